import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from iris_pipelines.training.augment import (
    AugmentParams,
    _rotation_matrix,
    augment_pair,
    perturb_masks,
    spatial_augment,
    warp_masks,
)


def _blob() -> torch.Tensor:
    mask = torch.zeros(1, 24, 24, 24)
    mask[0, 6:14, 8:18, 5:12] = 1
    return mask


def test_spatial_augment_moves_image_and_mask_together():
    mask = _blob()
    params = AugmentParams(flip_prob=0.5, affine_prob=1.0)
    for seed in range(4):
        image, masks = spatial_augment(
            mask.clone(), mask.clone(), torch.Generator().manual_seed(seed), params
        )
        agreement = ((image > 0.5) == (masks > 0.5)).float().mean()
        assert agreement > 0.995
        assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_augmentation_is_seeded():
    mask = _blob()
    a = augment_pair(mask.clone(), mask.clone(), torch.Generator().manual_seed(3))
    b = augment_pair(mask.clone(), mask.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_perturbation_changes_masks_by_at_most_one_voxel():
    masks = _blob().repeat(3, 1, 1, 1)
    dilated = torch.nn.functional.max_pool3d(masks[None], 3, 1, 1)[0]
    eroded = -torch.nn.functional.max_pool3d(-masks[None], 3, 1, 1)[0]
    changed = 0
    for seed in range(6):
        out = perturb_masks(masks, torch.Generator().manual_seed(seed), prob=1.0)
        for k in range(3):
            assert out[k].any()
            assert (out[k] <= dilated[k]).all()
            # Shifts move the blob by one voxel, so compare with the eroded core shifted either way.
            assert (out[k] * dilated[k]).sum() >= eroded[k].sum()
        changed += int(not torch.equal(out, masks))
    assert changed == 6
    assert torch.equal(perturb_masks(masks, torch.Generator().manual_seed(0), prob=0.0), masks)


def test_given_flips_are_applied_to_both_members_of_a_pair():
    mask = _blob()
    params = AugmentParams(flip_prob=0.5, affine_prob=0.0, intensity_prob=0.0, blur_prob=0.0)
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        _, query_mask = augment_pair(mask.clone(), mask.clone(), gen, params, flips=[1, 3])
        _, reference_mask = augment_pair(mask.clone(), mask.clone(), gen, params, flips=[1, 3])
        assert torch.equal(query_mask, mask.flip([1, 3])) and torch.equal(reference_mask, query_mask)


def _dense_reference():
    """benchmarks/augment.py keeps the whole-crop versions the boxed ones replaced (loaded by path)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "augment.py"
    spec = importlib.util.spec_from_file_location("augment_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _masks_for_boxes(gen: torch.Generator, shape=(3, 20, 23, 17)) -> torch.Tensor:
    """A random box, one touching two borders, a single voxel, an empty mask and one filling the crop."""
    k, d, h, w = shape
    masks = torch.zeros(shape)
    lo = [int(torch.randint(0, n - 4, (), generator=gen)) for n in (d, h, w)]
    masks[0, lo[0] : lo[0] + 5, lo[1] : lo[1] + 7, lo[2] : lo[2] + 4] = 1
    masks[1, 0:6, h - 5 :, 3:9] = 1
    masks[2, d // 2, h // 2, w // 2] = 1
    return torch.cat([masks, torch.zeros(1, d, h, w), torch.ones(1, d, h, w)])


def test_boxed_mask_warp_equals_sampling_the_whole_crop():
    gen = torch.Generator().manual_seed(0)
    for trial in range(12):
        masks = _masks_for_boxes(gen)
        # Small turns like training's, then large ones with scaling and a shift (theta's last column).
        degrees = 10.0 if trial < 6 else 60.0
        angles = [math.radians(degrees) * (2 * float(torch.rand((), generator=gen)) - 1) for _ in range(3)]
        theta = torch.zeros(1, 3, 4)
        theta[0, :, :3] = _rotation_matrix(tuple(angles)) / (0.8 + 0.4 * float(torch.rand((), generator=gen)))
        if trial >= 6:
            theta[0, :, 3] = 0.3 * (2 * torch.rand(3, generator=gen) - 1)
        grid = F.affine_grid(theta, [1, 1, *masks.shape[1:]], align_corners=False)
        dense = F.grid_sample(masks[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)
        assert torch.equal(warp_masks(masks, grid, theta), dense[0]), trial


def test_boxed_perturbation_equals_the_whole_crop_version_draw_for_draw():
    dense_perturb_masks = _dense_reference().dense_perturb_masks
    masks = _masks_for_boxes(torch.Generator().manual_seed(1))
    for seed in range(40):
        ours = perturb_masks(masks, torch.Generator().manual_seed(seed), prob=0.7)
        theirs = dense_perturb_masks(masks, torch.Generator().manual_seed(seed), prob=0.7)
        assert torch.equal(ours, theirs), seed
    # Both consume the generator alike, so the draws after them (the next episode's) are unchanged.
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    perturb_masks(masks, a, prob=0.7), dense_perturb_masks(masks, b, prob=0.7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_an_organ_cut_by_the_crop_face_is_not_stretched_past_its_mask():
    """Where the warp reaches outside the crop, the image must not show organ where its mask says none."""
    filled = torch.ones(1, 20, 20, 20)  # an organ that fills the crop and is cut by all six faces
    params = AugmentParams(flip_prob=0.0, affine_prob=1.0, scale=(0.8, 0.85))  # zoom out: pulls in outside
    for seed in range(4):
        image, masks = spatial_augment(
            filled.clone(), filled.clone(), torch.Generator().manual_seed(seed), params
        )
        assert masks.sum() < filled.sum(), (
            "the warp must reach outside the crop for this test to mean anything"
        )
        assert image[masks == 0].max() < 0.5  # no organ where the mask says background
        assert ((image > 0.5) != (masks > 0.5)).float().mean() < 0.01  # only the linear image's rim


def test_a_one_voxel_thin_structure_keeps_its_voxels_under_the_warp():
    """A vessel one voxel across: a linear warp thresholded at 0.5 erodes it, nearest does not."""
    tube = torch.zeros(1, 24, 24, 24)
    tube[0, 4:20, 12, 12] = 1
    params = AugmentParams(flip_prob=0.0, affine_prob=1.0)
    kept = []
    for seed in range(12):
        _, masks = spatial_augment(tube.clone(), tube.clone(), torch.Generator().manual_seed(seed), params)
        kept.append(float(masks.sum() / tube.sum()))
    assert min(kept) >= 0.6 and sum(kept) / len(kept) > 0.9, kept
