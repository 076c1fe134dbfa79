"""Anatomical shapes as signed distance-like fields in patient millimetres.

Every shape answers two questions: which axis-aligned box of space it can occupy (so rasterisation only
evaluates the voxels that matter) and, for any points, a field that is negative inside, positive outside
and roughly equal to the distance to the surface in mm. Working with distances rather than plain masks is
what lets a few primitives combine into realistic anatomy: intersections clip an organ under the
diaphragm, differences carve a kidney's hilum, offsets turn a dome into a 3 mm sheet, and bone gets a
cortical rim from the field's depth. Shapes know nothing about voxels; :mod:`.raster` puts them on grids.

Points are passed as float32 arrays of shape ``(3, N)``, so a whole block of a scan is one call. Fields
are accurate inside and near the surface; composite shapes skip parts that cannot change the answer, so
far outside they only promise a positive value, which is all that rasterising needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree

# Half-spaces and cylinders are unbounded; their boxes are clipped to this half-width (mm), far beyond any
# scan, so box arithmetic stays finite.
UNBOUNDED_MM = 5000.0
_EPS = 1e-6


class Shape(Protocol):
    """A solid in patient coordinates (LPS mm)."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Low and high corners of a box that contains the solid."""
        ...

    def field(self, points: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm) of ``points`` ``(3, N)``: negative inside."""
        ...


def rotation(x_deg: float = 0.0, y_deg: float = 0.0, z_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix R = Rz · Ry · Rx for angles in degrees about the x, y and z axes."""
    ax, ay, az = np.deg2rad([x_deg, y_deg, z_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _unbounded() -> tuple[np.ndarray, np.ndarray]:
    return np.full(3, -UNBOUNDED_MM), np.full(3, UNBOUNDED_MM)


def _weighted_rows(weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``Σ_c weights[c] · rows[c]`` over float32 rows ``(C, N)``, as plain elementwise float32 arithmetic.

    A matrix product would call BLAS, whose rounding depends on the kernel OpenBLAS picks for the CPU
    (Haswell, SkylakeX, …), so the same seed could rasterise differently on another machine. Each
    elementwise multiply and add is rounded exactly as IEEE prescribes on every CPU.
    """
    result = np.float32(weights[0]) * rows[0]
    for weight, row in zip(weights[1:], rows[1:], strict=True):
        result += np.float32(weight) * row
    return result


def _local(points: np.ndarray, centre: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Express points in a frame whose axes are the columns of ``rot``, centred on ``centre``."""
    shifted = points - centre.astype(np.float32)[:, None]
    return np.stack([_weighted_rows(rot[:, axis], shifted) for axis in range(3)])


@dataclass(frozen=True)
class RadialWaves:
    """Low-frequency radial deformation r(d) = 1 + Σ a·cos(k·d + φ) over unit directions d.

    Wave vectors of length 1–3 bend an ellipsoid into lobes and dents without ever folding it, which is
    what makes two subjects' livers look alike but never identical.
    """

    vectors: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3)))
    amplitudes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    phases: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

    @classmethod
    def random(cls, rng: np.random.Generator, amplitude: float, count: int = 4) -> RadialWaves:
        directions = rng.normal(size=(count, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        vectors = directions * rng.uniform(1.0, 3.0, size=(count, 1))
        return cls(vectors, rng.normal(0.0, amplitude, size=count), rng.uniform(0, 2 * np.pi, size=count))

    @property
    def max_gain(self) -> float:
        return 1.0 + float(np.abs(self.amplitudes).sum())

    def radius(self, directions: np.ndarray) -> np.ndarray:
        result = np.ones(directions.shape[1], dtype=np.float32)
        for vector, amplitude, phase in zip(self.vectors, self.amplitudes, self.phases, strict=True):
            angle = _weighted_rows(vector, directions)
            angle += np.float32(phase)
            np.cos(angle, out=angle)
            result += np.float32(amplitude) * angle
        return result


@dataclass(frozen=True)
class Blob:
    """A randomly deformed, optionally tapered ellipsoid: the model of a solid organ.

    ``taper`` narrows the cross-section (local y, z) linearly along local x, from ``1 + taper`` at the +x
    end to ``1 - taper`` at the -x end, giving wedge-like livers and a sacrum that narrows downwards.
    """

    centre: np.ndarray
    semi: np.ndarray
    rot: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    waves: RadialWaves = dataclasses.field(default_factory=RadialWaves)
    taper: float = 0.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = self.waves.max_gain * (1.0 + abs(self.taper))
        half = np.sqrt(((self.rot * self.semi) ** 2).sum(axis=1)) * reach
        return self.centre - half, self.centre + half

    def field(self, points: np.ndarray) -> np.ndarray:
        q = _local(points, self.centre, self.rot)
        u = q / self.semi.astype(np.float32)[:, None]
        if self.taper:
            scale = 1.0 + np.float32(self.taper) * np.clip(u[0], -1.0, 1.0)
            u[1] /= scale
            u[2] /= scale
        r = np.sqrt((u * u).sum(axis=0))
        r_safe = np.maximum(r, _EPS)
        target = self.waves.radius(u / r_safe) if len(self.waves.amplitudes) else np.float32(1.0)
        # Distance along the ray from the centre: (r - target) · |q| / r, where |q| / r is the length of one
        # unit of u along this ray (any semi-axis will do at the centre itself).
        mm_per_unit = np.where(r > _EPS, np.sqrt((q * q).sum(axis=0)) / r_safe, np.float32(self.semi.min()))
        return (r - target) * mm_per_unit


@dataclass(frozen=True)
class EllipticCylinder:
    """An elliptic cylinder along patient z with a wavy outline: trunk wall layers (skin, muscle, cavity)."""

    centre_xy: np.ndarray
    semi_xy: np.ndarray
    orders: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=int))
    amplitudes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    phases: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = self.semi_xy * (1.0 + float(np.abs(self.amplitudes).sum()))
        lo, hi = _unbounded()
        lo[:2], hi[:2] = self.centre_xy - half, self.centre_xy + half
        return lo, hi

    def field(self, points: np.ndarray) -> np.ndarray:
        qx = points[0] - np.float32(self.centre_xy[0])
        qy = points[1] - np.float32(self.centre_xy[1])
        ux, uy = qx / np.float32(self.semi_xy[0]), qy / np.float32(self.semi_xy[1])
        r = np.maximum(np.sqrt(ux * ux + uy * uy), np.float32(_EPS))
        target = np.ones_like(r)
        # The outline only matters for points within reach of the waves; elsewhere r - 1 has the right sign.
        reach = float(np.abs(self.amplitudes).sum())
        band = np.flatnonzero(np.abs(r - 1.0) < reach)
        # cos(nθ + φ) from cos θ and sin θ by the angle-addition recurrence: no arctan, no cosine per point.
        cos1, sin1 = ux[band] / r[band], uy[band] / r[band]
        cos_n, sin_n = np.ones_like(cos1), np.zeros_like(cos1)
        terms = dict(zip(self.orders.tolist(), zip(self.amplitudes, self.phases, strict=True), strict=True))
        outline = np.ones_like(cos1)
        for order in range(1, max(terms, default=0) + 1):
            cos_n, sin_n = cos_n * cos1 - sin_n * sin1, sin_n * cos1 + cos_n * sin1
            if order in terms:
                amplitude, phase = terms[order]
                outline += np.float32(amplitude * np.cos(phase)) * cos_n
                outline -= np.float32(amplitude * np.sin(phase)) * sin_n
        target[band] = outline
        mm_per_unit = np.where(r > _EPS, np.sqrt(qx * qx + qy * qy) / r, np.float32(self.semi_xy.min()))
        return (r - target) * mm_per_unit


@dataclass(frozen=True)
class HalfSpace:
    """Points with n·(p - origin) < 0: a cutting plane for intersections."""

    origin: np.ndarray
    normal: np.ndarray

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Unbounded, except along the axis of an axis-aligned normal, which keeps boxes tight."""
        lo, hi = _unbounded()
        axes = np.flatnonzero(self.normal)
        if axes.size == 1:
            axis = int(axes[0])
            (hi if self.normal[axis] > 0 else lo)[axis] = self.origin[axis]
        return lo, hi

    def field(self, points: np.ndarray) -> np.ndarray:
        unit = self.normal / np.sqrt(np.sum(self.normal * self.normal))  # np.linalg.norm would call BLAS
        return _weighted_rows(unit, points) - np.float32(np.sum(unit * self.origin))


@dataclass
class Tube:
    """A curved tube of varying radius around a cubic-spline centreline: vessels, bowel, ducts.

    The centreline is sampled every ``step_mm`` and distances come from a k-d tree of the samples, so any
    bend works and the error of the sampling (≤ step²/8r) stays far below a voxel.
    """

    centreline: np.ndarray
    radii: np.ndarray
    _tree: cKDTree = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._tree = cKDTree(self.centreline)

    @classmethod
    def through(cls, controls: np.ndarray, radii: np.ndarray, step_mm: float = 0.5) -> Tube:
        """Spline through ``controls`` (n×3) with radii given at the control points."""
        controls = np.asarray(controls, dtype=float)
        chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(controls, axis=0), axis=1))])
        samples = np.linspace(0.0, chord[-1], max(2, int(np.ceil(chord[-1] / step_mm)) + 1))
        centreline = CubicSpline(chord, controls, axis=0, bc_type="natural")(samples)
        return cls(centreline, np.interp(samples, chord, np.asarray(radii, dtype=float)))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = float(self.radii.max())
        return self.centreline.min(axis=0) - reach, self.centreline.max(axis=0) + reach

    def pieces(self, length_mm: float = 30.0, step_mm: float = 0.5) -> tuple[Tube, ...]:
        """The same tube as consecutive pieces (sharing their end samples).

        A tube is the union of balls around its samples, so the pieces' union is exactly the tube, and
        each piece's box is small: a diagonal vessel no longer makes the whole box between its ends
        go through the distance query.
        """
        count = max(2, int(round(length_mm / step_mm)))
        starts = range(0, max(len(self.radii) - 1, 1), count)
        return tuple(Tube(self.centreline[i : i + count + 1], self.radii[i : i + count + 1]) for i in starts)

    def field(self, points: np.ndarray) -> np.ndarray:
        cutoff = float(self.radii.max()) + 2.0
        distance, index = self._tree.query(points.T, distance_upper_bound=cutoff)
        far = ~np.isfinite(distance)
        index[far] = 0
        return np.where(far, cutoff, distance - self.radii[index]).astype(np.float32)


@dataclass(frozen=True)
class Offset:
    """Grow (``by`` > 0) or shrink (``by`` < 0) a shape by a distance in mm."""

    base: Shape
    by: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.base.bounds()
        return lo - max(self.by, 0.0), hi + max(self.by, 0.0)

    def field(self, points: np.ndarray) -> np.ndarray:
        return self.base.field(points) - np.float32(self.by)


@dataclass(frozen=True)
class Shell:
    """The sheet of a given thickness centred on a shape's surface: a wall or the diaphragm."""

    base: Shape
    thickness: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.base.bounds()
        return lo - self.thickness, hi + self.thickness

    def field(self, points: np.ndarray) -> np.ndarray:
        return np.abs(self.base.field(points)) - np.float32(self.thickness / 2.0)


@dataclass(frozen=True)
class Intersect:
    """Points inside every part; later parts are only evaluated where the earlier ones are all inside,
    so put the cheapest, most selective parts first."""

    parts: tuple[Shape, ...]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        boxes = [part.bounds() for part in self.parts]
        return np.max([lo for lo, _ in boxes], axis=0), np.min([hi for _, hi in boxes], axis=0)

    def field(self, points: np.ndarray) -> np.ndarray:
        result = self.parts[0].field(points)
        for part in self.parts[1:]:
            live = np.flatnonzero(result < 0)
            if live.size == 0:
                break
            result[live] = np.maximum(result[live], part.field(points[:, live]))
        return result


@dataclass(frozen=True)
class Subtract:
    """Points inside ``base`` and outside ``cut`` (evaluated only inside ``base``)."""

    base: Shape
    cut: Shape

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.base.bounds()

    def field(self, points: np.ndarray) -> np.ndarray:
        result = self.base.field(points)
        live = np.flatnonzero(result < 0)
        if live.size:
            result[live] = np.maximum(result[live], -self.cut.field(points[:, live]))
        return result
