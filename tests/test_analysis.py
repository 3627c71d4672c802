"""NS gap and AP gap: exact zeros for identical domains, train-mode statistics, no trace on the model, plots."""

import copy
import math
from functools import partial

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision
from scipy.stats import wasserstein_distance

from hybridat.analysis import (ap_gap, batch_ns, channels_figure, domain_batches, gap_by_depth_figure, mad,
                               measured_layers, ns_gap, perturb, plot_channels, plot_gap_by_depth, protocol_text,
                               running_ns, wasserstein_1d)
from hybridat.errors import HybridatError
from hybridat.models import ModelConfig, build_model, norm_layers

PROTOCOL = ["mode", "reference", "noise_clip"]
DOMAIN = ["noise", "steps", "step", "attack_branch", "start"]
COLUMNS = ["kind", "layer", "layer_name", "pair", "statistic", "measure", "distance", "fix_ap", "branch", "eps",
           *PROTOCOL, *DOMAIN]
CHANNEL_COLUMNS = ["layer", "layer_name", "domain", "channel", "mean", "std", "fix_ap", "branch", "eps", *PROTOCOL,
                   *DOMAIN]


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


def test_depth_plot_keeps_coinciding_lines_visible():
    """FILE-depth.png drew adv-clean (red) and noise-clean (blue) with one marker and width, noise on top: where the
    own-branch gaps coincide (the branches' AP gap dominates both) the red line was hidden. Now red lies wide with
    filled markers under a narrow blue line with hollow ones."""
    model, (x, y) = make("dual-bn"), batch()
    own, _ = ns_gap(model, x, y, eps=8, fix_ap=False, steps=1)
    adv = {(r["layer"], r["statistic"], r["measure"]): r["distance"] for r in own if r["pair"] == "adv-clean"}
    rows = [r | {"distance": adv[r["layer"], r["statistic"], r["measure"]]} if r["pair"] == "noise-clean" else r
            for r in own]
    fig = gap_by_depth_figure(rows)
    for ax in fig.axes:
        red, blue = sorted(ax.get_lines(), key=lambda line: line.get_zorder())
        assert (red.get_xydata() == blue.get_xydata()).all() and red.get_color() != blue.get_color()
        assert red.get_zorder() < blue.get_zorder() and red.get_linewidth() > blue.get_linewidth()
        assert red.get_marker() != blue.get_marker() and blue.get_markerfacecolor() == "none"


def test_channel_bars_take_each_domains_colour_in_the_depth_plot():
    """FILE-channels.png drew adv orange and noise green beside a depth plot of adv red and noise blue."""
    model, (x, y) = make("dual-bn"), batch()
    rows, channels = ns_gap(model, x, y, eps=8, fix_ap=True, steps=1)
    legend = gap_by_depth_figure(rows).legends[0]
    depth = {text.get_text().split("-")[0]: handle.get_color()
             for text, handle in zip(legend.get_texts(), legend.legend_handles)}
    bars = {c.get_label(): matplotlib.colors.to_hex(c.patches[0].get_facecolor())
            for c in channels_figure(channels, 3).axes[0].containers}
    assert set(bars) == {"clean", "adv", "noise"} and set(depth) == {"adv", "noise"}
    assert all(bars[d] == matplotlib.colors.to_hex(depth[d]) for d in depth) and bars["clean"] not in depth.values()


# ---- the two protocols (train / eval mode), the running-NS reference, unclipped noise, any nn.Module ----------

def _hooked_input_stats(model, call, layers):
    """Hand-written reference: forward pre-hooks on `layers` record each input's per-channel mean and biased std."""
    seen = {}

    def hook(name, module, inputs):
        h = inputs[0].detach().double()
        mean = h.mean(dim=(0, 2, 3))
        seen[name] = (mean, (h - mean[:, None, None]).pow(2).mean(dim=(0, 2, 3)).sqrt())

    handles = [m.register_forward_pre_hook(partial(hook, name)) for name, m in layers]
    with torch.no_grad():
        call()
    for h in handles:
        h.remove()
    return [seen[name] for name, _ in layers]


def torchvision_resnet18():
    """A plain torchvision ResNet-18 (model(x), nn.BatchNorm2d) with random, distinct running NS and AP."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("kind", ["dual-bn", "torchvision"])
def test_eval_mode_reads_what_hand_written_hooks_on_the_eval_model_read(kind):
    model = make(kind) if kind != "torchvision" else torchvision_resnet18()
    x = batch(16)[0]
    layers = measured_layers(model)
    assert len(layers) == 20
    call = (lambda: model(x, "clean")) if kind != "torchvision" else (lambda: model(x))
    want = _hooked_input_stats(model.eval(), call, layers)
    got = batch_ns(model, x, "clean", mode="eval")
    assert [name for _, name, *_ in got] == [name for name, _ in layers]
    for (_, _, mean, std), (ref_mean, ref_std) in zip(got, want):
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-6)
    # the protocols differ: below the first layer, running NS upstream are not the batch's own
    train = batch_ns(model, x, "clean", mode="train")
    torch.testing.assert_close(train[0][2], got[0][2])
    assert all((t[2] - e[2]).abs().max() > 1e-3 for t, e in zip(train[1:], got[1:]))


@pytest.mark.parametrize("kind", ["dual-bn", "torchvision"])
def test_train_mode_equals_the_authors_momentum_one_copy(kind):
    """The authors read NS by a forward in train mode through a copy whose BN momentum is 1: the running mean is
    then the batch mean and the running var the batch's unbiased variance."""
    model = make(kind) if kind != "torchvision" else torchvision_resnet18()
    x = batch(16)[0]
    copy_ = copy.deepcopy(model).train()
    layers = measured_layers(copy_)
    counts = {}  # values per channel each layer saw: N*H*W, for the unbiased variance
    for name, m in layers:
        m.momentum = 1.0
        m.register_forward_pre_hook(lambda mod, inputs, name=name: counts.__setitem__(
            name, inputs[0].numel() // inputs[0].shape[1]))
    with torch.no_grad():
        copy_(x, "adv") if kind != "torchvision" else copy_(x)
    got = batch_ns(model, x, "adv", mode="train")
    for (_, name, mean, std), (_, m) in zip(got, layers):
        running_mean, running_var = m.running("adv") if kind != "torchvision" else (m.running_mean, m.running_var)
        n = counts[name]
        torch.testing.assert_close(mean, running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(std.pow(2) * n / (n - 1), running_var, rtol=1e-5, atol=1e-6)


def test_unclipped_noise_has_the_documented_range():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[:, :, 0], x[:, :, 1] = 0.0, 1.0  # rows at the ends of the box
    model, y = make("dual-bn"), torch.zeros(8, dtype=torch.long)
    kept = perturb(model, x, y, "noise", "adv", 8, noise_clip=False, generator=torch.Generator().manual_seed(1))
    clipped = perturb(model, x, y, "noise", "adv", 8, noise_clip=True, generator=torch.Generator().manual_seed(1))
    delta = kept - x
    assert delta.abs().max() <= 8 / 255 + 1e-7 and delta.abs().max() > 0.99 * 8 / 255  # U(-eps, eps)
    assert kept.min() < 0 and kept.max() > 1  # the documented range is [-eps, 1 + eps]
    assert kept.min() >= -8 / 255 - 1e-7 and kept.max() <= 1 + 8 / 255 + 1e-7
    assert torch.equal(clipped, kept.clamp(0, 1))  # the same draw, clipped
    rows, channels = ns_gap(model, x, y, eps=8, fix_ap=True, steps=1, noise_clip=False)
    assert all(r["noise_clip"] is False for r in rows + channels)


def test_reference_running_compares_each_domain_with_the_stored_ns():
    model, (x, y) = make("dual-bn"), batch(16)
    rows, channels = ns_gap(model, x, y, eps=8, fix_ap=False, steps=1, reference="running", mode="eval")
    assert {r["pair"] for r in rows} == {"adv-running", "noise-running", "clean-running"}
    assert all(r["reference"] == "running" and r["mode"] == "eval" for r in rows)
    # without --fix-ap the clean domain goes through the clean branch: its running NS are the reference
    layer = norm_layers(model)[7][1]
    stored = [r["mean"] for r in channels if r["layer"] == 7 and r["domain"] == "running"]
    assert stored == layer.running_mean_clean.tolist()
    clean_ns = batch_ns(model, x, "clean", mode="eval", unbiased=True)[7]  # like running_var: unbiased
    row = next(r for r in rows if (r["layer"], r["pair"], r["statistic"], r["measure"]) ==
               (7, "clean-running", "std", "wasserstein"))
    assert row["distance"] == wasserstein_1d(clean_ns[3], layer.running_var_clean.sqrt())
    with pytest.raises(HybridatError, match="keeps no running NS"):
        ns_gap(make("gn-dual-ap"), x, y, eps=8, fix_ap=True, steps=1, reference="running")
    with pytest.raises(HybridatError, match="unknown reference"):
        ns_gap(model, x, y, eps=8, reference="stored")


def test_a_torchvision_module_runs_through_ns_gap_and_is_left_unchanged():
    model, (x, y) = torchvision_resnet18(), batch(16)
    before = copy.deepcopy(model.state_dict())
    zero, _ = ns_gap(model, x, y, eps=0, steps=1)  # identical domains: every distance exactly 0
    assert all(r["distance"] == 0 for r in zero)
    rows, channels = ns_gap(model, x, y, eps=16, steps=2, mode="eval")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert sorted({(r["layer"], r["layer_name"]) for r in rows}) == list(enumerate(names))
    assert all(r["branch"] == "model" and r["fix_ap"] is True for r in rows)
    assert all(r["distance"] > 0 for r in rows if r["pair"] == "adv-clean")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.training
    with pytest.raises(HybridatError, match="no two AP sets"):
        ap_gap(model)
    with pytest.raises(HybridatError, match="no norm layer"):
        batch_ns(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)), x)


def test_plots_say_how_the_ns_were_measured(tmp_path):
    model, (x, y) = make("dual-bn"), batch()
    train, _ = ns_gap(model, x, y, eps=8, fix_ap=True, steps=1)
    evald, channels = ns_gap(model, x, y, eps=8, fix_ap=True, steps=1, mode="eval", reference="running",
                             noise_clip=False)
    assert protocol_text("eval", "running", False) == ("NS read in eval mode, against the stored running NS, "
                                                       "noise not clipped")
    plot_gap_by_depth(train + evald, tmp_path / "both.png")  # two protocols: each line says which
    plot_channels(channels, 3, tmp_path / "channels.png")
    assert (tmp_path / "both.png").stat().st_size > 0 and (tmp_path / "channels.png").stat().st_size > 0


def test_depth_plot_panels_and_legend_say_what_they_show(tmp_path, monkeypatch):
    """Panels were titled "mean", "std", "weight", "bias" and the AP line "adv-clean (AP)": which mean, whose weight?"""
    import hybridat.analysis as analysis

    figures = []
    monkeypatch.setattr(analysis, "_save", lambda fig, path: figures.append(fig))
    model, (x, y) = make("dual-bn"), batch()
    rows, channels = ns_gap(model, x, y, eps=8, fix_ap=True, steps=1)
    plot_gap_by_depth(rows + ap_gap(model), tmp_path / "depth.png")
    plot_channels(channels, 3, tmp_path / "channels.png")
    depth, bars = figures
    assert [ax.get_title() for ax in depth.axes] == ["NS: channel means", "NS: channel stds", "AP: weight (γ)",
                                                     "AP: bias (β)"]
    assert {ax.get_ylabel() for ax in depth.axes} == {"Wasserstein distance"}
    assert [t.get_text() for t in depth.legends[0].get_texts()] == [
        "adv-clean (fix AP: adv)", "noise-clean (fix AP: adv)", "AP gap: adv vs clean branch"]
    assert bars.axes[0].get_ylabel() == "channel mean of the layer's input"


def test_rows_record_the_noise_and_attack_and_report_never_averages_them(tmp_path):
    """The noisy domain (uniform or Gaussian) and the adversarial one (PGD steps, step, the branch crafting it) are
    part of what a row measured: each row records them, and `report` keeps rows measured differently apart (a
    Gaussian noise-clean gap was averaged with the uniform one of the same checkpoint as one seed's value)."""
    from hybridat.analysis import write_ns_gap
    from hybridat.checkpoint import load_checkpoint, save_checkpoint
    from hybridat.report import build_tables, load_runs
    from hybridat.tables import distance_cell

    save_checkpoint(make("dual-bn"), tmp_path / "m.safetensors", seed=0,
                    train={"eps": 8, "loss": "hybrid", "dataset": "cifar10", "epochs": 1})
    ckpt, (x, y) = load_checkpoint(tmp_path / "m.safetensors"), batch(8)
    settings = {"u": dict(noise="uniform", steps=1), "g": dict(noise="gaussian", steps=1),
                "s": dict(noise="uniform", steps=2), "c": dict(noise="uniform", steps=1, branch="clean"),
                "n": dict(noise="uniform", steps=1, start="normal")}
    done = {k: write_ns_gap(ckpt, x, y, tmp_path / f"{k}.csv", eps=8, fix_ap=False, **s) for k, s in settings.items()}
    for k, s in settings.items():
        assert all((r["noise"], r["steps"], r["step"], r["attack_branch"], r["start"]) ==
                   (s["noise"], s["steps"], 2.0, s.get("branch", "adv"), s.get("start", "uniform"))
                   for r in done[k].rows + done[k].channels)
    table = build_tables(load_runs([tmp_path / f"{k}.csv" for k in settings]))["ns-gap"]
    assert table.training.nunique() == 5  # one part per measurement, none averaged with another
    for k in settings:
        want = [r["distance"] for r in done[k].rows if (r["kind"], r["layer"], r["pair"], r["statistic"],
                r["measure"]) == ("ns", 19, "noise-clean", "mean", "wasserstein")]
        assert distance_cell(pd.Series(want)) in set(table[table.layer == "19"]["own branch: noise-clean mean"])


def test_ns_gap_crafts_in_batches_and_reads_the_ns_without_a_backward_graph(monkeypatch):
    """Memory grows with the PGD batch, not with n: PGD runs batch_size images at a time (same examples as one
    call, the random start drawn for all images at once), and the NS passes keep no autograd graph."""
    import hybridat.attacks as attacks

    model, (x, y) = make("dual-bn"), batch(10)
    whole, _ = ns_gap(model, x, y, eps=8, steps=2, fix_ap=True, batch_size=10)
    sizes, grad_enabled = [], []
    pgd_from = attacks.pgd_from
    monkeypatch.setattr(attacks, "pgd_from", lambda m, xb, *a, **k: sizes.append(len(xb)) or pgd_from(m, xb, *a, **k))
    def record(module, inputs):  # train mode: the NS passes, not PGD's (eval mode)
        if module.training:
            grad_enabled.append(torch.is_grad_enabled())

    norm_layers(model)[0][1].register_forward_pre_hook(record)
    crafted = []
    parts, _ = ns_gap(model, x, y, eps=8, steps=2, fix_ap=True, batch_size=4, on_batch=crafted.append)
    assert sizes == [4, 4, 2] and crafted == [4, 8, 10]  # on_batch: the progress of PGD, the long part
    assert grad_enabled == [False] * 3  # batch_ns' pass per domain (the hook travels into its deep copy)
    assert [r["distance"] for r in parts] == pytest.approx([r["distance"] for r in whole], rel=1e-5, abs=1e-9)
    with pytest.raises(HybridatError, match="batch size"):
        ns_gap(model, x, y, eps=8, batch_size=0)


def test_ns_gap_pgd_starts_where_asked():
    """`start="normal"` crafts the adversarial domain from x + 0.001·N(0, 1), as the authors' NS figures do: its
    examples are `attacks.pgd`'s from that start (seeded like the uniform one), and differ from the uniform start's."""
    from hybridat.attacks import pgd
    from hybridat.models import BranchView

    model, (x, y) = make("dual-bn"), batch(6)
    adv = {s: domain_batches(model, x, y, "adv", 8, steps=2, seed=5, start=s)["adv"] for s in ("uniform", "normal")}
    want = pgd(BranchView(model, "adv"), x, y, 8 / 255, None, 2, start="normal",
               generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(adv["normal"], want, rtol=0, atol=0)
    assert not torch.equal(adv["normal"], adv["uniform"])
    with pytest.raises(HybridatError, match="start"):
        ns_gap(model, x, y, eps=8, steps=1, start="none ")


@pytest.mark.parametrize("kind", ["dual-bn", "torchvision"])
def test_running_reference_compares_like_with_like(kind):
    """Running NS set from the very batch that is measured (the authors' momentum-1 copy, one train-mode pass) lie at
    distance 0 from it: the stored running_var is the batch's unbiased variance, so the batch side of a comparison with
    running NS is the unbiased std too (a biased one put every clean-running std distance at (sqrt(n/(n-1)) - 1) * std,
    3 % of the std at the last layer of a one-image batch)."""
    model = make(kind) if kind != "torchvision" else torchvision_resnet18()
    x, y = batch(2)
    stored = copy.deepcopy(model).train()
    for _, m in measured_layers(stored):
        m.momentum = 1.0
    with torch.no_grad():
        stored(x, "adv") if kind != "torchvision" else stored(x)
    rows, channels = ns_gap(stored.eval(), x, y, eps=8, fix_ap=True, branch="adv", steps=1, reference="running")
    clean = [r for r in rows if r["pair"] == "clean-running"]
    assert len(clean) == 4 * len(measured_layers(model))  # mean and std, two measures each
    assert max(r["distance"] for r in clean) < 1e-5, max(clean, key=lambda r: r["distance"])


def test_fix_ap_routes_every_domain_through_the_chosen_branch():
    """--fix-ap --branch clean: the adversarial examples are crafted through the clean branch and all three domains
    pass through the clean branch's AP; the adv branch would give other NS from layer 1 on."""
    model, (x, y) = make("dual-bn"), batch()
    _, channel_rows = ns_gap(model, x, y, eps=8, fix_ap=True, branch="clean", steps=2, seed=4)
    data = domain_batches(model, x, y, "clean", eps=8, steps=2, seed=4)
    assert not torch.equal(data["adv"], domain_batches(model, x, y, "adv", eps=8, steps=2, seed=4)["adv"])
    for domain in ("clean", "adv", "noise"):
        rows = [r for r in channel_rows if r["domain"] == domain]
        assert all(r["branch"] == "clean" and r["attack_branch"] == "clean" for r in rows)
        means = [torch.tensor([r["mean"] for r in rows if r["layer"] == i]) for i in range(20)]
        for through in ("clean", "adv"):
            same = all(torch.equal(means[i], mean) for i, _, mean, _ in batch_ns(model, data[domain], through))
            assert same == (through == "clean"), (domain, through)


@pytest.mark.parametrize("branch", ["adv", "clean"])
def test_running_reference_of_cross_bn_swap_is_the_set_the_branch_reads(branch):
    """cross-bn-swap's branch reads the other domain's running set in eval mode (`eval_key`): the running
    reference is that set, the one the branch is normalized with, not the branch's own domain's."""
    model = make("cross-bn-swap")
    other = "clean" if branch == "adv" else "adv"
    for i, name, mean, std in running_ns(model, branch):
        layer = norm_layers(model)[i][1]
        assert torch.equal(mean, getattr(layer, f"running_mean_{other}"))
        assert torch.equal(std, getattr(layer, f"running_var_{other}").sqrt())
        assert not torch.equal(mean, getattr(layer, f"running_mean_{branch}"))
