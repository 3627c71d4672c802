"""Checks of what a notebook passes to the library's entry points (`evaluate`, `ns_gap`, `recombine`, ...): one
HybridatError line for a wrong type, a tensor on another device, pixels outside [0, 1], labels of the wrong dtype
or length, or ε in [0, 1] units where pixel units are meant, rather than a torch traceback deep inside or a
silently wrong number."""

from __future__ import annotations

import operator

import torch
from torch import nn

from .errors import HybridatError, check_number


def module_of(model, what: str = "model") -> nn.Module:
    """The network behind `model`: a torch.nn.Module as it is, a loaded `Checkpoint`'s model; anything else (a
    path, say) is refused with one line."""
    from .checkpoint import Checkpoint

    if isinstance(model, Checkpoint):
        return model.model
    if isinstance(model, nn.Module):
        return model
    hint = " (load it first: hybridat.load_checkpoint(path))" if isinstance(model, str) or hasattr(model, "suffix") \
        else ""
    raise HybridatError(f"{what} must be a torch.nn.Module or a hybridat Checkpoint, got "
                        f"{type(model).__name__}{hint}")


def attacked_module(model) -> nn.Module:
    """`model` if it is a torch.nn.Module an attack can call as model(x) -> logits; a loaded Checkpoint (no branch
    chosen) or anything else gets one line."""
    from .checkpoint import Checkpoint

    if isinstance(model, Checkpoint):
        raise HybridatError("an attack goes through one branch of the checkpoint's model: "
                            "hybridat.models.BranchView(ckpt.model, 'adv') (or 'clean')")
    if not isinstance(model, nn.Module):
        raise HybridatError(f"model must be a torch.nn.Module mapping pixels to logits, got {type(model).__name__}")
    return model


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for a module without tensors)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def check_same_device(model: nn.Module, data: torch.Tensor, what: str = "x") -> None:
    """One line unless the model's tensors are on `data`'s device."""
    device = model_device(model)
    if device is not None and device != data.device:
        raise HybridatError(f"the model is on {device}, {what} on {data.device}: move one of them (.to(device))")


def check_pixels(x, what: str = "x") -> torch.Tensor:
    """x if it is a float tensor (B, C, H, W), B >= 1, of finite pixels in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise HybridatError(f"{what} must be a torch.Tensor (B, 3, H, W) of pixels in [0, 1], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[0] == 0:
        raise HybridatError(f"{what} must have the shape (B, C, H, W) with B >= 1, got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        raise HybridatError(f"{what} is uint8 (0-255); pixels are floats in [0, 1]: hybridat.data.to_float(x)")
    if not x.is_floating_point():
        raise HybridatError(f"{what} must be a float tensor of pixels in [0, 1], got {x.dtype}")
    if x.device.type == "meta":
        raise HybridatError(f"{what} is on the meta device: it holds no values")
    if not torch.isfinite(x).all():
        raise HybridatError(f"{what} holds NaN or infinite values")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise HybridatError(f"{what} holds values in [{lo:.4g}, {hi:.4g}]; pixels must be in [0, 1] (divide 0-255 "
                            "images by 255; no mean/std normalization: a model trained on normalized inputs "
                            "normalizes itself, see `hybridat import --input-mean`)")
    return x


def check_labels(y, x: torch.Tensor, num_classes: int | None = None, what: str = "y") -> torch.Tensor:
    """y if it holds one integer class label per image of x (shape (B,)), on x's device, in [0, num_classes)."""
    if not isinstance(y, torch.Tensor):
        raise HybridatError(f"{what} must be a torch.Tensor of class labels (B,), got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise HybridatError(f"{what} must have one label per image, shape ({x.shape[0]},), got {tuple(y.shape)}")
    check_label_dtype(y, what)
    if y.device != x.device:
        raise HybridatError(f"{what} is on {y.device}, x on {x.device}: put them on one device")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        classes = f" (the model has {num_classes} classes)" if num_classes is not None else ""
        raise HybridatError(f"{what} holds labels in [{lo}, {hi}]; class labels run from 0 to "
                            f"{'K - 1' if num_classes is None else num_classes - 1}{classes}")
    return y


LABEL_DTYPES = (torch.long, torch.uint8)  # what cross_entropy takes as class targets


def check_label_dtype(y: torch.Tensor, what: str = "y") -> None:
    """One line unless y's dtype is one cross_entropy takes (int32 labels failed deep inside it). No host sync."""
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise HybridatError(f"{what} must hold integer class labels (torch.long), got {y.dtype}")
    if y.dtype not in LABEL_DTYPES:
        raise HybridatError(f"{what} must hold class labels as torch.long (int64), got {y.dtype} labels: "
                            f"{what}.long()")


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter or buffer (None for a module without one)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


CASTS = {torch.float32: "float", torch.float64: "double", torch.float16: "half", torch.bfloat16: "bfloat16"}


def model_classes(model: nn.Module) -> int | None:
    """The number of classes of a hybridat model (or a BranchView of one); None for any other module."""
    from .models import BranchView

    if isinstance(model, BranchView):  # what attacks take: the labels were then never checked against the classes
        model = model.model
    return getattr(getattr(model, "config", None), "num_classes", None)


def check_channels(model: nn.Module, x: torch.Tensor, what: str = "x") -> None:
    """One line unless x has the colour channels the model's first convolution takes (a grayscale batch failed
    inside that convolution with a RuntimeError)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and x.shape[1] != conv.in_channels:
        raise HybridatError(f"{what} has {x.shape[1]} channels and the model takes {conv.in_channels}: images are "
                            f"(N, {conv.in_channels}, H, W)")


def check_batch(model: nn.Module, x, y) -> None:
    """x and y as `check_pixels` and `check_labels` want them, on the model's device, x in the dtype of the model's
    weights (float64 pixels from numpy failed inside a convolution); labels within the classes of a hybridat model."""
    check_pixels(x)
    check_labels(y, x, model_classes(model))
    check_same_device(model, x)
    check_channels(model, x)
    dtype = model_dtype(model)
    if dtype is not None and x.dtype != dtype:
        cast = f"x.{CASTS[dtype]}()" if dtype in CASTS else f"x.to({dtype})"
        raise HybridatError(f"x is {x.dtype}, the model's weights are {dtype}: {cast}")


def check_split(model: nn.Module, split, hint: str = "hybridat.data.load_split(...)",
                num_classes: int | None = None) -> None:
    """One line unless `split` is a hybridat.data.Split as `load_split` gives it: uint8 images (N, C, H, W), N >= 1,
    and one integer label each (in [0, num_classes) where given), on the model's device. hint: how the caller's
    split is made, for the message."""
    from .data import Split

    if not isinstance(split, Split):
        raise HybridatError(f"split must be a hybridat.data.Split ({hint}), got {type(split).__name__}")
    images = split.images
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise HybridatError(f"split.images must have the shape (N, C, H, W), got "
                            f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    if images.dtype != torch.uint8:
        raise HybridatError(f"split.images must be uint8 (0-255), as load_split gives them, got {images.dtype} (float "
                            "pixels x in [0, 1]: Split((x * 255).round().to(torch.uint8), y))")
    if images.shape[0] == 0:
        raise HybridatError("the split holds no images")
    check_same_device(model, images, "the split")
    check_channels(model, images, "split.images")
    check_labels(split.labels, images, num_classes, what="split.labels")


def check_pixel_eps(eps: float, what: str = "eps") -> float:
    """`eps` (pixel units: 8 means 8/255) unless it is exactly k/255 for a k in 1..32, i.e. the [0, 1] value of a
    usual radius given where pixel units are meant (read in pixel units it is k/255²)."""
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1:
        k = round(eps * 255)
        if 1 <= k <= 32 and abs(eps * 255 - k) < 1e-9:
            raise HybridatError(f"{what} is in pixel units (8 means 8/255); {eps:.6g} is {k}/255 in [0, 1] units, "
                                f"which read in pixel units is {k}/255²: give {what}={k}")
    return eps


def check_pixel_radius(value: float, what: str = "eps", low_open: bool = False) -> float:
    """An ε or PGD step on the command line's scale: a finite number in [0, 255] (low_open: above 0), and not the
    [0, 1] form of a usual radius (`check_pixel_eps`)."""
    check_number(what, value, 0, 255, low_open=low_open)
    return check_pixel_eps(value, what)


def check_flag(value, what: str) -> bool:
    """`value` if it is a bool (a string such as "no" would count as true)."""
    if not isinstance(value, bool):
        raise HybridatError(f"{what} must be True or False, got {value!r}")
    return value


def check_callback(value, what: str):
    """`value` if it is None or callable: a progress callback that is neither failed at its first call, after the
    work (and some of its files) had started."""
    if value is not None and not callable(value):
        raise HybridatError(f"{what} must be a function or None, got {type(value).__name__}")
    return value


def layer_indices(layers) -> list[int] | None:
    """`layers` (an iterable of integer indices, None = all) as a list of ints; one line for anything else."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise HybridatError(f"layers must be a list of norm-layer indices (e.g. [10, 11]), got {layers!r}")
    out = []
    for i in layers:
        try:
            if isinstance(i, bool):
                raise TypeError
            out.append(operator.index(i))
        except TypeError:
            raise HybridatError(f"layer indices must be integers, got {i!r}") from None
    return out
