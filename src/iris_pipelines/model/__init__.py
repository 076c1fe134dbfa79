"""The Iris network and its losses, in plain torch (no Kedro, no MONAI, no I/O).

Contract (DESIGN.md, "Model API"): ``encode_task(ref_image, ref_masks) -> T`` (B, K, m+1, C), one
embedding per class; ``segment(query, T) -> logits`` (B, K, D, H, W) at the input resolution, all K
classes in one pass.
"""

from .config import IrisConfig
from .iris import Iris, QueryFeatures, count_parameters
from .losses import LossTerms, bce_loss, dice_score, segmentation_loss, soft_dice_loss
from .task_encoding import foreground_pool

__all__ = [
    "Iris",
    "IrisConfig",
    "LossTerms",
    "QueryFeatures",
    "bce_loss",
    "count_parameters",
    "dice_score",
    "foreground_pool",
    "segmentation_loss",
    "soft_dice_loss",
]
