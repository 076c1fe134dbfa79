"""Episodic training of Iris: sampling, augmentation, the one-rank train loop and checkpoints.

The train loop (and its optimiser and progress-bar dependencies) loads on first use, so the sampler and
config import with torch, numpy and pandas alone, as on the GPU benchmark machine.
"""

from importlib import import_module
from typing import Any

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .sampler import EpisodeSampler, train_class_ids, train_pool

_LOOP_EXPORTS = ("TrainResult", "lr_factor", "run_training", "weights_checksum")


def __getattr__(name: str) -> Any:
    if name in _LOOP_EXPORTS:
        return getattr(import_module(".loop", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EpisodeSampler",
    "TrainConfig",
    "TrainResult",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_factor",
    "run_training",
    "save_checkpoint",
    "train_class_ids",
    "train_pool",
    "weights_checksum",
]
