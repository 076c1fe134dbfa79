"""Train as one SLURM job of N ranks, submitted and watched by the Kedro process (``--env=hpcc``).

How it works (slurm/README.md has the user's view):

- **Submission.** submitit's ``SlurmExecutor`` writes an sbatch script that runs one ``srun`` task per
  rank (one per GPU), with ``--kill-on-bad-exit`` so a crashed rank ends the whole job instead of leaving
  the others blocked in a collective. The pickled call, per-rank logs and the metrics file live in the job
  folder ``<folder>/<date>T<time>-<random>/`` on the shared filesystem. A Kedro process that itself runs in
  an allocation (``salloc``, an sbatch'd driver) submits without that allocation's ``SLURM_*`` variables.
- **Ranks.** Every task reads its rank, world size and local rank from SLURM (``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``; submitit's ``TorchDistributedEnvironment`` also takes the first
  host of ``SLURM_JOB_NODELIST`` as MASTER_ADDR), joins NCCL on GPUs or gloo on CPU, and calls
  ``run_training`` unchanged. Rank 0 hosts the rendezvous store on a port it binds at once and publishes
  its address in the job folder, where the other ranks read it (:func:`rendezvous_store`): a port agreed
  in advance (submitit's, from the job id) can be held by anything on a shared node, and rank 0 then
  failed with EADDRINUSE.
- **Metrics.** Rank 0 appends each metrics record as a JSON line to ``metrics.jsonl`` in the job folder.
  The waiting Kedro process tails it, shows a progress bar (step, loss, samples/s, ETA) and hands each
  record to the same ``on_metrics`` callback as the other launchers. So the Kedro process stays the only
  MLflow writer and rank 0's metrics land in its run; compute nodes need no route to the tracking
  server, and a SQLite store on the login node keeps a single writer.
- **Preemption and time limits.** SLURM sends USR2 ``signal_delay_s`` before the time limit (submitit's
  ``--signal``; ``scancel --signal=USR2`` does the same by hand). Each rank sets a flag; the train loop
  agrees on a step, rank 0 writes a checkpoint and runs ``scontrol requeue``. The restarted job runs the
  same pickled call, which resumes from that checkpoint. SIGTERM (preemption with ``PreemptMode=REQUEUE``,
  or a cancel) also checkpoints, but exits without requeueing: SLURM requeues preempted jobs itself.
- **Waiting.** The Kedro process polls the job with ``scontrol``/``sacct`` (submitit's watcher relies on
  sacct alone and, without accounting, never sees a cancelled job end), keeps waiting through requeues,
  raises :class:`SlurmJobError` naming the job, its state, the failing rank's traceback and log tail, and
  cancels the job on Ctrl-C, SIGTERM, SIGHUP or any other error that stops the watching.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iris_pipelines.model import IrisConfig
from iris_pipelines.signals import install_handlers, restore_handlers
from iris_pipelines.training import TrainConfig, TrainResult, run_training
from iris_pipelines.training.loop import TrainingInterrupted, resolve_device

from .local_ddp import default_backend, place_rank

if TYPE_CHECKING:
    from torch.distributed import TCPStore

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Ranks start as srun and the nodes get to them; the shared filesystem may show rank 0's address file late.
RENDEZVOUS_TIMEOUT = timedelta(minutes=10)
# Job states after which the job never runs again (squeue/scontrol/sacct spelling).
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
RESULT_GRACE_S = 60  # a shared filesystem may show the result files a little after the job ended
LOG_TAIL_LINES = 40


class SlurmJobError(RuntimeError):
    """The SLURM training job failed, was cancelled or ended without a result; the message says which
    job, in which state, why, and shows the end of its log."""


# ---- inside the job: one instance runs on every rank ------------------------------------------------------


class _StopFlag:
    """Set from a signal handler; the train loop polls it after every step.

    Only a flag: a handler that saved or exited itself would run mid-step, possibly inside a collective.
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    def handler(self, signum: int, _frame: Any) -> None:
        # USR2 ("time limit soon", or by hand) asks for a requeue; SIGTERM only for a clean stop.
        if self.reason != "warning":
            self.reason = "warning" if signum != signal.SIGTERM else "terminate"

    def __call__(self) -> bool:
        return self.reason is not None


def _append_record(path: Path, record: dict[str, Any]) -> None:
    """Open, append, close for each record: NFS shows appended data to other clients only after close."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=float) + "\n")


def rendezvous_store(
    rank: int,
    world_size: int,
    host: str,
    address_file: Path,
    port: int = 0,
    timeout: timedelta = RENDEZVOUS_TIMEOUT,
) -> TCPStore:
    """The store every rank joins: rank 0 hosts it on ``port`` (0: one the OS binds in the same call, so
    nothing can take it first) and writes ``host:port`` to ``address_file`` (atomically: a rank never reads
    half of it); the other ranks wait for that file and connect. ``address_file`` must be new for each
    attempt of the job and lie where every node sees it (the job folder: submitit needs it shared anyway).
    """
    import torch.distributed as dist

    if rank == 0:
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        partial = address_file.with_name(f".{address_file.name}.{uuid.uuid4().hex}")
        partial.write_text(json.dumps({"host": host, "port": store.port}), encoding="utf-8")
        os.replace(partial, address_file)
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while not address_file.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {rank}: rank 0 did not publish the rendezvous address in {address_file} within "
                f"{timeout}; look at rank 0's log in the job folder"
            )
        time.sleep(0.2)
    address = json.loads(address_file.read_text(encoding="utf-8"))
    return dist.TCPStore(address["host"], int(address["port"]), world_size, is_master=False, timeout=timeout)


class SlurmTrainingJob:
    """The callable submitit pickles and every srun task runs (rank 0 returns the :class:`TrainResult`)."""

    def __init__(self, run_training_kwargs: dict[str, Any], backend: str | None, max_requeues: int) -> None:
        self.run_training_kwargs = run_training_kwargs
        self.backend = backend
        self.max_requeues = max_requeues

    def __call__(self) -> TrainResult | None:
        import submitit
        import torch.distributed as dist

        job = submitit.JobEnvironment()
        chosen_port = int(os.environ.get("MASTER_PORT") or 0)  # exported by the user; else the OS picks
        ranks = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        stop = _StopFlag()
        # Replaces submitit's own USR2 handler, which would requeue from inside the handler before the
        # train loop could write a checkpoint of the current step.
        signal.signal(getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"), stop.handler)
        signal.signal(signal.SIGTERM, stop.handler)
        metrics_path = Path(job.paths.folder) / METRICS_FILE
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        is_main = ranks.rank == 0
        # CPU ranks share the node: one thread per core allocated to the task, not per core of the node.
        place_rank(
            self.run_training_kwargs["train_config"], ranks.local_rank,
            int(os.environ.get("SLURM_CPUS_PER_TASK", "1")),
        )  # fmt: skip
        # One address file per attempt: a requeued run must not read the address of the one before.
        address_file = Path(job.paths.folder) / f"rendezvous_{job.job_id}_attempt{attempt}.json"
        store = rendezvous_store(
            ranks.rank, ranks.world_size, ranks.master_addr, address_file, port=chosen_port
        )
        if is_main:
            _append_record(
                metrics_path,
                {
                    "event": "started",
                    "attempt": attempt,
                    "world_size": ranks.world_size,
                    "master": f"{ranks.master_addr}:{store.port}",
                },
            )
        dist.init_process_group(
            self.backend or default_backend(self.run_training_kwargs["train_config"]),
            store=store,
            rank=ranks.rank,
            world_size=ranks.world_size,
        )
        try:
            result = run_training(
                **self.run_training_kwargs,
                rank=ranks.rank,
                world_size=ranks.world_size,
                on_metrics=(lambda record: _append_record(metrics_path, record)) if is_main else None,
                stop_requested=stop,
            )
        except TrainingInterrupted as stopped:
            self._after_interrupt(stopped.step, stop.reason or "warning", attempt, is_main, metrics_path)
        except Exception as error:
            if stop.reason is None:
                raise
            # A rank torn down by the stop (peer gone mid-collective) is not the job's failure.
            raise SystemExit(f"stopped by signal ({stop.reason}); then: {error!r}") from error
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return result if is_main else None

    def _after_interrupt(self, step: int, reason: str, attempt: int, is_main: bool, metrics_path: Path):
        import torch.distributed as dist

        job_id = os.environ["SLURM_JOB_ID"]
        action = "requeue" if reason == "warning" else "exit"
        if action == "requeue" and attempt >= self.max_requeues:
            action = "give_up"
        if is_main:
            record = {"event": "interrupted", "step": step, "reason": reason, "action": action}
            if action == "give_up":
                # Told through the metrics file, not a result file: that one could be cut off by srun
                # killing rank 0 once another rank has exited.
                record["message"] = (
                    f"SLURM job {job_id} hit its time limit or was preempted again after {attempt} requeues "
                    f"(max_requeues={self.max_requeues}); the checkpoint of step {step} is kept: run "
                    "`kedro run` again to resume from it, or raise time_min / max_requeues"
                )
            _append_record(metrics_path, {**record, "attempt": attempt})
            if action == "requeue":
                subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=120)
        # No rank may exit before rank 0 has requeued: srun's --kill-on-bad-exit would end the job first.
        dist.barrier()
        # SystemExit, not an exception: submitit then writes no (error) result, and the waiting Kedro
        # process keeps waiting for the requeued run.
        raise SystemExit(f"training stopped after step {step} ({reason}); checkpoint saved")


# ---- in the Kedro process: submit, watch, collect ----------------------------------------------------------


def _run(command: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def job_state(job_id: str) -> str:
    """SLURM's state of ``job_id``: from scontrol while slurmctld remembers the job, else sacct."""
    shown = _run(["scontrol", "show", "job", "-o", job_id])
    match = re.search(r"\bJobState=(\S+)", shown.stdout) if shown else None
    if match:
        return match.group(1)
    accounted = _run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id])
    if accounted and accounted.returncode == 0 and accounted.stdout.split():
        return accounted.stdout.split()[0]  # "CANCELLED by 0" -> "CANCELLED"
    return "UNKNOWN"


def cancel_job(job_id: str) -> None:
    done = _run(["scancel", job_id])
    if done is None or done.returncode != 0:
        detail = done.stderr.strip() if done else "scancel not runnable"
        logger.error(
            "could not cancel SLURM job %s (%s); cancel it by hand: scancel %s", job_id, detail, job_id
        )


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


class MetricsTail:
    """Reads the records rank 0 appended since the last call; a line still being written waits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            if line.strip():
                yield json.loads(line)


def _record_key(record: dict[str, Any]) -> tuple[str, int]:
    return (str(record.get("dataset", "")), int(record["step"]))


class _Watcher:
    """Progress bar, metric forwarding and event logging for one submitted job."""

    def __init__(self, job_id: str, steps: int, on_metrics: Callable[[dict[str, Any]], None] | None):
        from tqdm.auto import tqdm

        self.job_id = job_id
        self.on_metrics = on_metrics
        self.forwarded: set[tuple[str, int]] = set()
        self.bar = tqdm(total=steps, desc=f"SLURM job {job_id}", unit="step", dynamic_ncols=True)

    def handle(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "started":
            logger.info(
                "SLURM job %s: attempt %d running, %d ranks (rendezvous %s)",
                self.job_id,
                record["attempt"] + 1,
                record["world_size"],
                record["master"],
            )
        elif event == "interrupted" and record["action"] == "give_up":
            raise SlurmJobError(record["message"])
        elif event == "interrupted":
            what = "requeued itself" if record["action"] == "requeue" else "stopped (SIGTERM)"
            logger.warning(
                "SLURM job %s %s after a checkpoint at step %d; waiting for it to resume",
                self.job_id,
                what,
                record["step"],
            )
        elif event is None and "step" in record:
            # A run resumed from an older checkpoint repeats steps it already reported: forward once.
            key = _record_key(record)
            if key in self.forwarded:
                return
            self.forwarded.add(key)
            if "loss" in record:
                self.bar.update(max(0, int(record["step"]) - self.bar.n))
                self.bar.set_postfix(
                    loss=f"{record['loss']:.4f}", samples_s=f"{record.get('samples_per_s', 0):.2f}"
                )
            if self.on_metrics is not None:
                self.on_metrics(record)

    def state(self, state: str) -> None:
        self.bar.set_description(f"SLURM job {self.job_id} {state}")

    def close(self) -> None:
        self.bar.close()


def _results(job: Any, ntasks: int) -> list[tuple[float, int, str, Any]]:
    """(mtime, rank, outcome, result or traceback) of every rank that wrote its result file so far."""
    from submitit.core.utils import pickle_load

    out = []
    for rank in range(ntasks):
        path = job.task(rank).paths.result_pickle
        if path.exists():
            outcome, value = pickle_load(path)
            out.append((path.stat().st_mtime, rank, outcome, value))
    return out


def _failure(job: Any, ntasks: int, failed: list[tuple[float, int, str, Any]]) -> SlurmJobError:
    """The rank that failed first is the cause; the others usually only lost their peer."""
    _, rank, _, trace = min(failed)
    last_line = next((line for line in reversed(str(trace).splitlines()) if line.strip()), "")
    stderr = job.task(rank).paths.stderr
    return SlurmJobError(
        f"SLURM job {job.job_id} failed: rank {rank} of {ntasks} raised {last_line}\n"
        f"---- traceback of rank {rank} ----\n{trace}\n"
        f"---- last lines of {stderr} ----\n{tail(stderr)}"
    )


def _ended_without_result(job: Any, ntasks: int, state: str, missing: list[int]) -> SlurmJobError:
    logs = "\n".join(
        f"---- last lines of {job.task(rank).paths.stderr} ----\n{tail(job.task(rank).paths.stderr)}"
        for rank in missing
    )
    return SlurmJobError(
        f"SLURM job {job.job_id} ended in state {state} without a result from rank(s) {missing} of "
        f"{ntasks} (see `scontrol show job {job.job_id}` or `sacct -j {job.job_id}`)\n{logs}"
    )


def _wait(job: Any, ntasks: int, watcher: _Watcher, poll_s: float, lost_after_s: float) -> TrainResult:
    metrics = MetricsTail(Path(str(job.paths.folder)) / METRICS_FILE)
    state, ended_at, unknown_since = "", None, None
    while True:
        for record in metrics:
            watcher.handle(record)
        results = _results(job, ntasks)
        failed = [r for r in results if r[2] != "success"]
        if failed:
            cancel_job(job.job_id)  # ranks still alive wait on the dead one: free the nodes now
            raise _failure(job, ntasks, failed)
        if len(results) == ntasks:
            for record in metrics:  # the last records may land just before the result files
                watcher.handle(record)
            return next(value for _, rank, _, value in results if rank == 0)
        now = time.monotonic()
        new_state = job_state(job.job_id)
        if new_state != state:
            logger.info("SLURM job %s: %s", job.job_id, new_state)
            watcher.state(new_state)
            state = new_state
        unknown_since = (unknown_since or now) if state == "UNKNOWN" else None
        if unknown_since is not None and now - unknown_since > lost_after_s:
            raise SlurmJobError(
                f"lost track of SLURM job {job.job_id}: neither scontrol nor sacct know it any more and it "
                f"left no result in {job.paths.folder}"
            )
        if state.split()[0] in TERMINAL_STATES:
            ended_at = ended_at or now
            # Result files (a completed job's, or a failed rank's traceback) may reach a shared
            # filesystem a little after SLURM reports the end.
            if now - ended_at > (RESULT_GRACE_S if state == "COMPLETED" else 5 * poll_s):
                done = {rank for _, rank, _, _ in results}
                raise _ended_without_result(job, ntasks, state, [r for r in range(ntasks) if r not in done])
        else:
            ended_at = None
        time.sleep(poll_s)


class _Interrupt:
    """While waiting, SIGTERM and SIGHUP count as Ctrl-C: `scancel` of a batch job running `kedro run`
    (slurm/kedro_run.sbatch), `kill` of the Kedro process, or the SSH session that ran it closing then
    also cancels the training job, which would otherwise train on with nobody collecting its result. A
    signal the user ignores stays ignored: under `nohup` logging out must not cancel the job."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.cause = "Ctrl-C"
        self.previous: dict[int, Any] = {}

    def _terminate(self, signum: int, _frame: Any) -> None:
        self.cause = signal.Signals(signum).name
        raise KeyboardInterrupt

    def __enter__(self) -> _Interrupt:
        self.previous = install_handlers(self.SIGNALS, self._terminate)
        return self

    def __exit__(self, *_exc: object) -> None:
        restore_handlers(self.previous)


def _memory_per_node(mem_per_task: str | None, tasks_per_node: int) -> str | None:
    """``--mem`` is per node; users think per rank. ``"64G"`` × 4 tasks → ``"256G"``."""
    if mem_per_task is None:
        return None
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)B?", str(mem_per_task).strip(), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"mem_per_task must look like '64G' or '8000M', got {mem_per_task!r}")
    return f"{int(match.group(1)) * tasks_per_node}{match.group(2).upper()}"


# What a SLURM client needs to find its cluster; every other SLURM_* / SRUN_* variable of a job describes it.
_CLIENT_SETTINGS = frozenset({"SLURM_CONF"})


@contextlib.contextmanager
def _outside_the_current_allocation() -> Iterator[None]:
    """Hide the variables of the allocation this process runs in (if any) while submitting.

    sbatch exports the submitting environment into the job, where srun reads ``SLURM_*`` as its options:
    an inherited ``SLURM_MEM_PER_CPU`` beside the job's own ``SLURM_MEM_PER_NODE`` (``--mem``) makes srun
    refuse to start any rank ("mutually exclusive"). ``submitit.helpers.clean_env`` would also hide
    ``SLURM_CONF`` (which cluster to submit to) and the user's own ``SBATCH_*`` defaults, so it is not used.
    """
    if "SLURM_JOB_ID" not in os.environ:  # outside a job every SLURM_* variable is the user's choice
        yield
        return
    hidden = {
        name: os.environ.pop(name)
        for name in list(os.environ)
        if name.startswith(("SLURM_", "SLURMD_", "SRUN_")) and name not in _CLIENT_SETTINGS
    }
    logger.info(
        "Submitting from inside SLURM job %s: its %d SLURM_* variables are left out of the training job",
        hidden["SLURM_JOB_ID"],
        len(hidden),
    )
    try:
        yield
    finally:
        os.environ.update(hidden)


def run_slurm(
    *,
    folder: str | Path,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    nodes: int = 1,
    gpus_per_node: int = 0,
    tasks_per_node: int | None = None,
    cpus_per_task: int = 1,
    mem_per_task: str | None = None,
    time_min: int = 60,
    constraint: str | None = None,
    signal_delay_s: int = 120,
    backend: str | None = None,
    max_requeues: int = 10,
    job_name: str = "iris-train",
    setup: Sequence[str] = (),
    additional_parameters: dict[str, Any] | None = None,
    poll_s: float = 2.0,
    lost_after_s: float = 900.0,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    **run_training_kwargs: Any,
) -> TrainResult:
    """Submit ``run_training`` as a SLURM job of ``nodes × tasks_per_node`` ranks, wait, return rank 0's
    result. ``on_metrics`` also receives ``{"tags": {...}}`` (job id, folder, world size) on submission."""
    import submitit

    for key in ("rank", "world_size"):
        if key in run_training_kwargs:
            raise TypeError(f"the slurm launcher sets {key} itself; do not pass it")
    # Checked here because otherwise a typo in train.launcher_options would be pickled into the job and
    # fail as a TypeError on every rank only after the job waited in the queue for its nodes.
    unknown = sorted(set(run_training_kwargs) - set(inspect.signature(run_training).parameters))
    if unknown:
        options = sorted(
            name
            for name, parameter in inspect.signature(run_slurm).parameters.items()
            if parameter.kind is parameter.KEYWORD_ONLY and name != "on_metrics"
        )
        raise ValueError(
            f"unknown slurm launcher option(s) {unknown} (check train.launcher_options); "
            f"the slurm launcher takes {options}"
        )
    if shutil.which("sbatch") is None:
        raise SlurmJobError(
            "the slurm launcher needs the SLURM client (sbatch) on PATH: run on a login node, or start a "
            "local cluster with slurm/local-cluster/start.sh and export the SLURM_CONF it prints"
        )
    tasks_per_node = tasks_per_node or max(1, gpus_per_node)
    world_size = nodes * tasks_per_node
    config = TrainConfig.from_dict(run_training_kwargs["train_config"])  # a bad config fails before queueing
    config.check_crop_fits(IrisConfig.from_dict(run_training_kwargs["model_config"]).size_divisor)
    if config.batch_size % world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world_size} SLURM ranks")
    resolve_device(config, 0, world_size=world_size)  # a GPU index for several ranks
    # absolute(), not resolve(): compute nodes may mount the shared filesystem under the configured path
    # but not under the login node's real one behind its symlinks.
    run_training_kwargs["checkpoint_dir"] = str(Path(run_training_kwargs["checkpoint_dir"]).absolute())

    # A new folder per submission (job ids repeat: a reinstalled cluster, a wrapped counter, and a folder
    # holding an older job's result files would pass for this job's), named without the job id so that
    # it exists before sbatch: a job that starts before a "%j" folder is made fails with no log at all.
    job_folder = Path(folder).absolute() / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    job_folder.mkdir(parents=True)
    executor = submitit.SlurmExecutor(folder=job_folder)
    parameters: dict[str, Any] = {
        "job_name": job_name,
        "partition": partition,
        "account": account,
        "qos": qos,
        "nodes": nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": cpus_per_task,
        "gpus_per_node": gpus_per_node or None,
        "mem": _memory_per_node(mem_per_task, tasks_per_node),
        "time": time_min,
        "constraint": constraint,
        "signal_delay_s": signal_delay_s,
        "setup": list(setup),
        # --requeue: allowed even where the site's JobRequeue=0; --kill-on-bad-exit: see module docstring.
        "additional_parameters": {"requeue": True, **(additional_parameters or {})},
        # --cpus-per-task again for srun: Slurm 22.05-23.02 srun no longer reads SLURM_CPUS_PER_TASK, and
        # with CPU binding each rank (and its data-loader workers) would then get a single core.
        "srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={cpus_per_task}"],
    }
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    with _outside_the_current_allocation():
        try:
            job = executor.submit(SlurmTrainingJob(run_training_kwargs, backend, max_requeues))
        except submitit.core.utils.FailedJobError as error:  # submitit's message is sbatch's whole call
            refusal = [line for line in str(error).splitlines() if "sbatch:" in line] or [str(error)]
            raise SlurmJobError(
                f"sbatch refused the training job: {' '.join(' '.join(refusal).split())[:500]}. Run on a "
                "SLURM login node (for a local cluster, export the SLURM_CONF that "
                f"slurm/local-cluster/start.sh prints) and check train.launcher_options; the submission "
                f"script is in {job_folder}"
            ) from None
    logger.info(
        "Submitted SLURM job %s: %d node(s) x %d rank(s); logs and metrics in %s",
        job.job_id,
        nodes,
        tasks_per_node,
        job.paths.folder,
    )
    watcher = _Watcher(str(job.job_id), config.steps, on_metrics)
    interrupt = _Interrupt()
    try:
        with interrupt:
            if on_metrics is not None:
                on_metrics(
                    {
                        "tags": {
                            "slurm_job_id": str(job.job_id),
                            "slurm_job_folder": str(job.paths.folder),
                            "world_size": str(world_size),
                        }
                    }
                )
            return _wait(job, world_size, watcher, poll_s, lost_after_s)
    except SlurmJobError:
        raise  # the job failed, ended or was lost: nothing left to cancel
    except BaseException as error:
        # Whatever stops the watching (Ctrl-C, SIGTERM, SIGHUP, a bug, an MLflow or filesystem error) must
        # not leave the job training on: nobody would collect its result, and a rerun would train a
        # second job into the same checkpoint folder.
        cancel_job(job.job_id)
        resume = f"its checkpoints stay in {run_training_kwargs['checkpoint_dir']}, so the next run resumes"
        if isinstance(error, KeyboardInterrupt):
            message = f"{interrupt.cause}: cancelled SLURM job {job.job_id}; {resume}"
            logger.error(message)
            with contextlib.suppress(OSError):  # also when logging is not configured; SIGHUP: no terminal
                print(message, file=sys.stderr, flush=True)
            # An Exception, not the interrupt: Kedro then runs its pipeline-error hooks, and kedro-mlflow
            # ends the MLflow run as FAILED instead of leaving it FINISHED.
            raise SlurmJobError(message) from None
        error.add_note(
            f"SLURM job {job.job_id} was cancelled because the Kedro process stopped watching it; {resume}"
        )
        raise
    finally:
        watcher.close()


__all__ = ["SlurmJobError", "SlurmTrainingJob", "job_state", "run_slurm"]
