"""hybridat.data: the real CIFAR-10 copy, bad folders, batched crop/flip against torchvision, epoch iterators."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms.v2 import functional as TF

from hybridat import data
from hybridat.data import Split, augment, eval_batches, load_split, to_float, train_batches
from hybridat.errors import HybridatError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def data_dir() -> Path:
    return Path(os.environ.get("HYBRIDAT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


# ---------------------------------------------------------------- real CIFAR-10

def test_cifar10_test_split(data_dir):
    test = load_split("cifar10", train=False, data_dir=data_dir)
    assert len(test) == 10000
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.labels.shape == (10000,) and test.labels.dtype == torch.int64
    assert test.labels[0] == 3
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_cifar10_train_split(data_dir):
    train = load_split("cifar10", train=True, data_dir=data_dir)
    assert train.images.shape == (50000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert train.images[0, 0, 0, :3].tolist() == [59, 43, 50]  # data_batch_1 row 0 starts 59 43 50 (red)
    sums = train.images.numpy().reshape(50000, 3, 1024).sum(axis=(0, 2), dtype=np.int64)
    mean = sums / (50000 * 1024 * 255)
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=1e-3)


def test_cifar10_subsets_and_cache(data_dir):
    full = load_split("cifar10", train=False, data_dir=data_dir)
    hits = data._read_arrays.cache_info().hits
    first = load_split("cifar10", train=False, data_dir=data_dir, n=100)
    assert data._read_arrays.cache_info().hits == hits + 1
    assert len(first) == 100 and torch.equal(first.images, full.images[:100])
    first.images.zero_()  # a returned tensor never aliases the cache
    assert torch.equal(load_split("cifar10", train=False, data_dir=data_dir, n=100).images, full.images[:100])
    assert torch.equal(full.subset(7).labels, full.labels[:7]) and len(full.subset(None)) == 10000
    for n in (0, 10001):
        with pytest.raises(HybridatError, match="between 1 and 10000"):
            load_split("cifar10", train=False, data_dir=data_dir, n=n)
    with pytest.raises(HybridatError, match="n=10001 must be between 1 and 10000, the size of the split"):
        full.subset(10001)


def test_the_first_n_keep_each_image_with_its_label(tmp_path):
    """subset(n) and load_split(n=...) take the first n images and their own labels, and n may be the whole split."""
    split = Split(_images(10), torch.arange(10))
    for n in (4, 10):
        part = split.subset(n)
        assert torch.equal(part.images, split.images[:n]) and torch.equal(part.labels, split.labels[:n])
    _fake_cifar10(tmp_path, rows=4)  # 20 training images
    full = load_split("cifar10", train=True, data_dir=tmp_path)
    for n in (7, 20):
        part = load_split("cifar10", train=True, data_dir=tmp_path, n=n)
        assert torch.equal(part.images, full.images[:n]) and torch.equal(part.labels, full.labels[:n])


# ---------------------------------------------------------------- names and folders

def test_num_classes_and_unknown_name(tmp_path):
    assert {name: data.num_classes(name) for name in data.DATASETS} == {"cifar10": 10, "cifar100": 100, "svhn": 10}
    with pytest.raises(HybridatError, match="unknown dataset 'mnist'"):
        data.num_classes("mnist")
    with pytest.raises(HybridatError, match="unknown dataset"):
        load_split("imagenet", train=True, data_dir=tmp_path)


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYBRIDAT_DATA_DIR", raising=False)
    assert data.resolve_data_dir(None) == tmp_path.resolve() / "data"
    monkeypatch.setenv("HYBRIDAT_DATA_DIR", str(tmp_path / "env"))
    assert data.resolve_data_dir(None) == tmp_path.resolve() / "env"
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path.resolve() / "arg"


def _batch(rows: int, seed: int, label_key: str = "labels", classes: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    return {"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, rows).tolist(), "batch_label": f"fake {seed}"}


def _write(path: Path, obj, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=protocol))


def _fake_cifar10(root: Path, rows: int = 4, protocol: int = 2, **overrides) -> dict:
    """A cifar-10-batches-py folder of small random batches; overrides replace a file's content."""
    batches = {f"data_batch_{i}": _batch(rows, i) for i in range(1, 6)} | {"test_batch": _batch(rows, 6)}
    for name, content in (batches | overrides).items():
        if content is not None:
            _write(root / "cifar-10-batches-py" / name, content, protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_fake_cifar10_layout(tmp_path, monkeypatch, protocol):
    batches = _fake_cifar10(tmp_path, protocol=protocol)
    monkeypatch.setenv("HYBRIDAT_DATA_DIR", str(tmp_path))  # data_dir=None reads the variable
    train = load_split("cifar10", train=True)
    assert len(train) == 20
    rows = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])  # (20, 3072)
    c, y, x = 2, 5, 7  # row layout R(1024) G(1024) B(1024), each row-major 32x32
    assert torch.equal(train.images[:, c, y, x], torch.from_numpy(rows[:, c * 1024 + y * 32 + x]))
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert load_split("cifar10", train=False).labels.tolist() == batches["test_batch"]["labels"]


class _Exploit:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


BAD_FILES = {
    "wrong shape": ({"data": np.zeros((10, 100), np.uint8), "labels": [0] * 10}, r"shape \(N, 3072\)"),
    "wrong dtype": ({"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}, "uint8"),
    "labels out of range": ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}, r"\[0, 10\)"),
    "negative label": ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, -1, 2, 3]}, r"\[0, 10\)"),
    "labels too short": ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1]}, "expected 4 integer labels"),
    "missing key": ({"data": np.zeros((4, 3072), np.uint8)}, "'labels'"),
    "not a dict": ([1, 2, 3], "not a CIFAR pickle"),
    "not a pickle": (b"this is not a pickle", "not a CIFAR pickle"),
    "truncated": (pickle.dumps(_batch(4, 0), protocol=2)[:500], "not a CIFAR pickle"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_cifar_file(tmp_path, case):
    content, message = BAD_FILES[case]
    _fake_cifar10(tmp_path, data_batch_3=content)
    with pytest.raises(HybridatError, match=message) as err:
        load_split("cifar10", train=True, data_dir=tmp_path)
    assert "data_batch_3" in str(err.value)


def test_pickle_cannot_run_code(tmp_path):
    target = tmp_path / "pwned"
    _fake_cifar10(tmp_path, test_batch={"data": np.zeros((1, 3072), np.uint8), "labels": [_Exploit(target)]})
    with pytest.raises(HybridatError, match="posix.mkdir is not allowed|os.mkdir is not allowed"):
        load_split("cifar10", train=False, data_dir=tmp_path)
    assert not target.exists()


def test_missing_file_in_folder(tmp_path):
    _fake_cifar10(tmp_path, data_batch_5=None)
    with pytest.raises(HybridatError, match="data_batch_5 is missing"):
        load_split("cifar10", train=True, data_dir=tmp_path)


def test_missing_folder_without_download(tmp_path):
    with pytest.raises(HybridatError, match="cifar-10-batches-py does not exist and download is off"):
        load_split("cifar10", train=True, data_dir=tmp_path, download=False)


def test_missing_folder_download_fails(tmp_path, monkeypatch):
    calls = []

    def offline(root, train, download):
        calls.append((root, train, download))
        raise RuntimeError("no network here")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(HybridatError, match="downloading CIFAR10 .* failed .*no network here"):
        load_split("cifar10", train=False, data_dir=tmp_path)
    assert calls == [(str(tmp_path.resolve()), False, True)]


def test_download_then_read_ourselves(tmp_path, monkeypatch):
    files = {"train": _batch(6, 1, "fine_labels", 100), "test": _batch(3, 2, "fine_labels", 100)}

    def fake_download(root, train, download):  # stands in for torchvision.datasets.CIFAR100(download=True)
        for name, content in files.items():
            _write(Path(root) / "cifar-100-python" / name, content)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_download)
    train = load_split("cifar100", train=True, data_dir=tmp_path)
    assert train.labels.tolist() == files["train"]["fine_labels"]
    assert len(load_split("cifar100", train=False, data_dir=tmp_path)) == 3


class _FakeSVHN:
    labels = np.array([0, 9, 3])

    def __init__(self, root, split, download):
        if not download:
            raise RuntimeError("Dataset not found or corrupted.")
        self.data = np.zeros((3, 32, 32, 3), np.uint8).transpose(0, 3, 1, 2)  # non-contiguous, as torchvision's


def test_svhn_through_torchvision(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "SVHN", _FakeSVHN)
    split = load_split("svhn", train=False, data_dir=tmp_path)
    assert split.images.shape == (3, 3, 32, 32) and split.labels.tolist() == [0, 9, 3]
    with pytest.raises(HybridatError, match="test_32x32.mat.*not found"):
        load_split("svhn", train=False, data_dir=tmp_path, download=False)
    monkeypatch.setattr(_FakeSVHN, "labels", np.array([0, 10, 3]))
    with pytest.raises(HybridatError, match=r"\[0, 10\)"):
        load_split("svhn", train=True, data_dir=tmp_path)


def test_a_damaged_svhn_file_is_named_not_downloaded_over(tmp_path, monkeypatch):
    """torchvision downloads over a .mat whose checksum differs (here: failed for want of a network, naming a URL)."""
    calls = []

    def svhn(root, split, download):  # torchvision's checks: the file's md5, then a download if allowed
        calls.append(download)
        raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")

    monkeypatch.setattr(torchvision.datasets, "SVHN", svhn)
    (tmp_path / "test_32x32.mat").write_bytes(b"half a download")
    with pytest.raises(HybridatError, match=r"test_32x32.mat is not SVHN's test file, or is damaged .*delete it"):
        load_split("svhn", train=False, data_dir=tmp_path)
    assert calls == [False] and (tmp_path / "test_32x32.mat").read_bytes() == b"half a download"


# ---------------------------------------------------------------- augmentation

def _images(count: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=g)  # no zeros, unlike padding


@pytest.mark.parametrize("device", DEVICES)
def test_augment_matches_torchvision_loop(device):
    x = _images(64)
    top, left, flip = data._draw_crop_flip(64, torch.Generator().manual_seed(3))
    assert flip.any() and (~flip).any() and len(set(top.tolist())) == 9
    out = augment(x.to(device), torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device.type == device
    for i in range(64):
        ref = TF.crop(TF.pad(x[i], [4], fill=0), int(top[i]), int(left[i]), 32, 32)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        assert torch.equal(out[i].cpu(), ref), i


def test_augment_deterministic_per_seed():
    x = _images(16)
    a = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    with pytest.raises(HybridatError, match="uint8"):
        augment(x.float(), torch.Generator())
    with pytest.raises(HybridatError, match=r"\(B, C, H, W\)"):
        augment(x[0], torch.Generator())


def test_crop_flip_identity_flip_and_border():
    x = _images(5)
    fours, no = torch.full((5,), 4), torch.zeros(5, dtype=torch.bool)
    assert torch.equal(data._crop_flip(x, fours, fours, no), x)
    assert torch.equal(data._crop_flip(x, fours, fours, ~no), x.flip(-1))
    corner = data._crop_flip(x, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long), no)
    assert (corner[:, :, :4] == 0).all() and (corner[:, :, :, :4] == 0).all()  # zero padding, not reflection
    assert torch.equal(corner[:, :, 4:, 4:], x[:, :, :28, :28])


def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert to_float(x).dtype == torch.float32 and to_float(x).tolist() == pytest.approx([0.0, 0.2, 1.0])
    with pytest.raises(HybridatError, match="uint8"):
        to_float(x.float())


# ---------------------------------------------------------------- epoch iterators

def _id_split(count: int) -> Split:
    """Labels are the example ids, so batches show which examples they hold."""
    return Split(_images(count), torch.arange(count))


def test_train_batches_cover_epoch_once():
    split = _id_split(103)
    g = torch.Generator().manual_seed(0)
    batches = list(train_batches(split, 16, g, augment_data=False))
    assert [len(y) for _, y in batches] == [16] * 6 + [7]
    ids = torch.cat([y for _, y in batches])
    assert sorted(ids.tolist()) == list(range(103)) and ids.tolist() != list(range(103))
    for x, y in batches:
        assert x.dtype == torch.float32 and torch.equal(x, to_float(split.images[y]))
    again = torch.cat([y for _, y in train_batches(split, 16, g, augment_data=False)])
    assert not torch.equal(again, ids)  # the next epoch has a new order


def test_train_batches_shards_are_disjoint_and_cover_each_batch():
    split = _id_split(103)
    world = 3
    full = list(train_batches(split, 16, torch.Generator().manual_seed(5)))
    shards = [list(train_batches(split, 16, torch.Generator().manual_seed(5), rank=r, world_size=world))
              for r in range(world)]
    for r, shard in enumerate(shards):
        assert len(shard) == len(full)
        for (x, y), (fx, fy) in zip(shard, full):
            assert torch.equal(y, fy[r::world]) and torch.equal(x, fx[r::world])  # same crops as one process
    for step in range(len(full)):
        ids = torch.cat([shards[r][step][1] for r in range(world)])
        assert sorted(ids.tolist()) == sorted(full[step][1].tolist())


def test_train_batches_drops_a_last_batch_too_small_to_shard():
    split = _id_split(17)
    steps = [len(list(train_batches(split, 16, torch.Generator().manual_seed(0), rank=r, world_size=2)))
             for r in range(2)]
    assert steps == [1, 1]
    lasts = [list(train_batches(_id_split(18), 16, torch.Generator().manual_seed(0), rank=r, world_size=2))[-1][1]
             for r in range(2)]
    assert [len(y) for y in lasts] == [1, 1]  # a last batch of world_size rows is kept: one row per rank
    with pytest.raises(HybridatError, match="rank < world_size <= batch_size, got 2, 2, 16"):
        next(train_batches(split, 16, torch.Generator(), rank=2, world_size=2))
    with pytest.raises(HybridatError, match="rank < world_size <= batch_size, got 0, 4, 2"):
        next(train_batches(split, 2, torch.Generator(), world_size=4))


def test_eval_batches_in_order():
    split = _id_split(10)
    batches = list(eval_batches(split, 4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), split.labels)
    assert torch.equal(torch.cat([x for x, _ in batches]), to_float(split.images))
