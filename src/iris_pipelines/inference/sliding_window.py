"""Sliding-window segmentation of volumes larger than the training window, with MONAI's inferer.

The paper evaluates with 128³ windows at 50 % overlap on the reassembled volume, and the authors' MASS
release blends windows with Gaussian weights; MONAI's ``sliding_window_inference`` does exactly that, so
it is used rather than a hand-written tiler (DESIGN.md conventions). Windows blend **logits**, so a
volume covered by one window gives the same logits as ``model.segment`` on the whole volume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor

from iris_pipelines.inference.strategies import clamp_roi
from iris_pipelines.model import Iris

Predictor = Callable[[Tensor], Tensor]
"""(1, 1, d, h, w) window → (1, K, d, h, w) logits."""


@torch.no_grad()
def sliding_window_logits(
    predictor: Predictor,
    volume: Tensor,
    *,
    roi_size: int | Sequence[int] = 128,
    overlap: float = 0.5,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 1,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Logits (B, K, D, H, W) of ``predictor`` tiled over ``volume`` (B, 1, D, H, W).

    ``roi_size`` is clamped to the volume per axis, so an axis shorter than the window is covered by one
    window of its own length and MONAI never pads it (the model pads windows to a multiple of 16 itself,
    with replicate padding; MONAI's zero padding would change the result). ``device`` is where the full
    output is assembled (e.g. ``"cpu"`` for big volumes while windows run on the GPU); default: the
    volume's device. ``sw_device`` is where windows are cut to and blended (the predictor must return
    logits there); default: the volume's device. Batch entries are tiled one after the other so each
    window batch holds one scan.
    """
    if volume.dim() != 5 or volume.shape[1] != 1:
        raise ValueError(f"volume must have shape (B, 1, D, H, W), got {tuple(volume.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    roi = clamp_roi(roi_size, tuple(volume.shape[2:]))
    outputs = [
        sliding_window_inference(
            volume[b : b + 1],
            roi_size=roi,
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode=mode,
            sigma_scale=sigma_scale,
            sw_device=sw_device,
            device=device,
            progress=progress,
        )
        for b in range(volume.shape[0])
    ]
    return torch.cat([torch.as_tensor(o) for o in outputs])


def window_predictor(model: Iris, task: Tensor) -> Predictor:
    """The per-window predictor ``window → model.segment(window, task)`` (task moved to the model).

    Logits come back on the window's device, which is where MONAI blends them.
    """
    device = next(model.parameters()).device
    task = task.to(device)

    def predict(window: Tensor) -> Tensor:
        return model.segment(window.to(device), task).to(window.device)

    return predict


def sliding_window_segment(
    model: Iris,
    query: Tensor,
    task: Tensor,
    *,
    roi_size: int | Sequence[int] = 128,
    overlap: float = 0.5,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """``model.segment(query, task)`` for a query of any size: logits (B, K, D, H, W) on ``device``.

    ``task`` is (1, K, m+1, C), shared by every window (e.g. from any strategy in
    :mod:`~iris_pipelines.inference.strategies`). Signature-compatible with ``SegmentFn`` through
    ``functools.partial(sliding_window_segment, model, roi_size=...)``.
    """
    if task.dim() != 4 or task.shape[0] != 1:
        raise ValueError(f"task must have shape (1, K, m+1, C), got {tuple(task.shape)}")
    if query.dim() == 5:
        roi = clamp_roi(roi_size, tuple(query.shape[2:]))
        divisor = model.config.size_divisor
        if all(r <= divisor for r in roi):
            # InstanceNorm needs more than one bottleneck voxel, and the model pads to multiples of divisor.
            raise ValueError(
                f"window {roi} over a volume of {tuple(query.shape[2:])} voxels is too small: at least one "
                f"axis must exceed {divisor} voxels so the network's bottleneck holds more than one voxel "
                "(a larger window, or for a scan this small a finer target spacing)"
            )
    return sliding_window_logits(
        window_predictor(model, task),
        query,
        roi_size=roi_size,
        overlap=overlap,
        mode=mode,
        sw_batch_size=sw_batch_size,
        sw_device=next(model.parameters()).device,  # windows run and blend where the model is
        device=device if device is not None else query.device,
        progress=progress,
    )


def volume_predictor(model: Iris, task: Tensor, **sliding_window_options: Any) -> Predictor:
    """``volume → sliding_window_segment(model, volume, task, **options)``: segment_volume's ``predict``."""
    return partial(sliding_window_segment, model, task=task, **sliding_window_options)
