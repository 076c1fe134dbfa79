"""t-SNE map of the task embeddings: do embeddings of one concept cluster across datasets and modalities?"""

from __future__ import annotations

import logging

import matplotlib
import numpy as np
import pandas as pd
import plotly.express as px
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from plotly.graph_objects import Figure as PlotlyFigure
from sklearn.manifold import TSNE

logger = logging.getLogger(__name__)

COORDINATE_COLUMNS = ("dataset", "label", "class_name", "source", "case_id", "heldout", "novel", "x", "y")
# tab20's colours are the most distinguishable set of 20: its ten hues first, then their light shades, so a
# few values get ten different hues. Past 20 values the marker changes too, so every (colour, marker) pair
# is one class; resampling the map instead repeated colours past 20 (the default phantom collection has 22
# class names).
_TAB20 = [to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
PNG_COLOURS = (*_TAB20[0::2], *_TAB20[1::2])
PNG_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
# Plotly's symbols show the dataset, so the interactive map tells classes apart by colour alone: 60.
HTML_COLOURS = (
    *PNG_COLOURS,
    *(to_hex(c) for name in ("tab20b", "tab20c") for c in matplotlib.colormaps[name].colors),
)
# One symbol per dataset: plotly express cycles through 5 by default, so in the 9-dataset collection four
# pairs of datasets (a seen and a held-out one among them) shared a symbol. 24 filled shapes that differ
# in outline, then the same shapes open: 48.
_FILLED_SYMBOLS = (
    "circle", "square", "diamond", "triangle-up", "cross", "x", "triangle-down", "pentagon", "star",
    "hexagon", "hourglass", "triangle-left", "star-triangle-up", "triangle-right", "hexagram", "bowtie",
    "diamond-wide", "star-square", "octagon", "triangle-ne", "star-diamond", "diamond-tall", "triangle-sw",
    "star-triangle-down",
)  # fmt: skip
HTML_SYMBOLS = (*_FILLED_SYMBOLS, *(f"{symbol}-open" for symbol in _FILLED_SYMBOLS))


def tsne_coordinates(embeddings: pd.DataFrame, *, perplexity: float = 30.0, seed: int = 0) -> pd.DataFrame:
    """2-D t-SNE of every embedding row (references and memory bank), L2-normalised first so the map
    shows direction (what retrieval's cosine similarity compares), not magnitude.

    Perplexity is capped below the number of rows, as t-SNE requires; fewer than 3 rows is an error. When
    all rows share one direction, every point lies at the origin (logged as a warning).
    """
    if len(embeddings) < 3:
        raise ValueError(f"t-SNE needs at least 3 embeddings, got {len(embeddings)}")
    vectors = np.stack([np.asarray(v, dtype=np.float64) for v in embeddings["embedding"]])
    if not np.isfinite(vectors).all():
        raise ValueError("task embeddings hold NaN or Inf values; re-run embed_tasks with a healthy model")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    if np.abs(vectors - vectors[0]).max() < 1e-9:
        # Every row points the same way (or is zero), e.g. a collapsed encoder: there is nothing to map,
        # and scikit-learn's Barnes-Hut t-SNE kills the process (SIGSEGV) on such input.
        logger.warning(
            "All %d task embeddings point in the same direction after L2 normalisation; "
            "t-SNE is skipped and every point is placed at the origin",
            len(vectors),
        )
        points = np.zeros((len(vectors), 2))
    else:
        points = TSNE(
            n_components=2,
            perplexity=min(perplexity, (len(vectors) - 1) / 3),
            init="pca",
            random_state=seed,
            metric="euclidean",
        ).fit_transform(vectors)
    table = embeddings[[c for c in COORDINATE_COLUMNS if c in embeddings.columns]].copy()
    table["x"], table["y"] = points[:, 0], points[:, 1]
    return table.reset_index(drop=True)


def png_styles(count: int) -> list[tuple[str, str]]:
    """A (colour, marker) pair for each of ``count`` values, all different up to 160 values."""
    if count > len(PNG_COLOURS) * len(PNG_MARKERS):
        logger.warning("%d values in the t-SNE plot: past %d, colour and marker pairs repeat", count,
                       len(PNG_COLOURS) * len(PNG_MARKERS))  # fmt: skip
    return [
        (PNG_COLOURS[i % len(PNG_COLOURS)], PNG_MARKERS[(i // len(PNG_COLOURS)) % len(PNG_MARKERS)])
        for i in range(count)
    ]


def html_symbols(count: int) -> list[str]:
    """A plotly marker symbol for each of ``count`` datasets, all different up to 48 datasets."""
    if count > len(HTML_SYMBOLS):
        logger.warning("%d datasets in the interactive t-SNE map: past %d, symbols repeat", count,
                       len(HTML_SYMBOLS))  # fmt: skip
    return [HTML_SYMBOLS[i % len(HTML_SYMBOLS)] for i in range(count)]


def tsne_png(coordinates: pd.DataFrame) -> Figure:
    """Two panels: coloured by class concept (shared names across datasets) and by dataset."""
    figure = Figure(figsize=(14, 6))  # pyplot-free: no backend, no global state
    axes = figure.subplots(1, 2)
    for axis, key in zip(axes, ("class_name", "dataset"), strict=True):
        values = sorted(coordinates[key].astype(str).unique())
        for value, (colour, marker) in zip(values, png_styles(len(values)), strict=True):
            labelled = False  # the value's first series gets the legend entry, a memory-bank one too
            for source in ("reference", "memory_bank"):
                rows = coordinates[
                    (coordinates[key].astype(str) == value) & (coordinates["source"] == source)
                ]
                if rows.empty:
                    continue
                bank = source == "memory_bank"  # the class's own marker, larger and edged in black
                axis.scatter(
                    rows["x"], rows["y"], s=80 if bank else 25, marker=marker, color=colour,
                    edgecolors="black" if bank else "face", linewidths=1.2 if bank else 0,
                    label=None if labelled else value,
                )  # fmt: skip
                labelled = True
        axis.set_title(f"task embeddings by {key.replace('_', ' ')} (large, black-edged = memory bank)")
        axis.legend(fontsize=7, ncols=2, loc="best", markerscale=0.8)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    return figure


def tsne_html(coordinates: pd.DataFrame) -> PlotlyFigure:
    """Interactive map; hover shows dataset, class and the reference case of each point."""
    table = coordinates.assign(
        # Memory-bank rows have no reference case: their case id is "" (the catalog's tsne_coordinates
        # entry loads it as "", not NaN, and keeps numeric-looking ids such as "0007" as text).
        reference=coordinates["case_id"].replace("", "memory bank"),
        group=np.where(coordinates["novel"], "novel", np.where(coordinates["heldout"], "held-out", "seen")),
    )
    figure = px.scatter(
        table,
        x="x",
        y="y",
        color="class_name",
        color_discrete_sequence=HTML_COLOURS,
        symbol="dataset",
        symbol_sequence=html_symbols(table["dataset"].nunique(dropna=False)),
        hover_data={
            "dataset": True,
            "class_name": True,
            "reference": True,
            "group": True,
            "x": False,
            "y": False,
        },
        title="t-SNE of Iris task embeddings (colour: class, symbol: dataset)",
    )
    figure.update_layout(xaxis_visible=False, yaxis_visible=False, legend_title_text="class, dataset")
    return figure
