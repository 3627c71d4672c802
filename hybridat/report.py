"""`report`: tidy CSVs -> the Findings, the paper's five tables (Markdown, LaTeX, CSV), the figures and summary.txt.

`report` only reads and aggregates what `attack`, `train` and `ns-gap` wrote: it never recomputes a number
and never opens a model. This module writes the files (`write_report`); reading the CSVs is in records.py
(`load_runs`, importable from here too), the tables in tables.py, the figures in figures.py, the claims in
findings.py.
"""

from __future__ import annotations

import textwrap
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
from . import mpl  # noqa: F401  (first: a $MPLBACKEND matplotlib refuses is set aside)
from matplotlib.figure import Figure
from rich.table import Table
from rich.text import Text

from .errors import HybridatError, check_number
from .figures import figure_note, plot_accuracy, plot_ns_gap, plot_training
from .files import as_path, atomic_path, check_outputs, same_file
from .findings import WIDTH, findings, findings_latex, findings_markdown, summary_lines
# load_runs is not used here: `hybridat.report.load_runs`, then `write_report` is how the README and cli.py report
from .records import CSV_ERRORS, SCHEMAS, kind_of, load_runs  # noqa: F401
from .tables import LABELS, LEFT_OUT_HEADER, TITLES, build_tables, left_out, render_latex, render_markdown


FIGURES = {"accuracy.png": plot_accuracy, "training.png": plot_training}


def report_files(out_dir: Path) -> list[Path]:
    """Every file `write_report` may write into out_dir."""
    names = [f"{key}.{ext}" for key in ["findings", *TITLES] for ext in ("md", "tex", "csv")]
    names += ["report.md", "summary.txt", "ns-gap.png", *FIGURES]
    return [Path(out_dir) / name for name in names]


def check_frames(frames) -> None:
    """One line unless `frames` is what `load_runs` gives: {kind: DataFrame} with kinds of SCHEMAS, each frame
    holding its kind's columns, some rows in all (a typo of a kind left its rows out of a report of empty tables)."""
    if not isinstance(frames, dict):
        raise HybridatError("no rows to report: give write_report the frames of load_runs(paths)")
    for kind, frame in frames.items():  # each frame's type first: {"eval": None} ended in len()'s TypeError
        if kind not in SCHEMAS:
            raise HybridatError(f"unknown kind of rows {kind!r}; load_runs gives {', '.join(SCHEMAS)}")
        if not isinstance(frame, pd.DataFrame):
            raise HybridatError(f"{kind} rows must be a pandas DataFrame (load_runs gives them), got "
                                f"{type(frame).__name__}")
    if not any(len(f) for f in frames.values()):
        raise HybridatError("no rows to report: give write_report the frames of load_runs(paths)")
    for kind, frame in frames.items():
        missing = sorted(SCHEMAS[kind] - set(frame.columns))
        if missing:
            raise HybridatError(f"{kind} rows lack the column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if "eval" in frames:  # as load_runs checks a file's: a NaN accuracy (rows made in Python) left its seed out
        accuracy = pd.to_numeric(frames["eval"]["accuracy"], errors="coerce")
        bad = accuracy[accuracy.isna() | (accuracy < 0) | (accuracy > 1)]
        if len(bad):
            raise HybridatError(f"the eval rows' accuracy must lie in [0, 1], got "
                                f"{frames['eval']['accuracy'][bad.index[0]]} (row {bad.index[0]})")


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
        return kind_of(pd.read_csv(file, nrows=0).columns)
    except CSV_ERRORS:
        return None


def write_report(frames: dict[str, pd.DataFrame], out_dir: Path, margin: float = 2.0,
                 ratio_margin: float = 1.5, inputs=()) -> list[Path]:
    """Write findings.md/.tex/.csv, <key>.md, <key>.tex and <key>.csv per table, report.md (findings, then every
    table), the figures that have data (accuracy.png, training.png, ns-gap.png), and summary.txt: what `report`
    prints, the findings in short and where the rest is. Everything is rendered before the first file is written;
    all files are written to temp files, then renamed (a failure leaves an earlier report whole); none over a file of
    `inputs` (the CSVs read: `load_runs(..., sources=inputs)`) or over any CSV of measurements.
    A figure an earlier report left in out_dir that this one has no rows for is removed (other files stay).
    margin, ratio_margin: see `findings.findings`. Returns the paths written."""

    out_dir = as_path(out_dir, "out_dir")
    check_frames(frames)
    check_number("margin", margin, 0, 100)  # percentage points; as the command checks --margin and --ratio-margin
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
