"""From the paper authors' checkpoints to the paper's questions: `import --seed --loss --eps` records how a foreign
model was trained, so `report` sets its accuracy rows in the tables and Findings beside trained ones (without
them an imported model's rows record no loss, ε or seed, and report lists them among the rows no table shows)."""

import pytest
import torch
from typer.testing import CliRunner

import hybridat
from hybridat.cli import app
from hybridat.data import load_split
from hybridat.errors import HybridatError
from hybridat.evaluate import evaluate
from hybridat.report import build_tables, load_runs

from foreign_models import AuthorsResNet18, randomize

runner = CliRunner()


def authors_file(tmp_path, kind="dual-bn", seed=0):
    torch.manual_seed(seed)
    path = tmp_path / f"authors-{kind}-s{seed}.pt"
    torch.save(randomize(AuthorsResNet18(kind, 0.125), seed).state_dict(), path)
    return path


def test_import_records_the_training_it_is_told(tmp_path):
    out = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["import", str(authors_file(tmp_path)), "--layout", "authors-dual-bn", "--seed", "3",
                                 "--loss", "hybrid", "--eps", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    ckpt = hybridat.load_checkpoint(out)
    assert ckpt.row_ids()["seed"] == 3 and ckpt.row_ids()["train_eps"] == 16 and ckpt.row_ids()["loss_name"] == "hybrid"
    assert ckpt.train["dataset"] == "cifar10"
    bare = hybridat.import_checkpoint(authors_file(tmp_path), tmp_path / "bare.safetensors")
    ids = hybridat.load_checkpoint(bare.path).row_ids()
    assert (ids["seed"], ids["train_eps"], ids["loss_name"]) == ("", "", "")  # nothing claimed unless told


@pytest.mark.parametrize("flags, message", [(["--loss", "hinge"], "unknown loss"),
                                            (["--eps", "0.03137254901960784"], "pixel units"),
                                            (["--eps", "nan"], "eps"), (["--seed", "-1"], "seed")])
def test_import_refuses_training_facts_it_cannot_record_in_one_line(tmp_path, flags, message):
    out = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["import", str(authors_file(tmp_path)), *flags, "--out", str(out)])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_imported_authors_models_fill_the_test_time_table(tmp_path, data_dir):
    """Two seeds of the authors' Dual BN, imported with their training, as trained and under swap-AP: Table 4 has
    both rows with n=2, as for models trained here."""
    split = load_split("cifar10", train=False, data_dir=data_dir, n=16)
    for seed in (0, 1):
        run = tmp_path / "runs" / f"authors_s{seed}"
        done = hybridat.import_checkpoint(authors_file(tmp_path, seed=seed), run / "model.safetensors", seed=seed,
                                          loss="hybrid", eps=8)
        hybridat.swap_bn(hybridat.load_checkpoint(done.path), run / "swap" / "model.safetensors", swap_ap=True)
        for path in (run / "model.safetensors", run / "swap" / "model.safetensors"):
            rows = evaluate(hybridat.load_checkpoint(path), split, ["clean", "pgd"], ["adv", "clean"], eps=8,
                            steps=[1])
            hybridat.write_csv(rows, path.parent / "eval.csv")
    table = build_tables(load_runs([tmp_path / "runs"]))["test-time"]
    rows = table.set_index("operation")
    assert rows.loc["as trained", "adv: clean"].endswith("(n=2)")
    assert rows.loc["swap-ap", "clean: clean"].endswith("(n=2)")


def test_import_training_facts_from_python_are_checked(tmp_path):
    with pytest.raises(HybridatError, match="unknown loss"):
        hybridat.import_checkpoint(authors_file(tmp_path), loss="hinge")
