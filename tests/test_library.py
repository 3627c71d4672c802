"""The library from a notebook: bad arguments to the public functions give one HybridatError line that names the
mistake, never a torch traceback from deep inside or a silently wrong number."""

from pathlib import Path

import numpy as np
import pytest
import torch

from hybridat.analysis import ap_gap, batch_ns, measured_layers, ns_gap
from hybridat.checkpoint import load_checkpoint, save_checkpoint
from hybridat.data import Split
from hybridat.errors import HybridatError
from hybridat.evaluate import evaluate
from hybridat.recombine import cross, recombine, reestimate, swap_ap

from conftest import perturb, tiny


@pytest.fixture(scope="module")
def model():
    return perturb(tiny()).eval()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save_checkpoint(model, path, train={"eps": 8, "loss": "hybrid", "dataset": "cifar10", "epochs": 1}, seed=0)
    return load_checkpoint(path)


def data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def split(n=8):
    x, y = data(n)
    return Split((x * 255).to(torch.uint8), y)


@pytest.mark.parametrize("change, message", [
    (lambda x, y: (x * 255, y), r"values in \[0.*, 255\]; pixels must be in \[0, 1\]"),
    (lambda x, y: ((x * 255).to(torch.uint8), y), "uint8"),
    (lambda x, y: (x.numpy(), y), "must be a torch.Tensor"),
    (lambda x, y: (x[0], y), r"shape \(B, C, H, W\)"),
    (lambda x, y: (x * float("nan"), y), "NaN"),
    (lambda x, y: (x, y.float()), "integer class labels"),
    (lambda x, y: (x, y[:3]), "one label per image"),
    (lambda x, y: (x, y[:, None]), "one label per image"),
    (lambda x, y: (x, y + 10), r"labels in \[\d+, 1\d\].*10 classes"),
    (lambda x, y: (x.to("meta"), y.to("meta")), "meta device"),
])
def test_ns_gap_refuses_bad_images_and_labels_with_one_line(model, change, message):
    with pytest.raises(HybridatError, match=message):
        ns_gap(model, *change(*data()), eps=8, steps=1)


def test_eps_in_0_1_units_where_pixel_units_are_meant_is_refused(ckpt, model):
    """8/255 given to a function whose eps is in pixel units would attack with 8/255²: a silently wrong number."""
    with pytest.raises(HybridatError, match="8/255 in \\[0, 1\\] units.*eps=8"):
        ns_gap(model, *data(), eps=8 / 255, steps=1)
    with pytest.raises(HybridatError, match="give eps=16"):
        evaluate(ckpt, split(), ["pgd"], ["adv"], eps=16 / 255, steps=[1])
    with pytest.raises(HybridatError, match="give step=2"):
        evaluate(ckpt, split(), ["pgd"], ["adv"], eps=8, step=2 / 255, steps=[1])
    with pytest.raises(HybridatError, match="give eps=8"):
        reestimate(model, "adv", "adv", split(), eps=8 / 255)
    rows = ns_gap(model, *data(), eps=0.5, steps=1)[0]  # half a pixel level is a radius, not a fraction of 255
    assert rows[0]["eps"] == 0.5


def test_a_checkpoint_stands_for_its_model_and_a_path_is_named(ckpt, model):
    x, y = data()
    assert ns_gap(ckpt, x, y, eps=8, steps=1)[0] == ns_gap(model, x, y, eps=8, steps=1)[0]
    assert ap_gap(ckpt) == ap_gap(model)
    assert len(measured_layers(ckpt)) == 20
    assert torch.equal(cross(ckpt).state_dict()["bn1.running_mean_adv"], model.state_dict()["bn1.running_mean_clean"])
    for fn in (lambda m: ns_gap(m, x, y, eps=8), ap_gap, cross, swap_ap, lambda m: batch_ns(m, x)):
        with pytest.raises(HybridatError, match="load it first: hybridat.load_checkpoint"):
            fn(str(ckpt.path))


def test_fix_ap_must_be_a_bool(model):
    """fix_ap="no" is true in Python: it used to measure the fixed-AP gap and record fix_ap True."""
    with pytest.raises(HybridatError, match="fix_ap must be True or False, got 'no'"):
        ns_gap(model, *data(), eps=8, steps=1, fix_ap="no")


def test_evaluate_names_wrong_arguments(ckpt):
    s = split()
    cases = [((str(ckpt.path), s, ["clean"], ["adv"]), "must be a hybridat Checkpoint"),
             ((ckpt, (s.images, s.labels), ["clean"], ["adv"]), "must be a hybridat.data.Split"),
             ((ckpt, s, "clean", ["adv"]), "attacks must be a list of names"),  # was: unknown attack 'c'
             ((ckpt, s, ["clean"], "adv"), "branches must be a list of names"),  # was: unknown branch 'a'
             ((ckpt, s, [], ["adv"]), "no attacks given"),  # was: [] and nothing said
             ((ckpt, s, ["clean"], []), "no branches given"),
             ((ckpt, Split(s.images.to("meta"), s.labels.to("meta")), ["clean"], ["adv"]),
              "the model is on cpu, the split on meta")]
    for args, message in cases:
        with pytest.raises(HybridatError, match=message):
            evaluate(*args)
    assert [r["branch"] for r in evaluate(ckpt, s, ["clean"], ["adv", "clean"])] == ["adv", "clean"]


def test_recombine_names_bad_layers_and_mappings(model):
    """layers="3" used to read as layer 3 (a character) and numpy integers as out of range."""
    with pytest.raises(HybridatError, match="layers must be a list of norm-layer indices"):
        recombine(model, ns={"adv": "clean"}, layers="3")
    with pytest.raises(HybridatError, match="layer indices must be integers, got 2.0"):
        recombine(model, ns={"adv": "clean"}, layers=[2.0])
    with pytest.raises(HybridatError, match="must be a dict target branch -> source branch"):
        recombine(model, ns="adv=clean")
    new = recombine(model, ns={"adv": "clean"}, layers=[np.int64(19)])
    assert torch.equal(new.state_dict()["bn1.running_mean_adv"], model.state_dict()["bn1.running_mean_adv"])
    last = [k for k in new.state_dict() if k.endswith("running_mean_adv")][-1]
    assert torch.equal(new.state_dict()[last], model.state_dict()[last.replace("_adv", "_clean")])


def test_reestimate_names_a_wrong_split(model):
    x, y = data()
    with pytest.raises(HybridatError, match="split must be a hybridat.data.Split"):
        reestimate(model, "adv", "clean", (x, y))


def test_write_ns_gap_does_from_python_what_the_command_does(ckpt, tmp_path):
    """ns_gap's rows carry no checkpoint ids, so `report` could not read them: the command's whole work (ids, AP gap
    rows with the protocol, CSVs and plots) was in cli.py only."""
    from hybridat.analysis import write_ns_gap
    from hybridat.report import build_tables, load_runs

    x, y = data()
    done = write_ns_gap(ckpt, x, y, tmp_path / "g.csv", eps=8, steps=1, fix_ap=True, layer=3)
    assert [p.name for p in done.paths] == ["g.csv", "g-channels.csv", "g-depth.png", "g-channels.png"]
    assert all(p.is_file() for p in done.paths) and done.note == ""
    frames = load_runs([tmp_path])
    assert set(frames) == {"nsgap"} and len(frames["nsgap"]) == len(done.rows)
    ns = frames["nsgap"]
    assert set(ns.checkpoint_hash) == {ckpt.hash} and set(ns.norm) == {"dual-bn"} and set(ns.kind) == {"ns", "ap"}
    assert set(ns["mode"]) == {"train"}  # AP rows are recorded with the protocol, so report sets them beside
    table = build_tables(frames)["ns-gap"]
    assert table["AP gap: weight"].iloc[0] != "—"
    with pytest.raises(HybridatError, match="is an input"):
        write_ns_gap(ckpt, x, y, ckpt.path, eps=8)
    with pytest.raises(HybridatError, match="must end in .csv"):
        write_ns_gap(ckpt, x, y, tmp_path / "g.txt", eps=8)
    with pytest.raises(HybridatError, match="layer 20 is out of range"):
        write_ns_gap(ckpt, x, y, tmp_path / "h.csv", eps=8, layer=20)
    assert not (tmp_path / "h.csv").exists()


def test_swap_bn_writes_from_python_what_the_command_writes(ckpt, model, tmp_path):
    """The operation a derived checkpoint records was built in cli.py only; by hand a notebook wrote e.g.
    {"op": "cross", "layers": null}, which `report` shows as an operation of its own, not as cross."""
    from typer.testing import CliRunner

    from hybridat.cli import app
    from hybridat.recombine import swap_bn

    cases = [(dict(cross=True), ["--cross"]),
             (dict(swap_ap=True, from_layer=10), ["--swap-ap", "--from-layer", "10"]),
             (dict(ns={"adv": "clean"}), ["--ns", "adv=clean"])]
    for k, (kwargs, flags) in enumerate(cases):
        digest = swap_bn(ckpt, tmp_path / f"py{k}.safetensors", **kwargs)
        out = str(tmp_path / f"cli{k}.safetensors")
        result = CliRunner().invoke(app, ["swap-bn", str(ckpt.path), *flags, "--out", out, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        py, cli = (load_checkpoint(tmp_path / f"{w}{k}.safetensors") for w in ("py", "cli"))
        assert py.hash == cli.hash == digest and py.header["parent"] == ckpt.hash
        assert py.header["operation"] == cli.header["operation"]
    assert load_checkpoint(tmp_path / "py0.safetensors").meta("operation") == {"op": "cross"}
    with pytest.raises(HybridatError, match="exactly one of cross, swap_ap, ns/ap, reestimate"):
        swap_bn(ckpt, tmp_path / "x.safetensors", cross=True, swap_ap=True)
    with pytest.raises(HybridatError, match="reestimate needs split"):
        swap_bn(ckpt, tmp_path / "x.safetensors", reestimate="clean")
    with pytest.raises(HybridatError, match="is an input"):
        swap_bn(ckpt, ckpt.path, cross=True)
    with pytest.raises(HybridatError, match="must end in .safetensors"):
        swap_bn(ckpt, tmp_path / "x.pt", cross=True)
    s = split(16)
    new = swap_bn(ckpt, tmp_path / "re.safetensors", reestimate="clean", split=s, batch_size=8, n_images=16)
    re = load_checkpoint(tmp_path / "re.safetensors")
    assert re.hash == new and re.meta("operation")["domain"] == "clean" and re.meta("operation")["n_images"] == 16


def test_report_refuses_rows_of_a_checkpoint_changed_after_it_was_evaluated(model, tmp_path):
    """A checkpoint overwritten after its first evaluation (new weights, same run, settings and seed): its old and
    new CSVs were averaged into one seed's cell, as n=1, without a word."""
    from hybridat.checkpoint import write_csv
    from hybridat.recombine import swap_bn
    from hybridat.report import load_runs

    path = tmp_path / "run" / "model.safetensors"
    meta = dict(train={"eps": 8, "loss": "hybrid", "dataset": "cifar10", "epochs": 1}, seed=0, run="run")
    save_checkpoint(model, path, **meta)
    first = load_checkpoint(path)
    write_csv(evaluate(first, split(), ["clean"], ["adv"]), tmp_path / "run" / "eval.csv")
    write_csv(evaluate(first, split(), ["clean"], ["adv"]), tmp_path / "run" / "again.csv")  # same model
    swap_bn(first, tmp_path / "run" / "cross.safetensors", cross=True)  # same seed, another operation
    write_csv(evaluate(load_checkpoint(tmp_path / "run" / "cross.safetensors"), split(), ["clean"], ["adv"]),
              tmp_path / "run" / "cross.csv")
    before = load_runs([tmp_path])["eval"]  # one model in two CSVs, and a derived one: no clash
    assert before.checkpoint_hash.nunique() == 2 and len(before) == 3
    save_checkpoint(perturb(tiny(), seed=5).eval(), path, **meta)  # changed on disk
    changed = load_checkpoint(path)
    assert changed.hash != first.hash
    write_csv(evaluate(changed, split(), ["clean"], ["adv"]), tmp_path / "run" / "eval2.csv")
    with pytest.raises(HybridatError, match=f"hold rows of two checkpoints \\({first.hash}, {changed.hash}\\).*"
                                            "seed 0.*average two models as one seed"):
        load_runs([tmp_path])
    (tmp_path / "run" / "eval.csv").unlink()
    (tmp_path / "run" / "again.csv").unlink()
    assert set(load_runs([tmp_path])["eval"].checkpoint_hash) == {changed.hash, load_checkpoint(
        tmp_path / "run" / "cross.safetensors").hash}


def test_loading_training_and_reporting_name_wrong_arguments(ckpt, tmp_path, monkeypatch, data_dir):
    from hybridat import export_branch
    from hybridat.checkpoint import write_csv
    from hybridat.models import ModelConfig
    from hybridat.report import load_runs, write_report
    from hybridat.run import run_training
    from hybridat.train import TrainConfig

    with pytest.raises(HybridatError, match="unknown device 'gpu'"):  # was torch's RuntimeError
        load_checkpoint(ckpt.path, device="gpu")
    with pytest.raises(HybridatError, match="must be a str or Path, got int"):
        load_checkpoint(3)
    config, cfg = ModelConfig("resnet18", "bn", 0.0625, 10), TrainConfig(epochs=1, steps=1, train_subset=64)
    cases = [((ModelConfig("resnet18", "bn", 0.0625, 100), cfg), {}, "100 classes and cifar10 has 10"),
             ((config, {"epochs": 1}), {}, "must be a hybridat.train.TrainConfig, got dict"),
             ((("resnet18", "bn"), cfg), {}, "must be a hybridat.models.ModelConfig, got tuple"),
             ((config, TrainConfig(epochs=1, eps=8 / 255)), {}, "give eps=8"),
             ((config, TrainConfig(epochs=1, step=2 / 255)), {}, "give step=2"),
             ((config, cfg), {"device": "gpu"}, "unknown device 'gpu'")]
    for args, kwargs, message in cases:  # the 100-class model used to train on CIFAR-10's 10 labels silently
        with pytest.raises(HybridatError, match=message):
            run_training(tmp_path / "run", *args, data_dir=data_dir, **kwargs)
        assert not (tmp_path / "run").exists()
    write_csv(evaluate(ckpt, split(), ["clean"], ["adv"]), tmp_path / "runs" / "eval.csv")
    monkeypatch.chdir(tmp_path)
    assert len(load_runs("runs")["eval"]) == 1  # one path, not the paths "r", "u", "n", "s"
    with pytest.raises(HybridatError, match="no rows to report"):  # wrote a report of empty tables
        write_report({}, tmp_path / "report")
    assert not (tmp_path / "report").exists()
    done = export_branch(ckpt, tmp_path / "adv.safetensors", branch="adv", layout="kuangliu")  # was a TypeError
    assert done.path.is_file()


def test_each_commands_function_is_importable_from_the_package():
    import subprocess
    import sys

    import hybridat
    from hybridat import run, swap_bn, write_ns_gap

    assert hybridat.run_training is run.run_training and callable(swap_bn)
    assert callable(write_ns_gap) and set(hybridat.__all__) <= set(dir(hybridat))
    light = "import sys, hybridat; print('torch' in sys.modules)"  # `import hybridat` stays light
    assert subprocess.run([sys.executable, "-c", light], capture_output=True, text=True).stdout.strip() == "False"


def test_evaluate_reports_its_progress_batch_by_batch(ckpt):
    """A long evaluation (PGD-20 on 10,000 images at full width) says how far each attack is, after every batch:
    what runs, images done, images in all; the attack's start is announced at 0. The three come positionally, as
    documented: evaluate passed the last one as `total=`, and a callback naming it otherwise failed."""
    calls = []
    rows = evaluate(ckpt, split(10), ["clean", "pgd"], ["adv", "clean"], eps=8, steps=[1], batch_size=4,
                    on_batch=lambda label, images_done, images_all: calls.append((label, images_done, images_all)))
    assert len(rows) == 4
    assert calls == [(what, done, 10) for what in ("adv clean", "adv PGD-1", "clean clean", "clean PGD-1")
                     for done in (0, 4, 8, 10)]


def test_write_ns_gap_failing_halfway_leaves_the_earlier_files_whole(ckpt, tmp_path, monkeypatch):
    """A full disk at the last of the four files (the rows CSV): the plots and the channels CSV of the new run are
    not left beside the earlier rows (a plot that no CSV matches); the earlier four stay as they were."""
    import hybridat.analysis as analysis

    x, y = data()
    analysis.write_ns_gap(ckpt, x, y, tmp_path / "g.csv", eps=8, steps=1, fix_ap=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = analysis._write_rows

    def full(rows, path):
        if "g.csv" in Path(path).name and "channels" not in Path(path).name:
            raise OSError(28, "No space left on device", str(path))
        real(rows, path)

    monkeypatch.setattr(analysis, "_write_rows", full)
    with pytest.raises(OSError, match="No space left on device"):
        analysis.write_ns_gap(ckpt, x, y, tmp_path / "g.csv", eps=16, steps=1, fix_ap=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_evaluate_measures_each_branch_through_that_branch(tmp_path):
    """A row of branch b counts the images that the model's branch b classifies correctly. (`perturb`'s models answer
    one class for every image through both branches, so a model whose clean AP alone was moved.)"""
    model = tiny().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_clean"):
                p.add_(torch.randn(p.shape, generator=g))
    save_checkpoint(model, tmp_path / "m.safetensors", run="r")
    s = split(32)
    x = s.images.float() / 255
    with torch.no_grad():
        want = {b: (model(x, b).argmax(1) == s.labels).float().mean().item() for b in ("adv", "clean")}
    assert want["adv"] != want["clean"]
    rows = evaluate(load_checkpoint(tmp_path / "m.safetensors"), s, ["clean"], ["adv", "clean"])
    assert {r["branch"]: r["accuracy"] for r in rows} == want


def test_evaluate_rows_record_what_was_measured_in_pixel_units(ckpt, monkeypatch):
    """Each row records the radius and PGD step in 1/255 units as given (step eps/4 by default), n = every image of
    the split (not a batch), and the attack ran at that radius and step divided by 255: a row saying eps=4 for an
    attack at 4/255² (or a step of 2 run as 2/255², or one batch's images) puts a wrong number in the tables."""
    import hybridat.evaluate as ev

    calls = []

    def spy(model, x, y, attack, **kw):
        calls.append((attack, kw["eps"], kw["step"], kw["steps"], len(y)))
        return real(model, x, y, attack, **kw)

    real = ev.robust_accuracy
    monkeypatch.setattr(ev, "robust_accuracy", spy)
    s = split(10)
    rows = evaluate(ckpt, s, ["clean", "pgd"], ["adv"], eps=4, steps=[1], batch_size=4)
    rows += evaluate(ckpt, s, ["pgd"], ["adv"], eps=4, step=2, steps=[3], batch_size=4)
    got = [(r["attack"], r["eps"], r["step"], r["steps"], r["n"]) for r in rows]
    assert got == [("clean", 4, None, None, 10), ("pgd", 4, 1.0, 1, 10), ("pgd", 4, 2, 3, 10)]
    assert calls == [("clean", 4 / 255, None, 1, 10), ("pgd", 4 / 255, None, 1, 10), ("pgd", 4 / 255, 2 / 255, 3, 10)]
    assert [r["eps"] for r in evaluate(ckpt, s, ["clean"], ["adv"])] == [8]  # a clean row records the default ε
