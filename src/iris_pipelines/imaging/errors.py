"""The one error type for bad input, so batch stages can record a reject instead of crashing."""

from __future__ import annotations


class InvalidInputError(ValueError):
    """An input file that cannot be used, with the file, a machine-readable check and a human reason.

    ``check`` is a short stable name (``missing_file``, ``unreadable``, ``not_3d``, ``grid_mismatch``,
    ``undeclared_label``, ``non_finite``, ``empty_label``, ``duplicate_case``, ``unsupported_format``, …)
    that reports group by; ``reason`` is one sentence a person can act on.
    """

    def __init__(self, path: str, check: str, reason: str) -> None:
        self.path = str(path)
        self.check = check
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type[InvalidInputError], tuple[str, str, str]]:
        # Keeps the error picklable across process pools (the default would pass only the message).
        return (type(self), (self.path, self.check, self.reason))
