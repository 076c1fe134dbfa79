"""Atomic training checkpoints: everything needed so a restarted run continues bit-for-bit.

A checkpoint is written to a temporary file in the same directory and moved into place with
``os.replace`` (atomic on POSIX), so a crash mid-write leaves at worst a stray ``*.tmp`` that
:func:`latest_checkpoint` never picks. These are our own files, so ``torch.load(weights_only=False)``
is acceptable here; the exported model is safetensors + JSON and never goes through pickle.
"""

from __future__ import annotations

import logging
import os
import random
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

KEEP_LAST = 2  # older checkpoints are deleted: a paper-size one (weights + Lamb state) is ~0.8 GB
_PREFIX = "step_"
_NAME = re.compile(rf"^{_PREFIX}(\d{{8}})\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if present) CUDA generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the saving process saw: a run resumed on fewer GPUs restores those it has.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def save_checkpoint(directory: str | Path, step: int, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus ``step``) atomically as ``step_XXXXXXXX.pt`` and prune old ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(directory, step)
    # Not mkstemp: its 0600 would survive the rename, and a shared project's team could not resume the run.
    tmp = directory / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as handle:
            torch.save({**payload, "step": step}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    for old in list_checkpoints(directory)[:-KEEP_LAST]:
        old.unlink(missing_ok=True)
    # A write killed by a time limit or a node failure leaves its temporary file (~0.8 GB at paper size);
    # only this process writes here, so every other one is such a leftover.
    for stale in directory.glob(f".{_PREFIX}*.tmp"):
        stale.unlink(missing_ok=True)
    return target


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable: until the directory itself is flushed, a node that loses power can come
    back with the old name list, and a requeued job would resume from the checkpoint before (whose older
    siblings the pruning may already have deleted). Windows cannot open a directory; it has no such step."""
    if os.name != "posix":
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_latest_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that can be read, with its path; None when there is none.

    A newest file that cannot be read (a filesystem fault, a disk filled mid-write on a system without
    atomic rename) is skipped with a warning, so a requeued job resumes from the one before instead of
    failing on it at every restart. Fails, naming every file, only when none can be read.
    """
    found = list_checkpoints(directory)
    errors = []
    for path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except RuntimeError as error:
            logger.warning("%s; trying the checkpoint before it", error)
            errors.append(str(error))
    if errors:
        raise RuntimeError(
            f"no checkpoint in {directory} can be read ({'; '.join(errors)}); move the folder away to "
            "start afresh"
        )
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # a truncated or foreign file: say which one
        raise RuntimeError(f"cannot read training checkpoint {path}: {error}") from error
