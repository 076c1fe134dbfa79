import copy
import logging

import numpy as np
import pytest
import torch
from training_synthetic import fast_train_config, saved_case_rows, tiny_model_config

from iris_pipelines.launch import launch_training
from iris_pipelines.model import IrisConfig
from iris_pipelines.training import TrainConfig, latest_checkpoint, lr_factor, run_training, weights_checksum
from iris_pipelines.training.checkpoint import list_checkpoints
from iris_pipelines.training.loop import TrainingDiverged, resolve_device, validate, validation_episodes
from iris_pipelines.training.sampler import case_records


class Crash(RuntimeError):
    pass


def _run(collection, tmp_path, name="ck", on_metrics=None, **overrides):
    manifest, index = collection
    return run_training(
        tiny_model_config(),
        fast_train_config(**overrides),
        index,
        manifest,
        checkpoint_dir=tmp_path / name,
        on_metrics=on_metrics,
    )


def test_weights_checksum_covers_scalar_parameters():
    """A 0-dim parameter (a learned scale) is hashed, not a crash after training; shape and values count."""
    weights = {"scale": torch.tensor(5.0), "weight": torch.ones(2, 3), "empty": torch.zeros(0)}
    same = {name: value.clone() for name, value in weights.items()}
    assert weights_checksum(weights) == weights_checksum(same)
    assert weights_checksum(weights) != weights_checksum({**weights, "scale": torch.tensor(5.5)})
    assert weights_checksum(weights) != weights_checksum({**weights, "weight": torch.ones(2, 3) * 1.5})
    assert weights_checksum(weights) != weights_checksum({**weights, "weight": torch.ones(3, 2)})  # same data
    assert weights_checksum(weights) != weights_checksum({**weights, "scale": torch.tensor([5.0])})


@pytest.mark.parametrize(("local_rank", "expected"), [(None, 3), ("0", 0)], ids=["no launcher", "launcher"])
def test_a_rank_trains_on_the_gpu_of_its_local_rank(monkeypatch, local_rank, expected):
    """Rank 3 of 2 nodes x 3 ranks (4 GPUs each) is local rank 0 of the second node, whose launcher pinned
    cuda:0 for its NCCL collectives; rank % 4 GPUs would have put its model on cuda:3."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert resolve_device(TrainConfig(device="auto"), rank=3) == torch.device("cuda", expected)


def test_a_gpu_index_with_several_ranks_is_refused():
    """``cuda:0`` would put every rank on GPU 0; one rank may name its GPU."""
    with pytest.raises(ValueError, match=r"'cuda:0' puts all 2 ranks on one GPU; use 'auto'"):
        resolve_device(TrainConfig(device="cuda:0"), rank=1, world_size=2)
    assert resolve_device(TrainConfig(device="cuda:1"), rank=0) == torch.device("cuda", 1)
    assert resolve_device(TrainConfig(device="cuda"), rank=1, world_size=2) == torch.device("cuda")


def test_validation_scores_only_classes_both_crops_show(tmp_path):
    """Windows centred on two classes far apart show one of them: the other must neither be asked of the
    model with an empty reference nor score its empty target as a perfect 1.0."""
    label = np.zeros((96, 32, 32), np.uint8)
    label[40:70, 10:20, 10:20], label[88:94, 10:20, 10:20] = 1, 2
    rows = saved_case_rows(tmp_path, [label, label], "far")
    episode = {"split": "val", "dataset": "far", "query": "c0", "references": ["c1"], "classes": [1, 2]}
    episodes = validation_episodes({"episodes": [episode]}, case_records(rows))
    asked = []

    class PredictNothing(torch.nn.Module):
        def forward(self, query, ref, ref_masks):
            asked.append(ref_masks.flatten(2).sum(-1)[0].tolist())
            return torch.full((1, ref_masks.shape[1], *query.shape[2:]), -10.0)

    config = TrainConfig(crop_size=(32, 32, 32), device="cpu")
    assert validate(PredictNothing(), episodes, config, torch.device("cpu"), step=1) == [
        {"step": 1, "dataset": "far", "dice": 0.0}
    ]
    assert asked == [[1900]], "one class, z 51..69 of the window [51, 83) on the union of both"


def test_lr_schedule_warms_up_then_decays_exponentially():
    config = TrainConfig(steps=21, warmup_steps=5, final_lr_fraction=0.01)
    factors = [lr_factor(i, config) for i in range(config.steps)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(0.01 ** (1 / 3))  # 5 of the 15 decay steps done
    assert factors[20] == pytest.approx(0.01)
    ratios = [factors[i + 1] / factors[i] for i in range(5, 20)]
    assert ratios == pytest.approx([ratios[0]] * len(ratios))  # constant ratio = exponential


@pytest.mark.parametrize(
    "recipe",
    [{}, {"optimizer": "adamw", "auto_mask_prob": 0.5}],
    ids=["paper_lamb", "phantom_adamw_auto_masks"],
)
def test_restart_resumes_exactly(collection, tmp_path, recipe):
    reference = _run(collection, tmp_path, "uninterrupted", checkpoint_every=2, **recipe)

    def crash_at_step_3(record):
        if record.get("step") == 3 and "loss" in record:
            raise Crash("simulated kill after step 3")

    with pytest.raises(Crash):
        _run(collection, tmp_path, "restarted", on_metrics=crash_at_step_3, checkpoint_every=2, **recipe)
    assert latest_checkpoint(tmp_path / "restarted").name == "step_00000002.pt"
    resumed = _run(collection, tmp_path, "restarted", checkpoint_every=2, **recipe)

    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    for before, after in zip(reference.history, resumed.history, strict=True):
        assert after["loss"] == pytest.approx(before["loss"], abs=1e-6)
        assert after["lr"] == before["lr"]
    assert resumed.weights_checksum == reference.weights_checksum


@pytest.fixture(scope="module")
def short_run(collection, tmp_path_factory):
    metrics = []
    result = _run(
        collection,
        tmp_path_factory.mktemp("short"),
        on_metrics=metrics.append,
        steps=20,
        warmup_steps=3,
        val_every=10,
        checkpoint_every=10,
    )
    return result, metrics


def test_short_run_lowers_the_loss(short_run):
    result, _ = short_run
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 20 and result.final_step == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_metrics_are_streamed_and_validation_covers_val_datasets(short_run):
    result, metrics = short_run
    assert sorted(map(str, metrics)) == sorted(map(str, result.history + result.validation))
    assert {(v["step"], v["dataset"]) for v in result.validation} == {
        (s, d) for s in (10, 20) for d in ("alpha", "beta")
    }
    assert all(0.0 <= v["dice"] <= 1.0 for v in result.validation)
    assert set(result.history[0]) == {"step", "loss", "dice_loss", "ce_loss", "lr", "samples_per_s"}


def test_memory_bank_holds_the_trained_classes(short_run):
    result, _ = short_run
    assert result.model_config["memory_bank_size"] == len(result.class_ids) == 3
    assert (result.state_dict["bank_updates"] > 0).all()
    bank = result.state_dict["memory_bank"]
    assert bank.shape[0] == 3 and (bank.abs().sum((1, 2)) > 0).all()
    assert all(t.device == torch.device("cpu") for t in result.state_dict.values())


def test_workers_produce_the_same_stream(collection, tmp_path):
    serial = _run(collection, tmp_path, "serial", steps=2)
    parallel = _run(collection, tmp_path, "workers", steps=2, num_workers=1)
    assert [h["loss"] for h in parallel.history] == pytest.approx(
        [h["loss"] for h in serial.history], abs=1e-6
    )


def test_in_process_launcher_and_unknown_launcher(collection, tmp_path):
    manifest, index = collection
    kwargs = {
        "model_config": tiny_model_config(),
        "train_config": fast_train_config(steps=1),
        "episode_index": index,
        "preprocessed_manifest": manifest,
        "checkpoint_dir": tmp_path / "ip",
    }
    result = launch_training("in_process", **kwargs)
    assert result.world_size == 1 and result.final_step == 1 and len(result.weights_checksum) == 1
    with pytest.raises(ValueError, match="unknown launcher 'slurmish'"):
        launch_training("slurmish", **kwargs)
    with pytest.raises(TypeError, match="sets rank itself"):
        launch_training("in_process", rank=1, **kwargs)


def test_task_augmentation_recipe_trains_and_logs_the_exclusive_term(collection, tmp_path):
    """Shared flips, class unions and the exclusive term together: a real step, its loss logged apart."""
    result = _run(
        collection, tmp_path, steps=2, shared_flips=True, class_union_prob=1.0, exclusive_weight=0.5
    )
    for record in result.history:
        assert record["exclusive_loss"] > 0
        assert record["loss"] == pytest.approx(
            record["dice_loss"] + record["ce_loss"] + 0.5 * record["exclusive_loss"], rel=1e-5
        )


def test_a_diverging_run_stops_before_its_weights_replace_the_good_checkpoints(collection, tmp_path):
    """Pruning keeps two checkpoints: NaN weights saved twice would leave nothing to resume from."""
    with pytest.raises(
        TrainingDiverged,
        match="training diverged: the (loss is nan|weights hold NaN|gradient norm is (nan|inf))",
    ) as caught:
        _run(collection, tmp_path, "diverged", lr=1e8, checkpoint_every=1, steps=6)
    assert "Lower train.lr" in str(caught.value)
    saved = [torch.load(path, weights_only=False) for path in list_checkpoints(tmp_path / "diverged")]
    assert all(torch.isfinite(v).all() for ckpt in saved for v in ckpt["model"].values())


def test_clipping_can_be_turned_off(collection, tmp_path):
    result = _run(collection, tmp_path, "unclipped", grad_clip=None, steps=2)
    assert result.final_step == 2 and all(np.isfinite(h["loss"]) for h in result.history)


def test_a_resume_with_a_new_lr_and_weight_decay_uses_them(collection, tmp_path):
    """The optimiser's saved state holds the old values; the warning promises the new ones."""

    def crash_at_step_3(record):
        if record.get("step") == 3 and "loss" in record:
            raise Crash("simulated kill after step 3")

    with pytest.raises(Crash):
        _run(collection, tmp_path, on_metrics=crash_at_step_3, checkpoint_every=2, lr=5e-2, weight_decay=0.5)
    resumed = _run(collection, tmp_path, checkpoint_every=2, lr=1e-3, weight_decay=1e-5)
    new = TrainConfig.from_dict(fast_train_config(checkpoint_every=2, lr=1e-3, weight_decay=1e-5))
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    for record in resumed.history[2:]:
        assert record["lr"] == pytest.approx(1e-3 * lr_factor(record["step"] - 1, new))
    saved = torch.load(latest_checkpoint(tmp_path / "ck"), weights_only=False)
    assert {group["weight_decay"] for group in saved["optimizer"]["param_groups"]} == {1e-5}


def test_a_checkpoint_is_not_resumed_on_another_number_of_ranks(collection, tmp_path):
    from iris_pipelines.training import loop

    _run(collection, tmp_path, steps=2, checkpoint_every=2)
    assert torch.load(latest_checkpoint(tmp_path / "ck"), weights_only=False)["world_size"] == 1
    config = TrainConfig.from_dict(fast_train_config(steps=2))
    model = torch.nn.Linear(1, 1)  # refused before any state is loaded into it
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    scheduler = loop.LambdaLR(optimizer, lambda index: 1.0)
    with pytest.raises(RuntimeError, match=r"written by a run on 1 rank\(s\), this one has 2"):
        loop._resume(tmp_path / "ck", model, optimizer, scheduler, config, torch.device("cpu"), world_size=2)


def test_a_crop_the_network_cannot_take_is_refused_before_the_first_step(collection, tmp_path):
    """Before, a crop no larger than 2**stages on every axis passed setup and failed at the first forward
    step with the model's error, after a SLURM job had waited for its nodes."""
    divisor = IrisConfig.from_dict(tiny_model_config()).size_divisor
    metrics = []
    refused = rf"invalid TrainConfig: crop_size \[{divisor}, {divisor}, {divisor}\] is too small"
    with pytest.raises(ValueError, match=refused):
        _run(collection, tmp_path, on_metrics=metrics.append, crop_size=divisor, steps=1)
    assert metrics == [] and not (tmp_path / "ck").exists()


def test_an_index_without_class_tables_for_its_train_datasets_is_refused_at_setup(collection, tmp_path):
    """Before, an episode index whose class tables were empty trained into "the memory bank is disabled"
    at step 1, naming neither the index nor what to do."""
    manifest, index = collection
    index = copy.deepcopy(index)
    index["classes"] = {}
    with pytest.raises(ValueError, match=r"no class-table entries.*re-run `kedro run --pipelines=episodes`"):
        _run((manifest, index), tmp_path, steps=1)
    assert not (tmp_path / "ck").exists()


def test_a_resumed_run_checkpoints_the_rng_state_of_an_uninterrupted_one(collection, tmp_path):
    """Before, the resumed run's data loader drew its base seed from the global torch RNG after the
    checkpoint's state was restored: the weights matched, but its checkpoints held another RNG state, so
    anything drawing from that RNG later would have diverged."""
    _run(collection, tmp_path, "uninterrupted", checkpoint_every=2)

    def crash_at_step_3(record):
        if record.get("step") == 3 and "loss" in record:
            raise Crash("simulated kill after step 3")

    with pytest.raises(Crash):
        _run(collection, tmp_path, "restarted", on_metrics=crash_at_step_3, checkpoint_every=2)
    _run(collection, tmp_path, "restarted", checkpoint_every=2)
    reference = torch.load(latest_checkpoint(tmp_path / "uninterrupted"), weights_only=False)
    resumed = torch.load(latest_checkpoint(tmp_path / "restarted"), weights_only=False)
    assert reference["step"] == resumed["step"] == 4
    assert torch.equal(resumed["rng"]["torch"], reference["rng"]["torch"])
    assert resumed["rng"]["python"] == reference["rng"]["python"]


def test_a_nan_loss_stops_training_at_its_own_step_before_the_optimiser_takes_it(
    collection, tmp_path, monkeypatch
):
    """Before, the loss was read only on logging steps: a NaN at step 2 with log_every=5 was reported at
    step 5, with step 5's lr, after three optimiser steps on NaN gradients."""
    from iris_pipelines.training import loop

    real_loss, calls = loop.segmentation_loss, []

    def nan_at_step_2(logits, *args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == 2:  # as a bad episode (a NaN voxel, an overflow under bf16) would
            logits = logits * float("nan")
        return real_loss(logits, *args, **kwargs)

    monkeypatch.setattr(loop, "segmentation_loss", nan_at_step_2)
    with pytest.raises(TrainingDiverged, match="the gradient norm is nan at step 2 ") as caught:
        _run(collection, tmp_path, steps=8, log_every=5)
    config = TrainConfig.from_dict(fast_train_config(steps=8))
    assert f"(lr {config.lr * lr_factor(1, config):.3g};" in str(caught.value)
    assert calls == [1, 2]


def test_a_resume_names_the_changed_recipe_keys_and_ignores_scheduling_ones(collection, tmp_path, caplog):
    """Before, a resume after lowering num_workers (or log_every, ...) warned of "a different train config"
    without naming a key, as did a changed lr."""
    _run(collection, tmp_path, steps=2, checkpoint_every=2)
    with caplog.at_level(logging.WARNING, logger="iris_pipelines.training.loop"):
        _run(collection, tmp_path, steps=2, checkpoint_every=1, log_every=2, val_every=3)
        assert [r.message for r in caplog.records if r.name == "iris_pipelines.training.loop"] == []
        _run(collection, tmp_path, steps=2, checkpoint_every=2, lr=5e-3, weight_decay=0.5)
    assert "written with another train config (lr 0.002 → 0.005, weight_decay 1e-05 → 0.5)" in caplog.text


def test_a_newest_checkpoint_lacking_keys_is_passed_over_for_the_one_before(collection, tmp_path, caplog):
    """Before, a readable file of other code in the folder failed every resume with a bare KeyError."""
    _run(collection, tmp_path, steps=2, checkpoint_every=1)
    good = torch.load(latest_checkpoint(tmp_path / "ck"), weights_only=False)
    foreign = tmp_path / "ck" / "step_00000003.pt"
    torch.save({"model": good["model"], "step": 3}, foreign)
    resumed = _run(collection, tmp_path, steps=3, checkpoint_every=1)
    assert [h["step"] for h in resumed.history] == [1, 2, 3]
    assert f"training checkpoint {foreign} lacks ['optimizer', 'scheduler', 'rng', 'sampler'," in caplog.text


def test_a_second_run_in_a_checkpoint_folder_another_run_writes_to_is_refused(collection, tmp_path):
    """Before, two runs of one recipe shared the folder, and each deleted the other's temporary files
    mid-write: a bare FileNotFoundError, or checkpoints of two runs interleaved."""
    refusals = []

    def start_a_second_run(record):
        if record.get("step") == 1 and "loss" in record:
            try:
                _run(collection, tmp_path, steps=2)
            except RuntimeError as error:
                refusals.append(str(error))

    assert _run(collection, tmp_path, on_metrics=start_a_second_run, steps=2).final_step == 2
    assert len(refusals) == 1
    assert f"another training run is writing checkpoints in {tmp_path / 'ck'}" in refusals[0]
    assert _run(collection, tmp_path, steps=2).final_step == 2  # the lock went with the run that ended

    def crash_at_step_1(record):
        raise Crash("simulated failure")

    with pytest.raises(Crash):
        _run(collection, tmp_path, "failed", on_metrics=crash_at_step_1, steps=1)
    assert _run(collection, tmp_path, "failed", steps=1).final_step == 1  # and with the one that failed


def test_ranks_that_end_with_different_weights_are_refused_naming_them(tmp_path):
    from iris_pipelines.training.loop import require_same_weights_on_every_rank

    require_same_weights_on_every_rank(["a" * 64] * 3, tmp_path)
    with pytest.raises(
        RuntimeError, match=r"different weights \(ranks 0, 2: aaaaaaaaaaaa…; rank 1: bbbbbbbbbbbb…\)"
    ):
        require_same_weights_on_every_rank(["a" * 64, "b" * 64, "a" * 64], tmp_path)
