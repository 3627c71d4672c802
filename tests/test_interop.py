"""`hybridat import` / `export`: every foreign layout imports with the foreign network's logits through every
branch, an export imports back to the same logits, and hostile files are refused in one line."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import hybridat
from hybridat.checkpoint import load_checkpoint, save_checkpoint
from hybridat.cli import app
from hybridat.errors import HybridatError
from hybridat.interop import LAYOUTS, PLAIN, export_state_dict, import_checkpoint, read_state_dict
from hybridat.models import ModelConfig, build_model

from foreign_models import (AuthorsResNet18, PreActResNet18, TradesWideResNet, convert_splitbn, randomize,
                            split_view)

W = 0.125  # width of the small reference networks
AUTOATTACK_MODEL = Path(__import__("pyautoattack").__file__).parent / "examples" / "model_test.pt"


class Plain(nn.Module):
    """A single-BN foreign model seen as model(x, branch): both branches are the one network."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, branch=None):
        return self.model(x)


class Split(nn.Module):
    """A SplitBN model seen as model(x, branch): the adversarial branch is the `adv_split` split."""

    def __init__(self, model, adv_split):
        super().__init__()
        self.model, self.splits = model, {"adv": adv_split, "clean": "main" if adv_split == "aux" else "aux"}

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def forward(self, x, branch):
        return split_view(self.model, self.splits[branch])(x)


def kuangliu():
    from pyautoattack.examples.resnet import ResNet18  # the example model AutoAttack ships

    return ResNet18()


def torchvision_cifar():
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return model


# name -> (reference network in eval mode, seen as model(x, branch), layout, arch, norm it becomes)
CASES = {
    "kuangliu": (lambda: Plain(kuangliu()), "kuangliu", "resnet18", "bn"),
    "torchvision": (lambda: Plain(torchvision_cifar()), "torchvision", "resnet18", "bn"),
    "preact": (lambda: PreActResNet18(W), "preact", "preact18", "bn"),
    "trades-wrn34": (lambda: TradesWideResNet(34, width=W), "trades-wrn", "wrn34-10", "bn"),
    "trades-wrn28": (lambda: TradesWideResNet(28, width=W), "trades-wrn", "wrn28-10", "bn"),
    "authors-dual-bn": (lambda: AuthorsResNet18("dual-bn", W), "authors-dual-bn", "resnet18", "dual-bn"),
    "authors-dual-ap": (lambda: AuthorsResNet18("dual-ap", W), "authors-dual-ap", "resnet18", "dual-ap"),
    "authors-dual-ns": (lambda: AuthorsResNet18("dual-ns", W), "authors-dual-ns", "resnet18", "dual-ns"),
    "timm-splitbn-preact": (lambda: Split(convert_splitbn(PreActResNet18(W)), "aux"), "timm-splitbn", "preact18",
                            "dual-bn"),
    "timm-splitbn-wrn": (lambda: Split(convert_splitbn(TradesWideResNet(28, width=W)), "main"), "timm-splitbn",
                         "wrn28-10", "dual-bn"),
}


def reference(name):
    torch.manual_seed(0)
    build, layout, arch, norm = CASES[name]
    return randomize(build()), layout, arch, norm


def images(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_every_layout_imports_with_the_foreign_logits_through_every_branch(name, tmp_path):
    ref, layout, arch, norm = reference(name)
    src = tmp_path / "foreign.pt"
    torch.save(ref.state_dict(), src)
    split = {"timm-splitbn-wrn": "main", "timm-splitbn-preact": "aux"}.get(name)  # other layouts: refused
    done = import_checkpoint(src, tmp_path / "imported.safetensors", adv_split=split)
    assert done.layout.split(" ")[0] == layout and done.model.config.arch == arch and done.model.config.norm == norm
    ckpt = load_checkpoint(done.path)
    x = images()
    with torch.no_grad():
        theirs = {b: ref(x, b) for b in ("adv", "clean")}
        ours = {b: ckpt.model(x, b) for b in ("adv", "clean")}
    for b in ("adv", "clean"):
        scale = theirs[b].abs().max().item()
        print(f"{name} {b}: max abs logit difference {max_diff(ours[b], theirs[b]):.2e} (logits up to {scale:.2g})")
        assert max_diff(ours[b], theirs[b]) <= 1e-5 * max(scale, 1.0)
    if norm != "bn":  # the two branches really are the two list entries, not one of them twice
        gap = max_diff(theirs["adv"], theirs["clean"])
        assert gap > 1e-2 * theirs["adv"].abs().max().item()
        assert max_diff(ours["adv"], theirs["clean"]) > 100 * max_diff(ours["adv"], theirs["adv"])
    # the explicit layout (and arch) finds the same; the metadata records where the model came from
    again = import_checkpoint(src, layout=layout, arch=arch, adv_split=split)
    assert torch.equal(again.model(x, "adv"), ours["adv"])
    imported = ckpt.meta("imported")
    assert imported["layout"] == layout and imported["source"] == "foreign.pt" and imported["imported"] is True
    assert len(imported["source_hash"]) == 16


def test_a_timm_splitbn_file_takes_aux_as_adversarial_unless_told_and_records_which(tmp_path):
    """AdvProp trains the auxiliary BNs on adversarial examples: without --adv-split, aux becomes the adv branch;
    the checkpoint records the plain layout the split BNs were found on and which split became adv."""
    ref, *_ = reference("timm-splitbn-preact")  # its adv branch is the aux split
    src = tmp_path / "advprop.pt"
    torch.save(ref.state_dict(), src)
    x = images()
    with torch.no_grad():
        theirs = {b: ref(x, b) for b in ("adv", "clean")}
    for split, adv in ((None, "adv"), ("main", "clean")):
        done = import_checkpoint(src, tmp_path / f"{split}.safetensors", adv_split=split)
        with torch.no_grad():
            assert max_diff(done.model(x, "adv"), theirs[adv]) < 1e-5
        imported = load_checkpoint(done.path).meta("imported")
        assert imported["base_layout"] == "preact" and imported["adv_split"] == (split or "aux")


def test_the_autoattack_example_checkpoint_imports_exactly(tmp_path):
    """A real trained checkpoint (a legacy-format pickle of tensors) that pyautoattack ships."""
    from pyautoattack.examples.resnet import ResNet18

    ref = ResNet18()
    ref.load_state_dict(torch.load(AUTOATTACK_MODEL, map_location="cpu", weights_only=True))
    done = import_checkpoint(AUTOATTACK_MODEL, tmp_path / "aa.safetensors")
    assert done.layout == "kuangliu" and done.model.config == ModelConfig("resnet18", "bn", 1.0, 10)
    x = images(8)
    with torch.no_grad():
        diff = max_diff(ref.eval()(x), done.model(x, "clean"))
    print(f"autoattack model_test.pt: max abs logit difference {diff:.2e}")
    assert diff < 1e-4


def test_containers_and_prefixes_are_unwrapped(tmp_path):
    ref, *_ = reference("preact")
    state = ref.state_dict()
    x = images()
    expected = ref(x)
    wrapped = [{"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7, "best_acc": 0.5},
               {"net": {f"_orig_mod.{k}": v for k, v in state.items()}},
               {"model": {f"model.module.{k}": v for k, v in state.items()}, "optimizer": {"lr": 0.1}}]
    for i, obj in enumerate(wrapped):
        torch.save(obj, tmp_path / f"{i}.pth")
        model = import_checkpoint(tmp_path / f"{i}.pth").model
        assert max_diff(model(x, "adv"), expected) < 1e-5
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, tmp_path / "s.safetensors")
    assert max_diff(import_checkpoint(tmp_path / "s.safetensors").model(x, "adv"), expected) < 1e-5


def test_a_single_bn_import_may_start_a_two_branch_variant(tmp_path):
    """--norm dual-bn on a plain layout: both branches start as the one BN (e.g. to fine-tune as Dual BN)."""
    ref, *_ = reference("preact")
    torch.save(ref.state_dict(), tmp_path / "p.pt")
    model = import_checkpoint(tmp_path / "p.pt", norm="dual-bn").model
    x = images()
    assert torch.equal(model(x, "adv"), model(x, "clean"))
    assert max_diff(model(x, "adv"), ref(x)) < 1e-5
    with pytest.raises(HybridatError, match="per branch"):  # two sets cannot become one
        torch.save(reference("authors-dual-bn")[0].state_dict(), tmp_path / "d.pt")
        import_checkpoint(tmp_path / "d.pt", layout="authors-dual-bn", norm="bn")


class Normalized(nn.Module):
    """A leaderboard-style model: normalizes its [0, 1] input itself, weights saved without the normalization."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net, self.mean, self.std = net, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def forward(self, x, branch=None):
        return self.net((x - self.mean) / self.std)


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def test_input_normalization_is_recorded_and_applied_inside_the_model(tmp_path):
    ref, *_ = reference("preact")
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    normalized = Normalized(ref, MEAN, STD)
    done = import_checkpoint(tmp_path / "w.pt", tmp_path / "w.safetensors", input_mean="0.4914,0.4822,0.4465",
                             input_std=list(STD))
    ckpt = load_checkpoint(done.path)
    assert ckpt.config.input_mean == MEAN and ckpt.config.input_std == STD
    x = images()
    assert max_diff(ckpt.model(x, "adv"), normalized(x)) < 1e-5
    plain = import_checkpoint(tmp_path / "w.pt").model
    assert max_diff(plain(x, "adv"), normalized(x)) > 1e-2  # without it, another function
    # an export carries the normalization to the next import
    hybridat.export_branch(done.path, tmp_path / "e.safetensors", branch="adv", layout="preact")
    back = import_checkpoint(tmp_path / "e.safetensors").model
    assert back.config.input_mean == MEAN and torch.equal(back(x, "adv"), ckpt.model(x, "adv"))
    told = import_checkpoint(tmp_path / "e.safetensors", input_mean="0.5,0.5,0.5", input_std="0.25,0.25,0.25")
    assert (told.model.config.input_mean, told.model.config.input_std) == ((0.5,) * 3, (0.25,) * 3)  # flags win
    with pytest.raises(HybridatError, match="three numbers"):
        import_checkpoint(tmp_path / "w.pt", input_mean="0.5,0.5", input_std="1,1,1")
    with pytest.raises(HybridatError, match="together"):
        import_checkpoint(tmp_path / "w.pt", input_mean="0.5,0.5,0.5")


def test_configs_without_input_normalization_read_and_write_as_before(tmp_path):
    old = '{"arch": "resnet18", "norm": "dual-bn", "num_classes": 10, "width": 0.0625}'
    config = ModelConfig.from_json(old)
    assert config.input_mean is None and config.to_json() == old  # files written before it are unchanged
    model = build_model(config)
    assert "input_mean" not in json.dumps(list(model.state_dict()))  # not a weight: the config holds it
    normalized = build_model(ModelConfig("resnet18", "bn", 0.0625, 10, MEAN, STD))
    save_checkpoint(normalized, tmp_path / "n.safetensors")
    assert load_checkpoint(tmp_path / "n.safetensors").config == normalized.config
    with pytest.raises(HybridatError, match="both or neither"):
        build_model(ModelConfig("resnet18", "bn", 0.0625, 10, MEAN, None))


EXPORTS = [("resnet18", "kuangliu"), ("resnet18", "torchvision"), ("preact18", "preact"),
           ("wrn28-10", "trades-wrn")]


def two_branch(norm, arch="resnet18", seed=0):
    torch.manual_seed(seed)
    return randomize(build_model(ModelConfig(arch, norm, W)), seed=seed + 1)


@pytest.mark.parametrize("arch,layout", EXPORTS)
def test_import_of_an_export_gives_the_branch_back_exactly(arch, layout, tmp_path):
    model = two_branch("dual-bn", arch)
    save_checkpoint(model, tmp_path / "m.safetensors")
    x = images()
    for branch in ("adv", "clean"):
        for suffix in (".safetensors", ".pt"):
            out = tmp_path / f"{branch}{suffix}"
            hybridat.export_branch(tmp_path / "m.safetensors", out, branch=branch, layout=layout)
            back = import_checkpoint(out)
            assert back.layout == layout and back.model.config.norm == "bn"
            assert torch.equal(back.model(x, "adv"), model(x, branch))


@pytest.mark.parametrize("norm", ["dual-ap", "dual-ns", "cross-bn", "dual-linear", "bn-noaffine", "bn-mix"])
def test_every_batch_norm_variant_exports_what_the_branch_computes(norm):
    model = two_branch(norm)
    x = images()
    for branch in ("adv", "clean"):
        single = build_model(ModelConfig("resnet18", "bn", W))
        single.load_state_dict(export_state_dict(model, branch, "kuangliu"))
        assert torch.equal(single.eval()(x, "adv"), model(x, branch))


def test_export_refusals(tmp_path):
    save_checkpoint(two_branch("dual-bn"), tmp_path / "m.safetensors")
    save_checkpoint(two_branch("gn-dual-ap"), tmp_path / "g.safetensors")
    cases = [(tmp_path / "m.safetensors", tmp_path / "x.safetensors", "preact", "is for preact18"),
             (tmp_path / "m.safetensors", tmp_path / "x.safetensors", "authors-dual-bn", "plain single-BN"),
             (tmp_path / "g.safetensors", tmp_path / "x.safetensors", "kuangliu", "no batch norm"),
             (tmp_path / "m.safetensors", tmp_path / "m.safetensors", "kuangliu", "is an input"),
             (tmp_path / "m.safetensors", tmp_path / "x.onnx", "kuangliu", ".safetensors, .pt or .pth")]
    before = (tmp_path / "m.safetensors").read_bytes()
    for ckpt, out, layout, message in cases:
        with pytest.raises(HybridatError, match=message):
            hybridat.export_branch(ckpt, out, branch="adv", layout=layout)
    assert (tmp_path / "m.safetensors").read_bytes() == before and not (tmp_path / "x.safetensors").exists()
    result = invoke("export", tmp_path / "m.safetensors", "--branch", "adv", "--layout", "preact", "--out",
                    tmp_path / "x.safetensors")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:") and "preact18" in lines[0]


# ---- the command line ----

def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_imported_dual_bn_runs_attack_swap_bn_and_ns_gap(tmp_path, data_dir):
    ref, *_ = reference("authors-dual-bn")
    src = tmp_path / "authors.pt"  # as their training script saves it, inside a DataParallel wrapper and a dict
    torch.save({"epoch": 110, "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, src)
    model = tmp_path / "imported.safetensors"
    result = invoke("import", src, "--out", model)
    assert result.exit_code == 0, result.output
    assert "authors-dual-bn (auto)" in result.output and "dual-bn" in result.output
    csv = tmp_path / "eval.csv"
    result = invoke("attack", model, "--n", "32", "--steps", "2", "--data-dir", data_dir, "--device", "cpu",
                    "--out", csv)
    assert result.exit_code == 0, result.output
    rows = __import__("pandas").read_csv(csv)
    assert set(rows.branch) == {"adv", "clean"} and len(rows) == 4
    crossed = tmp_path / "cross.safetensors"
    result = invoke("swap-bn", model, "--cross", "--out", crossed, "--device", "cpu")
    assert result.exit_code == 0, result.output
    x = images()
    crossed_model = load_checkpoint(crossed).model
    assert not torch.equal(crossed_model(x, "adv"), load_checkpoint(model).model(x, "adv"))
    result = invoke("ns-gap", model, "--fix-ap", "--eps", "16", "--n", "32", "--steps", "2", "--data-dir",
                    data_dir, "--device", "cpu", "--out", tmp_path / "gap.csv")
    assert result.exit_code == 0, result.output
    assert len(__import__("pandas").read_csv(tmp_path / "gap.csv")) > 0
    # and one branch back out, for other tools, equal to the authors' clean BN
    result = invoke("export", model, "--branch", "clean", "--layout", "torchvision", "--out", tmp_path / "c.pth")
    assert result.exit_code == 0, result.output
    state, _ = read_state_dict(tmp_path / "c.pth")
    assert "layer2.0.downsample.1.running_var" in state and "fc.weight" in state
    with torch.no_grad():
        assert max_diff(import_checkpoint(tmp_path / "c.pth").model(x, "adv"), ref(x, "clean")) < 1e-5


class Payload:
    """Unpickling this would run code: it makes a directory."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def hostile_files(tmp_path: Path) -> dict:
    marker = tmp_path / "code-ran"
    ref, *_ = reference("preact")
    state = ref.state_dict()
    files = {}
    torch.save({"state_dict": state, "extra": Payload(marker)}, tmp_path / "code.pt")
    files["code.pt"] = "weights_only=True"
    with open(tmp_path / "code.pkl", "wb") as f:
        pickle.dump(Payload(marker), f, protocol=2)
    files["code.pkl"] = "weights_only=True"
    torch.save(reference("trades-wrn28")[0].state_dict(), tmp_path / "wrn.pt")
    files["wrn.pt --arch resnet18"] = "does not map as resnet18"
    torch.save({k: v for k, v in state.items() if k != "linear.bias"}, tmp_path / "missing.pt")
    files["missing.pt"] = "1 keys missing (linear.bias)"
    torch.save(state | {"projector.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    files["extra.pt"] = "1 keys not mapped (projector.weight)"
    torch.save(state | {"layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1)}, tmp_path / "shape.pt")
    files["shape.pt"] = "layer1.0.conv1.weight is (8, 8, 1, 1), expected (8, 8, 3, 3)"
    (tmp_path / "model.pt").write_text("this is a text file, not a model")
    files["model.pt"] = "neither a torch file"
    (tmp_path / "model.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{not json at all, cut")
    files["model.safetensors"] = "not a readable safetensors"
    torch.save([1, 2, 3], tmp_path / "list.pt")
    files["list.pt"] = "holds no state dict"
    save_checkpoint(build_model(ModelConfig("resnet18", "bn", W)), tmp_path / "ours.safetensors")
    files["ours.safetensors"] = "already a hybridat checkpoint"
    torch.save(state, tmp_path / "ok.pt")
    files["ok.pt --layout authors-dual-bn"] = "keys missing (bn1.bn_list.0.weight"
    files["ok.pt --input-mean 0.5,0.5,0.5"] = "together"
    return files


def test_hostile_imports_get_one_line_and_exit_1(tmp_path):
    files = hostile_files(tmp_path)
    for spec, message in files.items():
        name, *flags = spec.split()
        out = tmp_path / f"out-{name}.safetensors"
        result = invoke("import", tmp_path / name, "--out", out, *flags)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, (spec, result.output)
        assert lines[0].startswith("error:") and message in lines[0], (spec, lines[0])
        assert not out.exists()
    assert not (tmp_path / "code-ran").exists()  # no code from the files ran
    result = invoke("import", tmp_path / "ok.pt", "--out", tmp_path / "ok.pt")  # never over its input
    assert result.exit_code == 1 and "is an input" in result.output
    assert read_state_dict(tmp_path / "ok.pt")[0].keys() == reference("preact")[0].state_dict().keys()


def test_layout_table_lists_every_layout():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Bring your own model", 1)[1].split("\n## ", 1)[0]
    for name in LAYOUTS:
        assert f"`{name}`" in section, name
    assert set(PLAIN) < set(LAYOUTS)
