"""embed_tasks → evaluate → tsne in memory on the synthetic collection, with an MLflow run and a
registered model version, as `kedro run` chains them after train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from mlflow_support import temporary_mlflow_store

from iris_pipelines.evaluation.report import MIN_INTERVAL_SUBJECTS
from iris_pipelines.inference.device import resolve_device
from iris_pipelines.pipelines.embed_tasks import create_pipeline as embed_pipeline
from iris_pipelines.pipelines.evaluate import create_pipeline as evaluate_pipeline
from iris_pipelines.pipelines.tsne import create_pipeline as tsne_pipeline

STRATEGIES = ["one_shot", "ensemble", "memory_bank", "retrieval", "tuning", "checked"]
BASELINES = ["paste", "registration"]
PROJECT = Path(__file__).parents[3]
PARAMS = {
    # auto, as conf/hpcc: the GPU where there is one, else the CPU
    "embed_tasks": {"references_per_class": 2, "roi_size": [32, 32, 32], "seed": 0, "device": "auto"},
    "evaluate": {
        "device": "auto",
        "strategies": STRATEGIES,
        "baselines": BASELINES,
        "roi_size": [32, 32, 32],
        "retrieval_top_k": 2,
        "tuning_steps": 2,
        "nsd_tolerance_mm": 3.0,
        "class_tolerance_mm": {"kidney": 6.0},
        "registration": {"deformable": False, "affine_iterations": 20},
    },
    "tsne": {"perplexity": 5, "seed": 0},
}


def _project_catalog(data_root: Path, names: set[str]) -> dict:
    loader = OmegaConfigLoader(str(PROJECT / "conf"), base_env="base", default_run_env="base")
    loader["globals"] = {"data_root": str(data_root)}
    config = {name: entry for name, entry in loader["catalog"].items() if name in names}
    assert set(config) == names, f"outputs without a catalog entry: {names - set(config)}"
    assert all(entry.get("versioned") for entry in config.values())
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory, collection, untrained_bundle):
    root = tmp_path_factory.mktemp("evaluate")
    manifest, index = collection
    with temporary_mlflow_store(root):
        client = mlflow.MlflowClient()
        client.create_registered_model("iris")
        version = client.create_model_version("iris", source=(root / "model").as_uri()).version
        registered = {"name": "iris", "version": str(version), "model_uri": f"models:/iris/{version}"}
        pipeline = embed_pipeline() + evaluate_pipeline() + tsne_pipeline()
        # Outputs go through the project's own catalog entries (parquet with vectors, Markdown, PNG,
        # HTML), versioned under a temporary data root; inputs are in memory.
        catalog = DataCatalog.from_config(_project_catalog(root / "data", pipeline.all_outputs()))
        inputs = {
            "iris_model": MemoryDataset(untrained_bundle, copy_mode="assign"),
            "registered_model": MemoryDataset(registered),
            "episode_index": MemoryDataset(index),
            "preprocessed_manifest": MemoryDataset(manifest),
            **{f"params:{key}": MemoryDataset(value) for key, value in PARAMS.items()},
        }
        for name, dataset in inputs.items():
            catalog[name] = dataset
        with mlflow.start_run() as active:
            SequentialRunner().run(pipeline, catalog)
        yield catalog, client, active.info.run_id, registered, root / "data"


def _saved_png(run, filename: str) -> bool:
    """Matplotlib datasets are write-only: read the versioned file (``<file>/<version>/<file>``) instead."""
    files = list((run[-1] / "08_reporting" / filename).glob(f"*/{filename}"))
    return len(files) == 1 and files[0].read_bytes().startswith(b"\x89PNG")


def test_every_strategy_and_baseline_is_scored_per_group(run, collection) -> None:
    catalog, *_ = run
    metrics = catalog.load("evaluation_metrics")
    _, index = collection
    test_episodes = {e["episode_id"] for e in index["episodes"] if e["split"] == "test"}
    assert set(metrics.episode_id) == test_episodes
    seen, heldout = metrics[~metrics.heldout], metrics[metrics.heldout]
    assert set(seen.method) == set(STRATEGIES + BASELINES)
    assert set(heldout.method) == set(STRATEGIES + BASELINES) - {"memory_bank"}  # never trained
    assert heldout.novel.all() and not seen.novel.any()  # gamma's pancreas exists in no train dataset
    assert metrics[["dice", "iou", "nsd"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (metrics.error == "").all(), metrics.error[metrics.error != ""].tolist()
    assert set(metrics.loc[metrics.class_name == "kidney", "tolerance_mm"]) == {6.0}
    assert (metrics.model_uri == catalog.load("registered_model")["model_uri"]).all()

    summary = catalog.load("evaluation_summary")
    assert set(summary.group) == {"seen", "heldout", "novel"}
    for group, rows in summary.groupby("group"):
        expected = metrics[~metrics.heldout] if group == "seen" else metrics[metrics.heldout]
        for row in rows.itertuples():
            mean = expected.loc[expected.method == row.method, "dice"].mean()
            assert row.dice == pytest.approx(mean), (group, row.method)
    report = catalog.load("evaluation_report")
    assert "| registration" in report or "registration |" in report
    assert "## Gain over pasting the reference mask" in report
    assert "## Failures" in report.split("## All metrics per group")[1]  # listed, here "(none)"
    assert _saved_png(run, "evaluation_dice_boxplot.png") and _saved_png(run, "evaluation_class_dice.png")


def test_paste_baseline_equals_the_reference_mask_scaled_onto_the_query(run, collection) -> None:
    """Paste is exactly reproducible from the files, so its Dice is checked against a recomputation."""
    from iris_pipelines.imaging.registration import paste_label

    catalog, *_ = run
    manifest, _ = collection
    metrics = catalog.load("evaluation_metrics")
    row = metrics[metrics.method == "paste"].iloc[0]
    cases = manifest.set_index("case_id")
    truth = np.load(cases.loc[row.query, "label_array"])
    pasted = paste_label(np.load(cases.loc[row.references.split(",")[0], "label_array"]), truth.shape)
    a, b = pasted == row.label, truth == row.label
    assert row.dice == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_each_class_carries_its_reference_check(run, collection, untrained_bundle) -> None:
    """The Dice of the class in the first reference segmented with its own one-shot embedding, what
    `iris segment` warns on, recomputed for one row; the report relates it to one-shot's Dice."""
    from iris_pipelines.evaluation.embeddings import as_tensor, class_embeddings
    from iris_pipelines.inference import reference_self_dice, sliding_window_segment

    catalog, *_ = run
    manifest, _ = collection
    metrics = catalog.load("evaluation_metrics")
    assert metrics.reference_check_dice.between(0, 1).all()
    per_pair = metrics.groupby(["episode_id", "label"]).reference_check_dice.nunique()
    assert (per_pair == 1).all()  # one value per episode × class, on every method's row
    row = metrics[metrics.method == "one_shot"].iloc[0]
    classes = sorted(metrics.loc[metrics.episode_id == row.episode_id, "label"].unique())
    cases = manifest.set_index("case_id")
    reference = row.references.split(",")[0]
    image, label = (np.load(cases.loc[reference, key]) for key in ("image_array", "label_array"))
    model = untrained_bundle.build_model().eval()
    with torch.no_grad():
        task = class_embeddings(model, image, label, classes, [32, 32, 32])
        logits = sliding_window_segment(model, as_tensor(image), task, roi_size=[32, 32, 32], overlap=0.5)
    masks = torch.from_numpy(np.stack([label == c for c in classes]))[None]
    expected = reference_self_dice(logits, masks)[classes.index(row.label)].item()
    assert row.reference_check_dice == pytest.approx(expected, abs=1e-6)
    assert "## Reference check" in catalog.load("evaluation_report")


def test_mlflow_gets_headline_numbers_plots_and_version_tags(run) -> None:
    catalog, client, run_id, registered, _ = run
    data = client.get_run(run_id).data
    summary = catalog.load("evaluation_summary")
    one_shot = summary[(summary.group == "seen") & (summary.method == "one_shot")].dice.item()
    assert data.metrics["eval/seen/one_shot/dice"] == pytest.approx(one_shot)
    assert "eval/heldout/registration/dice" in data.metrics
    metrics = catalog.load("evaluation_metrics")
    pairs = metrics[metrics.method == "one_shot"].merge(
        metrics[metrics.method == "paste"], on=["episode_id", "label"], suffixes=("", "_paste")
    )
    seen = pairs[~pairs.heldout]
    gain = data.metrics["eval/seen/one_shot/dice_gain_vs_paste"]
    assert gain == pytest.approx((seen.dice - seen.dice_paste).mean())
    # 3 seen query subjects: too few for an interval (tests/evaluation/test_report.py has enough), so none
    # is logged rather than a misleading one.
    assert len(seen[["dataset", "subject_id"]].drop_duplicates()) < MIN_INTERVAL_SUBJECTS
    assert "eval/seen/one_shot/dice_gain_vs_paste_ci_low" not in data.metrics
    artifacts = {f.path for f in client.list_artifacts(run_id, "evaluation")}
    assert {
        "evaluation/dice_boxplot.png",
        "evaluation/class_dice.png",
        "evaluation/evaluation_report.md",
    } <= artifacts
    assert {f.path for f in client.list_artifacts(run_id, "tsne")} == {"tsne/tsne.png", "tsne/tsne.html"}
    tags = client.get_model_version("iris", registered["version"]).tags
    assert float(tags["eval.seen.one_shot.dice"]) == pytest.approx(one_shot, abs=1e-6)
    assert data.tags["evaluation_device"] == str(resolve_device("auto"))  # where the numbers were made


def test_tsne_maps_every_embedding_with_hover_details(run) -> None:
    catalog, *_ = run
    embeddings, coordinates = catalog.load("task_embeddings"), catalog.load("tsne_coordinates")
    assert len(coordinates) == len(embeddings) and np.isfinite(coordinates[["x", "y"]].to_numpy()).all()
    (page,) = (run[-1] / "08_reporting" / "tsne.html").glob("*/tsne.html")  # HTMLDataset is write-only
    html = page.read_text()
    assert "plotly" in html.lower()
    for field in ("dataset=", "class_name=", "reference="):  # the hover template of every trace
        assert field in html
    assert set(embeddings.case_id[embeddings.source == "reference"]) <= set(html.split('"'))  # hover values
    assert _saved_png(run, "tsne.png")


def test_embeddings_are_versioned_vectors_on_disk(run) -> None:
    catalog, *_ = run
    stored = catalog.load("task_embeddings")
    vectors = np.stack(stored.embedding)
    assert vectors.ndim == 2 and np.isfinite(vectors).all()
    assert (stored.tokens * stored.dim == vectors.shape[1]).all()


def test_report_is_written_as_utf8_under_an_ascii_locale(tmp_path: Path) -> None:
    """The report's −, × and ³ must not depend on the machine's locale: under "C" without Python's UTF-8
    mode, a text file opened with no encoding is ASCII and saving the report failed."""
    script = (
        "import sys; from kedro.config import OmegaConfigLoader; from kedro.io import DataCatalog;"
        "loader = OmegaConfigLoader(sys.argv[1], base_env='base', default_run_env='base');"
        "loader['globals'] = {'data_root': sys.argv[2]};"
        "catalog = DataCatalog.from_config({'report': loader['catalog']['evaluation_report']});"
        "catalog.save('report', 'gain \\u2212 0.1 at 32\\u00b3'); catalog.load('report')"
    )
    environment = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    environment.pop("PYTHONIOENCODING", None)
    done = subprocess.run(
        [sys.executable, "-c", script, str(PROJECT / "conf"), str(tmp_path)],
        env=environment, capture_output=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    (written,) = tmp_path.glob("08_reporting/evaluation_report.md/*/evaluation_report.md")
    assert written.read_text(encoding="utf-8") == "gain \u2212 0.1 at 32\u00b3"
