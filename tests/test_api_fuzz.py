"""What scripts/fuzz_api.py found: library functions called from Python with hostile arguments (a list where a
name is meant, None where a list is meant, ...) got a TypeError or AttributeError from inside instead of one
HybridatError line. Each test fails without its fix."""

import pytest
import torch

from hybridat import attacks
from hybridat.data import load_split, to_float
from hybridat.errors import HybridatError
from hybridat.interop import import_checkpoint
from hybridat.models import BranchView
from hybridat.norms import get_norm
from hybridat.report import load_runs

from conftest import tiny


def test_a_list_where_a_name_is_meant_is_refused_by_name(data_dir, tmp_path):
    """`name in DICT` of a list raised TypeError: unhashable type: 'list' (load_split(["cifar10"], ...),
    import_checkpoint(..., arch=[...]), robust_accuracy(..., attack=["pgd"]), get_norm(["bn"]))."""
    model = tiny("bn").eval()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    cases = [(lambda: load_split(["cifar10"], train=False, data_dir=data_dir, n=2), r"unknown dataset \['cifar10'\]"),
             (lambda: import_checkpoint(tmp_path / "plain.pt", arch=["resnet18"]), r"unknown arch \['resnet18'\]"),
             (lambda: import_checkpoint(tmp_path / "plain.pt", layout=["auto"]), r"unknown layout \['auto'\]"),
             (lambda: import_checkpoint(tmp_path / "plain.pt", norm=["bn"]), r"unknown norm \['bn'\]"),
             (lambda: attacks.robust_accuracy(BranchView(model, "adv"), x, y, ["pgd"], 8 / 255),
              r"unknown attack \['pgd'\]"),
             (lambda: get_norm(["bn"]), r"unknown norm \['bn'\]")]
    for call, message in cases:
        with pytest.raises(HybridatError, match=message):
            call()
    assert not (tmp_path / "plain.safetensors").exists()


def test_load_runs_names_paths_and_sources_that_are_not_lists(tmp_path):
    """load_runs(None) raised "'NoneType' object is not iterable"; load_runs(paths, sources=5) read the files and
    then ended in an AttributeError from sources.append."""
    (tmp_path / "a.csv").write_text("a,b\n1,2\n")
    with pytest.raises(HybridatError, match="paths must be a list of CSV files or folders, got NoneType"):
        load_runs(None)
    with pytest.raises(HybridatError, match="sources must be a list .load_runs appends each file read., got int"):
        load_runs([tmp_path], sources=5)


def test_run_training_names_an_out_that_is_not_a_path(data_dir):
    """run_training(5, ...) ended in Python's TypeError from Path()."""
    from hybridat.models import ModelConfig
    from hybridat.run import run_training
    from hybridat.train import TrainConfig

    with pytest.raises(HybridatError, match=r"out \(the run folder\) must be a str or Path, got int"):
        run_training(5, ModelConfig("resnet18", "bn", width=0.0625), TrainConfig(epochs=1, steps=1, batch_size=8,
                     train_subset=16), data_dir=data_dir)


def test_images_of_another_channel_count_than_the_model_takes_are_refused():
    """A grayscale split or batch (N, 1, H, W) passed every check and failed inside the first convolution with
    torch's RuntimeError ("expected input[8, 1, 32, 32] to have 3 channels")."""
    from hybridat.data import Split
    from hybridat.recombine import reestimate

    model = tiny().eval()
    gray = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(HybridatError, match=r"split.images has 1 channels and the model takes 3"):
        reestimate(model, "adv", "adv", Split(gray, y), steps=1, batch_size=4)
    with pytest.raises(HybridatError, match=r"x has 1 channels and the model takes 3"):
        attacks.robust_accuracy(BranchView(model, "adv"), to_float(gray), y, "pgd", 8 / 255, steps=1)
    from hybridat.analysis import ns_gap
    with pytest.raises(HybridatError, match=r"x has 1 channels and the model takes 3"):
        ns_gap(model, to_float(gray), y, eps=8, steps=1)


def test_a_callback_that_is_not_a_function_is_refused_before_any_work(data_dir, tmp_path):
    """on_batch=5 (or on_step, on_epoch, on_row, loss_fn) passed every check and failed at its first call with
    "'int' object is not callable", after the work had started: run_training(on_epoch=5) left a run folder with an
    epoch's checkpoint."""
    from hybridat.analysis import ns_gap
    from hybridat.models import ModelConfig
    from hybridat.recombine import reestimate
    from hybridat.run import run_training
    from hybridat.train import TrainConfig

    model = tiny().eval()
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    view = BranchView(model, "adv")
    split = load_split("cifar10", train=True, data_dir=data_dir, n=4)
    cfg = TrainConfig(epochs=1, steps=1, batch_size=8, train_subset=16)
    calls = {"on_batch": [lambda: attacks.pgd(view, x, y, 8 / 255, steps=1, on_batch=5),
                          lambda: attacks.robust_accuracy(view, x, y, "pgd", 8 / 255, steps=1, on_batch=5),
                          lambda: ns_gap(model, x, y, eps=8, steps=1, on_batch=5),
                          lambda: reestimate(model, "adv", "adv", split, steps=1, on_batch=5)],
             "loss_fn": [lambda: attacks.pgd(view, x, y, 8 / 255, steps=1, loss_fn=5)],
             "on_step": [lambda: run_training(tmp_path / "a", ModelConfig("resnet18", "bn", width=0.0625), cfg,
                                              data_dir=data_dir, on_step=5)],
             "on_epoch": [lambda: run_training(tmp_path / "b", ModelConfig("resnet18", "bn", width=0.0625), cfg,
                                               data_dir=data_dir, on_epoch=5)]}
    for name, cases in calls.items():
        for call in cases:
            with pytest.raises(HybridatError, match=f"{name} must be a function or None, got int"):
                call()
    assert not list(tmp_path.iterdir())


def test_a_flag_that_is_not_a_bool_is_refused(data_dir, tmp_path):
    """A string where True or False is meant is true in Python: load_checkpoint(p, allow_nonfinite="no") loaded
    non-finite weights, robust_accuracy(amp="no") crafted in bf16, reestimate(augment_data="no") augmented; None
    ended in torch's TypeError from set_autocast_enabled."""
    from hybridat.checkpoint import load_checkpoint
    from hybridat.recombine import reestimate

    model = tiny().eval()
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    split = load_split("cifar10", train=True, data_dir=data_dir, n=4)
    cases = [(lambda: attacks.robust_accuracy(BranchView(model, "adv"), x, y, "pgd", 8 / 255, steps=1, amp="no"),
              "amp must be True or False, got 'no'"),
             (lambda: attacks.robust_accuracy(BranchView(model, "adv"), x, y, "pgd", 8 / 255, steps=1, amp=None),
              "amp must be True or False, got None"),
             (lambda: attacks.robust_accuracy(BranchView(model, "adv"), x, y, "pgd", 8 / 255, graphs=2),
              "graphs must be True or False, got 2"),
             (lambda: reestimate(model, "adv", "adv", split, steps=1, augment_data="no"),
              "augment_data must be True or False"),
             (lambda: load_checkpoint(tmp_path / "m.safetensors", allow_nonfinite="no"),
              "allow_nonfinite must be True or False"),
             (lambda: load_split("cifar10", train=False, data_dir=data_dir, n=2, download="no"),
              "download must be True or False")]
    for call, message in cases:
        with pytest.raises(HybridatError, match=message):
            call()


@pytest.mark.parametrize("seed, message", [(2.5, "seed must be an integer, got 2.5"), (None, "seed must be an integer"),
                                           (-1, r"seed must be in \[0, ")])
def test_robust_accuracy_names_a_seed_it_cannot_use(seed, message):
    """robust_accuracy(..., seed=2.5) ended in torch's RuntimeError from manual_seed, seed=None in a TypeError from
    `seed + i`, seed=-1 was taken."""
    model = tiny().eval()
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(HybridatError, match=message):
        attacks.robust_accuracy(BranchView(model, "adv"), x, y, "pgd", 8 / 255, steps=1, seed=seed)


def test_labels_beyond_the_classes_of_a_branch_view_are_refused():
    """robust_accuracy's labels were checked against the model's classes only for a hybridat model itself, never
    for the BranchView the README tells a notebook to pass: label 10 of a 10-class model ended in cross_entropy's
    IndexError ("Target 10 is out of bounds")."""
    model = tiny().eval()
    x, y = torch.rand(2, 3, 32, 32), torch.full((2,), 10, dtype=torch.long)
    with pytest.raises(HybridatError, match=r"y holds labels in \[10, 10\].*the model has 10 classes"):
        attacks.robust_accuracy(BranchView(model, "adv"), x, y, "pgd", 8 / 255, steps=1)


def test_reestimate_names_a_branch_view_and_a_batch_count_it_cannot_use(data_dir):
    """reestimate(BranchView(m, 'adv'), ...) ended in "forward() takes 2 positional arguments but 3 were given";
    n_batches=NaN passed `n_batches < 1` and re-estimated on every batch, n_batches="3" ended in a TypeError."""
    from hybridat.recombine import reestimate

    model = tiny().eval()
    split = load_split("cifar10", train=True, data_dir=data_dir, n=4)
    with pytest.raises(HybridatError, match="not a BranchView of one: pass view.model"):
        reestimate(BranchView(model, "adv"), "adv", "adv", split, steps=1)
    for n, message in [(float("nan"), "n_batches must be an integer"), ("3", "n_batches must be an integer"),
                       (0, r"n_batches must be in \[1, ")]:
        with pytest.raises(HybridatError, match=message):
            reestimate(model, "adv", "adv", split, steps=1, n_batches=n)


def test_write_ns_gap_and_write_report_name_outputs_and_inputs_that_are_not_paths(data_dir, tmp_path):
    """write_ns_gap(..., out=5) and write_report(frames, 5) ended in Python's TypeError from Path();
    write_report(..., inputs=5) in "'int' object is not iterable", and inputs="eval.csv" (one path, not a list)
    protected its characters, not the file."""
    from hybridat.analysis import write_ns_gap
    from hybridat.checkpoint import load_checkpoint, save_checkpoint
    from hybridat.report import write_report

    save_checkpoint(tiny().eval(), tmp_path / "m.safetensors", train={"eps": 8, "loss": "hybrid",
                                                                     "dataset": "cifar10", "epochs": 1}, seed=0)
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(HybridatError, match="out must be a str or Path, got int"):
        write_ns_gap(ckpt, x, y, 5, eps=8, steps=1)
    from hybridat.checkpoint import write_csv
    from hybridat.evaluate import evaluate
    from hybridat.report import load_runs

    write_csv(evaluate(ckpt, load_split("cifar10", train=False, data_dir=data_dir, n=2), ["clean"], ["adv"]),
              tmp_path / "runs" / "eval.csv")
    frames = load_runs([tmp_path / "runs"])
    with pytest.raises(HybridatError, match="out_dir must be a str or Path, got int"):
        write_report(frames, 5)
    with pytest.raises(HybridatError, match="inputs must be a list of paths, got int"):
        write_report(frames, tmp_path / "rep", inputs=5)
    # one path for inputs is that path: the report may not write over it
    (tmp_path / "report.md").write_text("my notes\n")
    with pytest.raises(HybridatError, match="report.md"):
        write_report(frames, tmp_path, inputs=str(tmp_path / "report.md"))
    assert (tmp_path / "report.md").read_text() == "my notes\n"


def test_write_report_names_a_frame_that_is_not_a_dataframe_before_counting_rows(tmp_path):
    """write_report({"eval": None}, out) ended in "object of type 'NoneType' has no len()": the rows were counted
    before each frame's type was checked."""
    from hybridat.report import write_report

    with pytest.raises(HybridatError, match="eval rows must be a pandas DataFrame .load_runs gives them., got "
                                            "NoneType"):
        write_report({"eval": None}, tmp_path / "rep")


def test_autoattack_attacks_that_are_neither_a_str_nor_a_list_are_named():
    """aa_attacks=5 (evaluate, robust_accuracy, aa_settings) ended in "'int' object is not iterable"."""
    model = tiny().eval()
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(HybridatError, match="AutoAttack attacks must be a comma-separated str or a list of names, "
                                            "got int"):
        attacks.robust_accuracy(BranchView(model, "adv"), x, y, "autoattack", 8 / 255, aa_attacks=5)


def test_pgd_checks_its_batch_as_robust_accuracy_does():
    """pgd, which the README names beside robust_accuracy, checked only the shapes and dtypes: float64 pixels and
    a grayscale batch ended in torch's RuntimeError, label 10 in cross_entropy's IndexError, a NaN pixel came back
    as NaN examples, generator=5 ended in uniform_'s TypeError."""
    model = tiny().eval()
    view = BranchView(model, "adv")
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    cases = [((x.double(), y), {}, "x is torch.float64, the model's weights are torch.float32"),
             ((x[:, :1], y), {}, "x has 1 channels and the model takes 3"),
             ((x, y + 10), {}, r"y holds labels in \[10, 10\]"),
             ((nan, y), {}, "x holds NaN or infinite values"),
             ((x, y), {"generator": 5}, "generator must be a torch.Generator or None, got int")]
    for (xs, ys), kwargs, message in cases:
        with pytest.raises(HybridatError, match=message):
            attacks.pgd(view, xs, ys, 8 / 255, steps=1, **kwargs)
    assert attacks.pgd(view, x, y, 8 / 255, steps=1, generator=torch.Generator().manual_seed(0)).shape == x.shape


def test_write_csv_refuses_rows_without_columns(tmp_path):
    """write_csv([{}], path) wrote a CSV of two bare newlines, which load_runs then called unreadable: what
    write_csv refuses for no rows at all."""
    from hybridat.checkpoint import write_csv

    with pytest.raises(HybridatError, match="the rows have no columns"):
        write_csv([{}, {}], tmp_path / "e.csv")
    assert not (tmp_path / "e.csv").exists()


def test_pgd_names_a_loss_that_is_not_one_number():
    """A per-example loss_fn (cross_entropy(..., reduction="none")) ended in autograd's RuntimeError "grad can be
    implicitly created only for scalar outputs"."""
    import torch.nn.functional as F

    model = tiny().eval()
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(HybridatError, match=r"loss_fn must return one number .*got \(2,\)"):
        attacks.pgd(BranchView(model, "adv"), x, y, 8 / 255, steps=1,
                    loss_fn=lambda logits, t: F.cross_entropy(logits, t, reduction="none"))


def test_the_api_sweep_covers_every_parameter_of_every_function_the_readme_names(data_dir, tmp_path):
    """scripts/fuzz_api.py (~3 minutes, not part of `make test`) keeps up with the library: every function of
    hybridat's API and every parameter of each gets hostile values, and a new parameter of a kind the sweep does not
    know fails here rather than there."""
    import inspect
    import types

    import pandas as pd

    import hybridat
    from hybridat.checkpoint import load_checkpoint, save_checkpoint

    from conftest import script

    fuzz = script("fuzz_api")
    swept = {fuzz.SPECS[s][0].rsplit(".", 1)[1] for s in fuzz.SPECS}
    named = set(hybridat._API) - {"HybridatError"} | {"evaluate", "recombine", "cross", "swap_ap", "reestimate",
                                                       "pgd", "robust_accuracy"}
    assert swept == named
    for name, model in (("m", tiny()), ("bn", tiny("bn"))):
        save_checkpoint(model.eval(), tmp_path / f"{name}.safetensors", train={"eps": 8}, seed=0)
    split = load_split("cifar10", train=False, data_dir=data_dir, n=4)
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    ctx = types.SimpleNamespace(ws=tmp_path, ckpt=ckpt, bn=load_checkpoint(tmp_path / "bn.safetensors"),
                                split=split, train=split, x=to_float(split.images), y=split.labels,
                                view=BranchView(ckpt.model, "adv"))
    bases = {"frames": {"eval": pd.DataFrame({"accuracy": [50.0]})}, "rows": [{"a": 1}], "out": "o.csv"}
    for spec, (dotted, _, _) in fuzz.SPECS.items():
        for p in inspect.signature(fuzz._function(dotted)).parameters.values():
            if p.name in fuzz.SKIP.get(spec, ()):
                continue
            cases = fuzz.values(spec.split("+")[0], p, ctx, bases.get(p.name, p.default))
            assert cases, f"{spec}({p.name}) gets no hostile values"
            assert len({label for label, _ in cases}) == len(cases), f"{spec}({p.name}): labels repeat"


def test_robust_accuracy_refuses_autoattack_settings_for_another_attack():
    """robust_accuracy(..., "pgd", aa_restarts=float("nan")) (or aa_version="bogus") measured PGD without a word
    about the settings it ignored; evaluate refuses them unless autoattack is among its attacks."""
    model = tiny().eval()
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    for kwargs in ({"aa_restarts": float("nan")}, {"aa_version": "bogus"}, {"aa_attacks": "apgd-ce"}):
        with pytest.raises(HybridatError, match="AutoAttack settings .* were given, but the attack is 'pgd'"):
            attacks.robust_accuracy(BranchView(model, "adv"), x, y, "pgd", 8 / 255, steps=1, **kwargs)


def test_evaluate_hands_autoattack_settings_to_autoattack_only(data_dir, tmp_path):
    """evaluate passed aa_* to robust_accuracy for every attack; FGSM beside AutoAttack with its settings still
    measures both now that robust_accuracy refuses AutoAttack settings for another attack."""
    from hybridat.checkpoint import load_checkpoint, save_checkpoint
    from hybridat.evaluate import evaluate

    save_checkpoint(tiny().eval(), tmp_path / "m.safetensors", train={"eps": 8}, seed=0)
    rows = evaluate(load_checkpoint(tmp_path / "m.safetensors"), load_split("cifar10", train=False,
                    data_dir=data_dir, n=2), ["fgsm", "autoattack"], ["adv"], aa_attacks="apgd-ce", aa_restarts=1)
    assert [r["attack"] for r in rows] == ["fgsm", "autoattack-custom"]


def test_swap_bn_refuses_reestimate_settings_without_reestimate(tmp_path):
    """swap_bn(ckpt, out, cross=True, eps=float("nan")) (or steps=0, n_images=inf, a split) wrote the crossed
    model and ignored the settings, which the command refuses (`--eps only applies to --reestimate`)."""
    from hybridat.checkpoint import load_checkpoint, save_checkpoint
    from hybridat.recombine import swap_bn

    save_checkpoint(tiny().eval(), tmp_path / "m.safetensors", train={"eps": 8}, seed=0)
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    cases = [({"eps": float("nan")}, "eps only applies"), ({"steps": 0, "seed": 1}, "steps, seed only apply"),
             ({"n_images": float("inf")}, "n_images")]
    for kwargs, given in cases:
        with pytest.raises(HybridatError, match=f"{given}.*reestimate; cross does not use"):
            swap_bn(ckpt, tmp_path / "o.safetensors", cross=True, **kwargs)
    assert not (tmp_path / "o.safetensors").exists()
    swap_bn(ckpt, tmp_path / "o.safetensors", cross=True, eps=8, steps=10)  # the defaults, as given by the command
    assert (tmp_path / "o.safetensors").exists()


def test_write_report_refuses_eval_rows_of_a_nan_accuracy(data_dir, tmp_path):
    """load_runs refuses a CSV whose accuracy is NaN (its seed would silently drop out of its cell); frames made or
    edited in Python went into write_report unchecked and the report was written."""
    from hybridat.checkpoint import load_checkpoint, save_checkpoint, write_csv
    from hybridat.evaluate import evaluate
    from hybridat.report import load_runs, write_report

    save_checkpoint(tiny().eval(), tmp_path / "m.safetensors", train={"eps": 8}, seed=0)
    write_csv(evaluate(load_checkpoint(tmp_path / "m.safetensors"), load_split("cifar10", train=False,
                       data_dir=data_dir, n=2), ["clean"], ["adv"]), tmp_path / "runs" / "eval.csv")
    frames = load_runs([tmp_path / "runs"])
    frames["eval"]["accuracy"] = float("nan")
    with pytest.raises(HybridatError, match=r"the eval rows' accuracy must lie in \[0, 1\], got nan \(row 0\)"):
        write_report(frames, tmp_path / "rep")
    assert not (tmp_path / "rep").exists()
