"""What scripts/fuzz_cli.py leaves out: options that are each valid but meet (every pair of a command's options, and
interactions picked by hand), hostile environment variables, and interruptions at a random moment.

    python scripts/fuzz_combos.py [--part pairs,picked,env,signals] [--only attack,train] [--workers 2]
                                  [--timeout 25] [--seed 0] [--json cases.json]

Cases run as fuzz_cli.py runs them (its workspace, fork, --user, hashing, classes ok / error / started / BAD), on a
workspace with more in it (a one-branch model without AP, a 100-class model, a derived swap-bn checkpoint, run
folders unfinished, with a damaged resume state or last checkpoint, CSVs of other columns). The parts:

- pairs    for each command, every pair of its options (listed from the Typer app; the valid values of each in
           VALID, tested to cover every option), the rest of the command line fuzz_cli's base for it. A pair is
           judged by its class only: refusals are listed for reading.
- picked   command lines picked by hand (PICKED), each with what it must give: "ok", "error" (with a fragment of
           the line), or "any" (either is right).
- env      environment variables (ENV), each case in a fresh interpreter where the variable is read at import.
- signals  SIGINT, SIGTERM or SIGKILL at a random moment of train, attack, swap-bn, ns-gap, report, import. Then:
           exit 1 with "error: interrupted ..." last on stderr and no traceback (or exit 0: it finished first, or
           -9 for SIGKILL); every file under an output's final name complete (it loads); inputs unchanged; and the
           same command run again (train: with --resume) ends with exit 0 and leaves no temp file (a SIGKILL's
           included).

Classes beyond fuzz_cli's: interrupted (a signal ended it as it should). A full run: 1,229 cases in about 15
minutes on 2 CPU cores shared with other work (--workers 2): pairs 1,028 in 6.5 min, picked 102 in 1 min, env 27 in
3.5 min (three wait out the 60 s rendezvous), signals 72 in 3.5 min (one at a time: judging one runs it again).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_cli as fz  # noqa: E402  (its workspace, runner and judge)

FAST = fz.FAST
# valid values of every option, a few each, that change what the command does; ("--flag",) is a bool flag given
VALID = {
    "train": {"out": ["run"], "norm": ["gn"], "loss": ["trades"], "arch": ["preact18"],
              "width": ["0.125"], "dataset": ["cifar10"], "data_dir": ["data"], "eps": ["16"], "step": ["4"],
              "steps": ["2"], "epochs": ["2"], "batch_size": ["4"], "lr": ["0.01"], "weight_decay": ["0"],
              "clean_weight": ["0.3"], "trades_beta": ["1"], "train_subset": ["8"], "seed": ["1"],
              "device": ["cpu"], "amp": [("--amp",)], "graphs": [("--graphs",)], "resume": [("--resume",)],
              "overwrite": [("--overwrite",)], "quiet": [("--no-quiet",)]},
    "attack": {"checkpoint": ["bn.safetensors", "swap.safetensors"], "out": ["sub/o.csv"],
               "attack": ["autoattack", "fgsm"], "steps": ["2"], "eps": ["4"], "step": ["1"], "branch": ["clean"],
               "n": ["4"], "batch_size": ["3"], "aa_version": ["plus", "rand"], "aa_attacks": ["apgd-ce"],
               "aa_restarts": ["2"], "dataset": ["cifar10", "cifar100"], "data_dir": ["data"], "seed": ["1"],
               "device": ["cpu"], "graphs": [("--graphs",)], "amp": [("--amp",)]},
    "swap-bn": {"checkpoint": ["bn.safetensors", "swap.safetensors"], "out": ["sub/o.safetensors"],
                "cross": [("--cross",)], "swap_ap": [("--swap-ap",)], "ns": ["adv=clean"], "ap": ["clean=adv"],
                "from_layer": ["3", "20"], "reestimate": ["noise"], "branch": ["clean"], "n": ["4"], "eps": ["4"],
                "step": ["1"], "steps": ["2"], "batch_size": ["3"], "data_dir": ["data"], "seed": ["1"],
                "device": ["cpu"]},
    "ns-gap": {"checkpoint": ["bn.safetensors", "noaffine.safetensors", "swap.safetensors"], "out": ["sub/g.csv"],
               "fix_ap": [("--fix-ap",)], "branch": ["clean"], "eps": ["4"], "steps": ["2"], "step": ["1"],
               "n": ["4"], "batch_size": ["3"], "start": ["normal"], "noise": ["gaussian"],
               "noise_clip": [("--no-noise-clip",)], "measure": ["eval"], "reference": ["running"],
               "layer": ["0", "19"], "data_dir": ["data"], "seed": ["1"], "device": ["cpu"]},
    "report": {"runs": ["csvdir", "run"], "out": ["sub/rep"], "margin": ["0"], "ratio_margin": ["1"]},
    "import": {"src": ["plain.pt"], "out": ["sub/i.safetensors"], "arch": ["resnet18", "preact18"],
               "layout": ["torchvision", "kuangliu"], "norm": ["dual-bn", "bn-mix"], "num_classes": ["10", "100"],
               "input_mean": ["0.5,0.5,0.5"], "input_std": ["0.25,0.25,0.25"], "adv_split": ["main"],
               "dataset": ["cifar100"], "seed": ["1"], "loss": ["trades"], "eps": ["16"]},
    "export": {"checkpoint": ["bn.safetensors", "swap.safetensors"], "branch": ["clean"], "layout": ["kuangliu"],
               "out": ["e.safetensors"]},
    "info": {},  # one argument, no pairs: PICKED has its cases
    "bench": {},  # every valid bench runs for minutes: fuzz_cli's cases are enough
}
UNFIN = [*fz.without(fz.BASES["train"][3:], "--epochs", True), "--epochs", "2"]  # unfin/'s settings, but --out
TRAIN = fz.without(fz.BASES["train"], "--out", True)  # train without --out
ATTACK = ["--n", "8", "--no-graphs", *FAST]
NSGAP = ["--n", "8", "--steps", "1", "--batch-size", "8", *FAST]
# (command line, what it must give: "ok", "any", or the fragment its one error line holds)
PICKED = [
    # swap-bn: the operations meet
    (["swap-bn", "m.safetensors", "--cross", "--swap-ap", "--out", "o.safetensors"], "exactly one of"),
    (["swap-bn", "m.safetensors", "--cross", "--ns", "adv=clean", "--out", "o.safetensors"], "exactly one of"),
    (["swap-bn", "m.safetensors", "--cross", "--ap", "adv=clean", "--out", "o.safetensors"], "exactly one of"),
    (["swap-bn", "m.safetensors", "--cross", "--reestimate", "adv", "--out", "o.safetensors"], "exactly one of"),
    (["swap-bn", "m.safetensors", "--from-layer", "3", "--out", "o.safetensors"], "exactly one of"),
    (["swap-bn", "m.safetensors", "--cross", "--from-layer", "3", "--out", "o.safetensors"], "any"),
    (["swap-bn", "m.safetensors", "--ns", "adv=clean", "--from-layer", "20", "--out", "o.safetensors"], "layer"),
    (["swap-bn", "m.safetensors", "--ns", "adv=clean", "--from-layer", "19", "--out", "o.safetensors"], "ok"),
    (["swap-bn", "m.safetensors", "--ns", "adv=adv", "--out", "o.safetensors"], "any"),
    (["swap-bn", "m.safetensors", "--reestimate", "adv", "--from-layer", "3", "--n", "8", *FAST, "--out",
      "o.safetensors"], "any"),
    (["swap-bn", "bn.safetensors", "--cross", "--out", "o.safetensors"], "branch"),
    (["swap-bn", "noaffine.safetensors", "--reestimate", "clean", "--n", "8", *FAST, "--out", "o.safetensors"],
     "ok"),
    (["swap-bn", "swap.safetensors", "--cross", "--out", "o.safetensors"], "ok"),
    (["swap-bn", "c100.safetensors", "--reestimate", "clean", "--n", "8", *FAST, "--out", "o.safetensors"],
     "cifar100"),
    # attack
    (["attack", "m.safetensors", "--attack", "autoattack", "--aa-version", "plus", "--aa-attacks", "apgd-ce", "--out",
      "o.csv", *ATTACK], "error"),
    (["attack", "m.safetensors", "--attack", "autoattack", "--aa-version", "rand", "--aa-restarts", "2", "--out",
      "o.csv", *ATTACK], "error"),
    (["attack", "m.safetensors", "--attack", "autoattack", "--aa-attacks", "square", "--aa-restarts", "2", "--out",
      "o.csv", *ATTACK], "error"),
    (["attack", "m.safetensors", "--attack", "pgd", "--aa-restarts", "2", "--out", "o.csv", *ATTACK], "autoattack"),
    (["attack", "m.safetensors", "--attack", "pgd", "--aa-version", "plus", "--out", "o.csv", *ATTACK], "autoattack"),
    (["attack", "m.safetensors", "--attack", "clean", "--steps", "5", "--out", "o.csv", *ATTACK], "error"),
    (["attack", "m.safetensors", "--attack", "autoattack", "--amp", "--aa-attacks", "apgd-ce", "--out", "o.csv",
      *ATTACK], "any"),
    (["attack", "m.safetensors", "--attack", "clean", "--amp", "--out", "o.csv", *ATTACK], "any"),
    (["attack", "bn.safetensors", "--branch", "clean", "--attack", "clean", "--out", "o.csv", *ATTACK], "ok"),
    (["attack", "m.safetensors", "--branch", "clean", "--branch", "clean", "--out", "o.csv", *ATTACK], "ok"),
    (["attack", "m.safetensors", "--attack", "pgd", "--attack", "pgd", "--out", "o.csv", *ATTACK], "ok"),
    (["attack", "m.safetensors", "--steps", "10", "--steps", "10", "--out", "o.csv", *ATTACK], "ok"),
    (["attack", "m.safetensors", "--dataset", "cifar100", "--out", "o.csv", *ATTACK], "classes"),
    (["attack", "c100.safetensors", "--out", "o.csv", *ATTACK], "cifar100"),
    (["attack", "c100.safetensors", "--dataset", "cifar10", "--out", "o.csv", *ATTACK], "classes"),
    (["attack", "m.safetensors", "--dataset", "svhn", "--out", "o.csv", *ATTACK], "error"),
    (["attack", "unfin/last.safetensors", "--attack", "clean", "--out", "o.csv", *ATTACK], "ok"),
    (["attack", "m.safetensors", "--attack", "clean", "--n", "100", "--out", "o.csv", *ATTACK[2:]], "any"),
    (["attack", "m.safetensors", "--attack", "clean", "--out", "data/o.csv", *ATTACK], "any"),
    # ns-gap
    (["ns-gap", "bn.safetensors", "--fix-ap", "--out", "g.csv", *NSGAP], "any"),
    (["ns-gap", "bn.safetensors", "--out", "g.csv", *NSGAP], "any"),
    (["ns-gap", "noaffine.safetensors", "--fix-ap", "--out", "g.csv", *NSGAP], "any"),
    (["ns-gap", "m.safetensors", "--fix-ap", "--measure", "eval", "--reference", "running", "--out", "g.csv",
      *NSGAP], "ok"),
    (["ns-gap", "m.safetensors", "--fix-ap", "--branch", "clean", "--measure", "eval", "--out", "g.csv", *NSGAP],
     "ok"),
    (["ns-gap", "m.safetensors", "--layer", "20", "--out", "g.csv", *NSGAP], "layer"),
    (["ns-gap", "m.safetensors", "--out", "g.csv", "--n", "8", "--batch-size", "16", "--steps", "1", *FAST], "any"),
    (["ns-gap", "m.safetensors", "--out", "gap2.csv", *NSGAP[:-4], "--data-dir", "data"], "ok"),
    (["ns-gap", "c100.safetensors", "--out", "g.csv", *NSGAP], "cifar100"),
    # train: --resume and --out meet a folder
    (["train", "--out", "unfin", *UNFIN, "--resume"], "ok"),
    (["train", "--out", "unfin", *UNFIN], "--resume"),
    (["train", "--out", "unfin", *fz.without(UNFIN, "--norm", True), "--norm", "bn", "--resume"], "other settings"),
    (["train", "--out", "unfin", *UNFIN, "--eps", "16", "--resume"], "other settings"),
    (["train", "--out", "unfin", *UNFIN, "--width", "0.125", "--resume"], "other settings"),
    (["train", "--out", "unfin", *UNFIN, "--seed", "1", "--resume"], "other settings"),
    (["train", "--out", "unfin", *UNFIN, "--loss", "trades", "--resume"], "other settings"),
    (["train", "--out", "unfin", *fz.without(UNFIN, "--epochs", True), "--epochs", "1", "--resume"],
     "other settings"),
    (["train", "--out", "unfin", *UNFIN, "--resume", "--overwrite"], "exclude"),
    (["train", "--out", "unfin", *UNFIN, "--overwrite"], "ok"),
    (["train", "--out", "run", *TRAIN[3:], "--resume"], "finished run"),
    (["train", "--out", "unfin-trunc", *UNFIN, "--resume"], "resume"),
    (["train", "--out", "unfin-lastbad", *UNFIN, "--resume"], "any"),
    (["train", "--out", "unfin-nostate", *UNFIN, "--resume"], "error"),
    (["train", "--out", "rep-old", *TRAIN[1:]], "not a training run"),
    (["train", "--out", "csvdir", *TRAIN[1:], "--resume"], "not a training run"),
    (["train", "--out", "new", *TRAIN[1:], "--resume"], "ok"),
    (["train", "--out", "new", *TRAIN[1:], "--dataset", "cifar100"], "any"),
    (["train", "--out", "new", *fz.without(TRAIN[1:], "--batch-size", True), "--batch-size", "32"], "any"),
    (["train", "--out", "new", *TRAIN[1:], "--clean-weight", "0.3", "--loss", "trades"], "error"),
    (["train", "--out", "new", *TRAIN[1:], "--trades-beta", "1"], "error"),
    (["train", "--out", "new", *TRAIN[1:], "--norm", "cross-bn-swap"], "any"),
    (["train", "--out", "new", *TRAIN[1:], "--loss", "clean", "--norm", "dual-bn"], "any"),
    (["train", "--out", "new", *fz.without(TRAIN[1:], "--steps", True), "--steps", "0"], "error"),
    (["train", "--out", "data", *TRAIN[1:]], "error"),
    # import / export / info
    (["import", "plain.pt", "--layout", "kuangliu", "--out", "i.safetensors"], "error"),
    (["import", "plain.pt", "--layout", "authors-dual-bn", "--out", "i.safetensors"], "error"),
    (["import", "plain.pt", "--layout", "timm-splitbn", "--out", "i.safetensors"], "error"),
    (["import", "plain.pt", "--arch", "preact18", "--out", "i.safetensors"], "error"),
    (["import", "plain.pt", "--arch", "wrn34-10", "--out", "i.safetensors"], "error"),
    (["import", "plain.pt", "--num-classes", "100", "--out", "i.safetensors"], "error"),
    (["import", "plain.pt", "--dataset", "cifar100", "--out", "i.safetensors"], "classes"),
    (["import", "plain.pt", "--adv-split", "main", "--out", "i.safetensors"], "error"),
    (["import", "plain.pt", "--norm", "dual-linear", "--out", "i.safetensors"], "any"),
    (["import", "plain.pt", "--norm", "gn", "--out", "i.safetensors"], "error"),
    (["import", "plain.pt", "--input-mean", "0,0,0", "--out", "i.safetensors"], "error"),
    (["import", "m.safetensors", "--out", "i.safetensors"], "already a hybridat"),
    (["import", "unfin/resume.safetensors", "--out", "i.safetensors"], "error"),
    (["import", "e-norm.safetensors", "--input-mean", "0,0,0", "--input-std", "1,1,1", "--out", "i.safetensors"],
     "ok"),  # a torch file under a .safetensors name
    (["export", "bn.safetensors", "--branch", "clean", "--layout", "torchvision", "--out", "e.pt"], "any"),
    (["export", "noaffine.safetensors", "--branch", "adv", "--layout", "torchvision", "--out", "e.pt"], "any"),
    (["export", "swap.safetensors", "--branch", "clean", "--layout", "kuangliu", "--out", "e.pt"], "ok"),
    (["export", "m.safetensors", "--branch", "adv", "--layout", "authors-dual-bn", "--out", "e.pt"], "error"),
    (["export", "unfin/resume.safetensors", "--branch", "adv", "--layout", "torchvision", "--out", "e.pt"], "error"),
    (["info", "swap.safetensors"], "ok"),
    (["info", "unfin/last.safetensors"], "ok"),
    (["info", "unfin/resume.safetensors"], "error"),
    (["info", "e-norm.safetensors"], "error"),
    # report
    (["report", "csvdir", "csvdir", "--out", "rep"], "ok"),
    (["report", "eval.csv", "eval.csv", "--out", "rep"], "ok"),
    (["report", "eval.csv", "csvdir", "--out", "rep"], "any"),
    (["report", "nest", "nest/a", "--out", "rep"], "ok"),
    (["report", "folder", "--out", "rep"], "no eval"),
    (["report", "folder", "eval.csv", "--out", "rep"], "ok"),
    (["report", "eval.csv", "old.csv", "--out", "rep"], "any"),
    (["report", "eval.csv", "future.csv", "--out", "rep"], "any"),
    (["report", "eval.csv", "fixture-eval.csv", "--out", "rep"], "any"),
    (["report", "eval.csv", "--out", "csvdir"], "any"),
    (["report", ".", "--out", "rep"], "any"),
    (["report", "eval.csv", "--out", "rep", "--margin", "0", "--ratio-margin", "1"], "ok"),
]
_EXTRA = '''
import shutil, sys
from pathlib import Path
import pandas as pd
from hybridat.checkpoint import save_checkpoint
from hybridat.models import ModelConfig, build_model
from hybridat.run import run_training
from hybridat.train import TrainConfig
from conftest import perturb, tiny
import torch

ws = Path(sys.argv[1])
meta = {"train": {"loss": "hybrid", "eps": 8.0, "epochs": 1, "steps": 1, "dataset": "cifar10"}, "seed": "0",
        "run": "r", "epoch": "1"}
save_checkpoint(perturb(tiny("bn-noaffine")), ws / "noaffine.safetensors", **meta)
torch.manual_seed(0)
model = perturb(build_model(ModelConfig("resnet18", "dual-bn", width=0.0625, num_classes=100)))
save_checkpoint(model, ws / "c100.safetensors", **(meta | {"train": meta["train"] | {"dataset": "cifar100"}}))

class Stop(Exception):
    pass

def stop(row):
    raise Stop
cfg = TrainConfig(loss="hybrid", eps=8.0, step=2.0, steps=1, epochs=2, batch_size=8, seed=0, train_subset=16)
try:
    run_training(ws / "unfin", ModelConfig("resnet18", "dual-bn", 0.0625), cfg, data_dir=ws / "data",
                 on_epoch=stop, graphs=False)
except Stop:
    pass
for name, damaged in (("unfin-trunc", "resume.safetensors"), ("unfin-lastbad", "last.safetensors"),
                      ("unfin-nostate", None)):
    shutil.copytree(ws / "unfin", ws / name)
    (ws / name / ".lock").unlink(missing_ok=True)
    if damaged:
        whole = (ws / name / damaged).read_bytes()
        (ws / name / damaged).write_bytes(whole[:len(whole) // 2])
    else:
        (ws / name / "resume.safetensors").unlink()
(ws / "unfin" / ".lock").unlink(missing_ok=True)
frame = pd.read_csv(ws / "eval.csv")
frame.drop(columns=[c for c in ("attack_precision", "aa_attacks", "aa_restarts", "aa_eot_iter") if c in frame]
           ).to_csv(ws / "old.csv", index=False)
frame.assign(future_column="x").to_csv(ws / "future.csv", index=False)
for sub in ("nest/a", "nest/a/b"):
    (ws / sub).mkdir(parents=True)
shutil.copy(ws / "eval.csv", ws / "nest/a/eval.csv")
shutil.copy(ws / "gap.csv", ws / "nest/a/b/gap.csv")
(ws / "notrun").mkdir()
(ws / "notrun" / "notes.txt").write_text("mine")
'''


def build_workspace(ws: Path) -> None:
    """fuzz_cli's workspace, and what the pairs and picked cases meet (module docstring)."""
    fz.build_workspace(ws)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(fz.REPO), str(fz.REPO / "tests")])}
    done = subprocess.run([sys.executable, "-c", _EXTRA, str(ws)], env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode:
        raise SystemExit(f"building the workspace: {done.stderr}")
    steps = [["swap-bn", "m.safetensors", "--cross", "--out", "swap.safetensors"],
             ["export", "m.safetensors", "--branch", "adv", "--layout", "torchvision", "--out", "e-norm.pt"]]
    for args in steps:
        done = subprocess.run([sys.executable, "-m", "hybridat", *args], cwd=ws, env=env, capture_output=True,
                              text=True, timeout=600)
        if done.returncode:
            raise SystemExit(f"building the workspace: hybridat {' '.join(args)} failed:\n{done.stderr}")
    shutil.copy(ws / "e-norm.pt", ws / "e-norm.safetensors")  # a torch pickle under a safetensors name
    shutil.copy(fz.REPO / "tests" / "fixtures" / "report" / "eval.csv", ws / "fixture-eval.csv")
    unreadable = ws / "unreadable-data"
    shutil.copytree(ws / "data", unreadable)
    os.chmod(unreadable, 0)


# -- the cases ---------------------------------------------------------------------------------------------------

def _given(param, value) -> list[str]:
    if isinstance(value, tuple):  # a bool flag
        return list(value)
    return [param.opts[0], value] if param.param_type_name == "option" else [value]


def pair_cases(only: set[str] | None):
    """Every pair of each command's options, each with each of its VALID values, on fuzz_cli's base command."""
    import typer
    from hybridat.cli import app

    for command, cmd in typer.main.get_command(app).commands.items():
        if only and command not in only or not VALID[command]:
            continue
        params = [p for p in cmd.params if p.name in VALID[command]]
        for a, b in itertools.combinations(params, 2):  # none for info: its one argument is in PICKED
            base = fz.BASE_FOR.get((command, a.name)) or fz.BASE_FOR.get((command, b.name)) or fz.BASES[command]
            for va, vb in itertools.product(VALID[command][a.name], VALID[command][b.name]):
                args = list(base)
                positional = []
                for p, v in ((a, va), (b, vb)):
                    if p.param_type_name == "argument":
                        positional = [*positional, v] if p.multiple else [v]
                        continue
                    args = fz.without(args, p.opts[0], not isinstance(v, tuple))
                    for flag in [*p.opts[1:], *p.secondary_opts]:
                        args = fz.without(args, flag, False)
                    args += _given(p, v)
                if positional:
                    args = _with_positional(command, args, positional)
                yield {"command": command, "part": "pairs", "option": f"{a.name}+{b.name}",
                       "value": f"{va} {vb}", "args": args}


def _with_positional(command: str, args: list[str], values: list[str]) -> list[str]:
    if command == "report":  # the base's CSVs replaced
        return [command, *values, *args[args.index("--out"):]]
    return [command, *values, *args[2:]]


ENV = [  # (name, value, command line, what it must give); None as the value: unset
    ("HYBRIDAT_DATA_DIR", "", ["attack", "m.safetensors", "--out", "o.csv", "--n", "8", "--device", "cpu"], "ok"),
    ("HYBRIDAT_DATA_DIR", "data", ["attack", "m.safetensors", "--out", "o.csv", "--n", "8", "--device", "cpu"], "ok"),
    ("HYBRIDAT_DATA_DIR", "./data/", ["ns-gap", "m.safetensors", "--out", "g.csv", "--n", "8", "--device", "cpu"],
     "ok"),
    ("HYBRIDAT_DATA_DIR", "a-file", ["attack", "m.safetensors", "--out", "o.csv", "--n", "8", "--device", "cpu"],
     "a file"),
    ("HYBRIDAT_DATA_DIR", "unreadable-data", ["attack", "m.safetensors", "--out", "o.csv", "--n", "8", "--device",
                                              "cpu"], "error"),
    ("HYBRIDAT_DATA_DIR", "unreadable-data", ["train", "--out", "new", *TRAIN[1:-2]], "error"),
    ("HYBRIDAT_DATA_DIR", "empty-data", ["swap-bn", "m.safetensors", "--reestimate", "adv", "--n", "8", "--device",
                                         "cpu", "--out", "o.safetensors"], "error"),
    ("HYBRIDAT_DATA_DIR", "data", ["attack", "m.safetensors", "--out", "o.csv", "--n", "8", "--device", "cpu",
                                   "--data-dir", "a-file"], "a file"),
    ("CUDA_VISIBLE_DEVICES", "", ["attack", "m.safetensors", "--out", "o.csv", *ATTACK[:-2], "--device", "cuda"],
     "CUDA"),
    ("CUDA_VISIBLE_DEVICES", "", ["attack", "m.safetensors", "--out", "o.csv", *ATTACK[:-2], "--device", "cuda:3"],
     "CUDA"),
    ("CUDA_VISIBLE_DEVICES", "", ["train", "--out", "new", *TRAIN[1:-4], "--data-dir", "data", "--device", "auto"],
     "ok"),
    ("OMP_NUM_THREADS", "abc", ["attack", "m.safetensors", "--out", "o.csv", *ATTACK], "ok"),
    ("OMP_NUM_THREADS", "0", ["attack", "m.safetensors", "--out", "o.csv", *ATTACK], "ok"),
    ("OMP_NUM_THREADS", "-3", ["train", "--out", "new", *TRAIN[1:]], "ok"),
    ("MPLBACKEND", "nonsense", ["report", "eval.csv", "gap.csv", "run/train.csv", "--out", "rep"], "ok"),
    ("MPLBACKEND", "nonsense", ["ns-gap", "m.safetensors", "--out", "g.csv", *NSGAP], "ok"),
    ("MPLBACKEND", "TkAgg", ["report", "eval.csv", "gap.csv", "--out", "rep"], "ok"),
    ("MPLCONFIGDIR", "a-file", ["report", "eval.csv", "gap.csv", "--out", "rep"], "ok"),
]
TORCHRUN = [  # stale torchrun variables, each set of them on a tiny train
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "error"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"},
     "error"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}, "error"),
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29513"}, "error"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, "ok"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({"LOCAL_RANK": "x"}, "ok"),  # no GPU: the cpu device reads no LOCAL_RANK
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29514"}, "error"),
]


def env_cases():
    for name, value, args, expect in ENV:
        yield {"command": args[0], "part": "env", "option": name, "value": repr(value), "args": args,
               "env": {name: value}, "expect": expect, "spawn": name in ("OMP_NUM_THREADS", "MPLBACKEND",
                                                                          "CUDA_VISIBLE_DEVICES")}
    for env, expect in TORCHRUN:
        yield {"command": "train", "part": "env", "option": "torchrun", "value": " ".join(f"{k}={v}" for k, v in
                                                                                        env.items()),
               "args": ["train", "--out", "new", *TRAIN[1:]], "env": env, "expect": expect, "spawn": True,
               "timeout": 90}  # the processes' rendezvous: 60 s (hybridat.runtime.RENDEZVOUS_S)


def picked_cases(only: set[str] | None):
    for args, expect in PICKED:
        if not only or args[0] in only:
            yield {"command": args[0], "part": "picked", "option": "", "value": "", "args": args, "expect": expect}


INTERRUPTED = {  # what runs long enough to be interrupted, and a little less than it takes alone (seconds): the
    # signal comes at a random moment of that
    "train": (["train", "--out", "new", *fz.without(TRAIN[1:], "--epochs", True), "--epochs", "3",
               "--train-subset", "96"], 2.5),
    "attack": (["attack", "m.safetensors", "--out", "o.csv", "--attack", "clean", "--attack", "pgd", "--steps",
                "20", "--n", "64", "--batch-size", "8", "--no-graphs", *FAST], 1.7),
    "swap-bn": (["swap-bn", "m.safetensors", "--reestimate", "adv", "--n", "64", "--steps", "5", "--batch-size", "8",
                 *FAST, "--out", "o.safetensors"], 0.5),
    "ns-gap": (["ns-gap", "m.safetensors", "--out", "g.csv", "--n", "64", "--steps", "5", "--batch-size", "8",
                *FAST], 1.1),
    "report": (["report", "eval.csv", "gap.csv", "run/train.csv", "--out", "rep"], 1.3),
    "import": (["import", "plain.pt", "--out", "i.safetensors"], 0.3),
}


def signal_cases(only: set[str] | None, rng: random.Random, per: int = 6):
    for command, (args, seconds) in INTERRUPTED.items():
        if only and command not in only:
            continue
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            for _ in range(per if command in ("train", "attack") else per // 2):
                at = round(rng.uniform(0.05, seconds), 2)
                yield {"command": command, "part": "signals", "option": sig.name, "value": f"at {at} s", "args": args,
                       "signal": (int(sig), at)}


# -- judging -----------------------------------------------------------------------------------------------------

def complete(path: Path) -> str:
    """"" if the file at `path` is whole (it loads), else why not."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            load_file(path)  # numpy: no torch threads in the forking process
        elif path.suffix == ".csv":
            import pandas as pd

            if pd.read_csv(path).empty:
                return "a CSV without rows"
        elif path.suffix == ".png":
            if not path.read_bytes().endswith(b"IEND\xaeB`\x82"):
                return "a PNG without its end"
        elif path.stat().st_size == 0:
            return "empty"
    except Exception as e:  # noqa: BLE001 (what failed is the finding)
        return f"{type(e).__name__}: {str(e)[:100]}"
    return ""


def judge(run, status: int) -> dict:
    """fuzz_cli's classes; a picked or env case held to what it must give; an interrupted one to the module
    docstring's rules."""
    r = fz.classify(run, status)
    case, lines = run.case, r["stderr"].strip().splitlines()
    if run.signalled_at is not None:
        r = _interrupted(run, r, lines)
    elif case.get("expect") and r["result"] != "BAD":
        expect = case["expect"]
        if expect == "ok" and r["result"] != "ok" or expect not in ("ok", "any") and r["result"] != "error":
            r["problems"].append(f"expected {expect}")
        elif expect not in ("ok", "any", "error") and expect.lower() not in r["stderr"].lower():
            r["problems"].append(f"expected an error line with {expect!r}")
        if r["problems"]:
            r["result"] = "BAD"
    if case.get("env") and r["result"] == "started" and case["expect"] == "error":
        r["result"] = "BAD"  # a hang on a value that should be refused
        r["problems"].append("hung")
    return r


def _interrupted(run, r: dict, lines: list[str]) -> dict:
    keep = [p for p in r["problems"] if p.startswith(("inputs changed", "folders gone", "temp files left"))]
    sig, code = run.case["signal"][0], r["code"]
    if sig == signal.SIGKILL:  # no cleanup can run: the rerun below must remove what it left
        keep = [p for p in keep if not p.startswith("temp files left")]
    if code == 0:
        r["result"] = "ok"  # it finished before the signal
    elif sig == signal.SIGKILL and code == -signal.SIGKILL:
        r["result"] = "interrupted"
    elif code == 1 and lines and lines[-1].startswith("error: interrupted") and "Traceback" not in r["stderr"]:
        r["result"] = "interrupted"
    elif code == -sig and not r["stderr"].strip():  # before the command's handler was in place: nothing written
        r["result"] = "interrupted"
    else:
        r["result"] = "BAD"
        keep.append(f"after {signal.Signals(sig).name}: exit {code}, {len(lines)} stderr lines")
    for rel in r["new"]:
        path = run.ws / rel
        if path.is_file() and not path.name.startswith(".") and (why := complete(path)):
            keep.append(f"{rel} is not whole ({why})")
    if r["result"] != "BAD" and code:  # the same command again (train: --resume) ends well and leaves no temp file
        again = [*run.case["args"], *(["--resume"] if run.case["command"] == "train" else [])]
        done = subprocess.run([sys.executable, "-m", "hybridat", *again], cwd=run.ws, capture_output=True, text=True,
                              env=os.environ | {"PYTHONPATH": str(fz.REPO)}, timeout=120)
        temps = [str(p.relative_to(run.ws)) for p in run.ws.rglob("*.tmp")]
        if done.returncode or temps:
            keep.append(f"run again: exit {done.returncode}, temp files {temps}, {done.stderr.strip()[-300:]!r}")
    r["problems"] = keep
    if keep:
        r["result"] = "BAD"
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fz.common_arguments(ap, 25.0)
    ap.add_argument("--part", default="pairs,picked,env,signals", help="parts to run, comma-separated")
    ap.add_argument("--seed", type=int, default=0, help="seed of the signals' moments")
    opts = ap.parse_args()
    root, base_ws, user = fz.prepare(opts, build_workspace)
    only = set(opts.only.split(",")) if opts.only else None
    parts = opts.part.split(",")
    cases = [*(pair_cases(only) if "pairs" in parts else []), *(picked_cases(only) if "picked" in parts else []),
             *(c for c in env_cases() if (not only or c["command"] in only) and "env" in parts),
             *(signal_cases(only, random.Random(opts.seed)) if "signals" in parts else [])]
    for i, c in enumerate(cases):
        c["id"] = i
    signalled = [c for c in cases if "signal" in c]  # one at a time: judging one (it runs the command again)
    results = fz.sweep([c for c in cases if "signal" not in c], opts, root, base_ws, user, judge)  # holds the loop
    if signalled:
        results += fz.sweep(signalled, argparse.Namespace(**{**vars(opts), "workers": 1, "json": None}), root,
                            base_ws, user, judge)
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=1))
    refused = [r for r in results if r["part"] == "pairs" and r["result"] == "error"]
    if refused:
        print(f"\nrefused pairs ({len(refused)}), to read:", file=sys.stderr)
        for r in refused:
            print(f"  {r['option']:28s} {r['value']:28s} {r['stderr'].strip()[:150]}", file=sys.stderr)
    for r in results:
        r["command_part"] = f"{r['part']}: {r['command']}"
    bad = fz.print_table(results, ("ok", "error", "started", "interrupted", "BAD"), key="command_part")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
