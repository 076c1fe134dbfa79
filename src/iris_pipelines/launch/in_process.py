"""Run the train loop in the calling process (single rank): notebooks, tests, the phantom pipeline."""

from __future__ import annotations

from typing import Any

from iris_pipelines.training import TrainResult, run_training


def run_in_process(**run_training_kwargs: Any) -> TrainResult:
    """``run_training`` as rank 0 of 1."""
    for key in ("rank", "world_size"):
        if key in run_training_kwargs:
            raise TypeError(f"the in_process launcher sets {key} itself; do not pass it")
    return run_training(**run_training_kwargs, rank=0, world_size=1)
