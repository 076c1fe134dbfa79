"""Episode augmentation at 128³: the boxed mask warp and reference-mask perturbation of
``training.augment`` against the dense versions they replaced, side by side in one process.

The dense versions (kept here as the reference) warp, dilate, erode or shift every class over the whole
crop; the boxed ones touch each class only where it can land and must give the same masks bit for bit.
This times ``EpisodeSampler.batch`` (the loader's work per step, from synthetic CT-sized volumes built as
``dataloader.py`` builds them) with each, alternating which goes first at every step so load changes hit
both, and checks that every batch is identical. The ratio dense / boxed is the loader speed-up.

    python benchmarks/augment.py --json results/augment.json
    python benchmarks/augment.py --quick          # CPU smoke run, 32³ crops
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fill_unset, print_table, report_header, write_json  # noqa: E402
from dataloader import build_sampler, synthesize  # noqa: E402

from iris_pipelines.training import augment, sampler  # noqa: E402


def dense_warp_masks(masks: torch.Tensor, grid: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Every class sampled over the whole crop (the implementation before the boxed one)."""
    del theta  # the grid alone defines the dense warp
    warped = F.grid_sample(
        masks[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return warped[0].to(masks.dtype)


def dense_perturb_masks(masks: torch.Tensor, gen: torch.Generator, prob: float) -> torch.Tensor:
    """``perturb_masks`` over whole crops, with the same draws in the same order."""
    out = masks.clone()
    for k in range(masks.shape[0]):
        if not augment._chance(gen, prob):
            continue
        mask = masks[k].float()
        choice = int(torch.randint(3, (), generator=gen))
        if choice == 0:
            new = F.max_pool3d(mask[None, None], 3, 1, 1)[0, 0]
        elif choice == 1:
            new = -F.max_pool3d(-mask[None, None], 3, 1, 1)[0, 0]
        else:
            axis = int(torch.randint(3, (), generator=gen))
            new = augment._shift(mask, axis, 1 if augment._chance(gen, 0.5) else -1)
        if new.any():
            out[k] = new.to(masks.dtype)
    return out


@contextlib.contextmanager
def dense() -> Iterator[None]:
    """Swap the dense versions in where the sampler looks the boxed ones up."""
    saved = augment.warp_masks, sampler.perturb_masks
    augment.warp_masks, sampler.perturb_masks = dense_warp_masks, dense_perturb_masks
    try:
        yield
    finally:
        augment.warp_masks, sampler.perturb_masks = saved


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=None, help="crop edge (128)")
    parser.add_argument("--batch", type=int, default=None, help="episodes per batch (2)")
    parser.add_argument("--classes", type=int, default=None, help="max_classes (4)")
    parser.add_argument("--cases", type=int, default=None, help="synthetic cases (3)")
    parser.add_argument("--volume-shape", type=int, nargs=3, default=None, help="synthetic z y x")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per version (12)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a loader worker has one)")
    parser.add_argument("--quick", action="store_true", help="CPU-small smoke settings")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    full = {"size": 128, "batch": 2, "classes": 4, "cases": 3, "volume_shape": [300, 273, 273],
            "batches": 12, "warmup": 2}  # fmt: skip
    quick = {"size": 32, "batch": 1, "classes": 2, "cases": 3, "volume_shape": [64, 56, 56],
             "batches": 6, "warmup": 1}  # fmt: skip
    fill_unset(args, quick if args.quick else full)
    torch.set_num_threads(args.threads)
    print(f"augment: {vars(args)}", flush=True)

    times: dict[str, list[float]] = {"dense": [], "boxed": []}
    identical = True
    with tempfile.TemporaryDirectory(prefix="iris_augment_bench_") as tmp:
        manifest = synthesize(Path(tmp), args.cases, tuple(args.volume_shape))
        episodes = build_sampler(manifest, args.size, args.batch, args.classes)
        for step in range(args.warmup + args.batches):
            order = ("dense", "boxed") if step % 2 else ("boxed", "dense")
            batches = {}
            for version in order:
                with dense() if version == "dense" else contextlib.nullcontext():
                    started = time.perf_counter()
                    batches[version] = episodes.batch(step)
                    elapsed = time.perf_counter() - started
                if step >= args.warmup:
                    times[version].append(elapsed)
            identical &= all(
                torch.equal(batches["dense"][key], batches["boxed"][key]) for key in batches["dense"]
            )

    rows = [
        {
            "version": version,
            "batch_ms": 1e3 * statistics.median(seconds),
            "batch_ms_min": 1e3 * min(seconds),
            "episodes_per_s": args.batch / statistics.median(seconds),
        }
        for version, seconds in times.items()
    ]
    ratio = rows[0]["batch_ms"] / rows[1]["batch_ms"]
    print_table(rows, ["version", "batch_ms", "batch_ms_min", "episodes_per_s"])
    print(f"dense / boxed batch time: {ratio:.2f}x; batches identical: {identical}")
    payload = {
        **report_header("augment", argv, torch.device("cpu"), args),
        "results": rows,
        "ratios": {"dense_over_boxed_batch_time": ratio},
        "identical": identical,
    }
    write_json(args.json, payload)
    if not identical:
        raise SystemExit("the boxed augmentation changed a batch: it must match the dense one bit for bit")
    return payload


if __name__ == "__main__":
    main()
