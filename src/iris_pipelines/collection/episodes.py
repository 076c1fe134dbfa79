"""The episode index: subject-level splits, per-dataset class tables and fixed evaluation episodes.

Every random choice draws from a generator seeded by (seed, purpose, dataset[, case]) and works on sorted
ids, so the index depends only on the manifest's content and the seed: never on row order, and adding a
dataset leaves the other datasets' splits and episodes unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
HELDOUT_SPLITS = ("context", "test")
REQUIRED_COLUMNS = ("dataset", "case_id", "subject_id", "heldout", "labels", "class_voxels")


def _require_number(name: str, value: Any) -> None:
    """YAML reads ``0.2`` as a number but ``"0.2"`` as text, which would fail later in a comparison."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")


@dataclass(frozen=True)
class SplitRatios:
    train: float = 0.6
    val: float = 0.2
    test: float = 0.2

    def __post_init__(self) -> None:
        for name in SPLITS:
            _require_number(f"episodes.ratios.{name}", getattr(self, name))
        values = (self.train, self.val, self.test)
        if min(values) < 0 or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
            raise ValueError(f"episodes.ratios must be non-negative and sum to 1, got {values}")


@dataclass(frozen=True)
class EpisodeParams:
    """``params:episodes``."""

    seed: int = 0
    ratios: SplitRatios = field(default_factory=SplitRatios)
    heldout_context_ratio: float = 0.5
    n_references: int = 3

    def __post_init__(self) -> None:
        _require_number("episodes.heldout_context_ratio", self.heldout_context_ratio)
        for name in ("seed", "n_references"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"episodes.{name} must be a whole number, got {value!r}")
        if not 0 < self.heldout_context_ratio < 1:
            raise ValueError(
                f"episodes.heldout_context_ratio must be in (0, 1), got {self.heldout_context_ratio}"
            )
        if self.n_references < 1:
            raise ValueError(f"episodes.n_references must be >= 1, got {self.n_references}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpisodeParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown episodes parameter(s) {unknown}; expected some of {sorted(known)}")
        values = dict(data)
        if "ratios" in values:
            ratios = values["ratios"]
            # All three or none: a missing one would take its default, and the sum in the error would
            # then hold a number the user never wrote.
            if not isinstance(ratios, Mapping) or set(ratios) != set(SPLITS):
                given = sorted(ratios) if isinstance(ratios, Mapping) else ratios
                raise ValueError(f"episodes.ratios needs exactly the keys {list(SPLITS)}, got {given!r}")
            values["ratios"] = SplitRatios(**ratios)
        return cls(**values)

    @classmethod
    def coerce(cls, params: EpisodeParams | Mapping[str, Any]) -> EpisodeParams:
        return params if isinstance(params, cls) else cls.from_dict(params)


def derived_seed(*parts: object) -> int:
    """A stable 32-bit seed from any parts (Python's hash() is salted per process, so it cannot be used)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``n`` subjects over ``fractions``; when there are at least as many
    subjects as splits, every split with a positive fraction gets one, taken from the largest split."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(fractions):
        for i, fraction in enumerate(fractions):
            if fraction > 0 and counts[i] == 0:
                counts[max(range(len(counts)), key=lambda j: counts[j])] -= 1
                counts[i] = 1
    return counts


def _assign_subjects(
    subjects: Sequence[str], names: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    order = np.random.default_rng(seed).permutation(len(subjects))
    shuffled = [subjects[i] for i in order]
    assignment: dict[str, str] = {}
    start = 0
    for name, count in zip(names, split_counts(len(subjects), fractions), strict=True):
        assignment.update((s, name) for s in shuffled[start : start + count])
        start += count
    return assignment


def _json_map(value: Any) -> dict[str, Any]:
    return dict(json.loads(value) if isinstance(value, str) else value)


def _prepare(manifest: pd.DataFrame) -> pd.DataFrame:
    """Validate and sort the manifest so nothing downstream depends on its row order."""
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"preprocessed_manifest lacks column(s) {missing}")
    table = manifest.loc[:, list(REQUIRED_COLUMNS)].copy()
    for column in ("dataset", "case_id", "subject_id"):
        table[column] = table[column].astype(str)
    table["heldout"] = table["heldout"].astype(bool)
    duplicated = table.duplicated(["dataset", "case_id"])
    if duplicated.any():
        pairs = table.loc[duplicated, ["dataset", "case_id"]].to_numpy().tolist()
        raise ValueError(f"preprocessed_manifest has duplicate (dataset, case_id) rows: {pairs[:5]}")
    mixed = table.groupby("dataset")["heldout"].nunique()
    if (mixed > 1).any():
        raise ValueError(f"datasets mix held-out and training cases: {sorted(mixed[mixed > 1].index)}")
    table["labels"] = table["labels"].map(_json_map)
    table["class_voxels"] = table["class_voxels"].map(_json_map)
    table = table.sort_values(["dataset", "case_id"], kind="stable").reset_index(drop=True)
    _require_one_name_per_label(table)
    return table


def _require_one_name_per_label(table: pd.DataFrame) -> None:
    """Class tables and episodes know a class by its dataset and value, so a value named "liver" in one case
    and "spleen" in another would become one class and pair liver queries with spleen references."""
    for dataset, group in table.groupby("dataset", sort=True):
        first: dict[str, tuple[str, str]] = {}
        for case_id, labels in zip(group["case_id"], group["labels"], strict=True):
            for value, name in labels.items():
                first_name, first_case = first.setdefault(str(value), (str(name), case_id))
                if str(name) != first_name:
                    raise ValueError(
                        f"preprocessed_manifest: dataset {dataset!r} names label {value} {first_name!r} in "
                        f"case {first_case!r} but {str(name)!r} in case {case_id!r}; a label value must name "
                        "one class in every case of a dataset (ingest rejects such cases: re-run it)"
                    )


def assign_splits(table: pd.DataFrame, params: EpisodeParams) -> pd.Series:
    """Split each dataset over its subjects; held-out datasets go to context/test only."""
    ratios = params.ratios
    splits = pd.Series("", index=table.index, dtype=object)
    for dataset, group in table.groupby("dataset", sort=True):
        subjects = sorted(group["subject_id"].unique())
        if bool(group["heldout"].iloc[0]):
            names, fractions = (
                HELDOUT_SPLITS,
                (params.heldout_context_ratio, 1 - params.heldout_context_ratio),
            )
        else:
            names, fractions = SPLITS, (ratios.train, ratios.val, ratios.test)
        if len(subjects) < len(names):
            logger.warning(
                "dataset %s has %d subject(s); some of %s stay empty", dataset, len(subjects), names
            )
        assignment = _assign_subjects(subjects, names, fractions, derived_seed(params.seed, "split", dataset))
        splits[group.index] = group["subject_id"].map(assignment)
    return splits


def class_tables(table: pd.DataFrame) -> dict[str, dict[str, dict[str, Any]]]:
    """Per dataset and label: name, training cases that contain it, and whether no training dataset has
    a class of that name (compared case-insensitively)."""
    declared = {dataset: {} for dataset in table["dataset"].unique()}
    for dataset, labels in zip(table["dataset"], table["labels"], strict=True):
        declared[dataset].update(labels)
    training_datasets = set(table.loc[~table["heldout"], "dataset"])
    seen_in_training = {str(name).strip().lower() for d in training_datasets for name in declared[d].values()}
    train_rows = table[table["split"] == "train"]
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    for dataset in sorted(declared):
        rows = train_rows[train_rows["dataset"] == dataset]
        tables[dataset] = {
            label: {
                "name": str(name),
                "train_cases": int(sum(int(v.get(label, 0)) > 0 for v in rows["class_voxels"])),
                "novel": str(name).strip().lower() not in seen_in_training,
            }
            for label, name in sorted(declared[dataset].items(), key=lambda item: int(item[0]))
        }
    return tables


def _present_classes(case: pd.Series) -> list[int]:
    return sorted(int(label) for label in case["labels"] if int(case["class_voxels"].get(label, 0)) > 0)


def _draw_references(
    query: pd.Series, pool: pd.DataFrame, classes: list[int], k: int, seed: int
) -> list[pd.Series]:
    """k distinct cases of other subjects, seeded, those showing more of the query's classes first.

    The first reference is the one-shot reference, and evaluation scores only the classes it shows: a
    random pick could show none of them when no case shows them all. Ties keep the seeded random order.
    """
    candidates = pool[pool["subject_id"] != query["subject_id"]]
    order = np.random.default_rng(seed).permutation(len(candidates))
    shuffled = [candidates.iloc[i] for i in order]
    wanted = set(classes)
    # sorted() is stable, so cases showing as many query classes stay in the seeded order.
    ranked = sorted(shuffled, key=lambda case: -len(wanted & set(_present_classes(case))))
    return ranked[:k]


def build_episodes(table: pd.DataFrame, params: EpisodeParams) -> list[dict[str, Any]]:
    """One fixed episode per val/test case whose first (one-shot) reference shows one of its classes.

    An episode's ``classes`` are the query's classes that reference shows: evaluation and validation score
    only those, so listing another would promise a score that never comes, and a query none of whose
    classes any reference shows (the first shows the most) would make an episode that scores nothing.
    """
    episodes: list[dict[str, Any]] = []
    skipped = 0
    for dataset, group in table.groupby("dataset", sort=True):
        pool = group[group["split"] == ("context" if bool(group["heldout"].iloc[0]) else "train")]
        for _, query in group[group["split"].isin(["val", "test"])].iterrows():
            present = _present_classes(query)
            seed = derived_seed(params.seed, "episode", dataset, query["case_id"])
            references = _draw_references(query, pool, present, params.n_references, seed) if present else []
            classes = sorted(set(present) & set(_present_classes(references[0]))) if references else []
            if not classes:
                skipped += 1
                continue
            episodes.append(
                {
                    "episode_id": f"{dataset}/{query['case_id']}",
                    "split": str(query["split"]),
                    "dataset": str(dataset),
                    "query": str(query["case_id"]),
                    "references": [str(case["case_id"]) for case in references],
                    "classes": classes,
                    "seed": seed,
                }
            )
    if skipped:
        logger.warning(
            "%d val/test case(s) have no foreground class, no reference, or no reference showing any of "
            "their classes; no episode for them",
            skipped,
        )
    return episodes


def index_checksum(index: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of everything but the checksum."""
    body = {key: value for key, value in index.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_episode_index(
    preprocessed_manifest: pd.DataFrame, params: EpisodeParams | Mapping[str, Any]
) -> dict[str, Any]:
    """The ``episode_index`` contract of docs/data-contracts.md, deterministic in (manifest content, seed)."""
    params = EpisodeParams.coerce(params)
    table = _prepare(preprocessed_manifest)
    table["split"] = assign_splits(table, params)
    cases = [
        {
            "dataset": r.dataset,
            "case_id": r.case_id,
            "subject_id": r.subject_id,
            "split": r.split,
            "heldout": bool(r.heldout),
        }
        for r in table.itertuples(index=False)
    ]
    index: dict[str, Any] = {
        "seed": int(params.seed),
        "cases": cases,
        "classes": class_tables(table),
        "episodes": build_episodes(table, params),
    }
    index["checksum"] = index_checksum(index)
    counts = table["split"].value_counts().to_dict()
    logger.info("episode index: %s cases by split, %d episodes", counts, len(index["episodes"]))
    return index
