"""`iris review`: the provenance of a registered model version, and whether its numbers reproduce.

One cheap but real chain builds the model under review: train (2 steps) → register → embed_tasks →
evaluate, in memory with the project's own catalog entries persisted (versioned) under a temporary data
root, inside one MLflow run, so the version carries the provenance and eval tags a `kedro run` leaves.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from mlflow_support import temporary_mlflow_store

from iris_pipelines.cli import main
from iris_pipelines.collection.episodes import index_checksum
from iris_pipelines.hooks import InputVersionHooks, ProvenanceHooks
from iris_pipelines.pipelines.embed_tasks import create_pipeline as embed_pipeline
from iris_pipelines.pipelines.evaluate import create_pipeline as evaluate_pipeline
from iris_pipelines.pipelines.train import create_pipeline as train_pipeline
from iris_pipelines.registry import RegisteredModel
from iris_pipelines.review import (
    Comparison,
    project_config,
    provenance,
    recorded_evaluation,
    reproduced_value,
)

PROJECT = Path(__file__).parents[1]
# Kedro saves every versioned dataset of a session under the session id, which kedro-mlflow tags its run
# with (run_id): these stand for the sessions of ingest, preprocess, episodes and train.
INGEST_SESSION = "2025-12-31T00.00.00.000Z"
EPISODES_VERSION = "2026-01-01T00.00.00.000Z"
MANIFEST_VERSION = "2026-01-01T00.00.01.000Z"
TRAIN_SESSION = "2026-01-01T00.00.02.000Z"
LATER_EPISODES_VERSION = "2026-02-01T00.00.00.000Z"
INGEST_OVERRIDES = "{'phantoms': {'cases_per_dataset': 4, 'size_scale': 0.6}}"  # kedro run --params=…


def _parameters(root: Path) -> dict:
    return {
        "model": {"size": "tiny"},
        "preprocess": {"target_spacing": [3.0, 3.0, 3.0]},  # the synthetic collection's grid
        "train": {
            "launcher": "in_process", "launcher_options": {}, "checkpoint_root": str(root / "checkpoints"),
            "registry_name": "iris", "steps": 2, "batch_size": 1, "crop_size": [32, 32, 32],
            "warmup_steps": 1, "val_every": 1000, "checkpoint_every": 1000, "log_every": 1,
            "num_workers": 0, "device": "cpu", "precision": "fp32", "augment": False,
        },
        "embed_tasks": {"references_per_class": 2, "roi_size": [32, 32, 32], "seed": 0},
        "evaluate": {
            "strategies": ["one_shot", "ensemble"], "baselines": ["paste"], "roi_size": [32, 32, 32],
            "nsd_tolerance_mm": 3.0,
        },
        # as configured when training ran: ingest ran with --params (INGEST_OVERRIDES)
        "phantoms": {"cases_per_dataset": 16, "size_scale": 1.0},
        "episodes": {"seed": 0},
    }  # fmt: skip


def _upstream_runs() -> None:
    """The runs that saved the training data, as kedro-mlflow records them: tagged with their Kedro session
    (run_id) and --params (runtime_params), the params their nodes read, and the versions they read."""
    upstream = [
        ("ingest", INGEST_SESSION, {"phantoms.cases_per_dataset": 4, "phantoms.size_scale": 0.6},
         {"runtime_params": INGEST_OVERRIDES}),
        ("preprocess", MANIFEST_VERSION, {"preprocess.target_spacing": "[3.0, 3.0, 3.0]"},
         {"input_version.case_manifest": INGEST_SESSION}),
        ("episodes", EPISODES_VERSION, {"episodes.seed": 0},
         {"input_version.preprocessed_manifest": MANIFEST_VERSION}),
    ]  # fmt: skip
    for name, session, params, tags in upstream:
        with mlflow.start_run(run_name=name):
            mlflow.set_tags({"run_id": session, **tags})
            mlflow.log_params(params)


@pytest.fixture(scope="module")
def registered(tmp_path_factory, collection, one_torch_thread):
    """(tracking URI, data root) of a store holding models:/iris/1, trained, registered and evaluated."""
    root = tmp_path_factory.mktemp("review")
    data_root = root / "data"
    manifest, index = collection
    parameters = _parameters(root)
    pipeline = train_pipeline() + embed_pipeline() + evaluate_pipeline()
    config = project_config(PROJECT, None, str(data_root))["catalog"]
    persisted = {name: config[name] for name in pipeline.datasets() if name in config}
    DataCatalog.from_config(persisted, save_version=EPISODES_VERSION).save("episode_index", index)
    DataCatalog.from_config(persisted, save_version=MANIFEST_VERSION).save("preprocessed_manifest", manifest)
    catalog = DataCatalog.from_config(persisted, save_version=TRAIN_SESSION)
    catalog["parameters"] = MemoryDataset(parameters)
    for key, value in parameters.items():
        catalog[f"params:{key}"] = MemoryDataset(value)
    hooks = _create_hook_manager()
    hooks.register(InputVersionHooks())
    with temporary_mlflow_store(root) as uri:
        _upstream_runs()
        with mlflow.start_run(run_name="train", tags={"run_id": TRAIN_SESSION}):
            ProvenanceHooks().before_pipeline_run(run_params={"project_path": str(PROJECT), "env": "test"})
            SequentialRunner().run(pipeline, catalog, hook_manager=hooks)
        yield uri, data_root


def review(uri: str, data_root: Path, *args: str):
    return CliRunner().invoke(
        main,
        ["review", "models:/iris/1", "--tracking-uri", uri, "--project", str(PROJECT),
         "--data-root", str(data_root), *args],
    )  # fmt: skip


def test_provenance_is_printed_without_reproducing(registered) -> None:
    uri, data_root = registered
    result = review(uri, data_root)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    for expected in (
        "git commit",
        "kedro env │ test",
        f"version of episode_index │ {EPISODES_VERSION}",
        f"version of preprocessed_manifest │ {MANIFEST_VERSION}",
        "episode_index_checksum",
        "final train/loss",
        "eval.seen.one_shot.dice",
        "run eval/heldout/paste/dice",
        'evaluate.strategies │ ["one_shot", "ensemble"]',
    ):
        assert expected in output, expected
    assert "lock file │ matches current" in output or "lock file │ differs" in output


def test_review_shows_how_the_run_ended_and_the_registered_weights(registered) -> None:
    """A version whose training run failed or was deleted may lack what a completed registration records:
    the review says how the run ended, and which weights the version stands for."""
    uri, data_root = registered
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("iris", "1")
    output = " ".join(review(uri, data_root).output.split())
    assert "run status │ FINISHED" in output and "run lifecycle stage │ active" in output
    # the first 40 hex digits: a narrow terminal folds the rest onto the next table line
    assert f"weights sha256 │ {version.tags['weights_sha256'][:40]}" in output and "note:" not in output
    client.set_terminated(version.run_id, "FAILED")
    client.delete_run(version.run_id)
    try:
        output = " ".join(review(uri, data_root).output.split())
    finally:
        client.restore_run(version.run_id)
        client.set_terminated(version.run_id, "FINISHED")
    assert "run status │ FAILED" in output and "run lifecycle stage │ deleted" in output
    assert (
        f"note: version 1: its run {version.run_id} ended FAILED and is deleted; what it recorded" in output
    )


def _local_path(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path))


def test_review_reports_a_model_bundle_whose_artifacts_were_deleted(registered) -> None:
    """A clean-up of the artifact store (an admin's gc, a purged bucket prefix) left the version and its run:
    the review noted only the missing config/parameters.json, as if the model were there to use. It names
    where the bundle is (the logged model's, else the run's copy), or that neither holds it; a review
    reports what it finds and exits 0, as for a failed run."""
    from iris_pipelines.registry import _logged_model_id

    uri, data_root = registered
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("iris", "1")
    model_id = _logged_model_id(version)
    logged = _local_path(client.get_logged_model(model_id).artifact_location)
    run = _local_path(client.get_run(version.run_id).info.artifact_uri)
    outputs, moved = [" ".join(review(uri, data_root).output.split())], []
    try:
        for folder in (logged, run):
            folder.rename(folder.with_name("aside"))
            moved.append(folder)
            result = review(uri, data_root)
            assert result.exit_code == 0, result.output
            outputs.append(" ".join(result.output.split()))
    finally:
        for folder in moved:
            folder.with_name("aside").rename(folder)
    # a narrow terminal folds the rest of the value onto the next table line
    assert f"model bundle │ logged model {model_id}" in outputs[0]
    assert f"model bundle │ run {version.run_id}" in outputs[1] and "no model bundle found" not in outputs[1]
    assert "model bundle │ not found (see the note below)" in outputs[2]
    assert (
        f"note: models:/iris/1: no model bundle found (logged model {model_id} 'artifacts/model_bundle': no "
        f"files; run {version.run_id} artifact 'model_bundle': no files); `iris segment` and --reproduce "
        "cannot load this version" in outputs[2]
    )


def _table(output: str, title: str) -> str:
    """The rows of the review's table whose title starts with ``title`` (up to the next table's title)."""
    start = output.index(title)
    end = output.find("parameters of run", start + len(title))
    return output[start : end if end > 0 else len(output)]


def test_review_shows_the_parameters_of_the_runs_that_made_the_data(registered) -> None:
    """config/parameters.json holds phantoms.* as configured when training ran (16 cases); the data was
    made by an ingest run with --params=phantoms.cases_per_dataset=4. The training run's table holds the
    sections it read; each run that saved its data (found by its Kedro session = the data version) shows
    its own params and --params, labelled by what it saved."""
    uri, data_root = registered
    result = review(uri, data_root)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "cases_per_dataset │ 16" not in output  # the training run's copy, shown as if it made the data
    assert "note:" not in output
    trained = _table(output, "parameters of the training run train")
    assert "train.steps │ 2" in trained and "model.size │ tiny" in trained
    assert 'evaluate.strategies │ ["one_shot", "ensemble"]' in trained  # it evaluated the version, too
    assert "phantoms" not in trained.split("not read by this run")[0]
    assert "not read by this run │ episodes, phantoms:" in trained
    ingest = _table(output, "parameters of run ingest (saved case_manifest)")
    assert f"saved case_manifest │ version {INGEST_SESSION}" in ingest
    assert f"kedro session │ {INGEST_SESSION}" in ingest
    assert "--params phantoms.cases_per_dataset │ 4" in ingest
    assert "--params phantoms.size_scale │ 0.6" in ingest
    assert "phantoms.cases_per_dataset │ 4" in ingest and "phantoms.size_scale │ 0.6" in ingest
    assert f"saved preprocessed_manifest │ version {MANIFEST_VERSION}" in _table(
        output, "parameters of run preprocess (saved preprocessed_manifest)"
    )
    episodes = _table(output, "parameters of run episodes (saved episode_index)")
    assert "episodes.seed │ 0" in episodes and "--params │ none" in episodes
    assert output.index("run ingest") < output.index("run preprocess") < output.index("run episodes")


def test_train_sections_are_those_the_train_pipeline_reads() -> None:
    from iris_pipelines.review import TRAIN_SECTIONS

    read = {name[len("params:") :] for name in train_pipeline().inputs() if name.startswith("params:")}
    assert read == set(TRAIN_SECTIONS)


def test_data_whose_run_is_not_in_the_store_is_noted(registered) -> None:
    """Data saved through another store, or whose run was deleted: a note, not the training run's copy of
    the configuration shown as the producer's."""
    uri, data_root = registered
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    (ingest,) = client.search_runs(
        [client.get_run(client.get_model_version("iris", "1").run_id).info.experiment_id],
        filter_string=f"tags.run_id = '{INGEST_SESSION}'",
    )
    elsewhere = "2025-06-01T00.00.00.000Z"
    client.delete_run(ingest.info.run_id)
    try:
        with restored_version_tags(uri, "iris", "1") as client:
            client.set_model_version_tag("iris", "1", "input_version.episode_index", elsewhere)
            output = " ".join(review(uri, data_root).output.split())
    finally:
        client.restore_run(ingest.info.run_id)
    assert (
        f"note: case_manifest version {INGEST_SESSION} (read by run preprocess): the run that saved it "
        f"({ingest.info.run_id}) is deleted" in output
    )
    assert (
        f"note: episode_index version {elsewhere} (read by the training run): no run of experiment" in output
        and f"has tag run_id = {elsewhere}" in output
    )
    assert "parameters of run ingest" not in output and "parameters of run episodes" not in output
    assert "parameters of run preprocess (saved preprocessed_manifest)" in output
    assert "cases_per_dataset" not in output


def test_reproduce_passes_on_a_fresh_model(registered) -> None:
    uri, data_root = registered
    result = review(uri, data_root, "--reproduce")
    assert result.exit_code == 0, result.output
    assert "reproduced: all" in result.output and "✘" not in result.output
    assert "tag eval.seen.ensemble.dice" in result.output and "metric eval/novel/paste/nsd" in result.output


def test_reproduce_fails_on_a_tampered_metric(registered) -> None:
    uri, data_root = registered
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    original = client.get_model_version("iris", "1").tags["eval.seen.one_shot.dice"]
    client.set_model_version_tag("iris", "1", "eval.seen.one_shot.dice", f"{float(original) + 0.01:.6f}")
    try:
        result = review(uri, data_root, "--reproduce")
    finally:
        client.set_model_version_tag("iris", "1", "eval.seen.one_shot.dice", original)
    assert result.exit_code == 1
    assert "NOT REPRODUCED: 1 of" in result.output and "(tag eval.seen.one_shot.dice)" in result.output


@pytest.mark.parametrize("tolerance", [1e-6, 1e-7, 0.0])
def test_tags_are_compared_at_the_precision_they_were_written_with(tolerance: float) -> None:
    """Tags hold 6 decimals: compared with the full-precision recomputation, a bit-exact reproduction
    failed every --tolerance below 5e-7."""
    dice = 0.8123456789
    record = SimpleNamespace(
        tags={"eval.seen.one_shot.dice": f"{dice:.6f}"}, evaluation_metrics={"eval/seen/one_shot/dice": dice}
    )
    headline = {"eval/seen/one_shot/dice": dice}
    compared = [
        Comparison(name, value, reproduced_value(name, headline), tolerance)
        for name, value in recorded_evaluation(record).items()
    ]
    assert [c.metric for c in compared] == ["tag eval.seen.one_shot.dice", "metric eval/seen/one_shot/dice"]
    assert all(c.ok for c in compared), [(c.metric, c.difference) for c in compared]
    tag = "tag eval.seen.one_shot.dice"
    near_miss = {"eval/seen/one_shot/dice": dice + 2e-6}  # a difference in the tag's digits still fails
    assert not Comparison(tag, float(f"{dice:.6f}"), reproduced_value(tag, near_miss), tolerance).ok


def test_reproduce_is_not_attempted_when_the_recorded_data_version_is_gone(registered, tmp_path) -> None:
    """Nothing recomputed is a usage error (exit 2) naming why, not "0 of 0 metric(s) differ" (exit 1)."""
    uri, _ = registered
    result = review(uri, tmp_path / "empty_data_root", "--reproduce")
    assert result.exit_code == 2, result.output
    assert "could not attempt to reproduce models:/iris/1" in result.output
    assert f"episode_index: cannot load recorded version {EPISODES_VERSION}" in result.output
    assert "preprocessed_manifest: cannot load recorded version" in result.output
    assert "NOT REPRODUCED" not in result.output


def test_reproduce_reads_the_data_of_project_not_of_the_current_directory(
    registered, tmp_path, monkeypatch
) -> None:
    """Base data_root is the relative `data`: it is the --project's data folder wherever iris runs."""
    uri, data_root = registered
    project = tmp_path / "project"
    shutil.copytree(PROJECT / "conf", project / "conf")
    shutil.copytree(data_root, project / "data")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        main, ["review", "models:/iris/1", "--tracking-uri", uri, "--project", str(project), "--reproduce"]
    )
    assert result.exit_code == 0, result.output
    assert "reproduced: all" in result.output


@contextmanager
def restored_version_tags(uri: str, name: str, version: str) -> Iterator[mlflow.MlflowClient]:
    """The other tests of this module review models:/iris/1 as its training run evaluated it."""
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    before = dict(client.get_model_version(name, version).tags)
    try:
        yield client
    finally:
        for key in client.get_model_version(name, version).tags:
            if key not in before:
                client.delete_model_version_tag(name, version, key)
        for key, value in before.items():
            client.set_model_version_tag(name, version, key, value)


def evaluate_again(data_root: Path, index: dict, parameters: dict) -> str:
    """`kedro run --pipelines=embed_tasks,evaluate --params=…` after an episodes re-run: a new MLflow run
    on the registered model, the latest episode_index version and other settings. Returns its run id."""
    pipeline = embed_pipeline() + evaluate_pipeline()
    config = project_config(PROJECT, None, str(data_root))["catalog"]
    persisted = {name: config[name] for name in pipeline.datasets() if name in config}
    DataCatalog.from_config(persisted, save_version=LATER_EPISODES_VERSION).save("episode_index", index)
    catalog = DataCatalog.from_config(persisted)
    for key, value in parameters.items():
        catalog[f"params:{key}"] = MemoryDataset(value)
    hooks = _create_hook_manager()
    hooks.register(InputVersionHooks())
    with mlflow.start_run() as run:
        SequentialRunner().run(pipeline, catalog, hook_manager=hooks)
    return run.info.run_id


def test_reproduce_follows_a_later_evaluation_run(registered, collection) -> None:
    """A later evaluate-only run re-tags the version; review reproduces that run, not the training run's
    evaluation: its settings, its episode_index version, and none of the earlier run's eval tags."""
    uri, data_root = registered
    _, index = collection
    fewer = {**index, "episodes": [e for e in index["episodes"] if e["split"] == "test"][1:]}
    fewer["checksum"] = index_checksum(fewer)
    parameters = _parameters(data_root)
    parameters["embed_tasks"]["references_per_class"] = 1
    parameters["evaluate"]["strategies"] = ["ensemble"]
    with restored_version_tags(uri, "iris", "1") as client:
        run_id = evaluate_again(data_root, fewer, parameters)
        tags = client.get_model_version("iris", "1").tags
        assert tags["evaluation_run_id"] == run_id
        assert "eval.seen.ensemble.dice" in tags and "eval.seen.one_shot.dice" not in tags
        provenance_output = " ".join(review(uri, data_root).output.split())
        result = review(uri, data_root, "--reproduce")
    assert f"evaluation run id │ {run_id}" in provenance_output
    assert f"evaluated episode_index version │ {LATER_EPISODES_VERSION}" in provenance_output
    assert result.exit_code == 0, result.output
    assert "reproduced: all" in result.output and "warning" not in result.output
    comparisons = result.output[result.output.index("reproduction of") :]
    assert "tag eval.seen.ensemble.dice" in comparisons and "metric eval/seen/ensemble/dice" in comparisons
    assert "one_shot" not in comparisons
    assert 'evaluation settings: evaluate.strategies │ ["ensemble"]' in provenance_output


@pytest.mark.parametrize(
    ("project", "env", "expected"),
    [(PROJECT, "nope", "conf/nope"), (None, None, "conf/base")],
    ids=["unknown env", "not a project"],
)
def test_reproduce_without_the_project_config_is_a_one_line_error(
    registered, tmp_path, project, env, expected
) -> None:
    uri, _ = registered
    args = ["--project", str(project or tmp_path)] + (["--env", env] if env else [])
    result = CliRunner().invoke(
        main, ["review", "models:/iris/1", "--tracking-uri", uri, "--reproduce", *args]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "--project" in result.output and expected in result.output


def test_provenance_without_evaluation_hints_a_valid_kedro_command(tmp_path) -> None:
    """kedro run takes several pipelines as `--pipelines=a,b`; `--pipeline=a+b` names no pipeline."""
    record = RegisteredModel(
        uri="models:/iris/1", name="iris", version="1", tracking_uri="sqlite://", tags={}, run_id=None,
        run=None, model_id=None, client=None,
    )  # fmt: skip
    evaluation = dict(provenance(record, tmp_path, None))["evaluation"]
    assert evaluation == [("evaluation", "none recorded: run `kedro run --pipelines=embed_tasks,evaluate`")]


def test_unknown_version_is_a_one_line_error(registered) -> None:
    uri, data_root = registered
    result = CliRunner().invoke(main, ["review", "models:/iris/9", "--tracking-uri", uri])
    assert result.exit_code == 2
    assert (
        "models:/iris/9: cannot read the model version" in result.output and "Traceback" not in result.output
    )


def test_tracking_uris_mlflow_cannot_open_are_one_line_errors(registered, tmp_path) -> None:
    """A scheme MLflow has no store for, and the retired file store, fail in one line; SQLAlchemy options
    after the database path are not part of the file name."""
    uri, _ = registered
    for bad in ("foo://bar", str(tmp_path / "file_store")):
        result = CliRunner().invoke(main, ["review", "models:/iris/1", "--tracking-uri", bad])
        assert result.exit_code == 2, result.output
        assert f"cannot open the MLflow tracking URI {bad}" in " ".join(result.output.split())
        assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["review", "models:/iris/1", "--tracking-uri", f"{uri}?timeout=20"])
    assert result.exit_code == 0, result.output


def test_segment_downloads_the_registered_bundle(registered, tmp_path) -> None:
    """`iris segment --model models:/iris/1` fetches the version's bundle through the registry."""
    import json

    from test_cli_segment import make_scan

    from iris_pipelines.imaging import write_image

    uri, _ = registered
    image, label = make_scan((1.2, 1.0, 1.5), (-10.0, -8.0, 0.0), np.eye(3), size=(24, 24, 16))
    write_image(image, tmp_path / "scan.nii.gz")
    write_image(label, tmp_path / "ref_labels.nii.gz")
    result = CliRunner().invoke(
        main,
        ["segment", "--image", str(tmp_path / "scan.nii.gz"), "--model", "models:/iris/1",
         "--reference", f"{tmp_path / 'scan.nii.gz'}:{tmp_path / 'ref_labels.nii.gz'}",
         "--tracking-uri", uri, "--spacing", "1", "--out", str(tmp_path / "out.nii.gz")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["model"] == "models:/iris/1" and sidecar["roi_size"] == [32, 32, 32]  # the training crop


def test_segment_reads_the_registry_of_its_project_as_review_does(registered, tmp_path, monkeypatch) -> None:
    """`iris segment --project P --model models:/iris/1` looked in ./mlflow.db of the current folder,
    while `iris review --project P` read P/mlflow.db."""
    import sqlite3

    from test_cli_segment import make_scan

    from iris_pipelines.imaging import write_image

    uri, _ = registered
    project = tmp_path / "project"
    project.mkdir()
    with sqlite3.connect(uri[len("sqlite:///") :]) as source, sqlite3.connect(project / "mlflow.db") as copy:
        source.backup(copy)  # the project's store; its artifact paths are absolute
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the registered fixture's: the project's store decides
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    image, label = make_scan((1.2, 1.0, 1.5), (-10.0, -8.0, 0.0), np.eye(3), size=(24, 24, 16))
    write_image(image, elsewhere / "scan.nii.gz")
    write_image(label, elsewhere / "ref_labels.nii.gz")
    reviewed = CliRunner().invoke(main, ["review", "models:/iris/1", "--project", str(project)])
    assert reviewed.exit_code == 0, reviewed.output
    result = CliRunner().invoke(
        main,
        ["segment", "--image", "scan.nii.gz", "--model", "models:/iris/1", "--project", str(project),
         "--reference", "scan.nii.gz:ref_labels.nii.gz", "--spacing", "1", "--out", "out.nii.gz"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (elsewhere / "out.nii.gz").is_file() and not (elsewhere / "mlflow.db").exists()


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a machine without a GPU reproducing a GPU's evaluation"
)
def test_a_gpu_evaluation_is_reproduced_on_the_cpu_with_a_note():
    from types import SimpleNamespace

    from iris_pipelines.review import _reproduce_on_this_machine

    params = {"embed_tasks": {"device": "cuda"}, "evaluate": {"device": "cuda:0", "overlap": 0.5}}
    record = SimpleNamespace(evaluated_separately=False, run_tags={"evaluation_device": "cuda:0"})
    notes = _reproduce_on_this_machine(params, record)
    assert params == {"embed_tasks": {"device": "cpu"}, "evaluate": {"device": "cpu", "overlap": 0.5}}
    assert notes == [
        "params:embed_tasks asked for cuda, which this machine lacks: reproducing on the CPU",
        "params:evaluate asked for cuda:0, which this machine lacks: reproducing on the CPU",
        "the task embeddings were made on cuda and are re-made on cpu: expect differences in the last bits; "
        "judge them with a looser --tolerance",
        "the evaluation ran on cuda:0 and is reproduced on cpu: expect differences in the last bits; judge "
        "them with a looser --tolerance",
    ]
    same = {"embed_tasks": {}, "evaluate": {"device": "auto"}}
    assert _reproduce_on_this_machine(same, SimpleNamespace(evaluated_separately=False, run_tags={})) == []


def test_task_embeddings_are_reproduced_on_the_device_they_record(monkeypatch):
    """review --reproduce re-embedded on the CPU whatever device the recorded embed_tasks ran on, silently:
    the device stored with the task_embeddings (config/evaluation_parameters.json) now decides, and a
    reproduction elsewhere says so."""
    from iris_pipelines.review import _reproduce_on_this_machine

    made_on_gpu = {"references_per_class": 3, "roi_size": [32, 32, 32], "seed": 0, "device": "cuda:0"}
    record = SimpleNamespace(evaluated_separately=True, evaluation_run_tags={"evaluation_device": "cuda:0"})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU node the evaluation ran on
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    params = {"embed_tasks": dict(made_on_gpu), "evaluate": {"device": "auto"}}
    assert _reproduce_on_this_machine(params, record) == []
    assert params["embed_tasks"]["device"] == "cuda:0"

    # made on a node's second GPU, reproduced on a one-GPU machine: torch would accept cuda:1 and fail later
    params = {"embed_tasks": {**made_on_gpu, "device": "cuda:1"}, "evaluate": {"device": "auto"}}
    assert _reproduce_on_this_machine(params, record) == [
        "params:embed_tasks asked for cuda:1, which this machine lacks: reproducing on the CPU",
        "the task embeddings were made on cuda:1 and are re-made on cpu: expect differences in the last "
        "bits; judge them with a looser --tolerance",
    ]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a laptop
    params = {"embed_tasks": dict(made_on_gpu), "evaluate": {"device": "auto"}}
    notes = _reproduce_on_this_machine(params, record)
    assert params["embed_tasks"] == {**made_on_gpu, "device": "cpu"}
    assert notes == [
        "params:embed_tasks asked for cuda:0, which this machine lacks: reproducing on the CPU",
        "the task embeddings were made on cuda:0 and are re-made on cpu: expect differences in the last "
        "bits; judge them with a looser --tolerance",
        "the evaluation ran on cuda:0 and is reproduced on cpu: expect differences in the last bits; judge "
        "them with a looser --tolerance",
    ]

    # Embeddings written before the device was stored: re-made on the CPU, said when evaluate used a GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    older = {"embed_tasks": {"roi_size": [32, 32, 32]}, "evaluate": {"device": "auto"}}
    assert _reproduce_on_this_machine(older, record) == [
        "the task embeddings do not record the device they were made on (written before it was stored) and "
        "are re-made on cpu, while the evaluation ran on cuda:0: if embed_tasks ran there too, expect "
        "differences in the last bits"
    ]


@contextmanager
def login_recording_server() -> Iterator[tuple[str, list]]:
    """A tracking server that wants a login and answers every request 401, recording the Authorization
    header each one brought."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list = []

    class Unauthenticated(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = b'{"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unauthenticated)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_review_and_segment_send_the_server_login_of_the_kedro_env(tmp_path, monkeypatch) -> None:
    """`kedro run --env=hpcc` logs in with the `mlflow_server` entry of conf/hpcc/credentials.yml
    (kedro-mlflow exports it); `iris review` / `iris segment --env hpcc` send the same login, unless the
    variable is already exported, and never print it."""
    import base64

    project = tmp_path / "project"
    shutil.copytree(PROJECT / "conf", project / "conf", ignore=shutil.ignore_patterns("credentials*"))
    credentials = project / "conf" / "hpcc" / "credentials.yml"
    credentials.write_text(
        "mlflow_server:\n  MLFLOW_TRACKING_USERNAME: alice\n  MLFLOW_TRACKING_PASSWORD: pw-1\n"
    )
    login_variables = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")

    def unset_login() -> None:  # the commands export into this process: undone after the test
        for name in login_variables:
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def review_hpcc() -> tuple[int, str]:
        result = CliRunner().invoke(
            main, ["review", "models:/iris/1", "--project", str(project), "--env", "hpcc"]
        )
        return result.exit_code, " ".join(result.output.split())

    unset_login()
    scan = tmp_path / "scan.nii.gz"
    with login_recording_server() as (uri, seen):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as on the cluster; conf/hpcc requires it
        code, output = review_hpcc()
        assert code == 2 and "UNAUTHENTICATED" in output, output
        assert seen[-1] == basic("alice", "pw-1") and "pw-1" not in output and "note:" not in output

        unset_login()
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")  # exported: wins over the file
        monkeypatch.delenv("MLFLOW_TRACKING_URI")  # --tracking-uri instead: conf/hpcc's URI is not needed
        segmented = CliRunner().invoke(
            main,
            ["segment", "--image", str(scan), "--reference", f"{scan}:{scan}", "--model", "models:/iris/1",
             "--out", str(tmp_path / "out.nii.gz"), "--project", str(project), "--env", "hpcc",
             "--tracking-uri", uri],
        )  # fmt: skip
        assert segmented.exit_code == 2 and "UNAUTHENTICATED" in segmented.output, segmented.output
        assert seen[-1] == basic("bob", "pw-1") and "pw-1" not in segmented.output
        assert "MLFLOW_TRACKING_URI" not in os.environ

        unset_login()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        credentials.write_text("other_server:\n  MLFLOW_TRACKING_TOKEN: tk-1\n")
        code, output = review_hpcc()
        assert seen[-1] is None and "tk-1" not in output
        assert "names credentials 'mlflow_server', but no credentials.yml" in output

        credentials.unlink()
        code, output = review_hpcc()
        assert seen[-1] is None and "has no credentials.yml" in output
        assert code == 2 and "UNAUTHENTICATED" in output
