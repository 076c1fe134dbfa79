"""t-SNE of degenerate embedding tables (a collapsed or untrained encoder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog

from iris_pipelines.evaluation.tsne import tsne_html, tsne_png

PROJECT = Path(__file__).parents[2]

# In a subprocess: on such input scikit-learn's Barnes-Hut t-SNE ends the process with SIGSEGV.
SCRIPT = """
import json, logging, sys
import numpy as np, pandas as pd
from iris_pipelines.evaluation.tsne import tsne_coordinates
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
coordinates = []
for rows in json.loads(sys.argv[1]):
    table = pd.DataFrame({
        "dataset": "A", "label": range(len(rows)), "class_name": [f"c{i}" for i in range(len(rows))],
        "source": "reference", "case_id": [f"k{i}" for i in range(len(rows))], "heldout": False,
        "novel": False, "embedding": [np.asarray(row, dtype=np.float32) for row in rows],
    })
    coordinates.append(tsne_coordinates(table, perplexity=15)[["x", "y"]].to_numpy().tolist())
print(json.dumps(coordinates))
"""
TABLES = {
    "identical": [[1.0] * 8] * 20,
    "one direction, different magnitudes": [[float(i + 1)] * 8 for i in range(20)],
    "no direction at all": [[0.0] * 8] * 20,
}


def test_embeddings_of_one_direction_map_to_the_origin() -> None:
    """One subprocess for all tables: each start imports scikit-learn and plotly (seconds)."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(list(TABLES.values()))],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name, coordinates in zip(TABLES, json.loads(done.stdout), strict=True):
        assert coordinates == [[0.0, 0.0]] * len(TABLES[name]), name
    assert done.stderr.count("t-SNE is skipped") == len(TABLES)


def _coordinates(classes: int) -> pd.DataFrame:
    """A reference and a memory-bank point per class, in two datasets."""
    names = [f"class{i:02d}" for i in range(classes)]
    return pd.DataFrame(
        {
            "dataset": [f"D{i % 2}" for i in range(classes)] * 2,
            "label": list(range(classes)) * 2,
            "class_name": names * 2,
            "source": ["reference"] * classes + ["memory_bank"] * classes,
            "case_id": [f"k{i}" for i in range(classes)] + [""] * classes,
            "heldout": False,
            "novel": False,
            "x": np.arange(2 * classes, dtype=float),
            "y": np.zeros(2 * classes),
        }
    )


def test_every_class_gets_its_own_colour_and_marker_past_twenty_classes() -> None:
    """tab20 resampled to the 22 class names of the phantom collection drew classes in the same colour."""
    coordinates = _coordinates(22)
    by_class = tsne_png(coordinates).axes[0]
    styles: dict[str, set] = {}
    assert len(by_class.collections) == 2 * 22  # one scatter per class and source
    for collection in by_class.collections:
        x = collection.get_offsets()[0][0]
        name = coordinates.class_name[coordinates.x == x].item()
        marker = collection.get_paths()[0].vertices.round(6).tobytes()
        styles.setdefault(name, set()).add((tuple(collection.get_facecolor()[0]), marker))
    assert all(len(pair) == 1 for pair in styles.values())  # a class's bank point matches its references
    assert len({next(iter(pair)) for pair in styles.values()}) == 22

    html = tsne_html(coordinates)
    colours = {trace.name.split(",")[0]: trace.marker.color for trace in html.data}
    assert len(colours) == 22 and len(set(colours.values())) == 22


def test_case_ids_survive_the_catalogs_csv_round_trip(tmp_path: Path) -> None:
    """Without the entry's load_args, case id "0007" came back as 7.0 and the memory bank's "" as NaN,
    so the interactive map's hover named reference cases that do not exist."""
    loader = OmegaConfigLoader(str(PROJECT / "conf"), base_env="base", default_run_env="base")
    loader["globals"] = {"data_root": str(tmp_path)}
    catalog = DataCatalog.from_config({"tsne_coordinates": loader["catalog"]["tsne_coordinates"]})
    coordinates = _coordinates(3)
    coordinates["case_id"] = ["0007", "0012", "1e3", "", "", ""]  # 1e3: would load as the float 1000.0
    coordinates["dataset"] = ["2024", "007", "2024", "2024", "007", "2024"]
    catalog.save("tsne_coordinates", coordinates)

    loaded = catalog.load("tsne_coordinates")
    assert loaded["case_id"].tolist() == ["0007", "0012", "1e3", "", "", ""]
    assert loaded["dataset"].tolist() == coordinates["dataset"].tolist()
    # the other columns still load as numbers and booleans
    assert loaded["label"].dtype.kind == "i" and loaded["x"].dtype.kind == "f"
    assert loaded["heldout"].dtype == bool and loaded["novel"].dtype == bool
    pd.testing.assert_frame_equal(loaded, coordinates)

    hover = {str(row[2]) for trace in tsne_html(loaded).data for row in trace.customdata}
    assert hover == {"0007", "0012", "1e3", "memory bank"}


def test_every_dataset_gets_its_own_symbol_in_the_interactive_map(caplog) -> None:
    """Plotly's 5 default symbols made four pairs of the 9 phantom datasets (a seen and a held-out one
    among them) share a symbol; past the 48 symbols a warning says they repeat."""
    coordinates = _coordinates(24)
    coordinates["dataset"] = [f"D{i % 12}" for i in range(24)] * 2  # 12 datasets, 2 classes each
    symbols: dict[str, set] = {}
    for trace in tsne_html(coordinates).data:
        symbols.setdefault(trace.name.split(", ")[1], set()).add(trace.marker.symbol)
    assert len(symbols) == 12
    assert all(len(symbol) == 1 for symbol in symbols.values())  # one symbol for all of a dataset's points
    assert len({next(iter(symbol)) for symbol in symbols.values()}) == 12
    assert not caplog.records

    coordinates = _coordinates(49)
    coordinates["dataset"] = [f"D{i}" for i in range(49)] * 2
    assert len({trace.marker.symbol for trace in tsne_html(coordinates).data}) == 48
    assert "49 datasets in the interactive t-SNE map: past 48, symbols repeat" in caplog.text


def test_a_value_whose_only_point_is_in_the_memory_bank_has_a_legend_entry() -> None:
    """The legend labelled reference series only: a class (or dataset) seen only as a memory-bank row
    was drawn but missing from the PNG's legend."""
    coordinates = pd.DataFrame(
        {
            "dataset": ["A", "A", "B", "C"],
            "label": [1, 1, 2, 3],
            "class_name": ["liver", "liver", "spleen", "kidney"],
            "source": ["reference", "memory_bank", "memory_bank", "reference"],
            "case_id": ["k1", "", "", "k2"],
            "heldout": False,
            "novel": False,
            "x": [0.0, 1.0, 2.0, 3.0],
            "y": [0.0, 1.0, 2.0, 3.0],
        }
    )
    by_class, by_dataset = tsne_png(coordinates).axes
    assert [t.get_text() for t in by_class.get_legend().get_texts()] == ["kidney", "liver", "spleen"]
    assert [t.get_text() for t in by_dataset.get_legend().get_texts()] == ["A", "B", "C"]
