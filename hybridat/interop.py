"""Foreign checkpoints in, one branch out (`hybridat import`, `hybridat export`).

A *layout* is how other code names the same network: its module paths (`shortcut` or `downsample`, `linear` or
`fc`, ...) and how a norm layer stores its NS and AP sets (one plain BatchNorm2d, the paper authors' list of two,
their two-AP and two-NS layers, timm's SplitBatchNorm2d). Both directions go through one plan: for every key of
the hybridat model, the foreign key it comes from. Import fills the model from those keys and refuses anything
missing, left over or of another shape; export writes a branch's eval-mode norm as plain BatchNorm2d keys.

Files are read with `torch.load(weights_only=True)` (never unpickling code) or as safetensors.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .checkpoint import (Checkpoint, atomic_path, check_checkpoint_name, file_hash, is_resume_state, is_torch_save,
                         load_checkpoint, save_checkpoint)
from .data import DATASETS, check_classes
from .errors import HybridatError, check_choice, check_number
from .files import as_path, check_outputs
from .inputs import check_pixel_radius
from .models import ARCHS, BranchModel, ModelConfig, build_model, model_for_weights, norm_layers
from .norms import AP_PARAMS, BRANCHES, NORMS, NS_BUFFERS, SHARED, BranchBatchNorm, set_name

ADV_SPLITS = ("aux", "main")  # timm SplitBatchNorm2d: which split is the adversarial one

STATS = AP_PARAMS + NS_BUFFERS
TAGS = {"adv": "pgd", "clean": "normal"}  # the authors' names of the two branches
STEM = {"resnet18": 64, "preact18": 64, "wrn34-10": 16, "wrn28-10": 16}  # conv1 channels at width 1
CONTAINERS = ("state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "model.", "_orig_mod.")  # DataParallel / DDP, wrappers, torch.compile
SHOWN = 3  # keys named in an error message

Leaves = dict[tuple[str, str], str]  # (stat, set key: shared/adv/clean) -> the foreign name inside a norm layer


def _plain(adv_split: str) -> Leaves:
    """nn.BatchNorm2d: one NS set, one AP set."""
    return {(s, SHARED): s for s in STATS}


def _bn_list(adv_split: str) -> Leaves:
    """The authors' `batch_norm_multiple` over BatchNorm2d: bn_list.0 is the "pgd" (adv) BN, bn_list.1 "normal"."""
    return {(s, b): f"bn_list.{i}.{s}" for i, b in enumerate(BRANCHES) for s in STATS}


def _two_ap(adv_split: str) -> Leaves:
    """The authors' `Disentangling_LP` (in `bn_layer`): shared running NS, weight_pgd/bias_pgd and _normal AP."""
    ap = {(s, b): f"bn_layer.{s}_{tag}" for b, tag in TAGS.items() for s in AP_PARAMS}
    return ap | {(s, SHARED): f"bn_layer.{s}" for s in NS_BUFFERS}


def _two_ns(adv_split: str) -> Leaves:
    """The authors' `Disentangling_StatP` (in `bn_layer`): running_mean/var_pgd and _normal, one AP (weight_pgd,
    bias_pgd) and one batch counter."""
    ap = {(s, SHARED): f"bn_layer.{s}_pgd" for s in AP_PARAMS}
    ns = {(s, b): f"bn_layer.{s}_{tag}" for b, tag in TAGS.items() for s in ("running_mean", "running_var")}
    return ap | ns | {("num_batches_tracked", b): "bn_layer.num_batches_tracked" for b in BRANCHES}


def _split(adv_split: str) -> Leaves:
    """timm's SplitBatchNorm2d: the main BN under the plain names, the auxiliary one under aux_bn.0."""
    aux, main = ("adv", "clean") if adv_split == "aux" else ("clean", "adv")
    return {(s, main): s for s in STATS} | {(s, aux): f"aux_bn.0.{s}" for s in STATS}


@dataclass(frozen=True)
class Layout:
    """One foreign naming of a network: hybridat module path -> foreign path (regex substitutions in order),
    the norm layers' format, the variant it becomes, and foreign keys the foreign model holds but never uses."""

    name: str
    archs: tuple[str, ...]
    doc: str
    renames: tuple[tuple[str, str], ...] = ()
    leaves: Callable[[str], Leaves] = _plain
    norm: str = "bn"
    ignore: tuple[str, ...] = ()
    base: str | None = None  # timm-splitbn: the plain layout it was found on

    def foreign(self, module: str) -> str:
        for pattern, repl in self.renames:
            module = re.sub(pattern, repl, module)
        return module

    @property
    def label(self) -> str:
        return f"{self.name} ({self.base})" if self.base else self.name


_AUTHORS = ((r"\.shortcut\.0$", ".downsample.conv"), (r"\.shortcut\.1$", ".downsample.bn"), (r"^linear$", "fc"))
_UNUSED_BN_LIST = (r"\.bn_list\.\d+\.",)  # batch_norm_multiple builds bn_list beside bn_layer and never calls it
_RESNETS = ("resnet18",)
LAYOUTS: dict[str, Layout] = {l.name: l for l in [
    Layout("kuangliu", _RESNETS, "CIFAR ResNet-18 of kuangliu/pytorch-cifar (`shortcut`, `linear`), also "
           "AutoAttack's example model; hybridat's own names"),
    Layout("torchvision", _RESNETS, "torchvision-style ResNet-18 with a CIFAR stem (`downsample.0/1`, `fc`)",
           ((r"\.shortcut\.0$", ".downsample.0"), (r"\.shortcut\.1$", ".downsample.1"), (r"^linear$", "fc"))),
    Layout("preact", ("preact18",), "PreAct ResNet-18 of the fast-AT / robust-overfitting code and RobustBench "
           "(`shortcut.0`, final `bn`, `linear`)", ((r"\.shortcut$", ".shortcut.0"), (r"^bn_final$", "bn"))),
    Layout("trades-wrn", ("wrn34-10", "wrn28-10"), "WideResNet of TRADES and RobustBench (`block1.layer.0`, "
           "`convShortcut`, `fc`; TRADES's unused `sub_block1` is skipped)",
           ((r"^block(\d)\.(\d+)\.", r"block\1.layer.\2."), (r"\.shortcut$", ".convShortcut")),
           ignore=(r"^sub_block1\.",)),
    Layout("authors-dual-bn", _RESNETS, "Dual BN code of the paper's authors: every BN a `bn_list` of two, "
           "0 = adv (pgd), 1 = clean (normal)", _AUTHORS, _bn_list, "dual-bn"),
    Layout("authors-dual-ap", _RESNETS, "the authors' two-AP / shared-NS layer (`bn_layer`, Disentangling_LP)",
           _AUTHORS, _two_ap, "dual-ap", _UNUSED_BN_LIST),
    Layout("authors-dual-ns", _RESNETS, "the authors' two-NS / shared-AP layer (`bn_layer`, Disentangling_StatP)",
           _AUTHORS, _two_ns, "dual-ns", _UNUSED_BN_LIST),
    Layout("timm-splitbn", (), "timm SplitBatchNorm2d / AdvProp over any plain layout above: main BN under the "
           "plain keys, auxiliary BN under `aux_bn.0` (--adv-split says which is adversarial)", leaves=_split,
           norm="dual-bn"),
]}
PLAIN = ("kuangliu", "torchvision", "preact", "trades-wrn")


def _concrete(name: str) -> list[Layout]:
    """The layouts `name` stands for: timm-splitbn is tried over every plain layout."""
    if not isinstance(name, str) or name not in LAYOUTS:  # a list: TypeError (unhashable)
        raise HybridatError(f"unknown layout {name!r}; choose one of: auto, {', '.join(LAYOUTS)}")
    layout = LAYOUTS[name]
    if name != "timm-splitbn":
        return [layout]
    return [replace(LAYOUTS[p], name=name, leaves=layout.leaves, norm=layout.norm, base=p) for p in PLAIN]


# ----------------------------------------------------------------------------------------------------------------
# reading a foreign file


def _kind(path: Path) -> str:
    """'torch' (zip or legacy pickle) or 'safetensors', from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if is_torch_save(head):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise HybridatError(f"{path} is neither a torch file (.pt/.pth) nor a safetensors file")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_error(e: Exception) -> str:
    """What torch.load(weights_only=True) found wrong: the unpickler's own reason (e.g. "Unsupported global: GLOBAL
    __main__.Net"), not torch's preamble about re-running with weights_only=False, which would run the file's code."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = next((line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()), "")
        if reason:
            return reason
    return _first_line(e)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside the usual containers ({'state_dict': ...}, {'model': ...}, {'net': ...})."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in CONTAINERS if isinstance(obj.get(k), dict)), None)
        if inner is not None:
            obj = inner
            continue
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return _strip(dict(obj))
        break
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise HybridatError(f"{path} holds no state dict of tensors (found {keys}); expected one, or one under "
                        f"{', '.join(CONTAINERS)}")


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a prefix every key shares (module., model., _orig_mod.), as often as it repeats."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                changed = True
    return state


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A foreign file's state dict (unwrapped, prefixes stripped) and its safetensors metadata ({} for torch)."""
    path = Path(path)
    if path.is_dir():
        raise HybridatError(f"{path} is a folder; give the checkpoint file (.pt, .pth or .safetensors)")
    if not path.is_file():
        raise HybridatError(f"no file at {path}")
    if _kind(path) == "safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                return _strip({k: f.get_tensor(k) for k in f.keys()}), dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise HybridatError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    try:
        with warnings.catch_warnings():  # torch warns of the pickle protocol of files it then reads or refuses
            warnings.simplefilter("ignore")
            with open(path, "rb") as f:  # a file object: torch reads a path ending in .safetensors as safetensors
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever the unpickler refuses, the answer is one line
        raise HybridatError(f"{path} does not load with torch.load(weights_only=True), which never runs code from "
                            f"the file (a pickled model object needs code: save its state_dict() instead): "
                            f"{_load_error(e)}") from None
    return _unwrap(obj, path), {}


# ----------------------------------------------------------------------------------------------------------------
# the plan: hybridat key -> foreign key


def _parse(leaf: str) -> tuple[str, str]:
    """'running_mean_adv' -> ('running_mean', 'adv'); 'weight' -> ('weight', 'shared')."""
    for stat in STATS:
        if leaf == stat:
            return stat, SHARED
        for b in BRANCHES:
            if leaf == f"{stat}_{b}":
                return stat, b
    raise ValueError(leaf)


def plan(model: BranchModel, layout: Layout, adv_split: str = "aux") -> dict[str, str]:
    """For every key of `model`'s state dict, the foreign key holding its value in `layout`."""
    norms = {name: m for name, m in norm_layers(model)}
    leaves = layout.leaves(adv_split)
    out = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        if module in norms:
            if not isinstance(norms[module], BranchBatchNorm):
                raise HybridatError(f"--norm {model.config.norm} has no batch norm; layouts hold BatchNorm2d layers")
            stat, set_key = _parse(leaf)
            leaf = leaves.get((stat, set_key)) or leaves.get((stat, SHARED))
            if leaf is None:
                raise HybridatError(f"layout {layout.name} keeps a {stat} per branch; --norm {model.config.norm} "
                                    f"has one set: import it as {layout.norm} (or export one branch)")
        out[key] = f"{layout.foreign(module)}.{leaf}"
    return out


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def problems(model: BranchModel, layout: Layout, state: dict[str, torch.Tensor],
             adv_split: str = "aux") -> tuple[int, list[str]]:
    """Why `state` is not `model` in `layout`: (number of bad keys, one phrase per kind: missing keys, keys left
    over, shapes); (0, []) when it maps exactly."""
    mapping = plan(model, layout, adv_split)
    target = model.state_dict()
    optional = {f for h, f in mapping.items() if h.rpartition(".")[2].startswith("num_batches_tracked")}
    missing = [f for f in dict.fromkeys(mapping.values()) if f not in state and f not in optional]
    used = set(mapping.values())
    extra = [k for k in state if k not in used and not any(re.search(p, k) for p in layout.ignore)]
    shapes = [f"{f} is {tuple(state[f].shape)}, expected {tuple(target[h].shape)}" for h, f in mapping.items()
              if f in state and state[f].shape != target[h].shape]
    phrases = [f"{len(keys)} {what} ({_names(keys)})" for keys, what in
               [(missing, "keys missing"), (extra, "keys not mapped"), (shapes, "shapes differ")] if keys]
    return len(missing) + len(extra) + len(shapes), phrases


def _config(arch: str, layout: Layout, state: dict, norm: str | None, num_classes: int | None,
            mean, std) -> ModelConfig:
    """The config `state` would have as `arch` in `layout`: width from conv1, classes from the head (where they
    are missing, width 1 and 10 classes, and the missing keys are named later)."""
    stem, head = state.get("conv1.weight"), state.get(layout.foreign("fc" if arch.startswith("wrn") else "linear")
                                                      + ".weight")
    width = stem.shape[0] / STEM[arch] if stem is not None and stem.dim() == 4 else 1.0
    classes = num_classes or (head.shape[0] if head is not None and head.dim() == 2 else 10)
    return ModelConfig(arch, norm or layout.norm, width, classes, mean, std)


def _skeleton(config: ModelConfig) -> BranchModel:
    """The model's structure without memory: keys, shapes and norm layers only."""
    with torch.device("meta"):
        return build_model(config)


@dataclass
class Match:
    layout: Layout
    config: ModelConfig
    bad: int  # keys that do not map (0 = exact)
    problems: list[str]


def match(state: dict[str, torch.Tensor], *, arch: str | None = None, layout: str = "auto", norm: str | None = None,
          num_classes: int | None = None, input_mean=None, input_std=None, adv_split: str = "aux") -> Match:
    """The (layout, config) under which `state` is exactly a hybridat model. When there is none, a HybridatError
    naming the first missing or unmapped keys of the closest candidate."""
    if adv_split not in ("aux", "main"):
        raise HybridatError(f"adv split must be 'aux' or 'main', got {adv_split!r}")
    if arch is not None:
        check_choice(arch, ARCHS, "arch")
    if num_classes is not None:  # 0 was taken for "not given" and the head's classes used instead
        check_number("num_classes", num_classes, 2, 100_000, integer=True)
    if norm is not None:
        spec = NORMS.get(norm) if isinstance(norm, str) else None
        if spec is None or spec.ns_sets == 0 or spec.dual_head or spec.adapters:
            fits = [name for name, s in NORMS.items() if s.ns_sets and not s.dual_head and not s.adapters]
            what = "unknown norm" if spec is None else "--norm must be a batch-norm variant without extra heads or " \
                                                       "adapters, got"
            raise HybridatError(f"{what} {norm!r}; choose one of: {', '.join(fits)}")
    layouts = [lay for name in (LAYOUTS if layout == "auto" else [layout]) for lay in _concrete(name)]
    candidates = [(lay, a) for lay in layouts for a in lay.archs if arch in (None, a)]
    if not candidates:
        archs = sorted({a for lay in layouts for a in lay.archs})
        raise HybridatError(f"layout {layout} is for {', '.join(archs)}, not {arch}")
    # the layout is found with its own variant; --norm then only changes what the sets become
    found = []
    for lay, a in candidates:
        config = _config(a, lay, state, None, num_classes, input_mean, input_std)
        found.append(Match(lay, config, *problems(_skeleton(config), lay, state, adv_split)))
    best = min(found, key=lambda m: m.bad)
    if best.bad:
        closest = " (the closest of every layout and arch tried)" if len(found) > 1 else ""
        raise HybridatError(f"the state dict does not map as {best.config.arch} in layout {best.layout.label}"
                            f"{closest}: " + "; ".join(best.problems))
    if norm is None or norm == best.config.norm:
        return best
    config = replace(best.config, norm=norm)
    bad, phrases = problems(_skeleton(config), best.layout, state, adv_split)
    if bad:
        raise HybridatError(f"layout {best.layout.label} does not map to --norm {norm}: " + "; ".join(phrases))
    return Match(best.layout, config, 0, [])


def load_foreign(state: dict[str, torch.Tensor], found: Match, adv_split: str = "aux") -> BranchModel:
    """A hybridat model holding `state`'s values, as `found` (from `match`) maps them."""
    model = model_for_weights(found.config)
    mapping = plan(model, found.layout, adv_split)
    values = {h: state[f] if f in state else torch.zeros((), dtype=torch.long) for h, f in mapping.items()}
    model.load_state_dict(values, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# import and export


@dataclass
class Imported:
    model: BranchModel
    layout: str
    path: Path | None = None
    hash: str | None = None


def _triple(value, what: str) -> tuple[float, float, float] | None:
    """'0.49,0.48,0.45' (or '[0.49, 0.48, 0.45]') or a sequence of 3 numbers -> a tuple of 3 floats."""
    if value is None:
        return None
    try:
        parts = [float(v) for v in (value.strip("[]").split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 3:
        raise HybridatError(f"{what} takes three numbers R,G,B (e.g. 0.4914,0.4822,0.4465), got {value!r}")
    return tuple(parts)


def import_checkpoint(src: str | Path, out: str | Path | None = None, *, arch: str | None = None,
                      layout: str = "auto", norm: str | None = None, num_classes: int | None = None,
                      input_mean=None, input_std=None, adv_split: str | None = None,
                      dataset: str = "cifar10", seed: int | None = None, loss: str | None = None,
                      eps: float | None = None) -> Imported:
    """Read a foreign .pt/.pth/.safetensors checkpoint as a hybridat model; write it to `out` if given.

    The layout ('auto' tries every one), the arch, the width (from conv1) and the classes (from the head) are
    found from the keys unless given; `norm` defaults to the layout's variant. input_mean/std (R,G,B) make the
    model normalize its [0, 1] input itself, for models trained on normalized inputs; a file written by
    `export_branch` carries them. adv_split: which split of a timm SplitBatchNorm2d model is the adversarial
    one ('aux', as AdvProp trains it and the default, or 'main'; refused for a file of another layout).
    dataset: the one it was trained on, which later stages read by default. seed, loss, eps (pixel units): how it
    was trained, where known, recorded as `train` records them, so that `report` sets its rows in the tables and
    Findings (without them: among the rows no table shows).
    The checkpoint's metadata records the source's name and hash, the layout and `imported`.
    Returns an Imported: `.model` (eval mode, on the CPU), `.layout` (the one found), and where `out` was written
    `.path` and `.hash` (the new checkpoint's `checkpoint_hash`).
    """
    check_choice(dataset, DATASETS, "dataset")
    training = _training(dataset, seed, loss, eps)
    if adv_split is not None:
        check_choice(adv_split, ADV_SPLITS, "--adv-split")
    src = as_path(src, "the checkpoint to import")
    if out is not None:
        check_outputs([out], [src])  # never over the source (path, link, hardlink); writable; before any work
        check_checkpoint_name(out)
    state, meta = read_state_dict(src)
    if "hybridat.format" in meta:
        raise HybridatError(f"{src} is already a hybridat checkpoint: every stage reads it as it is")
    if is_resume_state(meta):
        raise HybridatError(f"{src} is a hybridat training run's resume state, not a checkpoint of other code; the "
                            f"run's latest model is {src.parent / 'last.safetensors'}, which every stage reads as it "
                            "is")
    bad = [k for k, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
           and not torch.isfinite(t).all()]
    if bad:  # every stage would refuse the model: refused here, before a checkpoint is written
        raise HybridatError(f"{src} has non-finite weights (NaN or inf) in {len(bad)} tensors, e.g. {bad[0]}")
    mean, std = _triple(input_mean, "--input-mean"), _triple(input_std, "--input-std")
    if mean is None and std is None and "input_mean" in meta:  # written by export_branch
        mean, std = _triple(meta["input_mean"], "input_mean"), _triple(meta.get("input_std"), "input_std")
    if (mean is None) != (std is None):
        raise HybridatError("--input-mean and --input-std go together: give both or neither")
    split = adv_split or "aux"
    found = match(state, arch=arch, layout=layout, norm=norm, num_classes=num_classes, input_mean=mean,
                  input_std=std, adv_split=split)
    if adv_split is not None and not found.layout.base:  # it would be ignored: the file has one BN per layer
        raise HybridatError(f"--adv-split applies to timm-splitbn files (two BNs per layer); {src} has layout "
                            f"{found.layout.label}")
    model = load_foreign(state, found, split)
    check_classes(dataset, model.config.num_classes)
    result = Imported(model, found.layout.label)
    if out is not None:
        record = {"source": src.name, "source_hash": file_hash(src), "layout": found.layout.name,
                  "imported": True}
        if found.layout.base:
            record |= {"base_layout": found.layout.base, "adv_split": split}
        result.path = Path(out)
        seeded = {} if seed is None else {"seed": str(seed)}  # as `train` records it
        result.hash = save_checkpoint(model, out, imported=record, train=training, **seeded)
    return result


def _training(dataset: str, seed: int | None, loss: str | None, eps: float | None) -> dict:
    """The `train` metadata of an imported model: its dataset, and the loss and ε it was trained with if given."""
    from .train import LOSSES

    if seed is not None:
        check_number("seed", seed, 0, 2**63 - 1, integer=True)
    training = {"dataset": dataset}
    if loss is not None:
        training["loss"] = check_choice(loss, LOSSES, "loss")
    if eps is not None:
        training["eps"] = float(check_pixel_radius(eps))
    return training


def branch_state(model: BranchModel, branch: str) -> dict[str, torch.Tensor]:
    """`branch` of `model` as the state dict of a single-BN (`bn`) model: every norm layer becomes the plain
    BatchNorm2d that does in eval mode what the layer does to `branch` rows (its running NS, its AP; no AP =
    weight 1, bias 0); a per-branch head becomes the branch's head."""
    if branch not in BRANCHES:
        raise HybridatError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
    spec = NORMS[model.config.norm]
    if spec.adapters:
        raise HybridatError(f"{model.config.norm} has per-branch adapters, which no single-BN layout holds")
    norms = dict(norm_layers(model))
    state = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in norms:
            continue
        if spec.dual_head and module.endswith(f".heads.{branch}"):
            state[f"{module.removesuffix(f'.heads.{branch}')}.{leaf}"] = value
        elif ".heads." not in module:
            state[key] = value
    for name, layer in norms.items():
        if not isinstance(layer, BranchBatchNorm):
            raise HybridatError(f"{model.config.norm} has no batch norm; a single-BN layout cannot hold it")
        ns = layer.eval_key(branch)
        weight, bias = layer.affine(branch)
        state |= {f"{name}.weight": torch.ones(layer.num_features) if weight is None else weight,
                  f"{name}.bias": torch.zeros(layer.num_features) if bias is None else bias}
        state |= {f"{name}.{base}": getattr(layer, set_name(base, ns)) for base in NS_BUFFERS}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_state_dict(model: BranchModel, branch: str, layout: str) -> dict[str, torch.Tensor]:
    """`branch` of `model` as a plain state dict under `layout`'s names (a plain single-BN layout)."""
    if layout not in PLAIN:
        raise HybridatError(f"export writes one branch as plain single-BN keys; layout must be one of "
                            f"{', '.join(PLAIN)}, got {layout!r}")
    lay = LAYOUTS[layout]
    if model.config.arch not in lay.archs:
        raise HybridatError(f"layout {layout} is for {', '.join(lay.archs)}; the checkpoint is {model.config.arch}")
    single = replace(model.config, norm="bn", input_mean=None, input_std=None)
    state = branch_state(model, branch)
    return {f: state[h] for h, f in plan(_skeleton(single), lay).items()}


@dataclass
class Exported:
    path: Path
    config: ModelConfig  # of the checkpoint the branch came from (its input mean/std, if any, apply)


def export_branch(checkpoint: str | Path | Checkpoint, out: str | Path, *, branch: str, layout: str) -> Exported:
    """Write `branch` of a hybridat checkpoint (its path, or a loaded Checkpoint) as a plain single-BN state dict in
    a foreign layout: safetensors (with the input mean/std, if any, in its metadata), or a torch `.pt`/`.pth` state
    dict by the suffix of `out`. Never writes over the checkpoint. Returns an Exported: the path written and the
    config of the checkpoint it came from."""
    out = as_path(out, "out")
    loaded = checkpoint if isinstance(checkpoint, Checkpoint) else None
    checkpoint = loaded.path if loaded is not None else as_path(checkpoint, "checkpoint (a path or a Checkpoint)")
    check_outputs([out], [checkpoint])  # never over the checkpoint (path, link, hardlink); writable; before any work
    ckpt = loaded or load_checkpoint(checkpoint)
    ckpt.check_unchanged()  # the export records its source's hash
    if out.suffix not in (".safetensors", ".pt", ".pth"):
        raise HybridatError(f"--out must end in .safetensors, .pt or .pth, got {out.name}")
    state = export_state_dict(ckpt.model, branch, layout)
    config = ckpt.config
    with atomic_path(out) as tmp:
        if out.suffix == ".safetensors":
            meta = {"layout": layout, "branch": branch, "source_hash": ckpt.hash,
                    "exported_by": f"hybridat {__version__}"}
            if config.input_mean is not None:
                meta |= {key: json.dumps(list(getattr(config, key))) for key in ("input_mean", "input_std")}
            save_file(state, tmp, metadata=meta)
        else:  # torch.save reports a failed write (a full disk) as a RuntimeError without errno or path; a
            # plain write of its bytes raises the OSError that names both. Bytes, not a view of the buffer: with
            # getbuffer() a failed write ended, after its error line, in a segfault at exit under torch 2.11
            buffer = io.BytesIO()
            torch.save(state, buffer)
            tmp.write_bytes(buffer.getvalue())
    return Exported(out, config)
