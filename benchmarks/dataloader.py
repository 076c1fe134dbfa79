"""Episode loading throughput: the training DataLoader with N workers against the GPU's training step rate.

Builds the loader exactly as the train loop does (``training.sampler.EpisodeSampler`` behind
``StepDataset``, one batch per step, ``batch_size=None``, pinned on CUDA) over preprocessed volumes, and
measures batches/s (and episodes/s) on the device (``batch_to_device``, as the loop moves them) after a
warm-up per worker count. The ratio that matters is loader batches/s over GPU steps/s at the same
per-GPU batch (target ≥ 1.5 with 8 workers). The step rate comes from
``--step-rate``, or from a ``train_step.py`` JSON (``--train-json``, the Iris row at this batch), or is
measured in this process with ``train_step.py``'s Iris step on ``--device``.

Data: the preprocessed volumes listed by ``--manifest`` (a ``preprocessed_manifest`` parquet, or its
Kedro versioned folder: the newest version is read), by default ``data/05_model_input`` when present;
otherwise (or with ``--synthetic``) ``--cases`` CT-sized volumes (default 300×273×273 float32, i.e. a
512×512×300 scan at 0.8×0.8×1.5 mm resampled to 1.5 mm) with 4 box-shaped organs are written as ``.npy``
to a temporary folder. Freshly written files sit in the page cache, so this measures decoding, cropping
and augmentation, not a cold shared file system.

    python benchmarks/dataloader.py --device cuda --workers 0 2 4 8 --train-json results/train_step.json
    python benchmarks/dataloader.py --quick --synthetic     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ROOT,
    IncrementalReport,
    error_row,
    fill_unset,
    print_table,
    report_header,
    resolve_device,
    set_fast_math,
    synchronize,
)

DEFAULT_MANIFEST = ROOT / "data" / "05_model_input" / "preprocessed_manifest.parquet"
LABELS = {"1": "liver", "2": "spleen", "3": "kidney_left", "4": "kidney_right"}


def read_manifest(path: Path) -> pd.DataFrame:
    """A parquet file, or a Kedro versioned dataset folder (``<name>/<version>/<name>``): the newest."""
    if path.is_dir():
        versions = sorted(p for p in path.iterdir() if p.is_dir())
        if not versions:
            raise FileNotFoundError(f"{path} has no versions")
        path = versions[-1] / path.name
    return pd.read_parquet(path)


def synthesize(root: Path, cases: int, shape: tuple[int, int, int]) -> pd.DataFrame:
    """``cases`` CT-like volumes (float32 image, uint8 label with 4 box organs) as .npy, plus a manifest."""
    rng = np.random.default_rng(0)
    rows = []
    z, y, x = shape
    for i in range(cases):
        image = np.lib.format.open_memmap(root / f"case{i:03d}_img.npy", "w+", np.float32, shape)
        label = np.lib.format.open_memmap(root / f"case{i:03d}_lab.npy", "w+", np.uint8, shape)
        for s in range(0, z, 32):  # slab by slab, to keep the writer's memory small
            image[s : s + 32] = rng.standard_normal((min(32, z - s), y, x), dtype=np.float32)
        voxels, boxes = {}, {}
        for key in LABELS:
            lo = [int(rng.integers(n // 8, n // 2)) for n in shape]
            hi = [lo[a] + max(2, shape[a] // 6) for a in range(3)]
            label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = int(key)
            image[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += 1.0
        for key in LABELS:  # after all boxes: later boxes may cover earlier ones
            where = np.argwhere(label == int(key))
            voxels[key] = len(where)
            if len(where):
                boxes[key] = [*where.min(0).tolist(), *(where.max(0) + 1).tolist()]
        image.flush()
        label.flush()
        del image, label
        rows.append(
            {
                "dataset": "synthetic_ct",
                "case_id": f"case{i:03d}",
                "subject_id": f"subject{i:03d}",
                "image_array": str(root / f"case{i:03d}_img.npy"),
                "label_array": str(root / f"case{i:03d}_lab.npy"),
                "labels": json.dumps(LABELS),
                "class_voxels": json.dumps(voxels),
                "class_bboxes": json.dumps(boxes),
            }
        )
    return pd.DataFrame(rows)


def all_train_index(manifest: pd.DataFrame) -> dict[str, Any]:
    """An episode index that puts every case in the train split (loading speed does not depend on splits)."""
    classes: dict[str, dict[str, str]] = {}
    for row in manifest.to_dict("records"):
        voxels = row["class_voxels"]
        voxels = json.loads(voxels) if isinstance(voxels, str) else voxels
        classes.setdefault(row["dataset"], {}).update({str(k): str(k) for k, v in voxels.items() if v})
    cases = [
        {"dataset": r["dataset"], "case_id": r["case_id"], "split": "train", "heldout": False}
        for r in manifest.to_dict("records")
    ]
    return {"cases": cases, "classes": classes}


def build_sampler(manifest: pd.DataFrame, size: int, batch: int, classes: int, augment: bool = True):
    """The train loop's ``EpisodeSampler`` over every case of ``manifest``, at ``size``³ crops."""
    # training/__init__ loads the train loop lazily, so this needs torch, numpy and pandas only.
    from iris_pipelines.training import config as config_mod
    from iris_pipelines.training import sampler as sampler_mod

    records = sampler_mod.case_records(manifest)
    index = all_train_index(manifest)
    config = config_mod.TrainConfig(
        batch_size=batch, crop_size=(size,) * 3, max_classes=classes, augment=augment
    )
    return sampler_mod.EpisodeSampler(
        sampler_mod.train_pool(index, records), sampler_mod.train_class_ids(index), config
    )


def gpu_step_rate(args, device: torch.device) -> tuple[float | None, str]:
    """Training steps/s of Iris at this batch and crop: given, from a train_step JSON, or measured now."""
    if args.step_rate:
        return args.step_rate, "--step-rate"
    if args.train_json:
        # Read before the rows: a missing or failed training step leaves them without a ratio rather than
        # stopping the loader.
        try:
            payload = json.loads(Path(args.train_json).read_text())
        except (OSError, json.JSONDecodeError) as error:
            return None, f"no step rate: {args.train_json} unreadable ({error})"
        for row in payload.get("results", []):
            if row.get("model") == "iris" and row.get("batch") == args.batch and "step_ms" in row:
                return 1e3 / row["step_ms"], f"{args.train_json} (iris, batch {args.batch})"
        return None, f"no step rate: {args.train_json} has no Iris result at batch {args.batch}"
    import train_step

    step_args = [
        "--device", str(device), "--size", str(args.size), "--batch", str(args.batch),
        "--classes", str(args.classes), "--models", "iris", "--repeats", str(args.step_repeats),
    ]  # fmt: skip
    if args.quick:
        step_args.append("--quick")
    payload = train_step.main(step_args)
    row = payload["results"][0]
    return 1e3 / row["step_ms"], f"measured in-process with train_step.py {' '.join(step_args)}"


def measure_loader(sampler_mod, sampler, workers: int, args, device: torch.device) -> dict[str, Any]:
    total = args.warmup + args.batches
    loader = DataLoader(
        sampler_mod.StepDataset(sampler, total + 1),
        batch_size=None,
        sampler=list(range(1, total + 1)),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=args.prefetch if workers else None,
    )
    start = time.perf_counter()
    arrivals = []
    for batch in loader:
        # What the train loop does with each batch: to the device, masks to float32 there.
        on_device = sampler_mod.batch_to_device(batch, device)
        synchronize(device)
        arrivals.append(time.perf_counter())
        assert on_device["query"].shape[0] == args.batch
    first = arrivals[0] - start
    timed = arrivals[args.warmup :]
    span = timed[-1] - arrivals[args.warmup - 1] if args.warmup else timed[-1] - start
    rate = len(timed) / span
    return {
        "workers": workers,
        "batches_per_s": rate,
        "episodes_per_s": rate * args.batch,
        "first_batch_s": first,
        "timed_batches": len(timed),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="where the GPU step rate is measured")
    parser.add_argument("--size", type=int, default=None, help="crop edge (128)")
    parser.add_argument("--batch", type=int, default=None, help="episodes per step per GPU (2)")
    parser.add_argument("--classes", type=int, default=None, help="max_classes (4)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (0 2 4 8)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per worker count (40)")
    parser.add_argument("--warmup", type=int, default=None, help="batches before timing starts (8)")
    parser.add_argument("--prefetch", type=int, default=2, help="prefetch_factor per worker")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--manifest", type=Path, default=None, help="preprocessed_manifest parquet")
    parser.add_argument("--synthetic", action="store_true", help="always synthesise volumes")
    parser.add_argument("--cases", type=int, default=None, help="synthetic cases (8)")
    parser.add_argument("--volume-shape", type=int, nargs=3, default=None, help="synthetic z y x")
    parser.add_argument("--step-rate", type=float, default=None, help="GPU steps/s, if known")
    parser.add_argument("--train-json", type=Path, default=None, help="train_step.py JSON for the step rate")
    parser.add_argument("--skip-step-rate", action="store_true", help="report the loader alone, no ratio")
    parser.add_argument("--step-repeats", type=int, default=None, help="timed steps if measured here (10)")
    parser.add_argument("--quick", action="store_true", help="CPU-small smoke settings")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    full = {"size": 128, "batch": 2, "classes": 4, "step_repeats": 10, "workers": [0, 2, 4, 8],
            "batches": 40, "warmup": 8, "cases": 8, "volume_shape": [300, 273, 273]}  # fmt: skip
    quick = {"size": 32, "batch": 1, "classes": 2, "step_repeats": 2, "workers": [0, 2],
             "batches": 6, "warmup": 2, "cases": 3, "volume_shape": [64, 56, 56]}  # fmt: skip
    fill_unset(args, quick if args.quick else full)
    if args.quick and args.device == "auto":
        args.device = "cpu"
    device = resolve_device(args.device)
    set_fast_math(device)
    print(f"dataloader: {vars(args)}", flush=True)

    from iris_pipelines.training import sampler as sampler_mod

    with tempfile.TemporaryDirectory(prefix="iris_loader_bench_") as tmp:
        manifest_path = args.manifest or DEFAULT_MANIFEST
        if args.synthetic or not manifest_path.exists():
            started = time.perf_counter()
            manifest = synthesize(Path(tmp), args.cases, tuple(args.volume_shape))
            source = f"synthetic: {args.cases} cases of {args.volume_shape} float32 (+uint8 labels)"
            print(f"{source}, written in {time.perf_counter() - started:.1f} s", flush=True)
        else:
            manifest = read_manifest(manifest_path)
            source = f"{manifest_path} ({len(manifest)} cases)"
        sampler = build_sampler(manifest, args.size, args.batch, args.classes, args.augment)
        header = report_header(
            "dataloader", argv, device, args, manifest=str(args.manifest), train_json=str(args.train_json),
            data=source,
        )  # fmt: skip
        report = IncrementalReport(args.json, header)
        targets = {"over_step_rate_min_with_8_workers": 1.5}
        # A step rate that is only read (given, or from train_step's JSON) is known before the rows: every
        # partial report then carries each row's ratio, so a step stopped at its time limit keeps the
        # target's figure. Measured in this process it comes after the rows, which its failure must not cost.
        measure_later = not (args.skip_step_rate or args.step_rate or args.train_json)
        if args.skip_step_rate:
            step_rate, step_source = None, "skipped"
        elif measure_later:
            step_rate, step_source = None, "to be measured after the loader's rows"
        else:
            step_rate, step_source = gpu_step_rate(args, device)
        rows: list[dict[str, Any]] = []
        for workers in args.workers:
            try:
                row = measure_loader(sampler_mod, sampler, workers, args, device)
                row["over_step_rate"] = row["batches_per_s"] / step_rate if step_rate else None
            except Exception as error:  # e.g. a worker killed when /dev/shm fills: keep the other counts
                row = {"workers": workers, **error_row(error)}
            rows.append(row)
            print_table(rows[-1:], list(rows[-1]))
            report.update(
                results=rows, step_rate={"steps_per_s": step_rate, "source": step_source}, targets=targets
            )

    if measure_later:
        step_rate, step_source = gpu_step_rate(args, device)
        for row in rows:
            if "batches_per_s" in row:
                row["over_step_rate"] = row["batches_per_s"] / step_rate if step_rate else None
    print()
    print_table(rows, ["workers", "batches_per_s", "episodes_per_s", "first_batch_s", "over_step_rate"])
    if step_rate:
        print(f"GPU step rate {step_rate:.3f} steps/s ({step_source}); target: >= 1.5x with 8 workers")
    else:
        print(step_source)
    payload = report.finish(
        results=rows, step_rate={"steps_per_s": step_rate, "source": step_source}, targets=targets
    )
    if all("error" in row for row in rows):
        raise SystemExit(f"every worker count failed; the first: {rows[0]['error']}")
    return payload


if __name__ == "__main__":
    main()
