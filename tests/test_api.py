"""The library as a researcher in a notebook calls it: the functions the README names leave the caller's state
(global random streams) as it was, and a mistake a notebook makes (labels or pixels of another dtype, a split that
is not load_split's, a foreign model where a hybridat one is meant, a single number where a list is meant) gets
one HybridatError line, never a torch error from deep inside or a silently unchanged model."""

import random

import pytest
import torch
import torchvision

from hybridat import attacks
from hybridat.analysis import ns_gap
from hybridat.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint, write_csv
from hybridat.data import Split, load_split, to_float
from hybridat.errors import HybridatError
from hybridat.evaluate import evaluate
from hybridat.interop import export_branch, import_checkpoint
from hybridat.models import BranchView, ModelConfig
from hybridat.recombine import cross, recombine, reestimate, swap_ap
from hybridat.run import run_training
from hybridat.train import TrainConfig

from conftest import perturb, tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "run" / "model.safetensors"
    save_checkpoint(perturb(tiny()).eval(), path, train={"eps": 8, "loss": "hybrid", "dataset": "cifar10",
                                                        "epochs": 1}, seed=0, run="run")
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def test_split(data_dir):
    return load_split("cifar10", train=False, data_dir=data_dir, n=24)


def _streams():
    return torch.get_rng_state(), random.getstate()


def _same_streams(before) -> bool:
    torch_state, python_state = _streams()
    return torch.equal(torch_state, before[0]) and python_state == before[1]


def test_loading_and_importing_a_checkpoint_leave_the_global_random_streams_alone(ckpt, tmp_path):
    """A model built only to receive a checkpoint's weights drew its random init from the caller's global RNG: in
    a notebook, `torch.manual_seed(0); load_checkpoint(p); torch.randn(3)` gave other numbers than without the
    load."""
    exported = export_branch(ckpt, tmp_path / "adv.safetensors", branch="adv", layout="kuangliu").path
    calls = [lambda: load_checkpoint(ckpt.path), lambda: checkpoint_info(ckpt.path),
             lambda: import_checkpoint(exported), lambda: import_checkpoint(exported, tmp_path / "m.safetensors")]
    for call in calls:
        torch.manual_seed(0)
        before = _streams()
        call()
        assert _same_streams(before)
    assert torch.equal(load_checkpoint(ckpt.path).model.state_dict()["bn1.running_mean_adv"],
                       ckpt.model.state_dict()["bn1.running_mean_adv"])


def test_training_from_python_leaves_the_callers_random_streams_alone(data_dir, tmp_path):
    """run_training seeded torch's and Python's global generators with the run's seed and left them there: every
    random number a notebook drew after a training came from the run's seed, not from the caller's stream. The run
    itself stays as reproducible as before: the same seed, the same model."""
    config = ModelConfig("resnet18", "bn", width=0.0625)
    cfg = TrainConfig(epochs=1, steps=1, batch_size=32, train_subset=64, seed=3)
    hashes = []
    for k, caller_seed in enumerate((1, 2)):
        torch.manual_seed(caller_seed)
        random.seed(caller_seed)
        before = _streams()
        threads = torch.get_num_threads()
        result = run_training(tmp_path / f"run{k}", config, cfg, data_dir=data_dir)
        assert _same_streams(before) and torch.get_num_threads() == threads
        hashes.append(load_checkpoint(result.model_path).hash)
    assert hashes[0] == hashes[1]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_labels_of_an_integer_dtype_torch_cannot_take_are_refused(ckpt, test_split, dtype):
    """check_labels let any integer dtype through; int32 labels (numpy's on some platforms, `torch.tensor(list,
    dtype=torch.int)`) then failed inside cross_entropy with a RuntimeError."""
    x, y = to_float(test_split.images), test_split.labels.to(dtype)
    view = BranchView(ckpt.model, "adv")
    calls = [lambda: evaluate(ckpt, Split(test_split.images, y), ["pgd"], ["adv"], steps=[1]),
             lambda: attacks.robust_accuracy(view, x, y, "pgd", 8 / 255, steps=1),
             lambda: attacks.pgd(view, x, y, 8 / 255, steps=1),
             lambda: ns_gap(ckpt, x, y, eps=8, steps=1),
             lambda: reestimate(ckpt, "adv", "adv", Split(test_split.images, y), steps=1, batch_size=8)]
    for call in calls:
        with pytest.raises(HybridatError, match=f"labels.*{dtype}.*\\.long\\(\\)"):
            call()
    # uint8 labels, which cross_entropy takes, still measure what int64 labels measure
    assert (attacks.robust_accuracy(view, x, test_split.labels.to(torch.uint8), "pgd", 8 / 255, steps=1)
            == attacks.robust_accuracy(view, x, test_split.labels, "pgd", 8 / 255, steps=1))


def test_pixels_of_another_float_dtype_than_the_model_are_refused(ckpt, test_split):
    """Images from numpy (`torch.from_numpy(a / 255)`) are float64; the float32 model then failed inside a
    convolution with a RuntimeError."""
    x, y = to_float(test_split.images).double(), test_split.labels
    with pytest.raises(HybridatError, match="x is torch.float64, the model's weights are torch.float32.*x.float()"):
        attacks.robust_accuracy(BranchView(ckpt.model, "adv"), x, y, "pgd", 8 / 255, steps=1)
    with pytest.raises(HybridatError, match="x is torch.float64"):
        ns_gap(ckpt, x, y, eps=8, steps=1)


def test_a_split_that_is_not_load_splits_is_named(ckpt, test_split):
    """evaluate and reestimate read a Split of uint8 images: float pixels got "to_float expects uint8 images", a
    message about a function the caller never called, and an empty split a RuntimeError from max()."""
    images, labels = test_split.images, test_split.labels
    cases = [(Split(to_float(images), labels), r"split.images must be uint8 \(0-255\).*got torch.float32"),
             (Split(images[:0], labels[:0]), "the split holds no images"),
             (Split(images[:, 0], labels), r"split.images must have the shape \(N, C, H, W\)"),
             ((images, labels), "must be a hybridat.data.Split")]
    for split, message in cases:
        with pytest.raises(HybridatError, match=message):
            evaluate(ckpt, split, ["clean"], ["adv"])
        with pytest.raises(HybridatError, match=message):
            reestimate(ckpt, "adv", "clean", split)


def test_recombining_a_model_without_branch_norms_is_refused():
    """cross, swap_ap and recombine of a torchvision ResNet returned an unchanged copy without a word: a
    "Cross-BN" model that was the input model."""
    foreign = torchvision.models.resnet18(num_classes=10)
    train = Split(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    for call in (lambda m: cross(m), lambda m: swap_ap(m), lambda m: recombine(m, ns={"adv": "clean"}),
                 lambda m: reestimate(m, "adv", "clean", train)):  # this one said "has no running NS"
        with pytest.raises(HybridatError, match="not a hybridat model.*hybridat import"):
            call(foreign)


def test_write_csv_writes_rows_to_a_csv_name_only(ckpt, test_split, tmp_path):
    """write_csv (what `attack --out` is from Python) wrote anything anywhere: no rows as a one-line file that
    load_runs then called unreadable, and rows over the checkpoint they measured (`write_csv(rows, path)` with the
    notebook's `path` still naming the model)."""
    rows = evaluate(ckpt, test_split, ["clean"], ["adv"])
    before = ckpt.path.read_bytes()
    with pytest.raises(HybridatError, match="must end in .csv"):
        write_csv(rows, ckpt.path)
    assert ckpt.path.read_bytes() == before
    for empty in ([], None):
        with pytest.raises(HybridatError, match="no rows to write"):
            write_csv(empty, tmp_path / "empty.csv")
    with pytest.raises(HybridatError, match="rows must be a list of dicts"):
        write_csv(rows[0], tmp_path / "one.csv")
    assert not list(tmp_path.iterdir())
    write_csv(rows, str(tmp_path / "eval.csv"))
    assert (tmp_path / "eval.csv").read_text().count("\n") == 2


def test_single_values_and_wrong_types_in_the_attack_settings_are_named(ckpt, test_split):
    x, y = to_float(test_split.images), test_split.labels
    view = BranchView(ckpt.model, "adv")
    cases = [(lambda: evaluate(ckpt, test_split, ["pgd"], ["adv"], steps=10), r"steps must be a list.*\[10\]"),
             (lambda: attacks.robust_accuracy(view, x, y, "pgd", 8 / 255, steps=2.5), "PGD steps must be an integer"),
             (lambda: attacks.pgd(view, x, y, 8 / 255, steps=2.5), "PGD steps must be an integer"),
             (lambda: attacks.robust_accuracy(view, x, y, "pgd", 8 / 255, steps=1, batch_size=8.0),
              "batch size must be an integer"),
             (lambda: ns_gap(ckpt, x, y, eps=8, steps=1, seed=1.5), "seed must be an integer"),
             (lambda: attacks.robust_accuracy(ckpt, x, y, "pgd", 8 / 255, steps=1),
              r"BranchView\(ckpt.model, 'adv'\)"),
             (lambda: attacks.pgd(ckpt, x, y, 8 / 255, steps=1), r"BranchView\(ckpt.model, 'adv'\)")]
    for call, message in cases:
        with pytest.raises(HybridatError, match=message):
            call()


def test_load_split_names_wrong_arguments(data_dir):
    """n=10.5 and n="10" ended in TypeErrors, device="gpu" in torch's RuntimeError, and train="no" (true in
    Python) loaded the training split."""
    cases = [(dict(n=10.5), "n must be an integer"), (dict(n="10"), "n must be an integer"),
             (dict(device="gpu"), "unknown device 'gpu'"), (dict(train="no"), "train must be True or False")]
    for kwargs, message in cases:
        with pytest.raises(HybridatError, match=message):
            load_split("cifar10", **{"train": False, "n": 10, "data_dir": data_dir, **kwargs})


def test_a_report_from_python_never_writes_over_the_csvs_it_read(ckpt, test_split, tmp_path):
    """`hybridat report` refuses an --out whose tables would replace a CSV it read; from Python, write_report knew
    its inputs only if passed `inputs=`, so ns-gap rows saved as results/ns-gap.csv were overwritten by the report's
    ns-gap table when the report went into results/. A CSV of measurements is now never a report's to replace."""
    from hybridat.analysis import write_ns_gap
    from hybridat.report import load_runs, write_report

    x, y = to_float(test_split.images), test_split.labels
    rows = tmp_path / "ns-gap.csv"
    write_ns_gap(ckpt, x, y, rows, eps=8, steps=1)
    before = rows.read_bytes()
    frames = load_runs([tmp_path])
    with pytest.raises(HybridatError, match="ns-gap.csv holds ns-gap rows, not a report's table"):
        write_report(frames, tmp_path)
    assert rows.read_bytes() == before and not (tmp_path / "report.md").exists()
    written = write_report(frames, tmp_path / "report")
    assert tmp_path / "report" / "ns-gap.csv" in written
    assert write_report(frames, tmp_path / "report") == written  # an earlier report's tables are no measurements


def test_a_checkpoint_changed_in_the_notebook_is_not_measured_under_its_files_hash(ckpt, test_split, tmp_path):
    """Every row and derived file names the checkpoint by the hash of the file it was loaded from. A forward pass in
    train mode in the notebook (which moves BN's running NS) or an edited weight changed ckpt.model, and evaluate,
    write_ns_gap, swap_bn (save_derived) and export_branch then recorded the other model's numbers under the file's
    hash, which `report` takes for the same model."""
    changed = load_checkpoint(ckpt.path)
    x, y = to_float(test_split.images), test_split.labels
    changed.model.eval()
    assert evaluate(changed, test_split, ["clean"], ["adv"])[0]["checkpoint_hash"] == ckpt.hash  # mode: no change
    changed.model.train()
    with torch.no_grad():
        changed.model(x, "adv")  # running NS of the adv branch move
    changed.model.eval()
    from hybridat.analysis import write_ns_gap
    from hybridat.recombine import save_derived, swap_bn

    calls = [lambda: evaluate(changed, test_split, ["clean"], ["adv"]),
             lambda: write_ns_gap(changed, x, y, tmp_path / "g.csv", eps=8, steps=1),
             lambda: swap_bn(changed, tmp_path / "cross.safetensors", cross=True),
             lambda: save_derived(changed, cross(changed), tmp_path / "cross.safetensors", {"op": "cross"}),
             lambda: export_branch(changed, tmp_path / "adv.pt", branch="adv", layout="kuangliu")]
    for call in calls:
        with pytest.raises(HybridatError, match="has changed since it was loaded.*save_checkpoint"):
            call()
    assert not list(tmp_path.iterdir())


def test_write_report_names_frames_and_margins_it_cannot_use(ckpt, test_split, tmp_path):
    """write_report of {"evals": rows} (a typo of a kind) wrote a report of empty tables, the rows unread; a margin
    of "2" or NaN, which the command refuses, went into the Findings' verdicts; a frame without its accuracy column
    ended in an AttributeError from a groupby."""
    from hybridat.report import load_runs, write_report

    write_csv(evaluate(ckpt, test_split, ["clean"], ["adv"]), tmp_path / "runs" / "eval.csv")
    frames = load_runs([tmp_path / "runs"])
    cases = [(({"evals": frames["eval"]},), {}, "unknown kind of rows 'evals'; load_runs gives eval, train, nsgap"),
             (({"eval": frames["eval"].drop(columns=["accuracy"])},), {}, "eval rows lack the column accuracy"),
             (({"eval": frames["eval"].to_dict("records")},), {}, "eval rows must be a pandas DataFrame"),
             ((frames,), {"margin": "2"}, "margin must be a number"),
             ((frames,), {"margin": float("nan")}, "margin must be a finite number"),
             ((frames,), {"margin": 1e30}, r"margin must be in \[0, 100\], got 1e\+30"),  # percentage points
             ((frames,), {"ratio_margin": 0.5}, r"ratio margin must be in \[1, inf\]")]
    for args, kwargs, message in cases:
        with pytest.raises(HybridatError, match=message):
            write_report(*args, tmp_path / "report", **kwargs)
    assert not (tmp_path / "report").exists()
    assert (tmp_path / "report" / "report.md") in write_report(frames, tmp_path / "report")


def test_a_checkpoint_or_a_model_where_a_path_is_meant_is_named(ckpt, tmp_path):
    """import_checkpoint(ckpt), export_branch(ckpt.model, ...), load_runs([ckpt]), run_training(..., data_dir=5)
    and an output given as a model ended in Python's TypeError from Path()."""
    from hybridat.report import load_runs

    cases = [(lambda: import_checkpoint(ckpt), "the checkpoint to import must be a str or Path, got Checkpoint"),
             (lambda: export_branch(ckpt.model, tmp_path / "a.pt", branch="adv", layout="kuangliu"),
              "checkpoint .a path or a Checkpoint. must be a str or Path, got ResNet"),
             (lambda: load_runs([ckpt]), "each path of load_runs must be a str or Path, got Checkpoint"),
             (lambda: load_split("cifar10", train=False, data_dir=5), "data_dir must be a str or Path, got int"),
             (lambda: write_csv([{"a": 1}], ckpt), "an output path must be a str or Path, got Checkpoint")]
    for call, message in cases:
        with pytest.raises(HybridatError, match=message):
            call()


def test_to_float_and_branch_view_name_what_they_take(ckpt):
    """README (From Python) names hybridat.data.to_float(split.images) and BranchView(ckpt.model, "adv"): a list
    given to to_float ended in "'list' object has no attribute 'dtype'", a torchvision model or a path given to
    BranchView in a TypeError at its first call."""
    with pytest.raises(HybridatError, match="to_float expects a uint8 tensor of images, got list"):
        to_float([[0, 255]])
    with pytest.raises(HybridatError, match="to_float expects a uint8 tensor of images, got NoneType"):
        to_float(None)
    for model in ("m.safetensors", torchvision.models.resnet18(num_classes=10)):
        with pytest.raises(HybridatError, match="BranchView takes a hybridat model"):
            BranchView(model, "adv")
    with pytest.raises(HybridatError, match="unknown branch 'both'"):
        BranchView(ckpt.model, "both")
    assert BranchView(ckpt.model, "clean").branch == "clean"
    assert BranchView(torch.compile(ckpt.model), "adv").branch == "adv"  # a wrapper of a hybridat model is one
