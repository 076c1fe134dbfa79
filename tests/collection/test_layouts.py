"""Case discovery for the MSD, nnU-Net v2 and CSV-manifest layouts, and its problems."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from builders import image_volume, label_volume, write, write_csv, write_dicom_case, write_msd, write_nnunet

from iris_pipelines.collection.layouts import (
    CaseRef,
    Problem,
    discover_cases,
    normalise_modality,
    parse_labels,
)
from iris_pipelines.imaging.errors import InvalidInputError


def _only_problem(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, problems
    return problems[0]


def test_msd_source_lists_training_cases(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task03_Liver", ["liver_0", "liver_1"])
    refs, problems = discover_cases({"name": "liver", "layout": "msd", "path": str(root)})
    assert problems == []
    assert [ref.case_id for ref in refs] == ["liver_0", "liver_1"]
    first = refs[0]
    assert first == CaseRef(
        dataset="liver",
        case_id="liver_0",
        subject_id="liver_0",
        modality="CT",
        heldout=False,
        layout="msd",
        image_path=root / "imagesTr" / "liver_0.nii.gz",
        label_path=root / "labelsTr" / "liver_0.nii.gz",
        labels={1: "liver", 2: "tumour"},
    )


def test_msd_multi_modal_takes_channel_0_with_warning(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task01_BrainTumour", ["brats_0"], modalities=("FLAIR", "T1w", "t1gd", "T2w"))
    refs, problems = discover_cases({"name": "brain", "layout": "msd", "path": str(root)})
    problem = _only_problem(problems)
    assert problem.warning and problem.check == "multichannel" and "channel 0 (FLAIR)" in problem.reason
    assert (refs[0].modality, refs[0].image_channels) == ("MR", 4)


def _permission_denied(method: Callable[..., object], refused: Path) -> Callable[..., object]:
    def guarded(path: Path, *args: object, **kwargs: object) -> object:
        if path == refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return method(path, *args, **kwargs)

    return guarded


def test_files_the_user_may_not_read_are_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A label in a folder the user may not search rejects its case; an unreadable dataset.json its source."""
    root = write_msd(tmp_path / "Task", ["a", "b"])
    hidden = root / "labelsTr" / "b.nii.gz"
    with monkeypatch.context() as patch:
        patch.setattr(Path, "exists", _permission_denied(Path.exists, hidden))
        refs, problems = discover_cases({"name": "t", "layout": "msd", "path": str(root)})
    assert [ref.case_id for ref in refs] == ["a"]
    problem = _only_problem(problems)
    assert (problem.check, problem.case_id, problem.path) == ("unreadable", "b", str(hidden))
    assert "Permission denied" in problem.reason
    meta_path = root / "dataset.json"
    monkeypatch.setattr(Path, "read_text", _permission_denied(Path.read_text, meta_path))
    refs, problems = discover_cases({"name": "t", "layout": "msd", "path": str(root)})
    problem = _only_problem(problems)
    assert refs == [] and (problem.check, problem.case_id, problem.path) == ("unreadable", "", str(meta_path))


def test_msd_modality_alias_and_subject_pattern(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task05", ["pat01_t1", "pat01_t2", "pat02_t1"], modality="MRI")
    refs, problems = discover_cases(
        {"name": "p", "layout": "msd", "path": str(root), "subject_pattern": r"^(pat\d+)_", "heldout": True}
    )
    assert problems == []
    assert [ref.subject_id for ref in refs] == ["pat01", "pat01", "pat02"]
    assert {ref.modality for ref in refs} == {"MR"}
    assert all(ref.heldout for ref in refs)


def test_dataset_json_naming_missing_file_is_reported(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task", ["a", "b"])
    missing = root / "imagesTr" / "b.nii.gz"
    missing.unlink()
    refs, problems = discover_cases({"name": "t", "layout": "msd", "path": str(root)})
    assert [ref.case_id for ref in refs] == ["a"]
    problem = _only_problem(problems)
    assert (problem.check, problem.case_id, problem.path) == ("missing_file", "b", str(missing))
    assert "does not exist" in problem.reason and "dataset.json" in problem.reason


def test_missing_dataset_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    refs, problems = discover_cases({"name": "e", "layout": "msd", "path": str(tmp_path / "empty")})
    problem = _only_problem(problems)
    assert refs == []
    assert problem.check == "missing_file"
    assert problem.path.endswith("dataset.json")


def test_malformed_dataset_json(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task", ["a"])
    (root / "dataset.json").write_text('{"labels": {"0": "background",')
    refs, problems = discover_cases({"name": "t", "layout": "msd", "path": str(root)})
    problem = _only_problem(problems)
    assert refs == [] and problem.check == "malformed_json" and "not valid JSON" in problem.reason


def test_unknown_layout(tmp_path: Path) -> None:
    _, problems = discover_cases({"name": "x", "layout": "bids", "path": str(tmp_path)})
    problem = _only_problem(problems)
    assert problem.check == "unknown_layout" and "'bids'" in problem.reason


def test_unknown_source_key_is_refused(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task", ["a"])
    _, problems = discover_cases({"name": "t", "layout": "msd", "path": str(root), "heldOut": True})
    assert _only_problem(problems).check == "bad_source"


def test_unknown_modality_tells_user_to_set_it(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task", ["a"], modality="zscore")
    _, problems = discover_cases({"name": "t", "layout": "msd", "path": str(root)})
    problem = _only_problem(problems)
    assert problem.check == "unknown_modality"
    assert "'zscore'" in problem.reason and "set `modality" in problem.reason
    refs, problems = discover_cases({"name": "t", "layout": "msd", "path": str(root), "modality": "ct"})
    assert problems == [] and refs[0].modality == "CT"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("MRI", "MR"), ("T1", "MR"), ("T2", "MR"), ("ADC", "MR"), ("FLAIR", "MR"), ("cineMRI", "MR"),
     ("CT", "CT"), ("ct", "CT"), ("PET", "PET")],
)  # fmt: skip
def test_normalise_modality(value: str, expected: str) -> None:
    assert normalise_modality(value, where="dataset.json") == expected


def test_parse_labels_accepts_both_styles_and_refuses_regions() -> None:
    assert parse_labels({"0": "background", "1": "liver"}, where="x") == {1: "liver"}
    assert parse_labels({"background": 0, "liver": 1, "spleen": 2}, where="x") == {1: "liver", 2: "spleen"}
    with pytest.raises(InvalidInputError) as caught:
        parse_labels({"background": 0, "whole tumour": [1, 2, 3], "core": [2, 3]}, where="d.json")
    assert caught.value.check == "unsupported_labels" and "region" in caught.value.reason


def test_nnunet_source_with_mha_ending(tmp_path: Path) -> None:
    root = write_nnunet(tmp_path / "Dataset005_Prostate", ["prostate_00", "prostate_01"])
    refs, problems = discover_cases(
        {"name": "prostate", "layout": "nnunet", "path": str(root), "subject_pattern": r"(\w+)_\d+"}
    )
    assert problems == []
    assert [(ref.case_id, ref.subject_id) for ref in refs] == [
        ("prostate_00", "prostate"),
        ("prostate_01", "prostate"),
    ]
    assert refs[0].image_path == root / "imagesTr" / "prostate_00_0000.mha"
    assert refs[0].label_path == root / "labelsTr" / "prostate_00.mha"
    assert refs[0].labels == {1: "prostate", 2: "zone"}
    assert refs[0].modality == "MR" and refs[0].layout == "nnunet"


def test_nnunet_image_without_label(tmp_path: Path) -> None:
    root = write_nnunet(tmp_path / "Dataset001_X", ["a", "b"])
    (root / "labelsTr" / "b.mha").unlink()
    refs, problems = discover_cases({"name": "x", "layout": "nnunet", "path": str(root)})
    problem = _only_problem(problems)
    assert [ref.case_id for ref in refs] == ["a"]
    assert (problem.check, problem.case_id) == ("missing_file", "b")
    assert problem.path == str(root / "labelsTr" / "b.mha") and "has no label" in problem.reason


def test_nnunet_multichannel_takes_channel_0_with_warning(tmp_path: Path) -> None:
    root = write_nnunet(tmp_path / "Dataset002_Brain", ["a"], channel_names={"0": "FLAIR", "1": "T1"})
    refs, problems = discover_cases({"name": "brain", "layout": "nnunet", "path": str(root)})
    problem = _only_problem(problems)
    assert problem.warning and problem.check == "multichannel" and "channel 0" in problem.reason
    assert refs[0].image_path.name == "a_0000.mha"


def test_nnunet_v1_task_is_told_to_add_its_file_ending(tmp_path: Path) -> None:
    """nnU-Net v1 dataset.json files have no `file_ending`: the error names the fix instead of guessing."""
    root = write_nnunet(tmp_path / "Task002_Heart", ["la_003"], file_ending=".nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    del meta["file_ending"]
    (root / "dataset.json").write_text(json.dumps(meta))
    refs, problems = discover_cases({"name": "heart", "layout": "nnunet", "path": str(root)})
    problem = _only_problem(problems)
    assert refs == [] and problem.check == "malformed_json"
    assert "nnU-Net v1" in problem.reason and '"file_ending": ".nii.gz"' in problem.reason


def test_nnunet_without_channel_names_takes_the_modality_of_the_source(tmp_path: Path) -> None:
    root = write_nnunet(tmp_path / "Dataset004_Liver", ["a"])
    meta = json.loads((root / "dataset.json").read_text())
    del meta["channel_names"]
    (root / "dataset.json").write_text(json.dumps(meta))
    source = {"name": "liver", "layout": "nnunet", "path": str(root)}
    refs, problems = discover_cases({**source, "modality": "CT"})
    assert problems == [] and refs[0].modality == "CT"
    refs, problems = discover_cases(source)  # neither says which modality: still refused
    assert refs == [] and _only_problem(problems).check == "unknown_modality"


def test_nnunet_region_labels_are_rejected(tmp_path: Path) -> None:
    root = write_nnunet(
        tmp_path / "Dataset003_Brats", ["a"], labels={"background": 0, "whole": [1, 2], "core": 2}
    )
    refs, problems = discover_cases({"name": "b", "layout": "nnunet", "path": str(root)})
    problem = _only_problem(problems)
    assert refs == [] and problem.check == "unsupported_labels"
    assert "region-based" in problem.reason and problem.path.endswith("dataset.json")


def test_nnunet_ignore_label_rejects_the_dataset(tmp_path: Path) -> None:
    """nnU-Net v2's "ignore" marks unannotated voxels; it must not become a foreground class."""
    root = write_nnunet(
        tmp_path / "Dataset004_Sparse", ["a"], labels={"background": 0, "prostate": 1, "ignore": 2}
    )
    refs, problems = discover_cases({"name": "sparse", "layout": "nnunet", "path": str(root)})
    problem = _only_problem(problems)
    assert refs == [] and problem.check == "unsupported_labels"
    assert problem.path == str(root / "dataset.json")
    assert "'ignore' (value 2)" in problem.reason and "partially annotated" in problem.reason


def test_nnunet_label_without_channel_0_image_is_reported(tmp_path: Path) -> None:
    root = write_nnunet(tmp_path / "Dataset001_X", ["a", "b"], channel_names={"0": "T2", "1": "ADC"})
    (root / "imagesTr" / "b_0000.mha").unlink()  # b_0001.mha and labelsTr/b.mha remain
    refs, problems = discover_cases({"name": "x", "layout": "nnunet", "path": str(root)})
    assert [ref.case_id for ref in refs] == ["a"]
    missing = [problem for problem in problems if not problem.warning]
    problem = _only_problem(missing)
    assert (problem.check, problem.case_id) == ("missing_file", "b")
    assert problem.path == str(root / "imagesTr" / "b_0000.mha")
    assert str(root / "labelsTr" / "b.mha") in problem.reason and "no channel-0 image" in problem.reason


def test_files_saved_with_a_byte_order_mark_are_read(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" and Windows editors start the file with a BOM."""
    root = tmp_path / "site"
    write(image_volume(), root / "a.nii.gz")
    write(label_volume(), root / "a_seg.nii.gz")
    (root / "manifest.csv").write_bytes("case_id,image,label\na,a.nii.gz,a_seg.nii.gz\n".encode("utf-8-sig"))
    (root / "labels.json").write_bytes('{"1": "kidney", "2": "cyst"}'.encode("utf-8-sig"))
    refs, problems = discover_cases({"name": "s", "layout": "csv", "path": str(root), "modality": "CT"})
    assert problems == []
    assert [(ref.case_id, ref.labels) for ref in refs] == [("a", {1: "kidney", 2: "cyst"})]
    msd = write_msd(tmp_path / "Task01", ["b"])
    meta = msd / "dataset.json"
    meta.write_bytes(meta.read_text().encode("utf-8-sig"))
    refs, problems = discover_cases({"name": "m", "layout": "msd", "path": str(msd)})
    assert problems == [] and [ref.case_id for ref in refs] == ["b"]


def test_csv_source_with_dicom_series_image(tmp_path: Path) -> None:
    root = tmp_path / "hospital"
    dicom_dir, label = write_dicom_case(root, "scan_a")
    nifti = write(image_volume(), root / "images" / "scan_b.nii.gz")
    write(label_volume(), root / "labels" / "scan_b.nii.gz")
    csv_path = write_csv(
        root,
        [
            {
                "case_id": "scan_a",
                "subject_id": "P1",
                "image": "images/scan_a",
                "label": "labels/scan_a.nii.gz",
            },
            {"case_id": "scan_b", "subject_id": "P1", "image": str(nifti), "label": "labels/scan_b.nii.gz"},
        ],
        labels={"0": "background", "1": "kidney", "2": "cyst"},
    )
    refs, problems = discover_cases({"name": "h", "layout": "csv", "path": str(csv_path), "modality": "CT"})
    assert problems == []
    assert [(ref.case_id, ref.subject_id) for ref in refs] == [("scan_a", "P1"), ("scan_b", "P1")]
    assert refs[0].image_path == dicom_dir and refs[0].label_path == label
    assert refs[1].labels == {1: "kidney", 2: "cyst"}


def test_csv_labels_column_and_directory_path(tmp_path: Path) -> None:
    root = tmp_path / "site"
    write(image_volume(), root / "a.nii.gz")
    write(label_volume(), root / "a_seg.nii.gz")
    row = {"case_id": "a", "subject_id": "", "image": "a.nii.gz", "label": "a_seg.nii.gz"}
    write_csv(root, [{**row, "labels": json.dumps({"liver": 1})}], labels=None)
    refs, problems = discover_cases({"name": "s", "layout": "csv", "path": str(root), "modality": "PET"})
    assert problems == []
    assert (refs[0].subject_id, refs[0].labels, refs[0].modality) == ("a", {1: "liver"}, "PET")


def test_csv_header_with_spaces_after_the_commas(tmp_path: Path) -> None:
    root = tmp_path / "site"
    write(image_volume(), root / "a.nii.gz")
    write(label_volume(), root / "a_seg.nii.gz")
    (root / "manifest.csv").write_text("case_id, image, label\na, a.nii.gz, a_seg.nii.gz\n")
    (root / "labels.json").write_text(json.dumps({"1": "liver", "2": "tumour"}))
    refs, problems = discover_cases({"name": "s", "layout": "csv", "path": str(root), "modality": "CT"})
    assert problems == [] and [(r.case_id, r.image_path.name) for r in refs] == [("a", "a.nii.gz")]


def test_csv_without_labels_is_reported(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path, [{"case_id": "a", "image": "a.nii", "label": "b.nii"}], labels=None)
    _, problems = discover_cases({"name": "s", "layout": "csv", "path": str(csv_path), "modality": "CT"})
    problem = _only_problem(problems)
    assert problem.check == "missing_file" and problem.path.endswith("labels.json")


def _annexed_msd(root: Path, store: Path, case_ids: list[str], targets: list[str]) -> Path:
    """An MSD task whose files are relative symlinks into ``store`` (git-annex / DataLad / DVC style)."""
    training = []
    for index, (case_id, target) in enumerate(zip(case_ids, targets, strict=True)):
        for folder, volume in (("imagesTr", image_volume(seed=index)), ("labelsTr", label_volume())):
            stored = write(volume, store / folder / target)
            link = root / folder / f"{case_id}.nii.gz"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(stored, link.parent))
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    meta = {"modality": {"0": "CT"}, "labels": {"1": "liver", "2": "tumour"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_case_ids_come_from_the_listed_names_of_symlinked_files(tmp_path: Path) -> None:
    """The MSD reader resolved each listed path, so a symlinked file got its target's name as case id
    (git-annex's ``SHA256E-s…``), and a subject_pattern written for the listed names matched nothing."""
    store = tmp_path / ".git" / "annex" / "objects"
    targets = [f"SHA256E-s{1000 + i}--{i:064x}.nii.gz" for i in range(2)]
    root = _annexed_msd(tmp_path / "Task03_Liver", store, ["liver_0", "liver_1"], targets)
    source = {"name": "liver", "layout": "msd", "path": str(root), "subject_pattern": r"^(liver)_\d+$"}
    refs, problems = discover_cases(source)
    assert problems == []
    assert [(ref.case_id, ref.subject_id) for ref in refs] == [("liver_0", "liver"), ("liver_1", "liver")]
    # Paths as dataset.json names them (read through the link), not the annex objects.
    assert [ref.image_path for ref in refs] == [root / "imagesTr" / f"liver_{i}.nii.gz" for i in range(2)]
    assert [ref.label_path for ref in refs] == [root / "labelsTr" / f"liver_{i}.nii.gz" for i in range(2)]
    assert all(ref.image_path.resolve().parent == store / "imagesTr" for ref in refs)


def test_msd_links_to_files_of_one_name_are_distinct_cases(tmp_path: Path) -> None:
    """A task combined from two sources' ``case_001`` under distinct link names lost one as a duplicate."""
    training = []
    root = tmp_path / "Task99_Combined"
    for index, (site, name) in enumerate((("TaskL", "liver_case_001"), ("TaskV", "vessel_case_001"))):
        for folder, volume in (("imagesTr", image_volume(seed=50 + index)), ("labelsTr", label_volume())):
            target = write(volume, tmp_path / site / folder / "case_001.nii.gz")
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{name}.nii.gz").symlink_to(target)
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {"modality": {"0": "CT"}, "labels": {"1": "liver"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    refs, problems = discover_cases({"name": "combined", "layout": "msd", "path": str(root)})
    assert problems == []
    assert [ref.case_id for ref in refs] == ["liver_case_001", "vessel_case_001"]


@pytest.mark.parametrize(
    "source", ["/data/Task03_Liver", ["msd", "/data"], None], ids=["str", "list", "None"]
)
def test_a_source_that_is_not_a_mapping_is_a_bad_source(source: object) -> None:
    """It crashed with AttributeError ('str' object has no attribute 'get') instead of being reported."""
    refs, problems = discover_cases(source)  # type: ignore[arg-type]
    problem = _only_problem(problems)
    assert refs == [] and problem.check == "bad_source"
    assert type(source).__name__ in problem.reason and "{name, layout, path}" in problem.reason
