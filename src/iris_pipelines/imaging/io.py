"""Reading and writing 3-D volumes with clear errors and atomic writes.

Every reader failure becomes an :class:`InvalidInputError` naming the file and the problem, so ingest can
record a reject instead of surfacing an ITK traceback.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import locale
import logging
import os
import re
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from iris_pipelines.imaging.errors import InvalidInputError

logger = logging.getLogger(__name__)

_SUFFIX_FORMATS: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".mha": "mha",
    ".mhd": "mha",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
}
_FORMAT_NAMES = {"nifti": "NIfTI", "mha": "MetaImage", "nrrd": "NRRD", "dicom": "DICOM"}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_UID_ROOT = "1.2.826.0.1.3680043.8.498"  # pydicom's registered root, for generated example UIDs
_MAX_REASON_CHARS = 300


def file_suffix(path: str | os.PathLike[str]) -> str:
    name = Path(path).name.lower()
    for suffix in _SUFFIX_FORMATS:
        if name.endswith(suffix):
            return suffix
    return ""


def detect_format(path: str | os.PathLike[str]) -> str:
    """Return ``nifti``, ``mha``, ``nrrd`` or ``dicom`` (any directory: its series is checked on read)."""
    suffix = file_suffix(path)
    if suffix:
        return _SUFFIX_FORMATS[suffix]
    if Path(path).is_dir():
        return "dicom"
    raise InvalidInputError(
        str(path),
        "unsupported_format",
        "unsupported image format; use NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd), "
        "NRRD (.nrrd, .nhdr) or a directory holding a DICOM series",
    )


_ERROR_MARKER = re.compile(r"(?:Description|ERROR):")
_ITK_OBJECT = re.compile(r"\b\w+\(0x[0-9a-fA-F]+\):\s*")


def _condense(message: str) -> str:
    """Reduce a multi-line ITK exception to the sentences that say what went wrong."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if _ERROR_MARKER.search(line)), None)
    if start is None:
        text = lines[-1] if lines else "unknown reader error"
    else:
        text = " ".join([_ERROR_MARKER.split(lines[start], maxsplit=1)[1], *lines[start + 1 :]])
    text = re.sub(r"\s+", " ", _ITK_OBJECT.sub("", text)).strip()
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 1] + "…"


def _gzip_payload_bytes(path: Path) -> int:
    """Decompressed length of a gzip file, failing on a truncated or corrupt stream.

    ITK's NIfTI reader zero-fills a truncated ``.nii.gz`` without any error (checked with SimpleITK 2.5),
    so the stream is verified here; decompressing once more costs well under a second per CT volume.
    """
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise InvalidInputError(
            str(path),
            "unreadable",
            f"the gzip stream is truncated or corrupt ({_condense(str(exc))}); "
            "re-export or re-download the file",
        ) from None
    return total


def _check_nifti(path: Path, payload_bytes: int) -> None:
    """Fail on what ITK's NIfTI reader hides: missing voxel bytes (zero-filled) and NaN/Inf (set to 0)."""
    try:
        proxy = nibabel.load(path).dataobj
    except (ImageFileError, HeaderDataError, ValueError, OSError, EOFError):
        return  # not parseable as NIfTI here; ITK's reader reports the problem next
    expected = proxy.offset + int(np.prod(proxy.shape)) * proxy.dtype.itemsize
    if payload_bytes < expected:
        raise InvalidInputError(
            str(path),
            "unreadable",
            f"the file is truncated: it holds {payload_bytes} of the {expected} bytes its header declares; "
            "re-export or re-download it",
        )
    if proxy.dtype.kind == "f":
        # ITK's NIfTI reader silently turns NaN and Inf into 0, so they must be counted in the file itself.
        stored = np.asanyarray(proxy.get_unscaled())
        non_finite = int(stored.size - np.count_nonzero(np.isfinite(stored)))
        if non_finite:
            raise InvalidInputError(
                str(path),
                "non_finite",
                f"{non_finite} of {stored.size} voxels are NaN or infinite (a NIfTI reader would silently "
                "turn them into 0); fix or mask them before ingesting",
            )


def _pick_dicom_series(directory: Path) -> list[str]:
    # GDCM prints "No Series were found" to stderr; the error raised below says it better.
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))
    except RuntimeError as exc:
        raise InvalidInputError(
            str(directory), "unreadable", f"could not scan the directory for DICOM: {_condense(str(exc))}"
        ) from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    if not series_ids:
        raise InvalidInputError(
            str(directory),
            "unreadable",
            "the directory holds no DICOM series; point to a directory of DICOM slice files "
            "or to a NIfTI/MHA/NRRD file",
        )
    series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: len(series[sid]))
    if len(series_ids) > 1:
        logger.warning(
            "%s holds %d DICOM series; reading the largest (%s, %d slices)",
            directory,
            len(series_ids),
            chosen,
            len(series[chosen]),
        )
    return list(series[chosen])


def read_image(
    path: str | os.PathLike[str], *, pixel_type: int | None = None, verify: bool = True
) -> sitk.Image:
    """Read a volume (file or DICOM series directory), raising :class:`InvalidInputError` on any failure.

    ``pixel_type`` is a SimpleITK pixel id (e.g. ``sitk.sitkFloat32``) to cast to while reading.
    ``verify=False`` skips the integrity checks ITK does not do itself (complete gzip stream, voxel bytes
    and NaN in NIfTI), which cost a second decompression; only for files already verified, like the
    ingested cases that preprocessing reads.
    """
    source = Path(path)
    if not source.exists():
        raise InvalidInputError(str(path), "missing_file", "the file does not exist; check the path")
    image_format = detect_format(source)
    output_type = sitk.sitkUnknown if pixel_type is None else pixel_type
    if image_format == "dicom":
        files = _pick_dicom_series(source)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
    else:
        if not source.is_file():
            raise InvalidInputError(str(path), "unreadable", "the path is not a regular file")
        if source.stat().st_size == 0:
            raise InvalidInputError(str(path), "unreadable", "the file is empty (0 bytes); re-export it")
        if verify:
            with source.open("rb") as handle:
                gzipped = handle.read(2) == _GZIP_MAGIC
            payload_bytes = _gzip_payload_bytes(source) if gzipped else source.stat().st_size
            if image_format == "nifti":
                _check_nifti(source, payload_bytes)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(source))
    reader.SetOutputPixelType(output_type)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InvalidInputError(
            str(path),
            "unreadable",
            f"the {_FORMAT_NAMES[image_format]} reader failed ({_condense(str(exc))}); "
            f"the file may be truncated, corrupt or not a valid {_FORMAT_NAMES[image_format]} file",
        ) from None


def write_image(image: sitk.Image, path: str | os.PathLike[str], *, compress: bool = True) -> None:
    """Write ``image`` so that ``path`` is either the old file or the complete new one, never partial.

    The image is written into a hidden scratch directory beside ``path`` (same filesystem, same file
    name, so detached ``.mhd``/``.nhdr`` headers reference the right data file) and then moved into
    place with ``os.replace``, data files first and the named file last.
    """
    target = Path(path)
    image_format = detect_format(target)
    if image_format == "dicom":
        raise InvalidInputError(
            str(path), "unsupported_format", "write_image writes files; use write_dicom_series for DICOM"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        try:
            sitk.WriteImage(image, str(scratch / target.name), useCompression=compress)
        except RuntimeError as exc:
            raise OSError(f"{path}: could not write the image: {_condense(str(exc))}") from None
        written = sorted(scratch.iterdir(), key=lambda item: item.name == target.name)
        for item in written:
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _decimal_string(value: float) -> str:
    """Format for a DICOM DS element, which allows at most 16 characters."""
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} cannot be written as a DICOM decimal string")


def _new_uid() -> str:
    return f"{_UID_ROOT}.{uuid.uuid4().int % 10**30}"


def _to_int16(image: sitk.Image) -> sitk.Image:
    values = sitk.GetArrayViewFromImage(image)
    info = np.iinfo(np.int16)
    clipped = np.clip(np.rint(values.astype(np.float64)), info.min, info.max).astype(np.int16)
    result = sitk.GetImageFromArray(clipped)
    result.CopyInformation(image)
    return result


@contextlib.contextmanager
def _process_locale_kept() -> Iterator[None]:
    """Restore the C library's locale after GDCM changed it.

    GDCM's DICOM writer leaves the process in the "C" locale once a slice carries metadata, so every
    text file opened later without an explicit encoding becomes ASCII: a whole ``kedro run`` that wrote
    the phantom DICOM series then failed at its last node, saving the Markdown report (U+2212).
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@_process_locale_kept()
def write_dicom_series(image: sitk.Image, directory: str | os.PathLike[str]) -> None:
    """Write a 3-D scalar volume as a CT series (int16, one file per slice) that reads back to the same grid.

    DICOM stacks slices along row × column, so only right-handed directions (det > 0) can be stored
    without reordering the index axes; others are refused rather than silently changed.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("write_dicom_series needs a 3-D scalar image")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if np.linalg.det(direction) <= 0:
        raise ValueError(
            "DICOM can only store a right-handed direction (det > 0); flip the z axis first (sitk.Flip)"
        )
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target}: exists and is not an empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    volume = _to_int16(image)
    spacing = image.GetSpacing()
    orientation = "\\".join(_decimal_string(v) for v in (*direction[:, 0], *direction[:, 1]))
    series_tags = {
        "0008|0016": _CT_IMAGE_STORAGE,
        "0008|0060": "CT",
        "0008|0008": "DERIVED\\SECONDARY\\AXIAL",
        "0010|0010": "Phantom^Iris",
        "0010|0020": "IRIS0001",
        "0020|000d": _new_uid(),
        "0020|000e": _new_uid(),
        "0020|0011": "1",
        "0020|0037": orientation,
        "0028|0030": f"{_decimal_string(spacing[1])}\\{_decimal_string(spacing[0])}",
        "0018|0050": _decimal_string(spacing[2]),
        "0028|1050": "40",
        "0028|1051": "400",
        "0028|1052": "0",
        "0028|1053": "1",
    }
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()  # otherwise GDCM replaces the series UIDs set above
        for k in range(volume.GetDepth()):
            position = volume.TransformIndexToPhysicalPoint((0, 0, k))
            slice_image = volume[:, :, k]
            for tag, value in series_tags.items():
                slice_image.SetMetaData(tag, value)
            slice_image.SetMetaData("0008|0018", _new_uid())
            slice_image.SetMetaData("0020|0013", str(k + 1))
            slice_image.SetMetaData("0020|0032", "\\".join(_decimal_string(v) for v in position))
            slice_image.SetMetaData("0020|1041", _decimal_string(float(np.dot(position, direction[:, 2]))))
            writer.SetFileName(str(scratch / f"slice_{k:04d}.dcm"))
            writer.Execute(slice_image)
        if target.exists():
            target.rmdir()
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text`` in one step (scratch file beside it, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Content checksum of a file, or of a directory's files (relative names and contents, sorted)."""
    source = Path(path)
    digest = hashlib.sha256()
    if source.is_dir():
        files = sorted(
            (p for p in source.rglob("*") if p.is_file()), key=lambda p: p.relative_to(source).as_posix()
        )
        for item in files:
            name = item.relative_to(source).as_posix().encode()
            digest.update(len(name).to_bytes(8, "little") + name)
            digest.update(item.stat().st_size.to_bytes(8, "little"))
            _update_from_file(digest, item)
        return digest.hexdigest()
    if not source.is_file():
        raise InvalidInputError(str(path), "missing_file", "the file does not exist; check the path")
    _update_from_file(digest, source)
    return digest.hexdigest()


def _update_from_file(digest: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
