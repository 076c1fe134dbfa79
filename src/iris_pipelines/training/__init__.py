"""Episodic training of Iris: sampling, augmentation, the one-rank train loop and checkpoints."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .loop import TrainResult, lr_factor, run_training, weights_checksum
from .sampler import EpisodeSampler, train_class_ids, train_pool

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
