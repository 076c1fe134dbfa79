"""register_pipelines under `kedro run --pipelines=<name>`'s filter: typos get Kedro's hint, broken
pipeline folders their import error. In a subprocess: the filter is process-wide Kedro state."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from kedro.framework.project import configure_project, pipelines
from iris_pipelines.pipeline_registry import register_pipelines
configure_project("iris_pipelines")
# As KedroSession.run does: the filter first, then pipelines[name], whose KeyError it turns into
# "Failed to find the pipeline named ... Did you mean".
pipelines.set_requested(["trian", "tsne"])
try:
    pipelines["trian"]
except KeyError:
    print("RESULT KeyError")
print("RESULT", sorted(register_pipelines()))
sys.modules["iris_pipelines.pipelines.tsne"] = None  # an existing folder whose import fails
try:
    register_pipelines()
except ImportError as exc:
    print("RESULT ImportError", exc.__cause__)
"""


def test_an_unknown_name_is_left_to_kedro_and_a_broken_folder_raises() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # Kedro's logging shares stdout
    lines = [line.removeprefix("RESULT ") for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines[:2] == ["KeyError", "['__default__', 'tsne']"]
    assert lines[2].startswith("ImportError") and "iris_pipelines.pipelines.tsne" in lines[2]
    assert "An error occurred while importing" not in done.stderr  # no warning about the typo either
