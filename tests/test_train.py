"""The Hybrid-AT step: the training attack leaves no trace, losses are what SPEC.md says, runs repeat."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from hybridat.attacks import pgd
from hybridat.data import Split
from hybridat.errors import HybridatError
from hybridat.models import BranchView
from hybridat.train import (LOSSES, TrainConfig, check_config, craft, lr_factor, lr_milestones, make_optimizer,
                            step_sums, summary, train, train_step)

from conftest import perturb, tiny


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("loss", ["hybrid", "trades", "madry"])
def test_training_attack_leaves_no_trace(loss):
    model = perturb(tiny("dual-bn")).train()
    before = copy.deepcopy(model.state_dict())
    x, y = batch()
    x_adv = craft(model, x, y, TrainConfig(loss=loss, steps=3))
    assert model.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)


def test_training_attack_goes_through_the_adv_branch_in_eval_mode():
    model = perturb(tiny("dual-bn")).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_clean"):
                p.neg_()  # the clean branch now sees a very different network
    x, y = batch()
    torch.manual_seed(5)
    got = craft(model, x, y, TrainConfig(steps=2))
    reference = copy.deepcopy(model).eval()
    torch.manual_seed(5)
    want = pgd(BranchView(reference, "adv"), x, y, 8 / 255, 2 / 255, 2, start="normal")
    assert torch.equal(got, want)
    torch.manual_seed(5)
    via_clean = pgd(BranchView(reference, "clean"), x, y, 8 / 255, 2 / 255, 2, start="normal")
    assert not torch.equal(got, via_clean)


@pytest.mark.parametrize("loss,idle", [("madry", "clean"), ("clean", "adv")])
def test_single_branch_losses_train_one_branch(loss, idle):
    model = perturb(tiny("dual-bn")).train()
    x, y = batch()
    out, logits = train_step(model, model, x, y, TrainConfig(loss=loss, steps=1))
    assert set(logits) == set(LOSSES[loss].branches)
    out.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.endswith(f"_{idle}"))
    assert all(g is not None for n, g in grads.items() if n.endswith(f"_{'adv' if idle == 'clean' else 'clean'}"))


def test_hybrid_and_trades_objectives():
    model = perturb(tiny("dual-bn")).train()
    x, y = batch()
    torch.manual_seed(0)
    cfg = TrainConfig(loss="hybrid", clean_weight=0.3, steps=1)
    loss, lg = train_step(model, model, x, y, cfg)
    want = 0.3 * F.cross_entropy(lg["clean"], y) + 0.7 * F.cross_entropy(lg["adv"], y)
    torch.testing.assert_close(loss, want)
    cfg = TrainConfig(loss="trades", trades_beta=6.0, steps=1)
    loss, lg = train_step(model, model, x, y, cfg)
    p_clean = F.softmax(lg["clean"], 1)
    kl = (p_clean * (p_clean.log() - F.log_softmax(lg["adv"], 1))).sum(1).mean()  # KL(clean || adv)
    torch.testing.assert_close(loss, F.cross_entropy(lg["clean"], y) + 6.0 * kl)


def test_lr_schedule_is_the_papers():
    """The authors' loop counts epochs from 1 and decays from its epoch 100 and 105: 99 epochs at the full lr, 5 at
    x0.1, the last 6 at x0.01 (SPEC: "the last 6 epochs")."""
    factors = [lr_factor(e, 110) for e in range(110)]
    assert [factors.count(f) for f in (1, 0.1, 0.1 ** 2)] == [99, 5, 6]
    assert [lr_factor(e, 110) for e in (0, 98, 99, 103, 104, 109)] == [1, 1, 0.1, 0.1, 0.1 ** 2, 0.1 ** 2]
    assert lr_factor(0, 1) == 1


@pytest.mark.parametrize("epochs", range(1, 221))
def test_lr_milestones_never_round_past_the_end(epochs):
    """The rule of `lr_milestones`: every run of 2+ epochs ends decayed; 110 is the paper's 100/105 (1-based)."""
    m1, m2 = lr_milestones(epochs)
    factors = [lr_factor(e, epochs) for e in range(epochs)]
    assert factors[0] == 1 and factors == sorted(factors, reverse=True)
    if epochs >= 2:
        assert 1 <= m1 <= epochs - 1 and factors[-1] <= 0.1 + 1e-12
    else:
        assert factors == [1]
    assert m2 > m1 and round(epochs * 99 / 110) - 1 <= m1 <= round(epochs * 99 / 110)  # moved by one at most
    assert lr_milestones(110) == (99, 104) and lr_milestones(5) == (4, 5) and lr_milestones(3) == (2, 3)
    if epochs >= 22:  # long enough for both decays, as in the paper
        assert m2 <= epochs - 1 and factors[-1] == pytest.approx(0.01)


@pytest.mark.parametrize("norm,loss,fragment", [("cross-bn", "madry", "norm cross-bn mixes both branches"),
                                               ("dual-ap", "clean", "norm dual-ap mixes both branches"),
                                               ("bn", "nope", "unknown loss 'nope'")])
def test_impossible_combinations_are_rejected(norm, loss, fragment):
    with pytest.raises(HybridatError, match=fragment):
        check_config(TrainConfig(loss=loss), norm)
    check_config(TrainConfig(loss="hybrid"), norm)  # the norm itself is fine


def test_bad_numbers_are_rejected():
    for cfg, fragment in ((TrainConfig(eps=-1), r"eps must be in \[0, 255\], got -1"),
                          (TrainConfig(epochs=0), r"epochs must be in \[1, 100000\], got 0"),
                          (TrainConfig(clean_weight=2), r"clean weight must be in \[0, 1\], got 2")):
        with pytest.raises(HybridatError, match=fragment):
            check_config(cfg, "bn")
    check_config(TrainConfig(), "bn")  # the defaults pass


@pytest.mark.parametrize("cfg, fragment", [
    (TrainConfig(loss="hybrid", trades_beta=3), "trades_beta weighs a term of loss trades; loss hybrid has none"),
    (TrainConfig(loss="madry", clean_weight=0.3), "clean_weight weighs a term of loss hybrid; loss madry has none"),
    (TrainConfig(loss="trades", clean_weight=0.3), "clean_weight weighs a term of loss hybrid; loss trades has none")])
def test_a_weight_the_loss_never_reads_is_refused(cfg, fragment):
    with pytest.raises(HybridatError, match=fragment):  # it would train, and its checkpoint record a weight unused
        check_config(cfg, "bn")
    check_config(TrainConfig(loss=cfg.loss, clean_weight=0.3 if cfg.loss == "hybrid" else 0.5,
                             trades_beta=3 if cfg.loss == "trades" else 6.0), "bn")  # each loss's own weight is fine


def test_training_is_deterministic_for_a_seed_and_learns():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long()  # a learnable rule
    split = Split(images, labels)
    cfg = TrainConfig(epochs=3, batch_size=16, steps=1, lr=0.05)
    states, rows = [], []
    for _ in range(2):
        model = tiny("dual-bn", seed=0)
        rows = list(train(model, split, cfg, torch.Generator().manual_seed(1)))
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["images"] == 32 for r in rows)
    assert {"loss", "loss_adv", "acc_adv", "loss_clean", "acc_clean", "seconds", "lr"} <= set(rows[0])


def _ddp_rank(rank: int, world: int, init: str, split: Split, cfg: TrainConfig, out: str) -> None:
    """One gloo rank of `test_ranks_with_unequal_shards_take_the_global_mean_step`: train, then save the weights."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = tiny("gn", seed=0)
    list(train(model, split, cfg, torch.Generator().manual_seed(0), rank=rank, world=world, graphs=False))
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.barrier()
    os._exit(0)  # no interpreter finalization after gloo (see runtime.exit_process: it may abort the process)


def test_ranks_with_unequal_shards_take_the_global_mean_step(tmp_path):
    """A global batch of 5 over 2 ranks is sharded 3 + 2 (and any last partial batch may be): DDP averages the ranks'
    gradients, so each rank's mean loss must count with its share of the rows, and the step is the one a single
    process takes on all 5 (a norm without batch statistics, so that the shards see the same function). Weighting
    the ranks' means alike weighed each of rank 0's 3 rows 1/6 and each of rank 1's 2 rows 1/4, not 1/5."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)
    split = Split(torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (5,), generator=g))
    cfg = TrainConfig(loss="clean", steps=0, epochs=1, batch_size=5, lr=0.5, momentum=0.0, weight_decay=0.0)
    single = tiny("gn", seed=0)
    list(train(single, split, cfg, torch.Generator().manual_seed(0), graphs=False))
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_rank, args=(2, f"file://{tmp_path / 'init'}", split, cfg, str(out)), nprocs=2, join=True)
    ddp, start = torch.load(out), tiny("gn", seed=0).state_dict()
    moved = max((single.state_dict()[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # the step is large enough to tell the two weightings apart
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_trades_training_attack_maximizes_the_kl_to_the_clean_branch():
    """--loss trades crafts x_adv by maximizing KL(clean branch on x || adv branch on x_adv) (SPEC: "the attack
    maximizes the KL"), not the cross-entropy the other losses' attack maximizes, nor the KL the other way round.
    An unperturbed tiny model with the clean AP moved: `perturb`'s logits (~1e23 in eval) saturate both softmaxes."""
    model = tiny("dual-bn").train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_clean"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    x, y = batch()
    torch.manual_seed(5)
    got = craft(model, x, y, TrainConfig(loss="trades", steps=2))
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        p_clean = F.softmax(reference(x, "clean"), dim=1)
    kls = {"clean || adv": lambda logits, _: (p_clean * (p_clean.log() - F.log_softmax(logits, 1))).sum(),
           "adv || clean": lambda logits, _: (F.softmax(logits, 1) * (F.log_softmax(logits, 1) - p_clean.log())).sum()}
    crafted = {}
    for direction, kl in kls.items():
        torch.manual_seed(5)
        crafted[direction] = pgd(BranchView(reference, "adv"), x, y, 8 / 255, 2 / 255, 2, start="normal", loss_fn=kl)
    assert torch.equal(got, crafted["clean || adv"]) and not torch.equal(got, crafted["adv || clean"])
    torch.manual_seed(5)
    assert not torch.equal(got, craft(model, x, y, TrainConfig(loss="hybrid", steps=2)))  # cross-entropy's


@pytest.mark.parametrize("loss", ["hybrid", "trades"])
def test_fused_step_routes_adversarial_rows_to_adv_and_clean_rows_to_clean(loss):
    """The step's adv logits are the adv branch's on x_adv and its clean logits the clean branch's on x (train mode,
    one fused forward = two passes for dual-bn): swapping the halves trained each branch on the other domain."""
    model = perturb(tiny("dual-bn")).train()
    x, y = batch()
    cfg = TrainConfig(loss=loss, steps=2)
    torch.manual_seed(3)
    x_adv = craft(copy.deepcopy(model), x, y, cfg)
    assert not torch.equal(x_adv, x)
    adv_pass, clean_pass = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(3)
    _, logits = train_step(model, model, x, y, cfg)
    with torch.no_grad():
        torch.testing.assert_close(logits["adv"], adv_pass(x_adv, "adv"))
        torch.testing.assert_close(logits["clean"], clean_pass(x, "clean"))
        assert not torch.allclose(logits["adv"], copy.deepcopy(adv_pass)(x, "adv"), atol=1e-3)


@pytest.mark.parametrize("norm", ["dual-linear", "dual-adapter"])
def test_training_attack_goes_through_the_adv_branch_where_folding_cannot_hide_it(norm):
    """Folding every norm as the adv branch sees it makes dual-bn's two views one network, so the test above cannot
    tell the branches apart through the norms alone; a per-branch head or adapter is not folded, so here the
    examples are the adv view's and not the clean view's."""
    model = perturb(tiny(norm)).train()
    x, y = batch()
    torch.manual_seed(5)
    got = craft(model, x, y, TrainConfig(steps=2))
    reference = copy.deepcopy(model).eval()
    views = {}
    for branch in ("adv", "clean"):
        torch.manual_seed(5)
        views[branch] = pgd(BranchView(reference, branch), x, y, 8 / 255, 2 / 255, 2, start="normal")
    torch.testing.assert_close(got, views["adv"], atol=1e-6, rtol=0)
    assert (got - views["clean"]).abs().max() > 1e-3


def test_optimizer_is_sgd_with_the_configs_momentum_and_weight_decay_on_every_parameter():
    """SPEC's SGD: lr, momentum 0.9 and weight decay 5e-4 over all parameters; one step moves a weight by the decay
    term even where its loss gradient is zero."""
    model = tiny("dual-bn")
    cfg = TrainConfig(lr=0.1, momentum=0.9, weight_decay=5e-4)
    optimizer = make_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.SGD)
    group, = optimizer.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 5e-4)
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}
    p = next(model.parameters())
    before = p.detach().clone()
    p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(p.detach(), before * (1 - 0.1 * 5e-4))


def test_epoch_metrics_are_per_image_means_over_batches_of_any_size():
    """The epoch row's loss, per-branch loss and accuracy are means over images: a batch of 5 weighs 5/8 against a
    batch of 3, as the loss of one batch of all 8 would."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (8,), generator=g)
    logits = {b: torch.randn(8, 10, generator=g) for b in ("adv", "clean")}
    sums = sum(step_sums(F.cross_entropy(logits["adv"][k], y[k]), {b: v[k] for b, v in logits.items()}, y[k])
               for k in (slice(0, 5), slice(5, 8)))
    row = summary(sums)
    assert row["images"] == 8
    torch.testing.assert_close(torch.tensor(row["loss"]), F.cross_entropy(logits["adv"], y))
    torch.testing.assert_close(torch.tensor(row["loss_adv"]), F.cross_entropy(logits["adv"], y))
    torch.testing.assert_close(torch.tensor(row["loss_clean"]), F.cross_entropy(logits["clean"], y))
    assert row["acc_clean"] == pytest.approx((logits["clean"].argmax(1) == y).float().mean().item())
