"""Helpers for tests that start processes and signal them as a user would."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def interruptible_children() -> Iterator[None]:
    """Processes started inside get Ctrl-C's default disposition, as from a terminal.

    A shell that starts the test suite in the background (``make test &``, some CI runners) leaves SIGINT
    ignored, and an ignored signal stays ignored across exec: a SIGINT sent to simulate Ctrl-C would then
    do nothing. A caught one is reset to the default on exec, so catching it here while the child starts
    is enough (signal handlers are set from the main thread, where tests run).
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
