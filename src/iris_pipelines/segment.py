"""``iris segment``: one raw scan, a few references (or stored task embeddings) → a label map on its grid.

Everything here reuses the inference library: references and the query are brought to the canonical grid
exactly as preprocessing does (:mod:`iris_pipelines.inference.volume`), references are encoded per class
as ``embed_tasks``/``evaluate`` do (:func:`~iris_pipelines.evaluation.embeddings.class_embeddings`), the
strategies come from :mod:`iris_pipelines.inference.strategies`, tiling from MONAI through
:func:`~iris_pipelines.inference.sliding_window.volume_predictor`, and the prediction returns to the
scan's own size, spacing, origin and direction (:func:`~iris_pipelines.inference.volume.segment_volume`).

No Click and no MLflow here: the CLI parses options and resolves the model, this module does the work and
raises :class:`SegmentError` (or :class:`~iris_pipelines.imaging.InvalidInputError`) with one line that
names the file and the problem.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import yaml
from torch import Tensor

from iris_pipelines import __version__
from iris_pipelines.collection.ingest import (
    CT_AIR_CHECK_HU,
    first_grid_difference,
    label_values,
    volume_at,
)
from iris_pipelines.collection.layouts import parse_labels
from iris_pipelines.collection.preprocessing import PreprocessParams
from iris_pipelines.evaluation.embeddings import (
    class_embeddings,
    embedded_roi_size,
    embedding_tensor,
    foreign_weights,
)
from iris_pipelines.evaluation.evaluate import EvaluateParams
from iris_pipelines.imaging import Geometry, InvalidInputError, read_image, write_image
from iris_pipelines.imaging.io import (
    detached_data_files,
    file_sha256,
    file_suffix,
    require_scalar_volume,
    require_storable,
    write_text_atomic,
)
from iris_pipelines.imaging.registration import RegistrationConfig, array_to_image, registration_baseline
from iris_pipelines.imaging.resample import LABEL_MAX, canonical_geometry, require_grid_fits
from iris_pipelines.inference.bundle import PREPROCESS_KEYS, BundleError, ModelBundle, newest_version
from iris_pipelines.inference.device import resolve_device as inference_device
from iris_pipelines.inference.sliding_window import volume_predictor
from iris_pipelines.inference.strategies import (
    SELF_CHECK_DICE,
    clamp_roi,
    context_ensemble,
    crop_reference,
    memory_bank_task,
    reference_self_dice,
    tune_task_embedding,
)
from iris_pipelines.inference.volume import (
    CanonicalVolume,
    VolumePredictor,
    class_masks,
    label_map_logits,
    prepare_image,
    prepare_label,
    segment_volume,
)
from iris_pipelines.model import Iris

logger = logging.getLogger(__name__)

REFERENCE_STRATEGIES = ("one_shot", "ensemble", "tuning", "checked")
EMBEDDING_STRATEGIES = ("one_shot", "ensemble", "memory_bank")
STRATEGY_CHOICES = ("one_shot", "ensemble", "tuning", "checked", "memory_bank")
# Strategies that use only the first reference.
ONE_REFERENCE_STRATEGIES = ("one_shot", "checked")
DEFAULT_SPACING = (3.0, 3.0, 3.0)
# Where preprocessing can come from the model itself; any other source is a guess, warned about.
_BUNDLE_SOURCE = "model bundle metadata"
_RUN_SOURCE = "registered run parameters"
GRID_TOLERANCE_MM = 1e-3  # as `iris validate` / ingest
_IGNORE_LABEL = "ignore"  # nnU-Net v2's label for unannotated voxels
# A reference class under a 2×2×2 block of the model's grid gives an embedding of a speck: warned about.
TINY_REFERENCE_VOXELS = 8
STEPS = ("reading", "embedding", "segmenting", "writing")

StepCallback = Callable[[str], None]


class SegmentError(ValueError):
    """Inputs that do not fit together (classes, datasets, strategies); the message is one line."""


# --------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ReferenceSpec:
    """``--reference IMAGE:LABEL``."""

    image: Path
    label: Path

    @classmethod
    def parse(cls, text: str) -> ReferenceSpec:
        """Split at the colon that leaves two existing paths (names may hold colons, e.g. ``C:\\scan``),
        else at the last one, so the error names the file that is missing."""
        text = str(text)
        splits = [(text[:i], text[i + 1 :]) for i, char in enumerate(text) if char == ":"]
        splits = [(image, label) for image, label in splits if image and label]
        if not splits:
            raise SegmentError(
                f"--reference {text!r}: expected IMAGE:LABEL, e.g. ref.nii.gz:ref_labels.nii.gz"
            )
        image, label = next(
            ((i, lb) for i, lb in reversed(splits) if Path(i).exists() and Path(lb).exists()), splits[-1]
        )
        return cls(Path(image), Path(label))


@dataclass
class SegmentRequest:
    """What a user asks of ``iris segment``; defaults as the CLI's.

    ``image`` and ``out`` are the one scan and its label map of :func:`segment`; :func:`segment_batch`
    takes its scans and output directory separately and ignores them.
    """

    image: Path | None = None
    out: Path | None = None
    references: list[ReferenceSpec] = field(default_factory=list)
    embeddings: Path | None = None
    dataset: str | None = None
    strategy: str = "ensemble"
    classes: list[int] | None = None
    labels_file: Path | None = None
    modality: str = "CT"
    # False when the user named the modality: a CT cropped inside the body has no air either, so an
    # explicit --modality CT is trusted with a warning rather than refused.
    require_air: bool = True
    roi_size: tuple[int, int, int] | None = None
    overlap: float = 0.5
    threshold: float = 0.5
    tuning_steps: int = EvaluateParams().tuning_steps
    tuning_lr: float = EvaluateParams().tuning_lr
    device: str = "auto"
    save_probabilities: bool = False
    # The volume of a 4-D (x, y, z, channel) scan or reference image to use; None: 3-D images only.
    channel: int | None = None
    # Segment each reference with the task and warn about the classes it does not find there.
    reference_check: bool = True

    def check(self) -> None:
        """Refuse contradictory options before any file is read."""
        if self.references and self.embeddings is not None:
            raise SegmentError("give either --reference or --embeddings, not both")
        if self.strategy not in STRATEGY_CHOICES:
            raise SegmentError(
                f"unknown strategy {self.strategy!r}; expected one of {list(STRATEGY_CHOICES)}"
            )
        if self.references and self.strategy not in REFERENCE_STRATEGIES:
            raise SegmentError(
                f"--strategy {self.strategy} takes no reference images; with --reference use one of "
                f"{list(REFERENCE_STRATEGIES)}, or use --embeddings / --dataset for the memory bank"
            )
        if self.strategy == "checked" and not self.reference_check:
            raise SegmentError(
                "--strategy checked decides by the reference check which classes to register; drop "
                "--no-reference-check"
            )
        if self.embeddings is not None and self.strategy not in EMBEDDING_STRATEGIES:
            raise SegmentError(
                f"--strategy {self.strategy} needs reference images; with --embeddings use one of "
                f"{list(EMBEDDING_STRATEGIES)}"
            )
        if not self.references and self.embeddings is None and self.strategy != "memory_bank":
            raise SegmentError("give at least one --reference IMAGE:LABEL, or --embeddings PATH")
        if self.strategy == "memory_bank" and self.embeddings is None and not self.dataset:
            raise SegmentError("--strategy memory_bank needs --dataset (the training dataset of the classes)")
        if self.classes is not None and (
            not self.classes or min(self.classes) < 1 or max(self.classes) > LABEL_MAX
        ):
            # The model's label grid is uint8: a value above 255 cannot be a class (a reference may hold
            # such values, as FreeSurfer's cortical parcels, as long as --classes leaves them out).
            raise SegmentError(
                f"--classes must list foreground label values in 1..{LABEL_MAX}, got {self.classes}"
            )
        if self.classes is not None:
            # "--classes 1,1" asks for one class: a repeat would be decoded twice and listed twice in the
            # sidecar and the probability map (the pyfunc segments a repeated class once, too).
            self.classes = list(dict.fromkeys(self.classes))
        if not 0.0 < self.threshold < 1.0:
            raise SegmentError(f"--threshold must lie in (0, 1), got {self.threshold}")
        if not 0.0 <= self.overlap < 1.0:
            raise SegmentError(f"--overlap must lie in [0, 1), got {self.overlap}")
        if self.roi_size is not None and (len(self.roi_size) != 3 or min(self.roi_size) < 1):
            raise SegmentError(f"--roi must be one or three positive sizes in voxels, got {self.roi_size}")
        if self.channel is not None and self.channel < 0:
            raise SegmentError(f"--channel must be 0 or more, got {self.channel}")
        resolve_device(self.device)  # a device this machine lacks fails before the model is fetched

    def used_references(self) -> list[ReferenceSpec]:
        """The references the strategy uses: only the first for ``one_shot`` and ``checked``."""
        if self.strategy in ONE_REFERENCE_STRATEGIES:
            return self.references[:1]
        return list(self.references)

    def inputs(self) -> list[Path]:
        """Every file the request reads besides the scans: no output may replace one of them."""
        paths = [path for ref in self.references for path in (ref.image, ref.label)]
        return paths + [path for path in (self.labels_file, self.embeddings) if path is not None]

    def class_name_files(self) -> list[Path]:
        """The JSON beside each reference label map, read for class names (an earlier run's sidecar too)."""
        return [sidecar_path(ref.label) for ref in self.references]


def written_files(out: Path) -> list[Path]:
    """What segmenting one scan writes or replaces: the label map, its JSON sidecar and its probabilities
    (written when asked for, else removed, so that none from an earlier run outlives its label map)."""
    return [out, sidecar_path(out), probabilities_path(out)]


def protected_inputs(
    scans: Sequence[Path], others: Sequence[Path], class_name_files: Sequence[Path] = ()
) -> dict[Path, str]:
    """Resolved path → how to name it, for every file an output must not replace: the scans, the other
    inputs, the class-name JSON read beside each reference label (whoever wrote it), and the JSON beside a
    scan or another input that another tool wrote (a dcm2niix/BIDS sidecar); an earlier run's own sidecar
    beside a scan or reference image may be replaced, so the same command can run again."""
    protected = {Path(path).resolve(): f"the scan {path}" for path in scans}
    protected.update({Path(path).resolve(): f"the input {path}" for path in others})
    protected.update(
        {
            Path(path).resolve(): "the class names read from it"
            for path in class_name_files
            if Path(path).is_file()
        }
    )
    for kind, paths in (("scan", scans), ("input", others)):
        for path in paths:
            beside = sidecar_path(path)
            if beside.is_file() and not is_segment_sidecar(beside):
                protected.setdefault(beside.resolve(), f"the JSON file beside the {kind} {path}")
    return protected


def is_segment_sidecar(path: Path) -> bool:
    """Whether ``path`` is a sidecar this command wrote: a JSON object with the keys only it writes together
    (``strategy``, ``preprocess`` and the ``classes`` list), so a re-run may replace it."""
    return segment_sidecar(path) is not None


def segment_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar at ``path`` when this command wrote it (see :func:`is_segment_sidecar`), else None."""
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON: not ours
        return None
    if (
        isinstance(document, dict)
        and {"strategy", "preprocess", "classes"} <= document.keys()
        and isinstance(document["classes"], list)
    ):
        return document
    return None


def refuse_overwrites(out: Path, protected: Mapping[Path, str]) -> None:
    """Refuse, before any work, an output of ``out`` (:func:`written_files`) that would replace a scan or
    another input, or a JSON file at its sidecar's path that this command did not write."""
    for path in written_files(out):
        what = protected.get(Path(path).resolve())
        if what is not None:
            raise SegmentError(f"{path} would overwrite {what}; choose another --out")
    sidecar = sidecar_path(out)
    if sidecar.is_file() and not is_segment_sidecar(sidecar):
        raise SegmentError(
            f"{sidecar} would be replaced by the sidecar of {out}, but iris segment did not write it (it "
            "lacks the sidecar's strategy, preprocess and classes); move it or choose another --out"
        )


def require_writable_directory(directory: Path, out: Path) -> None:
    """Refuse, before anything is read, an output directory that cannot be created or written in, naming
    ``--out``: otherwise the failure comes after all the work, naming a scratch file the user never chose.

    Directories created to find out are removed again, so a run refused later leaves nothing behind."""
    directory = Path(os.path.abspath(directory))  # "a/../b" names b, as mkdir(parents=True) would make it
    lineage = (directory, *directory.parents)
    existing = next(parent for parent in lineage if parent.exists())
    if not existing.is_dir():
        raise SegmentError(f"--out {out}: {existing} is a file, not a directory")
    created: list[Path] = []
    try:
        for parent in reversed(lineage[: lineage.index(existing)]):  # outermost first
            try:
                parent.mkdir()
            except OSError as error:
                raise SegmentError(f"--out {out}: cannot create {parent} ({error.strerror})") from None
            created.append(parent)
        probe = directory / f".iris-segment-write-test-{uuid.uuid4().hex}"
        try:
            probe.open("x").close()
            probe.unlink()
        except OSError as error:
            raise SegmentError(f"--out {out}: cannot write in {directory} ({error.strerror})") from None
    finally:
        for parent in reversed(created):  # innermost first; only what this check made
            try:
                parent.rmdir()
            except OSError:
                break  # something else put a file in it meanwhile: it and its parents stay


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` → the first CUDA device when present, else the CPU (see inference.device)."""
    try:
        return inference_device(name)
    except ValueError as error:
        raise SegmentError(f"--{error}") from None


def _stem_and_suffix(path: Path) -> tuple[str, str]:
    """``labels.nii.gz`` → (``labels``, ``.nii.gz``): the image suffix as written, else the last suffix."""
    length = len(file_suffix(path))
    return (path.name[:-length], path.name[-length:]) if length else (path.stem, path.suffix)


def sidecar_path(out: str | Path) -> Path:
    """``labels.nii.gz`` → ``labels.json`` next to it (any image suffix is dropped)."""
    stem, _ = _stem_and_suffix(Path(out))
    return Path(out).with_name(f"{stem}.json")


_PROBABILITIES = "_probabilities"


def probabilities_path(out: str | Path) -> Path:
    """``labels.nii.gz`` → ``labels_probabilities.nii.gz`` next to it, in the label map's format."""
    stem, suffix = _stem_and_suffix(Path(out))
    return Path(out).with_name(f"{stem}{_PROBABILITIES}{suffix}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # as ingest reads dataset.json
    except OSError as error:
        raise InvalidInputError(str(path), "unreadable", f"cannot read the file ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInputError(str(path), "malformed_json", f"not valid JSON ({error})") from None


def read_class_names(path: Path) -> dict[int, str]:
    """``{"1": "liver"}`` / ``{"liver": 1}``, a ``dataset.json`` whose ``labels`` section is either, or an
    ``iris segment`` sidecar (its ``classes``), so a corrected output can serve as the next reference.

    nnU-Net's ``"ignore"`` label names no class: dropped here, where only names are wanted.
    """
    document = _read_json(path)
    if isinstance(document, Mapping) and isinstance(document.get("classes"), list):
        try:
            return {int(item["label"]): str(item["name"]) for item in document["classes"]}
        except (KeyError, TypeError, ValueError):
            raise InvalidInputError(
                str(path), "malformed_labels", "`classes` must list objects with a `label` and a `name`"
            ) from None
    document = _labels_section(document)
    if isinstance(document, Mapping) and _IGNORE_LABEL in document:
        document = {key: value for key, value in document.items() if key != _IGNORE_LABEL}
    return parse_labels(document, where=str(path))


def _labels_section(document: Any) -> Any:
    """The ``labels`` of a ``dataset.json``, or the document itself (a plain name table)."""
    return document["labels"] if isinstance(document, Mapping) and "labels" in document else document


def ignore_label(path: Path) -> int | None:
    """The value that nnU-Net's ``"ignore"`` label gives unannotated voxels in a ``--labels`` file, if any:
    such voxels belong to no class, so the value must never be segmented as one."""
    document = _labels_section(_read_json(path))
    if not isinstance(document, Mapping) or _IGNORE_LABEL not in document:
        return None
    value = document[_IGNORE_LABEL]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(
            str(path),
            "malformed_labels",
            f"label {_IGNORE_LABEL!r} has value {value!r}; use a non-negative integer",
        )
    return value


def class_names(
    labels: Sequence[int],
    labels_file: Path | None,
    label_paths: Sequence[Path] = (),
    known: Mapping[int, str] | None = None,
) -> dict[int, str]:
    """Names for ``labels``: ``--labels`` file, else the reference label maps' JSON sidecars (the first
    that names a class), else ``known`` (what the embeddings table or the model bundle calls the class),
    else ``class_<n>``.

    A sidecar that holds no class names (e.g. a BIDS sidecar) is skipped with a warning: the names are a
    convenience there, while ``--labels`` asked for is an error when it cannot be read.
    """
    declared: dict[int, str] = {}
    if labels_file is not None:
        declared = read_class_names(labels_file)
    for label_path in () if labels_file is not None else label_paths:
        if not sidecar_path(label_path).is_file():
            continue
        try:
            declared = read_class_names(sidecar_path(label_path)) | declared  # the earlier reference wins
        except InvalidInputError as error:
            logger.warning("class names: skipped %s (use --labels to name the classes)", error)
    fallback = known or {}
    names = {int(v): declared.get(int(v), fallback.get(int(v), f"class_{int(v)}")) for v in labels}
    unnamed = [v for v in names if v not in declared]
    if labels_file is not None and unnamed:  # asked for names: a class without one is likely a wrong file
        logger.warning(
            "--labels %s names no class of label value(s) %s, which are segmented as %s",
            labels_file, unnamed, ", ".join(names[v] for v in unnamed),
        )  # fmt: skip
    return names


def _as_triple(values: Any, what: str) -> tuple[float, float, float]:
    triple = [float(v) for v in (values if isinstance(values, list | tuple) else [values])]
    if len(triple) == 1:
        triple *= 3
    if len(triple) != 3 or not all(math.isfinite(v) and v > 0 for v in triple):
        raise SegmentError(f"{what}: expected one or three positive numbers, got {values!r}")
    return tuple(triple)  # type: ignore[return-value]


def project_preprocess(project_dir: Path) -> dict[str, Any] | None:
    """``preprocess`` of ``conf/base/parameters_preprocess.yml`` in ``project_dir``, if there is one."""
    path = project_dir / "conf" / "base" / "parameters_preprocess.yml"
    if not path.is_file():
        return None
    try:
        section = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("preprocess")
    except yaml.YAMLError as error:
        raise InvalidInputError(str(path), "malformed_yaml", f"not valid YAML ({error})") from None
    return dict(section) if isinstance(section, Mapping) else None


def preprocess_params(
    spacing: Sequence[float] | None,
    bundle: ModelBundle,
    recorded: Mapping[str, Any] | None,
    project_dir: Path,
) -> tuple[dict[str, Any], str]:
    """The ``params:preprocess`` the model was trained with, and where they came from.

    Sources, first found wins: the bundle metadata (``preprocess`` or ``target_spacing``), the registered
    run's ``config/parameters.json`` (``recorded``), the project's ``conf/base/parameters_preprocess.yml``,
    then 3 mm. ``--spacing`` overrides only the spacing.
    """
    metadata = bundle.metadata or {}
    recorded_in_bundle = metadata.get("preprocess") or (
        {"target_spacing": metadata["target_spacing"]} if "target_spacing" in metadata else None
    )
    candidates: list[tuple[str, Any]] = [
        (_BUNDLE_SOURCE, recorded_in_bundle),
        (_RUN_SOURCE, (recorded or {}).get("preprocess")),
        (f"{project_dir / 'conf/base/parameters_preprocess.yml'}", project_preprocess(project_dir)),
    ]
    params: dict[str, Any] = {"target_spacing": list(DEFAULT_SPACING)}
    source = "default 3 mm"
    for name, section in candidates:
        if isinstance(section, Mapping) and section.get("target_spacing") is not None:
            params = {key: section[key] for key in PREPROCESS_KEYS if section.get(key) is not None}
            source = name
            break
    params["target_spacing"] = list(_as_triple(params["target_spacing"], f"target_spacing from {source}"))
    if spacing is None and source not in (_BUNDLE_SOURCE, _RUN_SOURCE):
        # A model trained at another spacing sees structures at the wrong scale and segments them badly.
        logger.warning(
            "preprocessing from %s (the model records none): resampling to %s mm; if the model was trained "
            "at another spacing, pass that with --spacing",
            source, "×".join(f"{v:g}" for v in params["target_spacing"]),
        )  # fmt: skip
    if spacing is not None:
        params["target_spacing"] = list(_as_triple(list(spacing), "--spacing"))
        source = f"--spacing (normalisation from {source})"
    return params, source


# ----------------------------------------------------------------------------------------- references


@dataclass
class Reference:
    """One reference on the canonical grid: normalised image and label map arrays [z, y, x], and that grid
    (for registering it to a scan, ``--strategy checked``)."""

    spec: ReferenceSpec
    image: np.ndarray
    label: np.ndarray
    grid: Geometry


def require_hounsfield(image: sitk.Image, path: Path, modality: str, refuse: bool = True) -> None:
    """Refuse a "CT" with no voxel below ingest's CT_AIR_CHECK_HU: an MR or PET scan, or a CT in stored values
    (HU + 1024), clipped to the CT window becomes a nearly binary image that is segmented badly, silently.
    With ``refuse`` False (the user named the modality) it is only warned about."""
    if modality != "CT":
        return
    extremes = sitk.MinimumMaximumImageFilter()
    extremes.Execute(image)
    if extremes.GetMinimum() <= CT_AIR_CHECK_HU:
        return
    found = (
        f"no voxel lies below {CT_AIR_CHECK_HU:g} HU (values {extremes.GetMinimum():g}.."
        f"{extremes.GetMaximum():g}; air is -1000 HU)"
    )
    if not refuse:
        logger.warning("%s: %s; segmenting it as CT, as --modality CT says", path, found)
        return
    raise InvalidInputError(
        str(path),
        "not_hounsfield",
        f"{found}, so it does not look like a CT in Hounsfield units as --modality CT (the default) expects: "
        "for an MR or PET scan pass --modality MR or --modality PET; for a CT stored without its rescale "
        "intercept (HU = value - 1024 for most scanners) convert it to Hounsfield units first; for a CT "
        "cropped inside the body pass --modality CT to segment it anyway",
    )


def read_reference(
    spec: ReferenceSpec,
    wanted: Sequence[int] | None,
    modality: str,
    params: Mapping[str, Any],
    ignored: int | None = None,
    require_air: bool = True,
    channel: int | None = None,
    require_every_class: bool = True,
) -> tuple[Reference, list[int]]:
    """Read and check a reference pair (the image's volume ``channel`` when it is 4-D); returns it on the
    canonical grid and its foreground values.

    The image and label must share a grid (a label on another grid is almost always the wrong file), and
    the label must hold every ``wanted`` class, or with ``require_every_class`` False (one of several
    references of an ensemble, each class taken from those that hold it) at least one of them; whether
    resampling kept them is checked later, on the canonical grid. ``ignored`` (nnU-Net's ``"ignore"``
    label) marks unannotated voxels, never a foreground value.
    """
    image = pick_channel(read_image(spec.image), spec.image, channel, "reference image")
    require_scalar_volume(image, spec.image, "reference image")
    require_hounsfield(image, spec.image, modality, refuse=require_air)
    label = read_image(spec.label)
    require_scalar_volume(label, spec.label, "reference label")
    difference = first_grid_difference(
        Geometry.from_image(image), Geometry.from_image(label), GRID_TOLERANCE_MM
    )
    if difference:
        raise InvalidInputError(
            str(spec.label),
            "grid_mismatch",
            f"reference image {spec.image} and its label are on different grids: {difference}; "
            "resample the label onto the image grid",
        )
    values = label_values(sitk.GetArrayViewFromImage(label), spec.label)
    if not wanted and values.size and (values[0] < 0 or values[-1] > LABEL_MAX):
        # Without --classes every value is a class, and the model's label grid holds 0..255; with it, the
        # other values are dropped (keep_classes), so such a reference serves for the classes asked for.
        raise InvalidInputError(
            str(spec.label),
            "label_range",
            f"label values must lie in 0..{LABEL_MAX}, got {values[0]}..{values[-1]}: relabel the classes as "
            f"1..{LABEL_MAX}, or pass --classes with the values to segment (each in 1..{LABEL_MAX}; the "
            "label's other values are then ignored)",
        )
    present = [int(v) for v in values if v not in (0, ignored)]
    missing = [c for c in (wanted or []) if c not in present]
    if missing and (require_every_class or len(missing) == len(wanted or [])):
        raise InvalidInputError(
            str(spec.label),
            "missing_class",
            f"the reference label has no voxel of class(es) {missing} (it holds {present}); "
            + (
                "drop them with --classes or use a reference that shows them"
                if require_every_class
                else "it adds nothing to the task: drop this reference, or change --classes"
            ),
        )
    if not present:
        raise InvalidInputError(
            str(spec.label),
            "empty_label",
            f"the reference label has no foreground voxel (every voxel is 0"
            f"{'' if ignored is None else f' or {ignored}, ignored'}): check that it is the label map of "
            f"{spec.image} and that its export kept the classes, or use a reference whose label shows the "
            "classes to segment",
        )
    if wanted:
        label = keep_classes(label, wanted)
    volume = prepare_image(image, modality, params, source=str(spec.image))
    canonical = prepare_label(label, volume, source=str(spec.label))
    warn_tiny_classes(canonical, wanted or present, params["target_spacing"], spec.label)
    return Reference(spec, volume.array, canonical, volume.grid), present


def keep_classes(label: sitk.Image, classes: Sequence[int]) -> sitk.Image:
    """``label`` with every value but ``classes`` set to 0. Only the asked-for classes go on to the model's
    label grid, which holds 1..255: a FreeSurfer aparc+aseg map (cortical parcels from 1000 up) can serve
    as a reference for its subcortical classes."""
    values = sitk.GetArrayFromImage(label)
    kept = sitk.GetImageFromArray(np.where(np.isin(values, list(classes)), values, 0).astype(values.dtype))
    kept.CopyInformation(label)
    return kept


def warn_tiny_classes(
    canonical: np.ndarray, classes: Sequence[int], spacing: Sequence[float], source: Path
) -> None:
    """Warn about the classes that cover fewer than TINY_REFERENCE_VOXELS voxels of the model's grid: their
    embedding pools a handful of voxels, so what the model finds for them is unreliable. A class with no
    voxel left is an error later (``class_masks``), not a warning."""
    counts = np.bincount(canonical.ravel(), minlength=LABEL_MAX + 1)
    grid = "×".join(f"{float(v):g}" for v in spacing)
    for c in (int(c) for c in classes if 0 < counts[c] < TINY_REFERENCE_VOXELS):
        logger.warning(
            "%s: class %d covers only %d voxel(s) of the model's %s mm grid, so its embedding rests on a "
            "speck and its segmentation is unreliable; use a reference in which it is larger, or a finer "
            "--spacing if the model was trained at one",
            source, c, counts[c], grid,
        )  # fmt: skip


def require_fits_network(
    shape: Sequence[int],
    roi: Sequence[int],
    divisor: int,
    path: Path,
    what: str,
    spacing: Sequence[float],
    remedy: str,
) -> None:
    """Refuse, naming ``path``, an image whose canonical array (``shape``, [z, y, x]) is too small for the
    network: the windows cut from it (``roi`` per axis, clamped to the volume) must exceed ``divisor``
    (2**stages) on at least one axis so the bottleneck holds more than one voxel. The model and the sliding
    window refuse such an input too, with a ValueError that names no file."""
    window = clamp_roi(tuple(int(r) for r in roi), tuple(int(v) for v in shape))
    if any(w > divisor for w in window):
        return
    size = "×".join(str(int(v)) for v in reversed(tuple(shape)))  # x×y×z, as the user reads a grid
    grid = "×".join(f"{float(v):g}" for v in spacing)
    raise InvalidInputError(
        str(path),
        "too_small",
        f"the {what} is {size} voxels on the model's {grid} mm grid, too small for this network: at least "
        f"one axis must exceed {divisor} voxels so its bottleneck holds more than one voxel; {remedy}",
    )


REFERENCE_TOO_SMALL = (
    "use a reference with more context around the class (a larger crop of its scan), or a finer --spacing "
    "if the model was trained at one"
)
SCAN_TOO_SMALL = (
    "segment a larger scan (more context around the structure), or a finer --spacing if the model was "
    "trained at one"
)


def scan_fits_network(
    image: sitk.Image, path: Path, spacing: Sequence[float], roi: Sequence[int], divisor: int
) -> None:
    """:func:`require_fits_network` for a raw scan, from its header alone (its canonical grid's size)."""
    shape = canonical_geometry(Geometry.from_image(image), spacing).size[::-1]
    require_fits_network(shape, roi, divisor, path, "scan", spacing, SCAN_TOO_SMALL)


def reference_holdings(
    references: Sequence[Reference], shown: Sequence[Sequence[int]], labels: Sequence[int], strategy: str
) -> np.ndarray:
    """(R, K) bool: which reference shows which class on the model's grid, checked before any encoding.

    One-reference strategies need every class in their reference. The others (each class's embedding the
    mean over the references that show it, as evaluate's ``ensemble`` and the pyfunc build it) need each
    class in at least one reference; a class that resampling lost from a reference that labels it
    (``shown``: its label file's values) is warned about, as the embedding then comes from the others.
    """
    held = np.array([[bool(np.any(ref.label == v)) for v in labels] for ref in references], dtype=bool)
    if strategy in ONE_REFERENCE_STRATEGIES:
        class_masks(references[0].label, labels, source=str(references[0].spec.label))  # names a lost class
        return held
    nowhere = [int(v) for v, column in zip(labels, held.T, strict=True) if not column.any()]
    if nowhere:
        holds = "; ".join(
            f"{ref.spec.label}: {[int(v) for v, h in zip(labels, row, strict=True) if h]}"
            for ref, row in zip(references, held, strict=True)
        )
        raise SegmentError(
            f"class(es) {nowhere}: no reference shows them on the model's grid (absent, or thinner than its "
            f"spacing {list(references[0].grid.spacing)} mm in the references that label them); the "
            f"references hold: {holds}. Add a reference that shows them, or leave them out of --classes"
        )
    for ref, row, values in zip(references, held, shown, strict=True):
        lost = [int(v) for v, h in zip(labels, row, strict=True) if not h and v in values]
        if lost:
            logger.warning(
                "%s: class(es) %s have no voxel left on the model's grid (thinner than its spacing), so "
                "their embeddings come from the other references only",
                ref.spec.label, lost,
            )  # fmt: skip
    if len(references) > 1 and not held.all():
        logger.info(
            "ensemble over %d references, each class from those that show it: %s",
            len(references),
            ", ".join(f"{int(v)}: {int(n)}" for v, n in zip(labels, held.sum(axis=0), strict=True)),
        )
    return held


def label_masks(label: np.ndarray, labels: Sequence[int]) -> Tensor:
    """(1, K, D, H, W) float masks of ``labels`` in a canonical label map, empty for a class it lacks."""
    return torch.from_numpy(np.stack([label == v for v in labels]))[None].float()


def reference_task(
    model: Iris,
    references: Sequence[Reference],
    labels: Sequence[int],
    held: np.ndarray,
    strategy: str,
    roi_size: Sequence[int],
    *,
    tuning_steps: int,
    tuning_lr: float,
) -> Tensor:
    """T (1, K, m+1, C) from reference images: one-shot (first), context ensemble, or tuned ensemble.

    Each class is encoded from a window centred on it, as ``embed_tasks`` and ``evaluate`` do, so the
    numbers of a model's evaluation describe what this command does. ``held`` (:func:`reference_holdings`)
    says which reference shows which class: a class's ensemble embedding is the mean over those, and in
    tuning a reference's loss counts only its own classes.
    """
    used = references[:1] if strategy in ONE_REFERENCE_STRATEGIES else references
    pool, valid = [], []
    for reference, row in zip(used, held[: len(used)], strict=True):
        if not row.any():
            continue  # resampling left it none of the classes: warned about by reference_holdings
        shown = [v for v, h in zip(labels, row, strict=True) if h]
        embedding = class_embeddings(model, reference.image, reference.label, shown, roi_size)
        slots = embedding.new_zeros((1, len(labels), *embedding.shape[2:]))
        slots[0, torch.from_numpy(row)] = embedding[0]
        pool.append(slots)
        valid.append(torch.from_numpy(row))
    task = context_ensemble(torch.cat(pool), torch.stack(valid))
    if strategy != "tuning":
        return task
    # A reference left with none of the classes would only dilute the mean loss over references.
    showing = [(reference, row) for reference, row in zip(used, held[: len(used)], strict=True) if row.any()]
    pairs = []
    for reference, _ in showing:
        image = torch.from_numpy(np.ascontiguousarray(reference.image))[None, None]
        pairs.append(crop_reference(image, label_masks(reference.label, labels), roi_size))
    # A class tuned at all must be in some reference's crop; within a reference, only its own classes count
    # (one that does not label a class says nothing about where it is).
    in_a_crop = torch.stack([m.flatten(2).sum(dim=2)[0] > 0 for _, m in pairs]).any(dim=0)
    slots = torch.from_numpy(np.stack([row for _, row in showing])) & in_a_crop
    return tune_task_embedding(model, task, pairs, steps=tuning_steps, lr=tuning_lr, class_mask=slots).task


# ------------------------------------------------------------------------------------ stored embeddings


def embeddings_file(path: Path) -> Path:
    """``--embeddings``: a parquet file, or the newest version of the catalog's versioned folder
    (``data/07_model_output/task_embeddings.parquet``), logged. Read whole, that folder would be every
    version's rows at once, from models that may differ."""
    if not path.is_dir():
        return path
    version = newest_version(path, Path.is_file)
    if version is None:
        return path  # a partitioned parquet dataset of one's own
    logger.info("embeddings %s: using its newest version %s", path, version.parent.name)
    return version


def read_embeddings(path: Path) -> pd.DataFrame:
    """A ``task_embeddings`` parquet (the embed_tasks output), checked for the columns used here."""
    if not path.exists():  # else pandas says only "not a readable parquet table (<path>)"
        raise InvalidInputError(str(path), "missing_file", "the file does not exist; check the path")
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise InvalidInputError(str(path), "unreadable", f"not a readable parquet table ({error})") from None
    needed = {"dataset", "label", "class_name", "source", "case_id", "tokens", "dim", "embedding"}
    missing = sorted(needed - set(table.columns))
    if missing:
        raise InvalidInputError(
            str(path), "malformed_table", f"not a task_embeddings table: columns {missing} are missing"
        )
    return table


def require_embeddings_fit(table: pd.DataFrame, path: Path, weights_sha256: str, roi: Sequence[int]) -> None:
    """Refuse embeddings another network encoded (they mean nothing to this one: a retrain with the same
    configuration gives tensors of the right shape and the wrong meaning); warn when their reference
    windows differ from the query windows, which training and ``evaluate`` keep equal."""
    made_by = foreign_weights(table, weights_sha256)
    if made_by:
        raise SegmentError(
            f"{path} holds embeddings of the model(s) with weights {[m[:12] for m in made_by]}, but this "
            f"model's weights are {weights_sha256[:12]}: pass the model that made them, or re-run "
            "embed_tasks with this one (kedro run --pipelines=embed_tasks)"
        )
    embedded_roi = embedded_roi_size(table)
    if embedded_roi is not None and embedded_roi != tuple(roi):
        logger.warning(
            "%s: the embeddings were encoded from %s-voxel reference windows, the query is segmented in %s "
            "windows (--roi or the model's training crop); the model was trained with the two equal",
            path, list(embedded_roi), list(roi),
        )  # fmt: skip


def one_reference(rows: pd.DataFrame, labels: Sequence[int], dataset: str) -> pd.DataFrame:
    """The reference rows of one case, the first (by case id) that shows every class of ``labels``: one-shot
    means one reference scan, as the paper and ``evaluate`` define it.

    embed_tasks draws each class's references on its own, so in a dataset of many classes no case may have
    been drawn for all of them; then each class's first case serves, with a warning that names them."""
    for _, group in rows.groupby("case_id", sort=True):
        if set(labels) <= {int(v) for v in group["label"]}:
            return group
    first = rows[rows["label"].astype(int).isin(labels)].sort_values("case_id", kind="stable")
    first = first.groupby("label", sort=True).head(1)
    logger.warning(
        "no single reference case of dataset %r in the embeddings shows all of class(es) %s: one_shot takes "
        "each class from its first reference case (%s), so not from one scan; --strategy ensemble averages "
        "every stored reference of each class",
        dataset, list(labels),
        ", ".join(f"{int(row.label)}: {row.case_id}" for row in first.sort_values("label").itertuples()),
    )  # fmt: skip
    return first


def stored_task(
    model: Iris, table: pd.DataFrame, dataset: str | None, strategy: str, classes: Sequence[int] | None
) -> tuple[Tensor, list[int], dict[int, str], str]:
    """T from a ``task_embeddings`` table: memory-bank rows, one reference case's rows (one_shot) or the
    mean of the dataset's reference rows per class (ensemble). Returns (T, labels, names, dataset)."""
    datasets = sorted(table["dataset"].astype(str).unique())
    if dataset is None:
        if len(datasets) != 1:
            raise SegmentError(f"the embeddings hold datasets {datasets}; choose one with --dataset")
        dataset = datasets[0]
    if dataset not in datasets:
        raise SegmentError(f"dataset {dataset!r} is not in the embeddings; known datasets: {datasets}")
    source = "memory_bank" if strategy == "memory_bank" else "reference"
    rows = table[(table["dataset"].astype(str) == dataset) & (table["source"] == source)]
    available = sorted(int(v) for v in rows["label"].unique())
    if not available:
        kinds = sorted(table.loc[table["dataset"].astype(str) == dataset, "source"].unique())
        raise SegmentError(
            f"the embeddings hold no {source} row of dataset {dataset!r} (only {kinds}); "
            + ("held-out datasets have no memory bank" if source == "memory_bank" else "re-run embed_tasks")
        )
    labels = list(classes) if classes else available
    missing = [c for c in labels if c not in available]
    if missing:
        raise SegmentError(
            f"the embeddings hold no {source} row of dataset {dataset!r} for class(es) {missing} "
            f"(available: {available})"
        )
    if strategy == "one_shot":
        rows = one_reference(rows, labels, dataset)
    expected = (model.config.num_tokens, model.config.embed_dim)
    slots, names = [], {}
    for label in labels:
        group = rows[rows["label"].astype(int) == label].sort_values("case_id", kind="stable")
        shapes = {(int(t), int(d)) for t, d in zip(group["tokens"], group["dim"], strict=True)}
        if shapes != {expected}:
            raise SegmentError(
                f"embeddings of {dataset}/{label} have (tokens, dim) {sorted(shapes)} but the model needs "
                f"{expected}; they were made by another model"
            )
        vectors = [embedding_tensor(row) for row in group.to_dict("records")]
        slots.append(torch.stack(vectors).mean(dim=0))  # (N, m+1, C) → (m+1, C)
        names[label] = str(group["class_name"].iloc[0])
    return torch.stack(slots)[None], labels, names, dataset


def bundle_class_names(bundle: ModelBundle, dataset: str | None) -> dict[int, str]:
    """Label value → name of ``dataset``'s classes, as the model's training index named them."""
    prefix = f"{dataset}/"
    return {
        int(key[len(prefix) :]): name for key, name in bundle.class_names.items() if key.startswith(prefix)
    }


def bank_task(
    model: Iris, bundle: ModelBundle, dataset: str, classes: Sequence[int] | None
) -> tuple[Tensor, list[int]]:
    """T from the model's own memory bank (training classes ``dataset/label``), no reference."""
    prefix = f"{dataset}/"
    known = sorted(int(key[len(prefix) :]) for key in bundle.class_ids if key.startswith(prefix))
    if not known:
        datasets = sorted({key.split("/", 1)[0] for key in bundle.class_ids})
        raise SegmentError(f"dataset {dataset!r} is not a training dataset of this model (known: {datasets})")
    labels = list(classes) if classes else known
    try:
        task = memory_bank_task(model, bundle.class_ids, [f"{prefix}{c}" for c in labels])
    except KeyError as error:
        raise SegmentError(str(error.args[0])) from None
    return task, labels


# ---------------------------------------------------------------------------------------- segmenting


def make_predictor(
    model: Iris, task: Tensor, *, roi_size: Sequence[int], overlap: float, device: torch.device
) -> VolumePredictor:
    """The canonical-volume predictor (a separate function so tests can substitute a known prediction)."""
    return volume_predictor(model, task, roi_size=roi_size, overlap=overlap, device=device)


@dataclass
class SegmentResult:
    """The written label map, its sidecar and the summary that went into the sidecar."""

    label_path: Path
    sidecar_path: Path
    summary: dict[str, Any]


def label_volumes(label: sitk.Image, names: Mapping[int, str]) -> list[dict[str, Any]]:
    """Per class: label value, name, voxel count and volume in ml (voxels × voxel volume in mm³ / 1000)."""
    voxel_mm3 = float(np.prod(label.GetSpacing()))
    values, counts = np.unique(sitk.GetArrayViewFromImage(label), return_counts=True)
    count_of = dict(zip(values.tolist(), counts.tolist(), strict=True))
    return [
        {
            "label": int(value),
            "name": name,
            "voxels": int(count_of.get(int(value), 0)),
            "volume_ml": count_of.get(int(value), 0) * voxel_mm3 / 1000.0,
        }
        for value, name in names.items()
    ]


@dataclass
class PreparedTask:
    """The network and the task embedding of a request: built once, then applied to every scan."""

    model: Iris
    task: Tensor
    labels: list[int]
    names: dict[int, str]
    dataset: str | None
    params: dict[str, Any]
    params_source: str
    roi: tuple[int, int, int]
    device: torch.device
    weights_sha256: str = ""
    embeddings: Path | None = None  # the file read: --embeddings, or its folder's newest version
    reference_check: dict[str, Any] | None = None  # check_on_references, when it ran
    # --strategy checked: the classes the check flagged, taken from this reference registered to each scan
    registered_classes: list[int] = field(default_factory=list)
    registered_reference: Reference | None = None
    # The references the task came from (one_shot and checked use only the first), with the classes each
    # gave: an ensemble takes a class from the references that show it.
    references: list[dict[str, Any]] = field(default_factory=list)


def check_on_references(
    model: Iris,
    task: Tensor,
    references: Sequence[Reference],
    labels: Sequence[int],
    names: Mapping[int, str],
    *,
    request: SegmentRequest,
    roi: Sequence[int],
    device: torch.device,
) -> dict[str, Any]:
    """Segment each reference with the task, as a scan would be, and score its own classes (Dice).

    A class the model does not find again in the scan its embedding came from (mean Dice below
    :data:`SELF_CHECK_DICE`) is warned about: the model does not recognise it from these references, so
    the scans' segmentation of it is unreliable, though it may look plausible. What the sidecar records.
    """
    predict = make_predictor(model, task, roi_size=roi, overlap=request.overlap, device=device)
    rows, scores = [], []
    for reference in references:
        masks = label_masks(reference.label, labels)  # a class this reference lacks scores NaN
        image = torch.from_numpy(np.ascontiguousarray(reference.image))[None, None].to(device)
        with torch.no_grad():
            dice = reference_self_dice(predict(image), masks, request.threshold).cpu()
        scores.append(dice)
        rows.append(
            {
                "image": str(reference.spec.image),
                "label": str(reference.spec.label),
                "dice": {
                    str(v): None if math.isnan(d) else round(float(d), 4)
                    for v, d in zip(labels, dice.tolist(), strict=True)
                },
            }
        )
    mean = torch.stack(scores).nanmean(dim=0).tolist()
    unreliable = {int(v): d for v, d in zip(labels, mean, strict=True) if not d >= SELF_CHECK_DICE}
    if unreliable:
        remedy = {
            "tuning": "even after tuning; other references or more --tuning-steps may help",
            "checked": "--strategy checked takes them from the reference registered to each scan instead",
        }.get(
            request.strategy,
            "--strategy checked takes them from the reference registered to each scan instead, and "
            "--strategy tuning fits the task to the references' own masks",
        )
        logger.warning(
            "class(es) %s: segmenting the reference%s with this task finds them with Dice below %g, so the "
            "model does not recognise them from %s and their segmentation of the scans is unreliable; %s",
            ", ".join(f"{v} ({names.get(v, v)}, Dice {d:.2f})" for v, d in unreliable.items()),
            "s" if len(references) > 1 else "", SELF_CHECK_DICE,
            "these references" if len(references) > 1 else "this reference", remedy,
        )  # fmt: skip
    return {"threshold": SELF_CHECK_DICE, "references": rows, "unreliable": sorted(unreliable)}


def prepare_task(
    request: SegmentRequest,
    bundle: ModelBundle,
    preprocessing: tuple[dict[str, Any], str],
    *,
    on_step: StepCallback | None = None,
) -> PreparedTask:
    """Read the references (or stored embeddings) and encode the task: the work shared by all scans.

    ``preprocessing`` is what :func:`preprocess_params` resolved: the parameters and where they came from.
    """
    step = on_step or (lambda _: None)
    request.check()
    labels = list(request.classes or [])
    ignored = ignore_label(request.labels_file) if request.labels_file is not None else None
    if ignored is not None and ignored in labels:
        raise SegmentError(
            f"--classes lists {ignored}, which {request.labels_file} names {_IGNORE_LABEL!r}: nnU-Net's "
            "label for unannotated voxels, not a class; leave it out of --classes"
        )
    if ignored is not None and not labels:
        logger.info(
            "%s: value %d is nnU-Net's %r label for unannotated voxels: not segmented as a class",
            request.labels_file, ignored, _IGNORE_LABEL,
        )  # fmt: skip
    device = resolve_device(request.device)
    params, params_source = preprocessing
    roi = tuple(request.roi_size) if request.roi_size else bundle.inference_window()
    model = bundle.build_model().to(device)
    divisor = model.config.size_divisor
    if all(r <= divisor for r in roi):  # else every image would be refused as too small, naming it
        raise SegmentError(
            f"the window {list(roi)} (--roi, else the model's training crop) is too small for this network: "
            f"at least one axis must exceed {divisor} voxels so its bottleneck holds more than one voxel"
        )
    references: list[Reference] = []
    held = np.zeros((0, 0), dtype=bool)  # which reference shows which class
    embeddings = embeddings_file(request.embeddings) if request.embeddings is not None else None
    table = read_embeddings(embeddings) if embeddings is not None else None
    if table is not None and not request.references:
        require_embeddings_fit(table, embeddings, bundle.weights_checksum, roi)  # type: ignore[arg-type]
    if request.references:
        specs = request.used_references()
        if len(specs) < len(request.references):
            logger.warning(
                "--strategy %s uses only the first reference (%s); ignored: %s. To use every reference, "
                "pass --strategy ensemble (or tuning)",
                request.strategy, specs[0].image,
                ", ".join(f"{spec.image}:{spec.label}" for spec in request.references[len(specs) :]),
            )  # fmt: skip
        one_reference_strategy = request.strategy in ONE_REFERENCE_STRATEGIES
        shown = []
        for spec in specs:
            reference, present = read_reference(
                spec, labels or None, request.modality, params, ignored, request.require_air, request.channel,
                require_every_class=one_reference_strategy or len(specs) == 1,
            )  # fmt: skip
            require_fits_network(
                reference.image.shape, roi, divisor, spec.image, "reference image", params["target_spacing"],
                REFERENCE_TOO_SMALL,
            )  # fmt: skip
            references.append(reference)
            shown.append(present)
        if not labels:  # every class the reference shows; for an ensemble, every class any reference shows
            labels = sorted(set().union(*shown))
        held = reference_holdings(references, shown, labels, request.strategy)

    step("embedding")
    dataset = request.dataset
    check = None
    if references:
        names = class_names(
            labels,
            request.labels_file,
            [r.spec.label for r in references],
            bundle_class_names(bundle, dataset),
        )  # fails before work
        task = reference_task(
            model, references, labels, held, request.strategy, roi,
            tuning_steps=request.tuning_steps, tuning_lr=request.tuning_lr,
        )  # fmt: skip
        if request.reference_check:
            step("checking the task on its references")
            check = check_on_references(
                model, task, references, labels, names, request=request, roi=roi, device=device
            )
    elif table is not None:
        task, labels, stored_names, dataset = stored_task(
            model, table, request.dataset, request.strategy, request.classes
        )
        names = class_names(labels, request.labels_file, (), stored_names)
    else:
        task, labels = bank_task(model, bundle, str(request.dataset), request.classes)
        names = class_names(labels, request.labels_file, (), bundle_class_names(bundle, dataset))
    registered = list(check["unreliable"]) if check is not None and request.strategy == "checked" else []
    return PreparedTask(
        model, task, labels, names, dataset, params, params_source, roi, device,  # type: ignore[arg-type]
        weights_sha256=bundle.weights_checksum, embeddings=embeddings, reference_check=check,
        registered_classes=registered, registered_reference=references[0] if registered else None,
        references=[
            {"image": str(ref.spec.image), "label": str(ref.spec.label),
             "classes": [int(v) for v, h in zip(labels, row, strict=True) if h],
             "image_sha256": file_sha256(ref.spec.image), "label_sha256": file_sha256(ref.spec.label)}
            for ref, row in zip(references, held, strict=True)
        ],
    )  # fmt: skip


def pick_channel(image: sitk.Image, path: Path, channel: int | None, what: str) -> sitk.Image:
    """Volume ``channel`` of a 4-D (x, y, z, channel) image, on the 3-D part of its grid (ingest takes
    channel 0 of a multi-modal MSD image, so a model trained on one saw channel 0); any other image as it
    is (a 3-D reference of the query's modality serves a 4-D query's channel). A 4-D image without
    ``channel`` is refused: which volume is meant is the user's call."""
    if image.GetDimension() != 4:
        return image
    count = image.GetSize()[3]
    if channel is None:
        raise InvalidInputError(
            str(path),
            "not_3d",
            f"the {what} holds {count} volumes along its 4th axis (channels or time points); choose one with "
            f"--channel N (0 to {count - 1}; a model trained on a multi-modal MSD task saw channel 0)",
        )
    if channel >= count:
        raise InvalidInputError(
            str(path),
            "channel",
            f"the {what} holds {count} volumes along its 4th axis, so --channel {channel} is not one of them "
            f"(0 to {count - 1})",
        )
    return volume_at(image, channel)


def read_scan(
    path: Path, out: Path, modality: str, require_air: bool = True, channel: int | None = None
) -> sitk.Image:
    """The scan to segment (its volume ``channel`` when it is 4-D), refused now if it does not fit
    ``modality`` or its label map could not be written to ``out`` (the volume's own grid)."""
    image = pick_channel(read_image(path), path, channel, "image")
    require_scalar_volume(image, path, "image")
    require_hounsfield(image, path, modality, refuse=require_air)
    require_storable(image, out)
    return image


def image_files(path: Path) -> list[Path]:
    """The files of the image ``path``: itself and, for a detached header (.mhd, .nhdr), the data files it
    names, which removing the header alone would leave behind. Only data files in the header's own folder, as
    write_image puts them: a header edited to name a file elsewhere must not get that file removed."""
    try:
        names = detached_data_files(path) if path.is_file() else []
    except (OSError, ValueError):  # not a header that can be read: nothing else to remove
        names = []
    beside = [path.with_name(name) for name in names if Path(name).name == name]
    return [path] + [data for data in beside if data.is_file()]


def registration_hook(
    prepared: PreparedTask, image_path: Path
) -> Callable[[CanonicalVolume, Tensor], Tensor] | None:
    """For ``--strategy checked``: the hook that replaces the logits of the classes the reference check
    flagged by the reference's masks registered to the scan (SimpleITK affine + B-spline, evaluate's
    ``registration`` baseline), on the canonical grid; None when no class was flagged."""
    reference = prepared.registered_reference
    if not prepared.registered_classes or reference is None:
        return None

    def replace(volume: CanonicalVolume, logits: Tensor) -> Tensor:
        propagated = registration_baseline(
            array_to_image(volume.array, volume.grid),
            array_to_image(reference.image, reference.grid),
            array_to_image(reference.label.astype(np.uint8), reference.grid),
            RegistrationConfig(),
            case=f"{image_path} (reference {reference.spec.image})",
        )
        certain = label_map_logits(sitk.GetArrayFromImage(propagated), prepared.labels)
        slots = [prepared.labels.index(c) for c in prepared.registered_classes]
        logits[:, slots] = certain[:, slots].to(logits.device, logits.dtype)
        return logits

    return replace


def segment_scan(
    request: SegmentRequest,
    prepared: PreparedTask,
    image: sitk.Image,
    image_path: Path,
    out: Path,
    *,
    model_uri: str,
    model_source: Mapping[str, Any] | None = None,
    on_step: StepCallback | None = None,
) -> SegmentResult:
    """Segment one scan with a prepared task on the canonical grid; write it on the scan's own grid.

    ``model_source`` is what ``model_uri`` resolved to (``model_registry``: name, version and run of a
    registry version; ``model_path``: a local bundle directory), recorded in the sidecar with the weights
    checksum, so a label map traces back to the exact model even when ``model_uri`` is an alias.
    """
    step = on_step or (lambda _: None)
    step("segmenting")
    scan_fits_network(
        image, image_path, prepared.params["target_spacing"], prepared.roi, prepared.model.config.size_divisor
    )
    predict = make_predictor(
        prepared.model, prepared.task, roi_size=prepared.roi, overlap=request.overlap, device=prepared.device
    )
    with torch.no_grad():
        prediction = segment_volume(
            image, predict, prepared.labels, modality=request.modality, params=prepared.params,
            threshold=request.threshold, probabilities=request.save_probabilities, device=prepared.device,
            source=str(image_path), adjust_logits=registration_hook(prepared, image_path),
        )  # fmt: skip

    step("writing")
    result = prediction.labels
    probabilities = None if prediction.probabilities is None else probabilities_path(out)
    earlier = [path for path in written_files(out) if path.exists()]
    if earlier:  # re-running into the same --out replaces its outputs, as documented
        removed = probabilities_path(out) if probabilities is None else None
        logger.info(
            "replacing what an earlier run wrote: %s",
            ", ".join(
                f"{path} (removed: no probabilities now)" if path == removed else str(path)
                for path in earlier
            ),
        )
    sidecar = sidecar_path(out)
    # An earlier run's sidecar must not describe this label map if writing stops before its own replaces it
    # (refuse_overwrites let only a sidecar iris segment wrote get here).
    sidecar.unlink(missing_ok=True)
    if prediction.probabilities is not None:
        write_image(prediction.probabilities, probabilities)
    else:  # an earlier run's must not sit beside this label map as if they were its own
        for path in image_files(probabilities_path(out)):
            path.unlink(missing_ok=True)
    write_image(result, out)  # last: a label map on disk means its probabilities, if any, are its own
    resolved = PreprocessParams.coerce(prepared.params)
    summary = {
        "image": str(image_path),
        # the file's, or a DICOM folder's files' (names and contents): what was segmented, if it changes later
        "image_sha256": file_sha256(image_path),
        "output": str(out),
        "iris_pipelines_version": __version__,
        "model": model_uri,
        "strategy": request.strategy,
        "references": prepared.references,
        "embeddings": None if request.embeddings is None else str(request.embeddings),
        "dataset": prepared.dataset,
        "modality": request.modality,
        "channel": request.channel,
        "preprocess": prepared.params,
        "preprocess_source": prepared.params_source,
        # what the scan was normalised with: "preprocess" holds only what the source recorded
        "preprocess_resolved": {key: list(getattr(resolved, key)) for key in PREPROCESS_KEYS},
        "roi_size": list(prepared.roi),
        "overlap": request.overlap,
        "threshold": request.threshold,
        "device": str(prepared.device),
        "geometry": Geometry.from_image(result).to_dict(),
        "voxel_volume_mm3": float(np.prod(result.GetSpacing())),
        "classes": label_volumes(result, prepared.names),
        "labels_file": None if request.labels_file is None else str(request.labels_file),
        "probabilities": None
        if probabilities is None
        else {
            "path": str(probabilities),
            "order": [int(v) for v in prepared.labels],
            "meaning": "fourth axis: each class's foreground probability (sigmoid; classes may overlap)",
        },
        "model_registry": (model_source or {}).get("model_registry"),
        "model_path": (model_source or {}).get("model_path"),
        # the checksum training recorded, which the registry tag weights_sha256 and every embedding row hold
        "weights_sha256": prepared.weights_sha256 or None,
        "embeddings_file": None if prepared.embeddings is None else str(prepared.embeddings),
        "tuning": {"steps": request.tuning_steps, "lr": request.tuning_lr}
        if request.strategy == "tuning"
        else None,
        # --strategy checked: the classes taken from the reference registered to this scan
        "registered_classes": prepared.registered_classes if request.strategy == "checked" else None,
        # each reference segmented with the task: Dice of its own classes; "unreliable" lists the classes
        # below the threshold (None: no reference images, or --no-reference-check)
        "reference_check": prepared.reference_check,
    }
    write_text_atomic(sidecar, json.dumps(summary, indent=2) + "\n")
    empty = [f"{item['label']} ({item['name']})" for item in summary["classes"] if item["voxels"] == 0]
    if empty:  # an empty class reads like "absent" in a volume table; say it may be a miss
        logger.warning(
            "%s: class(es) %s came out empty: the scan may not hold them, or the model does not find them "
            "from this task; look at --save-probabilities, or give more references (--strategy ensemble "
            "or tuning)",
            image_path, ", ".join(empty),
        )  # fmt: skip
    return SegmentResult(Path(out), sidecar, summary)


# torch's CPU allocator and ITK raise a plain RuntimeError when an allocation fails (numpy raises MemoryError,
# CUDA torch.OutOfMemoryError); any other RuntimeError is a bug and must surface.
_ALLOCATION_FAILURES = ("can't allocate memory", "Failed to allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation, from numpy, torch (CPU or CUDA) or SimpleITK."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _ALLOCATION_FAILURES)


def out_of_memory_reason(image_path: Path, error: BaseException) -> str:
    detail = " ".join(str(error).split()) or type(error).__name__
    return f"{image_path}: out of memory while segmenting it ({detail})"


def early_scan_fit(
    request: SegmentRequest, bundle: ModelBundle, image: sitk.Image, spacing: Sequence[float]
) -> None:
    """:func:`scan_fits_network` before the references are encoded, from the bundle's config (segment_scan
    checks again with the network built); skipped when the config or the window is wrong, which
    prepare_task names."""
    try:
        divisor = bundle.config().size_divisor
    except BundleError:
        return
    roi = tuple(request.roi_size) if request.roi_size else bundle.inference_window()
    if any(r > divisor for r in roi) and request.image is not None:
        scan_fits_network(image, request.image, spacing, roi, divisor)


def segment(
    request: SegmentRequest,
    bundle: ModelBundle,
    *,
    model_uri: str,
    model_source: Mapping[str, Any] | None = None,
    recorded_parameters: Mapping[str, Any] | None = None,
    project_dir: Path | None = None,
    spacing: Sequence[float] | None = None,
    on_step: StepCallback | None = None,
) -> SegmentResult:
    """Run ``iris segment`` on one scan: read, embed, segment on the canonical grid, write on its grid."""
    step = on_step or (lambda _: None)
    request.check()
    if request.image is None or request.out is None:
        raise SegmentError("give the scan to segment and the label map to write (--image, --out)")
    require_writable_directory(request.out.parent, request.out)
    refuse_overwrites(
        request.out, protected_inputs([request.image], request.inputs(), request.class_name_files())
    )
    step("reading")
    preprocessing = preprocess_params(spacing, bundle, recorded_parameters, project_dir or Path.cwd())
    # A bad scan, or one whose canonical grid could not be allocated, fails before the references are read.
    image = read_scan(request.image, request.out, request.modality, request.require_air, request.channel)
    require_grid_fits(Geometry.from_image(image), preprocessing[0]["target_spacing"], str(request.image))
    early_scan_fit(request, bundle, image, preprocessing[0]["target_spacing"])
    prepared = prepare_task(request, bundle, preprocessing, on_step=step)
    try:
        return segment_scan(
            request, prepared, image, request.image, request.out, model_uri=model_uri,
            model_source=model_source, on_step=step,
        )  # fmt: skip
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise SegmentError(
            f"{out_of_memory_reason(request.image, error)}; free memory or use a machine with more "
            "(a GPU that ran out: --device cpu), or a coarser --spacing if the model allows it"
        ) from None


# ------------------------------------------------------------------------------------------------ batches

OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
BATCH_SUMMARY = "segmentations.csv"
# A DICOM series (no suffix) and detached-header formats come out as single files.
_OWN_OUTPUT_SUFFIX = {"": ".nii.gz", ".mhd": ".mha", ".nhdr": ".nrrd"}


def _not_a_series(path: Path, out: Path | None) -> tuple[int, str] | None:
    """Why the subdirectory ``path`` of ``--images`` is no scan (with the level to log it at), or None: it
    holds the output directory ``out`` (``--out scans/results/run2``: expected, INFO), an earlier run's
    output (its ``segmentations.csv``, or only folders with one somewhere below: INFO), or nothing at all (a
    series may be missing: WARNING). Any other folder is read as a DICOM series, and reported if it is not
    one."""
    if out is not None and path.resolve() in out.resolve().parents:
        return logging.INFO, f"it holds the output directory {out}"
    if (path / BATCH_SUMMARY).is_file():
        return logging.INFO, f"it holds {BATCH_SUMMARY}, so it is the output of an earlier iris segment run"
    try:
        entries = [entry for entry in path.iterdir() if entry.name[0] != "."]
    except OSError:  # unreadable: reported when read, as a scan that failed
        return None
    if not entries:
        return logging.WARNING, "it is empty"
    if not any(entry.is_file() for entry in entries):
        # Only folders, so no DICOM series (its subfolders are not read as part of one): an earlier run's
        # output below (scans/results/run1) is found by listing folders, without reading any file.
        earlier = next(path.rglob(BATCH_SUMMARY), None)
        if earlier is not None:
            return (
                logging.INFO,
                f"it holds only folders, among them {earlier.parent}, an earlier run's output",
            )
    return None


def earlier_output(path: Path) -> Path | None:
    """The sidecar that shows the file ``path`` in ``--images`` to be what iris segment wrote (its label map,
    the sidecar's ``output``, or that label map's probabilities), else None: segmented again, a label map
    would fail as a CT or, as --modality MR, be segmented as if it were a scan."""
    sidecar = segment_sidecar(sidecar_path(path))
    if sidecar is not None and isinstance(sidecar.get("output"), str):
        if Path(sidecar["output"]).name == path.name:  # the name: the folder may have moved since
            return sidecar_path(path)
    stem, suffix = _stem_and_suffix(path)
    if not stem.endswith(_PROBABILITIES):
        return None
    label = path.with_name(f"{stem.removesuffix(_PROBABILITIES)}{suffix}")
    sidecar = segment_sidecar(sidecar_path(label))
    probabilities = None if sidecar is None else sidecar.get("probabilities")
    if isinstance(probabilities, Mapping) and isinstance(probabilities.get("path"), str):
        if Path(probabilities["path"]).name == path.name:
            return sidecar_path(label)
    return None


def scans_in(directory: Path, exclude: Path | None = None) -> list[Path]:
    """The scans in ``directory``, sorted by name: every NIfTI, MetaImage and NRRD file, and every
    subdirectory as a DICOM series (one that is not is reported when read, like any bad scan).

    ``exclude`` (the output directory, when it lies inside) is left out: a re-run must not read it. So
    are the folders that hold it, an earlier run's output folder (one holding ``segmentations.csv``, or
    only folders with one below) and the files an earlier run wrote (:func:`earlier_output`), logged at
    INFO, and an empty folder (logged as a WARNING: a series may be missing).
    """
    if not directory.is_dir():
        raise InvalidInputError(str(directory), "missing_file", "--images must name an existing directory")
    skip = exclude.resolve() if exclude is not None else None
    found = []
    for path in sorted(directory.iterdir()):
        if path.name[0] == ".":
            continue
        if path.is_file() and file_suffix(path):
            sidecar = earlier_output(path)
            if sidecar is None:
                found.append(path)
            else:
                logger.info("--images: skipped %s: iris segment wrote it (see %s), not a scan", path, sidecar)
        elif path.is_dir() and path.resolve() != skip:
            skipped = _not_a_series(path, exclude)
            if skipped is None:
                found.append(path)
            else:
                logger.log(
                    skipped[0], "--images: skipped the folder %s: %s, not a DICOM series", path, skipped[1]
                )
    if not found:
        raise InvalidInputError(
            str(directory),
            "no_images",
            "holds no .nii.gz, .nii, .mha, .mhd, .nrrd or .nhdr file and no DICOM series directory",
        )
    return found


def output_name(image: Path, suffix: str | None = None) -> str:
    """``scan.nii.gz`` → ``scan<suffix>``; by default the scan's own format, as one file."""
    own = file_suffix(image)
    stem = image.name[: len(image.name) - len(own)] if own else image.name
    return stem + (suffix or _OWN_OUTPUT_SUFFIX.get(own, own))


def batch_outputs(
    images: Sequence[Path],
    out_dir: Path,
    suffix: str | None = None,
    *,
    inputs: Sequence[Path] = (),
    class_name_files: Sequence[Path] = (),
) -> list[tuple[Path, Path]]:
    """(scan, label map) pairs under ``out_dir``; refused before any work when a file written or replaced
    for one scan (label map, JSON sidecar, probabilities) would overwrite a scan, another input (``inputs``:
    references, class names, embeddings; ``class_name_files``: the JSON read beside reference labels) or a
    file written for another scan."""
    if suffix is not None and suffix not in OUTPUT_SUFFIXES:
        raise SegmentError(f"--out-suffix {suffix!r}: expected one of {list(OUTPUT_SUFFIXES)}")
    protected = protected_inputs(images, inputs, class_name_files)
    pairs: list[tuple[Path, Path]] = []
    writers: dict[Path, Path] = {}
    for image in images:
        out = out_dir / output_name(Path(image), suffix)
        refuse_overwrites(out, protected)
        for path in written_files(out):
            key = path.resolve()
            if key in writers:
                # Not --out-suffix: the sidecar <stem>.json is the same whatever the label map's format.
                raise SegmentError(
                    f"{writers[key]} and {image} would both write {path} (a scan's outputs are named after "
                    "its file name, without folder or suffix); rename one of them, or segment them in "
                    "separate runs with different --out folders"
                )
            writers[key] = Path(image)
        pairs.append((Path(image), out))
    return pairs


@dataclass
class BatchResult:
    """The scans segmented, the ones that failed (with the one-line reason), and the summary table."""

    results: list[SegmentResult]
    failures: list[tuple[Path, str]]
    summary_path: Path


def _summary_row(image: Path, out: Path, result: SegmentResult | None, reason: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"image": str(image), "output": str(out) if result else "", "status": "ok"}
    if result is None:
        row.update(status="failed", reason=reason)
        return row
    row["reason"] = ""
    classes = result.summary["classes"]
    uses = Counter(item["name"] for item in classes)
    for item in classes:  # a name given to two label values keeps both columns
        name = item["name"] if uses[item["name"]] == 1 else f"{item['name']} [{item['label']}]"
        row[f"{name} (ml)"] = round(item["volume_ml"], 3)
    return row


def _remove_outputs(out: Path) -> str:
    """Remove the outputs of a scan that failed, so no label map from an earlier run sits beside its "failed"
    row looking like a result; returns what to add to the reason ("" when there were none)."""
    removed, kept = [], []
    for path in written_files(out):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            kept.append(f"{path.name} ({error.strerror})")
            continue
        removed.append(path.name)
    notes = [f"removed {', '.join(removed)} left by an earlier run"] if removed else []
    notes += [f"could not remove {', '.join(kept)} left by an earlier run"] if kept else []
    return "".join(f"; {note}" for note in notes)


def segment_batch(
    request: SegmentRequest,
    images: Sequence[Path],
    out_dir: Path,
    bundle: ModelBundle,
    *,
    model_uri: str,
    model_source: Mapping[str, Any] | None = None,
    out_suffix: str | None = None,
    recorded_parameters: Mapping[str, Any] | None = None,
    project_dir: Path | None = None,
    spacing: Sequence[float] | None = None,
    on_scan: Callable[[Path], None] | None = None,
) -> BatchResult:
    """``iris segment`` on many scans with one task, encoded once (the point of in-context segmentation).

    A scan that cannot be segmented (unreadable, NaN voxels, a grid its format cannot store, …) is logged,
    listed with its reason in ``segmentations.csv`` in ``out_dir`` and skipped, its outputs from an earlier
    run removed; the others go on. Problems shared by all scans (references, model, options, output names)
    stop the batch before any scan.
    """
    request.check()
    require_writable_directory(out_dir, out_dir)
    pairs = batch_outputs(
        images, out_dir, out_suffix, inputs=request.inputs(), class_name_files=request.class_name_files()
    )
    preprocessing = preprocess_params(spacing, bundle, recorded_parameters, project_dir or Path.cwd())
    prepared = prepare_task(request, bundle, preprocessing)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[SegmentResult] = []
    failures: list[tuple[Path, str]] = []
    rows: list[dict[str, Any]] = []
    summary_path = out_dir / BATCH_SUMMARY
    stopped: BaseException | None = None
    try:
        for image_path, out in pairs:
            if on_scan is not None:
                on_scan(image_path)
            try:
                image = read_scan(image_path, out, request.modality, request.require_air, request.channel)
                result = segment_scan(
                    request, prepared, image, image_path, out, model_uri=model_uri, model_source=model_source
                )
            # InvalidInputError and SegmentError are ValueErrors too, as is a scan too small to segment.
            except (OSError, ValueError) as error:
                reason = " ".join(str(error).split()) + _remove_outputs(out)
            # One scan too large for this machine's memory (or the GPU's) must not lose the scans after it.
            except (MemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                reason = out_of_memory_reason(image_path, error) + _remove_outputs(out)
            else:
                results.append(result)
                rows.append(_summary_row(image_path, out, result))
                continue
            logger.warning("skipped %s", reason)
            failures.append((image_path, reason))
            rows.append(_summary_row(image_path, out, None, reason))
    except BaseException as error:
        stopped = error
        raise
    finally:  # an unexpected error (or Ctrl-C) still leaves the table, listing the scans it did not reach
        unreached = pairs[len(rows) :]
        if unreached and isinstance(stopped, Exception):  # the scan in progress raised: it failed
            image_path, out = unreached.pop(0)
            reason = f"{type(stopped).__name__}: {' '.join(str(stopped).split())[:300]}" + _remove_outputs(
                out
            )
            rows.append(_summary_row(image_path, out, None, reason))
        rows += [
            {"image": str(image), "output": "", "status": "not run", "reason": "interrupted"}
            for image, _ in unreached
        ]
        write_text_atomic(summary_path, pd.DataFrame(rows).to_csv(index=False))
    return BatchResult(results, failures, summary_path)
