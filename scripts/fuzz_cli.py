"""Every option of every `hybridat` command, fed hostile values chosen by the option's type; each case in a
subprocess with a timeout, classified, and every input file hashed before and after.

    python scripts/fuzz_cli.py [--only attack,train] [--workers 2] [--timeout 20] [--json cases.json]

The options are listed from the Typer app (`typer.main.get_command(hybridat.cli.app)`), so a new option is swept
without an edit here (its kind is read from its annotation; a str option not in CHOICES is fed free text). Each case
runs in a fresh copy of a workspace built once: fake CIFAR-10 (64 images per file), a tiny trained run (width
1/16, 32 images, 1 epoch, PGD-1), its eval and ns-gap CSVs, an exported plain state dict and hostile files (empty,
random bytes, a folder named like a checkpoint, a read-only folder, damaged data folders). Results:

- ok        exit 0
- error     exit 1, exactly one line on stderr (`error: ...`) and nothing on stdout
- started   still running at --timeout (a valid value that started real work): ended with SIGTERM
- BAD       anything else: a traceback, exit 2, several lines, a signal, an input that changed, a file left by a
            failing case, a temp file left behind, or a hang on a value that the checks should have refused

Each case is a fork of a process that has imported hybridat (fast; the same code path as `python -m hybridat`),
run as --user (nobody) when the sweep runs as root, so that permissions stop it as they stop a user; `--spawn`
starts a fresh interpreter per case instead (as root, the read-only cases then cannot fail). A full sweep: 802
cases in 5 minutes on 2 CPU cores (13 while another job shared them), a third of it the 11 `bench` cases that
start work and run to --timeout.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAST = ["--device", "cpu", "--data-dir", "data"]
BASES = {  # a valid command line for each command, as small as the command allows
    "train": ["train", "--out", "runs/new", "--width", "0.0625", "--train-subset", "16", "--epochs", "1", "--steps",
              "1", "--batch-size", "8", "--quiet", "--no-graphs", *FAST],
    "attack": ["attack", "m.safetensors", "--out", "o.csv", "--n", "8", "--no-graphs", *FAST],  # PGD-10 (no --steps,
    # which would be refused with --attack other than pgd, before the value swept)
    "swap-bn": ["swap-bn", "m.safetensors", "--cross", "--out", "o.safetensors"],
    "ns-gap": ["ns-gap", "m.safetensors", "--out", "g.csv", "--n", "8", "--steps", "1", "--batch-size", "8", *FAST],
    "report": ["report", "eval.csv", "gap.csv", "run/train.csv", "--out", "rep"],
    "bench": ["bench", "--quick", "--rounds", "1", "--device", "cpu"],
    "import": ["import", "plain.pt", "--out", "i.safetensors"],
    "export": ["export", "m.safetensors", "--branch", "adv", "--layout", "torchvision", "--out", "e.pt"],
    "info": ["info", "m.safetensors"],
}
REESTIMATE = ["swap-bn", "m.safetensors", "--reestimate", "adv", "--n", "8", "--steps", "1", "--batch-size", "8",
              *FAST, "--out", "o.safetensors"]
BASE_FOR = {  # (command, option) -> the base its option needs to matter
    ("train", "trades_beta"): BASES["train"] + ["--loss", "trades"],
    ("attack", "aa_version"): BASES["attack"] + ["--attack", "autoattack"],
    ("attack", "aa_attacks"): BASES["attack"] + ["--attack", "autoattack"],
    ("attack", "aa_restarts"): BASES["attack"] + ["--attack", "autoattack", "--aa-attacks", "apgd-ce"],
    ("import", "input_mean"): BASES["import"] + ["--input-std", "1,1,1"],
    ("import", "input_std"): BASES["import"] + ["--input-mean", "0,0,0"],
    **{("swap-bn", o): REESTIMATE for o in ("reestimate", "branch", "n", "eps", "step", "steps", "batch_size",
                                            "data_dir", "seed", "device")},
    **{("swap-bn", o): ["swap-bn", "m.safetensors", "--out", "o.safetensors"] for o in ("cross", "swap_ap", "ns",
                                                                                         "ap")},
}
CHOICES = {  # str options that name one of a set: a valid name, to change its case
    "norm": "dual-bn", "loss": "hybrid", "arch": "resnet18", "dataset": "cifar10", "device": "cpu", "attack": "pgd",
    "branch": "adv", "aa_version": "standard", "layout": "torchvision", "reestimate": "adv", "start": "uniform",
    "noise": "uniform", "measure": "train", "reference": "batch", "adv_split": "aux",
}
NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e30", "abc", ""]
INTEGERS = NUMBERS + ["1", "2.5", "99999999999999999999"]  # the least (a batch of one); a fraction; past int64
FLOATS = NUMBERS + ["1e-30"]
TEXT = {  # free-text str options: malformed values of their own format
    "input_mean": ["nan,0,0", "1,2", "a,b,c", "", "1,,2", "1e30,0,0", "0,0,0,0"],
    "input_std": ["0,0,0", "-1,1,1", "inf,1,1", "1,2", "", "x"],
    "ns": ["adv", "=", "", "adv=", "=clean", "ADV=clean", "adv=clean=adv", "both=adv"],
    "ap": ["clean", "", "clean=ADV", "x=y"],
    "aa_attacks": ["", ",", "apgd-ce,", "APGD-CE", "apgd-ce,apgd-ce", "bogus", " apgd-ce"],
}
SUFFIX = {"attack": ".csv", "ns-gap": ".csv", "bench": ".csv", "swap-bn": ".safetensors", "import": ".safetensors",
          "export": ".pt"}
INPUT_OF = {"attack": "m.safetensors", "ns-gap": "m.safetensors", "swap-bn": "m.safetensors", "export":
            "m.safetensors", "import": "plain.pt", "report": "eval.csv", "bench": "m.safetensors"}
CHECKPOINTS = ["nope.safetensors", "dir.safetensors", "empty.safetensors", "random.safetensors", "eval.csv",
               "plain.pt", "", "data", "run", "truncated.safetensors", "bn.safetensors"]  # the last: one branch
FOREIGN = ["nope.pt", "folder", "empty.safetensors", "random.safetensors", "eval.csv", "m.safetensors", "",
           "empty.pt", "truncated.pt", "data"]
CSVS = ["nope.csv", "", "empty.csv", "random.csv", "header.csv", "other.csv", "m.safetensors", "folder", "data",
        "a-file", "gap-depth.png"]
DATA_DIRS = ["nope-data", "a-file", "empty-data", "bad-data", "wrong-data", "short-data", ""]


@functools.lru_cache(maxsize=1)
def _hints() -> dict[str, dict]:
    """{command: {parameter: its type}}, from the annotations of the functions the Typer app registers."""
    import typing

    from hybridat.cli import app

    return {info.name: typing.get_type_hints(info.callback) for info in app.registered_commands}


def option_kind(command: str, param) -> str:
    """bool, int, float, choice, text, or for a path: out, data-dir, ckpt, foreign, csvs; from the annotation."""
    import typing

    ann = _hints()[command][param.name]
    while typing.get_origin(ann) in (list, typing.Union):  # list[int] -> int, Optional[Path] -> Path
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    if ann in (bool, int, float):
        return ann.__name__
    if ann is Path:
        paths = {"out": "out", "data_dir": "data-dir", "checkpoint": "ckpt", "src": "foreign", "runs": "csvs"}
        return paths[param.name]
    return "choice" if param.name in CHOICES else "text"


def values_for(command: str, param) -> list[tuple[str, list[str]]]:
    """(label, the arguments that give the value) for each hostile value of this option."""
    kind, flag = option_kind(command, param), (param.opts[0] if param.opts else None)

    def given(value):
        return [flag, value] if param.param_type_name == "option" else [value]

    if kind == "bool":
        out = [(flag, [flag]), (f"{flag}=1", [f"{flag}=1"])]
        return out + [(no, [no]) for no in param.secondary_opts]
    if kind in ("int", "float"):
        vals = INTEGERS if kind == "int" else FLOATS
        cases = [(repr(v), given(v)) for v in vals]
        if param.multiple:
            cases.append(("twice", [flag, "1", flag, "1"]))
        return cases
    if kind == "choice":
        valid = CHOICES[param.name]
        vals = ["bogus", "", valid.upper(), f" {valid}"]
        if param.name == "device":
            vals += ["cuda", "cpu:0", "mps", "meta"]
        cases = [(repr(v), given(v)) for v in vals]
        if param.multiple:
            cases.append(("twice", [flag, valid, flag, valid]))
        return cases
    if kind == "text":
        return [(repr(v), given(v)) for v in TEXT.get(param.name, ["bogus", ""])]
    if kind == "data-dir":
        return [(repr(v), given(v)) for v in DATA_DIRS]
    if kind == "ckpt":
        return [(repr(v), given(v)) for v in CHECKPOINTS]
    if kind == "foreign":
        return [(repr(v), given(v)) for v in FOREIGN]
    if kind == "csvs":
        return [(repr(v), given(v)) for v in CSVS]
    if kind == "out":
        if command in ("train", "report"):  # a folder
            vals = ["nope/deeper/x", "ro/x", "a-file", "", ".", "data", "run", "m.safetensors", "folder",
                    "dir.safetensors"]
            if command == "report":
                vals += ["csvdir", "rep-old"]
        else:
            s = SUFFIX[command]
            vals = [f"nope/o{s}", f"ro/o{s}", INPUT_OF[command], f"existing{s}", "o.txt", "", "folder",
                    f"a-file/o{s}", "data/cifar-10-batches-py/test_batch", f"o{s}{s}", s]
            if command == "export":
                vals += ["e.safetensors", "e.pth", "e.PT"]
        cases = [(repr(v), given(v)) for v in vals]
        if command == "train":  # --overwrite: a finished run is replaced; a foreign folder or a file still is not
            cases += [(f"{v!r} --overwrite", [flag, v, "--overwrite"]) for v in ("run", "a-file", "data", ".")]
        return cases
    raise AssertionError(kind)


def without(args: list[str], flag: str, takes_value: bool) -> list[str]:
    """args with every occurrence of flag (and its value) removed."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = takes_value
            continue
        out.append(a)
    return out


def all_cases(only: set[str] | None):
    import typer
    from hybridat.cli import app

    group = typer.main.get_command(app)
    for command, cmd in group.commands.items():
        if only and command not in only:
            continue
        for param in cmd.params:
            base = BASE_FOR.get((command, param.name), BASES[command])
            for label, extra in values_for(command, param):
                if param.param_type_name == "argument":
                    args = [command, *extra, *base[2:]]  # the positional replaced
                    if command == "report":
                        args = [command, *extra, "--out", "rep"]
                else:
                    args = without(base, param.opts[0], option_kind(command, param) != "bool")
                    for no in param.secondary_opts:
                        args = without(args, no, False)
                    args = args + extra
                yield {"command": command, "option": param.name, "kind": option_kind(command, param), "value": label,
                       "args": args}


# -- the workspace -----------------------------------------------------------------------------------------------

def _damaged_cifar10(root: Path, content) -> None:
    """The test suite's fake CIFAR-10 folder (tests/conftest.py), each file's bytes replaced by content(name)."""
    from conftest import fake_cifar10

    for path in (fake_cifar10(root, 0) / "cifar-10-batches-py").iterdir():
        path.write_bytes(content(path.name))


def build_workspace(ws: Path) -> None:
    from conftest import fake_cifar10  # tests/: on the path from main()

    ws.mkdir(parents=True)
    fake_cifar10(ws / "data", 64)
    steps = [
        BASES["train"][:2] + ["run"] + BASES["train"][3:] + ["--train-subset", "32"],
        ["attack", "run/model.safetensors", "--out", "eval.csv", "--n", "8", "--steps", "1", "--no-graphs", *FAST],
        ["ns-gap", "run/model.safetensors", "--out", "gap.csv", "--n", "8", "--steps", "1", "--batch-size", "8",
         *FAST],
        ["export", "run/model.safetensors", "--branch", "adv", "--layout", "torchvision", "--out", "plain.pt"],
        ["import", "plain.pt", "--out", "bn.safetensors"],  # a one-branch (bn) checkpoint
    ]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    for args in steps:
        done = subprocess.run([sys.executable, "-m", "hybridat", *args], cwd=ws, env=env, capture_output=True,
                              text=True, timeout=600)
        if done.returncode:
            raise SystemExit(f"building the workspace: hybridat {' '.join(args)} failed:\n{done.stderr}")
    shutil.copy(ws / "run" / "model.safetensors", ws / "m.safetensors")
    # the modules a run of every command imports (lazily, some of them): the forking parent imports them all
    # first, so that a case dropped to --user never has to read them (a venv's Python may live under /root)
    script = ("import json, sys\nfrom hybridat.cli import app\nfor args in json.loads(sys.argv[1]):\n"
              "    try:\n        app(args, standalone_mode=False)\n    except BaseException:\n        pass\n"
              "print(json.dumps(sorted(sys.modules)))")
    runs = [["attack", "m.safetensors", "--out", "x.csv", "--n", "8", "--attack", "autoattack", "--attack", "fgsm",
             "--aa-attacks", "apgd-ce", *FAST], ["report", "eval.csv", "gap.csv", "--out", "x"],
            ["swap-bn", "m.safetensors", "--reestimate", "noise", "--n", "8", *FAST, "--out", "x.safetensors"],
            ["import", "plain.pt", "--out", "x.safetensors"], steps[0][:2] + ["x"] + steps[0][3:],
            ["bench", "--rounds", "0"], ["info", "m.safetensors"]]
    done = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=600)
    (ws.parent / "modules.json").write_text(done.stdout.strip().splitlines()[-1])
    for leftover in ("x.csv", "x", "x.safetensors", "x-channels.csv"):
        shutil.rmtree(ws / leftover) if (ws / leftover).is_dir() else (ws / leftover).unlink(missing_ok=True)
    rng = random.Random(0)
    (ws / "empty.safetensors").write_bytes(b"")
    (ws / "empty.pt").write_bytes(b"")
    (ws / "random.safetensors").write_bytes(rng.randbytes(4096))
    whole = (ws / "m.safetensors").read_bytes()
    (ws / "truncated.safetensors").write_bytes(whole[:len(whole) // 2])
    plain = (ws / "plain.pt").read_bytes()
    (ws / "truncated.pt").write_bytes(plain[:len(plain) // 2])
    (ws / "dir.safetensors").mkdir()
    (ws / "folder").mkdir()
    (ws / "ro").mkdir()
    (ws / "a-file").write_text("a plain file\n")
    for suffix in (".csv", ".safetensors", ".pt"):
        (ws / f"existing{suffix}").write_text("an earlier output\n")
    (ws / "empty.csv").write_text("")
    (ws / "random.csv").write_bytes(rng.randbytes(2048))
    (ws / "header.csv").write_text((ws / "eval.csv").read_text().splitlines()[0] + "\n")
    (ws / "other.csv").write_text("a,b\n1,2\n")
    (ws / "csvdir").mkdir()
    shutil.copy(ws / "eval.csv", ws / "csvdir" / "eval.csv")
    (ws / "rep-old").mkdir()
    (ws / "rep-old" / "notes.txt").write_text("my notes\n")
    (ws / "empty-data").mkdir()
    _damaged_cifar10(ws / "bad-data", lambda name: random.Random(name).randbytes(1024))
    _damaged_cifar10(ws / "wrong-data", lambda name: pickle.dumps({"x": 1}))
    _damaged_cifar10(ws / "short-data", lambda name: pickle.dumps({"data": b"\x00" * 100, "labels": [1, 2]}))
    os.chmod(ws / "ro", 0o555)


def snapshot(ws: Path) -> dict[str, str | None]:
    out = {}
    for p in sorted(ws.rglob("*")):
        rel = str(p.relative_to(ws))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
    return out


# -- running a case ----------------------------------------------------------------------------------------------

def _child(args: list[str], cwd: Path, stdout: Path, stderr: Path, user: int | None, env: dict | None) -> None:
    """In the forked child: the command as `python -m hybridat ARGS` runs it, as `user` if given, with the
    environment variables of `env` set (None: unset); one read when a module loads needs --spawn (the case's)."""
    try:
        for key, value in (env or {}).items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        if user is not None:
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)
        os.chdir(cwd)
        for fd, path in ((1, stdout), (2, stderr)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = ["hybridat", *args]
        from hybridat.cli import main

        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(70)
    os._exit(0)


class Running:
    """One case running: in a fresh copy of the workspace, forked (or spawned: `spawn`, or the case's "spawn"), with
    the case's "env"; its "signal" (signum, seconds) is sent that long after the start."""

    def __init__(self, case: dict, root: Path, base_ws: Path, spawn: bool, user: int | None):
        self.case, self.dir = case, root / f"case{case['id']:04d}"
        self.ws = self.dir / "ws"
        shutil.copytree(base_ws, self.ws, symlinks=True)
        if user is not None:
            for p in [self.dir, *self.dir.rglob("*")]:
                os.chown(p, user, user, follow_symlinks=False)
        self.before = snapshot(self.ws)
        self.out, self.err = self.dir / "stdout", self.dir / "stderr"
        self.t0 = time.monotonic()
        self.term_at = self.signalled_at = None
        if spawn or case.get("spawn"):
            env = os.environ | {"PYTHONPATH": str(REPO)}
            for key, value in case.get("env", {}).items():
                env.pop(key, None) if value is None else env.__setitem__(key, value)
            self.proc = subprocess.Popen([sys.executable, "-m", "hybridat", *case["args"]], cwd=self.ws, env=env,
                                         stdout=open(self.out, "w"), stderr=open(self.err, "w"),
                                         stdin=subprocess.DEVNULL)
            self.pid = self.proc.pid
        else:
            self.proc = None
            self.pid = os.fork()
            if self.pid == 0:
                _child(case["args"], self.ws, self.out, self.err, user, case.get("env"))

    def poll(self, timeout: float):
        """The wait status once the case has ended, else None; SIGTERM at timeout, SIGKILL 10 s later."""
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            return status
        timeout = self.case.get("timeout", timeout)  # a case's own
        spent = time.monotonic() - self.t0
        if self.case.get("signal") and self.signalled_at is None and spent > self.case["signal"][1]:
            self.signalled_at = spent
            os.kill(self.pid, self.case["signal"][0])
        if self.term_at is None and spent > timeout:
            self.term_at = spent
            os.kill(self.pid, signal.SIGTERM)
        elif self.term_at is not None and spent > self.term_at + 10:
            os.kill(self.pid, signal.SIGKILL)
        return None


def classify(run: Running, status: int) -> dict:
    case = run.case
    seconds = time.monotonic() - run.t0
    code = os.waitstatus_to_exitcode(status)
    stdout = run.out.read_text(errors="replace")
    stderr = run.err.read_text(errors="replace")
    after = snapshot(run.ws)
    problems = []
    outputs_named = {a for a in case["args"]}
    changed = [p for p, h in run.before.items() if after.get(p, "gone") != h and h is not None]
    out = case["args"][case["args"].index("--out") + 1] if "--out" in case["args"] else None
    existing = [p for p in changed if p.startswith("existing") and p in outputs_named  # an earlier output
                or {"--overwrite", "--resume"} & set(case["args"]) and out  # asked for: the run goes on or over
                and Path(p).parts[:1] == Path(out).parts[:1]]
    changed = [p for p in changed if p not in existing]
    if changed:
        problems.append(f"inputs changed: {changed}")
    gone = [p for p, h in run.before.items() if h is None and p not in after]
    if gone:
        problems.append(f"folders gone: {gone}")
    new = sorted(set(after) - set(run.before))
    temps = [p for p in new if p.endswith(".tmp") or Path(p).name.startswith(".") and Path(p).name != ".lock"]
    if temps:
        problems.append(f"temp files left: {temps}")
    lines = stderr.strip().splitlines()
    if run.term_at is not None:
        result = "started"
        if code not in (1, -signal.SIGTERM) or (code == 1 and "interrupted" not in stderr):
            problems.append(f"after SIGTERM: exit {code}, {stderr.strip()[-300:]!r}")
    elif code == 0:
        result = "ok"
    elif code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and not stdout.strip():
        result = "error"
        left = [p for p in new if Path(p).name != ".lock"]
        files = [p for p in left if (run.ws / p).is_file()]
        if left and not (files and all(p in stderr for p in files)):  # kept on purpose when its error line says so
            problems.append(f"a failing case left {left}")
    else:
        result = "BAD"
        why = "traceback" if "Traceback" in stderr else f"exit {code}, {len(lines)} stderr lines"
        problems.append(why)
    if problems and result != "BAD":
        result = "BAD"
    return case | {"result": result, "code": code, "seconds": round(seconds, 1), "problems": problems,
                   "stderr": stderr[-2000:], "stdout": stdout[-500:], "overwrote": existing, "new": new[:20]}


def common_arguments(ap: argparse.ArgumentParser, timeout: float) -> None:
    """The options of a sweep (this one's and scripts/fuzz_combos.py's)."""
    ap.add_argument("--only", help="commands to sweep, comma-separated (default: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=timeout)
    ap.add_argument("--root", type=Path, help="work folder (default: a new temp folder)")
    ap.add_argument("--json", type=Path, help="write every case's result here")
    ap.add_argument("--spawn", action="store_true", help="a fresh interpreter per case instead of a fork")
    ap.add_argument("--keep", action="store_true", help="keep each case's workspace")
    ap.add_argument("--user", type=int, default=65534, help="run as root: each forked case drops to this uid (and "
                    "gid), so that a read-only folder stops it (default: nobody)")


def prepare(opts, build=build_workspace) -> tuple[Path, Path, int | None]:
    """(root, the workspace every case copies, the uid cases run as): the workspace built by `build` once."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: two cases at once on a shared 2-core host
    sys.path[:0] = [str(REPO), str(REPO / "tests")]  # hybridat, and the suite's fake CIFAR-10 (conftest.py)
    user = opts.user if os.geteuid() == 0 and not opts.spawn else None
    if os.geteuid() == 0 and user is None:
        print("warning: running as root: the read-only folder stops nothing (see the docstring)", file=sys.stderr)
    root = opts.root or Path(tempfile.mkdtemp(prefix="hybridat-fuzz-"))
    root.mkdir(parents=True, exist_ok=True)
    if user is not None:  # mkdtemp makes it 0700: `user` must pass through it to its case folders
        root.chmod(0o755)
    os.environ.setdefault("MPLCONFIGDIR", str(root / "mpl"))
    os.environ["HOME"] = str(root / "home")  # the cases' own (torch, matplotlib caches), writable by `user`
    for folder in (root / "mpl", root / "home"):
        folder.mkdir(exist_ok=True)
        if user is not None:
            os.chown(folder, user, user)
    base_ws = root / "base"
    if not base_ws.exists():
        print(f"building the workspace in {base_ws} ...", file=sys.stderr)
        build(base_ws)
    return root, base_ws, user


def sweep(cases: list[dict], opts, root: Path, base_ws: Path, user: int | None, judge=classify) -> list[dict]:
    """Every case run (opts.workers at a time) and judged by `judge(run, status)`; BAD ones printed as they end."""
    for i, c in enumerate(cases):
        c.setdefault("id", i)  # given: a caller's numbering over several sweeps
    if not opts.spawn:  # imported once, before the forks (importing starts no thread)
        import importlib

        for name in json.loads((root / "modules.json").read_text()):
            try:
                importlib.import_module(name)
            except Exception:
                pass
    print(f"{len(cases)} cases in {root}", file=sys.stderr)
    results, pending, running = [], list(cases), []
    while pending or running:
        while pending and len(running) < opts.workers:
            case = pending.pop(0)
            running.append(Running(case, root, base_ws, opts.spawn, None if case.get("as_root") else user))
        time.sleep(0.05)
        for run in list(running):
            status = run.poll(opts.timeout)
            if status is None:
                continue
            running.remove(run)
            r = judge(run, status)
            if user is not None and not run.case.get("as_root") and ("No module named" in r["stderr"]
                                                                     or "Permission denied: '/root" in r["stderr"]):
                pending.append(run.case | {"as_root": True})  # a module --user cannot read: the harness, not hybridat
                shutil.rmtree(run.dir, ignore_errors=True)
                continue
            results.append(r)
            if r["result"] == "BAD":
                print(f"BAD  hybridat {' '.join(map(repr, r['args']))}\n     {r['problems']}\n     "
                      f"{r['stderr'].strip()[-600:]}", file=sys.stderr)
            if not opts.keep:
                shutil.rmtree(run.dir, ignore_errors=True)
    results.sort(key=lambda r: r["id"])
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=1))
    return results


def print_table(results: list[dict], classes=("ok", "error", "started", "BAD"), key: str = "command") -> int:
    """Cases per `key` and result class; returns how many are BAD."""
    width = max([10, *(len(str(r[key])) for r in results)])
    print(f"{key:{width}s} {'cases':>5s} " + " ".join(f"{c:>{max(4, len(c))}s}" for c in classes))
    for name in [*dict.fromkeys(r[key] for r in results), "all"]:
        count = Counter(r["result"] for r in results if name == "all" or r[key] == name)
        print(f"{name:{width}s} {sum(count.values()):5d} " + " ".join(f"{count[c]:{max(4, len(c))}d}"
                                                                      for c in classes))
    return Counter(r["result"] for r in results)["BAD"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(ap, 20.0)
    ap.add_argument("--option", help="options to sweep, comma-separated (default: all)")
    opts = ap.parse_args()
    root, base_ws, user = prepare(opts)
    cases = list(all_cases(set(opts.only.split(",")) if opts.only else None))
    if opts.option:
        cases = [c for c in cases if c["option"] in opts.option.split(",")]
    sys.exit(1 if print_table(sweep(cases, opts, root, base_ws, user)) else 0)


if __name__ == "__main__":
    main()
