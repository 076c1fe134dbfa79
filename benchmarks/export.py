"""Cost and accuracy of sending a prediction back to the scan's grid: nearest-neighbour label maps against
interpolated logits (what ``iris segment`` and ``evaluate`` do), with and without ``--save-probabilities``.

A CT-sized scan (default 512×512×300 voxels at 0.8×0.8×1.5 mm, LPS-flipped like most NIfTI exports;
``--oblique`` tilts it by 20° about two axes) holds K ellipsoid "organs" of 20–90 mm. The prediction on
the canonical 1.5 mm grid is each organ's signed distance as logits (1 per mm, positive inside), so the
true boundary is known in world space. Timed in the same run:

* ``nearest``: ``logits_to_labels`` on the canonical grid, then the label map resampled by nearest
  neighbour (the export before 2026-12-06);
* ``interpolated``: :func:`~iris_pipelines.inference.volume.to_original_grid`, each class's logits
  linearly interpolated onto the scan's grid and the label map decided there;
* ``interpolated_probabilities``: the same, also returning the K probability volumes.

Dice against the organs drawn on the scan's own grid says what the extra time buys. Peak memory is the
rise of the process's RSS (psutil). Needs SimpleITK (not a GPU benchmark: the export runs on the CPU).

    python benchmarks/export.py --classes 1 5 15
    python benchmarks/export.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakMemory, print_table, report_header, summarise, write_json  # noqa: E402

from iris_pipelines.imaging.geometry import Geometry  # noqa: E402
from iris_pipelines.imaging.resample import canonical_geometry, restore_geometry  # noqa: E402
from iris_pipelines.inference.strategies import logits_to_labels  # noqa: E402
from iris_pipelines.inference.volume import CanonicalVolume, to_original_grid  # noqa: E402

CPU = torch.device("cpu")


def scan_geometry(size: tuple[int, int, int], spacing: tuple[float, ...], oblique: bool) -> Geometry:
    direction = np.diag([-1.0, -1.0, 1.0])  # LPS-flipped
    if oblique:
        a = np.deg2rad(20.0)
        tilt_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        tilt_y = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        direction = tilt_y @ tilt_x @ direction
    half = (np.asarray(size) - 1) / 2 * np.asarray(spacing)
    origin = -direction @ half  # the scan centred on the world origin
    return Geometry(size, spacing, tuple(origin), tuple(direction.ravel()))


def organs(count: int, extent_mm: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centre, semi-axes) in mm of ``count`` ellipsoids inside the middle of the field of view."""
    rng = np.random.default_rng(seed)
    return [(rng.uniform(-0.3, 0.3, 3) * extent_mm, rng.uniform(10.0, 45.0, 3)) for _ in range(count)]


def signed_distance(world: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Approximate signed distance in mm to an ellipsoid's surface, positive inside."""
    radius = np.linalg.norm((world - centre) / axes, axis=-1)
    return (1.0 - radius) * np.min(axes)


def world_of(geometry: Geometry, z: int) -> np.ndarray:
    """World coordinates (y, x, 3) of slice ``z`` of ``geometry``."""
    size_x, size_y, _ = geometry.size
    columns, rows = np.meshgrid(np.arange(size_x), np.arange(size_y), indexing="xy")
    ijk = np.stack([columns.ravel(), rows.ravel(), np.full(columns.size, z)], axis=1)
    return geometry.index_to_world(ijk).reshape(size_y, size_x, 3)


def draw(geometry: Geometry, shapes: list, *, logits: bool) -> np.ndarray:
    """Per-class signed distances (K, z, y, x) as float32 logits, or the label map (z, y, x) of the truth."""
    size_x, size_y, size_z = geometry.size
    out = (
        np.empty((len(shapes), size_z, size_y, size_x), np.float32)
        if logits
        else np.zeros((size_z, size_y, size_x), np.uint8)
    )
    for z in range(size_z):
        world = world_of(geometry, z)
        for k, (centre, axes) in enumerate(shapes):
            distance = signed_distance(world, centre, axes)
            if logits:
                out[k, z] = distance
            else:
                out[z][distance > 0] = k + 1  # later organs win overlaps, as the largest logit would
    return out


def nearest_export(logits: torch.Tensor, volume: CanonicalVolume, labels: list[int]) -> np.ndarray:
    label_map = logits_to_labels(logits, labels).numpy().astype(np.uint8)
    canonical = volume.grid.apply_to(sitk.GetImageFromArray(label_map))
    return sitk.GetArrayFromImage(restore_geometry(canonical, volume.original, is_label=True))


def interpolated_export(
    logits: torch.Tensor, volume: CanonicalVolume, labels: list[int], *, probabilities: bool
) -> np.ndarray:
    exported = to_original_grid(logits, volume, labels, probabilities=probabilities)
    return sitk.GetArrayFromImage(exported.labels)


def mean_dice(predicted: np.ndarray, truth: np.ndarray, labels: list[int]) -> float:
    scores = []
    for value in labels:
        a, b = predicted == value, truth == value
        total = int(a.sum()) + int(b.sum())
        scores.append(2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0)
    return float(np.mean(scores))


def measure(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, float], float, Any]:
    times, peak, result = [], 0.0, None
    for _ in range(repeats):
        with PeakMemory(CPU) as memory:
            started = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - started)
        peak = max(peak, memory.peak_mib)
        del result
    result = fn()
    return summarise(times), peak, result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], help="scan voxels x y z")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5], help="scan mm")
    parser.add_argument("--target-spacing", type=float, default=1.5, help="the model's grid, mm")
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 5, 15])
    parser.add_argument("--oblique", action="store_true")
    parser.add_argument("--probabilities-up-to", type=int, default=5, help="largest K with probabilities")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="ITK and torch threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="a 160×160×80 scan, K = 1 and 3, 1 repeat")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.classes, args.repeats = [160, 160, 80], [1, 3], 1
    if args.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
        torch.set_num_threads(args.threads)

    original = scan_geometry(tuple(args.size), tuple(args.spacing), args.oblique)
    grid = canonical_geometry(original, args.target_spacing)
    extent = np.asarray(args.size) * np.asarray(args.spacing)
    rows = []
    for count in args.classes:
        shapes = organs(count, extent, seed=count)
        labels = list(range(1, count + 1))
        truth = draw(original, shapes, logits=False)
        logits = torch.from_numpy(draw(grid, shapes, logits=True))[None]
        volume = CanonicalVolume(np.empty(grid.size[::-1], np.float32), original, grid)
        cases: dict[str, Callable[[], np.ndarray]] = {
            "nearest": partial(nearest_export, logits, volume, labels),
            "interpolated": partial(interpolated_export, logits, volume, labels, probabilities=False),
        }
        if count <= args.probabilities_up_to:
            cases["interpolated_probabilities"] = partial(
                interpolated_export, logits, volume, labels, probabilities=True
            )
        baseline = None
        for name, fn in cases.items():
            timing, peak, predicted = measure(fn, args.repeats)
            baseline = baseline or timing["median_s"]
            rows.append(
                {
                    "K": count,
                    "case": name,
                    "median_s": timing["median_s"],
                    "x_nearest": timing["median_s"] / baseline,
                    "peak_rss_rise_mib": peak,
                    "mean_dice": mean_dice(predicted, truth, labels),
                }
            )
            del predicted
        print_table(
            rows[-len(cases) :], ["K", "case", "median_s", "x_nearest", "peak_rss_rise_mib", "mean_dice"]
        )
    payload = {
        **report_header("export", argv, CPU, args, scan_voxels=int(np.prod(args.size)), canonical=grid.size),
        "results": rows,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
