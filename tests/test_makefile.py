"""The Makefile's pipelines, run dry or on a stub hybridat (no training): what they write, and what they delete."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

STUB = """#!/bin/bash
# a stand-in for hybridat: writes its --out (train: a run folder); fails when $FAIL is in its command line
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
if [ -n "$FAIL" ] && [[ "$*" == *"$FAIL"* ]]; then
  [ "$1" = report ] && mkdir -p "$out" && echo half > "$out/report.md"
  echo "error: stub fails" >&2; exit 1
fi
case $1 in
  train) mkdir -p "$out"; echo m > "$out/model.safetensors";;
  report) mkdir -p "$out"; echo r > "$out/report.md"; echo summary > "$out/summary.txt";;
  *) mkdir -p "$(dirname "$out")"; echo x > "$out";;
esac
"""


def _make(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "HYBRIDAT_DATA_DIR"}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True,
                          env=clean | env, timeout=60)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """The Makefile beside an installed .venv whose hybridat is the stub."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "hybridat").write_text(STUB)
    (bin_ / "hybridat").chmod(0o755)
    (tmp_path / ".venv" / ".installed").touch()
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)  # ./data: CIFAR-10 is there
    (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").touch()
    os.utime(tmp_path / "pyproject.toml", (0, 0))  # older than .installed: install is done
    return tmp_path


def test_clean_demo_removes_what_demo_wrote_and_nothing_else(checkout):
    assert _make(checkout, "-j2", "demo").returncode == 0
    (checkout / "demo" / "notes.txt").write_text("mine")
    elsewhere = checkout / "elsewhere"
    elsewhere.mkdir()
    # a DEMO in the environment (exported for something else) is neither written into nor removed
    result = _make(checkout, "clean-demo", DEMO=str(elsewhere))
    assert result.returncode == 0, result.stderr
    assert elsewhere.is_dir() and sorted(os.listdir(checkout / "demo")) == ["notes.txt"]
    assert "rm -rf /runs" not in _make(checkout, "-n", "clean-demo", "DEMO=").stdout  # an empty name is refused
    (checkout / "demo" / "notes.txt").unlink()
    assert _make(checkout, "clean-demo").returncode == 0 and not (checkout / "demo").exists()


def test_a_report_that_fails_midway_is_redone(checkout):
    result = _make(checkout, "demo", FAIL="report")
    assert result.returncode != 0 and not (checkout / "demo" / "report" / "report.md").exists()
    result = _make(checkout, "demo")
    lines = result.stdout.strip().splitlines()  # the summary, then what a one-seed demo can and cannot say
    assert result.returncode == 0 and lines[-3] == "summary" and '"What make study finds"' in lines[-1]
    assert "train" not in result.stdout  # the stages that finished are not run again


def test_dry_runs_name_each_run_once():
    """-B: what each target runs from scratch, whatever this checkout has built already (make demo, make study)."""
    for target, trainings in [("demo", 2), ("mini", 16), ("study", 33), ("tables", 16)]:
        result = _make(ROOT, "-n", "-B", target)
        assert result.returncode == 0, result.stderr
        outs = [line.split("--out ")[1] for line in result.stdout.splitlines() if " train " in line]
        assert len(outs) == len(set(outs)) == trainings, target
    result = _make(ROOT, "-n", "-B", "tables", "SEEDS=0 1 2")
    assert sum(" train " in line for line in result.stdout.splitlines()) == 48


def test_cifar10_is_fetched_once_before_tests_and_trainings(checkout, tmp_path):
    """make test needs CIFAR-10 (the README: downloaded if missing) and make -j demo's trainings each downloaded it
    into one folder at once: one download step first, none when it is there."""
    data = tmp_path / "elsewhere"
    for target, first in [("test", "pytest"), ("demo", "train")]:
        lines = _make(checkout, "-n", "-j4", target, HYBRIDAT_DATA_DIR=str(data)).stdout.splitlines()
        fetch = [i for i, line in enumerate(lines) if "from hybridat import" in line]
        after = [i for i, line in enumerate(lines) if f" {first} " in f" {line} " or f"-m {first}" in line]
        assert len(fetch) == 1 and after and fetch[0] < min(after), (target, lines)
    (data / "cifar-10-batches-py").mkdir(parents=True)
    (data / "cifar-10-batches-py" / "test_batch").touch()
    assert "from hybridat import" not in _make(checkout, "-n", "demo", HYBRIDAT_DATA_DIR=str(data)).stdout


def test_makes_on_disjoint_seeds_build_one_grid_together(checkout, tmp_path):
    """The README's grid over several GPUs: `make data` first (it fetches CIFAR-10 when missing and trains nothing),
    then one `make tables SEEDS=g` per GPU at once; they write disjoint runs, and a last make over every seed, its
    report removed, only reports."""
    missing = str(tmp_path / "elsewhere")
    dry = _make(checkout, "-n", "data", HYBRIDAT_DATA_DIR=missing).stdout
    assert "from hybridat import" in dry and " train " not in dry
    assert _make(checkout, "data").returncode == 0
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "HYBRIDAT_DATA_DIR"}
    makes = [subprocess.Popen(["make", "--no-print-directory", "tables", f"SEEDS={seed}"], cwd=checkout, env=clean,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    for make in makes:
        _, err = make.communicate(timeout=60)
        assert make.returncode == 0, err
    runs = sorted(path.parent.name for path in (checkout / "tables" / "runs").glob("*/model.safetensors"))
    assert len(runs) == 32 and {run[-3:] for run in runs} == {"_s0", "_s1"}
    assert len(list((checkout / "tables" / "derived").glob("*_s[01]/eval.csv"))) == 10
    (checkout / "tables" / "report" / "report.md").unlink()
    result = _make(checkout, "tables", "SEEDS=0 1")
    assert result.returncode == 0 and result.stdout.splitlines()[0].startswith(".venv/bin/hybridat report ")
    assert " train " not in result.stdout and " attack " not in result.stdout


def test_every_pipelines_swap_bn_flags_are_accepted(tmp_path):
    """Each distinct swap-bn command of demo, mini, study and tables runs through the real CLI (on a 1/16-width
    dual-bn model and 16 random images): `make demo` stopped at its re-estimation on clean images when swap-bn began
    refusing PGD settings a clean pass ignores, and the dry runs above never run a command."""
    import shlex

    from typer.testing import CliRunner

    from conftest import fake_cifar10, tiny
    from hybridat.checkpoint import save_checkpoint
    from hybridat.cli import app

    parent = tmp_path / "parent.safetensors"
    save_checkpoint(tiny("dual-bn"), parent, run="r")
    data = fake_cifar10(tmp_path / "data", 16)
    commands = set()
    for target in ("demo", "mini", "study", "tables"):
        for line in _make(ROOT, "-n", "-B", target).stdout.splitlines():
            if " swap-bn " in line:
                words = shlex.split(line)
                args = words[words.index("swap-bn") + 1:]
                args = [str(parent) if a.endswith("model.safetensors") and a == args[0] else a for a in args]
                args = ["16" if prev == "--n" else a for prev, a in zip(["", *args], args)]  # 16 images, not 10,000
                commands.add(tuple(a for a in args if a != "--out" and not a.endswith("model.safetensors")))
    assert any("--reestimate=clean" in c for c in commands) and any("--reestimate=adv" in c for c in commands)
    for i, command in enumerate(sorted(commands)):
        reads_data = any(a.startswith("--reestimate") for a in command)  # the others refuse --data-dir
        extra = ["--data-dir", str(data)] * reads_data + ["--device", "cpu"] * ("--device" not in command)
        result = CliRunner().invoke(app, ["swap-bn", *command, *extra, "--out", str(tmp_path / f"out{i}.safetensors")])
        assert result.exit_code == 0, f"{command}: {result.output}"
