import json

import numpy as np
import pytest
import torch
from training_synthetic import saved_case_rows

from iris_pipelines.training import EpisodeSampler, TrainConfig, train_class_ids, train_pool
from iris_pipelines.training.sampler import MASK_KEYS, batch_to_device, case_records, read_crop


@pytest.fixture(scope="module")
def setup(collection):
    manifest, index = collection
    records = case_records(manifest)
    config = TrainConfig(crop_size=(32, 32, 32), max_classes=2, class_drop_prob=0.5)
    ids = train_class_ids(index)
    return manifest, index, records, config, ids


def _sampler(setup, **kwargs):
    _, index, records, config, ids = setup
    return EpisodeSampler(train_pool(index, records), ids, kwargs.pop("config", config), **kwargs)


def test_episodes_pair_different_subjects_of_one_train_dataset(setup):
    _, index, _, config, _ = setup
    split = {(c["dataset"], c["case_id"]): c["split"] for c in index["cases"]}
    sampler = _sampler(setup)
    datasets = set()
    for step in range(60):
        draw = sampler.draw(step, 0)
        datasets.add(draw.query.dataset)
        assert draw.query.dataset == draw.reference.dataset
        assert draw.query.subject_id != draw.reference.subject_id
        assert split[(draw.query.dataset, draw.query.case_id)] == "train"
        assert split[(draw.reference.dataset, draw.reference.case_id)] == "train"
        assert 1 <= len(draw.classes) <= config.max_classes
        assert set(draw.classes) <= set(draw.query.classes) & set(draw.reference.classes)
    assert datasets == {"alpha", "beta"}  # both train datasets, never the held-out "gamma"


def test_class_ids_cover_train_datasets_only(setup):
    assert setup[4] == {"alpha/1": 0, "alpha/2": 1, "beta/1": 2}


def test_batch_is_deterministic_in_seed_rank_step(setup):
    sampler = _sampler(setup)
    a, b = sampler.batch(5), sampler.batch(5)
    for key in a:
        assert torch.equal(a[key], b[key])
    other_step = sampler.batch(6)
    other_rank = _sampler(setup, rank=1).batch(5)
    assert not torch.equal(a["query"], other_step["query"])
    assert not torch.equal(a["query"], other_rank["query"])


@pytest.mark.parametrize("auto_mask_prob", [0.0, 1.0], ids=["labelled", "auto-mask"])
def test_masks_travel_as_uint8_and_reach_the_device_as_float(setup, auto_mask_prob):
    # uint8 masks are a quarter of the bytes through worker shared memory, pinning and the H2D copy;
    # the model and loss must still get float32 {0, 1} masks, the other entries untouched.
    config = TrainConfig.from_dict({**setup[3].to_dict(), "auto_mask_prob": auto_mask_prob})
    batch = _sampler(setup, config=config, batch_size=2).batch(3)
    moved = batch_to_device(batch, torch.device("cpu"))
    for key in MASK_KEYS:
        assert batch[key].dtype == torch.uint8
        assert set(batch[key].unique().tolist()) <= {0, 1}
        assert batch[key].any()
        assert moved[key].dtype == torch.float32
        assert torch.equal(moved[key], batch[key].float())
    for key in batch.keys() - set(MASK_KEYS):
        assert moved[key].dtype == batch[key].dtype and torch.equal(moved[key], batch[key])


def test_batch_shapes_padding_and_reference_coverage(setup):
    manifest, _, _, config, ids = setup
    voxels = {(r.dataset, r.case_id): json.loads(r.class_voxels) for r in manifest.itertuples()}
    plain = TrainConfig.from_dict({**config.to_dict(), "augment": False})
    sampler = _sampler(setup, config=plain, batch_size=3)
    for step in range(8):
        batch = sampler.batch(step)
        assert batch["query"].shape == (3, 1, 32, 32, 32)
        assert batch["ref_masks"].shape == batch["query_masks"].shape == (3, 2, 32, 32, 32)
        assert batch["class_mask"].dtype == torch.bool
        pad = ~batch["class_mask"]
        assert (batch["ref_masks"][pad] == 0).all() and (batch["class_ids"][pad] == -1).all()
        for slot in range(3):
            draw = sampler.draw(step, slot)
            for k, label in enumerate(draw.classes):
                # The reference crop keeps every selected class whole (all blobs fit in 32³).
                expected = voxels[(draw.reference.dataset, draw.reference.case_id)][str(label)]
                assert int(batch["ref_masks"][slot, k].sum()) == expected
                assert int(batch["class_ids"][slot, k]) == ids[f"{draw.query.dataset}/{label}"]


def test_read_crop_pads_small_volumes_with_edge_values():
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    crop = read_crop(array, [0, 1, 0], [4, 4, 4])
    assert crop.shape == (4, 4, 4)
    np.testing.assert_array_equal(crop[:2, :2, :4], array[:, 1:3, :])
    np.testing.assert_array_equal(crop[3], crop[1])


def _centroid(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask).float().mean(dim=0)


def test_shared_flips_keep_the_reference_on_the_same_side_as_the_query(setup):
    _, _, _, config, _ = setup
    # Only flips: with independent flips the two crops disagree in about half the episodes.
    recipe = {**config.to_dict(), "flip_prob": 0.5, "reference_mask_perturbation": 0.0}
    flips_only = dict(affine_prob=0.0, intensity_prob=0.0, blur_prob=0.0)
    from iris_pipelines.training.augment import AugmentParams

    def side_agreement(shared: bool) -> float:
        cfg = TrainConfig.from_dict({**recipe, "shared_flips": shared})
        sampler = _sampler(setup, config=cfg, augment=AugmentParams(flip_prob=0.5, **flips_only))
        plain = _sampler(setup, config=TrainConfig.from_dict({**recipe, "augment": False}))
        agree = []
        for step in range(24):
            flipped, unflipped = sampler.episode(step, 0), plain.episode(step, 0)
            for key in ("query_masks", "ref_masks"):
                assert flipped[key][0].sum() == unflipped[key][0].sum()
            moved = [
                torch.sign(_centroid(flipped[key][0]) - 15.5)
                != torch.sign(_centroid(unflipped[key][0]) - 15.5)
                for key in ("query_masks", "ref_masks")
            ]
            agree.append(bool(torch.equal(moved[0], moved[1])))
        return sum(agree) / len(agree)

    assert side_agreement(shared=True) == 1.0
    assert side_agreement(shared=False) < 0.9


def test_class_union_merges_two_slots_in_query_and_reference(setup):
    _, _, _, config, _ = setup
    recipe = {**config.to_dict(), "augment": False, "class_drop_prob": 0.0}
    plain = _sampler(setup, config=TrainConfig.from_dict(recipe))
    merging = _sampler(setup, config=TrainConfig.from_dict({**recipe, "class_union_prob": 1.0}))
    merged_any = False
    for step in range(16):
        before, after = plain.episode(step, 0), merging.episode(step, 0)
        n = int(before["class_mask"].sum())
        if n < 2:
            continue
        merged_any = True
        assert int(after["class_mask"].sum()) == n - 1
        for key in ("query_masks", "ref_masks"):
            union = before[key][:n].amax(dim=0)
            # Same voxels covered, now by one slot fewer, and slots stay disjoint.
            assert torch.equal(after[key].amax(dim=0), union)
            assert int(after[key].sum()) == int(before[key].sum())
        # The union is no single class (id −1) and the freed slot becomes padding (−1 too).
        assert (after["class_ids"] == -1).sum() == (before["class_ids"] == -1).sum() + 2
    assert merged_any


def _pool_of(root, labels: list[np.ndarray], dataset: str = "far"):
    """The train pool and class ids of one subject per label map (:func:`saved_case_rows`)."""
    rows = saved_case_rows(root, labels, dataset)
    values = sorted({int(v) for label in labels for v in np.unique(label) if v})
    cases = [
        {"dataset": dataset, "case_id": row.case_id, "subject_id": row.subject_id, "split": "train",
         "heldout": False}
        for row in rows.itertuples()
    ]  # fmt: skip
    index = {"cases": cases, "classes": {dataset: {str(v): {} for v in values}}}
    return train_pool(index, case_records(rows)), train_class_ids(index)


def _far_apart_pool(root, z_size: int = 96):
    """Three subjects whose two classes lie at opposite ends of z, farther apart than a 32³ crop."""
    label = np.zeros((z_size, 32, 32), np.uint8)
    label[2:8, 10:20, 10:20] = 1
    label[z_size - 8 : z_size - 2, 10:20, 10:20] = 2
    return _pool_of(root, [label] * 3)


def test_a_class_the_reference_crop_cuts_out_leaves_the_episode(tmp_path):
    # The crop centred on both classes' union shows neither: a slot with an empty reference would ask
    # for a class never shown and write an empty mask's embedding into the memory bank.
    pool, ids = _far_apart_pool(tmp_path)
    config = TrainConfig(crop_size=(32, 32, 32), augment=False, class_drop_prob=0.0, max_classes=2)
    sampler = EpisodeSampler(pool, ids, config)
    for step in range(12):
        episode = sampler.episode(step, 0)
        real = episode["class_mask"]
        assert real.sum() == 1, "of two classes 80 voxels apart, one fits a 32³ reference crop"
        assert (episode["ref_masks"][real].flatten(1).sum(1) == 600).all()
        assert (episode["ref_masks"][~real] == 0).all() and (episode["class_ids"][~real] == -1).all()


def test_foreground_query_crops_show_a_class_that_stayed_in_the_episode(tmp_path):
    pool, ids = _far_apart_pool(tmp_path)
    config = TrainConfig(
        crop_size=(32, 32, 32), augment=False, class_drop_prob=0.0, max_classes=2, foreground_crop_prob=1.0
    )
    sampler = EpisodeSampler(pool, ids, config)
    for step in range(20):
        episode = sampler.episode(step, 0)
        assert episode["query_masks"][episode["class_mask"]].sum() > 0, step


def test_a_class_in_two_parts_farther_apart_than_a_crop_is_still_shown(tmp_path):
    """One label value at both ends of z (a bilateral organ): its box's centre shows neither part."""
    label = np.zeros((96, 32, 32), np.uint8)
    label[2:8, 10:20, 10:20] = label[88:94, 10:20, 10:20] = 1
    pool, ids = _pool_of(tmp_path, [label, label.copy(), label.copy()])
    sampler = EpisodeSampler(pool, ids, TrainConfig(crop_size=(32, 32, 32), augment=False, max_classes=2))
    for step in range(8):
        episode = sampler.episode(step, 0)
        assert episode["class_mask"].sum() == 1 and episode["ref_masks"][0].sum() > 0


def test_augmentation_never_leaves_a_real_slot_with_an_empty_reference(tmp_path):
    """Warping and perturbing can wipe out a 4-voxel structure: the slot leaves the episode, or when it
    is the only one, the reference stays unwarped; never an empty mask with a memory-bank id."""
    labels = []
    for _ in range(3):
        label = np.zeros((48, 48, 48), np.uint8)
        label[20:22, 20:22, 20] = 1
        label[10:30, 30:40, 5:40] = 2
        labels.append(label)
    pool, ids = _pool_of(tmp_path, labels)
    config = TrainConfig(crop_size=(32, 32, 32), max_classes=2, class_drop_prob=0.5)
    sampler = EpisodeSampler(pool, ids, config)
    shown = 0
    for step in range(120):
        episode = sampler.episode(step, 0)
        real = episode["class_mask"]
        assert real.any(), step
        assert (episode["ref_masks"][real].flatten(1).sum(1) > 0).all(), step
        assert (episode["ref_masks"][~real] == 0).all() and (episode["class_ids"][~real] == -1).all()
        shown += int((episode["class_ids"] == ids["far/1"]).any())
    assert shown > 10, "the small structure still takes part in most episodes that draw it"


def test_query_crops_off_the_foreground_lie_anywhere_in_the_volume(tmp_path):
    pool, ids = _far_apart_pool(tmp_path)
    config = TrainConfig(crop_size=(32, 32, 32), augment=False, foreground_crop_prob=0.0)
    sampler = EpisodeSampler(pool, ids, config)
    starts = {int(sampler.episode(step, 0)["query"][0, 0, 0, 0]) for step in range(40)}
    assert len(starts) > 10 and min(starts) < 16 and max(starts) > 48  # z starts range over 0..64
