"""Where the train loop runs. Each launcher calls ``iris_pipelines.training.run_training`` unchanged."""

from __future__ import annotations

from typing import Any

from iris_pipelines.training import TrainResult

from .in_process import run_in_process
from .local_ddp import RankFailedError, run_local_ddp

LAUNCHERS = ("in_process", "local_ddp", "slurm")


def launch_training(launcher: str, **run_training_kwargs: Any) -> TrainResult:
    """Run training with ``launcher`` and return rank 0's :class:`TrainResult`.

    ``"in_process"``; ``"local_ddp"`` (also takes ``nprocs`` and ``backend``); ``"slurm"`` (a DDP job
    through sbatch; takes the SLURM options of :func:`iris_pipelines.launch.slurm.run_slurm`).
    """
    if launcher == "in_process":
        return run_in_process(**run_training_kwargs)
    if launcher == "local_ddp":
        return run_local_ddp(**run_training_kwargs)
    if launcher == "slurm":
        # Imported here: submitit is only needed where jobs are submitted.
        from .slurm import run_slurm

        return run_slurm(**run_training_kwargs)
    raise ValueError(f"unknown launcher {launcher!r}; choose one of {LAUNCHERS}")


__all__ = ["LAUNCHERS", "RankFailedError", "launch_training", "run_in_process", "run_local_ddp"]
