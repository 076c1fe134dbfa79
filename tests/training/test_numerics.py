"""Speed settings must not change results: the loss curve of bf16 autocast + ``torch.compile`` training
tracks the fp32 eager curve (issue 8: "a 200-step loss curve in bf16 and compiled mode tracks fp32 eager
within a stated tolerance").

Both runs train the same network from the same initial weights on the same episode stream (episodes are
a pure function of the seed and the step), for 200 steps, so any difference comes from the numerics.

Why a tolerance on *smoothed* curves: bf16 rounds activations to 8 mantissa bits, so the very first
losses differ by ~1e-3 and the two runs then take slightly different optimisation paths. Single steps of
a 2-episode batch are noisy (the loss jumps by tenths from one episode draw to the next), so per-step
equality is meaningless after a few steps, while a wrong precision or compile path (a dropped
autocast region, a mis-traced graph, a lost gradient) shows as a curve that stops falling or drifts off.
So we compare 20-step moving averages: their mean absolute gap over the 200 steps must stay under
``TOLERANCE`` = 0.05, the first step must agree to 2 % (same weights, same data, only rounding differs),
and both runs must learn (last 20 steps below 0.6× the first 20). Measured on CPU (2026-11-23): the 20-step
averages fall from 1.375 to 0.597 in fp32; bf16 + compile (aot_eager) differs from it by 0.0082 on
average (0.020 at most, first step 9e-5 relative), bf16 eager alone by 0.0029. A run that stops learning
or drifts off sits ~0.3 away, so 0.05 leaves 6× headroom over the measured gap and still catches that.

Sizes are shrunk so 2 × 200 steps fit in ~50 s on one (shared) CPU thread: a 3-level network (2 stages, widths
8/16/16) on 16³ crops, batch 2, no augmentation. CPU inductor needs a C++ compiler and minutes of
compilation on 2 cores (measured 184 s cold, 41 s with a warm cache for this tiny network), so the fast
test compiles with ``backend="aot_eager"``: dynamo capture + AOTAutograd's traced forward/backward graphs,
which is where tracing bugs change numbers, minus inductor's code generation. The ``slow`` test repeats
it with the real inductor backend.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from iris_pipelines.model import IrisConfig
from iris_pipelines.training import run_training

STEPS = 200
WINDOW = 20
TOLERANCE = 0.05  # mean |gap| of the 20-step moving averages; losses start near 1.5


def _model_config() -> dict:
    return IrisConfig.tiny(
        channels=(8, 16, 16), encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1), head_dim=8
    ).to_dict()


def _train(collection, tmp_path, name: str, **overrides) -> list[float]:
    manifest, index = collection
    config = {
        "steps": STEPS,
        "batch_size": 2,
        "crop_size": [16, 16, 16],
        "warmup_steps": 10,
        "augment": False,
        "val_every": 10_000,
        "checkpoint_every": 10_000,
        "log_every": 1,
        "device": "cpu",
        **overrides,
    }
    result = run_training(_model_config(), config, index, manifest, checkpoint_dir=tmp_path / name)
    return [h["loss"] for h in result.history]


def _smooth(values: list[float]) -> np.ndarray:
    return np.convolve(values, np.ones(WINDOW) / WINDOW, mode="valid")


def _assert_tracks(reference: list[float], fast: list[float]) -> None:
    assert len(reference) == len(fast) == STEPS
    assert fast[0] == pytest.approx(reference[0], rel=0.02)
    gap = float(np.abs(_smooth(reference) - _smooth(fast)).mean())
    assert gap < TOLERANCE, f"smoothed loss curves differ by {gap:.4f} on average (tolerance {TOLERANCE})"
    for curve in (reference, fast):
        assert np.mean(curve[-WINDOW:]) < 0.6 * np.mean(curve[:WINDOW])  # both runs learn


@pytest.fixture(scope="module")
def fp32_eager_curve(collection, tmp_path_factory):
    return _train(collection, tmp_path_factory.mktemp("fp32"), "fp32", precision="fp32")


@pytest.fixture
def compile_backend(monkeypatch):
    """Routes the loop's ``torch.compile`` to a chosen backend and records that it was called."""
    calls = []
    real_compile = torch.compile

    def use(backend: str) -> list:
        def compile_with(model, **kwargs):
            calls.append(type(model).__name__)
            torch._dynamo.reset()
            return real_compile(model, **{**kwargs, "backend": backend})

        monkeypatch.setattr(torch, "compile", compile_with)
        return calls

    yield use
    torch._dynamo.reset()


def test_bf16_compiled_curve_tracks_fp32_eager(collection, tmp_path, fp32_eager_curve, compile_backend):
    calls = compile_backend("aot_eager")
    fast = _train(collection, tmp_path, "bf16_compiled", precision="bf16", compile=True)
    assert calls == ["_EpisodeModel"]
    _assert_tracks(fp32_eager_curve, fast)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs C++")
def test_bf16_inductor_curve_tracks_fp32_eager(collection, tmp_path, fp32_eager_curve, compile_backend):
    calls = compile_backend("inductor")
    fast = _train(collection, tmp_path, "bf16_inductor", precision="bf16", compile=True)
    assert calls == ["_EpisodeModel"]
    _assert_tracks(fp32_eager_curve, fast)


def test_compile_flag_defaults_off_and_round_trips():
    from iris_pipelines.training import TrainConfig

    assert TrainConfig().compile is False
    config = TrainConfig(compile=True)
    assert TrainConfig.from_dict(config.to_dict()).compile is True
