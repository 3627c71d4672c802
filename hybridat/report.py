"""Tidy CSVs -> the paper's five tables (Markdown, LaTeX, CSV) and the NS-gap plot.

`report` only reads and aggregates what `attack`, `train` and `ns-gap` wrote: it never recomputes a number
and never opens a model. A cell is the mean ± sample std over seeds with n shown; a cell without rows is "—".
"""

from __future__ import annotations

import json
import math
import textwrap
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.table import Table
from rich.text import Text

from .analysis import DOMAIN_SETTINGS, FIRST, MEASURES, PROTOCOL, PROTOCOL_DEFAULTS, SECOND, protocol_text
from .checkpoint import TRAINING_COLUMNS
from .files import as_path, atomic_path, check_outputs, same_file
from .errors import HybridatError, check_number
from .evaluate import ROW_ATTACKS, aa_columns, attack_label
from .models import ARCHS
from .norms import BRANCHES, NORMS
from .train import LOSSES

MISSING = "—"

# The columns that identify each kind of CSV (a file may carry more).
SCHEMAS = {
    "eval": {"checkpoint_hash", "parent_hash", "operation", "norm", "arch", "width", "seed", "train_eps",
             "loss_name", "branch", "attack", "eps", "steps", "accuracy"},
    "train": {"run", "seed", "norm", "loss_name", "eps", "epoch", "loss", "acc_adv", "acc_clean", "seconds"},
    "nsgap": {"checkpoint_hash", "seed", "norm", "kind", "layer", "layer_name", "pair", "statistic", "measure",
              "distance", "fix_ap", "branch", "eps"},
}
NUMERIC = {"width", "seed", "train_eps", "eps", "step", "steps", "n", "accuracy", "seconds", "eval_seed", "images",
           "aa_restarts", "aa_eot_iter",
           "loss", "loss_adv", "acc_adv", "loss_clean", "acc_clean", "epoch", "lr", "images_per_s", "layer",
           "distance"}
LABELS = {"training", "norm", "loss", "train ε", "operation", "ε", "layer", "name", "claim", "comparison", "metric",
          "claimed", "verdict"}  # row labels; the rest are cells
# What identifies a training besides the tables' own keys (norm, loss, train ε) and the seed: rows that differ in
# any of these are never averaged into one cell. ns-gap tables have no loss / train ε key, so there they count too,
# and so does how the NS were measured (analysis.PROTOCOL): rows measured differently never share a cell or a line.
SETTING_COLUMNS = tuple(dict.fromkeys(("dataset", "arch", "width", *TRAINING_COLUMNS)))  # dataset is a training column too
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


# ---- reading ---------------------------------------------------------------------------------------------

def load_runs(paths: list[Path], sources: list[Path] | None = None) -> dict[str, pd.DataFrame]:
    """Read the eval, train and ns-gap CSVs among `paths` (files, or folders searched recursively).

    A file named directly must match a known schema; other CSVs found in a folder (raw per-channel NS, an
    earlier report) are skipped. Returns {"eval" | "train" | "nsgap": all rows of that kind} for kinds found.
    """
    if isinstance(paths, (str, Path)):  # one path, not a list of one-character paths ("/" searched the disk)
        paths = [paths]
    found: dict[str, list[pd.DataFrame]] = {kind: [] for kind in SCHEMAS}
    seen: set[Path] = set()
    for path in (as_path(p, "each path of load_runs") for p in paths):
        if not path.exists():
            raise HybridatError(f"no such file or folder: {path}")
        for file in sorted(path.rglob("*.csv")) if path.is_dir() else [path]:
            if not file.is_file() or file.resolve() in seen:
                continue
            seen.add(file.resolve())
            kind, frame = _read(file)
            if kind is None and not path.is_dir():
                raise HybridatError(f"{file} is not an eval, train or ns-gap CSV: its columns match no known schema")
            if kind == "nsgap":  # a CSV from before the protocol columns was measured as PROTOCOL_DEFAULTS say
                for col, default in PROTOCOL_DEFAULTS.items():
                    if col not in frame:
                        frame[col] = str(default)
            if kind is not None:
                _check_accuracies(file, frame)
                _check_cells(file, kind, frame)
                found[kind].append(frame.assign(**{SOURCE: str(file)}))
                if sources is not None:
                    sources.append(file)
    if not any(found.values()):
        raise HybridatError(f"found no eval, train or ns-gap CSV in {', '.join(map(str, paths))}")
    if not any(len(f) for frames in found.values() for f in frames):
        raise HybridatError(f"the CSVs in {', '.join(map(str, paths))} hold a header but no rows: nothing to report")
    frames = {kind: pd.concat(frames, ignore_index=True) for kind, frames in found.items() if frames}
    for kind, frame in frames.items():
        _check_one_model_per_seed(kind, frame)
    return {kind: _numeric(frame.drop(columns=SOURCE)) for kind, frame in frames.items()}


SOURCE = "__file"  # the CSV a row was read from, while load_runs checks the rows
# What one measurement of one trained model is keyed by: rows alike in all of these but of different checkpoints
# would be averaged as one seed's value (a model changed on disk since its CSV was written, an unfinished run's
# last.safetensors evaluated beside its model.safetensors, two runs of one seed).
SAME_MEASUREMENT = {
    "eval": ("dataset", "arch", "width", "norm", "loss_name", "train_eps", "seed", *TRAINING_COLUMNS, "operation",
             "branch", "attack", "steps", "step", "eps", "aa_attacks", "aa_restarts", "attack_precision"),
    "nsgap": ("dataset", "arch", "width", "norm", "loss_name", "train_eps", "seed", *TRAINING_COLUMNS, "operation",
              "kind", "layer", "pair", "statistic", "measure", "fix_ap", "branch", "eps", *PROTOCOL,
              *DOMAIN_SETTINGS),
}


def _key_text(frame: pd.DataFrame, key: list[str]) -> pd.Series:
    """Each row's values in `key` as one text, for grouping rows alike in all of them ("8", "8.0": one value)."""
    if frame.empty:  # agg over no rows gives a frame, not a series (rows without a seed: an imported model's)
        return pd.Series("", index=frame.index, dtype=str)
    return frame[key].astype(str).apply(lambda col: col.map(_value)).agg("|".join, axis=1)


def _check_one_model_per_seed(kind: str, frame: pd.DataFrame) -> None:
    """One line naming both CSVs when rows of one setting, seed and measurement come from two checkpoints."""
    if kind not in SAME_MEASUREMENT or frame.empty:
        return
    frame = frame[frame.seed.astype(str).str.strip() != ""]  # no seed: every checkpoint is its own unit anyway
    key = [c for c in dict.fromkeys(SAME_MEASUREMENT[kind]) if c in frame]
    if "operation" in key:
        frame = frame.assign(operation=frame.operation.map(_op_key))
    same = _key_text(frame, key)
    clash = frame[frame.groupby(same).checkpoint_hash.transform("nunique") > 1]
    if clash.empty:
        return
    first = clash.iloc[0]
    other = clash[(same[clash.index] == same[clash.index[0]]) & (clash.checkpoint_hash != first.checkpoint_hash)].iloc[0]
    unfinished = [f"{r.checkpoint_hash} is an unfinished run's" for r in (first, other)
                  if str(r.get("unfinished", "")).lower() == "true"]
    raise HybridatError(
        f"{first[SOURCE]} and {other[SOURCE]} hold rows of two checkpoints ({first.checkpoint_hash}, "
        f"{other.checkpoint_hash}{'; ' + unfinished[0] if unfinished else ''}) for one setting and seed "
        f"({first.norm}, seed {first.seed}, {kind} rows alike in every setting): report would average two models "
        "as one seed. Keep the CSV of the model you mean (was the checkpoint changed after it was evaluated?)")


ACCURACIES = ("accuracy", "acc_adv", "acc_clean")


def _check_accuracies(file: Path, frame: pd.DataFrame) -> None:
    """Every accuracy is a number in [0, 1]: an empty, NaN or text value would silently drop a seed from its cell.
    (A train row leaves the accuracy of a branch it does not train empty: `--loss clean` has no acc_adv.)"""
    for col in sorted(set(ACCURACIES) & set(frame.columns)):
        values = pd.to_numeric(frame[col], errors="coerce")
        unset = (frame[col].astype(str).str.strip() == "") & (col != "accuracy")
        bad = values[(values.isna() & ~unset) | (values < 0) | (values > 1)]
        if len(bad):
            i = bad.index[0]
            raise HybridatError(f"{file}: {col} must lie in [0, 1], got {frame[col][i]!r} (row {i + 2})"
                                if pd.isna(values[i]) else
                                f"{file}: {col} must lie in [0, 1], got {bad.iloc[0]} (row {i + 2})")


# What every row of a kind must hold: text that is not empty, and numbers (finite). A row without them was grouped
# as a setting "?" (an eps of NaN made a cell of its own, a pgd row without steps a "PGD-None" column).
REQUIRED_TEXT = {"eval": ("checkpoint_hash", "norm", "arch", "branch", "attack"),
                 "nsgap": ("checkpoint_hash", "norm", "kind", "pair", "statistic", "measure"),  # AP rows: no branch
                 "train": ("run", "norm", "loss_name")}
REQUIRED_NUMBERS = {"eval": ("width", "eps"), "nsgap": ("layer", "distance"), "train": ("eps", "epoch")}  # AP: no ε
# the names a text cell may hold ("" where a setting may not apply): what the commands write, lower-cased
CHOICES = {
    "eval": {"norm": tuple(NORMS), "arch": tuple(ARCHS), "branch": BRANCHES, "attack": ROW_ATTACKS,
             "loss_name": ("", *LOSSES)},
    "nsgap": {"norm": tuple(NORMS), "arch": tuple(ARCHS), "kind": ("ns", "ap"),
              "statistic": ("mean", "std", "weight", "bias"), "measure": tuple(MEASURES),
              "fix_ap": ("true", "false", ""), "branch": ("adv", "clean", "own", ""), "loss_name": ("", *LOSSES)},
    "train": {"norm": tuple(NORMS), "arch": tuple(ARCHS), "loss_name": tuple(LOSSES)},
}
CELL_RANGES = {"eps": (0, 255, False), "train_eps": (0, 255, False), "step": (0, 255, False),
               "width": (0, 16, False), "steps": (0, math.inf, True), "n": (1, math.inf, True),
               "layer": (0, math.inf, True), "epoch": (1, math.inf, True), "seed": (0, math.inf, True),
               "distance": (0, math.inf, False)}  # (low, high, integer) of what the commands write
MAY_DIVERGE = {"loss", "loss_adv", "loss_clean"}  # a diverged epoch's loss is NaN or inf, and its row is kept


def _check_cells(file: Path, kind: str, frame: pd.DataFrame) -> None:
    """One line naming the file, column and row of the first cell that is empty where every row has a value, or
    not a finite number in a numeric column (an empty numeric cell elsewhere is a setting that does not apply)."""
    def where(col: str, i) -> str:
        return f"{file}: {col} {{}} (row {i + 2})"

    text = {col: frame[col].astype(str).str.strip() for col in frame.columns}
    for col in REQUIRED_TEXT[kind] + REQUIRED_NUMBERS[kind]:
        empty = text[col][text[col] == ""]
        if len(empty):
            raise HybridatError(where(col, empty.index[0]).format(f"is empty; every {kind} row has one"))
    for col, names in CHOICES[kind].items():
        if col not in frame:
            continue
        unknown = text[col][~text[col].str.lower().isin(names)]
        if len(unknown):
            i = unknown.index[0]
            named = ", ".join(n or "empty" for n in names)
            raise HybridatError(where(col, i).format(f"{frame[col][i]!r} is none of {named}"))
    if kind == "eval":
        steps = text.get("steps")
        if steps is not None:
            unset = steps[(frame["attack"].str.strip() == "pgd") & (steps == "")]
            if len(unset):
                raise HybridatError(where("steps", unset.index[0]).format("is empty in a pgd row"))
    for col in sorted((NUMERIC - MAY_DIVERGE - set(ACCURACIES)) & set(frame.columns)):
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = values[(text[col] != "") & ~values.map(lambda v: pd.notna(v) and math.isfinite(v))]
        if len(bad):
            i = bad.index[0]
            raise HybridatError(where(col, i).format(f"must be a finite number, got {frame[col][i]!r}"))
        if col in CELL_RANGES:  # and a possible one: no stage writes a negative ε, 2.5 PGD steps or layer -1
            low, high, integer = CELL_RANGES[col]
            wrong = values[(text[col] != "") & ((values < low) | (values > high) | (values % 1 != 0 if integer
                                                                                      else False))]
            if len(wrong):
                i = wrong.index[0]
                what = f"{'an integer' if integer else 'a number'} in [{low:g}, {high:g}]"
                raise HybridatError(where(col, i).format(f"must be {what}, got {frame[col][i]!r}"))


def _read(file: Path) -> tuple[str | None, pd.DataFrame]:
    try:
        frame = pd.read_csv(file, dtype=str, keep_default_na=False)  # empty stays "", numbers converted later
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise HybridatError(f"{file} is not a readable CSV ({type(e).__name__}: {e})".strip()) from None
    return next((kind for kind, cols in SCHEMAS.items() if cols <= set(frame.columns)), None), frame


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    for col in NUMERIC & set(frame.columns):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


# ---- trainings ------------------------------------------------------------------------------------------

def _value(v) -> str:
    """A setting as text, the same however it was written ("2", "2.0" -> "2"; "True" -> "true"; missing -> "?")."""
    if v is None or (isinstance(v, float) and pd.isna(v)) or str(v).strip() == "":
        return "?"
    try:
        return f"{float(v):g}"
    except (TypeError, ValueError):
        return str(v).strip().lower()


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


def _op_key(operation) -> str:
    """Canonical form of a swap-bn operation (its JSON with sorted keys); "" for a trained model."""
    if not isinstance(operation, str) or not operation.strip():
        return ""
    try:
        return json.dumps(json.loads(operation), sort_keys=True)
    except json.JSONDecodeError:
        return operation.strip()


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
    # --cross twice, --ns adv=adv: the same hash) is still its operation's row, never the parent's
    ev = ev[_at_train_eps(ev)].drop_duplicates(["checkpoint_hash", "op", "branch", "column"], keep="last")
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
    return pd.DataFrame([{"operation": op_label(op), "train ε": _num(eps),
                          **_cells(ev[(ev.op == op) & (ev.train_eps == eps)], spec)}
                         for eps in _levels(ev.train_eps, always=[8]) for op in ops])


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


# ---- figures ---------------------------------------------------------------------------------------------

MAX_PANELS = 8  # rows of ns-gap.png, panels of accuracy.png: past this a figure is a wall no one reads
MAX_CURVES = 10  # curves of training.png: one colour each in matplotlib's default cycle
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


def _accuracy_panel(ax, g: pd.DataFrame, bars: list, narrow: bool) -> None:
    variants = list(dict.fromkeys(g.variant))
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
            ax.plot(mean.index, mean.values, marker="o", ms=3, color=f"C{k % 10}", label=label)
        ax.set(title=title, xlabel="epoch", ylabel=unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs, also for a 1-epoch run
        if not tr[col].notna().any():
            _say_empty(ax, "no values: the loss does not train this branch")
    # below the panels, never over the curves (a legend of long training labels covered the loss panel)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=ncol, fontsize=7)
    _say_left_out(fig, note, top=True)
    return fig


FIGURES = {"accuracy.png": plot_accuracy, "training.png": plot_training}


def report_files(out_dir: Path) -> list[Path]:
    """Every file `write_report` may write into out_dir."""
    names = [f"{key}.{ext}" for key in ["findings", *TITLES] for ext in ("md", "tex", "csv")]
    names += ["report.md", "summary.txt", "ns-gap.png", *FIGURES]
    return [Path(out_dir) / name for name in names]


def check_frames(frames) -> None:
    """One line unless `frames` is what `load_runs` gives: {kind: DataFrame} with kinds of SCHEMAS, each frame
    holding its kind's columns, some rows in all (a typo of a kind left its rows out of a report of empty tables)."""
    if not isinstance(frames, dict) or not any(len(f) for f in frames.values()):
        raise HybridatError("no rows to report: give write_report the frames of load_runs(paths)")
    for kind, frame in frames.items():
        if kind not in SCHEMAS:
            raise HybridatError(f"unknown kind of rows {kind!r}; load_runs gives {', '.join(SCHEMAS)}")
        if not isinstance(frame, pd.DataFrame):
            raise HybridatError(f"{kind} rows must be a pandas DataFrame (load_runs gives them), got "
                                f"{type(frame).__name__}")
        missing = sorted(SCHEMAS[kind] - set(frame.columns))
        if missing:
            raise HybridatError(f"{kind} rows lack the column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


def check_report_out(out_dir: Path, inputs=()) -> None:
    """Raise one line unless out_dir can take the report without writing over any input (e.g. a CSV it reads)."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise HybridatError(f"{out_dir} is a file; --out takes a folder")
    check_outputs(report_files(out_dir), inputs)


def check_no_measurements(out_dir: Path) -> None:
    """Raise one line if a file the report would write in out_dir holds measurements (eval, train or ns-gap rows),
    read or not: from Python, `write_report` knows what `load_runs` read only where `inputs` says so."""
    for path in report_files(out_dir):
        kind = _measured(path) if path.suffix == ".csv" and path.is_file() else None
        if kind is not None:
            raise HybridatError(f"{path} holds {KIND_NAMES[kind]} rows, not a report's table: the report would write "
                                "over them; choose another folder")


KIND_NAMES = {"eval": "eval", "train": "train", "nsgap": "ns-gap"}


def _measured(file: Path) -> str | None:
    """The kind of rows a CSV holds by its header (None: no known schema, or no readable CSV)."""
    try:
        columns = set(pd.read_csv(file, nrows=0).columns)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    return next((kind for kind, cols in SCHEMAS.items() if cols <= columns), None)


def write_report(frames: dict[str, pd.DataFrame], out_dir: Path, margin: float = 2.0,
                 ratio_margin: float = 1.5, inputs=()) -> list[Path]:
    """Write findings.md/.tex/.csv, <key>.md, <key>.tex and <key>.csv per table, report.md (findings, then every
    table), the figures that have data (accuracy.png, training.png, ns-gap.png), and summary.txt: what `report`
    prints, the findings in short and where the rest is. Everything is rendered before the first file is written;
    all files are written to temp files, then renamed (a failure leaves an earlier report whole); none over a file of
    `inputs` (the CSVs read: `load_runs(..., sources=inputs)`) or over any CSV of measurements.
    A figure an earlier report left in out_dir that this one has no rows for is removed (other files stay).
    margin, ratio_margin: see `findings.findings`. Returns the paths written."""
    from .findings import WIDTH, findings, findings_latex, findings_markdown, summary_lines

    out_dir = Path(out_dir)
    check_frames(frames)
    check_number("margin", margin, 0)  # as the command checks --margin and --ratio-margin
    check_number("ratio margin", ratio_margin, 1)
    check_report_out(out_dir, inputs)
    check_no_measurements(out_dir)  # an ns-gap.csv of rows beside the report was replaced by its ns-gap table
    found = findings(frames, margin, ratio_margin)
    tables = build_tables(frames)
    files: dict[str, str | pd.DataFrame | Figure] = {
        "findings.md": findings_markdown(found), "findings.tex": findings_latex(found), "findings.csv": found}
    for key, table in tables.items():
        files |= {f"{key}.md": render_markdown(table, TITLES[key]), f"{key}.tex": render_latex(table, TITLES[key]),
                  f"{key}.csv": table}
    missing = left_out(frames)
    note = f"{LEFT_OUT_HEADER}: {'; '.join(missing)}." if missing else ""
    files["report.md"] = "# hybridat report\n\n" + "\n".join(files[f"{k}.md"] for k in ["findings", *tables])
    if note:
        files["report.md"] += f"\n## Not in the tables\n\n{note}\n"
    figures = {name: fig for name, make in [*FIGURES.items(), ("ns-gap.png", plot_ns_gap)]
               if (fig := make(frames)) is not None}
    files |= figures
    drawn = [line for name, fig in figures.items() if (said := figure_note(fig))  # what a figure leaves out
             for line in textwrap.wrap(f"{name}: {said}", WIDTH, initial_indent="    ", subsequent_indent="    ",
                                       break_on_hyphens=False)]
    files["summary.txt"] = "\n".join(
        ["Findings (paired over seeds, 95 % interval; details and rules in findings.md)", *summary_lines(found), "",
         *(textwrap.wrap(note, WIDTH, subsequent_indent="    ", break_on_hyphens=False) + [""] if note else []),
         f"Tables:  {out_dir / 'report.md'} (also .md, .tex, .csv per table)",
         f"Figures: {', '.join(str(out_dir / n) for n in figures) or 'none (no rows to plot)'}", *drawn]) + "\n"
    # every file to its temp file first, then all renamed: a failure (a full disk, Ctrl-C) while writing leaves the
    # earlier report in out_dir as it was, never some of its tables beside some of this one's
    with ExitStack() as stack:
        for name, content in files.items():
            tmp = stack.enter_context(atomic_path(out_dir / name))
            if isinstance(content, pd.DataFrame):
                content.to_csv(tmp, index=False)
            elif isinstance(content, str):
                tmp.write_text(content, encoding="utf-8")
            else:
                content.savefig(tmp, format="png", dpi=150)  # the temp name ends in .tmp: say the format
    written = [out_dir / name for name in files]
    for stale in report_files(out_dir):  # an earlier report's figure left beside this one would pass for its own
        if stale not in written and stale.is_file() and not any(same_file(stale, i) for i in inputs):
            stale.unlink()
    return written


def print_tables(tables: dict[str, pd.DataFrame], console) -> None:
    """Each table as a rich Table on `console` (a rich.console.Console)."""
    for key, table in tables.items():
        view = Table(title=TITLES.get(key, key))
        for col in table.columns:  # Text: values from CSVs are shown as they are, never read as rich markup
            view.add_column(Text(str(col)), justify="left" if col in LABELS else "right")
        for row in table.itertuples(index=False):
            view.add_row(*(Text(str(v)) for v in row))
        console.print(view)
