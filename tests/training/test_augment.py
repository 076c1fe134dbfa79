import torch

from iris_pipelines.training.augment import AugmentParams, augment_pair, perturb_masks, spatial_augment


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
