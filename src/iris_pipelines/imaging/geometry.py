"""A scan's grid in world space, stored with every case so predictions can be sent back onto it."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Geometry:
    """SimpleITK geometry of a 3-D grid: sizes in (x, y, z) voxels, LPS millimetres, row-major direction.

    The direction's columns are the world directions of the index axes, as in SimpleITK and DICOM.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, float, float, float, float, float, float, float, float]

    def __post_init__(self) -> None:
        # Normalise list/numpy inputs (e.g. from JSON) so equality and hashing behave.
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("Geometry needs 3 sizes, 3 spacings, 3 origin values and 9 direction values")
        if min(self.size) < 1 or min(self.spacing) <= 0:
            raise ValueError(f"Geometry needs positive sizes and spacings: {self.size}, {self.spacing}")

    @classmethod
    def from_image(cls, image: sitk.Image) -> Geometry:
        if image.GetDimension() != 3:
            raise ValueError(f"Geometry is for 3-D images, got a {image.GetDimension()}-D one")
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Stamp spacing, origin and direction onto ``image`` (in place, also returned); sizes must match."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} does not match geometry size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(data["size"], data["spacing"], data["origin"], data["direction"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Geometry:
        return cls.from_dict(json.loads(text))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Map N×3 continuous (x, y, z) indices to N×3 world points in mm."""
        points = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        scaled = self.direction_matrix * np.asarray(self.spacing)
        return points @ scaled.T + np.asarray(self.origin)

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Map N×3 world points in mm to N×3 continuous (x, y, z) indices."""
        points = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        scaled = self.direction_matrix * np.asarray(self.spacing)
        return np.linalg.solve(scaled, (points - np.asarray(self.origin)).T).T

    def world_corners(self) -> np.ndarray:
        """The 8 corners (8×3, mm) of the box enclosing whole voxels, i.e. half a voxel beyond the centres."""
        lows = np.full(3, -0.5)
        highs = np.asarray(self.size, dtype=np.float64) - 0.5
        corners = np.array(list(itertools.product(*zip(lows, highs, strict=True))))
        return self.index_to_world(corners)

    def same_grid(self, other: Geometry, *, atol_mm: float = 1e-3, atol_direction: float = 1e-4) -> bool:
        """True when both grids put every voxel at the same world point (within the tolerances)."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, rtol=0.0, atol=atol_mm)
            and np.allclose(self.origin, other.origin, rtol=0.0, atol=atol_mm)
            and np.allclose(self.direction, other.direction, rtol=0.0, atol=atol_direction)
        )

    @property
    def is_identity_direction(self) -> bool:
        return bool(np.allclose(self.direction, IDENTITY_DIRECTION, rtol=0.0, atol=1e-6))
