"""Turn ingested cases into canonical, normalised, memory-mappable arrays, in parallel and cached.

One case is read, resampled onto an identity-direction grid at the target spacing, intensity-normalised by
modality and stored as ``image.npy`` (float32) + ``label.npy`` (uint8) + ``meta.json`` under
``<output_dir>/<cache_key[:2]>/<cache_key>/``. The key hashes the inputs' checksums, the parameters that
change the output and :data:`PREPROCESS_VERSION`, so re-runs skip unchanged cases and older manifest
versions keep pointing at valid files; a file edited since ingest no longer matches its checksum and is
rejected (``stale_manifest``) instead of being cached under the old one's key. Cases fan out over
dask.distributed (a local cluster, a SLURM cluster, or in-process for debugging); a failing case is
reported and the rest go on unless ``strict``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import SimpleITK as sitk
from distributed import Client, LocalCluster, SpecCluster, as_completed
from tqdm.auto import tqdm

from iris_pipelines.collection.ingest import volume_at
from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.io import detached_data_files, file_sha256, read_image, require_finite
from iris_pipelines.imaging.normalize import normalize_in_place
from iris_pipelines.imaging.resample import (
    canonical_geometry,
    field_of_view_mask,
    require_grid_fits,
    resample_to_geometry,
)
from iris_pipelines.imaging.stats import class_statistics

logger = logging.getLogger(__name__)

# Bump whenever a code change alters the arrays or meta.json, so cached cases are rebuilt, not reused.
# 2: normalisation statistics exclude the padding of oblique scans. 3: a case is only cached once its files
# match the manifest's checksums; a version-2 entry may hold a file edited after ingest under the old key.
# 4: MR/PET whose percentiles coincide (a nearly empty PET) keep their range instead of becoming zeros;
# meta.json records the inputs' size and mtime; class names no longer enter the key. 5: meta.json records the
# classes resampling lost, for the report of every later (cached) run; the inputs' stats cover the data files
# of a detached header (.mhd/.nhdr).
PREPROCESS_VERSION = "5"

REPORT_COLUMNS = ["dataset", "case_id", "path", "check", "reason"]
ADDED_COLUMNS = [
    "image_array",
    "label_array",
    "preprocessed_geometry",
    "original_geometry",
    "class_voxels",
    "class_bboxes",
    "cache_key",
]
SCHEDULER_KINDS = ("local", "slurm", "synchronous")
MODALITIES = ("CT", "MR", "PET")


def _from_mapping(cls: type, data: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Check a parameter mapping against a dataclass so a typo fails loudly instead of being ignored."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {section} parameter(s) {unknown}; expected some of {sorted(known)}")
    return dict(data)


@dataclass(frozen=True)
class SchedulerParams:
    """Where cases run: ``local`` (LocalCluster), ``slurm`` (dask-jobqueue) or ``synchronous`` (in-process).

    For ``slurm`` every job starts ``cores`` single-threaded worker processes that share ``memory``;
    one case per process keeps the peak per process near one volume's working set.
    """

    kind: str = "local"
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "4GiB"
    queue: str | None = None
    account: str | None = None
    cores: int = 4
    memory: str = "16GiB"
    walltime: str = "02:00:00"
    job_extra_directives: tuple[str, ...] = ()
    jobs: int = 1
    interface: str | None = None
    log_directory: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "job_extra_directives", tuple(self.job_extra_directives))
        if self.kind not in SCHEDULER_KINDS:
            raise ValueError(f"preprocess.scheduler.kind must be one of {SCHEDULER_KINDS}, got {self.kind!r}")
        if min(self.n_workers, self.threads_per_worker, self.cores, self.jobs) < 1:
            raise ValueError(
                "preprocess.scheduler n_workers, threads_per_worker, cores and jobs must be >= 1"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SchedulerParams:
        return cls(**_from_mapping(cls, data, "preprocess.scheduler"))

    @property
    def itk_threads(self) -> int | None:
        """Threads SimpleITK may use inside one worker; None keeps its default (all cores) in-process."""
        if self.kind == "local":
            return self.threads_per_worker
        if self.kind == "slurm":
            return 1
        return None


@dataclass(frozen=True)
class PreprocessParams:
    """``params:preprocess``. Only spacing and the modality's normalisation enter the cache key."""

    target_spacing: tuple[float, float, float] = (6.0, 6.0, 6.0)  # = conf/base (the CPU phantom recipe)
    ct_window: tuple[float, float] = (-990.0, 500.0)
    percentiles: tuple[float, float] = (2.0, 98.0)
    output_dir: str = "data/05_model_input/volumes"
    strict: bool = False
    scheduler: SchedulerParams = field(default_factory=SchedulerParams)

    def __post_init__(self) -> None:
        # One number is an isotropic spacing (as `iris segment --spacing 3`); `--params` cannot pass lists.
        spacing = (
            self.target_spacing
            if isinstance(self.target_spacing, list | tuple)
            else [self.target_spacing] * 3
        )
        for name, values in (
            ("target_spacing", spacing),
            ("ct_window", self.ct_window),
            ("percentiles", self.percentiles),
        ):
            try:
                object.__setattr__(self, name, tuple(float(v) for v in values))
            except (TypeError, ValueError):
                raise ValueError(f"preprocess.{name} needs a list of numbers, got {values!r}") from None
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ValueError(
                f"preprocess.target_spacing needs 3 positive mm values, got {self.target_spacing}"
            )
        if len(self.ct_window) != 2 or self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"preprocess.ct_window needs [low, high] with low < high, got {self.ct_window}")
        low, high = self.percentiles if len(self.percentiles) == 2 else (1.0, 0.0)
        if not 0 <= low < high <= 100:
            raise ValueError(f"preprocess.percentiles needs [low, high] in 0..100, got {self.percentiles}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessParams:
        values = _from_mapping(cls, data, "preprocess")
        if "scheduler" in values:
            values["scheduler"] = SchedulerParams.from_dict(values["scheduler"] or {})
        return cls(**values)

    @classmethod
    def coerce(cls, params: PreprocessParams | Mapping[str, Any]) -> PreprocessParams:
        return params if isinstance(params, cls) else cls.from_dict(params)


class CaseOutcome(NamedTuple):
    """What one case produced: a manifest row, or a report row; ``cached`` when nothing was recomputed.

    ``notes`` are report rows about a case that was kept all the same (a class lost in resampling).
    """

    row: dict[str, Any] | None
    failure: dict[str, str] | None
    cached: bool = False
    notes: tuple[dict[str, str], ...] = ()


def _declared_labels(row: Mapping[str, Any]) -> dict[str, str]:
    labels = row["labels"]
    return dict(json.loads(labels) if isinstance(labels, str) else labels)


def cache_key(row: Mapping[str, Any], params: PreprocessParams) -> str:
    """sha256 over what decides the output bytes; the normalisation parameter of other modalities is left
    out so that, say, changing the CT window does not rebuild every MR case."""
    modality = str(row["modality"]).upper()
    normalisation = (
        {"ct_window": list(params.ct_window)}
        if modality == "CT"
        else {"percentiles": list(params.percentiles)}
    )
    payload = {
        "version": PREPROCESS_VERSION,
        "image_sha256": row["image_sha256"],
        "label_sha256": row["label_sha256"],
        "modality": modality,
        # The label values decide the arrays, their names do not: renaming a class must not recompute it.
        "label_values": sorted(int(value) for value in _declared_labels(row)),
        "target_spacing": list(params.target_spacing),
        "normalisation": normalisation,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def case_directory(output_dir: str | os.PathLike[str], key: str) -> Path:
    return Path(output_dir) / key[:2] / key


def _modality(modality: str, source: str) -> str:
    kind = str(modality).upper()
    if kind not in MODALITIES:
        raise InvalidInputError(source, "unknown_modality", f"modality {kind!r} is not one of {MODALITIES}")
    return kind


def canonical_image_array(
    image: sitk.Image, modality: str, params: PreprocessParams, *, source: str = "<in-memory image>"
) -> tuple[np.ndarray, Geometry, Geometry]:
    """Canonical, normalised float32 array of an image, with its original and its canonical geometry.

    The one definition of "a preprocessed image", shared by the preprocess stage and by inference on raw
    scans, so a scan segmented at inference time sees exactly the grid and intensities training saw.
    ``source`` names the image in errors: an unknown modality, NaN voxels, or a canonical grid too large
    to allocate (``grid_too_large``, e.g. a header in metres). Pass the image as a temporary
    (``canonical_image_array(read_image(p), ...)``) to let it be freed right after resampling: a worker
    then holds at most the input and the resampled volume (or the resampled volume and its array) at a time.
    """
    kind = _modality(modality, source)
    original = Geometry.from_image(image)
    # From the header alone, before any voxel is read: past it ITK fails to allocate, with a traceback.
    require_grid_fits(original, params.target_spacing, source)
    # Checked on the source: after resampling, whether a NaN shows depends on the target spacing.
    require_finite(image, source)
    grid = canonical_geometry(original, params.target_spacing)
    canonical = resample_to_geometry(image, grid, is_label=False)
    del image
    array = sitk.GetArrayFromImage(canonical)
    del canonical
    normalize_in_place(
        array,
        kind,
        ct_window=params.ct_window,
        percentiles=params.percentiles,
        inside=field_of_view_mask(original, grid),
    )
    return array, original, grid


def canonical_label_array(
    label: sitk.Image, grid: Geometry, *, source: str = "<in-memory label>"
) -> np.ndarray:
    """A label map on an image's canonical grid (world-space nearest neighbour), so the two always align."""
    try:
        canonical = resample_to_geometry(label, grid, is_label=True)
    except ValueError as exc:  # resample refuses values outside uint8
        raise InvalidInputError(source, "label_range", f"{exc}; relabel the classes as 1..255") from None
    return sitk.GetArrayFromImage(canonical)


def _image_array(row: Mapping[str, Any], params: PreprocessParams) -> tuple[np.ndarray, Geometry, Geometry]:
    """:func:`canonical_image_array` of a manifest row's image file."""
    path = str(row["image_path"])
    modality = _modality(row["modality"], path)  # before reading: a bad modality costs no I/O
    # _preprocess matched the file's bytes to ingest's checksum, so ingest's integrity checks still hold:
    # skip the second decompression. The only 4-D images ingest accepts are multi-modal MSD ones, whose
    # first volume it checked.
    return canonical_image_array(volume_at(read_image(path, verify=False)), modality, params, source=path)


def _lost_classes(source_label: sitk.Image, voxels: Mapping[int, int]) -> dict[int, int]:
    """Voxels in the source label of each class that has none on the target grid: a structure finer than
    the target spacing that nearest-neighbour resampling stepped over. Only a class already absent on the
    grid (rarely any) costs a pass over the source."""
    absent = [value for value, count in voxels.items() if count == 0]
    if not absent:
        return {}
    values = sitk.GetArrayViewFromImage(source_label)
    counts = {value: int(np.count_nonzero(values == value)) for value in absent}
    return {value: count for value, count in counts.items() if count}


def _require_unchanged_inputs(row: Mapping[str, Any]) -> None:
    """Refuse a case whose image or label bytes differ from the checksums ingest recorded.

    The cache key is built from those checksums, so preprocessing an edited file would store it under the
    key of the file ingest checked: a later run would serve it for the original file too, and the edit
    would never have passed ingest's checks.
    """
    for kind in ("image", "label"):
        path = str(row[f"{kind}_path"])
        recorded = str(row[f"{kind}_sha256"])
        on_disk = file_sha256(path)
        if on_disk != recorded:
            raise InvalidInputError(
                path,
                "stale_manifest",
                f"{path} changed after ingest (sha256 {recorded} in the manifest, {on_disk} on disk); "
                "re-run the ingest pipeline",
            )


CASE_FILES = ("image.npy", "label.npy", "meta.json")


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in CASE_FILES)


def _write_case(directory: Path, image: np.ndarray, label: np.ndarray, meta: dict[str, Any]) -> None:
    """Fill a scratch directory beside the target and rename it into place in one ``os.replace``.

    A killed run leaves at most a hidden ``.<key>.tmp-*`` directory, never a case without its meta.json.
    If another worker renamed the same case first, its (identical) result is kept. A case directory that
    lacks one of its files (an interrupted copy of the cache, a file deleted by hand) is moved aside and
    replaced, so the cache repairs itself instead of failing on every run.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    scratch.mkdir()
    try:
        np.save(scratch / "image.npy", image)
        np.save(scratch / "label.npy", label)
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.replace(scratch, directory)
        except OSError:
            if _complete(directory):
                return
            broken = directory.parent / f".{directory.name}.broken-{uuid.uuid4().hex}"
            os.replace(directory, broken)
            shutil.rmtree(broken, ignore_errors=True)
            os.replace(scratch, directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _input_files(path: Path) -> list[Path]:
    """The files holding an input's bytes: a DICOM series folder's files, or a file with the data files its
    detached header (.mhd, .nhdr) names, where an edit leaves the header itself untouched. None for an
    input deleted since ingest: its changed stats lead to the checksum check, which names it
    (missing_file)."""
    if not path.exists():
        return []
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path, *(path.parent / name for name in detached_data_files(path))]


def _input_stats(row: Mapping[str, Any]) -> dict[str, list[int]]:
    """Size and modification time of the case's files: what a cache hit checks before trusting its key."""
    stats = {}
    for kind in ("image", "label"):
        # Summed, they stand for the input. A missing data file only changes them: the checksum that a
        # change triggers names it.
        found = [p.stat() for p in _input_files(Path(str(row[f"{kind}_path"]))) if p.is_file()]
        stats[kind] = [sum(s.st_size for s in found), max((s.st_mtime_ns for s in found), default=0)]
    return stats


def _meta(
    key: str,
    params: PreprocessParams,
    *,
    original: Geometry,
    grid: Geometry,
    voxels: Mapping[int, int],
    bboxes: Mapping[int, list[int] | None],
    lost: Mapping[int, int],
) -> dict[str, Any]:
    return {
        "version": PREPROCESS_VERSION,
        "cache_key": key,
        "target_spacing": list(params.target_spacing),
        "original_geometry": original.to_dict(),
        "preprocessed_geometry": grid.to_dict(),
        "class_voxels": {str(k): int(v) for k, v in sorted(voxels.items())},
        # Absent classes have no box; they are left out so every stored box can be unpacked.
        "class_bboxes": {str(k): [int(i) for i in v] for k, v in sorted(bboxes.items()) if v is not None},
        "lost_in_resampling": {str(k): int(v) for k, v in sorted(lost.items())},
    }


def _manifest_row(row: Mapping[str, Any], directory: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessed_manifest row, built only from meta.json so fresh and cached runs agree exactly."""
    return {
        **row,
        "image_array": str(directory / "image.npy"),
        "label_array": str(directory / "label.npy"),
        "preprocessed_geometry": Geometry.from_dict(meta["preprocessed_geometry"]).to_json(),
        "original_geometry": Geometry.from_dict(meta["original_geometry"]).to_json(),
        "class_voxels": json.dumps(meta["class_voxels"], sort_keys=True),
        "class_bboxes": json.dumps(meta["class_bboxes"], sort_keys=True),
        "cache_key": meta["cache_key"],
    }


def _lost_class_notes(row: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[dict[str, str], ...]:
    """Report rows for the classes the label holds but resampling lost: no episode of this case has them."""
    names = _declared_labels(row)
    spacing = " × ".join(f"{s:g}" for s in meta["target_spacing"])
    return tuple(
        _report_row(
            row,
            str(row["label_path"]),
            "class_lost_in_resampling",
            f"class {value} ({names[value]}) has {count} voxel(s) in the label but none at the target "
            f"spacing {spacing} mm; the case is kept without it: use a finer preprocess.target_spacing "
            "if this structure matters",
        )
        for value, count in meta["lost_in_resampling"].items()
    )


def _outcome(
    row: Mapping[str, Any], directory: Path, meta: Mapping[str, Any], *, cached: bool
) -> CaseOutcome:
    """A kept case's outcome, built only from meta.json so fresh and cached runs report the same."""
    return CaseOutcome(_manifest_row(row, directory, meta), None, cached, _lost_class_notes(row, meta))


def _preprocess(row: Mapping[str, Any], params: PreprocessParams) -> CaseOutcome:
    """One case, from the cache when its key is there; raises for unusable input."""
    key = cache_key(row, params)
    directory = case_directory(Path(params.output_dir).absolute(), key)
    if _complete(directory):
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        # The key holds the checksums ingest recorded; a file edited since then must be caught here too
        # (stale_manifest), and re-hashing every file on every run would cost as much as ingest. So the
        # files' size and time are compared, and only a changed one is hashed.
        if meta.get("inputs") != _input_stats(row):
            _require_unchanged_inputs(row)
        return _outcome(row, directory, meta, cached=True)
    _require_unchanged_inputs(row)
    inputs = _input_stats(row)
    image, original, grid = _image_array(row, params)
    label_path = str(row["label_path"])
    source_label = read_image(label_path, verify=False)  # kept: only it tells a lost class from an absent one
    label = canonical_label_array(source_label, grid, source=label_path)
    voxels, bboxes = class_statistics(label, sorted(int(k) for k in _declared_labels(row)))
    lost = _lost_classes(source_label, voxels)
    del source_label
    meta = {
        **_meta(key, params, original=original, grid=grid, voxels=voxels, bboxes=bboxes, lost=lost),
        "inputs": inputs,
    }
    _write_case(directory, image, label, meta)
    return _outcome(row, directory, meta, cached=False)


def preprocess_case(row: Mapping[str, Any], params: PreprocessParams | Mapping[str, Any]) -> dict[str, Any]:
    """One case_manifest row -> one preprocessed_manifest row; reuses the cached case when its key exists.

    Raises :class:`InvalidInputError` for unusable input.
    """
    return _preprocess(row, PreprocessParams.coerce(params)).row


def _report_row(row: Mapping[str, Any], path: str, check: str, reason: str) -> dict[str, str]:
    return {
        "dataset": str(row["dataset"]),
        "case_id": str(row["case_id"]),
        "path": path,
        "check": check,
        "reason": reason,
    }


def run_case(row: Mapping[str, Any], params: PreprocessParams, itk_threads: int | None = None) -> CaseOutcome:
    """Worker entry point: never raises, so one bad case cannot take a batch (or a worker) down."""
    if itk_threads is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)
    try:
        return _preprocess(row, params)
    except InvalidInputError as exc:
        return CaseOutcome(None, _report_row(row, exc.path, exc.check, exc.reason))
    except Exception as exc:  # a batch stage records every failure; strict mode turns it into an error
        reason = f"preprocessing failed with {type(exc).__name__}: {exc}"
        return CaseOutcome(None, _report_row(row, str(row["image_path"]), "preprocess_failed", reason))


def _slurm_cluster_class() -> type[SpecCluster]:
    """dask-jobqueue's SLURMCluster, imported only where it is used and without its side effect: on import
    it replaces Python's Ctrl-C handler with ``sys.exit()`` (dask_jobqueue/runner.py), which made an
    interrupted `kedro run` exit with status 0 and its MLflow run FINISHED."""
    handler = signal.getsignal(signal.SIGINT)
    from dask_jobqueue import SLURMCluster

    if threading.current_thread() is threading.main_thread():  # where handlers live (and were replaced)
        signal.signal(signal.SIGINT, handler)
    return SLURMCluster


def build_cluster(scheduler: SchedulerParams) -> SpecCluster:
    """The dask cluster for ``local`` or ``slurm``; SLURM jobs are only submitted when it is scaled."""
    if scheduler.kind == "local":
        return LocalCluster(
            n_workers=scheduler.n_workers,
            threads_per_worker=scheduler.threads_per_worker,
            processes=True,
            memory_limit=scheduler.memory_limit,
            dashboard_address=None,
        )
    if scheduler.kind == "slurm":
        return _slurm_cluster_class()(
            queue=scheduler.queue,
            account=scheduler.account,
            cores=scheduler.cores,
            processes=scheduler.cores,
            memory=scheduler.memory,
            walltime=scheduler.walltime,
            job_extra_directives=list(scheduler.job_extra_directives),
            interface=scheduler.interface,
            log_directory=scheduler.log_directory,
        )
    raise ValueError(f"scheduler kind {scheduler.kind!r} has no cluster")


def _run_synchronous(
    rows: list[dict[str, Any]], params: PreprocessParams
) -> Iterator[tuple[int, CaseOutcome]]:
    for index, row in enumerate(tqdm(rows, desc="preprocess", unit="case")):
        yield index, run_case(row, params)


def _run_distributed(
    rows: list[dict[str, Any]], params: PreprocessParams
) -> Iterator[tuple[int, CaseOutcome]]:
    """Fan cases out one task each; results stream back as they finish, in any order."""
    scheduler = params.scheduler
    with build_cluster(scheduler) as cluster:
        if scheduler.kind == "slurm":
            cluster.scale(jobs=scheduler.jobs)
        with Client(cluster) as client:
            futures = client.map(run_case, rows, params=params, itk_threads=scheduler.itk_threads, pure=False)
            index_of = {future.key: index for index, future in enumerate(futures)}
            finished = tqdm(as_completed(futures), total=len(futures), desc="preprocess", unit="case")
            for future in finished:
                index = index_of[future.key]
                if future.status == "error":
                    exc = future.exception()
                    reason = f"the dask worker failed ({type(exc).__name__}: {exc})"
                    row = rows[index]
                    failure = _report_row(row, str(row["image_path"]), "worker_failed", reason)
                    yield index, CaseOutcome(None, failure)
                else:
                    yield index, future.result()


def preprocess_cases(
    manifest: pd.DataFrame, params: PreprocessParams | Mapping[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Preprocess every case_manifest row -> (preprocessed_manifest, preprocess_report).

    Rows keep the manifest's order. Failed cases are left out of the manifest and listed in the report;
    with ``strict`` the first failure raises :class:`InvalidInputError` instead. A kept case that lost a
    class in resampling is listed too (``class_lost_in_resampling``), in strict mode as well.
    """
    params = PreprocessParams.coerce(params)
    rows = manifest.to_dict("records")
    runner = _run_synchronous if params.scheduler.kind == "synchronous" else _run_distributed
    outcomes: dict[int, CaseOutcome] = {}
    for index, outcome in runner(rows, params):
        if outcome.failure is not None:
            failure = outcome.failure
            if params.strict:
                raise InvalidInputError(failure["path"], failure["check"], failure["reason"])
            logger.warning(
                "preprocess rejected %s/%s: %s", failure["dataset"], failure["case_id"], failure["reason"]
            )
        for note in outcome.notes:
            logger.warning("preprocess kept %s/%s: %s", note["dataset"], note["case_id"], note["reason"])
        outcomes[index] = outcome
    ordered = [outcomes[i] for i in sorted(outcomes)]
    done = [o.row for o in ordered if o.row is not None]
    failures = [o.failure for o in ordered if o.failure is not None]
    cached = sum(o.cached for o in ordered)
    logger.info("preprocessed %d cases (%d from cache), %d rejected", len(done), cached, len(failures))
    columns = list(manifest.columns) + [c for c in ADDED_COLUMNS if c not in manifest.columns]
    report = [r for o in ordered for r in ([o.failure] if o.failure is not None else o.notes)]
    return pd.DataFrame(done, columns=columns), pd.DataFrame(report, columns=REPORT_COLUMNS)
