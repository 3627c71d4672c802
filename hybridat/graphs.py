"""Whole-step CUDA graphs: the training step and PGD evaluation, each replayed as one graph on a GPU.

A Hybrid-AT step at batch 128 is ~25 forward/backward passes of a small network: thousands of short kernels, so
an eager GPU waits on Python's launches (an H100 ran the eager step at half the speed of the same step captured).
A graph records the kernels once and replays them with one launch. What a graph needs, and how it gets it here:
- fixed shapes and addresses: inputs are copied into static buffers; a batch of another size (the last, partial
  batch of an epoch) runs eagerly on the same model, so every image is trained on exactly as in eager mode;
- a fixed learning rate: SGD's lr is a constant inside the graph, so the step is captured again when it changes
  (twice per run with the paper's schedule);
- warm-up before capture (cuDNN's algorithm search, the optimizer's momentum buffers): the first steps run
  eagerly on a side stream; they are real training steps, not extra ones;
- random numbers: the training attack's start draws from the default CUDA generator, which graphs advance at
  every replay exactly as eager calls would, so graph and eager runs draw the same numbers.
Everything here also runs on a CPU with `capture=False`: the same buffers and bookkeeping, calling the step
function eagerly in place of a replay, which is what CI tests.
"""

from __future__ import annotations

from typing import Callable

import torch


def graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


class Graphed:
    """`fn()` as one CUDA graph over static input buffers, captured on demand.

    `run(**inputs)` copies the inputs into `static` (allocated at the first call), then runs `fn()`: the first
    `warmup` calls eagerly (`warm_up`), later ones by replaying the graph, captured at the first of them.
    `invalidate()` makes the next replay capture again (after a change the graph cannot see, such as a new learning
    rate). With capture=False every call runs `fn()` eagerly: the CPU stand-in of a replay."""

    def __init__(self, fn: Callable[[], None], capture: bool, warmup: int = 1):
        self.fn, self.capture, self.warmup, self.graph = fn, capture, warmup, None
        self.static: dict[str, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # re-captures reuse one memory pool

    def invalidate(self) -> None:
        self.graph = None

    def run(self, **inputs: torch.Tensor) -> None:
        for name, value in inputs.items():
            if name not in self.static:
                self.static[name] = torch.empty_like(value)
            self.static[name].copy_(value)
        if self.warmup > 0:  # real work, eagerly: cuDNN's search, lazily made state (momentum buffers)
            self.warmup -= 1
            return warm_up(self.fn, self.capture)
        if not self.capture:
            return self.fn()
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.fn()
        self.graph.replay()


def warm_up(fn: Callable[[], None], capture: bool) -> None:
    """Run `fn()` once eagerly, on a side stream where graphs will follow (as torch.cuda.graph's docs ask)."""
    if not capture:
        fn()
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
