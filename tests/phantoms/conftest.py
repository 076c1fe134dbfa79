"""One small phantom collection shared by the phantom tests (generating it is the expensive part)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iris_pipelines.phantoms import generate_collection

# Two cases per dataset at full resolution: enough for every layout, format and geometry check.
CASES = 2


@pytest.fixture(scope="session")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("phantoms")
    return root, generate_collection(root, seed=0, cases_per_dataset=CASES)
