"""Reading and writing 3-D volumes with clear errors and atomic writes.

Every reader failure becomes an :class:`InvalidInputError` naming the file and the problem, so ingest can
record a reject instead of surfacing an ITK traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import itertools
import locale
import logging
import os
import re
import shutil
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import nibabel
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.stats import non_whole_values

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
# ITK picks a file's reader by its lower-case suffix alone ("scan.NII.GZ" finds none): named here instead.
_IMAGE_IOS = {"nifti": "NiftiImageIO", "mha": "MetaImageIO", "nrrd": "NrrdImageIO"}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_UID_ROOT = "1.2.826.0.1.3680043.8.498"  # pydicom's registered root, for generated example UIDs
_SEEDED_SERIES_TIME = datetime.datetime(2000, 1, 1)
_MAX_REASON_CHARS = 300
_HEADER_LIMIT = 1 << 20  # a header is a few hundred bytes; a LIST of one file per slice can be far longer
_METAIMAGE_LOCAL = ("LOCAL", "Local", "local")  # the spellings MetaIO accepts for voxels after the header
# Bytes per value of each MetaIO element type (MET_ValueTypeSize in MetaIO's metaTypes.h).
_METAIMAGE_TYPE_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
_FLOAT_PIXEL_IDS = frozenset(
    (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)
)
_SLICE_STEP_MM = 0.01  # absolute tolerance on DICOM slice steps; the relative one is 1 % of the step
_ORTHONORMAL_ATOL = 1e-4  # DᵀD against I: float32 NIfTI headers and 6-digit DICOM cosines stay well inside
# How far a NIfTI qform may stray from its sform and still count as one placement: ITK's quaternion of an
# oblique direction differs from the float32 sform by up to ~1e-5 per mm of voxel size, while 1e-3 mm and
# 1e-4 per mm (a 0.006° turn) stay far below a voxel.
_FORMS_ATOL_MM = 1e-3
_FORMS_ATOL_MATRIX = 1e-4


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
        written = Path(path).name[-len(suffix) :]
        if _SUFFIX_FORMATS[suffix] == "nifti" and written not in (suffix, suffix.upper()):
            raise InvalidInputError(
                str(path),
                "unsupported_format",
                f"the NIfTI library takes {suffix} in lower or upper case only, not {written!r}; "
                "rename the file",
            )
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


def non_finite_label_error(
    path: str | os.PathLike[str], non_finite: int, nans: int, total: int
) -> InvalidInputError:
    """The one wording of NaN/Inf values in a label map, whichever check finds them."""
    return InvalidInputError(
        str(path),
        "non_finite_label",
        f"the label holds {non_finite} NaN/infinite values ({nans} NaN, {non_finite - nans} infinite) out of "
        f"{total}; a label map must hold whole class numbers: re-export it",
    )


def _itk_reads_header(path: Path) -> bool:
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_IMAGE_IOS["nifti"])
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return True


def _refuse_invalid_header(path: Path, problem: Exception) -> NoReturn:
    reason = _condense(str(problem)) or type(problem).__name__
    raise InvalidInputError(
        str(path),
        "unreadable",
        f"the NIfTI header is invalid: nibabel refuses it ({reason}), while ITK reads it its own way without "
        "a word (a NaN scl_inter, for one, turns every NaN voxel into 0 and hides it from the NaN check), so "
        "tools would disagree on its voxels or placement; fix the header (e.g. scl_slope 1 and scl_inter 0 "
        "when the voxels are stored unscaled) or re-export the file",
    ) from None


def _nibabel_image(path: Path) -> nibabel.Nifti1Image | None:
    """The file as nibabel loads it (header only, voxels on demand), or None when it cannot be read.

    A header nibabel refuses but ITK reads is refused: ITK's NIfTI reader accepts what nibabel calls
    invalid (e.g. a NaN scl_inter, which it applies to every voxel, turning NaN voxels into 0) and the checks
    below, which read the file with nibabel, would be skipped. When ITK cannot read the header either, its
    reader reports the problem; an I/O failure (a truncated gzip stream, a denied read) is left to the
    gzip check and the reader as well.
    """
    try:
        return nibabel.load(path)
    except (OSError, EOFError, zlib.error):
        return None
    except (ImageFileError, HeaderDataError, ValueError) as exc:
        if _itk_reads_header(path):
            _refuse_invalid_header(path, exc)
        return None


def _check_nifti(path: Path, loaded: nibabel.Nifti1Image, payload_bytes: int, *, is_label: bool) -> None:
    """Fail on what ITK's NIfTI reader hides: missing voxel bytes (zero-filled) and NaN/Inf (set to 0)."""
    proxy = loaded.dataobj
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
        if non_finite and is_label:
            raise non_finite_label_error(
                path, non_finite, int(np.count_nonzero(np.isnan(stored))), stored.size
            )
        if non_finite:
            raise InvalidInputError(
                str(path),
                "non_finite",
                f"{non_finite} of {stored.size} voxels are NaN or infinite (a NIfTI reader would silently "
                "turn them into 0); fix or mask them before ingesting",
            )


def _stored_pixdim(loaded: nibabel.Nifti1Image) -> np.ndarray:
    """The header's pixdim as the file stores it: nibabel's load corrects it (a negative voxel size to its
    absolute value, a qfac other than 1 or -1 to 1) where ITK's reader mirrors the axis instead."""
    with loaded.file_map["image"].get_prepare_fileobj("rb") as handle:
        stored = type(loaded.header).from_fileobj(handle, check=False)
    return np.asarray(stored["pixdim"], dtype=np.float64)


def _sizes(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _corner_offset(shape: Sequence[int], matrix: np.ndarray) -> float:
    """How far apart two placements whose 3x3 parts differ by ``matrix`` put a corner voxel of ``shape``."""
    size = (tuple(shape[:3]) + (1, 1, 1))[:3]
    corners = np.array(list(itertools.product(*((0, n - 1) for n in size))), dtype=np.float64)
    return float(np.linalg.norm(corners @ matrix.T, axis=1).max())


def _require_unmirrored_pixdim(
    path: Path, pixdim: np.ndarray, axes: int, qform_code: int, sform_code: int
) -> None:
    """Refuse a pixdim that ITK reads mirrored and nibabel does not: a negative voxel size (ITK mirrors
    that axis whichever form places the voxels, nibabel takes its absolute value), or, when the qform alone
    places them, a negative qfac other than -1 (ITK mirrors the slice axis, nibabel takes 1)."""
    negative = [axis for axis in range(axes) if pixdim[1 + axis] < 0]
    if negative:
        raise InvalidInputError(
            str(path),
            "pixdim_mismatch",
            f"the header's voxel sizes (pixdim) {_sizes(pixdim[1 : 1 + axes])} are negative in "
            f"{', '.join(f'pixdim[{1 + axis}]' for axis in negative)}: ITK reads such an axis mirrored "
            "while nibabel (and the tools that follow it) takes the absolute value, so they place the "
            "voxels in mirror image and a mask made from it would lie off the scan in some tools; find out "
            "which orientation is right and store it with positive voxel sizes (loading the file with "
            "nibabel and saving it again stores nibabel's reading)",
        )
    qfac = float(pixdim[0])
    if qform_code > 0 and sform_code == 0 and qfac < 0 and qfac != -1:
        raise InvalidInputError(
            str(path),
            "pixdim_mismatch",
            f"the qform's handedness (qfac, pixdim[0]) is {qfac:g} rather than 1 or -1, and the qform alone "
            "places the voxels (sform code 0): ITK reads it as -1, mirroring the slice axis, while nibabel "
            "reads it as 1, so a mask made from it would lie off the scan in some tools; set it to 1 or -1, "
            "whichever is right (loading the file with nibabel and saving it again stores 1)",
        )


def _require_sform_read_alike(
    path: Path, shape: Sequence[int], sform: np.ndarray, sform_code: int, pixdim: np.ndarray, axes: int
) -> None:
    """Refuse an sform that ITK reads differently from nibabel and FSL when there is no qform.

    ITK takes only the direction from the sform: the voxel spacing comes from pixdim (0 read as 1), so
    voxel sizes that disagree with the sform's (ITK warns "unexpected scales in sform") move every voxel
    off where nibabel, FSL and viewers put it. A sheared sform ITK cannot read at all.
    """
    columns = sform[:3, :3]
    if not np.all(np.isfinite(sform)):
        return  # a NaN or infinite sform: ITK's reader or the geometry check reports it
    sizes = np.linalg.norm(columns, axis=0)
    flat = [axis for axis in range(3) if sizes[axis] == 0]
    if flat:  # first: a zero column has no direction, which the check below would report as a shear
        raise InvalidInputError(
            str(path),
            "bad_geometry",
            f"the sform (code {sform_code}), which alone places the voxels (qform code 0), gives voxel "
            f"{'axes' if len(flat) > 1 else 'axis'} {', '.join('ijk'[axis] for axis in flat)} a size of 0 mm "
            "(an all-zero column), so every voxel along it would lie at one place; fix the header's "
            "placement: set the sform to the scan's affine (e.g. in nibabel img.set_sform(affine, code=1), "
            "with the scanner's voxel sizes), or re-export the scan from its source",
        )
    direction = columns / np.maximum(sizes, np.finfo(float).tiny)
    if not np.allclose(direction @ direction.T, np.eye(3), rtol=0.0, atol=_ORTHONORMAL_ATOL):
        raise InvalidInputError(
            str(path),
            "non_orthogonal_direction",
            f"the sform (code {sform_code}), which alone places the voxels (qform code 0), is sheared (its "
            "axes are not perpendicular, e.g. a gantry-tilted CT): ITK cannot read a sheared placement from "
            "a NIfTI file, while nibabel and FSL use it as it is; resample the scan onto a grid with "
            "perpendicular axes, or store it as .nrrd or .mha, which keep a sheared direction",
        )
    stored = pixdim[1 : 1 + axes]
    itk_sizes = sizes.copy()
    itk_sizes[:axes] = np.where(np.isfinite(stored) & (stored != 0), np.abs(stored), 1.0)
    # Per mm of voxel size, as the qform and sform are compared.
    if (np.abs(itk_sizes - sizes) / np.maximum(sizes, np.finfo(float).tiny)).max() <= _FORMS_ATOL_MATRIX:
        return
    offset = _corner_offset(shape, direction * (itk_sizes - sizes))
    raise InvalidInputError(
        str(path),
        "pixdim_mismatch",
        f"the sform (code {sform_code}), which alone places the voxels (qform code 0), has voxel sizes "
        f"{_sizes(sizes[:axes])} but the header's pixdim says {_sizes(stored)}: ITK takes the spacing from "
        "pixdim and only the direction from the sform, while nibabel, FSL and viewers use the sform as it "
        f"is, so they place the voxels up to {offset:.4g} mm apart and a mask made from it would lie off "
        "the scan in some tools; if the sform is right, make pixdim agree with it (e.g. in nibabel "
        f"img.header.set_zooms({_sizes(sizes[:axes])}) and save) or store it as the qform too "
        "(img.set_qform(img.get_sform(), code=1), which sets pixdim as well), else fix the sform",
    )


def _require_one_placement(path: Path, loaded: nibabel.Nifti1Image) -> None:
    """Refuse a NIfTI whose qform and sform are both in use but place the voxels differently, that has
    neither, or whose header ITK reads differently from nibabel in another way.

    Tools disagree on which form wins: ITK takes the qform when the sform code is 2 or 4, nibabel, FSL and
    most viewers take the sform. With neither (both codes 0, an Analyze-era conversion) each tool invents a
    placement from the voxel sizes, and ITK's is mirrored and shifted against nibabel's and FSL's. With the
    sform alone, ITK takes the voxel sizes from pixdim instead of the sform, and fails on a sheared one; a
    negative voxel size (or, with the qform alone, a negative qfac other than -1) ITK reads mirrored and
    nibabel does not. Whichever is read here, a mask written from the scan carries it in both forms, so in
    the other tools the mask lies off its scan. Reads the header only.
    """
    header = loaded.header
    try:
        qform, qform_code = header.get_qform(coded=True)
        sform, sform_code = header.get_sform(coded=True)
    except (HeaderDataError, ValueError) as exc:  # e.g. a quaternion of more than unit length
        _refuse_invalid_header(path, exc)
    if qform_code == 0 and sform_code == 0:
        raise InvalidInputError(
            str(path),
            "no_placement",
            "neither the qform nor the sform is set (both codes 0), so the file does not say where its "
            "voxels lie: ITK and nibabel/FSL each assume a different orientation and origin, and a mask made "
            "from it would lie off the scan in some tools; set the right placement, e.g. in nibabel "
            "img.set_sform(affine, code=1) (with the affine of the scanner, or of the image this one was "
            "converted from), or `fslorient -setsformcode 1` once the sform holds it",
        )
    shape = tuple(header.get_data_shape())
    axes = min(len(shape), 3)
    pixdim = _stored_pixdim(loaded)
    _require_unmirrored_pixdim(path, pixdim, axes, qform_code, sform_code)
    if qform_code == 0:
        _require_sform_read_alike(path, shape, sform, sform_code, pixdim, axes)
        return
    if sform_code == 0:
        return
    translation = np.abs(qform[:3, 3] - sform[:3, 3]).max()
    # Per mm of voxel size, as direction cosines are compared: thick slices scale the round-off too.
    voxel_mm = np.maximum(np.linalg.norm(sform[:3, :3], axis=0), np.finfo(float).tiny)
    matrix = (np.abs(qform[:3, :3] - sform[:3, :3]) / voxel_mm).max()
    if translation <= _FORMS_ATOL_MM and matrix <= _FORMS_ATOL_MATRIX:
        return
    size = (tuple(header.get_data_shape()[:3]) + (1, 1, 1))[:3]
    corners = np.array([[*ijk, 1.0] for ijk in itertools.product(*((0, n - 1) for n in size))])
    offset = float(np.linalg.norm(corners @ (qform - sform).T, axis=1).max())
    raise InvalidInputError(
        str(path),
        "qform_sform_mismatch",
        f"the qform (code {qform_code}) and the sform (code {sform_code}) place the voxels up to "
        f"{offset:.4g} mm apart, and tools disagree on which to use (ITK reads the qform when the sform code "
        "is 2 or 4, nibabel and FSL the sform), so a mask made from it would lie off the scan in some of "
        "them; find out which is right and make the other agree or set its code to 0 (e.g. "
        "`fslorient -copysform2qform`, or in nibabel img.set_qform(img.get_sform()) when the sform is right, "
        "img.set_sform(img.get_qform()) when the qform is)",
    )


@dataclass(frozen=True)
class _Header:
    """What a MetaImage or NRRD header says about where its voxels are."""

    fields: dict[str, str]
    field: str  # the field naming the voxel files, for messages
    data_start: int  # byte offset right after the header, where embedded voxels start
    # (name as written, path) of each detached voxel file, in order; () when the voxels are embedded
    data_files: tuple[tuple[str, Path], ...]


def _resolve_data_file(header: Path, name: str) -> Path:
    # MetaIO and teem both take a relative name from the header's directory.
    return Path(name) if os.path.isabs(name) else header.parent / name


def _pattern_names(path: Path, field: str, value: str, pattern: str, numbers: Sequence[str]) -> list[str]:
    """Expand ``<printf pattern> <first> <last> <step>`` (the last number included) into file names."""
    try:
        first, last, step = (int(v) for v in numbers)
        return [pattern % index for index in range(first, last + (1 if step > 0 else -1), step)]
    except (TypeError, ValueError):
        raise InvalidInputError(
            str(path),
            "unsupported_format",
            f"{field} {value!r} is not a file-name pattern with integer first, last and step numbers "
            "(e.g. 'slice_%03d.raw 1 40 1'); list the files with LIST instead",
        ) from None


def _metaimage_header(path: Path, head: bytes) -> _Header | None:
    fields: dict[str, str] = {}
    offset = 0
    for line in head.splitlines(keepends=True):
        offset += len(line)
        key, sep, value = line.decode("utf-8", "surrogateescape").partition("=")
        if sep:
            fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    else:
        return None  # no complete header: the reader reports what is wrong
    value = fields["ElementDataFile"]
    if value in _METAIMAGE_LOCAL:
        names: list[str] = []
    elif value.startswith("LIST"):
        names = [n.strip() for n in _text_after(path, offset).splitlines() if n.strip()]
    elif "%" in value:
        words = value.split()
        names = _pattern_names(path, "ElementDataFile", value, " ".join(words[:-3]), words[-3:])
    else:
        plain = _resolve_data_file(path, value)
        # MetaIO falls back to a gzip- or compress-ed copy of the named file.
        found = next((c for c in (plain, Path(f"{plain}.gz"), Path(f"{plain}.Z")) if c.is_file()), plain)
        return _Header(fields, "ElementDataFile", offset, ((value, found),))
    return _Header(fields, "ElementDataFile", offset, tuple((n, _resolve_data_file(path, n)) for n in names))


def _nrrd_header(path: Path, head: bytes) -> _Header | None:
    lines = head.splitlines(keepends=True)
    if not lines or not lines[0].startswith(b"NRRD"):
        return None
    fields: dict[str, str] = {}
    offset = len(lines[0])
    for line in lines[1:]:
        offset += len(line)
        text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
        if not text:
            break  # the blank line that ends the header
        key, sep, value = text.partition(": ")  # fields; "key:=value" pairs are free text, never files
        if not sep or text.startswith("#"):
            continue
        key, value = key.strip(), value.strip()
        fields[key] = value
        if key in ("data file", "datafile"):
            words = value.split()
            if words and words[0] == "LIST":
                names = [n.strip() for n in _text_after(path, offset).splitlines() if n.strip()]
            elif len(words) >= 4 and "%" in words[0]:
                names = _pattern_names(path, f"'{key}:'", value, words[0], words[1:4])
            else:
                names = [value]
            files = tuple((n, _resolve_data_file(path, n)) for n in names)
            return _Header(fields, f"'{key}:'", offset, files)
    return _Header(fields, "'data file:'", offset, ())


def _text_after(path: Path, offset: int) -> str:
    """The rest of a header file after ``offset``: a LIST of data files runs to the end of the header."""
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode("utf-8", "surrogateescape")


def _read_header(path: Path, image_format: str) -> _Header | None:
    """The header of a MetaImage or NRRD file, or None when it is some other format or not parseable."""
    if image_format not in ("mha", "nrrd"):
        return None
    with path.open("rb") as handle:
        head = handle.read(_HEADER_LIMIT)
    return _metaimage_header(path, head) if image_format == "mha" else _nrrd_header(path, head)


def detached_data_files(path: str | os.PathLike[str]) -> list[str]:
    """The voxel files a MetaImage or NRRD header names, as written (relative to its folder unless absolute),
    in order; [] when the voxels are in the file itself. What to copy along with a detached header."""
    source = Path(path)
    header = _read_header(source, detect_format(source))
    return [] if header is None else [name for name, _ in header.data_files]


def _require_data_files(path: Path, header: _Header) -> None:
    """Name a detached voxel file that is missing; ITK would report a stale errno for the header instead."""
    missing = [(name, item) for name, item in header.data_files if not item.is_file()]
    if missing:
        name, item = missing[0]
        more = (
            f" (and {len(missing) - 1} more of its {len(header.data_files)} data files)"
            if len(missing) > 1
            else ""
        )
        raise InvalidInputError(
            str(path),
            "missing_file",
            f"the data file {name} that the header's {header.field} names does not exist ({item}){more}; "
            "copy it next to the header or correct the header",
        )


def _check_metaimage_size(path: Path, header: _Header) -> None:
    """Fail on a MetaImage whose voxel bytes are fewer than its header declares.

    ITK reports such a file with the stale errno of an earlier call ("No such file or directory"), so the
    byte count is compared here, as for NIfTI. Compressed data declare their size in CompressedDataSize.
    """
    fields = header.fields
    if fields.get("BinaryData", "True").lower() != "true" or len(header.data_files) > 1:
        return  # ASCII voxels or one file per slice: no single byte count to compare
    try:
        skip = max(int(fields.get("HeaderSize", "0")), 0)
        if fields.get("CompressedData", "False").lower() == "true":
            kind, expected = "compressed voxel bytes", int(fields["CompressedDataSize"])
        else:
            values = int(np.prod([int(v) for v in fields["DimSize"].split()], dtype=np.int64))
            channels = int(fields.get("ElementNumberOfChannels", "1"))
            kind, expected = "voxel bytes", values * channels * _METAIMAGE_TYPE_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):
        return  # an incomplete or unusual header: the reader reports what is wrong
    if header.data_files:
        name, item = header.data_files[0]
        if item.name != Path(name).name:
            return  # MetaIO's fallback to a .gz copy: compressed although the header does not say so
        where, available = f"the data file {name}", item.stat().st_size - skip
    else:
        where, available = "the file", path.stat().st_size - header.data_start - skip
    if available < expected:
        raise InvalidInputError(
            str(path),
            "unreadable",
            f"{where} is truncated: it holds {max(available, 0)} of the {expected} {kind} its header "
            "declares; re-export or re-download it",
        )


def require_finite(image: sitk.Image, path: str | os.PathLike[str], *, is_label: bool = False) -> None:
    """Fail on NaN/Inf voxels, which resampling would spread or skip depending on the target grid; in a
    label map (``is_label``) they are named as the label problem they are (``non_finite_label``)."""
    if image.GetPixelID() not in _FLOAT_PIXEL_IDS:
        return
    values = sitk.GetArrayViewFromImage(image)
    # Slab by slab, so no volume-sized mask is allocated.
    non_finite = sum(slab.size - int(np.count_nonzero(np.isfinite(slab))) for slab in values)
    if non_finite:
        nans = sum(int(np.count_nonzero(np.isnan(slab))) for slab in values)
        if is_label:
            raise non_finite_label_error(path, non_finite, nans, values.size)
        raise InvalidInputError(
            str(path),
            "non_finite",
            f"the image has {non_finite} non-finite voxels ({nans} NaN, {non_finite - nans} infinite) "
            f"out of {values.size}; replace them (e.g. with the background value) and re-export",
        )


def _require_distinct_positions(directory: Path, files: Sequence[str], positions: Sequence[float]) -> None:
    """Refuse a series that holds several slices at one position (cine phases, diffusion directions or
    repeats of one location exported as one series).

    ITK stacks them anyway: on an invented 1 mm step when every slice shares one position, on an averaged
    step otherwise, so the volume and its voxel spacing are fiction. GDCM only sorts a series by position
    when the positions differ, so they are sorted here.
    """
    order = np.argsort(positions, kind="stable")
    gaps = np.diff(np.asarray(positions, dtype=np.float64)[order])
    shared = gaps < _SLICE_STEP_MM  # closer than the step tolerance: the same position
    if not shared.any():
        return
    in_shared_position = np.zeros(len(files), dtype=bool)
    in_shared_position[:-1] |= shared
    in_shared_position[1:] |= shared
    shared_positions = int(shared[0]) + int(np.count_nonzero(shared[1:] & ~shared[:-1]))
    first = int(np.argmax(shared))
    one, other = Path(files[order[first]]).name, Path(files[order[first + 1]]).name
    raise InvalidInputError(
        str(directory),
        "coincident_slices",
        f"{int(np.count_nonzero(in_shared_position))} of the series' {len(files)} slices share a position "
        f"with another slice ({shared_positions} position(s) hold several slices, e.g. {one} and {other}, "
        f"both at {positions[order[first]]:.4g} mm along the slice normal), so there is no slice spacing to "
        "stack them on; the series mixes acquisitions of one location (e.g. cine phases or repeats): export "
        "each on its own",
    )


def _require_uniform_slices(
    directory: Path, files: Sequence[str], reader: sitk.ImageSeriesReader, in_plane_spacing: Sequence[float]
) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal, share a position, or shift
    sideways within their plane from slice to slice (a gantry tilt).

    ITK stacks such a series on one averaged slice step with only a warning, so after a lost slice every
    later slice sits up to a step away from where DICOM places it. ITK's
    ``ITK_non_uniform_sampling_deviation`` key is set on complete series too, so positions are compared
    here. ``in_plane_spacing`` (the pixel spacing of a slice) scales the tilt tolerance.
    """
    if len(files) < 2:
        return  # one slice has no step
    points = []
    try:
        orientation = reader.GetMetaData(0, "0020|0037")  # Image Orientation (Patient): row, column cosines
        row, column = np.asarray([float(v) for v in orientation.split("\\")]).reshape(2, 3)
        normal = np.cross(row, column)
        for index in range(len(files)):
            points.append([float(v) for v in reader.GetMetaData(index, "0020|0032").split("\\")])  # Position
        positions = [float(np.dot(point, normal)) for point in points]
    except (RuntimeError, ValueError):
        return  # no usable position or orientation: ITK falls back to its own spacing, nothing to compare
    _require_distinct_positions(directory, files, positions)
    steps = np.abs(np.diff(positions))
    # The most common step (the smallest on a tie): with one slice lost from four, the median of the steps
    # 2 and 4 mm is 3 mm, which would blame the good pair. Every step is at least _SLICE_STEP_MM here.
    values, counts = np.unique(np.round(steps / _SLICE_STEP_MM) * _SLICE_STEP_MM, return_counts=True)
    typical = float(values[counts == counts.max()].min())
    deviation = np.abs(steps - typical)
    if np.any(deviation > max(_SLICE_STEP_MM, 0.01 * typical)):
        i = int(np.argmax(deviation))
        raise InvalidInputError(
            str(directory),
            "non_uniform_slices",
            f"the series has a slice gap of {steps[i]:.4g} mm between slices {i + 1} and {i + 2} "
            f"({Path(files[i]).name}, {Path(files[i + 1]).name}) where the others are {typical:.4g} mm; "
            "a slice is missing or the series mixes acquisitions: export the complete series on its own",
        )
    _require_untilted_slices(directory, np.asarray(points, dtype=np.float64), normal, in_plane_spacing)


def _require_untilted_slices(
    directory: Path, points: np.ndarray, normal: np.ndarray, in_plane_spacing: Sequence[float]
) -> None:
    """Refuse a series whose slice positions move within the slice plane as well as along its normal.

    A CT acquired with a tilted gantry has its slices in the tilted plane, but each slice's Image Position
    advances along the table axis, which is not the slice normal, so successive positions also shift
    sideways within the slice plane. ITK stacks the slices along the normal regardless, with the length of
    the whole position step as spacing, so the sideways shift is dropped and voxels lie centimetres off over
    a series (8 mm after ten 2.5 mm slices at 20° in the audit). Each slice's sideways offset from the
    first, what ITK misplaces it by, may be at most ``_SLICE_STEP_MM`` or a tenth of a pixel. Offsets rather
    than single steps are compared so that a creeping tilt, small per step, is caught by what it
    accumulates, while header round-off does not accumulate: positions to 2 decimals and cosines to 5 stay
    below the tolerance over a 1 m oblique series.
    """
    length = float(np.linalg.norm(normal))
    if not np.isfinite(length) or length < 0.5:
        return  # degenerate orientation cosines: nothing to measure a tilt against
    normal = normal / length
    order = np.argsort(points @ normal, kind="stable")
    offsets = points[order] - points[order[0]]
    along = offsets @ normal
    sideways = offsets - np.outer(along, normal)
    slice_shift = np.linalg.norm(sideways, axis=1)
    pixel = float(min(in_plane_spacing)) if len(in_plane_spacing) else 0.0
    if slice_shift.max() <= max(_SLICE_STEP_MM, 0.1 * pixel):
        return
    steps = len(points) - 1
    angle = float(np.degrees(np.arctan2(float(np.linalg.norm(sideways[-1])), abs(float(along[-1])))))
    raise InvalidInputError(
        str(directory),
        "gantry_tilt",
        f"the slices shift sideways within their plane as they advance along its normal "
        f"({np.linalg.norm(sideways[-1]) / steps:.4g} mm per {abs(along[-1]) / steps:.4g} mm slice step, "
        f"a gantry tilt of {angle:.3g}°), so a reader that stacks them along the normal (as ITK does) "
        f"misplaces slices by {slice_shift.max():.3g} mm or more; convert the series with dcm2niix, which "
        "corrects gantry tilt, and ingest the NIfTI it writes, or export the series from the scanner without "
        "tilt (e.g. reformatted to axial slices)",
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
    largest = [sid for sid in series_ids if len(series[sid]) == len(series[chosen])]
    if len(largest) > 1:  # which one max() returns depends on GDCM's order: not the user's choice
        raise InvalidInputError(
            str(directory),
            "several_series",
            f"the directory holds {len(series_ids)} DICOM series, {len(largest)} of them with the most "
            f"slices ({len(series[chosen])}), so which one to read cannot be told (SeriesInstanceUIDs: "
            f"{', '.join(largest)}); move each series into its own folder and point to the one you mean",
        )
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
    path: str | os.PathLike[str],
    *,
    pixel_type: int | None = None,
    verify: bool = True,
    is_label: bool = False,
) -> sitk.Image:
    """Read a volume (file or DICOM series directory), raising :class:`InvalidInputError` on any failure.

    ``pixel_type`` is a SimpleITK pixel id (e.g. ``sitk.sitkFloat32``) to cast to while reading.
    ``verify=False`` skips the integrity checks ITK does not do itself (complete gzip stream, voxel bytes
    of NIfTI and MetaImage, NaN and Inf voxels), which cost a second decompression or a pass over the
    voxels; only for files already verified, like the ingested cases that preprocessing reads. ``is_label``
    reports NaN/Inf voxels as a label map's problem (``non_finite_label``) rather than an image's.
    A DICOM series must have evenly spaced slices at distinct positions and no gantry tilt, a detached
    header (``.mhd``, ``.nhdr``) its data files, and a NIfTI a header nibabel accepts, with a qform or an
    sform, agreeing ones when it has both, and voxel sizes (pixdim) that ITK reads as nibabel does, whatever
    ``verify`` says: these checks read headers only.
    """
    source = Path(path)
    if not source.exists():
        raise InvalidInputError(str(path), "missing_file", "the file does not exist; check the path")
    image_format = detect_format(source)
    if image_format == "dicom":
        files = _pick_dicom_series(source)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()  # per-slice positions, for the even-spacing check
    else:
        if not source.is_file():
            raise InvalidInputError(str(path), "unreadable", "the path is not a regular file")
        if source.stat().st_size == 0:
            raise InvalidInputError(str(path), "unreadable", "the file is empty (0 bytes); re-export it")
        header = _read_header(source, image_format)
        if header is not None:
            _require_data_files(source, header)
        # The header once for both NIfTI checks; None when neither library can read it: ITK's reader
        # reports the problem next.
        nifti = _nibabel_image(source) if image_format == "nifti" else None
        if nifti is not None:
            _require_one_placement(source, nifti)
        if verify:
            with source.open("rb") as handle:
                gzipped = handle.read(2) == _GZIP_MAGIC
            payload_bytes = _gzip_payload_bytes(source) if gzipped else source.stat().st_size
            if nifti is not None:
                _check_nifti(source, nifti, payload_bytes, is_label=is_label)
            elif image_format == "mha" and header is not None:
                _check_metaimage_size(source, header)
        reader = sitk.ImageFileReader()
        reader.SetImageIO(_IMAGE_IOS[image_format])
        reader.SetFileName(str(source))
    try:
        image = reader.Execute()  # in the file's own type: the checks below must see the stored values
    except RuntimeError as exc:
        raise InvalidInputError(
            str(path),
            "unreadable",
            f"the {_FORMAT_NAMES[image_format]} reader failed ({_condense(str(exc))}); "
            f"the file may be truncated, corrupt or not a valid {_FORMAT_NAMES[image_format]} file",
        ) from None
    if image_format == "dicom":
        _require_uniform_slices(source, files, reader, image.GetSpacing()[:2])
    if verify and image_format != "nifti":  # _check_nifti counted NaN/Inf in the file, before ITK zeroed them
        require_finite(image, source, is_label=is_label)
    return image if pixel_type is None else _cast_exactly(image, pixel_type, source)


_INTEGER_TYPES = {
    sitk.sitkUInt8: np.uint8,
    sitk.sitkInt8: np.int8,
    sitk.sitkUInt16: np.uint16,
    sitk.sitkInt16: np.int16,
    sitk.sitkUInt32: np.uint32,
    sitk.sitkInt32: np.int32,
    sitk.sitkUInt64: np.uint64,
    sitk.sitkInt64: np.int64,
}


def _cast_exactly(image: sitk.Image, pixel_type: int, path: Path) -> sitk.Image:
    """``image`` as ``pixel_type``, refusing what the cast would change: ITK's cast wraps 300 to 44 in
    uint8, truncates 1.5 to 1 and turns NaN into 0 without a word."""
    if image.GetPixelID() == pixel_type:
        return image
    name = sitk.GetPixelIDValueAsString(pixel_type)
    integer = _INTEGER_TYPES.get(pixel_type)
    if integer is not None and image.GetNumberOfComponentsPerPixel() == 1:
        require_finite(image, path)
        values = sitk.GetArrayViewFromImage(image)
        low, high, limits = float(values.min()), float(values.max()), np.iinfo(integer)
        if low < limits.min or high > limits.max:
            raise InvalidInputError(
                str(path),
                "pixel_type_range",
                f"values {low:g}..{high:g} do not fit {name} ({limits.min}..{limits.max}); "
                "read it without pixel_type or with a wider type",
            )
        if image.GetPixelID() in _FLOAT_PIXEL_IDS:
            count, examples = non_whole_values(values)
            if count:
                # repr, not :g, which prints 1.0000001 as "1" and hides why it is not whole.
                listed = ", ".join(repr(float(v)) for v in examples)
                raise InvalidInputError(
                    str(path),
                    "pixel_type_fraction",
                    f"{count} voxel(s) are not whole numbers (e.g. {listed}) "
                    f"and would be truncated as {name}; read it without pixel_type or as a float type",
                )
    try:
        return sitk.Cast(image, pixel_type)
    except RuntimeError as exc:
        raise InvalidInputError(
            str(path), "pixel_type", f"cannot be read as {name} ({_condense(str(exc))})"
        ) from None


def require_scalar_volume(image: sitk.Image, path: str | os.PathLike[str], what: str = "image") -> None:
    """One 3-D single-channel volume per file, checked before any geometry code sees it: that code only
    says "Geometry is for 3-D images" without the file, and ITK fails on a vector label with a traceback."""
    dimension = image.GetDimension()
    if dimension != 3:
        raise InvalidInputError(
            str(path),
            "not_3d",
            f"the {what} is {dimension}-D (size {tuple(image.GetSize())}); Iris needs one 3-D volume per "
            "file: split channels or time points into separate files",
        )
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InvalidInputError(
            str(path),
            "multi_component",
            f"the {what} has {components} values per voxel (e.g. RGB or a vector image); Iris needs a "
            "single-channel 3-D volume: export one value per voxel",
        )


def _is_orthonormal(image: sitk.Image) -> bool:
    dimension = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dimension, dimension)
    return bool(np.allclose(direction.T @ direction, np.eye(dimension), rtol=0.0, atol=_ORTHONORMAL_ATOL))


def require_storable(image: sitk.Image, path: str | os.PathLike[str]) -> None:
    """Refuse a grid the format of ``path`` cannot store, before any work goes into the image.

    NIfTI keeps only rotations (a quaternion): ITK silently straightens a sheared direction (e.g. a
    gantry-tilted CT read from MHA/NRRD), which moves every voxel of the written file off its place.
    """
    if detect_format(path) == "nifti" and not _is_orthonormal(image):
        raise InvalidInputError(
            str(path),
            "non_orthogonal_direction",
            "the image's direction is sheared (its axes are not perpendicular, e.g. a gantry-tilted CT); "
            "NIfTI cannot store it and the voxels would land in the wrong place: write .mha or .nrrd instead",
        )


def _scratch_directory(target: Path) -> Path:
    """A new hidden directory beside ``target`` with the umask's mode: mkdtemp's 0700 would survive the
    rename of a DICOM series and leave it unreadable to the rest of a shared project's group."""
    scratch = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    scratch.mkdir()
    return scratch


def write_image(image: sitk.Image, path: str | os.PathLike[str], *, compress: bool = True) -> None:
    """Write ``image`` so that ``path`` is either the old file or the complete new one, never partial.

    The image is written into a hidden scratch directory beside ``path`` (same filesystem, same file
    name, so detached ``.mhd``/``.nhdr`` headers reference the right data file) and then moved into
    place with ``os.replace``, data files first and the named file last. A detached header (``.mhd``,
    ``.nhdr``) is two files, so a process killed between their two renames leaves the old header beside
    the new voxels; write single-file formats where that matters.
    """
    target = Path(path)
    image_format = detect_format(target)
    if image_format == "dicom":
        raise InvalidInputError(
            str(path), "unsupported_format", "write_image writes files; use write_dicom_series for DICOM"
        )
    require_storable(image, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # ITK picks the writer by a lower-case suffix: "Labels.MHA" would come out as Labels.mhd + Labels.zraw.
    suffix = file_suffix(target)
    name = target.name[: len(target.name) - len(suffix)] + suffix
    scratch = _scratch_directory(target)
    try:
        try:
            sitk.WriteImage(image, str(scratch / name), useCompression=compress)
        except RuntimeError as exc:
            raise OSError(f"{path}: could not write the image: {_condense(str(exc))}") from None
        written = sorted(scratch.iterdir(), key=lambda item: item.name == name)
        for item in written:
            os.replace(item, target if item.name == name else target.parent / item.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _decimal_string(value: float) -> str:
    """Format for a DICOM DS element, which allows at most 16 characters."""
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} cannot be written as a DICOM decimal string")


def _new_uid(uid_seed: str | None, *role: object) -> str:
    """A UID under our root: random, or derived from ``uid_seed`` and the UID's role when a seed is given.

    The derived form (as pydicom's ``generate_uid(entropy_srcs=…)``) makes a seeded series byte-identical
    on every run; the 30 decimal digits (~100 bits) keep it within DICOM's 64 characters.
    """
    if uid_seed is None:
        number = uuid.uuid4().int
    else:
        digest = hashlib.sha256("\x1f".join(map(str, (uid_seed, *role))).encode()).digest()
        number = int.from_bytes(digest, "big")
    return f"{_UID_ROOT}.{number % 10**30}"


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
def write_dicom_series(
    image: sitk.Image, directory: str | os.PathLike[str], *, uid_seed: str | None = None
) -> None:
    """Write a 3-D scalar volume as a CT series (int16, one file per slice) that reads back to the same grid.

    DICOM stacks slices along row × column, so only right-handed directions (det > 0) can be stored
    without reordering the index axes; others are refused rather than silently changed.

    The study, series and instance UIDs are random, as a real series needs UIDs no other series has.
    Generated data that must be reproducible byte for byte passes ``uid_seed`` instead: a string naming
    the series (e.g. generator seed, dataset and case), from which every UID is derived, so the same seed
    writes the same files and different seeds write different UIDs.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("write_dicom_series needs a 3-D scalar image")
    if image.GetDepth() < 2:
        raise ValueError(
            "write_dicom_series needs at least 2 slices: the slice spacing of a single slice is not "
            "stored (it reads back as 1 mm); write .mha or .nrrd instead"
        )
    if not _is_orthonormal(image):
        raise ValueError(
            "DICOM can only store perpendicular axes, and this direction is sheared (e.g. a gantry-tilted "
            "CT): the slices would read back in the wrong place; write .mha or .nrrd instead"
        )
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
    # GDCM stamps each slice with the time it is written unless the study date and time are set: set once
    # here so all slices agree, and fixed for a seeded series, which must not depend on when it was written.
    written = _SEEDED_SERIES_TIME if uid_seed is not None else datetime.datetime.now()
    series_tags = {
        "0008|0016": _CT_IMAGE_STORAGE,
        "0008|0020": written.strftime("%Y%m%d"),
        "0008|0030": written.strftime("%H%M%S"),
        "0008|0060": "CT",
        "0008|0008": "DERIVED\\SECONDARY\\AXIAL",
        "0010|0010": "Phantom^Iris",
        "0010|0020": "IRIS0001",
        "0020|000d": _new_uid(uid_seed, "study"),
        "0020|000e": _new_uid(uid_seed, "series"),
        "0020|0011": "1",
        "0020|0037": orientation,
        "0028|0030": f"{_decimal_string(spacing[1])}\\{_decimal_string(spacing[0])}",
        "0018|0050": _decimal_string(spacing[2]),
        "0028|1050": "40",
        "0028|1051": "400",
        "0028|1052": "0",
        "0028|1053": "1",
    }
    scratch = _scratch_directory(target)
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()  # otherwise GDCM replaces the series UIDs set above
        for k in range(volume.GetDepth()):
            position = volume.TransformIndexToPhysicalPoint((0, 0, k))
            slice_image = volume[:, :, k]
            for tag, value in series_tags.items():
                slice_image.SetMetaData(tag, value)
            slice_image.SetMetaData("0008|0018", _new_uid(uid_seed, "instance", k))
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
    # Created with the umask's mode, not mkstemp's 0600, which the rename would keep.
    scratch = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(scratch, "x", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Content checksum of an image: a file, a directory's files (relative names and contents, sorted),
    or a detached header (``.mhd``, ``.nhdr``) with the data files it names (names and contents, in order).
    """
    source = Path(path)
    digest = hashlib.sha256()
    if source.is_dir():
        files = sorted(
            (p for p in source.rglob("*") if p.is_file()), key=lambda p: p.relative_to(source).as_posix()
        )
        _update_from_files(digest, [(item.relative_to(source).as_posix(), item) for item in files])
        return digest.hexdigest()
    if not source.is_file():
        raise InvalidInputError(str(path), "missing_file", "the file does not exist; check the path")
    header = _read_header(source, _SUFFIX_FORMATS.get(file_suffix(source), ""))
    if header is None or not header.data_files:
        _update_from_file(digest, source)
        return digest.hexdigest()
    # The voxels are in other files: without them a re-export with the same header keeps its checksum,
    # and the preprocessing cache serves the old voxels.
    _require_data_files(source, header)
    _update_from_files(digest, [(source.name, source), *header.data_files])
    return digest.hexdigest()


def _update_from_files(digest: hashlib._Hash, files: Sequence[tuple[str, Path]]) -> None:
    """Each file as its length-prefixed name, its size and its contents, so no two sets collide."""
    for name, item in files:
        encoded = name.encode("utf-8", "surrogateescape")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
        digest.update(item.stat().st_size.to_bytes(8, "little"))
        _update_from_file(digest, item)


def _update_from_file(digest: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
