"""NS gap and AP gap (SPEC.md "NS gap"): how far apart two data domains' normalization statistics are, layer by
layer, and how far apart the two branches' affine parameters are. Model and data in, tidy rows out; two plots.

Two protocols of the literature (`mode`): "train" reads each norm layer's input with the model in train mode, so
every norm upstream re-centres the batch with its own statistics (the paper authors' momentum-1 copy); "eval" reads
it with forward hooks on the model in eval mode (running NS upstream). The gap is taken against the clean batch's NS
(`reference="batch"`) or against the running NS the checkpoint stores (`reference="running"`, the authors' notebooks).

Any `torch.nn.Module` with BatchNorm layers can be measured: a hybridat model (`model(x, branch)`) through either
branch, any other module (`model(x)`) as one branch, its `nn.BatchNorm*` layers in depth order.

eps and step are in pixel units (8 means 8/255) and are converted where the attack or the noise is made.
Layer indices are positions in `measured_layers(model)` (depth order; `norm_layers` for a hybridat model, as in
`recombine`).
"""

from __future__ import annotations

import copy
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn
from . import mpl  # noqa: F401  (first: a $MPLBACKEND matplotlib refuses is set aside)
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .attacks import frozen, pgd
from .checkpoint import Checkpoint, check_csv_name, rows_frame, training_columns
from .files import as_path, atomic_path, check_outputs
from .errors import HybridatError, check_choice, check_number
from .inputs import check_batch, check_callback, check_flag, check_pixel_radius, check_same_device, module_of
from .models import BranchModel, BranchView, norm_layers
from .norms import BRANCHES, BranchBatchNorm, set_name

DOMAINS = ("clean", "adv", "noise")
NOISES = ("uniform", "gaussian")
MODES = ("train", "eval")  # the model's mode while the NS are read
REFERENCES = ("batch", "running")  # what a domain's NS are compared with: the clean batch's, or the stored ones
SINGLE = "model"  # the `branch` of rows measured on a module that is not a hybridat model (one branch)
PROTOCOL = ("mode", "reference", "noise_clip")  # recorded in every row; `report` never mixes rows that differ in them
PROTOCOL_DEFAULTS = {"mode": "train", "reference": "batch", "noise_clip": True}  # what ns-gap measured before them
# how the noisy and the adversarial domain were made (noise kind; PGD steps, step in pixel units, crafting branch,
# random start):
# recorded in every row, so that `report` never averages rows of different domains (CSVs before them: unknown)
DOMAIN_SETTINGS = ("noise", "steps", "step", "attack_branch", "start")
COLUMNS = ("kind", "layer", "layer_name", "pair", "statistic", "measure", "distance", "fix_ap", "branch", "eps",
           *PROTOCOL, *DOMAIN_SETTINGS)
CHANNEL_COLUMNS = ("layer", "layer_name", "domain", "channel", "mean", "std", "fix_ap", "branch", "eps", *PROTOCOL,
                   *DOMAIN_SETTINGS)
NS_STARTS = ("uniform", "normal")  # PGD's random start in ns-gap (attacks.STARTS less "none")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def branched(model: nn.Module) -> bool:
    """True for a hybridat model, called as model(x, branch); any other module is called as model(x)."""
    return isinstance(model, BranchModel)


def measured_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every norm layer whose input NS are measured, in depth order: a hybridat model's norm
    layers, or any other module's BatchNorm layers (a loaded Checkpoint: its model's)."""
    model = module_of(model)
    if branched(model):
        return norm_layers(model)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BATCH_NORMS)]


def _through(model: nn.Module, branch: str | None) -> nn.Module:
    """x -> logits through `branch` (a hybridat model) or the module itself."""
    return BranchView(model, branch) if branched(model) else model


def running_ns(model: nn.Module, branch: str) -> list[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """(layer index, name, mean (C,), std (C,)) of the running NS each norm layer normalizes `branch` with in eval
    mode, as stored in the checkpoint (std = sqrt(running_var), the unbiased estimate BN keeps)."""
    model = module_of(model)
    out = []
    for i, (name, m) in enumerate(measured_layers(model)):
        if isinstance(m, BranchBatchNorm):
            mean, var = m.running(m.eval_key(branch))
        elif isinstance(m, BATCH_NORMS) and m.running_mean is not None:
            mean, var = m.running_mean, m.running_var
        else:
            raise HybridatError(f"layer {name} keeps no running NS, so there is nothing to compare with: use "
                                f"reference 'batch'")
        out.append((i, name, mean.detach().float(), var.detach().float().sqrt()))
    return out


def perturb(model, x: torch.Tensor, y: torch.Tensor, domain: str, branch: str, eps: float, *,
            step: float | None = None, steps: int = 10, start: str = "uniform", noise: str = "uniform",
            noise_clip: bool = True, generator: torch.Generator | None = None,
            batch_size: int | None = None, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """x (B, 3, H, W) in [0, 1] moved into `domain`: clean = x; adv = L∞ PGD through `branch` in eval mode
    (no trace on the model; step None = ε/4; `batch_size` images at a time, `on_batch`: see `attacks.pgd`), in
    [0, 1]; noise = x + U(-ε, ε), or Gaussian of the same std ε/√3,
    clipped to [0, 1] with noise_clip, else left as drawn (U: in [-ε, 1 + ε], the authors' noise baseline)."""
    check_choice(domain, DOMAINS, "domain")
    check_choice(noise, NOISES, "noise")
    check_number("eps", eps, 0, 255)
    if branched(model):
        check_choice(branch, BRANCHES, "branch")
    if domain == "clean":
        return x
    if domain == "adv":
        step = None if step is None else step / 255
        return pgd(_through(model, branch), x, y, eps / 255, step, steps, start=start, generator=generator,
                   batch_size=batch_size, on_batch=on_batch)
    if noise == "uniform":
        delta = torch.empty_like(x).uniform_(-eps / 255, eps / 255, generator=generator)
    else:
        std = eps / 255 / math.sqrt(3)  # the std of U(-ε, ε)
        delta = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * std
    return (x + delta).clamp(0, 1) if noise_clip else x + delta


def domain_batches(model, x, y, branch: str, eps: float, step: float | None = None, steps: int = 10,
                   noise: str = "uniform", seed: int = 0, noise_clip: bool = True,
                   batch_size: int | None = None, on_batch: Callable[[int], None] | None = None,
                   start: str = "uniform") -> dict[str, torch.Tensor]:
    """{"clean": x, "adv": PGD-`steps` through `branch` (from `start`, see `attacks.pgd`; `batch_size` images at a
    time), "noise": x + noise}, all (B, 3, H, W)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return {d: perturb(model, x, y, d, branch, eps, step=step, steps=steps, start=start, noise=noise,
                       noise_clip=noise_clip, generator=generator, batch_size=batch_size, on_batch=on_batch)
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


def _record(stats: dict, index: int, correction: int, module, inputs) -> None:
    x = inputs[0]  # (N, C, H, W): the norm layer's input
    var, mean = torch.var_mean(x.detach().float(), dim=[0] + list(range(2, x.dim())), correction=correction)
    stats[index] = (mean, var.sqrt())


def batch_ns(model, x: torch.Tensor, branch: str = "adv", mode: str = "train",
             unbiased: bool = False) -> list[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """(layer index, layer name, mean (C,), std (C,)) of every norm layer's input (see `measured_layers`) when x
    goes through `branch` (ignored for a module that is not a hybridat model). mode "train": batch statistics
    upstream, as in training (see `train_pass`); "eval": running NS upstream (forward hooks in eval mode). std is
    the biased one BN divides by, or with `unbiased` the unbiased one (Bessel's correction over the N*H*W values of
    a channel) that BN's running_var keeps, for comparisons with running NS. Batch-independent norms report the
    same per-channel input statistics. The model is not changed (a deep copy runs). Nothing is kept for a backward
    pass: memory is the forward's alone."""
    check_choice(mode, MODES, "mode")
    check_flag(unbiased, "unbiased")
    model = module_of(model)
    if branched(model):
        check_choice(branch, BRANCHES, "branch")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise HybridatError(f"x must be a torch.Tensor (B, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    check_same_device(model, x)
    work = copy.deepcopy(model)
    layers = measured_layers(work)
    if not layers:
        raise HybridatError(f"{type(model).__name__} has no norm layer (BatchNorm) whose statistics could be read")
    stats: dict[int, tuple] = {}
    for i, (_, m) in enumerate(layers):
        m.register_forward_pre_hook(partial(_record, stats, i, int(unbiased)))
    with (train_pass if mode == "train" else frozen)(work), torch.no_grad():  # frozen: eval mode
        _through(work, branch)(x)
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


def pairs(reference: str) -> tuple[tuple[str, str], ...]:
    """The domain pairs of `reference`: adv and noise against the clean batch, or every domain (clean too, the
    baseline of the measurement) against the running NS."""
    check_choice(reference, REFERENCES, "reference")
    return (("adv", "clean"), ("noise", "clean")) if reference == "batch" else tuple((d, "running") for d in
                                                                                      ("adv", "noise", "clean"))


def check_ns_gap(*, eps: float, steps: int = 10, step: float | None = None, noise: str = "uniform",
                 reference: str = "batch", start: str = "uniform", batch_size: int = 512) -> None:
    """`ns_gap`'s settings checked (one line for the first bad one), before any model or data is read. The mode and
    the branch are its callers' to check: the CLI calls the mode --measure, and a one-branch module has no branch."""
    check_choice(noise, NOISES, "noise")
    check_choice(reference, REFERENCES, "reference")
    check_choice(start, NS_STARTS, "start")
    check_pixel_radius(eps)
    check_number("PGD steps", steps, 1, 100_000, integer=True)
    check_number("batch size", batch_size, 1, 1 << 20, integer=True)
    if step is not None:
        check_pixel_radius(step, "step", low_open=True)


def ns_gap(model, x, y, *, eps: float, fix_ap: bool = False, branch: str = "adv", steps: int = 10,
           step: float | None = None, noise: str = "uniform", seed: int = 0, mode: str = "train",
           reference: str = "batch", noise_clip: bool = True, batch_size: int = 512,
           on_batch: Callable[[int], None] | None = None, start: str = "uniform") -> tuple[list[dict], list[dict]]:
    """NS distances per layer between the adv and the noisy version of the batch x (B, 3, H, W) and a reference.

    The adversarial examples are crafted through `branch`. fix_ap: every domain passes through `branch`;
    otherwise each through its own: clean through the clean branch, adv AND noise through the adv branch, so that
    noise-clean carries the same AP difference as adv-clean and the two curves compare (SPEC.md). A module that is
    not a hybridat model has one branch: every domain passes through it (fix_ap holds trivially; branch "model").
    mode: the model's mode while NS are read (`batch_ns`). reference "batch": pairs adv-clean, noise-clean against
    the clean batch's NS (biased stds, as BN divides by); "running": adv-, noise- and clean-running against the
    running NS the clean domain is normalized with in eval mode (with fix_ap: `branch`'s, e.g. for dual-bn through
    adv the running NS of adversarial training data, as the authors' notebooks compared), every batch std then the
    unbiased one, as running_var keeps it (also in the channel rows). noise_clip: see `perturb`. batch_size: PGD
    crafts the adversarial domain that many images at a time (memory; the NS are read over all of x at once), and
    calls on_batch(images crafted so far) after each batch. start: PGD's random start, "uniform" in the ε-ball
    (evaluation protocol) or "normal", x + 0.001·N(0, 1) (the authors' NS figures and the training attack).
    x: float pixels in [0, 1] on the model's device, y: its integer labels (B,); eps, step in pixel units (8 means
    8/255). A loaded Checkpoint may stand for the model.
    Returns (rows in COLUMNS, channel rows in CHANNEL_COLUMNS; domain "running" holds the reference's channels).
    """
    model = module_of(model)
    check_batch(model, x, y)
    check_flag(fix_ap, "fix_ap")
    check_flag(noise_clip, "noise_clip")
    check_callback(on_batch, "on_batch")
    check_choice(mode, MODES, "mode")
    check_ns_gap(eps=eps, steps=steps, step=step, noise=noise, reference=reference, start=start,
                 batch_size=batch_size)
    check_number("seed", seed, 0, 2**63 - 1, integer=True)  # torch's manual_seed failed on 1.5 with a RuntimeError
    single = not branched(model)
    if single:
        fix_ap, branch = True, SINGLE
    else:
        check_choice(branch, BRANCHES, "branch")
    data = domain_batches(model, x, y, branch, eps, step, steps, noise, seed, noise_clip, batch_size, on_batch, start)
    route = {d: branch if fix_ap else ("clean" if d == "clean" else "adv") for d in DOMAINS}
    # against running NS, the unbiased batch std: running_var holds unbiased variances (the authors' momentum-1 copy
    # reads exactly these), and a biased batch std lay sqrt(n/(n-1)) - 1 of the std away from NS set by that batch
    ns = {d: batch_ns(model, data[d], route[d], mode, unbiased=reference == "running") for d in DOMAINS}
    if reference == "running":
        ns["running"] = running_ns(model, route["clean"])
    setting = {"fix_ap": bool(fix_ap), "branch": branch if fix_ap else "own", "eps": eps, "mode": mode,
               "reference": reference, "noise_clip": bool(noise_clip), "noise": noise, "steps": steps,
               "step": eps / 4 if step is None else step, "attack_branch": branch, "start": start}
    rows, channel_rows = [], []
    for layer, name, *_ in ns["clean"]:
        for d1, d2 in pairs(reference):
            (*_, mean1, std1), (*_, mean2, std2) = ns[d1][layer], ns[d2][layer]
            base = {"kind": "ns", "layer": layer, "layer_name": name, "pair": f"{d1}-{d2}"}
            rows += _distance_rows(base, "mean", mean1, mean2) + _distance_rows(base, "std", std1, std2)
        for d in ns:
            _, _, mean, std = ns[d][layer]
            channel_rows += [{"layer": layer, "layer_name": name, "domain": d, "channel": c, "mean": m, "std": s}
                             | setting for c, (m, s) in enumerate(zip(mean.tolist(), std.tolist()))]
    return [{k: r.get(k, setting.get(k)) for k in COLUMNS} for r in rows], channel_rows


def ap_gap(model) -> list[dict]:
    """Distances per layer between the adv and clean AP sets (weight and bias), rows in COLUMNS. A model without
    two AP sets (any module that is not a hybridat model has one) is refused with one line."""
    model = module_of(model)
    rows = []
    for layer, (name, m) in enumerate(measured_layers(model)):
        if len(getattr(m, "ap_keys", ())) != 2:
            continue
        base = {"kind": "ap", "layer": layer, "layer_name": name, "pair": "adv-clean"}
        for stat in ("weight", "bias"):
            a, c = getattr(m, set_name(stat, "adv")), getattr(m, set_name(stat, "clean"))
            rows += _distance_rows(base, stat, a, c)
    if not rows:
        norm = getattr(getattr(model, "config", None), "norm", type(model).__name__)
        raise HybridatError(f"the {norm} model has no two AP sets, so there is no AP gap between its branches")
    return [{k: r.get(k) for k in COLUMNS} for r in rows]  # fix_ap, branch, eps and the protocol stay empty


def _records(rows) -> list[dict]:
    return rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)


def _write_rows(rows: list[dict], tmp: Path) -> None:
    """Rows to a temp file of `write_ns_gap`'s (renamed onto FILE.csv or FILE-channels.csv with the rest)."""
    rows_frame(rows).to_csv(tmp, index=False)


def _save(fig: Figure, path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def protocol_text(mode, reference, noise_clip) -> str:
    """One line that says how NS rows were measured, for plot titles and tables."""
    ref = "the clean batch's NS" if reference == "batch" else "the stored running NS"
    clip = "noise clipped to [0, 1]" if str(noise_clip).lower() in ("true", "1", "1.0") else "noise not clipped"
    return f"NS read in {mode} mode, against {ref}, {clip}"


def _protocol(r: dict) -> tuple:
    return tuple(r.get(k, PROTOCOL_DEFAULTS[k]) for k in PROTOCOL)


def _protocols(records: list[dict]) -> list[tuple]:
    return list(dict.fromkeys(_protocol(r) for r in records if r["kind"] == "ns"))


DOMAIN_COLORS = {"adv": "C3", "noise": "C0", "clean": "0.5", "running": "k"}  # in both plots of ns-gap


def _pair_color(pair: str) -> str:
    return DOMAIN_COLORS.get(pair.split("-")[0], "0.5")


PANEL_TITLES = {"mean": "NS: channel means", "std": "NS: channel stds", "weight": "AP: weight (γ)",
                "bias": "AP: bias (β)"}
MEASURE_NAMES = {"wasserstein": "Wasserstein", "mad": "mean absolute"}


# How a distance-by-depth series is drawn (here and in `report`'s ns-gap.png). Series that coincide (own-branch
# adv-clean and noise-clean often do: the branches' AP gap dominates both) stay visible: the first is drawn wide
# with filled markers, the second narrow with hollow markers on top of it.
FIRST = {"marker": "o", "ms": 5, "lw": 2.6, "zorder": 2}
SECOND = {"marker": "s", "ms": 5, "lw": 1.1, "mfc": "none", "zorder": 3}


def plot_gap_by_depth(rows, path, measure: str = "wasserstein") -> None:
    """`gap_by_depth_figure(rows, measure)` saved to path (PNG)."""
    _save(gap_by_depth_figure(rows, measure), path)


def gap_by_depth_figure(rows, measure: str = "wasserstein") -> Figure:
    """Distance vs layer index, one panel per statistic (NS mean/std, AP weight/bias where present); one line per
    domain pair (adv red and wide, noise blue and clean grey narrow on top: coinciding lines stay visible), solid
    with fixed AP, dashed through each domain's own branch. The protocol (`protocol_text`) is the title, or part of
    each line's label where the rows hold several."""
    check_choice(measure, tuple(MEASURES), "measure")
    records = [r for r in _records(rows) if r["measure"] == measure]
    protocols = _protocols(records)
    lines: dict[str, dict[tuple, list]] = {}  # statistic -> (pair, setting) -> [(layer, distance)]
    for r in records:
        setting = "AP" if r["kind"] == "ap" else (f"fix AP: {r['branch']}" if r["fix_ap"] else "own branch")
        if r["kind"] != "ap" and len(protocols) > 1:
            setting += f"; {protocol_text(*_protocol(r))}"
        points = lines.setdefault(r["statistic"], {}).setdefault((r["pair"], setting), [])
        points.append((r["layer"], r["distance"]))
    if not lines:
        raise HybridatError(f"no {measure} rows to plot")
    stats = [s for s in ("mean", "std", "weight", "bias") if s in lines]
    fig = Figure(figsize=(4.5 * len(stats), 4.2), layout="constrained")
    if len(protocols) == 1:
        fig.suptitle(protocol_text(*protocols[0]), fontsize=9)
    labels = {}
    for ax, stat in zip(fig.subplots(1, len(stats), squeeze=False)[0], stats):
        for (pair, setting), points in sorted(lines[stat].items()):
            layers, dist = zip(*sorted(points))
            style = FIRST if pair.startswith("adv") else SECOND
            line, = ax.plot(layers, dist, "--" if setting.startswith("own branch") else "-", color=_pair_color(pair),
                            **style)
            labels.setdefault("AP gap: adv vs clean branch" if setting == "AP" else f"{pair} ({setting})", line)
        ax.set(title=PANEL_TITLES[stat], xlabel="norm layer (depth)", ylabel=f"{MEASURE_NAMES[measure]} distance")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if all(d > 0 for points in lines[stat].values() for _, d in points):
            ax.set_yscale("log")  # own-branch and fixed-AP gaps lie orders of magnitude apart
    fig.legend(labels.values(), labels.keys(), loc="outside lower center", ncols=min(len(labels), 3), fontsize=7)
    return fig


def check_layer(model, layer: int) -> int:
    """`layer` if it indexes one of the model's measured norm layers (`measured_layers`), else one line."""
    n = len(measured_layers(model))
    check_number("layer", layer, 0, integer=True)
    if layer >= n:
        raise HybridatError(f"layer {layer} is out of range: the model has {n} norm layers (0 to {n - 1})")
    return layer


def plot_channels(channel_rows, layer: int, path) -> None:
    """`channels_figure(channel_rows, layer)` saved to path (PNG)."""
    _save(channels_figure(channel_rows, layer), path)


def channels_figure(channel_rows, layer: int) -> Figure:
    """Per-channel bars of the mean at one layer for each domain (clean grey, adv red, noise blue, as in the depth
    plot, and the running NS black where they are the reference); one panel per setting and protocol."""
    panels: dict[tuple, dict[str, list]] = {}  # (fix_ap, branch, protocol) -> domain -> [(channel, mean)]
    for r in _records(channel_rows):
        if r["layer"] == layer:
            bars = panels.setdefault((r["fix_ap"], r["branch"], _protocol(r)), {}).setdefault(r["domain"], [])
            bars.append((r["channel"], r["mean"]))
    if not panels:
        raise HybridatError(f"no channel statistics for layer {layer}")
    fig = Figure(figsize=(10, 3.2 * len(panels)), layout="constrained")
    for ax, ((fixed, branch, protocol), domains) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0],
                                                         panels.items()):
        present = [d for d in (*DOMAINS, "running") if d in domains]
        width = 0.84 / len(present)
        for k, d in enumerate(present):
            channels, means = zip(*sorted(domains[d]))
            ax.bar([c + (k - (len(present) - 1) / 2) * width for c in channels], means, width=width, label=d,
                   color=DOMAIN_COLORS[d])
        ax.set(title=f"layer {layer}, {'fix AP: ' + branch if fixed else 'own branch'}; {protocol_text(*protocol)}",
               xlabel="channel", ylabel="channel mean of the layer's input")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    return fig


def ns_gap_paths(out) -> list[Path]:
    """The files `write_ns_gap` writes for `out` (FILE.csv): FILE.csv, FILE-channels.csv, FILE-depth.png and
    FILE-channels.png."""
    out = as_path(out, "out")
    stem = out.with_suffix("") if out.suffix else out
    return [out, Path(f"{stem}-channels.csv"), Path(f"{stem}-depth.png"), Path(f"{stem}-channels.png")]


@dataclass
class NSGapFiles:
    rows: list[dict]  # NS-gap rows (and AP-gap rows where the model has two AP sets), as written to FILE.csv
    channels: list[dict]  # per-channel NS, as written to FILE-channels.csv
    paths: list[Path]  # the four files written (`ns_gap_paths`)
    note: str = ""  # why there are no AP-gap rows, where there are none


def write_ns_gap(ckpt: Checkpoint, x, y, out, *, eps: float, layer: int | None = None, **settings) -> NSGapFiles:
    """What `hybridat ns-gap` does with a loaded checkpoint and its test images x, y: `ns_gap(ckpt.model, x, y,
    eps=eps, **settings)` (fix_ap, branch, steps, step, start, noise, seed, mode, reference, noise_clip,
    batch_size, on_batch), the AP gap where the model has two AP sets (recorded with the protocol, so that
    `report` sets it beside the NS gap), every row with the checkpoint's ids and training columns, as `report`
    reads them; then FILE.csv, FILE-channels.csv and the plots FILE-depth.png and FILE-channels.png (the channels
    of `layer`, default the last), all four atomically, none over the checkpoint. Every output is checked before any
    work."""
    if not isinstance(ckpt, Checkpoint):
        raise HybridatError(f"ckpt must be a hybridat Checkpoint (hybridat.load_checkpoint(path)), got "
                            f"{type(ckpt).__name__}")
    paths = check_outputs(ns_gap_paths(out), [ckpt.path])
    check_csv_name(paths[0])
    ckpt.check_unchanged()  # the rows name it by its file's hash
    if layer is not None:
        check_layer(ckpt.model, layer)
    rows, channels = ns_gap(ckpt.model, x, y, eps=eps, **settings)
    protocol = {k: rows[0][k] for k in (*PROTOCOL, *DOMAIN_SETTINGS)}
    note = ""
    try:  # the AP gap does not depend on the protocol; recorded with it, it sits next to the NS gap in `report`
        rows += [r | protocol for r in ap_gap(ckpt.model)]
    except HybridatError as e:
        note = str(e)
    ids = ({"run": ckpt.run} | ckpt.row_ids() | {"unfinished": ckpt.unfinished}
           | training_columns(ckpt.train))
    layer = max(r["layer"] for r in channels) if layer is None else layer
    with ExitStack() as stack:  # all four to temp files, then renamed: a failure leaves an earlier set whole
        tmp = [stack.enter_context(atomic_path(p)) for p in paths]
        plot_gap_by_depth(rows, tmp[2])
        plot_channels(channels, layer, tmp[3])
        rows, channels = [ids | r for r in rows], [ids | r for r in channels]
        _write_rows(channels, tmp[1])
        _write_rows(rows, tmp[0])
    return NSGapFiles(rows, channels, paths, note)
