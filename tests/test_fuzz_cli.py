"""scripts/fuzz_cli.py (the sweep of every option of every command with hostile values, ~15 minutes, not part of
`make test`) keeps up with the CLI: every parameter of every command gets its cases, and a new option of a type
the sweep does not know fails here rather than there."""

import typer

from hybridat.cli import app

from conftest import script


def _fuzz():
    return script("fuzz_cli")


def test_the_sweep_covers_every_option_of_every_command():
    fuzz = _fuzz()
    cases = list(fuzz.all_cases(None))
    group = typer.main.get_command(app)
    every = {(name, p.name) for name, command in group.commands.items() for p in command.params}
    assert {(c["command"], c["option"]) for c in cases} == every
    assert set(fuzz.BASES) == set(group.commands)
    numbers = [c for c in cases if c["kind"] in ("int", "float")]
    assert numbers and all({"'nan'", "'inf'", "'-1'", "'0'", "'abc'"} <= {c["value"] for c in numbers
                                                                            if c["option"] == o["option"]
                                                                            and c["command"] == o["command"]}
                           for o in numbers)


def test_a_case_replaces_the_option_it_sweeps():
    """The base command's own value of the option is removed, so the hostile value is the only one given."""
    fuzz = _fuzz()
    case = next(c for c in fuzz.all_cases({"ns-gap"}) if c["option"] == "steps" and c["value"] == "'nan'")
    assert case["args"].count("--steps") == 1 and case["args"][-2:] == ["--steps", "nan"]
    case = next(c for c in fuzz.all_cases({"attack"}) if c["option"] == "checkpoint" and c["value"] == "'eval.csv'")
    assert case["args"][:2] == ["attack", "eval.csv"] and "m.safetensors" not in case["args"]
