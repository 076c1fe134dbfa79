"""t-SNE of the task embeddings: coordinates, a PNG and an interactive page, also logged to MLflow."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from matplotlib.figure import Figure
from plotly.graph_objects import Figure as PlotlyFigure

from iris_pipelines.evaluation.tsne import tsne_coordinates, tsne_html, tsne_png


def map_task_embeddings(task_embeddings: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """``tsne_coordinates``: one 2-D point per embedding row, with its dataset, class and reference case."""
    return tsne_coordinates(
        task_embeddings, perplexity=float(params.get("perplexity", 30.0)), seed=int(params.get("seed", 0))
    )


def plot_task_embeddings(tsne_coordinates: pd.DataFrame) -> tuple[Figure, PlotlyFigure]:
    """The static map (coloured by class and by dataset) and the interactive page with hover details."""
    png, html = tsne_png(tsne_coordinates), tsne_html(tsne_coordinates)
    if mlflow.active_run() is not None:
        mlflow.log_figure(png, "tsne/tsne.png")
        with tempfile.TemporaryDirectory(prefix="iris-tsne-") as scratch:
            page = Path(scratch) / "tsne.html"
            # plotly.js inside the page (~4.5 MB), as the catalog's copy: one that loads it from a CDN is
            # blank offline, e.g. on cluster nodes or an MLflow server without internet access.
            html.write_html(page, include_plotlyjs=True)
            mlflow.log_artifact(str(page), artifact_path="tsne")
    return png, html
