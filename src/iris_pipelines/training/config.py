"""The train loop's settings, one dataclass so a run's JSON params show the whole recipe (paper §3.2)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

from iris_pipelines.model.config import config_from_dict, config_to_dict

_PRECISIONS = ("auto", "bf16", "fp32")
_COUNTS = ("steps", "batch_size", "max_classes", "val_every", "checkpoint_every", "log_every", "seed",
           "num_workers", "warmup_steps")  # fmt: skip
logger = logging.getLogger(__name__)


def _real(value: Any, name: str, problems: list[str]) -> Any:
    """``value`` as a float, a numeric string included; noted in ``problems`` otherwise."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        problems.append(f"{name} must be a number, got {value!r}")
        return value


def _whole(value: Any, name: str, problems: list[str]) -> Any:
    """``value`` as an int when it is a whole number (8e4 → 80000); noted in ``problems`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        problems.append(f"{name} must be a whole number, got {value!r}")
        return value
    return int(value)


OPTIMIZERS = ("lamb", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Episodic training recipe.

    Defaults are CPU-sized; the paper's run is 80K steps, batch 32, 2K warm-up, 128³ crops (reference
    notes §3.2). ``batch_size`` is global and split evenly over the ranks. The learning rate warms up
    linearly for ``warmup_steps`` and then decays exponentially to ``lr * final_lr_fraction`` at the
    last step. ``precision="auto"`` means bf16 autocast on CUDA and fp32 on CPU (CPU bf16 is slow and
    not what the cluster runs). ``compile`` wraps the network in ``torch.compile`` (inductor): faster
    steps on GPU after a one-off compilation, same weights and checkpoints (tests/training/test_numerics.py).
    """

    steps: int = 300
    batch_size: int = 2
    crop_size: tuple[int, int, int] = (64, 64, 64)
    # The paper's Lamb; AdamW (torch's) for small CPU runs, where Lamb's layer-wise trust ratio keeps
    # a short run on the "predict empty" plateau (docs/phantom-recipe.md has the measurements).
    optimizer: str = "lamb"
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 20
    final_lr_fraction: float = 0.05
    grad_clip: float | None = 1.0  # max global gradient norm; null turns clipping off
    max_classes: int = 4
    class_drop_prob: float = 0.3
    reference_mask_perturbation: float = 0.5
    val_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    precision: str = "auto"
    device: str = "auto"
    memory_bank_momentum: float = 0.999
    # Flips, rotation/scale and intensity changes of query and reference, and the reference mask's
    # perturbation (reference_mask_perturbation): false turns every one of them off.
    augment: bool = True
    compile: bool = False
    # nnU-Net forces a third of its patches onto foreground; small structures on a coarse CPU grid fill
    # ~1% of a crop, so the phantom recipe centres every query crop on a selected class instead.
    foreground_crop_prob: float = 2 / 3
    # L_seg = dice_weight·Dice + bce_weight·BCE (paper: 1 and 1).
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    # Per-axis flip probability of the spatial augmentation. Independent flips of query and reference
    # make a left/right pair of classes ambiguous; ``shared_flips`` flips both along the same axes, so
    # the reference still says which side is meant.
    flip_prob: float = 0.5
    shared_flips: bool = False
    # Weight of a softmax cross-entropy across an episode's (mutually exclusive) class slots, on top of
    # the per-slot Dice + BCE: inference takes the argmax of the K sigmoids, which per-slot losses alone
    # never rank (model.losses.exclusive_cross_entropy). 0 is the paper's loss.
    exclusive_weight: float = 0.0
    # Task augmentation (UniverSeg-style): with this probability an episode with two or more classes
    # merges two of them into one slot, in query and reference alike. The slot is then no fixed concept,
    # so only the reference says what to segment.
    class_union_prob: float = 0.0
    # Self-supervision: the share of episodes whose targets are auto-masks (homogeneous intensity regions
    # of one train scan, reference and query two views of it; training.auto_masks) instead of labels.
    # They cover tissue no dataset labels, so the reference, not a learned concept, must say what to find.
    auto_mask_prob: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        # YAML reads 8e4 as a float and a cube as one int: counts must be whole numbers, and fail here,
        # not deep in the loop after the job waited in a queue.
        crop = self.crop_size if isinstance(self.crop_size, list | tuple) else [self.crop_size] * 3
        object.__setattr__(self, "crop_size", tuple(_whole(v, "crop_size", problems) for v in crop))
        for name in _COUNTS:
            object.__setattr__(self, name, _whole(getattr(self, name), name, problems))
        for item in fields(self):  # YAML 1.1 reads 2e-3 (no dot) as a string
            value = getattr(self, item.name)
            if item.type == "float" or (item.type == "float | None" and value is not None):
                object.__setattr__(self, item.name, _real(value, item.name, problems))
        if problems:  # the range checks below need numbers
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        if len(self.crop_size) != 3 or min(self.crop_size) < 1:
            problems.append(f"crop_size must be 3 positive ints (or one for a cube), got {self.crop_size}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0 (null turns clipping off), got {self.grad_clip}")
        for name in ("steps", "batch_size", "max_classes", "val_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.num_workers < 0:
            problems.append("warmup_steps and num_workers must be >= 0")
        if not 0 < self.final_lr_fraction <= 1:
            problems.append(f"final_lr_fraction must be in (0, 1], got {self.final_lr_fraction}")
        for name in (
            "class_drop_prob",
            "reference_mask_perturbation",
            "memory_bank_momentum",
            "foreground_crop_prob",
            "flip_prob",
            "class_union_prob",
            "auto_mask_prob",
        ):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.exclusive_weight < 0:
            problems.append(f"exclusive_weight must be >= 0, got {self.exclusive_weight}")
        if self.dice_weight < 0 or self.bce_weight < 0 or self.dice_weight + self.bce_weight <= 0:
            problems.append(
                "dice_weight and bce_weight must be >= 0 and not both 0, "
                f"got {self.dice_weight} and {self.bce_weight}"
            )
        if self.precision not in _PRECISIONS:
            problems.append(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        if self.warmup_steps >= self.steps:
            logger.warning(
                "warmup_steps %d >= steps %d: the learning rate never reaches lr %g nor decays to its final "
                "fraction; shorten the warm-up with the run",
                self.warmup_steps, self.steps, self.lr,
            )  # fmt: skip

    def check_crop_fits(self, size_divisor: int) -> None:
        """Refuse a crop the network cannot take, before any step: it pads every input to a multiple of
        ``size_divisor`` (2**stages), and a crop no larger than that on every axis leaves one bottleneck
        voxel, which instance norm cannot normalise. The model's depth is not part of this config, so the
        train loop and the SLURM launcher call this once they know it."""
        if all(size <= size_divisor for size in self.crop_size):
            raise ValueError(
                f"invalid TrainConfig: crop_size {list(self.crop_size)} is too small for this network: at "
                f"least one axis must exceed {size_divisor} voxels (2**stages of params:model) so its "
                "bottleneck holds more than one voxel; raise train.crop_size or use a model with fewer stages"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the crop tuple becomes a list)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; an unknown key is an error, so a typo in params never goes unseen."""
        return config_from_dict(cls, data)
