"""Device choice, seeding and the torchrun/DDP environment."""

from __future__ import annotations

import os
import random
import socket
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from .errors import HybridatError
from .files import os_error_line

T = TypeVar("T")
_joined_group = False  # this process has been a rank of a process group (see `exit_process`)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` = the local CUDA device under torchrun, else cuda:0, else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            local = os.environ.get("LOCAL_RANK", "0")
            if not local.strip().isdigit():
                raise HybridatError(f"LOCAL_RANK={local!r} in the environment; torchrun sets it to the process's GPU "
                                    "index (unset it to run one process)")
            return resolve_device(f"cuda:{int(local)}")  # its index checked against the GPUs there are
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps") or (device.type != "cuda" and device.index):
        # torch knows more (xpu, meta, hip, ...), but the model could not be moved there: one line, not a traceback
        raise HybridatError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HybridatError("--device cuda asked for, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise HybridatError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise HybridatError("--device mps asked for, but this torch has no MPS device (Apple GPUs only)")
    return device


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast (CUDA, CPU) when enabled: convs and matmuls run in bf16; x, x_adv and the PGD step and
    projection stay fp32 tensors, and norms compute batch statistics and running NS in fp32. No cast cache while a
    CUDA graph is captured (torch's advice for graphs; the values are the same)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type in ("cuda", "cpu"),
                          cache_enabled=not capturing)


def bf16_emulated(device: torch.device) -> bool:
    """Whether `device` is a CPU whose bf16 arithmetic is emulated (no AVX-512 BF16 or AMX, as oneDNN reports);
    False where bf16 is native or this torch cannot tell."""
    try:
        return device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch without that op: say nothing
        return False


def bf16_note(device: torch.device, advice: str = "leave --amp out") -> str | None:
    """A line for `--amp` where bf16_emulated(device), else None. There bf16 is many times slower than fp32: a
    full-width training step ran 22x slower (0.41 vs 9.1 images/s) on a 2-core AVX2 EPYC."""
    return ("note: this CPU has no native bf16 (no AVX-512 BF16 or AMX), so bf16 runs many times slower than fp32 "
            f"here (22x for a full-width training step on an AVX2 CPU); {advice}") if bf16_emulated(device) else None


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once); os.cpu_count() elsewhere."""
    try:
        allowed = os.sched_getaffinity(0)
        cores = set()
        for cpu in allowed:
            base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
            with open(f"{base}/physical_package_id") as a, open(f"{base}/core_id") as b:
                cores.add((a.read().strip(), b.read().strip()))
        return max(1, len(cores))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def tune_host(device: torch.device) -> None:
    """Process-wide speed settings for `device`. Call once, before the work.

    CPU: one intra-op thread per physical core, as OMP_NUM_THREADS has it if set (two hyperthreads share one
    core's FMA units), and glibc malloc told to keep freed memory: a batch-128 activation (>= 32 MiB) is
    otherwise mmap'd afresh and page-faulted in at every layer (4% of a batch-128 bf16 step on 2 cores).
    CUDA: cuDNN picks the fastest conv algorithm per shape (shapes repeat every step).
    """
    if device.type == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it: each process its share
            torch.set_num_threads(physical_cores())
        _malloc_keep_memory()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _malloc_keep_memory() -> None:
    """glibc only: serve allocations up to 1 GiB from the heap and never trim it (M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD), so freed activations are reused instead of unmapped; nothing where there is no glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)
        libc.mallopt(-1, 1 << 30)
    except (OSError, AttributeError):
        pass


@contextmanager
def callers_streams(device: torch.device) -> Iterator[None]:
    """The caller's global random streams (torch's CPU generator and that of the CUDA device the block runs on,
    Python's `random`) as they were on the way out, whatever the block seeds or draws: a run seeds them
    (`seed_everything`), a notebook's next torch.randn does not come from the run's seed. Only the block's own GPU:
    reading every GPU's state would open a context on each (under torchrun, in every process)."""
    cuda = [device] if device.type == "cuda" else []
    python = random.getstate()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (all devices) and random; return a CPU generator for data order and augmentation."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def distributed(device: torch.device) -> Iterator[tuple[int, int]]:
    """(rank, world_size) inside; joins the process group when launched by torchrun (WORLD_SIZE > 1) and leaves it
    on the way out (a group the caller had already joined is the caller's to leave). Leaving explicitly: a rank that
    exits with its gloo connections still open can make a peer still reading them abort."""
    global _joined_group
    text = os.environ.get("WORLD_SIZE", "1")
    world = int(text) if text.strip().isdigit() else 0
    if world < 1:
        raise HybridatError(f"WORLD_SIZE={text!r} in the environment; it must be a number of processes >= 1 "
                            "(torchrun sets it: unset it to run one process)")
    if world == 1:
        yield 0, 1
        return
    rank = os.environ.get("RANK", "")
    if rank.strip().isdigit() and int(rank) >= world:
        raise HybridatError(f"RANK={rank} in the environment, but WORLD_SIZE={world} has ranks 0 to {world - 1} "
                            "(torchrun sets both: unset them to run one process)")
    joined = not dist.is_initialized()
    if joined:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _join_group("nccl" if device.type == "cuda" else "gloo", world)
        _joined_group = True
    try:
        yield dist.get_rank(), world
    finally:
        if joined:
            dist.destroy_process_group()


RENDEZVOUS_S = 60  # outside torchrun: how long the WORLD_SIZE processes may take to meet before one line says so


def _join_group(backend: str, world: int) -> None:
    """init_process_group from torchrun's environment variables. Outside torchrun (no TORCHELASTIC_RUN_ID: variables
    left in a shell, or a launcher of one's own) the processes must meet within RENDEZVOUS_S, else one line: torch
    waits 30 minutes for a process that was never started (a stale WORLD_SIZE=2 with MASTER_ADDR set), and neither
    Ctrl-C nor SIGTERM ended that wait. torchrun started every process itself: its wait is torch's own."""
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        if "TORCHELASTIC_RUN_ID" in os.environ:
            dist.init_process_group(backend)
            return
        if os.environ.get("RANK", "0").strip() != "0":  # in Python, where Ctrl-C works, and without torch's
            _wait_for_master(where)  # C++ log of every failed try (several lines each)
        # what init_process_group does with env://, but with a rendezvous timeout of its own (then torch's default)
        store, rank, size = next(dist.rendezvous("env://", timeout=timedelta(seconds=RENDEZVOUS_S)))
        store.set_timeout(default_pg_timeout)
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=size)
    except ValueError as e:  # torch's env:// rendezvous: RANK, MASTER_ADDR, ... missing or malformed
        raise HybridatError(f"WORLD_SIZE={world} but the process group could not start ({e}); launch with "
                            "torchrun, or unset WORLD_SIZE to run one process") from None
    except dist.DistError as e:  # the others never came (or the master never answered)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HybridatError(f"WORLD_SIZE={world} but not all {world} processes met at {where} within "
                            f"{RENDEZVOUS_S} s ({why}); launch with torchrun, or unset WORLD_SIZE, RANK, MASTER_ADDR "
                            "and MASTER_PORT to run one process") from None


def _wait_for_master(where: str) -> None:
    """Return once MASTER_ADDR:MASTER_PORT takes a connection (rank 0's store); one line after RENDEZVOUS_S."""
    host, _, port = where.rpartition(":")
    if not port.isdigit() or host == "None":  # torch's rendezvous says what is missing or malformed
        return
    deadline = time.monotonic() + RENDEZVOUS_S
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise HybridatError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but rank 0 did not answer at {where} "
                                    f"within {RENDEZVOUS_S} s ({os_error_line(e)}); launch with torchrun, or unset "
                                    "WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT to run one process") from None
            time.sleep(0.2)


def exit_process(code: int | str | None = 0) -> NoReturn:
    """End the process with `code` (as sys.exit takes it). A process that was a rank of a process group ends without
    the interpreter's finalization: gloo's worker threads may still be releasing the last collective's tensors, which
    takes the GIL, and a thread taking the GIL of a finalizing interpreter aborts the whole process ('terminate called
    without an active exception', SIGABRT; the race of pytorch/pytorch PR 179291). Seen in 5 of 284 two-process CPU
    runs here, after the model was written: torchrun called a finished run failed. Every file is closed by then."""
    if not _joined_group:
        sys.exit(code)
    if not isinstance(code, int):  # sys.exit's convention: None is 0, anything else is printed and exits 1
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def on_rank0(fn: Callable[[], T], world: int) -> T | None:
    """`fn()` on rank 0 alone and its result there (None on the other ranks); a HybridatError it raises stops every
    rank with the same line (one collective): a check only rank 0 makes must stop them all, or the others wait for
    it at their next collective and die with gloo's 'Connection reset by peer' traceback."""
    result, problem = None, None
    if is_main_process():
        try:
            result = fn()
        except HybridatError as e:
            problem = str(e)
    if world > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise HybridatError(problem)
    return result


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
