"""Architectures: the paper's ResNet-18 exactly, the others' shapes, routing errors."""

import pytest
import torch

from hybridat.errors import HybridatError
from hybridat.models import ARCHS, ModelConfig, build_model, norm_layers

from conftest import tiny


def test_resnet18_is_the_papers_network():
    model = build_model(ModelConfig("resnet18", "bn", width=1.0))
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the standard CIFAR ResNet-18
    assert len(norm_layers(model)) == 20
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.linear.in_features == 512


@pytest.mark.parametrize("arch,norms", [("resnet18", 20), ("preact18", 17), ("wrn34-10", 31), ("wrn28-10", 25)])
def test_every_arch_runs_both_branches(arch, norms):
    model = tiny("dual-bn", arch).eval()
    x = torch.rand(2, 3, 32, 32)
    assert model(x, "adv").shape == (2, 10)
    assert len(norm_layers(model)) == norms
    assert arch in ARCHS


def test_width_scales_channels():
    assert build_model(ModelConfig("resnet18", "bn", width=0.25)).conv1.out_channels == 16
    assert build_model(ModelConfig("wrn28-10", "bn", width=0.1)).fc.in_features == 64


@pytest.mark.parametrize("route", ["both", (3, 3), (-1, 5), (2, 1)])
def test_bad_routes_are_rejected(route):
    with pytest.raises(HybridatError, match="route"):
        tiny()(torch.rand(4, 3, 32, 32), route)


@pytest.mark.parametrize("config,match", [(ModelConfig("resnet50"), "arch"), (ModelConfig(norm="batchnorm"), "norm"),
                                          (ModelConfig(width=0), "width")])
def test_bad_configs_are_rejected(config, match):
    with pytest.raises(HybridatError, match=match):
        build_model(config)


def test_config_round_trips_through_json():
    config = ModelConfig("preact18", "cross-bn", 0.5, 100)
    assert ModelConfig.from_json(config.to_json()) == config
