"""NS gap and AP gap: exact zeros for identical domains, train-mode statistics, no trace on the model, plots."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

from hybridat.analysis import (ap_gap, batch_ns, domain_batches, mad, ns_gap, plot_channels, plot_gap_by_depth,
                               wasserstein_1d)
from hybridat.errors import HybridatError
from hybridat.models import ModelConfig, build_model, norm_layers

COLUMNS = ["kind", "layer", "layer_name", "pair", "statistic", "measure", "distance", "fix_ap", "branch", "eps"]
CHANNEL_COLUMNS = ["layer", "layer_name", "domain", "channel", "mean", "std", "fix_ap", "branch", "eps"]


@torch.no_grad()
def make(norm: str, seed: int = 0, randomize: bool = True):
    """ResNet-18 at width 1/8, eval mode; with randomize, every NS and AP set holds different random values."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig("resnet18", norm, 0.125))
    g = torch.Generator().manual_seed(seed)
    for _, m in norm_layers(model) if randomize else []:
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if name.startswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif not name.startswith("num_batches"):  # running_mean, bias around 0; weight around 1
                t.copy_(0.1 * torch.randn(t.shape, generator=g) + name.startswith("weight"))
    return model.eval()


def batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_wasserstein_matches_scipy_and_mad_is_the_mean_abs_difference():
    g = np.random.default_rng(0)
    for n in (1, 7, 64):
        a, b = g.normal(size=n), g.normal(1.0, 2.0, size=n)
        assert wasserstein_1d(torch.tensor(a), torch.tensor(b)) == pytest.approx(wasserstein_distance(a, b), abs=1e-12)
        assert mad(a, b) == pytest.approx(np.abs(a - b).mean(), abs=1e-12)
    assert wasserstein_1d([3.0, 1.0, 2.0], [1.0, 2.0, 3.0]) == 0.0 < mad([3.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(HybridatError, match="equal length"):
        wasserstein_1d([1.0, 2.0], [1.0])


def test_domain_batches_stay_in_the_eps_ball_and_the_box():
    x, y = batch()
    x[:, :, :4] = 0.5  # interior pixels: the noise there is not clipped
    for noise in ("uniform", "gaussian"):
        d = domain_batches(make("dual-bn"), x, y, "adv", eps=8, steps=2, noise=noise, seed=3)
        assert torch.equal(d["clean"], x)
        for k in ("adv", "noise"):
            assert d[k].min() >= 0 and d[k].max() <= 1 and not torch.equal(d[k], x)
        assert (d["adv"] - x).abs().max() <= 8 / 255 + 1e-6
        std = (d["noise"] - x)[:, :, :4].std().item()
        assert std == pytest.approx(8 / 255 / math.sqrt(3), rel=0.05)
    assert ((d["noise"] - x).abs().max() > 8 / 255)  # gaussian noise is not bounded by eps
    with pytest.raises(HybridatError, match="unknown noise"):
        domain_batches(make("dual-bn"), x, y, "adv", eps=8, noise="salt")


@pytest.mark.parametrize("norm", ["dual-bn", "cross-bn", "cross-bn-swap", "bn-mix", "gn-dual-ap"])
def test_batch_ns_leaves_the_model_unchanged(norm):
    model = make(norm)
    before = copy.deepcopy(model.state_dict())
    stats = batch_ns(model, batch()[0], "adv")
    assert [s[0] for s in stats] == list(range(20)) and [s[1] for s in stats] == [n for n, _ in norm_layers(model)]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in model.modules())
    if norm.startswith("cross-bn"):  # its train-mode override is undone
        want = {"cross-bn": "clean", "cross-bn-swap": "other"}[norm]
        assert all(m.batch_ns == want for _, m in norm_layers(model))


def test_batch_ns_reads_each_layers_input_with_batch_statistics_upstream():
    model, x = make("dual-bn"), batch()[0]
    stats = batch_ns(model, x, "clean")
    with torch.no_grad():
        h = model.conv1(x)  # input of norm layer 0
        bn = model.bn1  # in train mode it normalizes with the batch's own statistics, then the clean AP
        var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0)
        z = F.relu((h - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps) * bn.weight_clean[:, None, None]
                   + bn.bias_clean[:, None, None])
        h1 = model.layer1[0].conv1(z)  # input of norm layer 1
    torch.testing.assert_close(stats[0][2], mean)
    torch.testing.assert_close(stats[0][3], var.sqrt())
    var1, mean1 = torch.var_mean(h1, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(stats[1][2], mean1)
    torch.testing.assert_close(stats[1][3], var1.sqrt())


def test_ns_gap_is_exactly_zero_for_identical_domains():
    x, y = batch()
    rows, channel_rows = ns_gap(make("dual-bn"), x, y, eps=0, fix_ap=True, branch="clean", steps=1)
    assert len(rows) == 20 * 2 * 2 * 2  # layers x pairs x (mean, std) x (wasserstein, mad)
    assert all(list(r) == COLUMNS for r in rows) and all(list(r) == CHANNEL_COLUMNS for r in channel_rows)
    assert all(r["distance"] == 0.0 and r["fix_ap"] is True and r["branch"] == "clean" and r["eps"] == 0
               for r in rows)
    assert len(channel_rows) == 3 * sum(m.num_features for _, m in norm_layers(make("dual-bn")))


def test_fix_ap_separates_the_data_gap_from_the_ap_gap():
    """eps = 0: the domains hold the same images, so any gap without --fix-ap comes from the branches' AP."""
    model, (x, y) = make("dual-bn"), batch()
    fixed, _ = ns_gap(model, x, y, eps=0, fix_ap=True, steps=1)
    own, _ = ns_gap(model, x, y, eps=0, fix_ap=False, steps=1)
    assert all(r["distance"] == 0 for r in fixed)
    assert all(r["branch"] == "own" and r["fix_ap"] is False for r in own)
    adv_clean = [r for r in own if r["pair"] == "adv-clean"]
    assert all(r["distance"] == 0 for r in adv_clean if r["layer"] == 0)  # conv1's output: no AP upstream yet
    assert all(r["distance"] > 0 for r in adv_clean if r["layer"] > 0)
    # noise goes through the adv branch like the adv domain: at eps 0 noise-clean is exactly adv-clean's AP gap
    noise_clean = [r for r in own if r["pair"] == "noise-clean"]
    assert [r["distance"] for r in noise_clean] == [r["distance"] for r in adv_clean]


def test_ns_gap_sees_the_perturbations():
    x, y = batch()
    rows, channel_rows = ns_gap(make("dual-bn"), x, y, eps=16, fix_ap=True, steps=2, noise="gaussian")
    assert all(r["distance"] > 0 and r["eps"] == 16 for r in rows)
    assert {r["domain"] for r in channel_rows} == {"clean", "adv", "noise"}


def test_ap_gap_is_zero_for_identical_sets_and_positive_otherwise():
    model = make("dual-bn", randomize=False)  # both AP sets start at weight 1, bias 0
    rows = ap_gap(model)
    assert len(rows) == 20 * 2 * 2 and all(list(r) == COLUMNS for r in rows)
    assert all(r["distance"] == 0 and r["kind"] == "ap" and r["fix_ap"] is None for r in rows)
    with torch.no_grad():
        layer = norm_layers(model)[3][1]
        layer.weight_adv.add_(torch.linspace(0, 1, layer.num_features))
    for r in ap_gap(model):
        assert (r["distance"] > 0) == (r["layer"] == 3 and r["statistic"] == "weight")
    for norm in ("bn", "dual-ns"):
        with pytest.raises(HybridatError, match="no two AP sets"):
            ap_gap(make(norm))


def test_plots_write_png_files(tmp_path):
    model, (x, y) = make("dual-bn"), batch()
    fixed, channels = ns_gap(model, x, y, eps=8, fix_ap=True, steps=1)
    own, channels_own = ns_gap(model, x, y, eps=8, fix_ap=False, steps=1)
    plot_gap_by_depth(fixed + own + ap_gap(model), tmp_path / "depth.png")
    plot_channels(channels + channels_own, 5, tmp_path / "channels.png")
    for name in ("depth.png", "channels.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["channels.png", "depth.png"]  # no temp files left
    with pytest.raises(HybridatError, match="layer 99"):
        plot_channels(channels, 99, tmp_path / "none.png")
