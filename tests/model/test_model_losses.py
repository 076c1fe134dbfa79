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
