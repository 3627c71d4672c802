"""Small re-implementations of the foreign networks `hybridat import` reads, written for the tests from the
published layouts (module names, parameter and buffer names, forward arithmetic), each with a width knob so
the tests stay fast. Only eval-mode forwards are needed: the tests compare logits of trained-looking weights.

Every model here is called as `model(x, branch)`; single-BN models ignore the branch.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn


def ch(c: int, width: float) -> int:
    return max(1, round(c * width))


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


# ---- PreAct ResNet-18 as in the fast-AT / robust-overfitting code (shortcut = Sequential(conv), final `bn`) ----

class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, width=1.0, num_classes=10):
        super().__init__()
        widths = [ch(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = conv3x3(3, widths[0])
        cin = widths[0]
        for i, cout in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.bn = nn.BatchNorm2d(widths[-1])
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x, branch=None):
        out = self.conv1(x)
        for i in range(1, 5):
            out = getattr(self, f"layer{i}")(out)
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        return self.linear(out.view(out.size(0), -1))


# ---- WideResNet in the TRADES layout (NetworkBlock.layer, convShortcut, an unused sub_block1) ----

class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = conv3x3(cout, cout)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return torch.add(x if self.equal else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class TradesWideResNet(nn.Module):
    def __init__(self, depth=34, widen=10, width=1.0, num_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        c = [ch(16, width), ch(16 * widen, width), ch(32 * widen, width), ch(64 * widen, width)]
        self.conv1 = conv3x3(3, c[0])
        self.block1 = NetworkBlock(n, c[0], c[1], 1)
        self.sub_block1 = NetworkBlock(n, c[0], c[1], 1)  # TRADES builds it and never calls it
        self.block2 = NetworkBlock(n, c[1], c[2], 2)
        self.block3 = NetworkBlock(n, c[2], c[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(c[3]), nn.ReLU()
        self.fc = nn.Linear(c[3], num_classes)
        self.channels = c[3]

    def forward(self, x, branch=None):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.channels))


# ---- the paper authors' multi-BN ResNet-18 (batch_norm_multiple: bn_list / bn_layer; "pgd" = adv) ----

NAMES = {"adv": "pgd", "clean": "normal"}


class TwoAP(nn.Module):
    """Shared running NS, AP per branch (their Disentangling_LP), eval forward."""

    def __init__(self, c):
        super().__init__()
        for tag in NAMES.values():
            self.register_parameter(f"weight_{tag}", nn.Parameter(torch.ones(c)))
            self.register_parameter(f"bias_{tag}", nn.Parameter(torch.zeros(c)))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x, tag):
        return F.batch_norm(x, self.running_mean, self.running_var, getattr(self, f"weight_{tag}"),
                            getattr(self, f"bias_{tag}"), False, 0.0, 1e-5)


class TwoNS(nn.Module):
    """Running NS per branch, one AP (weight_pgd/bias_pgd) (their Disentangling_StatP), eval forward."""

    def __init__(self, c):
        super().__init__()
        self.weight_pgd, self.bias_pgd = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        for tag in NAMES.values():
            self.register_buffer(f"running_mean_{tag}", torch.zeros(c))
            self.register_buffer(f"running_var_{tag}", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x, tag):
        return F.batch_norm(x, getattr(self, f"running_mean_{tag}"), getattr(self, f"running_var_{tag}"),
                            self.weight_pgd, self.bias_pgd, False, 0.0, 1e-5)


class MultiBN(nn.Module):
    """Their batch_norm_multiple: `bn_list` always (a BN per name), `bn_layer` for the two-AP/two-NS layers."""

    def __init__(self, kind, c):
        super().__init__()
        self.kind = kind
        if kind == "dual-bn":
            self.bn_list = nn.ModuleList([nn.BatchNorm2d(c), nn.BatchNorm2d(c)])
        else:
            layer = TwoAP if kind == "dual-ap" else TwoNS
            self.bn_list = nn.ModuleList([layer(c), layer(c)])  # built, never called
            self.bn_layer = layer(c)

    def forward(self, x, branch):
        if self.kind == "dual-bn":
            return self.bn_list[0 if branch == "adv" else 1](x)
        return self.bn_layer(x, NAMES[branch])


class AuthorsBlock(nn.Module):
    def __init__(self, kind, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), MultiBN(kind, cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), MultiBN(kind, cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Module()
            self.downsample.conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.downsample.bn = MultiBN(kind, cout)

    def forward(self, x, branch):
        out = F.relu(self.bn1(self.conv1(x), branch))
        out = self.bn2(self.conv2(out), branch)
        identity = x if self.downsample is None else self.downsample.bn(self.downsample.conv(x), branch)
        return F.relu(out + identity)


class AuthorsResNet18(nn.Module):
    """Their torchvision-style ResNet with the CIFAR stem they swap in (3x3 conv1, no max-pool)."""

    def __init__(self, kind="dual-bn", width=1.0, num_classes=10):
        super().__init__()
        widths = [ch(c, width) for c in (64, 128, 256, 512)]
        self.conv1, self.bn1 = conv3x3(3, widths[0]), MultiBN(kind, widths[0])
        cin = widths[0]
        for i, cout in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.ModuleList([AuthorsBlock(kind, cin, cout, stride),
                                                     AuthorsBlock(kind, cout, cout, 1)]))
            cin = cout
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x, branch="adv"):
        out = F.relu(self.bn1(self.conv1(x), branch))
        for i in range(1, 5):
            for block in getattr(self, f"layer{i}"):
                out = block(out, branch)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# ---- timm's SplitBatchNorm2d: main BN under the plain names, auxiliary BN under aux_bn.0 ----

class SplitBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c)
        self.aux_bn = nn.ModuleList([nn.BatchNorm2d(c)])


def convert_splitbn(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d of `module` becomes a SplitBatchNorm2d (in place)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, SplitBatchNorm2d(child.num_features))
        else:
            convert_splitbn(child)
    return module


@torch.no_grad()
def split_view(model: nn.Module, split: str) -> nn.Module:
    """A copy of a SplitBN model that computes, in eval, with its `split` BNs ('main': as the model itself does;
    'aux': the auxiliary BNs in place of the main ones)."""
    view = copy.deepcopy(model).eval()
    if split == "aux":
        for m in view.modules():
            if isinstance(m, SplitBatchNorm2d):
                for key, value in m.aux_bn[0].state_dict().items():
                    getattr(m, key).copy_(value)
    return view


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking values for every norm tensor (each list entry and branch its own), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if t.dtype == torch.long:
            t.fill_(int(torch.randint(1, 1000, (), generator=g)))
        elif t.dim() == 1 and leaf.startswith("running_var"):
            t.copy_(0.5 + 1.5 * torch.rand(t.shape, generator=g))
        elif t.dim() == 1 and leaf.startswith("weight"):
            t.copy_(0.5 + torch.rand(t.shape, generator=g))
        elif t.dim() == 1:
            t.copy_(0.2 * torch.randn(t.shape, generator=g))
    return model.eval()
