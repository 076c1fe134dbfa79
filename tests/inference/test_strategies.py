"""The inference strategies: one-shot, ensemble, memory bank, retrieval, tuning, labels, windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from blobs import blob_volume

from iris_pipelines.inference import (
    ModelBundle,
    check_strategy,
    context_ensemble,
    crop_reference,
    encode_class_windows,
    encode_reference,
    encode_references,
    frozen,
    logits_to_labels,
    mask_window,
    memory_bank_gaps,
    memory_bank_task,
    reference_self_dice,
    retrieval_task,
    retrieve_references,
    tune_task_embedding,
)
from iris_pipelines.model import Iris, IrisConfig, segmentation_loss

Scans = dict[str, tuple[torch.Tensor, torch.Tensor]]


def test_strategy_names_are_checked() -> None:
    assert check_strategy("retrieval") == "retrieval"
    with pytest.raises(ValueError, match=r"unknown inference strategy 'few_shot'.*one_shot"):
        check_strategy("few_shot")


# ------------------------------------------------------------------------------------ one-shot, ensemble


def test_ensemble_of_identical_references_equals_one_shot(tiny_model: Iris, scans: Scans) -> None:
    image, masks = scans["a"]
    query = scans["b"][0]
    one_shot = encode_reference(tiny_model, image, masks)
    pool = encode_references(tiny_model, [(image, masks)] * 3)
    ensembled = context_ensemble(pool)
    assert pool.shape == (3, *one_shot.shape[1:])
    torch.testing.assert_close(ensembled, one_shot, rtol=0, atol=1e-6)
    # The mean of three equal float32 vectors can differ from the vector in its last bit, and the network
    # amplifies that with the logits' magnitude (one voxel of 27648 was 1.2e-5 off at |logit| 6.3 in CI;
    # an AVX2 CPU with 2 threads used 92 % of a 1e-5 tolerance), so the logits get the tolerance the model
    # tests give kernel differences.
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_model.segment(query, ensembled), tiny_model.segment(query, one_shot), rtol=1e-4, atol=1e-4
        )


def test_ensemble_is_the_mean_over_references_holding_the_class() -> None:
    pool = torch.randn(3, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([[True, True], [True, False], [False, True]])
    task = context_ensemble(pool, valid)
    torch.testing.assert_close(task[0, 0], (pool[0, 0] + pool[1, 0]) / 2)
    torch.testing.assert_close(task[0, 1], (pool[0, 1] + pool[2, 1]) / 2)
    assert not torch.allclose(task, context_ensemble(pool))
    unused = pool.clone()
    unused[1, 1], unused[2, 0] = float("nan"), float("inf")  # slots no reference holds: never read
    torch.testing.assert_close(context_ensemble(unused, valid), task)
    with pytest.raises(ValueError, match=r"class slot\(s\) \[1\] have no valid reference"):
        context_ensemble(pool, torch.tensor([[True, False], [True, False], [False, False]]))
    with pytest.raises(ValueError, match=r"valid must have shape \(3, 2\)"):
        context_ensemble(pool, torch.ones(2, 2, dtype=torch.bool))


def test_references_with_empty_masks_or_wrong_shapes_are_refused(tiny_model: Iris, scans: Scans) -> None:
    image, masks = scans["a"]
    empty = masks.clone()
    empty[:, 1] = 0
    with pytest.raises(ValueError, match=r"reference 1: reference mask of class slot\(s\) \[1\] is empty"):
        encode_references(tiny_model, [(image, masks), (image, empty)])
    with pytest.raises(ValueError, match=r"masks must have shape \(1, K, D, H, W\) matching"):
        encode_reference(tiny_model, image, masks[..., :20])
    with pytest.raises(ValueError, match=r"different numbers of classes \[1, 2\]"):
        encode_references(tiny_model, [(image, masks), (image, masks[:, :1])])


# ------------------------------------------------------------------------------------------ memory bank


@pytest.fixture(scope="module")
def banked_model() -> tuple[Iris, dict[str, int], torch.Tensor]:
    torch.manual_seed(0)
    model = Iris(IrisConfig.tiny(memory_bank_size=3)).eval()
    rows = torch.randn(2, model.config.num_tokens, model.config.embed_dim)
    model.update_memory_bank(torch.tensor([0, 2]), rows)  # slot 1 never appears in training
    return model, {"liver/1": 0, "kidney/2": 1, "spleen/1": 2}, rows


def test_memory_bank_returns_the_rows_of_the_keys(
    banked_model: tuple[Iris, dict[str, int], torch.Tensor], tmp_path: Path
) -> None:
    model, class_ids, rows = banked_model
    task = memory_bank_task(model, class_ids, ["spleen/1", "liver/1"])
    assert torch.equal(task, torch.stack([rows[1], rows[0]])[None])
    # The versioned artifact carries the bank and the key table: a reloaded bundle gives the same rows.
    loaded = ModelBundle.load(ModelBundle.from_model(model, class_ids).save(tmp_path / "bundle"))
    again = memory_bank_task(loaded.build_model(), loaded.class_ids, ["spleen/1", "liver/1"])
    assert torch.equal(again, task)
    task.add_(1.0)  # the result is a copy: editing it must not touch the bank
    assert torch.equal(model.memory_bank[2], rows[1])


def test_memory_bank_errors_name_unknown_and_unseen_classes(
    banked_model: tuple[Iris, dict[str, int], torch.Tensor], tiny_model: Iris
) -> None:
    model, class_ids, _ = banked_model
    with pytest.raises(KeyError, match=r"\['heart/4'\] are not training classes.*kidney/2, liver/1"):
        memory_bank_task(model, class_ids, ["liver/1", "heart/4"])
    with pytest.raises(KeyError, match=r"no embedding for \['kidney/2'\]: they never appeared"):
        memory_bank_task(model, class_ids, ["kidney/2"])
    with pytest.raises(KeyError, match="outside the memory bank of 3 slots"):
        memory_bank_task(model, {"x/1": 7}, ["x/1"])
    with pytest.raises(ValueError, match="has no memory bank"):
        memory_bank_task(tiny_model, class_ids, ["liver/1"])


def test_memory_bank_gaps_name_each_class_the_bank_cannot_give(
    banked_model: tuple[Iris, dict[str, int], torch.Tensor],
) -> None:
    """So evaluation can segment the classes the bank holds rather than lose all of them to one gap."""
    model, class_ids, _ = banked_model
    gaps = memory_bank_gaps(model, class_ids, ["liver/1", "kidney/2", "heart/4", "spleen/1"])
    assert list(gaps) == ["kidney/2", "heart/4"]
    assert (
        gaps["kidney/2"] == "the memory bank holds no embedding for ['kidney/2']: they never appeared in a "
        "training episode"
    )
    assert gaps["heart/4"].startswith("class(es) ['heart/4'] are not training classes")  # no KeyError quotes
    assert memory_bank_gaps(model, class_ids, ["liver/1"]) == {}


# --------------------------------------------------------------------------------------------- retrieval


def test_retrieve_references_picks_the_most_similar_per_class() -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 2, 3, 8, generator=generator)
    pool = torch.randn(5, 2, 3, 8, generator=generator)
    noise = torch.randn(5, 2, 3, 8, generator=generator)
    # Class 0: row 3 is the query with a little noise, row 1 with more; class 1: row 0, then row 4.
    # A scaled copy is as similar as the query itself (cosine ignores the norm).
    pool[3, 0] = query[0, 0] + 0.05 * noise[3, 0]
    pool[1, 0] = query[0, 0] + 0.3 * noise[1, 0]
    pool[0, 1] = 5.0 * query[0, 1]
    pool[4, 1] = query[0, 1] + 0.2 * noise[4, 1]
    task, indices, scores = retrieve_references(query, pool, top_k=2)
    assert indices.tolist() == [[3, 1], [0, 4]]
    assert scores[1, 0] == pytest.approx(1.0, abs=1e-5) and (scores[:, 0] >= scores[:, 1]).all()
    torch.testing.assert_close(task[0, 0], (pool[3, 0] + pool[1, 0]) / 2)
    torch.testing.assert_close(task[0, 1], (pool[0, 1] + pool[4, 1]) / 2)
    # Rows that do not hold a class are never retrieved for it; too few valid rows are padded with -1.
    valid = torch.ones(5, 2, dtype=torch.bool)
    valid[3, 0] = False
    valid[:, 1] = torch.tensor([False, False, True, False, False])
    _, indices, scores = retrieve_references(query, pool, top_k=2, valid=valid)
    assert indices[0, 0].item() == 1 and indices[1].tolist() == [2, -1] and scores[1, 1] == float("-inf")


def test_retrieval_task_retrieves_the_reference_matching_the_query(tiny_model: Iris, scans: Scans) -> None:
    """With an exact initial segmentation, the query's own embedding is in the pool: retrieval must find it.

    The initial segmentation comes from an injected ``segment_fn`` returning the query's true masks as
    logits, so the query self-encoding is known and the test does not depend on a trained network.
    """
    query, query_masks = scans["c"]
    calls = []

    def oracle(image: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        calls.append(task)
        return (query_masks * 2 - 1) * 10.0

    query_task = encode_class_windows(tiny_model, query, (query_masks[:, k : k + 1] for k in range(2)), 20)
    others = encode_references(tiny_model, [scans["a"], scans["b"]])
    pool = torch.cat([others[:1], query_task, others[1:]])  # the match sits in row 1
    result = retrieval_task(tiny_model, query, pool, top_k=1, initial_index=2, segment_fn=oracle, roi_size=20)
    assert result.indices.tolist() == [[1], [1]]
    assert result.initial_indices.tolist() == [2, 2] and torch.equal(calls[0], pool[2:3])
    torch.testing.assert_close(result.task, query_task, rtol=0, atol=1e-5)
    assert result.scores[:, 0].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert not result.fallback.any()
    valid = torch.ones(3, 2, dtype=torch.bool)
    valid[2, 0] = False
    with pytest.raises(ValueError, match=r"initial reference 2 does not hold class slot\(s\) \[0\]"):
        retrieval_task(tiny_model, query, pool, top_k=1, valid=valid, initial_index=2, segment_fn=oracle)


def test_retrieval_falls_back_to_the_pool_mean_for_an_empty_initial_mask(
    tiny_model: Iris, scans: Scans
) -> None:
    query, query_masks = scans["c"]
    partial = query_masks.clone()
    partial[:, 1] = 0  # class 1 is not found by the initial segmentation

    def oracle(image: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return (partial * 2 - 1) * 10.0

    pool = encode_references(tiny_model, [scans["a"], scans["b"], (query, query_masks)])
    generator = torch.Generator().manual_seed(0)
    result = retrieval_task(tiny_model, query, pool, top_k=1, segment_fn=oracle, generator=generator)
    assert result.fallback.tolist() == [False, True]
    assert result.indices[0].tolist() == [2] and result.indices[1].tolist() == [-1]
    torch.testing.assert_close(result.task[0, 1], pool[:, 1].mean(dim=0))
    # The random initial reference is drawn from the seeded generator: the same seed, the same draw.
    again = retrieval_task(
        tiny_model, query, pool, top_k=1, segment_fn=oracle, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(again.initial_indices, result.initial_indices)


def test_retrieval_encodes_each_class_of_the_query_in_its_own_window(tiny_model: Iris) -> None:
    """Initial masks farther apart than the window: each class is encoded around itself, as the pool's
    references are, not from a single window that cuts one of them out."""
    size = (16, 16, 64)
    query, masks = blob_volume([((8, 8, 4), 3, 1.0), ((8, 8, 59), 3, -1.0)], size, seed=4)

    def oracle(image: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return (masks * 2 - 1) * 10.0

    own = encode_class_windows(tiny_model, query, (masks[:, k : k + 1] for k in range(2)), 32)
    others = encode_references(tiny_model, [(torch.randn_like(query), masks)] * 2)
    pool = torch.cat([others[:1], own, others[1:]])
    result = retrieval_task(tiny_model, query, pool, top_k=1, initial_index=0, segment_fn=oracle, roi_size=32)
    assert result.indices.tolist() == [[1], [1]] and not result.fallback.any()
    torch.testing.assert_close(result.task, own, rtol=0, atol=1e-5)


def test_retrieval_without_segment_fn_runs_the_model(tiny_model: Iris, scans: Scans) -> None:
    pool = encode_references(tiny_model, [scans["a"], scans["b"]])
    result = retrieval_task(tiny_model, scans["c"][0], pool, top_k=2, initial_index=0)
    assert result.task.shape == (1, 2, *pool.shape[2:]) and torch.isfinite(result.task).all()
    picked = result.indices[~result.fallback]
    assert ((picked == 0) | (picked == 1)).all()


# ------------------------------------------------------------------------------------------------ tuning


def test_tuning_lowers_its_loss_and_leaves_every_weight_bit_identical(scans: Scans) -> None:
    torch.manual_seed(0)
    model = Iris(IrisConfig.tiny()).train()
    model.encoder.requires_grad_(False)  # a mixed state that must come back as it was
    model.encoder.eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    image, masks = scans["a"]
    initial = encode_reference(model, *scans["b"])
    initial_copy = initial.clone()

    result = tune_task_embedding(model, initial, [(image, masks)], steps=6, lr=5e-2)

    assert len(result.losses) == 7
    assert result.losses[-1] < result.losses[0] - 0.1, result.losses
    assert not result.task.requires_grad and not torch.equal(result.task, initial)
    assert torch.equal(initial, initial_copy)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model.encoder.training and model.task_encoder.training


def test_tuning_leaves_the_slots_outside_its_class_mask_as_they_were(tiny_model: Iris, scans: Scans) -> None:
    """A class cropped out of the reference still gets gradient through the decoder's attention
    between class tokens; Adam would scale it into full-size steps and shift that class's T."""
    image, masks = scans["a"]
    initial = encode_reference(tiny_model, *scans["b"])
    keep = torch.tensor([True, False])
    result = tune_task_embedding(tiny_model, initial, [(image, masks)], steps=5, lr=0.1, class_mask=keep)
    assert torch.equal(result.task[:, 1], initial[:, 1])
    assert not torch.equal(result.task[:, 0], initial[:, 0])


def test_tuning_counts_in_each_reference_only_the_classes_of_its_row(tiny_model: Iris, scans: Scans) -> None:
    """With a (references, K) class_mask, a reference that does not label a class says nothing about it:
    what its mask holds in that slot changes nothing, while the reference that labels it does."""
    (image_a, masks_a), (image_c, masks_c) = scans["a"], scans["c"]
    initial = encode_reference(tiny_model, *scans["b"])
    rows = torch.tensor([[True, True], [True, False]])

    def tuned(slot_1_of_c: torch.Tensor) -> torch.Tensor:
        masks = torch.cat([masks_c[:, :1], slot_1_of_c], dim=1)
        references = [(image_a, masks_a), (image_c, masks)]
        return tune_task_embedding(tiny_model, initial, references, steps=3, lr=0.1, class_mask=rows).task

    empty = tuned(torch.zeros_like(masks_c[:, 1:]))
    torch.testing.assert_close(tuned(masks_c[:, 1:]), empty, rtol=0, atol=0)
    torch.testing.assert_close(tuned(torch.ones_like(masks_c[:, 1:])), empty, rtol=0, atol=0)
    everything = tune_task_embedding(
        tiny_model, initial, [(image_a, masks_a), (image_c, masks_c)], steps=3, lr=0.1,
        class_mask=torch.tensor([True, True]),
    )  # fmt: skip
    assert not torch.equal(everything.task, empty)  # with the slot counted, c's mask of class 2 matters
    with pytest.raises(ValueError, match=r"class_mask must have shape \(2,\) or \(2, 2\)"):
        tune_task_embedding(tiny_model, initial, [scans["a"], scans["c"]], steps=1, class_mask=rows[:1, :1])


def test_tuning_follows_the_plain_adam_loop_on_segment(tiny_model: Iris, scans: Scans) -> None:
    """Encoding the references once is an optimisation only: the same steps as segmenting each time."""
    references = [scans["a"], scans["c"]]
    initial = encode_reference(tiny_model, *scans["b"])
    result = tune_task_embedding(tiny_model, initial, references, steps=4, lr=5e-2)

    task = initial.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([task], lr=5e-2)
    expected = []
    with frozen(tiny_model):
        for step in range(5):
            optimizer.zero_grad()
            loss = sum(segmentation_loss(tiny_model.segment(i, task), m).total for i, m in references) / 2
            expected.append(float(loss.detach()))
            if step < 4:
                loss.backward()
                optimizer.step()
    assert result.losses == pytest.approx(expected, abs=1e-5)
    torch.testing.assert_close(result.task, task.detach(), rtol=0, atol=1e-5)


def test_tuning_checks_its_inputs(tiny_model: Iris, scans: Scans) -> None:
    task = encode_reference(tiny_model, *scans["a"])
    image, masks = scans["b"]
    with pytest.raises(ValueError, match="has 1 class masks but the task embedding has 2"):
        tune_task_embedding(tiny_model, task, [(image, masks[:, :1])], steps=1)
    with pytest.raises(ValueError, match="at least one reference"):
        tune_task_embedding(tiny_model, task, [], steps=1)
    with pytest.raises(ValueError, match=r"initial task embedding must have shape \(1, K, 11, 64\)"):
        tune_task_embedding(tiny_model, task[..., :8], [(image, masks)], steps=1)


# ---------------------------------------------------------------------------------- labels and windows


def test_logits_to_labels_takes_the_argmax_above_threshold() -> None:
    logits = torch.full((2, 1, 1, 4), -5.0)
    logits[0, 0, 0, 0] = 2.0  # class 0 only
    logits[:, 0, 0, 1] = torch.tensor([1.0, 3.0])  # both above: argmax is class 1
    logits[:, 0, 0, 2] = torch.tensor([-0.1, -0.2])  # max below 0.5 probability: background
    labels = logits_to_labels(logits[None], [4, 7])
    assert labels.dtype == torch.int32 and labels[0, 0].tolist() == [4, 7, 0, 0]
    assert logits_to_labels(logits, [4, 7], threshold=0.4)[0, 0].tolist() == [4, 7, 4, 0]
    with pytest.raises(ValueError, match=r"K=3"):
        logits_to_labels(logits, [1, 2, 3])


def test_reference_window_is_centred_on_the_union_box_and_stays_inside() -> None:
    masks = torch.zeros(1, 2, 40, 30, 20)
    masks[0, 0, 10:14, 5:9, 2:6] = 1
    masks[0, 1, 20:22, 8:10, 4:8] = 1  # union box: z 10..22, y 5..10, x 2..8
    z, y, x = mask_window(masks, 16)
    assert (z.start, z.stop) == (8, 24)  # centre 16
    assert (y.start, y.stop) == (0, 16)  # centre 7.5 would start at -0.5: shifted inside
    assert (x.start, x.stop) == (0, 16)
    image = torch.randn(1, 1, 40, 30, 20)
    crop_image, crop_masks = crop_reference(image, masks, (64, 16, 64))  # z, x fit whole
    assert crop_image.shape == (1, 1, 40, 16, 20) and crop_masks.sum() == masks.sum()
    assert torch.equal(crop_image, image[:, :, :, 0:16])
    with pytest.raises(ValueError, match="empty masks"):
        mask_window(torch.zeros(1, 1, 8, 8, 8), 4)


@pytest.mark.parametrize("roi", [(8, 8, 8), (8, 40, 40), (12, 12, 12)])
def test_reference_window_holds_foreground_when_the_structure_outgrows_it(roi) -> None:
    """A curved organ or two distant lesions: the box centre is empty, the window must not be."""
    shape = (40, 24, 24)
    masks = torch.zeros(1, 1, *shape)
    masks[0, 0, 2:6, 4:8, 4:8] = 1
    masks[0, 0, 30:36, 16:20, 16:20] = 1  # union box z 2..36: its centre z = 19 is empty
    window = mask_window(masks, roi)
    assert masks[0, 0, window[0], window[1], window[2]].sum() > 0
    for axis, part in enumerate(window):
        assert part.stop - part.start == min(roi[axis], shape[axis])
        assert 0 <= part.start and part.stop <= shape[axis]


def test_reference_self_dice_scores_each_class_as_the_label_map_decides_it() -> None:
    """The reference check: Dice of each class when the reference is segmented with its own task."""
    masks = torch.zeros(1, 3, 4, 4, 4)
    masks[0, 0, :2] = 1  # class slot 0: the lower half
    masks[0, 1, 2:] = 1  # slot 1: the upper half
    masks[0, 2, 3] = 1  # slot 2 overlaps slot 1's top layer
    found = torch.where(masks > 0, 5.0, -5.0)
    assert reference_self_dice(found, masks).tolist()[:2] == [1.0, 1.0]
    # slots 1 and 2 compete for the top layer, as in a label map: the larger logit (slot 2's) takes it
    found[0, 2] = torch.where(masks[0, 2] > 0, 6.0, -5.0)
    assert reference_self_dice(found, masks).tolist() == pytest.approx([1.0, 2 * 16 / (16 + 32), 1.0])
    missed = found.clone()
    missed[0, 0] = -5.0  # slot 0 never passes the threshold
    assert reference_self_dice(missed, masks)[0] == 0.0
    assert reference_self_dice(missed, masks, threshold=0.001)[0] == 1.0  # logit -5 passes a 0.1 % cut
    absent = masks.clone()
    absent[0, 2] = 0  # a slot this reference does not show: no score, not a perfect one
    assert torch.isnan(reference_self_dice(found, absent)[2])
    with pytest.raises(ValueError, match=r"must both be \(1, K, D, H, W\)"):
        reference_self_dice(found[:, :2], masks)
