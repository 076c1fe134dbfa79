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
        {"steps": 4.5},
        {"lr": "fast"},
        {"lr": 0.0},
        {"grad_clip": 0.0},  # would zero every gradient
        {"grad_clip": -1.0},  # would ascend the loss
        {"seed": -1},
    ],
)
def test_invalid_values_fail_early(bad):
    with pytest.raises(ValueError, match="invalid TrainConfig"):
        TrainConfig.from_dict(bad)


def test_yaml_spellings_of_numbers_are_read_as_meant(caplog):
    """YAML reads steps: 8e4 as a float, lr: 2e-3 (no dot) as a string; a cube's crop is one number."""
    config = TrainConfig.from_dict({"steps": 8e4, "lr": "2e-3", "crop_size": 128, "grad_clip": None})
    assert (config.steps, config.lr, config.crop_size, config.grad_clip) == (80000, 0.002, (128,) * 3, None)
    assert isinstance(config.steps, int) and not caplog.text


def test_a_warm_up_as_long_as_the_run_is_warned_about(caplog):
    TrainConfig(steps=1000, warmup_steps=2000)
    assert "warmup_steps 2000 >= steps 1000" in caplog.text


def test_a_crop_no_larger_than_the_size_divisor_on_every_axis_is_refused():
    """Before, TrainConfig took crop_size 8 for a network padding to 16 and training failed at step 1."""
    config = TrainConfig(crop_size=(8, 16, 16))
    with pytest.raises(ValueError, match=r"crop_size \[8, 16, 16\] is too small.*exceed 16 voxels"):
        config.check_crop_fits(16)
    config.check_crop_fits(8)  # one axis larger than the divisor is enough
    TrainConfig(crop_size=(8, 8, 17)).check_crop_fits(16)
