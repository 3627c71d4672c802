"""Each normalization variant's defining property, checked numerically (SPEC.md's table)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridat.models import norm_layers
from hybridat.norms import NORMS, BranchBatchNorm, Router

from conftest import perturb, tiny

C = 6
TWO_PASS_OK = [n for n, s in NORMS.items() if s.batch_ns == "own"]


def layer(name: str, seed: int = 0):
    """A standalone norm layer of variant `name` with distinct per-branch AP."""
    torch.manual_seed(seed)
    m = NORMS[name].layer(C)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


def run(m, x, sizes):
    m.router.sizes = sizes
    return m(x)


@pytest.fixture
def halves():
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(5, C, 4, 4, generator=g) * 2 + 1  # adv rows: another mean and scale than clean rows
    xc = torch.randn(7, C, 4, 4, generator=g)
    return xa, xc


def ref_bn(weight=None, bias=None):
    bn = nn.BatchNorm2d(C, affine=weight is not None)
    if weight is not None:
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    return bn


def test_registry_keys_are_lowercase_and_cover_spec():
    expected = {"bn", "bn-mix", "dual-bn", "dual-ap", "dual-ns", "cross-bn", "cross-bn-adv", "cross-bn-swap",
                "dual-linear", "gn", "in", "ln",
                "gn-dual-ap", "in-dual-ap", "ln-dual-ap", "bn-noaffine", "dual-bn-fixed-ap", "dual-adapter"}
    assert set(NORMS) == expected
    assert all(k == k.lower() for k in NORMS)


def test_bn_is_two_passes_of_one_batchnorm(halves):
    xa, xc = halves
    m = layer("bn").train()
    ref = ref_bn(m.weight, m.bias).train()
    y = run(m, torch.cat([xa, xc]), (5, 7))
    want = torch.cat([ref(xa), ref(xc)])  # adv pass then clean pass update the one running set
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)
    assert set(dict(m.named_parameters())) == {"weight", "bias"}


def test_bn_state_dict_is_a_plain_batchnorm():
    ref = ref_bn(torch.randn(C), torch.randn(C))
    m = layer("bn")
    m.load_state_dict(ref.state_dict())  # strict: same keys as nn.BatchNorm2d
    x = torch.randn(4, C, 3, 3)
    torch.testing.assert_close(run(m.eval(), x, (4, 0)), ref.eval()(x))


def test_bn_mix_normalizes_the_mixed_batch(halves):
    xa, xc = halves
    m = layer("bn-mix").train()
    ref = ref_bn(m.weight, m.bias).train()
    x = torch.cat([xa, xc])
    torch.testing.assert_close(run(m, x, (5, 7)), ref(x))
    torch.testing.assert_close(m.running_var, ref.running_var)


def test_dual_bn_is_one_batchnorm_per_branch(halves):
    xa, xc = halves
    m = layer("dual-bn").train()
    ra, rc = ref_bn(m.weight_adv, m.bias_adv).train(), ref_bn(m.weight_clean, m.bias_clean).train()
    y = run(m, torch.cat([xa, xc]), (5, 7))
    torch.testing.assert_close(y, torch.cat([ra(xa), rc(xc)]))
    torch.testing.assert_close(m.running_mean_adv, ra.running_mean)
    torch.testing.assert_close(m.running_var_clean, rc.running_var)
    m.eval(), ra.eval(), rc.eval()
    torch.testing.assert_close(run(m, xc, (0, 7)), rc(xc))
    torch.testing.assert_close(run(m, xc, (7, 0)), ra(xc))


def test_dual_ap_one_running_ns_two_ap_sets(halves):
    xa, xc = halves
    m = layer("dual-ap").train()
    assert {n for n, _ in m.named_buffers()} == {"running_mean", "running_var", "num_batches_tracked"}
    assert {n for n, _ in m.named_parameters()} == {"weight_adv", "bias_adv", "weight_clean", "bias_clean"}
    x = torch.cat([xa, xc])
    y = run(m, x, (5, 7))
    ref = ref_bn().train()
    z = ref(x)  # the mixed batch's normalization, no AP
    torch.testing.assert_close(y[:5], z[:5] * m.weight_adv[:, None, None] + m.bias_adv[:, None, None])
    torch.testing.assert_close(y[5:], z[5:] * m.weight_clean[:, None, None] + m.bias_clean[:, None, None])
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    # in eval both branches share NS: their outputs differ only through AP
    m.eval()
    ya, yc = run(m, xc, (7, 0)), run(m, xc, (0, 7))
    za = (ya - m.bias_adv[:, None, None]) / m.weight_adv[:, None, None]
    zc = (yc - m.bias_clean[:, None, None]) / m.weight_clean[:, None, None]
    torch.testing.assert_close(za, zc)
    assert not torch.allclose(ya, yc)


def test_dual_ns_shares_ap_and_keeps_ns_per_branch(halves):
    xa, xc = halves
    m = layer("dual-ns").train()
    assert {n for n, _ in m.named_parameters()} == {"weight", "bias"}
    ra, rc = ref_bn(m.weight, m.bias).train(), ref_bn(m.weight, m.bias).train()
    torch.testing.assert_close(run(m, torch.cat([xa, xc]), (5, 7)), torch.cat([ra(xa), rc(xc)]))
    torch.testing.assert_close(m.running_mean_adv, ra.running_mean)
    torch.testing.assert_close(m.running_mean_clean, rc.running_mean)
    m.eval()
    assert not torch.allclose(run(m, xc, (7, 0)), run(m, xc, (0, 7)))  # different NS
    m.running_mean_adv.copy_(m.running_mean_clean), m.running_var_adv.copy_(m.running_var_clean)
    torch.testing.assert_close(run(m, xc, (7, 0)), run(m, xc, (0, 7)))  # same NS, shared AP: identical


def normalize(x, stats_of, w, b):
    """Hand-written BN: x normalized with the biased batch statistics of `stats_of`, then w, b per channel."""
    var, mean = torch.var_mean(stats_of, dim=(0, 2, 3), correction=0)
    return (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * w[:, None, None] + b[:, None, None]


@pytest.mark.parametrize("name,source", [("cross-bn", "clean"), ("cross-bn-adv", "adv")])
def test_one_sided_cross_bn_against_a_hand_written_reference(halves, name, source):
    """cross-bn: adv rows with the CLEAN rows' batch NS and the adv AP, clean rows as in Self-BN (their own NS,
    clean AP); one running set, of clean data only. cross-bn-adv: the same with the domains exchanged."""
    xa, xc = (h.clone().requires_grad_() for h in halves)
    m = layer(name).train()
    assert len(m.ns_keys) == 1 and len(m.ap_keys) == 2
    y = run(m, torch.cat([xa, xc]), (5, 7))
    src = xc if source == "clean" else xa
    want_a = normalize(xa, src, m.weight_adv, m.bias_adv)
    want_c = normalize(xc, src, m.weight_clean, m.bias_clean)
    torch.testing.assert_close(y[:5], want_a)
    torch.testing.assert_close(y[5:], want_c)
    # the rows of the source domain are normalized exactly as Self-BN would (own NS, own AP)
    own = ref_bn(*m.affine(source)).train()
    torch.testing.assert_close(y[5:] if source == "clean" else y[:5], own(src))
    # gradients flow through the source rows' statistics, as in the authors' layer
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [xa, xc, m.weight_adv], g)
    want = torch.autograd.grad(torch.cat([want_a, want_c]), [xa, xc, m.weight_adv], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[0 if source == "clean" else 1].abs().sum() > 0
    # the one running set holds the source domain's statistics only (as nn.BatchNorm2d on those rows)
    torch.testing.assert_close(m.running_mean, own.running_mean)
    torch.testing.assert_close(m.running_var, own.running_var)
    assert m.num_batches_tracked.item() == 1
    # in eval both branches read that running set, each with its own AP
    m.eval(), own.eval()
    with torch.no_grad():
        for branch, rows, sizes in (("adv", xa, (5, 0)), ("clean", xc, (0, 7))):
            w, b = m.affine(branch)
            plain = (rows - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + 1e-5)
            torch.testing.assert_close(run(m, rows, sizes), plain * w[:, None, None] + b[:, None, None])


@pytest.mark.parametrize("name,missing", [("cross-bn", (5, 0)), ("cross-bn-adv", (0, 7))])
def test_one_sided_cross_bn_needs_its_source_rows_in_training(halves, name, missing):
    from hybridat.errors import HybridatError

    m = layer(name).train()
    x = halves[0] if missing[0] else halves[1]
    with pytest.raises(HybridatError, match="batch statistics"):
        run(m, x, missing)
    src = halves[1] if missing[0] else halves[0]  # a batch of only the source rows is fine: Self-BN
    sizes = (0, 7) if missing[0] else (5, 0)
    torch.testing.assert_close(run(m, src, sizes), ref_bn(*m.affine("clean" if missing[0] else "adv")).train()(src))


def test_cross_bn_swap_normalizes_each_half_with_the_other_halfs_stats(halves):
    xa, xc = halves
    m = layer("cross-bn-swap").train()
    y = run(m, torch.cat([xa, xc]), (5, 7))
    torch.testing.assert_close(y[:5], normalize(xa, xc, m.weight_adv, m.bias_adv))
    torch.testing.assert_close(y[5:], normalize(xc, xa, m.weight_clean, m.bias_clean))
    ra, rc = ref_bn().train(), ref_bn().train()
    ra(xa), rc(xc)  # running NS are kept per domain
    torch.testing.assert_close(m.running_mean_adv, ra.running_mean)
    torch.testing.assert_close(m.running_var_clean, rc.running_var)
    # in eval, branch adv = clean running NS + adv AP
    m.eval(), rc.eval()
    want = (rc(xa) * m.weight_adv[:, None, None] + m.bias_adv[:, None, None])
    torch.testing.assert_close(run(m, xa, (5, 0)), want)


def test_cross_bn_swap_needs_both_halves_in_training(halves):
    from hybridat.errors import HybridatError

    m = layer("cross-bn-swap").train()
    with pytest.raises(HybridatError, match="both branches"):
        run(m, halves[0], (5, 0))


@pytest.mark.parametrize("name,groups", [("gn", 2), ("in", C), ("ln", 1)])
def test_batch_independent_norms(name, groups, halves):
    xa, xc = halves
    for variant in (name, f"{name}-dual-ap"):
        m = layer(variant).train()
        assert not list(m.buffers())  # no NS at all
        y = run(m, torch.cat([xa, xc]), (5, 7))
        w, b = m.affine("adv")
        torch.testing.assert_close(y[:5], F.group_norm(xa, groups, w, b, 1e-5))
        w, b = m.affine("clean")
        torch.testing.assert_close(y[5:], F.group_norm(xc, groups, w, b, 1e-5))
        assert (m.affine("adv")[0] is m.affine("clean")[0]) == (variant == name)


def test_gn_groups_fit_narrow_layers():
    assert NORMS["gn"].layer(64).groups == 32
    assert NORMS["gn"].layer(8).groups == 8


@pytest.mark.parametrize("name", ["bn-noaffine", "dual-bn-fixed-ap"])
def test_no_affine_variants(name, halves):
    m = layer(name).train()
    assert not list(m.parameters())
    y = run(m, torch.cat(halves), (5, 7))
    var, mean = torch.var_mean(y[:5], dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros(C), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones(C), atol=1e-3, rtol=0)
    assert len(m.ns_keys) == (2 if name.startswith("dual") else 1)


def test_running_update_matches_batchnorm_with_cumulative_momentum(halves):
    m = layer("dual-bn").train()
    m.momentum = None
    ref = nn.BatchNorm2d(C, momentum=None).train()
    for x in halves:
        run(m, x, (len(x), 0))
        ref(x)
    torch.testing.assert_close(m.running_mean_adv, ref.running_mean)
    torch.testing.assert_close(m.running_var_adv, ref.running_var)


@pytest.mark.parametrize("name", TWO_PASS_OK)
def test_fused_forward_equals_two_passes_in_training(name):
    model = perturb(tiny(name)).train()
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    xa, xc = torch.rand(6, 3, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g)
    la, lc = model.fused(xa, xc)
    torch.testing.assert_close(la, other(xa, "adv"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lc, other(xc, "clean"), rtol=1e-5, atol=1e-5)
    for (k, v), w in zip(model.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", list(NORMS))
def test_fused_forward_equals_two_passes_in_eval(name):
    model = perturb(tiny(name)).eval()
    g = torch.Generator().manual_seed(0)
    xa, xc = torch.rand(6, 3, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g)
    la, lc = model.fused(xa, xc)
    torch.testing.assert_close(la, model(xa, "adv"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lc, model(xc, "clean"), rtol=1e-5, atol=1e-5)
    branches_differ = not torch.allclose(model(xa, "adv"), model(xa, "clean"))
    assert branches_differ == (NORMS[name].branches == 2)


def test_dual_linear_shares_everything_but_the_head():
    model = perturb(tiny("dual-linear")).eval()
    heads = model.linear.heads
    x = torch.rand(3, 3, 32, 32)
    feats = {}
    model.linear.register_forward_pre_hook(lambda m, inp: feats.setdefault(m.router.sizes, inp[0]))
    la, lc = model(x, "adv"), model(x, "clean")
    torch.testing.assert_close(feats[(3, 0)], feats[(0, 3)])
    torch.testing.assert_close(la, heads["adv"](feats[(3, 0)]))
    torch.testing.assert_close(lc, heads["clean"](feats[(3, 0)]))


def test_dual_adapter_starts_as_identity_and_routes_rows():
    model = tiny("dual-adapter").eval()
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(model(x, "adv"), model(x, "clean"))  # zero-initialised adapters
    with torch.no_grad():
        model.adapt2.adapters["adv"].up.weight.normal_()
    assert not torch.allclose(model(x, "adv"), model(x, "clean"))
    before = model(x, "clean")
    with torch.no_grad():
        model.adapt3.adapters["adv"].down.weight.normal_()
    torch.testing.assert_close(model(x, "clean"), before)  # the adv adapter never sees clean rows


def test_every_layer_of_a_model_shares_its_router():
    model = tiny("dual-bn")
    routers = {id(m.router) for _, m in norm_layers(model)}
    assert routers == {id(model.router)}
    assert isinstance(model.router, Router)
    assert all(isinstance(m, BranchBatchNorm) for _, m in norm_layers(model))
