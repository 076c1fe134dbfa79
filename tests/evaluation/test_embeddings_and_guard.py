"""Task embeddings carry their provenance; evaluation never lets a query be its own reference."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from iris_pipelines.evaluation import (
    EvaluateParams,
    ModelInfo,
    ReferenceLeakError,
    build_task_embeddings,
    check_references,
    evaluate_episodes,
)
from iris_pipelines.evaluation.embeddings import class_embeddings, embedding_tensor, load_arrays
from iris_pipelines.evaluation.evaluate import _table_pool
from iris_pipelines.pipelines.evaluate.nodes import report_evaluation
from iris_pipelines.training.sampler import case_records

INFO = ModelInfo("models:/iris/7", "7", "f00d")
PARAMS = EvaluateParams(roi_size=(32, 32, 32))  # the windows the table below was embedded with


@pytest.fixture(scope="module")
def table(untrained_bundle, collection) -> pd.DataFrame:
    manifest, index = collection
    return build_task_embeddings(
        untrained_bundle.build_model(),
        untrained_bundle.class_ids,
        index,
        case_records(manifest),
        references_per_class=2,
        roi_size=(32, 32, 32),
        seed=0,
        model_info=INFO,
    )


def test_embeddings_cover_every_class_from_the_right_split(table, collection, untrained_bundle) -> None:
    _, index = collection
    split_of = {(c["dataset"], c["case_id"]): c["split"] for c in index["cases"]}
    references = table[table.source == "reference"]
    for dataset, classes in index["classes"].items():
        for label in classes:
            rows = references[(references.dataset == dataset) & (references.label == int(label))]
            assert 1 <= len(rows) <= 2, (dataset, label)
    # seen datasets embed train cases, held-out ones their context cases; never val or test
    assert {split_of[(r.dataset, r.case_id)] for r in references.itertuples()} <= {"train", "context"}
    assert set(references[references.heldout].split) == {"context"}
    assert (table.model_uri == "models:/iris/7").all() and (table.weights_sha256 == "f00d").all()
    bank = table[table.source == "memory_bank"]
    assert len(bank) == len(untrained_bundle.class_ids) and not bank.heldout.any()


def test_an_embedding_row_equals_encoding_its_reference_again(table, untrained_bundle, collection) -> None:
    manifest, _ = collection
    records = case_records(manifest)
    row = table[table.source == "reference"].iloc[0]
    image, label = load_arrays(records[(row.dataset, row.case_id)])
    again = class_embeddings(
        untrained_bundle.build_model().eval(), image, label, [int(row.label)], (32, 32, 32)
    )
    assert torch.allclose(embedding_tensor(row), again[0, 0], atol=1e-6)


def test_check_references_refuses_the_query_and_its_subject(collection) -> None:
    _, index = collection
    subjects = {(c["dataset"], c["case_id"]): c["subject_id"] for c in index["cases"]}
    episode = copy.deepcopy(next(e for e in index["episodes"] if e["split"] == "test"))
    check_references(episode, subjects)  # the episode builder's episodes pass
    with pytest.raises(ReferenceLeakError, match="is its own reference"):
        check_references({**episode, "references": [episode["query"]]}, subjects)
    sibling = next(
        c["case_id"]
        for c in index["cases"]
        if c["dataset"] == "beta" and c["subject_id"] == subjects[("beta", c["case_id"])]
    )
    same_subject = [
        c["case_id"]
        for c in index["cases"]
        if c["dataset"] == "beta" and c["subject_id"] == subjects[("beta", sibling)]
    ]
    assert len(same_subject) == 2  # beta has two scans per subject
    leak = {
        "episode_id": "beta/x",
        "dataset": "beta",
        "query": same_subject[0],
        "references": [same_subject[1]],
    }
    with pytest.raises(ReferenceLeakError, match="same subject"):
        check_references(leak, subjects)


def test_evaluation_refuses_a_leaking_index_before_any_inference(untrained_bundle, collection, table) -> None:
    manifest, index = collection
    leaking = copy.deepcopy(index)
    episode = next(e for e in leaking["episodes"] if e["split"] == "test")
    episode["references"] = [episode["query"], *episode["references"][1:]]
    with pytest.raises(ReferenceLeakError, match=episode["query"]):
        evaluate_episodes(
            untrained_bundle.build_model(), untrained_bundle.class_ids, leaking, manifest,
            case_records(manifest), table, PARAMS, INFO,
        )  # fmt: skip


def test_evaluation_refuses_embeddings_of_another_model(untrained_bundle, collection, table) -> None:
    """After a retrain, the latest task_embeddings still hold the old model's: retrieval must not mix them
    into the new model's numbers."""
    manifest, index = collection
    retrained = ModelInfo("models:/iris/8", "8", "beef")
    with pytest.raises(ValueError, match=r"made by the model\(s\) with weights \['f00d'\].* are beef"):
        evaluate_episodes(
            untrained_bundle.build_model(), untrained_bundle.class_ids, index, manifest,
            case_records(manifest), table, PARAMS, retrained,
        )  # fmt: skip


def test_retrieval_refuses_embeddings_of_other_reference_windows(untrained_bundle, collection, table) -> None:
    """Retrieval ranks the table's embeddings against the query's own, encoded from evaluate's windows: an
    evaluate.roi_size override must not rank embeddings of two window sizes against each other."""
    manifest, index = collection
    untested = {**index, "episodes": []}
    arguments = (untrained_bundle.build_model(), untrained_bundle.class_ids, untested, manifest)
    wider = EvaluateParams(roi_size=(40, 40, 40))
    with pytest.raises(
        ValueError, match=r"encoded from \[32, 32, 32\]-voxel .* evaluate.roi_size is \[40, 40, 40\]"
    ):
        evaluate_episodes(*arguments, case_records(manifest), table, wider, INFO)
    without_retrieval = EvaluateParams(roi_size=(40, 40, 40), strategies=("one_shot", "tuning"))
    assert evaluate_episodes(*arguments, case_records(manifest), table, without_retrieval, INFO).empty


def test_no_scorable_episode_gives_an_empty_table_with_its_columns(
    untrained_bundle, collection, table
) -> None:
    manifest, index = collection
    untested = {**index, "episodes": [e for e in index["episodes"] if e["split"] != "test"]}
    metrics = evaluate_episodes(
        untrained_bundle.build_model(), untrained_bundle.class_ids, untested, manifest,
        case_records(manifest), table, PARAMS, INFO,
    )  # fmt: skip
    assert metrics.empty and {"dice", "heldout", "label", "method"} <= set(metrics.columns)
    assert report_evaluation(metrics, {})  # the report of nothing, not a KeyError


def test_retrieval_pool_never_holds_the_query_subject(table, collection) -> None:
    """Even when the stored embeddings include the query's own scan, the pool leaves it out."""
    manifest, index = collection
    records = case_records(manifest)
    query_row = table[(table.source == "reference") & ~table.heldout].iloc[0]
    query = records[(query_row.dataset, query_row.case_id)]

    class Episode:  # the two fields _table_pool reads
        pass

    episode = Episode()
    episode.query, episode.classes = query, [int(query_row.label)]
    pool, valid = _table_pool(table, episode)
    kept = table[
        (table.source == "reference")
        & (table.dataset == query.dataset)
        & (table.subject_id != query.subject_id)
    ]
    assert pool.shape[0] == kept.case_id.nunique() and bool(valid.any())
    mine = embedding_tensor(query_row)
    assert not any(torch.equal(mine, pool[n, 0]) for n in range(pool.shape[0]))
    assert np.isfinite(pool.numpy()).all()
