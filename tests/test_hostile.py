"""Hostile input, as a new user would give it: every case is one clear line (or a clean success) and no input changes.

One table: (case, command, fragment the one-line message must hold, exit code). Each case runs in a fresh copy of a
workspace holding checkpoints (sound, unfinished, NaN, hostile metadata), CSVs, run folders and a tiny fake
CIFAR-10; afterwards every file that was there is byte-identical and, for a failing case, nothing new exists
(no output, no temp file, no created data folder) but a run folder's lock file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from hybridat.checkpoint import load_checkpoint, save_checkpoint
from hybridat.cli import app
from hybridat.errors import HybridatError
from hybridat.interop import export_branch
from hybridat.models import ModelConfig, build_model
from hybridat.run import identity, save_state
from hybridat.train import TrainConfig, make_optimizer

from conftest import fake_cifar10, perturb, tiny

TO_IMPORT = "a checkpoint of other code (.pt, .pth, .safetensors) becomes one with `hybridat import`"
FIXTURES = Path(__file__).parent / "fixtures" / "report"
TRAIN_META = {"loss": "hybrid", "eps": 8.0, "epochs": 2, "steps": 1, "dataset": "cifar10"}
LONG = "x" * 240 + ".csv"  # 244 bytes: a legal name, but its temp name would pass 255
ROOT = os.geteuid() == 0  # permissions do not stop root
FAST = ["--device", "cpu", "--data-dir", "data"]
TRAIN = ["train", "--width", "0.0625", "--train-subset", "16", "--epochs", "2", "--steps", "1", "--quiet", *FAST]


def _rewrite(src: Path, dst: Path, **changes) -> None:
    """A copy of checkpoint src whose hybridat.<key> metadata is replaced (None deletes the key)."""
    with safe_open(src, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    for key, value in changes.items():
        meta.pop(f"hybridat.{key}", None) if value is None else meta.__setitem__(f"hybridat.{key}", value)
    save_file(tensors, dst, metadata=meta)


def _build(ws: Path) -> None:
    fake_cifar10(ws / "data", 16)
    fake_cifar10(ws / "empty-data", 0)
    model = perturb(tiny("dual-bn"))
    meta = {"train": TRAIN_META, "seed": "0", "run": "r"}
    save_checkpoint(model, ws / "m.safetensors", **meta, epoch="2")
    save_checkpoint(model, ws / "last.safetensors", **meta, epoch="1")  # epoch 1 of 2: unfinished
    save_checkpoint(model, ws / "markup.safetensors", train=TRAIN_META, seed="[bold]0", run="[/]", epoch="2")
    (ws / "link.safetensors").symlink_to("m.safetensors")
    with torch.no_grad():
        nan = perturb(tiny("dual-bn"))
        next(nan.parameters()).fill_(float("nan"))
    save_checkpoint(nan, ws / "nan.safetensors", **meta, epoch="2")
    config = json.loads(model.config.to_json())
    _rewrite(ws / "m.safetensors", ws / "huge.safetensors", config=json.dumps(config | {"width": 16.0}))
    _rewrite(ws / "m.safetensors", ws / "width-str.safetensors", config=json.dumps(config | {"width": "64"}))
    _rewrite(ws / "m.safetensors", ws / "no-arch.safetensors", config=json.dumps({"norm": "bn"}))
    _rewrite(ws / "m.safetensors", ws / "not-json.safetensors", config="{not json")
    _rewrite(ws / "m.safetensors", ws / "train-list.safetensors", train="[1, 2]")
    _rewrite(ws / "m.safetensors", ws / "epoch-str.safetensors", epoch='"two"')
    _rewrite(ws / "m.safetensors", ws / "classes-bool.safetensors", config=json.dumps(config | {"num_classes": True}))
    (ws / "csv").mkdir()
    shutil.copy(FIXTURES / "eval.csv", ws / "csv" / "eval.csv")
    shutil.copy(FIXTURES / "nsgap.csv", ws / "csv" / "ns-gap.csv")  # named like the report's table 5
    for name, value in (("acc-high", 7.5), ("acc-low", -3), ("acc-nan", "nan"), ("acc-empty", ""),
                        ("acc-text", "0.5x")):
        frame = pd.read_csv(FIXTURES / "eval.csv", dtype=str, keep_default_na=False)
        frame.loc[3, "accuracy"] = str(value)
        (ws / name).mkdir()
        frame.to_csv(ws / name / "eval.csv", index=False)
    (ws / "header-only").mkdir()
    (ws / "header-only" / "eval.csv").write_text((FIXTURES / "eval.csv").read_text().splitlines()[0] + "\n")
    runs = ws / "runs"
    for name in ("finished", "finished-eval", "unfinished", "other", "corrupt", "foreign", "locked"):
        (runs / name).mkdir(parents=True)
    for name in ("finished", "finished-eval"):
        save_checkpoint(model, runs / name / "model.safetensors", **meta, epoch="2")
        (runs / name / "train.csv").write_text("epoch\n1\n2\n")
    shutil.copy(FIXTURES / "eval.csv", runs / "finished-eval" / "eval.csv")  # as the README's Stages put it
    save_checkpoint(model, runs / "unfinished" / "last.safetensors", **meta, epoch="1")
    (runs / "unfinished" / "train.csv").write_text("epoch\n1\n")
    small = build_model(ModelConfig("resnet18", "dual-bn", 0.0625))
    other = identity(small.config, TrainConfig(epochs=5), "cifar10")  # the commands below ask for 2 epochs
    save_state(runs / "other" / "resume.safetensors", small, make_optimizer(small, TrainConfig()),
               torch.Generator().manual_seed(0), 1, other, [{"epoch": 1}])
    (runs / "corrupt" / "resume.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    (runs / "foreign" / "notes.txt").write_text("my notes")
    torch.save(model.state_dict(), ws / "foreign.pt")  # a checkpoint of other code
    export_branch(ws / "m.safetensors", ws / "plain.pt", branch="adv", layout="torchvision")  # one `import` reads
    state = torch.load(ws / "plain.pt", weights_only=True)
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, ws / "plain-nan.pt")
    (ws / "garbage.pt").write_bytes(b"\x80\x04garbage")  # a pickle's first bytes, then no pickle
    torch.save(torch.nn.Linear(2, 2), ws / "module.pt")  # a pickled model object, not its state dict
    _rewrite(ws / "m.safetensors", ws / "dataset-mnist.safetensors",
             train=json.dumps(TRAIN_META | {"dataset": "mnist"}))
    _rewrite(ws / "m.safetensors", ws / "eps-nan.safetensors", train=json.dumps(TRAIN_META | {"eps": float("nan")}))
    with safe_open(ws / "m.safetensors", "pt") as f:  # the weights of the same shapes as int8: cast, silently
        save_file({k: f.get_tensor(k).to(torch.int8) if k == "conv1.weight" else f.get_tensor(k) for k in f.keys()},
                  ws / "int8.safetensors", metadata=f.metadata())
    evals = pd.read_csv(FIXTURES / "eval.csv", dtype=str, keep_default_na=False)
    pgd = evals.index[evals.attack == "pgd"][0]
    for name, col, row, value in (("eps-nan", "eps", 3, "nan"), ("pgd-no-steps", "steps", pgd, ""),
                                  ("norm-typo", "norm", 3, "dualbn"), ("branch-empty", "branch", 3, ""),
                                  ("eps-negative", "eps", 3, "-8"), ("steps-fraction", "steps", pgd, "2.5")):
        (ws / name).mkdir()
        evals.assign(**{col: evals[col].where(evals.index != row, value)}).to_csv(ws / name / "eval.csv",
                                                                                  index=False)
    gaps = pd.read_csv(FIXTURES / "nsgap.csv", dtype=str, keep_default_na=False)
    for name, col, value in (("distance-inf", "distance", "inf"), ("measure-typo", "measure", "wasserstien")):
        (ws / name).mkdir()
        gaps.assign(**{col: gaps[col].where(gaps.index != 2, value)}).to_csv(ws / name / "g.csv", index=False)
    (ws / "random.safetensors").write_bytes(random.Random(0).randbytes(4096))
    (ws / "empty.safetensors").write_bytes(b"")
    (ws / "dir.safetensors").mkdir()
    (ws / "a-file").write_text("a plain file")
    (ws / "folder").mkdir()
    (ws / "ro").mkdir()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("hostile") / "ws"
    ws.mkdir()
    _build(ws)
    return ws


def _snapshot(ws: Path) -> dict[str, bytes | None]:
    """Every path under ws: file bytes (None for folders and symlinks, which are compared by existence)."""
    out = {}
    for p in sorted(ws.rglob("*")):
        rel = str(p.relative_to(ws))
        out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


CASES = [
    # -- no command writes over its inputs: same path, relative path, symlink, hardlink, data files, report CSVs
    ("attack over its checkpoint", ["attack", "m.safetensors", "--out", "m.safetensors"], "is an input", 1),
    ("attack over it, relative", ["attack", "m.safetensors", "--out", "csv/../m.safetensors"], "is an input", 1),
    ("attack over it, symlink", ["attack", "m.safetensors", "--out", "link.safetensors"], "is an input", 1),
    ("attack over it, hardlink", ["attack", "m.safetensors", "--out", "hard.safetensors"], "is an input", 1),
    ("attack over a data file", ["attack", "m.safetensors", "--n", "8", *FAST, "--out",
                                 "data/cifar-10-batches-py/test_batch"], "is an input", 1),
    ("ns-gap over its checkpoint", ["ns-gap", "m.safetensors", "--out", "m.safetensors"], "is an input", 1),
    ("ns-gap over it, relative", ["ns-gap", "m.safetensors", "--out", "./folder/../m.safetensors"], "is an input", 1),
    ("swap-bn over it, hardlink", ["swap-bn", "m.safetensors", "--cross", "--out", "hard.safetensors"],
     "is an input", 1),
    ("swap-bn over it, symlink", ["swap-bn", "link.safetensors", "--cross", "--out", "m.safetensors"],
     "is an input", 1),
    ("report over its input CSVs", ["report", "csv", "--out", "csv"], "is an input", 1),
    ("report over a named input", ["report", "csv/ns-gap.csv", "--out", "csv"], "is an input", 1),
    # -- run folders: finished, unfinished, foreign, other settings, locked
    ("train into a finished run", [*TRAIN, "--out", "runs/finished"], "finished run", 1),
    ("train into an unfinished run", [*TRAIN, "--out", "runs/unfinished"], "--resume to go on", 1),
    ("resume without a state", [*TRAIN, "--resume", "--out", "runs/unfinished"], "no resume.safetensors", 1),
    ("resume other settings", [*TRAIN, "--resume", "--out", "runs/other"], "other settings", 1),
    ("resume a corrupt state", [*TRAIN, "--resume", "--out", "runs/corrupt"], "not a readable resume state", 1),
    ("train into a foreign folder", [*TRAIN, "--out", "runs/foreign"], "not a training run's", 1),
    ("resume and overwrite", [*TRAIN, "--resume", "--overwrite", "--out", "runs/x"], "exclude each other", 1),
    ("train while another trains", [*TRAIN, "--out", "runs/locked"], "another process is training", 1),
    ("train into a file", [*TRAIN, "--out", "a-file"], "is a file", 1),
    ("train into a file, progress bar on", [x for x in TRAIN if x != "--quiet"] + ["--out", "a-file"], "is a file",
     1),  # the bar never started: no blank line before the error
    ("train into a finished run with its eval.csv", [*TRAIN, "--out", "runs/finished-eval"], "holds a finished run",
     1),
    ("train --out empty", [*TRAIN, "--out", ""], "Invalid value for '--out': the path is empty", 1),  # not "."
    # -- NaN, infinity and out-of-range numbers
    ("train --lr nan", [*TRAIN, "--lr", "nan", "--out", "runs/x"], "lr must be a finite number", 1),
    ("train --eps inf", [*TRAIN, "--eps", "inf", "--out", "runs/x"], "eps must be a finite number", 1),
    ("train --step nan", [*TRAIN, "--step", "nan", "--out", "runs/x"], "step must be a finite number", 1),
    ("train --width inf", [*TRAIN, "--width", "inf", "--out", "runs/x"], "width must be a finite number", 1),
    ("train --width 0", [*TRAIN, "--width", "0", "--out", "runs/x"], "width must be in (0", 1),
    ("train --width 1000", [*TRAIN, "--width", "1000", "--out", "runs/x"], "width must be in (0, 16]", 1),
    ("train --clean-weight 2", [*TRAIN, "--clean-weight", "2", "--out", "runs/x"], "clean weight must be in", 1),
    ("train --weight-decay -1", [*TRAIN, "--weight-decay", "-1", "--out", "runs/x"], "weight decay must be in", 1),
    ("train --seed -1", [*TRAIN, "--seed", "-1", "--out", "runs/x"], "seed must be in", 1),
    ("train --epochs 0", [*TRAIN, "--epochs", "0", "--out", "runs/x"], "epochs must be in", 1),
    ("train --steps 0", [*TRAIN, "--steps", "0", "--out", "runs/x"], "PGD steps must be in [1, 100000], got 0", 1),
    ("attack --eps nan", ["attack", "m.safetensors", "--eps", "nan", "--out", "o.csv"], "eps must be a finite", 1),
    ("attack --eps 300", ["attack", "m.safetensors", "--eps", "300", "--out", "o.csv"], "eps must be in [0, 255]", 1),
    ("attack --step 0", ["attack", "m.safetensors", "--step", "0", "--out", "o.csv"], "step must be in (0", 1),
    ("attack --steps 0", ["attack", "m.safetensors", "--steps", "0", "--out", "o.csv"], "PGD steps must be in", 1),
    ("attack --n 0", ["attack", "m.safetensors", "--n", "0", "--out", "o.csv"], "n must be in", 1),
    ("attack --batch-size 0", ["attack", "m.safetensors", "--batch-size", "0", "--out", "o.csv"],
     "batch size must be in", 1),
    ("ns-gap --eps inf", ["ns-gap", "m.safetensors", "--eps", "inf", "--out", "o.csv"], "eps must be a finite", 1),
    ("swap-bn --reestimate --eps nan", ["swap-bn", "m.safetensors", "--reestimate", "adv", "--eps", "nan", *FAST,
                                        "--out", "o.safetensors"], "eps must be a finite", 1),
    ("bench --rounds 0", ["bench", "--rounds", "0", "--device", "cpu"], "rounds must be in [1", 1),
    # -- unknown choices: one line listing the valid names, exit 1 (not a usage box, exit 2)
    ("unknown --norm", [*TRAIN, "--norm", "dual", "--out", "runs/x"], "unknown norm 'dual'; choose one of: bn", 1),
    ("unknown --loss", [*TRAIN, "--loss", "ce", "--out", "runs/x"], "unknown loss 'ce'; choose one of: hybrid", 1),
    ("unknown --arch", [*TRAIN, "--arch", "resnet50", "--out", "runs/x"], "unknown arch 'resnet50'; choose one", 1),
    ("unknown --dataset", [*TRAIN, "--dataset", "mnist", "--out", "runs/x"], "unknown dataset 'mnist'", 1),
    ("unknown --attack", ["attack", "m.safetensors", "--attack", "cw", "--out", "o.csv"], "unknown attack 'cw'", 1),
    ("unknown --branch", ["attack", "m.safetensors", "--branch", "both", "--out", "o.csv"],
     "unknown branch 'both'; choose one of: adv, clean", 1),
    ("unknown --aa-version", ["attack", "m.safetensors", "--aa-version", "x", "--out", "o.csv"],
     "unknown AutoAttack version", 1),
    ("unknown --aa-attacks", ["attack", "m.safetensors", "--attack", "autoattack", "--aa-attacks", "apgd-ce,cw",
                              "--out", "o.csv"], "unknown AutoAttack attack 'cw'; choose one of: apgd-ce", 1),
    ("empty --aa-attacks", ["attack", "m.safetensors", "--attack", "autoattack", "--aa-attacks", "", "--out", "o.csv"],
     "no AutoAttack attacks given", 1),
    ("--aa-restarts 0", ["attack", "m.safetensors", "--attack", "autoattack", "--aa-restarts", "0", "--out", "o.csv"],
     "AutoAttack restarts must be in [1", 1),
    ("--aa-version contradicts --aa-attacks", ["attack", "m.safetensors", "--attack", "autoattack", "--aa-version",
                                               "standard", "--aa-attacks", "apgd-ce", "--out", "o.csv"],
     "AutoAttack version 'standard' runs apgd-ce,apgd-t,fab-t,square with 1 restart(s); give a version or", 1),
    ("--aa-version contradicts --aa-restarts", ["attack", "m.safetensors", "--attack", "autoattack", "--aa-version",
                                                "plus", "--aa-restarts", "1", "--out", "o.csv"],
     "AutoAttack version 'plus' runs 5 restart(s), not 1", 1),
    ("--aa-restarts without an untargeted attack", ["attack", "m.safetensors", "--attack", "autoattack",
                                                    "--aa-attacks", "apgd-t,square", "--aa-restarts", "3", "--out",
                                                    "o.csv"], "restarts apply to apgd-ce, apgd-dlr, fab", 1),
    ("--aa-attacks without autoattack", ["attack", "m.safetensors", "--aa-attacks", "apgd-ce", "--out", "o.csv"],
     "but autoattack is not among the attacks", 1),
    ("--steps without pgd", ["attack", "m.safetensors", "--attack", "clean", "--attack", "fgsm", "--steps", "5",
                             "--out", "o.csv"], "PGD steps and step size were given, but pgd is not among", 1),
    ("--step without pgd", ["attack", "m.safetensors", "--attack", "autoattack", "--step", "1", "--out", "o.csv"],
     "PGD steps and step size were given, but pgd is not among", 1),
    ("--eps with clean accuracy only", ["attack", "m.safetensors", "--attack", "clean", "--eps", "4", "--out",
                                        "o.csv"], "eps was given, but clean accuracy takes none", 1),
    ("attack --out not a .csv", ["attack", "m.safetensors", "--out", "eval.png"], "--out must end in .csv", 1),
    ("ns-gap --out not a .csv", ["ns-gap", "m.safetensors", "--out", "gap"], "--out must end in .csv", 1),
    ("bench --out not a .csv", ["bench", "--out", "bench.txt", "--device", "cpu"], "--out must end in .csv", 1),
    ("--amp without fgsm or pgd", ["attack", "m.safetensors", "--amp", "--attack", "clean", "--attack", "autoattack",
                                   "--out", "o.csv"], "amp (bf16 examples) applies to fgsm and pgd, none of which", 1),
    ("unknown ns-gap --noise", ["ns-gap", "m.safetensors", "--noise", "pink", "--out", "o.csv"], "unknown noise", 1),
    ("unknown ns-gap --start", ["ns-gap", "m.safetensors", "--start", "none", "--out", "o.csv"], "unknown start", 1),
    ("unknown ns-gap --branch", ["ns-gap", "m.safetensors", "--branch", "x", "--out", "o.csv"], "unknown branch", 1),
    ("unknown ns-gap --measure", ["ns-gap", "m.safetensors", "--measure", "test", "--out", "o.csv"],
     "unknown measure 'test'; choose one of: train, eval", 1),
    ("unknown ns-gap --reference", ["ns-gap", "m.safetensors", "--reference", "stored", "--out", "o.csv"],
     "unknown reference 'stored'; choose one of: batch, running", 1),
    ("ns-gap --steps 0", ["ns-gap", "m.safetensors", "--steps", "0", "--out", "o.csv"], "PGD steps must be in [1", 1),
    ("swap-bn --reestimate --steps 0", ["swap-bn", "m.safetensors", "--reestimate", "adv", "--steps", "0", *FAST,
                                        "--out", "o.safetensors"], "PGD steps must be in [1", 1),
    ("swap-bn --reestimate --n past the training split", ["swap-bn", "m.safetensors", "--reestimate", "clean", "--n",
                                                          "81", *FAST, "--out", "o.safetensors"],
     "n=81 must be between 1 and 80, the size of the cifar10 train split in ", 1),
    ("ns-gap --layer past the last", ["ns-gap", "m.safetensors", "--layer", "100", "--n", "8", "--steps", "1", *FAST,
                                      "--out", "o.csv"], "layer 100 is out of range: the model has 20 norm layers", 1),
    # -- flags that would be ignored: swap-bn's pass settings without --reestimate (--cross acts on both branches)
    ("swap-bn --cross --branch", ["swap-bn", "m.safetensors", "--cross", "--branch", "clean", "--out",
                                  "o.safetensors"],
     "--branch only applies to --reestimate; --cross does not use it", 1),
    ("swap-bn --swap-ap --n --eps", ["swap-bn", "m.safetensors", "--swap-ap", "--n", "5", "--eps", "4", "--out",
                                     "o.safetensors"],
     "--n, --eps only apply to --reestimate; --swap-ap does not use them", 1),
    ("unknown --reestimate domain", ["swap-bn", "m.safetensors", "--reestimate", "fog", "--out", "o.safetensors"],
     "unknown --reestimate domain 'fog'", 1),
    ("unknown --ns source", ["swap-bn", "m.safetensors", "--ns", "adv=both", "--out", "o.safetensors"],
     "unknown branch 'both'", 1),
    # -- output paths checked before any work
    ("--out empty", ["attack", "m.safetensors", "--out", ""], "Invalid value for '--out': the path is empty", 1),
    ("--out an existing folder", ["attack", "m.safetensors", "--out", "folder"], "is a folder", 1),
    ("--out under a file", ["attack", "m.safetensors", "--out", "a-file/o.csv"], "a-file is a file, not a folder", 1),
    ("--out name too long", ["attack", "m.safetensors", "--out", LONG], "file name too long", 1),
    ("--out in a read-only folder", ["attack", "m.safetensors", "--out", "ro/o.csv"], "permission denied", 1),
    ("report --out a file", ["report", "csv", "--out", "a-file"], "is a file", 1),
    ("ns-gap --out under a file", ["ns-gap", "m.safetensors", "--out", "a-file/g.csv"], "is a file, not a folder", 1),
    ("bench --out a folder", ["bench", "--out", "folder", "--device", "cpu"], "is a folder", 1),
    # -- checkpoints: metadata by type, shapes before the model is built, non-finite weights
    ("config width a string", ["attack", "width-str.safetensors", "--out", "o.csv", *FAST],
     "width must be a number", 1),
    ("config without arch", ["info", "no-arch.safetensors"], "invalid model config", 1),
    ("config not JSON", ["info", "not-json.safetensors"], "not JSON", 1),
    ("config classes a bool", ["info", "classes-bool.safetensors"], "num_classes must be an integer", 1),
    ("train metadata a list", ["attack", "train-list.safetensors", "--out", "o.csv", *FAST], "'train' must be dict", 1),
    ("epoch metadata a string", ["info", "epoch-str.safetensors"], "'epoch' must be int", 1),
    ("tiny file, huge config", ["attack", "huge.safetensors", "--out", "o.csv", *FAST], "do not match its config", 1),
    ("NaN weights: attack", ["attack", "nan.safetensors", "--out", "o.csv", *FAST], "non-finite weights", 1),
    ("NaN weights: swap-bn", ["swap-bn", "nan.safetensors", "--cross", "--out", "o.safetensors"],
     "non-finite weights", 1),
    ("NaN weights: ns-gap", ["ns-gap", "nan.safetensors", "--out", "o.csv", *FAST], "non-finite weights", 1),
    ("no such checkpoint, markup in name", ["attack", "no[/]such[red].safetensors", "--out", "o.csv"],
     "no checkpoint at no[/]such[red].safetensors", 1),
    # -- a file that is not a hybridat checkpoint, given to every command that loads one: pointed at `import`
    *[(f"{what}: {cmd[0]}", [cmd[0], name, *cmd[1:]], fragment, 1)
      for what, name, fragment in [
          ("a .pt", "foreign.pt", f"is a PyTorch file (torch.save), not a hybridat checkpoint; {TO_IMPORT}"),
          ("random bytes", "random.safetensors", f"(Error while deserializing header: header too large); {TO_IMPORT}"),
          ("an empty file", "empty.safetensors", f"is an empty file, not a hybridat checkpoint; {TO_IMPORT}"),
          ("a folder", "dir.safetensors", f"is a folder, not a checkpoint file (a run folder holds model.safetensors); "
                                          f"{TO_IMPORT}")]
      for cmd in [["info"], ["attack", "--out", "o.csv"], ["swap-bn", "--cross", "--out", "o.safetensors"],
                  ["ns-gap", "--out", "o.csv"],
                  ["export", "--branch", "clean", "--layout", "torchvision", "--out", "o.pt"]]],
    # -- a file of another stage where a checkpoint is expected: named as what it is
    ("a CSV as the checkpoint", ["attack", "csv/eval.csv", "--out", "o.csv"],
     "csv/eval.csv is a CSV file, not a checkpoint (a .safetensors file written by `hybridat train`", 1),
    ("a resume state as the checkpoint", ["info", "runs/other/resume.safetensors"],
     "is a training run's resume state (weights, optimizer, generators), not a model checkpoint; the run's latest "
     "model is runs/other/last.safetensors", 1),
    # -- a checkpoint named as what it is not; a dataset the model cannot be evaluated on
    ("import --out a .pt name", ["import", "plain.pt", "--out", "o.pt"], "--out must end in .safetensors", 1),
    ("swap-bn --out a .pth name", ["swap-bn", "m.safetensors", "--cross", "--out", "o.pth"],
     "--out must end in .safetensors", 1),
    ("import --dataset of other classes", ["import", "plain.pt", "--dataset", "cifar100", "--out", "o.safetensors"],
     "the model has 10 classes and cifar100 has 100", 1),
    ("attack --dataset of other classes", ["attack", "m.safetensors", "--dataset", "cifar100", *FAST, "--out",
                                           "o.csv"], "the model has 10 classes and cifar100 has 100", 1),
    ("import NaN weights", ["import", "plain-nan.pt", "--out", "o.safetensors"],
     "plain-nan.pt has non-finite weights (NaN or inf) in 1 tensors, e.g. fc.weight", 1),
    ("import an export", ["import", "plain.pt", "--out", "o.safetensors"], "layout torchvision (auto)", 0),
    # -- data: a mistyped folder is neither created nor downloaded into; an empty split
    ("mistyped --data-dir", ["attack", "m.safetensors", "--n", "8", "--device", "cpu", "--data-dir", "dta",
                             "--out", "o.csv"], "dta does not exist", 1),
    ("zero-image split", ["attack", "m.safetensors", "--device", "cpu", "--data-dir", "empty-data", "--out", "o.csv"],
     "has no images", 1),
    # -- usage errors (typer's parsing) end as every other bad input: one line, exit 1
    ("--epochs not a number", ["train", "--epochs", "abc", "--out", "never"], "Invalid value for '--epochs'", 1),
    ("--eps not a number", ["attack", "m.safetensors", "--eps", "eight", "--out", "o.csv"],
     "Invalid value for '--eps'", 1),
    ("unknown flag", ["ns-gap", "m.safetensors", "--fixap", "--out", "o.csv"], "No such option: --fixap", 1),
    ("unknown command", ["nsgap", "m.safetensors"], "No such command 'nsgap'", 1),
    ("missing argument", ["info"], "Missing argument", 1),
    ("missing --out", ["swap-bn", "m.safetensors", "--cross"], "Missing option '--out'", 1),
    # -- report: accuracies are fractions
    ("report accuracy 7.5", ["report", "acc-high", "--out", "rep"], "accuracy must lie in [0, 1], got 7.5", 1),
    ("report accuracy -3", ["report", "acc-low", "--out", "rep"], "accuracy must lie in [0, 1], got -3", 1),
    ("report accuracy NaN", ["report", "acc-nan", "--out", "rep"], "accuracy must lie in [0, 1], got 'nan' (row 5)",
     1),
    ("report accuracy empty", ["report", "acc-empty", "--out", "rep"], "accuracy must lie in [0, 1], got '' (row 5)",
     1),
    ("report accuracy text", ["report", "acc-text/eval.csv", "--out", "rep"], "got '0.5x' (row 5)", 1),
    ("report a header-only CSV", ["report", "header-only", "--out", "rep"], "hold a header but no rows", 1),
    # -- found by the audit of every command against every bad-input kind (issue: bad-input and artifact safety)
    ("--device xpu", ["attack", "m.safetensors", "--device", "xpu", "--out", "o.csv"], "unknown device 'xpu'", 1),
    ("--device xpu:0", ["swap-bn", "m.safetensors", "--cross", "--device", "xpu:0", "--out", "o.safetensors"],
     "unknown device 'xpu:0'", 1),
    pytest.param("--device mps without one", ["attack", "m.safetensors", "--device", "mps", "--out", "o.csv"],
                 "no MPS device", 1, marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="has MPS")),
    ("--device cuda:99", ["attack", "m.safetensors", "--device", "cuda:99", "--out", "o.csv"], "--device cuda", 1),
    ("import a damaged pickle", ["import", "garbage.pt", "--out", "o.safetensors"],
     "does not load with torch.load(weights_only=True), which never runs code from the file (a pickled model object "
     "needs code: save its state_dict() instead): Unsupported operand", 1),
    ("import a pickled module", ["import", "module.pt", "--out", "o.safetensors"],
     "Unsupported global: GLOBAL torch.nn.modules.linear.Linear", 1),
    ("import a resume state", ["import", "runs/other/resume.safetensors", "--out", "o.safetensors"],
     "is a hybridat training run's resume state, not a checkpoint of other code; the run's latest model is "
     "runs/other/last.safetensors", 1),
    ("import a folder", ["import", "folder", "--out", "o.safetensors"], "folder is a folder; give the checkpoint", 1),
    ("import --num-classes 0", ["import", "plain.pt", "--num-classes", "0", "--out", "o.safetensors"],
     "num_classes must be in [2, 100000], got 0", 1),
    ("import --input-mean nan", ["import", "plain.pt", "--input-mean", "nan,0,0", "--input-std", "1,1,1", "--out",
                                 "o.safetensors"], "input_mean must be a finite number, got nan", 1),
    ("import --input-std inf", ["import", "plain.pt", "--input-mean", "0,0,0", "--input-std", "1,inf,1", "--out",
                                "o.safetensors"], "input_std must be a finite number, got inf", 1),
    ("import --adv-split of a plain file", ["import", "plain.pt", "--adv-split", "main", "--out", "o.safetensors"],
     "--adv-split applies to timm-splitbn files (two BNs per layer); plain.pt has layout torchvision", 1),
    ("train --clean-weight with --loss trades", [*TRAIN, "--loss", "trades", "--clean-weight", "0.3", "--out",
                                                 "runs/x"],
     "--clean-weight weighs a term of --loss hybrid; --loss trades has none, so it would be ignored", 1),
    ("train --trades-beta with --loss hybrid", [*TRAIN, "--trades-beta", "3", "--out", "runs/x"],
     "--trades-beta weighs a term of --loss trades; --loss hybrid has none", 1),
    ("train --lr 0", [*TRAIN, "--lr", "0", "--out", "runs/x"], "lr must be in (0, inf], got 0", 1),
    ("train --step 0", [*TRAIN, "--step", "0", "--out", "runs/x"], "step must be in (0, 255], got 0", 1),
    ("swap-bn --reestimate adv --step 0", ["swap-bn", "m.safetensors", "--reestimate", "adv", "--step", "0", "--n",
                                           "8", *FAST, "--out", "o.safetensors"], "step must be in (0, 255]", 1),
    ("swap-bn --reestimate clean --eps", ["swap-bn", "m.safetensors", "--reestimate", "clean", "--eps", "4", "--n",
                                          "8", *FAST, "--out", "o.safetensors"],
     "--eps does not apply to --reestimate clean", 1),
    ("swap-bn --reestimate noise --steps --step", ["swap-bn", "m.safetensors", "--reestimate", "noise", "--steps",
                                                   "3", "--step", "1", "--n", "8", *FAST, "--out", "o.safetensors"],
     "--step, --steps do not apply to --reestimate noise: it reads --eps only", 1),
    ("swap-bn --ns one branch twice", ["swap-bn", "m.safetensors", "--ns", "adv=clean", "--ns", "adv=adv", "--out",
                                       "o.safetensors"], "--ns gives branch adv two sources", 1),
    ("train --overwrite that fails keeps the old run", [*TRAIN, "--overwrite", "--train-subset", "1000", "--out",
                                                        "runs/finished"], "n=1000 must be between 1 and 80", 1),
    ("train --overwrite that fails keeps a resume state", [*TRAIN, "--overwrite", "--train-subset", "1000", "--out",
                                                           "runs/other"], "n=1000 must be between 1 and 80", 1),
    ("train fails in a new folder", [*TRAIN, "--train-subset", "1000", "--out", "runs/new"],
     "n=1000 must be between 1 and 80", 1),  # and leaves no empty run folder (nor the folders above it)
    ("train fails in new folders", [*TRAIN, "--train-subset", "1000", "--out", "new/deeper/run"],
     "n=1000 must be between 1 and 80", 1),
    ("checkpoint of int8 weights", ["swap-bn", "int8.safetensors", "--cross", "--out", "o.safetensors"],
     "'conv1.weight' is I8, the model needs F32", 1),
    ("checkpoint trained on an unknown dataset", ["info", "dataset-mnist.safetensors"],
     "dataset-mnist.safetensors: unknown training setting 'dataset' 'mnist'", 1),
    ("checkpoint trained at eps NaN: attack", ["attack", "eps-nan.safetensors", "--n", "8", *FAST, "--out", "o.csv"],
     "eps-nan.safetensors: training setting 'eps' must be a finite number, got nan", 1),
    ("checkpoint trained at eps NaN: swap-bn", ["swap-bn", "eps-nan.safetensors", "--cross", "--out",
                                                "o.safetensors"], "training setting 'eps' must be a finite number", 1),
    ("report eps NaN", ["report", "eps-nan", "--out", "rep"],
     "eval.csv: eps must be a finite number, got 'nan' (row 5)",
     1),
    ("report a pgd row without steps", ["report", "pgd-no-steps", "--out", "rep"], "steps is empty in a pgd row", 1),
    ("report an unknown norm", ["report", "norm-typo", "--out", "rep"], "norm 'dualbn' is none of bn, bn-mix", 1),
    ("report an empty branch", ["report", "branch-empty/eval.csv", "--out", "rep"],
     "branch is empty; every eval row has one (row 5)", 1),
    ("report a negative eps", ["report", "eps-negative", "--out", "rep"],
     "eval.csv: eps must be a number in [0, 255], got '-8' (row 5)", 1),
    ("report 2.5 PGD steps", ["report", "steps-fraction", "--out", "rep"], "steps must be an integer in [0, inf], got "
     "'2.5'", 1),
    ("report an unknown NS measure", ["report", "measure-typo", "--out", "rep"],
     "g.csv: measure 'wasserstien' is none of wasserstein, mad (row 4)", 1),
    ("report an infinite NS distance", ["report", "distance-inf", "--out", "rep"],
     "g.csv: distance must be a finite number, got 'inf' (row 4)", 1),
    # -- found by the sweep of every option of every command (scripts/fuzz_cli.py)
    ("--data-dir a file", ["attack", "m.safetensors", "--n", "8", "--device", "cpu", "--data-dir", "a-file", "--out",
                           "o.csv"], "a-file is a file, not a folder; give the folder that holds cifar-10-batches-py/",
     1),  # it said the folder "does not exist"
    ("train --data-dir a file", [*TRAIN[:-2], "--data-dir", "a-file", "--out", "runs/x"],
     "a-file is a file, not a folder", 1),
    # an empty path (an unset shell variable) was read as ".": a report of 23 files or a dataset download landed in
    # the current folder, and a folder argument was searched through
    ("report --out empty", ["report", "csv", "--out", ""], "Invalid value for '--out': the path is empty", 1),
    ("report of an empty path", ["report", "", "--out", "rep"], "Invalid value for 'runs': the path is empty", 1),
    ("--data-dir empty", ["attack", "m.safetensors", "--n", "8", "--device", "cpu", "--data-dir", "", "--out",
                          "o.csv"], "Invalid value for '--data-dir': the path is empty", 1),
    ("info of an empty path", ["info", ""], "Invalid value for 'checkpoint': the path is empty", 1),
    ("import of an empty path", ["import", "", "--out", "o.safetensors"], "'src': the path is empty", 1),
    ("swap-bn --reestimate empty", ["swap-bn", "m.safetensors", "--reestimate", "", "--out", "o.safetensors"],
     "unknown --reestimate domain ''; choose one of: clean, adv, noise", 1),  # not "give exactly one of ..."
    # a checkpoint where a CSV is meant: "not a readable CSV (UnicodeDecodeError: 'utf-8' codec can't decode ...)"
    ("report of a checkpoint", ["report", "m.safetensors", "--out", "rep"],
     "m.safetensors is a safetensors file (a checkpoint?), not a CSV; measure a model with `hybridat attack`", 1),
    ("report of a .pt", ["report", "foreign.pt", "--out", "rep"], "foreign.pt is a PyTorch file (torch.save), not a "
     "CSV", 1),
    ("import --norm unknown", ["import", "plain.pt", "--norm", "dualbn", "--out", "o.safetensors"],
     "unknown norm 'dualbn'; choose one of: bn, bn-mix, dual-bn", 1),  # the valid names were not listed
    ("report --margin past 100 points", ["report", "csv", "--margin", "1e30", "--out", "rep"],
     "margin must be in [0, 100], got 1e+30", 1),  # accuracies are never 100 points apart: all were comparable
    # -- successes that used to break: markup in metadata and paths; an unfinished checkpoint is marked
    ("swap-bn, markup everywhere", ["swap-bn", "markup.safetensors", "--cross", "--out", "[red]x[/].safetensors"],
     "[red]x[/].safetensors  cross", 0),
    ("info, markup in metadata", ["info", "markup.safetensors"], "[/]", 0),
    ("train --loss clean", [*TRAIN, "--loss", "clean", "--steps", "0", "--out", "runs/x"], "acc adv — clean 0.", 0),
    ("attack an unfinished run", ["attack", "last.safetensors", "--attack", "clean", "--n", "8", *FAST, "--out",
                                  "o.csv"], "unfinished run's checkpoint (epoch 1 of 2)", 0),
]


def _values(case) -> tuple:
    return case.values if hasattr(case, "marks") else case  # a pytest.param, or a plain row


@pytest.mark.parametrize("case,args,fragment,code", CASES, ids=[_values(c)[0] for c in CASES])
def test_hostile(case, args, fragment, code, base, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    os.link(ws / "m.safetensors", ws / "hard.safetensors")
    os.chmod(ws / "ro", 0o555)
    if ROOT:  # mode bits do not stop root: the folder is made to look read-only to os.access as well
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: not (Path(p).name == "ro" and mode & os.W_OK)
                            and access(p, mode, **k))
    monkeypatch.chdir(ws)
    before = _snapshot(ws)
    lock = os.open(ws / "runs" / "locked" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "another process" holds the run folder
    try:
        result = CliRunner().invoke(app, args)
    finally:
        os.close(lock)
    after = _snapshot(ws)
    assert result.exit_code == code, result.output
    assert fragment in result.output, result.output
    if code == 1:
        lines = result.output.rstrip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), repr(result.output)
        new = [p for p in after.keys() - before.keys() if Path(p).name != ".lock"]
        assert not new, f"a failing command left {new}"
    changed = [p for p, content in before.items() if after.get(p, "gone") != content]
    assert not changed, f"inputs changed: {changed}"


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 40
    commands = {_values(c)[1][0] for c in CASES}
    assert commands == {"train", "attack", "swap-bn", "ns-gap", "report", "bench", "info", "nsgap", "export",
                        "import"}


def test_unfinished_checkpoint_is_marked_in_the_csv(base, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    monkeypatch.chdir(ws)
    for ckpt, unfinished in (("last.safetensors", True), ("m.safetensors", False)):
        for args in (["attack", ckpt, "--attack", "clean", "--n", "8"], ["ns-gap", ckpt, "--n", "8", "--steps", "1"]):
            result = CliRunner().invoke(app, [*args, *FAST, "--out", "o.csv"])
            assert result.exit_code == 0, result.output
            assert ("warning:" in result.output and "unfinished" in result.output) == unfinished
            assert (pd.read_csv("o.csv")["unfinished"] == unfinished).all()


def test_rows_of_a_checkpoint_outside_a_run_name_its_folder(base, tmp_path, monkeypatch):
    """A checkpoint not written by `train` (imported, or moved) is of the run its folder names, in attack and ns-gap
    rows alike, however the path is written ("m.safetensors" from inside, "../mine/m.safetensors")."""
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    (ws / "mine").mkdir()
    save_checkpoint(perturb(tiny("dual-bn")), ws / "mine" / "m.safetensors", train=TRAIN_META)  # no run, no seed
    data = ["--device", "cpu", "--data-dir", str(ws / "data")]
    for where, ckpt in ((ws / "mine", "m.safetensors"), (ws / "folder", "../mine/m.safetensors")):
        monkeypatch.chdir(where)
        for args in (["attack", ckpt, "--attack", "clean", "--n", "8"], ["ns-gap", ckpt, "--n", "8", "--steps", "1"]):
            result = CliRunner().invoke(app, [*args, *data, "--out", "o.csv"])
            assert result.exit_code == 0, result.output
            assert set(pd.read_csv("o.csv", keep_default_na=False)["run"]) == {"mine"}, args


@pytest.mark.parametrize("when", ["between rows", "while writing"])
def test_ctrl_c_in_attack_leaves_no_csv_and_keeps_the_old_one(when, base, tmp_path, monkeypatch):
    """SIGINT (KeyboardInterrupt) after the first row, or halfway through writing the CSV: one line, exit 1, the
    earlier o.csv byte-identical, no temp file."""
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    monkeypatch.chdir(ws)
    Path("o.csv").write_text("an earlier evaluation\n")
    if when == "between rows":
        import hybridat.cli as cli

        monkeypatch.setattr(cli, "_print_row", lambda row: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:
        def half(self, path, *args, **kwargs):
            Path(path).write_text("run,checkpoint\nhalf")
            raise KeyboardInterrupt

        monkeypatch.setattr(pd.DataFrame, "to_csv", half)
    result = CliRunner().invoke(app, ["attack", "m.safetensors", "--attack", "clean", "--n", "8", *FAST,
                                      "--out", "o.csv"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == "error: interrupted; no half-written file was left", result.output
    assert Path("o.csv").read_text() == "an earlier evaluation\n"
    assert not [p for p in os.listdir(ws) if p.startswith(".o.csv")]


def test_an_os_error_while_writing_is_one_line(base, tmp_path, monkeypatch):
    """Disk full (ENOSPC) in the middle of writing the CSV: one line, exit 1, no temp file, no output."""
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    monkeypatch.chdir(ws)

    def full(self, path, *args, **kwargs):
        Path(path).write_text("half a csv")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    result = CliRunner().invoke(app, ["attack", "m.safetensors", "--attack", "clean", "--n", "8", *FAST,
                                      "--out", "o.csv"])
    lines = result.output.strip().splitlines()  # the accuracy lines, then one error naming the output
    assert result.exit_code == 1 and lines[-1] == "error: No space left on device: o.csv", result.output
    assert sum(line.startswith("error") for line in lines) == 1
    assert not [p for p in os.listdir(ws) if p.startswith(".o.csv") or p == "o.csv"]


def test_hostile_checkpoint_never_builds_the_big_model(base, monkeypatch):
    """The shapes are checked on the meta device: no real tensor of the width-16 model is ever allocated."""
    import hybridat.checkpoint as checkpoint

    built = []
    real = checkpoint.build_model
    monkeypatch.setattr(checkpoint, "build_model", lambda config: built.append(
        torch.empty(0).device.type) or real(config))
    with pytest.raises(HybridatError, match="do not match"):
        load_checkpoint(base / "huge.safetensors")
    assert built == ["meta"]  # built once, on the meta device, and refused before the real build


@pytest.mark.parametrize("args", [[], ["--help"], ["ns-gap", "--help"]])
def test_help_is_not_an_error(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "Usage" in result.output and "error:" not in result.output


def test_help_shows_the_defaults_that_are_not_values():
    """A default described in words ("eps/4", "all") is shown, not eaten as rich markup."""
    result = CliRunner().invoke(app, ["attack", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    for text in ("(eps/4)", "(all)", "(both)", "($HYBRIDAT_DATA_DIR or ./data)"):
        assert text in result.output, result.output


@pytest.mark.parametrize("args, out", [
    (["export", "m.safetensors", "--branch", "adv", "--layout", "kuangliu", "--out", "e.pt"], "e.pt"),
    (["export", "m.safetensors", "--branch", "adv", "--layout", "kuangliu", "--out", "e.safetensors"],
     "e.safetensors"),
    (["swap-bn", "m.safetensors", "--cross", "--out", "c.safetensors"], "c.safetensors"),
    (["import", "plain.pt", "--out", "i.safetensors"], "i.safetensors")])
def test_a_full_disk_while_writing_a_checkpoint_is_one_line(args, out, base, tmp_path):
    """A real write failure, not a stand-in: the file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the
    checkpoint's write fail part-way as a full disk does (EFBIG for ENOSPC). One line naming the output, exit 1,
    neither the output nor its temp file left; torch.save's and safetensors' own errors never reach the user."""
    import resource
    import signal
    import subprocess
    import sys

    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)

    def limit():  # in the child: writes past 4 KB fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1]), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-m", "hybridat", *args], cwd=ws, env=env, preexec_fn=limit,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"error: File too large: {out}\n"
    assert not [p for p in os.listdir(ws) if p.startswith(f".{out}") or p == out]


def test_running_out_of_memory_on_the_cpu_is_one_line(base, tmp_path, monkeypatch):
    """Seen at full width, `attack --batch-size 1024` under a 5 GB limit: torch's CPU allocator raises a plain
    RuntimeError (no OutOfMemoryError as on CUDA), which reached the user as a traceback."""
    import hybridat.attacks as attacks

    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    monkeypatch.chdir(ws)

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 268435456 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(attacks, "pgd_from", no_memory)
    result = CliRunner().invoke(app, ["attack", "m.safetensors", "--attack", "pgd", "--n", "8", *FAST,
                                      "--out", "o.csv"])
    assert result.exit_code == 1 and result.output == "error: out of memory; a smaller --batch-size needs less\n"
    assert not result.exception or isinstance(result.exception, SystemExit)
    assert not (ws / "o.csv").exists()


@pytest.mark.parametrize("value, fragment", [
    ("abc", "WORLD_SIZE='abc' in the environment; it must be a number of processes >= 1"),
    ("0", "WORLD_SIZE='0' in the environment"),
    ("2", "WORLD_SIZE=2 but the process group could not start (Error initializing torch.distributed using env:// "
          "rendezvous: environment variable RANK expected, but not set); launch with torchrun")])
def test_a_bad_torchrun_environment_is_one_line(value, fragment, base, tmp_path, monkeypatch):
    """WORLD_SIZE that is no count, or > 1 outside torchrun: a traceback (int('abc'), torch's rendezvous error)."""
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    monkeypatch.chdir(ws)
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", value)
    result = CliRunner().invoke(app, [*TRAIN, "--out", "runs/x"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and fragment in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (ws / "runs" / "x").exists()


@pytest.mark.parametrize("name, env, fragment", [
    ("auto", {"LOCAL_RANK": "x"}, "LOCAL_RANK='x' in the environment"),
    ("auto", {"LOCAL_RANK": "2"}, "--device cuda:2: torch sees 2 CUDA device(s), cuda:0 to cuda:1"),
    ("cuda:5", {}, "--device cuda:5: torch sees 2 CUDA device(s)"),
    ("xpu", {}, "unknown device 'xpu'"), ("cpu:1", {}, "unknown device 'cpu:1'"), ("meta", {}, "unknown device")])
def test_device_names_on_a_two_gpu_host(name, env, fragment, monkeypatch):
    """What a GPU host would answer (two CUDA devices, faked: nothing touches CUDA before these checks)."""
    from hybridat.errors import HybridatError
    from hybridat.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(HybridatError) as e:
        resolve_device(name)
    assert fragment in str(e.value)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1) and resolve_device("cuda:1") == torch.device("cuda", 1)


def test_an_empty_data_dir_is_refused_from_python(base):
    """load_split(data_dir="") read the current folder (Path("") is "."), and downloaded CIFAR-10 into it."""
    from hybridat.data import load_split

    with pytest.raises(HybridatError, match="data_dir is empty"):
        load_split("cifar10", train=False, data_dir="")


def test_a_data_dir_variable_naming_a_file_is_one_line(base, tmp_path, monkeypatch):
    """$HYBRIDAT_DATA_DIR naming a file: 'downloading CIFAR10 into a-file failed (FileExistsError(17, ...))'."""
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("HYBRIDAT_DATA_DIR", "a-file")
    result = CliRunner().invoke(app, ["attack", "m.safetensors", "--n", "8", "--device", "cpu", "--out", "o.csv"])
    folder = (ws / "a-file").resolve()
    assert result.exit_code == 1 and result.output == (f"error: data folder {folder} is a file, not a folder; give "
                                                       "the folder that holds cifar-10-batches-py/\n")
    assert not (ws / "o.csv").exists()
