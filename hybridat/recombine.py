"""Test-time recombination of a two-branch model's norm layers (SPEC.md "Test-time recombination", `swap-bn`).

A branch's NS is the running set it reads in eval (`eval_key`): its own domain's set, or for cross-bn-swap the
other domain's. So "adv takes clean's NS" always means: afterwards the adv branch reads the statistics the clean
branch read before, whatever the variant. Every function returns a new model (a deep copy); the input is never changed.
Layer indices are positions in `norm_layers(model)` (depth order).
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Iterable

import torch

from .analysis import DOMAINS, check_choice, perturb, train_pass
from .checkpoint import Checkpoint, check_checkpoint_name, save_checkpoint
from .data import Split, train_batches
from .files import check_outputs
from .errors import HybridatError, check_number
from .inputs import check_callback, check_flag, check_pixel_radius, check_split, layer_indices, model_classes, module_of
from .models import BranchView, norm_layers
from .norms import AP_PARAMS, BRANCHES, NS_BUFFERS, BranchBatchNorm, set_name

SWAP = {"adv": "clean", "clean": "adv"}
PARENT_ONLY = ("format", "config", "versions", "operation", "parent")  # header keys a derived file writes anew


def _norm(model) -> str:
    return getattr(getattr(model, "config", None), "norm", "given")


def _mapping(mapping: dict | None, what: str) -> dict[str, str]:
    """target branch -> source branch for both branches; a branch left out keeps its own set."""
    if mapping is not None and not isinstance(mapping, dict):
        raise HybridatError(f"{what} must be a dict target branch -> source branch, e.g. {{'adv': 'clean'}}, got "
                            f"{mapping!r}")
    mapping = dict(mapping or {})
    for target, source in mapping.items():
        if target not in BRANCHES or source not in BRANCHES:
            raise HybridatError(f"{what} mapping {mapping} must map branches ({', '.join(BRANCHES)}) to branches")
    return {b: mapping.get(b, b) for b in BRANCHES}


def _branched(model, what: str):
    """The hybridat model behind `model` (`module_of`); one line for any other module, which has no branch norm
    layers (a torchvision ResNet came back from `cross` as an unchanged copy)."""
    model = module_of(model)
    if not norm_layers(model):
        raise HybridatError(f"{type(model).__module__}.{type(model).__qualname__} is not a hybridat model (no branch "
                            f"norm layers), so it has no branches to {what}; `hybridat import` "
                            "(hybridat.import_checkpoint) turns a foreign checkpoint into one")
    return model


def deeper_than(model, k: int) -> list[int]:
    """Indices of the norm layers at depth >= k (k counts in `norm_layers` order, from 0)."""
    check_number("layer index", k, integer=True)
    n = len(norm_layers(module_of(model)))
    if not 0 <= k < n:
        raise HybridatError(f"layer index {k} is out of range: the model has {n} norm layers (0 to {n - 1})")
    return list(range(k, n))


def _chosen(model, layers: Iterable[int] | None) -> list[tuple[int, str, torch.nn.Module]]:
    all_layers = norm_layers(model)
    if layers is None:
        return [(i, name, m) for i, (name, m) in enumerate(all_layers)]
    out = []
    for i in sorted(set(layer_indices(layers))):
        if not (isinstance(i, int) and 0 <= i < len(all_layers)):
            raise HybridatError(f"layer index {i} is out of range: the model has {len(all_layers)} norm layers "
                                f"(0 to {len(all_layers) - 1})")
        out.append((i, *all_layers[i]))
    return out


@torch.no_grad()
def _move(layer, bases: tuple[str, ...], mapping: dict[str, str], key_of) -> None:
    """Tensor set read by branch b := the old set read by branch mapping[b], for every base name."""
    old = {(base, b): getattr(layer, set_name(base, key_of(b))).clone() for base in bases for b in BRANCHES}
    for target, source in mapping.items():
        for base in bases:
            getattr(layer, set_name(base, key_of(target))).copy_(old[(base, source)])


def recombine(model, ns: dict | None = None, ap: dict | None = None, layers: Iterable[int] | None = None):
    """A copy in which branch b reads the running NS of branch ns[b] and the AP of branch ap[b] (branches left out
    keep their own), in the norm layers `layers` (indices; None = all, see `deeper_than`). Needs two NS sets per
    chosen layer when ns moves anything and two AP sets when ap does. A loaded Checkpoint may stand for the model
    (its model is copied; `save_derived` writes the result)."""
    model = _branched(model, "move NS or AP between")
    ns, ap = _mapping(ns, "ns"), _mapping(ap, "ap")
    new = copy.deepcopy(model)
    for index, name, layer in _chosen(new, layers):
        if any(s != t for t, s in ns.items()):
            if not (isinstance(layer, BranchBatchNorm) and len(layer.ns_keys) == 2):
                raise HybridatError(f"the {_norm(model)} model has no per-branch running NS at layer {index} "
                                    f"({name}), so a branch cannot take the other branch's NS")
            _move(layer, NS_BUFFERS, ns, layer.eval_key)
        if any(s != t for t, s in ap.items()):
            if len(layer.ap_keys) != 2:
                raise HybridatError(f"the {_norm(model)} model has no two AP sets at layer {index} ({name}), "
                                    "so a branch cannot take the other branch's AP")
            _move(layer, AP_PARAMS, ap, layer.ap_key)
    return new


def cross(model, layers: Iterable[int] | None = None):
    """Each branch keeps its AP and takes the running NS the other branch used (`--cross`)."""
    return recombine(model, ns=SWAP, layers=layers)


def swap_ap(model, layers: Iterable[int] | None = None):
    """Each branch keeps its running NS and takes the other branch's AP (`--swap-ap`)."""
    return recombine(model, ap=SWAP, layers=layers)


@torch.no_grad()
def _reset(layer: BranchBatchNorm, key: str) -> None:
    mean, var = layer.running(key)
    mean.zero_()
    var.fill_(1.0)
    getattr(layer, set_name("num_batches_tracked", key)).zero_()


@torch.no_grad()
def _copy_set(dst: BranchBatchNorm, dst_key: str, src: BranchBatchNorm, src_key: str) -> None:
    for base in NS_BUFFERS:
        getattr(dst, set_name(base, dst_key)).copy_(getattr(src, set_name(base, src_key)))


# the attack settings each --reestimate domain reads (the others it would ignore)
DOMAIN_USES = {"clean": (), "noise": ("eps",), "adv": ("eps", "step", "steps")}


def _is_default(value, default) -> bool:
    """Whether `value` is `default` (8 for 8.0; never NaN, True for 1 or "adv" for a list)."""
    if value is default:
        return True
    numbers = (int, float)
    if isinstance(default, numbers) and not isinstance(default, bool):
        return isinstance(value, numbers) and not isinstance(value, bool) and value == default
    return type(value) is type(default) and value == default


def check_reestimate(branch: str, domain: str, *, eps: float = 8.0, step: float = 2.0, steps: int = 10,
                     batch_size: int = 128, seed: int = 0, n_images: int | None = None,
                     given: Iterable[str] = ()) -> None:
    """Every setting of `reestimate` checked (one line for the first bad one), before any model or data is read.
    given: the names of eps, step and steps a user set explicitly; one the domain does not read is refused, rather
    than silently ignored (`--reestimate clean --eps 4` measured nothing at ε=4)."""
    check_choice(branch, BRANCHES, "branch")
    check_choice(domain, DOMAINS, "domain")
    unused = [name for name in given if name in DOMAIN_USES["adv"] and name not in DOMAIN_USES[domain]]
    if unused:
        why = {"clean": "clean images take no ε or PGD settings",
               "noise": "it reads --eps only (--step and --steps are adv's PGD settings)"}[domain]
        raise HybridatError(f"{', '.join(f'--{name}' for name in unused)} {'does' if len(unused) == 1 else 'do'} "
                            f"not apply to --reestimate {domain}: {why}")
    check_pixel_radius(eps)
    check_pixel_radius(step, "step", low_open=True)  # a step of 0: PGD never leaves its start
    check_number("PGD steps", steps, 1, 100_000, integer=True)
    check_number("batch size", batch_size, 1, 1 << 20, integer=True)
    check_number("seed", seed, 0, 2**63 - 1, integer=True)
    if n_images is not None:
        check_number("n", n_images, 1, integer=True)


def reestimate(model, branch: str, domain: str, split: Split, *, batch_size: int = 128, n_batches: int | None = None,
               n_images: int | None = None, eps: float = 8.0, step: float = 2.0, steps: int = 10, seed: int = 0,
               augment_data: bool = True, attack_branch: str | None = None, layers: Iterable[int] | None = None,
               on_batch: Callable[[int], None] | None = None):
    """A copy whose `branch` reads running NS recomputed from one pass over `domain` data of `split`.

    The pass draws training batches (seed: order, augmentation and attack noise; the first n_images, at most
    n_batches batches) and moves each into the domain (adv: PGD as in training, start x + 0.001·N(0,1), through
    `attack_branch` (default `branch`) of the INPUT model in eval mode; noise: x + U(-ε, ε) clipped to [0, 1]; eps,
    step in pixel units). The result then goes through `branch` in train mode, and the branch's running set becomes
    the cumulative average of the batch statistics (momentum None). Only that set changes, AP and every other buffer
    stay bit-identical. In a shared-NS model (bn, bn-mix, dual-ap, ...) that set is the one both branches read
    (cross-bn and cross-bn-adv too). In cross-bn-swap the set the branch reads (the other domain's) is the one
    refilled, from rows normalized by their own batch statistics (see `train_pass`). `layers` (indices, see
    `deeper_than`; None = all): only those layers' sets are re-estimated, every other layer keeps its running NS
    bit-identical (the pass still uses batch statistics everywhere, as training does). on_batch(images done so far)
    follows the pass: 0, then after each batch.
    """
    check_reestimate(branch, domain, eps=eps, step=step, steps=steps, batch_size=batch_size, seed=seed)
    check_callback(on_batch, "on_batch")
    check_flag(augment_data, "augment_data")
    if isinstance(model, BranchView):  # it takes x only: the pass through `branch` ended in a TypeError
        raise HybridatError("reestimate takes the two-branch model, not a BranchView of one: pass view.model")
    model = _branched(model, "re-estimate the running NS of")
    check_split(model, split, "hybridat.data.load_split(..., train=True)", model_classes(model))
    attack_branch = check_choice(attack_branch or branch, BRANCHES, "attack branch")
    if n_batches is not None:  # NaN passed `n_batches < 1` and meant every batch; "3" ended in a TypeError
        check_number("n_batches", n_batches, 1, integer=True)
    new = copy.deepcopy(model)
    chosen = {i for i, _, _ in _chosen(new, layers)}
    pairs = [(m, o) for i, ((_, m), (_, o)) in enumerate(zip(norm_layers(new), norm_layers(model)))
             if isinstance(m, BranchBatchNorm) and i in chosen]
    if not pairs:
        raise HybridatError(f"the {_norm(model)} model has no running NS to re-estimate")
    momenta = [m.momentum for m, _ in pairs]
    for m, _ in pairs:
        m.momentum = None  # _update then averages: momentum 1/num_batches_tracked
        _reset(m, m.ns_key(branch))
    data = split.subset(n_images) if n_images is not None else split
    generator = torch.Generator(device=split.images.device).manual_seed(seed)
    batches = train_batches(data, batch_size, torch.Generator().manual_seed(seed), augment_data)
    done = 0
    if on_batch is not None:
        on_batch(done)
    for i, (x, y) in enumerate(batches):
        if n_batches is not None and i >= n_batches:
            break
        x = perturb(model, x, y, domain, attack_branch, eps, step=step, steps=steps, start="normal",
                    generator=generator)
        with train_pass(new), torch.no_grad():
            new(x, branch)
        done += len(y)
        if on_batch is not None:
            on_batch(done)
    for i, ((_, m), (_, original)) in enumerate(zip(norm_layers(new), norm_layers(model))):
        if isinstance(m, BranchBatchNorm) and i not in chosen:  # not chosen: as before the pass
            for key in m.ns_keys:
                _copy_set(m, key, original, key)
    for (m, original), momentum in zip(pairs, momenta):
        m.momentum = momentum
        source, target = m.ns_key(branch), m.eval_key(branch)
        if source != target:  # cross-bn-swap: the rows updated their own domain's set; the branch reads the other
            _copy_set(m, target, m, source)
            _copy_set(m, source, original, source)
    return new


def save_derived(ckpt: Checkpoint, new_model, out_path, operation: dict) -> str:
    """Write `new_model` as a new checkpoint recording `operation` (JSON; of a derived parent, with the parent's
    operation under "after") and `parent` (the parent's hash), with the parent's other metadata (run, seed, train,
    ...); returns the new file's hash. Never writes over the input."""
    out, = check_outputs([out_path], [ckpt.path])
    ckpt.check_unchanged()  # the new file records the parent's hash as its parent
    if getattr(new_model, "config", None) != ckpt.config:
        raise HybridatError("the derived model's config differs from its parent's")
    meta = {k: v for k, v in ckpt.header.items() if k not in PARENT_ONLY}
    operation = dict(operation)
    if ckpt.meta("operation"):  # a derived parent: the chain is recorded (its operation, and so on up), so that
        operation["after"] = ckpt.meta("operation")  # report never reads a chain as one operation on a trained model
    return save_checkpoint(new_model, out, **meta, operation=operation, parent=ckpt.hash)


_reestimate = reestimate  # swap_bn's argument `reestimate` (the domain) shadows the function


def swap_bn(ckpt: Checkpoint, out, *, cross: bool = False, swap_ap: bool = False, ns: dict | None = None,
            ap: dict | None = None, from_layer: int | None = None, reestimate: str | None = None,
            split: Split | None = None, branch: str = "adv", n_images: int = 10000, eps: float = 8.0,
            step: float = 2.0, steps: int = 10, batch_size: int = 128, seed: int = 0,
            on_batch: Callable[[int], None] | None = None) -> str:
    """What `hybridat swap-bn` does with a loaded checkpoint (two-branch but for `reestimate`, which takes any with
    batch norms): exactly one of `cross`, `swap_ap`, `ns`/`ap` (target branch -> source branch,
    e.g. {"adv": "clean"}) or `reestimate` (a domain: `branch`'s running NS recomputed on `split`, a training split on
    the checkpoint's device; see `reestimate` for the rest), in the norm layers from `from_layer` on (None: all);
    writes the NEW checkpoint `out` recording the operation as `report` reads it and the parent's hash
    (`save_derived`), never over its input. Returns the new file's hash. on_batch: see `reestimate`."""
    check_flag(cross, "cross")
    check_flag(swap_ap, "swap_ap")
    chosen = [name for name, on in [("cross", cross), ("swap_ap", swap_ap), ("ns/ap", ns or ap),
                                    ("reestimate", reestimate is not None)] if on]
    if len(chosen) != 1:
        raise HybridatError("give exactly one of cross, swap_ap, ns/ap, reestimate")
    if not isinstance(ckpt, Checkpoint):
        raise HybridatError(f"ckpt must be a hybridat Checkpoint (hybridat.load_checkpoint(path)), got "
                            f"{type(ckpt).__name__}")
    if reestimate is None:  # as the command refuses --eps without --reestimate: swap_bn(cross=True, eps=nan) was ok
        settings = {"split": split, "branch": branch, "n_images": n_images, "eps": eps, "step": step, "steps": steps,
                    "batch_size": batch_size, "seed": seed}  # on_batch: a progress bar with nothing to follow
        defaults = inspect.signature(swap_bn).parameters
        given = [k for k, v in settings.items() if not _is_default(v, defaults[k].default)]
        if given:
            raise HybridatError(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to reestimate; "
                                f"{chosen[0]} does not use {'them' if len(given) > 1 else 'it'}")
    else:
        check_reestimate(branch, reestimate, eps=eps, step=step, steps=steps, batch_size=batch_size, seed=seed,
                         n_images=n_images)
        if split is None:
            raise HybridatError("reestimate needs split: the training split (hybridat.data.load_split(dataset, "
                                "train=True, device=...))")
    out, = check_outputs([out], [ckpt.path])
    check_checkpoint_name(out)
    ckpt.check_unchanged()  # the new file records the parent's hash
    layers = None if from_layer is None else deeper_than(ckpt.model, from_layer)
    op = {"op": {"swap_ap": "swap-ap", "ns/ap": "recombine"}.get(chosen[0], chosen[0]), "layers": layers}
    if cross:
        new = recombine(ckpt.model, ns=SWAP, layers=layers)
    elif swap_ap:
        new = recombine(ckpt.model, ap=SWAP, layers=layers)
    elif reestimate is None:
        new = recombine(ckpt.model, ns=ns, ap=ap, layers=layers)
        op |= {"ns": dict(ns or {}), "ap": dict(ap or {})}  # as given
    else:
        new = _reestimate(ckpt.model, branch, reestimate, split, batch_size=batch_size,
                           n_images=n_images, eps=eps, step=step, steps=steps, seed=seed, layers=layers,
                           on_batch=on_batch)
        op |= {"branch": branch, "domain": reestimate, "n_images": n_images, "eps": eps, "seed": seed}
        if reestimate == "adv":
            op |= {"step": step, "steps": steps}
    return save_derived(ckpt, new, out, {k: v for k, v in op.items() if v is not None})
