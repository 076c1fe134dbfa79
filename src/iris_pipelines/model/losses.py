"""Segmentation loss L_seg = L_dice + L_ce on per-class sigmoid logits (paper §3.2; MASS uses both, weight 1).

Each class slot is a binary task (multi-label sigmoid, not softmax): Iris decomposes multi-class
segmentation into binary tasks, and the K slots of an episode need not be mutually exclusive. When they
are (training episodes cut from one label map), :func:`exclusive_cross_entropy` can be added: inference
turns the K sigmoids into one label map by argmax, and per-slot losses alone never teach a slot to stay
below the right class where both fire.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

_SPATIAL = (-3, -2, -1)


class LossTerms(NamedTuple):
    """The weighted total and its (unweighted) parts, for logging."""

    total: Tensor
    dice: Tensor
    bce: Tensor
    exclusive: Tensor | None = None


def _slot_mask(logits: Tensor, class_mask: Tensor | None) -> Tensor:
    if logits.dim() != 5:
        raise ValueError(f"logits must have shape (B, K, D, H, W), got {tuple(logits.shape)}")
    if class_mask is None:
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    if class_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"class_mask must have shape {tuple(logits.shape[:2])}, got {tuple(class_mask.shape)}"
        )
    return class_mask.to(device=logits.device, dtype=torch.bool)


def _masked_mean(per_slot: Tensor, slots: Tensor) -> Tensor:
    """Mean over the real class slots; zero (still attached to the graph) when there are none."""
    weights = slots.to(per_slot.dtype)
    return (per_slot * weights).sum() / weights.sum().clamp_min(1.0)


def soft_dice_loss(
    logits: Tensor, target: Tensor, class_mask: Tensor | None = None, smooth: float = 1.0
) -> Tensor:
    """Smoothed soft Dice loss, 1 − (2Σpt + s) / (Σp + Σt + s), per (episode, class) slot, then averaged.

    Why per slot with additive smoothing rather than batch Dice: slot k of two episodes in a batch holds
    two unrelated classes, so pooling a "class" over the batch has no meaning here. The smoothing s (one
    voxel's worth) keeps the ratio finite for a class that is absent from the query crop: its loss is
    Σp / (Σp + s), near 0 only while the total probability Σp over the crop stays below about one voxel.
    At a 32³ crop a logit of −8 everywhere already gives Σp ≈ 11 and a loss of 0.92, so for absent classes
    this term is mostly a constant with a small gradient towards lower probabilities everywhere, and the
    BCE term is what silences false positives (and what tells a 10 % false-positive blob from an empty
    prediction). For a present class of n voxels an empty prediction scores n / (n + s): 0.97 from 32
    voxels on, but 0.5 for one voxel and 0.89 for eight, so at a coarse grid the smallest structures (an
    adrenal at 6 mm) are pushed less towards being found than larger ones; the BCE term still is.
    MONAI's and nnU-Net's s of 1e-5 would remove that, but it would also make an absent class's loss
    jump to 1 at the first false-positive voxel. 1e-5 for present classes only was measured and found
    nothing the recipe misses (docs/phantom-recipe.md, "Dice smoothing for present classes").
    """
    slots = _slot_mask(logits, class_mask)
    probs = torch.sigmoid(logits.float())
    target = target.to(probs.dtype)
    intersection = (probs * target).sum(_SPATIAL)
    denominator = probs.sum(_SPATIAL) + target.sum(_SPATIAL)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return _masked_mean(1.0 - dice, slots)


def bce_loss(logits: Tensor, target: Tensor, class_mask: Tensor | None = None) -> Tensor:
    """Voxel-mean binary cross-entropy on logits per slot, averaged over the real slots."""
    slots = _slot_mask(logits, class_mask)
    per_voxel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return _masked_mean(per_voxel.mean(_SPATIAL), slots)


def exclusive_cross_entropy(logits: Tensor, target: Tensor, class_mask: Tensor | None = None) -> Tensor:
    """Voxel-mean softmax cross-entropy over [background, the K slots], background logit fixed at 0.

    For mutually exclusive targets (at most one slot is 1 per voxel, as when all slots come from one label
    map). With the background logit at 0, softmax over [0, l_1 … l_K] gives p_k = σ(l_k) when K = 1, so it
    agrees with the sigmoid decision rule of inference; with K > 1 it also ranks the slots against each
    other, which is what the argmax of :func:`~iris_pipelines.inference.strategies.logits_to_labels`
    reads. Padding slots get −inf and take no part. Computed in float32.
    """
    slots = _slot_mask(logits, class_mask)
    if target.shape != logits.shape:
        raise ValueError(f"target {tuple(target.shape)} must match logits {tuple(logits.shape)}")
    real = slots[..., None, None, None]
    hot = (target > 0.5) & real
    if bool(hot.sum(dim=1).gt(1).any()):
        raise ValueError("exclusive_cross_entropy needs mutually exclusive targets: a voxel is in two slots")
    masked = logits.float().masked_fill(~real, float("-inf"))
    full = torch.cat([torch.zeros_like(masked[:, :1]), masked], dim=1)
    # At most one slot is hot per voxel, so this sum is its class index in ``full`` (0: background).
    slot_numbers = torch.arange(1, hot.shape[1] + 1, device=hot.device).view(1, -1, 1, 1, 1)
    index = (hot.long() * slot_numbers).sum(dim=1)
    per_voxel = F.cross_entropy(full, index, reduction="none")
    has_slot = slots.any(dim=1).to(per_voxel.dtype)
    return (per_voxel.mean(_SPATIAL) * has_slot).sum() / has_slot.sum().clamp_min(1.0)


def segmentation_loss(
    logits: Tensor,
    target: Tensor,
    class_mask: Tensor | None = None,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    smooth: float = 1.0,
    exclusive_weight: float = 0.0,
) -> LossTerms:
    """L_seg = dice_weight·Dice + bce_weight·BCE (+ exclusive_weight·softmax CE) on (B, K, D, H, W)
    logits and {0, 1} targets.

    ``class_mask`` (B, K) bool marks the real class slots; padding slots (episodes with fewer classes
    than K) contribute nothing. The exclusive term (:func:`exclusive_cross_entropy`) needs targets that
    never put a voxel in two slots. Computed in float32 so it is safe under bf16 autocast.
    """
    if target.shape != logits.shape:
        raise ValueError(f"target {tuple(target.shape)} must match logits {tuple(logits.shape)}")
    dice = soft_dice_loss(logits, target, class_mask, smooth)
    bce = bce_loss(logits, target, class_mask)
    total = dice_weight * dice + bce_weight * bce
    if exclusive_weight <= 0:
        return LossTerms(total, dice, bce)
    exclusive = exclusive_cross_entropy(logits, target, class_mask)
    return LossTerms(total + exclusive_weight * exclusive, dice, bce, exclusive)


def dice_score(pred_mask: Tensor, target: Tensor) -> Tensor:
    """Hard Dice 2|P∩T| / (|P| + |T|) over the last three (spatial) dimensions; leading dims are kept.

    Both empty counts as a perfect 1.0 (nothing to find, nothing found).
    """
    if pred_mask.shape != target.shape:
        raise ValueError(f"pred_mask {tuple(pred_mask.shape)} must match target {tuple(target.shape)}")
    pred, true = pred_mask.bool(), target.bool()
    intersection = (pred & true).sum(_SPATIAL).double()
    total = (pred.sum(_SPATIAL) + true.sum(_SPATIAL)).double()
    return torch.where(total > 0, 2.0 * intersection / total.clamp_min(1.0), torch.ones_like(total))
