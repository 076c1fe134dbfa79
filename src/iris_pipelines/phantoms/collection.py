"""The default phantom collection: dataset specifications and their generation on disk.

No medical data can be downloaded in the environments this project must run in, so the default
configuration trains and evaluates on this collection instead. It imitates the paper's mix (§3.1): several
CT, MR and PET datasets from different "sites", each labelling some of a shared set of class concepts,
with different spacings, orientations, sizes, noise and on-disk layouts, plus held-out datasets with
classes no training dataset labels. Every case is reproducible alone from ``(seed, dataset, subject)``.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.io import file_sha256, write_dicom_series, write_image, write_text_atomic
from iris_pipelines.phantoms.anatomy import CONCEPTS, build_subject
from iris_pipelines.phantoms.appearance import STORAGE, Appearance
from iris_pipelines.phantoms.layouts import (
    FILE_ENDINGS,
    LAYOUTS,
    CaseFiles,
    case_files,
    write_index,
)
from iris_pipelines.phantoms.raster import Structure, SubjectFrame, paint
from iris_pipelines.phantoms.shapes import rotation

logger = logging.getLogger(__name__)

# Bump whenever generated content changes, so existing collections are regenerated.
GENERATOR_VERSION = "2"
STAMP_NAME = "phantoms.json"
# The stamp's "generator": only folders a stamp with this name lists are ever deleted.
GENERATOR = "iris_pipelines.phantoms"
DIRECTIONS = ("identity", "flipped", "oblique", "coronal")
_FIXED_DIRECTIONS = {
    "identity": np.eye(3),
    # What RAS-minded tools (nibabel, many NIfTI converters) store: x and y reversed relative to LPS.
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    # Coronal slices: i runs to the patient's left, j downwards (inferior), slices stack posteriorly.
    "coronal": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}
_OBLIQUE_DEGREES = (10.0, 25.0)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_STREAM_ANATOMY = 0


@dataclass(frozen=True)
class DatasetSpec:
    """One phantom dataset: which anatomy it labels, how its scanner images it, how it is stored.

    ``fov_mm`` is the field of view along the grid's index axes (i, j, k); slices are along k.
    ``fov_centre_mm`` is where that field of view is centred, in patient coordinates (see
    :mod:`.anatomy`). Spacing is drawn per case from ``in_plane_mm`` (i, j) and ``slice_mm`` (k).
    ``acquisitions`` lists what is acquired per subject (CT phase, MR sequence, PET tracer); more than one
    gives subjects with several cases of the same anatomy. ``dicom_cases`` (CSV layout only) stores that
    many cases' images as DICOM series directories.
    """

    name: str
    modality: str
    layout: str
    folder: str
    file_ending: str
    classes: tuple[str, ...]
    acquisitions: tuple[str, ...]
    fov_mm: tuple[float, float, float]
    fov_centre_mm: tuple[float, float, float]
    in_plane_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    direction: str
    noise: float
    storage: str
    case_prefix: str
    heldout: bool = False
    dicom_cases: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.layout not in LAYOUTS:
            problems.append(f"layout {self.layout!r} is not one of {LAYOUTS}")
        if self.file_ending not in FILE_ENDINGS or (self.layout == "msd" and self.file_ending != ".nii.gz"):
            problems.append(f"file ending {self.file_ending!r} does not suit layout {self.layout!r}")
        if self.dicom_cases and self.layout != "csv":
            problems.append("only the csv layout can point at DICOM series")
        # write_dicom_series stores a CT series of int16 values: any other modality would be tagged CT and
        # fractional intensities rounded, so the series would no longer hold the rendered image.
        if self.dicom_cases and self.modality != "CT":
            problems.append(
                f"DICOM series are written as CT, so a {self.modality} dataset cannot have dicom_cases"
            )
        if (
            self.dicom_cases
            and self.storage in STORAGE
            and not np.issubdtype(STORAGE[self.storage], np.integer)
        ):
            problems.append(
                f"DICOM series hold integers, so {self.storage!r} storage cannot have dicom_cases; "
                "use int16 or uint16"
            )
        if not self.acquisitions:
            problems.append("acquisitions must name at least one acquisition per subject")
        if not _PLAIN_NAME.fullmatch(self.case_prefix):
            problems.append(
                f"case_prefix {self.case_prefix!r} must be a plain name (letters, digits, _ and -): "
                "it becomes part of every file name"
            )
        for field_name in ("in_plane_mm", "slice_mm"):
            low, high = getattr(self, field_name)
            if not 0 < low <= high:
                problems.append(
                    f"{field_name} {(low, high)} must be a range of positive spacings, low ≤ high"
                )
        if min(self.fov_mm) <= 0:
            problems.append(f"fov_mm {self.fov_mm} must be positive along every axis")
        if self.direction not in DIRECTIONS:
            problems.append(f"direction {self.direction!r} is not one of {DIRECTIONS}")
        if not 1 <= len(self.classes) <= 254 or len(set(self.classes)) != len(self.classes):
            problems.append("classes must be 1–254 distinct concept names")
        unknown = sorted(set(self.classes) - set(CONCEPTS))
        if unknown:
            problems.append(f"unknown class concepts {unknown}")
        if Path(self.folder).name != self.folder or self.folder.startswith("."):
            problems.append(f"folder {self.folder!r} must be a plain directory name")
        if problems:
            raise ValueError(f"dataset spec {self.name!r}: " + "; ".join(problems))
        for acquisition in self.acquisitions:
            self.appearance(acquisition)

    @property
    def sequences_per_subject(self) -> int:
        return len(self.acquisitions)

    def appearance(self, acquisition: str) -> Appearance:
        return Appearance(self.modality, acquisition, self.noise, self.storage)


def default_specs() -> list[DatasetSpec]:
    """Seven training and two held-out datasets covering every layout, format, modality and direction."""
    # fmt: off
    return [
        DatasetSpec(
            name="AbdomenCT", modality="CT", layout="msd", folder="Task01_AbdomenCT", file_ending=".nii.gz",
            classes=("liver", "spleen", "kidney_left", "kidney_right", "aorta", "ivc", "gallbladder",
                     "adrenal_right"),
            acquisitions=("venous",), fov_mm=(225, 180, 165), fov_centre_mm=(0, 5, 20),
            in_plane_mm=(1.6, 2.0), slice_mm=(2.5, 3.0), direction="flipped", noise=15.0, storage="int16",
            case_prefix="abdomen",
        ),
        DatasetSpec(
            name="KidneyTumourCT", modality="CT", layout="nnunet", folder="Dataset064_KidneyTumourCT",
            file_ending=".nii.gz", classes=("kidney_left", "kidney_right", "kidney_tumour"),
            acquisitions=("arterial",), fov_mm=(150, 110, 105), fov_centre_mm=(0, 32, 10),
            in_plane_mm=(0.75, 0.9), slice_mm=(2.5, 3.0), direction="identity", noise=25.0, storage="int16",
            case_prefix="kidney",
        ),
        DatasetSpec(
            name="LiverTumourCT", modality="CT", layout="nnunet", folder="Dataset029_LiverTumourCT",
            file_ending=".mha", classes=("liver", "liver_tumour"), acquisitions=("venous",),
            fov_mm=(190, 170, 150), fov_centre_mm=(-35, 5, 55), in_plane_mm=(1.5, 1.8), slice_mm=(2.0, 3.0),
            direction="oblique", noise=20.0, storage="int16", case_prefix="liver",
        ),
        DatasetSpec(
            name="AbdomenMR", modality="MR", layout="csv", folder="AbdomenMR", file_ending=".nii.gz",
            classes=("liver", "spleen", "kidney_left", "kidney_right"), acquisitions=("T1", "T2"),
            fov_mm=(240, 200, 175), fov_centre_mm=(0, 5, 25), in_plane_mm=(1.4, 1.6), slice_mm=(4.5, 5.0),
            direction="identity", noise=0.03, storage="uint16", case_prefix="chaos",
        ),
        DatasetSpec(
            name="PelvisMR", modality="MR", layout="nnunet", folder="Dataset005_PelvisMR",
            file_ending=".nrrd", classes=("bladder", "rectum", "prostate"), acquisitions=("T2",),
            fov_mm=(200, 170, 140), fov_centre_mm=(0, 5, -105), in_plane_mm=(1.1, 1.3), slice_mm=(4.0, 5.0),
            direction="coronal", noise=0.05, storage="float32", case_prefix="pelvis",
        ),
        DatasetSpec(
            name="LesionPET", modality="PET", layout="msd", folder="Task11_LesionPET", file_ending=".nii.gz",
            classes=("lesion", "bladder", "kidney_left", "kidney_right"), acquisitions=("FDG",),
            fov_mm=(240, 200, 300), fov_centre_mm=(0, 5, -10), in_plane_mm=(3.6, 4.1), slice_mm=(3.0, 4.0),
            direction="flipped", noise=0.35, storage="float32", case_prefix="fdg",
        ),
        DatasetSpec(
            name="TrunkCT", modality="CT", layout="csv", folder="TrunkCT", file_ending=".mha",
            classes=("spine", "aorta", "diaphragm", "liver", "spleen", "adrenal_left"),
            acquisitions=("native",),
            fov_mm=(230, 190, 180), fov_centre_mm=(0, 10, 55), in_plane_mm=(1.8, 2.2), slice_mm=(2.0, 2.5),
            direction="identity", noise=12.0, storage="int16", case_prefix="trunk", dicom_cases=2,
        ),
        DatasetSpec(
            name="PancreasCT", modality="CT", layout="msd", folder="Task07_Pancreas", file_ending=".nii.gz",
            classes=("pancreas", "pancreas_tumour"), acquisitions=("venous",), fov_mm=(220, 180, 150),
            fov_centre_mm=(0, 5, 25), in_plane_mm=(1.5, 1.8), slice_mm=(2.5, 3.0), direction="flipped",
            noise=18.0, storage="int16", case_prefix="pancreas", heldout=True,
        ),
        DatasetSpec(
            name="PelvisCT", modality="CT", layout="csv", folder="PelvisCT", file_ending=".nii.gz",
            classes=("sacrum", "hip_left", "hip_right", "bladder"), acquisitions=("venous",),
            fov_mm=(230, 190, 180), fov_centre_mm=(0, 15, -105), in_plane_mm=(1.8, 2.2), slice_mm=(2.0, 3.0),
            direction="oblique", noise=22.0, storage="int16", case_prefix="pelvic", heldout=True,
        ),
    ]
    # fmt: on


def case_rng(seed: int, spec: DatasetSpec, subject: int, stream: int) -> np.random.Generator:
    """Generator for one subject's anatomy (stream 0) or one of its acquisitions (stream 1 + index).

    Seeded from the dataset's name through CRC-32, not Python's salted ``hash``, so it is stable across
    processes and any case can be rebuilt alone.
    """
    return np.random.default_rng(
        np.random.SeedSequence([seed, zlib.crc32(spec.name.encode()), subject, stream])
    )


def scan_geometry(
    spec: DatasetSpec, frame: SubjectFrame, rng: np.random.Generator, size_scale: float = 1.0
) -> Geometry:
    """This acquisition's grid: random spacing, field of view and (if oblique) tilt, centred on the region.

    ``size_scale`` multiplies the voxel count along each axis by refining the spacing; the field of view,
    and so the anatomy shown, stays the same.
    """
    in_plane = rng.uniform(*spec.in_plane_mm)
    spacing = np.round(np.array([in_plane, in_plane, rng.uniform(*spec.slice_mm)]) / size_scale, 3)
    fov = np.asarray(spec.fov_mm, dtype=float) * rng.uniform(0.95, 1.05, 3)
    size = np.maximum(np.rint(fov / spacing).astype(int), 8)
    if spec.direction == "oblique":
        tilt = rng.uniform(*_OBLIQUE_DEGREES, 2) * rng.choice([-1.0, 1.0], 2)
        direction = rotation(x_deg=tilt[0], z_deg=tilt[1])
    else:
        direction = _FIXED_DIRECTIONS[spec.direction]
    centre = frame.to_world(np.asarray([spec.fov_centre_mm], dtype=float) + rng.normal(0.0, 5.0, (1, 3)))[0]
    origin = np.round(centre - direction @ (spacing * (size - 1) / 2.0), 2)
    return Geometry(tuple(size), tuple(spacing), tuple(origin), tuple(direction.ravel()))


def label_values(structures: list[Structure], classes: tuple[str, ...]) -> np.ndarray:
    """Label value per structure-map value (0 = air): a class's index + 1, its parent organ's, or 0."""
    value = {name: index for index, name in enumerate(classes, start=1)}
    lut = [0] + [value.get(s.name, value.get(s.parent, 0) if s.parent else 0) for s in structures]
    return np.asarray(lut, dtype=np.uint8)


def render_case(
    spec: DatasetSpec, *, seed: int, subject: int, acquisition: int = 0, size_scale: float = 1.0
) -> tuple[sitk.Image, sitk.Image]:
    """Image and label map of one case, with the scan's full geometry; nothing is written."""
    frame, structures = build_subject(case_rng(seed, spec, subject, _STREAM_ANATOMY), spec.classes)
    rng = case_rng(seed, spec, subject, 1 + acquisition)
    geometry = scan_geometry(spec, frame, rng, size_scale)
    region, cortex = paint(structures, geometry, frame)
    pixels = spec.appearance(spec.acquisitions[acquisition]).render(structures, region, cortex, geometry, rng)
    image = geometry.apply_to(sitk.GetImageFromArray(pixels))
    label = geometry.apply_to(sitk.GetImageFromArray(label_values(structures, spec.classes)[region]))
    return image, label


def _case_plan(spec: DatasetSpec, cases: int) -> list[tuple[int, int, str, str]]:
    """(subject, acquisition index, case id, subject id) for at least ``cases`` cases of whole subjects."""
    plan = []
    for subject in range(math.ceil(cases / spec.sequences_per_subject)):
        subject_id = f"{spec.case_prefix}_{subject:03d}"
        for index, acquisition in enumerate(spec.acquisitions):
            case_id = subject_id if spec.sequences_per_subject == 1 else f"{subject_id}_{acquisition}"
            plan.append((subject, index, case_id, subject_id))
    return plan


def _sources(root: Path, specs: Sequence[DatasetSpec]) -> list[dict[str, Any]]:
    return [
        {
            "name": spec.name,
            "layout": spec.layout,
            "path": str(root / spec.folder),
            "modality": spec.modality,
            "heldout": spec.heldout,
        }
        for spec in specs
    ]


def _read_stamp(root: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((root / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _is_current(stamp: dict[str, Any] | None, params: dict[str, Any], root: Path) -> bool:
    """Whether the stamp was written for these parameters and every file it lists is still as written.

    Sizes alone miss a file corrupted or edited in place, so the checksums are compared too: hashing the
    default collection (~170 MB) takes well under a second, against minutes to regenerate it.
    """
    if stamp is None or stamp.get("version") != GENERATOR_VERSION or stamp.get("params") != params:
        return False
    files = stamp.get("files")
    try:
        return bool(files) and all(
            (root / entry["path"]).is_file()
            and (root / entry["path"]).stat().st_size == entry["bytes"]
            and file_sha256(root / entry["path"]) == entry["sha256"]
            for entry in files
        )
    except (KeyError, TypeError):
        return False


def _owned_folders(stamp: dict[str, Any] | None) -> set[str]:
    """The folders a stamp written by this generator says it wrote (none for a foreign or unreadable one)."""
    if stamp is None or stamp.get("generator") != GENERATOR:
        return set()
    folders = stamp.get("folders")
    if not isinstance(folders, list):
        return set()
    return {
        folder
        for folder in folders
        if isinstance(folder, str) and Path(folder).name == folder and not folder.startswith(".")
    }


def _checked_size_scale(size_scale: object) -> float:
    """``size_scale`` as a float, refused unless a finite number above 0.

    A float whatever the caller passed: ``kedro run --params phantoms.size_scale=1`` gives an int and
    ``iris phantoms --size-scale 1`` a float, and the DICOM UIDs are seeded from the number's text, so
    ``1`` and ``1.0`` wrote different bytes for what the stamp records as the same parameters. The float
    form is the one conf/base (``size_scale: 1.0``) has always passed, so the default bytes do not change.
    """
    if isinstance(size_scale, bool) or not isinstance(size_scale, numbers.Real):
        raise ValueError(f"size_scale must be a number above 0, not {size_scale!r}")
    value = float(size_scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"size_scale must be a finite number above 0, got {size_scale!r}")
    return value


def generate_collection(
    root: str | Path,
    *,
    seed: int = 0,
    cases_per_dataset: int = 8,
    size_scale: float = 1.0,
    specs: Sequence[DatasetSpec] | None = None,
) -> list[dict[str, Any]]:
    """Write the phantom collection under ``root`` and return one ingest source per dataset.

    Idempotent: ``root/phantoms.json`` records the generator version, the parameters and every file's
    checksum; when it matches and all files are there, nothing is written. Otherwise the datasets'
    folders are replaced (so stale cases from other parameters never linger) and the stamp is written
    last, so an interrupted run is regenerated next time. Only folders a stamp of this generator lists are
    ever deleted: a dataset folder that exists under ``root`` without one (a real ``Task07_Pancreas``
    download, say) is refused with :class:`FileExistsError`, nothing touched. A dataset with several
    acquisitions per subject gets whole subjects, hence possibly a case more than ``cases_per_dataset``.
    ``size_scale`` multiplies the number of voxels along each axis (finer spacing, same field of view);
    ``specs`` replaces the default datasets.
    """
    if cases_per_dataset < 1:
        raise ValueError("cases_per_dataset must be ≥ 1")
    size_scale = _checked_size_scale(size_scale)
    root = Path(root).expanduser().resolve()
    specs = list(default_specs() if specs is None else specs)
    if len({spec.name for spec in specs}) != len(specs) or len({spec.folder for spec in specs}) != len(specs):
        raise ValueError("dataset names and folders must be unique")
    params = json.loads(
        json.dumps(
            {
                "seed": seed,
                "cases_per_dataset": cases_per_dataset,
                "size_scale": size_scale,
                "specs": [asdict(spec) for spec in specs],
            }
        )
    )
    stamp = _read_stamp(root)
    if _is_current(stamp, params, root):
        logger.info("Phantom collection at %s is up to date", root)
        return _sources(root, specs)

    # Ownership lives in the stamp alone. Before anything is deleted, a *pending* stamp (no files, so never
    # current) replaces the old one, listing every folder this run may delete or write; the complete stamp
    # replaces it last. An interrupted run thus leaves a stamp that still claims its half-written folders,
    # and the next run deletes and regenerates them. A folder no stamp claims is never ours to delete.
    owned = _owned_folders(stamp)
    foreign = [
        spec.folder
        for spec in specs
        if spec.folder not in owned and ((root / spec.folder).exists() or (root / spec.folder).is_symlink())
    ]
    if foreign:
        listed = ", ".join(str(root / folder) for folder in foreign)
        raise FileExistsError(
            f"{listed}: a phantom dataset folder exists but no {STAMP_NAME} of the phantom generator in "
            f"{root} lists it, so it may hold your own data (a real dataset of that name) and is left "
            "alone; choose another root for the phantoms, or move the folder out of the way (delete it "
            "only if it is a phantom collection you no longer need)"
        )
    claimed = sorted(owned | {spec.folder for spec in specs})
    pending = {"generator": GENERATOR, "version": GENERATOR_VERSION, "complete": False, "folders": claimed}
    write_text_atomic(root / STAMP_NAME, json.dumps(pending, indent=1) + "\n")
    for folder in claimed:
        if (root / folder).is_dir():
            shutil.rmtree(root / folder)
    plans = {spec.name: _case_plan(spec, cases_per_dataset) for spec in specs}
    total = sum(map(len, plans.values()))
    with tqdm(total=total, desc="phantoms", unit="case", disable=None) as progress:
        for spec in specs:
            progress.set_postfix_str(spec.name)
            dataset_dir = root / spec.folder
            written: list[CaseFiles] = []
            for ordinal, (subject, acquisition, case_id, subject_id) in enumerate(plans[spec.name]):
                dicom = ordinal < spec.dicom_cases
                files = case_files(
                    spec.layout, dataset_dir, case_id, subject_id, spec.file_ending, dicom=dicom
                )
                image, label = render_case(
                    spec, seed=seed, subject=subject, acquisition=acquisition, size_scale=size_scale
                )
                if dicom:
                    # UIDs from everything the series' pixels depend on: the same collection is then
                    # byte-identical (same checksums) on every run, and different content never shares UIDs.
                    uid_seed = f"iris-phantom/{GENERATOR_VERSION}/{seed}/{size_scale}/{spec.name}/{case_id}"
                    write_dicom_series(image, files.image, uid_seed=uid_seed)
                else:
                    write_image(image, files.image)
                write_image(label, files.label)
                written.append(files)
                progress.update()
            write_index(
                spec.layout,
                dataset_dir,
                name=spec.name,
                modality=spec.modality,
                classes=spec.classes,
                file_ending=spec.file_ending,
                cases=written,
            )

    files = sorted(
        path
        for spec in specs
        for path in (root / spec.folder).rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    stamp = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "params": params,
        "folders": [spec.folder for spec in specs],
        "files": [
            {
                "path": path.relative_to(root).as_posix(),
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
            for path in files
        ],
    }
    write_text_atomic(root / STAMP_NAME, json.dumps(stamp, indent=1) + "\n")
    logger.info("Generated %d phantom cases in %d datasets under %s", total, len(specs), root)
    return _sources(root, specs)
