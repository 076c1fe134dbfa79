"""How each modality turns a structure map into intensities.

The three models differ in exactly the ways intensity normalisation and a segmentation model have to cope
with: CT is calibrated (Hounsfield units, air −1000, bone several hundred, contrast phases change which
organs are bright) with additive noise; MR has an arbitrary scale per scan, a smooth multiplicative bias
field and Rician noise, and two sequences give opposite contrasts (fluid dark on T1, bright on T2); PET is
mostly low uptake with hot spots (bladder, kidneys, lesions), a wide point-spread function and heavy,
signal-dependent noise. Per structure values vary from subject to subject, so no class can be found by
its intensity alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.phantoms.raster import Structure, index_to_patient

# Hounsfield units per tissue in the native, arterial and portal-venous phases.
CT_HU: dict[str, tuple[float, float, float]] = {
    "fat": (-100, -100, -100),
    "muscle": (45, 50, 55),
    "cavity": (-75, -70, -70),
    "lung": (-850, -850, -850),
    "heart": (40, 180, 130),
    "diaphragm": (45, 50, 55),
    "bowel": (25, 40, 55),
    "bowel_gas": (-950, -950, -950),
    "liver": (58, 75, 110),
    "gallbladder": (10, 10, 12),
    "spleen": (48, 125, 115),
    "kidney": (33, 190, 165),
    "adrenal": (25, 55, 60),
    "pancreas": (40, 110, 95),
    "bladder": (8, 8, 10),
    "prostate": (40, 60, 70),
    "rectum": (30, 45, 55),
    "aorta": (42, 200, 150),
    "ivc": (40, 75, 140),
    "bone": (230, 230, 230),
    "cortex": (850, 850, 850),
    "liver_tumour": (38, 60, 65),
    "kidney_tumour": (35, 120, 90),
    "pancreas_tumour": (35, 50, 55),
    "lesion": (40, 70, 80),
}
CT_PHASES = ("native", "arterial", "venous")
CT_AIR_HU = -1000.0

# MR signal (arbitrary units before the per-scan scale) on T1- and T2-weighted sequences.
MR_SIGNAL: dict[str, tuple[float, float]] = {
    "fat": (900, 650),
    "muscle": (280, 180),
    "cavity": (760, 560),
    "lung": (30, 30),
    "heart": (120, 120),
    "diaphragm": (260, 170),
    "bowel": (300, 480),
    "bowel_gas": (5, 5),
    "liver": (520, 230),
    "gallbladder": (150, 1000),
    "spleen": (380, 520),
    "kidney": (420, 600),
    "adrenal": (400, 350),
    "pancreas": (600, 350),
    "bladder": (100, 1100),
    "prostate": (330, 500),
    "rectum": (260, 300),
    "aorta": (70, 50),
    "ivc": (90, 70),
    "bone": (720, 520),
    "cortex": (30, 25),
    "liver_tumour": (300, 620),
    "kidney_tumour": (360, 650),
    "pancreas_tumour": (320, 560),
    "lesion": (350, 600),
}
MR_SEQUENCES = ("T1", "T2")

# FDG uptake (SUV) and its log-normal spread between subjects.
PET_SUV: dict[str, tuple[float, float]] = {
    "fat": (0.3, 0.15),
    "muscle": (0.7, 0.15),
    "cavity": (0.5, 0.15),
    "lung": (0.4, 0.15),
    "heart": (3.0, 0.5),
    "diaphragm": (0.8, 0.15),
    "bowel": (1.3, 0.3),
    "bowel_gas": (0.1, 0.15),
    "liver": (2.2, 0.15),
    "gallbladder": (0.6, 0.15),
    "spleen": (1.8, 0.15),
    "kidney": (4.0, 0.25),
    "adrenal": (1.4, 0.15),
    "pancreas": (1.4, 0.15),
    "bladder": (15.0, 0.6),
    "prostate": (1.2, 0.15),
    "rectum": (1.3, 0.2),
    "aorta": (1.7, 0.1),
    "ivc": (1.6, 0.1),
    "bone": (1.3, 0.2),
    "cortex": (0.5, 0.15),
    "liver_tumour": (5.0, 0.4),
    "kidney_tumour": (3.0, 0.4),
    "pancreas_tumour": (5.0, 0.4),
    "lesion": (8.0, 0.45),
}
PET_TRACERS = ("FDG",)

ACQUISITIONS: dict[str, tuple[str, ...]] = {"CT": CT_PHASES, "MR": MR_SEQUENCES, "PET": PET_TRACERS}
STORAGE = {"int16": np.int16, "uint16": np.uint16, "float32": np.float32}
# Voxel-scale blur standing in for the scanner's point-spread function and partial-volume effect.
_PSF_VOXELS = 0.45


@dataclass(frozen=True)
class Appearance:
    """A modality's intensity model for one acquisition (CT phase, MR sequence or PET tracer).

    ``noise`` is in the modality's own unit: HU standard deviation for CT, a fraction of the typical
    tissue signal (≈1000) for MR, the Poisson-like relative noise at SUV 1 for PET.
    """

    modality: str
    acquisition: str
    noise: float
    storage: str

    def __post_init__(self) -> None:
        if self.acquisition not in ACQUISITIONS.get(self.modality, ()):
            raise ValueError(
                f"{self.modality} has no acquisition {self.acquisition!r}; "
                f"choose from {ACQUISITIONS.get(self.modality, ())}"
            )
        if self.storage not in STORAGE:
            raise ValueError(f"storage {self.storage!r} is not one of {sorted(STORAGE)}")

    def render(
        self,
        structures: list[Structure],
        region: np.ndarray,
        cortex: np.ndarray,
        geometry: Geometry,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Intensity volume ``[z, y, x]`` in the storage dtype for a structure map and cortex mask."""
        values, cortex_value = self._values(structures, rng)
        image = values[region]
        image[cortex] = cortex_value
        if self.modality == "CT":
            noise = np.float32(self.noise) * rng.standard_normal(image.shape, dtype=np.float32)
            image = _blur(image, _PSF_VOXELS) + noise
            image = np.clip(image, -1024.0, 3071.0)
        elif self.modality == "MR":
            image = _blur(image, _PSF_VOXELS) * _bias_field(geometry, rng)
            sigma = np.float32(self.noise * 1000.0)
            real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
            imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
            image = np.sqrt(real * real + imaginary * imaginary) * np.float32(rng.uniform(0.5, 2.5))
        else:
            fwhm_mm = rng.uniform(6.5, 8.0)
            sigma_voxels = fwhm_mm / 2.3548 / np.asarray(geometry.spacing)[::-1]
            image = gaussian_filter(image, sigma_voxels, mode="nearest")
            spread = np.float32(self.noise) * np.sqrt(np.maximum(image, 0.0) + np.float32(0.05))
            image = np.maximum(image + spread * rng.standard_normal(image.shape, dtype=np.float32), 0.0)
        dtype = STORAGE[self.storage]
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            return np.clip(np.rint(image), info.min, info.max).astype(dtype)
        return image.astype(dtype)

    def _values(self, structures: list[Structure], rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """Per-structure intensity (index 0 is air) and this subject's cortical bone value."""
        tissues = ["air"] + [structure.tissue for structure in structures]
        values = np.array([self._tissue_value(tissue, rng) for tissue in tissues], dtype=np.float32)
        return values, self._tissue_value("cortex", rng)

    def _tissue_value(self, tissue: str, rng: np.random.Generator) -> float:
        if self.modality == "CT":
            if tissue == "air":
                return CT_AIR_HU
            mean = CT_HU[tissue][CT_PHASES.index(self.acquisition)]
            return float(rng.normal(mean, 5.0 + 0.05 * abs(mean)))
        if self.modality == "MR":
            if tissue == "air":
                return 0.0
            mean = MR_SIGNAL[tissue][MR_SEQUENCES.index(self.acquisition)]
            return float(mean * rng.normal(1.0, 0.06))
        if tissue == "air":
            return 0.0
        mean, spread = PET_SUV[tissue]
        return float(mean * rng.lognormal(0.0, spread))


def _blur(image: np.ndarray, sigma_voxels: float) -> np.ndarray:
    return gaussian_filter(image, sigma_voxels, mode="nearest", truncate=3.0)


def _bias_field(geometry: Geometry, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field (±20–40%) over world space, as receive-coil sensitivity produces."""
    matrix, offset = index_to_patient(geometry)
    i, j, k = (np.arange(n, dtype=np.float64) for n in geometry.size)
    log_gain = np.zeros(tuple(reversed(geometry.size)), dtype=np.float64)
    for _ in range(3):
        direction = rng.normal(size=3)
        wave = direction / np.sqrt(np.sum(direction * direction)) * 2 * np.pi / rng.uniform(250.0, 500.0)
        amplitude = rng.uniform(0.08, 0.15) * rng.choice([-1.0, 1.0])
        # The phase wave · world, with world = offset + matrix @ (i, j, k), summed term by term in float64.
        # A BLAS product rounds as the OpenBLAS kernel picked for the CPU does, so a float32 tensordot gave
        # other MR images for the same seed on another machine. Elementwise arithmetic never calls BLAS,
        # and in float64 a last-bit difference between CPUs' cos or exp almost never survives the cast to
        # float32.
        per_step = [sum(wave[c] * matrix[c, axis] for c in range(3)) for axis in range(3)]
        start = sum(wave[c] * offset[c] for c in range(3)) + rng.uniform(0, 2 * np.pi)
        phase = (
            (start + per_step[2] * k)[:, None, None]
            + (per_step[1] * j)[None, :, None]
            + (per_step[0] * i)[None, None, :]
        )
        log_gain += amplitude * np.cos(phase)
    return np.exp(log_gain).astype(np.float32)
