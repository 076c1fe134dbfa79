"""Episode augmentation (paper §3.3 and supplement): spatial + intensity on query and reference alike,
and perturbation of the reference masks to simulate imperfect references.

Hand-written on torch rather than MONAI transforms: every draw must come from one explicit
``torch.Generator`` seeded by (seed, rank, step) so a resumed run replays the exact same episodes, and
MONAI's randomisable transforms carry their own NumPy state that would have to be checkpointed too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentParams:
    """Ranges from the supplement; the paper gives no probabilities, so each op fires with ``p``."""

    flip_prob: float = 0.5
    affine_prob: float = 0.5
    rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    intensity_prob: float = 0.5
    brightness_mul: tuple[float, float] = (0.9, 1.1)
    brightness_add_sigma: float = 0.1
    contrast: tuple[float, float] = (0.8, 1.2)
    gamma: tuple[float, float] = (0.8, 1.2)
    blur_sigma: tuple[float, float] = (0.7, 1.3)
    blur_prob: float = 0.2
    noise_sigma_max: float = 0.02


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _chance(gen: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=gen)) < p


def _rotation_matrix(angles: tuple[float, float, float]) -> Tensor:
    a, b, c = angles
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).float()


def flip_axes(gen: torch.Generator, params: AugmentParams) -> list[int]:
    """Spatial axes (1–3 of a (C, D, H, W) tensor) to flip, each with ``params.flip_prob``."""
    return [d + 1 for d in range(3) if _chance(gen, params.flip_prob)]


def spatial_augment(
    image: Tensor,
    masks: Tensor,
    gen: torch.Generator,
    params: AugmentParams,
    flips: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Flips and a small rotation/scale about the crop centre, applied identically to (1, D, H, W) image
    and (K, D, H, W) masks. Masks are resampled linearly and re-thresholded at 0.5 so they stay binary.
    ``flips`` fixes the flipped axes (to flip a query and its reference alike); None draws them."""
    dims = flip_axes(gen, params) if flips is None else flips
    if dims:
        image, masks = image.flip(dims), masks.flip(dims)
    if not _chance(gen, params.affine_prob):
        return image, masks
    limit = math.radians(params.rotation_deg)
    angles = tuple(_uniform(gen, -limit, limit) for _ in range(3))
    scale = _uniform(gen, *params.scale)
    theta = torch.zeros(1, 3, 4)
    theta[0, :, :3] = _rotation_matrix(angles) / scale  # sampling grid: output -> input coordinates
    size = (1, 1, *image.shape[1:])
    grid = F.affine_grid(theta, list(size), align_corners=False)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    if masks.shape[0]:
        grid_k = grid.expand(1, *grid.shape[1:])
        warped = F.grid_sample(
            masks[None].float(), grid_k, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        masks = (warped[0] > 0.5).to(masks.dtype)
    return image, masks


def _gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = image[None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0] * 6
        pad[4 - 2 * axis] = pad[5 - 2 * axis] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0]


def intensity_augment(image: Tensor, gen: torch.Generator, params: AugmentParams) -> Tensor:
    """Brightness (× and +), contrast, gamma, blur and noise on a normalised (1, D, H, W) image."""
    p = params.intensity_prob
    if _chance(gen, p):
        image = image * _uniform(gen, *params.brightness_mul)
    if _chance(gen, p):
        image = image + params.brightness_add_sigma * float(torch.randn((), generator=gen))
    if _chance(gen, p):
        mean = image.mean()
        image = (image - mean) * _uniform(gen, *params.contrast) + mean
    if _chance(gen, p):
        # Gamma needs a non-negative range: rescale to [0, 1], apply, map back.
        low, high = image.min(), image.max()
        span = (high - low).clamp_min(1e-6)
        image = ((image - low) / span) ** _uniform(gen, *params.gamma) * span + low
    if _chance(gen, params.blur_prob):
        image = _gaussian_blur(image, _uniform(gen, *params.blur_sigma))
    if _chance(gen, p):
        sigma = _uniform(gen, 0.0, params.noise_sigma_max)
        image = image + sigma * torch.randn(image.shape, generator=gen, dtype=image.dtype)
    return image


def _shift(mask: Tensor, axis: int, offset: int) -> Tensor:
    """Shift one voxel along ``axis`` with zero fill (no wrap-around, unlike ``torch.roll``)."""
    out = torch.zeros_like(mask)
    n = mask.shape[axis]
    src = mask.narrow(axis, max(0, -offset), n - abs(offset))
    out.narrow(axis, max(0, offset), n - abs(offset)).copy_(src)
    return out


def perturb_masks(masks: Tensor, gen: torch.Generator, prob: float) -> Tensor:
    """Per class, with probability ``prob``: dilate, erode or shift the (K, D, H, W) mask by one voxel.

    An erosion that would empty a mask is skipped: an empty reference carries no task at all.
    """
    out = masks.clone()
    for k in range(masks.shape[0]):
        if not _chance(gen, prob):
            continue
        mask = masks[k].float()
        choice = int(torch.randint(3, (), generator=gen))
        if choice == 0:
            new = F.max_pool3d(mask[None, None], 3, 1, 1)[0, 0]
        elif choice == 1:
            new = -F.max_pool3d(-mask[None, None], 3, 1, 1)[0, 0]
        else:
            axis = int(torch.randint(3, (), generator=gen))
            new = _shift(mask, axis, 1 if _chance(gen, 0.5) else -1)
        if new.any():
            out[k] = new.to(masks.dtype)
    return out


def augment_pair(
    image: Tensor,
    masks: Tensor,
    gen: torch.Generator,
    params: AugmentParams | None = None,
    flips: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Spatial then intensity augmentation of one (image, masks) pair (``flips``: see spatial_augment)."""
    params = params or AugmentParams()
    image, masks = spatial_augment(image, masks, gen, params, flips)
    return intensity_augment(image, gen, params), masks
