import os

import pytest
import torch
from training_synthetic import fast_train_config, tiny_model_config

from iris_pipelines.launch import RankFailedError, launch_training


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
