"""The `hybridat` command line: wires flags to library calls, nothing more."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .attacks import ATTACKS
from .checkpoint import load_checkpoint, save_checkpoint, training_columns, write_csv
from .data import DATASETS, load_split, num_classes, to_float
from .errors import HybridatError
from .evaluate import attack_label, evaluate
from .models import ARCHS, ModelConfig, build_model
from .norms import NORMS
from .runtime import resolve_device, tune_host
from .train import LOSSES, TrainConfig, check_config, summary, train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hybrid adversarial training and the analysis of Dual BN.")
console = Console(stderr=True)


def _choices(name: str, keys) -> type[Enum]:
    return Enum(name, {k: k for k in keys}, type=str)


Norm, Arch, Loss, Dataset = (_choices(n, r) for n, r in
                             [("Norm", NORMS), ("Arch", ARCHS), ("Loss", LOSSES), ("Dataset", DATASETS)])
Attack = _choices("Attack", ATTACKS)
AAVersion = _choices("AAVersion", ("standard", "plus", "rand"))
Branch = _choices("Branch", ("adv", "clean"))

DataDir = Annotated[Optional[Path], typer.Option(help="folder holding cifar-10-batches-py/ "
                                                      "[default: $HYBRIDAT_DATA_DIR or ./data]")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")]
Eps = Annotated[float, typer.Option(help="L-inf radius in pixel units (8 = 8/255)")]
Seed = Annotated[int, typer.Option(help="seed of weights, data order, augmentation and attack noise")]
Ckpt = Annotated[Path, typer.Argument(help="a hybridat .safetensors checkpoint")]


def cli_errors(fn):
    """Bad input ends in one line on stderr and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HybridatError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _device(name: str) -> torch.device:
    """The device asked for, with this process's speed settings for it (threads, allocator, cuDNN)."""
    device = resolve_device(name)
    tune_host(device)
    return device


def _split_for(ckpt, data_dir: Path | None, *, train: bool, n: int | None = None, dataset: str | None = None):
    """A split of the dataset the checkpoint was trained on (unless given), on the checkpoint's device."""
    name = dataset or (ckpt.meta("train") or {}).get("dataset", "cifar10")
    return load_split(name, train=train, data_dir=data_dir, device=next(ckpt.model.parameters()).device, n=n)


def _progress(quiet: bool) -> Progress:
    return Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), TextColumn("step {task.completed}/"
                    "{task.total}"), TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                    console=console, disable=quiet)


@app.command("train")
@cli_errors
def train_cmd(
    out: Annotated[Path, typer.Option(help="run folder: model.safetensors when done (last.safetensors after each epoch), train.csv")],
    norm: Annotated[Norm, typer.Option(help="normalization variant (SPEC.md)")] = "dual-bn",
    loss: Annotated[Loss, typer.Option(help="training objective")] = "hybrid",
    arch: Annotated[Arch, typer.Option()] = "resnet18",
    width: Annotated[float, typer.Option(help="channel multiplier (1 = the paper's)")] = 1.0,
    dataset: Annotated[Dataset, typer.Option()] = "cifar10",
    data_dir: DataDir = None,
    eps: Eps = 8.0,
    step: Annotated[float, typer.Option(help="training PGD step in pixel units")] = 2.0,
    steps: Annotated[int, typer.Option(help="training PGD steps")] = 10,
    epochs: Annotated[int, typer.Option(help="lr x0.1 at 100/110 and x0.01 at 105/110 of them (short runs: the "
                                             "first decay no later than the last epoch)")] = 110,
    batch_size: Annotated[int, typer.Option(help="images per branch per step (all GPUs together)")] = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    clean_weight: Annotated[float, typer.Option(help="hybrid loss weight of the clean branch")] = 0.5,
    trades_beta: float = 6.0,
    train_subset: Annotated[Optional[int], typer.Option(help="train on the first N images only")] = None,
    seed: Seed = 0,
    device: DeviceOpt = "auto",
    amp: Annotated[bool, typer.Option(help="bf16 autocast in the training step (norm statistics, weights and the "
                   "perturbation stay fp32); about 1.9x faster where bf16 is native, see README (Speed)")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
):
    """Train a model under Hybrid-AT with any normalization variant."""
    from .runtime import init_distributed, is_main_process, seed_everything

    dev = _device(device)
    cfg = TrainConfig(loss=loss.value, eps=eps, step=step, steps=steps, epochs=epochs, batch_size=batch_size,
                      lr=lr, weight_decay=weight_decay, clean_weight=clean_weight, trades_beta=trades_beta,
                      seed=seed, train_subset=train_subset, amp=amp)
    check_config(cfg, norm.value)
    rank, world = init_distributed(dev)
    generator = seed_everything(seed)
    split = load_split(dataset.value, train=True, data_dir=data_dir, device=dev, n=train_subset)
    config = ModelConfig(arch.value, norm.value, width, num_classes(dataset.value))
    model = build_model(config).to(dev)
    meta = {"train": cfg.to_dict() | {"dataset": dataset.value}, "seed": str(seed), "run": out.name}
    rows, main = [], is_main_process()
    with _progress(quiet or not main) as progress:
        task = progress.add_task("train", total=None, epoch=0, stats="")

        def on_step(epoch, i, n, sums):
            if i % 10 == 0 or i == n:  # a host sync, so not every step
                s = summary(sums)
                progress.update(task, epoch=f"{epoch}/{epochs}", completed=i, total=n, stats=f"loss {s['loss']:.3f}  acc adv "
                                f"{s['acc_adv']:.3f} clean {s['acc_clean']:.3f}  "
                                f"{s['images'] / (time.perf_counter() - t0):.0f} img/s")

        t0 = time.perf_counter()
        for row in train(model, split, cfg, generator, rank, world, on_step):
            t0 = time.perf_counter()
            diverged = not math.isfinite(row["loss"])  # the same on every rank: the row is all-reduced
            if main:
                # each epoch goes to last.safetensors; model.safetensors appears only when training is complete,
                # so an interrupted run never looks finished to make
                digest = "" if diverged else save_checkpoint(model, out / "last.safetensors", **meta,
                                                             epoch=str(row["epoch"]))
                rows.append({"run": out.name, "seed": seed, "norm": norm.value, "arch": arch.value, "width": width,
                             "loss_name": loss.value, "eps": eps, "checkpoint_hash": digest}
                            | training_columns(meta["train"]) | row)
                write_csv(rows, out / "train.csv")
            if diverged:
                why = NORMS[norm.value].diverges
                raise HybridatError(f"training diverged: loss {row['loss']} in epoch {row['epoch']}"
                                    f"{f' ({why})' if why else ''}; {out / 'train.csv'} has every epoch, "
                                    "no checkpoint was written for this one")
    if main:
        os.replace(out / "last.safetensors", out / "model.safetensors")
        last = rows[-1]
        console.print(f"{out}/model.safetensors  epoch {last['epoch']}  acc adv {last['acc_adv']:.3f} "
                      f"clean {last['acc_clean']:.3f}  {last['images_per_s']:.0f} img/s", highlight=False)


@app.command("attack")
@cli_errors
def attack_cmd(
    checkpoint: Ckpt,
    out: Annotated[Path, typer.Option(help="tidy CSV, one row per (branch, attack, steps)")],
    attack: Annotated[list[Attack], typer.Option(help="repeatable")] = ["clean", "pgd"],
    steps: Annotated[list[int], typer.Option(help="PGD steps, repeatable (10 and 20 = two rows)")] = [10],
    eps: Eps = 8.0,
    step: Annotated[Optional[float], typer.Option(help="PGD step in pixel units [default: eps/4]")] = None,
    branch: Annotated[Optional[list[Branch]], typer.Option(help="repeatable [default: both]")] = None,
    n: Annotated[Optional[int], typer.Option(help="evaluate the first N test images [default: all]")] = None,
    batch_size: int = 500,
    aa_version: Annotated[AAVersion, typer.Option(help="AutoAttack version (reference implementation)")]
    = "standard",
    dataset: Annotated[Optional[Dataset], typer.Option(help="[default: the one it was trained on]")] = None,
    data_dir: DataDir = None,
    seed: Seed = 0,
    device: DeviceOpt = "auto",
):
    """Evaluate a checkpoint per branch: clean, FGSM, PGD, AutoAttack accuracy."""
    ckpt = load_checkpoint(checkpoint, _device(device))
    split = _split_for(ckpt, data_dir, train=False, n=n, dataset=dataset and dataset.value)
    branches = [b.value for b in branch] if branch else ["adv", "clean"]
    rows = evaluate(ckpt, split, [a.value for a in attack], branches, eps=eps, step=step, steps=steps,
                    batch_size=batch_size, seed=seed, aa_version=aa_version.value, on_row=_print_row)
    write_csv(rows, out)


def _print_row(row: dict) -> None:
    label = attack_label(row["attack"], row["steps"])
    console.print(f"  {row['branch']:5s} {label:8s} acc {row['accuracy']:.4f}  ({row['seconds']:.1f} s)",
                  highlight=False)


def _mapping(pairs: list[str] | None, flag: str) -> dict[str, str]:
    """['adv=clean'] -> {'adv': 'clean'}: the target branch takes the source branch's set."""
    mapping = {}
    for pair in pairs or []:
        target, _, source = pair.partition("=")
        if not source:
            raise HybridatError(f"{flag} takes BRANCH=SOURCE (e.g. adv=clean), got {pair!r}")
        mapping[target] = source
    return mapping


@app.command("swap-bn")
@cli_errors
def swap_bn_cmd(
    checkpoint: Ckpt,
    out: Annotated[Path, typer.Option(help="the NEW checkpoint (never the input)")],
    cross: Annotated[bool, typer.Option("--cross", help="each branch keeps its AP, takes the other's NS")] = False,
    swap_ap: Annotated[bool, typer.Option("--swap-ap", help="each branch keeps its NS, takes the other's AP")] = False,
    ns: Annotated[Optional[list[str]], typer.Option(help="general form: BRANCH=SOURCE NS, e.g. adv=clean")] = None,
    ap: Annotated[Optional[list[str]], typer.Option(help="general form: BRANCH=SOURCE AP, e.g. clean=adv")] = None,
    from_layer: Annotated[Optional[int], typer.Option(help="only norm layers with index >= K (0 = first)")] = None,
    reestimate: Annotated[Optional[str], typer.Option(help="recompute --branch's running NS on clean, adv "
                                                            "or noise training data")] = None,
    branch: Annotated[Branch, typer.Option(help="the branch whose NS --reestimate recomputes")] = "adv",
    n: Annotated[int, typer.Option(help="--reestimate: training images in the pass")] = 10000,
    eps: Eps = 8.0,
    step: Annotated[float, typer.Option(help="--reestimate adv: PGD step in pixel units")] = 2.0,
    steps: Annotated[int, typer.Option(help="--reestimate adv: PGD steps")] = 10,
    batch_size: int = 128,
    data_dir: DataDir = None,
    seed: Seed = 0,
    device: DeviceOpt = "auto",
):
    """Recombine a two-branch checkpoint's NS and AP at test time; writes a new checkpoint."""
    from .recombine import cross as cross_fn, deeper_than, recombine, reestimate as reestimate_fn, save_derived

    chosen = [name for name, on in [("--cross", cross), ("--swap-ap", swap_ap), ("--ns/--ap", ns or ap),
                                    ("--reestimate", reestimate)] if on]
    if len(chosen) != 1:
        raise HybridatError("give exactly one of --cross, --swap-ap, --ns/--ap, --reestimate")
    ckpt = load_checkpoint(checkpoint, _device(device))
    layers = None if from_layer is None else deeper_than(ckpt.model, from_layer)
    op = {"op": {"--ns/--ap": "recombine"}.get(chosen[0], chosen[0].lstrip("-")), "layers": layers}
    if cross:
        new = cross_fn(ckpt.model, layers)
    elif swap_ap or ns or ap:
        mapping = {"ns": _mapping(ns, "--ns"), "ap": _mapping(ap, "--ap" if ap else "--swap-ap")}
        if swap_ap:
            mapping["ap"] = {"adv": "clean", "clean": "adv"}
        new = recombine(ckpt.model, layers=layers, **mapping)
        op |= mapping if not swap_ap else {}
    else:
        split = _split_for(ckpt, data_dir, train=True)
        new = reestimate_fn(ckpt.model, branch.value, reestimate, split, batch_size=batch_size, n_images=n,
                            eps=eps, step=step, steps=steps, seed=seed, layers=layers)
        op |= {"branch": branch.value, "domain": reestimate, "n_images": n, "eps": eps, "seed": seed}
        if reestimate == "adv":
            op |= {"step": step, "steps": steps}
        if NORMS[ckpt.config.norm].ns_sets == 1:
            console.print(f"note: {ckpt.config.norm} has one NS set, so both branches read the new statistics")
    digest = save_derived(ckpt, new, out, {k: v for k, v in op.items() if v is not None})
    console.print(f"{out}  {op['op']}  parent {ckpt.hash} -> {digest}", highlight=False)


@app.command("ns-gap")
@cli_errors
def ns_gap_cmd(
    checkpoint: Ckpt,
    out: Annotated[Path, typer.Option(help="tidy CSV; FILE-channels.csv and FILE-*.png are written beside it")],
    fix_ap: Annotated[bool, typer.Option("--fix-ap", help="all domains through the same branch (same AP)")] = False,
    branch: Annotated[Branch, typer.Option(help="branch of the PGD examples, and of every domain with --fix-ap")]
    = "adv",
    eps: Eps = 16.0,
    steps: Annotated[int, typer.Option(help="PGD steps of the adversarial domain")] = 10,
    n: Annotated[int, typer.Option(help="test images in the batch")] = 512,
    noise: Annotated[str, typer.Option(help="uniform U(-eps, eps) or gaussian of the same std")] = "uniform",
    layer: Annotated[Optional[int], typer.Option(help="layer of the per-channel plot [default: the last]")] = None,
    data_dir: DataDir = None,
    seed: Seed = 0,
    device: DeviceOpt = "auto",
):
    """Per-layer NS distance between adversarial, noisy and clean versions of the same test images."""
    from .analysis import ap_gap, ns_gap, plot_channels, plot_gap_by_depth

    ckpt = load_checkpoint(checkpoint, _device(device))
    split = _split_for(ckpt, data_dir, train=False, n=n)
    rows, channels = ns_gap(ckpt.model, to_float(split.images), split.labels, eps=eps, fix_ap=fix_ap,
                            branch=branch.value, steps=steps, noise=noise, seed=seed)
    try:
        rows += ap_gap(ckpt.model)
    except HybridatError as e:
        console.print(f"note: no AP gap ({e})", highlight=False)
    train = ckpt.meta("train") or {}
    ids = {"run": ckpt.header.get("run", ""), "seed": ckpt.meta("seed", ""), "norm": ckpt.config.norm,
           "checkpoint_hash": ckpt.hash, "parent_hash": ckpt.header.get("parent", ""),
           "operation": ckpt.header.get("operation", ""), "arch": ckpt.config.arch, "width": ckpt.config.width,
           "loss_name": train.get("loss", ""), "train_eps": train.get("eps", "")} | training_columns(train)
    stem = out.with_suffix("")
    layer = max(r["layer"] for r in channels) if layer is None else layer
    plot_gap_by_depth(rows, f"{stem}-depth.png")
    plot_channels(channels, layer, f"{stem}-channels.png")
    write_csv([ids | r for r in channels], f"{stem}-channels.csv")
    write_csv([ids | r for r in rows], out)
    console.print(f"{out}: {len(rows)} rows; plots {stem}-depth.png, {stem}-channels.png", highlight=False)


@app.command("report")
@cli_errors
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="CSV files or folders searched for them")],
    out: Annotated[Path, typer.Option(help="folder for the tables (.md, .tex, .csv), report.md and plots")],
    margin: Annotated[float, typer.Option(min=0, help="Findings: accuracies within this many percentage points "
                                                       "count as comparable")] = 2.0,
    ratio_margin: Annotated[float, typer.Option(min=1, help="Findings: NS gaps within this factor count as "
                                                             "comparable")] = 1.5,
):
    """The paper's claims checked against the rows (Findings), SPEC.md's five tables (mean ± std over seeds) and
    figures, from tidy CSVs; never recomputes anything. Prints the findings and where the tables and figures are."""
    from .report import load_runs, write_report

    frames = load_runs(runs)
    written = write_report(frames, out, margin=margin, ratio_margin=ratio_margin)
    typer.echo((out / "summary.txt").read_text(encoding="utf-8"), nl=False)
    console.print(f"{len(written)} files in {out}", highlight=False)


@app.command("bench")
@cli_errors
def bench_cmd(
    out: Annotated[Optional[Path], typer.Option(help="CSV: comparison, ours, theirs, unit, ratio, device")] = None,
    quick: Annotated[bool, typer.Option(help="batch 32 instead of 128: under 3 minutes on a 2-core CPU")] = False,
    amp: Annotated[bool, typer.Option(help="time hybridat's step with `train --amp` (bf16 autocast)")] = False,
    rounds: Annotated[Optional[int], typer.Option(min=1, help="interleaved rounds [default: 3]")] = None,
    ablate: Annotated[bool, typer.Option(help="also time our step with each speed technique turned off")] = False,
    device: DeviceOpt = "auto",
):
    """Time hybridat's Hybrid-AT step and PGD-20 evaluation against a reference step, the FLOP floor and
    torchattacks, in one run; print the ratios (how many times faster hybridat is)."""
    from .bench import run_bench

    run_bench(device, quick=quick, out=out, console=Console(), amp=amp, rounds=rounds, ablate=ablate)


@app.command("info")
@cli_errors
def info_cmd(checkpoint: Ckpt):
    """Print a checkpoint's config, branches and metadata."""
    ckpt = load_checkpoint(checkpoint)
    spec = NORMS[ckpt.config.norm]
    table = Table(title=str(checkpoint), show_header=False)
    table.add_row("hash", ckpt.hash)
    for key, value in vars(ckpt.config).items():
        table.add_row(key, str(value))
    table.add_row("branches", "adv, clean" if spec.branches == 2 else "one network for both")
    table.add_row("NS sets / AP sets", f"{spec.ns_sets} / {spec.ap_sets}")
    table.add_row("parameters", f"{sum(p.numel() for p in ckpt.model.parameters()):,}")
    for key, value in sorted(ckpt.header.items()):
        if key not in ("config", "format"):
            table.add_row(key, value)
    Console().print(table)


def main() -> None:  # console-script entry point
    sys.exit(app())
