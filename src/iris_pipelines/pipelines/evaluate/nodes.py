"""Score every strategy and baseline on the test episodes; summarise, plot and link to the model version."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import mlflow
import pandas as pd
from matplotlib.figure import Figure

from iris_pipelines.evaluation import EvaluateParams, embedding_settings, evaluate_episodes
from iris_pipelines.evaluation.report import (
    class_bars,
    dice_boxplot,
    dice_pivot,
    failure_table,
    gain_over_baseline,
    headline_metrics,
    markdown_report,
    reference_check_table,
    summary_by_dataset,
    summary_by_group,
)
from iris_pipelines.inference.bundle import ModelBundle
from iris_pipelines.inference.device import resolve_device
from iris_pipelines.pipelines.embed_tasks.nodes import model_info, roi_size_or_training_crop
from iris_pipelines.pipelines.train.nodes import input_checksums
from iris_pipelines.registry import (
    EVAL_TAG_DECIMALS,
    EVAL_TAG_PREFIX,
    EVALUATION_DEVICE_TAG,
    EVALUATION_PARAMETERS_ARTIFACT,
    EVALUATION_RUN_TAG,
)
from iris_pipelines.training.sampler import case_records

logger = logging.getLogger(__name__)


def evaluate_strategies(
    iris_model: ModelBundle,
    registered_model: dict[str, Any],
    task_embeddings: pd.DataFrame,
    episode_index: dict[str, Any],
    preprocessed_manifest: pd.DataFrame,
    params: dict[str, Any],
) -> pd.DataFrame:
    """``evaluation_metrics``: one row per test episode × method × class, on the original grids.

    Without ``roi_size`` the sliding and reference windows are the model's training crop, as embed_tasks
    takes it: each defaulting on its own would leave retrieval with embeddings of another window size.
    """
    window = roi_size_or_training_crop(iris_model, params.get("roi_size"), "evaluate")
    settings = EvaluateParams.from_dict({**params, "roi_size": list(window)})
    require_unseen_queries(iris_model, episode_index, settings.splits)
    device = resolve_device(settings.device)
    logger.info("Evaluating on %s", device)
    if mlflow.active_run() is not None:
        mlflow.set_tag(EVALUATION_DEVICE_TAG, str(device))
    return evaluate_episodes(
        iris_model.build_model().to(device),
        iris_model.class_ids,
        episode_index,
        preprocessed_manifest,
        case_records(preprocessed_manifest),
        task_embeddings,
        settings,
        model_info(iris_model, registered_model),
    )


def require_unseen_queries(
    iris_model: ModelBundle, episode_index: dict[str, Any], splits: Sequence[str]
) -> None:
    """Refuse to score a model on query subjects it was trained on.

    Subjects are split per dataset, so a re-run of ingest → episodes after a subject was added or
    rejected can move subjects the model trained on into the val or test split of the new index: its
    scores would include memorised scans. The bundle lists its training subjects (``train_subjects``);
    a bundle without the list (trained before it was recorded) is not checked. Asking for the ``train``
    split itself is scoring on training subjects on purpose, and allowed.
    """
    trained = set((iris_model.metadata or {}).get("train_subjects") or ())
    if not trained:
        return
    subject = {
        (case["dataset"], case["case_id"]): f"{case['dataset']}/{case['subject_id']}"
        for case in episode_index.get("cases", [])
    }
    queried = {
        subject.get((episode["dataset"], episode["query"]), f"{episode['dataset']}/{episode['query']}")
        for episode in episode_index.get("episodes", [])
        if episode["split"] in splits and episode["split"] != "train"
    }
    seen = sorted(queried & trained)
    if seen:
        raise ValueError(
            f"{len(seen)} query subject(s) of the evaluated episodes were training subjects of this model "
            f"({', '.join(seen[:5])}{', …' if len(seen) > 5 else ''}): this episode index splits the "
            "subjects differently from the one the model was trained on. Evaluate on the model's index "
            "(its registered version's input_version.episode_index tag names it: kedro run "
            "--pipelines=evaluate --load-versions=episode_index:<version>), or retrain on this one"
        )


def record_evaluation_inputs(
    episode_index: dict[str, Any],
    preprocessed_manifest: pd.DataFrame,
    task_embeddings: pd.DataFrame,
    evaluate_params: dict[str, Any],
) -> None:
    """Log what this evaluation ran on to the active MLflow run, so ``iris review --reproduce`` can repeat
    an evaluation run apart from training: the settings of both steps, and the checksums of the inputs
    (the run's ``input_version.*`` tags name their versions).

    The embed_tasks settings are those stored in ``task_embeddings``: an evaluate-only run reads a table an
    earlier embed_tasks run made, perhaps with other ``params:embed_tasks`` than the current ones.
    """
    if mlflow.active_run() is None:
        return
    settings: dict[str, Any] = {"evaluate": evaluate_params}
    made_with = embedding_settings(task_embeddings)
    if made_with is None:
        logger.warning(
            "task_embeddings do not record the embed_tasks settings that made them (a table written before "
            "they were stored, or rows of several runs): the evaluation is logged without them, and iris "
            "review --reproduce will re-embed with the project's params:embed_tasks; re-run embed_tasks to "
            "record them"
        )
    else:
        settings["embed_tasks"] = made_with
    mlflow.log_dict(settings, EVALUATION_PARAMETERS_ARTIFACT)
    mlflow.set_tags(input_checksums(episode_index, preprocessed_manifest))


def _tag_model_version(registered_model: dict[str, Any] | None, metrics: dict[str, float]) -> None:
    """Put the headline Dice on the registered version, so a review sees it next to the provenance tags.

    The version then holds exactly this evaluation's ``eval.*`` tags: those of an earlier evaluation with
    other strategies are removed, as they would otherwise be credited to this run.
    """
    name, version = (registered_model or {}).get("name"), (registered_model or {}).get("version")
    if not (name and version):
        return
    client = mlflow.MlflowClient()
    run = mlflow.active_run()
    if run is not None:  # which run evaluated: its settings, inputs and metrics, for reviews
        client.set_model_version_tag(name, str(version), EVALUATION_RUN_TAG, run.info.run_id)
    tags = {
        key.replace("/", "."): f"{value:.{EVAL_TAG_DECIMALS}f}"
        for key, value in metrics.items()
        if key.endswith("/dice")
    }
    existing = client.get_model_version(name, str(version)).tags or {}
    for key in existing:
        if key.startswith(EVAL_TAG_PREFIX) and key not in tags:
            client.delete_model_version_tag(name, str(version), key)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def report_evaluation(
    evaluation_metrics: pd.DataFrame, registered_model: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, str, Figure, Figure]:
    """Summary tables (per group, per dataset), the Markdown report, the box plot and the class bars.

    The headline numbers go to the active MLflow run as ``eval/<group>/<method>/<metric>`` (with the paired
    ``dice_gain_vs_paste`` and its CI) and the mean Dice onto the registered model version as tags.
    """
    by_group = summary_by_group(evaluation_metrics)
    by_dataset = summary_by_dataset(evaluation_metrics)
    first = evaluation_metrics.iloc[0] if not evaluation_metrics.empty else {}
    model = {key: str(first.get(key, "")) for key in ("model_uri", "weights_sha256")} if len(first) else {}
    gains = gain_over_baseline(evaluation_metrics)
    report = markdown_report(
        by_group,
        by_dataset,
        gains,
        model,
        reference_check_table(evaluation_metrics),
        failure_table(evaluation_metrics),
    )
    boxplot, bars = dice_boxplot(evaluation_metrics), class_bars(evaluation_metrics)
    if not by_group.empty:
        logger.info("Mean Dice per group and method:\n%s", dice_pivot(by_group, "group").round(3).to_string())
    if not gains.empty:
        table = gains.round(3).to_string(index=False)
        logger.info("Dice gain over paste (95 %% CI over query subjects):\n%s", table)
    if mlflow.active_run() is not None:
        headline = headline_metrics(by_group, gains)
        mlflow.log_metrics(headline)
        mlflow.log_text(report, "evaluation/evaluation_report.md")
        mlflow.log_figure(boxplot, "evaluation/dice_boxplot.png")
        mlflow.log_figure(bars, "evaluation/class_dice.png")
        _tag_model_version(registered_model, headline)
    return by_group, by_dataset, report, boxplot, bars
