"""Atomic training checkpoints: everything needed so a restarted run continues bit-for-bit.

A checkpoint is written to a temporary file in the same directory and moved into place with
``os.replace`` (atomic on POSIX), so a crash mid-write leaves at worst a stray ``*.tmp`` that
:func:`latest_checkpoint` never picks. Beside each one, ``step_XXXXXXXX.pt.sha256`` (``sha256sum``
format) records the sha256 of its bytes: ``torch.load`` checks no CRC, so a flipped byte inside a tensor
would otherwise load as other weights. These are our own files, so ``torch.load(weights_only=False)`` is
acceptable here; the exported model is safetensors + JSON and never goes through pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

logger = logging.getLogger(__name__)

KEEP_LAST = 2  # older checkpoints are deleted: a paper-size one (weights + Lamb state) is ~0.8 GB
_PREFIX = "step_"
_NAME = re.compile(rf"^{_PREFIX}(\d{{8}})\.pt$")
DIGEST_SUFFIX = ".sha256"
LOCK_NAME = ".lock"
# Keys of TrainConfig that change how often the loop logs, validates and saves, or how many processes load
# episodes, but not a single weight (episodes are a function of seed, rank and step): a run resumes a
# checkpoint written with other values of these as its own, and the train node leaves them out of the
# checkpoint folder's key, so lowering num_workers after a loader ran out of memory resumes the run.
SCHEDULING_KEYS = ("num_workers", "log_every", "val_every", "checkpoint_every")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def digest_path(checkpoint: str | Path) -> Path:
    """The file holding ``checkpoint``'s sha256 (``sha256sum -c`` checks it by hand, in the folder)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + DIGEST_SUFFIX)


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
    """Write ``payload`` (plus ``step``) atomically as ``step_XXXXXXXX.pt``, with the sha256 of its bytes
    beside it, and prune old ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(directory, step)
    digest_file = digest_path(target)
    tmp, digest_tmp = _temporary_path(target), _temporary_path(digest_file)
    try:
        with open(tmp, "xb") as handle:
            hashing = _HashingWriter(handle)
            torch.save({**payload, "step": step}, hashing)
            handle.flush()
            os.fsync(handle.fileno())
        with open(digest_tmp, "x", encoding="ascii") as handle:
            handle.write(f"{hashing.hexdigest()}  {target.name}\n")
            handle.flush()
            os.fsync(handle.fileno())
        # The digest is in place, durably, before its checkpoint: a crash in between leaves a digest that
        # matches no file (the checkpoint is then refused, never loaded unchecked), not a checkpoint
        # without one, which would load unverified as one written before checkpoints had digests.
        os.replace(digest_tmp, digest_file)
        _fsync_directory(directory)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        digest_tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    for old in list_checkpoints(directory)[:-KEEP_LAST]:
        old.unlink(missing_ok=True)
        digest_path(old).unlink(missing_ok=True)
    # A write killed by a time limit or a node failure leaves its temporary file (~0.8 GB at paper size);
    # a run holds the folder (exclusive_checkpoint_folder) while it writes here, so every other one is
    # such a leftover.
    for stale in directory.glob(f".{_PREFIX}*.tmp"):
        stale.unlink(missing_ok=True)
    return target


def _temporary_path(target: Path) -> Path:
    # Not mkstemp: its 0600 would survive the rename, and a shared project's team could not resume the run.
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")


class _HashingWriter:
    """The file ``torch.save`` writes through, hashing the bytes on their way: torch writes a checkpoint
    front to back through ``write`` alone, so the digest is the file's without holding a second copy of
    a paper-size checkpoint (~0.8 GB) in memory or reading it back."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@contextlib.contextmanager
def exclusive_checkpoint_folder(directory: str | Path) -> Iterator[None]:
    """Hold ``directory`` for one training run: a second run writing there (a ``kedro run`` started
    twice, a requeued SLURM job overlapping the one before) is refused instead of deleting the first
    one's temporary files mid-write. The kernel drops the lock with the process that held it, so a
    killed run leaves no stale lock behind."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if os.name != "posix":  # no flock on Windows: two runs there are not told apart
        yield
        return
    import fcntl

    lock_path = directory / LOCK_NAME
    handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another training run is writing checkpoints in {directory} (it holds {lock_path}): two "
                "runs there would delete each other's files. Wait for that run to end or stop it, then "
                "run again to resume from its checkpoints"
            ) from None
        except OSError as error:  # a filesystem without locks (Lustre mounted without -o flock)
            logger.warning(
                "cannot lock %s (%s): a second run writing checkpoints in %s would not be refused",
                lock_path, error, directory,
            )  # fmt: skip
        yield
    finally:
        os.close(handle)  # releases the lock


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


def load_latest_checkpoint(
    directory: str | Path, required_keys: Collection[str] = ()
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that can be read, with its path; None when there is none.

    A newest file that cannot be read (a filesystem fault, a disk filled mid-write on a system without
    atomic rename), whose bytes are not those written (its sha256 differs from the recorded one) or that
    lacks one of ``required_keys`` (a file of other code) is skipped with a warning, so a requeued job
    resumes from the one before instead of failing on it at every restart. Fails, naming every file, only
    when none can be read.
    """
    found = list_checkpoints(directory)
    errors = []
    for path in reversed(found):
        try:
            payload = load_checkpoint(path)
            _require_keys(path, payload, required_keys)
            return path, payload
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
    """The checkpoint at ``path``, once its bytes match the sha256 recorded beside it."""
    path = Path(path)
    _verify_digest(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # a truncated or foreign file: say which one
        raise RuntimeError(f"cannot read training checkpoint {path}: {error}") from error


def _verify_digest(path: Path) -> None:
    digest_file = digest_path(path)
    try:
        recorded = digest_file.read_text(encoding="ascii").split()[0]
    except FileNotFoundError:
        logger.warning(
            "training checkpoint %s cannot be verified: it has no %s beside it (it was written before "
            "checkpoints recorded their sha256); loading it as it is",
            path, digest_file.name,
        )  # fmt: skip
        return
    except (OSError, UnicodeDecodeError, IndexError) as error:
        raise RuntimeError(
            f"cannot read the sha256 of training checkpoint {path} from {digest_file}: {error!r}"
        ) from error
    try:
        with open(path, "rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as error:
        raise RuntimeError(f"cannot read training checkpoint {path}: {error}") from error
    if actual != recorded:
        raise RuntimeError(
            f"training checkpoint {path} is corrupted: its bytes hash to sha256 {actual[:16]}…, not to the "
            f"{recorded[:16]}… recorded in {digest_file.name} when it was written (one of the two files was "
            "damaged or replaced since)"
        )


def _require_keys(path: Path, payload: Any, required_keys: Collection[str]) -> None:
    if not isinstance(payload, dict):
        raise RuntimeError(
            f"training checkpoint {path} holds a {type(payload).__name__}, not the dict a training run writes"
        )
    missing = [key for key in required_keys if key not in payload]
    if missing:
        raise RuntimeError(
            f"training checkpoint {path} lacks {missing} (a file of other code, or put there by hand), so "
            "no run can resume from it"
        )
