"""Evaluation of every inference strategy and both baselines on the fixed test episodes.

Predictions are made on the preprocessed (canonical) grid, sent back to each query's original grid and
header, and scored there against the label file as the user has it, with its own spacing (DESIGN.md,
"Geometry"). Every metric row says which episode, strategy, class and model it belongs to, so summaries
and reviews can be recomputed from the table alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from torch import Tensor
from tqdm.auto import tqdm

from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.io import file_sha256, read_image
from iris_pipelines.imaging.metrics import MaskMetrics, label_map_metrics, spacing_from_image
from iris_pipelines.imaging.registration import (
    RegistrationConfig,
    RegistrationError,
    array_to_image,
    paste_label,
    registration_baseline,
)
from iris_pipelines.imaging.resample import as_label
from iris_pipelines.inference.device import resolve_device
from iris_pipelines.inference.sliding_window import sliding_window_segment
from iris_pipelines.inference.strategies import (
    SELF_CHECK_DICE,
    STRATEGIES,
    TUNING_LR,
    TUNING_STEPS,
    context_ensemble,
    crop_reference,
    memory_bank_gaps,
    memory_bank_task,
    reference_self_dice,
    retrieval_task,
    tune_task_embedding,
)
from iris_pipelines.inference.volume import CanonicalVolume, label_map_logits, to_original_grid
from iris_pipelines.model import Iris
from iris_pipelines.model.config import config_from_dict
from iris_pipelines.training.sampler import CaseRecord

from .embeddings import (
    ModelInfo,
    as_tensor,
    class_embeddings,
    embedded_roi_size,
    embedding_tensor,
    foreign_weights,
    load_arrays,
)

logger = logging.getLogger(__name__)

BASELINES = ("paste", "registration")
GROUPS = ("seen", "heldout", "novel")
# ``checked``: one-shot, and for each class the reference check flags (its reference, segmented with its
# own embedding, shows it with a Dice below SELF_CHECK_DICE) the reference mask propagated by registration.
# Decided from the reference alone, as `iris segment --strategy checked` decides it; it needs SimpleITK, so
# it lives here rather than among the torch-only STRATEGIES.
EVALUATE_STRATEGIES = (*STRATEGIES, "checked")


class ReferenceLeakError(ValueError):
    """An episode would use the query (or another scan of the same subject) as its own reference."""


@dataclass(frozen=True)
class EvaluateParams:
    """``params:evaluate``. Strategies follow the paper (§3.3); the baselines are the bar to clear."""

    strategies: tuple[str, ...] = EVALUATE_STRATEGIES
    baselines: tuple[str, ...] = BASELINES
    roi_size: tuple[int, int, int] = (64, 64, 64)  # sliding window and reference windows, in voxels
    overlap: float = 0.5
    threshold: float = 0.5
    retrieval_top_k: int = 2
    tuning_steps: int = TUNING_STEPS
    tuning_lr: float = TUNING_LR
    nsd_tolerance_mm: float = 2.0  # per-class overrides by class name below
    class_tolerance_mm: dict[str, float] = field(default_factory=dict)
    registration: dict[str, Any] = field(default_factory=dict)  # RegistrationConfig fields
    splits: tuple[str, ...] = ("test",)
    # auto: the GPU when there is one. The results then differ from a CPU run's in the last bits, which
    # `iris review --reproduce` reports; conf/base keeps cpu so make run reproduces byte for byte.
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", tuple(self.strategies))
        object.__setattr__(self, "baselines", tuple(self.baselines))
        object.__setattr__(self, "roi_size", tuple(int(v) for v in self.roi_size))
        object.__setattr__(self, "splits", tuple(self.splits))
        unknown = [s for s in self.strategies if s not in EVALUATE_STRATEGIES]
        unknown += [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(
                f"unknown strategies/baselines {unknown}; strategies: {EVALUATE_STRATEGIES}, baselines: "
                f"{BASELINES}"
            )
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be 3 positive ints, got {self.roi_size}")
        if self.retrieval_top_k < 1 or self.tuning_steps < 0:
            raise ValueError("retrieval_top_k must be >= 1 and tuning_steps >= 0")
        RegistrationConfig(**self.registration)  # fail at start-up, not after an hour of inference
        resolve_device(self.device)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluateParams:
        return config_from_dict(cls, dict(data))

    def tolerance(self, class_name: str) -> float:
        return float(self.class_tolerance_mm.get(class_name, self.nsd_tolerance_mm))


def check_references(episode: Mapping[str, Any], subjects: Mapping[tuple[str, str], str]) -> None:
    """Refuse an episode whose references include its query, or another scan of the query's subject.

    Evaluating with the query's own label as context would report memorisation as in-context learning;
    the episode builder already prevents it, and this guard keeps a hand-edited index from sneaking it in.
    """
    dataset, query = episode["dataset"], episode["query"]
    query_subject = subjects.get((dataset, query))
    for reference in episode["references"]:
        if reference == query:
            raise ReferenceLeakError(
                f"episode {episode['episode_id']}: the query {query} is its own reference"
            )
        if query_subject is not None and subjects.get((dataset, reference)) == query_subject:
            raise ReferenceLeakError(
                f"episode {episode['episode_id']}: reference {reference} is the same subject "
                f"({query_subject}) as the query {query}"
            )


@dataclass
class _Episode:
    """Everything about one test episode that the strategies share."""

    info: Mapping[str, Any]
    heldout: bool
    query: CaseRecord
    references: list[CaseRecord]
    reference_arrays: list[tuple[np.ndarray, np.ndarray]]  # (image, label) per reference, read once
    classes: list[int]
    class_names: dict[int, str]
    novel: dict[int, bool]
    image: np.ndarray
    grid: Geometry
    original: Geometry
    truth: np.ndarray
    spacing: tuple[float, ...]


def _geometry(value: Any) -> Geometry:
    return Geometry.from_dict(json.loads(value) if isinstance(value, str) else dict(value))


def _truth_labels(image: sitk.Image, path: str) -> np.ndarray:
    """The truth label map as integers, as the metrics need.

    Ingest accepts float label files that hold whole numbers (many public datasets ship 0.0/1.0 maps), so
    such a case is scored rather than stopping the run.
    """
    try:
        return sitk.GetArrayFromImage(as_label(image))
    except ValueError as exc:
        raise InvalidInputError(path, "non_integer_label", f"{exc}; then re-run ingest") from None


def _require_label_as_preprocessed(path: str, recorded_sha256: str) -> None:
    """Refuse a truth file whose bytes differ from the checksum the manifest recorded for it.

    The episode's classes and the references' masks come from the file as ingest and preprocess saw it:
    scoring an edited file against them would silently mix two versions of the truth.
    """
    on_disk = file_sha256(path)
    if on_disk != recorded_sha256:
        raise InvalidInputError(
            path,
            "stale_manifest",
            f"the label file changed after preprocessing (sha256 {recorded_sha256[:12]} in the manifest, "
            f"{on_disk[:12]} on disk): the preprocessed manifest is stale; re-run ingest, preprocess and "
            "episodes",
        )


def _load_episode(
    episode: Mapping[str, Any],
    episode_index: Mapping[str, Any],
    records: Mapping[tuple[str, str], CaseRecord],
    rows: Mapping[tuple[str, str], Mapping[str, Any]],
    heldout_of: Mapping[str, bool],
) -> _Episode:
    dataset = episode["dataset"]
    absent = [case for case in (episode["query"], *episode["references"]) if (dataset, case) not in records]
    if absent:
        raise ValueError(f"case(s) {absent} of dataset {dataset} are not in the preprocessed manifest")
    query = records[(dataset, episode["query"])]
    references = [records[(dataset, case)] for case in episode["references"]]
    # The label file first: one edited or broken since preprocessing explains any disagreement below.
    table = episode_index["classes"][dataset]
    row = rows[(dataset, query.case_id)]
    label_path = str(row["label_path"])
    _require_label_as_preprocessed(label_path, str(row["label_sha256"]))
    truth_image = read_image(label_path, verify=False)  # verify=False: the bytes are the ones ingest checked
    truth = _truth_labels(truth_image, label_path)
    classes = [
        int(c) for c in episode["classes"] if int(c) in query.bboxes and int(c) in references[0].bboxes
    ]
    if not classes:
        # The episode builder lists only classes both show, so the manifest is not the one the index was
        # built from (e.g. re-preprocessed at a spacing that loses a small class): a failure, not a skip.
        raise ValueError(
            f"none of the episode's classes {[int(c) for c in episode['classes']]} is in both its query "
            f"{query.case_id} (holds {sorted(query.bboxes)}) and its first reference {references[0].case_id} "
            f"(holds {sorted(references[0].bboxes)}) in this preprocessed manifest; the episode index was "
            "built from another one: re-run episodes (kedro run --pipelines=episodes) after preprocess"
        )
    missing = [int(c) for c in episode["classes"] if int(c) not in query.bboxes]
    if missing:
        logger.warning(
            "episode %s: class(es) %s are not scored: its query %s does not hold them in this preprocessed "
            "manifest (the episode index was built from another one)",
            episode["episode_id"], missing, query.case_id,
        )  # fmt: skip
    unscored = [int(c) for c in episode["classes"] if int(c) in query.bboxes and int(c) not in classes]
    if unscored:  # every method is scored on the same classes, and one-shot and paste need reference 0
        logger.warning(
            "episode %s: class(es) %s of the query are not scored: its first reference %s does not show them",
            episode["episode_id"], unscored, references[0].case_id,
        )  # fmt: skip
    image, _ = load_arrays(query)
    return _Episode(
        info=episode,
        heldout=bool(heldout_of.get(dataset, False)),
        query=query,
        references=references,
        reference_arrays=[load_arrays(reference) for reference in references],
        classes=classes,
        class_names={c: str(table[str(c)]["name"]) for c in classes},
        novel={c: bool(table[str(c)].get("novel", False)) for c in classes},
        image=image,
        grid=_geometry(row["preprocessed_geometry"]),
        original=_geometry(row["original_geometry"]),
        truth=truth,
        spacing=spacing_from_image(truth_image),
    )


def _to_original(logits: Tensor, episode: _Episode, threshold: float) -> np.ndarray:
    """Canonical-grid logits as a label map on the query's original grid, an array like the label file's.

    Exported as ``iris segment`` exports (:func:`~iris_pipelines.inference.volume.to_original_grid`), so
    the metrics describe what a user gets; baselines' label maps go through it as certain logits.
    """
    volume = CanonicalVolume(episode.image, episode.original, episode.grid)
    restored = sitk.GetArrayFromImage(
        to_original_grid(logits, volume, episode.classes, threshold=threshold).labels
    )
    if restored.shape != episode.truth.shape:
        raise ValueError(
            f"{episode.query.case_id}: prediction restored to {restored.shape} but the label file holds "
            f"{episode.truth.shape}; the label and image grids differ"
        )
    return restored.astype(np.int32)


def _reference_pool(model: Iris, episode: _Episode, roi: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(N, K, m+1, C) embeddings of the episode's references and the (N, K) table of who holds what."""
    classes = episode.classes
    embeddings, valid = [], []
    for reference, (image, label) in zip(episode.references, episode.reference_arrays, strict=True):
        present = [c for c in classes if c in reference.bboxes]
        slots = torch.zeros(1, len(classes), model.config.num_tokens, model.config.embed_dim)
        if present:
            encoded = class_embeddings(model, image, label, present, roi)
            for index, value in enumerate(present):
                slots[0, classes.index(value)] = encoded[0, index]
        embeddings.append(slots)
        valid.append(torch.tensor([c in present for c in classes]))
    return torch.cat(embeddings), torch.stack(valid)


def _table_pool(embeddings: pd.DataFrame, episode: _Episode) -> tuple[Tensor, Tensor]:
    """The retrieval pool from ``task_embeddings``: the dataset's references, never the query subject's."""
    rows = embeddings[
        (embeddings["source"] == "reference")
        & (embeddings["dataset"] == episode.query.dataset)
        & (embeddings["subject_id"] != episode.query.subject_id)
        & (embeddings["case_id"] != episode.query.case_id)
    ]
    cases = sorted(rows["case_id"].unique())
    if not cases:
        raise ValueError(f"task_embeddings hold no reference of {episode.query.dataset} besides the query")
    first = rows.iloc[0]
    pool = torch.zeros(len(cases), len(episode.classes), int(first["tokens"]), int(first["dim"]))
    valid = torch.zeros(len(cases), len(episode.classes), dtype=torch.bool)
    for row in rows.to_dict("records"):
        if int(row["label"]) in episode.classes:
            n, k = cases.index(row["case_id"]), episode.classes.index(int(row["label"]))
            pool[n, k], valid[n, k] = embedding_tensor(row), True
    return pool, valid


def _bank_key(episode: _Episode, label: int) -> str:
    """The ``dataset/label`` key of a class in the model bundle's ``class_ids``."""
    return f"{episode.query.dataset}/{label}"


class _Shared:
    """Results that several methods of one episode use, each computed once.

    ``checked`` is one-shot plus registration where the reference check flags a class: it reuses the
    ``one_shot`` and ``registration`` predictions and the check the other rows already needed. A method
    that reuses a result is charged the seconds it took, so ``seconds`` stays what the method costs a user
    who runs it alone (``iris segment --strategy checked`` does all three).
    """

    def __init__(self) -> None:
        self._done: dict[str, tuple[Any, float]] = {}
        self.charged = 0.0  # seconds of reused results since the caller last reset it

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        if name in self._done:
            value, seconds = self._done[name]
            self.charged += seconds
            return value
        started = time.perf_counter()
        value = compute()
        self._done[name] = (value, time.perf_counter() - started)
        return value


class _Runner:
    """One episode's predictions, strategy by strategy, each canonical-grid logits (1, K, D, H, W)."""

    def __init__(
        self,
        model: Iris,
        class_ids: Mapping[str, int],
        embeddings: pd.DataFrame,
        params: EvaluateParams,
        rows_by_case: Mapping[tuple[str, str], Mapping[str, Any]],
    ) -> None:
        self.model, self.class_ids, self.embeddings, self.params = model, class_ids, embeddings, params
        self.rows_by_case = rows_by_case

    def segment(self, query: Tensor, task: Tensor) -> Tensor:
        return sliding_window_segment(
            self.model, query, task, roi_size=self.params.roi_size, overlap=self.params.overlap
        )

    def predictions(
        self, episode: _Episode, shared: _Shared
    ) -> tuple[dict[str, Callable[[], Tensor]], dict[int, float]]:
        """The episode's methods, and the Dice of each class in its reference check (:meth:`reference_check`,
        which ``checked`` decides by). The methods must not modify the logits they return: ``shared``
        hands the same tensors to the methods that reuse them."""
        p, classes = self.params, episode.classes
        query = as_tensor(episode.image)
        pool, valid = _reference_pool(self.model, episode, p.roi_size)
        first = pool[:1]  # every scored class is in the first reference (see _load_episode)

        def check() -> dict[int, float]:
            return shared.get("reference_check", lambda: self.reference_check(episode, first))

        def one_shot() -> Tensor:
            return shared.get("one_shot", lambda: self.segment(query, first))

        def ensemble() -> Tensor:
            usable = valid.any(dim=1)
            return self.segment(query, context_ensemble(pool[usable], valid[usable]))

        def memory_bank() -> Tensor:
            missing = self.unpredictable("memory_bank", episode)
            banked = [c for c in classes if c not in missing]
            # The classes the bank lacks stay empty (their rows carry the reason); the others are scored.
            logits = label_map_logits(np.zeros(episode.image.shape, np.uint8), classes)
            if banked:
                task = memory_bank_task(self.model, self.class_ids, [_bank_key(episode, c) for c in banked])
                logits[:, [classes.index(c) for c in banked]] = self.segment(query, task)
            return logits

        def retrieval() -> Tensor:
            table_pool, table_valid = _table_pool(self.embeddings, episode)
            generator = torch.Generator().manual_seed(int(episode.info.get("seed", 0)))
            result = retrieval_task(
                self.model,
                query,
                table_pool,
                p.retrieval_top_k,
                valid=table_valid,
                generator=generator,
                segment_fn=partial(
                    sliding_window_segment, self.model, roi_size=p.roi_size, overlap=p.overlap
                ),
                roi_size=p.roi_size,
                threshold=p.threshold,
            )
            return self.segment(query, result.task)

        def tuning() -> Tensor:
            image, label = episode.reference_arrays[0]
            masks = torch.from_numpy(np.stack([label == c for c in classes]))[None].float()
            crop_image, crop_masks = crop_reference(as_tensor(image), masks, p.roi_size)
            holds = crop_masks.flatten(2).sum(dim=2)[0] > 0
            tuned = tune_task_embedding(
                self.model, first, [(crop_image, crop_masks)], steps=p.tuning_steps, lr=p.tuning_lr,
                class_mask=holds,
            )  # fmt: skip
            return self.segment(query, tuned.task)

        def paste() -> Tensor:
            _, label = episode.reference_arrays[0]
            return label_map_logits(paste_label(label, episode.image.shape), classes)

        def register() -> Tensor:
            reference = episode.references[0]
            image, label = episode.reference_arrays[0]
            grid = _geometry(self._row(reference)["preprocessed_geometry"])
            propagated = registration_baseline(
                array_to_image(episode.image, episode.grid),
                array_to_image(image, grid),
                array_to_image(label.astype(np.uint8), grid),
                RegistrationConfig(**p.registration),
                case=f"{episode.info['episode_id']} (reference {reference.case_id})",
            )
            return label_map_logits(sitk.GetArrayFromImage(propagated), classes)

        def registration() -> Tensor:
            return shared.get("registration", register)

        def checked() -> Tensor:
            dice = check()
            logits = one_shot().clone()
            flagged = [k for k, c in enumerate(classes) if not dice[c] >= SELF_CHECK_DICE]
            if flagged:
                logits[:, flagged] = registration()[:, flagged].to(logits.device)
            return logits

        methods = {
            "checked": checked,
            "one_shot": one_shot,
            "ensemble": ensemble,
            "memory_bank": memory_bank,
            "retrieval": retrieval,
            "tuning": tuning,
            "paste": paste,
            "registration": registration,
        }
        return {name: methods[name] for name in self.method_names(episode.heldout)}, check()

    def reference_check(self, episode: _Episode, task: Tensor) -> dict[int, float]:
        """Dice of each class of the first reference segmented with its own one-shot embedding ``task``:
        the reference check of ``iris segment``, scored here so the report shows how well it predicts the
        query's one-shot Dice."""
        image, label = episode.reference_arrays[0]
        masks = torch.from_numpy(np.stack([label == c for c in episode.classes]))[None]
        dice = reference_self_dice(self.segment(as_tensor(image), task), masks, self.params.threshold)
        return dict(zip(episode.classes, dice.tolist(), strict=True))

    def method_names(self, heldout: bool) -> list[str]:
        """The strategies and baselines an episode is scored with."""
        wanted = [*self.params.strategies, *self.params.baselines]
        if heldout and "memory_bank" in wanted:
            wanted.remove("memory_bank")  # held-out classes were never trained: the bank has no row for them
        return wanted

    def unpredictable(self, method: str, episode: _Episode) -> dict[int, str]:
        """The episode's classes ``method`` cannot segment, each with the reason; they are left empty."""
        if method != "memory_bank":
            return {}
        keys = {c: _bank_key(episode, c) for c in episode.classes}
        gaps = memory_bank_gaps(self.model, self.class_ids, list(keys.values()))
        return {c: gaps[key] for c, key in keys.items() if key in gaps}

    def _row(self, record: CaseRecord) -> Mapping[str, Any]:
        return self.rows_by_case[(record.dataset, record.case_id)]


METRIC_COLUMNS = (
    "episode_id", "dataset", "query", "subject_id", "references", "method", "kind", "class_name", "heldout",
    "novel", "label", *(item.name for item in fields(MaskMetrics)), "reference_check_dice", "seconds",
    "error", "model_uri", "model_version", "weights_sha256",
)  # fmt: skip
"""The columns of ``evaluation_metrics``, also when no episode could be scored. ``subject_id`` is the
query's subject: episodes of one subject are correlated, so the report's intervals resample subjects.
``reference_check_dice`` (the same on every method's row of an episode × class) is the Dice of the class
in the first reference segmented with its own one-shot embedding."""

# What a bad episode raises: a missing, unreadable or edited file (InvalidInputError is a ValueError, a
# missing .npy an OSError), a query or class absent from the manifest (KeyError), a tensor that cannot be
# encoded (RuntimeError). The episode is recorded with the error and the others are still scored.
EPISODE_FAILURES = (ValueError, KeyError, OSError, RuntimeError)


class EvaluationError(RuntimeError):
    """No episode could be scored: an empty report would read as a result, so the stage stops."""


def failure_reason(failure: BaseException) -> str:
    """The message of an exception; a KeyError's without the quotes ``str(KeyError)`` wraps it in."""
    if isinstance(failure, KeyError) and failure.args:
        return str(failure.args[0])
    return str(failure)


@dataclass(frozen=True)
class _RowContext:
    """What every metric row of one episode shares."""

    info: Mapping[str, Any]
    subject_id: str
    heldout: bool
    model_info: ModelInfo

    def row(
        self,
        method: str,
        label: int,
        class_name: str,
        novel: bool,
        metrics: Mapping[str, Any],
        seconds: float,
        error: str,
        reference_check_dice: float = float("nan"),
    ) -> dict[str, Any]:
        return {
            "episode_id": self.info["episode_id"],
            "dataset": self.info["dataset"],
            "query": self.info["query"],
            "subject_id": self.subject_id,
            "references": ",".join(self.info["references"]),
            "method": method,
            "kind": "baseline" if method in BASELINES else "iris",
            "class_name": class_name,
            "heldout": self.heldout,
            "novel": novel,
            "label": label,
            **metrics,
            "reference_check_dice": reference_check_dice,
            "seconds": seconds,
            "error": error,
            "model_uri": self.model_info.model_uri,
            "model_version": self.model_info.model_version,
            "weights_sha256": self.model_info.weights_sha256,
        }


def _score_episode(
    episode: _Episode, runner: _Runner, params: EvaluateParams, context: _RowContext
) -> list[dict[str, Any]]:
    """Metric rows of every method × class of one loaded episode.

    A method that fails is recorded with its ``error`` and an empty prediction, so the table still shows
    what a user would have got; anything else that fails propagates, to fail the whole episode.
    """
    tolerances = {c: params.tolerance(episode.class_names[c]) for c in episode.classes}
    shared = _Shared()
    with torch.no_grad():
        methods, check_dice = runner.predictions(episode, shared)
    out = []
    for name, predict in methods.items():
        started, error = time.perf_counter(), ""
        shared.charged = 0.0
        try:
            # tuning needs gradients for T; everything else runs without autograd
            with torch.no_grad() if name != "tuning" else contextlib.nullcontext():
                prediction = predict()
        except (RegistrationError, ValueError, KeyError) as failure:
            error = failure_reason(failure)
            logger.warning("episode %s, %s failed: %s", episode.info["episode_id"], name, error)
            prediction = label_map_logits(np.zeros(episode.image.shape, np.uint8), episode.classes)
        seconds = time.perf_counter() - started + shared.charged
        unpredictable = {} if error else runner.unpredictable(name, episode)
        for label, reason in unpredictable.items():
            logger.warning(
                "episode %s, %s cannot segment class %s: %s", episode.info["episode_id"], name, label, reason
            )
        restored = _to_original(prediction, episode, params.threshold)
        scored = label_map_metrics(restored, episode.truth, episode.spacing, episode.classes, tolerances)
        for row in scored:
            label = int(row.pop("label"))
            class_error = error or unpredictable.get(label, "")
            out.append(
                context.row(
                    name,
                    label,
                    episode.class_names[label],
                    episode.novel[label],
                    row,
                    seconds,
                    class_error,
                    check_dice[label],
                )  # fmt: skip
            )
    return out


def _failed_episode_rows(
    info: Mapping[str, Any],
    episode_index: Mapping[str, Any],
    records: Mapping[tuple[str, str], CaseRecord],
    methods: Sequence[str],
    context: _RowContext,
    error: str,
) -> list[dict[str, Any]]:
    """Rows of an episode that could not be scored: every method × class it would have had, metrics empty.

    The classes are those the episode would have scored when its query and first reference are known and
    share one, else the classes it lists (a query missing from the manifest has no class table to consult).
    """
    dataset = info["dataset"]
    query = records.get((dataset, info["query"]))
    first = records.get((dataset, info["references"][0])) if info["references"] else None
    listed = [int(c) for c in info["classes"]]
    shared = [c for c in listed if c in query.bboxes and c in first.bboxes] if query and first else []
    classes = shared or listed
    table = episode_index.get("classes", {}).get(dataset, {})
    unscored = dict.fromkeys(item.name for item in fields(MaskMetrics))
    rows = []
    for method in methods:
        for label in classes:
            entry = table.get(str(label), {})
            name, novel = str(entry.get("name", label)), bool(entry.get("novel", False))
            rows.append(context.row(method, label, name, novel, unscored, float("nan"), error))
    return rows


def evaluate_episodes(
    model: Iris,
    class_ids: Mapping[str, int],
    episode_index: Mapping[str, Any],
    manifest: pd.DataFrame,
    records: Mapping[tuple[str, str], CaseRecord],
    embeddings: pd.DataFrame,
    params: EvaluateParams,
    model_info: ModelInfo,
) -> pd.DataFrame:
    """Metric rows (episode × strategy × class) for every fixed episode of ``params.splits``.

    A strategy that fails on an episode (e.g. registration that does not converge) is logged and recorded
    with an ``error`` and an empty prediction, so the table still shows what a user would have got. An
    episode that cannot be scored at all (its label file missing, unreadable or edited since preprocessing,
    its query absent from the manifest) is logged and recorded with the ``error`` on every method × class
    row and empty metrics, and the other episodes are still scored; when none can be, the stage fails.
    ``embeddings`` (retrieval's pool) must come from the evaluated model: a table embedded by an earlier
    model is refused, not silently mixed into the new model's numbers.
    """
    made_by = foreign_weights(embeddings, model_info.weights_sha256)
    if made_by:
        raise ValueError(
            f"task_embeddings were made by the model(s) with weights {[m[:12] for m in made_by]}, but the "
            f"evaluated model's weights are {model_info.weights_sha256[:12]}: re-run embed_tasks with this "
            "model (kedro run --pipelines=embed_tasks,evaluate)"
        )
    embedded_roi = embedded_roi_size(embeddings)
    if "retrieval" in params.strategies and embedded_roi not in (None, params.roi_size):
        # Retrieval ranks the table's embeddings against the query's own, encoded from evaluate's windows:
        # embeddings of another window size are other tasks, and its figures would not compare.
        raise ValueError(
            f"task_embeddings were encoded from {list(embedded_roi)}-voxel reference windows, but "
            f"evaluate.roi_size is {list(params.roi_size)}: retrieval would rank embeddings of two window "
            "sizes; give embed_tasks.roi_size the same value and re-run embed_tasks (kedro run "
            "--pipelines=embed_tasks,evaluate), or leave retrieval out of evaluate.strategies"
        )
    if "label_sha256" not in manifest.columns:
        raise ValueError(
            "preprocessed_manifest has no label_sha256 column, so the label files cannot be checked against "
            "what was preprocessed; re-run preprocess"
        )
    model.eval()
    rows_by_case = {(r["dataset"], r["case_id"]): r for r in manifest.to_dict("records")}
    subjects = {(c["dataset"], c["case_id"]): c["subject_id"] for c in episode_index["cases"]}
    heldout_of = {c["dataset"]: bool(c["heldout"]) for c in episode_index["cases"]}
    runner = _Runner(model, class_ids, embeddings, params, rows_by_case)
    episodes = [e for e in episode_index["episodes"] if e["split"] in params.splits]
    for episode in episodes:
        check_references(episode, subjects)
    out: list[dict[str, Any]] = []
    failed: dict[str, str] = {}  # episode id → why it could not be scored
    scored_episodes = 0
    for info in tqdm(episodes, desc="evaluate", unit="episode"):
        heldout = bool(heldout_of.get(info["dataset"], False))
        context = _RowContext(
            info, str(subjects.get((info["dataset"], info["query"]), "")), heldout, model_info
        )
        try:
            episode = _load_episode(info, episode_index, records, rows_by_case, heldout_of)
            out.extend(_score_episode(episode, runner, params, context))
            scored_episodes += 1
        except EPISODE_FAILURES as failure:
            failed[info["episode_id"]] = reason = failure_reason(failure)
            logger.warning(
                "episode %s could not be scored, recorded with its error: %s", info["episode_id"], reason
            )
            methods = runner.method_names(heldout)
            out.extend(_failed_episode_rows(info, episode_index, records, methods, context, reason))
    if failed and not scored_episodes:
        listed = "; ".join(f"{episode}: {reason}" for episode, reason in list(failed.items())[:5])
        raise EvaluationError(
            f"none of the {len(failed)} evaluated episode(s) could be scored ({listed}"
            f"{'; …' if len(failed) > 5 else ''})"
        )
    return pd.DataFrame(out, columns=list(METRIC_COLUMNS))
