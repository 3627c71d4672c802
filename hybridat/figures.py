"""The report's figures: NS and AP gap by depth (ns-gap.png), accuracy by variant (accuracy.png), training curves
(training.png); each at most a limit of panels or curves, saying what it leaves out.

They draw the rows the tables read (tables.py); the `report` command writes them (report.py).
"""

from __future__ import annotations

import textwrap

import pandas as pd
from . import mpl  # noqa: F401  (first: a $MPLBACKEND matplotlib refuses is set aside)
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .analysis import FIRST, PROTOCOL, SECOND, protocol_text
from .errors import HybridatError
from .norms import NORMS
from .tables import _eval, _match, _ns, _ns_specs, _num, label_trainings

MAX_PANELS = 8  # rows of ns-gap.png, panels of accuracy.png: past this a figure is a wall no one reads
MAX_CURVES = 20  # curves of training.png: matplotlib's 10 default colours, solid then dashed (the paper's grid: 16)
LEFT_OUT = "left-out"  # gid of the line in which a figure says what it leaves out; summary.txt repeats it
CHARS_PER_INCH = 11  # of 12 pt title text: to size a panel for the lines matplotlib wraps a long title into


def _most_supported(groups: list, limit: int, what: str, then: tuple[str, tuple], rest: str) -> tuple[list, str]:
    """At most `limit` of the (key, rows) groups, in their own order: those with the most seeds (the rows' `unit`),
    then the most distinct values of the columns then[1] (what then[0] calls them); and the line that says what is
    left out ("" when every group is kept)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise HybridatError(f"limit is how many {what} a figure draws: a whole number, at least 1; got {limit!r}")
    if len(groups) <= limit:
        return groups, ""
    name, cols = then
    score = [(g.unit.nunique(), len(g[list(cols)].drop_duplicates())) for _, g in groups]
    rank = sorted(range(len(groups)), key=lambda i: (-score[i][0], -score[i][1], i))
    note = f"{limit} of {len(groups)} {what} drawn (those with the most seeds, then {name}); {rest}"
    return [groups[i] for i in sorted(rank[:limit])], note


def _say_left_out(fig: Figure, note: str, top: bool = False) -> None:
    if note:
        (fig.suptitle if top else fig.supxlabel)(note, gid=LEFT_OUT, fontsize=9, color="0.3")


def figure_note(fig: Figure) -> str:
    """What a figure of this module says it leaves out ("" when it draws every group)."""
    return " ".join(t.get_text() for t in fig.texts if t.get_gid() == LEFT_OUT)


def _lines(title: str, inches: float) -> int:
    """About how many lines beyond the first a title `inches` wide takes when wrapped."""
    return len(title) // max(20, int(inches * CHARS_PER_INCH))


def _say_empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.4")


# How each distance-by-depth series is drawn. Colour: the domain pair (or AP statistic); line style: which AP the
# domains went through; coinciding series stay visible (analysis.FIRST under analysis.SECOND).
SERIES = ("kind", "statistic", "pair", "fix", "branch", "layer")  # one measurement: a point of a drawn series
SETTING_LS = {"own branch": "--", "fix-AP adv": "-", "fix-AP clean": "-."}  # any other fixed branch: ":"


def _series(ax, rows: pd.DataFrame, match: dict, **style) -> None:
    """Mean over seeds per layer, std over seeds as error bars."""
    rows = _match(rows, **match)
    if not rows.empty:
        stats = rows.groupby(["layer", "unit"]).distance.mean().groupby("layer").agg(["mean", "std"])
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), capsize=2, elinewidth=1, **style)


def _ns_row(axes, g: pd.DataFrame) -> None:
    """One (training, norm, ε) group: NS mean gap, NS std gap, AP gap by layer."""
    for ax, stat in zip(axes, ("mean", "std")):
        for col, match in _ns_specs(g):
            if match["kind"] == "ns" and match["statistic"] == stat:
                setting = col.split(": ")[0]
                style = FIRST | {"color": "C3"} if match["pair"].startswith("adv") else SECOND | {"color": "C0"}
                _series(ax, g, match, ls=SETTING_LS.get(setting, ":"), label=f"{setting} {match['pair']}", **style)
        ax.set(title=f"NS {stat} gap", xlabel="layer", ylabel="Wasserstein distance")
        # own-branch and fixed-AP gaps lie orders of magnitude apart
        if ax.lines and (g.distance[(g.kind == "ns") & (g.statistic == stat)] > 0).all():
            ax.set_yscale("log")
    _series(axes[2], g, {"kind": "ap", "statistic": "weight"}, color="C2", label="AP weight", **FIRST)
    _series(axes[2], g, {"kind": "ap", "statistic": "bias"}, color="C4", label="AP bias", **SECOND)
    axes[2].set(title="AP gap between branches", xlabel="layer", ylabel="Wasserstein distance")
    for ax, what in zip(axes, ("NS", "NS", "AP-gap")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layer indices
        if not ax.lines:  # said, never an empty frame with axes 0-1 that reads as a plot of nothing
            _say_empty(ax, f"no {what} rows for this model")


def plot_ns_gap(frames: dict[str, pd.DataFrame], limit: int = MAX_PANELS) -> Figure | None:
    """Distance vs depth, one row per (training, norm, ε): NS mean gap, NS std gap, AP gap, one legend for all.
    At most `limit` rows, those with the most seeds; the figure says how many it leaves out (`figure_note`).
    None without NS-gap rows."""
    ns = _ns(label_trainings(frames))
    if ns.empty:
        return None
    groups = list(ns.groupby(["training", "norm", "eps"], dropna=False))  # different trainings never share a line
    groups, note = _most_supported(groups, limit, "(training, norm, ε) groups", ("measurements", SERIES),
                                   "table 5 (ns-gap.md) has them all")
    labels = [" ".join(x for x in (norm, f"ε={_num(eps)}", training and f"[{training}]") if x)
              for (training, norm, eps), _ in groups]
    heights = [0.4] + [3.4 + 0.2 * _lines(label, 14) for label in labels]  # the legend's strip, then the rows
    fig = Figure(figsize=(14, sum(heights) + 0.3 + 0.3 * bool(note)), layout="constrained")
    measured = ns[ns.kind == "ns"]
    protocols = measured[list(PROTOCOL)].drop_duplicates() if set(PROTOCOL) <= set(measured) else []
    if len(protocols) == 1:  # otherwise each row's training label names its protocol
        fig.suptitle(protocol_text(*protocols.iloc[0]), fontsize=9)
    top, *rows = fig.subfigures(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0]
    for (_, g), sub, label in zip(groups, rows, labels):
        sub.suptitle(label, fontsize=11, wrap=True)  # a long training label: lines as wide as the figure
        _ns_row(sub.subplots(1, 3), g)
    handles = {}  # one legend for every row, in a strip above them: per-axes legends sat on the lines
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    top.legend(handles.values(), handles.keys(), loc="center", ncol=min(len(handles), 6), fontsize=8)
    _say_left_out(fig, note)
    return fig


def _variant(norm, loss) -> str:
    return norm if loss == "hybrid" else f"{norm} {loss}"


def plot_accuracy(frames: dict[str, pd.DataFrame], limit: int = MAX_PANELS) -> Figure | None:
    """Accuracy by trained variant, mean ± std over seeds: the adv branch under PGD-10 and the clean branch on
    clean data, one panel per (training, train ε), bars of one width in every panel. At most `limit` panels, those
    with the most seeds; the figure says how many it leaves out (`figure_note`). None without eval rows of trained
    models."""
    ev = _eval(label_trainings(frames))
    ev = ev[(ev.op == "") & ev.train_eps.notna()]
    bars = [("adv", "PGD-10", "C3"), ("clean", "clean", "C0")]
    ev = ev[pd.Series(list(zip(ev.branch, ev.column)), index=ev.index).isin([(b, c) for b, c, _ in bars])]
    if ev.empty:
        return None
    ev = ev.assign(variant=[_variant(n, l) for n, l in zip(ev.norm, ev.loss_name)])
    panels, note = _most_supported(list(ev.groupby(["training", "train_eps"])), limit, "(training, train ε) panels",
                                   ("variants", ("variant",)), "report on only the others' CSVs draws them")
    slots = max(g.variant.nunique() for _, g in panels)
    width = min(24.0, max(6.0, 0.9 * slots + 3))  # wider than 24 inches no page or screen shows
    longest = max(len(v) for _, g in panels for v in g.variant.unique())
    narrow = longest * 0.08 > (width - 2.5) / slots - 0.1  # names at 20° (~0.08 inch a letter) would meet: at 90°
    titles = [f"{training}, " * bool(training) + f"train ε={_num(eps)}: accuracy (%), mean ± std over seeds"
              for (training, eps), _ in panels]
    heights = [3.6 + 0.2 * _lines(t, width - 2.5) + 0.08 * longest * narrow for t in titles]  # names at 90° too
    fig = Figure(figsize=(width, sum(heights) + 0.3 * bool(note)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for (_, g), ax, title in zip(panels, axes, titles):
        _accuracy_panel(ax, g, bars, narrow)
        ax.set_xlim(-0.6, slots - 0.4)  # every slot in view, a missing bar's too; one bar width in every panel
        ax.set_title(title, wrap=True)  # a long training label: lines as wide as the figure holds
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
    _say_left_out(fig, note)
    return fig


def _paper_order(g: pd.DataFrame) -> list[str]:
    """The panel's variants in the registry's order (the paper's: bn, bn-mix, dual-bn, dual-ap, ...), hybrid before
    other losses; not the order the CSVs were read in (bn-mix_... sorts before bn_...)."""
    rank = {norm: i for i, norm in enumerate(NORMS)}
    pairs = g[["norm", "loss_name", "variant"]].drop_duplicates("variant").itertuples(index=False)
    return [v for *_, v in sorted(pairs, key=lambda r: (rank.get(r[0], len(rank)), r[0], r[1] != "hybrid", r[1]))]


def _accuracy_panel(ax, g: pd.DataFrame, bars: list, narrow: bool) -> None:
    variants = _paper_order(g)
    for k, (branch, col, color) in enumerate(bars):
        per_seed = g[(g.branch == branch) & (g.column == col)].groupby(["variant", "unit"]).accuracy.mean() * 100
        stats = per_seed.groupby("variant").agg(["mean", "std", "count"]).reindex(variants)
        xs = [i + (k - 0.5) * 0.38 for i in range(len(variants))]
        if stats["mean"].notna().any():  # a series without rows gets no legend entry (it would read as 0 %)
            ax.bar(xs, stats["mean"], width=0.38, yerr=stats["std"].fillna(0), capsize=3, color=color,
                   label=f"{branch} branch, {col}")
        for x, (m, n) in zip(xs, zip(stats["mean"], stats["count"])):
            if pd.notna(m):
                ax.annotate(f"n={n:g}", (x, 0), ha="center", va="bottom", fontsize=6, color="white")
            else:  # a missing bar is said to be missing, never left to look like 0 %
                ax.annotate(f"no {branch} {col}", (x, 0), xytext=(0, 3), textcoords="offset points", ha="center",
                            va="bottom", fontsize=6, color="0.4", rotation=90)
    ax.set_xticks(range(len(variants)), variants, rotation=90 if narrow else 20,
                  ha="center" if narrow else "right")


def plot_training(frames: dict[str, pd.DataFrame], limit: int = MAX_CURVES) -> Figure | None:
    """Training curves from train.csv: loss and each branch's training accuracy by epoch, mean over seeds, one line
    per (variant, ε, training), one legend below the panels. At most `limit` lines, those with the most seeds; the
    figure says how many it leaves out (`figure_note`). None without train rows."""
    tr = label_trainings(frames).get("train")
    if tr is None or tr.empty:
        return None
    tr = tr.assign(unit=tr.seed, curve=[" ".join(x for x in (_variant(n, l), f"ε={_num(e)}", t) if x)
                                        for n, l, e, t in zip(tr.norm, tr.loss_name, tr.eps, tr.training)])
    curves, note = _most_supported(list(tr.groupby("curve", sort=True)), limit, "curves", ("epochs", ("epoch",)),
                                   "report on only the others' CSVs draws them")
    labels = ["\n".join(textwrap.wrap(f"{curve} (n={g.seed.nunique()})", 100, break_on_hyphens=False))
              for curve, g in curves]
    # legend columns: as many as fit in the figure's 15 inches: about 21 characters of 7 pt text per inch, and 11
    # characters' room for each entry's line
    ncol = max(1, min(len(labels), 315 // (max(len(line) for t in labels for line in t.split("\n")) + 11)))
    lines = sum(max(t.count("\n") + 1 for t in labels[i:i + ncol]) for i in range(0, len(labels), ncol))
    fig = Figure(figsize=(15, 4 + 0.15 * lines + 0.3 * bool(note)), layout="constrained")
    panels = [("loss", "training loss", 1, "loss"), ("acc_adv", "adv branch accuracy on x_adv", 100, "accuracy (%)"),
              ("acc_clean", "clean branch accuracy on x", 100, "accuracy (%)")]
    for ax, (col, title, scale, unit) in zip(fig.subplots(1, 3), panels):
        for k, ((_, g), label) in enumerate(zip(curves, labels)):
            mean = g.groupby("epoch")[col].mean() * scale  # train.csv holds accuracies as fractions
            ax.plot(mean.index, mean.values, color=f"C{k % 10}", linestyle="-" if k < 10 else "--",
                    marker="o" if k < 10 else "s", ms=3, label=label)
        ax.set(title=title, xlabel="epoch", ylabel=unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs, also for a 1-epoch run
        if not tr[col].notna().any():
            _say_empty(ax, "no values: the loss does not train this branch")
    # below the panels, never over the curves (a legend of long training labels covered the loss panel)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=ncol, fontsize=7)
    _say_left_out(fig, note, top=True)
    return fig
