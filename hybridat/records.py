"""Reading the tidy CSVs: `load_runs`, the columns that tell an eval, train or ns-gap CSV apart (SCHEMAS), and the
checks that refuse a row `report` would misread (empty, unknown or impossible cells; two models as one seed).

The rows -> tables part is in tables.py, the figures in figures.py, the `report` command's files in report.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .analysis import DOMAIN_SETTINGS, MEASURES, PROTOCOL, PROTOCOL_DEFAULTS
from .checkpoint import TRAINING_COLUMNS, is_torch_save
from .errors import HybridatError
from .evaluate import ROW_ATTACKS
from .files import as_path
from .models import ARCHS
from .norms import BRANCHES, NORMS
from .train import LOSSES

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


# ---- reading ---------------------------------------------------------------------------------------------

def load_runs(paths: list[Path], sources: list[Path] | None = None) -> dict[str, pd.DataFrame]:
    """Read the eval, train and ns-gap CSVs among `paths` (files, or folders searched recursively).

    A file named directly must match a known schema; other CSVs found in a folder (raw per-channel NS, an
    earlier report) are skipped. Returns {"eval" | "train" | "nsgap": all rows of that kind} for kinds found.
    """
    if isinstance(paths, (str, Path)):  # one path, not a list of one-character paths ("/" searched the disk)
        paths = [paths]
    try:
        paths = list(paths)
    except TypeError:  # None, a number: Python's TypeError from the loop
        raise HybridatError(f"paths must be a list of CSV files or folders, got {type(paths).__name__}") from None
    if sources is not None and not isinstance(sources, list):  # it collects the files read: an AttributeError
        raise HybridatError(f"sources must be a list (load_runs appends each file read), got "
                            f"{type(sources).__name__}")
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
    twin = (same[clash.index] == same[clash.index[0]]) & (clash.checkpoint_hash != first.checkpoint_hash)
    other = clash[twin].iloc[0]
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


CSV_ERRORS = (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError)  # an unreadable CSV


def kind_of(columns) -> str | None:
    """The kind of rows (a key of SCHEMAS) a CSV with these columns holds; None for no known schema."""
    return next((kind for kind, cols in SCHEMAS.items() if cols <= set(columns)), None)


def _not_text(file: Path) -> str:
    """What a file named where a CSV is meant is, where its first bytes tell (a checkpoint, a figure); "" else."""
    try:
        with open(file, "rb") as f:
            head, size = f.read(16), file.stat().st_size
    except OSError:
        return ""  # pandas says why
    if is_torch_save(head):
        return "a PyTorch file (torch.save), not a CSV; measure a model with `hybridat attack` or `ns-gap` first"
    if len(head) > 9 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < size:  # header size, JSON
        return "a safetensors file (a checkpoint?), not a CSV; measure a model with `hybridat attack` or `ns-gap` " \
               "first"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "a PNG image, not a CSV"
    return ""


def _read(file: Path) -> tuple[str | None, pd.DataFrame]:
    if kind := _not_text(file):
        raise HybridatError(f"{file} is {kind}")
    try:
        frame = pd.read_csv(file, dtype=str, keep_default_na=False)  # empty stays "", numbers converted later
    except CSV_ERRORS as e:
        raise HybridatError(f"{file} is not a readable CSV ({type(e).__name__}: {e})".strip()) from None
    return kind_of(frame.columns), frame


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    for col in NUMERIC & set(frame.columns):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


# ---- settings as text (tables.py groups by them too) -----------------------------------------------------

def _value(v) -> str:
    """A setting as text, the same however it was written ("2", "2.0" -> "2"; "True" -> "true"; missing -> "?")."""
    if v is None or (isinstance(v, float) and pd.isna(v)) or str(v).strip() == "":
        return "?"
    try:
        return f"{float(v):g}"
    except (TypeError, ValueError):
        return str(v).strip().lower()


def _op_key(operation) -> str:
    """Canonical form of a swap-bn operation (its JSON with sorted keys); "" for a trained model."""
    if not isinstance(operation, str) or not operation.strip():
        return ""
    try:
        return json.dumps(json.loads(operation), sort_keys=True)
    except json.JSONDecodeError:
        return operation.strip()
