"""Device choice, seeding and the torchrun/DDP environment."""

from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist

from .errors import HybridatError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` = the local CUDA device under torchrun, else cuda:0, else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HybridatError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HybridatError("--device cuda asked for, but torch sees no CUDA device")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (all devices) and random; return a CPU generator for data order and augmentation."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size); joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
