"""embed_tasks: which registry version its rows are credited to, which reference pool and window it uses."""

from __future__ import annotations

import logging

import pytest

from iris_pipelines.evaluation import ModelInfo
from iris_pipelines.evaluation.embeddings import embedded_roi_size
from iris_pipelines.inference.bundle import ModelBundle
from iris_pipelines.model import IrisConfig
from iris_pipelines.pipelines.embed_tasks.nodes import embed_tasks, model_info
from iris_pipelines.pipelines.evaluate.nodes import evaluate_strategies


def _bundle(weights: str) -> ModelBundle:
    return ModelBundle(
        model_config=IrisConfig.tiny().to_dict(), state_dict={}, metadata={"weights_checksum": [weights]}
    )


def test_a_registered_entry_of_other_weights_is_refused() -> None:
    """A train run that saved model B but failed to register it leaves version 1 (model A) as latest."""
    registered = {"name": "iris", "version": "1", "model_uri": "models:/iris/1", "weights_sha256": "aaa"}
    with pytest.raises(ValueError, match=r"models:/iris/1, whose weights are aaa, but iris_model holds bbb"):
        model_info(_bundle("bbb"), registered)


def test_matching_and_older_registered_entries_are_credited() -> None:
    registered = {"name": "iris", "version": "1", "model_uri": "models:/iris/1"}
    expected = ModelInfo("models:/iris/1", "1", "aaa")
    assert model_info(_bundle("aaa"), {**registered, "weights_sha256": "aaa"}) == expected
    # registered_model.json written before the checksum was recorded: nothing to compare against
    assert model_info(_bundle("aaa"), registered) == expected


# ------------------------------------------------------------------ reference pool and window of embed_tasks


def _one_dataset(index: dict, dataset: str) -> dict:
    """``index`` cut down to one dataset, so a test embeds a handful of references, not the collection."""
    return {
        **index,
        "cases": [case for case in index["cases"] if case["dataset"] == dataset],
        "classes": {dataset: index["classes"][dataset]},
        "episodes": [],
    }


def _trained_on_crop(bundle: ModelBundle, crop: list[int]) -> ModelBundle:
    """``bundle`` as the train pipeline saves it: its metadata records the training crop."""
    metadata = {**bundle.metadata, "train_config": {"crop_size": crop}}
    return ModelBundle(bundle.model_config, bundle.state_dict, bundle.class_ids, metadata)


def test_a_reference_case_missing_from_the_manifest_is_refused(untrained_bundle, collection) -> None:
    """A newer preprocess that rejected a case leaves an episode_index listing it: skipping it silently drew
    another reference pool (or none) than the model was evaluated on, where train refuses the mismatch."""
    manifest, index = collection
    gamma = _one_dataset(index, "gamma")  # held out: its reference pool is the context split
    dropped = next(case["case_id"] for case in gamma["cases"] if case["split"] == "context")
    short = manifest[~((manifest.dataset == "gamma") & (manifest.case_id == dropped))]
    params = {"references_per_class": 1, "roi_size": [32, 32, 32], "seed": 0}
    with pytest.raises(
        KeyError,
        match=rf"episode_index context case \('gamma', '{dropped}'\) is missing from preprocessed_manifest: "
        r".*re-run episodes on this manifest",
    ):
        embed_tasks(untrained_bundle, {}, gamma, short, params)


def test_a_class_no_reference_holds_is_named_in_a_warning(untrained_bundle, collection, caplog) -> None:
    """Retrieval and the t-SNE map then go without the class: the log says which, not only a row count."""
    manifest, index = collection
    gamma = _one_dataset(index, "gamma")
    gamma["classes"] = {"gamma": {**gamma["classes"]["gamma"], "7": {"name": "ghost", "novel": False}}}
    params = {"references_per_class": 1, "roi_size": [32, 32, 32], "seed": 0}
    with caplog.at_level(logging.WARNING):
        table = embed_tasks(untrained_bundle, {}, gamma, manifest, params)
    assert set(table[table.source == "reference"].label) == {1}
    assert "no context case of dataset gamma holds class 7 (ghost)" in caplog.text
    assert "class 1 " not in caplog.text  # a class with references is not warned about


def test_embed_tasks_encodes_in_the_training_crop_unless_told_otherwise(
    untrained_bundle, collection, caplog
) -> None:
    """`iris segment` and the pyfunc encode references in the training crop; embed_tasks defaulted to 64³
    and said nothing about a params:embed_tasks.roi_size of another size."""
    manifest, index = collection
    gamma = _one_dataset(index, "gamma")
    bundle = _trained_on_crop(untrained_bundle, [32, 32, 32])
    params = {"references_per_class": 1, "seed": 0}
    with caplog.at_level(logging.WARNING):
        table = embed_tasks(bundle, {}, gamma, manifest, params)
    assert embedded_roi_size(table) == (32, 32, 32)
    assert "roi_size" not in caplog.text
    with caplog.at_level(logging.WARNING):
        table = embed_tasks(bundle, {}, gamma, manifest, {**params, "roi_size": [24, 24, 24]})
    assert embedded_roi_size(table) == (24, 24, 24)  # a deliberate other window is used, and said
    assert (
        "params:embed_tasks.roi_size is [24, 24, 24] voxels, but the model was trained on [32, 32, 32]-voxel "
        "crops" in caplog.text
    )


def test_evaluate_windows_default_to_the_training_crop_and_a_mismatch_is_said(
    untrained_bundle, collection, caplog
) -> None:
    """Left out of both params sections, embed_tasks and evaluate must agree on the window (retrieval refuses
    embeddings of another one); a set evaluate.roi_size other than the crop is logged."""
    manifest, index = collection
    gamma = _one_dataset(index, "gamma")
    bundle = _trained_on_crop(untrained_bundle, [32, 32, 32])
    table = embed_tasks(bundle, {}, gamma, manifest, {"references_per_class": 1, "seed": 0})
    evaluate = {"strategies": ["retrieval"], "baselines": []}
    with caplog.at_level(logging.WARNING):
        assert evaluate_strategies(bundle, {}, table, gamma, manifest, evaluate).empty
    assert "roi_size" not in caplog.text
    with caplog.at_level(logging.WARNING):
        evaluate_strategies(bundle, {}, table, gamma, manifest, {**evaluate, "strategies": ["one_shot"],
                                                                 "roi_size": [24, 24, 24]})  # fmt: skip
    assert (
        "params:evaluate.roi_size is [24, 24, 24] voxels, but the model was trained on [32, 32, 32]-voxel "
        "crops" in caplog.text
    )
