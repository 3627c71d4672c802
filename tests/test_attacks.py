"""Attacks: threat-model bounds, no trace left on the model, exact agreement with torchattacks, behaviour."""

import copy
import logging
import re

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from hybridat.attacks import (AA_VERSIONS, ATTACKS, AASettings, aa_settings, autoattack, default_step, fgsm, frozen,
                              pgd, pgd_from, pgd_unchecked, robust_accuracy)
from hybridat.errors import HybridatError

EPS = 8 / 255


def tiny_net(seed: int = 0) -> nn.Sequential:
    """conv-BN-ReLU-pool-fc: (B, 3, 8, 8) -> (B, 10)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def data(n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[:, :, 0, :] = 0.0  # pixels on the box boundary: the [0, 1] clamp must act
    x[:, :, 1, :] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


def synthetic(n: int, seed: int):
    """Two classes: class 1 has channel 0 brighter by 0.1; per-pixel noise std 0.1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 + 0.1 * torch.randn(n, 3, 8, 8, generator=g)
    x[:, 0] += 0.1 * y.view(-1, 1, 1).float()
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    """A tiny net trained to high clean accuracy on the synthetic task, returned in eval mode."""
    model = tiny_net(3)
    x, y = synthetic(512, 0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xt, yt = synthetic(128, 1)
    return model, xt, yt


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def assert_in_ball(x_adv, x, eps, norm="linf"):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if norm == "linf":
        assert (x_adv - x).abs().max() <= eps + 1e-6
    else:
        assert ((x_adv - x).flatten(1).norm(dim=1) <= eps + 1e-5).all()


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
@pytest.mark.parametrize("start", ["uniform", "normal", "none"])
def test_pgd_stays_in_ball_and_box(norm, eps, start):
    model, (x, y) = tiny_net(), data()
    x_adv = pgd(model, x, y, eps, default_step(eps), 5, start=start, norm=norm)
    assert_in_ball(x_adv, x, eps, norm)
    assert not torch.equal(x_adv, x)  # it moved


def test_fgsm_stays_in_ball_and_matches_torchattacks():
    model, (x, y) = tiny_net(), data()
    x_adv = fgsm(model, x, y, EPS)
    assert_in_ball(x_adv, x, EPS)
    ref = torchattacks.FGSM(model, eps=EPS)(x, y)
    torch.testing.assert_close(x_adv, ref, atol=1e-6, rtol=0)


def test_random_starts_differ_and_generator_reproduces():
    model, (x, y) = tiny_net(), data()
    a = pgd(model, x, y, EPS, steps=1, generator=torch.Generator().manual_seed(0))
    b = pgd(model, x, y, EPS, steps=1, generator=torch.Generator().manual_seed(0))
    c = pgd(model, x, y, EPS, steps=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def mean_ce(logits, y):
    return F.cross_entropy(logits, y)  # torchattacks' loss: CE averaged over the batch


@pytest.mark.parametrize("n", [5, 16, 24])
@pytest.mark.parametrize("start", ["none", "uniform"])
def test_pgd_with_torchattacks_loss_is_torchattacks_bit_for_bit(n, start):
    """With the same loss (mean CE) and the same start, every example is torchattacks.PGD's, for any batch size;
    the uniform start is drawn from the global RNG as torchattacks draws it."""
    model, (x, y) = tiny_net(), data(n)
    model.train()  # torchattacks switches to eval itself, as we do
    torch.manual_seed(7)
    ours = pgd(model, x, y, EPS, 2 / 255, 10, start=start, loss_fn=mean_ce)
    torch.manual_seed(7)
    ref = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=10, random_start=start == "uniform")(x, y)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("n", [1, 16, 64])
def test_pgd_matches_torchattacks_bit_for_bit_on_a_power_of_two_batch(n):
    """The default summed CE is B x the mean: for B a power of two that scaling is exact in floating point, so
    every gradient sign, and so every example, is torchattacks'."""
    model, (x, y) = tiny_net(), data(n)
    ours = pgd(model, x, y, EPS, 2 / 255, 10, start="none")
    ref = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=10, random_start=False)(x, y)
    assert torch.equal(ours, ref)
    with torch.no_grad():  # an evaluation loop may call it under no_grad
        assert torch.equal(pgd(model, x, y, EPS, 2 / 255, 10, start="none"), ref)


@pytest.mark.parametrize("n", [5, 24, 100])
def test_summed_ce_gradient_is_b_times_the_mean_up_to_round_off(n):
    """Any other batch size: each step's gradient of the summed CE equals B x torchattacks' (mean CE) up to float
    round-off, bounded here by 1e-5 of the sample's largest component (1.4e-6 measured on a trained ResNet), so a
    sign can differ only at a component within that of 0. Checked at every iterate of a PGD-10 run."""
    model, (x, y) = tiny_net(), data(n)
    adv, rel = x.clone(), []
    for _ in range(10):
        with torch.enable_grad(), frozen(model):
            a = adv.clone().requires_grad_(True)
            summed = torch.autograd.grad(F.cross_entropy(model(a), y, reduction="sum"), a)[0]
            mean = torch.autograd.grad(mean_ce(model(a), y), a)[0]
        scale = summed.flatten(1).abs().amax(1).clamp_min(1e-30).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        rel.append(((summed - n * mean).abs() / scale).max().item())
        flips = summed.sign() != mean.sign()
        assert (summed.abs() <= 1e-5 * scale)[flips].all()  # a sign differs only within round-off of 0
        adv = pgd_from(model, x, y, adv, EPS, 2 / 255, 1)  # pgd's next iterate
    assert 0 < max(rel) < 1e-5  # not exact (B is no power of two), but within round-off


def test_pgd_l2_matches_torchattacks_with_the_same_loss():
    model, (x, y) = tiny_net(), data(16)  # PGDL2 normalizes the gradient after a mean loss
    ours = pgd(model, x, y, 0.5, 0.1, 10, start="none", loss_fn=mean_ce, norm="l2")
    ref = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=10, random_start=False)(x, y)
    assert torch.equal(ours, ref)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("attack", ["fgsm", "pgd-normal", "pgd-l2", "autoattack-apgd"])
def test_attacks_leave_no_trace(attack):
    model, (x, y) = tiny_net(), data(8)
    model.train()
    model[1].eval()  # mixed modes: BN kept in eval by its owner, the rest in train
    model[0].bias.requires_grad_(False)  # one parameter frozen by its owner
    modes = [m.training for m in model.modules()]
    before = snapshot(model)
    if attack == "fgsm":
        fgsm(model, x, y, EPS)
    elif attack == "pgd-normal":
        pgd(model, x, y, EPS, 2 / 255, 3, start="normal")
    elif attack == "pgd-l2":
        pgd(model, x, y, 0.5, 0.1, 3, norm="l2")
    else:
        autoattack(model, x, y, EPS, attacks=["apgd-ce"])
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats and counters untouched
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True, True, True]


def test_bn_buffers_untouched_from_full_train_mode():
    model, (x, y) = tiny_net(), data(8)
    model.train()
    before = snapshot(model)
    pgd(model, x, y, EPS, 2 / 255, 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


def test_frozen_restores_on_exception():
    model = tiny_net()
    model.train()
    model[5].eval()
    with pytest.raises(RuntimeError, match="boom"):
        with frozen(model):
            assert not any(m.training for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, True, True, True, True, False]
    assert all(p.requires_grad for p in model.parameters())


def test_pgd_lowers_accuracy_and_raises_loss(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    assert clean > 0.9
    x_adv = pgd(model, x, y, 0.08, 0.02, 10)
    assert accuracy(model, x_adv, y) < clean - 0.5
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 1.0
    assert accuracy(model, fgsm(model, x, y, 0.08), y) < clean - 0.3


def test_loss_fn_is_pluggable(trained):
    model, x, y = trained
    calls = []

    def toward_class_0(logits, y):  # targeted: maximizing −CE(·, 0) pushes every input toward class 0
        calls.append(1)
        return -F.cross_entropy(logits, torch.zeros_like(y), reduction="sum")

    default = pgd(model, x, y, 0.08, 0.02, 7, start="none")
    targeted = pgd(model, x, y, 0.08, 0.02, 7, start="none", loss_fn=toward_class_0)
    assert len(calls) == 7 and not torch.equal(default, targeted)
    with torch.no_grad():
        assert (model(targeted).argmax(1) == 0).float().mean() > 0.9


def test_autoattack_list_runs_in_ball_and_keeps_global_rng(trained):
    model, x, y = trained
    x, y = x[:8], y[:8]
    rng = torch.get_rng_state()
    x_adv = autoattack(model, x, y, 0.08, attacks=["apgd-ce"], seed=0)
    assert torch.equal(torch.get_rng_state(), rng)  # the reference code reseeds the global RNG; we undo it
    assert_in_ball(x_adv, x, 0.08)
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_registry_uniform_signature(trained, name):
    """Every entry takes (model, x, y, eps, step, steps, seed); "autoattack" is the standard version."""
    model, x, y = trained
    x, y = x[:4], y[:4]
    x_adv = ATTACKS[name](model, x, y, EPS, None, 3, 0)
    assert name == name.lower()
    assert_in_ball(x_adv, x, EPS)
    assert torch.equal(x_adv, x) == (name == "clean")


def test_robust_accuracy(trained):
    model, x, y = trained
    assert robust_accuracy(model, x, y, "clean", EPS, batch_size=50) == pytest.approx(accuracy(model, x, y))
    a = robust_accuracy(model, x, y, "pgd", 0.08, steps=5, batch_size=50, seed=3)
    assert a == robust_accuracy(model, x, y, "pgd", 0.08, steps=5, batch_size=50, seed=3)  # seeded
    assert a < accuracy(model, x, y) - 0.5


def test_amp_crafts_in_bf16_through_folded_norms_and_counts_in_fp32():
    """robust_accuracy(amp=True): PGD's examples are those of the same PGD under bf16 autocast through a copy of
    the model with its norms folded into their convolutions (as `train --amp` crafts); they are counted in fp32 on
    the model itself, which is left as it was. The examples differ from the fp32 attack's (the flag is not a
    no-op) and stay in the ε-ball and [0, 1]."""
    import copy

    from conftest import perturb, tiny
    from hybridat.models import BranchView, bn_folded

    view = BranchView(perturb(tiny("dual-bn")), "adv").eval()
    x, y = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 10
    before, modules = snapshot(view), [type(m) for m in view.modules()]
    by_hand = []
    for i, lo in enumerate(range(0, 20, 8)):  # batches of 8 seeded 5 + i, as robust_accuracy draws them
        folded = copy.deepcopy(view.model)
        with bn_folded(folded, "adv", torch.bfloat16), torch.autocast("cpu", dtype=torch.bfloat16):
            by_hand.append(pgd(BranchView(folded, "adv"), x[lo:lo + 8], y[lo:lo + 8], EPS, steps=3,
                               generator=torch.Generator().manual_seed(5 + i)))
    x_bf16 = torch.cat(by_hand)
    fp32 = [pgd(view, x[lo:lo + 8], y[lo:lo + 8], EPS, steps=3, generator=torch.Generator().manual_seed(5 + i))
            for i, lo in enumerate(range(0, 20, 8))]
    assert_in_ball(x_bf16, x, EPS)
    assert not torch.equal(x_bf16, torch.cat(fp32))
    with torch.no_grad():
        correct = (view(x_bf16).argmax(1) == y).sum().item()
    acc = robust_accuracy(view, x, y, "pgd", EPS, steps=3, batch_size=8, seed=5, amp=True)
    assert acc == correct / 20 and 0 < acc < 1
    assert all(torch.equal(before[k], v) for k, v in snapshot(view).items())
    assert [type(m) for m in view.modules()] == modules  # no folded convolution left behind


def test_amp_on_any_module_is_bf16_autocast_alone():
    """A module that is not a hybridat branch is attacked as it is, under bf16 autocast; the accuracy pass runs
    without it (fp32)."""
    model, (x, y) = tiny_net(), data(16)
    seen = []  # (grad enabled, autocast enabled) at each forward
    model.register_forward_hook(lambda *_: seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))))
    robust_accuracy(model, x, y, "pgd", EPS, steps=3, batch_size=16, seed=2, amp=True)
    assert seen == [(True, True)] * 3 + [(False, False)]  # 3 PGD steps in bf16, then the count in fp32
    seen.clear()
    robust_accuracy(model, x, y, "pgd", EPS, steps=3, batch_size=16, seed=2)
    assert seen == [(True, False)] * 3 + [(False, False)]


def test_bad_input_raises():
    model, (x, y) = tiny_net(), data(4)
    with pytest.raises(HybridatError, match="clean, fgsm, pgd, autoattack"):
        robust_accuracy(model, x, y, "cw", EPS)
    for kwargs, fragment in [(dict(eps=-0.1), r"eps must be in \[0, inf\], got -0.1"),
                             (dict(eps=EPS, steps=0), r"PGD steps must be in \[1, inf\], got 0"),
                             (dict(eps=EPS, step=-1.0), r"PGD step size must be in \[0, inf\], got -1.0"),
                             (dict(eps=EPS, step=float("nan")), "PGD step size must be a finite number, got nan"),
                             (dict(eps=EPS, start="zeros"), "unknown PGD start 'zeros'; choose one of: uniform, "),
                             (dict(eps=EPS, norm="l1"), "unknown threat-model norm 'l1'; choose one of: linf, l2")]:
        with pytest.raises(HybridatError, match=fragment):
            pgd(model, x, y, **kwargs)
    with pytest.raises(HybridatError, match=r"y must have one label per image, shape \(4,\), got \(3,\)"):
        pgd(model, x, y[:3], EPS)
    with pytest.raises(HybridatError, match="not both"):
        autoattack(model, x, y, EPS, version="standard", attacks=["apgd-ce"])
    with pytest.raises(HybridatError, match="unknown AutoAttack attack 'cw'"):
        autoattack(model, x, y, EPS, attacks=["cw"])
    with pytest.raises(HybridatError, match=r"eps must be in \[0, inf\], got -0.031"):
        autoattack(model, x, y, -EPS)


def test_random_start_distributions():
    """With step 0 the output is the projected start: N(0, 0.001²) for "normal", U(−ε, ε) for "uniform"."""
    model = tiny_net()
    x, y = torch.full((64, 3, 8, 8), 0.5), torch.zeros(64, dtype=torch.long)
    normal = pgd(model, x, y, EPS, 0.0, 1, start="normal") - x
    assert 0.0009 < normal.std() < 0.0011
    uniform = pgd(model, x, y, EPS, 0.0, 1, start="uniform") - x
    assert uniform.abs().max() > 0.99 * EPS and uniform.std() == pytest.approx(EPS / 3**0.5, rel=0.05)
    assert torch.equal(pgd(model, x, y, EPS, 0.0, 1, start="none"), x)


def test_autoattack_logger_is_quiet_only_when_asked(caplog):
    """A model that outputs probabilities instead of logits: the reference code warns about it."""
    model, (x, y) = nn.Sequential(tiny_net(), nn.Softmax(dim=1)), data(4)
    for quiet in (True, False):
        caplog.clear()
        with caplog.at_level("WARNING"):
            autoattack(model, x, y, EPS, attacks="apgd-ce", quiet=quiet)
        assert any(r.name == "auto-attack" for r in caplog.records) == (not quiet)
    assert logging.getLogger("auto-attack").level == logging.NOTSET  # restored


STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
PLUS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")


@pytest.mark.parametrize("kwargs,expected", [
    ({}, AASettings(STANDARD, 1)),
    ({"version": "plus"}, AASettings(PLUS, 5)),
    ({"version": "rand"}, AASettings(("apgd-ce", "apgd-dlr"), 1, eot_iter=20)),
    ({"attacks": "apgd-ce"}, AASettings(("apgd-ce",), 1)),  # not the reference's custom default of 5
    ({"attacks": " square , apgd-t"}, AASettings(("square", "apgd-t"), 1)),  # order kept
    ({"attacks": ["apgd-ce"], "restarts": 3}, AASettings(("apgd-ce",), 3)),
    ({"restarts": 2}, AASettings(STANDARD, 2)),
    ({"attacks": ",".join(STANDARD)}, AA_VERSIONS["standard"]),  # the standard version, named as such
    ({"attacks": PLUS, "restarts": 5}, AA_VERSIONS["plus"]),
    ({"version": "standard", "attacks": list(STANDARD), "restarts": 1}, AA_VERSIONS["standard"]),  # agrees
])
def test_aa_settings_resolve(kwargs, expected):
    assert aa_settings(**kwargs) == expected


def test_aa_settings_name_what_ran():
    assert [aa_settings(version=v).name for v in ("standard", "plus", "rand")] == \
        ["autoattack", "autoattack-plus", "autoattack-rand"]
    assert aa_settings(attacks="apgd-ce").name == aa_settings(restarts=3).name == "autoattack-custom"
    assert aa_settings(attacks="apgd-ce,square", restarts=2).columns() == \
        {"aa_attacks": "apgd-ce,square", "aa_restarts": 2, "aa_eot_iter": 1}


@pytest.mark.parametrize("kwargs,fragment", [
    ({"version": "custom"}, "unknown AutoAttack version 'custom'"),
    ({"attacks": ""}, "no AutoAttack attacks given"),
    ({"attacks": []}, "no AutoAttack attacks given"),
    ({"attacks": "apgd-ce,cw"}, "unknown AutoAttack attack 'cw'"),
    ({"attacks": "apgd-ce,,square"}, "unknown AutoAttack attack ''"),
    ({"attacks": "square,square"}, "named twice"),
    ({"restarts": 0}, "AutoAttack restarts must be in [1"),
    ({"restarts": 1.5}, "AutoAttack restarts must be an integer"),
    ({"version": "standard", "attacks": "apgd-ce"}, "not both"),
    ({"version": "standard", "attacks": list(reversed(STANDARD))}, "not both"),  # another order is another run
    ({"version": "plus", "restarts": 1}, "not both"),
    ({"version": "standard", "attacks": "apgd-ce", "restarts": 5}, "not both"),
    ({"attacks": "apgd-t,fab-t,square", "restarts": 2}, "restarts apply to apgd-ce, apgd-dlr, fab"),
    ({"attacks": "fab-t,fab", "restarts": 2}, "list fab before fab-t"),
])
def test_aa_settings_refuse_contradictions(kwargs, fragment):
    with pytest.raises(HybridatError, match=re.escape(fragment)):
        aa_settings(**kwargs)


def _spy_on_autoattack(monkeypatch) -> list[tuple]:
    """Every attack object pyautoattack calls, with its settings at that moment; each returns x unchanged
    (no point is broken, so every listed attack is called)."""
    from pyautoattack import autopgd_base, fab_base, square

    calls = []

    def spy(name, *settings):
        def perturb(self, x, y=None, *args, **kwargs):
            calls.append((name, *(getattr(self, s) for s in settings)))
            return x.clone()
        return perturb

    monkeypatch.setattr(autopgd_base.APGDAttack, "perturb", spy("apgd", "loss", "n_restarts", "eot_iter", "n_iter"))
    monkeypatch.setattr(autopgd_base.APGDAttack_targeted, "perturb",
                        spy("apgd-t", "n_restarts", "n_target_classes", "eot_iter", "n_iter"))
    monkeypatch.setattr(fab_base.FABAttack, "perturb", spy("fab", "targeted", "n_restarts", "n_target_classes"))
    monkeypatch.setattr(square.SquareAttack, "perturb", spy("square", "n_restarts", "n_queries"))
    return calls


APGD_T, FAB_T, SQUARE = ("apgd-t", 1, 9, 1, 100), ("fab", True, 1, 9), ("square", 1, 5000)  # in every version


@pytest.mark.parametrize("kwargs,expected", [
    ({}, [("apgd", "ce", 1, 1, 100), APGD_T, FAB_T, SQUARE]),
    ({"version": "plus"}, [("apgd", "ce", 5, 1, 100), ("apgd", "dlr", 5, 1, 100), ("fab", False, 5, 9), SQUARE,
                           APGD_T, FAB_T]),
    ({"version": "rand"}, [("apgd", "ce", 1, 20, 100), ("apgd", "dlr", 1, 20, 100)]),
    ({"attacks": "apgd-ce"}, [("apgd", "ce", 1, 1, 100)]),  # the reference's custom mode alone would run 5
    ({"attacks": "fab,apgd-ce", "restarts": 3}, [("fab", False, 3, 9), ("apgd", "ce", 3, 1, 100)]),
    ({"attacks": "square,fab-t,apgd-t"}, [SQUARE, FAB_T, APGD_T]),
])
def test_autoattack_runs_what_its_settings_say(monkeypatch, kwargs, expected):
    """The reference code's attack objects, at the moment each is called, have the restarts, target classes and
    EOT iterations that `aa_settings` records or takes as fixed (one batch: each attack called once)."""
    calls = _spy_on_autoattack(monkeypatch)
    model, (x, _) = tiny_net(), data(4)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point correct: every attack has points to attack
    autoattack(model, x, y, EPS, batch_size=4, **kwargs)
    assert calls == expected


def test_autoattack_list_is_the_reference_call_bit_for_bit(trained):
    """A list with restarts: the same examples as pyautoattack's custom mode with those restarts set by hand."""
    import pyautoattack

    model, x, y = trained
    x, y = x[:8], y[:8]
    ours = autoattack(model, x, y, 0.03, attacks="apgd-ce", restarts=2, seed=5)
    with frozen(model):
        ref = pyautoattack.AutoAttack(model, attacks=["apgd-ce"], eps=0.03, seed=5, version="custom")
        ref.apgd.n_restarts = 2
        ref_adv, _ = ref.run_standard_evaluation(x, y, batch_size=500)
    assert torch.equal(ours, ref_adv)
    assert not torch.equal(ours, x)  # it attacked


def test_autoattack_refuses_a_reference_that_would_run_other_settings(monkeypatch):
    """If pyautoattack's versions changed (here: Square with 1,000 queries), the rows would record what did not run:
    refused before any attack."""
    import pyautoattack

    set_version = pyautoattack.AutoAttack._set_version

    def fewer_queries(self, version="standard"):
        set_version(self, version)
        self.square.n_queries = 1000

    monkeypatch.setattr(pyautoattack.AutoAttack, "_set_version", fewer_queries)
    calls = _spy_on_autoattack(monkeypatch)
    model, (x, y) = tiny_net(), data(4)
    with pytest.raises(HybridatError, match="not the reference settings hybridat records"):
        autoattack(model, x, y, EPS)
    assert calls == []


@pytest.mark.parametrize("case, fragment", [
    ("labels (B, 1)", "must have one label per image"),
    ("float labels", "must hold integer class labels"),
    ("uint8 images", "is uint8 (0-255)"),
    ("0-255 floats", "pixels must be in [0, 1]"),
    ("eps in pixel units", "eps is in [0, 1] units here"),
    ("eps a string", "eps must be a number"),
    ("3-D x", "must have the shape (B, C, H, W)"),
])
def test_robust_accuracy_names_bad_input_in_one_line(case, fragment):
    """What a notebook gets wrong ends in one HybridatError, never a traceback or a silently wrong number (labels
    of shape (B, 1) used to count 6 of 1)."""
    model, (x, y) = tiny_net(), data(4)
    eps = 8 / 255
    if case == "labels (B, 1)":
        y = y[:, None]
    elif case == "float labels":
        y = y.float()
    elif case == "uint8 images":
        x = (x * 255).to(torch.uint8)
    elif case == "0-255 floats":
        x = x * 255
    elif case == "eps in pixel units":
        eps = 8
    elif case == "eps a string":
        eps = "8"
    else:
        x = x[0]
    with pytest.raises(HybridatError, match=re.escape(fragment)):
        robust_accuracy(model, x, y, "clean", eps)


def test_pgd_refuses_wrong_dtypes_and_linf_eps_above_1_without_a_sync():
    """The training attack's checks (pgd_unchecked: no host sync; pgd checks the values too)."""
    model, (x, y) = tiny_net(), data(4)
    with pytest.raises(HybridatError, match="integer class labels"):
        pgd_unchecked(model, x, y.float(), EPS)
    with pytest.raises(HybridatError, match=re.escape("expected float pixels x in [0, 1], got torch.uint8")):
        pgd_unchecked(model, (x * 255).to(torch.uint8), y, EPS)
    with pytest.raises(HybridatError, match=re.escape("eps is in [0, 1] units here")):
        pgd_unchecked(model, x, y, 8.0)
    x_adv = pgd_unchecked(model, x, y, 2.0, 0.1, 1, norm="l2", start="none")  # an L2 radius may exceed 1
    assert_in_ball(x_adv, x, 2.0, norm="l2")


def test_robust_accuracy_pgd_is_the_evaluation_protocol_batch_by_batch(trained):
    """"pgd" is PGD with step ε/4 (SPEC: evaluation protocol) from a uniform start in the ε-ball, batch i drawn from a
    generator seeded seed + i; the accuracy counts its examples on the model."""
    model, x, y = trained
    eps, steps, seed, size = 0.08, 3, 3, 50
    assert default_step(eps) == eps / 4
    correct = 0
    for i, lo in enumerate(range(0, len(x), size)):
        xb, yb = x[lo:lo + size], y[lo:lo + size]
        generator = torch.Generator().manual_seed(seed + i)
        x_adv = pgd(model, xb, yb, eps, eps / 4, steps, start="uniform", generator=generator)
        assert torch.equal(ATTACKS["pgd"](model, xb, yb, eps, None, steps, seed + i), x_adv)
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == yb).sum().item()
    assert robust_accuracy(model, x, y, "pgd", eps, steps=steps, batch_size=size, seed=seed) == correct / len(x)


@pytest.mark.parametrize("attack", ["clean", "fgsm", "pgd"])
def test_robust_accuracy_counts_in_eval_mode_and_leaves_a_train_mode_model_as_it_was(trained, attack):
    """robust_accuracy counts in eval mode (running NS), whatever mode the caller left the model in; a count in
    train mode normalized each batch with its own statistics and moved BN's running NS."""
    model, x, y = trained
    model = copy.deepcopy(model)
    with torch.no_grad():
        model[1].running_mean.add_(0.3)  # running NS far from any batch's: eval and train mode now differ
    want = robust_accuracy(model, x, y, attack, 0.02, steps=3, batch_size=32, seed=1)
    model.train()
    before = snapshot(model)
    assert robust_accuracy(model, x, y, attack, 0.02, steps=3, batch_size=32, seed=1) == want
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
