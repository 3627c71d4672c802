"""Every parameter of every library function the README names (Stages, "From Python ..."), fed hostile values chosen
by the parameter's annotation and name, called in-process as a notebook calls it; each call classified.

    python scripts/fuzz_api.py [--only evaluate,pgd] [--param steps] [--timeout 60] [--json cases.json]

The parameters are read from `inspect.signature`, so a new one is swept without an edit here (its values come from
its name, else from its annotation; an unknown kind fails the sweep). run_training's ModelConfig and TrainConfig
are swept field by field. Every call starts from one valid call (tiny models at 1/16 width, 8 images, PGD-1) in
fuzz_cli's workspace (fake CIFAR-10, a trained dual-bn run, a one-branch import, its CSVs, hostile files), with its
objects loaded afresh. Results:

- ok        returned, and nothing below went wrong
- error     HybridatError with one line
- raised    a callback's own exception, or Python's TypeError for a callback that takes no arguments, passed
            through (the caller's code, not the library's)
- started   still running at --timeout (a valid value that started real work)
- BAD       anything else: another exception (TypeError, RuntimeError, IndexError from inside torch), a message of
            several lines, a NaN in what came back, the caller's global random streams (torch, random, numpy) or
            thread count changed, an input file or an input object (model weights, pixels, labels) changed, a file
            left by a failing call or a temp file left by any

`ok` on a NaN, infinite or huge value is listed for a reading (`ok?`); it is not counted BAD by itself. Judged
acceptable and not counted: a run folder's .lock (as fuzz_cli), the resume state a run keeps when a callback raises
after an epoch (as after an interrupt), the train.csv a diverged run keeps (documented), running as root (the
read-only folder then cannot refuse). A full sweep: 1,466 calls in about 3 minutes on 2 CPU cores (the workspace
20 s of it); `pgd` and `robust_accuracy` with steps=1e30 run to --timeout.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests"), str(HERE)]

from fuzz_cli import build_workspace, print_table, snapshot  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hybridat  # noqa: E402
from hybridat.data import Split, load_split, to_float  # noqa: E402
from hybridat.errors import HybridatError  # noqa: E402
from hybridat.models import BranchView, ModelConfig  # noqa: E402
from hybridat.train import TrainConfig  # noqa: E402

NAN, INF = float("nan"), float("inf")


class CallbackError(Exception):
    """What a hostile callback raises: passed through to the caller, it is `raised`, not BAD."""


class Timeout(BaseException):
    pass


# -- the objects a call is given: loaded afresh for every case ---------------------------------------------------

class Ctx:
    def __init__(self, ws: Path):
        self.ws = ws
        self.ckpt = hybridat.load_checkpoint(ws / "m.safetensors")
        self.bn = hybridat.load_checkpoint(ws / "bn.safetensors")
        self.split = load_split("cifar10", train=False, data_dir=ws / "data", n=8)
        self.train = load_split("cifar10", train=True, data_dir=ws / "data", n=16)
        self.x, self.y = to_float(self.split.images), self.split.labels
        self.view = BranchView(self.ckpt.model, "adv")

    def fingerprint(self) -> str:
        """A hash of every input object a call could change in place."""
        h = hashlib.sha256()
        for m in (self.ckpt.model, self.bn.model):
            for k, t in m.state_dict().items():
                h.update(k.encode() + t.detach().cpu().contiguous().numpy().tobytes())
        for t in (self.x, self.y, self.split.images, self.split.labels, self.train.images, self.train.labels):
            h.update(t.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def _foreign():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


# -- hostile values -------------------------------------------------------------------------------------------

INTS = [("nan", NAN), ("inf", INF), ("-1", -1), ("0", 0), ("2.5", 2.5), ("'3'", "3"), ("None", None),
        ("[1]", [1]), ("True", True), ("1e30", 10 ** 30)]
FLOATS = [("nan", NAN), ("inf", INF), ("-inf", -INF), ("-1", -1.0), ("0", 0.0), ("'8'", "8"), ("None", None),
          ("[8]", [8.0]), ("1e30", 1e30), ("True", True), ("tensor(8.)", torch.tensor(8.0))]
BOOLS = [("'no'", "no"), ("None", None), ("2", 2)]
CHOICE = [("''", ""), ("upper", None), ("'bogus'", "bogus"), ("5", 5), ("None", None), ("list", None)]
CALLBACK_DOC = {"on_batch": 1, "on_step": 4, "on_epoch": 1, "on_row": 1}  # positional arguments documented
CHOICE_NAMES = {"attack": "pgd", "branch": "adv", "domain": "adv", "layout": "torchvision", "norm": "linf",
                "start": "uniform", "noise": "uniform", "mode": "train", "reference": "batch", "dataset": "cifar10",
                "name": "cifar10", "arch": "resnet18", "aa_version": "standard", "adv_split": "aux", "loss": "hybrid",
                "reestimate": "adv", "attack_branch": "adv", "device": "cpu"}


def _callbacks(name: str):
    n = {"evaluate": 3}.get(name, CALLBACK_DOC.get(name, 1))

    # a callback whose parameters have other names than the docstrings' (called positionally, it must work)
    other = eval(f"lambda {', '.join(f'p{i}_' for i in range(n))}: None")  # noqa: S307 (our own text)

    def raising(*args, **kwargs):
        raise CallbackError("the callback raised")

    def returning(*args, **kwargs):
        return "a value"
    def no_arguments():  # Python's TypeError naming this function: the caller's mistake, passed through
        return None
    return [("other names", other), ("raises", raising), ("returns a value", returning), ("5", 5),
            ("no arguments", no_arguments)]


def values(fn: str, p: inspect.Parameter, c: Ctx, base) -> list[tuple[str, object]]:
    """(label, value) for each hostile value of parameter p of function fn; `base` is its valid value."""
    name = p.name
    ann = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
    pixel_eps = fn not in ("pgd", "robust_accuracy")
    if name.startswith("on_"):
        return _callbacks("evaluate" if (fn, name) == ("evaluate", "on_batch") else name)
    if name in ("ckpt", "checkpoint") or (name == "model" and fn in ("recombine", "cross", "swap_ap",
                                                                    "reestimate", "ns_gap")):
        return [("one-branch ckpt", c.bn if name != "model" else c.bn.model), ("torchvision model", _foreign()),
                ("ckpt.model" if name != "model" else "Checkpoint", c.ckpt.model if name != "model" else c.ckpt),
                ("path str", "m.safetensors"), ("None", None), ("BranchView", c.view)]
    if name == "model":  # the attacks: a module that maps pixels to logits
        return [("Checkpoint", c.ckpt), ("two-branch model", c.ckpt.model), ("one-branch model", c.bn.model),
                ("torchvision model", _foreign()), ("None", None), ("a function", lambda x: x)]
    if name == "x":
        x = c.x
        return [("float64", x.double()), ("uint8", c.split.images), ("(N,H,W)", x[:, 0]), ("empty", x[:0]),
                ("NaN pixel", x.clone().index_fill_(0, torch.tensor([0]), NAN)), ("x255", x * 255),
                ("list", x.tolist()), ("meta", x.to("meta")), ("fewer than y", x[:4]), ("numpy", x.numpy()),
                ("(N,1,32,32)", x[:, :1]), ("64x64", torch.nn.functional.interpolate(x, 64))]
    if name == "y":
        y = c.y
        return [("float", y.float()), ("int32", y.int()), ("fewer than x", y[:4]), ("label 10", y * 0 + 10),
                ("label -1", y * 0 - 1), ("(N,1)", y[:, None]), ("list", y.tolist()), ("meta", y.to("meta")),
                ("numpy", y.numpy()), ("bool", y > 4)]
    if name == "split":
        s = c.train if fn in ("reestimate", "swap_bn") else c.split
        return [("tuple", (s.images, s.labels)), ("float images", Split(to_float(s.images), s.labels)),
                ("fewer labels", Split(s.images, s.labels[:4])), ("label 10", Split(s.images, s.labels * 0 + 10)),
                ("int32 labels", Split(s.images, s.labels.int())), ("None", None),
                ("64x64", Split(torch.nn.functional.interpolate(s.images.float(), 64).to(torch.uint8), s.labels)),
                ("1 channel", Split(s.images[:, :1], s.labels)), ("empty", Split(s.images[:0], s.labels[:0]))]
    if name in ("eps", "step"):
        own = [("8/255", 8 / 255)] if pixel_eps else [("8", 8.0)]
        return own + [v for v in FLOATS if not (p.default is None and v[0] == "None")]
    if name in ("steps",) and "list" in ann:
        return [("10 (no list)", 10), ("[]", []), ("[nan]", [NAN]), ("[2.5]", [2.5]), ("[-1]", [-1]), ("[0]", [0]),
                ("['1']", ["1"]), ("'1'", "1"), ("[1, 1]", [1, 1])]
    if name == "layers":
        return [("[99]", [99]), ("[-1]", [-1]), ("5", 5), ("['a']", ["a"]), ("[1.5]", [1.5]), ("[]", []),
                ("[1, 1]", [1, 1]), ("range(100)", range(100))]
    if name in ("attacks", "branches"):
        one = "pgd" if name == "attacks" else "adv"
        return [(f"{one!r} (no list)", one), ("[]", []), ("['bogus']", ["bogus"]), ("[5]", [5]), ("None", None),
                (f"[{one!r}, {one!r}]", [one, one]), ("upper", [one.upper()]), ("tuple", (one,))]
    if name == "aa_attacks":
        return [("''", ""), ("','", ","), ("'bogus'", "bogus"), ("[]", []), ("['apgd-ce', 'apgd-ce']",
                ["apgd-ce", "apgd-ce"]), ("5", 5), ("[5]", [5]), ("upper", "APGD-CE")]
    if name == "device":
        return [("'gpu'", "gpu"), ("'cuda'", "cuda"), ("'meta'", "meta"), ("5", 5), ("'cuda:7'", "cuda:7"),
                ("device('meta')", torch.device("meta")), ("None", None)]
    if name in ("ns", "ap"):
        return [("'adv'", "adv"), ("{adv: bogus}", {"adv": "bogus"}), ("{bogus: adv}", {"bogus": "adv"}),
                ("{5: 1}", {5: 1}), ("[]", []), ("{}", {}), ("{adv: None}", {"adv": None})]
    if name in ("input_mean", "input_std"):
        return [("[nan,0,0]", [NAN, 0, 0]), ("[1,2]", [1, 2]), ("'x'", "x"), ("0", 0), ("[0,0,0]", [0, 0, 0]),
                ("[-1,1,1]", [-1, 1, 1]), ("['a','b','c']", ["a", "b", "c"]), ("[inf,1,1]", [INF, 1, 1])]
    if name == "frames":
        return [("{}", {}), ("None", None), ("{eval: None}", {"eval": None}), ("[]", []),
                ("a DataFrame", base["eval"]), ("{eval: empty}", {"eval": base["eval"].iloc[:0]}),
                ("{eval: NaN accuracy}", {"eval": base["eval"].assign(accuracy=NAN)})]
    if name == "inputs":
        return [("5", 5), ("['nope.csv']", ["nope.csv"]), ("'eval.csv' (no list)", "eval.csv"), ("[5]", [5])]
    if name == "rows":
        import pandas as pd

        return [("[]", []), ("'x'", "x"), ("[1]", [1]), ("[{}]", [{}]), ("[{a: nan}]", [{"a": NAN}]),
                ("empty DataFrame", pd.DataFrame()), ("rows of other keys", [{"a": 1}, {"b": 2}]),
                ("generator", (r for r in base))]
    if name == "paths":
        return [("'eval.csv' (no list)", "eval.csv"), ("[]", []), ("['nope.csv']", ["nope.csv"]),
                ("['empty.csv']", ["empty.csv"]), ("['random.csv']", ["random.csv"]), ("['header.csv']",
                ["header.csv"]), ("['other.csv']", ["other.csv"]), ("['folder']", ["folder"]), ("[5]", [5]),
                ("None", None), ("['m.safetensors']", ["m.safetensors"]), ("['eval.csv'] * 2", ["eval.csv"] * 2)]
    if name == "sources":
        return [("5", 5), ("['x']", ["x"]), ("[]", [])]
    if name in ("path", "src"):
        return [("missing", "nope.safetensors"), ("folder", "folder"), ("empty", "empty.safetensors"),
                ("random bytes", "random.safetensors"), ("a CSV", "eval.csv"), ("truncated", "truncated.safetensors"),
                ("5", 5), ("None", None), ("''", ""), ("plain.pt", "plain.pt"), ("m.safetensors", "m.safetensors")]
    if name in ("out", "out_dir"):
        ext = Path(str(base)).suffix
        same = {"write_report": "csvdir", "run_training": "run"}.get(fn, "m.safetensors")
        if fn == "import_checkpoint":
            same = "plain.pt"
        vals = [("the input", same), ("folder", "folder"), ("read-only folder", f"ro/x{ext}"),
                ("an earlier output", f"existing{ext}" if ext else "rep-old"), ("5", 5), ("''", ""),
                ("under a file", f"a-file/x{ext}"), ("data folder", "data"), ("other suffix", "o.txt")]
        return vals + ([("None", None)] if p.default is not inspect.Parameter.empty else [])
    if name == "data_dir":
        return [(d, d) for d in ("nope-data", "a-file", "empty-data", "bad-data", "wrong-data", "short-data", "")] \
            + [("5", 5)]
    if name == "generator":
        return [("5", 5), ("'x'", "x"), ("seeded", torch.Generator().manual_seed(0))]
    if name == "loss_fn":
        def raising(*a):
            raise CallbackError("the loss raised")
        return [("5", 5), ("raises", raising), ("per-example loss", lambda logits, y: torch.nn.functional
                                                 .cross_entropy(logits, y, reduction="none"))]
    if name == "config":
        return [("None", None), ("dict", {"arch": "resnet18"}), ("norm 'bogus'", ModelConfig("resnet18", "bogus")),
                ("TrainConfig", TrainConfig())]
    if name == "cfg":
        return [("None", None), ("dict", {"epochs": 1}), ("ModelConfig", ModelConfig())]
    if name == "settings":  # write_ns_gap(**settings)
        return []
    if name in CHOICE_NAMES or ann in ("str", "str | None"):
        good = base if isinstance(base, str) else CHOICE_NAMES.get(name, "x")
        return [(label, good.upper() if label == "upper" else [good] if label == "list" else v)
                for label, v in CHOICE if not (v is None and label == "None" and p.default is None)]
    if ann == "bool":
        return BOOLS
    if "int" in ann and "float" not in ann:
        return [v for v in INTS if not (v[0] == "None" and "None" in ann)]
    if "float" in ann:
        return [v for v in FLOATS if not (v[0] == "None" and "None" in ann)]
    raise SystemExit(f"fuzz_api: no hostile values for {fn}({name}: {ann}); add its kind to values()")


# -- the functions and a valid call of each -----------------------------------------------------------------------

def _frames(ws):
    from hybridat.report import load_runs
    return load_runs([ws / "eval.csv", ws / "gap.csv", ws / "run" / "train.csv"])


def _rows(ws):
    import pandas as pd
    return pd.read_csv(ws / "eval.csv").to_dict("records")


TINY = dict(epochs=1, steps=1, batch_size=8, train_subset=16, seed=0)
SPECS = {  # name: (function, the valid call's keyword arguments from a Ctx, global streams it may draw from)
    "run_training": ("hybridat.run.run_training", lambda c: dict(
        out="runs/new", config=ModelConfig("resnet18", "bn", width=0.0625), cfg=TrainConfig(**TINY),
        data_dir="data", graphs=False), ()),
    "evaluate": ("hybridat.evaluate.evaluate", lambda c: dict(
        ckpt=c.ckpt, split=c.split, attacks=["pgd"], branches=["adv"], steps=[1], batch_size=8), ()),
    "write_csv": ("hybridat.checkpoint.write_csv", lambda c: dict(rows=_rows(c.ws), path="o.csv"), ()),
    "swap_bn": ("hybridat.recombine.swap_bn", lambda c: dict(ckpt=c.ckpt, out="o.safetensors", cross=True), ()),
    "swap_bn+reestimate": ("hybridat.recombine.swap_bn", lambda c: dict(
        ckpt=c.ckpt, out="o.safetensors", reestimate="adv", split=c.train, n_images=8, steps=1, batch_size=8), ()),
    "recombine": ("hybridat.recombine.recombine", lambda c: dict(model=c.ckpt.model, ns={"adv": "clean"}), ()),
    "cross": ("hybridat.recombine.cross", lambda c: dict(model=c.ckpt.model), ()),
    "swap_ap": ("hybridat.recombine.swap_ap", lambda c: dict(model=c.ckpt.model), ()),
    "reestimate": ("hybridat.recombine.reestimate", lambda c: dict(
        model=c.ckpt.model, branch="adv", domain="adv", split=c.train, steps=1, batch_size=8), ()),
    "ns_gap": ("hybridat.analysis.ns_gap", lambda c: dict(
        model=c.ckpt.model, x=c.x, y=c.y, eps=8, steps=1, batch_size=8), ()),
    "write_ns_gap": ("hybridat.analysis.write_ns_gap", lambda c: dict(
        ckpt=c.ckpt, x=c.x, y=c.y, out="g.csv", eps=8, steps=1, batch_size=8), ()),
    "load_runs": ("hybridat.report.load_runs", lambda c: dict(paths=["eval.csv", "gap.csv"]), ()),
    "write_report": ("hybridat.report.write_report", lambda c: dict(frames=_frames(c.ws), out_dir="rep"), ()),
    "import_checkpoint": ("hybridat.interop.import_checkpoint", lambda c: dict(
        src="plain.pt", out="i.safetensors"), ()),
    "export_branch": ("hybridat.interop.export_branch", lambda c: dict(
        checkpoint=c.ckpt, out="e.pt", branch="adv", layout="torchvision"), ()),
    "checkpoint_info": ("hybridat.checkpoint.checkpoint_info", lambda c: dict(path="m.safetensors"), ()),
    "load_checkpoint": ("hybridat.checkpoint.load_checkpoint", lambda c: dict(path="m.safetensors"), ()),
    "load_split": ("hybridat.data.load_split", lambda c: dict(name="cifar10", train=False, data_dir="data", n=8),
                   ()),
    "pgd": ("hybridat.attacks.pgd", lambda c: dict(model=c.view, x=c.x, y=c.y, eps=8 / 255, steps=1),
            ("torch",)),  # README: pgd without a generator draws its start from torch's
    "robust_accuracy": ("hybridat.attacks.robust_accuracy", lambda c: dict(
        model=c.view, x=c.x, y=c.y, attack="pgd", eps=8 / 255, steps=1, batch_size=8), ()),
}
SKIP = {"write_ns_gap": {"settings"}}  # **settings: ns_gap's keywords, swept there


def _function(dotted: str):
    import importlib

    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def all_cases(only: set[str] | None, params: set[str] | None):
    """(spec, parameter, label, a function of Ctx giving the keyword arguments)."""
    import dataclasses

    for spec, (dotted, base, _) in SPECS.items():
        if only and spec not in only and spec.split("+")[0] not in only:
            continue
        sig = inspect.signature(_function(dotted))
        probe = None
        for p in sig.parameters.values():
            if p.name in SKIP.get(spec, ()) or (params and p.name not in params):
                continue
            if probe is None:
                probe = Ctx(WS)
            kwargs = base(probe)
            for k, (label, _) in enumerate(values(spec.split("+")[0], p, probe, kwargs.get(p.name, p.default))):
                def make(c, p=p, k=k, base=base, spec=spec):
                    kw = base(c)
                    kw[p.name] = values(spec.split("+")[0], p, c, kw.get(p.name, p.default))[k][1]
                    return kw
                yield spec, p.name, label, make
        if spec == "run_training":  # the two configs, field by field
            for cls, arg in ((ModelConfig, "config"), (TrainConfig, "cfg")):
                for f in dataclasses.fields(cls):
                    if params and f"{arg}.{f.name}" not in params:
                        continue
                    fake = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                             annotation=str(f.type))
                    for label, value in values("config", fake, probe or Ctx(WS), getattr(
                            base(probe or Ctx(WS))[arg], f.name)):
                        def make(c, arg=arg, name=f.name, value=value, base=base):
                            kw = base(c)
                            obj = copy.copy(kw[arg])
                            object.__setattr__(obj, name, value)
                            kw[arg] = obj
                            return kw
                        yield spec, f"{arg}.{f.name}", label, make


# -- running and judging one case -------------------------------------------------------------------------------

def _streams():
    return (torch.get_rng_state(), random.getstate(), np.random.get_state(), torch.get_num_threads())


def _changed_streams(before, exempt) -> list[str]:
    after = _streams()
    changed = []
    if "torch" not in exempt and not torch.equal(before[0], after[0]):
        changed.append("torch")
    if before[1] != after[1]:
        changed.append("random")
    if not all(np.array_equal(a, b) for a, b in zip(before[2], after[2])):
        changed.append("numpy")
    if before[3] != after[3]:
        changed.append("threads")
    return changed


def _has_nan(value, depth=0) -> bool:
    if depth > 3:
        return False
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_nan(v, depth + 1) for v in value[:1000])
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != "meta":
        return bool(torch.isnan(value).any())
    return False


def _on_alarm(signum, frame):
    raise Timeout()


RESUMABLE = {"last.safetensors", "resume.safetensors", "train.csv"}


def run_case(case, timeout: float, pristine: Path) -> dict:
    spec, param, label, make = case
    dotted, _, exempt = SPECS[spec]
    fn = _function(dotted)
    c = Ctx(WS)
    kwargs = make(c)
    before_files, before_obj = snapshot(WS), c.fingerprint()
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    streams = _streams()
    result, detail, value = "ok", "", None
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        value = fn(**kwargs)
    except Timeout:
        result, detail = "started", f"still running at {timeout:g} s"
    except HybridatError as e:
        text = str(e)
        if text and "\n" not in text.strip():
            result, detail = "error", text
        else:
            result, detail = "BAD", f"HybridatError of {text.count(chr(10)) + 1} lines: {text[:300]!r}"
    except CallbackError as e:
        result, detail = "raised", str(e)
    except BaseException as e:  # noqa: BLE001 -- what the sweep is for
        if isinstance(e, TypeError) and "no_arguments()" in str(e):  # the callback's own signature
            result, detail = "raised", str(e)
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "hybridat" in f.filename),
                     "?")
        if result != "raised":
            first = str(e).splitlines()[0][:300] if str(e) else ""
            result, detail = "BAD", f"{type(e).__name__} (last in hybridat at {where}): {first}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    seconds = time.perf_counter() - t0
    problems = []
    if result != "started":
        streams_changed = _changed_streams(streams, exempt)
        if streams_changed:
            problems.append(f"global streams changed: {', '.join(streams_changed)}")
    after_files = snapshot(WS)
    changed = [p for p, h in before_files.items() if after_files.get(p, "gone") != h]
    if result == "ok" and label == "an earlier output":  # an output is the caller's to replace, an input never
        changed = [p for p in changed if p != str(kwargs.get(param, ""))]
    new = [p for p in after_files if p not in before_files]
    if changed:
        problems.append(f"input changed: {changed[:5]}")
    left = [p for p in new if Path(p).name != ".lock"]  # a run folder's lock file stays, as fuzz_cli judges it
    if result == "error" and detail.startswith("training diverged"):  # documented: train.csv keeps every epoch
        left = [p for p in left if p not in ("runs", "runs/new", "runs/new/train.csv")]
    if result == "raised" and spec == "run_training":  # a callback that raised after an epoch: as an interrupt,
        # the run keeps what `resume` goes on from
        left = [p for p in left if p not in ("runs", "runs/new") and Path(p).name not in RESUMABLE]
    if left and result not in ("ok", "started"):
        problems.append(f"left {left[:5]}")
    temps = [p for p in left if ".tmp" in p or Path(p).name.startswith(".")]
    if temps:
        problems.append(f"temp files left: {temps[:5]}")
    if c.fingerprint() != before_obj:
        problems.append("an input object changed in place")
    if result == "ok" and _has_nan(value if not isinstance(value, torch.nn.Module) else None):
        problems.append("NaN in what came back")
    if problems:
        detail = "; ".join(problems) + (f" [{result}: {detail}]" if detail else f" [{result}]")
        result = "BAD"
    elif result == "ok" and any(s in label.lower() for s in ("nan", "inf", "1e30")):
        detail = "ok? (a non-finite or huge value accepted)"
    # back to the workspace as built
    for p in sorted(new, key=len, reverse=True):
        target = WS / p
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    for p in changed:
        (WS / p).unlink(missing_ok=True) if (WS / p).is_file() else None
        src = pristine / p
        if src.is_file():
            (WS / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, WS / p)
        elif src.is_dir():
            (WS / p).mkdir(parents=True, exist_ok=True)
    return {"function": spec, "param": param, "value": label, "result": result, "detail": detail,
            "seconds": round(seconds, 3)}


WS = Path()


def main() -> None:
    global WS
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="functions to sweep, comma-separated (default: all)")
    ap.add_argument("--param", help="parameters to sweep, comma-separated (cfg.eps for a TrainConfig field)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--json", type=Path, help="write every case's result here")
    opts = ap.parse_args()
    opts.json = opts.json.resolve() if opts.json else None
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="fuzz-api-"))
    try:
        WS = root / "ws"
        build_workspace(WS)
        os.chmod(WS / "ro", 0o755)
        pristine = root / "pristine"
        shutil.copytree(WS, pristine)
        os.chmod(WS / "ro", 0o555)
        os.chdir(WS)
        built = time.perf_counter() - t0
        cases = list(all_cases(set(opts.only.split(",")) if opts.only else None,
                               set(opts.param.split(",")) if opts.param else None))
        results = []
        for case in cases:
            r = run_case(case, opts.timeout, pristine)
            results.append(r)
            if r["result"] == "BAD":
                print(f"BAD  {r['function']}({r['param']}={r['value']}): {r['detail']}", flush=True)
        for r in results:
            if r["detail"].startswith("ok?"):
                print(f"ok?  {r['function']}({r['param']}={r['value']})")
        bad = print_table(results, classes=("ok", "error", "raised", "started", "BAD"), key="function")
        print(f"{len(results)} calls in {time.perf_counter() - t0:.0f} s (the workspace: {built:.0f} s)")
        if opts.json:
            opts.json.write_text(json.dumps(results, indent=1))
    finally:
        os.chdir("/")
        os.chmod(root / "ws" / "ro", 0o755) if (root / "ws" / "ro").exists() else None
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
