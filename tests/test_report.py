"""`report` turns tidy CSVs into the paper's tables: exact cells, "—" for what is missing, atomic files.

The fixture (tests/fixtures/report/) has cells with 3, 2 and 1 seeds and cells with none; the expected
Markdown of tables 1 and 2 is in fixtures/report/expected/, with the hand computation in its README.
"""

import shutil
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from hybridat import report
from hybridat.errors import HybridatError
from hybridat.figures import MAX_CURVES, MAX_PANELS
from hybridat.report import TITLES, build_tables, load_runs, print_tables, render_latex, render_markdown, write_report
from hybridat.tables import TABLES, _eval, cell, distance_cell, op_label

FIXTURES = Path(__file__).parent / "fixtures" / "report"


@pytest.fixture(scope="module")
def frames():
    return load_runs([FIXTURES])


@pytest.fixture(scope="module")
def tables(frames):
    return build_tables(frames)


def test_cell_is_mean_sample_std_and_n():
    assert cell(pd.Series([0.80, 0.82])) == "81.0 ± 1.4 (n=2)"
    assert cell(pd.Series([0.843])) == "84.3 (n=1)"
    assert cell(pd.Series([0.81, 0.82, 0.83])) == "82.0 ± 1.0 (n=3)"
    assert cell(pd.Series([0.5, float("nan")])) == "50.0 (n=1)"
    assert cell(pd.Series([], dtype=float)) == "—"
    assert cell(pd.Series([0.1, 0.12]), scale=1.0, digits=3) == "0.110 ± 0.014 (n=2)"


def test_registry_keys():
    assert list(TABLES) == ["cross-bn", "ns-vs-ap", "two-task", "test-time", "ns-gap"]
    assert set(TITLES) == set(TABLES) and all(k == k.lower() for k in TABLES)


def test_load_runs_classifies_by_columns(frames):
    assert set(frames) == {"eval", "train", "nsgap"}
    assert len(frames["eval"]) == 51 and len(frames["train"]) == 1 and len(frames["nsgap"]) == 70
    assert frames["eval"].accuracy.dtype.kind == "f" and frames["nsgap"].layer.dtype.kind in "iuf"
    # files and folders mix; a file reached twice is read once
    again = load_runs([FIXTURES / "eval.csv", FIXTURES])
    assert len(again["eval"]) == 51
    only = load_runs([FIXTURES / "nsgap.csv"])
    assert set(only) == {"nsgap"}


def test_load_runs_errors_name_the_file(tmp_path):
    with pytest.raises(HybridatError, match="no such file or folder: .*nowhere"):
        load_runs([tmp_path / "nowhere"])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(HybridatError, match=r"empty\.csv is not a readable CSV"):
        load_runs([tmp_path / "empty.csv"])
    (tmp_path / "ragged.csv").write_text("a,b\n1,2\n1,2,3,4\n")
    with pytest.raises(HybridatError, match=r"ragged\.csv is not a readable CSV"):
        load_runs([tmp_path / "ragged.csv"])
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    with pytest.raises(HybridatError, match=r"other\.csv is not an eval, train or ns-gap CSV"):
        load_runs([tmp_path / "other.csv"])


def test_folders_skip_unknown_csvs_but_not_nothing(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "ns-raw.csv").write_text("layer,channel,mean\n0,0,0.1\n")
    with pytest.raises(HybridatError, match="found no eval, train or ns-gap CSV"):
        load_runs([tmp_path])
    shutil.copy(FIXTURES / "nsgap.csv", tmp_path / "raw" / "gap.csv")
    assert set(load_runs([tmp_path])) == {"nsgap"}


@pytest.mark.parametrize("key", ["cross-bn", "ns-vs-ap"])
def test_markdown_matches_hand_computed(tables, key):
    expected = (FIXTURES / "expected" / f"{key}.md").read_text(encoding="utf-8")
    assert render_markdown(tables[key], TITLES[key]) == expected


def test_two_task_rows_sit_next_to_table_2(tables):
    t = tables["two-task"].set_index(["norm", "loss"])
    assert list(t.index) == [("dual-linear", "hybrid"), ("dual-adapter", "hybrid"), ("bn", "trades"),
                             ("dual-bn", "trades"), ("bn", "hybrid"), ("dual-bn", "hybrid")]
    assert t.loc[("dual-bn", "trades"), "ε=8 adv: PGD-10"] == "52.0 (n=1)"
    assert set(t.loc[("dual-linear", "hybrid")]) == {"—"}
    two = tables["ns-vs-ap"].set_index("norm")
    assert (t.loc[("bn", "hybrid")] == two.loc["bn"]).all()


def test_test_time_operations_and_inheritance(tables):
    t = tables["test-time"]
    eight = t[t["train ε"] == "8"].set_index("operation")
    assert list(eight.index) == ["as trained", "cross", "swap-ap", "reestimate adv NS on adv data",
                                 "reestimate clean NS on clean data"]
    # the cross checkpoint has no seed/loss/ε of its own: they come from its parent; the second re-estimate
    # is a child of the cross checkpoint, two generations from the trained model
    assert eight.loc["cross", "adv: clean"] == "70.0 (n=1)" and eight.loc["cross", "clean: PGD-10"] == "5.0 (n=1)"
    assert eight.loc["reestimate clean NS on clean data", "adv: clean"] == "72.0 (n=1)"
    assert set(eight.loc["swap-ap"]) == {"8", "—"}
    assert eight.loc["as trained", "adv: AA"] == "44.0 (n=1)"


def test_a_derived_model_with_its_parents_weights_keeps_its_own_row(frames):
    """swap-bn --cross twice (or --ns adv=adv) gives back the trained weights, so the same checkpoint_hash: its rows
    are still its operation's, and the trained model's rows stay the trained model's."""
    ev = frames["eval"]
    trained = ev[(ev.run == "run-d0") & (ev.operation == "")]
    twice = trained.assign(operation='{"op": "cross", "after": {"op": "cross"}}', parent_hash="x0")
    t = build_tables({"eval": pd.concat([trained, twice], ignore_index=True)})["test-time"].set_index("operation")
    assert "cross after cross" in t.index and t.loc["cross", "adv: clean"] == "—"
    assert t.loc["as trained", "adv: clean"] == t.loc["cross after cross", "adv: clean"] == "84.0 (n=1)"


def test_two_runs_with_equal_weights_keep_their_own_rows(frames):
    """One seed trained at ε 8 and at 16 with a training attack that never reaches ε 8 (PGD-1 of step 2: a tiny
    `make tables`) comes out as the same weights, the same checkpoint_hash: each run's rows stay in its own ε column
    (report kept only the rows read last, as if re-runs of one evaluation: Table 2's ε-16 cells were empty). A
    re-run of one evaluation still replaces the earlier one."""
    ev = frames["eval"]
    eight = ev[(ev.run == "run-d0") & (ev.operation == "")]
    sixteen = eight.assign(run="run-d0-16", train_eps=16, eps=eight.eps.where(eight.attack == "clean", 16))
    rerun = eight.assign(accuracy=eight.accuracy + 0.01)
    t = build_tables({"eval": pd.concat([eight, sixteen, rerun], ignore_index=True)})["ns-vs-ap"]
    cells = t.set_index("norm").loc["dual-bn"]
    assert cells["ε=8 adv: clean"] == "85.0 (n=1)" and cells["ε=16 adv: clean"] == "84.0 (n=1)"


def test_test_time_shows_a_train_eps_only_where_a_model_was_recombined(frames):
    """The fixture's dual-bn model trained at ε 16 was never recombined: it adds no ε-16 rows to Table 4 (they were
    every operation's row, all "—", and its "as trained" row, which Table 2 has); one recombined model at 16 brings
    them."""
    ev = frames["eval"]
    assert set(build_tables(frames)["test-time"]["train ε"]) == {"8"}
    trained = ev[ev.run == "run-d16"]
    crossed = trained.assign(checkpoint_hash="x16", parent_hash="d16", operation='{"op": "cross"}',
                             accuracy=trained.accuracy - 0.1)
    t = build_tables({"eval": pd.concat([ev, crossed], ignore_index=True)})["test-time"]
    sixteen = t[t["train ε"] == "16"].set_index("operation")
    assert (sixteen.loc["as trained", "adv: clean"], sixteen.loc["cross", "adv: clean"]) == ("75.0 (n=1)", "65.0 (n=1)")


def test_test_time_drops_aa_columns_without_aa(frames):
    no_aa = {"eval": frames["eval"][frames["eval"].attack != "autoattack"]}
    t = build_tables(no_aa)["test-time"]
    assert list(t.columns) == ["operation", "train ε", "adv: clean", "adv: PGD-10", "clean: clean", "clean: PGD-10"]


def test_op_label():
    assert op_label("") == "as trained"
    assert op_label('{"op": "cross"}') == "cross"
    assert op_label('{"branch": "adv", "domain": "noise", "op": "reestimate"}') == "reestimate adv NS on noise data"
    assert op_label('{"ap": "clean", "layers": [1, 2], "op": "recombine"}') == "recombine ap=clean layers=[1, 2]"
    assert op_label("not json") == "not json"
    clean = '{"branch": "adv", "domain": "clean", "eps": 8.0, "n_images": 1000, "op": "reestimate", "seed": 0}'
    assert op_label(clean) == "reestimate adv NS on clean data n_images=1000 seed=0"  # no radius on clean images
    assert op_label(clean.replace("clean", "noise")) == "reestimate adv NS on noise data eps=8.0 n_images=1000 seed=0"
    chain = ('{"after": {"after": {"op": "cross"}, "branch": "clean", "domain": "adv", "op": "reestimate"}, '
             '"op": "swap-ap"}')
    assert op_label(chain) == "swap-ap after reestimate clean NS on adv data after cross"


def test_ns_gap_table(tables):
    t = tables["ns-gap"].set_index("layer")
    assert list(t.index) == ["0", "1"] and list(t["name"]) == ["conv1.bn", "layer1.0.bn1"]
    # wasserstein rows only (the "mad" rows hold 9.0); seeds 0 and 1 differ by 0.02
    assert t.loc["0", "own branch: adv-clean mean"] == "0.110 ± 0.014 (n=2)"
    assert t.loc["0", "own branch: noise-clean std"] == "0.0500 ± 0.014 (n=2)"
    assert t.loc["1", "fix-AP adv: adv-clean std"] == "0.170 ± 0.014 (n=2)"
    assert t.loc["0", "AP gap: weight"] == "0.310 ± 0.014 (n=2)"
    assert t.loc["1", "AP gap: bias"] == "0.300 (n=1)"


def test_ap_gap_without_eps_joins_the_ns_rows_of_its_checkpoint(frames):
    """ns-gap writes AP rows with an empty ε (AP belong to the checkpoint): they sit beside every ε measured."""
    ns = frames["nsgap"].copy()
    ns.loc[ns.kind == "ap", "eps"] = float("nan")
    t = build_tables({"nsgap": ns})["ns-gap"]
    assert set(t["ε"]) == {"8"}  # no extra rows with an empty ε
    assert t.set_index("layer").loc["0", "AP gap: weight"] == "0.310 ± 0.014 (n=2)"


def test_no_data_gives_missing_cells_not_numbers():
    tables = build_tables({})
    assert set(tables) == set(TABLES)
    for key in ("cross-bn", "ns-vs-ap", "two-task", "test-time"):
        labels = [c for c in tables[key].columns if c in report.LABELS]
        assert len(tables[key]) > 0 and set(tables[key].drop(columns=labels).stack()) == {"—"}
    assert tables["ns-gap"].empty and "own branch: adv-clean mean" in tables["ns-gap"].columns


def test_mixed_model_settings_are_split_not_averaged(frames):
    ev = frames["eval"].copy()
    ev.loc[ev.norm == "bn", "width"] = 0.25  # the bn runs had another width than the rest
    t = build_tables({"eval": ev})["ns-vs-ap"]
    assert list(t.columns[:2]) == ["training", "norm"]
    assert list(zip(t.training, t.norm)) == [("width=0.25", "bn"), ("width=1", "dual-bn"), ("width=1", "dual-ap")]
    assert t.iloc[0]["ε=8 adv: clean"] == "87.0 ± 1.4 (n=2)"  # the fixture's bn cell, alone


def test_a_training_label_names_each_setting_once(frames):
    """Rows trained on two datasets: the label says dataset=... once (SETTING_COLUMNS held it twice)."""
    ev = frames["eval"].copy()
    ev["dataset"] = "cifar10"
    ev.loc[ev.norm == "bn", "dataset"] = "svhn"
    t = build_tables({"eval": ev})["ns-vs-ap"]
    assert sorted(zip(t.training, t.norm)) == [("dataset=cifar10", "dual-ap"), ("dataset=cifar10", "dual-bn"),
                                               ("dataset=svhn", "bn")]


def test_two_checkpoints_differing_only_in_a_training_setting_give_two_rows(tmp_path, data_dir):
    """Same norm, loss, eps and seed; one trained with lr 0.1, the other with lr 0.05: two rows, not one mean."""
    from hybridat.checkpoint import load_checkpoint, save_checkpoint, write_csv
    from hybridat.data import load_split
    from hybridat.evaluate import evaluate
    from hybridat.train import TrainConfig

    from conftest import tiny

    split = load_split("cifar10", train=False, data_dir=data_dir, n=32)
    accs = {}
    for lr, seed in ((0.1, 0), (0.05, 1)):
        path = tmp_path / f"lr{lr}" / "model.safetensors"
        train = TrainConfig(lr=lr, epochs=5).to_dict() | {"dataset": "cifar10"}
        save_checkpoint(tiny("dual-bn", seed=seed), path, run=f"lr{lr}", seed="0", train=train)
        rows = evaluate(load_checkpoint(path), split, ["clean"], ["adv", "clean"])
        assert rows[0]["train_lr"] == lr and rows[0]["train_epochs"] == 5 and rows[0]["dataset"] == "cifar10"
        write_csv(rows, path.parent / "eval.csv")
        accs[lr] = rows[0]["accuracy"]
    assert accs[0.1] != accs[0.05]  # different weights: a mean would hide both
    t = build_tables(load_runs([tmp_path]))["ns-vs-ap"]
    dual = t[t.norm == "dual-bn"].set_index("training")
    assert sorted(dual.index) == ["lr=0.05", "lr=0.1"]
    for lr in (0.1, 0.05):
        assert dual.loc[f"lr={lr:g}", "ε=8 adv: clean"] == f"{100 * accs[lr]:.1f} (n=1)"


def test_latex_escapes_and_booktabs():
    table = pd.DataFrame({"norm": ["a&b_c"], "100% ε": ["81.0 ± 1.4 (n=2)"], "x": ["—"]})
    assert render_latex(table, "T") == (
        "% T\n"
        "\\begin{tabular}{lrr}\n"
        "\\toprule\n"
        "norm & 100\\% $\\varepsilon$ & x \\\\\n"
        "\\midrule\n"
        "a\\&b\\_c & 81.0 $\\pm$ 1.4 (n=2) & --- \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n")


def test_markdown_escapes_pipes():
    table = pd.DataFrame({"operation": ["a|b"], "adv: clean": ["—"]})
    assert render_markdown(table, "T").splitlines()[-1] == r"| a\|b | — |"


def test_write_report_writes_every_file(frames, tables, tmp_path):
    written = write_report(frames, tmp_path / "out")
    names = [p.name for p in written]
    expected = ([f"findings.{ext}" for ext in ("md", "tex", "csv")] + [f"{k}.{ext}" for k in TABLES
                for ext in ("md", "tex", "csv")] + ["report.md", "accuracy.png", "training.png", "ns-gap.png",
                                                    "summary.txt"])
    assert names == expected
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(expected)  # no temp files left
    for key, table in tables.items():
        assert (tmp_path / "out" / f"{key}.md").read_text(encoding="utf-8") == render_markdown(table, TITLES[key])
        assert (tmp_path / "out" / f"{key}.tex").read_text(encoding="utf-8") == render_latex(table, TITLES[key])
        back = pd.read_csv(tmp_path / "out" / f"{key}.csv", dtype=str, keep_default_na=False)
        assert back.equals(table.astype(str))
    full = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert all(TITLES[k] in full for k in TABLES)
    assert (FIXTURES / "expected" / "ns-vs-ap.md").read_text(encoding="utf-8") in full
    for figure in ("ns-gap.png", "accuracy.png", "training.png"):
        assert (tmp_path / "out" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert full.startswith("# hybridat report\n\n## Findings")
    summary = (tmp_path / "out" / "summary.txt").read_text(encoding="utf-8")
    assert summary.splitlines()[-1] == ("Figures: " + ", ".join(str(tmp_path / "out" / f) for f in
                                                               ("accuracy.png", "training.png", "ns-gap.png")))
    assert "—" not in summary and max(map(len, summary.splitlines()[:-2])) <= 118  # readable in a terminal


def test_write_report_without_ns_gap_has_no_plot(frames, tmp_path):
    names = [p.name for p in write_report({"eval": frames["eval"]}, tmp_path)]
    assert "ns-gap.png" not in names and "training.png" not in names and "ns-gap.md" in names


def test_write_report_renders_everything_before_writing(frames, tmp_path, monkeypatch):
    def broken(frames):
        raise RuntimeError("plot failed")
    monkeypatch.setattr(report, "plot_ns_gap", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(frames, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_write_report_failure_leaves_the_earlier_report_whole(frames, tmp_path, monkeypatch):
    """A failure halfway through (a full disk while the third table's CSV is written) leaves the folder as the
    earlier report left it: no file of the new one beside the old report.md, no half file, no temp file."""
    write_report(frames, tmp_path)  # the earlier report: every table, findings on NS rows too
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = pd.DataFrame.to_csv

    def failing(frame, path, *args, **kwargs):
        if "two-task.csv" in Path(path).name:
            Path(path).write_text("norm,lo")
            raise OSError(28, "No space left on device", str(path))
        return real(frame, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing)
    with pytest.raises(OSError, match="No space left on device"):
        write_report({"eval": frames["eval"]}, tmp_path)  # other findings: every table file would change
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_print_tables(tables):
    console = Console(record=True, width=400)
    print_tables(tables, console)
    text = console.export_text()
    assert TITLES["cross-bn"] in text and "81.0 ± 1.4 (n=2)" in text and "0.600 (n=1)" in text


def test_ns_gap_rows_measured_differently_are_never_mixed(frames, tmp_path):
    """One checkpoint's NS gap in both protocols: two parts of table 5, each with its own reference's pairs; an
    ns-gap CSV from before the protocol columns reads as the protocol it was measured with (train, batch, clipped)."""
    old = frames["nsgap"]
    new = old.copy().assign(mode="eval", reference="running", noise_clip="False")
    new["pair"] = new.pair.str.replace("-clean", "-running")
    new["distance"] = new.distance * 10
    (tmp_path / "a").mkdir()
    shutil.copy(FIXTURES / "nsgap.csv", tmp_path / "a" / "old.csv")
    new.to_csv(tmp_path / "a" / "new.csv", index=False)
    loaded = load_runs([tmp_path / "a"])["nsgap"]
    assert set(zip(loaded["mode"], loaded["reference"], loaded["noise_clip"])) == {("train", "batch", "True"),
                                                                                   ("eval", "running", "False")}
    t = build_tables({"nsgap": loaded})["ns-gap"]
    parts = dict(iter(t.groupby("training")))
    assert set(parts) == {"NS mode=train, NS reference=batch, noise clip=true",
                          "NS mode=eval, NS reference=running, noise clip=false"}
    train = parts["NS mode=train, NS reference=batch, noise clip=true"].set_index("layer")
    evald = parts["NS mode=eval, NS reference=running, noise clip=false"].set_index("layer")
    assert train.loc["0", "own branch: adv-clean mean"] == "0.110 ± 0.014 (n=2)"  # as without the new rows
    assert evald.loc["0", "own branch: adv-running mean"] == "1.10 ± 0.14 (n=2)"
    assert evald["own branch: adv-clean mean"].isna().all()  # that column belongs to the other part only
    # the figure says how the NS were measured: in its title for one protocol, in each row's label for several
    assert report.plot_ns_gap({"nsgap": old}).get_suptitle() == ("NS read in train mode, against the clean batch's "
                                                                 "NS, noise clipped to [0, 1]")
    assert report.plot_ns_gap({"nsgap": loaded}).get_suptitle() == ""


def test_autoattack_runs_other_than_standard_get_their_own_columns(frames):
    """AA is the standard version only: a single component, other restarts or another version each get a column
    named by what ran; rows of CSVs written before the aa_* columns are the versions their `attack` names."""
    ev = frames["eval"]
    standard = ev[(ev.attack == "autoattack") & (ev.run == "run-d0")]
    assert len(standard) == 1 and "aa_attacks" not in ev  # the fixture is an old CSV
    runs = [("autoattack-custom", "apgd-ce", 1, 0.50), ("autoattack-custom", "apgd-ce", 5, 0.48),
            ("autoattack-custom", "apgd-ce,square", 1, 0.46), ("autoattack-plus", "apgd-ce,apgd-dlr,fab,square,apgd-t,"
                                                                 "fab-t", 5, 0.42)]
    new = pd.concat([standard.assign(attack=a, aa_attacks=aa, aa_restarts=r, aa_eot_iter=1, accuracy=acc)
                     for a, aa, r, acc in runs])
    both = {"eval": pd.concat([ev, new], ignore_index=True)}
    t = build_tables(both)["cross-bn"]
    t = t[t["train ε"] == "8"].set_index("norm")
    assert t.loc["dual-bn (Self-BN)", "adv: AA"] == "44.0 (n=1)"  # the standard run's, as before
    assert {c: t.loc["dual-bn (Self-BN)", f"adv: {c}"] for c in ("APGD-CE", "APGD-CE (5 restarts)",
                                                                 "AA(apgd-ce,square)", "AA-plus")} == \
        {"APGD-CE": "50.0 (n=1)", "APGD-CE (5 restarts)": "48.0 (n=1)", "AA(apgd-ce,square)": "46.0 (n=1)",
         "AA-plus": "42.0 (n=1)"}
    assert t.loc["cross-bn", "adv: APGD-CE"] == "—"
    assert "ε=8 adv: APGD-CE" in build_tables(both)["ns-vs-ap"].columns
    old = _eval(frames)
    aa = old[old.attack == "autoattack"]
    assert len(aa) and (aa.aa_attacks == "apgd-ce,apgd-t,fab-t,square").all() and (aa.aa_restarts == 1).all()
    assert (old[old.attack == "clean"].aa_attacks == "").all()
    assert list(build_tables(frames)["cross-bn"].columns) == ["norm", "train ε"] + [
        f"{b}: {c}" for b in ("adv", "clean") for c in ("clean", "PGD-10", "AA")]  # no extra columns without rows


def test_examples_crafted_in_bf16_get_their_own_column(frames):
    """`attack --amp` rows are "PGD-10 (bf16)", never averaged into the fp32 PGD-10 cell; rows of CSVs written
    before `attack_precision` existed are fp32."""
    ev = frames["eval"]
    assert "attack_precision" not in ev  # the fixture is an old CSV
    pgd = ev[(ev.attack == "pgd") & (ev.run == "run-d0") & (ev.branch == "adv")]
    bf16 = pgd.assign(attack_precision="bf16", accuracy=0.99)
    rows = _eval({"eval": pd.concat([ev, bf16], ignore_index=True)})
    assert set(rows[rows.attack_precision == "bf16"].column) == {"PGD-10 (bf16)"}
    assert len(rows[rows.attack_precision == "fp32"]) == len(_eval(frames))  # the old rows, as they were
    before, after = (build_tables(f)["cross-bn"] for f in (frames, {"eval": pd.concat([ev, bf16], ignore_index=True)}))
    pd.testing.assert_frame_equal(before, after[before.columns])  # the PGD-10 cells are the fp32 rows' alone
    assert list(after.columns) == list(before.columns) + ["adv: PGD-10 (bf16)", "clean: PGD-10 (bf16)"]
    at8 = after[after["train ε"] == "8"].set_index("norm")
    assert at8.loc["dual-bn (Self-BN)", "adv: PGD-10 (bf16)"] == "99.0 (n=1)"


def test_ns_protocols_do_not_split_the_accuracy_tables(frames):
    """The NS gap measured in two protocols (the README's `for mode in train eval`) makes two parts of table 5
    only; tables 1-4 stay as with one protocol: no "training" column of empty labels, no rows lost."""
    ns = frames["nsgap"]
    both = frames | {"nsgap": pd.concat([ns, ns.assign(mode="eval")], ignore_index=True)}
    one, two = build_tables(frames), build_tables(both)
    for key in ("cross-bn", "ns-vs-ap", "two-task", "test-time"):
        pd.testing.assert_frame_equal(two[key], one[key])
    assert set(two["ns-gap"].training) == {"NS mode=train", "NS mode=eval"}


def test_a_branch_not_trained_has_an_empty_training_accuracy_which_is_no_error(tmp_path):
    """`train --loss clean` writes acc_adv empty: read as missing. An eval row's accuracy is never optional, and
    a training accuracy that is written is a number in [0, 1]."""
    train = pd.read_csv(FIXTURES / "train.csv", dtype=str, keep_default_na=False)
    train.assign(acc_adv="").to_csv(tmp_path / "train.csv", index=False)
    assert load_runs([tmp_path / "train.csv"])["train"].acc_adv.isna().all()
    train.assign(acc_adv="nan").to_csv(tmp_path / "nan.csv", index=False)
    with pytest.raises(HybridatError, match=r"acc_adv must lie in \[0, 1\], got 'nan' \(row 2\)"):
        load_runs([tmp_path / "nan.csv"])
    ev = pd.read_csv(FIXTURES / "eval.csv", dtype=str, keep_default_na=False)
    ev.assign(accuracy="").to_csv(tmp_path / "eval.csv", index=False)
    with pytest.raises(HybridatError, match=r"accuracy must lie in \[0, 1\], got '' \(row 2\)"):
        load_runs([tmp_path / "eval.csv"])


def _body(tex: str) -> list[str]:
    return [line for line in tex.splitlines() if not line.startswith("%")]  # comments never reach the typesetter


def test_latex_files_are_ascii_and_compile_in_principle(frames, tmp_path):
    """pdflatex stops at − (U+2212, the findings' 'dual-ap − dual-bn') and at β; < and > print as ¡ and ¿ in its
    default OT1 encoding; × needs a recent kernel: each is written in math mode."""
    table = pd.DataFrame({"comparison": ["dual-ap − dual-bn, ε=8"], "claimed": ["> ×1"], "β": ["< 0 · Δ"]})
    assert _body(render_latex(table, "T")) == [
        r"\begin{tabular}{llr}", r"\toprule", r"comparison & claimed & $\beta$ \\", r"\midrule",
        r"dual-ap $-$ dual-bn, $\varepsilon$=8 & $>$ $\times$1 & $<$ 0 $\cdot$ $\Delta$ \\", r"\bottomrule",
        r"\end{tabular}"]
    written = write_report(frames, tmp_path)
    for tex in (p for p in written if p.suffix == ".tex"):
        for line in _body(tex.read_text(encoding="utf-8")):
            assert line.isascii(), (tex.name, line)
    findings = (tmp_path / "findings.tex").read_text(encoding="utf-8")
    assert "$-$ dual-bn" in findings  # the fixture's findings have accuracy comparisons


def test_a_second_report_into_the_same_folder_leaves_no_figure_of_the_first(frames, tmp_path):
    """A report without NS rows used to leave the earlier report's ns-gap.png beside its own report.md."""
    write_report(frames, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    written = write_report({"eval": frames["eval"]}, tmp_path)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["accuracy.png"] == sorted(p.name for p in written if p.suffix == ".png")
    assert (tmp_path / "notes.txt").read_text() == "mine"  # files that are not the report's stay


def test_accuracy_plot_shows_no_legend_entry_for_missing_rows_and_says_they_are_missing(frames):
    """A legend entry for PGD-10 without any PGD-10 row drew no bar: read as 0 % robust accuracy."""
    ev = frames["eval"]
    fig = report.plot_accuracy({"eval": ev[ev.attack == "clean"]})
    ax = fig.axes[0]
    assert ax.get_legend_handles_labels()[1] == ["clean branch, clean"]
    missing = [t for t in ax.texts if t.get_text() == "no adv PGD-10"]
    slots = len(ax.get_xticks())
    assert len(missing) == slots and all(ax.get_xlim()[0] < t.xy[0] < ax.get_xlim()[1] for t in missing)
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1  # beside the bars, not over them


def test_training_plot_of_one_epoch_has_integer_epoch_ticks_and_accuracy_in_percent(frames):
    fig = report.plot_training({"train": frames["train"]})
    loss, adv, clean = fig.axes
    assert all(float(t).is_integer() for t in adv.get_xticks()) and len(frames["train"].epoch.unique()) == 1
    assert adv.get_ylabel() == clean.get_ylabel() == "accuracy (%)"
    line = adv.get_lines()[0]
    assert line.get_ydata()[0] == pytest.approx(100 * frames["train"].acc_adv.iloc[0])


def test_rows_no_table_shows_are_named_in_the_summary_and_report(frames, tmp_path):
    """PGD-20 (the README's own `attack --steps 10 --steps 20`), robust rows at another ε and variants outside the
    paper's tables were read and shown nowhere, without a word: a reader looked for them in vain."""
    assert report.left_out(frames) == ["PGD-20 (2 rows)", "PGD-10 at ε=4 on models trained at ε=8 (1 row)"]
    ev = frames["eval"]
    gn = ev[ev.norm == "dual-bn"].head(2).assign(norm="gn", checkpoint_hash="g" * 16)
    assert report.left_out({"eval": gn}) == ["gn (loss hybrid) (2 rows)"]
    write_report(frames, tmp_path)
    summary = (tmp_path / "summary.txt").read_text(encoding="utf-8")
    assert "Not in the tables" in summary and "PGD-20 (2 rows)" in summary.replace("\n    ", " ")
    assert max(map(len, summary.splitlines()[:-2])) <= 118  # wrapped for a terminal
    assert (tmp_path / "report.md").read_text(encoding="utf-8").endswith(
        "## Not in the tables\n\n" + report.LEFT_OUT_HEADER + ": PGD-20 (2 rows); PGD-10 at ε=4 on models trained "
        "at ε=8 (1 row).\n")
    assert report.left_out({"eval": ev[(ev.attack == "clean") & (ev.norm == "dual-bn")]}) == []


def test_ns_gap_cells_keep_three_significant_digits():
    """Distances of 0.0001-0.01 (deep layers, small ε) printed as 0.000 ± 0.000 with three decimals."""
    assert distance_cell(pd.Series([0.00102, 0.00146])) == "0.00124 ± 0.00031 (n=2)"
    assert distance_cell(pd.Series([0.11, 0.13])) == "0.120 ± 0.014 (n=2)"
    assert distance_cell(pd.Series([0.0994])) == "0.0994 (n=1)"
    assert distance_cell(pd.Series([], dtype=float)) == "—"


def test_pgd_with_a_step_other_than_eps_over_4_never_fills_the_pgd_cells(frames):
    """SPEC's PGD-10 steps by ε/4; a PGD run with another `--step` is another attack: a column of its own (named
    in the summary, shown in no table), never averaged into, or replacing, the PGD-10 cells (it replaced them)."""
    ev = frames["eval"]
    pgd = ev[(ev.attack == "pgd") & (ev.run == "run-d0") & (ev.branch == "adv")]
    other = {"eval": pd.concat([ev, pgd.assign(step=1.0, accuracy=0.99)], ignore_index=True)}
    labels = set(_eval(other).column[_eval(other).step == 1.0])
    assert labels and all(c.startswith("PGD-") and c.endswith(" (step 1)") for c in labels)
    for key in ("cross-bn", "ns-vs-ap", "test-time"):
        pd.testing.assert_frame_equal(build_tables(frames)[key], build_tables(other)[key])
    assert any(s.startswith("PGD-10 (step 1) (") for s in report.left_out(other))


def test_seeds_evaluated_on_different_numbers_of_images_are_refused(frames, tmp_path):
    """One seed's PGD-10 on the first 500 test images and another's on all 10,000 are not one measurement: refused
    in one line naming the cell and each seed's n, not averaged. Other cells may differ in n (AutoAttack on the
    first 1,000 beside PGD on all)."""
    ev = frames["eval"]
    assert set(ev[ev.attack == "autoattack"].n) == {1000} and set(ev[ev.attack != "autoattack"].n) == {10000}
    build_tables(frames)  # the fixture: AutoAttack on the first 1,000, the rest on all 10,000, each cell one n
    seed0 = (ev.run == "run-b0") & (ev.attack == "pgd") & (ev.branch == "adv") & (ev.eps == 8)
    assert seed0.sum() == 1
    mixed = ev.copy()
    mixed.loc[seed0, "n"] = 500
    with pytest.raises(HybridatError, match=r"^PGD-10 of bn \(adv branch, as trained, ε=8\) was evaluated on "
                                            r"different numbers of test images \(seed 0: n=500; seed 1: n=10000"):
        build_tables({"eval": mixed})
    mixed.to_csv(tmp_path / "eval.csv", index=False)
    with pytest.raises(HybridatError, match="Evaluate every seed with the same --n"):
        write_report(load_runs([tmp_path]), tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_rows_without_a_seed_are_reported_not_a_crash(tmp_path):
    """An imported checkpoint records no seed (nor a training eps or loss): its eval and ns-gap rows, the documented
    `import` -> `attack`, `ns-gap` -> `report` path, gave a pandas traceback ("Grouper ... not 1-dimensional")
    when every row lacked a seed. Each such checkpoint is its own unit: reported, never refused or averaged."""
    for name in ("eval.csv", "nsgap.csv"):
        rows = pd.read_csv(FIXTURES / name, dtype=str, keep_default_na=False)
        rows.assign(seed="", train_eps="", loss_name="").to_csv(tmp_path / name, index=False)
    loaded = load_runs([tmp_path])
    assert set(loaded) == {"eval", "nsgap"} and loaded["eval"].seed.isna().all()
    written = write_report(loaded, tmp_path / "report")
    assert (tmp_path / "report" / "report.md") in written


# ---- figures at every scale: what a reader sees (artists, sizes, texts; never pixels) ----------------------------

def _many(frame: pd.DataFrame, n: int, seeds_of=lambda i: 1) -> pd.DataFrame:
    """n trainings of the fixture's rows, told apart by a dozen settings, so each has a long training label
    ("epochs=…, PGD steps=…, lr=…, batch=…, …"); training i keeps the rows of its first seeds_of(i) seeds."""
    parts = []
    for i in range(n):
        part = frame[frame.seed.rank(method="dense") <= seeds_of(i)]
        settings = {"train_epochs": 10 + i, "train_steps": 3 + i, "train_step": 2, "train_lr": 0.1 + i / 1000,
                    "train_batch_size": 64 + i, "train_momentum": 0.9, "train_weight_decay": 5e-4 + i / 1e6,
                    "train_clean_weight": 0.5, "train_trades_beta": 6 + i, "train_subset": 1000 + i,
                    "dataset": "cifar10", "train_amp": "false", "arch": "resnet18" if i % 2 else "preact18"}
        parts.append(part.assign(**settings, checkpoint_hash=part.checkpoint_hash.astype(str) + f"-{i}"))
    return pd.concat(parts, ignore_index=True)


def _drawn(fig):
    """The figure laid out and drawn as savefig draws it; its renderer, for the extents of what it shows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def _inside(box, outer, slack=1.0) -> bool:
    return (box.x0 >= outer.x0 - slack and box.x1 <= outer.x1 + slack and box.y0 >= outer.y0 - slack
            and box.y1 <= outer.y1 + slack)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1


def _titles(fig) -> list:
    """Every title the figure shows: axes titles, row titles of subfigures, the figure's own."""
    subs = [sub._suptitle for sub in fig.subfigs if sub._suptitle is not None]
    return [ax.title for ax in fig.axes if ax.get_title()] + subs + [t for t in fig.texts if t.get_text()]


def _check_readable(fig) -> None:
    """No title or legend runs off the figure or into another; no legend lies on a panel; tick labels of one axis
    do not run into each other."""
    renderer = _drawn(fig)
    whole = fig.bbox
    boxes = [t.get_window_extent(renderer) for t in _titles(fig)]
    legends = [lg.get_window_extent(renderer) for lg in [*fig.legends, *(l for s in fig.subfigs for l in s.legends),
                                                          *(ax.get_legend() for ax in fig.axes)] if lg is not None]
    panels = [ax.get_window_extent(renderer) for ax in fig.axes]
    for box in boxes + legends:
        assert _inside(box, whole), f"{box} runs off the figure {whole}"
    for i, a in enumerate(boxes + legends):
        assert not any(_overlap(a, b) for b in (boxes + legends)[i + 1:]), "two titles or legends overlap"
    assert not any(_overlap(lg, p) for lg in legends for p in panels), "a legend lies on a panel"
    for ax in fig.axes:
        ticks = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert not any(_overlap(a, b) for i, a in enumerate(ticks) for b in ticks[i + 1:]), "tick labels overlap"


def _data_lines(ax) -> list:
    """The line of each error-bar series (not its caps or bars)."""
    return [c.lines[0] for c in ax.containers if c.lines[0] is not None]


def test_ns_gap_plot_keeps_coinciding_series_visible(frames):
    """The own-branch adv-clean line (red) was drawn under the noise-clean line (blue) with the same marker, width
    and style: where the two gaps coincide (they often do: the AP gap dominates both) a reader saw only blue."""
    ns = frames["nsgap"].copy()
    noise = ns.pair == "noise-clean"
    ns.loc[noise, "distance"] = ns.loc[noise].merge(  # the noise gap made equal to the adv gap, row for row
        ns[ns.pair == "adv-clean"], on=["checkpoint_hash", "statistic", "measure", "fix_ap", "layer"],
        how="left").distance_y.to_numpy()
    fig = report.plot_ns_gap({"nsgap": ns})
    for ax in fig.axes:
        lines = _data_lines(ax)
        same = [(a, b) for i, a in enumerate(lines) for b in lines[i + 1:]
                if len(a.get_xdata()) == len(b.get_xdata()) and (a.get_xydata() == b.get_xydata()).all()]
        if ax.get_title().startswith("NS"):
            assert len(same) == 2  # own branch and fix-AP: adv-clean and noise-clean coincide
        for a, b in same:
            under, over = sorted((a, b), key=lambda line: line.get_zorder())
            assert under.get_zorder() < over.get_zorder() and under.get_linewidth() > over.get_linewidth()
            assert under.get_marker() != over.get_marker() and over.get_markerfacecolor() == "none"
            assert under.get_color() != over.get_color()
    _check_readable(fig)
    labels = [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else \
        [t.get_text() for s in fig.subfigs for lg in s.legends for t in lg.get_texts()]
    assert labels == ["own branch adv-clean", "own branch noise-clean", "fix-AP adv adv-clean",
                      "fix-AP adv noise-clean", "AP weight", "AP bias"]  # one legend for every panel


def test_ns_gap_plot_of_many_groups_draws_the_best_supported_few_and_says_so(frames, tmp_path):
    """220 (training, norm, ε) groups made one 660-axes figure 800 inches tall that took ~55 s to draw and no one
    could read. Now: at most MAX_PANELS rows, those with the most seeds; the figure and summary.txt say the rest."""
    ns = _many(frames["nsgap"], 12, seeds_of=lambda i: 2 if i in (3, 7, 11) else 1)
    fig = report.plot_ns_gap({"nsgap": ns})
    limit = MAX_PANELS
    assert len(fig.axes) == 3 * limit and fig.get_figheight() < 4.5 * limit
    rows = [sub._suptitle.get_text().replace("\n", " ") for sub in fig.subfigs if sub._suptitle is not None]
    assert len(rows) == limit and sum("epochs=13," in r or "epochs=17," in r or "epochs=21," in r for r in rows) == 3
    assert all(r.startswith("dual-bn ε=8 [arch=") for r in rows)  # each row names its training
    assert report.figure_note(fig) == (f"{limit} of 12 (training, norm, ε) groups drawn (those with the most seeds, "
                                       "then measurements); table 5 (ns-gap.md) has them all")
    _check_readable(fig)
    write_report({"nsgap": ns}, tmp_path)
    summary = (tmp_path / "summary.txt").read_text(encoding="utf-8").replace("\n    ", " ")
    assert f"ns-gap.png: {limit} of 12 (training, norm, ε) groups drawn" in summary
    assert len(pd.read_csv(tmp_path / "ns-gap.csv").training.unique()) == 12  # the table keeps every group
    small = report.plot_ns_gap(frames)  # the fixture: every group drawn, nothing said
    assert report.figure_note(small) == "" and len(small.axes) == 3


def test_ns_gap_plot_says_a_panel_without_rows_is_empty(frames):
    """A model measured for its AP gap only drew two empty NS panels with axes 0-1, a plot of nothing."""
    ns = frames["nsgap"]
    fig = report.plot_ns_gap({"nsgap": ns[ns.kind == "ap"]})
    mean, std, ap = fig.axes
    assert [t.get_text() for t in mean.texts] == ["no NS rows for this model"] == [t.get_text() for t in std.texts]
    assert not mean.lines and ap.lines and not ap.texts


def test_accuracy_plot_of_many_trainings_stays_readable(frames):
    """40 (training, train ε) panels made a figure 104 inches tall, titles wider than the figure, one variant's bar
    8 inches wide in one panel and 60 variants' names run into each other in another."""
    ev = frames["eval"]
    many = _many(ev, 11, seeds_of=lambda i: 3 if i == 5 else 1)
    wide = ev.assign(norm=[f"{n}-{i}" for i, n in enumerate(ev.norm)], checkpoint_hash=ev.checkpoint_hash + "-w")
    fig = report.plot_accuracy({"eval": pd.concat([many, wide], ignore_index=True)})
    limit = MAX_PANELS
    assert len(fig.axes) == limit and fig.get_figheight() < 6 * limit and fig.get_figwidth() <= 24
    # 12 trainings, two train ε each
    assert report.figure_note(fig).startswith(f"{limit} of 24 (training, train ε) panels drawn")
    assert len({ax.get_xlim() for ax in fig.axes}) == 1  # one bar width in every panel
    _check_readable(fig)
    small = report.plot_accuracy(frames)
    assert report.figure_note(small) == "" and len(small.axes) == 2  # train ε 8 and 16
    _check_readable(small)


def test_accuracy_bars_follow_the_papers_order_not_the_files(frames):
    """Bars in the registry's order (bn, bn-mix, dual-bn, ...; hybrid before TRADES), whatever order the CSVs came
    in: `make tables` read bn-mix_hybrid_8_s0 before bn_hybrid_8_s0 and drew bn-mix first."""
    ev = frames["eval"]
    eight = ev[(ev.train_eps == 8) & (ev.operation == "")]
    extra = [eight[eight.norm == "bn"].assign(norm="bn-mix", checkpoint_hash="m8"),
             eight[eight.norm == "bn"].assign(loss_name="trades", checkpoint_hash="t8"),
             eight[eight.norm == "dual-bn"].assign(norm="cross-bn", checkpoint_hash="c8")]
    shuffled = pd.concat([*extra, eight], ignore_index=True).iloc[::-1]
    ax = report.plot_accuracy({"eval": shuffled}).axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names == ["bn", "bn trades", "bn-mix", "dual-bn", "dual-bn trades", "dual-ap", "cross-bn",
                     "cross-bn trades"]


def test_training_plot_of_many_curves_stays_readable(frames):
    """173 curves: colours repeated every 10, and a legend of long training labels wider than the figure that
    covered the loss panel. Now at most MAX_CURVES curves, no two drawn alike (10 colours, solid then dashed), the
    legend below the panels; the paper's grid (16 trainings) is drawn whole."""
    tr = frames["train"]
    two_seeds = pd.concat([tr, tr.assign(seed=1)], ignore_index=True)
    grid = report.plot_training({"train": _many(two_seeds, 16, seeds_of=lambda i: 2)})
    assert len(grid.axes[0].get_lines()) == 16 and report.figure_note(grid) == ""
    many = _many(two_seeds, MAX_CURVES + 4, seeds_of=lambda i: 2 if i < 3 else 1)
    fig = report.plot_training({"train": many})
    lines = fig.axes[0].get_lines()
    assert len(lines) == MAX_CURVES
    assert len({(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines}) == MAX_CURVES
    assert sum("(n=2)" in line.get_label() for line in lines) == 3
    assert report.figure_note(fig).startswith(f"{MAX_CURVES} of {MAX_CURVES + 4} curves drawn")
    _check_readable(fig)
    _check_readable(grid)
    small = report.plot_training(frames)
    assert report.figure_note(small) == "" and len(small.axes[0].get_lines()) == 1
    _check_readable(small)


@pytest.mark.parametrize("plot", ["plot_ns_gap", "plot_accuracy", "plot_training"])
@pytest.mark.parametrize("limit", [0, -1, 2.5, True, "8"])
def test_a_figure_limit_that_is_not_a_whole_number_of_panels_is_one_clear_error(frames, plot, limit):
    with pytest.raises(HybridatError, match=f"a whole number, at least 1; got {limit!r}"):
        getattr(report, plot)(frames, limit=limit)


def test_robust_rows_at_another_eps_stay_out_of_the_training_eps_cell(frames):
    """Tables show robust accuracy at the model's training ε: a PGD-10 at ε 16 (or 4) of a model trained at ε 8,
    measured after the ε-8 one, neither replaces nor joins its ε-8 cell; it is named among the rows left out."""
    ev = frames["eval"]
    eight = ev[(ev.run == "run-d0") & (ev.operation == "")]
    assert set(eight.train_eps) == {8}
    robust = eight[eight.attack != "clean"]
    other = pd.concat([robust.assign(eps=e, accuracy=0.01) for e in (16, 4)], ignore_index=True)
    both = {"eval": pd.concat([eight, other], ignore_index=True)}
    t = build_tables(both)["ns-vs-ap"].set_index("norm").loc["dual-bn"]
    want = build_tables({"eval": eight})["ns-vs-ap"].set_index("norm").loc["dual-bn"]
    assert t["ε=8 adv: PGD-10"] == want["ε=8 adv: PGD-10"] != "—"
    assert any("at ε=16 on models trained at ε=8" in line for line in report.left_out(both))
