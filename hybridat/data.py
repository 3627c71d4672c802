"""CIFAR-10/100 and SVHN as uint8 tensors on the device; batched random crop + flip; epoch iterators.

As in airbench, a whole split lives on the device and a batch is an index gather plus a few tensor ops.
CIFAR pickles are read here (our shared CIFAR-10 copy fails torchvision's md5 check); torchvision only
downloads a missing CIFAR folder, and reads SVHN's .mat files.
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import HybridatError, check_choice, check_number
from .files import as_path
from .inputs import check_flag
from .runtime import resolve_device

PAD = 4  # pixels of zero padding on each side before the random crop back to the image size
Arrays = tuple[np.ndarray, np.ndarray]  # images (N, 3, 32, 32) uint8, labels (N,) int64


@dataclass(frozen=True)
class DatasetInfo:
    """How to read a dataset: our own reader for CIFAR pickles in root/folder, torchvision's for SVHN."""
    num_classes: int
    tv_class: str  # the torchvision dataset class that downloads it (and reads SVHN)
    folder: str | None = None  # CIFAR only: the folder under root holding the pickles
    files: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # CIFAR only: (train files, test files)
    label_key: str = "labels"  # CIFAR only: the pickle key of the labels


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, 32, 32) uint8, on the device
    labels: torch.Tensor  # (N,) int64, on the device

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, n: int | None) -> Split:
        """The first n examples (views); None keeps all."""
        n = _check_n(n, len(self), "split")
        return Split(self.images[:n], self.labels[:n])


def _check_n(n: int | None, total: int, what: str) -> int:
    if n is None:
        return total
    check_number("n", n, integer=True)  # n=10.5 ended in a TypeError from slicing
    if not 1 <= n <= total:
        raise HybridatError(f"n={n} must be between 1 and {total}, the size of the {what}")
    return n


class _ArrayUnpickler(pickle.Unpickler):
    """Builds plain containers and numpy arrays only, so a data file cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {  # what numpy pickles use
        (f"numpy.{core}.{module}", name) for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _check(images, labels: np.ndarray, num_classes: int, path: Path) -> Arrays:
    """The arrays if images are (N, 3, 32, 32) uint8 and labels N integers in [0, num_classes)."""
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32)):
        raise HybridatError(f"{path}: images must be a uint8 array of shape (N, 3, 32, 32), got {_describe(images)}")
    if labels.size == 0:  # [] reads as float64: an empty split is reported as empty, where it is used
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
        raise HybridatError(f"{path}: expected {len(images)} integer labels, got {_describe(labels)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise HybridatError(f"{path}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return images, labels.astype(np.int64)


def _describe(a) -> str:
    return f"shape {a.shape} dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__


def _read_pickle(path: Path, label_key: str, num_classes: int) -> Arrays:
    """One CIFAR batch file: a dict with 'data' (N, 3072) uint8, rows R(1024) G(1024) B(1024), and labels."""
    if not path.is_file():
        raise HybridatError(f"{path} is missing; delete its folder to download the dataset again")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        data, labels = batch["data"], np.asarray(batch[label_key])
    except Exception as e:  # any unpickling failure or missing key means a bad file
        raise HybridatError(f"{path} is not a CIFAR pickle with 'data' and '{label_key}' ({e!r})") from e
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise HybridatError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {_describe(data)}")
    return _check(data.reshape(-1, 3, 32, 32), labels, num_classes, path)


def _read_cifar(info: DatasetInfo, root: Path, train: bool, download: bool) -> Arrays:
    base = root / info.folder
    if not base.is_dir():
        _download_cifar(info.tv_class, root, train, download, base)
    parts = [_read_pickle(base / name, info.label_key, info.num_classes) for name in info.files[0 if train else 1]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _download_cifar(tv_class: str, root: Path, train: bool, download: bool, base: Path) -> None:
    if not download:
        raise HybridatError(f"{base} does not exist and download is off; put the dataset there "
                            "or point HYBRIDAT_DATA_DIR at its parent")
    import torchvision  # here: importing it costs every command 1.3 s of start-up (it pulls in torch._dynamo)

    try:  # the class is looked up at call time, so tests can replace it
        getattr(torchvision.datasets, tv_class)(str(root), train=train, download=True)
    except Exception as e:
        raise HybridatError(f"{base} does not exist and downloading {tv_class} into {root} failed ({e!r})") from e


def _read_svhn(info: DatasetInfo, root: Path, train: bool, download: bool) -> Arrays:
    split = "train" if train else "test"
    path = root / f"{split}_32x32.mat"
    present = path.exists()
    import torchvision  # here: see _download_cifar

    try:  # torchvision maps label 10 (digit 0) to 0; it downloads over a file whose checksum differs: never ours
        ds = getattr(torchvision.datasets, info.tv_class)(str(root), split=split, download=download and not present)
        images, labels = np.ascontiguousarray(ds.data), np.asarray(ds.labels)
    except Exception as e:
        if present:
            why = str(e).split(". ")[0]  # torchvision's advice after it (download=True) is not ours to give
            raise HybridatError(f"{path} is not SVHN's {split} file, or is damaged ({why}); delete it to download "
                                "it again") from e
        raise HybridatError(f"could not read SVHN from {path} ({e!r})") from e
    return _check(images, labels, info.num_classes, path)


_CIFAR10_FILES = (tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",))
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(10, "CIFAR10", "cifar-10-batches-py", _CIFAR10_FILES),
    "cifar100": DatasetInfo(100, "CIFAR100", "cifar-100-python", (("train",), ("test",)), "fine_labels"),
    "svhn": DatasetInfo(10, "SVHN"),
}


def _info(name: str) -> DatasetInfo:
    return DATASETS[check_choice(name, DATASETS, "dataset")]


def num_classes(name: str) -> int:
    return _info(name).num_classes


def check_classes(name: str, classes: int) -> str:
    """`name` if a model with `classes` outputs can be evaluated on that dataset, else one line."""
    if classes != num_classes(name):
        raise HybridatError(f"the model has {classes} classes and {name} has {num_classes(name)}: give the "
                            "dataset it was trained on (--dataset)")
    return name


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The folder holding `cifar-10-batches-py/` etc.: data_dir, else $HYBRIDAT_DATA_DIR, else ./data."""
    if isinstance(data_dir, str) and not data_dir.strip():  # Path("") is ".": a download would land in the cwd
        raise HybridatError("data_dir is empty; give the folder that holds cifar-10-batches-py/ (None: "
                            "$HYBRIDAT_DATA_DIR, else ./data)")
    chosen = as_path(data_dir, "data_dir") if data_dir is not None else os.environ.get("HYBRIDAT_DATA_DIR") or "data"
    return Path(chosen).expanduser().resolve()


def split_files(name: str, train: bool, data_dir: str | Path | None = None) -> list[Path]:
    """The files a split is read from: inputs that no command may write over."""
    info, root = _info(name), resolve_data_dir(data_dir)
    if info.folder:
        return [root / info.folder / f for f in info.files[0 if train else 1]]
    return [root / f"{'train' if train else 'test'}_32x32.mat"]


@functools.lru_cache(maxsize=8)
def _read_arrays(name: str, train: bool, root: Path, download: bool) -> Arrays:
    info = _info(name)
    return (_read_cifar if info.folder else _read_svhn)(info, root, train, download)


def load_split(name: str, train: bool, data_dir: str | Path | None = None, device: str | torch.device = "cpu",
               n: int | None = None, download: bool = True) -> Split:
    """The whole train or test split (or its first n examples) as uint8 tensors on device (cpu, cuda, cuda:N, mps
    or auto)."""
    _info(name)
    check_flag(train, "train")  # train="no" is true in Python: it loaded the training split
    check_flag(download, "download")
    device = resolve_device(str(device))
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():  # a file given (or in $HYBRIDAT_DATA_DIR) where the folder is meant
        info = _info(name)
        holds = f"{info.folder}/" if info.folder else f"{name}'s .mat files"
        raise HybridatError(f"data folder {root} is a file, not a folder; give the folder that holds {holds}")
    if data_dir is not None and not root.is_dir():  # a typo: neither created nor downloaded into
        raise HybridatError(f"data folder {root} does not exist; fix the path, or create the folder to download "
                            f"{name} into it")
    images, labels = _read_arrays(name, bool(train), root, download)
    if len(labels) == 0:
        raise HybridatError(f"the {name} {'train' if train else 'test'} split in {root} has no images")
    n = _check_n(n, len(labels), f"{name} {'train' if train else 'test'} split in {root}")
    # copy=True: the cached arrays never share memory with a returned tensor
    images, labels = (torch.from_numpy(a[:n]).to(device, copy=True) for a in (images, labels))
    return Split(images, labels)


def _draw_crop_flip(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, on CPU: crop top and left in the padded image, (B,) int64 in [0, 2*PAD], and a flip flag (B,)."""
    offsets = torch.randint(0, 2 * PAD + 1, (2, batch), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    return offsets[0], offsets[1], flip


def _crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop each zero-padded image at (top, left) back to its size, mirrored left-right where flip; one gather."""
    B, C, H, W = images.shape
    dev = images.device
    top, left, flip = top.to(dev), left.to(dev), flip.to(dev)
    padded = F.pad(images, (PAD, PAD, PAD, PAD))  # (B, C, H+8, W+8), zeros around
    rows = top[:, None] + torch.arange(H, device=dev)  # (B, H)
    cols = left[:, None] + torch.arange(W, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # read columns right to left where flipped
    b = torch.arange(B, device=dev)[:, None, None, None]
    c = torch.arange(C, device=dev)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip per image, batched; (B, 3, 32, 32) uint8 in and out."""
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise HybridatError(f"augment expects (B, C, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    return _crop_flip(images, *_draw_crop_flip(images.shape[0], generator))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1], same shape and device."""
    if not isinstance(images, torch.Tensor):  # a list or None: "'list' object has no attribute 'dtype'"
        raise HybridatError(f"to_float expects a uint8 tensor of images, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise HybridatError(f"to_float expects uint8 images, got {images.dtype}")
    return images.float().div_(255)


def train_batches(split: Split, batch_size: int, generator: torch.Generator, augment_data: bool = True,
                  rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch in a random order: x (B, 3, 32, 32) float32 in [0, 1], y (B,) int64, on the split's device.

    batch_size is global: rank r takes rows r, r + world_size, ... of each batch. Every random number is drawn
    for the global batch, so ranks sharing a seed stay in step and together see what one process would.
    A last batch with fewer rows than world_size is dropped, so every rank takes the same number of steps.
    """
    if not (1 <= world_size <= batch_size and 0 <= rank < world_size):
        raise HybridatError(f"need 0 <= rank < world_size <= batch_size, got {rank}, {world_size}, {batch_size}")
    order = torch.randperm(len(split), generator=generator)  # on CPU, the same on every rank
    mine = slice(rank, None, world_size)
    rows, crops = [], []  # per batch: this rank's rows and their crop draws, drawn in batch order as ever
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < world_size:
            break
        if augment_data:
            crops.append([t[mine] for t in _draw_crop_flip(len(idx), generator)])
        rows.append(idx[mine])
    if not rows:
        return
    # the whole epoch in one gather (and one crop): a GPU then spends no launches per batch on the data
    idx = torch.cat(rows).to(split.images.device)
    images, labels = split.images[idx], split.labels[idx]  # (N_rank, 3, 32, 32) uint8, (N_rank,)
    if augment_data:
        images = _crop_flip(images, *(torch.cat(parts) for parts in zip(*crops)))
    start = 0
    for r in rows:
        yield to_float(images[start:start + len(r)]), labels[start:start + len(r)]
        start += len(r)


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split in order, no augmentation: x (B, 3, 32, 32) float32 in [0, 1], y (B,) int64."""
    if batch_size < 1:
        raise HybridatError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(split), batch_size):
        yield to_float(split.images[start:start + batch_size]), split.labels[start:start + batch_size]
