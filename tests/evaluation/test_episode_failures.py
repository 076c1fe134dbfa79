"""A bad episode is recorded with its error and the others are still scored; a label file edited after
preprocessing is one; a class the memory bank lacks costs only that class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from iris_pipelines.evaluation import EvaluateParams, EvaluationError, ModelInfo, evaluate_episodes
from iris_pipelines.training.sampler import case_records

INFO = ModelInfo("models:/iris/7", "7", "f00d")
QUICK = EvaluateParams(strategies=("one_shot",), baselines=("paste",), roi_size=(32, 32, 32))
NO_EMBEDDINGS = pd.DataFrame(columns=["source", "weights_sha256"])  # one-shot and paste need none


def _evaluate(bundle, manifest: pd.DataFrame, index: dict, params: EvaluateParams = QUICK, model=None):
    return evaluate_episodes(
        model or bundle.build_model(), bundle.class_ids, index, manifest, case_records(manifest),
        NO_EMBEDDINGS, params, INFO,
    )  # fmt: skip


def _test_episodes(index: dict) -> list[dict]:
    return [e for e in index["episodes"] if e["split"] == "test"]


def _query_row(manifest: pd.DataFrame, episode: dict) -> pd.Series:
    return (manifest.dataset == episode["dataset"]) & (manifest.case_id == episode["query"])


def test_a_bad_episode_is_recorded_with_its_error_and_the_others_are_scored(
    untrained_bundle, collection, tmp_path: Path, caplog
) -> None:
    """A missing label file and a query absent from the manifest stopped the whole stage, losing every
    episode already scored."""
    manifest, index = collection
    episodes = _test_episodes(index)
    no_label, no_query, *fine = episodes
    broken = manifest.copy()
    broken.loc[_query_row(broken, no_label), "label_path"] = str(tmp_path / "gone_label.nii.gz")
    broken = broken[~_query_row(broken, no_query)]
    with caplog.at_level("WARNING", logger="iris_pipelines.evaluation.evaluate"):
        metrics = _evaluate(untrained_bundle, broken, index)

    assert set(metrics.episode_id) == {e["episode_id"] for e in episodes}
    errors = metrics.groupby("episode_id")["error"].unique()
    [missing_file] = errors[no_label["episode_id"]]
    assert missing_file.startswith(str(tmp_path / "gone_label.nii.gz")) and "does not exist" in missing_file
    [missing_query] = errors[no_query["episode_id"]]
    dataset, query = no_query["dataset"], no_query["query"]
    assert missing_query == f"case(s) ['{query}'] of dataset {dataset} are not in the preprocessed manifest"
    for episode in (no_label, no_query):
        rows = metrics[metrics.episode_id == episode["episode_id"]]
        # every method × class the episode would have had, left unscored
        assert set(rows.method) == {"one_shot", "paste"} and rows.dice.isna().all()
        assert set(rows.label) <= {int(c) for c in episode["classes"]} and len(rows) >= 2
        assert f"episode {episode['episode_id']} could not be scored" in caplog.text
    scored = metrics[metrics.episode_id.isin([e["episode_id"] for e in fine])]
    assert (scored.error == "").all() and scored.dice.notna().all()


def test_when_no_episode_can_be_scored_the_stage_fails(untrained_bundle, collection, tmp_path: Path) -> None:
    manifest, index = collection
    broken = manifest.assign(label_path=str(tmp_path / "gone_label.nii.gz"))
    with pytest.raises(
        EvaluationError, match=r"none of the 5 evaluated episode\(s\) could be scored \(alpha/"
    ):
        _evaluate(untrained_bundle, broken, index)


def _without_classes(manifest: pd.DataFrame, dataset: str, case_id: str) -> None:
    """The case holds no class in ``manifest``, as on a grid too coarse for its structures."""
    row = (manifest.dataset == dataset) & (manifest.case_id == case_id)
    manifest.loc[row, "class_bboxes"] = json.dumps({})
    voxels = json.loads(manifest.loc[row, "class_voxels"].item())
    manifest.loc[row, "class_voxels"] = json.dumps(dict.fromkeys(voxels, 0))


def test_an_episode_whose_query_and_reference_share_no_class_here_is_a_failure(
    untrained_bundle, collection
) -> None:
    """An index built from another manifest: such an episode was dropped without a row, and when every
    episode was, evaluate returned an empty table as if it had scored something."""
    manifest, index = collection
    lost, *fine = _test_episodes(index)
    changed = manifest.copy()
    _without_classes(changed, lost["dataset"], lost["references"][0])
    metrics = _evaluate(untrained_bundle, changed, index)
    rows = metrics[metrics.episode_id == lost["episode_id"]]
    assert set(rows.method) == {"one_shot", "paste"} and rows.dice.isna().all()
    assert set(rows.label) == {int(c) for c in lost["classes"]}
    assert rows.error.str.contains("the episode index was built from another one").all()
    assert set(metrics.episode_id) == {e["episode_id"] for e in (lost, *fine)}

    for episode in fine:
        _without_classes(changed, episode["dataset"], episode["references"][0])
    with pytest.raises(EvaluationError, match="none of the 5 evaluated episode"):
        _evaluate(untrained_bundle, changed, index)


def test_a_label_file_edited_after_preprocessing_is_refused(
    untrained_bundle, collection, tmp_path: Path
) -> None:
    """The label was read without comparing it to the manifest's checksum: an edited file was scored
    against the classes and references of the one that was preprocessed."""
    manifest, index = collection
    edited_episode, *others = _test_episodes(index)
    original = manifest.loc[_query_row(manifest, edited_episode), "label_path"].item()
    edited = tmp_path / Path(original).name
    shutil.copyfile(original, edited)
    manifest = manifest.copy()
    manifest.loc[_query_row(manifest, edited_episode), "label_path"] = str(edited)
    same_bytes = _evaluate(untrained_bundle, manifest, index)
    assert (same_bytes.error == "").all()  # a copy with the recorded bytes is the same truth

    image = sitk.ReadImage(str(edited))
    labels = sitk.GetArrayFromImage(image)
    labels[labels == 2] = 0  # one class erased after preprocessing
    rewritten = sitk.GetImageFromArray(labels)
    rewritten.CopyInformation(image)
    sitk.WriteImage(rewritten, str(edited))
    metrics = _evaluate(untrained_bundle, manifest, index)

    rows = metrics[metrics.episode_id == edited_episode["episode_id"]]
    assert rows.dice.isna().all()
    [error] = rows.error.unique()
    assert error.startswith(f"{edited}: the label file changed after preprocessing")
    assert "the preprocessed manifest is stale; re-run ingest, preprocess" in error
    others = metrics[metrics.episode_id != edited_episode["episode_id"]]
    assert (others.error == "").all()


def test_evaluation_refuses_a_manifest_without_label_checksums(untrained_bundle, collection) -> None:
    manifest, index = collection
    with pytest.raises(ValueError, match="no label_sha256 column.*re-run preprocess"):
        _evaluate(untrained_bundle, manifest.drop(columns="label_sha256"), index)


def test_a_class_missing_from_the_memory_bank_costs_only_that_class(untrained_bundle, collection) -> None:
    """One class without a bank slot zeroed memory_bank for every class of the episode."""
    manifest, index = collection
    model = untrained_bundle.build_model()
    model.bank_updates[untrained_bundle.class_ids["alpha/2"]] = 0  # never in a training episode
    params = EvaluateParams(strategies=("memory_bank",), baselines=(), roi_size=(32, 32, 32))
    metrics = _evaluate(untrained_bundle, manifest, index, params, model=model)

    alpha = metrics[metrics.dataset == "alpha"].set_index("label")
    assert alpha.loc[1, "error"] == "" and alpha.loc[1, "prediction_voxels"] > 0
    assert alpha.loc[2, "error"] == (
        "the memory bank holds no embedding for ['alpha/2']: they never appeared in a training episode"
    )
    assert alpha.loc[2, "prediction_voxels"] == 0 and np.isfinite(alpha.loc[2, "dice"])
    beta = metrics[metrics.dataset == "beta"]
    assert (beta.error == "").all() and (beta.prediction_voxels > 0).any()


@pytest.mark.parametrize("check", [0.0, 1.0])
def test_checked_is_one_shot_where_the_reference_check_passes_and_registration_where_it_fails(
    untrained_bundle, collection, monkeypatch, check
) -> None:
    """``checked`` decides per class from the reference alone: a class its own reference does not show
    again (Dice below 0.5) takes the registered reference mask, the others keep one-shot's logits."""
    from iris_pipelines.evaluation.evaluate import _Runner

    manifest, index = collection
    monkeypatch.setattr(
        _Runner, "reference_check", lambda self, episode, task: dict.fromkeys(episode.classes, check)
    )
    params = EvaluateParams(
        strategies=("one_shot", "checked"), baselines=("registration",), roi_size=(32, 32, 32),
        registration={"deformable": False, "affine_iterations": 5},
    )  # fmt: skip
    metrics = _evaluate(untrained_bundle, manifest, index, params)
    dice = metrics.pivot_table(index=["episode_id", "label"], columns="method", values="dice")
    assert (metrics.reference_check_dice == check).all()
    followed = "one_shot" if check >= 0.5 else "registration"
    np.testing.assert_array_equal(dice["checked"], dice[followed])
    assert not np.array_equal(dice["one_shot"], dice["registration"])  # the two differ, so the test can fail


def test_checked_reuses_the_one_shot_registration_and_check_the_episode_already_ran(
    untrained_bundle, collection, monkeypatch
) -> None:
    """``checked`` ran one-shot, the reference check and registration again although the other rows of the
    episode had just computed them, and the check encoded the first reference a second time."""
    from iris_pipelines.evaluation import evaluate

    manifest, index = collection
    calls = {"segment": 0, "encode": 0, "register": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(evaluate._Runner, "segment", counted("segment", evaluate._Runner.segment))
    monkeypatch.setattr(evaluate, "class_embeddings", counted("encode", evaluate.class_embeddings))
    register = counted("register", evaluate.registration_baseline)
    monkeypatch.setattr(evaluate, "registration_baseline", register)
    params = EvaluateParams(
        strategies=("checked", "one_shot"), baselines=("registration",), roi_size=(32, 32, 32),
        registration={"deformable": False, "affine_iterations": 5},
    )  # fmt: skip
    metrics = _evaluate(untrained_bundle, manifest, index, params)

    episodes = _test_episodes(index)
    assert (metrics.error == "").all() and set(metrics.episode_id) == {e["episode_id"] for e in episodes}
    # per episode: one query segmentation (one-shot) and one of the first reference (the check)
    assert calls["segment"] == 2 * len(episodes)
    assert calls["register"] == len(episodes)
    assert calls["encode"] == sum(len(e["references"]) for e in episodes)


def test_a_method_that_reuses_a_result_is_charged_its_seconds(monkeypatch) -> None:
    """``seconds`` is what a method costs run alone, whichever method computed a shared result first."""
    from iris_pipelines.evaluation import evaluate

    clock = iter([10.0, 13.0])  # the first computation takes 3 s
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: next(clock))
    shared = evaluate._Shared()
    assert shared.get("one_shot", lambda: "logits") == "logits" and shared.charged == 0.0
    assert shared.get("one_shot", lambda: pytest.fail("computed twice")) == "logits"
    assert shared.charged == 3.0
