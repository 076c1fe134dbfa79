"""What a review of a registered version reports when parts of MLflow cannot be read."""

from __future__ import annotations

from types import SimpleNamespace

from iris_pipelines.registry import EVALUATION_RUN_TAG, RegisteredModel


class _UnreachableArtifactStore:
    """A tracking server that answers for runs while its artifact store is down."""

    def __init__(self) -> None:
        self.listings = 0

    def get_run(self, run_id: str) -> SimpleNamespace:
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(metrics={}, tags={}))

    def list_artifacts(self, run_id: str, path: str) -> list:
        self.listings += 1
        raise OSError(f"Connection refused:\n  s3://bucket/{run_id}/artifacts/{path}")


def test_an_unreachable_artifact_store_is_one_reported_line_read_once() -> None:
    client = _UnreachableArtifactStore()
    version = RegisteredModel(
        uri="models:/iris/3", name="iris", version="3", tracking_uri="http://mlflow:5000",
        tags={EVALUATION_RUN_TAG: "eval-run"}, run_id="train-run", run=client.get_run("train-run"),
        model_id=None, client=client,
    )  # fmt: skip
    assert version.evaluated_separately
    assert version.evaluation_parameters() is None
    assert version.evaluation_parameters() is None  # a review and --reproduce both ask
    assert client.listings == 1
    assert version.problems == [
        "artifacts of run eval-run: Connection refused: s3://bucket/eval-run/artifacts/config"
    ]
