"""The one rule by which `kedro run` (settings.py's ``env_or``) and the iris commands (``registry``) place a
relative SQLite MLflow store, so the two open the same file. Imports nothing of the package: settings.py
must not pull in torch, which the registry module does."""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "sqlite:///"


def absolute_sqlite_uri(uri: str, directory: str | os.PathLike[str]) -> str:
    """``sqlite:///mlflow.db`` → ``sqlite:////<directory>/mlflow.db``; any other URI (another scheme, an
    absolute or in-memory file) as it is. SQLAlchemy options after a ``?`` are kept."""
    if not uri.startswith(PREFIX):
        return uri
    path, _, options = uri[len(PREFIX) :].partition("?")
    if path in ("", ":memory:") or Path(path).is_absolute():
        return uri
    return f"{PREFIX}{(Path(directory) / path).resolve()}" + (f"?{options}" if options else "")
