"""Discover the cases of one source (MSD, nnU-Net v2 raw, CSV manifest) without reading any volume.

Discovery looks only at ``dataset.json`` / ``manifest.csv`` and at which files exist, so a badly laid out
collection is reported in seconds; the volumes themselves are checked case by case in
:mod:`iris_pipelines.collection.ingest`.

A *source* is a plain mapping (it comes from ``params:ingest.sources``)::

    {name, layout: msd|nnunet|csv, path, modality?, heldout?, subject_pattern?}
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iris_pipelines.imaging.errors import InvalidInputError

LAYOUTS = ("msd", "nnunet", "csv")
SOURCE_KEYS = frozenset({"name", "layout", "path", "modality", "heldout", "subject_pattern"})
MODALITIES = ("CT", "MR", "PET")

# Channel names seen in MSD / nnU-Net dataset.json files, mapped to the modality that decides intensity
# normalisation. Names of nnU-Net normalisation schemes ("zscore", "noNorm", …) are deliberately absent:
# they say nothing about the scanner, so the user has to state the modality.
_MODALITY_ALIASES: dict[str, str] = {
    **dict.fromkeys(("ct", "cect", "ncct", "cta"), "CT"),
    **dict.fromkeys(("pet", "pt", "fdg-pet"), "PET"),
    **dict.fromkeys(
        (
            "mr", "mri", "t1", "t1w", "t1gd", "t1ce", "t1c", "t2", "t2w", "t2*", "flair", "adc", "dwi",
            "pd", "pdw", "swi", "cinemri", "cine", "dce", "bold", "lge",
        ),
        "MR",
    ),
}  # fmt: skip
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
_CSV_REQUIRED = ("case_id", "image", "label")
_INTEGER_KEY = re.compile(r"^\s*-?\d+\s*$")
_NNUNET_IGNORE = "ignore"
# utf-8-sig also reads files saved with a byte order mark (Excel's "CSV UTF-8", Notepad), which plain
# utf-8 would glue onto the first column name or refuse as JSON.
_TEXT_ENCODING = "utf-8-sig"


@dataclass(frozen=True)
class CaseRef:
    """One labelled case as found on disk; nothing about it has been read or checked yet."""

    dataset: str
    case_id: str
    subject_id: str
    modality: str
    heldout: bool
    layout: str
    image_path: Path
    label_path: Path
    labels: dict[int, str]
    # Modalities of a multi-modal MSD image, stacked along its 4th axis; only the first volume is ingested.
    image_channels: int = 1


@dataclass(frozen=True)
class Problem:
    """Something wrong found at discovery.

    ``case_id`` is empty when the whole source is affected. A ``warning`` rejects nothing (the case is
    still returned); anything else means the case or source was dropped and belongs in the ingest report.
    """

    dataset: str
    case_id: str
    path: str
    check: str
    reason: str
    warning: bool = False

    def to_error(self) -> InvalidInputError:
        return InvalidInputError(self.path, self.check, self.reason)


@dataclass(frozen=True)
class _Source:
    name: str
    layout: str
    path: Path
    modality: str | None
    heldout: bool
    subject_pattern: re.Pattern[str] | None


def unreadable(error: OSError, where: str | Path) -> InvalidInputError:
    """An OS error (no read permission, an I/O error on a network file system) as the reject of the file it
    hit, or of ``where`` when it names none: one unreadable file must not stop a whole collection."""
    advice = (
        "make it (and its folders) readable for the user running ingest"
        if isinstance(error, PermissionError)
        else "check the file and its file system"
    )
    path = where if error.filename is None else error.filename
    return InvalidInputError(
        str(path), "unreadable", f"the file cannot be read ({error.strerror or error}); {advice}"
    )


def not_a_source(source: object, index: int | None = None) -> InvalidInputError:
    """The ``bad_source`` error of a source that is no mapping (a bare path, a list, a YAML scalar)."""
    where = "source" if index is None else f"sources[{index}]"
    return InvalidInputError(
        where,
        "bad_source",
        f"{where} is a {type(source).__name__} ({source!r:.80}), not a mapping; write each source as "
        "{name, layout, path} (in YAML, a list item `- name: …` with `layout:` and `path:` below it)",
    )


def normalise_modality(value: object, *, where: str) -> str:
    """Map a channel name such as ``MRI``, ``T2`` or ``ct`` to ``CT``, ``MR`` or ``PET``."""
    key = str(value).strip().lower()
    if key.upper() in MODALITIES:
        return key.upper()
    if key in _MODALITY_ALIASES:
        return _MODALITY_ALIASES[key]
    raise InvalidInputError(
        where,
        "unknown_modality",
        f"modality {value!r} is not CT, MR or PET nor a known alias (MRI, T1, T2, FLAIR, ADC, …); "
        "set `modality: CT`, `MR` or `PET` in the source",
    )


def parse_labels(raw: object, *, where: str) -> dict[int, str]:
    """Declared foreground labels ``{value: name}`` from MSD style ``{"1": "liver"}`` or nnU-Net style
    ``{"liver": 1}``; value 0 is background and dropped. Region-based (list) values are refused because a
    voxel could then belong to several classes, which the episode sampler cannot represent.

    nnU-Net v2's reserved ``"ignore"`` label (nnU-Net style only) is refused too: it marks voxels nobody
    annotated, so it is no class, and mapping it to background would teach the model that every
    unannotated voxel is background. Partially annotated datasets are therefore not ingested at all.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise InvalidInputError(where, "malformed_labels", "`labels` must be a non-empty JSON object")
    pairs: list[tuple[object, object]]
    if all(isinstance(key, str) and _INTEGER_KEY.match(key) for key in raw):
        pairs = [(int(key), name) for key, name in raw.items()]
    else:
        if _NNUNET_IGNORE in raw:
            raise InvalidInputError(
                where,
                "unsupported_labels",
                f"label {_NNUNET_IGNORE!r} (value {raw[_NNUNET_IGNORE]!r}) is nnU-Net's ignore label for "
                "unannotated voxels: partially annotated datasets are not supported for in-context "
                "training, whose reference masks must mark every voxel of a class; annotate the ignored "
                "voxels (or drop the dataset) and remove the label",
            )
        pairs = [(value, name) for name, value in raw.items()]
    labels: dict[int, str] = {}
    for value, name in pairs:
        if isinstance(value, list):
            raise InvalidInputError(
                where,
                "unsupported_labels",
                f"label {name!r} is a region {value}: region-based nnU-Net datasets are not supported; "
                "declare one integer value per label",
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(
                where, "malformed_labels", f"label {name!r} has value {value!r}; use a non-negative integer"
            )
        if value in labels:
            raise InvalidInputError(
                where,
                "malformed_labels",
                f"label value {value} is declared twice ({labels[value]!r} and {name!r})",
            )
        labels[value] = str(name)
    foreground = {value: name for value, name in sorted(labels.items()) if value != 0}
    if not foreground:
        raise InvalidInputError(where, "malformed_labels", "`labels` declares no foreground label")
    return foreground


def case_id_from_path(path: Path) -> str:
    """File name without its image suffix (``la_003.nii.gz`` → ``la_003``); a DICOM directory's name."""
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _parse_source(source: Mapping[str, Any]) -> _Source:
    name = source.get("name")
    where = str(source.get("path") or f"source {name!r}")
    unknown = sorted(set(source) - SOURCE_KEYS)
    if unknown:
        raise InvalidInputError(
            where, "bad_source", f"unknown key(s) {unknown} in source; allowed: {sorted(SOURCE_KEYS)}"
        )
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(where, "bad_source", "the source needs a non-empty `name`")
    layout = source.get("layout")
    if layout not in LAYOUTS:
        raise InvalidInputError(
            where, "unknown_layout", f"layout {layout!r} is not one of {', '.join(LAYOUTS)}"
        )
    if not source.get("path"):
        raise InvalidInputError(where, "bad_source", f"source {name!r} needs a `path`")
    path = Path(str(source["path"])).expanduser().resolve()
    if not path.exists():
        raise InvalidInputError(str(path), "missing_file", f"the {layout} source path does not exist")
    heldout = source.get("heldout", False)
    if not isinstance(heldout, bool):
        raise InvalidInputError(where, "bad_source", f"`heldout` must be true or false, not {heldout!r}")
    modality = source.get("modality")
    pattern = source.get("subject_pattern")
    return _Source(
        name=name.strip(),
        layout=layout,
        path=path,
        modality=None if modality is None else normalise_modality(modality, where=where),
        heldout=heldout,
        subject_pattern=None if pattern is None else _compile_subject_pattern(pattern, where),
    )


def _compile_subject_pattern(pattern: object, where: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(str(pattern))
    except re.error as exc:
        raise InvalidInputError(
            where, "bad_source", f"subject_pattern {pattern!r} is not a regex: {exc}"
        ) from None
    if compiled.groups != 1:
        raise InvalidInputError(
            where,
            "bad_source",
            f"subject_pattern {pattern!r} has {compiled.groups} groups; it needs exactly one: the subject id",
        )
    return compiled


def _subject_id(source: _Source, case_id: str, where: str) -> str:
    if source.subject_pattern is None:
        return case_id
    match = source.subject_pattern.search(case_id)
    if match is None or not match.group(1):
        raise InvalidInputError(
            where,
            "bad_subject_pattern",
            f"subject_pattern {source.subject_pattern.pattern!r} does not match case id {case_id!r}; "
            "fix the pattern so that every case id yields a subject id",
        )
    return match.group(1)


def _read_dataset_json(directory: Path) -> tuple[Path, dict[str, Any]]:
    meta_path = directory / "dataset.json"
    if not meta_path.is_file():
        raise InvalidInputError(
            str(meta_path), "missing_file", f"no dataset.json in {directory}; is this the dataset folder?"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding=_TEXT_ENCODING))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(
            str(meta_path), "malformed_json", f"dataset.json is not valid JSON: {exc}"
        ) from None
    if not isinstance(meta, dict):
        raise InvalidInputError(str(meta_path), "malformed_json", "dataset.json must hold a JSON object")
    return meta_path, meta


def _channels(source: _Source, meta: Mapping[str, Any], key: str, meta_path: Path) -> dict[str, object]:
    """dataset.json's channel names; optional (``{}`` when absent) if the source names the modality."""
    channels = meta.get(key)
    if source.modality and not isinstance(channels, Mapping):
        return {}
    if not isinstance(channels, Mapping) or "0" not in channels:
        raise InvalidInputError(
            str(meta_path),
            "unknown_modality",
            f'dataset.json has no `{key}` entry for channel "0"; set `modality` in the source',
        )
    return dict(channels)


def _channel_0_only(source: _Source, channels: Mapping[str, object], meta_path: Path) -> list[Problem]:
    """One warning per dataset that declares several input channels: Iris reads one, channel 0."""
    if len(channels) < 2:
        return []
    return [
        Problem(
            source.name,
            "",
            str(meta_path),
            "multichannel",
            f"{len(channels)} input channels {list(channels.values())}; Iris reads one, "
            f"so only channel 0 ({channels['0']}) is ingested",
            warning=True,
        )
    ]


def _make_ref(
    source: _Source,
    case_id: str,
    *,
    image: Path,
    label: Path,
    labels: dict[int, str],
    modality: str,
    subject_id: str | None = None,
    listed_in: str = "",
    image_channels: int = 1,
) -> CaseRef:
    """Build a case after checking that both files exist; ``listed_in`` names who pointed at them."""
    try:
        image_exists, label_exists = image.exists(), label.exists()
    except OSError as exc:  # a folder on the way that the user may not search
        raise unreadable(exc, image) from None
    if not image_exists:
        raise InvalidInputError(str(image), "missing_file", f"the image{listed_in} does not exist")
    if not label_exists:
        raise InvalidInputError(
            str(label),
            "missing_file",
            f"the image {image.name} has no label: {label}{listed_in} does not exist",
        )
    return CaseRef(
        dataset=source.name,
        case_id=case_id,
        subject_id=subject_id or _subject_id(source, case_id, str(image)),
        modality=modality,
        heldout=source.heldout,
        layout=source.layout,
        image_path=image,
        label_path=label,
        labels=labels,
        image_channels=image_channels,
    )


def _listed_path(directory: Path, listed: str) -> Path:
    """``listed`` (a path in dataset.json or a CSV manifest) under ``directory``, its folders resolved but
    not its file.

    The case id is the listed file's name: a symlinked file (git-annex, DataLad, a DVC symlink cache, a
    task combined from links) would otherwise be named after its target (``SHA256E-s…``, a cache hash,
    or another task's ``case_001``). The file is still read through the link, as the nnU-Net reader does.
    """
    path = directory / listed
    if path.name in ("", ".", ".."):  # no file name to keep
        return path.resolve()
    return path.parent.resolve() / path.name


def _discover_msd(source: _Source) -> tuple[list[CaseRef], list[Problem]]:
    meta_path, meta = _read_dataset_json(source.path)
    channels = _channels(source, meta, "modality", meta_path)
    modality = source.modality or normalise_modality(channels["0"], where=str(meta_path))
    labels = parse_labels(meta.get("labels"), where=str(meta_path))
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        raise InvalidInputError(
            str(meta_path),
            "malformed_json",
            "dataset.json needs a non-empty `training` list of {image, label}",
        )
    refs: list[CaseRef] = []
    # Multi-modal MSD tasks (BrainTumour, Prostate) stack their modalities in one 4-D image per case.
    problems = _channel_0_only(source, channels, meta_path)
    for index, entry in enumerate(training):
        if not isinstance(entry, Mapping) or not entry.get("image") or not entry.get("label"):
            problems.append(
                Problem(
                    source.name,
                    "",
                    str(meta_path),
                    "malformed_json",
                    f"training[{index}] must be an object with `image` and `label` paths",
                )
            )
            continue
        image = _listed_path(source.path, str(entry["image"]))
        case_id = case_id_from_path(image)
        try:
            refs.append(
                _make_ref(
                    source,
                    case_id,
                    image=image,
                    label=_listed_path(source.path, str(entry["label"])),
                    labels=labels,
                    modality=modality,
                    listed_in=f" listed in {meta_path}",
                    image_channels=max(len(channels), 1),
                )
            )
        except InvalidInputError as err:
            problems.append(Problem(source.name, case_id, err.path, err.check, err.reason))
    return refs, problems


def _discover_nnunet(source: _Source) -> tuple[list[CaseRef], list[Problem]]:
    meta_path, meta = _read_dataset_json(source.path)
    channel_key = "channel_names" if "channel_names" in meta else "modality"
    channels = _channels(source, meta, channel_key, meta_path)
    modality = source.modality or normalise_modality(channels["0"], where=str(meta_path))
    labels = parse_labels(meta.get("labels"), where=str(meta_path))
    images_dir = source.path / "imagesTr"
    file_ending = meta.get("file_ending")
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise InvalidInputError(str(meta_path), "malformed_json", _file_ending_advice(meta, images_dir))
    if not images_dir.is_dir():
        raise InvalidInputError(str(images_dir), "missing_file", "the nnU-Net dataset has no imagesTr folder")
    problems = _channel_0_only(source, channels, meta_path)
    suffix = "_0000" + file_ending
    labels_dir = source.path / "labelsTr"
    refs: list[CaseRef] = []
    imaged: set[str] = set()
    for image in sorted(images_dir.iterdir()):
        if image.name.startswith(".") or not image.name.endswith(suffix):
            continue
        case_id = image.name[: -len(suffix)]
        imaged.add(case_id)
        label = labels_dir / f"{case_id}{file_ending}"
        try:
            refs.append(
                _make_ref(source, case_id, image=image, label=label, labels=labels, modality=modality)
            )
        except InvalidInputError as err:
            problems.append(Problem(source.name, case_id, err.path, err.check, err.reason))
    # Cases are found through their channel-0 images, so a label whose image is missing would otherwise
    # vanish without a trace.
    labelled = sorted(labels_dir.iterdir()) if labels_dir.is_dir() else []
    for label in labelled:
        if label.name.startswith(".") or not label.name.endswith(file_ending):
            continue
        case_id = label.name[: -len(file_ending)]
        if case_id in imaged:
            continue
        expected = images_dir / f"{case_id}{suffix}"
        problems.append(
            Problem(
                source.name,
                case_id,
                str(expected),
                "missing_file",
                f"the label {label} has no channel-0 image: {expected} does not exist",
            )
        )
    if not refs and not any(not problem.warning for problem in problems):
        raise InvalidInputError(str(images_dir), "no_cases", f"imagesTr holds no file ending in {suffix}")
    return refs, problems


def _channel_0_ending(images_dir: Path) -> str | None:
    """The image suffix of the first ``<case>_0000<suffix>`` file in imagesTr, if there is one."""
    if not images_dir.is_dir():
        return None
    for image in sorted(images_dir.iterdir()):
        for suffix in _IMAGE_SUFFIXES:
            if image.name.endswith("_0000" + suffix):
                return suffix
    return None


def _file_ending_advice(meta: Mapping[str, Any], images_dir: Path) -> str:
    """Why a dataset.json without a usable ``file_ending`` is refused, naming the fix for an nnU-Net v1 task.

    nnU-Net v1 had no ``file_ending`` (its images were all NIfTI); the ending is not guessed from the files,
    since one stray file would then decide which cases a dataset has.
    """
    found = None if "file_ending" in meta else _channel_0_ending(images_dir)
    if found is None:
        return 'dataset.json needs a `file_ending` such as ".nii.gz"'
    return (
        f"dataset.json has no `file_ending`, and imagesTr holds images named <case>_0000{found}: this looks "
        f'like an nnU-Net v1 task; add `"file_ending": "{found}"` to its dataset.json to ingest it'
    )


def _read_manifest_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with csv_path.open(newline="", encoding=_TEXT_ENCODING) as handle:
            reader = csv.DictReader(handle)
            # "case_id, image, label" (a space after each comma) names the same columns as without.
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            rows = list(reader)
            columns = list(reader.fieldnames)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InvalidInputError(
            str(csv_path), "malformed_csv", f"the manifest is not valid CSV: {exc}"
        ) from None
    missing = [column for column in _CSV_REQUIRED if column not in columns]
    if missing:
        raise InvalidInputError(
            str(csv_path),
            "malformed_csv",
            f"the manifest lacks column(s) {missing}; it needs case_id, image, label (and subject_id)",
        )
    if not rows:
        raise InvalidInputError(str(csv_path), "no_cases", "the CSV manifest has no rows")
    return columns, [
        {key: (value or "").strip() for key, value in row.items() if key is not None} for row in rows
    ]


def _csv_default_labels(csv_path: Path, has_column: bool) -> dict[int, str] | None:
    labels_path = csv_path.parent / "labels.json"
    if not labels_path.is_file():
        if has_column:
            return None
        raise InvalidInputError(
            str(labels_path),
            "missing_file",
            f"no labels.json next to {csv_path.name} and no `labels` column; add one of them",
        )
    try:
        raw = json.loads(labels_path.read_text(encoding=_TEXT_ENCODING))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(
            str(labels_path), "malformed_json", f"labels.json is not valid JSON: {exc}"
        ) from None
    return parse_labels(raw, where=str(labels_path))


def _csv_row_labels(row: Mapping[str, str], default: dict[int, str] | None, where: str) -> dict[int, str]:
    text = row.get("labels", "")
    if not text:
        if default is None:
            raise InvalidInputError(
                where, "malformed_labels", "the row has an empty `labels` cell and no labels.json"
            )
        return default
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            where, "malformed_labels", f"the `labels` cell is not valid JSON: {exc}"
        ) from None
    return parse_labels(raw, where=where)


def _discover_csv(source: _Source) -> tuple[list[CaseRef], list[Problem]]:
    csv_path = source.path / "manifest.csv" if source.path.is_dir() else source.path
    if not csv_path.is_file():
        raise InvalidInputError(str(csv_path), "missing_file", "the CSV manifest does not exist")
    if source.modality is None:
        raise InvalidInputError(
            str(csv_path), "unknown_modality", "a csv source needs `modality: CT`, `MR` or `PET`"
        )
    columns, rows = _read_manifest_csv(csv_path)
    default_labels = _csv_default_labels(csv_path, has_column="labels" in columns)
    base = csv_path.parent
    refs: list[CaseRef] = []
    problems: list[Problem] = []
    first_names = _FirstLabelNames(source.name)
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path}:{line}"
        case_id = row["case_id"]
        try:
            if not case_id or not row["image"] or not row["label"]:
                raise InvalidInputError(where, "malformed_csv", "the row needs case_id, image and label")
            labels = _csv_row_labels(row, default_labels, where)
            first_names.require_same(labels, case_id, where)
            ref = _make_ref(
                source,
                case_id,
                image=_listed_path(base, row["image"]),
                label=_listed_path(base, row["label"]),
                labels=labels,
                modality=source.modality,
                subject_id=row.get("subject_id") or None,
                listed_in=f" listed in {where}",
            )
        except InvalidInputError as err:
            problems.append(Problem(source.name, case_id, err.path, err.check, err.reason))
            continue
        first_names.record(labels, case_id)
        refs.append(ref)
    return refs, problems


class _FirstLabelNames:
    """The name each label value has in the first accepted case that declares it, per dataset.

    A ``labels`` column lets every case name its labels; downstream a class is its dataset and value, so a
    value named "liver" in one case and "spleen" in another would silently merge two classes. As with a
    duplicate case, the first declaration stands and a later case that contradicts it is rejected.
    """

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.first: dict[int, tuple[str, str]] = {}

    def require_same(self, labels: Mapping[int, str], case_id: str, where: str) -> None:
        conflicts = [
            (value, name, *self.first[value])
            for value, name in sorted(labels.items())
            if value in self.first and self.first[value][0] != name
        ]
        if conflicts:
            listed = "; ".join(
                f"label {value} is {name!r} here but {first_name!r} in case {first_case!r}"
                for value, name, first_name, first_case in conflicts
            )
            raise InvalidInputError(
                where,
                "inconsistent_labels",
                f"{listed} of dataset {self.dataset!r}; a label value must name the same class in every "
                "case of a dataset: fix the `labels` cell, or make a separate dataset of the cases that "
                "number their classes differently",
            )

    def record(self, labels: Mapping[int, str], case_id: str) -> None:
        for value, name in labels.items():
            self.first.setdefault(value, (name, case_id))


_DISCOVERERS: dict[str, Callable[[_Source], tuple[list[CaseRef], list[Problem]]]] = {
    "msd": _discover_msd,
    "nnunet": _discover_nnunet,
    "csv": _discover_csv,
}


def discover_cases(source: Mapping[str, Any]) -> tuple[list[CaseRef], list[Problem]]:
    """Cases of one source and the problems met finding them.

    Never raises for bad input: a source that cannot be read at all yields no case and one problem with
    an empty ``case_id``, so one broken dataset does not stop a collection from being ingested.
    """
    if not isinstance(source, Mapping):
        err = not_a_source(source)
        return [], [Problem("", "", err.path, err.check, err.reason)]
    name = str(source.get("name") or "")
    try:
        parsed = _parse_source(source)
        return _DISCOVERERS[parsed.layout](parsed)
    except (InvalidInputError, OSError) as exc:  # OSError: dataset.json, the manifest or a folder unreadable
        err = unreadable(exc, str(source.get("path") or "")) if isinstance(exc, OSError) else exc
        return [], [Problem(name, "", err.path, err.check, err.reason)]
