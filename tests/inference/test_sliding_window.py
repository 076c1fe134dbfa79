"""Sliding-window inference: one window equals direct inference, larger volumes come back whole."""

from __future__ import annotations

import pytest
import torch

from iris_pipelines.inference import encode_reference, sliding_window_logits, sliding_window_segment
from iris_pipelines.model import Iris

Scans = dict[str, tuple[torch.Tensor, torch.Tensor]]


@pytest.mark.parametrize("roi_size", [128, (30, 23, 64)])
def test_a_volume_that_fits_one_window_equals_direct_inference(
    tiny_model: Iris, scans: Scans, roi_size: int | tuple[int, int, int]
) -> None:
    """Odd sizes (padded inside the model) and a window larger than the volume on every axis."""
    task = encode_reference(tiny_model, *scans["a"])
    query = torch.randn(1, 1, 30, 23, 27, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = tiny_model.segment(query, task)
    tiled = sliding_window_segment(tiny_model, query, task, roi_size=roi_size)
    assert tiled.shape == direct.shape == (1, 2, 30, 23, 27)
    torch.testing.assert_close(tiled, direct, rtol=1e-5, atol=1e-5)


def test_a_larger_volume_is_tiled_and_returned_whole(tiny_model: Iris, scans: Scans) -> None:
    task = encode_reference(tiny_model, *scans["a"])
    query = torch.randn(2, 1, 40, 24, 33, generator=torch.Generator().manual_seed(1))
    windows = []

    def count(window: torch.Tensor) -> torch.Tensor:
        windows.append(tuple(window.shape))
        return tiny_model.segment(window, task)

    logits = sliding_window_logits(count, query, roi_size=24, overlap=0.5)
    assert logits.shape == (2, 2, 40, 24, 33) and torch.isfinite(logits).all()
    # z: 40 in windows of 24 at stride 12 → 3 starts (0, 12, 16); y: one; x: 33 → 2 starts. Per scan.
    assert windows == [(1, 1, 24, 24, 24)] * (2 * 3 * 1 * 2)
    with torch.no_grad():
        whole = tiny_model.segment(query[:1], task)
    assert not torch.allclose(logits[:1], whole, atol=1e-3), "tiling must actually use windows"
    assert torch.equal(logits[1:], sliding_window_segment(tiny_model, query[1:], task, roi_size=24))


def test_gaussian_blending_of_a_pointwise_predictor_reassembles_it_exactly() -> None:
    """A predictor that treats every voxel alone gives the same value in every window: the blend of
    overlapping windows must reproduce it wherever the windows overlap, edges included."""
    volume = torch.randn(1, 1, 37, 29, 21, generator=torch.Generator().manual_seed(2))

    def pointwise(window: torch.Tensor) -> torch.Tensor:
        return torch.cat([2.0 * window, window.exp()], dim=1)

    logits = sliding_window_logits(pointwise, volume, roi_size=(16, 12, 8), overlap=0.5)
    torch.testing.assert_close(logits, pointwise(volume), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused(tiny_model: Iris, scans: Scans) -> None:
    task = encode_reference(tiny_model, *scans["a"])
    with pytest.raises(ValueError, match=r"volume must have shape \(B, 1, D, H, W\)"):
        sliding_window_segment(tiny_model, torch.zeros(1, 24, 24, 24), task)
    with pytest.raises(ValueError, match=r"overlap must lie in \[0, 1\)"):
        sliding_window_segment(tiny_model, torch.zeros(1, 1, 24, 24, 24), task, overlap=1.0)
    with pytest.raises(ValueError, match=r"task must have shape \(1, K, m\+1, C\)"):
        sliding_window_segment(tiny_model, torch.zeros(1, 1, 24, 24, 24), task[0])
    with pytest.raises(ValueError, match="roi_size must be a positive int or 3 positive ints"):
        sliding_window_segment(tiny_model, torch.zeros(1, 1, 24, 24, 24), task, roi_size=(24, 24))
    with pytest.raises(ValueError, match=r"window \(16, 16, 16\) over a volume of .* voxels is too small"):
        sliding_window_segment(tiny_model, torch.zeros(1, 1, 24, 24, 24), task, roi_size=16)
