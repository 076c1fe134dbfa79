"""Signal handlers that stop a run cleanly, set without overriding what the user chose to ignore."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any


def install_handlers(numbers: Iterable[int], handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """Set ``handler`` for each of ``numbers`` that is not ignored; returns the handlers it replaced.

    An ignored signal stays ignored: `nohup kedro run &` ignores SIGHUP so that the run outlives the
    terminal, and a handler here would end it when the user logs out. Handlers live in the main thread
    only, so elsewhere nothing is set.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {
        number: signal.signal(number, handler)
        for number in numbers
        if signal.getsignal(number) is not signal.SIG_IGN
    }


def restore_handlers(previous: dict[int, Any]) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)
