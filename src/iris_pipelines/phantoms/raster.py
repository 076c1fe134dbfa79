"""Rasterise a subject's anatomy onto one scan grid.

Anatomy lives in patient coordinates; a :class:`SubjectFrame` places the patient in the scanner (world,
LPS mm) and the scan's :class:`~iris_pipelines.imaging.geometry.Geometry` places voxels in the world. Each
voxel centre is mapped back to patient coordinates and asked which structure it falls in, so the same
anatomy lands in the same world place whatever the grid's spacing, direction or extent: exactly the
property that geometry-aware preprocessing has to preserve and that the tests check.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.phantoms.shapes import UNBOUNDED_MM, Shape


@dataclass(frozen=True)
class SubjectFrame:
    """Pose and build of one subject: ``world = scale · rot · patient + shift``."""

    scale: float
    rot: np.ndarray
    shift: np.ndarray

    def to_world(self, points: np.ndarray) -> np.ndarray:
        """Map N×3 patient points to N×3 world points."""
        return self.scale * np.asarray(points, dtype=float) @ self.rot.T + self.shift


@dataclass(frozen=True)
class Structure:
    """One labelled-or-not piece of anatomy.

    ``name`` is the class concept (``liver``, ``kidney_left`` …) a dataset may label; ``tissue`` picks its
    appearance; ``parent`` is the organ a nested lesion belongs to: the lesion is painted only over that
    organ, and a dataset that labels the organ but not the lesion labels the lesion as the organ (as real
    annotations do); ``cortex_mm`` gives bone a bright rim of that depth.
    """

    name: str
    tissue: str
    parts: tuple[Shape, ...]
    parent: str | None = None
    cortex_mm: float = 0.0


def index_to_patient(geometry: Geometry, frame: SubjectFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Affine (M, b) with ``patient = M @ (i, j, k) + b``; world coordinates when ``frame`` is None."""
    matrix = geometry.direction_matrix * np.asarray(geometry.spacing)
    offset = np.asarray(geometry.origin, dtype=float)
    if frame is None:
        return matrix, offset
    inverse = frame.rot.T / frame.scale
    return inverse @ matrix, inverse @ (offset - frame.shift)


def block_points(
    matrix: np.ndarray, offset: np.ndarray, lo: tuple[int, int, int], hi: tuple[int, int, int]
) -> np.ndarray:
    """Coordinates ``(3, z, y, x)`` (float32) of the voxel centres in the index block [lo, hi) (x, y, z)."""
    axes = [np.arange(lo[a], hi[a], dtype=np.float64) for a in range(3)]
    shape = (hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0])
    points = np.empty((3, *shape), dtype=np.float32)
    for c in range(3):
        points[c] = (
            (offset[c] + matrix[c, 2] * axes[2])[:, None, None]
            + (matrix[c, 1] * axes[1])[None, :, None]
            + (matrix[c, 0] * axes[0])[None, None, :]
        )
    return points


def _index_block(
    shape: Shape, to_index: np.ndarray, offset: np.ndarray, size: tuple[int, int, int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """The voxel block that can hold ``shape`` (index = to_index @ (patient - offset)), or None."""
    lo, hi = (np.clip(v, -UNBOUNDED_MM, UNBOUNDED_MM) for v in shape.bounds())
    if np.any(lo > hi):
        return None
    corners = np.array(list(itertools.product(*zip(lo, hi, strict=True))))
    index = (corners - offset) @ to_index.T
    first = np.maximum(np.floor(index.min(axis=0)).astype(int), 0)
    last = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1, size)
    if np.any(first >= last):
        return None
    return (int(first[0]), int(first[1]), int(first[2])), (int(last[0]), int(last[1]), int(last[2]))


def _parent_numbers(structures: list[Structure]) -> dict[int, list[int]]:
    """Structure-map values of each nested structure's parent (every earlier structure of that name)."""
    parents: dict[int, list[int]] = {}
    for number, structure in enumerate(structures, start=1):
        if structure.parent is None:
            continue
        earlier = [n for n, s in enumerate(structures[: number - 1], start=1) if s.name == structure.parent]
        if not earlier:
            raise ValueError(
                f"structure {number} ({structure.name!r}) nests in {structure.parent!r}, but no structure "
                f"of that name is painted before it"
            )
        parents[number] = earlier
    return parents


def paint(
    structures: list[Structure], geometry: Geometry, frame: SubjectFrame
) -> tuple[np.ndarray, np.ndarray]:
    """Structure map and cortex mask, both ``[z, y, x]``.

    The map holds ``1 + index`` of the last structure (in list order) covering each voxel centre and 0 for
    air, so later structures override earlier ones: that order is how vessels run through organs. A
    structure with a ``parent`` overrides only the voxels its parent holds at that point: a lesion whose
    shape reaches past its organ, or into the gallbladder or a vessel drawn over the organ, would
    otherwise give those voxels the organ's label in every dataset that labels the lesion as its organ.
    """
    if len(structures) > 254:
        raise ValueError(f"{len(structures)} structures do not fit a uint8 structure map")
    parents = _parent_numbers(structures)
    shape = tuple(reversed(geometry.size))
    region = np.zeros(shape, dtype=np.uint8)
    cortex = np.zeros(shape, dtype=bool)
    matrix, offset = index_to_patient(geometry, frame)
    to_index = np.linalg.inv(matrix)
    for number, structure in enumerate(structures, start=1):
        for part in structure.parts:
            block = _index_block(part, to_index, offset, geometry.size)
            if block is None:
                continue
            lo, hi = block
            window = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
            points = block_points(matrix, offset, lo, hi)
            distance = part.field(points.reshape(3, -1)).reshape(points.shape[1:]) * np.float32(frame.scale)
            inside = distance < 0
            if number in parents:
                inside &= np.isin(region[window], parents[number])
            region[window][inside] = number
            cortex[window][inside] = (distance > -structure.cortex_mm)[inside]
    return region, cortex
