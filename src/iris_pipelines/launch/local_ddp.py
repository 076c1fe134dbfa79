"""Several ranks on this machine with ``torch.multiprocessing.spawn`` and DistributedDataParallel.

Sets up what torchrun would (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK), so the train loop sees the
same environment as under SLURM. Like torchrun, the launching process hosts the rendezvous store, on a
port the OS picks while binding it: a port found free and bound later by rank 0 can be taken in between.
Rank 0's result comes back through a file in a temporary directory (spawn has no return channel); every
rank's failure is re-raised naming the rank. Rank 0's metrics come back through a queue while training
runs, and the launching process hands them to ``on_metrics``: it holds the MLflow run, which a spawned
rank does not.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iris_pipelines.training import TrainConfig, TrainResult, run_training
from iris_pipelines.training.loop import resolve_device


class RankFailedError(RuntimeError):
    """A training rank raised; the message names the rank and carries its traceback."""


RENDEZVOUS_HOST = "127.0.0.1"
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)
RANK_EXIT_GRACE_S = 5.0  # how long a terminated rank may take to exit before it is killed


def usable_cpus() -> int:
    """The cores this process may run on: a SLURM or taskset allocation, not every core of the node."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def trains_on_cuda(train_config: Mapping[str, Any]) -> bool:
    return resolve_device(TrainConfig.from_dict(dict(train_config)), rank=0).type == "cuda"


def default_backend(train_config: Mapping[str, Any]) -> str:
    """NCCL where the ranks train on CUDA devices, gloo otherwise: NCCL takes no CPU tensors, so a GPU
    host's ranks told ``device: cpu`` need gloo as much as a host without a GPU."""
    return "nccl" if trains_on_cuda(train_config) else "gloo"


def place_rank(train_config: Mapping[str, Any], local_rank: int, cpu_threads: int) -> None:
    """Give a rank its own GPU when it trains on CUDA, else its share of the CPU threads.

    NCCL's collectives without a device argument (barrier, all_gather_object) use the current device:
    left at cuda:0, every rank would claim the same GPU. CPU ranks share the host's cores: without a
    limit each one spawns a thread per core and they thrash, on a GPU host told ``device: cpu`` too
    (it used to get ``set_device`` and no limit).
    """
    if trains_on_cuda(train_config):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        torch.set_num_threads(max(1, cpu_threads))


def _worker(
    rank: int,
    world_size: int,
    backend: str,
    port: int,
    result_dir: str,
    kwargs: dict[str, Any],
    metrics: Any | None,
) -> None:
    os.environ.update(
        MASTER_ADDR=RENDEZVOUS_HOST,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    on_metrics = metrics.put if metrics is not None else None
    try:
        place_rank(kwargs["train_config"], rank, usable_cpus() // world_size)
        store = dist.TCPStore(RENDEZVOUS_HOST, port, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        try:
            result = run_training(**kwargs, on_metrics=on_metrics, rank=rank, world_size=world_size)
        finally:
            dist.destroy_process_group()
    except Exception as error:
        raise RankFailedError(
            f"rank {rank}/{world_size} failed: {error!r}\n{traceback.format_exc()}"
        ) from None
    if rank == 0:
        torch.save(result, Path(result_dir) / "result.pt")


def stop_ranks(processes: Sequence[Any], grace_s: float = RANK_EXIT_GRACE_S) -> None:
    """Terminate the ranks still running and reap every one: a rank terminated but never joined stays a
    zombie for as long as the launching process (a notebook kernel, a Kedro session) lives, and one that
    does not exit within ``grace_s`` of SIGTERM is killed."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def run_local_ddp(nprocs: int = 2, backend: str | None = None, **run_training_kwargs: Any) -> TrainResult:
    """``run_training`` on ``nprocs`` spawned ranks; returns rank 0's result (with every rank's checksum)."""
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    for key in ("rank", "world_size"):
        if key in run_training_kwargs:
            raise TypeError(f"the local_ddp launcher sets {key} itself; do not pass it")
    # A GPU index for several ranks fails here, not in every spawned rank (the rest of the config is
    # checked in the ranks, whose errors name them).
    device = str(run_training_kwargs["train_config"].get("device", TrainConfig.device))
    resolve_device(TrainConfig(device=device), 0, world_size=nprocs)
    backend = backend or default_backend(run_training_kwargs["train_config"])
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise ValueError(f"nccl with {nprocs} ranks needs {nprocs} GPUs, found {torch.cuda.device_count()}")
    on_metrics = run_training_kwargs.pop("on_metrics", None)
    metrics = mp.get_context("spawn").SimpleQueue() if on_metrics is not None else None
    # Port 0: the OS binds a free port in the same call, so no other process can take it first.
    store = dist.TCPStore(
        RENDEZVOUS_HOST, 0, is_master=True, wait_for_workers=False, timeout=RENDEZVOUS_TIMEOUT
    )
    with tempfile.TemporaryDirectory(prefix="iris-ddp-") as result_dir:
        try:
            ranks = mp.spawn(
                _worker,
                args=(nprocs, backend, store.port, result_dir, run_training_kwargs, metrics),
                nprocs=nprocs,
                join=False,
            )
            try:
                while True:
                    done = ranks.join(timeout=0.5)  # raises when a rank failed
                    while metrics is not None and not metrics.empty():
                        on_metrics(metrics.get())
                    if done:
                        break
            except BaseException:
                stop_ranks(ranks.processes)  # Ctrl-C or a failing callback: no rank trains on
                raise
        except mp.ProcessRaisedException as error:
            raise RankFailedError(
                f"local_ddp training failed on rank {error.error_index} of {nprocs}; its traceback:\n{error}"
            ) from None
        except mp.ProcessExitedException as error:
            raise RankFailedError(
                f"local_ddp rank {error.error_index} exited with code {error.exit_code} (killed or crashed)"
            ) from None
        return torch.load(Path(result_dir) / "result.pt", weights_only=False)
