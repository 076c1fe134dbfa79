"""What the tsne pipeline logs to MLflow."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from iris_pipelines.pipelines.tsne.nodes import plot_task_embeddings


def test_the_page_logged_to_mlflow_works_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLflow copy of tsne.html loaded plotly.js from cdn.plot.ly: a blank page without internet
    access (cluster nodes), while the catalog's copy embeds it."""
    logged: dict[str, str] = {}
    monkeypatch.setattr(mlflow, "active_run", object)  # a run is active
    monkeypatch.setattr(mlflow, "log_figure", lambda figure, path: logged.setdefault(path, "figure"))

    def log_artifact(local_path: str, artifact_path: str | None = None) -> None:
        logged[f"{artifact_path}/{Path(local_path).name}"] = Path(local_path).read_text(encoding="utf-8")

    monkeypatch.setattr(mlflow, "log_artifact", log_artifact)
    coordinates = pd.DataFrame(
        {
            "dataset": ["A", "A", "B"],
            "label": [1, 1, 2],
            "class_name": ["liver", "liver", "spleen"],
            "source": ["reference", "memory_bank", "reference"],
            "case_id": ["k1", "", "k2"],
            "heldout": False,
            "novel": False,
            "x": np.arange(3.0),
            "y": np.zeros(3),
        }
    )
    plot_task_embeddings(coordinates)

    assert set(logged) == {"tsne/tsne.png", "tsne/tsne.html"}
    page = logged["tsne/tsne.html"]
    # Booleans, not `in` on the page: pytest's diff of a 4.5 MB string takes minutes.
    external = re.findall(r"<script[^>]*\bsrc=[^>]*>", page)
    assert external == []  # the CDN copy: <script charset="utf-8" src="https://cdn.plot.ly/plotly-….js">
    embedded = "plotly.js v" in page  # the library's own banner: plotly.js is inside the page
    assert embedded
