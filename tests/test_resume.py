"""Runs that survive: killed anywhere and resumed, a run ends bit-identical to one never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hybridat import run as run_module
from hybridat.errors import HybridatError
from hybridat.files import atomic_path, remove_stale_temps
from hybridat.models import ModelConfig
from hybridat.run import MODEL, STATE, run_training, weights_finite
from hybridat.train import TrainConfig

from conftest import fake_cifar10

ARGS = ["--width", "0.0625", "--train-subset", "256", "--epochs", "3", "--batch-size", "32", "--steps", "1",
        "--step", "4", "--quiet", "--device", "cpu"]
TIMING = ["seconds", "images_per_s"]  # the only columns allowed to differ


def _cli(data_dir, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "hybridat", "train", *ARGS, "--data-dir", str(data_dir), "--out", str(out), *extra]


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _rows(out: Path) -> int:
    try:
        return max(0, len((out / "train.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


def _same_run(a: Path, b: Path) -> None:
    """Bit-identical weights and the same train.csv (timings aside)."""
    wa, wb = load_file(a / MODEL), load_file(b / MODEL)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    fa, fb = (pd.read_csv(p / "train.csv").drop(columns=TIMING + ["run"]) for p in (a, b))
    pd.testing.assert_frame_equal(fa, fb)
    assert list(fa["epoch"]) == [1, 2, 3]


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
    """Two SIGKILLs (mid-epoch 2, then mid-epoch 3 of the resumed run), two resumes: the same model, bit for bit."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    data_dir = fake_cifar10(tmp_path / "data", 256)  # 10,000 image files would be read 4 times over
    done = subprocess.run(_cli(data_dir, ref), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for rows_before_kill, extra in ((1, []), (2, ["--resume"])):
        proc = subprocess.Popen(_cli(data_dir, out, *extra), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while _rows(out) < rows_before_kill and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if rows_before_kill == 1:  # a second process on the same folder is refused while the first trains
            with pytest.raises(HybridatError, match="another process is training"):
                run_training(out, CONFIG, CFG, data_dir=data_dir, resume=True)
        time.sleep(0.15)  # somewhere in the next epoch (or in its saves)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        assert not (out / MODEL).exists()
    done = subprocess.run(_cli(data_dir, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed after epoch" in done.stderr
    _same_run(ref, out)
    assert sorted(p.name for p in out.iterdir()) == [".lock", MODEL, "train.csv"]  # no state, no temp file


CFG = TrainConfig(epochs=3, batch_size=32, steps=1, step=4.0, train_subset=64)
CONFIG = ModelConfig("resnet18", "dual-bn", 0.0625)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the subprocesses have: faster on a shared 2-core machine, and one reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    run_training(out, CONFIG, CFG, data_dir=data_dir)
    return out


class Killed(BaseException):
    """Stands in for a kill at one point of the epoch's saves."""


@pytest.mark.parametrize("where", ["save_checkpoint", "save_state", "write_csv", "replace"])
def test_a_crash_between_any_two_saves_resumes_identically(where, reference, tmp_path, data_dir, monkeypatch):
    """Interrupted before each write of epoch 2 (last.safetensors, resume state, train.csv) or before the final
    rename: the resumed run ends with the reference's weights and rows."""
    out = tmp_path / "run"
    calls = {"n": 0}
    target = os if where == "replace" else run_module
    real = getattr(target, where)

    def crash(*args, **kwargs):
        calls["n"] += 1
        if Path(args[1]).name == MODEL if where == "replace" else calls["n"] == 2:  # epoch 2's write, or the rename
            raise Killed()
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(target, where, crash)
        with pytest.raises(Killed):
            run_training(out, CONFIG, CFG, data_dir=data_dir)
    assert not (out / MODEL).exists()
    (out / "eval.csv").write_text("mine")  # the user evaluated last.safetensors into the run folder meanwhile
    result = run_training(out, CONFIG, CFG, data_dir=data_dir, resume=True)
    assert result.resumed_from == {"save_checkpoint": 1, "save_state": 1, "write_csv": 2, "replace": 3}[where]
    assert (out / "eval.csv").read_text() == "mine"
    _same_run(reference, out)


def test_resume_of_a_finished_run_and_overwrite(reference, tmp_path, data_dir):
    out = tmp_path / "run"
    run_training(out, CONFIG, CFG, data_dir=data_dir)
    with pytest.raises(HybridatError, match="finished run"):
        run_training(out, CONFIG, CFG, data_dir=data_dir, resume=True)
    (out / "eval.csv").write_text("mine")  # a file of the user's: --overwrite never touches it
    with pytest.raises(HybridatError, match="finished run"):  # what the folder is, not the file beside it
        run_training(out, CONFIG, CFG, data_dir=data_dir)
    before = (out / MODEL).stat().st_mtime_ns
    old = {name: (out / name).read_bytes() for name in (MODEL, "train.csv")}

    def interrupt(*args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # --overwrite stopped in its first epoch: the finished run is kept whole
        run_training(out, CONFIG, CFG, data_dir=data_dir, overwrite=True, on_step=interrupt)
    assert {name: (out / name).read_bytes() for name in (MODEL, "train.csv")} == old
    assert sorted(os.listdir(out)) == [".lock", "eval.csv", MODEL, "train.csv"]
    run_training(out, CONFIG, CFG, data_dir=data_dir, overwrite=True)
    assert (out / MODEL).stat().st_mtime_ns != before and (out / "eval.csv").read_text() == "mine"
    _same_run(reference, out)


def test_a_step_to_non_finite_weights_is_divergence(tmp_path, data_dir):
    out = tmp_path / "run"
    with pytest.raises(HybridatError, match="training diverged"):
        run_training(out, CONFIG, TrainConfig(epochs=2, batch_size=32, steps=1, train_subset=64, lr=1e30),
                     data_dir=data_dir)
    assert not (out / MODEL).exists() and not (out / STATE).exists()
    model = torch.nn.Linear(2, 2)
    assert weights_finite(model)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    assert not weights_finite(model)


def test_artifacts_get_the_umask_mode_and_stale_temps_go(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.bin.{dead.pid}.deadbeef.tmp"
    stale.write_bytes(b"left by a SIGKILL")
    mine = tmp_path / f".out.bin.{os.getpid()}.cafecafe.tmp"  # a live writer's: kept
    mine.write_bytes(b"")
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "out.bin") as tmp:
            os.chmod(tmp, 0o600)  # as safetensors leaves it
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o640
    assert not stale.exists() and mine.exists()
    remove_stale_temps(tmp_path / "out.bin")
    assert mine.exists()


def test_sigterm_removes_the_temp_file(tmp_path):
    """A SIGTERM while an artifact is half written leaves neither the artifact nor its temp file."""
    script = (f"import sys, time\nfrom hybridat.files import atomic_path, signals_interrupt\n"
              f"with signals_interrupt():\n  with atomic_path({str(tmp_path / 'a.csv')!r}) as tmp:\n"
              f"    tmp.write_text('half'); print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0 and list(tmp_path.iterdir()) == []


_DDP_DRIVER = """
import os, sys
from pathlib import Path
import torch, torch.distributed as dist
from hybridat import run
from hybridat.errors import HybridatError
from hybridat.models import ModelConfig
from hybridat.train import TrainConfig

dist.init_process_group("gloo")  # joined here once: every run_training below keeps the group
data, root = Path(sys.argv[1]), Path(sys.argv[2])
config = ModelConfig("resnet18", "dual-bn", width=0.0625)
cfg = TrainConfig(epochs=2, steps=1, step=8, batch_size=32, train_subset=64)
run.run_training(root / "whole", config, cfg, data_dir=data)
train = run.train

def stop_after_epoch_1(*args, **kwargs):  # every rank stops once rank 0 has saved epoch 1
    for row in train(*args, **kwargs):
        yield row
        raise HybridatError("killed")

run.train = stop_after_epoch_1
try:
    run.run_training(root / "resumed", config, cfg, data_dir=data)
except HybridatError:
    pass
dist.barrier()
run.train = train
assert (root / "resumed" / STATE).is_file()
result = run.run_training(root / "resumed", config, cfg, data_dir=data, resume=True)
assert [row["epoch"] for row in result.rows] == ([] if dist.get_rank() else [1, 2]), result.rows  # rank 0's rows
dist.barrier()
os._exit(0)  # no interpreter finalization after gloo: it may abort a rank (see runtime.exit_process)
""".replace("STATE", repr(STATE))


def test_a_resumed_torchrun_run_is_bit_identical(tmp_path):
    """Two gloo ranks: a run stopped after epoch 1 and resumed ends with the uninterrupted run's model. Rank 1 used to
    go on from its own running statistics, while a resumed rank 1 loads rank 0's: the runs parted in epoch 2. Only
    rank 0 returns rows (a resumed rank 1 returned the state's, and train printed a second, stale last line)."""
    data = fake_cifar10(tmp_path / "data", 16)
    driver = tmp_path / "driver.py"
    driver.write_text(_DDP_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(data), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    whole, resumed = (load_file(tmp_path / name / MODEL) for name in ("whole", "resumed"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    rows = [pd.read_csv(tmp_path / name / "train.csv").drop(columns=TIMING + ["run"]) for name in ("whole", "resumed")]
    pd.testing.assert_frame_equal(*rows)
    assert list(rows[0]["epoch"]) == [1, 2]


def test_a_folder_that_turned_read_only_is_named_as_the_output(tmp_path, monkeypatch):
    """The output's folder was writable when checked and is read-only (a remount, a full quota) when the artifact is
    written, hours later: the error names the artifact, not its hidden temp file (seen with `mount -o remount,ro`:
    'Read-only file system: /mnt/.e.csv.4107.6577b8c6.tmp'), and nothing is left."""
    import errno

    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError) as caught:
        with atomic_path(tmp_path / "e.csv") as tmp:
            tmp.write_text("never")
    assert caught.value.filename == str(tmp_path / "e.csv") and caught.value.errno == errno.EROFS
    assert list(tmp_path.iterdir()) == []


SMALL = TrainConfig(epochs=2, batch_size=16, steps=1, train_subset=16)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, Path]:
    """A run folder stopped after epoch 1 of 2 (last.safetensors, resume state, train.csv) and its data."""
    root = tmp_path_factory.mktemp("stopped")
    data = fake_cifar10(root / "data", 16)

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(root / "run", CONFIG, SMALL, data_dir=data, on_epoch=stop)
    return root / "run", data


def _damage(tensors: dict, meta: dict, what: str) -> None:
    weight = "model.conv1.weight"
    {"no generator": lambda: tensors.pop("rng.torch"),
     "a generator of the wrong size": lambda: tensors.__setitem__("rng.torch", torch.zeros(3, dtype=torch.uint8)),
     "a weight missing": lambda: tensors.pop(weight),
     "a weight of the wrong shape": lambda: tensors.__setitem__(weight, torch.zeros(3)),
     "NaN weights": lambda: tensors.__setitem__(weight, torch.full_like(tensors[weight], float("nan"))),
     "epoch -1": lambda: meta.__setitem__("epoch", "-1"),
     "epoch past the last": lambda: meta.__setitem__("epoch", "5"),
     "damaged optimizer scalars": lambda: meta.__setitem__("optim_scalars", json.dumps({"x": 1})),
     "a damaged Python generator": lambda: meta.__setitem__("rng_python", "[1]")}[what]()


@pytest.mark.parametrize("what, message", [
    ("no generator", "not a readable resume state (no rng.torch)"),
    ("a generator of the wrong size", "does not fit this run (Expected a CPUGeneratorImplState of size"),
    ("a weight missing", "does not fit this run (Missing key(s) in state_dict: \"conv1.weight\""),
    ("a weight of the wrong shape", "does not fit this run (size mismatch for conv1.weight"),
    ("NaN weights", "holds non-finite weights"),
    ("epoch -1", "not a readable resume state (epoch -1 of 2)"),
    ("epoch past the last", "not a readable resume state (epoch 5 of 2)"),
    ("damaged optimizer scalars", "not a readable resume state (damaged optimizer scalars)"),
    ("a damaged Python generator", "not a readable resume state (a damaged Python generator state)")])
def test_a_damaged_resume_state_is_one_line_and_changes_nothing(what, message, stopped, tmp_path):
    """A resume state whose header reads but whose contents are damaged: a traceback from restore_state (KeyError,
    torch's RuntimeError, ValueError), or, for an impossible epoch, a 'finished' model of the wrong epoch."""
    run, data = stopped
    out = tmp_path / "run"
    shutil.copytree(run, out)
    with safe_open(out / STATE, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    _damage(tensors, meta, what)
    save_file(tensors, out / STATE, metadata=meta)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(HybridatError, match="--overwrite to start over") as e:
        run_training(out, CONFIG, SMALL, data_dir=data, resume=True)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
