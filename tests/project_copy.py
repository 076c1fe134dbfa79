"""A copy of the project's code and configuration in a fresh folder, for real `kedro` subprocesses."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("conf", "src", "pyproject.toml", "requirements.lock", ".telemetry", ".gitignore")


def copy_project(root: Path, names: Iterable[str] = PROJECT_FILES) -> Path:
    """Copy ``names`` from the repository into ``root`` (no data, no MLflow store, no credentials)."""
    for name in names:
        source = PROJECT_ROOT / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("credentials*", "__pycache__", "*.egg-info")
            shutil.copytree(source, root / name, ignore=ignore)
        else:
            shutil.copy2(source, root / name)
    return root
