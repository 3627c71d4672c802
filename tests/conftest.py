import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np

import pytest
import torch

from hybridat.models import ModelConfig, build_model


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding cifar-10-batches-py/: $HYBRIDAT_DATA_DIR, else ../shared/data beside the checkout."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("HYBRIDAT_DATA_DIR", default))
    assert (path / "cifar-10-batches-py").is_dir(), f"real CIFAR-10 expected under {path}"
    return path


def tiny(norm: str = "dual-bn", arch: str = "resnet18", seed: int = 0):
    """A ResNet at 1/16 width: every layer type, a few thousand parameters."""
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch, norm, width=0.0625))


def perturb(model, scale: float = 0.5, seed: int = 1):
    """Move every parameter and running buffer away from its init so per-branch sets differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype.is_floating_point:
                noise = torch.rand(t.shape, generator=g) * scale
                t.add_(noise) if "var" not in name else t.mul_(1 + noise)
    return model


def fake_cifar10(root: Path, rows: int) -> Path:
    """A cifar-10-batches-py folder under root with `rows` random images per file (protocol 4: rows may be 0)."""
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, rows).tolist()}
        path = root / "cifar-10-batches-py" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(batch, protocol=4))
    return root


def script(name: str):
    """scripts/NAME.py loaded as a module (the scripts are not a package)."""
    path = Path(__file__).parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
