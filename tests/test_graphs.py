"""The graph path of the training step and of PGD evaluation, as far as a CPU runs it: static buffers, warm-up,
re-capture on a new learning rate, eager partial batches, the epoch's one gather. The capture itself needs a GPU
(scripts/gpu-check.sh checks graph == eager there)."""


import torch

from hybridat import attacks
from hybridat.attacks import pgd_accuracy, robust_accuracy
from hybridat.bench import synthetic_split
from hybridat.data import _crop_flip, _draw_crop_flip, to_float, train_batches
from hybridat.graphs import Graphed
from hybridat.models import BranchView
from hybridat.train import Stepper, TrainConfig, make_optimizer, train

from conftest import perturb, tiny
from foreign_models import randomize


def _run(graphs: bool, epochs: int = 3, n: int = 40):
    model = tiny("dual-bn")
    torch.manual_seed(3)
    rows = list(train(model, synthetic_split(n, "cpu"), TrainConfig(batch_size=16, steps=2, epochs=epochs),
                      torch.Generator().manual_seed(0), graphs=graphs))
    return rows, model.state_dict()


def test_the_graph_path_trains_exactly_as_the_eager_path():
    """20 images in batches of 16: a static-buffer step and an eager 4-image step per epoch; 3 warm-up steps, then
    the graph, captured again when the lr drops. Same losses, accuracies and weights, to the bit."""
    (rows_g, state_g), (rows_e, state_e) = _run(True, epochs=11, n=20), _run(False, epochs=11, n=20)
    assert len({r["lr"] for r in rows_g}) >= 2
    for g, e in zip(rows_g, rows_e):
        assert g["images"] == e["images"] == 20
        assert all(g[k] == e[k] for k in ("loss", "loss_adv", "acc_adv", "loss_clean", "acc_clean"))
    assert all(torch.equal(state_g[k], state_e[k]) for k in state_e)


class CountingGraph(Graphed):
    """Graphed on a CPU that counts captures (invalidations followed by a replay) and replays (calls past the
    warm-up)."""

    def __init__(self, fn, capture, warmup=1):
        super().__init__(fn, capture, warmup)
        self.captures, self.runs, self._stale = 0, 0, True

    def invalidate(self):
        super().invalidate()
        self._stale = True

    def run(self, **inputs):
        if self.warmup == 0:
            self.captures += self._stale
            self._stale = False
            self.runs += 1
        super().run(**inputs)


def test_stepper_warms_up_then_captures_once_per_learning_rate(monkeypatch):
    monkeypatch.setattr("hybridat.train.Graphed", CountingGraph)
    model = tiny("dual-bn").train()
    cfg = TrainConfig(batch_size=8, steps=1)
    optimizer = make_optimizer(model, cfg)
    stepper = Stepper(model, model, optimizer, cfg, graphs=True, warmup=2)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    stepper.step(x, y)
    static_x = stepper.graph.static["x"]
    for _ in range(3):
        stepper.step(x, y)
    assert (stepper.graph.captures, stepper.graph.runs) == (1, 2)  # 2 eager warm-up steps, then 1 capture
    stepper.step(x[:5], y[:5])  # another size: eager, the graph untouched
    assert stepper.graph.runs == 2 and stepper.sums[1].item() == 4 * 8 + 5
    optimizer.param_groups[0]["lr"] = 0.01
    stepper.step(x, y)
    stepper.step(x, y)
    assert (stepper.graph.captures, stepper.graph.runs) == (2, 4)
    assert stepper.graph.static["x"] is static_x and not static_x.requires_grad  # one static buffer throughout


def test_an_epoch_is_one_gather_with_the_same_batches_as_batch_by_batch():
    split = synthetic_split(37, "cpu")
    got = list(train_batches(split, 8, torch.Generator().manual_seed(4), rank=1, world_size=2))
    g = torch.Generator().manual_seed(4)
    order = torch.randperm(37, generator=g)
    for (x, y), start in zip(got, range(0, 37, 8), strict=True):
        idx = order[start:start + 8]
        crop = [t[1::2] for t in _draw_crop_flip(len(idx), g)]
        assert torch.equal(x, to_float(_crop_flip(split.images[idx[1::2]], *crop)))
        assert torch.equal(y, split.labels[idx[1::2]])


def _attackable(n: int = 23):
    """The adv branch of a model that answers each of n images by its own features, its answers as labels, so that
    PGD at eps 2/255 turns some of them and not all. (perturb's model answers one class for every image, which
    PGD never changes: a path that skipped the attack counted the same.)"""
    model = randomize(tiny("dual-bn"), seed=1)
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    feats = []
    hook = model.linear.register_forward_pre_hook(lambda m, inputs: feats.append(inputs[0]))
    with torch.no_grad():
        model(x, "adv")
        hook.remove()
        logits = feats[0] @ model.linear.weight.T  # the head centred on these images, logits of spread 1
        model.linear.weight.div_((logits - logits.mean(0)).std())
        model.linear.bias.copy_(-(feats[0].mean(0) @ model.linear.weight.T))
        view = BranchView(model, "adv")
        return view, x, view(x).argmax(1)


def test_pgd_accuracy_counts_what_eager_pgd_counts():
    """Full batches through static buffers (the first eagerly, as warm-up), a last partial batch eagerly."""
    model, x, y = _attackable()
    eager = robust_accuracy(model, x, y, "pgd", 2 / 255, 0.5 / 255, steps=3, batch_size=8, seed=7)
    static = pgd_accuracy(model, x, y, 2 / 255, 0.5 / 255, 3, batch_size=8, seed=7, capture=False)
    assert static.item() / 23 == eager and 0 < eager < 1  # every image is right before the attack


def test_pgd_accuracy_in_bf16_counts_what_eager_bf16_pgd_counts():
    model, x, y = _attackable()
    eager = robust_accuracy(model, x, y, "pgd", 2 / 255, 0.5 / 255, steps=3, batch_size=8, seed=7, amp=True)
    static = pgd_accuracy(model, x, y, 2 / 255, 0.5 / 255, 3, batch_size=8, seed=7, capture=False, amp=True)
    assert static.item() / 23 == eager and 0 < eager < 1


def test_pgd_from_is_pgd_after_its_start():
    model = BranchView(perturb(tiny("dual-bn")), "adv")
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    full = attacks.pgd(model, x, y, 8 / 255, 2 / 255, 3, generator=torch.Generator().manual_seed(1))
    start = attacks._start(x, 8 / 255, "uniform", "linf", torch.Generator().manual_seed(1))
    frozen_start = start.clone()
    assert torch.equal(attacks.pgd_from(model, x, y, start, 8 / 255, 2 / 255, 3), full)
    assert torch.equal(start, frozen_start) and not start.requires_grad  # the caller's start is left as it was


def test_pgd_accuracy_attacks_each_batch_from_the_eager_paths_start(monkeypatch):
    """Not just the same count: every batch's examples are the eager path's, batch i started from a generator seeded
    seed + i (a count of 23 images can agree by chance with every batch started from one seed)."""
    model, x, y = _attackable()
    counted = {}

    def record(path):
        def count(net, x_adv, yb):
            counted.setdefault(path, []).append(x_adv.clone())
            return count_correct(net, x_adv, yb)
        return count

    count_correct = attacks._count_correct
    monkeypatch.setattr(attacks, "_count_correct", record("eager"))
    robust_accuracy(model, x, y, "pgd", 2 / 255, 0.5 / 255, steps=3, batch_size=8, seed=7)
    monkeypatch.setattr(attacks, "_count_correct", record("static"))
    pgd_accuracy(model, x, y, 2 / 255, 0.5 / 255, 3, batch_size=8, seed=7, capture=False)
    assert [len(b) for b in counted["eager"]] == [len(b) for b in counted["static"]] == [8, 8, 7]
    for eager, static in zip(counted["eager"], counted["static"]):
        assert torch.equal(eager, static)
