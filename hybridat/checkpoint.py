"""Artifacts on disk: one .safetensors file per model (config in its metadata) and tidy CSVs, written atomically.

Metadata keys are `hybridat.*` strings; structured values are JSON. A derived checkpoint records the
operation that made it and its parent's hash. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .data import DATASETS
from .errors import HybridatError, check_choice, check_number
from .inputs import check_flag
from .files import as_path, atomic_path
from .models import BranchModel, ModelConfig, build_model, model_for_weights
from .runtime import resolve_device

__all__ = ["atomic_path", "write_csv", "save_checkpoint", "load_checkpoint", "checkpoint_hash", "Checkpoint"]

FORMAT = "hybridat-model-v1"
RESUME_FORMAT = "hybridat-resume"  # a training run's resume state (run.STATE_FORMAT: this and a version)


def is_resume_state(metadata: dict[str, str]) -> bool:
    """Whether a safetensors file's metadata is a training run's resume state, which is no model checkpoint."""
    return str(metadata.get("format", "")).startswith(RESUME_FORMAT)


def write_csv(rows: list[dict] | pd.DataFrame, path: str | Path) -> None:
    """Write tidy rows (a list of dicts, one per row, as `evaluate` returns them, or a DataFrame) to `path`, a .csv
    name (what `report` finds in folders; never a checkpoint's), atomically: what `attack --out` writes."""
    frame = rows_frame(rows)
    with atomic_path(check_csv_name(path)) as tmp:
        frame.to_csv(tmp, index=False)


def rows_frame(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """The rows as a DataFrame; one line for no rows (a CSV of a bare newline, which `report` cannot read) or for
    anything but a list of dicts or a DataFrame."""
    if rows is None or (isinstance(rows, (list, tuple, pd.DataFrame)) and len(rows) == 0):
        raise HybridatError("no rows to write")
    frame = rows
    if not isinstance(rows, pd.DataFrame):
        if not isinstance(rows, (list, tuple)) or not all(isinstance(r, dict) for r in rows):
            raise HybridatError(f"rows must be a list of dicts (one per row) or a DataFrame, got "
                                f"{type(rows).__name__}")
        frame = pd.DataFrame(rows).convert_dtypes()
    if frame.columns.empty:  # [{}]: a CSV of bare newlines, as unreadable as no rows
        raise HybridatError("the rows have no columns: nothing to write")
    return frame


def file_hash(path: str | Path) -> str:
    """First 16 hex digits of the file's sha256: the `source_hash` an imported checkpoint records (the id CSV rows
    carry is `checkpoint_hash`, of the config and tensors only)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def checkpoint_hash(tensors: dict[str, torch.Tensor], config: ModelConfig) -> str:
    """First 16 hex digits of a sha256 over the config and every tensor (name, dtype, shape, bytes, in name order):
    the id every CSV row carries. The same weights and config give the same hash, whatever else the file holds."""
    digest = hashlib.sha256(config.to_json().encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"\n{name}\n{t.dtype}\n{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    return {"hybridat": __version__, "torch": torch.__version__}


def save_checkpoint(model: BranchModel, path: str | Path, **meta) -> str:
    """Write the model and `meta` (str or JSON-able values) to `path`; returns the new file's hash."""
    metadata = {"hybridat.format": FORMAT, "hybridat.config": model.config.to_json(),
                "hybridat.versions": json.dumps(versions())}
    for key, value in meta.items():
        metadata[f"hybridat.{key}"] = value if isinstance(value, str) else json.dumps(value)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return checkpoint_hash(tensors, model.config)


TO_IMPORT = "a checkpoint of other code (.pt, .pth, .safetensors) becomes one with `hybridat import`"


def check_checkpoint_name(path: str | Path) -> Path:
    """`path` if its name says what a checkpoint is (.safetensors); a safetensors file named .pt would be taken
    for a torch.save file by every other tool."""
    path = as_path(path, "an output path")
    if path.suffix != ".safetensors":
        raise HybridatError(f"--out must end in .safetensors (a hybridat checkpoint is a safetensors file), got "
                            f"{path.name}")
    return path


def check_csv_name(path: str | Path) -> Path:
    """`path` if its name ends in .csv: what a tidy CSV is called, and what `report` looks for in folders."""
    path = as_path(path, "an output path")
    if path.suffix.lower() != ".csv":
        raise HybridatError(f"--out must end in .csv (a tidy CSV; `report` finds CSVs in folders by that name), "
                            f"got {path.name}")
    return path


def read_header(path: str | Path) -> dict[str, str]:
    """The checkpoint's `hybridat.*` metadata without the `hybridat.` prefix; validates the file kind."""
    path = Path(path)
    if path.is_dir():
        raise HybridatError(f"{path} is a folder, not a checkpoint file (a run folder holds model.safetensors); "
                            f"{TO_IMPORT}")
    if not path.is_file():
        raise HybridatError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        kind = _foreign_kind(path)
        if kind in ("a CSV file", "a text file"):  # no model in it: nothing to import either
            raise HybridatError(f"{path} is {kind}, not a checkpoint (a .safetensors file written by `hybridat "
                                "train`, `swap-bn` or `import`)") from None
        what = f"is {kind}, not a hybridat checkpoint" if kind else f"is not a readable safetensors file ({e})"
        raise HybridatError(f"{path} {what}; {TO_IMPORT}") from None
    if is_resume_state(metadata):
        raise HybridatError(f"{path} is a training run's resume state (weights, optimizer, generators), not a model "
                            f"checkpoint; the run's latest model is {path.parent / 'last.safetensors'}")
    if metadata.get("hybridat.format") != FORMAT:
        raise HybridatError(f"{path} is a safetensors file but not a hybridat model checkpoint; {TO_IMPORT}")
    return {k.removeprefix("hybridat."): v for k, v in metadata.items() if k.startswith("hybridat.")}


def is_torch_save(head: bytes) -> bool:
    """Whether a file's first bytes are torch.save's: a zip archive, or a bare pickle (protocol 2+)."""
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"


def _foreign_kind(path: Path) -> str:
    """What a file that safetensors could not read is, where its first bytes tell: empty, torch.save's zip
    archive or bare pickle (read by `hybridat import`, never here), or text (a CSV, say); "" otherwise."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if is_torch_save(head):
        return "a PyTorch file (torch.save)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at byte 512 is still text; anything else is not
        text = head[:e.start].decode("utf-8") if e.start > len(head) - 4 else ""
    if text and all(c.isprintable() or c in "\n\r\t" for c in text):
        return "a CSV file" if "," in text.partition("\n")[0] else "a text file"
    return ""


# The training config as CSV columns: every eval, train and ns-gap row says which training it came from, so
# `report` never averages different trainings into one cell. (loss, eps and seed have their own columns.)
TRAINING_KEYS = ("dataset", "epochs", "steps", "step", "lr", "batch_size", "momentum", "weight_decay",
                 "clean_weight", "trades_beta", "train_subset", "amp")


def training_column(key: str) -> str:
    return key if key in ("dataset", "train_subset") else f"train_{key}"


TRAINING_COLUMNS = tuple(training_column(k) for k in TRAINING_KEYS)


def training_columns(train: dict | None) -> dict:
    """{train_epochs: ..., train_lr: ..., dataset: ...} from a checkpoint's `train` metadata ("" where unknown)."""
    train = train or {}
    values = {training_column(k): train.get(k, "") for k in TRAINING_KEYS}
    if train and not values["dataset"]:
        values["dataset"] = "cifar10"  # the default, for checkpoints written before the dataset was recorded
    return {k: "" if v is None else v for k, v in values.items()}


@dataclass
class Checkpoint:
    model: BranchModel
    header: dict[str, str]
    hash: str
    path: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def meta(self, key: str, default=None):
        """A metadata value, JSON-decoded where it is JSON."""
        return _decode(self.header, key, default)

    @property
    def train(self) -> dict:
        """The training settings recorded by `train` ({} for a model from elsewhere)."""
        return self.meta("train") or {}

    @property
    def run(self) -> str:
        """The run it came from (`train`'s folder name), else the name of the folder holding it."""
        return self.header.get("run") or self.path.resolve().parent.name

    def row_ids(self) -> dict:
        """What every eval and ns-gap row says of the checkpoint it measured: hash, parent and operation, model,
        seed, training loss and ε (the rest of its training: `training_columns`)."""
        train = self.train
        return {"checkpoint_hash": self.hash, "parent_hash": self.header.get("parent", ""),
                "operation": self.header.get("operation", ""), "norm": self.config.norm, "arch": self.config.arch,
                "width": self.config.width, "seed": self.meta("seed", ""), "train_eps": train.get("eps", ""),
                "loss_name": train.get("loss", "")}

    def check_unchanged(self) -> None:
        """One line if the model's weights or buffers differ from the file's (a forward pass in train mode moves BN's
        running NS; an edited weight): every row and derived file names the model by the file's hash, which would
        then stand for a model that was not measured. Costs one hash of the weights (0.15 s for ResNet-18, 0.37 s for
        WRN-34-10 on this 2-core CPU)."""
        if checkpoint_hash(self.model.state_dict(), self.config) != self.hash:
            raise HybridatError(f"the model of {self.path} has changed since it was loaded (its weights or BN running "
                                "NS; a forward pass in train mode moves them), so rows would carry the file's hash for "
                                "another model: save it as a checkpoint of its own (hybridat.checkpoint."
                                "save_checkpoint) and load that, or load the file again")

    @property
    def unfinished(self) -> bool:
        """Whether this is a run's checkpoint of an epoch before its last (`last.safetensors` of a run that did not
        complete, or a model derived from one)."""
        epoch, epochs = self.meta("epoch"), self.train.get("epochs")
        return isinstance(epoch, int) and isinstance(epochs, int) and epoch < epochs


def _decode(header: dict[str, str], key: str, default=None):
    if key not in header:
        return default
    try:
        return json.loads(header[key])
    except json.JSONDecodeError:
        return header[key]


# metadata a checkpoint may carry, and the JSON types its value must decode to (str: any text)
META_TYPES = {"train": (dict,), "seed": (int, str), "epoch": (int,), "operation": (dict,), "parent": (str,),
              "run": (int, str, float)}
TRAIN_TYPES = {"dataset": (str,), "eps": (int, float), "loss": (str,), "epochs": (int,), "steps": (int,)}
TRAIN_RANGES = {"eps": (0, 255), "epochs": (1, math.inf), "steps": (0, math.inf)}


def _check_header(path: Path, header: dict[str, str]) -> ModelConfig:
    """The model config, after every metadata value this package reads has been checked by type."""
    if "config" not in header:
        raise HybridatError(f"{path} has no model config")
    try:
        config = ModelConfig.from_json(header["config"])
    except HybridatError as e:
        raise HybridatError(f"{path} has an invalid model config: {e}") from None
    for key, kinds in META_TYPES.items():
        value = _decode(header, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise HybridatError(f"{path}: metadata {key!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                                f"got {header[key][:100]!r}")
    train = _decode(header, "train") or {}
    for key, kinds in TRAIN_TYPES.items():
        value = train.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise HybridatError(f"{path}: training setting {key!r} must be "
                                f"{' or '.join(k.__name__ for k in kinds)}, got {value!r}"[:300])
    # and by value: every later row copies these (a NaN ε, a dataset no stage can load)
    try:
        for key, (low, high) in TRAIN_RANGES.items():
            if train.get(key) is not None:
                check_number(f"training setting {key!r}", train[key], low, high)
        if train.get("dataset") is not None:
            check_choice(train["dataset"], DATASETS, "training setting 'dataset'")
        if _decode(header, "epoch") is not None:
            check_number("metadata 'epoch'", _decode(header, "epoch"), 0)
    except HybridatError as e:
        raise HybridatError(f"{path}: {e}") from None
    return config


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.int64: "I64"}  # what a hybridat model's tensors are stored as


def _check_shapes(path: Path, f, config: ModelConfig) -> None:
    """Every tensor the config's model has, with its shape, and nothing else; checked on the meta device, so a
    small file claiming a huge config never allocates the huge model."""
    with torch.device("meta"):
        state = build_model(config).state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = [f"missing {k!r}" for k in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {k!r}" for k in sorted(found.keys() - expected.keys())]
    problems += [f"{k!r} has shape {found[k]}, the config needs {expected[k]}" for k in expected
                 if k in found and found[k] != expected[k]]
    # the dtype too: load_state_dict would cast int8 or float16 weights into the float32 model without a word
    dtypes = {k: f.get_slice(k).get_dtype() for k in expected.keys() & found.keys()}
    problems += [f"{k!r} is {dtypes[k]}, the model needs {SAFETENSORS_DTYPES[state[k].dtype]}" for k in sorted(dtypes)
                 if state[k].dtype in SAFETENSORS_DTYPES and dtypes[k] != SAFETENSORS_DTYPES[state[k].dtype]]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise HybridatError(f"{path}: weights do not match its config {config.to_json()}: {problems[0]}{more}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", allow_nonfinite: bool = False) -> Checkpoint:
    """The checkpoint's model (eval mode, on `device`) and metadata, after the metadata, the tensor shapes and
    (unless `allow_nonfinite`) the weights' finiteness have been checked. device: cpu, cuda, cuda:N, mps or auto."""
    if not isinstance(path, (str, Path)):
        raise HybridatError(f"a checkpoint path must be a str or Path, got {type(path).__name__}")
    check_flag(allow_nonfinite, "allow_nonfinite")
    device = resolve_device(str(device))
    path = Path(path)
    header = read_header(path)
    config = _check_header(path, header)
    try:
        with safe_open(path, framework="pt") as f:
            _check_shapes(path, f, config)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError) as e:
        raise HybridatError(f"{path}: unreadable tensors ({e})") from None
    if not allow_nonfinite:
        bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise HybridatError(f"{path} has non-finite weights (NaN or inf) in {len(bad)} tensors, e.g. {bad[0]}; "
                                "a diverged run's model cannot be evaluated")
    model = model_for_weights(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise HybridatError(f"{path}: weights do not match its config {config.to_json()}: {first}") from None
    return Checkpoint(model.to(device).eval(), header, checkpoint_hash(state, config), path)


def checkpoint_info(path: str | Path) -> list[tuple[str, str]]:
    """What `hybridat info` shows, as (name, value) rows: the hash, the model config, branches and norm sets,
    the parameter count, whether it is unfinished or diverged (non-finite weights), then the metadata as stored."""
    from .norms import NORMS
    from .run import weights_finite

    ckpt = load_checkpoint(path, allow_nonfinite=True)
    spec = NORMS[ckpt.config.norm]
    rows = [("hash", ckpt.hash)] + [(key, str(value)) for key, value in vars(ckpt.config).items()]
    rows += [("branches", "adv, clean" if spec.branches == 2 else "one network for both"),
             ("NS sets / AP sets", f"{spec.ns_sets} / {spec.ap_sets}"),
             ("parameters", f"{sum(p.numel() for p in ckpt.model.parameters()):,}")]
    if ckpt.unfinished:
        rows.append(("unfinished", f"epoch {ckpt.meta('epoch')} of {ckpt.train.get('epochs')}"))
    if not weights_finite(ckpt.model):
        rows.append(("weights", "NOT FINITE (NaN or inf): a diverged model"))
    return rows + [(key, value) for key, value in sorted(ckpt.header.items()) if key not in ("config", "format")]
