"""A small on-disk collection of .npy volumes plus its manifest and episode index, built directly
(no ingest/preprocess) so the training tests stay fast. Shapes straddle the 32³ crop to exercise padding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from iris_pipelines.collection.episodes import build_episode_index
from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.io import file_sha256

# dataset -> (labels, held-out, subjects, cases per subject)
DATASETS = {
    "alpha": ({"1": "liver", "2": "spleen"}, False, 6, 1),
    "beta": ({"1": "kidney"}, False, 5, 2),
    "gamma": ({"1": "pancreas"}, True, 4, 1),
}
SHAPES = ((28, 36, 34), (40, 30, 26), (34, 34, 34))
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _volume(rng: np.random.Generator, shape: tuple[int, int, int], n_labels: int):
    """Blobs whose intensity gives the class away, so a tiny model can learn them in a few steps."""
    image = rng.normal(0.0, 0.2, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    zz, yy, xx = np.indices(shape)
    for value in range(1, n_labels + 1):
        centre = [rng.integers(s // 4, 3 * s // 4) for s in shape]
        radius = rng.integers(4, 7)
        ball = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2
        label[ball] = value
        image[ball] += 1.5 if value == 1 else -1.5
    return image, label


def _stats(label: np.ndarray, labels: dict[str, str]) -> tuple[dict, dict]:
    voxels, boxes = {}, {}
    for key in labels:
        where = np.argwhere(label == int(key))
        voxels[key] = len(where)
        if len(where):
            boxes[key] = [*where.min(0).tolist(), *(where.max(0) + 1).tolist()]
    return voxels, boxes


def saved_case_rows(root: Path, labels: list[np.ndarray], dataset: str) -> pd.DataFrame:
    """``preprocessed_manifest`` rows of one subject per label map, saved under ``root``. Each image is its
    voxels' z index, so a crop's first value tells where it starts."""
    rows = []
    for s, label in enumerate(labels):
        image = np.broadcast_to(np.arange(label.shape[0], dtype=np.float32)[:, None, None], label.shape)
        np.save(root / f"i{s}.npy", image)
        np.save(root / f"l{s}.npy", label)
        voxels, boxes = _stats(label, {str(int(v)): "" for v in np.unique(label) if v})
        rows.append(
            {
                "dataset": dataset,
                "case_id": f"c{s}",
                "subject_id": f"s{s}",
                "image_array": str(root / f"i{s}.npy"),
                "label_array": str(root / f"l{s}.npy"),
                "class_voxels": json.dumps(voxels),
                "class_bboxes": json.dumps(boxes),
            }
        )
    return pd.DataFrame(rows)


def build_collection(root: Path, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(preprocessed_manifest, episode_index) for :data:`DATASETS` under ``root``."""
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, (labels, heldout, subjects, per_subject) in DATASETS.items():
        for s in range(subjects):
            for c in range(per_subject):
                case_id = f"{dataset}_{s:02d}_{c}"
                image, label = _volume(rng, SHAPES[(s + c) % len(SHAPES)], len(labels))
                image_path, label_path = root / f"{case_id}_img.npy", root / f"{case_id}_lab.npy"
                np.save(image_path, image)
                np.save(label_path, label)
                voxels, boxes = _stats(label, labels)
                # The "original" scan is the canonical grid itself (3 mm, identity), so evaluation can
                # restore predictions and read the label file like it does for real cases.
                grid = Geometry(tuple(reversed(label.shape)), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0), IDENTITY)
                label_file = root / f"{case_id}_label.nii.gz"
                sitk.WriteImage(grid.apply_to(sitk.GetImageFromArray(label)), str(label_file))
                rows.append(
                    {
                        "dataset": dataset,
                        "case_id": case_id,
                        "subject_id": f"{dataset}_subj{s:02d}",
                        "heldout": heldout,
                        "modality": "CT",
                        "labels": json.dumps(labels),
                        "class_voxels": json.dumps(voxels),
                        "class_bboxes": json.dumps(boxes),
                        "image_array": str(image_path),
                        "label_array": str(label_path),
                        "label_path": str(label_file),
                        "label_sha256": file_sha256(label_file),
                        "preprocessed_geometry": grid.to_json(),
                        "original_geometry": grid.to_json(),
                    }
                )
    manifest = pd.DataFrame(rows)
    index = build_episode_index(manifest, {"seed": seed, "n_references": 2})
    return manifest, index


def tiny_model_config() -> dict[str, Any]:
    from iris_pipelines.model import IrisConfig

    return IrisConfig.tiny().to_dict()


def fast_train_config(**overrides: Any) -> dict[str, Any]:
    config = {
        "steps": 4,
        "batch_size": 2,
        "crop_size": [32, 32, 32],
        "warmup_steps": 2,
        "val_every": 1000,
        "checkpoint_every": 1000,
        "log_every": 1,
    }
    config.update(overrides)
    return config
