"""The Iris network's contract: shapes, class equivariance, cached and broadcast embeddings, padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iris_pipelines.model import Iris, IrisConfig, foreground_pool


def _random_masks(batch: int, classes: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, classes, *shape, generator=generator) > 0.8).float()


@pytest.mark.parametrize("classes", [1, 3])
def test_logits_have_the_full_odd_input_size(tiny_model: Iris, classes: int) -> None:
    shape = (33, 40, 27)
    query, ref = torch.randn(1, 1, *shape), torch.randn(1, 1, *shape)
    with torch.no_grad():
        task = tiny_model.encode_task(ref, _random_masks(1, classes, shape))
        logits = tiny_model.segment(query, task)
    config = tiny_model.config
    assert task.shape == (1, classes, config.num_tokens, config.embed_dim)
    assert logits.shape == (1, classes, *shape)
    assert torch.isfinite(logits).all()


def test_an_input_of_one_bottleneck_voxel_is_refused_with_its_size(tiny_model: Iris) -> None:
    """At most 2**stages voxels on every axis pad to a single bottleneck voxel, which instance norm cannot
    take; the error names the size, not torch's "when training" (the model is in eval mode)."""
    small = tiny_model.config.size_divisor
    with pytest.raises(ValueError, match=rf"an input of \({small}, {small}, 3\) voxels is too small"):
        tiny_model.encode_task(torch.randn(1, 1, small, small, 3), torch.ones(1, 1, small, small, 3))
    with pytest.raises(ValueError, match="too small for this network"):
        tiny_model.encode_query(torch.randn(1, 1, 5, small, small))
    with torch.no_grad():  # one axis longer than the divisor is enough
        tiny_model.encode_query(torch.randn(1, 1, small + 1, small, small))


def test_a_task_of_no_class_is_refused_by_name(tiny_model: Iris) -> None:
    """Zero class masks failed deep in the task encoder with "select(): index 0 out of range"."""
    shape = (17, 17, 17)
    with pytest.raises(ValueError, match=r"ref_masks hold no class \(K = 0\)"):
        tiny_model.encode_task(torch.randn(1, 1, *shape), torch.zeros(1, 0, *shape))
    config = tiny_model.config
    with pytest.raises(ValueError, match=r"task_embedding holds no class \(K = 0\)"):
        tiny_model.segment(torch.randn(1, 1, *shape), torch.zeros(1, 0, config.num_tokens, config.embed_dim))


def test_masks_are_padded_like_the_image(tiny_model: Iris) -> None:
    """An odd-sized reference must encode exactly as the same reference padded by hand."""
    shape = (17, 30, 20)
    ref, masks = torch.randn(1, 1, *shape), _random_masks(1, 2, shape)
    pad = [6, 6, 1, 1, 7, 8]  # to 32 × 32 × 32, split evenly as Iris does
    with torch.no_grad():
        task = tiny_model.encode_task(ref, masks)
        by_hand = tiny_model.encode_task(F.pad(ref, pad, mode="replicate"), F.pad(masks, pad))
    torch.testing.assert_close(task, by_hand, rtol=1e-5, atol=5e-5)


def test_permuting_classes_permutes_logits(tiny_model: Iris, episode: dict[str, torch.Tensor]) -> None:
    masks = torch.cat([episode["ref_masks"][:1], _random_masks(1, 1, (32, 32, 32))], dim=1)  # 3 classes
    permutation = torch.tensor([2, 0, 1])
    with torch.no_grad():
        logits = tiny_model(episode["query"][:1], episode["ref"][:1], masks)
        permuted = tiny_model(episode["query"][:1], episode["ref"][:1], masks[:, permutation])
    torch.testing.assert_close(permuted, logits[:, permutation], rtol=0, atol=5e-5)


def test_cached_embedding_equals_forward(tiny_model: Iris, episode: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        full = tiny_model(episode["query"], episode["ref"], episode["ref_masks"])
        task = tiny_model.encode_task(episode["ref"], episode["ref_masks"]).clone()
        cached = tiny_model.segment(episode["query"], task)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-6)


def test_segmenting_encoded_query_features_equals_segmenting_the_query(tiny_model: Iris) -> None:
    query = torch.randn(2, 1, 19, 26, 33)  # odd sizes: the features carry the padding to crop off
    task = torch.randn(1, 3, tiny_model.config.num_tokens, tiny_model.config.embed_dim)
    other = torch.randn_like(task)
    with torch.no_grad():
        features = tiny_model.encode_query(query)
        # the same features serve a second T (in-context tuning reuses them every step)
        from_features = [tiny_model.segment(features, t) for t in (task, other)]
        direct = [tiny_model.segment(query, t) for t in (task, other)]
    assert from_features[0].shape == (2, 3, 19, 26, 33)
    for cached, full in zip(from_features, direct, strict=True):
        torch.testing.assert_close(cached, full, rtol=0, atol=1e-6)


def test_one_embedding_broadcasts_over_a_query_batch(
    tiny_model: Iris, episode: dict[str, torch.Tensor]
) -> None:
    with torch.no_grad():
        task = tiny_model.encode_task(episode["ref"][:1], episode["ref_masks"][:1])
        broadcast = tiny_model.segment(episode["query"], task)
        repeated = tiny_model.segment(episode["query"], task.repeat(2, 1, 1, 1))
        single = [tiny_model.segment(episode["query"][i : i + 1], task) for i in range(2)]
    torch.testing.assert_close(broadcast, repeated, rtol=0, atol=1e-6)
    # CPU convolutions pick a different algorithm for batch 1 and batch 2 (im2col vs oneDNN), which
    # moves logits by a few 1e-5; the per-query comparison allows for that.
    torch.testing.assert_close(broadcast, torch.cat(single), rtol=0, atol=1e-4)


def test_mismatched_batches_are_rejected(tiny_model: Iris, episode: dict[str, torch.Tensor]) -> None:
    task = torch.zeros(2, 2, tiny_model.config.num_tokens, tiny_model.config.embed_dim)
    with pytest.raises(ValueError, match="must be 1 or equal the query batch"):
        tiny_model.segment(torch.zeros(3, 1, 32, 32, 32), task)
    with pytest.raises(ValueError, match="ref_masks"):
        tiny_model.encode_task(episode["ref"], episode["ref_masks"][:, :, :16])


def test_padding_slots_do_not_change_the_real_classes(
    tiny_model: Iris, episode: dict[str, torch.Tensor]
) -> None:
    """Training pads episodes to max_classes; evaluation never does. With the class mask the real
    classes must come out as in an unpadded pass, whatever the padding slots hold."""
    padding = torch.zeros(2, 2, 32, 32, 32)  # the sampler pads with empty reference masks
    masks = torch.cat([episode["ref_masks"], padding], dim=1)
    class_mask = torch.tensor([[True, True, False, False]] * 2)
    with torch.no_grad():
        task = tiny_model.encode_task(episode["ref"], masks)
        unpadded = tiny_model.segment(episode["query"], task[:, :2])
        masked = tiny_model.segment(episode["query"], task, class_mask)
        scrambled = task.clone()
        scrambled[:, 2:] = torch.randn_like(scrambled[:, 2:]) * 10
        masked_scrambled = tiny_model.segment(episode["query"], scrambled, class_mask)
        unmasked = tiny_model.segment(episode["query"], task)
    torch.testing.assert_close(masked[:, :2], unpadded, rtol=0, atol=1e-4)
    torch.testing.assert_close(masked_scrambled[:, :2], unpadded, rtol=0, atol=1e-4)
    # Without the mask the padding tokens take part in the attention and move the real logits.
    assert (unmasked[:, :2] - unpadded).abs().max() > 1e-3
    with pytest.raises(ValueError, match="class_mask must be a bool tensor"):
        tiny_model.segment(episode["query"], task, class_mask.float())


def test_foreground_pool_equals_upsample_then_masked_average() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 3, 4, 2, generator=generator)
    masks = (torch.rand(2, 3, 48, 64, 32, generator=generator) > 0.7).float()
    masks[1, 2] = 0.0  # an empty mask gives a zero token, not NaN
    upsampled = F.interpolate(features, size=masks.shape[2:], mode="trilinear", align_corners=False)
    naive = (
        torch.einsum("bcxyz,bkxyz->bkc", upsampled, masks) / masks.sum((2, 3, 4)).clamp_min(1e-6)[..., None]
    )
    torch.testing.assert_close(foreground_pool(features, masks), naive, rtol=1e-5, atol=5e-5)
    assert torch.equal(foreground_pool(features, masks)[1, 2], torch.zeros(6))


def test_foreground_token_is_the_normalised_pool(tiny_model: Iris, episode: dict[str, torch.Tensor]) -> None:
    """T = [T_f; T_c] (paper §3.2): T_f is the pooled reference feature itself, so the class identity it
    carries is not averaged away by the query-token attention (which drowned it when T_f went through)."""
    ref, masks = episode["ref"][:1], episode["ref_masks"][:1]
    with torch.no_grad():
        task = tiny_model.encode_task(ref, masks)
        pooled = foreground_pool(tiny_model.encoder(ref)[-1], masks)
        expected = tiny_model.task_encoder.norm_foreground(pooled)
    torch.testing.assert_close(task[:, :, 0], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(task[0, 0, 0], task[0, 1, 0], atol=1e-2)  # two classes, two T_f


def test_gradients_reach_a_tuned_embedding(tiny_model: Iris, episode: dict[str, torch.Tensor]) -> None:
    """In-context tuning optimises T with the weights frozen."""
    with torch.no_grad():
        task = tiny_model.encode_task(episode["ref"][:1], episode["ref_masks"][:1])
    task.requires_grad_(True)
    tiny_model.segment(episode["query"][:1], task).sigmoid().mean().backward()
    assert task.grad is not None and torch.isfinite(task.grad).all() and task.grad.abs().sum() > 0
    tiny_model.zero_grad(set_to_none=True)


def test_memory_bank_ema() -> None:
    torch.manual_seed(0)
    model = Iris(IrisConfig.tiny(memory_bank_size=4))
    shape = (model.config.num_tokens, model.config.embed_dim)
    first, second, other = torch.randn(1, *shape), torch.randn(1, *shape), torch.randn(1, *shape)
    model.update_memory_bank(torch.tensor([2]), first, momentum=0.9)
    torch.testing.assert_close(model.memory_bank[2], first[0])  # the first update copies
    model.update_memory_bank(torch.tensor([2, -1]), torch.cat([second, other]), momentum=0.9)  # -1: padding
    warmup = 2 / 11  # min(0.9, (1 + n) / (10 + n)) after n = 1 update
    torch.testing.assert_close(model.memory_bank[2], warmup * first[0] + (1 - warmup) * second[0])
    assert model.bank_initialized.tolist() == [False, False, True, False]
    assert model.bank_updates.tolist() == [0, 0, 2, 0]
    assert model.memory_bank_embedding(torch.tensor([2])).shape == (1, 1, *shape)
    with pytest.raises(KeyError, match=r"\[0\]"):
        model.memory_bank_embedding(torch.tensor([0, 2]))
    with pytest.raises(KeyError, match=r"class ids \[-2, 4\] are outside the memory bank's 0..3"):
        model.memory_bank_embedding(torch.tensor([-2, 2, 4]))  # -2 would have read slot 2
    assert "memory_bank" in model.state_dict()


def test_memory_bank_forgets_early_training_embeddings() -> None:
    """A class's embedding drifts while the network learns; the bank must end near its latest value.

    With α = 0.999 and no warm-up, 61 % of the bank would still be the first, random-network embedding
    after 500 updates (the 1000-step CPU run's bank scored Dice 0.01 that way).
    """
    model = Iris(IrisConfig.tiny(memory_bank_size=1))
    shape = (1, model.config.num_tokens, model.config.embed_dim)
    early, late = torch.zeros(shape), torch.ones(shape)
    for _ in range(250):
        model.update_memory_bank(torch.tensor([0]), early, momentum=0.999)
    for _ in range(250):
        model.update_memory_bank(torch.tensor([0]), late, momentum=0.999)
    assert model.memory_bank.min() > 0.95
    assert model.bank_updates.tolist() == [500]


def test_memory_bank_momentum_reaches_alpha() -> None:
    model = Iris(IrisConfig.tiny(memory_bank_size=1))
    shape = (1, model.config.num_tokens, model.config.embed_dim)
    model.update_memory_bank(torch.tensor([0]), torch.zeros(shape))
    model.bank_updates.fill_(20_000)  # long past the warm-up: the update uses α itself
    model.update_memory_bank(torch.tensor([0]), torch.ones(shape), momentum=0.999)
    torch.testing.assert_close(model.memory_bank, torch.full(shape, 0.001))


def test_models_saved_with_the_boolean_bank_flags_still_load() -> None:
    """Versions registered before the EMA warm-up stored ``bank_initialized``; reviews must load them."""
    torch.manual_seed(0)
    old = Iris(IrisConfig.tiny(memory_bank_size=3))
    old.update_memory_bank(torch.tensor([1]), torch.randn(1, old.config.num_tokens, old.config.embed_dim))
    state = old.state_dict()
    state["bank_initialized"] = state.pop("bank_updates") > 0
    model = Iris(IrisConfig.tiny(memory_bank_size=3))
    model.load_state_dict(state)
    assert model.bank_updates.tolist() == [0, 1, 0]
    torch.testing.assert_close(model.memory_bank, old.memory_bank)


def test_disabled_memory_bank_refuses_updates(tiny_model: Iris) -> None:
    with pytest.raises(RuntimeError, match="disabled"):
        tiny_model.update_memory_bank(torch.tensor([0]), torch.zeros(1, 11, 64))


def _conditioned(**options: bool) -> Iris:
    torch.manual_seed(0)
    return Iris(IrisConfig.tiny(**options)).eval()


def test_foreground_queries_make_the_context_tokens_class_specific(episode: dict[str, torch.Tensor]) -> None:
    """With the option the m query tokens start from learned queries + T_f, so when T_f differs, T_c does."""
    ref, masks = episode["ref"][:1], episode["ref_masks"][:1]
    plain, conditioned = _conditioned(), _conditioned(foreground_queries=True)
    conditioned.load_state_dict(plain.state_dict())  # same weights: only the start of the queries differs
    with torch.no_grad():
        t_plain, t_cond = plain.encode_task(ref, masks), conditioned.encode_task(ref, masks)
    torch.testing.assert_close(t_cond[:, :, 0], t_plain[:, :, 0])  # T_f untouched
    assert not torch.allclose(t_cond[:, :, 1:], t_plain[:, :, 1:], atol=1e-3)
    gap = lambda t: float((t[0, 0, 1:] - t[0, 1, 1:]).norm() / t[0, :, 1:].norm())  # noqa: E731
    assert gap(t_cond) > 2 * gap(t_plain)


@pytest.mark.parametrize("options", [{"foreground_queries": True}, {"classifier_foreground": True}])
def test_conditioning_options_keep_permutation_and_caching(
    options: dict[str, bool], episode: dict[str, torch.Tensor]
) -> None:
    model = _conditioned(**options)
    masks = torch.cat([episode["ref_masks"][:1], _random_masks(1, 1, (32, 32, 32))], dim=1)
    permutation = torch.tensor([2, 0, 1])
    with torch.no_grad():
        task = model.encode_task(episode["ref"][:1], masks)
        logits = model.segment(episode["query"][:1], task)
        full = model(episode["query"][:1], episode["ref"][:1], masks)
        permuted = model(episode["query"][:1], episode["ref"][:1], masks[:, permutation])
    torch.testing.assert_close(full, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(permuted, logits[:, permutation], rtol=0, atol=5e-5)


def test_classifier_foreground_reads_the_unfused_foreground_token(episode: dict[str, torch.Tensor]) -> None:
    """The classifier's input starts with each class's pre-fusion T_f, ahead of the fused-scale tokens."""
    model = _conditioned(classifier_foreground=True)
    assert model.mask_decoder.classifier.norm.normalized_shape[0] == sum(model.config.fused_channels) + 64
    with torch.no_grad():
        task = model.encode_task(episode["ref"][:1], episode["ref_masks"][:1])
        captured = {}
        hook = model.mask_decoder.classifier.register_forward_pre_hook(
            lambda module, args: captured.update(tokens=args[0])  # returns None: args stay as they are
        )
        model.segment(episode["query"][:1], task)
        hook.remove()
    torch.testing.assert_close(captured["tokens"][..., :64], task[:, :, 0])
