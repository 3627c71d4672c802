"""NS gap and AP gap (SPEC.md "NS gap"): how far apart two data domains' normalization statistics are, layer by
layer, and how far apart the two branches' affine parameters are. Model and data in, tidy rows out; two plots.

eps and step are in pixel units (8 means 8/255) and are converted where the attack or the noise is made.
Layer indices are positions in `norm_layers(model)` (depth order), as in `recombine`.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from functools import partial

import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .attacks import pgd
from .files import atomic_path
from .errors import HybridatError, check_choice, check_number
from .models import BranchView, norm_layers
from .norms import BRANCHES, BranchBatchNorm, set_name

DOMAINS = ("clean", "adv", "noise")
NOISES = ("uniform", "gaussian")
PAIRS = (("adv", "clean"), ("noise", "clean"))
COLUMNS = ("kind", "layer", "layer_name", "pair", "statistic", "measure", "distance", "fix_ap", "branch", "eps")
CHANNEL_COLUMNS = ("layer", "layer_name", "domain", "channel", "mean", "std", "fix_ap", "branch", "eps")


def perturb(model, x: torch.Tensor, y: torch.Tensor, domain: str, branch: str, eps: float, *,
            step: float | None = None, steps: int = 10, start: str = "uniform", noise: str = "uniform",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """x (B, 3, H, W) in [0, 1] moved into `domain`: clean = x; adv = L∞ PGD through `branch` in eval mode
    (no trace on the model; step None = ε/4); noise = x + U(-ε, ε), or Gaussian of the same std ε/√3; in [0, 1]."""
    check_choice(domain, DOMAINS, "domain")
    check_choice(noise, NOISES, "noise")
    check_number("eps", eps, 0, 255)
    if domain == "clean":
        return x
    if domain == "adv":
        step = None if step is None else step / 255
        return pgd(BranchView(model, check_choice(branch, BRANCHES, "branch")), x, y, eps / 255, step, steps,
                   start=start, generator=generator)
    if noise == "uniform":
        delta = torch.empty_like(x).uniform_(-eps / 255, eps / 255, generator=generator)
    else:
        std = eps / 255 / math.sqrt(3)  # the std of U(-ε, ε)
        delta = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * std
    return (x + delta).clamp(0, 1)


def domain_batches(model, x, y, branch: str, eps: float, step: float | None = None, steps: int = 10,
                   noise: str = "uniform", seed: int = 0) -> dict[str, torch.Tensor]:
    """{"clean": x, "adv": PGD-`steps` through `branch` (uniform start), "noise": x + noise}, all (B, 3, H, W)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return {d: perturb(model, x, y, d, branch, eps, step=step, steps=steps, noise=noise, generator=generator)
            for d in DOMAINS}


@contextmanager
def train_pass(model):
    """Train mode for a measurement pass through ONE branch; every module's mode is restored afterwards.

    The Cross-BN variants normalize rows with ONE domain's (or the other branch's) batch in training, which a
    one-domain batch may not have; here their layers normalize the rows with their own batch statistics, as every
    other BN variant does.
    """
    modes = [(m, m.training) for m in model.modules()]
    cross = [(m, m.batch_ns) for m in model.modules()
             if isinstance(m, BranchBatchNorm) and m.batch_ns not in ("own", "mixed")]
    model.train()
    for m, _ in cross:
        m.batch_ns = "own"
    try:
        yield model
    finally:
        for m, batch in cross:
            m.batch_ns = batch
        for m, training in modes:
            m.training = training


def _record(stats: dict, index: int, module, inputs) -> None:
    x = inputs[0]  # (N, C, H, W): the norm layer's input
    var, mean = torch.var_mean(x.detach().float(), dim=[0] + list(range(2, x.dim())), correction=0)
    stats[index] = (mean, var.sqrt())


@torch.no_grad()
def batch_ns(model, x: torch.Tensor, branch: str) -> list[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """(layer index, layer name, mean (C,), std (C,)) of every norm layer's input when x goes through `branch` in
    train mode (batch statistics upstream, as in training; see `train_pass`). std is the biased one BN divides by.
    Batch-independent norms report the same per-channel input statistics. The model is not changed (a deep copy
    runs)."""
    check_choice(branch, BRANCHES, "branch")
    work = copy.deepcopy(model)
    layers = norm_layers(work)
    stats: dict[int, tuple] = {}
    for i, (_, m) in enumerate(layers):
        m.register_forward_pre_hook(partial(_record, stats, i))
    with train_pass(work):
        work(x, branch)
    return [(i, name, *stats[i]) for i, (name, _) in enumerate(layers)]


def _vector(a) -> torch.Tensor:
    return torch.as_tensor(a).detach().flatten().double().cpu()


def wasserstein_1d(a, b) -> float:
    """1-D Wasserstein distance between the empirical distributions of two equally long vectors' values."""
    a, b = _vector(a), _vector(b)
    if a.numel() != b.numel() or a.numel() == 0:
        raise HybridatError(f"wasserstein_1d needs two non-empty vectors of equal length, got {a.numel()}, {b.numel()}")
    return (a.sort().values - b.sort().values).abs().mean().item()


def mad(a, b) -> float:
    """Mean absolute difference, channel by channel."""
    a, b = _vector(a), _vector(b)
    if a.numel() != b.numel() or a.numel() == 0:
        raise HybridatError(f"mad needs two non-empty vectors of equal length, got {a.numel()}, {b.numel()}")
    return (a - b).abs().mean().item()


MEASURES = {"wasserstein": wasserstein_1d, "mad": mad}


def _distance_rows(base: dict, statistic: str, a, b) -> list[dict]:
    return [base | {"statistic": statistic, "measure": m, "distance": fn(a, b)} for m, fn in MEASURES.items()]


def ns_gap(model, x, y, *, eps: float, fix_ap: bool, branch: str = "adv", steps: int = 10,
           step: float | None = None, noise: str = "uniform", seed: int = 0) -> tuple[list[dict], list[dict]]:
    """NS distances per layer between adv and clean, and noise and clean, versions of the batch x (B, 3, H, W).

    The adversarial examples are crafted through `branch`. fix_ap: every domain passes through `branch`;
    otherwise each through its own: clean through the clean branch, adv AND noise through the adv branch, so that
    noise-clean carries the same AP difference as adv-clean and the two curves compare (SPEC.md). Returns
    (rows in COLUMNS, channel rows in CHANNEL_COLUMNS); `branch` is "own" in the rows when fix_ap is off.
    """
    check_choice(branch, BRANCHES, "branch")
    check_choice(noise, NOISES, "noise")
    check_number("eps", eps, 0, 255)
    check_number("steps", steps, 0, 100_000, integer=True)
    if step is not None:
        check_number("step", step, 0, 255, low_open=True)
    data = domain_batches(model, x, y, branch, eps, step, steps, noise, seed)
    route = {d: branch if fix_ap else ("clean" if d == "clean" else "adv") for d in DOMAINS}
    ns = {d: batch_ns(model, data[d], route[d]) for d in DOMAINS}
    setting = {"fix_ap": bool(fix_ap), "branch": branch if fix_ap else "own", "eps": eps}
    rows, channel_rows = [], []
    for layer, name, *_ in ns["clean"]:
        for d1, d2 in PAIRS:
            (*_, mean1, std1), (*_, mean2, std2) = ns[d1][layer], ns[d2][layer]
            base = {"kind": "ns", "layer": layer, "layer_name": name, "pair": f"{d1}-{d2}"}
            rows += _distance_rows(base, "mean", mean1, mean2) + _distance_rows(base, "std", std1, std2)
        for d in DOMAINS:
            _, _, mean, std = ns[d][layer]
            channel_rows += [{"layer": layer, "layer_name": name, "domain": d, "channel": c, "mean": m, "std": s}
                             | setting for c, (m, s) in enumerate(zip(mean.tolist(), std.tolist()))]
    return [{k: r.get(k, setting.get(k)) for k in COLUMNS} for r in rows], channel_rows


def ap_gap(model) -> list[dict]:
    """Distances per layer between the adv and clean AP sets (weight and bias), rows in COLUMNS."""
    rows = []
    for layer, (name, m) in enumerate(norm_layers(model)):
        if len(m.ap_keys) != 2:
            continue
        base = {"kind": "ap", "layer": layer, "layer_name": name, "pair": "adv-clean"}
        for stat in ("weight", "bias"):
            a, c = getattr(m, set_name(stat, "adv")), getattr(m, set_name(stat, "clean"))
            rows += _distance_rows(base, stat, a, c)
    if not rows:
        norm = getattr(getattr(model, "config", None), "norm", "this")
        raise HybridatError(f"the {norm} model has no two AP sets, so there is no AP gap between its branches")
    return [{k: r.get(k) for k in COLUMNS} for r in rows]  # fix_ap, branch, eps stay empty


def _records(rows) -> list[dict]:
    return rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)


def _save(fig: Figure, path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def plot_gap_by_depth(rows, path, measure: str = "wasserstein") -> None:
    """Distance vs layer index, one panel per statistic (NS mean/std, AP weight/bias where present); adv–clean
    and noise–clean lines, solid with fixed AP, dashed through each domain's own branch."""
    check_choice(measure, tuple(MEASURES), "measure")
    lines: dict[str, dict[tuple, list]] = {}  # statistic -> (pair, setting) -> [(layer, distance)]
    for r in _records(rows):
        if r["measure"] == measure:
            setting = "AP" if r["kind"] == "ap" else (f"fix AP: {r['branch']}" if r["fix_ap"] else "own branch")
            points = lines.setdefault(r["statistic"], {}).setdefault((r["pair"], setting), [])
            points.append((r["layer"], r["distance"]))
    if not lines:
        raise HybridatError(f"no {measure} rows to plot")
    stats = [s for s in ("mean", "std", "weight", "bias") if s in lines]
    fig = Figure(figsize=(4.5 * len(stats), 3.5), layout="constrained")
    for ax, stat in zip(fig.subplots(1, len(stats), squeeze=False)[0], stats):
        for (pair, setting), points in sorted(lines[stat].items()):
            layers, dist = zip(*sorted(points))
            style = "--" if setting == "own branch" else "-"
            ax.plot(layers, dist, style, marker="o", ms=3, color="C3" if pair == "adv-clean" else "C0",
                    label=f"{pair} ({setting})")
        ax.set(title=f"{stat}", xlabel="norm layer (depth)", ylabel=f"{measure} distance")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_channels(channel_rows, layer: int, path) -> None:
    """Per-channel bars of the batch mean at one layer for clean, adv and noise; one panel per setting."""
    panels: dict[tuple, dict[str, list]] = {}  # (fix_ap, branch) -> domain -> [(channel, mean)]
    for r in _records(channel_rows):
        if r["layer"] == layer:
            bars = panels.setdefault((r["fix_ap"], r["branch"]), {}).setdefault(r["domain"], [])
            bars.append((r["channel"], r["mean"]))
    if not panels:
        raise HybridatError(f"no channel statistics for layer {layer}")
    fig = Figure(figsize=(10, 3 * len(panels)), layout="constrained")
    for ax, ((fixed, branch), domains) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels.items()):
        for k, d in enumerate(x for x in DOMAINS if x in domains):
            channels, means = zip(*sorted(domains[d]))
            ax.bar([c + (k - 1) * 0.28 for c in channels], means, width=0.28, label=d)
        ax.set(title=f"layer {layer}, {'fix AP: ' + branch if fixed else 'own branch'}", xlabel="channel",
               ylabel="batch mean")
        ax.legend(fontsize=7)
    _save(fig, path)
