"""The fsspec set-up every dataset of this package shares, as kedro-datasets does it."""

from __future__ import annotations

import os
from copy import deepcopy
from typing import Any

import fsspec
from kedro.io.core import Version, get_protocol_and_path


def open_filesystem(
    filepath: str | os.PathLike[str],
    version: Version | None,
    credentials: dict[str, Any] | None,
    fs_args: dict[str, Any] | None,
) -> tuple[str, str, fsspec.AbstractFileSystem]:
    """``(protocol, path, filesystem)`` for a dataset path; local folders are created on save."""
    _fs_args = deepcopy(fs_args) or {}
    _credentials = deepcopy(credentials) or {}
    protocol, path = get_protocol_and_path(str(filepath), version)
    if protocol == "file":
        _fs_args.setdefault("auto_mkdir", True)
    return protocol, path, fsspec.filesystem(protocol, **_credentials, **_fs_args)
