"""The tiny network can learn one in-context episode: it is wired so that gradients reach everything."""

from __future__ import annotations

import torch

from iris_pipelines.model import Iris, IrisConfig, dice_score, segmentation_loss


def test_tiny_model_overfits_one_episode(episode: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = Iris(IrisConfig.tiny())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    best = 0.0
    for step in range(150):
        logits = model(episode["query"], episode["ref"], episode["ref_masks"])
        loss = segmentation_loss(logits, episode["query_masks"]).total
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 5 == 0:
            best = dice_score(logits.detach() > 0, episode["query_masks"] > 0).min().item()
            if best > 0.95:
                break
    assert best > 0.95, f"worst class Dice {best:.3f} after {step + 1} steps"
