"""Episode augmentation (paper §3.3 and supplement): spatial + intensity on query and reference alike,
and perturbation of the reference masks to simulate imperfect references.

Hand-written on torch rather than MONAI transforms: every draw must come from one explicit
``torch.Generator`` seeded by (seed, rank, step) so a resumed run replays the exact same episodes, and
MONAI's randomisable transforms carry their own NumPy state that would have to be checkpointed too.
"""

from __future__ import annotations

import itertools
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
    and (K, D, H, W) masks. Masks are resampled by nearest neighbour, so they stay binary and a structure
    one voxel thin keeps its voxels. Where the warp reaches past the crop, image and masks are both zero
    (the normalised mean intensity, and background): a border-replicated image would stretch an organ cut
    by the crop face into a band its masks call background.
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
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    return image, warp_masks(masks, grid, theta)


def mask_extent(masks: Tensor) -> tuple[list[int], list[int]] | None:
    """First and last (D, H, W) index any of the (K, D, H, W) masks covers; None when all are empty."""
    occupied = (masks != 0).any(dim=0)
    first, last = [], []
    for axis in range(3):
        hits = occupied.any(dim=tuple(a for a in range(3) if a != axis)).nonzero()
        if not hits.numel():
            return None
        first.append(int(hits[0]))
        last.append(int(hits[-1]))
    return first, last


def warp_masks(masks: Tensor, grid: Tensor, theta: Tensor) -> Tensor:
    """``grid_sample(masks, grid)`` (nearest, zero padding) for the affine ``theta`` behind ``grid``.

    Each mask is sampled only over the output box it can reach, which gives the same result bit for bit:
    a nearest sample is non-zero only within half a voxel of the mask, the affine map sends the mask's box
    (grown by that voxel) into the box of its corners' images, and grid_sample computes every output
    voxel on its own. A class covers a small part of a crop, and sampling all of it for every class was
    most of an episode's augmentation time at 128³ (benchmarks/augment.py).
    """
    out = torch.zeros_like(masks)
    for k in range(masks.shape[0]):
        window = _reachable_window(masks[k : k + 1], theta)
        if window is None:
            continue
        warped = F.grid_sample(
            masks[None, k : k + 1].float(), grid[(slice(None), *window)], mode="nearest",
            padding_mode="zeros", align_corners=False,
        )  # fmt: skip
        out[k][window] = warped[0, 0].to(masks.dtype)
    return out


def _reachable_window(mask: Tensor, theta: Tensor) -> tuple[slice, slice, slice] | None:
    """The output (D, H, W) box outside which the affine warp of the (1, D, H, W) ``mask`` is 0."""
    extent = mask_extent(mask)
    if extent is None:
        return None
    sizes = torch.tensor(mask.shape[1:], dtype=torch.float64)
    # The 8 corners of the reachable input box (one voxel around the mask), in voxel (D, H, W) and then
    # normalised (x, y, z) coordinates (align_corners=False: voxel i of n sits at (2i + 1) / n - 1).
    reach = [(a - 1, b + 1) for a, b in zip(*extent, strict=True)]
    corners = torch.tensor(list(itertools.product(*reach)), dtype=torch.float64)
    source_xyz = ((2 * corners + 1) / sizes - 1).flip(-1)
    matrix, shift = theta[0, :, :3].double(), theta[0, :, 3].double()
    target = ((source_xyz - shift) @ torch.linalg.inv(matrix).T).flip(-1)
    voxels = ((target + 1) * sizes - 1) / 2
    # One voxel more each way than the corners' box: float rounding in affine_grid stays inside it.
    start = (voxels.min(dim=0).values.floor() - 1).clamp(min=0).long().tolist()
    stop = torch.minimum(voxels.max(dim=0).values.ceil() + 2, sizes).long().tolist()
    if any(a >= b for a, b in zip(start, stop, strict=True)):
        return None
    return tuple(slice(a, b) for a, b in zip(start, stop, strict=True))


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
        choice = int(torch.randint(3, (), generator=gen))
        if choice == 2:
            axis = int(torch.randint(3, (), generator=gen))
            offset = 1 if _chance(gen, 0.5) else -1
        extent = mask_extent(masks[k : k + 1])
        if extent is None:  # every perturbation of an empty mask is empty
            continue
        # All three reach one voxel: outside the mask's box grown by one, the result is 0 as before.
        window = tuple(slice(max(a - 1, 0), b + 2) for a, b in zip(*extent, strict=True))
        mask = masks[k][window].float()
        if choice == 0:
            new = F.max_pool3d(mask[None, None], 3, 1, 1)[0, 0]
        elif choice == 1:
            new = -F.max_pool3d(-mask[None, None], 3, 1, 1)[0, 0]
        else:
            new = _shift(mask, axis, offset)
        if new.any():
            out[k][window] = new.to(masks.dtype)
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
