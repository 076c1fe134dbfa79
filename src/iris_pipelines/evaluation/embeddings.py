"""Task embeddings per dataset × class from reference cases, plus the memory-bank snapshot.

One row per (reference case, class): the flattened T of that class, encoded from a window centred on that
class alone (each class gets the context it had in training, however far apart the classes lie). Rows
of the memory bank carry ``source == "memory_bank"``. The table is what ``evaluate`` draws its retrieval
pool from and what ``tsne`` maps, so it records where every vector came from: reference case, split, the
model (registry version and weights checksum) and the settings that drew and encoded the references.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from iris_pipelines.inference.strategies import encode_class_windows
from iris_pipelines.model import Iris
from iris_pipelines.training.sampler import CaseRecord

EMBEDDING_COLUMNS = (
    "dataset",
    "label",
    "class_name",
    "heldout",
    "novel",
    "source",
    "case_id",
    "subject_id",
    "split",
    "tokens",
    "dim",
    "embedding",
    "model_uri",
    "model_version",
    "weights_sha256",
    "embed_settings",
)
logger = logging.getLogger(__name__)

REFERENCE_SPLITS = {False: "train", True: "context"}  # seen datasets draw on train, held-out on context


@dataclass(frozen=True)
class ModelInfo:
    """Which model made an embedding or a metric: registry URI/version and the weights' checksum."""

    model_uri: str = ""
    model_version: str = ""
    weights_sha256: str = ""

    @classmethod
    def from_registration(
        cls, registered_model: Mapping[str, Any] | None, weights_sha256: str = ""
    ) -> ModelInfo:
        registered = dict(registered_model or {})
        return cls(
            str(registered.get("model_uri", "")), str(registered.get("version", "")), str(weights_sha256)
        )


def load_arrays(record: CaseRecord) -> tuple[np.ndarray, np.ndarray]:
    """The preprocessed image (float32) and label map of a case, read in full (small on the CPU grid)."""
    return np.load(record.image_path).astype(np.float32), np.load(record.label_path)


def as_tensor(image: np.ndarray) -> Tensor:
    """[z, y, x] array → (1, 1, D, H, W) float tensor."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]


@torch.no_grad()
def class_embeddings(
    model: Iris, image: np.ndarray, label: np.ndarray, classes: Sequence[int], roi_size: Sequence[int]
) -> Tensor:
    """T (1, K, m+1, C) of one reference, each class encoded from a window centred on that class.

    Raises ``ValueError`` naming the class when the reference does not contain it.
    """

    def masks() -> Iterator[Tensor]:
        for label_value in classes:
            mask = torch.from_numpy(label == label_value)[None, None].float()
            if not bool(mask.any()):
                raise ValueError(f"the reference has no voxel of class {label_value}")
            yield mask

    return encode_class_windows(model, as_tensor(image), masks(), roi_size)


def reference_cases(
    episode_index: Mapping[str, Any],
    records: Mapping[tuple[str, str], CaseRecord],
    dataset: str,
    heldout: bool,
) -> list[CaseRecord]:
    """The reference pool of a dataset: its train cases (seen) or context cases (held-out), by case id.

    Raises ``KeyError`` for a pool case that ``records`` (the preprocessed manifest) lacks, as the train
    pipeline does: the two were made from different data (a newer preprocess rejected the case), and
    skipping it would quietly draw references from another pool, or none, than the model was evaluated on.
    """
    split = REFERENCE_SPLITS[bool(heldout)]
    cases = []
    for case in episode_index["cases"]:
        if case["dataset"] != dataset or case["split"] != split:
            continue
        key = (case["dataset"], case["case_id"])
        if key not in records:
            raise KeyError(
                f"episode_index {split} case {key} is missing from preprocessed_manifest: the index was "
                "built from other preprocessed data; re-run episodes on this manifest (kedro run "
                "--pipelines=episodes), or load the manifest version the index was built from "
                "(--load-versions=preprocessed_manifest:<version>)"
            )
        cases.append(records[key])
    return sorted(cases, key=lambda record: record.case_id)


def _dataset_heldout(episode_index: Mapping[str, Any]) -> dict[str, bool]:
    return {c["dataset"]: bool(c["heldout"]) for c in episode_index["cases"]}


def build_task_embeddings(
    model: Iris,
    class_ids: Mapping[str, int],
    episode_index: Mapping[str, Any],
    records: Mapping[tuple[str, str], CaseRecord],
    *,
    references_per_class: int,
    roi_size: Sequence[int],
    seed: int,
    model_info: ModelInfo,
) -> pd.DataFrame:
    """Per dataset × class: up to ``references_per_class`` reference embeddings (drawn with ``seed`` from
    the reference pool of cases that contain the class) and the memory-bank row of seen classes."""
    if references_per_class < 1:
        raise ValueError(f"references_per_class must be >= 1, got {references_per_class}")
    model.eval()
    heldout_of = _dataset_heldout(episode_index)
    rows: list[dict[str, Any]] = []
    tokens, dim = model.config.num_tokens, model.config.embed_dim
    settings = {
        "references_per_class": references_per_class,
        "roi_size": [int(v) for v in roi_size],
        "seed": seed,
        # resolved (cuda:0, not auto): iris review --reproduce re-embeds there, or says it cannot, as a
        # GPU's embeddings differ from the CPU's in the last bits
        "device": str(next(model.parameters()).device),
    }
    provenance = {
        "model_uri": model_info.model_uri,
        "model_version": model_info.model_version,
        "weights_sha256": model_info.weights_sha256,
        "tokens": tokens,
        "dim": dim,
        # A later evaluation records these, not whatever params:embed_tasks says by then (JSON: parquet
        # keeps a string column, where DataFrame.attrs may not survive every copy of the table).
        "embed_settings": json.dumps(settings, sort_keys=True),
    }
    for dataset in sorted(episode_index["classes"]):
        heldout = heldout_of.get(dataset, False)
        pool = reference_cases(episode_index, records, dataset, heldout)
        for label_key, info in sorted(episode_index["classes"][dataset].items(), key=lambda kv: int(kv[0])):
            label = int(label_key)
            common = {
                "dataset": dataset,
                "label": label,
                "class_name": str(info["name"]),
                "heldout": heldout,
                "novel": bool(info.get("novel", False)),
            }
            holders = [case for case in pool if label in case.bboxes]
            if not holders:  # evaluate's retrieval and tsne then have no reference of this class
                logger.warning(
                    "task_embeddings: no %s case of dataset %s holds class %s (%s): it gets no reference "
                    "embedding, so evaluate's retrieval and the t-SNE map go without it",
                    REFERENCE_SPLITS[heldout], dataset, label, info["name"],
                )  # fmt: skip
            rng = np.random.default_rng([seed, label, *dataset.encode()])
            chosen = [holders[i] for i in sorted(rng.permutation(len(holders))[:references_per_class])]
            for case in chosen:
                image, label_map = load_arrays(case)
                embedding = class_embeddings(model, image, label_map, [label], roi_size)[0, 0]
                rows.append(
                    {
                        **common,
                        **provenance,
                        "source": "reference",
                        "case_id": case.case_id,
                        "subject_id": case.subject_id,
                        "split": REFERENCE_SPLITS[heldout],
                        "embedding": embedding.flatten().float().cpu().numpy(),
                    }
                )
            key = f"{dataset}/{label}"
            slot = class_ids.get(key)
            if slot is not None and model.config.memory_bank_size and bool(model.bank_initialized[slot]):
                rows.append(
                    {
                        **common,
                        **provenance,
                        "source": "memory_bank",
                        "case_id": "",
                        "subject_id": "",
                        "split": "train",
                        "embedding": model.memory_bank[slot].flatten().float().cpu().numpy(),
                    }
                )
    return pd.DataFrame(rows, columns=list(EMBEDDING_COLUMNS))


def embedding_settings(table: pd.DataFrame) -> dict[str, Any] | None:
    """The settings that made a task_embeddings table, or None when it does not record one set of them
    (written before they were stored, or rows of several embed_tasks runs put together)."""
    if "embed_settings" not in table.columns:
        return None
    recorded = table["embed_settings"].dropna().unique()
    return json.loads(recorded[0]) if len(recorded) == 1 else None


def foreign_weights(table: pd.DataFrame, weights_sha256: str) -> list[str]:
    """The weights checksums of the models that made ``table``'s rows, when any is not ``weights_sha256``
    (an embedding is only meaningful to the network that encoded it); empty when the table fits or either
    side records none."""
    made_by = sorted({str(v) for v in table.get("weights_sha256", pd.Series(dtype=str)).dropna() if str(v)})
    return made_by if weights_sha256 and made_by and made_by != [weights_sha256] else []


def embedded_roi_size(table: pd.DataFrame) -> tuple[int, ...] | None:
    """The reference window (voxels) ``table``'s embeddings were encoded from, when it records one."""
    settings = embedding_settings(table)
    if not settings or "roi_size" not in settings:
        return None
    return tuple(int(v) for v in settings["roi_size"])


def embedding_tensor(row: Mapping[str, Any]) -> Tensor:
    """One table row's embedding back to its (m+1, C) shape."""
    values = np.array(row["embedding"], dtype=np.float32)  # a copy: parquet hands back read-only arrays
    return torch.from_numpy(values.reshape(int(row["tokens"]), int(row["dim"])))


def embedding_summary(table: pd.DataFrame) -> dict[str, Any]:
    """Counts for logs and MLflow: rows per source and the datasets × classes covered."""
    return {
        "rows": int(len(table)),
        "by_source": {str(k): int(v) for k, v in table["source"].value_counts().sort_index().items()},
        "classes": int(table[["dataset", "label"]].drop_duplicates().shape[0]),
        "reference_cases": json.loads(
            table[table.source == "reference"].groupby("dataset")["case_id"].nunique().to_json()
        ),
    }
