"""Auto-masks: homogeneous regions of one scan, and the label-free episodes built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iris_pipelines.training import EpisodeSampler, TrainConfig, train_class_ids, train_pool
from iris_pipelines.training.auto_masks import intensity_regions, shared_regions
from iris_pipelines.training.sampler import case_records


def _two_organs() -> np.ndarray:
    """A 24³ scan: background 0, a bright cube, a medium ball, and a one-voxel speck."""
    image = np.zeros((24, 24, 24), np.float32)
    image[3:9, 3:9, 3:9] = 5.0
    z, y, x = np.ogrid[:24, :24, :24]
    image[(z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2 <= 16] = 2.0
    image[20, 3, 3] = 5.0
    return image


def test_regions_are_the_homogeneous_objects_without_background_or_specks() -> None:
    image = _two_organs()
    regions = intensity_regions(image, bins=3, smoothing=0.0, min_voxels=8, max_fraction=0.2)
    labels = [label for label in np.unique(regions) if label]
    assert len(labels) == 2
    cube, ball = regions[5, 5, 5], regions[16, 16, 16]
    assert cube and ball and cube != ball
    for label, truth in ((cube, (image == 5.0) & (np.arange(24)[:, None, None] < 12)), (ball, image == 2.0)):
        region = regions == label
        assert not (region & ~truth).any()  # never leaks out of its object
        assert region.sum() >= 0.7 * truth.sum()  # the opening only trims edges and corners
    assert regions[20, 3, 3] == 0  # one voxel: below min_voxels
    assert regions[0, 0, 0] == 0  # the background fills most of the scan: above max_fraction


def test_regions_reject_what_is_not_a_volume() -> None:
    with pytest.raises(ValueError, match=r"3-D image, got shape \(4, 4\)"):
        intensity_regions(np.zeros((4, 4)), bins=3)
    with pytest.raises(ValueError, match="bins must be >= 2"):
        intensity_regions(np.zeros((4, 4, 4)), bins=1)


def test_shared_regions_need_enough_voxels_in_every_window() -> None:
    regions = np.zeros((10, 10, 10), np.int32)
    regions[0:3, 0:3, 0:3] = 1  # 27 voxels, only in the first window
    regions[4:8, 4:8, 4:8] = 2  # 64 voxels, in both
    windows = [((0, 0, 0), (8, 8, 8)), ((2, 2, 2), (8, 8, 8))]
    assert shared_regions(regions, windows, min_voxels=8) == [2]
    assert shared_regions(regions, windows[:1], min_voxels=8) == [1, 2]
    assert shared_regions(regions, windows, min_voxels=65) == []


@pytest.fixture(scope="module")
def pool(collection):
    manifest, index = collection
    return train_pool(index, case_records(manifest)), train_class_ids(index)


def _sampler(pool, **recipe) -> EpisodeSampler:
    config = TrainConfig(crop_size=(32, 32, 32), max_classes=4, class_drop_prob=0.0, **recipe)
    return EpisodeSampler(*pool, config)


def test_auto_mask_episodes_have_disjoint_nonempty_targets_and_no_class(pool) -> None:
    sampler = _sampler(pool, auto_mask_prob=1.0, augment=False)
    for step in range(8):
        episode = sampler.episode(step, 0)
        real = int(episode["class_mask"].sum())
        assert real >= 1
        assert (episode["class_ids"] == -1).all()  # no class: never written to the memory bank
        for key in ("query_masks", "ref_masks"):
            masks = episode[key]
            assert (masks[:real].flatten(1).sum(dim=1) > 0).all()
            assert masks.sum(dim=0).max() <= 1  # regions never overlap
            assert masks[real:].sum() == 0


def test_labelled_episodes_are_unchanged_by_the_auto_mask_share(pool) -> None:
    plain, mixed = _sampler(pool), _sampler(pool, auto_mask_prob=0.5)
    kinds = []
    for step in range(16):
        episode = mixed.episode(step, 0)
        labelled = bool((episode["class_ids"] >= 0).any())
        kinds.append(labelled)
        if labelled:
            for key, value in plain.episode(step, 0).items():
                assert torch.equal(episode[key], value), key
    assert any(kinds) and not all(kinds)
