"""Per-branch robustness evaluation of a checkpoint: one tidy row per (branch, attack, steps)."""

from __future__ import annotations

import time
from typing import Callable

from .attacks import ATTACKS, robust_accuracy
from .checkpoint import Checkpoint, training_columns
from .data import Split, to_float
from .errors import HybridatError, check_choice, check_number
from .models import BranchView
from .norms import BRANCHES, NORMS

AA_VERSIONS = ("standard", "plus", "rand")


def attack_label(attack: str, steps: int | None) -> str:
    """Column name in tables: clean, FGSM, PGD-10, AA (AA-plus, AA-rand for the other AutoAttack versions)."""
    if attack.startswith("autoattack-"):
        return "AA-" + attack.removeprefix("autoattack-")
    return {"clean": "clean", "fgsm": "FGSM", "autoattack": "AA"}.get(attack, f"PGD-{steps}")


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


def check_evaluation(attacks: list[str], branches: list[str], *, eps: float, step: float | None = None,
                     steps: list[int] = (10,), batch_size: int = 500, seed: int = 0,
                     aa_version: str = "standard") -> list[tuple[str, int | None]]:
    """Every setting of `evaluate` checked (one line for the first bad one); returns the attack plan."""
    check_number("eps", eps, 0, 255)
    if step is not None:
        check_number("step", step, 0, 255, low_open=True)
    check_number("batch size", batch_size, 1, 1 << 20, integer=True)
    check_number("seed", seed, 0, 2**63 - 1, integer=True)
    check_choice(aa_version, AA_VERSIONS, "AutoAttack version")
    for b in branches:
        check_choice(b, BRANCHES, "branch")
    return attack_plan(attacks, list(steps))


def evaluate(ckpt: Checkpoint, split: Split, attacks: list[str], branches: list[str], *, eps: float,
             step: float | None = None, steps: list[int] = (10,), batch_size: int = 500, seed: int = 0,
             aa_version: str = "standard", on_row: Callable[[dict], None] | None = None,
             graphs: bool = True) -> list[dict]:
    """Accuracy under each attack through each branch. eps/step in pixel units; step defaults to eps/4.

    A single-branch model is one network for both branches: it is attacked once and reported under each.
    """
    plan = check_evaluation(attacks, branches, eps=eps, step=step, steps=steps, batch_size=batch_size, seed=seed,
                            aa_version=aa_version)
    if int(split.labels.max()) >= ckpt.config.num_classes:
        raise HybridatError(f"{ckpt.path} has {ckpt.config.num_classes} classes, but the data has labels up to "
                            f"{int(split.labels.max())}; evaluate it on the dataset it was trained on")
    single = NORMS[ckpt.config.norm].branches == 1
    x, y = to_float(split.images), split.labels
    rows, done = [], {}
    for branch in dict.fromkeys(branches):
        for attack, k in plan:
            key = (attack, k) if single else (branch, attack, k)
            if key not in done:
                t0 = time.perf_counter()
                acc = robust_accuracy(BranchView(ckpt.model, branch), x, y, attack, eps=eps / 255,
                                      step=None if step is None else step / 255, steps=k or 1,
                                      batch_size=batch_size, seed=seed, aa_version=aa_version, graphs=graphs)
                done[key] = (acc, time.perf_counter() - t0)
            acc, seconds = done[key]
            name = f"autoattack-{aa_version}" if attack == "autoattack" and aa_version != "standard" else attack
            row = _row(ckpt, branch, name, k, eps, step, len(y), acc, seconds, seed)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _row(ckpt, branch, attack, steps, eps, step, n, acc, seconds, seed) -> dict:
    train = ckpt.train
    return {"run": ckpt.header.get("run", ckpt.path.parent.name), "checkpoint": str(ckpt.path),
            "checkpoint_hash": ckpt.hash, "parent_hash": ckpt.header.get("parent", ""),
            "operation": ckpt.header.get("operation", ""), "norm": ckpt.config.norm, "arch": ckpt.config.arch,
            "width": ckpt.config.width, "seed": ckpt.meta("seed", ""), "train_eps": train.get("eps", ""),
            "loss_name": train.get("loss", ""), "branch": branch, "attack": attack, "eps": eps,
            "step": (step if step is not None else eps / 4) if attack == "pgd" else None, "steps": steps,
            "n": n, "accuracy": acc, "seconds": seconds, "eval_seed": seed,
            "unfinished": ckpt.unfinished} | training_columns(train)
