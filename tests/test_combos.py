"""Defects found by scripts/fuzz_combos.py (options that meet, environment variables, interruptions), one test each,
and the sweep keeping up with the CLI."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file

from hybridat.checkpoint import save_checkpoint
from hybridat.cli import OneLineUsageErrors, app
from hybridat.errors import HybridatError
from hybridat.files import atomic_path
from hybridat.interop import export_branch, import_checkpoint
from hybridat.models import ModelConfig
from hybridat.run import CSV, LAST, MODEL, STATE, run_training
from hybridat.train import TrainConfig

from conftest import fake_cifar10, perturb, script, tiny

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "report"


def _hybridat(args, cwd, env=None, timeout=120) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "hybridat", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _combos():
    return script("fuzz_combos")


def test_the_pairs_cover_every_option_of_every_command():
    """Every option of every command has valid values to pair (info has one argument, bench only long runs)."""
    combos = _combos()
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        if name in ("info", "bench"):
            continue
        assert set(combos.VALID[name]) == {p.name for p in command.params}, name
    pairs = [c for c in combos.pair_cases({"swap-bn"}) if c["option"] == "cross+swap_ap"]
    assert len(pairs) == 1 and {"--cross", "--swap-ap"} <= set(pairs[0]["args"])


def test_an_unknown_mplbackend_is_set_aside(tmp_path):
    """MPLBACKEND=nonsense: matplotlib raised at import, and report (and ns-gap) ended in a traceback."""
    done = _hybridat(["report", FIXTURES / "eval.csv", "--out", tmp_path / "rep"], tmp_path,
                     {"MPLBACKEND": "nonsense"})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and (tmp_path / "rep" / "accuracy.png").is_file()


def test_a_nested_atomic_write_makes_no_temp_of_a_temp(tmp_path):
    """ns-gap drew each plot through atomic_path onto its own temp path: killed there (SIGKILL), it left
    '..g-depth.png.PID.X.tmp.PID.Y.tmp', which no later run removed (remove_stale_temps looks for '.g-depth.png.')."""
    with atomic_path(tmp_path / "g.png") as tmp:
        with atomic_path(tmp) as inner:
            assert inner == tmp
            inner.write_bytes(b"x")
            assert [p.name for p in tmp_path.iterdir()] == [tmp.name]
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"] and (tmp_path / "g.png").read_bytes() == b"x"
    with pytest.raises(KeyError):  # a failure inside: the outer temp removed, nothing written
        with atomic_path(tmp_path / "h.png") as tmp:
            with atomic_path(tmp) as inner:
                inner.write_bytes(b"y")
                raise KeyError
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_ctrl_c_before_the_command_began_is_one_line(monkeypatch, capsys):
    """SIGINT while the command line was parsed (0.14 s into a report): typer turned it into exit code 130 and
    printed nothing; every other interruption says one line and exits 1."""
    def interrupted(self, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(OneLineUsageErrors, "invoke", interrupted)
    with pytest.raises(SystemExit) as done:
        app(["info", "m.safetensors"])
    assert done.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: interrupted before the command began; nothing "
                                                            "was written"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ALONE = """
import sys, time
import torch
from hybridat import runtime
from hybridat.errors import HybridatError
runtime.RENDEZVOUS_S = 3
t0 = time.monotonic()
try:
    with runtime.distributed(torch.device("cpu")):
        print("joined")
except HybridatError as e:
    print(f"{time.monotonic() - t0:.1f} {e}")
"""


@pytest.mark.parametrize("rank, fragment", [("0", "not all 2 processes met at 127.0.0.1:"),
                                            ("1", "rank 0 did not answer at 127.0.0.1:"),
                                            ("3", "RANK=3 in the environment, but WORLD_SIZE=2 has ranks 0 to 1")])
def test_stale_torchrun_variables_are_one_line_not_a_hang(rank, fragment, tmp_path):
    """RANK, WORLD_SIZE=2, MASTER_ADDR and MASTER_PORT left in a shell, one process: rank 0 waited torch's 30
    minutes for rank 1 (SIGTERM did not end it), rank 1 retried for rank 0 printing C++ stack traces, RANK=3 the
    same; now one line once RENDEZVOUS_S (here 3 s) is over, or at once."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "RANK": rank, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}
    env.pop("TORCHELASTIC_RUN_ID", None)
    done = subprocess.run([sys.executable, "-c", _ALONE], env=env, capture_output=True, text=True, timeout=60)
    seconds, _, line = done.stdout.strip().partition(" ")
    assert fragment in line and float(seconds) < 20, (done.stdout, done.stderr)
    assert "frame #" not in done.stderr, done.stderr


def test_two_processes_launched_without_torchrun_still_train(tmp_path):
    """The rendezvous of one's own launcher (RANK, WORLD_SIZE, MASTER_* set, no torchrun) still meets and trains."""
    fake_cifar10(tmp_path / "data", 32)
    port = str(_free_port())
    procs = []
    for rank in ("0", "1"):
        env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": rank, "LOCAL_RANK": rank,
                            "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        env.pop("TORCHELASTIC_RUN_ID", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "hybridat", "train", "--out", str(tmp_path / "run"),
                                       "--width", "0.0625", "--train-subset", "32", "--epochs", "1", "--steps", "1",
                                       "--batch-size", "8", "--quiet", "--device", "cpu", "--data-dir",
                                       str(tmp_path / "data")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_torch_file_named_safetensors_imports(tmp_path):
    """A torch.save state dict under a .safetensors name: its first bytes said torch, but torch.load, given the path,
    read it as safetensors ('does not load with torch.load(weights_only=True) ...: header too large')."""
    save_checkpoint(perturb(tiny("dual-bn")), tmp_path / "m.safetensors")
    export_branch(tmp_path / "m.safetensors", tmp_path / "e.pt", branch="adv", layout="torchvision")
    shutil.copy(tmp_path / "e.pt", tmp_path / "e.safetensors")
    done = import_checkpoint(tmp_path / "e.safetensors", tmp_path / "i.safetensors")
    assert done.layout == "torchvision" and done.model.config.norm == "bn"
    assert (tmp_path / "i.safetensors").is_file()


def _stop_after_epoch_1(row):
    raise KeyboardInterrupt


def test_resume_after_a_kill_between_the_first_checkpoint_and_its_state(tmp_path):
    """SIGINT (or SIGKILL) after epoch 1's last.safetensors was written and before its resume state: the folder held
    last.safetensors alone, `train --resume` refused it ('no resume.safetensors to resume from; --overwrite'),
    though the interrupted run had said '--resume goes on from the last epoch'. Now that run starts again and ends
    as one never interrupted; a last.safetensors of other settings is still refused."""
    data = fake_cifar10(tmp_path / "data", 16)
    config, cfg = ModelConfig("resnet18", "dual-bn", 0.0625), TrainConfig(steps=1, epochs=2, batch_size=8,
                                                                            train_subset=16)
    run_training(tmp_path / "ref", config, cfg, data_dir=data, graphs=False)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_training(out, config, cfg, data_dir=data, graphs=False, on_epoch=_stop_after_epoch_1)
    (out / STATE).unlink()  # the moment between the two writes
    (out / CSV).unlink()
    with pytest.raises(HybridatError, match="other settings|no resume.safetensors"):
        run_training(out, config, replace(cfg, seed=1), data_dir=data, graphs=False, resume=True)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [LAST]
    run_training(out, config, cfg, data_dir=data, graphs=False, resume=True)
    a, b = load_file(tmp_path / "ref" / MODEL), load_file(out / MODEL)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
