"""model_info: which registry version the embedding and metric rows of a bundle are credited to."""

from __future__ import annotations

import pytest

from iris_pipelines.evaluation import ModelInfo
from iris_pipelines.inference.bundle import ModelBundle
from iris_pipelines.model import IrisConfig
from iris_pipelines.pipelines.embed_tasks.nodes import model_info


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
