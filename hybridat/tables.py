"""Rows -> the paper's five tables, and their Markdown and LaTeX: pure renders of what `load_runs` read.

A cell is the mean ± sample std over seeds with n shown; a cell without rows is "—". Rows of different trainings
(`label_trainings`) never share a cell. Reading the CSVs is in records.py, the figures in figures.py, the `report`
command's files in report.py.
"""

from __future__ import annotations

import json

import pandas as pd

from .analysis import DOMAIN_SETTINGS, PROTOCOL
from .checkpoint import TRAINING_COLUMNS
from .errors import HybridatError
from .evaluate import aa_columns, attack_label
from .records import SAME_MEASUREMENT, SCHEMAS, _key_text, _op_key, _value

MISSING = "—"

LABELS = {"training", "norm", "loss", "train ε", "operation", "ε", "layer", "name", "claim", "comparison", "metric",
          "claimed", "verdict"}  # row labels; the rest are cells
# What identifies a training besides the tables' own keys (norm, loss, train ε) and the seed: rows that differ in
# any of these are never averaged into one cell. ns-gap tables have no loss / train ε key, so there they count too,
# and so does how the NS were measured (analysis.PROTOCOL): rows measured differently never share a cell or a line.
# dataset is a training column too: each column once
SETTING_COLUMNS = tuple(dict.fromkeys(("dataset", "arch", "width", *TRAINING_COLUMNS)))
NS_SETTING_COLUMNS = ("loss_name", "train_eps", *PROTOCOL, *DOMAIN_SETTINGS)
SHORT = {"train_epochs": "epochs", "train_steps": "PGD steps", "train_step": "PGD step", "train_lr": "lr",
         "train_batch_size": "batch", "train_momentum": "momentum", "train_weight_decay": "wd",
         "train_clean_weight": "clean weight", "train_trades_beta": "β", "train_subset": "subset", "train_amp": "amp",
         "loss_name": "loss", "train_eps": "train ε", "mode": "NS mode", "reference": "NS reference",
         "noise_clip": "noise clip", "noise": "noise", "steps": "NS PGD steps", "step": "NS PGD step",
         "attack_branch": "NS PGD branch", "start": "NS PGD start"}

BOTH = [(b, c) for b in ("adv", "clean") for c in ("clean", "PGD-10", "AA")]  # (branch, attack column)
PAPER = [("adv", "clean"), ("adv", "PGD-10"), ("adv", "AA"), ("clean", "clean")]  # table 2's cells per ε
CROSS, SWAP_AP = (json.dumps({"op": op}) for op in ("cross", "swap-ap"))


# ---- trainings ------------------------------------------------------------------------------------------

def _settings(frame: pd.DataFrame, columns) -> pd.DataFrame:
    """The setting columns the frame has, as text (a column an older CSV lacks is left out, not guessed)."""
    return pd.DataFrame({c: frame[c].map(_value) for c in columns if c in frame}, index=frame.index)


def label_trainings(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Copies of `frames` with a `training` column: the settings in which rows' trainings differ (beyond the
    tables' keys and the seed), e.g. "lr=0.05, epochs=5"; "" where every row shares them. A row that lacks a
    setting its CSV's other rows have reads "?", so rows of unknown provenance are never averaged with known ones."""
    frames = {k: f.copy() for k, f in frames.items()}
    settings = {k: _settings(f, SETTING_COLUMNS) for k, f in frames.items()}
    every = pd.concat(settings.values()) if settings else pd.DataFrame()
    varying = [c for c in SETTING_COLUMNS if c in every and every[c].dropna().nunique() > 1]
    for kind, frame in frames.items():
        table = settings[kind]
        if kind == "nsgap":
            extra = _settings(frame, NS_SETTING_COLUMNS)
            table = table.join(extra)
            varying_here = varying + [c for c in extra if extra[c].nunique() > 1]
        else:
            varying_here = varying
        cols = [c for c in varying_here if c in table]
        frame["training"] = [", ".join(f"{SHORT.get(c, c)}={v}" for c, v in zip(cols, row))
                             for row in table[cols].itertuples(index=False)] if cols else ""
    return frames


# ---- cells -----------------------------------------------------------------------------------------------

def cell(values: pd.Series, scale: float = 100.0, digits: int = 1) -> str:
    """One value per seed -> "84.3 ± 0.4 (n=3)" (accuracy in [0,1] shown in %, sample std); none -> "—"."""
    values = pd.to_numeric(pd.Series(values), errors="coerce").dropna() * scale
    if values.empty:
        return MISSING
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f} (n=1)"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f} (n={len(values)})"


def distance_cell(values: pd.Series) -> str:
    """One NS or AP distance per seed -> "0.00102 ± 0.00031 (n=2)": 3 significant digits for the mean, 2 for the
    std, since distances span orders of magnitude over depth (fixed decimals printed 0.000 for the small ones)."""
    values = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    if values.empty:
        return MISSING
    if len(values) == 1:
        return f"{values.iloc[0]:#.3g} (n=1)"
    return f"{values.mean():#.3g} ± {values.std(ddof=1):#.2g} (n={len(values)})"


def _match(frame: pd.DataFrame, **match) -> pd.DataFrame:
    for col, want in match.items():
        frame = frame[frame[col] == want]
    return frame


def _pick(frame: pd.DataFrame, value: str, scale: float = 100.0, digits: int = 1, **match) -> str:
    """The cell of the rows matching every column=value; several rows of one seed are averaged first."""
    return cell(_match(frame, **match).groupby("unit")[value].mean(), scale, digits)


def _units(frame: pd.DataFrame) -> pd.Series:
    """What a cell's n counts: the seed, or the checkpoint where the seed is unknown."""
    return frame.seed.map(lambda s: f"seed {s:g}").where(frame.seed.notna(), frame.checkpoint_hash)


def _num(x) -> str:
    return "" if pd.isna(x) else f"{x:g}"


def op_label(key: str) -> str:
    """Readable name of an operation: "cross", "swap-ap", "reestimate adv NS on adv data", "swap-ap after cross"."""
    try:
        op = json.loads(key) if key else None
    except json.JSONDecodeError:
        return key
    if not isinstance(op, dict):
        return "as trained" if op is None else key
    name = str(op.pop("op", "?"))
    after = op.pop("after", None)  # a swap-bn of a swap-bn output: the parent's operation
    if name == "reestimate":
        if op.get("domain") == "clean":  # clean images have no radius (swap_bn records its default eps all the same)
            op.pop("eps", None)
        who = f" {op.pop('branch')}" if "branch" in op else ""
        name = f"reestimate{who} NS" + (f" on {op.pop('domain')} data" if "domain" in op else "")
    rest = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(op.items())]
    label = " ".join([name, *rest])
    return label if after is None else f"{label} after {op_label(json.dumps(after))}"


# ---- tables ----------------------------------------------------------------------------------------------

def _eval(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Eval rows ready for tables: derived checkpoints inherit training metadata, robust rows at train ε only."""
    ev = _eval_all(frames.get("eval", pd.DataFrame(columns=sorted(SCHEMAS["eval"]))).copy())
    # a re-run of the same evaluation replaces the earlier one; a derived model with its parent's weights (swap-bn
    # --cross twice, --ns adv=adv: the same hash) is still its operation's row, never the parent's; two runs whose
    # weights came out equal (one seed at ε 8 and 16 where the training attack never reaches ε 8: PGD-1 of step 2)
    # are each their own run's row
    same = [c for c in ("checkpoint_hash", "train_eps", "loss_name", "training", "op", "branch", "column") if c in ev]
    ev = ev[_at_train_eps(ev)].drop_duplicates(same, keep="last")
    _check_same_images(ev)
    return ev


def _check_same_images(ev: pd.DataFrame) -> None:
    """The seeds of one cell were evaluated on as many test images (`attack --n`): an accuracy on the first 500 and
    one on all 10,000 are not two draws of one measurement, and their mean is neither."""
    if "n" not in ev or ev.n.dropna().empty:
        return
    key = [c for c in (*SAME_MEASUREMENT["eval"], "training") if c in ev and c not in ("seed", "operation", "steps",
                                                                                      "step")] + ["op", "column"]
    text = _key_text(ev, key)
    mixed = ev[ev.groupby(text).n.transform("nunique") > 1]
    if mixed.empty:
        return
    rows = mixed[text[mixed.index] == text[mixed.index[0]]].sort_values("seed")
    first = rows.iloc[0]
    seeds = "; ".join(f"{r.unit}: n={r.n:g}" for r in rows.itertuples())
    raise HybridatError(
        f"{first.column} of {first.norm} ({first.branch} branch, {op_label(first.op)}, ε={_num(first.eps)}) was "
        f"evaluated on different numbers of test images ({seeds}); report would average them as one cell. "
        "Evaluate every seed with the same --n")


def _eval_all(ev: pd.DataFrame) -> pd.DataFrame:
    """Every eval row with its table column, operation key and unit; robust rows at any ε."""
    for _ in range(3):  # one generation per pass: a re-estimate of a cross checkpoint is two deep
        parent = ev.drop_duplicates("checkpoint_hash").set_index("checkpoint_hash")
        for col in ("seed", "train_eps", "loss_name"):
            missing = ev[col].isna() | (ev[col].astype(str) == "")
            ev[col] = ev[col].where(~missing, ev.parent_hash.map(parent[col]))
    ev = _with_aa_columns(ev)
    # examples crafted in bf16 (`attack --amp`) get their own column; rows from before the column are fp32
    precision = ev.get("attack_precision", pd.Series("fp32", index=ev.index))
    ev["attack_precision"] = precision.fillna("fp32").astype(str).replace("", "fp32")
    ev["column"] = [attack_label(a, None if pd.isna(k) else int(k), aa, r, p) for a, k, aa, r, p in
                    zip(ev.attack, ev.steps, ev.aa_attacks, ev.aa_restarts, ev.attack_precision)]
    # PGD-k steps by ε/4 (SPEC); a run with another --step is another attack, in a column of its own (a row
    # without a step, from before the column, was the default)
    step = pd.to_numeric(ev.get("step", pd.Series(float("nan"), index=ev.index)), errors="coerce")
    other = (ev.attack == "pgd") & step.notna() & ((step - ev.eps / 4).abs() > 1e-9 * ev.eps.abs().clip(lower=1))
    if other.any():
        ev.loc[other, "column"] = ev.column[other] + " (step " + step[other].map(_num) + ")"
    ev["op"] = ev.operation.map(_op_key)
    ev["unit"] = _units(ev)
    return ev


def _at_train_eps(ev: pd.DataFrame) -> pd.Series:
    return (ev.attack == "clean") | ev.train_eps.isna() | (ev.eps == ev.train_eps)


# (norm, loss) of the trained models tables 1-3 show; table 4 shows swap-bn operations of dual-bn (hybrid) only
TABLED = {(n, "hybrid") for n in ("cross-bn", "cross-bn-adv", "bn", "bn-mix", "dual-bn", "dual-ap", "dual-ns",
                                  "dual-linear", "dual-adapter")} | {("bn", "trades"), ("dual-bn", "trades")}
LEFT_OUT_HEADER = ("Not in the tables, which show clean, PGD-10 and AutoAttack accuracy at the training ε of the "
                   "paper's variants (the rows stay in their CSVs)")


def left_out(frames: dict[str, pd.DataFrame]) -> list[str]:
    """The eval rows no table shows, as "what (N rows)": attacks other than clean, PGD-10 and AutoAttack (PGD-20,
    FGSM, ...), robust rows at an ε other than the model's training ε, variants and losses no table has, swap-bn
    operations of models other than dual-bn (hybrid). A reader who measured them finds them named here."""
    if "eval" not in frames or frames["eval"].empty:
        return []
    ev = _eval_all(frames["eval"].copy())
    shown = {"clean", "PGD-10", "AA", *_other_columns(ev)}
    loss = ev.loss_name.fillna("").astype(str).replace("", "?")
    reasons = []
    for i, r in ev.iterrows():
        if r.column not in shown:
            reasons.append(r.column)
        elif not _at_train_eps(ev.loc[[i]]).iloc[0]:
            reasons.append(f"{r.column} at ε={_num(r.eps)} on models trained at ε={_num(r.train_eps)}")
        elif r.op == "" and (r.norm, loss[i]) not in TABLED:
            reasons.append(f"{r.norm} (loss {loss[i]})")
        elif r.op != "" and (r.norm, loss[i]) != ("dual-bn", "hybrid"):
            reasons.append(f"{op_label(r.op)} of {r.norm} (loss {loss[i]})")
        else:
            reasons.append("")
    counts = pd.Series(reasons, dtype=str).value_counts(sort=False)
    return [f"{what} ({n} row{'s' if n > 1 else ''})" for what, n in counts.items() if what]


def _with_aa_columns(ev: pd.DataFrame) -> pd.DataFrame:
    """AutoAttack rows of CSVs written before `aa_attacks`/`aa_restarts`/`aa_eot_iter` existed get what their
    `attack` ran then (the standard, plus or rand version)."""
    ev = ev.copy()
    for col in ("aa_attacks", "aa_restarts", "aa_eot_iter"):
        if col not in ev:
            ev[col] = "" if col == "aa_attacks" else float("nan")
    old = ev.aa_attacks.fillna("").astype(str).str.strip() == ""
    for i in ev.index[old]:
        for col, value in aa_columns(ev.at[i, "attack"]).items():
            ev.at[i, col] = value
    ev["aa_attacks"] = ev.aa_attacks.fillna("").astype(str)
    return ev


def _cells(rows: pd.DataFrame, spec: list[tuple[str, str]], prefix: str = "") -> dict[str, str]:
    return {f"{prefix}{branch}: {col}": _pick(rows, "accuracy", branch=branch, column=col) for branch, col in spec}


def _other_columns(ev: pd.DataFrame) -> list[str]:
    """Columns of AutoAttack runs other than the standard version (AA-plus, APGD-CE, AA(apgd-ce,square), ...) and
    of PGD-10 with examples crafted in bf16 (`attack --amp`) found in the rows: tables show them beside AA and
    PGD-10, never in their place."""
    other = ev.column[ev.attack.astype(str).str.startswith("autoattack-") | (ev.column == "PGD-10 (bf16)")]
    return sorted(set(other))


def _levels(*values: pd.Series, always=()) -> list[float]:
    """The train ε values to show: those in the data plus the paper's."""
    return sorted(set(always).union(*(v.dropna() for v in values)))


def table_cross_bn(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 1: Cross-BN vs Self-BN (dual-bn), hybrid loss, each branch under clean / PGD-10 / AA."""
    ev = _eval(frames)
    ev = ev[(ev.op == "") & (ev.loss_name == "hybrid")]
    spec = BOTH + [(b, c) for b in ("adv", "clean") for c in _other_columns(ev)]
    rows = []
    for eps in _levels(ev.train_eps[ev.norm.isin(["cross-bn", "cross-bn-adv", "dual-bn"])], always=[8]):
        for norm, label in [("cross-bn", "cross-bn"), ("cross-bn-adv", "cross-bn-adv"),
                            ("dual-bn", "dual-bn (Self-BN)")]:
            rows.append({"norm": label, "train ε": _num(eps),
                         **_cells(ev[(ev.norm == norm) & (ev.train_eps == eps)], spec)})
    return pd.DataFrame(rows)


def _eps_grid(frames: dict[str, pd.DataFrame], pairs: list[tuple[str, str]], show_loss: bool) -> pd.DataFrame:
    """One row per (norm, loss) of trained models; table 2's four cells for each train ε (8 and 16 at least)."""
    ev = _eval(frames)
    ev = ev[ev.op == ""]
    mine = {(norm, loss): ev[(ev.norm == norm) & (ev.loss_name == loss)] for norm, loss in pairs}
    levels = _levels(*(m.train_eps for m in mine.values()), always=[8, 16])
    spec = PAPER + [("adv", c) for c in _other_columns(pd.concat(mine.values()))]
    rows = []
    for (norm, loss), m in mine.items():
        row = {"norm": norm, "loss": loss} if show_loss else {"norm": norm}
        for eps in levels:
            row |= _cells(m[m.train_eps == eps], spec, f"ε={_num(eps)} ")
        rows.append(row)
    return pd.DataFrame(rows)


def table_ns_vs_ap(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 2: which of NS and AP has to be split, hybrid loss, at train ε = 8 and 16."""
    return _eps_grid(frames, [(n, "hybrid") for n in ("bn", "bn-mix", "dual-bn", "dual-ap", "dual-ns")], False)


def table_two_task(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 3: two-task models (two heads, adapters) and TRADES with one or two BNs, next to table 2's."""
    pairs = [("dual-linear", "hybrid"), ("dual-adapter", "hybrid"), ("bn", "trades"), ("dual-bn", "trades"),
             ("bn", "hybrid"), ("dual-bn", "hybrid")]
    return _eps_grid(frames, pairs, True)


def table_test_time(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 4: the dual-bn hybrid model as trained and under each swap-bn operation found."""
    ev = _eval(frames)
    ev = ev[(ev.norm == "dual-bn") & (ev.loss_name == "hybrid")]
    ops = list(dict.fromkeys(["", CROSS, SWAP_AP, *sorted(set(ev.op), key=op_label)]))
    spec = [s for s in BOTH if s[1] != "AA" or (ev.column == "AA").any()]
    spec += [(b, c) for b in ("adv", "clean") for c in _other_columns(ev)]  # a new list: BOTH stays as it is
    # the train ε of some recombined model, and the paper's 8: at an ε without one, every operation's row would be
    # empty and "as trained" is Table 2's row again
    return pd.DataFrame([{"operation": op_label(op), "train ε": _num(eps),
                          **_cells(ev[(ev.op == op) & (ev.train_eps == eps)], spec)}
                         for eps in _levels(ev.train_eps[ev.op != ""], always=[8]) for op in ops])


def _ns(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    ns = frames.get("nsgap", pd.DataFrame(columns=sorted(SCHEMAS["nsgap"])))
    ns = ns[ns.measure == "wasserstein"].copy()
    ns["fix"] = ns.fix_ap.astype(str).str.strip().str.lower().isin(["true", "1", "1.0"])
    ns["unit"] = _units(ns)
    # the AP gap belongs to the checkpoint, not to an ε: show it beside each ε its NS gap was measured at
    ap, ns = ns[ns.kind == "ap"], ns[ns.kind != "ap"]
    eps_of = ns[["checkpoint_hash", "eps"]].drop_duplicates()
    ap = pd.concat([ap.drop(columns="eps").merge(eps_of, on="checkpoint_hash", how="inner"),
                    ap[~ap.checkpoint_hash.isin(eps_of.checkpoint_hash)]])
    return pd.concat([ns, ap], ignore_index=True)


def ns_pairs(ns: pd.DataFrame) -> tuple[str, str]:
    """The adv and noise pairs of these rows: against the clean batch ("adv-clean", "noise-clean"), or against the
    running NS where that was the reference (`ns-gap --reference running`)."""
    running = "reference" in ns and (ns.reference[ns.kind == "ns"] == "running").any()
    return ("adv-running", "noise-running") if running else ("adv-clean", "noise-clean")


def _ns_specs(ns: pd.DataFrame) -> list[tuple[str, dict]]:
    """(column, match): NS gaps with each domain through its own branch, then all through one branch, then AP."""
    fixed = sorted(set(ns.branch[ns.fix & (ns.kind == "ns")])) or ["adv"]
    settings = [("own branch", {"fix": False})] + [(f"fix-AP {b}", {"fix": True, "branch": b}) for b in fixed]
    specs = [(f"{name}: {pair} {stat}", {"kind": "ns", "pair": pair, "statistic": stat, **match})
             for name, match in settings for stat in ("mean", "std") for pair in ns_pairs(ns)]
    return specs + [(f"AP gap: {stat}", {"kind": "ap", "statistic": stat}) for stat in ("weight", "bias")]


def table_ns_gap(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 5: per layer, 1-D Wasserstein distance between domains' channel NS, and between branches' AP."""
    ns = _ns(frames)
    specs = _ns_specs(ns)
    # only the columns read below: filtering a wide frame once per cell took minutes over a hundred ns-gap CSVs
    ns = ns[list(dict.fromkeys(["norm", "eps", "layer", "layer_name", "unit", "distance",
                                *(col for _, match in specs for col in match)]))]
    rows = [{"norm": norm, "ε": _num(eps), "layer": _num(layer), "name": name,
             **{col: distance_cell(_match(g, **match).groupby("unit").distance.mean()) for col, match in specs}}
            for (norm, eps, layer, name), g in ns.groupby(["norm", "eps", "layer", "layer_name"], dropna=False)]
    return pd.DataFrame(rows, columns=["norm", "ε", "layer", "name", *(col for col, _ in specs)])


TABLES = {"cross-bn": table_cross_bn, "ns-vs-ap": table_ns_vs_ap, "two-task": table_two_task,
          "test-time": table_test_time, "ns-gap": table_ns_gap}
TITLES = {
    "cross-bn": "Table 1. Cross-BN vs Self-BN (hybrid AT; accuracy %, mean ± std over seeds)",
    "ns-vs-ap": "Table 2. Disentangling NS vs AP (hybrid AT; accuracy %, by train ε)",
    "two-task": "Table 3. Two-task hypothesis, next to single and Dual BN (accuracy %, by train ε)",
    "test-time": "Table 4. Test-time Dual BN: the dual-bn hybrid model under swap-bn operations (accuracy %)",
    "ns-gap": "Table 5. NS gap and AP gap by depth (1-D Wasserstein distance over channels; ε: the radius of the "
              "measured adversarial and noisy domains, not the training ε)",
}


def _filled(table: pd.DataFrame) -> pd.DataFrame:
    """The rows with at least one measured cell."""
    cells = [c for c in table.columns if c not in LABELS]
    return table[(table[cells] != MISSING).any(axis=1)] if cells else table


def build_tables(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The five tables. Rows of different trainings (see `label_trainings`) are never averaged: when the data hold
    several, every table is built once per training and the parts are stacked under a leading "training" column
    (rows without any measurement dropped)."""
    frames = label_trainings(frames)
    trainings = sorted(set().union(*(set(f.training) for f in frames.values()))) if frames else []
    if len(trainings) <= 1:
        return {key: make(frames) for key, make in TABLES.items()}
    tables = {}
    for key, make in TABLES.items():
        parts = [_filled(make({k: f[f.training == t] for k, f in frames.items()})).assign(training=t)
                 for t in trainings]
        labels = [part.training.iloc[0] for part in parts if len(part)]
        if labels in ([], [""]):  # the trainings differ only in rows this table does not read (e.g. NS protocols)
            tables[key] = make({k: f[f.training == ""] for k, f in frames.items()})
            continue
        table = pd.concat(parts, ignore_index=True)
        tables[key] = table[["training", *(c for c in table.columns if c != "training")]]
    return tables


# ---- rendering -------------------------------------------------------------------------------------------

def render_markdown(table: pd.DataFrame, title: str) -> str:
    def line(values) -> str:
        return "| " + " | ".join(str(v).replace("|", r"\|") for v in values) + " |"
    rule = "|" + "|".join(":---" if c in LABELS else "---:" for c in table.columns) + "|"
    rows = [line(r) for r in table.itertuples(index=False)]
    return "\n".join([f"## {title}", "", line(table.columns), rule, *rows]) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "ε": r"$\varepsilon$",
        "—": "---", "–": "--", "−": "$-$", "×": r"$\times$", "<": "$<$", ">": "$>$", "β": r"$\beta$",
        "γ": r"$\gamma$", "Δ": r"$\Delta$", "≤": r"$\leq$", "≥": r"$\geq$", "·": r"$\cdot$"}
# Every other non-ASCII character is refused by pdflatex ("not set up for use with LaTeX") or drawn as another glyph
# (< and > in the default OT1 encoding print ¡ and ¿), so each has its math-mode form above.


def _tex(text) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def render_latex(table: pd.DataFrame, title: str) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}) to \\input inside the paper's own table."""
    align = "".join("l" if c in LABELS else "r" for c in table.columns)
    rows = [" & ".join(map(_tex, r)) + r" \\" for r in table.itertuples(index=False)]
    head = " & ".join(map(_tex, table.columns)) + r" \\"
    lines = [f"% {title}", rf"\begin{{tabular}}{{{align}}}", r"\toprule", head, r"\midrule", *rows,
             r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
