"""Per-branch robustness evaluation of a checkpoint: one tidy row per (branch, attack, steps)."""

from __future__ import annotations

import time
from typing import Callable

from .attacks import AA_VERSIONS, AMP_ATTACKS, ATTACKS, AASettings, aa_settings, robust_accuracy
from .checkpoint import Checkpoint, training_columns
from .data import Split, to_float
from .errors import HybridatError, check_choice, check_number
from .inputs import check_callback, check_flag, check_pixel_radius, check_split
from .models import BranchView
from .norms import BRANCHES, NORMS

# every `attack` an eval row holds: AutoAttack's is "autoattack" for the standard version only (AASettings.name)
ROW_ATTACKS = (*ATTACKS, *(f"autoattack-{v}" for v in [*AA_VERSIONS, "custom"] if v != "standard"))
AA_COMPONENTS = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square",
                 "apgd-dlr": "APGD-DLR", "fab": "FAB"}  # AutoAttack's attacks as the literature names them


def attack_label(attack: str, steps: int | None, aa_attacks: str = "", aa_restarts: int | None = None,
                 precision: str = "fp32") -> str:
    """Column name in tables: clean, FGSM, PGD-10, AA (the standard version only), AA-plus, AA-rand; any other
    AutoAttack run says what ran: one attack by its name ("APGD-CE"), several as "AA(apgd-ce,square)", and
    restarts other than 1 after it ("APGD-CE (5 restarts)"). Examples crafted in bf16 (`attack --amp`) say so:
    "PGD-10 (bf16)", never the fp32 attack's column."""
    label = _attack_name(attack, steps, aa_attacks, aa_restarts)
    return label if precision == "fp32" else f"{label} ({precision})"


def _attack_name(attack: str, steps: int | None, aa_attacks: str, aa_restarts: int | None) -> str:
    if attack == "autoattack-custom" and aa_attacks:
        names = aa_attacks.split(",")
        label = AA_COMPONENTS.get(names[0], names[0]) if len(names) == 1 else f"AA({aa_attacks})"
        known = aa_restarts is not None and aa_restarts == aa_restarts  # NaN: not recorded
        return f"{label} ({aa_restarts:g} restarts)" if known and aa_restarts != 1 else label
    if attack.startswith("autoattack-"):
        return "AA-" + attack.removeprefix("autoattack-")
    return {"clean": "clean", "fgsm": "FGSM", "autoattack": "AA"}.get(attack, f"PGD-{steps}")


def aa_columns(attack: str) -> dict:
    """The AutoAttack columns of a row written before they existed: what its `attack` ran then (rows of
    "autoattack", "autoattack-plus", "autoattack-rand"); {} for any other attack."""
    version = {"autoattack": "standard"}.get(attack, attack.removeprefix("autoattack-"))
    return AA_VERSIONS[version].columns() if version in AA_VERSIONS else {}


def attack_plan(attacks: list[str], steps: list[int]) -> list[tuple[str, int | None]]:
    """(attack, steps) pairs: PGD once per steps value, other attacks once (steps = None)."""
    for a in attacks:
        check_choice(a, ATTACKS, "attack")
    for k in steps:
        check_number("PGD steps", k, 1, 100_000, integer=True)
    plan = []
    for a in dict.fromkeys(attacks):
        plan += [(a, k) for k in dict.fromkeys(steps)] if a == "pgd" else [(a, None)]
    return plan


PGD_STEPS = (10,)  # PGD's steps when none are given
EVAL_EPS = 8.0  # ε (1/255) when none is given; clean rows record it too


def check_evaluation(attacks: list[str], branches: list[str], *, eps: float | None = None, step: float | None = None,
                     steps: list[int] | None = None, batch_size: int = 500, seed: int = 0,
                     aa_version: str | None = None, aa_attacks: str | list[str] | None = None,
                     aa_restarts: int | None = None, amp: bool = False) -> list[tuple[str, int | None]]:
    """Every setting of `evaluate` checked (one line for the first bad one); returns the attack plan. `eps` (None:
    EVAL_EPS), and PGD's `steps` and `step` (None: PGD_STEPS, eps/4), given where no attack uses them, are refused,
    not ignored."""
    if eps is not None:
        check_pixel_radius(eps)
    if step is not None:
        check_pixel_radius(step, "step", low_open=True)
    for what, names in (("attacks", attacks), ("branches", branches)):
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            example = ["clean", "pgd"] if what == "attacks" else ["adv"]
            raise HybridatError(f"{what} must be a list of names, e.g. {example}, got {names!r}")
        if not names:
            raise HybridatError(f"no {what} given: nothing to evaluate")
    check_number("batch size", batch_size, 1, 1 << 20, integer=True)
    check_number("seed", seed, 0, 2**63 - 1, integer=True)
    for b in branches:
        check_choice(b, BRANCHES, "branch")
    if eps is not None and set(attacks) == {"clean"}:
        raise HybridatError("eps was given, but clean accuracy takes none (give an attack too, e.g. pgd)")
    if "pgd" not in attacks and (steps is not None or step is not None):
        raise HybridatError("PGD steps and step size were given, but pgd is not among the attacks (FGSM takes one "
                            "step of eps)")
    if steps is not None and not isinstance(steps, (list, tuple)):
        raise HybridatError(f"steps must be a list of PGD step counts, e.g. [{steps}], got {steps!r}")
    plan = attack_plan(attacks, list(PGD_STEPS if steps is None else steps))
    aa_settings(aa_version, aa_attacks, aa_restarts)
    if (aa_version, aa_attacks, aa_restarts) != (None, None, None) and "autoattack" not in attacks:
        raise HybridatError("AutoAttack settings (version, attacks, restarts) were given, but autoattack is not "
                            "among the attacks")
    if amp and not set(attacks) & set(AMP_ATTACKS):
        raise HybridatError(f"amp (bf16 examples) applies to {' and '.join(AMP_ATTACKS)}, none of which is among "
                            "the attacks (AutoAttack runs the reference code in fp32)")
    return plan


def evaluate(ckpt: Checkpoint, split: Split, attacks: list[str], branches: list[str], *, eps: float | None = None,
             step: float | None = None, steps: list[int] | None = None, batch_size: int = 500, seed: int = 0,
             aa_version: str | None = None, aa_attacks: str | list[str] | None = None,
             aa_restarts: int | None = None, on_row: Callable[[dict], None] | None = None,
             graphs: bool = True, amp: bool = False,
             on_batch: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """Accuracy under each attack through each branch: one row per (branch, attack, steps), its `accuracy` a
    fraction in [0, 1] of the split's images. eps/step in pixel units (eps defaults to 8, step to eps/4).
    AutoAttack runs `aa_settings(aa_version, aa_attacks, aa_restarts)` (default: the standard version), and its
    rows record what ran (`aa_attacks`, `aa_restarts`, `aa_eot_iter`; `attack` is "autoattack" for the
    standard version only). amp: FGSM and PGD craft their examples in bf16 (`attacks.crafting`); every row
    records the precision its examples were crafted in (`attack_precision`, fp32 or bf16).

    A single-branch model is one network for both branches: it is attacked once and reported under each.
    ckpt: `load_checkpoint(path, device)`; split: `data.load_split(ckpt's dataset, train=False, device=the same)`.
    Returns the rows (and hands each to `on_row` as it is measured); `checkpoint.write_csv(rows, path)` writes them.
    on_batch(what, images done, images in all) follows each attack batch by batch, e.g. ("adv PGD-10", 1000, 10000),
    for a progress bar.
    """
    if not isinstance(ckpt, Checkpoint):
        raise HybridatError(f"ckpt must be a hybridat Checkpoint (hybridat.load_checkpoint(path)), got "
                            f"{type(ckpt).__name__}")
    check_split(ckpt.model, split)
    check_callback(on_row, "on_row")
    check_callback(on_batch, "on_batch")
    check_flag(graphs, "graphs")
    check_flag(amp, "amp")
    ckpt.check_unchanged()  # the rows name it by its file's hash
    plan = check_evaluation(attacks, branches, eps=eps, step=step, steps=steps, batch_size=batch_size, seed=seed,
                            aa_version=aa_version, aa_attacks=aa_attacks, aa_restarts=aa_restarts, amp=amp)
    aa = aa_settings(aa_version, aa_attacks, aa_restarts)
    eps = EVAL_EPS if eps is None else eps
    if int(split.labels.max()) >= ckpt.config.num_classes:
        raise HybridatError(f"{ckpt.path} has {ckpt.config.num_classes} classes, but the data has labels up to "
                            f"{int(split.labels.max())}; evaluate it on the dataset it was trained on")
    single = NORMS[ckpt.config.norm].branches == 1

    def precision(attack: str) -> str:
        return "bf16" if amp and attack in AMP_ATTACKS else "fp32"

    x, y = to_float(split.images), split.labels
    rows, done = [], {}
    for branch in dict.fromkeys(branches):
        for attack, k in plan:
            key = (attack, k) if single else (branch, attack, k)
            if key not in done:
                what = f"{'both' if single else branch} {attack_label(attack, k, precision=precision(attack))}"
                # positional, as documented: a callback's parameters may have any names
                progress = None if on_batch is None else lambda n, what=what: on_batch(what, n, len(y))
                t0 = time.perf_counter()
                if progress is not None:
                    progress(0)
                acc = robust_accuracy(BranchView(ckpt.model, branch), x, y, attack, eps=eps / 255,
                                      step=None if step is None else step / 255, steps=k or 1,
                                      batch_size=batch_size, seed=seed, graphs=graphs, amp=amp, on_batch=progress,
                                      **(dict(aa_version=aa_version, aa_attacks=aa_attacks, aa_restarts=aa_restarts)
                                         if attack == "autoattack" else {}))
                done[key] = (acc, time.perf_counter() - t0)
            acc, seconds = done[key]
            row = _row(ckpt, branch, attack, k, eps, step, len(y), acc, seconds, seed, aa if attack == "autoattack"
                       else None, precision(attack))
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _row(ckpt, branch, attack, steps, eps, step, n, acc, seconds, seed, aa: AASettings | None,
         precision: str) -> dict:
    aa_record = aa.columns() if aa is not None else {"aa_attacks": None, "aa_restarts": None, "aa_eot_iter": None}
    where = {"run": ckpt.run, "checkpoint": str(ckpt.path)}
    measured = {"branch": branch, "attack": aa.name if aa else attack, "eps": eps,
                "step": (step if step is not None else eps / 4) if attack == "pgd" else None, "steps": steps,
                "n": n, "accuracy": acc, "seconds": seconds, "eval_seed": seed, "attack_precision": precision,
                "unfinished": ckpt.unfinished}
    return where | ckpt.row_ids() | measured | aa_record | training_columns(ckpt.train)
