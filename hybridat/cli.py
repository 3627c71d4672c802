"""The `hybridat` command line: wires flags to library calls, nothing more."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional


def _parallel_make() -> bool:
    """Whether this process is a recipe of `make -jN` (N > 1): GNU make passes -jN to recipes in MAKEFLAGS."""
    return any(f.startswith("-j") and f != "-j1" for f in os.environ.get("MAKEFLAGS", "").split())


# Under `make -j`, set before torch loads its OpenMP runtime (libgomp reads it once, then): a thread that waits for
# the others at the end of a parallel region sleeps instead of spinning. Spinning threads of processes that share
# the cores take them from the very threads they wait for, at each of a step's thousands of small parallel regions:
# `make -j2` of two demo-size trainings (1,000 images) on this 2-core CPU took 79 s and 136 s, 8 s with PASSIVE.
# Alone, PASSIVE costs a third of the speed (540 -> 335 images/s), so a run outside `make -j` keeps libgomp's
# default (README, Speed). A policy in the environment is kept.
if _parallel_make():
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from safetensors import SafetensorError

from . import __version__
from .attacks import AA_ATTACKS, AA_VERSIONS, ATTACKS
from .checkpoint import check_checkpoint_name, check_csv_name, checkpoint_info, load_checkpoint, write_csv
from .data import DATASETS, check_classes, load_split, num_classes, split_files, to_float
from .errors import HybridatError, check_choice, check_number
from .evaluate import attack_label, check_evaluation, evaluate
from .files import Terminated, check_outputs, os_error_line, signals_interrupt
from .interop import LAYOUTS, PLAIN
from .models import ARCHS, ModelConfig
from .norms import BRANCHES, NORMS
from .runtime import bf16_note, exit_process, resolve_device, tune_host
from .train import LOSSES, TrainConfig, loss_weights, summary

# typer vendors click; its usage errors (an unknown command or flag, a value of the wrong type, a missing argument)
# derive from click's ClickException, reached here through the public typer.BadParameter
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineUsageErrors(TyperGroup):
    """A usage error ends as every other bad input does: one line on stderr and exit code 1 (not click's boxed
    message and exit code 2). `hybridat` alone still prints the help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except USAGE_ERROR as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # the help is printed already
                sys.exit(0)
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            error_line(f"{e.format_message()}{hint}")
            sys.exit(1)
        except typer.Abort:
            error_line("aborted")
            sys.exit(1)
        if code == 130:  # typer's answer to Ctrl-C before a command's own handler (cli_errors) was in place
            error_line("interrupted before the command began; nothing was written")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hybrid adversarial training and the analysis of Dual BN: train, then attack, swap-bn and "
                       "ns-gap on its checkpoint, then report on their CSVs (README: Stages). Pixels are in [0, 1]; "
                       "eps and PGD step sizes are in 1/255 (--eps 8 = 8/255) on every command and in every CSV.")
console = Console(stderr=True)


def _print_version(show: bool) -> None:
    if show:
        typer.echo(f"hybridat {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _app_options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                       help="print hybridat's, torch's and Python's versions")]
                 = False) -> None:
    """No options of its own beyond --version: each command takes its own."""


def command(name: str):
    """app.command, with the docstring's first paragraph on one line as the command's help in `hybridat --help`:
    typer's listing keeps a docstring's line breaks, which broke lines there mid-sentence."""
    def register(function):
        first = inspect.cleandoc(function.__doc__ or "").split("\n\n")[0]
        return app.command(name, short_help=" ".join(first.split()))(function)
    return register


def _names(keys) -> str:
    return ", ".join(keys)


def _path(value) -> Path:
    """A path flag's or argument's value. An empty one (an unset shell variable: --out "$DIR") is refused: Typer
    would read it as '.', and a report, a training run or a dataset download would land in the current folder."""
    if isinstance(value, str) and not value:
        raise typer.BadParameter("the path is empty")
    return Path(value)


def _path_option(**kwargs):  # metavar: what a plain Path flag shows in --help (an argument's would replace its name)
    return typer.Option(parser=_path, metavar="<path>", **kwargs)


def _path_argument(**kwargs):
    return typer.Argument(parser=_path, **kwargs)


# choices are plain strings checked by the library (an unknown name: one line, exit 1, the valid names listed)
Norm = Annotated[str, typer.Option(help=f"normalization variant (README: Normalization variants): {_names(NORMS)}")]
Arch = Annotated[str, typer.Option(help=_names(ARCHS))]
Loss = Annotated[str, typer.Option(help=f"training objective: {_names(LOSSES)}")]
Dataset = Annotated[str, typer.Option(help=_names(DATASETS))]
DataDir = Annotated[Optional[Path], _path_option(help="folder holding cifar-10-batches-py/ (cifar-100-python/, "
                                                      "SVHN's .mat files); a missing dataset is downloaded into it",
                                                 show_default="$HYBRIDAT_DATA_DIR or ./data")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")]
Graphs = Annotated[bool, typer.Option(help="on a GPU, run each training step (attack + update) as one CUDA graph "
                                            "(--no-graphs: eager)")]
Eps = Annotated[float, typer.Option(help="L-inf radius in pixel units (8 = 8/255)")]
Seed = Annotated[int, typer.Option(help="seed of weights, data order, augmentation and attack noise")]
EvalSeed = Annotated[int, typer.Option(help="seed of PGD's random start (batch i: seed + i) and of AutoAttack; "
                                            "recorded as eval_seed")]
Ckpt = Annotated[Path, _path_argument(help="a hybridat .safetensors checkpoint")]


def error_line(message: str) -> None:
    """`error: message` on stderr as one line; the message is never read as rich markup."""
    console.print(Text.assemble(("error:", "red"), " ", message.replace("\n", " ")), highlight=False,
                  soft_wrap=True)


def say(message: str) -> None:
    """A line of user text (paths, metadata) on stderr, never read as rich markup."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _out_of_memory(command: str) -> str:
    batched = {"attack_cmd": "--batch-size", "ns_gap_cmd": "--batch-size or --n", "train_cmd": "--batch-size",
               "swap_bn_cmd": "--batch-size"}
    return "out of memory" + (f"; a smaller {batched[command]} needs less" if command in batched else "")


def cli_errors(fn):
    """Bad input, an OS error (read-only folder, disk full, ...), SIGINT or SIGTERM end in one line on stderr and
    exit code 1, never a traceback; SIGTERM runs every cleanup (temp files, locks) as SIGINT does."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with signals_interrupt():
                return fn(*args, **kwargs)
        except HybridatError as e:
            error_line(str(e))
        except OSError as e:
            error_line(os_error_line(e))
        except SafetensorError as e:
            error_line(f"could not read or write a safetensors file ({e})")
        except (MemoryError, torch.OutOfMemoryError):
            error_line(_out_of_memory(fn.__name__))
        except RuntimeError as e:  # torch's CPU allocator has no exception type of its own, only this message
            if "can't allocate memory" not in str(e):
                raise
            error_line(_out_of_memory(fn.__name__))
        except (KeyboardInterrupt, Terminated):
            resume = " (--resume goes on from the last epoch)" if fn.__name__ == "train_cmd" else ""
            error_line(f"interrupted; no half-written file was left{resume}")
        raise typer.Exit(1)

    return wrapper


def _device(name: str) -> torch.device:
    """The device asked for, with this process's speed settings for it (threads, allocator, cuDNN)."""
    device = resolve_device(name)
    tune_host(device)
    return device


def _dataset_of(ckpt, dataset: str | None = None) -> str:
    """The dataset asked for, else the one the checkpoint was trained on; one with as many classes as the model."""
    return check_classes(check_choice(dataset or ckpt.train.get("dataset", "cifar10"), DATASETS, "dataset"),
                         ckpt.config.num_classes)


def _split_for(ckpt, data_dir: Path | None, *, train: bool, n: int | None = None, dataset: str | None = None):
    """A split of the dataset the checkpoint was trained on (unless given), on the checkpoint's device."""
    return load_split(_dataset_of(ckpt, dataset), train=train, data_dir=data_dir,
                      device=next(ckpt.model.parameters()).device, n=n)


def _load(path: Path, device: str):
    """The checkpoint, refused if its weights are not finite; a warning line if its run was not finished."""
    ckpt = load_checkpoint(path, _device(device))
    if ckpt.unfinished:
        say(f"warning: {path} is an unfinished run's checkpoint (epoch {ckpt.meta('epoch')} of "
            f"{ckpt.train.get('epochs')}); its rows are marked unfinished")
    return ckpt


def _acc(value) -> str:
    """A training accuracy; "—" for a branch the loss does not train (--loss clean, madry), never "nan"."""
    return "—" if value is None or value != value else f"{value:.3f}"


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ImagesBar:
    """A progress bar per measurement that goes batch by batch ("adv PGD-10  ━━━━  1000/10000 images  0:01:02  ETA
    0:09:18"), shown while it runs on a terminal and then removed (the result lines stay); nothing in a log file.
    Use as `on_batch(what, done, total)` inside `with`."""

    def __init__(self):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} "
                            "images"), TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), console=console,
                            transient=True, disable=not console.is_terminal)  # a log file: not even an empty line
        self.tasks: dict[str, tuple] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        if what not in self.tasks:
            for task, _ in self.tasks.values():
                self.bar.update(task, visible=False)
            self.tasks[what] = (self.bar.add_task(what, total=total, eta=""), time.perf_counter())
            if not self.bar.live.is_started:
                self.bar.start()
        task, t0 = self.tasks[what]
        left = (time.perf_counter() - t0) / done * (total - done) if done else None
        self.bar.update(task, completed=done, eta="" if left is None else f"ETA {_eta(left)}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar.live.is_started:  # stopping a bar that never started prints an empty line
            self.bar.stop()


def _progress(quiet: bool) -> Progress:
    # one text column after a short bar: in an 80-column terminal only its tail (img/s) is cut, never the epoch,
    # step or ETA (rich squeezes every column of several)
    return Progress(BarColumn(bar_width=10), TextColumn("[bold]epoch {task.fields[epoch]}[/] step {task.completed}/"
                    "{task.total}  {task.fields[stats]}"), console=console, disable=quiet)


@command("train")
@cli_errors
def train_cmd(
    out: Annotated[Path, _path_option(help="run folder: model.safetensors when done (last.safetensors and a resume "
                                           "state after each epoch), train.csv")],
    norm: Norm = "dual-bn",
    loss: Loss = "hybrid",
    arch: Arch = "resnet18",
    width: Annotated[float, typer.Option(help="channel multiplier (1 = the paper's)")] = 1.0,
    dataset: Dataset = "cifar10",
    data_dir: DataDir = None,
    eps: Eps = 8.0,
    step: Annotated[float, typer.Option(help="training PGD step in pixel units (2 = 2/255)")] = 2.0,
    steps: Annotated[int, typer.Option(help="training PGD steps (start x + 0.001 N(0, 1), through the adv "
                                            "branch in eval mode)")] = 10,
    epochs: Annotated[int, typer.Option(help="training epochs; the lr drops x0.1 at 100/110 of them and x0.01 at "
                                             "105/110 (a short run: the first drop by its last epoch)")] = 110,
    batch_size: Annotated[int, typer.Option(help="images per branch per step (all GPUs together)")] = 128,
    lr: Annotated[float, typer.Option(help="SGD learning rate (momentum 0.9)")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="SGD weight decay, on every parameter")] = 5e-4,
    clean_weight: Annotated[Optional[float], typer.Option(help="--loss hybrid: w in w CE(clean branch, x) + (1 - w) "
                                                              "CE(adv branch, x_adv)", show_default="0.5")] = None,
    trades_beta: Annotated[Optional[float], typer.Option(help="--loss trades: weight of the KL term",
                                                         show_default="6.0")] = None,
    train_subset: Annotated[Optional[int], typer.Option(help="train on the first N training images only",
                                                        show_default="all")] = None,
    seed: Seed = 0,
    device: DeviceOpt = "auto",
    amp: Annotated[bool, typer.Option(help="bf16 autocast in the training step (norm statistics, weights and the "
                   "perturbation stay fp32); about 1.9x faster where bf16 is native, see README (Speed)")] = False,
    graphs: Graphs = True,
    resume: Annotated[bool, typer.Option(help="go on with the unfinished run in --out (same settings); a folder "
                                              "without one starts afresh")] = False,
    overwrite: Annotated[bool, typer.Option(help="start over in --out: replace a finished or unfinished run, or one "
                                                 "of other settings (its own files, once the first epoch is done); "
                                                 "other files there stay")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
):
    """Train a model under Hybrid-AT with any normalization variant; --resume goes on after an interruption."""
    from .run import run_training

    check_choice(dataset, DATASETS, "dataset")
    check_choice(arch, ARCHS, "arch")
    check_choice(norm, NORMS, "norm")
    cfg = TrainConfig(loss=loss, eps=eps, step=step, steps=steps, epochs=epochs, batch_size=batch_size,
                      lr=lr, weight_decay=weight_decay, seed=seed, train_subset=train_subset, amp=amp,
                      **loss_weights(loss, clean_weight, trades_beta))
    config = ModelConfig(arch, norm, width, num_classes(dataset)).check()
    quiet = quiet or os.environ.get("RANK", "0") != "0"  # rank 0 only; no progress: no host sync every 10 steps
    # started at the first step, so that every check (and its one-line error) comes first
    progress = _progress(quiet)
    task = progress.add_task("train", total=None, epoch=0, stats="")
    # where the pace counts from: the end of the run's first step (before it: reading the data, building the model,
    # cuDNN's search; counted in, they made the first epoch's ETA several times too long), then each epoch's start
    clock: dict = {}
    dev = _device(device)
    # said at the first step, once every check has passed; by rank 0 only
    note = bf16_note(dev) if amp and os.environ.get("RANK", "0") == "0" else None

    def on_step(epoch, i, n, sums):
        nonlocal note
        if note:
            say(note)
            note = None
        if quiet:
            return
        if not progress.live.is_started:
            progress.start()
        if i == 1 or i % 10 == 0 or i == n:  # a host sync, so not every step; a full-width step can take a minute
            s, now = summary(sums), time.perf_counter()
            if not clock:
                clock.update(t=now, step=i, images=s["images"])
            steps, spent = i - clock["step"], now - clock["t"]
            pace = f"ETA {_eta(spent / steps * (n - i + (epochs - epoch) * n))}  " if steps else "ETA -  "
            speed = f"  {(s['images'] - clock['images']) / spent:.0f} img/s" if steps else ""
            progress.update(task, epoch=f"{epoch}/{epochs}", completed=i, total=n, stats=f"{pace}loss "
                            f"{s['loss']:.3f}  acc adv {_acc(s['acc_adv'])} clean {_acc(s['acc_clean'])}{speed}")

    def on_epoch(row):
        clock.update(t=time.perf_counter(), step=0, images=0)

    try:
        result = run_training(out, config, cfg, dataset=dataset, data_dir=data_dir, device=dev,
                              resume=resume, overwrite=overwrite, on_step=on_step if not quiet or note else None,
                              on_epoch=on_epoch, graphs=graphs)
    finally:
        if progress.live.is_started:  # stopping a bar that never started prints an empty line
            progress.stop()
    if result.rows:
        last = result.rows[-1]
        resumed = f"  (resumed after epoch {result.resumed_from})" if result.resumed_from else ""
        say(f"{result.model_path}  epoch {last['epoch']}  acc adv {_acc(last['acc_adv'])} clean "
            f"{_acc(last['acc_clean'])}  {last['images_per_s']:.0f} img/s{resumed}")


@command("attack")
@cli_errors
def attack_cmd(
    checkpoint: Ckpt,
    out: Annotated[Path, _path_option(help="tidy CSV, one row per (branch, attack, steps)")],
    attack: Annotated[list[str], typer.Option(help=f"repeatable: {_names(ATTACKS)}")] = ["clean", "pgd"],
    steps: Annotated[Optional[list[int]], typer.Option(help="PGD steps, repeatable (10 and 20 = two rows); FGSM "
                                                            "is one step of eps", show_default="10")] = None,
    eps: Annotated[Optional[float], typer.Option(help="L-inf radius in pixel units (8 = 8/255) of FGSM, PGD and "
                                                     "AutoAttack", show_default="8")] = None,
    step: Annotated[Optional[float], typer.Option(help="PGD step in pixel units (report's PGD-k cells are eps/4 "
                                                       "only)", show_default="eps/4")] = None,
    branch: Annotated[Optional[list[str]], typer.Option(help="adv or clean, repeatable (a one-branch model is "
                                                             "measured once, its rows under each branch asked)",
                                                        show_default="both")] = None,
    n: Annotated[Optional[int], typer.Option(help="evaluate the first N test images", show_default="all")] = None,
    batch_size: Annotated[int, typer.Option(help="images per attack batch (memory)")] = 500,
    aa_version: Annotated[Optional[str], typer.Option(help=f"AutoAttack version: {_names(AA_VERSIONS)}",
                                                      show_default="standard")] = None,
    aa_attacks: Annotated[Optional[str], typer.Option(
        help=f"AutoAttack's attacks to run, comma-separated, in order: any of {_names(AA_ATTACKS)} (1 restart "
             "unless --aa-restarts); instead of --aa-version")] = None,
    aa_restarts: Annotated[Optional[int], typer.Option(
        help="restarts of apgd-ce, apgd-dlr and fab", show_default="1; plus: 5")] = None,
    dataset: Annotated[Optional[str], typer.Option(help=_names(DATASETS),
                                                   show_default="the one it was trained on")] = None,
    data_dir: DataDir = None,
    seed: EvalSeed = 0,
    device: DeviceOpt = "auto",
    graphs: Annotated[bool, typer.Option(help="on a GPU, run each PGD batch as one CUDA graph (--no-graphs: "
                                              "eager)")] = True,
    amp: Annotated[bool, typer.Option(help="craft FGSM and PGD examples in bf16 (autocast, norms folded into their "
                                           "convolutions) for speed; accuracy is still counted in fp32, rows say "
                                           "bf16, and AutoAttack stays fp32. Not the paper's protocol")] = False,
):
    """Evaluate a checkpoint per branch: clean, FGSM, PGD, AutoAttack accuracy."""
    branches = branch or ["adv", "clean"]
    evaluate_args = dict(eps=eps, step=step, steps=steps, batch_size=batch_size, seed=seed, aa_version=aa_version,
                         aa_attacks=aa_attacks, aa_restarts=aa_restarts, amp=amp)
    check_evaluation(attack, branches, **evaluate_args)  # every option, before any work
    if dataset is not None:
        check_choice(dataset, DATASETS, "dataset")
    if n is not None:
        check_number("n", n, 1, integer=True)
    check_outputs([out], [checkpoint])
    ckpt = _load(checkpoint, device)
    check_outputs([out], [checkpoint, *split_files(_dataset_of(ckpt, dataset), False, data_dir)])
    check_csv_name(out)
    split = _split_for(ckpt, data_dir, train=False, n=n, dataset=dataset)
    if amp and (note := bf16_note(split.images.device)):
        say(note)
    with ImagesBar() as bar:
        rows = evaluate(ckpt, split, attack, branches, **evaluate_args, on_row=_print_row, graphs=graphs,
                        on_batch=bar)
    write_csv(rows, out)


def _print_row(row: dict) -> None:
    label = attack_label(row["attack"], row["steps"], row["aa_attacks"] or "", row["aa_restarts"],
                         row["attack_precision"])
    say(f"  {row['branch']:5s} {label:8s} acc {row['accuracy']:.4f}  ({row['seconds']:.1f} s)")


def _mapping(pairs: list[str] | None, flag: str) -> dict[str, str]:
    """['adv=clean'] -> {'adv': 'clean'}: the target branch takes the source branch's set."""
    mapping = {}
    for pair in pairs or []:
        target, _, source = pair.partition("=")
        if not source:
            raise HybridatError(f"{flag} takes BRANCH=SOURCE (e.g. adv=clean), got {pair!r}")
        target, source = check_choice(target, BRANCHES, "branch"), check_choice(source, BRANCHES, "branch")
        if mapping.get(target, source) != source:  # the later one silently won
            raise HybridatError(f"{flag} gives branch {target} two sources ({target}={mapping[target]}, "
                                f"{target}={source}); give each branch once")
        mapping[target] = source
    return mapping


@command("swap-bn")
@cli_errors
def swap_bn_cmd(
    checkpoint: Ckpt,
    out: Annotated[Path, _path_option(help="the NEW checkpoint (never the input)")],
    cross: Annotated[bool, typer.Option("--cross", help="each branch keeps its AP, takes the other's NS")] = False,
    swap_ap: Annotated[bool, typer.Option("--swap-ap", help="each branch keeps its NS, takes the other's AP")] = False,
    ns: Annotated[Optional[list[str]], typer.Option(help="general form, repeatable: BRANCH=SOURCE, BRANCH reads "
                                                         "SOURCE's running NS, e.g. adv=clean")] = None,
    ap: Annotated[Optional[list[str]], typer.Option(help="general form, repeatable: BRANCH=SOURCE, BRANCH uses "
                                                         "SOURCE's AP, e.g. clean=adv")] = None,
    from_layer: Annotated[Optional[int], typer.Option(help="only norm layers K and deeper (depth order, 0 = first, "
                                                           "as ns-gap's layer column)", show_default="all")] = None,
    reestimate: Annotated[Optional[str], typer.Option(help="recompute --branch's running NS from one pass in train "
                                                            "mode over the first --n augmented training images as "
                                                            "they are (clean), PGD examples as in training crafted "
                                                            "through --branch (adv), or x + U(-eps, eps) (noise)")]
    = None,
    branch: Annotated[Optional[str], typer.Option(help="--reestimate: adv or clean, the branch whose NS it "
                                                       "recomputes", show_default="adv")] = None,
    n: Annotated[Optional[int], typer.Option(help="--reestimate: the first N training images, one pass",
                                             show_default="10000")] = None,
    eps: Annotated[Optional[float], typer.Option(help="--reestimate adv or noise: L-inf radius in pixel units",
                                                 show_default="8.0")] = None,
    step: Annotated[Optional[float], typer.Option(help="--reestimate adv: PGD step in pixel units",
                                                  show_default="2.0")] = None,
    steps: Annotated[Optional[int], typer.Option(help="--reestimate adv: PGD steps", show_default="10")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="--reestimate: images per batch",
                                                      show_default="128")] = None,
    data_dir: DataDir = None,
    seed: Annotated[Optional[int], typer.Option(help="--reestimate: seed of data order, augmentation and attack "
                                                     "noise", show_default="0")] = None,
    device: DeviceOpt = "auto",
):
    """Recombine a two-branch checkpoint's NS and AP at test time, or re-estimate a branch's running NS (any batch-norm
    checkpoint); writes a new checkpoint."""
    from .analysis import DOMAINS
    from .recombine import check_reestimate, swap_bn

    chosen = [name for name, on in [("--cross", cross), ("--swap-ap", swap_ap), ("--ns/--ap", ns or ap),
                                    ("--reestimate", reestimate is not None)] if on]  # "" is given, too
    if len(chosen) != 1:
        raise HybridatError("give exactly one of --cross, --swap-ap, --ns/--ap, --reestimate")
    pass_flags = {"--branch": branch, "--n": n, "--eps": eps, "--step": step, "--steps": steps,
                  "--batch-size": batch_size, "--seed": seed, "--data-dir": data_dir}
    if reestimate is None and (given := [flag for flag, value in pass_flags.items() if value is not None]):
        several = len(given) > 1
        raise HybridatError(f"{', '.join(given)} only appl{'y' if several else 'ies'} to --reestimate; {chosen[0]} "
                            f"does not use {'them' if several else 'it'} (one branch only: --ns/--ap BRANCH=SOURCE)")
    defaults = {"branch": "adv", "n": 10000, "eps": 8.0, "step": 2.0, "steps": 10, "batch_size": 128, "seed": 0}
    branch, n, eps, step, steps, batch_size, seed = (default if value is None else value for value, default in zip(
        (branch, n, eps, step, steps, batch_size, seed), defaults.values()))
    if reestimate is not None:
        check_choice(reestimate, DOMAINS, "--reestimate domain")
        check_reestimate(branch, reestimate, eps=eps, step=step, steps=steps, batch_size=batch_size, seed=seed,
                         n_images=n, given=[flag.lstrip("-") for flag, value in pass_flags.items()
                                            if value is not None])
    if from_layer is not None:
        check_number("from layer", from_layer, 0, integer=True)
    mapping = {"ns": _mapping(ns, "--ns"), "ap": _mapping(ap, "--ap")}
    check_outputs([out], [checkpoint])
    check_checkpoint_name(out)
    ckpt = _load(checkpoint, device)
    split = None
    if reestimate is not None:
        check_outputs([out], [checkpoint, *split_files(_dataset_of(ckpt), True, data_dir)])
        split = _split_for(ckpt, data_dir, train=True, n=n)  # the first n only: what the pass reads
    with ImagesBar() as bar:
        progress = functools.partial(bar, f"{branch} NS on {reestimate} images", total=min(n, len(split or [])))
        digest = swap_bn(ckpt, out, cross=cross, swap_ap=swap_ap, ns=mapping["ns"] if ns or ap else None,
                         ap=mapping["ap"] if ns or ap else None, from_layer=from_layer, reestimate=reestimate,
                         split=split, branch=branch, n_images=n, eps=eps, step=step, steps=steps,
                         batch_size=batch_size, seed=seed, on_batch=progress)
    if reestimate is not None and NORMS[ckpt.config.norm].ns_sets == 1:
        say(f"note: {ckpt.config.norm} has one NS set, so both branches read the new statistics")
    op = {"--ns/--ap": "recombine"}.get(chosen[0], chosen[0].lstrip("-"))
    say(f"{out}  {op}  parent {ckpt.hash} -> {digest}")


@command("ns-gap")
@cli_errors
def ns_gap_cmd(
    checkpoint: Ckpt,
    out: Annotated[Path, _path_option(help="tidy CSV; FILE-channels.csv and FILE-*.png are written beside it")],
    fix_ap: Annotated[bool, typer.Option("--fix-ap", help="all domains through --branch (one AP: the paper's "
                                                          "protocol); without it each through its own branch (adv "
                                                          "and noise: adv; clean: clean), as earlier work")] = False,
    branch: Annotated[str, typer.Option(help="adv or clean: branch of the PGD examples, and of every domain with "
                                             "--fix-ap")] = "adv",
    eps: Annotated[float, typer.Option(help="L-inf radius of the adversarial and noisy domains in pixel units "
                                            "(16 = 16/255)")] = 16.0,
    steps: Annotated[int, typer.Option(help="PGD steps of the adversarial domain")] = 10,
    step: Annotated[Optional[float], typer.Option(help="PGD step of the adversarial domain in pixel units (the "
                                                       "authors' figures: 2)", show_default="eps/4")] = None,
    n: Annotated[int, typer.Option(help="the first N test images; each domain's NS are read over all N at once")]
    = 512,
    batch_size: Annotated[int, typer.Option(help="PGD crafts the adversarial images this many at a time (memory); "
                                                 "the NS are still read over all N")] = 512,
    start: Annotated[str, typer.Option(help="PGD's random start: uniform in the eps-ball, or normal: x + "
                                             "0.001 N(0, 1) (the authors' figures)")] = "uniform",
    noise: Annotated[str, typer.Option(help="uniform U(-eps, eps) or gaussian of the same std")] = "uniform",
    noise_clip: Annotated[bool, typer.Option(help="clip the noisy images to [0, 1] (the authors' noise baseline "
                                                  "does not)")] = True,
    measure: Annotated[str, typer.Option(help="train: read NS in train mode, batch NS upstream (the authors' "
                                              "momentum-1 protocol); eval: forward hooks in eval mode, running NS "
                                              "upstream (CSV column: mode)")] = "train",
    reference: Annotated[str, typer.Option(help="batch: each domain against the clean batch's NS; running: against "
                                                "the checkpoint's running NS (the authors' notebooks)")] = "batch",
    layer: Annotated[Optional[int], typer.Option(help="norm layer whose channels FILE-channels.png shows (0 = "
                                                      "first)", show_default="the last")] = None,
    data_dir: DataDir = None,
    seed: Annotated[int, typer.Option(help="seed of PGD's random start and of the noise")] = 0,
    device: DeviceOpt = "auto",
):
    """Per-layer NS distance between adversarial, noisy and clean versions of the same test images."""
    from .analysis import MODES, check_layer, check_ns_gap, ns_gap_paths, write_ns_gap

    check_choice(branch, BRANCHES, "branch")
    check_choice(measure, MODES, "measure")
    check_ns_gap(eps=eps, steps=steps, step=step, noise=noise, reference=reference, start=start,
                 batch_size=batch_size)
    check_number("n", n, 1, integer=True)
    check_number("seed", seed, 0, 2**63 - 1, integer=True)
    if layer is not None:
        check_number("layer", layer, 0, integer=True)
    outputs = ns_gap_paths(out)
    check_outputs(outputs, [checkpoint])
    ckpt = _load(checkpoint, device)
    if layer is not None:
        check_layer(ckpt.model, layer)
    check_outputs(outputs, [checkpoint, *split_files(_dataset_of(ckpt), False, data_dir)])
    check_csv_name(out)
    split = _split_for(ckpt, data_dir, train=False, n=n)
    with ImagesBar() as bar:
        progress = functools.partial(bar, f"PGD-{steps} through {branch}", total=len(split))
        progress(0)
        done = write_ns_gap(ckpt, to_float(split.images), split.labels, out, eps=eps, layer=layer, fix_ap=fix_ap,
                            branch=branch, steps=steps, step=step, noise=noise, seed=seed, mode=measure,
                            reference=reference, noise_clip=noise_clip, batch_size=batch_size, on_batch=progress,
                            start=start)
    if done.note:
        say(f"note: no AP gap ({done.note})")
    say(f"{out}: {len(done.rows)} rows; plots {outputs[2]}, {outputs[3]}")


@command("report")
@cli_errors
def report_cmd(
    runs: Annotated[list[Path], _path_argument(help="eval, train and ns-gap CSVs, or folders searched for them "
                                                    "recursively (other CSVs there are skipped)")],
    out: Annotated[Path, _path_option(help="folder for report.md, the findings and the five tables (.md, .tex, "
                                           ".csv each), summary.txt and the figures")],
    margin: Annotated[float, typer.Option(help="Findings: accuracies within this many percentage points "
                                                       "count as comparable")] = 2.0,
    ratio_margin: Annotated[float, typer.Option(help="Findings: NS gaps within this factor count as "
                                                             "comparable")] = 1.5,
):
    """The paper's claims checked against the rows (Findings), its five tables (mean ± std over seeds) and
    figures, from tidy CSVs; never recomputes anything. Prints the findings and where the tables and figures are."""
    from .report import check_report_out, load_runs, write_report

    check_number("margin", margin, 0, 100)  # percentage points: two accuracies are never more than 100 apart
    check_number("ratio margin", ratio_margin, 1)
    check_report_out(out, [r for r in runs if not r.is_dir()])
    sources: list[Path] = []
    frames = load_runs(runs, sources)
    written = write_report(frames, out, margin=margin, ratio_margin=ratio_margin, inputs=sources)
    typer.echo((out / "summary.txt").read_text(encoding="utf-8"), nl=False)
    say(f"{len(written)} files in {out}")


@command("bench")
@cli_errors
def bench_cmd(
    out: Annotated[Optional[Path], _path_option(help="CSV: comparison, ours, theirs, unit, ratio, device")] = None,
    quick: Annotated[bool, typer.Option(help="batch 32 instead of 128: 3 to 8 minutes on a 2-core CPU")] = False,
    amp: Annotated[bool, typer.Option(help="time hybridat's step with `train --amp` (bf16 autocast); on a CPU "
                                      "without native bf16, also the bf16 PGD row (left out there otherwise)")] = False,
    rounds: Annotated[Optional[int], typer.Option(help="interleaved rounds, >= 1", show_default="3")] = None,
    ablate: Annotated[bool, typer.Option(help="also time our step with each speed technique turned off")] = False,
    device: DeviceOpt = "auto",
):
    """Time hybridat's Hybrid-AT step and PGD-20 evaluation against a reference step, the FLOP floor and
    torchattacks, in one run; print the ratios (how many times faster hybridat is)."""
    from .bench import run_bench

    run_bench(device, quick=quick, out=out, console=Console(), amp=amp, rounds=rounds, ablate=ablate)


@command("import")
@cli_errors
def import_cmd(
    src: Annotated[Path, _path_argument(help="a foreign .pt/.pth (read with weights_only=True) or .safetensors file")],
    out: Annotated[Path, _path_option(help="the hybridat checkpoint to write (.safetensors)")],
    arch: Annotated[Optional[str], typer.Option(help=_names(ARCHS), show_default="found from the keys")] = None,
    layout: Annotated[str, typer.Option(help=f"key layout of the file (README: Bring your own model): auto, "
                                             f"{_names(LAYOUTS)}")] = "auto",
    norm: Annotated[Optional[str], typer.Option(help="variant to import as: one with the same sets (e.g. bn-mix), "
                                                     "or dual-bn, dual-ap, dual-ns from one single BN",
                                                show_default="the layout's")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="classes of the classifier",
                                                       show_default="from the classifier's shape")] = None,
    input_mean: Annotated[Optional[str], typer.Option(help="R,G,B: the model was trained on (x - mean) / std")]
    = None,
    input_std: Annotated[Optional[str], typer.Option(help="R,G,B, with --input-mean")] = None,
    adv_split: Annotated[Optional[str], typer.Option(help="timm-splitbn: which split is adversarial, aux (AdvProp) "
                                                          "or main", show_default="aux")] = None,
    dataset: Annotated[str, typer.Option(help=f"the dataset it was trained on, for later stages: "
                                              f"{_names(DATASETS)}")] = "cifar10",
    seed: Annotated[Optional[int], typer.Option(help="the seed it was trained with (report pairs seeds)",
                                                show_default="not recorded")] = None,
    loss: Annotated[Optional[str], typer.Option(help=f"its training objective: {_names(LOSSES)}",
                                                show_default="not recorded")] = None,
    eps: Annotated[Optional[float], typer.Option(help="the L-inf radius it was trained at, in pixel units (8 = "
                                                      "8/255)", show_default="not recorded")] = None,
):
    """Import a checkpoint of other code (ResNet-18, PreAct, WRN, the authors' Dual BN, timm SplitBN). With --seed,
    --loss and --eps (how it was trained) report sets its rows in the tables and Findings."""
    from .interop import import_checkpoint

    done = import_checkpoint(src, out, arch=arch, layout=layout, norm=norm, num_classes=num_classes,
                             input_mean=input_mean, input_std=input_std, adv_split=adv_split, dataset=dataset,
                             seed=seed, loss=loss, eps=eps)
    c = done.model.config
    say(f"{out}  layout {done.layout}{' (auto)' if layout == 'auto' else ''}: {c.arch} width {c.width:g}, "
        f"{c.num_classes} classes, norm {c.norm}  -> {done.hash}")


@command("export")
@cli_errors
def export_cmd(
    checkpoint: Ckpt,
    branch: Annotated[str, typer.Option(help="the branch to write: adv or clean")],
    layout: Annotated[str, typer.Option(help=f"the foreign key layout: {_names(PLAIN)}")],
    out: Annotated[Path, _path_option(help=".safetensors, or .pt/.pth for a torch state dict")],
):
    """Write one branch as a plain single-BN state dict in a foreign layout, for other tools."""
    from .interop import export_branch

    config = export_branch(checkpoint, out, branch=branch, layout=layout).config
    say(f"{out}  {branch} branch, layout {layout}")
    if config.input_mean is not None and out.suffix != ".safetensors":
        say(f"note: the model expects inputs normalized with mean {list(config.input_mean)}, std "
            f"{list(config.input_std)}")


@command("info")
@cli_errors
def info_cmd(checkpoint: Ckpt):
    """Print a checkpoint's config, branches and metadata."""
    table = Table(title=Text(str(checkpoint)), show_header=False)
    for key, value in checkpoint_info(checkpoint):
        table.add_row(Text(key), Text(value))  # Text: metadata is shown as it is, never read as markup
    Console().print(table)


def main() -> None:  # console-script entry point (and `python -m hybridat`, what torchrun starts)
    try:
        app()  # it ends by sys.exit (OneLineUsageErrors.main)
    except SystemExit as done:
        exit_process(done.code)
    exit_process(0)
