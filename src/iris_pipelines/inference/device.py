"""Where inference runs: one spelling (``auto``, ``cpu``, ``cuda``, ``cuda:N``) for the CLI and the nodes."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device when present, else the CPU; otherwise what torch understands.

    Raises ``ValueError`` for a name torch does not know, for CUDA on a machine without it and for a GPU
    index the machine does not have, so a stage asked for the GPU fails at its start rather than after
    loading every scan.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {name!r}: {error}") from None
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
