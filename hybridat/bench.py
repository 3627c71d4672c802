"""`hybridat bench`: the speed of hybridat's Hybrid-AT step and PGD evaluation, against references, in one run.

Every task is timed interleaved round by round in this one process (medians over rounds), so a busy machine slows
all alike. The comparisons:
  train_vs_reference   hybridat's training step vs the same step written as common research code does it
  train_vs_floor       hybridat's step vs its arithmetic floor: the step's FLOPs (torch's flop counter) over
                       the rate this device runs those very convolutions and matmuls at, alone, back to back
  train_graphs_vs_eager, train_epoch_vs_step   the step as a CUDA graph vs eager; `train`'s whole loop vs the step
  pgd_vs_torchattacks  PGD-20 evaluation (`robust_accuracy`) vs torchattacks.PGD, same network, weights and data
  pgd_vs_torchattacks_reference   the same vs torchattacks.PGD on the network as research code writes it
                       (same weights: nn.BatchNorm2d with a route flag, NCHW)
  pgd_bf16_vs_torchattacks   PGD-20 with examples crafted in bf16 (`attack --amp`) vs torchattacks.PGD (fp32)
  pgd_graphs_vs_eager  hybridat's PGD evaluation with and without CUDA graphs
`ratio` is always how many times faster hybridat is (ours / theirs in images/s), so the floor row is <= 1.
It also prints how close both PGD evaluations come to their own floor, and with `ablate`, our step with each
technique of ABLATIONS undone in turn (leave one out), to show what each one gains on this device.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import flop_registry
from torch.utils._python_dispatch import TorchDispatchMode

from .attacks import frozen, robust_accuracy
from .checkpoint import check_csv_name, write_csv
from .data import Split, to_float, train_batches
from .errors import check_number
from .files import check_outputs
from .models import BranchView, ModelConfig, build_model, fused
from .runtime import autocast, bf16_note, resolve_device, tune_host
from .train import LOSSES, Stepper, TrainConfig, craft, make_optimizer, train

COLUMNS = ("comparison", "ours", "theirs", "unit", "ratio", "device")
EPS, STEP = 8 / 255, 2 / 255


@dataclass(frozen=True)
class BenchSize:
    """How big a bench run is. batch is per branch, as in TrainConfig."""

    width: float  # ResNet-18 channel multiplier
    batch: int
    steps: int  # PGD steps of the training attack
    eval_batch: int
    eval_steps: int  # PGD steps of the evaluation attack
    rounds: int  # interleaved repetitions; medians are reported
    images: int  # synthetic training images (uint8, seeded)


SIZES = {
    "full": BenchSize(width=1.0, batch=128, steps=10, eval_batch=128, eval_steps=20, rounds=3, images=1024),
    # the same network, a quarter of the batch: about 2 minutes on 2 CPU cores
    "quick": BenchSize(width=1.0, batch=32, steps=10, eval_batch=32, eval_steps=20, rounds=3, images=256),
}
# On a GPU a step takes milliseconds: each timed call runs REPEAT steps (or PGD batches), so a task is timed over
# rounds x REPEAT >= 50 steps, and PGD evaluates REPEAT batches of 500 (`hybridat attack`'s batch) per call.
GPU_REPEAT, GPU_EVAL_BATCH = 20, 500


def size_for(name: str, device: torch.device) -> tuple[BenchSize, int]:
    """The BenchSize `name` on `device`, and how many steps (PGD batches) each timed call runs."""
    size = SIZES[name]
    if device.type != "cuda":
        return size, 1
    return replace(size, eval_batch=GPU_EVAL_BATCH, images=size.batch * GPU_REPEAT), GPU_REPEAT


# ---- the reference: Hybrid-AT with Dual BN as common research code writes it ----------------------------

class RefDualBN(nn.Module):
    """Dual BN with a route flag: two BatchNorm2d, the flag (set on every layer before a pass) picks one."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn_adv, self.bn_clean = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.route = "clean"

    def forward(self, x):
        return self.bn_adv(x) if self.route == "adv" else self.bn_clean(x)


class RefBlock(nn.Module):
    """The BasicBlock of the widely copied CIFAR ResNet (kuangliu/pytorch-cifar), with Dual BN."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = RefDualBN(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = RefDualBN(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), RefDualBN(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class RefResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem, fp32, NCHW; `width` scales channels as hybridat's `--width` does."""

    def __init__(self, width: float = 1.0, num_classes: int = 10):
        super().__init__()
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = RefDualBN(widths[0])
        cin = widths[0]
        for i, cout in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(RefBlock(cin, cout, stride), RefBlock(cout, cout, 1)))
            cin = cout
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


def set_route(model: nn.Module, route: str) -> None:
    for m in model.modules():
        if isinstance(m, RefDualBN):
            m.route = route


def reference_from(model: nn.Module, width: float) -> RefResNet18:
    """A RefResNet18 holding the weights and running NS of a hybridat `dual-bn` ResNet-18."""
    ref = RefResNet18(width)
    state = {}
    for name, value in model.state_dict().items():
        stem, _, last = name.rpartition(".")
        base, _, branch = last.rpartition("_")
        if branch in ("adv", "clean") and base in ("weight", "bias", "running_mean", "running_var",
                                                   "num_batches_tracked"):
            name = f"{stem}.bn_{branch}.{base}"
        state[name] = value.detach().clone().contiguous()
    ref.load_state_dict(state, strict=True)
    return ref


def reference_pgd(model, x, y, eps: float, alpha: float, steps: int):
    """PGD as common training code writes it: loss.backward(), so every parameter's .grad is filled too."""
    model.eval()
    set_route(model, "adv")
    x_adv = torch.clamp(x.detach() + 0.001 * torch.randn_like(x), 0, 1)
    for _ in range(steps):
        x_adv.requires_grad_()
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        x_adv = x_adv.detach() + alpha * x_adv.grad.sign()
        delta = torch.clamp(x_adv - x, min=-eps, max=eps)
        x_adv = torch.clamp(x + delta, min=0, max=1).detach()
    model.train()
    return x_adv


def reference_step(model, optimizer, x, y, eps: float = EPS, alpha: float = STEP, steps: int = 10,
                   clean_weight: float = 0.5) -> float:
    """One Hybrid-AT step: PGD through the adv BNs, then two separate passes, one per route flag."""
    x_adv = reference_pgd(model, x, y, eps, alpha, steps)
    set_route(model, "adv")
    loss_adv = F.cross_entropy(model(x_adv), y)
    set_route(model, "clean")
    loss_clean = F.cross_entropy(model(x), y)
    loss = clean_weight * loss_clean + (1 - clean_weight) * loss_adv
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()  # logged every step, as such code does


class RefCifar(Dataset):
    """uint8 images (N, 3, 32, 32) served one PIL image at a time through per-sample torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        import torchvision.transforms as T  # only the reference needs them

        self.images, self.labels = images.transpose(0, 2, 3, 1), labels  # (N, 32, 32, 3)
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_batches(split: Split, batch: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches from a shuffling DataLoader, copied to the device per batch. Worker processes on GPU, as
    such code has them; none on CPU, where they would take the cores the step itself runs on."""
    device = torch.device(device)
    workers = 0 if device.type == "cpu" else min(4, (os.cpu_count() or 1) // 2)
    loader = DataLoader(RefCifar(split.images.cpu().numpy(), split.labels.cpu().numpy()), batch_size=batch,
                        shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda")
    while True:
        for x, y in loader:
            yield x.to(device), y.to(device)


# ---- the floor: the step's own convolutions and matmuls, replayed alone ---------------------------------

def _spec(a):
    """A hashable description of an op argument: tensors by shape, strides, dtype and device."""
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), tuple(a.stride()), a.dtype, a.device)
    if isinstance(a, (list, tuple)):
        return tuple(_spec(v) for v in a)
    if isinstance(a, dict):
        return ("dict", tuple((k, _spec(v)) for k, v in sorted(a.items())))
    return a


def _make(spec):
    """Fresh arguments matching a `_spec`: random tensors with the recorded shape, strides and dtype."""
    if isinstance(spec, tuple) and spec[:1] == ("tensor",):
        _, shape, stride, dtype, device = spec
        return torch.empty_strided(shape, stride, dtype=dtype, device=device).uniform_(-1, 1)
    if isinstance(spec, tuple) and spec[:1] == ("dict",):
        return {k: _make(v) for k, v in spec[1]}
    if isinstance(spec, tuple):
        return [_make(v) for v in spec]
    return spec


class OpRecorder(TorchDispatchMode):
    """Counts the calls of every FLOP-counted op, by signature (op, argument shapes/strides/dtypes, options),
    and their FLOPs with the formulas of torch's flop counter.

    A dispatch mode rather than FlopCounterMode: the latter's module hooks reject torch.autograd.grad with
    respect to a leaf input, which is exactly what PGD computes."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in flop_registry:
            self.calls[(func, _spec(args), _spec(kwargs))] += 1
            self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


class Floor:
    """The arithmetic floor of a recorded step: its FLOPs, and the time the device takes for its
    convolutions and matmuls alone (each distinct call timed after a warm-up run, times its count)."""

    def __init__(self, recorder: OpRecorder):
        self.calls, self.flops = recorder.calls, recorder.flops

    def seconds(self, sync: Callable[[], None]) -> float:
        total = 0.0
        for (func, args, kwargs), n in self.calls.items():
            a, k = _make(args), _make(kwargs)
            func(*a, **k)  # warm: caches, oneDNN/cuDNN primitive selection
            sync()
            start = time.perf_counter()
            func(*a, **k)
            sync()
            total += n * (time.perf_counter() - start)
        return total


# ---- timing ------------------------------------------------------------------------------------------------

def interleaved(tasks: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None],
                on_round: Callable[[int, dict], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each task, `rounds` times, the tasks taking turns (the order rotates each round, so no
    task always follows the same one). A task returning a float reports its own seconds (the floor)."""
    times: dict[str, list[float]] = {name: [] for name in tasks}
    names = list(tasks)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start = time.perf_counter()
            result = tasks[name]()
            sync()
            times[name].append(result if isinstance(result, float) else time.perf_counter() - start)
        if on_round is not None:
            on_round(r + 1, {k: v[-1] for k, v in times.items()})
    return times


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{device.type}: {name}, {torch.get_num_threads()} threads"


def synthetic_split(n: int, device, seed: int = 0) -> Split:
    """n random uint8 CIFAR-shaped images and labels: speed does not depend on pixel values."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return Split(images.to(device), torch.randint(0, 10, (n,), generator=g).to(device))


def _endless(split: Split, batch: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from train_batches(split, batch, generator)


# ---- the benchmark --------------------------------------------------------------------------------------------

def run_bench(device: str | torch.device = "auto", quick: bool = False, out: Path | None = None, console=None,
              amp: bool = False, rounds: int | None = None, ablate: bool = False) -> list[dict]:
    """Time hybridat against the references on `device`; print a table; write `out` (CSV) if given.

    amp: bf16 autocast in hybridat's training step (`hybridat train --amp`). PGD evaluation is timed in fp32, and
    in bf16 for its own row (pgd_bf16_vs_torchattacks) where the device has native bf16 or `amp` asks for bf16: a
    CPU that emulates bf16 would spend most of the run on a row that only says "much slower" (bench says so).
    ablate: also time our step with each technique of ABLATIONS in use turned off, one at a time.
    Returns one row per comparison with COLUMNS."""
    if rounds is not None:
        check_number("rounds", rounds, 1, 1000, integer=True)
    if out is not None:
        check_outputs([out])
        check_csv_name(out)
    say = console.print if console is not None else print
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    tune_host(device)
    note = bf16_note(device, "the bf16 rows time that" if amp else  # None where bf16 is native
                     "the pgd_bf16_vs_torchattacks row is left out (--amp times it, and the step, in bf16)")
    if note:
        say(note)
    time_bf16 = amp or note is None
    size, repeat = size_for("quick" if quick else "full", device)
    rounds = rounds or size.rounds
    cfg = TrainConfig(batch_size=size.batch, steps=size.steps, amp=amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    split = synthetic_split(size.images, device)

    model = build_model(ModelConfig("resnet18", "dual-bn", size.width)).to(device).train()
    reference = reference_from(model, size.width).to(device).train()
    eager = _our_step(copy.deepcopy(model), split, cfg, graphs=False)
    ours, theirs = _our_step(model, split, cfg), _reference_step(reference, split, cfg, device)
    x_eval, y_eval = to_float(split.images[:size.eval_batch]), split.labels[:size.eval_batch]
    x_eval, y_eval = x_eval.repeat(repeat, 1, 1, 1), y_eval.repeat(repeat)  # `repeat` batches per call
    pgd = _pgd_tasks(model, copy.deepcopy(reference), x_eval, y_eval, size.eval_steps, size.eval_batch, time_bf16)
    floor, pgd_floor = record_floor(eager), record_floor(pgd["pgd_eager"])  # also the first warm-up of both
    steps = {"ours": ours, "eager": eager, "reference": theirs}
    tasks = {name: _repeated(task, repeat) for name, task in steps.items()}
    epoch_split = split.subset(size.batch * max(repeat, 2))
    tasks |= {"floor": lambda: floor.seconds(sync), "epoch": _epoch_task(model, epoch_split, cfg), **pgd,
              "pgd_floor": lambda: pgd_floor.seconds(sync)}
    ablations = [name for name in ABLATIONS if ablate and (cfg.amp or name != "bf16 autocast")]
    tasks |= {f"without {name}": _ablated_step(model, split, cfg, device, name) for name in ablations}
    for task in tasks.values():  # warm-up: allocator, oneDNN/cuDNN primitive caches, graph capture
        task()
    precision = "bf16 autocast" if cfg.amp else "fp32"
    say(f"bench ({'quick' if quick else 'full'}): ResNet-18 width {size.width}, dual-bn, Hybrid-AT PGD-{size.steps}, "
        f"batch {size.batch} per branch, ours {precision}; PGD-{size.eval_steps} evaluation "
        f"({'fp32; bf16 in its own row' if time_bf16 else 'fp32'}) on {len(y_eval)} images in batches of "
        f"{size.eval_batch}; {rounds} interleaved rounds of {repeat} step(s) per task on {device_name(device)}")
    times = interleaved(tasks, rounds, sync, lambda r, t: say(
        f"  round {r}/{rounds}: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items())))
    med = {k: statistics.median(v) / (repeat if k in steps else 1) for k, v in times.items()}  # seconds per step
    rows = _rows(med, size, len(epoch_split), len(y_eval), f"{device_name(device)}, ours {precision}")
    say(markdown_table(rows))
    for line in floor_lines(floor.flops, pgd_floor.flops, med, size, len(y_eval)):
        say(line)
    if ablations:
        say(ablation_table(med, size.batch, ablations))
    if out is not None:
        write_csv([{k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in r.items()} for r in rows], out)
    return rows


def _repeated(task: Callable[[], object], repeat: int) -> Callable[[], None]:
    def run():
        for _ in range(repeat):
            task()
    return run


def _epoch_task(model, split: Split, cfg: TrainConfig) -> Callable[[], float]:
    """`train`'s own loop (batching, augmentation, metrics, graphs) over `split` on a copy of `model`; returns the
    seconds of its last epoch. On a GPU two epochs, timing the second: the steady state of a long run (the first
    holds the warm-up steps and the capture). On a CPU one, which is already that."""
    epochs = 2 if split.images.device.type == "cuda" else 1

    def run() -> float:
        rows = list(train(copy.deepcopy(model), split, replace(cfg, epochs=epochs), torch.Generator().manual_seed(0)))
        return rows[-1]["seconds"]
    return run


def record_floor(task: Callable[[], object]) -> Floor:
    """Run `task` once, recording its convolutions and matmuls: the Floor of that task."""
    recorder = OpRecorder()
    with recorder:
        task()
    return Floor(recorder)


def _our_step(model, split: Split, cfg: TrainConfig, graphs: bool = True) -> Callable[[], torch.Tensor]:
    """`hybridat train`'s step (a CUDA graph on a GPU unless graphs=False) on endless batches of `split`; a call
    returns the epoch's running sums so far (the step's loss is in them)."""
    stepper, batches = Stepper(model, model, make_optimizer(model, cfg), cfg, graphs), _endless(split, cfg.batch_size)

    def step():
        stepper.step(*next(batches))
        return stepper.sums
    return step


def _reference_step(reference, split: Split, cfg: TrainConfig, device) -> Callable[[], float]:
    optimizer = torch.optim.SGD(reference.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    batches = reference_batches(split, cfg.batch_size, device)

    def step():
        x, y = next(batches)
        reference_step(reference, optimizer, x, y, cfg.eps / 255, cfg.step / 255, cfg.steps, cfg.clean_weight)
    return step


def _pgd_tasks(model, reference, x, y, steps: int, batch: int, bf16: bool = True) -> dict[str, Callable[[], None]]:
    """PGD-20 evaluation over x in batches of `batch`, uniform start, step eps/4, through the adv branch:
    hybridat's (`robust_accuracy` as `hybridat attack` runs it: CUDA graphs on a GPU; "pgd_eager" without them,
    "pgd_bf16" as `attack --amp` crafts, if `bf16`) and torchattacks.PGD with an accuracy pass in eval mode, on
    the same network ("pgd_torchattacks") and on the same weights in `reference`, the network as research code
    writes it ("pgd_torchattacks_reference")."""
    import torchattacks  # only the benchmark needs it

    view = BranchView(model, "adv")
    set_route(reference, "adv")

    def ours(**kwargs) -> Callable[[], None]:
        def run() -> None:  # the accuracy is not returned: `interleaved` would take it for the task's seconds
            robust_accuracy(view, x, y, "pgd", EPS, EPS / 4, steps=steps, batch_size=batch, **kwargs)
        return run

    def theirs(net: nn.Module) -> Callable[[], None]:
        attack = torchattacks.PGD(net, eps=EPS, alpha=EPS / 4, steps=steps, random_start=True)

        def run() -> None:
            correct = 0
            for xb, yb in zip(x.split(batch), y.split(batch)):
                x_adv = attack(xb, yb)
                with frozen(net), torch.no_grad():  # torchattacks leaves the net in its own `training` mode
                    correct += (net(x_adv).argmax(1) == yb).sum()
            correct.item()
        return run
    bf16_task = {"pgd_bf16": ours(amp=True)} if bf16 else {}
    return {"pgd_ours": ours(), "pgd_eager": ours(graphs=False), **bf16_task,
            "pgd_torchattacks": theirs(view), "pgd_torchattacks_reference": theirs(reference)}


# ---- leave-one-out: our step with one technique turned off ---------------------------------------------------

ABLATIONS = ("bf16 autocast", "channels_last", "fused forward", "input-only attack gradients",
             "on-device data")


def _ablated_step(model, split: Split, cfg: TrainConfig, device, off: str) -> Callable[[], torch.Tensor]:
    """Our training step on a copy of `model` with the technique `off` (one of ABLATIONS) undone the way the
    reference does it: fp32, NCHW, two passes with a route flag, loss.backward() inside PGD, DataLoader."""
    model = copy.deepcopy(model)
    if off == "channels_last":
        model = model.to(memory_format=torch.contiguous_format)
    cfg = replace(cfg, amp=cfg.amp and off != "bf16 autocast")
    optimizer = make_optimizer(model, cfg)
    batches = (reference_batches(split, cfg.batch_size, device) if off == "on-device data"
               else _endless(split, cfg.batch_size))
    objective = LOSSES["hybrid"].objective

    def step():
        x, y = next(batches)
        with autocast(x.device, cfg.amp):
            if off == "input-only attack gradients":
                x_adv = reference_pgd(BranchView(model, "adv"), x, y, cfg.eps / 255, cfg.step / 255, cfg.steps)
            else:
                x_adv = craft(model, x, y, cfg)
            if off == "fused forward":
                logits = {"adv": model(x_adv, "adv"), "clean": model(x, "clean")}
            else:
                logits = dict(zip(("adv", "clean"), fused(model, x_adv, x)))
            loss = objective({b: v.float() for b, v in logits.items()}, y, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss
    return step


def ablation_table(med: dict, batch: int, names: list[str]) -> str:
    lines = ["| our step without | images/s | our step is faster by |", "|---|---:|---:|",
             f"| (nothing: hybridat) | {batch / med['ours']:.2f} | 1.00x |"]
    lines += [f"| {name} | {batch / med[f'without {name}']:.2f} | {med[f'without {name}'] / med['ours']:.2f}x |"
              for name in names]
    return "\n".join(lines)


def _rows(med: dict, size: BenchSize, epoch_images: int, eval_images: int, device: str) -> list[dict]:
    """The comparisons from median seconds per step (per `epoch` of `epoch_images`, per PGD call over
    `eval_images`); pgd_bf16_vs_torchattacks only where `med` has "pgd_bf16"."""
    def row(comparison, ours, theirs):
        return {"comparison": comparison, "ours": ours, "theirs": theirs, "unit": "images/s",
                "ratio": ours / theirs, "device": device}
    train_rate = size.batch / med["ours"]
    return [row("train_vs_reference", train_rate, size.batch / med["reference"]),
            row("train_vs_floor", train_rate, size.batch / med["floor"]),
            row("train_graphs_vs_eager", train_rate, size.batch / med["eager"]),
            row("train_epoch_vs_step", epoch_images / med["epoch"], train_rate),
            row("pgd_vs_torchattacks", eval_images / med["pgd_ours"], eval_images / med["pgd_torchattacks"]),
            row("pgd_vs_torchattacks_reference", eval_images / med["pgd_ours"],
                eval_images / med["pgd_torchattacks_reference"]),
            *([row("pgd_bf16_vs_torchattacks", eval_images / med["pgd_bf16"], eval_images / med["pgd_torchattacks"])]
              if "pgd_bf16" in med else []),
            row("pgd_graphs_vs_eager", eval_images / med["pgd_ours"], eval_images / med["pgd_eager"])]


def floor_lines(step_flops: float, pgd_flops: float, med: dict, size: BenchSize, eval_images: int) -> list[str]:
    """What the floors say beside the table: FLOPs per image and the rate of the convolutions and matmuls alone
    (`med`: median seconds per step, and per PGD call over `eval_images`, as `_rows` takes them)."""
    return [f"training step: {step_flops / size.batch / 1e9:.2f} GFLOP per image (torch flop counter); its own "
            f"convolutions and matmuls alone run at {step_flops / med['floor'] / 1e9:.0f} GFLOP/s",
            f"PGD-{size.eval_steps} evaluation: {pgd_flops / eval_images / 1e9:.2f} GFLOP per image; hybridat at "
            f"{med['pgd_floor'] / med['pgd_ours']:.2f}x, torchattacks at "
            f"{med['pgd_floor'] / med['pgd_torchattacks']:.2f}x the speed of its convolutions and matmuls alone"]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| comparison | hybridat | theirs | unit | ratio |", "|---|---:|---:|---|---:|"]
    lines += [f"| {r['comparison']} | {r['ours']:.2f} | {r['theirs']:.2f} | {r['unit']} | {r['ratio']:.2f}x |"
              for r in rows]
    return "\n".join(lines)
