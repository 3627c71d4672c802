"""The benchmark measures what it says: a reference that computes our step the slow way, an exact FLOP count,
and CSV rows whose ratio is always how many times faster hybridat is. Timings themselves are not tested."""

import copy
import csv
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hybridat import bench
from hybridat.attacks import frozen
from hybridat.models import fused
from hybridat.train import TrainConfig, craft, fit_step, make_optimizer

from conftest import tiny
from foreign_models import randomize

WIDTH = 0.0625  # conftest.tiny's width


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture
def pair():
    """A dual-bn model whose per-branch NS and AP differ, and the reference holding the same weights. (Not perturb's
    model: in eval mode its logits reach 1e23, so an attack through either branch made the same examples.)"""
    model = randomize(tiny("dual-bn"), seed=1).train()
    return model, bench.reference_from(model, WIDTH).train()


def test_reference_is_the_same_network_routed_by_a_flag(pair):
    model, ref = pair
    x, _ = batch()
    for mode in ("eval", "train"):
        model.train(mode == "train"), ref.train(mode == "train")
        for branch in ("adv", "clean"):
            bench.set_route(ref, branch)
            torch.testing.assert_close(ref(x), model(x, branch), rtol=1e-4, atol=1e-5)
    bench.set_route(ref, "adv")
    assert not torch.allclose(ref.eval()(x), model.eval()(x, "clean"), atol=1e-3)  # the flag matters


def test_reference_step_computes_our_step(pair):
    """Same weights, data and attack noise: the same loss, and the same weights after the SGD step."""
    model, ref = pair
    x, y = batch(16)  # 16 rows: the mean-CE (reference) and sum-CE (ours) attack gradients have equal signs
    cfg = TrainConfig(steps=3, lr=0.05, clean_weight=0.3)  # not 1/2: the two weights are not interchangeable
    torch.manual_seed(7)
    loss, _ = fit_step(model, model, make_optimizer(model, cfg), x, y, cfg)
    torch.manual_seed(7)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ref_loss = bench.reference_step(ref, ref_opt, x, y, cfg.eps / 255, cfg.step / 255, cfg.steps, cfg.clean_weight)
    assert ref_loss == pytest.approx(loss.item(), rel=1e-4)
    ours = {k: v for k, v in bench.reference_from(model, WIDTH).state_dict().items()}
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(v, ours[k], rtol=1e-3, atol=2e-4, msg=k)  # fp32 rounding of two BN codes


def test_reference_attack_computes_parameter_gradients_ours_does_not(pair):
    model, ref = pair
    x, y = batch()
    bench.reference_pgd(ref, x, y, 8 / 255, 2 / 255, 1)
    grads = {n: p.grad for n, p in ref.named_parameters() if "bn_clean" not in n}  # the route was adv
    assert all(g is not None for g in grads.values())  # the wasted work the reference stands for
    assert ref.training
    craft(model, x, y, TrainConfig(steps=1))
    assert all(p.grad is None for p in model.parameters())


def test_reference_loader_serves_augmented_batches():
    split = bench.synthetic_split(12, "cpu")
    x, y = next(bench.reference_batches(split, 4, "cpu"))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)
    assert 0 <= x.min() and x.max() <= 1


def test_floor_counts_exactly_the_flops_of_the_step():
    """Recorded convolutions and matmuls of one step = steps x (eval forward + input backward) + one fused
    forward/backward with parameter gradients, as FlopCounterMode counts them part by part."""
    model = tiny("dual-bn").train()
    x, y = batch()
    cfg = TrainConfig(steps=2)
    recorder = bench.OpRecorder()
    with recorder:
        fit_step(model, model, make_optimizer(model, cfg), x, y, cfg)
    floor = bench.Floor(recorder)

    with FlopCounterMode(display=False) as attack, frozen(model):
        x_leaf = x.clone().requires_grad_(True)
        F.cross_entropy(model(x_leaf, "adv"), y, reduction="sum").backward()
    with FlopCounterMode(display=False) as update:
        la, lc = fused(model, x, x)
        (F.cross_entropy(la, y) + F.cross_entropy(lc, y)).backward()
    assert floor.flops == cfg.steps * attack.get_total_flops() + update.get_total_flops()
    assert floor.seconds(lambda: None) > 0


def test_floor_times_each_distinct_call_once_after_a_warm_up_and_counts_it_n_times(monkeypatch):
    """On a clock that only the ops move: a first (cold) call of a signature takes 100 s, later ones `cost` s."""
    clock, seen = [0.0], []

    def op(cost):
        clock[0] += 100.0 if cost not in seen else cost
        seen.append(cost)

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    recorder = SimpleNamespace(calls={(op, (1.0,), ("dict", ())): 3, (op, (0.25,), ("dict", ())): 2}, flops=0)
    assert bench.Floor(recorder).seconds(lambda: None) == 3 * 1.0 + 2 * 0.25
    assert seen == [1.0, 1.0, 0.25, 0.25]  # each signature: one warm-up, one timed call


def test_interleaved_rotates_the_order_and_takes_reported_seconds():
    calls = []
    tasks = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "floor": lambda: 123.0}
    times = bench.interleaved(tasks, 3, lambda: None)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # round 2 starts with b, round 3 (after floor) with a
    assert times["floor"] == [123.0] * 3 and all(len(v) == 3 for v in times.values())
    events = []
    bench.interleaved({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, 1,
                      lambda: events.append("sync"))
    assert events == ["sync", "a", "sync", "sync", "b", "sync"]  # a GPU's queued work is inside the task's time


def test_rows_say_how_many_times_faster_hybridat_is():
    size = bench.BenchSize(width=1.0, batch=100, steps=10, eval_batch=50, eval_steps=20, rounds=1, images=100)
    med = {"ours": 2.0, "reference": 6.0, "floor": 1.5, "eager": 4.0, "epoch": 5.0, "pgd_ours": 1.0,
           "pgd_torchattacks": 2.0, "pgd_eager": 3.0, "pgd_bf16": 0.5, "pgd_torchattacks_reference": 4.0}
    rows = {r["comparison"]: r for r in bench._rows(med, size, 200, 50, "cpu")}
    assert rows["train_vs_reference"]["ours"] == 50 and rows["train_vs_reference"]["ratio"] == pytest.approx(3)
    assert rows["train_vs_floor"]["ratio"] == pytest.approx(0.75)  # slower than the floor: <= 1
    assert rows["train_graphs_vs_eager"]["ratio"] == pytest.approx(2)
    assert rows["train_epoch_vs_step"]["ours"] == 40 and rows["train_epoch_vs_step"]["ratio"] == pytest.approx(0.8)
    assert rows["pgd_vs_torchattacks"]["ours"] == 50 and rows["pgd_vs_torchattacks"]["ratio"] == pytest.approx(2)
    assert rows["pgd_graphs_vs_eager"]["ratio"] == pytest.approx(3)
    assert rows["pgd_vs_torchattacks_reference"]["ratio"] == pytest.approx(4)
    assert rows["pgd_bf16_vs_torchattacks"]["ours"] == 100 and rows["pgd_bf16_vs_torchattacks"]["ratio"] == 4


def test_floor_lines_divide_the_flops_by_the_floors_own_seconds():
    """The printed rates: FLOPs per image of the batch and of the PGD images, the step's FLOPs over the floor's
    seconds (not the step's), each PGD over the PGD floor's seconds."""
    size = bench.BenchSize(width=1, batch=4, steps=10, eval_batch=8, eval_steps=20, rounds=3, images=8)
    med = {"floor": 2.0, "ours": 5.0, "pgd_floor": 1.0, "pgd_ours": 4.0, "pgd_torchattacks": 8.0}
    step, pgd = bench.floor_lines(3e12, 1.6e10, med, size, eval_images=16)
    assert step == ("training step: 750.00 GFLOP per image (torch flop counter); its own convolutions and matmuls "
                    "alone run at 1500 GFLOP/s")
    assert pgd == ("PGD-20 evaluation: 1.00 GFLOP per image; hybridat at 0.25x, torchattacks at 0.12x the speed of "
                   "its convolutions and matmuls alone")


@pytest.mark.parametrize("amp, emulated", [(True, False), (False, True)])
def test_run_bench_writes_one_row_per_comparison(tmp_path, monkeypatch, amp, emulated):
    """Every comparison, each with the images/s its medians give; the bf16 PGD row where bf16 is native or --amp
    asks for it, and left out, with a line that says so, on a CPU that emulates bf16 (it would take most of the
    run there)."""
    import hybridat.runtime
    monkeypatch.setattr(hybridat.runtime, "bf16_emulated", lambda device: emulated)
    micro = bench.BenchSize(width=WIDTH, batch=8, steps=1, eval_batch=8, eval_steps=2, rounds=3, images=24)
    monkeypatch.setitem(bench.SIZES, "quick", micro)
    monkeypatch.setattr(bench, "size_for", lambda name, device: (bench.SIZES[name], 2))  # 2 steps per call, as a GPU
    seconds, interleaved = {}, bench.interleaved

    def one_round_stretched(tasks, rounds, sync, on_round=None):
        """The tasks run one round; the rounds then report 5x, 1.5x and 1x its seconds: the median is 1.5x."""
        assert rounds == 3
        seconds.update({k: v[0] for k, v in interleaved(tasks, 1, sync, on_round).items()})
        return {k: [5 * v, 1.5 * v, v] for k, v in seconds.items()}

    monkeypatch.setattr(bench, "interleaved", one_round_stretched)
    graphs, stepper = [], bench.Stepper
    monkeypatch.setattr(bench, "Stepper", lambda *args: graphs.append(args[4]) or stepper(*args))
    printed = []
    console = type("Console", (), {"print": lambda self, *a, **k: printed.append(" ".join(map(str, a)))})()
    out = tmp_path / "sub" / "bench.csv"
    rows = bench.run_bench("cpu", quick=True, out=out, console=console, amp=amp, ablate=True)
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.COLUMNS
        written = list(reader)
    assert [r["comparison"] for r in written] == ["train_vs_reference", "train_vs_floor", "train_graphs_vs_eager",
                                                  "train_epoch_vs_step", "pgd_vs_torchattacks",
                                                  "pgd_vs_torchattacks_reference",
                                                  *["pgd_bf16_vs_torchattacks"] * amp, "pgd_graphs_vs_eager"]
    assert ("pgd_bf16" in seconds) == amp
    notes = [line for line in printed if line.startswith("note: this CPU has no native bf16")]
    assert [note.split("; ")[-1] for note in notes] == (
        ["the pgd_bf16_vs_torchattacks row is left out (--amp times it, and the step, in bf16)"] if emulated else [])
    for r, w in zip(rows, written):
        assert r["ours"] > 0 and r["theirs"] > 0 and r["unit"] == "images/s"
        assert r["ratio"] == pytest.approx(r["ours"] / r["theirs"])
        assert float(w["ratio"]) == pytest.approx(r["ratio"], rel=1e-3) and w["device"].startswith("cpu")
    step = {k: 1.5 * v / (2 if k in ("ours", "eager", "reference") else 1) for k, v in seconds.items()}
    by_name = {r["comparison"]: r for r in rows}  # a step holds 8 images; an epoch 16 (2 steps), a PGD call 2 x 8
    assert by_name["train_vs_reference"]["ours"] == pytest.approx(8 / step["ours"])
    assert by_name["train_vs_reference"]["theirs"] == pytest.approx(8 / step["reference"])
    assert by_name["train_vs_floor"]["theirs"] == pytest.approx(8 / step["floor"])
    assert by_name["train_epoch_vs_step"]["ours"] == pytest.approx(16 / step["epoch"])
    assert by_name["pgd_vs_torchattacks"]["ours"] == pytest.approx(16 / step["pgd_ours"])
    assert by_name["pgd_vs_torchattacks"]["theirs"] == pytest.approx(16 / step["pgd_torchattacks"])
    assert graphs == [False, True]  # the eager step, then ours (graphs wherever the device has them)
    assert any("train_vs_floor" in line for line in printed)
    ablated = [name for name in bench.ABLATIONS if amp or name != "bf16 autocast"]
    assert any(all(f"| {name} |" in line for name in ablated) for line in printed)
    assert not list(tmp_path.glob("sub/*.tmp"))


@pytest.mark.parametrize("norm", ["dual-bn", "bn-mix", "dual-ap", "cross-bn", "gn-dual-ap", "dual-adapter"])
def test_amp_is_opt_in_and_keeps_weights_ns_and_losses_fp32(norm):
    """bf16 stays opt-in: beside fp32 at mini scale it lost 1.5 points of PGD accuracy (README, Speed)."""
    assert TrainConfig().amp is False
    model = tiny(norm).train()
    before = copy.deepcopy(model.state_dict())
    x, y = batch()
    cfg = TrainConfig(steps=1, amp=True)
    loss, logits = fit_step(model, model, make_optimizer(model, cfg), x, y, cfg)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in logits.values())
    assert torch.isfinite(loss)
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype, k  # fp32 weights and running NS
        if "running_mean" in k:
            assert not torch.equal(v, before[k]), k  # NS updated through bf16 activations


@pytest.mark.parametrize("off", ["channels_last", "fused forward", "input-only attack gradients", "bf16 autocast"])
def test_an_ablated_step_computes_our_step_the_slow_way(off):
    """With one technique undone, the step is the same computation: the same loss from the same state, data and
    attack noise (bf16 undone: our fp32 step). The timing difference is then the technique's alone."""
    model = randomize(tiny("dual-bn"), seed=1).train()  # an attack through the clean branch makes other examples
    split = bench.synthetic_split(16, "cpu")
    cfg = TrainConfig(batch_size=16, steps=2, amp=False)  # 16 rows: mean- and sum-CE attack steps agree in sign
    ablated = bench._ablated_step(model, split, replace(cfg, amp=off == "bf16 autocast"), "cpu", off)
    ours = bench._our_step(model, split, cfg)
    torch.manual_seed(5)
    sums = ours()  # the running sums after one step: loss*n, n, ...
    torch.manual_seed(5)
    assert ablated().item() == pytest.approx((sums[0] / sums[1]).item(), rel=1e-4)


def test_each_pgd_task_runs_the_attack_its_row_names(monkeypatch):
    """hybridat's PGD-20 through the adv branch (step eps/4): with graphs, without ("pgd_eager"), crafted in bf16
    ("pgd_bf16"); torchattacks.PGD with a random start on our adv branch and on the reference routed to adv."""
    import torchattacks

    ours, theirs = [], []
    monkeypatch.setattr(bench, "robust_accuracy", lambda view, *args, **kwargs: ours.append((view, args, kwargs)))

    class PGD:
        def __init__(self, net, **kwargs):
            theirs.append((net, kwargs))

        def __call__(self, x, y):
            return x

    monkeypatch.setattr(torchattacks, "PGD", PGD)
    model = tiny("dual-bn")
    reference = bench.reference_from(model, WIDTH)
    x, y = batch(4)
    tasks = bench._pgd_tasks(model, reference, x, y, 3, 2)
    for name in ("pgd_ours", "pgd_eager", "pgd_bf16", "pgd_torchattacks", "pgd_torchattacks_reference"):
        tasks[name]()
    assert all(view.model is model and view.branch == "adv" for view, _, _ in ours)
    assert all(args == (x, y, "pgd", bench.EPS, bench.EPS / 4) for _, args, _ in ours)
    assert [kwargs for *_, kwargs in ours] == [{"steps": 3, "batch_size": 2}, {"steps": 3, "batch_size": 2,
                                                "graphs": False}, {"steps": 3, "batch_size": 2, "amp": True}]
    (view, first), (net, second) = theirs
    assert view.model is model and view.branch == "adv" and net is reference
    assert {m.route for m in reference.modules() if isinstance(m, bench.RefDualBN)} == {"adv"}
    assert first == second == {"eps": bench.EPS, "alpha": bench.EPS / 4, "steps": 3, "random_start": True}


def test_a_gpu_times_at_least_50_steps_per_task_and_pgd_at_attacks_batch():
    for name in bench.SIZES:
        size, repeat = bench.size_for(name, torch.device("cuda"))
        assert size.rounds * repeat >= 50 and size.eval_batch == 500 and size.images >= size.batch * repeat
        assert bench.size_for(name, torch.device("cpu")) == (bench.SIZES[name], 1)  # CPU as before
