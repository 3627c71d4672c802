"""Artifacts on disk: one .safetensors file per model (config in its metadata) and tidy CSVs, written atomically.

Metadata keys are `hybridat.*` strings; structured values are JSON. A derived checkpoint records the
operation that made it and its parent's hash. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import HybridatError
from .models import BranchModel, ModelConfig, build_model

FORMAT = "hybridat-model-v1"


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_csv(rows: list[dict] | pd.DataFrame, path: str | Path) -> None:
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows).convert_dtypes()
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def file_hash(path: str | Path) -> str:
    """First 16 hex digits of the file's sha256: the id every CSV row carries."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
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
    return file_hash(path)


def read_header(path: str | Path) -> dict[str, str]:
    """The checkpoint's `hybridat.*` metadata without the `hybridat.` prefix; validates the file kind."""
    path = Path(path)
    if not path.is_file():
        raise HybridatError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise HybridatError(f"{path} is not a readable safetensors file ({e})") from None
    if metadata.get("hybridat.format") != FORMAT:
        raise HybridatError(f"{path} is a safetensors file but not a hybridat model checkpoint")
    return {k.removeprefix("hybridat."): v for k, v in metadata.items() if k.startswith("hybridat.")}


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
        if key not in self.header:
            return default
        try:
            return json.loads(self.header[key])
        except json.JSONDecodeError:
            return self.header[key]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    header = read_header(path)
    try:
        config = ModelConfig.from_json(header["config"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise HybridatError(f"{path} has no valid model config ({e})") from None
    model = build_model(config)
    with safe_open(path, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise HybridatError(f"{path}: weights do not match its config {config.to_json()}: {first}") from None
    return Checkpoint(model.to(device).eval(), header, file_hash(path), Path(path))
