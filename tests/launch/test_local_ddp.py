import os
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from training_synthetic import fast_train_config, tiny_model_config

from iris_pipelines.launch import RankFailedError, launch_training
from iris_pipelines.training import run_training


def _kwargs(collection, tmp_path, **overrides):
    manifest, index = collection
    return {
        "model_config": tiny_model_config(),
        "train_config": fast_train_config(**overrides),
        "episode_index": index,
        "preprocessed_manifest": manifest,
        "checkpoint_dir": tmp_path / "ck",
    }


def test_two_gloo_ranks_keep_identical_weights(collection, tmp_path):
    streamed = []  # the launching process holds the MLflow run: rank 0's records must reach it
    result = launch_training(
        "local_ddp",
        nprocs=2,
        backend="gloo",
        on_metrics=streamed.append,
        **_kwargs(collection, tmp_path, steps=3),
    )
    assert [record["step"] for record in streamed if "loss" in record] == [1, 2, 3]
    assert result.world_size == 2 and result.final_step == 3
    assert len(result.weights_checksum) == 2
    assert result.weights_checksum[0] == result.weights_checksum[1]
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert (result.state_dict["bank_updates"] > 0).any()


def test_a_failing_rank_is_named(collection, tmp_path):
    kwargs = _kwargs(collection, tmp_path, steps=1)
    kwargs["train_config"]["not_a_field"] = 1
    with pytest.raises(RankFailedError, match=r"rank \d.*unknown TrainConfig fields \['not_a_field'\]"):
        launch_training("local_ddp", nprocs=2, backend="gloo", **kwargs)


def test_ranks_share_the_cores_this_process_may_use_not_the_whole_node():
    """Under a SLURM or taskset allocation os.cpu_count() is every core of the node: ranks sized on it
    oversubscribe the allocation."""
    from iris_pipelines.launch.local_ddp import usable_cpus

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert usable_cpus() == len(allowed)


class Spawned(Exception):
    pass


def test_a_cpu_run_on_a_gpu_host_uses_gloo(monkeypatch, tmp_path):
    """Before, device: cpu with the local_ddp launcher on a GPU host picked NCCL, which takes no CPU
    tensors: every rank failed at its first collective."""
    from iris_pipelines.launch import local_ddp

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []

    def spawn(worker, args, nprocs, join):
        chosen.append(args[1])  # (world_size, backend, port, ...)
        raise Spawned

    monkeypatch.setattr(local_ddp.mp, "spawn", spawn)
    for device in ("cpu", "auto", "cuda"):
        with pytest.raises(Spawned):
            launch_training("local_ddp", nprocs=2, train_config={"device": device}, checkpoint_dir=tmp_path)
    assert chosen == ["gloo", "nccl", "nccl"]


def test_a_gpu_index_for_several_ranks_is_refused_before_any_rank_starts(monkeypatch, tmp_path):
    """``device: cuda:0`` with 2 ranks put both on GPU 0; it is refused before spawning or queueing."""
    import submitit

    from iris_pipelines.launch import local_ddp

    def spawned(*_args, **_kwargs):
        raise AssertionError("started ranks that would share one GPU")

    monkeypatch.setattr(local_ddp.mp, "spawn", spawned)
    with pytest.raises(ValueError, match=r"'cuda:0' puts all 2 ranks on one GPU"):
        launch_training("local_ddp", nprocs=2, train_config={"device": "cuda:0"}, checkpoint_dir=tmp_path)

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(submitit, "SlurmExecutor", spawned)
    with pytest.raises(ValueError, match=r"'cuda:0' puts all 4 ranks on one GPU"):
        launch_training(
            "slurm",
            folder=tmp_path / "jobs",
            nodes=2,
            tasks_per_node=2,
            model_config=tiny_model_config(),
            train_config=fast_train_config(device="cuda:0", batch_size=4),
            episode_index={},
            preprocessed_manifest=None,
            checkpoint_dir=tmp_path / "ck",
        )


def test_the_slurm_launcher_refuses_a_crop_the_network_cannot_take_before_queueing(monkeypatch, tmp_path):
    """Before, the pre-queue check took a crop no larger than 2**stages on every axis: the job waited for
    its nodes, then failed at its first forward step."""
    import submitit

    from iris_pipelines.model import IrisConfig

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))

    def submitted(**_kwargs):
        raise AssertionError("submitted a job whose config cannot train")

    monkeypatch.setattr(submitit, "SlurmExecutor", submitted)
    divisor = IrisConfig.from_dict(tiny_model_config()).size_divisor
    with pytest.raises(ValueError, match=rf"crop_size \[{divisor}, {divisor}, {divisor}\] is too small"):
        launch_training(
            "slurm",
            folder=tmp_path / "jobs",
            model_config=tiny_model_config(),
            train_config=fast_train_config(crop_size=divisor),
            episode_index={},
            preprocessed_manifest=None,
            checkpoint_dir=tmp_path / "ck",
        )
    assert not (tmp_path / "jobs").exists()


@pytest.mark.parametrize(
    ("device", "expected"), [("cpu", [("threads", 3)]), ("auto", [("gpu", 1)]), ("cuda", [("gpu", 1)])]
)
def test_a_rank_on_a_gpu_host_takes_a_gpu_only_when_it_trains_on_cuda(monkeypatch, device, expected):
    """Both launchers set every rank's CUDA device whenever the host had a GPU: ``device: cpu`` ranks each
    opened a CUDA context on a GPU they never used and got no CPU thread limit, so they thrashed."""
    from iris_pipelines.launch.local_ddp import place_rank

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    placed = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: placed.append(("gpu", index)))
    monkeypatch.setattr(torch, "set_num_threads", lambda count: placed.append(("threads", count)))
    place_rank({"device": device}, local_rank=3, cpu_threads=3)
    assert placed == expected


def _rank_with_its_own_checkpoint_folder(rank, world_size, store_port, kwargs, folders, errors):
    """One rank of a run whose ranks see different checkpoint folders (node-local disks)."""
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False)
    # Without the check the ranks would wait on each other's collectives: fail in a minute, not in 30.
    timeout = timedelta(minutes=1)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        run_training(**{**kwargs, "checkpoint_dir": folders[rank]}, rank=rank, world_size=world_size)
    except RuntimeError as error:
        Path(errors, f"rank{rank}.txt").write_text(str(error))
    finally:
        dist.destroy_process_group()


def test_ranks_that_resume_different_steps_stop_instead_of_training_apart(collection, tmp_path):
    """Each rank read the checkpoint folder on its own: with the folder on node-local disk, rank 0 resumed
    step 2 and rank 1 started afresh, and DDP averaged the gradients of two different models."""
    kwargs = _kwargs(collection, tmp_path, steps=2, checkpoint_every=2)
    launch_training("local_ddp", nprocs=2, backend="gloo", **kwargs)
    folders = [tmp_path / "node0", tmp_path / "node1"]
    shutil.copytree(kwargs["checkpoint_dir"], folders[0])  # only the first node holds the checkpoint
    errors = tmp_path / "errors"
    errors.mkdir()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    kwargs["train_config"] = fast_train_config(steps=4, checkpoint_every=2)
    mp.spawn(_rank_with_its_own_checkpoint_folder, args=(2, store.port, kwargs, folders, errors), nprocs=2)
    for rank in (0, 1):  # both stop (neither waits forever for the other) and name the steps
        message = (errors / f"rank{rank}.txt").read_text()
        assert "the ranks resumed from different checkpoints" in message
        assert "rank 0: step 2, rank 1: step 0" in message
    assert not (folders[1] / "step_00000004.pt").exists() and not (folders[0] / "step_00000004.pt").exists()


class CallbackFailed(Exception):
    pass


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="reads the process table in /proc")
def test_ranks_are_reaped_when_the_metrics_callback_fails(collection, tmp_path, monkeypatch):
    """Before, the launcher terminated the ranks but never joined them: they stayed zombies for as long as
    the launching process (a notebook kernel, a Kedro session) lived."""
    from iris_pipelines.launch import local_ddp

    contexts = []
    real_spawn = local_ddp.mp.spawn

    def spawn(*args, **kwargs):
        contexts.append(real_spawn(*args, **kwargs))
        return contexts[-1]

    def failing_callback(record):
        raise CallbackFailed("MLflow refused the record")

    monkeypatch.setattr(local_ddp.mp, "spawn", spawn)
    with pytest.raises(CallbackFailed):
        launch_training(
            "local_ddp",
            nprocs=2,
            backend="gloo",
            on_metrics=failing_callback,
            **_kwargs(collection, tmp_path, steps=2),
        )
    pids = [process.pid for process in contexts[0].processes]
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


def _ignore_sigterm_and_wait(ready):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(600)


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM cannot be ignored on Windows")
def test_a_rank_that_does_not_exit_on_sigterm_is_killed_and_reaped():
    from iris_pipelines.launch.local_ddp import stop_ranks

    context = mp.get_context("fork")  # the child runs one function of this module; fork starts it at once
    ready = context.Event()
    process = context.Process(target=_ignore_sigterm_and_wait, args=(ready,))
    process.start()
    try:
        assert ready.wait(60)
        stop_ranks([process], grace_s=0.5)
        assert process.exitcode == -signal.SIGKILL
        assert not Path(f"/proc/{process.pid}").exists()
    finally:
        if process.is_alive():
            process.kill()
            process.join()
