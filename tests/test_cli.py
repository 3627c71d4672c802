"""The command line on real CIFAR-10: train -> attack -> info, and one-line errors for bad input."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from typer.testing import CliRunner

import torch

from hybridat.checkpoint import load_checkpoint
from hybridat.models import norm_layers
from hybridat.cli import app

SMALL = ["--width", "0.0625", "--train-subset", "256", "--epochs", "2", "--batch-size", "64", "--steps", "2",
         "--step", "4", "--quiet", "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "dual"
    result = invoke("train", "--norm", "dual-bn", "--data-dir", data_dir, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_checkpoint_and_epoch_rows(trained):
    frame = pd.read_csv(trained / "train.csv")
    assert list(frame["epoch"]) == [1, 2]
    assert (frame["images"] == 256).all()
    assert frame[["acc_adv", "acc_clean"]].notna().all().all()
    ckpt = load_checkpoint(trained / "model.safetensors")
    assert ckpt.config.norm == "dual-bn" and ckpt.config.width == 0.0625
    assert ckpt.meta("train")["steps"] == 2 and ckpt.meta("seed") == 0
    assert ckpt.meta("train")["amp"] is False  # fp32 unless --amp; the precision is recorded
    assert frame["checkpoint_hash"].iloc[-1] == ckpt.hash


def test_attack_writes_one_row_per_branch_and_attack(trained, tmp_path, data_dir):
    out = tmp_path / "eval.csv"
    result = invoke("attack", trained / "model.safetensors", "--n", "64", "--attack", "clean", "--attack", "pgd",
                    "--steps", "2", "--steps", "3", "--data-dir", data_dir, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert len(frame) == 6  # 2 branches x (clean, PGD-2, PGD-3)
    assert set(frame["branch"]) == {"adv", "clean"}
    assert sorted(frame["steps"].dropna().astype(int)) == [2, 2, 3, 3]
    assert (frame["n"] == 64).all() and frame["accuracy"].between(0, 1).all()
    assert (frame["checkpoint_hash"] == load_checkpoint(trained / "model.safetensors").hash).all()
    clean, pgd = (frame[(frame.attack == a) & (frame.branch == "adv")]["accuracy"].iloc[0] for a in ("clean", "pgd"))
    assert pgd <= clean


def test_attack_amp_rows_say_bf16_for_the_crafted_attacks_only(trained, tmp_path, data_dir):
    out = tmp_path / "eval.csv"
    result = invoke("attack", trained / "model.safetensors", "--n", "32", "--attack", "clean", "--attack", "fgsm",
                    "--attack", "pgd", "--steps", "2", "--amp", "--branch", "adv", "--data-dir", data_dir,
                    "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out).set_index("attack")
    assert frame.attack_precision.to_dict() == {"clean": "fp32", "fgsm": "bf16", "pgd": "bf16"}
    assert "PGD-2 (bf16)" in result.output and "FGSM (bf16)" in result.output


def test_ns_gap_protocol_flags_are_recorded_in_every_row(trained, tmp_path, data_dir):
    out = tmp_path / "gap.csv"
    result = invoke("ns-gap", trained / "model.safetensors", "--measure", "eval", "--reference", "running",
                    "--no-noise-clip", "--eps", "8", "--n", "16", "--steps", "1", "--step", "2", "--noise", "gaussian",
                    "--start", "normal", "--data-dir", data_dir, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    frame, channels = pd.read_csv(out), pd.read_csv(tmp_path / "gap-channels.csv")
    for f in (frame, channels):  # the AP rows too: they sit next to the NS gap of this protocol in `report`
        assert (f["mode"] == "eval").all() and (f["reference"] == "running").all() and (~f["noise_clip"]).all()
        assert (f["step"] == 2).all() and (f["steps"] == 1).all() and (f["noise"] == "gaussian").all()
        assert (f["attack_branch"] == "adv").all() and (f["start"] == "normal").all()
    assert set(frame.pair) == {"adv-running", "noise-running", "clean-running", "adv-clean"}  # adv-clean: AP rows
    assert set(frame.pair[frame.kind == "ap"]) == {"adv-clean"}
    assert set(channels.domain) == {"clean", "adv", "noise", "running"}
    assert (tmp_path / "gap-depth.png").stat().st_size > 0 and (tmp_path / "gap-channels.png").stat().st_size > 0


def test_attack_runs_and_records_the_autoattack_asked_for(trained, tmp_path, data_dir):
    """--aa-attacks/--aa-restarts: the row says what ran (never the standard version's name), and so does the
    printed label; the standard version is "autoattack" with its attacks and restarts recorded."""
    out = tmp_path / "aa.csv"
    common = ["--n", "16", "--branch", "adv", "--data-dir", data_dir, "--device", "cpu"]
    result = invoke("attack", trained / "model.safetensors", "--attack", "autoattack", "--aa-attacks", "apgd-ce",
                    "--aa-restarts", "2", *common, "--out", out)
    assert result.exit_code == 0, result.output
    assert "APGD-CE (2 restarts)" in result.output
    row = pd.read_csv(out).iloc[0]
    assert (row.attack, row.aa_attacks, row.aa_restarts, row.aa_eot_iter) == ("autoattack-custom", "apgd-ce", 2, 1)
    clean = invoke("attack", trained / "model.safetensors", "--attack", "clean", *common, "--out", tmp_path / "c.csv")
    assert clean.exit_code == 0 and pd.read_csv(tmp_path / "c.csv").aa_attacks.isna().all()  # no AA: empty
    assert row.accuracy <= pd.read_csv(tmp_path / "c.csv").accuracy.iloc[0]
    rand = invoke("attack", trained / "model.safetensors", "--attack", "autoattack", "--aa-version", "rand",
                  "--n", "4", "--branch", "adv", "--data-dir", data_dir, "--device", "cpu", "--out", tmp_path / "r.csv")
    assert rand.exit_code == 0, rand.output
    # report reads every attack name the command writes: each run gets its own column
    result = invoke("report", out, tmp_path / "c.csv", tmp_path / "r.csv", "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    columns = pd.read_csv(tmp_path / "report" / "cross-bn.csv").columns
    assert {"adv: APGD-CE (2 restarts)", "adv: AA-rand"} <= set(columns)


def test_info_prints_config(trained):
    result = invoke("info", trained / "model.safetensors")
    assert result.exit_code == 0
    assert "dual-bn" in result.output and "adv, clean" in result.output


def test_info_rows_come_from_the_library(trained):
    import hybridat

    rows = dict(hybridat.checkpoint_info(trained / "model.safetensors"))
    ckpt = load_checkpoint(trained / "model.safetensors")
    assert rows["hash"] == ckpt.hash and rows["norm"] == "dual-bn" and rows["branches"] == "adv, clean"
    assert rows["NS sets / AP sets"] == "2 / 2" and "unfinished" not in rows and "weights" not in rows
    assert int(rows["parameters"].replace(",", "")) == sum(p.numel() for p in ckpt.model.parameters())
    output = invoke("info", trained / "model.safetensors").output
    assert all(key in output for key in rows)  # the command shows every row


@pytest.mark.parametrize("args,message", [
    (["attack", "missing.safetensors", "--out", "x.csv"], "no checkpoint"),
    (["info", "README.md"], "README.md is a text file, not a checkpoint"),
    (["train", "--norm", "cross-bn", "--loss", "madry", "--out", "never"], "use --loss hybrid"),
    (["train", "--epochs", "0", "--out", "never"], "epochs"),
])
def test_bad_input_is_one_line_and_exit_1(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("not a checkpoint")
    result = invoke(*args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "never").exists() and not (tmp_path / "x.csv").exists()


def test_torchrun_ddp_on_cpu(tmp_path, data_dir):
    """Two gloo processes train one model through DistributedDataParallel; rank 0 writes."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hybridat",
           "train", "--norm", "dual-bn", "--loss", "madry", "--data-dir", str(data_dir), "--out", str(out), *SMALL]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    # on failure, every rank's own last lines (torchrun's summary alone names the signal, not its cause)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-8000:]}"
    assert "Warning" not in proc.stderr, proc.stderr  # DDP's grad-strides warning, on every rank
    frame = pd.read_csv(out / "train.csv")
    assert list(frame["epoch"]) == [1, 2] and (frame["images"] == 256).all()  # both ranks' images counted
    assert load_checkpoint(out / "model.safetensors").config.norm == "dual-bn"


@pytest.mark.parametrize("code, status, printed", [(0, 0, ""), (1, 1, ""), (None, 0, ""), ("why", 1, "why\n")])
def test_a_rank_exits_without_finalization(code, status, printed, monkeypatch, capsys):
    """A process that was a rank of a process group leaves by os._exit with sys.exit's status, streams flushed: in
    the interpreter's finalization a gloo worker thread still releasing the last collective's tensors takes the GIL
    and aborts the process (SIGABRT after the model was written: a core of it showed that stack). Any other process
    exits as usual."""
    from hybridat import runtime

    with pytest.raises(SystemExit) as done:
        runtime.exit_process(code)
    assert done.value.code == code
    left = []
    monkeypatch.setattr(runtime, "_joined_group", True)
    monkeypatch.setattr(runtime.os, "_exit", left.append)
    runtime.exit_process(code)
    assert left == [status] and capsys.readouterr().err == printed


@pytest.mark.parametrize("held", ["finished run", "lock", "batch 1"])
def test_torchrun_refusal_is_one_line_per_rank(held, tmp_path):
    """A folder rank 0 refuses stops rank 1 too with the same line (it died of gloo's 'Connection reset by peer'
    traceback, waiting at a barrier for a rank that had left); a global batch below the ranks is named as such
    before the folder is made (was: 'need 0 <= rank < world_size <= batch_size')."""
    out = tmp_path / "run"
    if held == "batch 1":
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "hybridat", "train", "--data-dir", str(tmp_path), "--out", str(out), "--device",
                               "cpu", *SMALL, "--batch-size", "1"], capture_output=True, text=True,
                              env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=120)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and errors == ["error: batch_size 1 is below the 2 processes of this run: each "
                                                   "takes at least one image per step (--batch-size is the global "
                                                   "batch)"] * 2, proc.stderr
        assert not out.exists()
        return
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"a finished run's model")
    lock = None
    if held == "lock":
        import fcntl
        (out / "model.safetensors").unlink()
        lock = open(out / ".lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hybridat",
           "train", "--data-dir", str(tmp_path), "--out", str(out), "--device", "cpu", *SMALL]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                              timeout=120)
    finally:
        if lock is not None:
            lock.close()
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    expected = "holds a finished run" if held == "finished run" else "another process is training"
    assert proc.returncode == 1 and len(errors) == 2 and all(expected in line for line in errors), proc.stderr
    assert "[rank" not in proc.stderr  # no rank printed a traceback (torchrun prefixes their lines)
    assert os.listdir(out) == [".lock"] if held == "lock" else sorted(os.listdir(out)) == [".lock", "model.safetensors"]


_DOWNLOAD_DRIVER = """
import os, sys, time
from pathlib import Path
import torchvision
sys.path.insert(0, sys.argv[3])
from conftest import fake_cifar10
from hybridat.models import ModelConfig
from hybridat.run import run_training
from hybridat.runtime import exit_process
from hybridat.train import TrainConfig

def download(root, train, download):  # stands in for torchvision's CIFAR10(download=True): slow, as a download is
    with open(Path(sys.argv[2]) / "downloads", "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    time.sleep(1)
    fake_cifar10(Path(root), 16)

torchvision.datasets.CIFAR10 = download
run_training(Path(sys.argv[2]) / "run", ModelConfig("resnet18", "bn", width=0.0625),
             TrainConfig(epochs=1, steps=1, step=8, batch_size=32), data_dir=sys.argv[1])
exit_process(0)  # as the CLI leaves: no interpreter finalization after gloo, which may abort a rank
"""


def test_torchrun_downloads_on_rank_0_only(tmp_path):
    """A missing dataset is downloaded once, by rank 0; the other ranks read it after (both downloaded into one
    folder at once)."""
    data = tmp_path / "data"
    data.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(_DOWNLOAD_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(data), str(tmp_path), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "downloads").read_text().split() == ["0"]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_all_five_commands_chain(trained, tmp_path, data_dir):
    """train (fixture) -> swap-bn -> attack -> ns-gap -> report, on real CIFAR-10."""
    runs = tmp_path / "runs"
    parent = trained / "model.safetensors"
    crossed = runs / "cross" / "model.safetensors"
    assert invoke("swap-bn", parent, "--cross", "--out", crossed, "--device", "cpu").exit_code == 0
    reest = runs / "reest" / "model.safetensors"
    result = invoke("swap-bn", parent, "--reestimate", "adv", "--branch", "clean", "--n", "64", "--steps", "1",
                    "--step", "3", "--from-layer", "10", "--data-dir", data_dir, "--device", "cpu", "--out", reest)
    assert result.exit_code == 0, result.output
    op = load_checkpoint(reest).meta("operation")
    assert (op["layers"], op["step"], op["steps"], op["domain"]) == (list(range(10, 20)), 3.0, 1, "adv")
    before, after = load_checkpoint(parent).model.state_dict(), load_checkpoint(reest).model.state_dict()
    names = [n for n, _ in norm_layers(load_checkpoint(parent).model)]
    changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(names[10:])  # only layers 10 onward were re-estimated
    for ckpt in (parent, crossed, reest):
        out = runs / ckpt.parent.name / "eval.csv"
        result = invoke("attack", ckpt, "--n", "32", "--steps", "2", "--data-dir", data_dir, "--device", "cpu",
                        "--out", out)
        assert result.exit_code == 0, result.output
    gap = runs / "nsgap" / "fixap.csv"
    result = invoke("ns-gap", parent, "--fix-ap", "--eps", "16", "--n", "32", "--steps", "2", "--data-dir",
                    data_dir, "--device", "cpu", "--out", gap)
    assert result.exit_code == 0, result.output
    assert (runs / "nsgap" / "fixap-depth.png").stat().st_size > 0
    frame = pd.read_csv(gap)
    assert {"ns", "ap"} == set(frame["kind"]) and (frame["checkpoint_hash"] == load_checkpoint(parent).hash).all()
    assert (frame["train_epochs"] == 2).all() and (frame["loss_name"] == "hybrid").all()  # the training it measured
    evals = pd.read_csv(runs / "reest" / "eval.csv")
    assert (evals["train_steps"] == 2).all() and (evals["train_subset"] == 256).all()  # inherited from the parent

    result = invoke("report", runs, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    # it prints the findings and where the tables and figures are, nothing wider than a terminal
    printed = (tmp_path / "report" / "summary.txt").read_text(encoding="utf-8")
    assert printed in result.output and "(5) Two-task variants" in printed and "—" not in printed
    assert printed.splitlines()[-1].startswith("Figures: ") and "accuracy.png" in printed.splitlines()[-1]
    table4 = pd.read_csv(tmp_path / "report" / "test-time.csv").set_index("operation")
    assert table4.loc["as trained", "adv: clean"] != "—" and table4.loc["cross", "adv: clean"] != "—"
    assert any(op.startswith("reestimate clean NS on adv data") for op in table4.index)
    table5 = pd.read_csv(tmp_path / "report" / "ns-gap.csv")
    assert len(table5) == 20 and (table5["fix-AP adv: adv-clean mean"] != "—").all()
    assert (tmp_path / "report" / "ns-gap.png").exists() and (tmp_path / "report" / "report.md").exists()


def test_swap_bn_refuses_its_input_and_single_branch_models(trained, tmp_path, data_dir):
    parent = trained / "model.safetensors"
    before = parent.read_bytes()
    result = invoke("swap-bn", parent, "--cross", "--out", parent)
    assert result.exit_code == 1 and "error:" in result.output and parent.read_bytes() == before
    single = tmp_path / "bn"
    assert invoke("train", "--norm", "bn", "--data-dir", data_dir, "--out", single, *SMALL).exit_code == 0
    result = invoke("swap-bn", single / "model.safetensors", "--cross", "--out", tmp_path / "x.safetensors")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()
    result = invoke("swap-bn", parent, "--cross", "--swap-ap", "--out", tmp_path / "y.safetensors")
    assert result.exit_code == 1 and "exactly one" in result.output


def test_a_diverging_run_fails_clearly_and_leaves_no_model(tmp_path, data_dir):
    out = tmp_path / "nan"
    result = invoke("train", "--norm", "bn", "--lr", "1e30", "--data-dir", data_dir, "--out", out, *SMALL)
    assert result.exit_code == 1 and "training diverged" in result.output, result.output
    assert not (out / "model.safetensors").exists()
    frame = pd.read_csv(out / "train.csv")
    assert frame["loss"].isna().iloc[-1] or not frame["loss"].iloc[-1] < float("inf")


@pytest.mark.parametrize("norm", ["cross-bn", "cross-bn-adv"])
def test_one_sided_cross_bn_trains_from_scratch(tmp_path, data_dir, norm):
    """The authors' Cross-BN (and its other direction) trains on real CIFAR-10 where the two-way swap diverges."""
    out = tmp_path / norm
    small = ["--width", "0.125", "--train-subset", "512", "--epochs", "2", "--batch-size", "64", "--steps", "2",
             "--step", "4", "--quiet", "--device", "cpu"]
    result = invoke("train", "--norm", norm, "--data-dir", data_dir, "--out", out, *small)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "train.csv")
    assert list(frame.epoch) == [1, 2]
    assert frame[["loss", "loss_adv", "loss_clean"]].abs().max().max() < 10  # finite and not blowing up
    # every row carries the training config it came from
    row = frame.iloc[-1]
    assert (row.train_epochs, row.train_steps, row.train_step, row.train_subset, row.width) == (2, 2, 4, 512, 0.125)
    assert (row.train_batch_size, row.train_lr, row.dataset, row.train_amp) == (64, 0.1, "cifar10", False)
    ckpt = load_checkpoint(out / "model.safetensors")
    assert ckpt.config.norm == norm
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        for branch in ("adv", "clean"):
            assert torch.isfinite(ckpt.model(x, branch)).all()


def test_cross_bn_swap_diverges_with_its_reason(tmp_path, data_dir):
    out = tmp_path / "swap"
    result = invoke("train", "--norm", "cross-bn-swap", "--data-dir", data_dir, "--out", out, "--width", "0.125",
                    "--train-subset", "256", "--epochs", "1", "--batch-size", "64", "--steps", "2", "--step", "4",
                    "--quiet", "--device", "cpu")
    assert result.exit_code == 1
    assert "training diverged" in result.output and "variance ratio" in result.output
    assert "Traceback" not in result.output and not (out / "model.safetensors").exists()


def test_the_commands_start_without_importing_torchvision():
    """Importing torchvision (for downloads only) costs every command ~1.3 s of start-up and ~200 MB: `hybridat
    info` on a checkpoint took 5.3 s, most of it imports. Only a download imports it."""
    code = "import sys, hybridat.cli, hybridat.data, hybridat.analysis, hybridat.report, hybridat.interop, " \
           "hybridat.run, hybridat.recombine, hybridat.evaluate; print('torchvision' in sys.modules)"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_train_progress_shows_the_first_step_and_the_time_left(monkeypatch, tmp_path):
    """The bar is filled in at the first step, not the tenth (a full-width step on a CPU takes about a minute:
    'epoch 0 step 0/None' for ten minutes), and says how long the run has left, at the pace of the steps alone: the
    time before the first step's end (reading the data, building the model, cuDNN's search) made the first epoch's
    ETA several times too long."""
    import hybridat.cli
    import hybridat.run
    from hybridat.train import step_sums

    now = [0.0]
    monkeypatch.setattr(hybridat.cli, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    y = torch.zeros(4, dtype=torch.long)
    sums = step_sums(torch.tensor(2.0), {"adv": torch.zeros(4, 10), "clean": torch.zeros(4, 10)}, y)

    def steps(out, config, cfg, *, on_step, **kwargs):
        now[0] = 100.0  # 100 s of start-up, then the first step ends
        on_step(1, 1, 50, sums)  # epoch 1 of 3, step 1 of 50
        now[0] = 109.0  # 9 more steps at 1 s each
        on_step(1, 10, 50, sums * 10)
        raise KeyboardInterrupt  # the bar's last state is printed when it stops

    monkeypatch.setattr(hybridat.run, "run_training", steps)
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), "--epochs", "3", "--width", "0.0625"])
    assert result.exit_code == 1
    assert "epoch 1/3" in result.output and "step 10/50" in result.output, result.output
    # 40 steps left in this epoch and 100 in the two after, at 1 s a step (with start-up counted in: 0:25:26)
    assert "ETA 0:02:20" in result.output and "  4 img" in result.output, result.output  # img/s: cut at 80 columns


_TORCH_LOADS_WITH = """
import os, sys
seen = []
class Watch:  # notes the policy at the moment torch (and with it libgomp, which reads it once) is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Watch())
import hybridat.cli
print(seen[0])
"""


@pytest.mark.parametrize("makeflags, given, policy", [
    (" -j2 --jobserver-auth=3,4", None, "PASSIVE"), ("k -j", None, "PASSIVE"), (" -j2", "ACTIVE", "ACTIVE"),
    (None, None, None), (" -j1", None, None)])
def test_under_parallel_make_torch_loads_with_waiting_openmp_threads_asleep(makeflags, given, policy):
    """Two runs sharing the cores under `make -j2` ran 10x slower with OpenMP's spinning waits (README, Speed): the
    command sets OMP_WAIT_POLICY=PASSIVE before torch loads when make runs jobs in parallel, keeps a policy the user
    set, and leaves a run alone (where spinning is a third faster) as it was."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MAKEFLAGS")}
    env |= ({"MAKEFLAGS": makeflags} if makeflags else {}) | ({"OMP_WAIT_POLICY": given} if given else {})
    done = subprocess.run([sys.executable, "-c", _TORCH_LOADS_WITH], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(policy)


def test_amp_on_a_cpu_of_emulated_bf16_says_so_once_work_has_begun(monkeypatch, trained, tmp_path, data_dir):
    """On a CPU without native bf16 (AVX2 only) --amp ran a full-width training step 22x slower than fp32, with
    nothing said; now train (at its first step, --quiet too), attack and bench say so in one line. Bad input still
    gets its one error line alone: the note comes once every check has passed."""
    import hybridat.cli
    from hybridat.runtime import bf16_note

    assert bf16_note(torch.device("cuda")) is None  # asked of CPUs only, without touching CUDA
    assert (bf16_note(torch.device("cpu")) is None) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    monkeypatch.setattr(hybridat.cli, "bf16_note", lambda device: "note: emulated bf16 here")
    small = [*SMALL[:5], "1", *SMALL[6:]]  # one epoch
    for args, notes in ((["--amp"], 1), ([], 0)):
        result = invoke("train", "--data-dir", data_dir, "--out", tmp_path / f"run{notes}", *small, *args)
        assert result.exit_code == 0, result.output
        assert result.output.count("note: emulated bf16 here") == notes, result.output
    result = invoke("attack", trained / "model.safetensors", "--n", "8", "--steps", "1", "--amp", "--data-dir",
                    data_dir, "--device", "cpu", "--out", tmp_path / "e.csv")
    assert result.exit_code == 0 and result.output.count("note: emulated bf16 here") == 1, result.output
    result = invoke("train", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "bad", *small, "--amp")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error:"), result.output
