"""scripts/gpu-check.sh, the one call a GPU session runs, end to end on a CPU at toy scale (SMOKE=1 DEVICE=cpu):
every section but bench (tested in test_bench.py; at its --quick size it takes minutes here) runs, writes what the
summary reads, and on a CPU, where graphs take their eager stand-in, graph == eager holds exactly. GPU sessions are
rare and short: a script broken since the last one would cost one of them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_section_on_a_cpu_at_toy_scale(tmp_path):
    out = tmp_path / "gpu-check"
    env = os.environ | {"SMOKE": "1", "DEVICE": "cpu", "SECTIONS": "checks epochs attack grid",
                        "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], capture_output=True, text=True, env=env,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "FAILED" not in log and "Traceback" not in log, log[-6000:]

    checks = json.loads((out / "checks.json").read_text())
    assert [c["what"].split(",")[0] for c in checks] == ["PGD-20 fp32", "PGD-20 bf16", "train fp32",
                                                         "train fp32 deterministic", "train bf16"]
    for c in checks[:2]:
        assert c["examples_total"] > 0 and c["examples_max_abs_diff"] == 0 and c["acc_graph"] == c["acc_eager"]
    assert "acc_fp32" in checks[1]
    for c in checks[2:]:
        assert c["graph_loss"] == c["eager_loss"] == c["eager2_loss"] and c["weights_rel_graph_vs_eager"] == 0

    epochs = pd.read_csv(out / "epochs.csv")
    assert epochs.groupby("run").epoch.max().to_dict() == {"graphs-bf16": 2, "graphs-fp32": 2, "eager-bf16": 1}
    assert (epochs.seconds > 0).all() and (epochs.images_per_s > 0).all()
    grid = pd.read_csv(out / "concurrency.csv")
    assert grid.processes.tolist() == [1, 2] and (grid.aggregate_images_per_s > 0).all()
    for name, precision in (("attack.csv", "fp32"), ("attack-bf16.csv", "bf16")):
        rows = pd.read_csv(out / name)
        assert rows.attack.tolist() == ["pgd"] and rows.n.tolist() == [48]
        assert rows.attack_precision.tolist() == [precision] and rows.steps.tolist() == [20]

    summary = proc.stdout[proc.stdout.index("== summary"):]
    assert "cpu (smoke: 1)" in summary and "attack attack-bf16.csv: pgd 20 48 bf16" in summary
    assert [line.split(":")[0] for line in summary.splitlines() if "missing" in line] == ["bench-bf16.csv"]
    assert (out / "checks.json").exists() and not list(tmp_path.glob("tmp.*"))  # mktemp's data and runs: removed
