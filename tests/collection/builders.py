"""Tiny on-disk datasets (8×9×10 volumes) in each supported layout, for the collection tests."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_pipelines.imaging.io import write_dicom_series

SIZE = (8, 9, 10)  # x, y, z
SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-10.0, 20.0, 5.0)


def image_volume(size: Sequence[int] = SIZE, *, seed: int = 0) -> sitk.Image:
    """A float32 scan with anisotropic spacing and a non-zero origin, so geometry errors show."""
    values = np.random.default_rng(seed).normal(100.0, 20.0, size=tuple(reversed(size))).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    return image


def label_volume(size: Sequence[int] = SIZE, *, values: Sequence[int] = (1, 2)) -> sitk.Image:
    """A uint8 label on the same grid as :func:`image_volume`, one small block per value."""
    array = np.zeros(tuple(reversed(size)), dtype=np.uint8)
    for offset, value in enumerate(values):
        array[1 + 2 * offset : 3 + 2 * offset, 2:5, 2:5] = value
    label = sitk.GetImageFromArray(array)
    label.SetSpacing(SPACING)
    label.SetOrigin(ORIGIN)
    return label


def multi_modal_volume(modalities: int, size: Sequence[int] = SIZE, *, seed: int = 0) -> sitk.Image:
    """A 4-D (x, y, z, modality) image as multi-modal MSD tasks store one, whose first volume is
    ``image_volume(seed=seed)``."""
    return sitk.JoinSeries([image_volume(size, seed=seed + 1000 * channel) for channel in range(modalities)])


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def write_msd(
    root: Path,
    case_ids: Sequence[str],
    *,
    labels: Mapping[str, str] | None = None,
    modality: str = "CT",
    modalities: Sequence[str] = (),
) -> Path:
    """An MSD task folder: imagesTr/labelsTr NIfTI plus dataset.json listing them (``./`` paths).

    Several ``modalities`` make every image a 4-D :func:`multi_modal_volume`, as in Task01 BrainTumour.
    """
    training = []
    for index, case_id in enumerate(case_ids):
        image = multi_modal_volume(len(modalities), seed=index) if modalities else image_volume(seed=index)
        write(image, root / "imagesTr" / f"{case_id}.nii.gz")
        write(label_volume(), root / "labelsTr" / f"{case_id}.nii.gz")
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    meta = {
        "name": root.name,
        "modality": {str(channel): name for channel, name in enumerate(modalities or [modality])},
        "labels": dict(labels or {"0": "background", "1": "liver", "2": "tumour"}),
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


NNUNET_SEEDS = 500


def write_nnunet(
    root: Path,
    case_ids: Sequence[str],
    *,
    file_ending: str = ".mha",
    channel_names: Mapping[str, str] | None = None,
    labels: Mapping[str, object] | None = None,
) -> Path:
    """An nnU-Net v2 raw dataset folder (``Dataset###_Name``) with ``<case>_0000<file_ending>`` images."""
    channels = dict(channel_names or {"0": "T2"})
    for index, case_id in enumerate(case_ids):
        for channel in channels:
            # Seeds apart from write_msd's: ingest refuses one scan in two datasets, whatever the format.
            scan = image_volume(seed=NNUNET_SEEDS + index)
            write(scan, root / "imagesTr" / f"{case_id}_{int(channel):04d}{file_ending}")
        write(label_volume(), root / "labelsTr" / f"{case_id}{file_ending}")
    meta = {
        "channel_names": channels,
        "labels": dict(labels or {"background": 0, "prostate": 1, "zone": 2}),
        "numTraining": len(case_ids),
        "file_ending": file_ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def write_csv(root: Path, rows: Sequence[Mapping[str, str]], *, labels: Mapping[str, str] | None) -> Path:
    """A CSV manifest in ``root``; ``labels`` (if given) becomes labels.json next to it."""
    root.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if labels is not None:
        (root / "labels.json").write_text(json.dumps(dict(labels)))
    return root / "manifest.csv"


def write_dicom_case(root: Path, case_id: str) -> tuple[Path, Path]:
    """A DICOM series directory image and a NIfTI label on its grid, as a CSV manifest would list them."""
    image_dir = root / "images" / case_id
    write_dicom_series(image_volume(), image_dir)
    label = write(label_volume(), root / "labels" / f"{case_id}.nii.gz")
    return image_dir, label
