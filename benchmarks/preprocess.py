"""Preprocessing throughput and worker memory: our dask-parallel ``preprocess_cases`` vs a naive loop.

Generates CT-like int16 NIfTI volumes (body, lungs, organs, spine, noise; LPS-flipped like most NIfTI
exports) in a temporary directory, then times in the same run:

* naive: one process, per case ``ReadImage -> Resample (1.5 mm) -> clip/z-score -> WriteImage(.nii.gz)``
  for the image and the label (SimpleITK multithreaded over all cores, as a user gets by default);
* naive, uncompressed: the same loop writing ``.nii``, to separate the cost of gzip from parallelism;
* ours: ``preprocess_cases`` on a dask LocalCluster (canonical grid, .npy output, cache), then once more
  with every case cached.

Peak memory is sampled with psutil from a background thread (every 20 ms): the benchmark process for the
naive loops, every worker process for ours. One volume = the input grid as float32.

    python benchmarks/preprocess.py --cases 4 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import psutil
import SimpleITK as sitk
from distributed import Client, LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout, no install

from iris_pipelines.collection.preprocessing import PreprocessParams, SchedulerParams, preprocess_cases  # noqa: E402
from iris_pipelines.imaging.io import file_sha256  # noqa: E402

LABELS = {"1": "liver", "2": "spleen", "3": "kidney_left", "4": "kidney_right"}
LPS_FLIP = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
MIB = 2**20


class RssSampler:
    """Peak resident memory per process and CPU seconds, sampled in a thread; ``children`` samples the
    worker processes (their last CPU reading counts, so up to one interval per process is missed)."""

    def __init__(self, children: bool, interval_s: float = 0.02) -> None:
        self._root = psutil.Process()
        self._children = children
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peaks: dict[int, int] = {}
        self._child_cpu: dict[int, float] = {}
        self._own_cpu = 0.0

    def _processes(self) -> list[psutil.Process]:
        return self._root.children(recursive=True) if self._children else [self._root]

    def _run(self) -> None:
        while not self._stop.is_set():
            for process in self._processes():
                try:
                    with process.oneshot():
                        rss = process.memory_info().rss
                        times = process.cpu_times()
                except psutil.Error:
                    continue
                self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss)
                if self._children:
                    self._child_cpu[process.pid] = times.user + times.system
            time.sleep(self._interval)

    def _own_seconds(self) -> float:
        times = self._root.cpu_times()
        return times.user + times.system

    def __enter__(self) -> RssSampler:
        self._own_cpu = -self._own_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._own_cpu += self._own_seconds()

    @property
    def cpu_seconds(self) -> float:
        """CPU time of this process (all its threads) plus, with ``children``, of the worker processes."""
        return self._own_cpu + sum(self._child_cpu.values())

    def top(self, n: int) -> list[int]:
        """The ``n`` largest peaks (the workers; the resource tracker stays small)."""
        return sorted(self.peaks.values(), reverse=True)[:n]


def _ellipse(
    xx: np.ndarray, yy: np.ndarray, centre: tuple[float, float], radii: tuple[float, float]
) -> np.ndarray:
    return ((xx - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 < 1.0


def ct_like_volume(size: tuple[int, int, int], spacing: tuple[float, float, float], seed: int):
    """An int16 HU volume and its uint8 organ label, built slice by slice to keep generation lean."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    xx, yy = np.meshgrid((np.arange(nx) - nx / 2) * spacing[0], (np.arange(ny) - ny / 2) * spacing[1])
    shift = rng.uniform(-10, 10, 2)
    height = nz * spacing[2]
    image = np.empty((nz, ny, nx), dtype=np.int16)
    label = np.zeros((nz, ny, nx), dtype=np.uint8)
    # (label, HU, centre x/y/z in mm from the middle, radii x/y/z in mm)
    organs = [
        (1, 60, -60, 10, 0.1, 85, 70, 0.2),
        (2, 50, 80, 30, 0.1, 35, 45, 0.12),
        (3, 30, -45, 55, -0.15, 25, 30, 0.1),
        (4, 30, 45, 55, -0.15, 25, 30, 0.1),
    ]
    for k in range(nz):
        z = (k - nz / 2) * spacing[2]
        hu = np.full((ny, nx), -1000.0, dtype=np.float32)
        hu[_ellipse(xx, yy, (shift[0], shift[1]), (170, 120))] = 40.0
        if z > 0.2 * height:
            hu[_ellipse(xx, yy, (-70 + shift[0], shift[1]), (55, 70))] = -850.0
            hu[_ellipse(xx, yy, (70 + shift[0], shift[1]), (55, 70))] = -850.0
        for value, organ_hu, cx, cy, cz, rx, ry, rz in organs:
            dz = (z - cz * height) / (rz * height)
            if abs(dz) < 1:
                scale = np.sqrt(1 - dz**2)
                inside = _ellipse(xx, yy, (cx + shift[0], cy + shift[1]), (rx * scale, ry * scale))
                hu[inside] = organ_hu
                label[k][inside] = value
        hu[_ellipse(xx, yy, (shift[0], 85 + shift[1]), (16, 16))] = 700.0
        hu += rng.standard_normal((ny, nx), dtype=np.float32) * 20.0
        image[k] = np.clip(hu, -1024, 3071)
    return image, label


def write_case(root: Path, index: int, size, spacing) -> dict:
    image, label = ct_like_volume(size, spacing, seed=index)
    paths = {}
    origin = (size[0] / 2 * spacing[0], size[1] / 2 * spacing[1], -size[2] / 2 * spacing[2])
    for kind, array in (("image", image), ("label", label)):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing(spacing)
        volume.SetOrigin(origin)
        volume.SetDirection(LPS_FLIP)
        paths[kind] = root / f"case{index:03d}_{kind}.nii.gz"
        sitk.WriteImage(volume, str(paths[kind]), useCompression=True)
    return {
        "dataset": "bench",
        "case_id": f"case{index:03d}",
        "subject_id": f"s{index:03d}",
        "modality": "CT",
        "heldout": False,
        "layout": "csv",
        "image_path": str(paths["image"]),
        "label_path": str(paths["label"]),
        "image_format": "nifti",
        "size": list(size),
        "spacing": list(spacing),
        "origin": list(origin),
        "direction": list(LPS_FLIP),
        "labels": json.dumps(LABELS),
        "image_sha256": file_sha256(paths["image"]),
        "label_sha256": file_sha256(paths["label"]),
    }


def naive_resample(image: sitk.Image, target: float, interpolator: int, pixel_type: int) -> sitk.Image:
    size = [round(n * s / target) for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        interpolator,
        image.GetOrigin(),
        (target,) * 3,
        image.GetDirection(),
        -1024.0 if pixel_type == sitk.sitkFloat32 else 0,
        pixel_type,
    )


def naive_case(row: dict, out: Path, target: float, compress: bool) -> None:
    """What a first script does: SimpleITK in, numpy in between, NIfTI out."""
    suffix = ".nii.gz" if compress else ".nii"
    image = naive_resample(sitk.ReadImage(row["image_path"]), target, sitk.sitkLinear, sitk.sitkFloat32)
    array = np.clip(sitk.GetArrayFromImage(image), -990, 500)
    array = (array - array.mean()) / array.std()
    normalised = sitk.GetImageFromArray(array.astype(np.float32))
    normalised.CopyInformation(image)
    sitk.WriteImage(normalised, str(out / f"{row['case_id']}_image{suffix}"), useCompression=compress)
    label = naive_resample(
        sitk.ReadImage(row["label_path"]), target, sitk.sitkNearestNeighbor, sitk.sitkUInt8
    )
    sitk.WriteImage(label, str(out / f"{row['case_id']}_label{suffix}"), useCompression=compress)


class Run(NamedTuple):
    seconds: float
    peaks: list[int]
    load: float  # 1-minute load average when the run started: other work on the machine shows up here
    cpu_seconds: float


def timed(run: Callable[[], object], children: bool, n_peaks: int) -> Run:
    load = psutil.getloadavg()[0]
    with RssSampler(children) as sampler:
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
    return Run(elapsed, sampler.top(n_peaks), load, sampler.cpu_seconds)


def idle_worker_rss(memory_limit: str) -> int:
    """RSS of a worker that has imported the preprocessing module but holds no volume."""
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):

        def probe() -> int:
            import iris_pipelines.collection.preprocessing  # noqa: F401, PLC0415 - what a worker loads

            return psutil.Process().memory_info().rss

        return next(iter(client.run(probe).values()))


def measure(rows: list[dict], root: Path, args: argparse.Namespace, repeat: int) -> dict[str, Run]:
    """One round of every variant, back to back, so load from other work hits them alike."""
    runs = {}
    for name, compress in (("naive, .nii.gz out", True), ("naive, .nii out", False)):
        out = root / f"naive-{repeat}-{compress}"
        out.mkdir()
        runs[name] = timed(
            lambda o=out, c=compress: [naive_case(r, o, args.target, c) for r in rows],
            children=False,
            n_peaks=1,
        )
    params = PreprocessParams(
        target_spacing=(args.target,) * 3,
        output_dir=str(root / f"volumes-{repeat}"),
        strict=True,
        scheduler=SchedulerParams(kind="local", n_workers=args.workers, memory_limit=args.memory_limit),
    )
    manifest = pd.DataFrame(rows)
    for name in ("ours (dask, .npy out)", "ours, all cached"):
        runs[name] = timed(lambda: preprocess_cases(manifest, params), children=True, n_peaks=args.workers)
    print(f"round {repeat}: " + ", ".join(f"{n} {r.seconds:.1f} s" for n, r in runs.items()), flush=True)
    return runs


def report(rounds: list[dict[str, Run]], args: argparse.Namespace, idle: int) -> None:
    """Median and fastest round: on a shared machine the fastest round is the least disturbed one."""
    volume_bytes = int(np.prod(args.size)) * 4
    median = {name: statistics.median(r[name].seconds for r in rounds) for name in rounds[0]}
    best = {name: min(r[name].seconds for r in rounds) for name in rounds[0]}
    print(
        f"\n{args.cases} cases of {'x'.join(map(str, args.size))} int16 at {tuple(args.spacing)} mm -> "
        f"{args.target} mm; {args.workers} workers; {os.cpu_count()} CPUs; "
        f"Python {platform.python_version()}; {len(rounds)} round(s)"
    )
    print(
        f"one volume (input grid, float32) = {volume_bytes / MIB:.0f} MiB; "
        f"idle worker RSS = {idle / MIB:.0f} MiB\n"
    )
    print(
        "| run | wall s: median (each round) | cases/s (median / best) | vs naive .nii.gz (median / best) "
        "| CPU s per case | peak RSS per process | peak / volume | load at start |"
    )
    print("|---|---|---|---|---|---|---|---|")
    naive = "naive, .nii.gz out"
    for name, seconds in median.items():
        peak = max(max(r[name].peaks) for r in rounds)
        each = ", ".join(f"{r[name].seconds:.1f}" for r in rounds)
        loads = ", ".join(f"{r[name].load:.1f}" for r in rounds)
        cpu = statistics.median(r[name].cpu_seconds for r in rounds) / args.cases
        print(
            f"| {name} | {seconds:.1f} ({each}) | "
            f"{args.cases / seconds:.3f} / {args.cases / best[name]:.3f} | "
            f"{median[naive] / seconds:.2f}x / {best[naive] / best[name]:.2f}x | {cpu:.2f} | "
            f"{peak / MIB:.0f} MiB | {peak / volume_bytes:.2f}x | {loads} |"
        )
    ours_peak = max(max(r["ours (dask, .npy out)"].peaks) for r in rounds)
    print(
        f"\nours: peak worker RSS minus idle worker = {(ours_peak - idle) / MIB:.0f} MiB "
        f"= {(ours_peak - idle) / volume_bytes:.2f}x one volume"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all variants; the median is shown")
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 200), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), metavar=("X", "Y", "Z"))
    parser.add_argument("--target", type=float, default=1.5, help="target spacing in mm")
    parser.add_argument("--memory-limit", default="4GiB", help="dask memory limit per worker")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="iris-bench-") as tmp:
        root = Path(tmp)
        (root / "raw").mkdir()
        start = time.perf_counter()
        rows = [write_case(root / "raw", i, tuple(args.size), tuple(args.spacing)) for i in range(args.cases)]
        print(f"generated {args.cases} cases in {time.perf_counter() - start:.1f} s", flush=True)
        rounds = [measure(rows, root, args, repeat) for repeat in range(args.repeats)]
    report(rounds, args, idle_worker_rss(args.memory_limit))


if __name__ == "__main__":
    main()
