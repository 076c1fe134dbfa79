"""The Iris inference strategies (paper §3.3, Fig. 3/4) as functions that produce task embeddings.

Every strategy ends in the same object, a task embedding ``T`` of shape (1, K, m+1, C) whose K slots follow
the caller's class order; segmentation is then ``model.segment(query, T)`` or, for volumes larger than a
window, :func:`iris_pipelines.inference.sliding_window.sliding_window_segment`. Keeping "where does T come
from" apart from "how is a volume segmented" lets every strategy run on crops, whole volumes or sliding
windows alike, and lets T be cached, stored and compared (t-SNE) as a plain tensor.

* ``one_shot``: :func:`encode_reference` of one reference, cached and reused for any number of queries.
* ``ensemble``: :func:`context_ensemble`, the mean of per-reference embeddings (:func:`encode_references`).
* ``memory_bank``: :func:`memory_bank_task`, the training-time EMA embedding of a seen class, no reference.
* ``retrieval``: :func:`retrieval_task`, object-level context retrieval (initial segmentation, query
  self-encoding, per-class cosine top-k from a pool, mean of the picks).
* ``tuning``: :func:`tune_task_embedding`, gradient descent on T alone with every weight frozen.

Pure torch on purpose (no SimpleITK, no MONAI), so GPU benchmarks can import it with torch alone.
Reference and query tensors are (1, 1, D, H, W) images and (1, K, D, H, W) binary masks on the canonical
preprocessed grid; :mod:`iris_pipelines.inference.volume` builds them from raw scans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from iris_pipelines.model import Iris
from iris_pipelines.model.losses import segmentation_loss

Strategy = Literal["one_shot", "ensemble", "memory_bank", "retrieval", "tuning"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

# In-context tuning's defaults (evaluate, ``iris segment`` and the pyfunc take them from here). The paper
# gives neither steps, lr nor optimiser. On the phantom recipe (docs/phantom-recipe.md) 10 × Adam(1e-2)
# barely moved T, 30 × 0.1 lifted the held-out datasets, 60 lifted them further on every network
# measured, 120 no more; lr 0.1 suits tokens that the task encoder's final LayerNorm keeps at unit scale.
TUNING_STEPS = 60
TUNING_LR = 0.1

SegmentFn = Callable[[Tensor, Tensor], Tensor]
"""(query (1, 1, D, H, W), T (1, K, m+1, C)) → logits (1, K, D, H, W): direct or sliding-window."""


def check_strategy(name: str) -> Strategy:
    """``name`` if it is one of :data:`STRATEGIES`; otherwise a ValueError listing them (for params)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown inference strategy {name!r}; expected one of {list(STRATEGIES)}")
    return name  # type: ignore[return-value]


def _device(model: Iris) -> torch.device:
    return next(model.parameters()).device


def _check_pair(image: Tensor, masks: Tensor, what: str) -> None:
    if image.dim() != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"{what} image must have shape (1, 1, D, H, W), got {tuple(image.shape)}")
    if masks.dim() != 5 or masks.shape[0] != 1 or masks.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"{what} masks must have shape (1, K, D, H, W) matching the image {tuple(image.shape)}, "
            f"got {tuple(masks.shape)}"
        )
    if masks.shape[1] == 0:
        raise ValueError(f"{what} masks hold no class (K = 0)")


def _check_not_empty(masks: Tensor, what: str) -> None:
    """A class with no voxel has no foreground to pool: its embedding would be meaningless, so refuse."""
    empty = (masks.reshape(masks.shape[1], -1) > 0).sum(dim=1) == 0
    if empty.any():
        raise ValueError(
            f"{what} mask of class slot(s) {empty.nonzero().flatten().tolist()} is empty; a reference must "
            "contain every class it is asked to encode (crop it around the structures or drop the class)"
        )


def _check_task(task: Tensor, model: Iris | None = None, what: str = "task embedding") -> None:
    tail = f", {model.config.num_tokens}, {model.config.embed_dim}" if model is not None else ", m+1, C"
    ok = task.dim() == 4 and task.shape[0] == 1
    if ok and model is not None:
        ok = tuple(task.shape[2:]) == (model.config.num_tokens, model.config.embed_dim)
    if not ok:
        raise ValueError(f"{what} must have shape (1, K{tail}), got {tuple(task.shape)}")


# ---------------------------------------------------------------------------------------- one-shot, ensemble


@torch.no_grad()
def encode_reference(model: Iris, image: Tensor, masks: Tensor) -> Tensor:
    """T (1, K, m+1, C) of one reference: the ``one_shot`` embedding, to cache and reuse for many queries.

    ``image`` (1, 1, D, H, W) and ``masks`` (1, K, D, H, W) in {0, 1}; every class slot must hold at least
    one voxel. References larger than the training window should first be cut with
    :func:`crop_reference` (the task encoder sees the bottleneck at 1/16 of the input, so a huge input
    spreads the same tokens over far more context than training showed).
    """
    _check_pair(image, masks, "reference")
    _check_not_empty(masks, "reference")
    device = _device(model)
    return model.encode_task(image.to(device, torch.float32), masks.to(device, torch.float32))


def encode_references(model: Iris, references: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """Stack :func:`encode_reference` over references of any sizes → (N, K, m+1, C).

    References are encoded one at a time because their sizes differ; all must list the same K classes in
    the same slot order. The result is the context pool of ``ensemble`` and ``retrieval``.
    """
    embeddings = []
    for index, (image, masks) in enumerate(references):
        try:
            embeddings.append(encode_reference(model, image, masks))
        except ValueError as error:
            raise ValueError(f"reference {index}: {error}") from error
    if not embeddings:
        raise ValueError("encode_references needs at least one reference")
    ks = {e.shape[1] for e in embeddings}
    if len(ks) > 1:
        raise ValueError(f"references hold different numbers of classes {sorted(ks)}; K must match")
    return torch.cat(embeddings)


def _check_pool(pool: Tensor, valid: Tensor | None) -> Tensor:
    """The (N, K) bool availability table; all-True when ``valid`` is None."""
    if pool.dim() != 4 or pool.shape[0] == 0:
        raise ValueError(f"embeddings must have shape (N >= 1, K, m+1, C), got {tuple(pool.shape)}")
    if valid is None:
        return torch.ones(pool.shape[:2], dtype=torch.bool, device=pool.device)
    if tuple(valid.shape) != tuple(pool.shape[:2]):
        raise ValueError(f"valid must have shape {tuple(pool.shape[:2])} (N, K), got {tuple(valid.shape)}")
    valid = valid.to(device=pool.device, dtype=torch.bool)
    missing = (~valid.any(dim=0)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"class slot(s) {missing} have no valid reference embedding in the pool")
    return valid


def context_ensemble(embeddings: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-class mean of N reference embeddings (N, K, m+1, C) → T (1, K, m+1, C) (paper §3.3).

    ``valid`` (N, K) bool marks which reference holds which class, so a reference without class k does
    not dilute its mean; every class needs one valid reference. Averaging identical embeddings gives the
    one-shot embedding back, so ensemble and one-shot agree on a pool of one.
    """
    valid = _check_pool(embeddings, valid)
    weights = valid.to(embeddings.dtype)[..., None, None]
    # where, not a product with the weights: an unused slot may hold anything, and NaN × 0 is NaN
    held = torch.where(valid[..., None, None], embeddings, torch.zeros((), dtype=embeddings.dtype))
    return (held.sum(dim=0) / weights.sum(dim=0)).unsqueeze(0)


# ---------------------------------------------------------------------------------------------- memory bank


def memory_bank_task(model: Iris, class_ids: Mapping[str, int], keys: Sequence[str]) -> Tensor:
    """T (1, K, m+1, C) of seen classes from the EMA memory bank; no reference needed (paper suppl.).

    Args:
        model: a trained Iris whose ``memory_bank`` buffer was filled during training.
        class_ids: ``"dataset/label"`` → bank slot, as stored in the model bundle (``bundle.class_ids``).
        keys: the ``"dataset/label"`` classes to segment, in slot order.

    Raises:
        ValueError: the model has no memory bank, or ``keys`` is empty.
        KeyError: a key is not a training class, or its slot never received an embedding during training;
            both name the offending keys.
    """
    if model.config.memory_bank_size == 0:
        raise ValueError("this model has no memory bank (IrisConfig.memory_bank_size == 0)")
    if not keys:
        raise ValueError("memory_bank_task needs at least one 'dataset/label' key")
    unknown = [key for key in keys if key not in class_ids]
    if unknown:
        known = sorted(class_ids)
        shown = ", ".join(known[:10]) + (", …" if len(known) > 10 else "")
        raise KeyError(
            f"class(es) {unknown} are not training classes of this model's memory bank (known: {shown})"
        )
    slots = [int(class_ids[key]) for key in keys]
    outside = [
        key for key, slot in zip(keys, slots, strict=True) if not 0 <= slot < model.memory_bank.shape[0]
    ]
    if outside:
        raise KeyError(
            f"class(es) {outside} map outside the memory bank of {model.memory_bank.shape[0]} slots"
        )
    empty = [key for key, slot in zip(keys, slots, strict=True) if not bool(model.bank_initialized[slot])]
    if empty:
        raise KeyError(
            f"the memory bank holds no embedding for {empty}: they never appeared in a training episode"
        )
    return model.memory_bank_embedding(torch.tensor(slots, dtype=torch.long)).clone()


def memory_bank_gaps(model: Iris, class_ids: Mapping[str, int], keys: Sequence[str]) -> dict[str, str]:
    """The ``keys`` the memory bank has no embedding for, each with :func:`memory_bank_task`'s reason.

    So a caller can segment the classes the bank holds and report the others one by one, instead of losing
    every class of a scan to one class that never appeared in training.
    """
    gaps = {}
    for key in keys:
        try:
            memory_bank_task(model, class_ids, [key])
        except KeyError as error:
            gaps[key] = str(error.args[0])  # str(KeyError) would wrap the message in quotes
    return gaps


# ------------------------------------------------------------------------------------ reference windowing


def mask_window(masks: Tensor, roi_size: int | Sequence[int]) -> tuple[slice, slice, slice]:
    """A window of ``min(roi, size)`` voxels per axis, centred on the union bounding box of the masks.

    Why centred on the union box: the task encoder must see every requested structure and as much of its
    surroundings as training did (training crops are ``roi``-sized windows around the foreground). When
    the union box is larger than ``roi`` along an axis, its centre may lie in empty space (a curved
    organ, lesions far apart), so along that axis the window is centred on the foreground voxel nearest
    the box centre instead: the window always holds foreground. It is shifted, never shrunk, to stay
    inside the volume. ``masks`` is (..., D, H, W).
    """
    spatial = tuple(masks.shape[-3:])
    roi = clamp_roi(roi_size, spatial)
    occupied = masks.reshape(-1, *spatial).amax(dim=0) > 0
    if not occupied.any():
        raise ValueError("cannot place a window on empty masks: no class has a foreground voxel")
    extents = []
    for axis in range(3):
        indices = occupied.any(dim=tuple(a for a in range(3) if a != axis)).nonzero().flatten()
        extents.append((int(indices[0]), int(indices[-1]) + 1))
    centres = [(low + high) / 2.0 for low, high in extents]
    cut = [high - low > length for (low, high), length in zip(extents, roi, strict=True)]
    if any(cut):  # only then list the foreground voxels (millions for a large organ at full resolution)
        voxels = occupied.nonzero().float() + 0.5
        centre = torch.tensor(centres, device=voxels.device)
        nearest = voxels[((voxels - centre) ** 2).sum(dim=1).argmin()].tolist()
        centres = [n if c else b for n, c, b in zip(nearest, cut, centres, strict=True)]
    window = []
    for size, length, centre in zip(spatial, roi, centres, strict=True):
        start = min(max(int(round(centre - length / 2.0)), 0), size - length)
        window.append(slice(start, start + length))
    return window[0], window[1], window[2]


def clamp_roi(roi_size: int | Sequence[int], spatial: Sequence[int]) -> tuple[int, int, int]:
    """Window per axis, clamped to the volume; a size that fits the volume is the whole axis."""
    roi = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size must be a positive int or 3 positive ints, got {roi_size}")
    return tuple(min(r, s) for r, s in zip(roi, spatial, strict=True))  # type: ignore[return-value]


def crop_reference(image: Tensor, masks: Tensor, roi_size: int | Sequence[int]) -> tuple[Tensor, Tensor]:
    """``image`` and ``masks`` cut to :func:`mask_window`; the whole volume when it fits in ``roi``.

    One window for all classes, as training's reference crop: a class farther than ``roi`` from the others
    may be cut out (its mask then empty). :func:`encode_class_windows` gives each class its own window.
    """
    _check_pair(image, masks, "reference")
    z, y, x = mask_window(masks, roi_size)
    return image[..., z, y, x], masks[..., z, y, x]


def encode_class_windows(
    model: Iris, image: Tensor, class_masks: Iterable[Tensor], roi_size: int | Sequence[int]
) -> Tensor:
    """T (1, K, m+1, C) of one reference, each class encoded from a window centred on that class.

    How ``embed_tasks``, ``evaluate`` and ``iris segment`` encode a reference: every class keeps the
    context training showed around it, however far apart the classes lie. ``class_masks`` yields one
    (1, 1, D, H, W) mask per class, lazily if need be, so K full-size masks never coexist.
    """
    slots = [encode_reference(model, *crop_reference(image, mask, roi_size)) for mask in class_masks]
    if not slots:
        raise ValueError("encode_class_windows needs at least one class mask")
    return torch.cat(slots, dim=1)


# ---------------------------------------------------------------------------------------------- retrieval


@dataclass(frozen=True)
class RetrievalResult:
    """What object-level retrieval chose, kept so evaluation can report and reproduce it.

    Attributes:
        task: T (1, K, m+1, C), per class the mean of the retrieved pool embeddings.
        indices: (K, top_k) pool rows retrieved per class, most similar first; -1 pads classes with
            fewer valid references than ``top_k``.
        scores: (K, top_k) their cosine similarities (-inf at padding).
        initial_indices: (K,) the random pool row whose embedding gave the initial segmentation.
        fallback: (K,) True where the initial segmentation of that class was empty, so the query could not
            be encoded for it and the class used the full-pool ensemble instead of retrieval.
    """

    task: Tensor
    indices: Tensor
    scores: Tensor
    initial_indices: Tensor
    fallback: Tensor


def _flatten_tokens(embedding: Tensor, tokens: Literal["all", "foreground"]) -> Tensor:
    if tokens == "all":
        return embedding.flatten(-2)
    if tokens == "foreground":
        return embedding[..., 0, :]
    raise ValueError(f"tokens must be 'all' or 'foreground', got {tokens!r}")


def retrieve_references(
    query_task: Tensor,
    pool: Tensor,
    top_k: int,
    valid: Tensor | None = None,
    tokens: Literal["all", "foreground"] = "all",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per class, the ``top_k`` pool embeddings most cosine-similar to the query's own embedding.

    Args:
        query_task: (1, K, m+1, C) embedding of the query encoded with its own (initial) masks.
        pool: (N, K, m+1, C) reference embeddings (:func:`encode_references`).
        top_k: references kept per class (clamped to the valid ones; for the paper's "top p %" pass
            ``max(1, round(p / 100 * N))``).
        valid: optional (N, K) bool, which reference holds which class.
        tokens: similarity over the flattened (m+1)·C embedding (``"all"``, default) or the foreground
            token only; the paper does not say which (reference notes §4).

    Returns:
        ``(task (1, K, m+1, C), indices (K, top_k), scores (K, top_k))``: the per-class mean of the picks,
        the picked rows (most similar first, -1 padding) and their similarities (-inf padding).
    """
    valid = _check_pool(pool, valid)
    if query_task.dim() != 4 or query_task.shape[0] != 1 or query_task.shape[1:] != pool.shape[1:]:
        raise ValueError(
            f"query_task must have shape (1, {', '.join(map(str, pool.shape[1:]))}) like the pool, "
            f"got {tuple(query_task.shape)}"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    query = _flatten_tokens(query_task[0].float(), tokens)  # (K, F)
    refs = _flatten_tokens(pool.float(), tokens)  # (N, K, F)
    similarity = torch.nn.functional.cosine_similarity(refs, query.unsqueeze(0), dim=-1)  # (N, K)
    similarity = similarity.masked_fill(~valid, float("-inf"))
    k = min(top_k, pool.shape[0])
    scores, indices = similarity.T.topk(k, dim=1)  # (K, k), most similar first
    picked = torch.isfinite(scores)
    indices = torch.where(picked, indices, torch.full_like(indices, -1))
    chosen = torch.zeros(pool.shape[:2], dtype=torch.bool, device=pool.device)  # (N, K)
    for slot in range(pool.shape[1]):
        chosen[indices[slot][picked[slot]], slot] = True
    return context_ensemble(pool, chosen).to(pool.dtype), indices, scores


def _initial_indices(valid: Tensor, generator: torch.Generator | None) -> Tensor:
    """One random pool row for all classes, or per class the first valid row of one random order."""
    order = torch.randperm(valid.shape[0], generator=generator).to(valid.device)
    return torch.stack([order[valid[order, k]][0] for k in range(valid.shape[1])])


@torch.no_grad()
def retrieval_task(
    model: Iris,
    query: Tensor,
    pool: Tensor,
    top_k: int,
    *,
    valid: Tensor | None = None,
    initial_index: int | None = None,
    generator: torch.Generator | None = None,
    segment_fn: SegmentFn | None = None,
    roi_size: int | Sequence[int] | None = None,
    threshold: float = 0.5,
    tokens: Literal["all", "foreground"] = "all",
) -> RetrievalResult:
    """Object-level context retrieval (paper §3.3): a task embedding chosen per class for this query.

    1. Segment ``query`` with the embedding of a random pool reference (``initial_index`` fixes it;
       ``generator`` seeds the draw).
    2. Binarise each class at sigmoid > ``threshold`` and encode the query with its own initial masks,
       each class from its own :func:`mask_window` of ``roi_size`` when given (as the pool's references
       are: :func:`encode_class_windows`).
    3. Per class, retrieve the ``top_k`` most cosine-similar pool embeddings (:func:`retrieve_references`).
    4. Return their per-class mean; the caller segments the query again with ``result.task``.

    A class whose initial mask is empty cannot be encoded from the query; it falls back to the mean of
    the whole pool (the 100 % point of Fig. 4, where retrieval and ensemble meet) and is flagged in
    ``result.fallback``. The query must not be in the pool. ``segment_fn`` defaults to whole-volume
    ``model.segment``; pass a sliding-window one for volumes larger than a window.
    """
    valid = _check_pool(pool, valid)
    tokens_shape = (model.config.num_tokens, model.config.embed_dim)
    if tuple(pool.shape[2:]) != tokens_shape:
        raise ValueError(
            f"pool must have shape (N, K, {tokens_shape[0]}, {tokens_shape[1]}), got {tuple(pool.shape)}"
        )
    if query.dim() != 5 or query.shape[:2] != (1, 1):
        raise ValueError(f"query must have shape (1, 1, D, H, W), got {tuple(query.shape)}")
    device = _device(model)
    query = query.to(device, torch.float32)
    pool = pool.to(device)
    valid = valid.to(device)
    if initial_index is None:
        initial = _initial_indices(valid, generator)
    else:
        if not 0 <= initial_index < pool.shape[0]:
            raise ValueError(f"initial_index {initial_index} is outside the pool of {pool.shape[0]}")
        if not bool(valid[initial_index].all()):
            missing = (~valid[initial_index]).nonzero().flatten().tolist()
            raise ValueError(f"initial reference {initial_index} does not hold class slot(s) {missing}")
        initial = torch.full((pool.shape[1],), initial_index, dtype=torch.long, device=device)
    initial_task = pool[initial, torch.arange(pool.shape[1], device=device)].unsqueeze(0)
    segment = segment_fn or model.segment
    logits = segment(query, initial_task)
    masks = (torch.sigmoid(logits.float()) > threshold).to(device, torch.float32)
    del logits
    fallback = masks.flatten(2).sum(dim=2)[0] == 0  # (K,)
    full_pool = context_ensemble(pool, valid)
    if bool(fallback.all()):
        k = min(top_k, pool.shape[0])
        empty_indices = torch.full((pool.shape[1], k), -1, dtype=torch.long, device=device)
        empty_scores = torch.full((pool.shape[1], k), float("-inf"), device=device)
        return RetrievalResult(full_pool, empty_indices, empty_scores, initial, fallback)
    if roi_size is None:
        # Classes are encoded independently by the task encoder, so empty slots do not disturb the others.
        query_task = model.encode_task(query, masks)
    else:  # each class from its own window, as the pool's references were encoded
        found = (~fallback).nonzero().flatten().tolist()
        encoded = encode_class_windows(model, query, (masks[:, k : k + 1] for k in found), roi_size)
        query_task = encoded.new_zeros((1, masks.shape[1], *encoded.shape[2:]))
        query_task[:, found] = encoded  # the empty slots fall back to the whole pool below
    task, indices, scores = retrieve_references(query_task, pool, top_k, valid, tokens)
    task = torch.where(fallback[None, :, None, None], full_pool, task)
    indices = indices.masked_fill(fallback[:, None], -1)
    scores = scores.masked_fill(fallback[:, None], float("-inf"))
    return RetrievalResult(task, indices, scores, initial, fallback)


# ------------------------------------------------------------------------------------------- tuning


@dataclass(frozen=True)
class TuningResult:
    """Tuned T (1, K, m+1, C), detached, and the loss before the first and after every step (steps + 1)."""

    task: Tensor
    losses: list[float]


@contextmanager
def frozen(model: Iris):
    """Model in eval mode with no parameter requiring grad; both restored on exit, even on error."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    modes = [(module, module.training) for module in model.modules()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for module, training in modes:  # each module's own mode: they need not all match the root's
            module.training = training


def _reference_slots(
    class_mask: Tensor | None, references: int, slots: int, device: torch.device
) -> list[Tensor | None]:
    """Each reference's (1, K) loss slots from ``class_mask`` (None, (K,) or (N, K)); see
    :func:`tune_task_embedding`."""
    if class_mask is None:
        return [None] * references
    mask = class_mask.to(device, torch.bool)
    if mask.dim() == 1:
        mask = mask.expand(references, -1)
    if tuple(mask.shape) != (references, slots):
        raise ValueError(
            f"class_mask must have shape ({slots},) or ({references}, {slots}) (references, class slots), "
            f"got {tuple(class_mask.shape)}"
        )
    return [row.reshape(1, -1) for row in mask]


def tune_task_embedding(
    model: Iris,
    task: Tensor,
    references: Sequence[tuple[Tensor, Tensor]],
    *,
    steps: int = TUNING_STEPS,
    lr: float = TUNING_LR,
    class_mask: Tensor | None = None,
) -> TuningResult:
    """In-context tuning (paper §3.3): optimise only T on the references' own masks, weights frozen.

    Args:
        model: the network; left bit-identical, with its ``requires_grad`` flags and train/eval mode
            restored afterwards.
        task: initial T (1, K, m+1, C), e.g. :func:`encode_reference` of a random reference.
        references: (image (1, 1, D, H, W), masks (1, K, D, H, W)) pairs, slot order as ``task``; a
            class absent from a reference crop is fine (the loss then pushes it to empty there).
        steps: Adam steps (:data:`TUNING_STEPS`, which says how the default was measured).
        lr: Adam learning rate.
        class_mask: optional (K,) bool of slots to tune; the others are left exactly as given (their
            own loss terms are dropped, and the gradient that reaches them through the decoder's
            attention between class tokens is zeroed, or Adam would scale it to full-size steps). Or
            (N, K), one row per reference: reference n's loss counts only the slots of row n (a reference
            that does not label a class says nothing about it), and a slot in no row is left as given.

    The loss is ``segmentation_loss`` (Dice + BCE, as in training) averaged over the references, each
    segmented whole: crop references larger than a window first (:func:`crop_reference`).
    """
    _check_task(task, model, "initial task embedding")
    if not references:
        raise ValueError("in-context tuning needs at least one reference image with masks")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = _device(model)
    pairs = []
    for index, (image, masks) in enumerate(references):
        _check_pair(image, masks, f"tuning reference {index}")
        if masks.shape[1] != task.shape[1]:
            raise ValueError(
                f"tuning reference {index} has {masks.shape[1]} class masks but the task embedding has "
                f"{task.shape[1]} class slots"
            )
        pairs.append((image.to(device, torch.float32), masks.to(device, torch.float32)))
    rows = _reference_slots(class_mask, len(pairs), task.shape[1], device)
    tuned = task.detach().to(device, torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([tuned], lr=lr)
    losses: list[float] = []
    with frozen(model):
        with torch.no_grad():  # the encoder does not see T: encode each reference once, not every step
            encoded = [(model.encode_query(image), masks) for image, masks in pairs]
        with torch.enable_grad():
            for step in range(steps + 1):
                optimizer.zero_grad(set_to_none=True)
                loss = sum(
                    segmentation_loss(model.segment(features, tuned), masks, slots).total
                    for (features, masks), slots in zip(encoded, rows, strict=True)
                ) / len(encoded)
                losses.append(float(loss.detach()))
                if step == steps:
                    break
                loss.backward()
                if class_mask is not None:
                    tuned.grad.mul_(torch.cat(rows).any(dim=0).reshape(1, -1, 1, 1))
                optimizer.step()
    return TuningResult(tuned.detach().to(task.dtype), losses)


# ------------------------------------------------------------------------------------------- self-check

SELF_CHECK_DICE = 0.5
"""A class that its own reference, segmented with the task, shows with a lower Dice is reported as
unreliable: on the phantom recipe such classes are the ones one-shot misses on the queries too
(docs/phantom-recipe.md, "Checking a task on its own reference")."""


def reference_self_dice(logits: Tensor, masks: Tensor, threshold: float = 0.5) -> Tensor:
    """Dice (K,) of each class of a reference segmented with its own task embedding.

    ``logits`` (1, K, D, H, W) come from segmenting the reference image with T, ``masks`` (1, K, D, H, W)
    are its class masks; voxels are labelled as for a query (:func:`logits_to_labels`, so classes compete).
    A class the model cannot find even in the scan its embedding came from is not recognised from that
    reference, and a query will not fare better. NaN for a slot the reference does not show.
    """
    if logits.shape != masks.shape or logits.dim() != 5 or logits.shape[0] != 1:
        raise ValueError(
            f"logits {tuple(logits.shape)} and masks {tuple(masks.shape)} must both be (1, K, D, H, W)"
        )
    slots = logits.shape[1]
    labels = logits_to_labels(logits, list(range(1, slots + 1)), threshold)
    values = torch.arange(1, slots + 1, device=labels.device).view(-1, 1, 1, 1)
    predicted = (labels[None] == values).flatten(1)
    truth = (masks[0] > 0).to(labels.device).flatten(1)
    overlap = (predicted & truth).sum(dim=1).double()
    shown = truth.sum(dim=1).double()
    dice = 2 * overlap / (predicted.sum(dim=1).double() + shown).clamp(min=1)
    return torch.where(shown > 0, dice, torch.full_like(dice, float("nan")))


# --------------------------------------------------------------------------------------------- labels


def logit_cut(threshold: float) -> float:
    """The logit a foreground probability ``threshold`` corresponds to (sigmoid is monotonic, so labels are
    decided in logit space without a probability tensor)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    return torch.logit(torch.tensor(threshold, dtype=torch.float64)).item()


def logits_to_labels(logits: Tensor, label_values: Sequence[int], threshold: float = 0.5) -> Tensor:
    """(K, D, H, W) or (1, K, D, H, W) logits → int32 label map (D, H, W).

    A voxel takes ``label_values[k]`` when class k has the highest probability and sigmoid > ``threshold``,
    else 0: each slot is a binary sigmoid task (classes may overlap), so the argmax resolves overlaps and
    the threshold decides foreground, as MASS ``inference.py`` does. Compared in logit space (the sigmoid
    is monotonic) so no (K, D, H, W) probability tensor is allocated.
    """
    if logits.dim() == 5 and logits.shape[0] == 1:
        logits = logits[0]
    if logits.dim() != 4 or logits.shape[0] != len(label_values):
        raise ValueError(
            f"logits must have shape (K={len(label_values)}, D, H, W) for label values "
            f"{list(label_values)}, got {tuple(logits.shape)}"
        )
    cut = logit_cut(threshold)
    best_logit, best = logits.max(dim=0)
    values = torch.as_tensor(list(label_values), dtype=torch.int32, device=logits.device)[best]
    return torch.where(best_logit > cut, values, torch.zeros_like(values))
