"""Every normalization variant of SPEC.md, the `NORMS` registry, and the routing of rows to branches.

A batch is always ordered `cat[adv rows, clean rows]`; a `Router` shared by every branch-aware layer of a
model says how many rows each branch has. A layer never sees a flag "which branch am I": it sees row counts,
so one fused forward over both halves and two separate passes run the same arithmetic per row.

Names of parameters and buffers: a set shared by both branches keeps the plain BatchNorm2d name
(`weight`, `running_mean`, ...), a per-branch set gets the branch as suffix (`weight_adv`, `running_var_clean`),
so a plain BN state dict loads into the `bn` variant unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HybridatError, check_choice

BRANCHES = ("adv", "clean")
SHARED = "shared"
NS_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
AP_PARAMS = ("weight", "bias")


def other(branch: str) -> str:
    return "clean" if branch == "adv" else "adv"


def set_name(base: str, key: str) -> str:
    """Attribute name of one NS/AP set: `running_mean` for the shared set, `running_mean_adv` for a branch's."""
    return base if key == SHARED else f"{base}_{key}"


def set_keys(count: int) -> tuple[str, ...]:
    return {0: (), 1: (SHARED,), 2: BRANCHES}[count]


class Router:
    """Row counts `(n_adv, n_clean)` of the batch in flight; the model sets them before every forward."""

    def __init__(self):
        self.sizes = (0, 0)

    def split(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The non-empty row groups of x, adv first (views, no copy)."""
        n_adv, n_clean = self.sizes
        if n_adv + n_clean != x.shape[0]:
            raise RuntimeError(f"router expects {n_adv}+{n_clean} rows, got {x.shape[0]}")
        if n_adv == 0 or n_clean == 0:  # one branch: x itself
            return {"adv" if n_adv else "clean": x}
        adv, clean = x.split([n_adv, n_clean])  # backward is one cat, not a zero-filled copy per slice
        return {"adv": adv, "clean": clean}


class Routed(nn.Module):
    """A layer that reads the shared router; `BranchModel` hands every such layer the same Router."""

    def __init__(self):
        super().__init__()
        self.router = Router()


def rows_affine(x: torch.Tensor, sizes: tuple[int, int], scale: dict, shift: dict) -> torch.Tensor:
    """y = x * scale[branch] + shift[branch] per row group; scale/shift are (C,) per branch present.

    One elementwise op over the whole batch (no split + cat): per-branch vectors are expanded to rows.
    It runs in x's dtype: under bf16 autocast the activations stay bf16 (statistics are fp32 upstream).
    """
    present = [b for b, n in zip(BRANCHES, sizes) if n > 0]
    first = present[0]
    if all(scale[b] is scale[first] and shift[b] is shift[first] for b in present):
        s, t = scale[first], shift[first]  # (C,)
    else:
        s = torch.cat([scale[b].expand(n, -1) for b, n in zip(BRANCHES, sizes) if n > 0])  # (N, C)
        t = torch.cat([shift[b].expand(n, -1) for b, n in zip(BRANCHES, sizes) if n > 0])
    shape = (-1, x.shape[1]) + (1,) * (x.dim() - 2)
    return torch.addcmul(t.reshape(shape).to(x.dtype), x, s.reshape(shape).to(x.dtype))


class BranchNorm(Routed):
    """Base of every norm: `ap_sets` affine sets (0 = no AP, 1 = shared, 2 = one per branch)."""

    def __init__(self, num_features: int, ap_sets: int):
        super().__init__()
        self.num_features = num_features
        self.ap_keys = set_keys(ap_sets)
        for key in self.ap_keys:
            self.register_parameter(set_name("weight", key), nn.Parameter(torch.ones(num_features)))
            self.register_parameter(set_name("bias", key), nn.Parameter(torch.zeros(num_features)))

    def ap_key(self, branch: str) -> str | None:
        if not self.ap_keys:
            return None
        return branch if len(self.ap_keys) == 2 else SHARED

    def affine(self, branch: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        key = self.ap_key(branch)
        if key is None:
            return None, None
        return getattr(self, set_name("weight", key)), getattr(self, set_name("bias", key))


class BranchBatchNorm(BranchNorm):
    """BatchNorm whose NS and AP may be shared or per branch.

    batch_ns says which rows' batch statistics normalize a branch's rows in training:
      "own"   each branch its own rows (two separate passes; `bn`, `dual-bn`, `dual-ns`)
      "mixed" all rows of cat[x_adv, x_clean] (`bn-mix`, `dual-ap`)
      "clean" the clean rows, for both branches (`cross-bn`: the clean rows are normalized as in Self-BN, the adv
              rows meet the clean rows' NS under their own AP; the authors' `CrossTrainingBN_clean`)
      "adv"   the adv rows, for both branches (`cross-bn-adv`, the other direction)
      "other" the other branch's rows (`cross-bn-swap`, the two-way swap: an ablation that cannot train)
    ns_sets = 1: one running set (updated adv then clean for "own", as two passes would; for "clean"/"adv" only
    the rows of that domain update it);
    ns_sets = 2: one running set per domain; in eval a branch reads the set whose statistics it was
    normalized with in training (its own domain's, or for cross-bn-swap the other domain's).
    """

    def __init__(self, num_features: int, *, batch_ns: str, ns_sets: int, ap_sets: int,
                 eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(num_features, ap_sets)
        self.batch_ns, self.eps, self.momentum = batch_ns, eps, momentum
        self.ns_keys = set_keys(ns_sets)
        for key in self.ns_keys:
            self.register_buffer(set_name("running_mean", key), torch.zeros(num_features))
            self.register_buffer(set_name("running_var", key), torch.ones(num_features))
            self.register_buffer(set_name("num_batches_tracked", key), torch.tensor(0, dtype=torch.long))

    def ns_key(self, domain: str) -> str:
        """The running set that the statistics of `domain` rows go to."""
        return domain if len(self.ns_keys) == 2 else SHARED

    def eval_key(self, branch: str) -> str:
        """The running set a branch is normalized with in eval mode."""
        return self.ns_key(other(branch) if self.batch_ns == "other" else branch)

    def running(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, set_name("running_mean", key)), getattr(self, set_name("running_var", key))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        groups = self.router.split(x)
        if self.training and self.batch_ns in ("own", "mixed"):
            return self._train_native(x, groups)
        if self.training:
            stats = self._batch_stats(groups)
        else:
            stats = {b: self.running(self.eval_key(b)) for b in groups}
        scale, shift = {}, {}
        for b, (mean, var) in stats.items():
            scale[b], shift[b] = self._scale_shift(mean, var, b)
        if len(stats) == 2 and stats["adv"][0] is stats["clean"][0] and self.ap_key("adv") == self.ap_key("clean"):
            scale["clean"], shift["clean"] = scale["adv"], shift["adv"]  # one affine for the whole batch
        return rows_affine(x, self.router.sizes, scale, shift)

    def eval_affine(self, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (C,): what this layer does to `branch` rows in eval mode, y = x * scale + shift."""
        return self._scale_shift(*self.running(self.eval_key(branch)), branch)

    def _scale_shift(self, mean: torch.Tensor, var: torch.Tensor, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        w, bias = self.affine(branch)
        scale = torch.rsqrt(var + self.eps) if w is None else w * torch.rsqrt(var + self.eps)
        return scale, (-mean * scale if bias is None else bias - mean * scale)

    def _train_native(self, x: torch.Tensor, groups: dict) -> torch.Tensor:
        """Training with a branch's own or the mixed batch NS: one F.batch_norm per row group, i.e. exactly
        one nn.BatchNorm2d pass each (fused kernels forward and backward, statistics accumulated in fp32)."""
        if self.batch_ns == "mixed":
            shared_ap = len(self.ap_keys) < 2
            y = self._native(x, SHARED, *(self.affine("adv") if shared_ap else (None, None)))
            if shared_ap:
                return y
            affines = {b: self.affine(b) for b in groups}
            return rows_affine(y, self.router.sizes, {b: a[0] for b, a in affines.items()},
                               {b: a[1] for b, a in affines.items()})
        outs = [self._native(g, self.ns_key(b), *self.affine(b)) for b, g in groups.items()]  # adv first
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _native(self, x: torch.Tensor, key: str, weight, bias) -> torch.Tensor:
        """F.batch_norm in training mode on running set `key`, counting the batch as nn.BatchNorm2d does."""
        tracked = getattr(self, set_name("num_batches_tracked", key))
        tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / tracked.item()
        running_mean, running_var = self.running(key)
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, self.eps)

    def _batch_stats(self, groups: dict) -> dict:
        """Per-branch (mean, biased var) that the cross variants normalize with in training (a branch's own or the
        mixed batch's NS take `_train_native`); updates the running sets as a side effect."""
        if self.batch_ns in BRANCHES:  # one domain's rows normalize every row
            if self.batch_ns not in groups:
                raise HybridatError(f"this norm normalizes every row with the {self.batch_ns} rows' batch statistics, "
                                    f"so in train mode the batch needs {self.batch_ns} rows")
            source = _mean_var(groups[self.batch_ns])
            self._update(self.ns_key(self.batch_ns), source, groups[self.batch_ns])
            return {b: source for b in groups}
        own = {b: _mean_var(g) for b, g in groups.items()}  # "other": each half with the other half's
        for b, g in groups.items():  # adv first, as in two passes adv then clean
            self._update(self.ns_key(b), own[b], g)
        if len(groups) < 2:
            raise HybridatError("cross-bn-swap normalizes each branch with the other branch's batch statistics, "
                                "so in train mode it needs both branches in one batch")
        return {b: own[other(b)] for b in groups}

    @torch.no_grad()
    def _update(self, key: str, stats: tuple, rows: torch.Tensor) -> None:
        """Running NS update as nn.BatchNorm2d does it: unbiased variance; momentum None = cumulative mean."""
        mean, var = stats
        count = rows.numel() // rows.shape[1]  # values per channel: N*H*W
        tracked = getattr(self, set_name("num_batches_tracked", key))
        tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / tracked.item()
        running_mean, running_var = self.running(key)
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var * (count / max(count - 1, 1)), alpha=momentum)


def _mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance, in fp32 whatever the input dtype."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
    return mean, var


class BranchGroupNorm(BranchNorm):
    """A batch-independent norm (GroupNorm with `groups` groups) with shared or per-branch AP."""

    def __init__(self, num_features: int, *, groups: Callable[[int], int], ap_sets: int, eps: float = 1e-5):
        super().__init__(num_features, ap_sets)
        self.groups, self.eps = groups(num_features), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x, self.groups, None, None, self.eps)
        if not self.ap_keys:
            return y
        groups = self.router.split(x)
        scale = {b: self.affine(b)[0] for b in groups}
        shift = {b: self.affine(b)[1] for b in groups}
        return rows_affine(y, self.router.sizes, scale, shift)


def by_branch(x: torch.Tensor, router: Router, modules: nn.ModuleDict) -> torch.Tensor:
    """Run each branch's rows through that branch's module and put the rows back in order."""
    outs = [modules[b](g) for b, g in router.split(x).items()]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class BranchLinear(Routed):
    """One classifier head per branch (`dual-linear`): shared features, separate decisions."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.heads = nn.ModuleDict({b: nn.Linear(in_features, out_features) for b in BRANCHES})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return by_branch(x, self.router, self.heads)


class Adapter(nn.Module):
    """Residual bottleneck x + up(relu(down(x))), zero-initialised so it starts as the identity."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.down = nn.Conv2d(channels, hidden, 1, bias=False)
        self.up = nn.Conv2d(hidden, channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return x + self.up(F.relu(self.down(x)))


class BranchAdapter(Routed):
    """One residual adapter per branch after a stage (`dual-adapter`, the two-task hypothesis beyond norms)."""

    def __init__(self, channels: int):
        super().__init__()
        self.adapters = nn.ModuleDict({b: Adapter(channels) for b in BRANCHES})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return by_branch(x, self.router, self.adapters)


@dataclass(frozen=True)
class NormSpec:
    """One variant of SPEC.md's table: its norm layer, and what else the model gets per branch."""

    layer: Callable[[int], BranchNorm]
    doc: str
    dual_head: bool = False
    adapters: bool = False
    ns_sets: int = 1
    ap_sets: int = 1
    diverges: str = ""  # why training this variant is expected to diverge (said in the error when it does)

    @property
    def batch_ns(self) -> str:
        """Whose batch statistics normalize a branch's rows in training (see `BranchBatchNorm`); "own" if none."""
        return getattr(self.layer, "keywords", {}).get("batch_ns", "own")

    @property
    def needs_both(self) -> bool:
        """True if a training batch must hold both branches' rows (the statistics of one normalize the other)."""
        return self.batch_ns != "own"

    @property
    def branches(self) -> int:
        """2 if the two branches have any parameter or buffer of their own, else 1."""
        dual = self.ns_sets == 2 or self.ap_sets == 2 or self.dual_head or self.adapters
        return 2 if dual else 1


def _bn(doc: str, batch_ns: str, ns_sets: int, ap_sets: int, **extra) -> NormSpec:
    layer = partial(BranchBatchNorm, batch_ns=batch_ns, ns_sets=ns_sets, ap_sets=ap_sets)
    return NormSpec(layer, doc, ns_sets=ns_sets, ap_sets=ap_sets, **extra)


def _gn(doc: str, groups: Callable[[int], int], ap_sets: int) -> NormSpec:
    return NormSpec(partial(BranchGroupNorm, groups=groups, ap_sets=ap_sets), doc, ns_sets=0, ap_sets=ap_sets)


SWAP_DIVERGES = ("cross-bn-swap normalizes each half with the other half's batch NS, which squares the adv/clean "
                 "variance ratio at every norm layer (rho -> rho^2), so activations blow up with depth; it is an "
                 "ablation that cannot train (README: Known behaviour); train cross-bn or cross-bn-adv instead")

_GROUPS = {
    "gn": lambda c: math.gcd(32, c),  # 32 groups (Wu & He 2018), fewer when a narrow layer has fewer channels
    "in": lambda c: c,  # one group per channel = InstanceNorm
    "ln": lambda c: 1,  # one group = LayerNorm over (C, H, W)
}

NORMS: dict[str, NormSpec] = {
    "bn": _bn("single BN, clean and adv in separate passes", "own", 1, 1),
    "bn-mix": _bn("single BN on the mixed batch cat[x_adv, x_clean]", "mixed", 1, 1),
    "dual-bn": _bn("Dual BN / Self-BN: NS and AP per branch", "own", 2, 2),
    "dual-ap": _bn("two AP sets, shared NS of the mixed batch", "mixed", 1, 2),
    "dual-ns": _bn("two NS sets, shared AP", "own", 2, 1),
    "cross-bn": _bn("Cross-BN (the authors' CrossTrainingBN_clean): adv rows normalized with the clean rows' batch "
                    "NS and the adv AP, clean rows as in Self-BN; running NS of clean data", "clean", 1, 2),
    "cross-bn-adv": _bn("Cross-BN the other way: clean rows normalized with the adv rows' batch NS and the clean AP, "
                        "adv rows as in Self-BN; running NS of adversarial data", "adv", 1, 2),
    "cross-bn-swap": _bn("two-way swap (ablation): each branch normalized with the other branch's batch NS, own AP",
                         "other", 2, 2, diverges=SWAP_DIVERGES),
    "dual-linear": _bn("single BN, one classifier head per branch", "own", 1, 1, dual_head=True),
    "bn-noaffine": _bn("single BN without AP", "own", 1, 0),
    "dual-bn-fixed-ap": _bn("Dual BN with AP removed (frozen at gamma=1, beta=0)", "own", 2, 0),
    "dual-adapter": _bn("single BN plus a residual adapter per branch after each stage", "own", 1, 1,
                        adapters=True),
}
for _name, _groups in _GROUPS.items():
    NORMS[_name] = _gn(f"{_name.upper()}, batch-independent, one AP set", _groups, 1)
    NORMS[f"{_name}-dual-ap"] = _gn(f"{_name.upper()}, batch-independent, AP per branch", _groups, 2)


def get_norm(name: str) -> NormSpec:
    return NORMS[check_choice(name, NORMS, "norm")]
