"""Guards on the episode index: subject-level splits, held-out isolation, references, determinism."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import yaml

from iris_pipelines.collection.episodes import (
    EpisodeParams,
    _draw_references,
    build_episode_index,
    index_checksum,
    split_counts,
)

REPO = Path(__file__).resolve().parents[2]
# dataset -> (held out, subjects, cases per subject, labels)
DATASETS = {
    "abdomen": (False, 10, 2, {"1": "liver", "2": "spleen"}),
    "brain": (False, 5, 1, {"1": "white matter"}),
    "tiny": (False, 3, 1, {"1": "Liver"}),
    "pelvis": (True, 6, 1, {"1": "sacrum", "2": "liver"}),
}


def make_manifest() -> pd.DataFrame:
    rows = []
    for dataset, (heldout, n_subjects, per_subject, labels) in DATASETS.items():
        for s in range(n_subjects):
            for c in range(per_subject):
                # Every fourth case lacks the last declared class; case 0 of subject 1 is all background.
                voxels = {
                    label: (0 if (label == max(labels) and (s + c) % 4 == 3) else 100 + s) for label in labels
                }
                if s == 1 and c == 0:
                    voxels = dict.fromkeys(labels, 0)
                rows.append(
                    {
                        "dataset": dataset,
                        "case_id": f"{dataset}-{s:02d}-{c}",
                        "subject_id": f"p{s:02d}",
                        "heldout": heldout,
                        "labels": json.dumps(labels),
                        "class_voxels": json.dumps(voxels),
                        "modality": "CT",
                    }
                )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return make_manifest()


@pytest.fixture(scope="module")
def index(manifest: pd.DataFrame) -> dict:
    return build_episode_index(manifest, {"seed": 0})


def _cases(index: dict) -> pd.DataFrame:
    return pd.DataFrame(index["cases"]).set_index(["dataset", "case_id"], drop=False)


def test_no_subject_in_two_splits(index):
    splits_per_subject = pd.DataFrame(index["cases"]).groupby(["dataset", "subject_id"])["split"].nunique()
    assert (splits_per_subject == 1).all()


def test_heldout_datasets_are_never_trained_or_validated_on(index):
    cases = _cases(index)
    assert set(cases.loc[cases["heldout"], "split"]) == {"context", "test"}
    assert set(cases.loc[~cases["heldout"], "split"]) == {"train", "val", "test"}
    for dataset, (heldout, *_rest) in DATASETS.items():
        if not heldout:
            assert set(cases.loc[cases["dataset"] == dataset, "split"]) == {"train", "val", "test"}


def test_references_are_other_subjects_from_the_reference_pool(index, manifest):
    cases = _cases(index)
    voxels = {(r.dataset, r.case_id): json.loads(r.class_voxels) for r in manifest.itertuples()}
    assert index["episodes"]
    for episode in index["episodes"]:
        dataset = episode["dataset"]
        query = cases.loc[(dataset, episode["query"])]
        pool = "context" if query["heldout"] else "train"
        assert episode["split"] == query["split"] in {"val", "test"}
        assert 1 <= len(episode["references"]) == len(set(episode["references"])) <= 3
        for reference in episode["references"]:
            ref = cases.loc[(dataset, reference)]
            assert reference != episode["query"]
            assert ref["subject_id"] != query["subject_id"]
            assert ref["split"] == pool
        present = {int(k) for k, v in voxels[(dataset, episode["query"])].items() if v > 0}
        shown = {int(k) for k, v in voxels[(dataset, episode["references"][0])].items() if v > 0}
        assert episode["classes"] == sorted(present & shown)


def test_every_query_with_foreground_gets_an_episode(index, manifest):
    cases = _cases(index)
    queries = cases[cases["split"].isin(["val", "test"])]
    background_only = {f"{d}-01-0" for d in DATASETS}
    expected = {(d, c) for d, c in zip(queries["dataset"], queries["case_id"], strict=True)} - {
        (c.split("-")[0], c) for c in background_only
    }
    assert {(e["dataset"], e["query"]) for e in index["episodes"]} == expected


def test_class_tables(index, manifest):
    cases = _cases(index)
    classes = index["classes"]
    assert classes["pelvis"]["1"] == {"name": "sacrum", "train_cases": 0, "novel": True}
    assert classes["pelvis"]["2"]["novel"] is False  # "liver" is a training class
    assert classes["tiny"]["1"]["novel"] is False
    train_ids = set(cases.loc[cases["split"] == "train", "case_id"])
    abdomen = manifest[(manifest["dataset"] == "abdomen") & manifest["case_id"].isin(train_ids)]
    spleen_cases = sum(json.loads(v)["2"] > 0 for v in abdomen["class_voxels"])
    assert classes["abdomen"]["2"] == {"name": "spleen", "train_cases": spleen_cases, "novel": False}


def test_deterministic_under_row_shuffles(index, manifest):
    for seed in (1, 2, 3):
        shuffled = manifest.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        assert build_episode_index(shuffled, {"seed": 0}) == index


def test_checksum_is_of_the_canonical_json_and_follows_the_seed(index, manifest):
    assert index["checksum"] == index_checksum(json.loads(json.dumps(index)))
    other = build_episode_index(manifest, {"seed": 1})
    assert other["checksum"] != index["checksum"] and other["seed"] == 1


def test_adding_a_dataset_leaves_the_others_unchanged(index, manifest):
    smaller = build_episode_index(manifest[manifest["dataset"] != "brain"], {"seed": 0})
    keep = [c for c in index["cases"] if c["dataset"] != "brain"]
    assert smaller["cases"] == keep
    assert smaller["episodes"] == [e for e in index["episodes"] if e["dataset"] != "brain"]


@pytest.mark.parametrize(
    ("n", "fractions", "expected"),
    [
        (10, (0.6, 0.2, 0.2), [6, 2, 2]),
        (3, (0.6, 0.2, 0.2), [1, 1, 1]),
        (5, (0.75, 0.05, 0.2), [3, 1, 1]),
        (2, (0.6, 0.2, 0.2), [1, 1, 0]),
        (7, (0.5, 0.5), [4, 3]),
        (4, (1.0, 0.0, 0.0), [4, 0, 0]),
    ],
)
def test_split_counts(n, fractions, expected):
    assert split_counts(n, fractions) == expected


def test_params_from_the_conf_file():
    data = yaml.safe_load((REPO / "conf" / "base" / "parameters_episodes.yml").read_text())["episodes"]
    assert EpisodeParams.from_dict(data) == EpisodeParams()
    with pytest.raises(ValueError, match="sum to 1"):
        EpisodeParams.from_dict({"ratios": {"train": 0.9, "val": 0.2, "test": 0.2}})
    with pytest.raises(ValueError, match="n_refs"):
        EpisodeParams.from_dict({"n_refs": 2})


@pytest.mark.parametrize(
    ("params", "refused"),
    [
        (
            {"ratios": {"train": 0.8, "test": 0.2}},
            r"ratios needs exactly the keys \['train', 'val', 'test'\]",
        ),
        ({"ratios": {"train": 0.7, "valid": 0.15, "test": 0.15}}, r"got \['test', 'train', 'valid'\]"),
        (
            {"ratios": {"train": "0.6", "val": 0.2, "test": 0.2}},
            r"episodes.ratios.train must be a number, got '0.6'",
        ),
        ({"n_references": "3"}, r"episodes.n_references must be a whole number, got '3'"),
        ({"seed": 1.5}, r"episodes.seed must be a whole number, got 1.5"),
        ({"heldout_context_ratio": "half"}, r"episodes.heldout_context_ratio must be a number, got 'half'"),
    ],
)
def test_episode_parameters_are_refused_by_name(params, refused):
    """A missing ratio took its default (the error then summed a number nobody wrote), and a misspelt key
    or a number written as text failed with a bare TypeError naming neither the parameter nor episodes."""
    with pytest.raises(ValueError, match=refused):
        EpisodeParams.from_dict(params)


def test_duplicate_cases_are_refused(manifest):
    with pytest.raises(ValueError, match="duplicate"):
        build_episode_index(pd.concat([manifest, manifest.iloc[:1]]), {})


def test_first_reference_shows_the_most_query_classes():
    """With no reference showing every query class, the first (one-shot) reference was drawn at random,
    possibly one showing none of them: evaluation then scored none of the classes it lacked."""
    labels = {"1": "liver", "2": "spleen", "3": "kidney"}
    query = pd.Series(
        {"case_id": "q", "subject_id": "sq", "labels": labels, "class_voxels": dict.fromkeys(labels, 5)}
    )
    shown = {"shows_1_2": ("1", "2"), "shows_3": ("3",), "shows_none": (), "shows_1": ("1",)}
    pool = pd.DataFrame(
        [
            {
                "case_id": case_id,
                "subject_id": f"s{number}",
                "labels": labels,
                "class_voxels": {label: 5 if label in present else 0 for label in labels},
            }
            for number, (case_id, present) in enumerate(shown.items())
        ]
    )
    orders = {
        tuple(case["case_id"] for case in _draw_references(query, pool, [1, 2, 3], 4, seed))
        for seed in range(40)
    }
    # Ties (one class each) stay in the seeded random order.
    assert orders == {
        ("shows_1_2", "shows_3", "shows_1", "shows_none"),
        ("shows_1_2", "shows_1", "shows_3", "shows_none"),
    }


def test_an_episode_lists_only_the_query_classes_its_first_reference_shows(caplog):
    """An episode listed every class of its query although its one-shot reference showed none of some (or
    all) of them: evaluation then scored it on fewer classes than listed, or on none and skipped it."""
    labels = {"1": "liver", "2": "lesion"}
    rows = [
        {
            "dataset": "held",
            "case_id": f"c{k}",
            "subject_id": f"s{k}",
            "heldout": True,
            "labels": json.dumps(labels),
            "class_voxels": json.dumps({"1": 100, "2": 0}),
        }
        for k in range(6)
    ]
    splits = {c["case_id"]: c["split"] for c in build_episode_index(pd.DataFrame(rows), {})["cases"]}
    queries = sorted(case for case, split in splits.items() if split == "test")
    assert len(queries) == 3  # the context cases show the liver only
    # A lesion-only query, a query with both classes, and one with the liver only.
    voxels = dict(zip(queries, ({"1": 0, "2": 50}, {"1": 100, "2": 50}, {"1": 100, "2": 0}), strict=True))
    for row in rows:
        row["class_voxels"] = json.dumps(voxels.get(row["case_id"], {"1": 100, "2": 0}))
    with caplog.at_level(logging.WARNING, logger="iris_pipelines.collection.episodes"):
        index = build_episode_index(pd.DataFrame(rows), {})
    assert {e["query"]: e["classes"] for e in index["episodes"]} == {queries[1]: [1], queries[2]: [1]}
    assert "1 val/test case(s) have no foreground class, no reference, or no reference showing" in caplog.text


def test_a_label_named_differently_in_two_cases_is_refused(manifest):
    """Classes are keyed by dataset and value, so "liver" in one case and "spleen" in another would merge."""
    renamed = manifest.copy()
    first_abdomen = renamed.index[renamed["case_id"] == "abdomen-03-1"][0]
    renamed.loc[first_abdomen, "labels"] = json.dumps({"1": "kidney", "2": "spleen"})
    with pytest.raises(
        ValueError,
        match="dataset 'abdomen' names label 1 'liver' in case 'abdomen-00-0' but 'kidney' in case "
        "'abdomen-03-1'",
    ):
        build_episode_index(renamed, {})
