"""MLflow's warning that a PythonModel's ``predict`` has no type hints, dropped where nobody can act on it.

MLflow checks the hints when a ``PythonModel`` subclass is created and warns under its own "once" filter,
which no warnings filter of ours can override; so the warnings raised while such a class is created are
recorded, that one is dropped, and the others are raised again.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

TYPE_HINT_WARNING = "Add type hints to the `predict` method"


@contextmanager
def without_type_hint_warning() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        if TYPE_HINT_WARNING not in str(warning.message):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
