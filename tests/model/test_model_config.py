"""IrisConfig: JSON round trip, validation, and the paper configuration's parameter count."""

from __future__ import annotations

import json

import pytest
import torch

from iris_pipelines.model import Iris, IrisConfig, count_parameters


@pytest.mark.parametrize(
    "config", [IrisConfig.paper(), IrisConfig.cpu(), IrisConfig.tiny(memory_bank_size=7)]
)
def test_json_round_trip(config: IrisConfig) -> None:
    restored = IrisConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown IrisConfig fields"):
        IrisConfig.from_dict({**IrisConfig.tiny().to_dict(), "chanels": [1, 2]})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"decoder_blocks": (1, 1)}, "decoder_blocks"),
        ({"fusion_scales": 5}, "fusion_scales"),
        ({"head_dim": 24}, "head_dim"),
        ({"pad_mode": "reflect"}, "pad_mode"),
    ],
)
def test_invalid_config_names_the_problem(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IrisConfig.tiny(**overrides)


def test_paper_parameter_count() -> None:
    """The paper reports 69.4 M parameters (Table 3); our paper configuration should be close."""
    config = IrisConfig.paper()
    with torch.device("meta"):
        model = Iris(config)
    count = count_parameters(model)
    print(f"IrisConfig.paper(): {count / 1e6:.2f} M parameters")
    assert 60e6 <= count <= 80e6
    assert config.size_divisor == 16 and config.channels[0] == 32 and config.num_tokens == 11


def test_cpu_network_keeps_the_paper_bottleneck_on_its_crop() -> None:
    """The paper's 128³ crop has an 8³ bottleneck (4 stages); the CPU recipe's 32³ crop must too."""
    paper, cpu = IrisConfig.paper(), IrisConfig.cpu()
    assert 128 // paper.size_divisor == 32 // cpu.size_divisor == 8
    features = Iris(cpu).encoder(torch.zeros(1, 1, 32, 32, 32))
    assert features[-1].shape[2:] == (8, 8, 8)
