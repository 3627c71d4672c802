"""CIFAR networks with a pluggable norm: ResNet-18 (the paper's), PreAct ResNet-18, WRN-34-10, WRN-28-10.

Every model is a `BranchModel`: `model(x, "adv")`, `model(x, "clean")`, or `model(cat[x_adv, x_clean],
(n_adv, n_clean))` for one fused forward over both branches. Inputs are pixels in [0, 1]: no mean/std
normalization (SPEC.md); a model imported from code that expected normalized inputs carries its mean/std in
its config and normalizes internally, so pixels stay in [0, 1] outside it. `width` scales every channel count,
for small runs on a CPU.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HybridatError, check_choice, check_number
from .norms import (BRANCHES, BranchAdapter, BranchBatchNorm, BranchLinear, BranchNorm, NormSpec, Routed, Router,
                    get_norm)

Route = str | tuple[int, int]
MAX_WIDTH = 16.0  # --width above this is a typo, not a model: ResNet-18 at 16x has ~3e9 parameters


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved as JSON in the checkpoint's metadata."""

    arch: str = "resnet18"
    norm: str = "dual-bn"
    width: float = 1.0
    num_classes: int = 10
    input_mean: tuple[float, ...] | None = None  # per RGB channel, for models trained on (x - mean) / std
    input_std: tuple[float, ...] | None = None

    def to_json(self) -> str:
        # unset input normalization is left out, so configs without it read exactly as before it existed
        fields = {k: v for k, v in asdict(self).items() if v is not None or k not in INPUT_NORM}
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """The config in `text`, each field checked by type and range (a checkpoint's metadata is untrusted)."""
        try:
            fields = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise HybridatError(f"the model config is not JSON ({e})") from None
        required = {"arch", "norm", "width", "num_classes"}
        if not isinstance(fields, dict) or not required <= set(fields) <= required | set(INPUT_NORM):
            raise HybridatError(f"the model config must be a JSON object with arch, norm, width and num_classes "
                                f"(and optionally {' and '.join(INPUT_NORM)}), got {text[:200]}")
        for key in INPUT_NORM:
            value = fields.get(key)
            if value is not None:
                if not isinstance(value, list) or len(value) != 3:
                    raise HybridatError(f"{key} must be a list of 3 numbers (R, G, B), got {value!r:.200}")
                fields[key] = tuple(float(check_number(key, v, -1e6, 1e6)) for v in value)
        return cls(**fields).check()

    def check(self) -> "ModelConfig":
        """Self if every field has its type and a possible value; else one HybridatError."""
        from .norms import NORMS

        if not isinstance(self.arch, str) or self.arch not in ARCHS:
            raise HybridatError(f"unknown arch {self.arch!r}; choose one of: {', '.join(ARCHS)}")
        if not isinstance(self.norm, str) or self.norm not in NORMS:
            raise HybridatError(f"unknown norm {self.norm!r}; choose one of: {', '.join(NORMS)}")
        check_number("width", self.width, 0, MAX_WIDTH, low_open=True)
        check_number("num_classes", self.num_classes, 2, 100_000, integer=True)
        for key in INPUT_NORM:  # NaN or infinity here made every logit NaN
            value = getattr(self, key)
            if value is not None:
                if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
                    raise HybridatError(f"{key} must be 3 numbers (R, G, B), got {value!r:.200}")
                for v in value:
                    check_number(key, v, -1e6, 1e6)
        if self.input_std is not None and not all(v > 0 for v in self.input_std):
            raise HybridatError(f"input_std must be positive, got {self.input_std}")
        return self


INPUT_NORM = ("input_mean", "input_std")


class Parts:
    """The per-variant building blocks an architecture asks for."""

    def __init__(self, spec: NormSpec, width: float):
        self.spec, self.width = spec, width

    def ch(self, channels: int) -> int:
        return max(1, round(channels * self.width))

    def norm(self, channels: int) -> nn.Module:
        return self.spec.layer(channels)

    def head(self, features: int, classes: int) -> nn.Module:
        return BranchLinear(features, classes) if self.spec.dual_head else nn.Linear(features, classes)

    def adapter(self, channels: int) -> nn.Module:
        return BranchAdapter(channels) if self.spec.adapters else nn.Identity()


def route_sizes(route: Route, n: int) -> tuple[int, int]:
    """(n_adv, n_clean) of a batch of n rows ordered cat[adv, clean]."""
    if route == "adv":
        return (n, 0)
    if route == "clean":
        return (0, n)
    if isinstance(route, tuple) and len(route) == 2 and sum(route) == n and min(route) >= 0:
        return (int(route[0]), int(route[1]))
    raise HybridatError(f"route must be 'adv', 'clean' or (n_adv, n_clean) summing to {n}, got {route!r}")


class BranchModel(nn.Module):
    """Base of every network: sets the shared router's row counts, normalizes the input if its config says so,
    then runs `logits`."""

    config: ModelConfig

    def set_input_norm(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
        """(1, 3, 1, 1) buffers input_mean/std (None: pixels go in as they are), not saved: the config holds them."""
        if (mean is None) != (std is None):
            raise HybridatError("input mean and std go together: give both or neither")
        if mean is not None and (len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std)):
            raise HybridatError(f"input mean and std take 3 values each (R,G,B), std > 0; got {mean}, {std}")
        for name, values in (("input_mean", mean), ("input_std", std)):
            buffer = None if values is None else torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer(name, buffer, persistent=False)

    def share_router(self) -> None:
        self.router = Router()
        for m in self.modules():
            if isinstance(m, Routed):
                m.router = self.router

    def forward(self, x: torch.Tensor, route: Route = "adv") -> torch.Tensor:
        self.router.sizes = route_sizes(route, x.shape[0])
        if self.input_mean is not None:
            x = (x - self.input_mean) / self.input_std
        return self.logits(x)

    def fused(self, x_adv: torch.Tensor, x_clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fused(self, x_adv, x_clean)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def fused(model: Callable, x_adv: torch.Tensor, x_clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both branches in one forward: (logits of x_adv via adv, logits of x_clean via clean).

    `model` is a BranchModel or a wrapper that passes (x, route) through, such as DDP.
    """
    logits = model(torch.cat([x_adv, x_clean]), (len(x_adv), len(x_clean)))
    return logits[: len(x_adv)], logits[len(x_adv):]


class BranchView(nn.Module):
    """A two-branch model seen through one branch: x -> logits, for attacks and other libraries."""

    def __init__(self, model: BranchModel, branch: str):
        super().__init__()
        inner = getattr(model, "_orig_mod", getattr(model, "module", model))  # torch.compile, DDP: wrappers of one
        if not isinstance(inner, BranchModel):  # a str or a torchvision model failed at the first call, untold
            raise HybridatError(f"BranchView takes a hybridat model (load_checkpoint(path).model), got "
                                f"{type(model).__name__}; another network maps pixels to logits as it is")
        self.model, self.branch = model, check_choice(branch, BRANCHES, "branch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.branch)


ONEDNN_BLOCK = 16  # channels per block of oneDNN's widest CPU kernels (AVX-512; AVX2's block is 8)


def onednn_unsafe(conv: nn.Module, x: torch.Tensor) -> bool:
    """True where oneDNN's NHWC kernel is wrong: its 1x1 strided convolution's weight-gradient kernel fails when the
    input has fewer channels than the ISA's block: on AVX2 (block 8) it hangs or returns wrong gradients
    (uxlfoundation/oneDNN#6035), on AVX-512 (block 16) it corrupts the heap on odd batches (SIGSEGV; e.g. an epoch's
    last partial batch under --loss madry). Hit by the stride-2 shortcuts of models at width < 1/4. The NCHW kernel
    is right."""
    return (x.device.type == "cpu" and conv.kernel_size == (1, 1) and max(conv.stride) > 1
            and x.shape[1] < ONEDNN_BLOCK)


def nchw_conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`conv`'s convolution, run in NCHW where `onednn_unsafe`. Input and weight both: torch picks the NHWC kernel
    when either is channels_last, and a (C_out, C_in, 1, 1) weight converted to channels_last stays marked so."""
    if onednn_unsafe(conv, x):
        x, weight = x.contiguous(), weight.clone(memory_format=torch.contiguous_format)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class Conv1x1(nn.Conv2d):
    """A 1x1 convolution without bias (the residual shortcut), guarded against the oneDNN fault above."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        return nchw_conv(self, x, self.weight, None)


class FoldedConv(nn.Module):
    """A convolution followed by a batch norm in eval mode, as one convolution with a bias."""

    def __init__(self, conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        bias = shift if conv.bias is None else shift + conv.bias * scale
        self.weight, self.bias = (conv.weight * scale.view(-1, 1, 1, 1)).to(dtype), bias.to(dtype)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.kernel_size = conv.kernel_size

    def forward(self, x):
        return nchw_conv(self, x, self.weight, self.bias)


@contextmanager
def bn_folded(model: nn.Module, branch: str, dtype: torch.dtype = torch.float32):
    """For the duration, every batch norm right after a convolution is folded into it as `branch` sees it in eval
    mode (its running NS, its AP): the attack's forward and backward skip the norm's pass. The folded weights
    (in `dtype`: bf16 under autocast saves a cast per call) take no gradient, so this is for attacks through
    `branch` on a frozen model only; the original modules are back on exit."""
    swaps = []
    try:
        with torch.no_grad():
            for module in list(model.modules()):
                for parent, conv_name, norm_name in getattr(module, "conv_norm_pairs", tuple)():
                    conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
                    if isinstance(norm, BranchBatchNorm):
                        swaps.append((parent, conv_name, conv, norm_name, norm))
                        setattr(parent, conv_name, FoldedConv(conv, *norm.eval_affine(branch), dtype))
                        setattr(parent, norm_name, nn.Identity())
        yield model
    finally:
        for parent, conv_name, conv, norm_name, norm in swaps:
            setattr(parent, conv_name, conv)
            setattr(parent, norm_name, norm)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block (He et al. 2016)."""

    def __init__(self, parts: Parts, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), parts.norm(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), parts.norm(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(Conv1x1(cin, cout, stride), parts.norm(cout))

    def conv_norm_pairs(self):
        yield self, "conv1", "bn1"
        yield self, "conv2", "bn2"
        if self.shortcut is not None:
            yield self.shortcut, "0", "1"

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016b); also the WideResNet block (dropout 0)."""

    def __init__(self, parts: Parts, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = parts.norm(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = parts.norm(cout), conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = Conv1x1(cin, cout, stride)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


def stage(block: Callable, parts: Parts, cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[block(parts, cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])


class ResNet(BranchModel):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool); post- or pre-activation blocks."""

    def __init__(self, parts: Parts, num_classes: int, preact: bool = False):
        super().__init__()
        block = PreActBlock if preact else BasicBlock
        widths = [parts.ch(c) for c in (64, 128, 256, 512)]
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = None if preact else parts.norm(widths[0])
        cins = [widths[0]] + widths[:-1]
        for i, (cin, cout) in enumerate(zip(cins, widths), start=1):
            setattr(self, f"layer{i}", stage(block, parts, cin, cout, 2, 1 if i == 1 else 2))
            setattr(self, f"adapt{i}", parts.adapter(cout))
        self.bn_final = parts.norm(widths[-1]) if preact else None
        self.linear = parts.head(widths[-1], num_classes)
        self.preact = preact

    def conv_norm_pairs(self):
        if self.bn1 is not None:
            yield self, "conv1", "bn1"

    def logits(self, x):  # (B, 3, 32, 32) -> (B, K)
        out = self.conv1(x)
        if self.bn1 is not None:
            out = F.relu(self.bn1(out))
        for i in range(1, 5):
            out = getattr(self, f"adapt{i}")(getattr(self, f"layer{i}")(out))
        if self.bn_final is not None:
            out = F.relu(self.bn_final(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class WideResNet(BranchModel):
    """WideResNet-depth-k (Zagoruyko & Komodakis 2016), as used by TRADES: pre-activation, no dropout."""

    def __init__(self, parts: Parts, num_classes: int, depth: int, widen: int):
        super().__init__()
        n = (depth - 4) // 6
        widths = [parts.ch(c) for c in (16, 16 * widen, 32 * widen, 64 * widen)]
        self.conv1 = conv3x3(3, widths[0])
        for i in range(1, 4):
            setattr(self, f"block{i}", stage(PreActBlock, parts, widths[i - 1], widths[i], n, 1 if i == 1 else 2))
            setattr(self, f"adapt{i}", parts.adapter(widths[i]))
        self.bn1 = parts.norm(widths[3])
        self.fc = parts.head(widths[3], num_classes)

    def logits(self, x):  # (B, 3, 32, 32) -> (B, K)
        out = self.conv1(x)
        for i in range(1, 4):
            out = getattr(self, f"adapt{i}")(getattr(self, f"block{i}")(out))
        out = F.relu(self.bn1(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


ARCHS: dict[str, Callable[[Parts, int], BranchModel]] = {
    "resnet18": lambda parts, k: ResNet(parts, k),
    "preact18": lambda parts, k: ResNet(parts, k, preact=True),
    "wrn34-10": lambda parts, k: WideResNet(parts, k, depth=34, widen=10),
    "wrn28-10": lambda parts, k: WideResNet(parts, k, depth=28, widen=10),
}


def build_model(config: ModelConfig) -> BranchModel:
    config.check()
    model = ARCHS[config.arch](Parts(get_norm(config.norm), config.width), config.num_classes)
    model.config = config
    model.set_input_norm(config.input_mean, config.input_std)
    model.share_router()
    # conv weights in channels_last: activations then stay NHWC end to end, which oneDNN (CPU) and cuDNN (GPU)
    # run without layout reorders; state dicts and checkpoints are unaffected (values, not strides)
    return model.to(memory_format=torch.channels_last)


def model_for_weights(config: ModelConfig) -> BranchModel:
    """`build_model(config)` to be filled with a state dict at once: its random init is drawn from a forked RNG, so
    loading a checkpoint leaves the caller's global random stream (a notebook's next torch.randn) as it was."""
    with torch.random.fork_rng(devices=[]):  # built on the CPU: only the CPU generator is drawn from
        return build_model(config)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every norm layer, in order of construction (depth order)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BranchNorm)]
