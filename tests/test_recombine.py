"""swap-bn: exact round trips, hand-made exchanges, which sets move, re-estimation on real adversarial data."""

import copy

import pytest
import torch

from hybridat.attacks import pgd
from hybridat.checkpoint import load_checkpoint, save_checkpoint
from hybridat.data import Split, train_batches
from hybridat.errors import HybridatError
from hybridat.models import BranchView, ModelConfig, build_model, norm_layers
from hybridat.norms import AP_PARAMS, BRANCHES, NS_BUFFERS, get_norm, set_name
from hybridat.recombine import cross, deeper_than, recombine, reestimate, save_derived, swap_ap, swap_bn

NS_NAMES = {set_name(base, b) for base in NS_BUFFERS for b in BRANCHES}
AP_NAMES = {set_name(base, b) for base in AP_PARAMS for b in BRANCHES}


@torch.no_grad()
def make(norm: str, seed: int = 0):
    """ResNet-18 at width 1/8 whose every NS and AP set holds different random values; eval mode."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig("resnet18", norm, 0.125))
    g = torch.Generator().manual_seed(seed)
    for _, m in norm_layers(model):
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if name.startswith("num_batches"):
                t.fill_(int(torch.randint(100, 1000, (), generator=g)))
            elif name.startswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:  # running_mean, bias around 0; weight around 1
                t.copy_(0.1 * torch.randn(t.shape, generator=g) + name.startswith("weight"))
    return model.eval()


def inputs(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tiny_split(n: int = 32) -> Split:
    g = torch.Generator().manual_seed(2)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=g))


def exchanged(state: dict, names: set[str]) -> dict:
    """The state dict with every `<base>_adv` <-> `<base>_clean` exchanged among the given attribute names."""
    out = {k: v.clone() for k, v in state.items()}
    for key in state:
        prefix, attr = key.rsplit(".", 1)
        if attr in names and attr.endswith("_adv"):
            partner = f"{prefix}.{attr[:-4]}_clean"
            out[key], out[partner] = state[partner].clone(), state[key].clone()
    return out


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def outputs(model, x):
    with torch.no_grad():
        return {b: model(x, b) for b in BRANCHES}


@pytest.mark.parametrize("norm,op", [("dual-bn", cross), ("cross-bn-swap", cross), ("dual-ns", cross),
                                     ("dual-bn-fixed-ap", cross), ("dual-bn", swap_ap), ("cross-bn-swap", swap_ap),
                                     ("cross-bn", swap_ap),
                                     ("dual-ap", swap_ap), ("gn-dual-ap", swap_ap)])
def test_twice_gives_back_the_original(norm, op):
    model = make(norm)
    before = copy.deepcopy(model.state_dict())
    once = op(model)
    assert not same_state(once, model)
    assert same_state(op(once), model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched


@pytest.mark.parametrize("norm,op,names", [("dual-bn", cross, NS_NAMES), ("cross-bn-swap", cross, NS_NAMES),
                                           ("dual-bn", swap_ap, AP_NAMES), ("gn-dual-ap", swap_ap, AP_NAMES)])
def test_derived_checkpoint_evaluates_like_a_hand_exchange(tmp_path, norm, op, names):
    save_checkpoint(make(norm), tmp_path / "parent.safetensors", run="r")
    parent = load_checkpoint(tmp_path / "parent.safetensors")
    save_derived(parent, op(parent.model), tmp_path / "child.safetensors", {"op": op.__name__})
    child = load_checkpoint(tmp_path / "child.safetensors").model
    by_hand = build_model(parent.config)
    by_hand.load_state_dict(exchanged(parent.model.state_dict(), names))
    assert same_state(child, by_hand)  # every exchanged tensor, the NS counters (num_batches_tracked) too
    x = inputs()
    got, want, old = outputs(child, x), outputs(by_hand.eval(), x), outputs(parent.model, x)
    for b in BRANCHES:
        assert torch.equal(got[b], want[b])
        assert not torch.allclose(got[b], old[b])


@pytest.mark.parametrize("norm,written", [("dual-bn", "adv"), ("cross-bn-swap", "clean")])
def test_taking_a_branchs_ns_means_the_set_it_reads(norm, written):
    """adv takes clean's NS: afterwards adv reads what clean read. Cross-BN's adv reads the clean-domain set."""
    model = make(norm)
    new = recombine(model, ns={"adv": "clean"})
    for (_, old), (_, m) in zip(norm_layers(model), norm_layers(new)):
        assert all(torch.equal(a, b) for a, b in zip(m.running(m.eval_key("adv")), old.running(old.eval_key("clean"))))
        assert not torch.equal(getattr(m, f"running_mean_{written}"), getattr(old, f"running_mean_{written}"))
        kept = "clean" if written == "adv" else "adv"
        assert torch.equal(getattr(m, f"running_mean_{kept}"), getattr(old, f"running_mean_{kept}"))
    x = inputs()
    assert torch.equal(outputs(new, x)["clean"], outputs(model, x)["clean"])
    assert not torch.allclose(outputs(new, x)["adv"], outputs(model, x)["adv"])


def test_layer_restriction_touches_only_the_chosen_layers():
    model = make("dual-bn")
    chosen = deeper_than(model, 12)
    assert chosen == list(range(12, 20))
    new = cross(model, layers=chosen)
    for i, ((_, old), (_, m)) in enumerate(zip(norm_layers(model), norm_layers(new))):
        same = torch.equal(m.running_mean_adv, old.running_mean_adv)
        assert same == (i < 12)
        if i >= 12:
            assert torch.equal(m.running_var_adv, old.running_var_clean)
        assert torch.equal(m.weight_adv, old.weight_adv)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, new.state_dict()[k])}
    assert changed and all(k.rsplit(".", 1)[1] in NS_NAMES for k in changed)


@pytest.mark.parametrize("call,match", [
    (lambda: cross(make("bn")), "no per-branch running NS"),
    (lambda: cross(make("dual-ap")), "no per-branch running NS"),
    (lambda: cross(make("gn-dual-ap")), "no per-branch running NS"),
    (lambda: swap_ap(make("bn")), "no two AP sets"),
    (lambda: swap_ap(make("dual-ns")), "no two AP sets"),
    (lambda: recombine(make("dual-bn"), ns={"adv": "noise"}), "must map branches"),
    (lambda: cross(make("dual-bn"), layers=[20]), "out of range"),
    (lambda: deeper_than(make("dual-bn"), -1), "out of range"),
    (lambda: reestimate(make("dual-bn"), "adv", "blur", tiny_split()), "unknown domain"),
    (lambda: reestimate(make("dual-bn"), "both", "adv", tiny_split()), "unknown branch"),
    (lambda: reestimate(make("gn"), "adv", "clean", tiny_split()), "no running NS"),
])
def test_bad_input_is_one_clear_error(call, match):
    with pytest.raises(HybridatError, match=match):
        call()


def manual_pass(model, x, branch):
    """NS of one train-mode pass with momentum 1: the running sets then hold exactly this batch's statistics."""
    manual = copy.deepcopy(model)
    for _, m in norm_layers(manual):
        m.momentum = 1.0
    with torch.no_grad():
        manual.train()(x, branch)
    return manual


def test_reestimate_runs_the_adversarial_examples_through_the_network():
    model, split, seed = make("dual-bn"), tiny_split(), 5
    kw = dict(batch_size=16, n_batches=1, eps=8, step=2, steps=3, seed=seed)
    on_adv, on_clean = reestimate(model, "adv", "adv", split, **kw), reestimate(model, "adv", "clean", split, **kw)
    x, y = next(train_batches(split, 16, torch.Generator().manual_seed(seed)))
    x_adv = pgd(BranchView(model, "adv"), x, y, 8 / 255, 2 / 255, 3, start="normal",
                generator=torch.Generator().manual_seed(seed))
    gap = 0.0
    for got, clean, want, want_clean in zip(*(norm_layers(m) for m in
                                             (on_adv, on_clean, manual_pass(model, x_adv, "adv"),
                                              manual_pass(model, x, "adv")))):
        torch.testing.assert_close(got[1].running("adv"), want[1].running("adv"))
        torch.testing.assert_close(clean[1].running("adv"), want_clean[1].running("adv"))
        assert got[1].num_batches_tracked_adv.item() == 1
        gap += (got[1].running_mean_adv - clean[1].running_mean_adv).abs().sum().item()
    assert gap > 1e-3  # re-estimating on adv data is not re-estimating on clean data


@pytest.mark.parametrize("norm,branch,domain,target", [
    ("dual-bn", "adv", "adv", "adv"), ("dual-bn", "clean", "noise", "clean"),
    ("cross-bn-swap", "adv", "noise", "clean"),  # cross-bn-swap's adv branch reads the clean-domain set
    ("cross-bn", "adv", "noise", "shared"),  # one running set, read by both branches
    ("bn", "adv", "noise", "shared"), ("dual-ap", "clean", "clean", "shared"),
])
def test_reestimate_changes_only_the_set_the_branch_reads(norm, branch, domain, target):
    model = make(norm)
    new = reestimate(model, branch, domain, tiny_split(), batch_size=8, n_images=24, eps=8, steps=1)
    names = {set_name(base, target) for base in NS_BUFFERS}
    before, after = model.state_dict(), new.state_dict()
    changed = {k.rsplit(".", 1)[1] for k in before if not torch.equal(before[k], after[k])}
    assert changed == names
    layers = norm_layers(new)
    assert all(m.num_batches_tracked if target == "shared" else getattr(m, f"num_batches_tracked_{target}")
               for _, m in layers)
    assert all(m.momentum == 0.1 and not m.training for _, m in layers)
    assert getattr(layers[0][1], set_name("num_batches_tracked", target)).item() == 3  # 24 images / 8


def test_save_derived_records_its_parent_and_never_overwrites_it(tmp_path):
    path = tmp_path / "parent.safetensors"
    save_checkpoint(make("dual-bn"), path, run="r1", seed="3", train={"eps": 8.0}, epoch="2")
    parent, before = load_checkpoint(path), path.read_bytes()
    op = {"op": "recombine", "ns": {"adv": "clean"}, "layers": [1, 2]}
    digest = save_derived(parent, recombine(parent.model, ns={"adv": "clean"}, layers=[1, 2]),
                          tmp_path / "out" / "child.safetensors", op)
    child = load_checkpoint(tmp_path / "out" / "child.safetensors")
    assert child.hash == digest != parent.hash
    assert child.meta("parent") == parent.hash and child.meta("operation") == op
    assert (child.meta("run"), child.meta("seed"), child.meta("train")) == ("r1", 3, {"eps": 8.0})
    for same in (path, tmp_path / "out" / ".." / "parent.safetensors"):
        with pytest.raises(HybridatError, match="is an input"):
            save_derived(parent, cross(parent.model), same, {"op": "cross"})
    assert path.read_bytes() == before
    # a swap-bn of a swap-bn output records the chain, never its last operation alone (report would read "cross of
    # child" as "cross of the trained model")
    save_derived(child, cross(child.model), tmp_path / "grandchild.safetensors", {"op": "cross"})
    grandchild = load_checkpoint(tmp_path / "grandchild.safetensors")
    assert grandchild.meta("operation") == {"op": "cross", "after": op} and grandchild.meta("parent") == child.hash


def test_reestimate_from_a_layer_leaves_the_shallower_layers_alone():
    model, k = make("dual-bn"), 12
    new = reestimate(model, "adv", "noise", tiny_split(), batch_size=8, n_images=16, eps=8,
                     layers=deeper_than(model, k))
    full = reestimate(model, "adv", "noise", tiny_split(), batch_size=8, n_images=16, eps=8)
    for i, ((_, old), (_, m), (_, f)) in enumerate(zip(*(norm_layers(x) for x in (model, new, full)))):
        for key in m.ns_keys:
            same_as = old if i < k or key != "adv" else f  # chosen layers: as the full re-estimate
            assert all(torch.equal(a, b) for a, b in zip(m.running(key), same_as.running(key))), (i, key)
        if i >= k:
            assert not torch.equal(m.running_mean_adv, old.running_mean_adv)


def test_reestimate_reports_its_progress_batch_by_batch():
    """`swap-bn --reestimate adv` crafts PGD-10 on 10,000 training images by default (40 minutes at full width on
    a CPU): the pass says how far it is, 0 first, then after every batch, and the result does not depend on it."""
    model, done = make("dual-bn"), []
    new = reestimate(model, "adv", "adv", tiny_split(10), batch_size=4, steps=1, on_batch=done.append)
    assert done == [0, 4, 8, 10]
    assert same_state(new, reestimate(model, "adv", "adv", tiny_split(10), batch_size=4, steps=1))


@pytest.mark.parametrize("kwargs,op", [
    (dict(cross=True), cross),
    (dict(swap_ap=True), swap_ap),
    (dict(cross=True, from_layer=12), lambda m: cross(m, deeper_than(m, 12))),
    (dict(swap_ap=True, from_layer=12), lambda m: swap_ap(m, deeper_than(m, 12))),
    (dict(ns={"adv": "clean"}, ap={"clean": "adv"}), lambda m: recombine(m, ns={"adv": "clean"}, ap={"clean": "adv"})),
])
def test_swap_bn_writes_the_model_of_the_operation_it_records(tmp_path, kwargs, op):
    """`swap_bn` (what `hybridat swap-bn` runs) writes the very model `cross`, `swap_ap` or `recombine` makes, in the
    layers it records: --swap-ap exchanging the NS instead, or --from-layer ignored, wrote a model whose recorded
    operation is not the one applied."""
    save_checkpoint(make("dual-bn"), tmp_path / "parent.safetensors", run="r")
    parent = load_checkpoint(tmp_path / "parent.safetensors")
    swap_bn(parent, tmp_path / "child.safetensors", **kwargs)
    child = load_checkpoint(tmp_path / "child.safetensors")
    assert same_state(child.model, op(parent.model))
    assert not same_state(child.model, parent.model)


@pytest.mark.parametrize("norm", ["cross-bn", "cross-bn-adv", "cross-bn-swap"])
def test_a_reestimated_cross_bn_model_still_trains_as_its_variant(norm):
    """The pass of `reestimate` normalizes a Cross-BN layer's one-domain rows with their own statistics
    (`train_pass`), and only for the pass: the returned model, in train mode, still normalizes every row with the
    statistics of its variant's domain, as the same weights loaded into a fresh model of the config do."""
    new = reestimate(make(norm), "adv", "noise", tiny_split(), batch_size=8, n_images=8, eps=8, steps=1)
    assert [m.batch_ns for _, m in norm_layers(new)] == [get_norm(norm).batch_ns] * len(norm_layers(new))
    fresh = build_model(new.config)
    fresh.load_state_dict(new.state_dict())
    x = inputs(8)
    with torch.no_grad():
        assert torch.equal(new.train()(x, (4, 4)), fresh.train()(x, (4, 4)))
