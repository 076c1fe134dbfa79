from __future__ import annotations

import re
from pathlib import Path

import fsspec
import numpy as np
import pytest
import SimpleITK as sitk
from kedro.io.core import DatasetError, Version

from iris_pipelines.datasets import MedicalImageDataset
from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.io import write_dicom_series

_OBLIQUE = (0.9396926, 0.0, 0.3420201, 0.1169778, 0.9396926, -0.3213938, -0.3213938, 0.3420201, 0.8830222)


def _volume(fill: int = 0) -> sitk.Image:
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) + fill
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.5, 20.25, 3.0))
    image.SetDirection(_OBLIQUE)
    return image


def _assert_same(a: sitk.Image, b: sitk.Image) -> None:
    assert Geometry.from_image(a).same_grid(Geometry.from_image(b), atol_mm=1e-4, atol_direction=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.mha", "ct.nrrd", "ct.mhd"])
def test_round_trip_keeps_geometry(tmp_path: Path, name: str) -> None:
    dataset = MedicalImageDataset(filepath=str(tmp_path / "sub" / name))
    assert not dataset.exists()
    dataset.save(_volume())
    assert dataset.exists()
    _assert_same(dataset.load(), _volume())


def test_load_args_cast_pixel_type(tmp_path: Path) -> None:
    MedicalImageDataset(filepath=str(tmp_path / "ct.mha")).save(_volume())
    loaded = MedicalImageDataset(
        filepath=str(tmp_path / "ct.mha"), load_args={"pixel_type": "sitkFloat32"}
    ).load()
    assert loaded.GetPixelID() == sitk.sitkFloat32
    with pytest.raises(DatasetError, match="pixel type"):
        MedicalImageDataset(filepath=str(tmp_path / "ct.mha"), load_args={"pixel_type": "float"})
    with pytest.raises(DatasetError, match="unknown load/save arguments"):
        MedicalImageDataset(filepath=str(tmp_path / "ct.mha"), save_args={"level": 9})


def test_loads_a_dicom_series_directory(tmp_path: Path) -> None:
    write_dicom_series(_volume(), tmp_path / "series")
    _assert_same(MedicalImageDataset(filepath=str(tmp_path / "series")).load(), _volume())


def test_versioned_save_and_load(tmp_path: Path) -> None:
    filepath = str(tmp_path / "ct.nii.gz")
    MedicalImageDataset(filepath=filepath, version=Version(None, "2025-01-01T00.00.00.000Z")).save(_volume(0))
    MedicalImageDataset(filepath=filepath, version=Version(None, "2025-01-02T00.00.00.000Z")).save(
        _volume(100)
    )
    assert (tmp_path / "ct.nii.gz" / "2025-01-01T00.00.00.000Z" / "ct.nii.gz").is_file()
    latest = MedicalImageDataset(filepath=filepath, version=Version(None, None)).load()
    first = MedicalImageDataset(filepath=filepath, version=Version("2025-01-01T00.00.00.000Z", None)).load()
    _assert_same(latest, _volume(100))
    _assert_same(first, _volume(0))


def test_missing_file_raises_dataset_error_naming_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        MedicalImageDataset(filepath=str(tmp_path / "absent.nii.gz")).load()
    with pytest.raises(DatasetError, match="Did not find any versions"):
        MedicalImageDataset(filepath=str(tmp_path / "absent.nii.gz"), version=Version(None, None)).load()


def test_save_rejects_non_images(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="saves SimpleITK images"):
        MedicalImageDataset(filepath=str(tmp_path / "ct.nii.gz")).save(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nhdr"])
def test_non_local_protocol_goes_through_a_local_copy(name: str) -> None:
    filepath = f"memory:///iris-test/{name}"
    dataset = MedicalImageDataset(filepath=filepath)
    try:
        dataset.save(_volume())
        _assert_same(dataset.load(), _volume())
    finally:
        fsspec.filesystem("memory").rm("/iris-test", recursive=True)


@pytest.mark.parametrize("layout", ["another stem", "slices in a subfolder"])
def test_a_remote_detached_header_brings_the_data_files_it_names(tmp_path: Path, layout: str) -> None:
    """A .mhd whose voxels are not <stem>.raw (renamed, or one file per slice in a subfolder, as MetaIO
    writes with LIST) loads remotely as it does locally; a missing one is named with its remote path."""
    volume = _volume(7)
    sitk.WriteImage(volume, str(tmp_path / "scan.mhd"))
    header = (tmp_path / "scan.mhd").read_text()
    if layout == "another stem":
        files = {"voxels.raw": (tmp_path / "scan.raw").read_bytes()}
        header = header.replace("ElementDataFile = scan.raw", "ElementDataFile = voxels.raw")
    else:
        raw, depth = (tmp_path / "scan.raw").read_bytes(), volume.GetDepth()
        step = len(raw) // depth
        files = {f"slices/{k}.raw": raw[k * step : (k + 1) * step] for k in range(depth)}
        names = "\n".join(files)
        header = header.replace("ElementDataFile = scan.raw", f"ElementDataFile = LIST 2D\n{names}")
    memory = fsspec.filesystem("memory")
    try:
        memory.pipe("/iris-remote/scan.mhd", header.encode())
        for name, content in files.items():
            memory.pipe(f"/iris-remote/{name}", content)
        _assert_same(MedicalImageDataset(filepath="memory:///iris-remote/scan.mhd").load(), volume)
        missing = next(iter(files))
        memory.rm(f"/iris-remote/{missing}")
        expected = (
            f"data file {missing} that the header names does not exist (memory:///iris-remote/{missing})"
        )
        with pytest.raises(DatasetError, match=re.escape(expected)):
            MedicalImageDataset(filepath="memory:///iris-remote/scan.mhd").load()
    finally:
        memory.rm("/iris-remote", recursive=True)


def test_describe(tmp_path: Path) -> None:
    dataset = MedicalImageDataset(filepath=str(tmp_path / "ct.nii.gz"), save_args={"compress": False})
    described = dataset._describe()
    assert str(described["filepath"]) == (tmp_path / "ct.nii.gz").as_posix()
    assert described["protocol"] == "file"
    assert described["save_args"] == {"compress": False}
    assert described["load_args"] == {"pixel_type": None}
    assert "ct.nii.gz" in str(dataset)


def test_a_detached_header_over_http_brings_its_data_file(tmp_path: Path) -> None:
    """fsspec keeps http(s) URLs whole: the header's folder must keep its "//"."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    image = sitk.GetImageFromArray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    image.SetSpacing((1.0, 2.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "scan.mhd"), useCompression=True)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        loaded = MedicalImageDataset(filepath=f"{base}/scan.mhd").load()
        assert loaded.GetSpacing() == (1.0, 2.0, 3.0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), sitk.GetArrayFromImage(image))
        (tmp_path / "scan.zraw").unlink()
        with pytest.raises(DatasetError, match=rf"\({re.escape(base)}/scan.zraw\)") as caught:
            MedicalImageDataset(filepath=f"{base}/scan.mhd").load()
        assert "http://http" not in str(caught.value)
    finally:
        server.shutdown()
