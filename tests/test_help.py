"""The --help of every command is a newcomer's reference: every flag and argument says what it does, and every
radius or step says its unit (pixel units: 8 = 8/255), as the README's Conventions do."""

import typer

from hybridat.cli import app


def _params():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            yield name, param


def test_every_flag_and_argument_of_every_command_has_a_help_text():
    bare = [f"{name} {param.name}" for name, param in _params() if not (getattr(param, "help", None) or "").strip()]
    assert bare == []


def test_every_radius_and_step_flag_states_its_unit():
    sized = [(name, param) for name, param in _params() if param.name in ("eps", "step")]
    assert {name for name, _ in sized} == {"train", "attack", "swap-bn", "ns-gap", "import"}
    vague = [f"{name} --{param.name}" for name, param in sized if "pixel units" not in param.help]
    assert vague == []


def test_no_help_text_points_at_a_file_outside_the_repository():
    """SPEC.md lives beside the project, not in it: a user of the package never has it."""
    group = typer.main.get_command(app)
    texts = [group.help or ""] + [c.help or "" for c in group.commands.values()]
    texts += [getattr(p, "help", None) or "" for _, p in _params()]
    assert not [t for t in texts if "SPEC" in t]


def test_the_command_list_shows_each_command_s_help_as_one_paragraph():
    """`hybridat --help` lists each command with its docstring's first paragraph, its source line breaks gone (the
    listing kept them, and broke lines mid-sentence)."""
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        first = command.help.split("\n\n")[0]
        assert command.short_help == " ".join(first.split()) and "\n" not in command.short_help, name


def test_version_prints_hybridat_torch_and_python_versions_and_exits_0():
    import subprocess
    import sys

    import torch

    from hybridat import __version__

    done = subprocess.run([sys.executable, "-m", "hybridat", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"hybridat {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})\n"
