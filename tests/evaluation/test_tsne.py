"""t-SNE of degenerate embedding tables (a collapsed or untrained encoder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
