"""Helpers for tests that start processes and signal them as a user would."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

SIMULATED = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; scancel and SLURM time limits


def _caught(*_: object) -> None:
    raise AssertionError("a signal meant for a child reached the test process")


@contextmanager
def catching(*numbers: int) -> Iterator[None]:
    """These signals are caught (not ignored) in this process while inside, as in a terminal session, so
    a handler that leaves ignored signals alone (``iris_pipelines.signals``) installs its own.

    A shell that starts the test suite in the background (``make test &``, ``nohup``, some CI runners)
    leaves SIGINT or SIGHUP ignored. Children started inside get the default dispositions: an ignored
    signal stays ignored across exec, a caught one is reset to the default. Handlers are set from the
    main thread, where tests run.
    """
    previous = {number: signal.signal(number, _caught) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def interruptible_children() -> AbstractContextManager[None]:
    """Processes started inside get SIGINT's and SIGTERM's default dispositions, as from a terminal: a
    SIGINT sent to simulate Ctrl-C must not be ignored because the suite runs in the background."""
    return catching(*SIMULATED)
