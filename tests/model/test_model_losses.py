"""Dice + BCE loss: absent classes, padding slots, and the ordering of good and bad predictions."""

from __future__ import annotations

import torch

from iris_pipelines.model import dice_score, segmentation_loss

BIG = 12.0  # a confident logit


def _target() -> torch.Tensor:
    target = torch.zeros(1, 2, 8, 8, 8)
    target[0, 0, 2:6, 2:6, 2:6] = 1.0  # class 0 present, class 1 absent
    return target


def test_empty_target_gives_finite_loss_and_gradients() -> None:
    logits = torch.randn(1, 2, 8, 8, 8, requires_grad=True)
    loss = segmentation_loss(logits, torch.zeros(1, 2, 8, 8, 8)).total
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_missing_a_present_class_costs_more_than_finding_it() -> None:
    target = _target()
    correct = torch.where(target > 0, BIG, -BIG)
    all_background = torch.full_like(target, -BIG)
    assert segmentation_loss(all_background, target).total > segmentation_loss(correct, target).total + 0.5


def test_foreground_on_an_absent_class_costs_more_than_background() -> None:
    target = _target()
    background = torch.where(target > 0, BIG, -BIG)
    false_positive = background.clone()
    false_positive[0, 1, 3:5, 3:5, 3:5] = BIG  # 8 voxels of an absent class
    assert segmentation_loss(false_positive, target).total > segmentation_loss(background, target).total + 0.5
    assert segmentation_loss(background, target).dice < 1e-2  # empty target + empty prediction ≈ 0


def test_padding_slots_are_ignored() -> None:
    target = _target()
    logits = torch.randn(1, 2, 8, 8, 8)
    only_first = torch.tensor([[True, False]])
    garbage = logits.clone()
    garbage[0, 1] = 1e4
    expected = segmentation_loss(logits[:, :1], target[:, :1]).total
    torch.testing.assert_close(segmentation_loss(garbage, target, only_first).total, expected)
    nothing = segmentation_loss(logits.requires_grad_(), target, torch.zeros(1, 2, dtype=torch.bool)).total
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_dice_score() -> None:
    target = _target().bool()
    pred = target.clone()
    pred[0, 0, 2] = False  # drop one of four slices: |P| = 48, |T| = 64
    score = dice_score(pred, target)
    assert score.shape == (1, 2)
    torch.testing.assert_close(score[0, 0].item(), 2 * 48 / (48 + 64))
    assert score[0, 1].item() == 1.0  # nothing to find, nothing found


def test_exclusive_cross_entropy_is_bce_for_one_class_and_ranks_slots():
    from iris_pipelines.model.losses import bce_loss, exclusive_cross_entropy

    target = _target()[:, :1]
    logits = torch.randn(1, 1, 8, 8, 8)
    # Background logit fixed at 0: softmax over [0, l] is σ(l), so one slot is plain BCE.
    torch.testing.assert_close(exclusive_cross_entropy(logits, target), bce_loss(logits, target))

    two = torch.zeros(1, 2, 8, 8, 8)
    two[0, 1, 2:6, 2:6, :2] = 1.0  # a second, disjoint class
    inside = two[0, 0].bool() | _target()[0, 0].bool()
    right = torch.where(torch.cat([_target()[:, :1], two[:, 1:]], 1).bool(), BIG, -BIG)
    # Slot 1 also fires inside slot 0's region, but less: per-slot sigmoids cannot tell, the ranking can.
    overlapping = right.clone()
    overlapping[0, 1][_target()[0, 0].bool()] = BIG / 2
    wrong_winner = right.clone()
    wrong_winner[0, 1][_target()[0, 0].bool()] = 2 * BIG
    full = torch.cat([_target()[:, :1], two[:, 1:]], 1)
    assert inside.any()
    assert exclusive_cross_entropy(right, full) < 1e-3
    assert exclusive_cross_entropy(wrong_winner, full) > exclusive_cross_entropy(overlapping, full) + 0.5


def test_exclusive_cross_entropy_ignores_padding_and_rejects_overlapping_targets():
    import pytest

    from iris_pipelines.model.losses import exclusive_cross_entropy

    target = _target()
    logits = torch.randn(1, 2, 8, 8, 8)
    garbage = logits.clone()
    garbage[:, 1] = 1e4  # a padding slot may hold anything
    only_first = torch.tensor([[True, False]])
    torch.testing.assert_close(
        exclusive_cross_entropy(garbage, target, only_first),
        exclusive_cross_entropy(logits[:, :1], target[:, :1]),
    )
    both = target.clone()
    both[0, 1] = both[0, 0]
    with pytest.raises(ValueError, match="mutually exclusive"):
        exclusive_cross_entropy(logits, both)
    terms = segmentation_loss(logits, target, exclusive_weight=0.5)
    assert terms.exclusive is not None
    torch.testing.assert_close(terms.total, terms.dice + terms.bce + 0.5 * terms.exclusive)
