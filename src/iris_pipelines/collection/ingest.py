"""Check every discovered case and build the ``case_manifest`` and ``ingest_report`` tables.

A case is accepted only when its image and label can be read, are 3-D, share one grid, the image is finite
and the label holds declared integer labels with some foreground. Everything else becomes one report row
(and one WARNING), so a bad file never stops a collection from being ingested unless ``strict`` is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from iris_pipelines.collection.layouts import CaseRef, Problem, discover_cases, not_a_source, unreadable
from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.io import (
    detect_format,
    file_sha256,
    non_finite_label_error,
    read_image,
    require_scalar_volume,
)
from iris_pipelines.imaging.resample import LABEL_MAX
from iris_pipelines.imaging.stats import non_whole_values

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "dataset",
    "case_id",
    "subject_id",
    "modality",
    "heldout",
    "layout",
    "image_path",
    "label_path",
    "image_format",
    "size",
    "spacing",
    "origin",
    "direction",
    "labels",
    "image_sha256",
    "label_sha256",
    "voxel_sha256",
)
REPORT_COLUMNS = ("dataset", "case_id", "path", "reason", "check")

# Direction cosines are unitless, so they get their own tolerance: NIfTI stores them as float32
# (~1e-7 error) and qform/sform round-trips add ~1e-6, while 1e-4 still catches a 0.006° rotation.
DIRECTION_ATOL = 1e-4
_MAX_LISTED = 10


def _format_values(values: Iterable[float]) -> str:
    return "(" + ", ".join(repr(round(float(v), 6)) if isinstance(v, float) else str(v) for v in values) + ")"


def first_grid_difference(image: Geometry, label: Geometry, tolerance_mm: float) -> str | None:
    """Name the first differing grid attribute with both values, or None when the grids agree."""
    checks = (
        ("size", 0.0),
        ("spacing", tolerance_mm),
        ("origin", tolerance_mm),
        ("direction", DIRECTION_ATOL),
    )
    for name, tolerance in checks:
        ours, theirs = getattr(image, name), getattr(label, name)
        if not np.allclose(ours, theirs, rtol=0.0, atol=tolerance):
            return f"{name} {_format_values(ours)} in the image vs {_format_values(theirs)} in the label"
    return None


def label_values(values: np.ndarray, path: Path) -> np.ndarray:
    """Distinct label values, refusing NaN, infinite or fractional ones (interpolated or probability
    masks)."""
    if not np.issubdtype(values.dtype, np.integer):
        # Checked first: an infinity is "whole" to rint and would become a nonsense int64 class below. A label
        # file read with read_image(is_label=True) has been refused already; this guards any other array.
        non_finite = values.size - int(np.count_nonzero(np.isfinite(values)))
        if non_finite:
            raise non_finite_label_error(
                path, non_finite, int(np.count_nonzero(np.isnan(values))), values.size
            )
        count, examples = non_whole_values(values, _MAX_LISTED)
        if count:
            listed = ", ".join(repr(float(v)) for v in examples)  # :g would print 1.0000001 as "1"
            raise InvalidInputError(
                str(path),
                "non_integer_label",
                f"{count} label voxels are not whole numbers (e.g. {listed}); "
                "a label map must hold integer class values: re-export it without interpolation",
            )
        values = np.rint(values)
    # sorted=False uses a hash table: ~2x faster than sorting a 512² × 300 volume.
    return np.sort(np.unique(values, sorted=False)).astype(np.int64)


def _require_declared_foreground(present: np.ndarray, labels: Mapping[int, str], path: Path) -> None:
    undeclared = [int(v) for v in present if v != 0 and int(v) not in labels]
    if undeclared:
        listed = ", ".join(map(str, undeclared[:_MAX_LISTED])) + (
            " …" if len(undeclared) > _MAX_LISTED else ""
        )
        raise InvalidInputError(
            str(path),
            "undeclared_label",
            f"the label holds value(s) {listed} not declared in the dataset's labels "
            f"{dict(sorted(labels.items()))}; declare them or remove them from the label",
        )
    if not np.any(present != 0):
        raise InvalidInputError(
            str(path),
            "empty_label",
            "the label has no foreground voxel (all background); it cannot serve as a reference or be "
            "evaluated: remove the case or fix the label",
        )


# Air is -1000 HU and fat about -100: a CT scan with no voxel below this holds raw stored values.
CT_AIR_CHECK_HU = -200.0


def _require_finite_geometry(image: sitk.Image, path: Path, what: str) -> None:
    """Refuse a header whose spacing, origin or direction holds NaN or infinity (e.g. a NIfTI sform with a
    NaN offset): ITK reads it without a word, and every later comparison of it fails, so it surfaced as a
    grid mismatch with the advice to resample, and no resampling can fix it."""
    for field, values in (
        ("spacing", image.GetSpacing()),
        ("origin", image.GetOrigin()),
        ("direction", image.GetDirection()),
    ):
        if not np.all(np.isfinite(values)):
            raise InvalidInputError(
                str(path),
                "bad_geometry",
                f"the {what}'s header gives a non-finite {field} {_format_values(values)}, so where its "
                f"voxels lie is unknown; correct the {field} in the header (or re-export the {what} from its "
                "source)",
            )


def _warn_without_air(image: sitk.Image, path: Path) -> None:
    """A CT whose values were exported without the DICOM rescale (stored value = HU + 1024) is clipped to
    the CT window and normalised into a nearly binary image, and nothing fails: say so."""
    extremes = sitk.MinimumMaximumImageFilter()
    extremes.Execute(image)
    if extremes.GetMinimum() > CT_AIR_CHECK_HU:
        logger.warning(
            "%s: a CT with no voxel below %g HU (values %g..%g); if these are stored values without the "
            "rescale intercept (HU = value - 1024 for most scanners), convert them to Hounsfield units first",
            path, CT_AIR_CHECK_HU, extremes.GetMinimum(), extremes.GetMaximum(),
        )  # fmt: skip


def volume_at(image: sitk.Image, index: int = 0) -> sitk.Image:
    """The ``index``-th 3-D volume of a 4-D (x, y, z, channel) image, on the 3-D part of its grid (volume 0
    of a multi-modal MSD image is its first modality); any other image as it is."""
    if image.GetDimension() != 4:
        return image
    size = list(image.GetSize())
    return sitk.Extract(
        image, [*size[:3], 0], [0, 0, 0, index], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX
    )


def _channel_0(image: sitk.Image, ref: CaseRef) -> sitk.Image:
    """Channel 0 of a multi-modal case, refusing a 4-D image that does not hold one volume per modality."""
    if ref.image_channels == 1 or image.GetDimension() != 4:
        return image
    volumes = image.GetSize()[3]
    if volumes != ref.image_channels:
        raise InvalidInputError(
            str(ref.image_path),
            "channel_count",
            f"the image holds {volumes} volumes along its 4th axis but its dataset.json declares "
            f"{ref.image_channels} modalities; which one is channel 0 is unclear: fix the image or the "
            "`modality` entry",
        )
    return volume_at(image)


def validate_case(ref: CaseRef, *, tolerance_mm: float) -> dict[str, Any]:
    """Read the image and label once each, check them, and return the case's ``case_manifest`` row.

    Raises :class:`InvalidInputError` naming the offending file and the problem.
    """
    image = _channel_0(read_image(ref.image_path), ref)  # verifies NaN/Inf voxels too
    require_scalar_volume(image, ref.image_path)
    _require_finite_geometry(image, ref.image_path, "image")
    if str(ref.modality).upper() == "CT":
        _warn_without_air(image, ref.image_path)
    geometry = Geometry.from_image(image)
    voxels = voxel_sha256(image)
    del image  # the label is read next; do not hold two volumes
    label = read_image(ref.label_path, is_label=True)
    require_scalar_volume(label, ref.label_path, "label")
    _require_finite_geometry(label, ref.label_path, "label")
    difference = first_grid_difference(geometry, Geometry.from_image(label), tolerance_mm)
    if difference:
        raise InvalidInputError(
            str(ref.label_path),
            "grid_mismatch",
            f"image and label are on different grids: {difference}; resample the label onto the image grid",
        )
    present = label_values(sitk.GetArrayViewFromImage(label), ref.label_path)
    outside = [int(v) for v in present if not 0 <= v <= LABEL_MAX]
    if outside:  # refused here, not by preprocessing hours later
        raise InvalidInputError(
            str(ref.label_path),
            "label_range",
            f"the label holds value(s) {outside[:_MAX_LISTED]} outside 0..{LABEL_MAX}; label maps are stored "
            f"as uint8: relabel the classes as 1..{LABEL_MAX}",
        )
    _require_declared_foreground(present, ref.labels, ref.label_path)
    return {
        "dataset": ref.dataset,
        "case_id": ref.case_id,
        "subject_id": ref.subject_id,
        "modality": ref.modality,
        "heldout": ref.heldout,
        "layout": ref.layout,
        "image_path": str(ref.image_path),
        "label_path": str(ref.label_path),
        "image_format": detect_format(ref.image_path),
        **geometry.to_dict(),
        "labels": json.dumps({str(value): name for value, name in sorted(ref.labels.items())}),
        "image_sha256": file_sha256(ref.image_path),
        "label_sha256": file_sha256(ref.label_path),
        "voxel_sha256": voxels,
    }


def voxel_sha256(image: sitk.Image) -> str:
    """sha256 of the scan's voxel values, whatever file format, compression or number type holds them.

    Two files of one scan (an MSD copy and an nnU-Net conversion, ``.nii`` beside ``.nii.gz``, int16
    beside float32) have different bytes, so ``image_sha256`` cannot tell they are one scan; the values
    and the array's shape can. Hashed slice by slice as float64, so a CT needs no second copy in memory.
    """
    digest = hashlib.sha256(repr(image.GetSize()).encode())
    values = sitk.GetArrayViewFromImage(image)
    for plane in values:
        digest.update(np.ascontiguousarray(plane, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _drop_duplicate_cases(refs: list[CaseRef]) -> tuple[list[CaseRef], list[Problem]]:
    """Keep the first case of each id; a later one with the same id is a reject, not an overwrite."""
    first: dict[str, CaseRef] = {}
    problems: list[Problem] = []
    for ref in refs:
        if ref.case_id in first:
            problems.append(
                Problem(
                    ref.dataset,
                    ref.case_id,
                    str(ref.image_path),
                    "duplicate_case",
                    f"case id {ref.case_id!r} appears twice in dataset {ref.dataset!r} "
                    f"(first: {first[ref.case_id].image_path}); rename or remove one",
                )
            )
        else:
            first[ref.case_id] = ref
    return list(first.values()), problems


def source_list(sources: object) -> list[Any]:
    """``sources`` as a list, refused unless it is a list (or other sequence) of sources.

    A YAML mapping written without ``-`` (one source's keys) or a bare path would otherwise be iterated
    key by key or letter by letter.
    """
    if isinstance(sources, (str, bytes, Mapping)) or not isinstance(sources, Iterable):
        raise InvalidInputError(
            "sources",
            "bad_source",
            f"`sources` is a {type(sources).__name__} ({sources!r:.80}), not a list; write it as a list of "
            "{name, layout, path} mappings (in YAML, one `- name: …` item per source)",
        )
    return list(sources)


def discover_sources(sources: Iterable[Mapping[str, Any]]) -> tuple[list[CaseRef], list[Problem]]:
    """Cases of all sources, refusing a source whose name an earlier one already uses."""
    refs: list[CaseRef] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for index, source in enumerate(sources):
        if not isinstance(source, Mapping):
            err = not_a_source(source, index)
            problems.append(Problem("", "", err.path, err.check, err.reason))
            continue
        # Stripped as discovery strips it: "Liver" and "Liver " would both become dataset "Liver".
        name = str(source.get("name") or "").strip()
        if name in seen:
            problems.append(
                Problem(
                    name,
                    "",
                    str(source.get("path") or ""),
                    "duplicate_dataset",
                    f"dataset name {name!r} is already used by the source at {seen[name]}; "
                    "give each source a unique name",
                )
            )
            continue
        if name:
            seen[name] = str(source.get("path") or "")
        found, found_problems = discover_cases(source)
        unique, duplicates = _drop_duplicate_cases(found)
        refs.extend(unique)
        problems.extend(found_problems + duplicates)
    return refs, problems


def _reject(problem: Problem, *, strict: bool, rejects: list[dict[str, str]]) -> None:
    if strict:
        raise problem.to_error()
    where = f"{problem.dataset}/{problem.case_id}" if problem.case_id else problem.dataset or "source"
    logger.warning("Rejected %s: %s: %s", where, problem.path, problem.reason)
    rejects.append(
        {
            "dataset": problem.dataset,
            "case_id": problem.case_id,
            "path": problem.path,
            "reason": problem.reason,
            "check": problem.check,
        }
    )


def ingest_sources(
    sources: Iterable[Mapping[str, Any]], *, strict: bool = False, tolerance_mm: float = 1e-3
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Discover and check every case of ``sources``: ``(case_manifest, ingest_report)``.

    Bad inputs are logged and reported and the rest goes on; ``strict`` raises the first
    :class:`InvalidInputError` instead, for users who want a collection accepted whole or not at all.
    """
    sources = source_list(sources)
    refs, problems = discover_sources(sources)
    rejects: list[dict[str, str]] = []
    for problem in problems:
        if problem.warning:
            logger.warning("%s: %s: %s", problem.dataset, problem.path, problem.reason)
        else:
            _reject(problem, strict=strict, rejects=rejects)
    rows: list[dict[str, Any]] = []
    first_of_scan: dict[str, dict[str, Any]] = {}
    for ref in tqdm(refs, desc="Checking cases", unit="case"):
        try:
            row = validate_case(ref, tolerance_mm=tolerance_mm)
        except (InvalidInputError, OSError) as exc:  # OSError: e.g. a file the user may not read
            err = unreadable(exc, ref.image_path) if isinstance(exc, OSError) else exc
            _reject(
                Problem(ref.dataset, ref.case_id, err.path, err.check, err.reason),
                strict=strict,
                rejects=rejects,
            )
            continue
        first = first_of_scan.setdefault(row["voxel_sha256"], row)
        if first is not row:
            # One scan under two case ids (or in two datasets) could be the reference of its own query,
            # or a held-out test scan the training saw: the split and subject checks would not know.
            # Compared by voxel values: a converted copy of a public set has other file bytes.
            _reject(
                Problem(
                    ref.dataset,
                    ref.case_id,
                    str(ref.image_path),
                    "duplicate_image",
                    f"the same scan (its voxel values) as case {first['dataset']}/{first['case_id']} "
                    f"({first['image_path']}); list each scan once",
                ),
                strict=strict,
                rejects=rejects,
            )
            continue
        rows.append(row)
    if not rows:
        logger.warning("No case was accepted from %d source(s); see the ingest report", len(sources))
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).astype({"heldout": bool})
    return manifest, pd.DataFrame(rejects, columns=list(REPORT_COLUMNS))
