"""What a review of a registered version reports when parts of MLflow cannot be read."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from iris_pipelines import registry
from iris_pipelines.registry import EVALUATION_RUN_TAG, RegisteredModel, RegistryError


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


def test_each_version_loads_its_own_bundle_when_one_run_registered_twice(tmp_path) -> None:
    """kedro-mlflow may reuse a run (``run.id`` in mlflow.yml): its ``model_bundle`` artifact then holds
    the last registration only, while each version's logged model holds its own."""
    import mlflow
    import pandas as pd
    import torch
    from mlflow_support import temporary_mlflow_store

    from iris_pipelines import registry
    from iris_pipelines.inference.bundle import ModelBundle
    from iris_pipelines.model import Iris, IrisConfig
    from iris_pipelines.pipelines.train.nodes import register_model
    from iris_pipelines.training import weights_checksum

    with temporary_mlflow_store(tmp_path) as uri, mlflow.start_run():
        uris, registered = [], []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = Iris(IrisConfig.tiny())
            registered.append(weights_checksum(model.state_dict()))
            bundle = ModelBundle.from_model(model, metadata={"weights_checksum": [registered[-1]]})
            entry = register_model(bundle, {"checksum": "c"}, pd.DataFrame({"cache_key": ["k"]}), {})
            uris.append(entry["model_uri"])
        loaded = [registry.resolve(model_uri, uri).load_bundle().weights_checksum for model_uri in uris]
    assert loaded == registered and registered[0] != registered[1]


class _NotFound(Exception):
    error_code = "RESOURCE_DOES_NOT_EXIST"


class _Registry:
    """A registry holding versions 1 and 2 of ``iris``, version 1 aliased ``champion``."""

    def get_model_version(self, name: str, version: str) -> SimpleNamespace:
        if name != "iris" or version not in ("1", "2"):
            raise _NotFound(f"Model Version (name={name}, version={version}) not found")
        tags = {key: "x" for key in registry.REQUIRED_VERSION_TAGS}
        return SimpleNamespace(
            version=version, tags=tags, status="READY", run_id=f"run{version}", model_id=None, source=""
        )

    def get_run(self, run_id: str) -> SimpleNamespace:
        info = SimpleNamespace(run_id=run_id, status="FINISHED", lifecycle_stage="active")
        return SimpleNamespace(info=info, data=SimpleNamespace(metrics={}, params={}, tags={}))

    def get_registered_model(self, name: str) -> SimpleNamespace:
        if name != "iris":
            raise _NotFound(f"Registered Model with name={name} not found")
        return SimpleNamespace(name=name, aliases={"champion": "1"})

    def search_model_versions(self, filter_string: str) -> list[SimpleNamespace]:
        listed = filter_string == "name = 'iris'"
        return [SimpleNamespace(version=v) for v in ("2", "1")] if listed else []

    def search_registered_models(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name="iris")]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/iris/3", "(versions of 'iris': 1, 2; aliases: @champion = 1)"),
        ("models:/irs/1", "(no registered model 'irs'; registered: iris)"),
        ("models:/irs/latest", "models:/irs/latest: no registered model 'irs'; registered: iris"),
    ],
)
def test_a_version_that_does_not_exist_lists_those_that_do(monkeypatch, uri: str, expected: str) -> None:
    monkeypatch.setattr(registry, "_client", lambda tracking: _Registry())
    with pytest.raises(RegistryError) as raised:
        registry.resolve(uri, "sqlite:///mlflow.db")
    assert expected in str(raised.value)


def test_latest_is_the_highest_version(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_client", lambda tracking: _Registry())
    assert registry.resolve("models:/iris/latest", "sqlite:///mlflow.db").version == "2"


def test_latest_is_the_newest_complete_registration_however_its_run_ended(tmp_path) -> None:
    """register_model is train's last node: a version created with its tags holds the whole model, while
    its run's status covers the rest of the `kedro run` (embed_tasks, evaluate, tsne). A failing tsne made
    `latest` pass over that version for ever; it is now used, with a note saying what the status means.
    Passed over (and named in a note): a version without provenance or weights hash (an earlier release's
    tagging failed midway), one MLflow has not finished registering, and one whose run was deleted. A
    version named by number is served whatever it lacks, with a note."""
    import sqlite3

    import mlflow
    from mlflow_support import temporary_mlflow_store

    complete = {"git_commit": "c0ffee", "weights_sha256": "ab" * 32}
    with temporary_mlflow_store(tmp_path) as uri:
        client = mlflow.MlflowClient()
        client.create_registered_model("iris")
        runs = {}
        for number, (status, tags) in enumerate(
            [("FINISHED", complete), ("FAILED", complete), ("FINISHED", {"git_commit": "c0ffee"}),
             ("FINISHED", complete), ("FINISHED", complete)],
            start=1,
        ):  # fmt: skip
            run = client.create_run(os.environ["MLFLOW_EXPERIMENT_ID"])
            client.set_terminated(run.info.run_id, status)
            client.create_model_version("iris", f"runs:/{run.info.run_id}/iris", run.info.run_id, tags=tags)
            runs[number] = run.info.run_id
        client.delete_run(runs[4])
        with sqlite3.connect(tmp_path / "mlflow.db") as db:  # a server still copying the artifacts
            db.execute("UPDATE model_versions SET status = 'PENDING_REGISTRATION' WHERE version = 5")
        latest = registry.resolve("models:/iris/latest", uri)
        named = {number: registry.resolve(f"models:/iris/{number}", uri) for number in (1, 2, 4)}
    ended = (
        f"version 2: its run {runs[2]} ended FAILED after registering it; the model is complete (registered "
        "with its tags), but what that run recorded later (evaluation, t-SNE) may be missing"
    )
    assert latest.version == "2" and latest.run.info.run_id == runs[2]
    assert latest.problems == [
        "models:/iris/latest is version 2, the newest complete registration; passed over: version 5 (its "
        f"registration is PENDING_REGISTRATION, not READY); version 4 (its run {runs[4]} is deleted); "
        "version 3 (no weights_sha256 tag)",
        ended,
    ]
    assert named[2].problems == [ended] and named[1].problems == []
    assert named[4].version == "4" and named[4].problems == [
        f"version 4: its run {runs[4]} is deleted; what it recorded (tags, metrics, artifacts) may be "
        "incomplete"
    ]


def test_a_bundle_copy_without_its_weights_is_not_a_bundle() -> None:
    """iris review lists the bundle's files instead of downloading it: a copy that lost its weights (a
    partial clean-up, an interrupted upload) is no bundle to load."""

    class Listing:
        def list_artifacts(self, run_id: str, path: str) -> list[SimpleNamespace]:
            return [SimpleNamespace(path=f"{path}/config.json")]

    version = RegisteredModel(
        uri="models:/iris/2", name="iris", version="2", tracking_uri="sqlite://", tags={}, run_id="run2",
        run=None, model_id=None, client=Listing(),
    )  # fmt: skip
    assert version.bundle_location() is None
    assert version.problems == [
        "models:/iris/2: no model bundle found (run run2 artifact 'model_bundle': no weights.safetensors); "
        "`iris segment` and --reproduce cannot load this version"
    ]


def _tiny_bundle(metadata_checksum: str | None = None):
    """A tiny network's bundle whose metadata records the checksum of its own tensors (as training
    writes it), or ``metadata_checksum`` when given."""
    import torch

    from iris_pipelines.inference.bundle import ModelBundle
    from iris_pipelines.model import Iris, IrisConfig
    from iris_pipelines.training import weights_checksum

    torch.manual_seed(0)
    model = Iris(IrisConfig.tiny())
    checksum = metadata_checksum or weights_checksum(model.state_dict())
    return ModelBundle.from_model(model, metadata={"weights_checksum": [checksum]})


def _version_serving(directory, tags: dict[str, str]) -> RegisteredModel:
    """models:/iris@champion (version 4) whose download is the bundle saved in ``directory``."""
    version = RegisteredModel(
        uri="models:/iris@champion", name="iris", version="4", tracking_uri="sqlite://", tags=tags,
        run_id=None, run=None, model_id=None, client=None,
    )  # fmt: skip
    version.download_bundle = lambda destination: directory
    return version


def test_a_bundle_whose_tensors_are_not_the_registered_weights_is_refused(tmp_path) -> None:
    """Weights replaced after registration, re-saved with the old metadata: the metadata still claims the
    registered checksum, so only hashing the tensors notices (README: segment and review check the
    downloaded bundle against the version's weights_sha256 tag)."""
    from iris_pipelines.training import weights_checksum

    original = _tiny_bundle()
    registered = weights_checksum(original.state_dict)
    replaced = {name: tensor + 1 if tensor.is_floating_point() else tensor
                for name, tensor in original.state_dict.items()}  # fmt: skip
    type(original)(original.model_config, replaced, original.class_ids, dict(original.metadata)).save(
        tmp_path / "bundle"
    )
    version = _version_serving(tmp_path / "bundle", {"weights_sha256": registered})
    with pytest.raises(RegistryError) as raised:
        version.load_bundle()
    message = str(raised.value)
    assert "models:/iris@champion (version 4)" in message
    assert registered in message and weights_checksum(replaced) in message
    assert "register these weights as a new version" in message


def test_a_bundle_whose_metadata_misstates_its_weights_is_refused(tmp_path) -> None:
    """No weights_sha256 tag to compare with, but config.json records a checksum its tensors do not have."""
    _tiny_bundle(metadata_checksum="f00d").save(tmp_path / "bundle")
    with pytest.raises(RegistryError, match=r"models:/iris@champion \(version 4\).*weights_checksum f00d"):
        _version_serving(tmp_path / "bundle", {}).load_bundle()


def test_the_registered_weights_load(tmp_path) -> None:
    bundle = _tiny_bundle()
    bundle.save(tmp_path / "bundle")
    loaded = _version_serving(tmp_path / "bundle", {"weights_sha256": bundle.weights_checksum}).load_bundle()
    assert loaded.weights_checksum == bundle.weights_checksum


def test_unreadable_credentials_are_named_without_their_content(tmp_path, monkeypatch) -> None:
    """A YAML error quotes the line it failed on: the note names the file's kind and the error's type only,
    and nothing is exported."""
    conf = tmp_path / "conf"
    (conf / "base").mkdir(parents=True)
    (conf / "hpcc").mkdir()
    (conf / "hpcc" / "mlflow.yml").write_text("server:\n  credentials: mlflow_server\n")
    (conf / "hpcc" / "credentials.yml").write_text(
        'mlflow_server:\n  MLFLOW_TRACKING_PASSWORD: "pw-1\n  x: [\n'
    )
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")  # undone after the test, should it be exported
    notes = registry.export_credentials(tmp_path, "hpcc")
    assert len(notes) == 1 and notes[0].startswith(f"cannot read the credentials.yml of {conf} (env hpcc): ")
    assert "pw-1" not in notes[0] and "MLFLOW_TRACKING_PASSWORD" not in os.environ
    assert registry.export_credentials(tmp_path, None) == []  # the default env names no login


def test_the_login_is_looked_up_where_the_project_settings_say() -> None:
    """export_credentials finds mlflow.yml and credentials.yml without importing settings.py (it imports
    kedro-mlflow, which sets up logging): its envs and patterns must stay those of settings.py."""
    from iris_pipelines.settings import CONFIG_LOADER_ARGS

    assert {
        key: CONFIG_LOADER_ARGS[key] for key in registry.CONFIG_LOADER_ENVS
    } == registry.CONFIG_LOADER_ENVS
    assert CONFIG_LOADER_ARGS["config_patterns"]["mlflow"] == registry.MLFLOW_CONFIG_PATTERNS
    assert "credentials" not in CONFIG_LOADER_ARGS["config_patterns"]  # Kedro's default patterns
