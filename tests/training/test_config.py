import pytest

from iris_pipelines.training import TrainConfig


def test_round_trip_through_dict():
    config = TrainConfig(steps=7, crop_size=(16, 32, 48))
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["crop_size"] == [16, 32, 48]


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="unknown TrainConfig fields \\['stepz'\\]"):
        TrainConfig.from_dict({"stepz": 3})


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"crop_size": [32, 32]},
        {"final_lr_fraction": 0.0},
        {"precision": "fp16"},
        {"bce_weight": -0.1},
        {"dice_weight": 0.0, "bce_weight": 0.0},
        {"flip_prob": 1.5},
        {"optimizer": "sgd"},
    ],
)
def test_invalid_values_fail_early(bad):
    with pytest.raises(ValueError, match="invalid TrainConfig"):
        TrainConfig.from_dict(bad)
