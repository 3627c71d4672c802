"""Checkpoints rebuild their model exactly; bad files give one clear error; writes are atomic."""

import json
import random
import re

import pytest
import torch
from safetensors.torch import save_file

from hybridat.checkpoint import atomic_path, load_checkpoint, read_header, save_checkpoint, write_csv
from hybridat.errors import HybridatError

from conftest import perturb, tiny


def test_round_trip_is_exact(tmp_path):
    model = perturb(tiny("cross-bn"))
    path = tmp_path / "m.safetensors"
    digest = save_checkpoint(model, path, seed="3", train={"loss": "hybrid", "eps": 8})
    ckpt = load_checkpoint(path)
    assert ckpt.hash == digest
    save_checkpoint(model, tmp_path / "again.safetensors", seed="4", run="other")  # other metadata, same weights
    assert load_checkpoint(tmp_path / "again.safetensors").hash == digest
    assert ckpt.config == model.config
    assert ckpt.meta("train") == {"loss": "hybrid", "eps": 8} and ckpt.meta("seed") == 3
    assert json.loads(ckpt.header["versions"])["torch"] == torch.__version__
    for (k, v), w in zip(model.state_dict().items(), ckpt.model.state_dict().values()):
        assert torch.equal(v, w), k
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x, "adv"), ckpt.model(x, "adv"), rtol=0, atol=0)
    assert not ckpt.model.training


def test_missing_file(tmp_path):
    with pytest.raises(HybridatError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none.safetensors")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(HybridatError, match="not a readable safetensors"):
        load_checkpoint(path)


def test_foreign_safetensors_is_the_wrong_kind(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(HybridatError, match="not a hybridat model checkpoint"):
        read_header(path)


def test_weights_that_do_not_match_the_config(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(tiny("dual-bn"), path)
    header = read_header(path)
    config = json.loads(header["config"])
    config["norm"] = "bn"
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    meta["hybridat.config"] = json.dumps(config)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(HybridatError, match="do not match"):
        load_checkpoint(path)


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.csv"
    write_csv([{"a": 1}], target)
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "a\n1\n"  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temp file left


@pytest.mark.parametrize("kind,message", [
    ("zip", "is a PyTorch file (torch.save), not a hybridat checkpoint"),
    ("legacy", "is a PyTorch file (torch.save), not a hybridat checkpoint"),  # torch.save's pre-1.6 bare pickle
    ("empty", "is an empty file, not a hybridat checkpoint"),
    ("random", "is not a readable safetensors file (Error while deserializing header"),
    ("folder", "is a folder, not a checkpoint file"),
])
def test_a_file_that_is_not_safetensors_is_pointed_at_hybridat_import(tmp_path, kind, message):
    path = tmp_path / "model.pt"
    if kind in ("zip", "legacy"):
        torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, path, _use_new_zipfile_serialization=kind == "zip")
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"" if kind == "empty" else bytes(random.Random(0).randrange(256) for _ in range(4096)))
    with pytest.raises(HybridatError, match=re.escape(message) + ".*`hybridat import`"):
        load_checkpoint(path)


def test_the_hash_tells_apart_configs_whose_weights_look_alike(tmp_path):
    """bn and bn-mix (dual-bn and cross-bn-swap) have the same tensor names and shapes: the same weights saved under
    either config are two different models, and every CSV row names a model by this hash, so it covers the config."""
    for a, b in (("bn", "bn-mix"), ("dual-bn", "cross-bn-swap")):
        model = perturb(tiny(a))
        twin = tiny(b)
        twin.load_state_dict(model.state_dict())
        hashes = [save_checkpoint(m, tmp_path / f"{m.config.norm}.safetensors") for m in (model, twin)]
        assert hashes[0] != hashes[1]
        assert [load_checkpoint(tmp_path / f"{n}.safetensors").hash for n in (a, b)] == hashes


def test_row_ids_name_the_model_its_parent_and_its_training(tmp_path):
    """What every eval and ns-gap row says of its checkpoint: each id from the field it names (the training ε from
    train.eps, not its PGD step)."""
    model = perturb(tiny("dual-bn"))
    op = {"op": "cross", "layers": None}
    digest = save_checkpoint(model, tmp_path / "m.safetensors", seed="3", parent="0123456789abcdef", operation=op,
                             train={"loss": "trades", "eps": 16, "step": 4, "steps": 10})
    ids = load_checkpoint(tmp_path / "m.safetensors").row_ids()
    assert ids == {"checkpoint_hash": digest, "parent_hash": "0123456789abcdef", "operation": json.dumps(op),
                   "norm": "dual-bn", "arch": "resnet18", "width": 0.0625, "seed": 3, "train_eps": 16,
                   "loss_name": "trades"}
