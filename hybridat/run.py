"""A training run folder that survives: what `hybridat train` does, callable from Python (`run_training`).

The folder holds, while training, `last.safetensors` (the model after the latest epoch, a checkpoint like any
other, marked unfinished), `train.csv` (one row per epoch) and `resume.safetensors`: everything needed to go on
exactly where the run stopped (weights, optimizer state, epoch, every RNG state, the rows so far) as tensors and
JSON metadata, no pickle. All three are rewritten atomically after each epoch: last.safetensors, then the resume
state, then train.csv (a kill between two redoes at most that epoch). When the last epoch is done,
`last.safetensors` becomes `model.safetensors` and the resume state is removed, so a run folder holds a model only
when training is complete. A lock file keeps a second process out of the folder.

On CPU a run killed at any point and resumed ends with the same weights, bit for bit, as one never interrupted
(tests/test_resume.py); on CUDA as far as its kernels are deterministic.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .checkpoint import RESUME_FORMAT, read_header, save_checkpoint, training_columns, write_csv
from .data import DATASETS, load_split, num_classes, split_files
from .errors import HybridatError, check_choice
from .files import as_path, atomic_path, check_outputs
from .inputs import check_callback, check_flag
from .models import BranchModel, ModelConfig, build_model
from .norms import NORMS
from .runtime import callers_streams, distributed, is_main_process, on_rank0, resolve_device, seed_everything
from .train import TrainConfig, check_config, make_optimizer, train

MODEL, LAST, STATE, CSV, LOCK = "model.safetensors", "last.safetensors", "resume.safetensors", "train.csv", ".lock"
RUN_FILES = (MODEL, LAST, STATE, CSV)
STATE_FORMAT = f"{RESUME_FORMAT}-v1"


@dataclass
class RunResult:
    model_path: Path
    rows: list[dict]  # one per epoch, as in train.csv; none on the other ranks of a torchrun (rank 0 keeps them)
    resumed_from: int  # epochs done before this call (0: a fresh run)


# ---- the folder ------------------------------------------------------------------------------------------

@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` (a folder) or fail at once with one line; released when the process ends."""
    try:
        import fcntl
    except ImportError:  # no flock here: no lock
        yield
        return
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HybridatError(f"another process is training in {out} (it holds {out / LOCK}); "
                                "wait for it or choose another --out") from None
        yield
    finally:
        os.close(fd)


def remove_empty(folders: list[Path]) -> None:
    """Remove each of `folders` (deepest first: ones this call made) that holds nothing but a run's lock file."""
    for folder in folders:
        try:
            if set(os.listdir(folder)) - {LOCK}:
                return  # it holds something (a file of the run, another process's): keep it and those above
            if (folder / LOCK).exists():
                os.unlink(folder / LOCK)
            os.rmdir(folder)
        except OSError:
            return


def discard_run(out: Path) -> None:
    """Remove the run's own files from `out` (an --overwrite, once the new run has an epoch to write instead)."""
    for name in sorted(_contents(out) & set(RUN_FILES)):
        os.unlink(out / name)


def _contents(out: Path) -> set[str]:
    """Names in the run folder, without the lock and hidden temp files."""
    return {name for name in os.listdir(out) if not name.startswith(".")}


def identity(config: ModelConfig, cfg: TrainConfig, dataset: str) -> dict:
    """What makes two runs the same run: a resumed run must match it exactly."""
    return {"model": json.loads(config.to_json()), "train": cfg.to_dict(), "dataset": dataset}


def _differences(old: dict, new: dict) -> list[str]:
    """'train.lr 0.1 != 0.2' for each setting (two levels deep) that differs."""
    def flat(d: dict) -> dict:
        return {f"{k}.{j}": w for k, v in d.items() for j, w in (v.items() if isinstance(v, dict) else [("", v)])}

    a, b = flat(old), flat(new)
    return [f"{k.rstrip('.')} {a.get(k)!r} != {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def prepare_folder(out: Path, ident: dict, *, resume: bool, overwrite: bool) -> dict | None:
    """Check what `out` holds against what is asked; returns the resume state to go on from, or None to start.

    Refused with one line: a finished run (model.safetensors) or an unfinished one unless --resume or
    --overwrite; a run of other settings unless --overwrite; a folder of files that belong to no run unless
    --overwrite (files beside a finished run or a resume state, e.g. an eval.csv, never stop it). --overwrite
    starts afresh; the old run's own files (never anything else) are removed by `discard_run` only when the new
    run's first epoch is done, so a run that fails before then (bad data, Ctrl-C) leaves the old one as it was.
    """
    present = _contents(out)
    mine = present & set(RUN_FILES)
    if overwrite:
        return None
    if MODEL in present:
        raise HybridatError(f"{out} holds a finished run ({MODEL}); --overwrite to train it again")
    foreign = sorted(present - mine)
    if foreign and STATE not in mine:  # no run to go on with: not a run's folder
        raise HybridatError(f"{out} holds files that are not a training run's ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder, or --overwrite")
    if not mine:
        return None
    present = mine
    if not resume:
        raise HybridatError(f"{out} holds an unfinished run ({', '.join(sorted(present))}); --resume to go on "
                            "with it, or --overwrite to start over")
    if STATE not in present:
        if present == {LAST} and _first_epoch_of(out / LAST, ident):  # killed between the first epoch's checkpoint
            return None  # and its resume state: nothing to go on from, the same run starts again (and replaces it)
        raise HybridatError(f"{out} holds {', '.join(sorted(present))} but no {STATE} to resume from; "
                            "--overwrite to start over")
    state = read_state(out / STATE)
    diff = _differences(state["identity"], ident)
    if diff:
        raise HybridatError(f"{out} holds a run with other settings ({'; '.join(diff[:3])}); --resume needs the "
                            "same settings, --overwrite starts over")
    return state


def _first_epoch_of(path: Path, ident: dict) -> bool:
    """Whether the checkpoint at `path` is epoch 1 of the run `ident` describes (its recorded settings)."""
    try:
        meta = read_header(path)
        train = json.loads(json.dumps(ident["train"] | {"dataset": ident["dataset"]}))
        return (meta.get("epoch") == "1" and json.loads(meta["config"]) == ident["model"]
                and json.loads(meta["train"]) == train)
    except (HybridatError, KeyError, ValueError, TypeError):
        return False


# ---- the resume state ------------------------------------------------------------------------------------

def save_state(path: Path, model: BranchModel, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               epoch: int, ident: dict, rows: list[dict]) -> None:
    """Everything to go on after `epoch` epochs, written atomically: weights, optimizer state, RNG states."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    scalars = {}
    for index, entries in sorted(optimizer.state_dict()["state"].items()):
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value
            elif value is not None:
                scalars[f"{index}.{name}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": STATE_FORMAT, "epoch": str(epoch), "identity": json.dumps(ident),
                "rows": json.dumps(rows), "optim_scalars": json.dumps(scalars),
                "rng_python": json.dumps(random.getstate()), "hybridat": __version__}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_state(path: Path) -> dict:
    """The resume state as {epoch, identity, rows, tensors, ...}; a damaged file is one clear error."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        state = {"epoch": int(meta["epoch"]), "identity": json.loads(meta["identity"]),
                 "rows": json.loads(meta["rows"]), "optim_scalars": json.loads(meta["optim_scalars"]),
                 "rng_python": json.loads(meta["rng_python"]), "tensors": tensors}
        if not (isinstance(state["rows"], list) and isinstance(state["identity"], dict)):
            raise ValueError("rows or identity of the wrong type")
        epochs = state["identity"].get("train", {}).get("epochs") if isinstance(state["identity"].get("train"),
                                                                                 dict) else None
        if state["epoch"] < 1 or (isinstance(epochs, int) and state["epoch"] > epochs):
            raise ValueError(f"epoch {state['epoch']} of {epochs}")
        missing = [k for k in ("rng.torch", "rng.data") if k not in tensors]
        if missing or not any(k.startswith("model.") for k in tensors):
            raise ValueError(f"no {', '.join(missing) or 'model weights'}")
        python = state["rng_python"]
        if not (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)):
            raise ValueError("a damaged Python generator state")
        scalars = state["optim_scalars"]
        if not (isinstance(scalars, dict) and all(re.fullmatch(r"\d+\.\w+", k) for k in scalars)):
            raise ValueError("damaged optimizer scalars")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise HybridatError(f"{path} is not a readable resume state ({e}); --overwrite to start over") from None
    return state


def restore_state(state: dict, model: BranchModel, optimizer: torch.optim.Optimizer,
                  generator: torch.Generator) -> None:
    """Put the model, optimizer and every generator back where `save_state` found them."""
    t = state["tensors"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in t.items() if k.startswith("model.")})
    per_param: dict[int, dict] = {}
    for key, value in t.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for key, value in state["optim_scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": per_param, "param_groups": current["param_groups"]})
    torch.set_rng_state(t["rng.torch"])
    generator.set_state(t["rng.data"])
    cuda = [t[k] for k in sorted((k for k in t if k.startswith("rng.cuda.")), key=lambda k: int(k.split(".")[2]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))


# ---- the run ---------------------------------------------------------------------------------------------

def weights_finite(model: BranchModel) -> bool:
    """Whether every parameter and buffer is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all())


def run_training(out: str | Path, config: ModelConfig, cfg: TrainConfig, *, dataset: str = "cifar10",
                 data_dir: str | Path | None = None, device: str | torch.device = "cpu", resume: bool = False,
                 overwrite: bool = False, on_step: Callable | None = None,
                 on_epoch: Callable[[dict], None] | None = None, graphs: bool = True) -> RunResult:
    """Train `config` under `cfg` into the run folder `out` (see the module docstring). Returns a RunResult: the
    path of model.safetensors, the epoch rows as in train.csv, and the epochs done before this call. The caller's
    global random streams are as they were afterwards (the run seeds its own from cfg.seed).

    resume: go on from the folder's resume state (a folder without one starts afresh, so `make` may always
    pass it). overwrite: replace a finished run, another run's files or a run of other settings. A loss or a
    weight that is not finite stops the run as diverged (HybridatError; train.csv has every epoch, no model).
    graphs: the training step as one CUDA graph on a GPU (`train`).
    """
    out, device = as_path(out, "out (the run folder)"), resolve_device(str(device))
    check_choice(dataset, DATASETS, "dataset")
    if not isinstance(config, ModelConfig):
        raise HybridatError(f"config must be a hybridat.models.ModelConfig, got {type(config).__name__}")
    config.check()
    if config.num_classes != num_classes(dataset):  # a 100-class model trained on CIFAR-10 was trained silently
        raise HybridatError(f"the model config has {config.num_classes} classes and {dataset} has "
                            f"{num_classes(dataset)}: ModelConfig(..., num_classes={num_classes(dataset)})")
    check_config(cfg, config.norm)
    check_callback(on_step, "on_step")
    check_callback(on_epoch, "on_epoch")
    for flag, name in ((resume, "resume"), (overwrite, "overwrite"), (graphs, "graphs")):
        check_flag(flag, name)
    if resume and overwrite:
        raise HybridatError("--resume and --overwrite exclude each other: go on with the run, or start over")
    if out.exists() and not out.is_dir():
        raise HybridatError(f"{out} is a file; --out takes a run folder")
    check_outputs([out / name for name in RUN_FILES], split_files(dataset, True, data_dir))
    with distributed(device) as (rank, world):
        main = is_main_process()
        if cfg.batch_size < world:  # every rank alike, before the folder is made
            raise HybridatError(f"batch_size {cfg.batch_size} is below the {world} processes of this run: each "
                                "takes at least one image per step (--batch-size is the global batch)")
        made = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
        out.mkdir(parents=True, exist_ok=True)
        try:
            with ExitStack() as lock:
                ident = identity(config, cfg, dataset)

                def check_folder():  # rank 0's lock and verdict; every rank stops on a refusal
                    lock.enter_context(run_lock(out))
                    return prepare_folder(out, ident, resume=resume, overwrite=overwrite)
                state = on_rank0(check_folder, world)
                if world > 1 and not main and resume and (out / STATE).is_file():  # rank 0 checked it
                    state = read_state(out / STATE)
                with callers_streams(device):  # the run seeds the global generators for itself
                    result = _train_into(out, config, cfg, ident, state, dataset, data_dir, device, rank, world,
                                         main, on_step, on_epoch, graphs, overwrite)
        except BaseException:  # a bad dataset, an interrupt before the first epoch: no empty run folder is left
            if main:
                remove_empty(made)
            raise
        if world > 1:  # rank 0 has written the model: every rank leaves the group together
            torch.distributed.barrier()
        return result


def _train_into(out, config, cfg, ident, state, dataset, data_dir, device, rank, world, main, on_step,
                on_epoch, graphs, overwrite=False) -> RunResult:
    generator = seed_everything(cfg.seed)
    # rank 0 alone downloads a missing dataset (ranks downloading at once wrote into one folder)
    split = on_rank0(lambda: load_split(dataset, train=True, data_dir=data_dir, device=device, n=cfg.train_subset),
                     world)
    if split is None:
        split = load_split(dataset, train=True, data_dir=data_dir, device=device, n=cfg.train_subset, download=False)
    model = build_model(config).to(device)
    optimizer = make_optimizer(model, cfg)
    rows, start = [], 0
    if state is not None:
        try:  # read_state checked its structure; what only the model can tell (keys, shapes, generator sizes) here
            restore_state(state, model, optimizer, generator)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
            why = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
            raise HybridatError(f"{out / STATE} does not fit this run ({why}); --overwrite to start over") from None
        if not weights_finite(model):  # save_state never writes a diverged epoch's weights
            raise HybridatError(f"{out / STATE} holds non-finite weights; --overwrite to start over")
        rows, start = state["rows"], state["epoch"]
    meta = {"train": cfg.to_dict() | {"dataset": dataset}, "seed": str(cfg.seed), "run": out.name}
    ids = {"run": out.name, "seed": cfg.seed, "norm": config.norm, "arch": config.arch, "width": config.width,
           "loss_name": cfg.loss, "eps": cfg.eps}
    for row in train(model, split, cfg, generator, rank, world, on_step, graphs=graphs, start_epoch=start,
                     optimizer=optimizer):
        problem = _divergence(row, model)  # the same on every rank: the row is all-reduced, weights in sync
        if main:
            if overwrite:  # the old run stays whole until now: a run that failed before its first epoch kept it
                discard_run(out)
                overwrite = False
            # last.safetensors, then the resume state, then the CSV: a kill between any two leaves a state that
            # redoes at most this epoch, with the same numbers
            digest = "" if problem else save_checkpoint(model, out / LAST, **meta, epoch=str(row["epoch"]))
            rows.append(ids | {"checkpoint_hash": digest} | training_columns(meta["train"]) | row)
            if not problem:
                save_state(out / STATE, model, optimizer, generator, row["epoch"], ident, rows)
            write_csv(rows, out / CSV)
            if on_epoch is not None:
                on_epoch(rows[-1])
        if problem:
            why = NORMS[config.norm].diverges  # a variant known to diverge says why
            raise HybridatError(f"training diverged: {problem} in epoch {row['epoch']}{f' ({why})' if why else ''}; "
                                f"{out / CSV} has every epoch, no model was written")
    def check_complete():  # on rank 0; the other ranks would wait for it at the last barrier
        if not (out / LAST).is_file():
            raise HybridatError(f"{out}: the resume state says the run is complete, but {LAST} is missing; "
                                "--overwrite to start over")
    on_rank0(check_complete, world)
    if main:
        write_csv(rows, out / CSV)  # complete even if the last run was killed before writing it
        os.replace(out / LAST, out / MODEL)
        if (out / STATE).exists():
            os.unlink(out / STATE)
    return RunResult(out / MODEL, rows if main else [], start)  # a resumed rank 1 held only the state's rows


def _divergence(row: dict, model: BranchModel) -> str:
    """What makes this epoch diverged ("" when nothing): a loss or a weight that is not finite."""
    if not math.isfinite(row["loss"]):
        return f"loss {row['loss']}"
    return "" if weights_finite(model) else "weights not finite"
