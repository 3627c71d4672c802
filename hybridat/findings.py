"""The paper's claims, each checked against the rows present: paired differences over seeds, a 95 % interval, n.

`report` only reads rows. A comparison pairs two cells of the same training (see `tables.label_trainings`) seed by
seed: the difference per seed, its mean, and the t-interval of that mean. The verdict never says more than the
interval allows:
  - a claim that two settings are comparable ("same") is consistent if the whole interval lies within ±margin,
    not consistent if it lies wholly outside, and not resolved otherwise;
  - a claim of a direction ("more", "less") is consistent if the interval excludes 0 on that side, not consistent
    if it excludes 0 on the other side (or touches it only there), and not resolved otherwise;
  - fewer than 2 paired seeds never resolve anything.
Accuracy differences are in percentage points; NS-gap comparisons are log2 ratios of distances, shown as ratios.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import pandas as pd
from scipy import stats

from .tables import SWAP_AP, _eval, _ns, label_trainings, ns_pairs, render_latex, render_markdown

CONSISTENT, NOT_CONSISTENT, UNRESOLVED = "consistent", "not consistent", "not resolved at this n"
CLAIMS = {
    1: "Cross-BN (adv branch on clean-domain NS) is as robust as Self-BN (dual-bn)",
    2: "Two AP sets (dual-ap) match Dual BN; two NS sets with one AP (dual-ns) match it at ε 8 but fall short at ε 16",
    3: "With one AP, the adv-clean NS gap is comparable to the noise-clean gap; through each branch's own AP it "
       "looks larger",
    4: "Swapping the AP moves robustness with it (the clean branch with the adv AP gains, the adv branch loses)",
    5: "Two-task variants (two heads, adapters, two BNs, TRADES) improve on single BN",
}
PGD = ("adv", "PGD-10")  # (branch, attack column): the robustness every accuracy claim is read on


def dual_ns_expectation(eps: float) -> str:
    """What claim (2) says of dual-ns against dual-bn at a training ε (1/255): comparable at the paper's small ε
    (8 and below), short of it above, where the paper saw its robustness drop (16)."""
    return "same" if eps <= 8 else "less"


def depth_thirds(n_layers: int) -> list[tuple[str, range]]:
    """The measured norm layers 0..n-1 in three contiguous groups, shallow to deep, as even as can be (the first
    ones one larger): ResNet-18's 20 give 0-6, 7-13, 14-19; a WideResNet-34-10's 31 give 0-10, 11-20, 21-30."""
    size, extra = divmod(n_layers, 3)
    groups, start = [], 0
    for k in range(3):
        stop = start + size + (k < extra)
        if stop > start:
            groups.append((f"layers {start}-{stop - 1}", range(start, stop)))
        start = stop
    return groups


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, diffs: pd.Series) -> Interval:
        """Mean of the per-seed differences and its two-sided 95 % t-interval (NaN bounds for n < 2)."""
        d = pd.to_numeric(diffs, errors="coerce").dropna()
        n = len(d)
        if n < 2:
            return cls(d.mean() if n else math.nan, math.nan, math.nan, n)
        half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
        return cls(d.mean(), d.mean() - half, d.mean() + half, n)


def verdict(expect: str, ci: Interval, margin: float) -> str:
    """The verdict of a claim of kind `expect` ("same", "more", "less") given the interval (see the module doc)."""
    if ci.n < 2 or math.isnan(ci.low):
        return UNRESOLVED
    if expect == "same":
        if -margin <= ci.low and ci.high <= margin:
            return CONSISTENT
        return NOT_CONSISTENT if ci.low > margin or ci.high < -margin else UNRESOLVED
    sign = 1 if expect == "more" else -1
    low, high = sorted((sign * ci.low, sign * ci.high))
    return CONSISTENT if low > 0 else NOT_CONSISTENT if high <= 0 else UNRESOLVED


def _row(claim: int, comparison: str, metric: str, expect: str, ci: Interval, margin: float, training: str,
         unit: str = "pts") -> dict:
    return {"claim": claim, "training": training, "comparison": comparison, "metric": metric, "expected": expect,
            "difference": ci.mean, "ci_low": ci.low, "ci_high": ci.high, "n": ci.n, "unit": unit,
            "margin": margin if expect == "same" else math.nan, "verdict": verdict(expect, ci, margin)}


def _per_seed(ev: pd.DataFrame, branch: str, column: str, **match) -> pd.Series:
    """Accuracy in % per seed of the rows matching every column=value (several rows of a seed averaged)."""
    rows = ev[(ev.branch == branch) & (ev.column == column)]
    for col, want in match.items():
        rows = rows[rows[col] == want]
    return rows.groupby("unit").accuracy.mean() * 100


def _paired(a: pd.Series, b: pd.Series) -> pd.Series:
    both = a.index.intersection(b.index)
    return a[both] - b[both]


def _accuracy_rows(ev: pd.DataFrame, training: str, margin: float) -> list[dict]:
    """Claims 1, 2, 4, 5: accuracy differences between trained variants (or operations) of one training."""
    trained = ev[ev.op == ""]
    out = []

    def compare(claim, a, b, expect, label, eps):
        ci = Interval.of(_paired(_per_seed(trained, *PGD, **a, train_eps=eps),
                                 _per_seed(trained, *PGD, **b, train_eps=eps)))
        out.append(_row(claim, f"{label}, ε={eps:g}", f"{PGD[0]} branch {PGD[1]}", expect, ci, margin, training))

    def present(match) -> bool:
        return bool(((trained.norm == match["norm"]) & (trained.loss_name == match["loss_name"])).any())

    hybrid = {"loss_name": "hybrid"}
    all_eps = sorted(set(trained.train_eps.dropna()) | {8.0})
    for eps in all_eps:
        for cross in ("cross-bn", "cross-bn-adv"):
            if cross == "cross-bn" or present({"norm": cross, **hybrid}):
                compare(1, {"norm": cross, **hybrid}, {"norm": "dual-bn", **hybrid}, "same", f"{cross} − dual-bn",
                        eps)
    for eps in sorted(set(all_eps) | {16.0}):
        compare(2, {"norm": "dual-ap", **hybrid}, {"norm": "dual-bn", **hybrid}, "same", "dual-ap − dual-bn", eps)
        compare(2, {"norm": "dual-ns", **hybrid}, {"norm": "dual-bn", **hybrid}, dual_ns_expectation(eps),
                "dual-ns − dual-bn", eps)
    swap = ev[(ev.norm == "dual-bn") & (ev.loss_name == "hybrid")]
    for eps in all_eps:
        for branch, expect in (("clean", "more"), ("adv", "less")):
            ci = Interval.of(_paired(_per_seed(swap, branch, "PGD-10", op=SWAP_AP, train_eps=eps),
                                     _per_seed(swap, branch, "PGD-10", op="", train_eps=eps)))
            out.append(_row(4, f"dual-bn swap-AP − as trained, ε={eps:g}", f"{branch} branch PGD-10", expect, ci,
                            margin, training))
    variants = [({"norm": n, **hybrid}, n) for n in ("dual-bn", "dual-linear", "dual-adapter")]
    variants += [({"norm": "bn", "loss_name": "trades"}, "bn TRADES")]
    for eps in all_eps:
        for match, label in variants:
            if label == "dual-bn" or present(match):
                compare(5, match, {"norm": "bn", **hybrid}, "more", f"{label} − bn", eps)
    return out


def _gap(ns: pd.DataFrame, layers, pair: str, **match) -> pd.Series:
    """Per seed: the sum over `layers` and both statistics (mean, std) of the Wasserstein distance of `pair`."""
    rows = ns[(ns.kind == "ns") & (ns.pair == pair) & ns.layer.isin(list(layers))]
    for col, want in match.items():
        rows = rows[rows[col] == want]
    return rows.groupby(["unit", "layer", "statistic"]).distance.mean().groupby("unit").sum()


def _log2_ratio(a: pd.Series, b: pd.Series) -> pd.Series:
    both = a.index.intersection(b.index)
    ratio = a[both] / b[both]
    return ratio[(ratio > 0) & ratio.map(math.isfinite)].map(math.log2)


def _ns_rows(ns: pd.DataFrame, training: str, ratio_margin: float) -> list[dict]:
    """Claim 3: fixed-AP adv-clean vs noise-clean by depth; own-branch vs fixed-AP adv-clean over all layers."""
    margin = math.log2(ratio_margin)
    out = []
    norms = sorted(set(ns.norm.dropna())) or ["dual-bn"]
    for norm in norms:
        rows = ns[ns.norm == norm]
        eps_values = sorted(set(rows.eps.dropna())) or [math.nan]
        fixed_branches = sorted(set(rows.branch[rows.fix & (rows.kind == "ns")]))
        # the paper fixes the adv branch's AP
        fixed_branch = "adv" if not fixed_branches or "adv" in fixed_branches else fixed_branches[0]
        adv, noise = ns_pairs(rows)  # against the clean batch, or the running NS (one reference per training)
        measured = rows.layer[rows.kind == "ns"].dropna()
        depths = depth_thirds(int(measured.max()) + 1 if len(measured) else 20)  # 20: ResNet-18's, for empty rows
        for eps in eps_values:
            at = rows[rows.eps == eps]
            where = "" if math.isnan(eps) else f", ε={eps:g}"
            fixed = {"fix": True, "branch": fixed_branch}
            for label, layers in depths:
                ci = Interval.of(_log2_ratio(_gap(at, layers, adv, **fixed), _gap(at, layers, noise, **fixed)))
                out.append(_row(3, f"{norm} fixed AP ({fixed_branch}){where}: {adv} / {noise}",
                                f"NS gap, {label}", "same", ci, margin, training, "log2"))
            every = range(0, 1000)
            ci = Interval.of(_log2_ratio(_gap(at, every, adv, fix=False), _gap(at, every, adv, **fixed)))
            out.append(_row(3, f"{norm}{where}: own-branch / fixed-AP {adv}", "NS gap, all layers", "more", ci,
                            margin, training, "log2"))
    return out


def findings(frames: dict[str, pd.DataFrame], margin: float = 2.0, ratio_margin: float = 1.5) -> pd.DataFrame:
    """One row per comparison of every claim (CLAIMS), per training found. margin: percentage points within which
    two accuracies count as comparable; ratio_margin: the factor within which two NS gaps count as comparable."""
    frames = label_trainings(frames)
    ev, ns = _eval(frames), _ns(frames)
    rows = []  # accuracy claims per training of the eval rows, NS claims per training (and protocol) of the NS rows
    for t in sorted(set(ev.get("training", pd.Series(dtype=str)))) or [""]:
        rows += _accuracy_rows(ev[ev.training == t] if "training" in ev else ev, t, margin)
    for t in sorted(set(ns.get("training", pd.Series(dtype=str)))) or [""]:
        rows += _ns_rows(ns[ns.training == t] if "training" in ns else ns, t, ratio_margin)
    frame = pd.DataFrame(rows)
    return frame.sort_values("claim", kind="stable").reset_index(drop=True)


# ---- rendering -------------------------------------------------------------------------------------------

def _number(row, x: float) -> str:
    if row["unit"] == "log2":
        return f"×{2 ** x:.2f}"
    return f"{x:+.1f}"


def describe(row) -> str:
    """ "+1.2 pts [-0.8, +3.2], n=3" / "×1.10 [×0.95, ×1.28], n=3" / "+1.2 pts, n=1" / "no paired seeds (n=0)"."""
    if row["n"] == 0:
        return "no paired seeds (n=0)"
    unit = " pts" if row["unit"] == "pts" else ""
    if row["n"] < 2:
        return f"{_number(row, row['difference'])}{unit}, n=1"
    return (f"{_number(row, row['difference'])}{unit} [{_number(row, row['ci_low'])}, "
            f"{_number(row, row['ci_high'])}], n={row['n']}")


def _expected(row) -> str:
    if row["expected"] == "same":
        m = row["margin"]
        return f"within ×{2 ** m:.2f}" if row["unit"] == "log2" else f"within ±{m:g} pts"
    return "> 0" if row["unit"] == "pts" and row["expected"] == "more" else \
        "< 0" if row["unit"] == "pts" else ("> ×1" if row["expected"] == "more" else "< ×1")


def findings_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows as a table to render: claim, comparison, metric, claimed, Δ [95 % CI] n, verdict."""
    show = pd.DataFrame({
        "claim": frame.claim.map(lambda c: f"({c})"),
        "comparison": frame.comparison, "metric": frame.metric,
        "claimed": [_expected(r) for _, r in frame.iterrows()],
        "difference [95 % CI]": [describe(r) for _, r in frame.iterrows()],
        "verdict": frame.verdict})
    if frame.training.nunique() > 1:
        show.insert(1, "training", frame.training)
    return show


def summary_lines(frame: pd.DataFrame) -> list[str]:
    """The findings for a terminal: each claim once, then one short line per comparison that has data, and one line
    per claim listing what had none."""
    lines = []
    for claim, text in CLAIMS.items():
        rows = frame[frame.claim == claim]
        counts = rows.verdict[rows.n > 0].value_counts()
        tally = [f"{counts[v]} {v}" for v in (CONSISTENT, NOT_CONSISTENT, UNRESOLVED) if v in counts]
        if empty := int((rows.n == 0).sum()):
            tally.append(f"{empty} without data" if tally else "no data")
        lines += _wrap(f"({claim}) {text}:", ', '.join(tally) or 'no comparison')
        for _, r in rows[rows.n > 0].iterrows():
            where = f"[{r.training}] " if r.training else ""
            lines += _wrap(f"    {where}{r.comparison}, {r.metric}:", f"{describe(r)} -> {r.verdict}")
        if missing := _missing(rows):
            lines += _wrap(f"    no data for: {'; '.join(missing)}")
    return lines


def _wrap(text: str, tail: str = "") -> list[str]:
    """text wrapped to WIDTH, continued 8 spaces in, with tail (a result and its verdict) kept on one line: after the
    text if it fits there, else on a line of its own."""
    lines = textwrap.wrap(text, WIDTH, subsequent_indent=INDENT, break_on_hyphens=False)
    if tail and len(lines[-1]) + 1 + len(tail) <= WIDTH:
        lines[-1] += f" {tail}"
    elif tail:
        lines += textwrap.wrap(tail, WIDTH, initial_indent=INDENT, subsequent_indent=INDENT, break_on_hyphens=False)
    return lines


WIDTH = 118  # a terminal line
INDENT = " " * 8  # a wrapped line's continuation


def _missing(rows: pd.DataFrame) -> list[str]:
    """The comparisons without a single paired seed (with the metric where one comparison has several)."""
    # a comparison with data elsewhere in its training: name the metric that has none; [the training], if any
    measured = {(t, c) for t, c, n in zip(rows.training, rows.comparison, rows.n) if n > 0}
    names = [("" if not r.training else f"[{r.training}] ")
             + (f"{r.comparison} ({r.metric})" if (r.training, r.comparison) in measured else r.comparison)
             for _, r in rows.iterrows() if r.n == 0]
    return list(dict.fromkeys(names))


HEADER = ("Each comparison pairs the two settings seed by seed within one training; Δ is the mean difference with "
          "its 95 % t-interval over n paired seeds (accuracy in percentage points; NS gaps as ratios). A claim of "
          "comparability is consistent when the whole interval lies within the margin, not consistent when it lies "
          "wholly outside; a claim of direction is consistent when the interval excludes 0 on that side, not "
          "consistent when it lies on the other side; anything else, or n < 2, is not resolved at this n.")


def findings_markdown(frame: pd.DataFrame) -> str:
    """The Findings section: the claims, one table row per comparison with data, one line for those without."""
    claims = "\n".join(f"- ({k}) {text}" for k, text in CLAIMS.items())
    data = frame[frame.n > 0]
    body = (render_markdown(findings_table(data), "Findings").split("\n", 2)[2] if len(data)
            else "No comparison has data.\n")
    missing = [f"({c}) {'; '.join(m)}" for c in CLAIMS if (m := _missing(frame[frame.claim == c]))]
    tail = ("\nNo data for: " + " · ".join(missing) + "\n") if missing else ""
    return f"## Findings\n\n{HEADER}\n\n{claims}\n\n{body}{tail}"


def findings_latex(frame: pd.DataFrame) -> str:
    data = frame[frame.n > 0]
    return render_latex(findings_table(data), "Findings: " + HEADER)
