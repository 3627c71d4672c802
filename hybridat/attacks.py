"""Adversarial attacks in pixel space: FGSM, PGD (L∞, L2) and AutoAttack through the reference code.

Models map x (B, 3, H, W) float in [0, 1] to logits (B, K); ε and step sizes are in [0, 1] units.
Every attack runs inside `frozen(model)` and so leaves no trace on the model (STYLE habit 4).
"""

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hybridat.errors import HybridatError, check_choice, check_number
from hybridat.graphs import Graphed
from hybridat.inputs import attacked_module, check_batch, check_callback, check_flag, check_label_dtype
from hybridat.models import BranchView, bn_folded
from hybridat.runtime import autocast

STARTS = ("uniform", "normal", "none")
NORMS = {"linf": "Linf", "l2": "L2"}  # our name -> pyautoattack's name
AA_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")  # pyautoattack's names


@contextmanager
def frozen(model: nn.Module):
    """Eval mode and no parameter gradients for the duration; every module's mode and every
    parameter's requires_grad are restored afterwards, also on exceptions. BN buffers stay untouched."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)  # backward then computes input gradients only
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training  # per module: a submodule kept in eval by its owner stays in eval
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def default_step(eps: float) -> float:
    """The evaluation protocol's PGD step: ε/4."""
    return eps / 4


def _check(x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf") -> None:
    """The cheap checks of every attack call (no host sync: the training attack runs inside CUDA graphs)."""
    check_number("eps", eps, 0)
    check_choice(norm, NORMS, "threat-model norm")
    if norm == "linf" and eps > 1:
        raise HybridatError(f"eps is in [0, 1] units here (8/255 = 0.0314 for 8 in pixel units), got {eps}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise HybridatError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise HybridatError(f"expected x (B, C, H, W) and y (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not x.is_floating_point():
        raise HybridatError(f"expected float pixels x in [0, 1], got {x.dtype}")
    check_label_dtype(y)


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1)  # (B, 1, 1, 1)


def _start(x, eps, start, norm, generator):
    """Random start, projected to the ε-ball and [0, 1]."""
    if start == "none":
        return x.clone()
    if start == "normal":  # training protocol: x + 0.001·N(0, 1)
        delta = 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif norm == "linf":  # evaluation protocol: U(-ε, ε) per pixel
        delta = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    else:  # L2: random direction, radius ε·U(0, 1), as torchattacks.PGDL2
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        r = torch.rand((x.shape[0], 1, 1, 1), generator=generator, device=x.device, dtype=x.dtype)
        delta = direction * r / _l2(direction) * eps
    return torch.clamp(x + _project(delta, eps, norm), 0, 1)


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return torch.clamp(delta, min=-eps, max=eps)
    # as torchattacks.PGDL2: scale down to norm ε; clamp_min keeps δ = 0, ε = 0 free of 0/0
    return delta * torch.clamp(eps / _l2(delta).clamp_min(1e-12), max=1.0)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float | None = None,
        steps: int = 10, start: str = "uniform", loss_fn=None, norm: str = "linf",
        generator: torch.Generator | None = None, batch_size: int | None = None,
        on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Projected gradient ascent, Madry et al. 2018 ("Towards Deep Learning Models Resistant to
    Adversarial Attacks"). Threat model: ‖x_adv − x‖_∞ ≤ ε (norm="linf") or ‖·‖_2 ≤ ε per sample
    (norm="l2"), x_adv ∈ [0, 1]. x (B, C, H, W) in [0, 1], y (B,) int labels -> x_adv (B, C, H, W), detached.
    start: "uniform" (evaluation), "normal" (training: x + 0.001·N(0,1)) or "none". loss_fn(logits, y)
    -> scalar to maximize, default CE summed over the batch (so an example's step does not depend on the batch).
    A step is torchattacks.PGD's (PGDL2's) arithmetic. What is exact (tests/test_attacks.py): with torchattacks'
    loss, `loss_fn` = mean CE, the examples are torchattacks.PGD's bit for bit from the same start (start="none",
    or "uniform" drawn from the same global RNG state), and PGDL2's from start="none". With the default summed
    CE (L∞) the gradient is B times the mean's: exactly so for a batch B that is a power of two (bit-identical
    examples again); for another B up to float round-off (within 1e-5 of each sample's largest component), so a
    component within round-off of 0 can take the other sign, and that sample's later iterates can then differ
    (README, Speed: measured counts). batch_size: the iterations run on that many images at a time (None: all of x
    at once), so memory grows with it, not with len(x); the random start is drawn for all of x first, so the
    examples are one call's up to that round-off (`loss_fn` then sees one batch at a time). on_batch(images done so
    far) is called after each batch, for a progress bar. x and y are checked as `robust_accuracy` checks them (one
    host sync)."""
    attacked_module(model)
    check_batch(model, x, y)  # float64 pixels, NaN, label 10, grayscale: torch errors inside, or NaN examples
    if generator is not None and not isinstance(generator, torch.Generator):
        raise HybridatError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return pgd_unchecked(model, x, y, eps, step, steps, start, loss_fn, norm, generator, batch_size, on_batch)


def pgd_unchecked(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float | None = None,
                  steps: int = 10, start: str = "uniform", loss_fn=None, norm: str = "linf",
                  generator: torch.Generator | None = None, batch_size: int | None = None,
                  on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """`pgd` without its checks of the pixels and labels (no host sync): for callers that checked them (the
    training attack, inside CUDA graphs; robust_accuracy, whose bf16 crafting copy of the model differs from x's
    dtype)."""
    attacked_module(model)
    _check(x, y, eps, norm)
    check_callback(loss_fn, "loss_fn")
    check_callback(on_batch, "on_batch")
    check_number("PGD steps", steps, 1, integer=True)
    step = default_step(eps) if step is None else check_number("PGD step size", step, 0)
    check_choice(start, STARTS, "PGD start")
    if batch_size is not None:
        check_number("PGD batch size", batch_size, 1, integer=True)
    x, y = x.detach(), y.detach()
    adv = _start(x, eps, start, norm, generator).detach()  # (B, C, H, W): one draw, whatever the batch size
    size = len(x) if batch_size is None else batch_size
    parts = []
    for lo in range(0, len(x), size):
        parts.append(pgd_from(model, x[lo:lo + size], y[lo:lo + size], adv[lo:lo + size], eps, step, steps, loss_fn,
                              norm))
        if on_batch is not None:
            on_batch(lo + len(parts[-1]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def pgd_from(model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, eps: float, step: float,
             steps: int, loss_fn=None, norm: str = "linf") -> torch.Tensor:
    """PGD's iterations from the starting point `adv` (the part of `pgd` a CUDA graph can hold: no random draws,
    no host syncs). Same arguments and result as `pgd`."""
    loss_fn = partial(F.cross_entropy, reduction="sum") if loss_fn is None else loss_fn
    adv = adv.detach()  # a view: the caller's tensor keeps requires_grad=False
    with frozen(model), torch.enable_grad():  # also callable from inside a caller's no_grad block
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = loss_fn(model(adv), y)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:  # metadata only: no host sync
                got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise HybridatError(f"loss_fn must return one number (a 0-dim tensor: sum or mean over the batch), "
                                    f"got {got}")
            grad = torch.autograd.grad(loss, adv)[0]
            if norm == "linf":  # torchattacks.PGD's arithmetic
                adv = adv.detach() + step * grad.sign()
            else:  # torchattacks.PGDL2's arithmetic
                adv = adv.detach() + step * (grad / (_l2(grad) + 1e-10))
            delta = _project(adv - x, eps, norm)
            adv = torch.clamp(x + delta, min=0, max=1).detach()
    return adv


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method, Goodfellow et al. 2015 ("Explaining and Harnessing Adversarial
    Examples"): x + ε·sign(∇ CE), clipped to [0, 1]. Threat model L∞. x (B, C, H, W), y (B,) -> (B, C, H, W)."""
    return pgd(model, x, y, eps, step=eps, steps=1, start="none")


def _fgsm_unchecked(model, x, y, eps):
    return pgd_unchecked(model, x, y, eps, step=eps, steps=1, start="none")


UNTARGETED = ("apgd-ce", "apgd-dlr", "fab")  # the attacks whose restarts AutoAttack's versions set


@dataclass(frozen=True)
class AASettings:
    """What one AutoAttack run runs: `attacks` in order, `restarts` of each untargeted attack (APGD-CE,
    APGD-DLR, FAB) and APGD's `eot_iter` (EOT gradient samples). Fixed in every version of the reference code
    (L∞, L2), so not recorded: APGD 100 iterations; APGD-T and FAB-T 1 restart for each of 9 target classes;
    Square 5,000 queries, 1 restart."""
    attacks: tuple[str, ...]
    restarts: int = 1
    eot_iter: int = 1

    @property
    def version(self) -> str:
        """The reference version with exactly these settings, else "custom"."""
        return next((v for v, s in AA_VERSIONS.items() if s == self), "custom")

    @property
    def name(self) -> str:
        """The `attack` of an eval row: "autoattack" is the standard version only."""
        return {"standard": "autoattack"}.get(self.version, f"autoattack-{self.version}")

    def columns(self) -> dict:
        """The eval row's record of what ran."""
        return {"aa_attacks": ",".join(self.attacks), "aa_restarts": self.restarts, "aa_eot_iter": self.eot_iter}


AA_VERSIONS = {  # as pyautoattack's AutoAttack._set_version sets them for L∞ and L2
    "standard": AASettings(("apgd-ce", "apgd-t", "fab-t", "square"), restarts=1),
    "plus": AASettings(("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"), restarts=5),
    "rand": AASettings(("apgd-ce", "apgd-dlr"), restarts=1, eot_iter=20),
}


def aa_settings(version: str | None = None, attacks: str | list[str] | tuple[str, ...] | None = None,
                restarts: int | None = None) -> AASettings:
    """What AutoAttack runs, from a version (default "standard"), or a list of attacks (a comma-separated string
    or a sequence, run in that order) with `restarts` (default 1, the standard version's). Settings that
    contradict each other are refused, never silently overridden."""
    if version is not None:
        check_choice(version, AA_VERSIONS, "AutoAttack version")
    if restarts is not None:
        check_number("AutoAttack restarts", restarts, 1, 1000, integer=True)
    if attacks is None:
        chosen = AA_VERSIONS[version or "standard"]
        if restarts is None or restarts == chosen.restarts:
            return chosen
        if version is not None:
            raise HybridatError(f"AutoAttack version {version!r} runs {chosen.restarts} restart(s), not {restarts}; "
                                "give a version or the restarts (with a list of attacks), not both")
        attacks = chosen.attacks
    if not isinstance(attacks, (str, list, tuple)):  # 5: "'int' object is not iterable"
        raise HybridatError(f"AutoAttack attacks must be a comma-separated str or a list of names, got "
                            f"{type(attacks).__name__}")
    names = tuple(a.strip() for a in attacks.split(",")) if isinstance(attacks, str) else tuple(attacks)
    if not names or names == ("",):
        raise HybridatError(f"no AutoAttack attacks given; name one or more of: {', '.join(AA_ATTACKS)}")
    for a in names:
        check_choice(a, AA_ATTACKS, "AutoAttack attack")
    if len(set(names)) < len(names):
        raise HybridatError(f"an AutoAttack attack is named twice in {','.join(names)}")
    if version is not None:
        chosen = AA_VERSIONS[version]
        if names != chosen.attacks or (restarts or chosen.restarts) != chosen.restarts:
            raise HybridatError(f"AutoAttack version {version!r} runs {','.join(chosen.attacks)} with "
                                f"{chosen.restarts} restart(s); give a version or a list of attacks, not both")
        return chosen
    if restarts is not None and not set(names) & set(UNTARGETED):
        raise HybridatError(f"AutoAttack restarts apply to {', '.join(UNTARGETED)}, none of which is in "
                            f"{','.join(names)} (apgd-t and fab-t run 1 restart per target class, square 1)")
    restarts = 1 if restarts is None else restarts
    if restarts > 1 and "fab" in names and "fab-t" in names and names.index("fab-t") < names.index("fab"):
        raise HybridatError("pyautoattack runs fab with 1 restart once fab-t has run; list fab before fab-t")
    return AASettings(names, restarts)


def _reference_settings(aa) -> AASettings:
    """What a pyautoattack.AutoAttack object is set to run, read back from it (for what AASettings records);
    refused if a setting that AASettings takes as fixed differs (another version of the reference code)."""
    fixed = dict(apgd_iter=aa.apgd.n_iter, apgdt_iter=aa.apgd_targeted.n_iter,
                 apgdt_restarts=aa.apgd_targeted.n_restarts, apgdt_targets=aa.apgd_targeted.n_target_classes,
                 fab_targets=aa.fab.n_target_classes, square_queries=aa.square.n_queries,
                 square_restarts=aa.square.n_restarts)
    if fixed != dict(apgd_iter=100, apgdt_iter=100, apgdt_restarts=1, apgdt_targets=9, fab_targets=9,
                     square_queries=5000, square_restarts=1):
        raise HybridatError(f"this pyautoattack sets {fixed}, not the reference settings hybridat records")
    attacks = tuple(aa.attacks_to_run)
    fab_restarts = aa.fab.n_restarts if "fab" in attacks else None
    apgd_restarts = aa.apgd.n_restarts if {"apgd-ce", "apgd-dlr"} & set(attacks) else None
    restarts = {r for r in (fab_restarts, apgd_restarts) if r is not None} or {1}
    if len(restarts) > 1:
        raise HybridatError(f"this pyautoattack runs APGD with {apgd_restarts} and FAB with {fab_restarts} restarts")
    return AASettings(attacks, restarts.pop(), aa.apgd.eot_iter)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str | None = None,
               batch_size: int = 500, seed: int = 0, device: torch.device | str | None = None,
               attacks: str | list[str] | None = None, restarts: int | None = None, norm: str = "linf",
               quiet: bool = True) -> torch.Tensor:
    """AutoAttack, Croce & Hein 2020 ("Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks"), through the reference implementation (pyautoattack). What runs is
    `aa_settings(version, attacks, restarts)`: by default the standard version (APGD-CE, APGD-T, FAB-T, Square);
    a list of attacks (e.g. ["apgd-ce"]) runs with 1 restart unless `restarts` says otherwise (the reference's
    own custom mode would silently run 5). Threat model L∞ (or L2) ball of radius ε, [0, 1]. x (B, C, H, W),
    y (B,) -> x_adv (B, C, H, W) on x's device. The caller's global RNG state is left as it was (the reference
    code reseeds it)."""
    import pyautoattack  # imported here: only evaluation needs it

    _check(x, y, eps, norm)
    settings = aa_settings(version, attacks, restarts)
    device = torch.device(x.device if device is None else device)
    rng_devices = [device] if device.type == "cuda" else []
    logger = logging.getLogger("auto-attack")
    level = logger.level
    if quiet:  # its sanity-check warnings come once per batch and per attack
        logger.setLevel(logging.ERROR)
    try:
        with frozen(model), torch.random.fork_rng(devices=rng_devices):
            custom = settings.version == "custom"
            aa = pyautoattack.AutoAttack(model, attacks=list(settings.attacks) if custom else None, device=device,
                                         eps=eps, norm=NORMS[norm], seed=seed, version=settings.version)
            if custom:  # the reference's custom mode starts from 5 restarts for APGD and FAB
                aa.apgd.n_restarts = aa.fab.n_restarts = settings.restarts
                aa.apgd.eot_iter = settings.eot_iter
            reference = _reference_settings(aa)
            if reference != settings:
                raise HybridatError(f"pyautoattack was set to run {reference}, not {settings}")
            x_adv, _ = aa.run_standard_evaluation(x.detach(), y.detach(), batch_size=batch_size)
    finally:
        logger.setLevel(level)
    return x_adv.detach()


# Uniform signature (model, x, y, eps, step, steps, seed) -> x_adv; step/steps ignored where they do not apply.
def _clean(model, x, y, eps, step, steps, seed):
    return x


def _fgsm(model, x, y, eps, step, steps, seed):
    return _fgsm_unchecked(model, x, y, eps)  # robust_accuracy checked x and y


def _pgd(model, x, y, eps, step, steps, seed):  # evaluation protocol: uniform start, step ε/4 by default
    return pgd_unchecked(model, x, y, eps, step, steps, start="uniform",
                         generator=torch.Generator(x.device).manual_seed(seed))


def _autoattack(model, x, y, eps, step, steps, seed):
    return autoattack(model, x, y, eps, seed=seed)


ATTACKS = {"clean": _clean, "fgsm": _fgsm, "pgd": _pgd, "autoattack": _autoattack}


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, eps: float,
                    step: float | None = None, steps: int = 10, batch_size: int = 500, seed: int = 0,
                    aa_version: str | None = None, aa_attacks: str | list[str] | None = None,
                    aa_restarts: int | None = None, graphs: bool = True, amp: bool = False,
                    on_batch: Callable[[int], None] | None = None) -> float:
    """Fraction of x classified correctly after `attack` (a key of ATTACKS), in eval mode. Attacks run
    batch by batch (batch i seeded with seed + i); AutoAttack (`aa_settings(aa_version, aa_attacks,
    aa_restarts)`) gets all of x and batches itself.
    graphs: PGD on a GPU runs each full batch as one CUDA graph (`pgd_accuracy`), with the same numbers.
    amp: FGSM and PGD craft their examples in bf16 (`crafting`); the accuracy is counted in fp32 on `model`.
    on_batch(images done so far) is called after each batch, for a progress bar (no host sync; AutoAttack: once, at
    the end)."""
    check_choice(attack, ATTACKS, "attack")
    if attack != "autoattack" and (aa_version, aa_attacks, aa_restarts) != (None, None, None):  # as evaluate
        raise HybridatError(f"AutoAttack settings (aa_version, aa_attacks, aa_restarts) were given, but the attack "
                            f"is {attack!r}")
    attacked_module(model)
    check_batch(model, x, y)  # pixels in [0, 1], one integer label per image, all on the model's device
    _check(x, y, eps)
    check_callback(on_batch, "on_batch")
    check_number("seed", seed, 0, 2**63 - 1, integer=True)  # 2.5: torch's RuntimeError from manual_seed
    check_flag(graphs, "graphs")
    check_flag(amp, "amp")
    check_number("PGD steps", steps, 1, integer=True)
    check_number("batch size", batch_size, 1, integer=True)
    amp = amp and attack in AMP_ATTACKS
    if attack == "pgd" and graphs and x.device.type == "cuda":
        step = default_step(eps) if step is None else step
        return pgd_accuracy(model, x, y, eps, step, steps, batch_size, seed, capture=True, amp=amp,
                            on_batch=on_batch).item() / len(x)
    with crafting(model, x.device, amp) as net:
        x_aa = None
        if attack == "autoattack":
            x_aa = autoattack(model, x, y, eps, version=aa_version, batch_size=batch_size, seed=seed,
                              attacks=aa_attacks, restarts=aa_restarts)
        correct = torch.zeros((), dtype=torch.long, device=x.device)
        for i, lo in enumerate(range(0, x.shape[0], batch_size)):
            xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
            if x_aa is not None:
                x_adv = x_aa[lo:lo + batch_size]
            else:
                with autocast(x.device, amp):
                    x_adv = ATTACKS[attack](net, xb, yb, eps, step, steps, seed + i)
            correct += _count_correct(model, x_adv, yb)
            if on_batch is not None:
                on_batch(lo + len(yb))
    return correct.item() / x.shape[0]  # the one host sync


AMP_ATTACKS = ("fgsm", "pgd")  # the attacks `amp` applies to; AutoAttack runs the reference code as it is


@contextmanager
def crafting(model: nn.Module, device: torch.device, amp: bool):
    """The network an attack's gradients go through: `model` itself, or with amp a bf16 version of it, as the
    training attack crafts (`hybridat train --amp`): under bf16 autocast (`runtime.autocast`, which the caller
    enters around the attack), and for a hybridat model seen through a branch (BranchView) a copy of it with
    every norm that follows a convolution folded into that convolution in bf16 (`models.bn_folded`): the same
    function, fewer passes. `model` itself is never changed, so the accuracy is counted on it in fp32."""
    if not amp:
        yield model
        return
    if device.type not in ("cuda", "cpu"):
        raise HybridatError(f"bf16 attacks run on CUDA and CPU, not on {device.type}")
    if not isinstance(model, BranchView):
        yield model
        return
    net = BranchView(copy.deepcopy(model.model), model.branch)
    with bn_folded(net.model, net.branch, torch.bfloat16):
        yield net


def _count_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with frozen(model), torch.no_grad():
        return (model(x).argmax(dim=1) == y).sum()


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
                 batch_size: int, seed: int, capture: bool, amp: bool = False,
                 on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """How many of x stay correct under L∞ PGD (evaluation protocol), as `robust_accuracy(..., "pgd", amp=amp)`
    counts them, with every full batch's iterations and count replayed as one CUDA graph (capture=True; graphs.py).

    The random start of batch i is drawn eagerly from its own generator seeded seed + i, and the graph holds the
    rest, so the numbers are the eager path's. The first full batch runs eagerly (warm-up), and so does a last,
    smaller batch. capture=False calls the step function in place of replays (the CPU stand-in)."""
    correct = torch.zeros((), dtype=torch.long, device=x.device)

    def attack_and_count(xb, yb, start):
        with autocast(x.device, amp):
            x_adv = pgd_from(net, xb, yb, start, eps, step, steps)
        correct.add_(_count_correct(model, x_adv, yb))

    graph = Graphed(lambda: attack_and_count(**graph.static), capture)
    with crafting(model, x.device, amp) as net:
        for i, lo in enumerate(range(0, x.shape[0], batch_size)):
            xb, yb = x[lo:lo + batch_size].detach(), y[lo:lo + batch_size]
            start = _start(xb, eps, "uniform", "linf", torch.Generator(x.device).manual_seed(seed + i))
            if len(yb) != batch_size:
                attack_and_count(xb, yb, start)
            else:
                graph.run(xb=xb, yb=yb, start=start)
            if on_batch is not None:
                on_batch(lo + len(yb))
    return correct
