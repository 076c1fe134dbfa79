"""A NIfTI carries its placement twice, as a qform and an sform; tools disagree on which one wins, so a file
whose two forms disagree is refused, and so is one with neither (each tool then invents another placement),
while one whose forms agree, or that uses only one, reads as before."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.io import read_image

SHAPE = (12, 10, 6)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _affine(turn_degrees: float = 0.0, shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """An oblique, anisotropic RAS affine, turned about z and shifted as asked."""
    rotation = Rotation.from_euler("xyz", [20.0, -10.0, 30.0 + turn_degrees], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = np.array([-40.0, 25.0, 12.0]) + shift_mm
    return affine


def _write(path: Path, qform: np.ndarray, qform_code: int, sform: np.ndarray, sform_code: int) -> Path:
    image = nibabel.Nifti1Image(np.zeros(SHAPE, np.int16), None)
    image.set_qform(qform, code=qform_code)
    image.set_sform(sform, code=sform_code)
    nibabel.save(image, path)
    return path


def _placement(affine: np.ndarray) -> Geometry:
    """The grid ITK gives a NIfTI placed by ``affine`` (RAS), in LPS."""
    lps = RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    origin = RAS_TO_LPS @ affine[:3, 3]
    return Geometry(SHAPE, tuple(spacing), tuple(origin), tuple((lps / spacing).ravel()))


@pytest.mark.parametrize("sform_code", [1, 2, 4])
@pytest.mark.parametrize("verify", [True, False])
def test_a_qform_and_sform_that_disagree_are_refused(tmp_path: Path, sform_code: int, verify: bool) -> None:
    """An sform fixed by registration beside a stale qform, 40 mm off: ITK read the qform for codes 2 and 4,
    and the mask written from it lay 40 mm off its scan in nibabel, FSL and most viewers."""
    path = _write(tmp_path / "scan.nii.gz", _affine(shift_mm=(40.0, 0.0, 0.0)), 1, _affine(), sform_code)
    with pytest.raises(InvalidInputError) as caught:
        read_image(path, verify=verify)
    error = caught.value
    assert error.check == "qform_sform_mismatch" and error.path == str(path)
    assert f"the qform (code 1) and the sform (code {sform_code}) place the voxels up to 40 mm apart" in str(
        error
    )
    assert "set its code to 0" in str(error)


def test_a_turned_qform_is_refused_with_its_largest_offset(tmp_path: Path) -> None:
    path = _write(tmp_path / "scan.nii", _affine(turn_degrees=1.0), 2, _affine(), 2)
    with pytest.raises(InvalidInputError, match=r"place the voxels up to 0\.\d+ mm apart"):
        read_image(path)


@pytest.mark.parametrize(
    ("qform_code", "sform_code", "used"),
    [(1, 1, "both"), (2, 4, "both"), (1, 0, "qform"), (0, 2, "sform")],
)
def test_forms_that_agree_or_a_form_alone_read_as_before(
    tmp_path: Path, qform_code: int, sform_code: int, used: str
) -> None:
    """Agreeing forms (as ITK, FSL and SPM write them) pass, and a form whose code is 0 is not compared:
    readers ignore it, whatever it holds."""
    placed, other = _affine(), _affine(turn_degrees=5.0, shift_mm=(30.0, -7.0, 2.0))
    if used == "both":
        qform, sform = placed, placed
    else:
        qform, sform = (placed, other) if used == "qform" else (other, placed)
    path = _write(tmp_path / "scan.nii.gz", qform, qform_code, sform, sform_code)
    assert Geometry.from_image(read_image(path)).same_grid(
        _placement(placed), atol_mm=1e-4, atol_direction=1e-5
    )


@pytest.mark.parametrize("verify", [True, False])
def test_a_nifti_with_neither_form_is_refused(tmp_path: Path, verify: bool) -> None:
    """Both codes 0: ITK placed it mirrored in y and 22 mm off where nibabel and FSL put it, and the mask
    written from ITK's reading (with both codes set) lay off its scan in those tools."""
    path = _write(tmp_path / "scan.nii.gz", _affine(), 0, _affine(), 0)
    with pytest.raises(InvalidInputError) as caught:
        read_image(path, verify=verify)
    assert caught.value.check == "no_placement" and caught.value.path == str(path)
    assert "neither the qform nor the sform is set (both codes 0)" in str(caught.value)
