"""Hybrid adversarial training: the losses, the step and the epoch loop (SPEC.md "Training").

One step: craft x_adv through the adv branch in eval mode (parameters frozen, so the attack computes input
gradients only), then one fused train-mode forward over cat[x_adv, x] and one backward (`--loss madry` and `clean`
train one branch: one forward of x_adv or x alone, and `clean` crafts nothing).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .attacks import frozen, pgd_unchecked
from .data import Split, train_batches
from .inputs import check_pixel_eps
from .errors import HybridatError, check_choice, check_number
from .graphs import Graphed, graphs_supported
from .models import BranchModel, BranchView, bn_folded, fused
from .norms import NORMS, get_norm
from .runtime import autocast


@dataclass(frozen=True)
class TrainConfig:
    """The paper's protocol by default. eps and step are in pixel units (8 means 8/255)."""

    loss: str = "hybrid"
    eps: float = 8.0
    step: float = 2.0
    steps: int = 10
    epochs: int = 110
    batch_size: int = 128  # per branch, global over all ranks
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clean_weight: float = 0.5  # hybrid: w * CE(clean branch, x) + (1 - w) * CE(adv branch, x_adv)
    trades_beta: float = 6.0
    seed: int = 0
    train_subset: int | None = None
    amp: bool = False  # bf16 autocast in the training step: opt-in, see README (Speed) for the side-by-side run

    def to_dict(self) -> dict:
        return asdict(self)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def trades_kl(logits_adv: torch.Tensor, p_clean: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(p_clean || p_adv) as TRADES' reference code computes it (KLDivLoss(log p_adv, p_clean))."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), p_clean, reduction=reduction)


@dataclass(frozen=True)
class Loss:
    """A training objective: which branches it trains and what the training attack maximizes."""

    branches: tuple[str, ...]
    objective: Callable  # (logits by branch, y, cfg) -> scalar loss
    doc: str


def _hybrid(logits, y, cfg):
    w = cfg.clean_weight
    return w * cross_entropy(logits["clean"], y) + (1 - w) * cross_entropy(logits["adv"], y)


def _trades(logits, y, cfg):
    p_clean = F.softmax(logits["clean"], dim=1)
    return cross_entropy(logits["clean"], y) + cfg.trades_beta * trades_kl(logits["adv"], p_clean)


LOSSES: dict[str, Loss] = {
    "hybrid": Loss(("adv", "clean"), _hybrid, "w*CE(clean branch, x) + (1-w)*CE(adv branch, x_adv)"),
    "madry": Loss(("adv",), lambda lg, y, cfg: cross_entropy(lg["adv"], y), "CE(adv branch, x_adv)"),
    "trades": Loss(("adv", "clean"), _trades, "CE(clean, x) + beta*KL(clean on x || adv on x_adv)"),
    "clean": Loss(("clean",), lambda lg, y, cfg: cross_entropy(lg["clean"], y), "CE(clean branch, x)"),
}


LOSS_WEIGHTS = {"clean_weight": "hybrid", "trades_beta": "trades"}  # the one loss each weight is read by


def loss_weights(loss: str, clean_weight: float | None = None, trades_beta: float | None = None) -> dict:
    """TrainConfig's clean_weight and trades_beta: each one given (not None) only with the loss that reads it (with
    another it would be ignored: `--loss trades --clean-weight 0.3` trained with no clean weight), the defaults
    elsewhere."""
    check_choice(loss, LOSSES, "loss")
    given = {"clean_weight": clean_weight, "trades_beta": trades_beta}
    _refuse_unread_weights(loss, [name for name, value in given.items() if value is not None], "--")
    return {name: getattr(TrainConfig, name) if value is None else value for name, value in given.items()}


def _refuse_unread_weights(loss: str, given: list[str], prefix: str = "") -> None:
    """One line if a weight in `given` belongs to a loss other than `loss` (`prefix` "--" names the flags)."""
    for name in given:
        if LOSS_WEIGHTS[name] != loss:
            flag = prefix + (name.replace("_", "-") if prefix else name)
            raise HybridatError(f"{flag} weighs a term of {prefix}loss {LOSS_WEIGHTS[name]}; {prefix}loss {loss} "
                                f"has none, so it would be ignored")


def check_config(cfg: TrainConfig, norm: str) -> None:
    """Reject impossible settings (NaN and infinity included) before any work is done."""
    if not isinstance(cfg, TrainConfig):
        raise HybridatError(f"the training settings must be a hybridat.train.TrainConfig, got {type(cfg).__name__}")
    check_choice(cfg.loss, LOSSES, "loss")
    if get_norm(norm).needs_both and len(LOSSES[cfg.loss].branches) < 2:
        raise HybridatError(f"norm {norm} mixes both branches in one batch; use --loss hybrid or trades")
    attacked = "adv" in LOSSES[cfg.loss].branches  # only --loss clean crafts no adversarial examples
    check_number("eps", cfg.eps, 0, 255)
    check_number("step", cfg.step, 0, 255, low_open=attacked)  # a step of 0: PGD never leaves its start
    check_pixel_eps(cfg.eps)
    check_pixel_eps(cfg.step, "step")
    check_number("PGD steps", cfg.steps, 1 if attacked else 0, 100_000, integer=True)
    check_number("epochs", cfg.epochs, 1, 100_000, integer=True)
    check_number("batch size", cfg.batch_size, 1, 1 << 20, integer=True)
    check_number("lr", cfg.lr, 0, low_open=True)  # 0: no weight ever moves
    check_number("momentum", cfg.momentum, 0, 1)
    check_number("weight decay", cfg.weight_decay, 0)
    check_number("clean weight", cfg.clean_weight, 0, 1)
    check_number("trades beta", cfg.trades_beta, 0)
    # a weight set away from its default for a loss that never reads it (TrainConfig(trades_beta=3) trained hybrid)
    _refuse_unread_weights(cfg.loss, [name for name in LOSS_WEIGHTS
                                      if getattr(cfg, name) != getattr(TrainConfig, name)])
    check_number("seed", cfg.seed, 0, 2**63 - 1, integer=True)
    if cfg.train_subset is not None:
        check_number("train subset", cfg.train_subset, 1, integer=True)
    if not isinstance(cfg.amp, bool):
        raise HybridatError(f"amp must be true or false, got {cfg.amp!r}")


def craft(model: BranchModel, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The training attack: PGD from x + 0.001*N(0,1) through the adv branch, in eval mode (norms folded into
    their convolutions, the same function with fewer passes)."""
    adv = BranchView(model, "adv")
    loss_fn = None  # cross-entropy
    if cfg.loss == "trades":
        with torch.no_grad(), frozen(model):
            p_clean = F.softmax(model(x, "clean"), dim=1)
        loss_fn = lambda logits, _: trades_kl(logits, p_clean, reduction="sum")  # noqa: E731
    folded_dtype = torch.bfloat16 if torch.is_autocast_enabled(x.device.type) else x.dtype
    with bn_folded(model, "adv", folded_dtype):  # eval mode, one branch: each BN is part of its conv
        return pgd_unchecked(adv, x, y, cfg.eps / 255, cfg.step / 255, cfg.steps, start="normal",
                             loss_fn=loss_fn)  # no host sync: a CUDA graph may hold it


def train_step(net, model: BranchModel, x, y, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """One Hybrid-AT step (no optimizer call). `net` is `model` or its DDP wrapper."""
    spec = LOSSES[cfg.loss]
    with autocast(x.device, cfg.amp):
        x_adv = craft(model, x, y, cfg) if "adv" in spec.branches else None
        if spec.branches == ("adv", "clean"):
            logits_adv, logits_clean = fused(net, x_adv, x)
            logits = {"adv": logits_adv, "clean": logits_clean}
        elif spec.branches == ("adv",):
            logits = {"adv": net(x_adv, "adv")}
        else:
            logits = {"clean": net(x, "clean")}
        logits = {b: v.float() for b, v in logits.items()}  # no-op in fp32; the loss is fp32 under amp
        return spec.objective(logits, y, cfg), logits


def fit_step(net, model: BranchModel, optimizer, x, y, cfg: TrainConfig,
             weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """One full training step, as `train` runs it: attack, fused forward, backward, optimizer step. The gradient is
    that of `weight` * loss (a rank's share of a global batch, see `rank_weight`); the loss returned is unweighted."""
    loss, logits = train_step(net, model, x, y, cfg)
    optimizer.zero_grad(set_to_none=True)
    (loss if weight == 1.0 else loss * weight).backward()
    optimizer.step()
    return loss, logits


def lr_milestones(epochs: int) -> tuple[int, int]:
    """The epochs (0-based) from which the lr is x0.1 and x0.01: the paper's epochs 100 and 105 of 110, counted
    from 1 as the authors' loop counts them (`for epoch in range(1, 111)`, decay `if epoch >= 100`): 99 epochs at
    the full lr, 5 at x0.1, the last 6 at x0.01. Scaled to E epochs.

    Rule: m1 = round(E*99/110) clamped to [1, E-1], so that every run of 2 or more epochs spends at least its
    last epoch at x0.1 (unclamped, 5 epochs would round to 5 and never decay); m2 = max(round(E*104/110), m1 + 1),
    which may equal E (no x0.01 epoch) when the run is too short for both. E = 110 gives (99, 104); 5 gives (4, 5);
    1 gives (1, 2): a one-epoch run never decays.
    """
    m1 = max(1, min(round(epochs * 99 / 110), epochs - 1))
    return m1, max(round(epochs * 104 / 110), m1 + 1)


def lr_factor(epoch: int, epochs: int) -> float:
    """The lr multiplier of 0-based `epoch` in a run of `epochs`: 1, then x0.1 and x0.01 at `lr_milestones`."""
    m1, m2 = lr_milestones(epochs)
    return 0.1 ** ((epoch >= m1) + (epoch >= m2))


def make_optimizer(model: BranchModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class Stepper:
    """`fit_step` plus the epoch's running metric sums (`sums`, on the device), eagerly or as one CUDA graph.

    With graphs, batches of the first batch's size go through static buffers and a captured step (graphs.py): the
    first `warmup` of them run eagerly, the graph is captured again whenever the learning rate has changed, and a
    batch of another size (an epoch's last, partial one) runs eagerly. On a CPU `graphs` takes the same path with
    the step function called in place of a replay."""

    def __init__(self, net, model: BranchModel, optimizer, cfg: TrainConfig, graphs: bool, warmup: int = 3):
        self.net, self.model, self.optimizer, self.cfg = net, model, optimizer, cfg
        device = next(model.parameters()).device
        self.sums = torch.zeros(len(SUMS), device=device)
        self.graph = Graphed(self._static_step, graphs and graphs_supported(device), warmup) if graphs else None
        self.lr = None  # the lr the graph holds

    def _eager(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> None:
        loss, logits = fit_step(self.net, self.model, self.optimizer, x, y, self.cfg, weight)
        self.sums += step_sums(loss, logits, y)

    def _static_step(self) -> None:
        self._eager(self.graph.static["x"], self.graph.static["y"])

    def step(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> None:
        if (self.graph is None or weight != 1.0
                or ("x" in self.graph.static and x.shape != self.graph.static["x"].shape)):
            return self._eager(x, y, weight)
        lr = self.optimizer.param_groups[0]["lr"]
        if lr != self.lr:
            self.graph.invalidate()
            self.lr = lr
        self.graph.run(x=x, y=y)


def train(model: BranchModel, split: Split, cfg: TrainConfig, generator: torch.Generator,
          rank: int = 0, world: int = 1, on_step: Callable | None = None, *, graphs: bool = True,
          start_epoch: int = 0, optimizer: torch.optim.Optimizer | None = None) -> Iterator[dict]:
    """Train for cfg.epochs; yields one metrics row per epoch. `on_step(epoch, step, n_steps, sums)` reports progress.

    graphs: the step as one CUDA graph on a GPU (its CPU stand-in elsewhere); one process only, DDP stays eager.
    Resuming (hybridat.run): `start_epoch` epochs are done already and `optimizer` (from `make_optimizer`, its
    state loaded) goes on from there; the caller restores the generators' states.
    """
    check_config(cfg, model.config.norm)
    net = model
    if world > 1:
        two = NORMS[model.config.norm].branches == 2 and len(LOSSES[cfg.loss].branches) == 1
        net = DistributedDataParallel(model, find_unused_parameters=two)  # one branch leaves the other idle
        # a 1x1 conv weight in channels_last gets a contiguous gradient: the same layout for a (C, C, 1, 1)
        # tensor, but DDP compares strides and warned on every rank of every run (one copy per bucket, no harm)
        warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides", UserWarning)
    optimizer = optimizer or make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e + start_epoch, cfg.epochs))
    stepper = Stepper(net, model, optimizer, cfg, graphs=graphs and world == 1)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        start = time.perf_counter()
        stepper.sums.zero_()
        n_steps = math.ceil(len(split) / cfg.batch_size)
        for i, (x, y) in enumerate(train_batches(split, cfg.batch_size, generator, rank=rank, world_size=world)):
            stepper.step(x, y, rank_weight(len(y), min(cfg.batch_size, len(split) - i * cfg.batch_size), world))
            if on_step is not None:
                on_step(epoch + 1, i + 1, n_steps, stepper.sums)
        if world > 1:  # rank 0's running statistics on every rank, as a resumed run starts from (rank 0 saves them)
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        row = epoch_row(stepper.sums.clone(), world) | {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        row["seconds"] = time.perf_counter() - start
        row["images_per_s"] = row["images"] / row["seconds"]  # training images, each counted once
        schedule.step()
        yield row


def rank_weight(rows: int, global_rows: int, world: int) -> float:
    """The factor on a rank's mean loss that makes DDP's average of the ranks' gradients the gradient of the mean over
    the global batch: rows * world / global_rows, 1 when the batch splits evenly (always in one process). A global
    batch of 5 over 2 ranks is sharded 3 + 2; the ranks' means counted alike weighed a row 1/6 or 1/4, not 1/5."""
    return rows * world / global_rows


SUMS = ("loss*n", "n", "loss_adv*n", "correct_adv", "loss_clean*n", "correct_clean")


def step_sums(loss, logits, y) -> torch.Tensor:
    """One step's contribution to the running sums SUMS, as one device tensor (no host transfer: graph-safe)."""
    n = torch.full((), float(len(y)), device=y.device)
    parts = [loss.detach() * n, n]
    for b in ("adv", "clean"):
        if b in logits:
            parts += [F.cross_entropy(logits[b].detach(), y, reduction="sum"),
                      (logits[b].detach().argmax(1) == y).sum().float()]
        else:
            parts += [torch.full((), float("nan"), device=y.device)] * 2
    return torch.stack(parts)


def summary(sums: torch.Tensor) -> dict[str, float]:
    """Mean loss and per-branch loss and accuracy from the running sums (one host sync)."""
    s = sums.tolist()
    n = s[1]
    return {"images": int(n), "loss": s[0] / n, "loss_adv": s[2] / n, "acc_adv": s[3] / n,
            "loss_clean": s[4] / n, "acc_clean": s[5] / n}


def epoch_row(sums: torch.Tensor, world: int) -> dict[str, float]:
    if world > 1:
        dist.all_reduce(sums)
    return summary(sums)
