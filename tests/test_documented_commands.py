"""Every hybridat command a reader copies, from the README's code blocks and from the Makefile's pipelines, parses
on the CLI as it is: a flag renamed in cli.py but not in the docs fails here, not in a reader's terminal. The
README's Python example runs, at a smaller size."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import typer

from hybridat.cli import USAGE_ERROR, app

ROOT = Path(__file__).resolve().parents[1]


def _command(words: list[str]) -> list[str]:
    """A shell line's hybridat arguments, up to its first redirection or operator."""
    words = words[words.index("hybridat") + 1:] if "hybridat" in words else words[1:]
    ends = [i for i, word in enumerate(words) if re.fullmatch(r"\d?[<>|&;].*|&&|\|\|", word)]
    return words[:min(ends, default=len(words))]


def _readme_commands() -> list[list[str]]:
    """The hybridat command lines of the README's ```bash blocks: continuations joined, comments dropped, shell
    variables given their value (`M=...`, or the first value of `for NAME in ...`)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        values: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            if m := re.match(r"\s*(\w+)=(\S+)\s*$", line):
                values[m[1]] = m[2]
            if m := re.match(r"\s*for (\w+) in (\S+)", line):
                values[m[1]] = m[2]
            line = re.sub(r"\$\{?(\w+)\}?", lambda v: values.get(v[1], v[0]), line)
            words = shlex.split(line, comments=True)
            if "hybridat" in words:
                commands.append(_command(words))
    return commands


def _make_commands() -> list[list[str]]:
    """The hybridat command lines `make -n -B` prints for every pipeline (nothing runs)."""
    commands = []
    for target in ("demo", "mini", "study", "tables", "bench"):
        result = subprocess.run(["make", "--no-print-directory", "-n", "-B", target], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        for line in result.stdout.replace("\\\n", " ").splitlines():
            if line.startswith(".venv/bin/hybridat "):
                commands.append(_command(shlex.split(line, comments=True)))
    return commands


def _parses(words: list[str]) -> None:
    """Parse a command line as the CLI would, without running the command."""
    commands = typer.main.get_command(app).commands
    assert words[0] in commands, f"no command {words[0]!r} (of {', '.join(commands)})"
    commands[words[0]].make_context(words[0], list(words[1:]))


def test_the_readme_shows_each_command_with_its_flags():
    commands = _readme_commands()
    shown = {words[0] for words in commands}
    assert {"train", "attack", "swap-bn", "ns-gap", "report", "info", "import", "export", "bench"} <= shown
    assert any(words[0] == "import" and "--input-mean" in words for words in commands)  # a continued line, joined


@pytest.mark.parametrize("words", _readme_commands(), ids=shlex.join)
def test_every_command_of_the_readme_parses(words):
    _parses(words)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_every_command_of_the_makefile_parses():
    commands = _make_commands()
    assert {"train", "attack", "swap-bn", "ns-gap", "report", "bench"} <= {words[0] for words in commands}
    for words in commands:
        _parses(words)


def test_a_redirection_ends_the_command():
    assert _command(shlex.split("hybridat report runs --out r > /dev/null 2>&1")) == ["report", "runs", "--out", "r"]
    assert _command(shlex.split(".venv/bin/hybridat info m 2>log && echo ok")) == ["info", "m"]


def test_a_renamed_flag_is_caught():
    with pytest.raises(USAGE_ERROR, match="No such option: --stepz"):
        _parses(["attack", "m.safetensors", "--stepz", "10", "--out", "e.csv"])
    with pytest.raises(typer.BadParameter):
        _parses(["attack", "m.safetensors", "--n", "many", "--out", "e.csv"])


# the README's sizes -> a toy size, each found exactly once (a README example resized goes on being checked)
TOY_SIZES = {"epochs=2, train_subset=1024, batch_size=64": "epochs=1, train_subset=64, batch_size=32",
             "width=0.125": "width=0.0625", "n=500": "n=48",
             "test.images[:256]), test.labels[:256]": "test.images[:32]), test.labels[:32]"}


def test_the_readme_python_example_runs(tmp_path, data_dir):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1
    code = blocks[0]
    for size, toy in TOY_SIZES.items():
        assert code.count(size) == 1, size
        code = code.replace(size, toy)
    (tmp_path / "example.py").write_text(code)
    env = {**os.environ, "HYBRIDAT_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder in ("runs/dual-bn", "derived/swap-ap"):
        rows = pd.read_csv(tmp_path / folder / "eval.csv")
        assert sorted(zip(rows.branch, rows.attack)) == [("adv", "clean"), ("adv", "pgd"), ("clean", "clean"),
                                                         ("clean", "pgd")]
        assert (rows.n == 48).all()
    assert pd.read_csv(tmp_path / "runs/dual-bn/train.csv").epoch.tolist() == [1]
    ns = pd.read_csv(tmp_path / "nsgap/fixap.csv").query("kind == 'ns'")  # (also: the AP gap rows)
    assert ns.fix_ap.all() and (ns.eps == 16).all() and {"adv-clean", "noise-clean"} <= set(ns.pair)
    # what the example prints: finding (4) read from the swapped model's rows, the figures written
    assert "swap-AP − as trained, ε=8, adv branch PGD-10" in proc.stdout
    assert "report/ns-gap.png" in proc.stdout and (tmp_path / "report" / "ns-gap.png").is_file()
