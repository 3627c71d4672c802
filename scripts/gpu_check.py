"""GPU check of hybridat's graph path, in one process: graph == eager (training and PGD), then one table.

Run by scripts/gpu-check.sh (which also writes the CIFAR-10-shaped folder of random pixels with
`write_synthetic_cifar` and times `hybridat train` epochs and `hybridat bench`). Usage:
    python3 scripts/gpu_check.py OUT_DIR [DEVICE [smoke]]
DEVICE defaults to cuda; `smoke` runs every check at toy scale (on a CPU graphs take their eager stand-in, so
graph == eager holds exactly there): what CI runs to keep this script working between GPU sessions."""

from __future__ import annotations

import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybridat.attacks import _start, crafting, pgd_accuracy, pgd_from, robust_accuracy
from hybridat.bench import synthetic_split
from hybridat.graphs import Graphed, graphs_supported
from hybridat.models import BranchView, ModelConfig, build_model
from hybridat.runtime import autocast, tune_host
from hybridat.train import TrainConfig, train


@dataclass(frozen=True)
class Scale:
    width: float  # ResNet-18 channel multiplier
    batch: int  # training images per branch per step
    steps: int  # full training steps per check (one partial batch follows)
    pgd_n: int  # images PGD's accuracy is counted on
    pgd_batch: int  # PGD batch (`hybridat attack`'s is 500)


SCALES = {"gpu": Scale(width=1.0, batch=128, steps=12, pgd_n=2000, pgd_batch=500),
          "smoke": Scale(width=0.0625, batch=16, steps=2, pgd_n=32, pgd_batch=16)}


def write_synthetic_cifar(root: Path, seed: int = 0, per_file: int = 10_000) -> None:
    """cifar-10-batches-py/ with 5 x per_file training and per_file test images of random pixels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_file).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_train(graphs: bool, amp: bool, scale: Scale, device: torch.device, seed: int = 0):
    """`train` for one epoch of `scale.steps` full batches plus a partial one, ResNet-18 dual-bn, from seed."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig("resnet18", "dual-bn", scale.width)).to(device)
    split = synthetic_split(scale.batch * scale.steps + scale.batch * 5 // 16, device, seed=1)  # 40 at 128
    cfg = TrainConfig(batch_size=scale.batch, steps=10, epochs=1, amp=amp)
    torch.manual_seed(seed + 100)  # the attack's noise
    rows = list(train(model, split, cfg, torch.Generator().manual_seed(seed), graphs=graphs))
    return rows[0], {k: v.detach().double() for k, v in model.state_dict().items()}


def max_rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / (b[k].norm() + 1e-12)).item() for k in b if b[k].is_floating_point())


def check_training(amp: bool, scale: Scale, device: torch.device, deterministic: bool = False) -> dict:
    """Graph vs eager and eager vs eager (cuDNN's own run-to-run spread) after `scale.steps` + 1 steps;
    deterministic: with cuDNN's deterministic algorithms only, where eager runs repeat exactly."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic
    try:
        g_row, g_state = run_train(True, amp, scale, device)
        e_row, e_state = run_train(False, amp, scale, device)
        e2_row, e2_state = run_train(False, amp, scale, device)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    return {"what": f"train {'bf16' if amp else 'fp32'}{' deterministic' if deterministic else ''}, "
                    f"{scale.steps + 1} steps",
            "graph_loss": g_row["loss"], "eager_loss": e_row["loss"], "eager2_loss": e2_row["loss"],
            "weights_rel_graph_vs_eager": max_rel(g_state, e_state),
            "weights_rel_eager_vs_eager": max_rel(e2_state, e_state)}


def check_pgd(scale: Scale, device: torch.device, amp: bool = False) -> dict:
    """The same PGD-20 examples from one start, captured vs eager; and the accuracy over `scale.pgd_n` images. amp:
    the examples crafted in bf16 (`attack --amp`), and the fp32 accuracy beside it."""
    torch.manual_seed(0)
    model = BranchView(build_model(ModelConfig("resnet18", "dual-bn", scale.width)).to(device).eval(), "adv")
    x = torch.rand(scale.pgd_n, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (scale.pgd_n,), device=device)
    eps, step, b = 8 / 255, 2 / 255, scale.pgd_batch
    start = _start(x[:b], eps, "uniform", "linf", torch.Generator(device).manual_seed(3))
    capture = graphs_supported(device)
    out = {}
    with crafting(model, x.device, amp) as net:
        def fn():
            s = graph.static
            with autocast(x.device, amp):
                out["adv"] = pgd_from(net, s["x"], s["y"], s["start"], eps, step, 20)
        with autocast(x.device, amp):
            eager = pgd_from(net, x[:b], y[:b], start, eps, step, 20)
        graph = Graphed(fn, capture)
        for _ in range(2):  # the first eagerly (warm-up), the second captured and replayed
            graph.run(x=x[:b], y=y[:b], start=start)
        synchronize(device)
    acc_graph = pgd_accuracy(model, x, y, eps, step, 20, b, seed=0, capture=capture, amp=amp).item() / len(y)
    acc_eager = robust_accuracy(model, x, y, "pgd", eps, step, 20, batch_size=b, seed=0, graphs=False, amp=amp)
    diff = (out["adv"] - eager).abs()
    result = {"what": f"PGD-20 {'bf16' if amp else 'fp32'}, {b} examples; accuracy on {scale.pgd_n:,}",
              "examples_max_abs_diff": diff.max().item(), "examples_differing": int((diff > 0).sum().item()),
              "examples_total": diff.numel(), "acc_graph": acc_graph, "acc_eager": acc_eager}
    if amp:
        result["acc_fp32"] = robust_accuracy(model, x, y, "pgd", eps, step, 20, batch_size=b, seed=0)
    return result


def main(out_dir: str, device: str = "cuda", scale: str = "gpu") -> None:
    out, dev, size = Path(out_dir), torch.device(device), SCALES[scale]
    tune_host(dev)
    results = []
    checks = (("pgd", lambda: check_pgd(size, dev)), ("pgd bf16", lambda: check_pgd(size, dev, amp=True)),
              ("train fp32", lambda: check_training(False, size, dev)),
              ("train fp32 deterministic", lambda: check_training(False, size, dev, deterministic=True)),
              ("train bf16", lambda: check_training(True, size, dev)))
    for name, check in checks:
        try:
            results.append(check())
        except Exception as e:  # report it and go on with the other checks
            import traceback
            traceback.print_exc()
            results.append({"what": name, "error": repr(e)})
        print(json.dumps(results[-1]), flush=True)
        (out / "checks.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
