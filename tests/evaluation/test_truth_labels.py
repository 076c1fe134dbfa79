"""Evaluation scores a query against its label file as ingest accepted it, float label maps included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from iris_pipelines.evaluation.evaluate import _load_episode
from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.io import file_sha256, write_image
from iris_pipelines.imaging.metrics import label_map_metrics
from iris_pipelines.training.sampler import CaseRecord


def _episode(tmp_path: Path, truth: np.ndarray, reference_shows: tuple[int, ...] | None = None):
    """One episode whose query label file holds ``truth`` (stored with truth's dtype); its reference shows
    the classes ``reference_shows`` (default: the query's)."""
    query_classes = tuple(int(c) for c in np.unique(np.rint(truth)) if c > 0)
    grid = Geometry(truth.shape[::-1], (0.8, 0.9, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    label_file = tmp_path / "query_labels.nii.gz"
    write_image(grid.apply_to(sitk.GetImageFromArray(truth)), label_file)
    records = {}
    for case, shown in (("query", query_classes), ("ref", reference_shows or query_classes)):
        np.save(tmp_path / f"{case}_image.npy", np.zeros(truth.shape, np.float32))
        np.save(tmp_path / f"{case}_label.npy", np.rint(truth).astype(np.uint8))
        records[("ds", case)] = CaseRecord(
            "ds", case, case, str(tmp_path / f"{case}_image.npy"), str(tmp_path / f"{case}_label.npy"),
            shown, {c: (1, 1, 1, 3, 3, 3) for c in shown},
        )  # fmt: skip
    row = {
        "label_path": str(label_file),
        "label_sha256": file_sha256(label_file),
        "preprocessed_geometry": grid.to_dict(),
        "original_geometry": grid.to_dict(),
    }
    return _load_episode(
        {"episode_id": "e1", "dataset": "ds", "query": "query", "references": ["ref"], "classes": [1, 2]},
        {"classes": {"ds": {"1": {"name": "liver"}, "2": {"name": "spleen"}}}},
        records,
        {("ds", "query"): row},
        {"ds": False},
    )


def test_a_float_label_file_holding_whole_numbers_is_scored(tmp_path: Path) -> None:
    """Ingest accepts a float32 0.0/1.0 label map; evaluate then stopped: the metrics refused its dtype."""
    truth = np.zeros((6, 7, 8), dtype=np.float32)
    truth[2:4, 2:5, 3:6] = 1.0
    episode = _episode(tmp_path, truth)
    assert episode.truth.dtype.kind in "iu"
    np.testing.assert_array_equal(episode.truth, truth)
    perfect = (truth > 0).astype(np.uint8)  # a prediction restored to the query's grid is uint8
    [row] = label_map_metrics(perfect, episode.truth, episode.spacing, [1], 2.0)
    assert row["dice"] == pytest.approx(1.0)


def test_a_label_file_with_fractions_is_named(tmp_path: Path) -> None:
    truth = np.zeros((6, 7, 8), dtype=np.float32)
    truth[2:4, 2:5, 3:6] = 0.5
    with pytest.raises(InvalidInputError) as caught:
        _episode(tmp_path, truth)
    assert caught.value.check == "non_integer_label"
    assert caught.value.path == str(tmp_path / "query_labels.nii.gz")
    assert "18 voxel(s) are not" in caught.value.reason


def test_query_classes_the_reference_does_not_show_are_logged_as_unscored(tmp_path: Path, caplog) -> None:
    truth = np.zeros((6, 7, 8), dtype=np.uint8)
    truth[1:3, 2:5, 3:6], truth[4:6, 2:5, 3:6] = 1, 2
    with caplog.at_level("WARNING", logger="iris_pipelines.evaluation.evaluate"):
        episode = _episode(tmp_path, truth, reference_shows=(1,))
    assert episode.classes == [1]
    assert "episode e1: class(es) [2] of the query are not scored: its first reference ref" in caplog.text
