"""Where inference runs: one spelling (``auto``, ``cpu``, ``cuda``, ``cuda:N``) for the CLI and the nodes."""

from __future__ import annotations

import re

import torch

# Only what the code is built and tested for: torch also parses mps, xla, meta, … and fails on them only when
# the model is moved there, with a traceback, and lists its ~20 device types for a typo such as "gpu".
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device when present, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` as named.

    Raises ``ValueError`` for any other name, for CUDA on a machine without it and for a GPU index the
    machine does not have, so a stage asked for the GPU fails at its start rather than after loading every
    scan.
    """
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        # torch accepts the name and fails only when the model is moved there, after the scans are loaded
        count = torch.cuda.device_count()
        raise ValueError(
            f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; use one "
            "of them, cuda or auto"
        )
    return device
