"""Intensity models: the MR bias field is a function of world position, computed without BLAS."""

from __future__ import annotations

import numpy as np

from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.phantoms.appearance import _bias_field
from iris_pipelines.phantoms.shapes import rotation


def _reference_bias_field(geometry: Geometry, rng: np.random.Generator) -> np.ndarray:
    """The field written out voxel by voxel in float64: exp(Σ a · cos(wave · world + φ)), same draws."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in reversed(geometry.size)), indexing="ij")
    steps = geometry.direction_matrix * np.asarray(geometry.spacing)
    world = [geometry.origin[c] + steps[c, 0] * i + steps[c, 1] * j + steps[c, 2] * k for c in range(3)]
    log_gain = np.zeros(i.shape)
    for _ in range(3):
        direction = rng.normal(size=3)
        wave = direction / np.sqrt(np.sum(direction**2)) * 2 * np.pi / rng.uniform(250.0, 500.0)
        amplitude = rng.uniform(0.08, 0.15) * rng.choice([-1.0, 1.0])
        phase = wave[0] * world[0] + wave[1] * world[1] + wave[2] * world[2]
        log_gain += amplitude * np.cos(phase + rng.uniform(0, 2 * np.pi))
    return np.exp(log_gain)


def test_bias_field_matches_its_world_space_formula() -> None:
    geometry = Geometry(
        size=(23, 17, 11),
        spacing=(1.4, 1.6, 4.5),
        origin=(-150.0, -120.0, -40.0),
        direction=tuple(rotation(x_deg=18.0, z_deg=-12.0).ravel()),
    )
    field = _bias_field(geometry, np.random.default_rng(5))
    reference = _reference_bias_field(geometry, np.random.default_rng(5))
    assert field.dtype == np.float32 and field.shape == (11, 17, 23)
    # The float64 field cast to float32: within float32's rounding of the reference.
    np.testing.assert_allclose(field, reference, rtol=2**-23, atol=0)
    assert 0.4 < field.min() < field.max() < 2.5
