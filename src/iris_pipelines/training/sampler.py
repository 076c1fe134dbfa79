"""Episodic sampling over the train split (paper suppl. Alg. 1).

Each episode: a train dataset (uniform), a query case and a reference case of *different subjects* of
that dataset, the classes both contain (randomly dropped down to ``max_classes``), crops read from the
memory-mapped arrays, one binary mask per class. Everything an episode draws comes from generators
seeded by (seed, rank, step, slot), so the data of step s is a pure function of those numbers: a
resumed run only needs the step counter to replay the exact stream, and DataLoader workers need no
shared state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .augment import AugmentParams, augment_pair, flip_axes, perturb_masks
from .auto_masks import intensity_regions, shared_regions
from .config import TrainConfig

Box = tuple[int, int, int, int, int, int]
# An auto-mask region must fill this share of a crop in both views (64 voxels of a 32³ crop).
AUTO_MASK_MIN_SHARE = 64 / 32**3
# The batch entries holding (K, D, H, W) class masks.
MASK_KEYS = ("query_masks", "ref_masks")


@dataclass(frozen=True)
class CaseRecord:
    """What sampling needs of one preprocessed case."""

    dataset: str
    case_id: str
    subject_id: str
    image_path: str
    label_path: str
    classes: tuple[int, ...]  # labels with voxels > 0
    bboxes: Mapping[int, Box]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CaseRecord:
        voxels = _json(row["class_voxels"])
        boxes = _json(row["class_bboxes"])
        return cls(
            dataset=str(row["dataset"]),
            case_id=str(row["case_id"]),
            subject_id=str(row["subject_id"]),
            image_path=str(row["image_array"]),
            label_path=str(row["label_array"]),
            classes=tuple(sorted(int(k) for k, v in voxels.items() if int(v) > 0)),
            bboxes={int(k): tuple(int(x) for x in v) for k, v in boxes.items() if v},
        )


def _json(value: Any) -> dict[str, Any]:
    return dict(json.loads(value) if isinstance(value, str) else value or {})


def case_records(manifest: pd.DataFrame) -> dict[tuple[str, str], CaseRecord]:
    """(dataset, case_id) → record, for every row of the preprocessed manifest."""
    return {
        (r.dataset, r.case_id): r for r in (CaseRecord.from_row(row) for row in manifest.to_dict("records"))
    }


def train_class_ids(episode_index: Mapping[str, Any]) -> dict[str, int]:
    """Map ``"dataset/label"`` to a memory-bank slot for every class of a dataset that has train cases.

    Sorted by (dataset, label) so the mapping depends only on the index content; held-out datasets never
    have train cases, so their classes never get a slot.
    """
    train_datasets = {
        c["dataset"] for c in episode_index["cases"] if c["split"] == "train" and not c["heldout"]
    }
    keys = [
        f"{dataset}/{int(label)}"
        for dataset in sorted(train_datasets)
        for label in sorted(episode_index["classes"].get(dataset, {}), key=int)
    ]
    return {key: slot for slot, key in enumerate(keys)}


def train_pool(
    episode_index: Mapping[str, Any], records: Mapping[tuple[str, str], CaseRecord]
) -> dict[str, list[CaseRecord]]:
    """Train-split cases per dataset, keeping only datasets where some two subjects share a class."""
    pool: dict[str, list[CaseRecord]] = {}
    for case in episode_index["cases"]:
        if case["split"] != "train" or case["heldout"]:
            continue
        key = (case["dataset"], case["case_id"])
        if key not in records:
            raise KeyError(f"episode_index train case {key} is missing from preprocessed_manifest")
        if records[key].classes:
            pool.setdefault(case["dataset"], []).append(records[key])
    usable = {}
    for dataset, unsorted in sorted(pool.items()):
        cases = sorted(unsorted, key=lambda c: c.case_id)
        if any(_partners(cases, q) for q in cases):
            usable[dataset] = cases
    if not usable:
        raise ValueError(
            "no train dataset has two subjects sharing a foreground class; cannot build episodes"
        )
    return usable


def _partners(cases: Sequence[CaseRecord], query: CaseRecord) -> list[CaseRecord]:
    return [c for c in cases if c.subject_id != query.subject_id and set(c.classes) & set(query.classes)]


def crop_window(
    size: Sequence[int], crop: Sequence[int], lo: Sequence[int], hi: Sequence[int], rng
) -> list[int]:
    """Start per axis of a window that contains [lo, hi) when it fits (random among those that do),
    else one centred on it; clipped to the volume (volumes smaller than the crop start at 0, then pad)."""
    starts = []
    for n, c, a, b in zip(size, crop, lo, hi, strict=True):
        if n <= c:
            starts.append(0)
            continue
        first, last = max(0, b - c), min(a, n - c)
        if first <= last:
            starts.append(int(rng.integers(first, last + 1)) if rng is not None else (first + last) // 2)
        else:
            starts.append(int(np.clip((a + b) // 2 - c // 2, 0, n - c)))
    return starts


def read_crop(array: np.ndarray, start: Sequence[int], crop: Sequence[int]) -> np.ndarray:
    """Read a crop from a memory-mapped [z, y, x] array; edge-pad where the volume is smaller."""
    region = np.asarray(array[tuple(slice(s, s + c) for s, c in zip(start, crop, strict=True))])
    pad = [(0, c - n) for c, n in zip(crop, region.shape, strict=True)]
    return np.pad(region, pad, mode="edge") if any(p for _, p in pad) else region


def union_box(boxes: Sequence[Box]) -> tuple[list[int], list[int]]:
    lo = [min(b[i] for b in boxes) for i in range(3)]
    hi = [max(b[i + 3] for b in boxes) for i in range(3)]
    return lo, hi


def load_crop(
    record: CaseRecord, start: Sequence[int], crop: Sequence[int], classes: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """(1, D, H, W) float image and (K, D, H, W) uint8 {0, 1} masks of ``classes`` for one crop."""
    image = read_crop(np.load(record.image_path, mmap_mode="r"), start, crop)
    label = read_crop(np.load(record.label_path, mmap_mode="r"), start, crop)
    masks = np.stack([label == c for c in classes]) if classes else np.zeros((0, *crop), bool)
    return torch.from_numpy(image.astype(np.float32))[None], torch.from_numpy(masks.astype(np.uint8))


def first_voxel(record: CaseRecord, value: int) -> list[int]:
    """[z, y, x] of the first voxel of class ``value``: a point that shows it, where the centre of its
    box may not (a class in two parts, such as a bilateral organ under one label)."""
    box = record.bboxes[value]
    label = np.load(record.label_path, mmap_mode="r")[tuple(slice(box[i], box[i + 3]) for i in range(3))]
    offset = np.argwhere(np.asarray(label) == value)[0]
    return [int(box[i] + offset[i]) for i in range(3)]


def volume_shape(record: CaseRecord) -> tuple[int, ...]:
    return tuple(np.load(record.image_path, mmap_mode="r").shape)


@dataclass(frozen=True)
class EpisodeDraw:
    """The discrete choices of one episode (kept separate so tests can check them without I/O)."""

    query: CaseRecord
    reference: CaseRecord
    classes: tuple[int, ...]


class EpisodeSampler:
    """Draws one rank's batch for a given step; stateless apart from its fixed inputs."""

    def __init__(
        self,
        pool: Mapping[str, list[CaseRecord]],
        class_ids: Mapping[str, int],
        config: TrainConfig,
        *,
        rank: int = 0,
        batch_size: int | None = None,
        augment: AugmentParams | None = None,
    ) -> None:
        self.pool = dict(pool)
        self.datasets = sorted(self.pool)
        self.class_ids = dict(class_ids)
        self.config = config
        self.rank = rank
        self.batch_size = batch_size or config.batch_size
        self.augment = augment or AugmentParams()
        # Each query with its partners, found once: scanning every pair per episode is quadratic in a
        # dataset's cases (seconds per episode at TotalSegmentator's 1200).
        self.queries = {
            dataset: [(q, partners) for q in cases if (partners := _partners(cases, q))]
            for dataset, cases in self.pool.items()
        }

    def _seed(self, step: int, slot: int) -> list[int]:
        return [self.config.seed, self.rank, step, slot]

    def draw(self, step: int, slot: int) -> EpisodeDraw:
        """Dataset, query, reference and classes of episode ``slot`` of ``step``."""
        rng = np.random.default_rng(self._seed(step, slot))
        dataset = self.datasets[int(rng.integers(len(self.datasets)))]
        queries = self.queries[dataset]
        query, partners = queries[int(rng.integers(len(queries)))]
        reference = partners[int(rng.integers(len(partners)))]
        common = sorted(set(query.classes) & set(reference.classes))
        order = [common[i] for i in rng.permutation(len(common))]
        keep = len(order)
        if keep > 1 and rng.random() < self.config.class_drop_prob:
            keep = int(rng.integers(1, keep))
        return EpisodeDraw(query, reference, tuple(order[: min(keep, self.config.max_classes)]))

    def episode(self, step: int, slot: int) -> dict[str, Tensor]:
        """Tensors of one episode: crops, masks padded to ``max_classes``, class mask and bank ids."""
        # Drawn from a stream of its own, and only when enabled, so labelled episodes stay the same.
        if self.config.auto_mask_prob > 0:
            task_rng = np.random.default_rng([*self._seed(step, slot), 2])
            if task_rng.random() < self.config.auto_mask_prob:
                return self._auto_mask_episode(task_rng)
        draw = self.draw(step, slot)
        rng = np.random.default_rng([*self._seed(step, slot), 1])
        crop = self.config.crop_size
        ref_lo, ref_hi = union_box([draw.reference.bboxes[c] for c in draw.classes])
        ref_start = crop_window(volume_shape(draw.reference), crop, ref_lo, ref_hi, rng)
        ref, r_masks = load_crop(draw.reference, ref_start, crop, draw.classes)
        # Classes spread wider than a crop: the window centred on their union cuts some out. A slot
        # with an empty reference asks for a class the reference never shows, and would write that
        # empty mask's embedding into the class's memory-bank row, so such classes leave the episode.
        shown = r_masks.flatten(1).amax(1) > 0
        if not shown.any():  # every class cut out: centre on the first one's box instead
            first = draw.reference.bboxes[draw.classes[0]]
            ref, r_masks, shown = self._reference_crop(draw, first[:3], first[3:])
            if not shown.any():  # the box's centre missed a class in two parts: centre on a voxel of it
                point = first_voxel(draw.reference, draw.classes[0])
                ref, r_masks, shown = self._reference_crop(draw, point, [v + 1 for v in point])
        classes = [c for c, visible in zip(draw.classes, shown.tolist(), strict=True) if visible]
        r_masks = r_masks[shown]
        q_size = volume_shape(draw.query)
        if rng.random() < self.config.foreground_crop_prob:  # on a class that stayed in the episode
            box = draw.query.bboxes[classes[int(rng.integers(len(classes)))]]
            centre = [int(rng.integers(box[i], max(box[i] + 1, box[i + 3]))) for i in range(3)]
            q_start = crop_window(q_size, crop, centre, [c + 1 for c in centre], rng)
        else:
            q_start = [int(rng.integers(0, max(n - c, 0) + 1)) for n, c in zip(q_size, crop, strict=True)]
        query, q_masks = load_crop(draw.query, q_start, crop, classes)
        ids = [self.class_ids.get(f"{draw.query.dataset}/{c}", -1) for c in classes]
        # Drawn only when enabled, so recipes without it keep their episode stream.
        if self.config.class_union_prob > 0 and len(ids) > 1 and rng.random() < self.config.class_union_prob:
            pair = rng.choice(len(ids), size=2, replace=False)
            q_masks, r_masks, ids = _merge_slots(q_masks, r_masks, ids, int(pair[0]), int(pair[1]))
        return self._finish(rng, ids, query, q_masks, ref, r_masks)

    def _reference_crop(
        self, draw: EpisodeDraw, lo: Sequence[int], hi: Sequence[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The reference window around [lo, hi), its masks, and which of them show their class."""
        crop = self.config.crop_size
        start = crop_window(volume_shape(draw.reference), crop, lo, hi, None)
        ref, masks = load_crop(draw.reference, start, crop, draw.classes)
        return ref, masks, masks.flatten(1).amax(1) > 0

    def _finish(
        self, rng, ids: list[int], query: Tensor, q_masks: Tensor, ref: Tensor, r_masks: Tensor
    ) -> dict[str, Tensor]:
        """Augment query and reference (each its own draw), perturb the reference masks, pad.

        Warping and perturbing can wipe out a small or sliver-thin reference mask: such a slot leaves the
        episode, as a class the reference crop cuts out does (its empty mask would teach an empty task and
        write into the memory bank). If none would remain, the reference stays as it was cropped.
        """
        if self.config.augment:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            flips = flip_axes(gen, self.augment) if self.config.shared_flips else None
            query, q_masks = augment_pair(query, q_masks, gen, self.augment, flips)
            warped, warped_masks = augment_pair(ref, r_masks, gen, self.augment, flips)
            warped_masks = perturb_masks(warped_masks, gen, self.config.reference_mask_perturbation)
            kept = warped_masks.flatten(1).amax(1) > 0
            if kept.any():
                ref, r_masks = warped, warped_masks[kept]
                q_masks, ids = q_masks[kept], [i for i, keep in zip(ids, kept.tolist(), strict=True) if keep]
        return self._pad(ids, query, q_masks, ref, r_masks)

    def _auto_mask_episode(self, rng: np.random.Generator) -> dict[str, Tensor]:
        """A label-free episode: regions of one train scan, seen through two different crops.

        The query window lies within a quarter crop of the reference window, so the two views share
        most of their regions; the targets are the regions with enough voxels in both views
        (:mod:`~iris_pipelines.training.auto_masks`). Their bank ids are −1: no class, no bank row.
        """
        cases = self.pool[self.datasets[int(rng.integers(len(self.datasets)))]]
        record = cases[int(rng.integers(len(cases)))]
        size, crop = volume_shape(record), self.config.crop_size
        ref_start = [int(rng.integers(0, max(n - c, 0) + 1)) for n, c in zip(size, crop, strict=True)]
        q_start = [
            int(np.clip(s + rng.integers(-(c // 4), c // 4 + 1), 0, max(n - c, 0)))
            for s, n, c in zip(ref_start, size, crop, strict=True)
        ]
        lo = [min(a, b) for a, b in zip(ref_start, q_start, strict=True)]
        extent = [max(a, b) + c - low for a, b, c, low in zip(ref_start, q_start, crop, lo, strict=True)]
        image = read_crop(np.load(record.image_path, mmap_mode="r"), lo, extent).astype(np.float32)
        min_voxels = max(8, int(AUTO_MASK_MIN_SHARE * np.prod(crop)))
        regions = intensity_regions(image, int(rng.integers(3, 9)), min_voxels=min_voxels)
        windows = [
            ([s - low for s, low in zip(start, lo, strict=True)], crop) for start in (ref_start, q_start)
        ]
        labels = shared_regions(regions, windows, min_voxels)
        if not labels:  # a scan too uniform to cut: fall back to one region covering the shared view
            regions = np.ones_like(regions)
            labels = [1]
        count = int(rng.integers(1, min(len(labels), self.config.max_classes) + 1))
        chosen = [labels[i] for i in rng.permutation(len(labels))[:count]]
        views = []
        for start, _ in windows:
            window = tuple(slice(s, s + c) for s, c in zip(start, crop, strict=True))
            region_crop = regions[window]
            masks = np.stack([region_crop == label for label in chosen]).astype(np.uint8)
            views.append(
                (torch.from_numpy(np.ascontiguousarray(image[window]))[None], torch.from_numpy(masks))
            )
        (ref, r_masks), (query, q_masks) = views
        return self._finish(rng, [-1] * count, query, q_masks, ref, r_masks)

    def _pad(
        self, ids: list[int], query: Tensor, q_masks: Tensor, ref: Tensor, r_masks: Tensor
    ) -> dict[str, Tensor]:
        k, n = self.config.max_classes, len(ids)
        pad = torch.zeros(k - n, *query.shape[1:], dtype=q_masks.dtype)
        ids = ids + [-1] * (k - n)
        return {
            "query": query,
            "query_masks": torch.cat([q_masks, pad]),
            "ref_image": ref,
            "ref_masks": torch.cat([r_masks, pad]),
            "class_mask": torch.arange(k) < n,
            "class_ids": torch.tensor(ids, dtype=torch.long),
        }

    def batch(self, step: int) -> dict[str, Tensor]:
        """This rank's batch for ``step``, stacked along a leading batch axis (masks uint8: see
        :func:`batch_to_device`)."""
        episodes = [self.episode(step, slot) for slot in range(self.batch_size)]
        return {key: torch.stack([e[key] for e in episodes]) for key in episodes[0]}


def batch_to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Move a batch to ``device``, where its uint8 masks become float32.

    Masks are most of an episode's bytes (K of them per image), so they travel as uint8: a quarter of
    float32's traffic through the loader workers' shared memory, pinning and the host-to-device copy.
    """
    out = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    for key in MASK_KEYS:
        out[key] = out[key].float()
    return out


def _merge_slots(
    q_masks: Tensor, r_masks: Tensor, ids: list[int], keep: int, merged: int
) -> tuple[Tensor, Tensor, list[int]]:
    """Slot ``keep`` becomes the union of slots ``keep`` and ``merged`` (which goes) in both mask stacks.

    The union is a task no single class is, so its memory-bank id is −1 (never written to the bank).
    """
    rest = [i for i in range(len(ids)) if i != merged]

    def merge(masks: Tensor) -> Tensor:
        out = masks.clone()
        out[keep] = torch.maximum(masks[keep], masks[merged])
        return out[rest]

    new_ids = [-1 if i == keep else ids[i] for i in rest]
    return merge(q_masks), merge(r_masks), new_ids


class StepDataset(Dataset):
    """Map-style view ``step → batch`` so a DataLoader with workers prefetches future steps and a resume
    just starts the index range at the restored step (the sampler state *is* the step counter)."""

    def __init__(self, sampler: EpisodeSampler, steps: int) -> None:
        self.sampler = sampler
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        return self.sampler.batch(step)
