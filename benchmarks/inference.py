"""Inference cost of Iris: cached one-shot latency, 10 queries × 15 classes, sliding windows on a CT volume,
and K classes in one pass against K single-class passes, each with its peak memory.

Cases (random weights and data: speed and memory do not depend on what was learned):

* ``encode_task``: T for K classes from one S³ reference (the part a cached embedding saves);
* ``one_shot_cached``: ``segment(query, T)`` for one S³ query with T cached, K classes;
* ``ten_queries``: one reference encoded once, then 10 queries × K classes, masks kept (logits > 0); the
  paper reports 2.0 s and 7.4 GB for this (target ≤ 0.5 s and ≤ 7.4 GB);
* ``single_class`` / ``k_one_pass`` / ``k_single_passes``: ``segment`` with 1 class, K classes at once,
  and K one-class calls (target: K = 15 in one pass ≤ 1.5× one class);
* ``sliding_window``: a CT-sized scan (default 512×512×300 voxels at 0.8×0.8×1.5 mm) resampled on the
  device to 1.5 mm (``resample``), then S³ windows at 50 % overlap with Gaussian blending, K classes.

Each composite case is also reported over a reference measured in the same run (``case_ratios``): the
K-class pass over one class, the Q × K case over Q·K one-class passes and over its parts, the sliding
window over its number of windows × one cached S³ pass.

    python benchmarks/inference.py --device cuda --json results/inference.json
    python benchmarks/inference.py --quick          # CPU smoke run, tiny model, small volumes
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    IncrementalReport,
    PeakMemory,
    add_common_args,
    autocast,
    error_row,
    finish_args,
    free_memory,
    iris_config,
    maybe_compile,
    print_table,
    report_header,
    set_fast_math,
    summarise,
    time_calls,
    to_channels_last,
)

from iris_pipelines.model import Iris, count_parameters  # noqa: E402

Predictor = Callable[[Tensor], Tensor]


def _gaussian_importance(roi: Sequence[int], sigma_scale: float, device: torch.device) -> Tensor:
    axes = []
    for n in roi:
        x = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (sigma_scale * n)) ** 2))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return weight.clamp_min(max(weight.min().item(), 1e-3))  # as MONAI: corners weigh at least 1e-3


def _starts(size: int, roi: int, overlap: float) -> list[int]:
    if size <= roi:
        return [0]
    interval = max(1, int(roi * (1 - overlap)))
    count = math.ceil((size - roi) / interval) + 1
    return sorted({min(i * interval, size - roi) for i in range(count)})


def torch_sliding_window(
    predictor: Predictor, volume: Tensor, roi_size: int, overlap: float, sw_batch_size: int
) -> Tensor:
    """Gaussian-blended sliding windows (MONAI's ``mode="gaussian"``, sigma 0.125 of the window, the same
    window grid), in torch alone. Used only where MONAI is missing: the GPU benchmark machine has no
    MONAI, and the project's ``inference.sliding_window`` (what users run) needs it; otherwise that one is
    benchmarked."""
    shape = volume.shape[2:]
    roi = [min(roi_size, s) for s in shape]
    importance = _gaussian_importance(roi, 0.125, volume.device)
    windows = list(itertools.product(*(_starts(s, r, overlap) for s, r in zip(shape, roi, strict=True))))
    output: Tensor | None = None
    weight = torch.zeros(1, 1, *shape, device=volume.device)
    for i in range(0, len(windows), sw_batch_size):
        chunk = windows[i : i + sw_batch_size]
        slices = [tuple(slice(s, s + r) for s, r in zip(start, roi, strict=True)) for start in chunk]
        logits = predictor(torch.cat([volume[(..., *sl)] for sl in slices])).float()
        if output is None:
            output = torch.zeros(1, logits.shape[1], *shape, device=volume.device)
        for j, sl in enumerate(slices):
            output[(..., *sl)] += logits[j : j + 1] * importance
            weight[(..., *sl)] += importance
    assert output is not None
    return output / weight


def sliding_window_fn() -> tuple[Callable[..., Tensor], str]:
    """The project's MONAI-based ``sliding_window_logits`` when importable, else the torch fallback."""
    try:
        from iris_pipelines.inference.sliding_window import sliding_window_logits
    except ImportError:
        return torch_sliding_window, "torch fallback (MONAI not installed)"

    def run(predictor: Predictor, volume: Tensor, roi_size: int, overlap: float, sw_batch_size: int):
        return sliding_window_logits(
            predictor, volume, roi_size=roi_size, overlap=overlap, sw_batch_size=sw_batch_size
        )

    return run, "iris_pipelines.inference.sliding_window (MONAI)"


def ct_volume(shape_xyz: Sequence[int], device: torch.device) -> Tensor:
    """A (1, 1, z, y, x) CT-like float32 volume: noise around a body-sized ellipsoid."""
    x, y, z = shape_xyz
    gen = torch.Generator().manual_seed(0)
    volume = torch.randn(1, 1, z, y, x, generator=gen) * 0.1
    zz, yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, z), torch.linspace(-1, 1, y), torch.linspace(-1, 1, x), indexing="ij"
    )
    volume[0, 0] += ((xx / 0.8) ** 2 + (yy / 0.6) ** 2 + zz**2 < 1).float()
    return volume.to(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--batch", type=int, default=1, help="queries per segment call in ten_queries")
    parser.add_argument("--classes", type=int, default=None, help="K (15)")
    parser.add_argument("--queries", type=int, default=None, help="queries sharing one reference (10)")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=None, help="scan size x y z (512 512 300)")
    parser.add_argument("--ct-spacing", type=float, nargs=3, default=(0.8, 0.8, 1.5), help="mm, x y z")
    parser.add_argument("--target-spacing", type=float, default=1.5, help="mm, isotropic")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch", type=int, default=None, help="windows per segment call (2)")
    parser.add_argument("--sw-repeats", type=int, default=None, help="timed sliding-window runs (3)")
    parser.add_argument("--skip-sliding", action="store_true")
    args = finish_args(
        parser.parse_args(argv),
        full={
            "size": 128,
            "repeats": 10,
            "warmup": 3,
            "classes": 15,
            "queries": 10,
            "ct_shape": [512, 512, 300],
            "sw_batch": 2,
            "sw_repeats": 3,
        },
        quick={
            "size": 32,
            "repeats": 2,
            "warmup": 1,
            "classes": 3,
            "queries": 2,
            "ct_shape": [96, 96, 40],
            "sw_batch": 2,
            "sw_repeats": 1,
        },
    )
    device = torch.device(args.device)
    set_fast_math(device)
    print(f"inference: {vars(args)}", flush=True)
    size, k, cl = args.size, args.classes, args.channels_last

    model = Iris(iris_config(args.model)).to(device).eval()
    if cl:
        model = model.to(memory_format=torch.channels_last_3d)
    encode = maybe_compile(model.encode_task, args.compile, args.compile_mode)
    segment = maybe_compile(model.segment, args.compile, args.compile_mode)

    gen = torch.Generator().manual_seed(0)

    def volume(batch: int = 1) -> Tensor:
        return to_channels_last(torch.randn(batch, 1, size, size, size, generator=gen).to(device), cl)

    ref = volume()
    coarse = (torch.rand(1, k, max(1, size // 8), *(max(1, size // 8),) * 2, generator=gen) > 0.7).float()
    ref_masks = to_channels_last(F.interpolate(coarse, size=(size,) * 3, mode="nearest").to(device), cl)
    queries = [volume() for _ in range(args.queries)]

    def run(fn: Callable[[], Any], repeats: int | None = None, warmup: int | None = None) -> dict[str, Any]:
        free_memory(device)
        with torch.inference_mode(), autocast(device, args.precision):
            fn()  # compile / autotune / allocate outside the measured block
            with PeakMemory(device) as memory:
                times = time_calls(
                    fn, device, repeats or args.repeats, args.warmup if warmup is None else warmup
                )
        stats = summarise(times)
        return {"seconds": stats["median_s"], "seconds_min": stats["min_s"], **memory.as_dict()}

    slide, sliding_impl = sliding_window_fn() if not args.skip_sliding else (None, None)
    header = report_header(
        "inference",
        argv,
        device,
        args,
        params_m=count_parameters(model) / 1e6,
        sliding_window_impl=sliding_impl,
    )
    report = IncrementalReport(args.json, header)
    targets = {
        "ten_queries_seconds_max": 0.5,
        "ten_queries_peak_gb_max": 7.4,
        "k_one_pass_over_single_class_max": 1.5,
        "paper_ten_queries": {"seconds": 2.0, "peak_gb": 7.4},
    }
    # The cached task of the cases below. Compiled, this is the first compilation: an error or OOM here is
    # recorded as encode_task's row and the step goes on with the cases that do not encode.
    encode_failure: dict[str, str] | None = None
    try:
        with torch.inference_mode(), autocast(device, args.precision):
            task = encode(ref, ref_masks)
    except Exception as error:
        encode_failure = error_row(error)
    if encode_failure is not None:  # outside the except block, whose traceback holds the failed frames
        free_memory(device)
    rows: list[dict[str, Any]] = []

    def add(case: str, classes: int, fn: Callable[[], Any], repeats: int | None = None,
            warmup: int | None = None, encodes: bool = True, **extra: Any) -> None:  # fmt: skip
        if encode_failure is not None and encodes:
            # Not run: it would compile (or run out of memory in) the failed encoder again, or needs its T.
            result = encode_failure if case == "encode_task" else {"error": "skipped: encode_task failed"}
        else:
            try:
                result = run(fn, repeats, warmup)
            except Exception as error:  # a kernel that fails or runs out of memory: keep the other cases
                result = error_row(error)
        rows.append({"case": case, "classes": classes, **result, **extra})
        print_table(rows[-1:], list(rows[-1]))
        report.update(results=rows, ratios=case_ratios(rows), targets=targets)

    add("encode_task", k, lambda: encode(ref, ref_masks))
    add("one_shot_cached", k, lambda: segment(queries[0], task))

    def ten_queries() -> list[Tensor]:
        t = encode(ref, ref_masks)
        masks = []
        for i in range(0, len(queries), args.batch):
            chunk = torch.cat(queries[i : i + args.batch]) if args.batch > 1 else queries[i]
            masks.append(segment(chunk, t) > 0)
        return masks

    add(f"{args.queries}_queries", k, ten_queries, queries=args.queries, query_batch=args.batch)
    add("single_class", 1, lambda: segment(queries[0], task[:, :1]))
    add("k_one_pass", k, lambda: segment(queries[0], task))

    def k_single_passes() -> None:
        for c in range(k):
            segment(queries[0], task[:, c : c + 1])

    add("k_single_passes", k, k_single_passes)

    if slide is not None:
        scan = ct_volume(args.ct_shape, device)
        spacing_xyz = args.ct_spacing
        target = [round(n * s / args.target_spacing) for n, s in zip(args.ct_shape, spacing_xyz, strict=True)]
        target_zyx = (target[2], target[1], target[0])

        def resample() -> Tensor:
            return F.interpolate(scan, size=target_zyx, mode="trilinear", align_corners=False)

        add("resample", 0, resample, repeats=args.sw_repeats, warmup=0, encodes=False,
            shape_zyx=list(target_zyx))  # fmt: skip
        with torch.inference_mode():
            resampled = to_channels_last(resample(), cl)
        windows = math.prod(len(_starts(n, min(size, n), args.overlap)) for n in target_zyx)

        def predictor(window: Tensor) -> Tensor:
            return segment(window, task).float()

        def sliding() -> Tensor:
            return slide(predictor, resampled, size, args.overlap, args.sw_batch)

        add("sliding_window", k, sliding, repeats=args.sw_repeats, warmup=0, windows=windows,
            shape_zyx=list(target_zyx), impl=sliding_impl)  # fmt: skip

    ratios = case_ratios(rows)
    print()
    print_table(rows, ["case", "classes", "seconds", "peak_memory_mib", "memory_metric"])
    many = next(row for row in rows if row["case"] == f"{args.queries}_queries")
    if "seconds" in many:
        peak = many["peak_memory_mib"]
        print(f"{args.queries} queries x {k} classes: {many['seconds']:.3f} s, {peak:.0f} MiB")
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    payload = report.finish(results=rows, ratios=ratios, targets=targets)
    if all("error" in row for row in rows):
        raise SystemExit(f"every case failed; the first: {rows[0]['error']}")
    return payload


def case_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each composite case's seconds over a reference measured in the same run, where both cases ran.

    * ``k_one_pass_over_single_class``: K classes in one ``segment`` call over one class (target ≤ 1.5);
    * ``k_single_passes_over_k_one_pass``: K one-class calls over one K-class call;
    * ``queries_case_over_queries_x_classes_single_class``: the Q queries × K classes case (encoding
      included) over Q·K cached one-class passes (150 for 10 × 15);
    * ``queries_case_over_encode_plus_queries_one_shot``: the same case over its parts timed alone,
      ``encode_task`` + Q × ``one_shot_cached`` (above 1: overhead of running them together);
    * ``sliding_window_over_windows_x_one_shot_cached``: the sliding-window case (resampling excluded)
      over its number of S³ windows × one cached K-class S³ pass (above 1: the blending's cost; below
      1: what batching windows saves).
    """
    seconds = {row["case"]: row["seconds"] for row in rows if "seconds" in row}
    pairs = {
        "k_one_pass_over_single_class": ("k_one_pass", "single_class"),
        "k_single_passes_over_k_one_pass": ("k_single_passes", "k_one_pass"),
    }
    ratios = {key: seconds[a] / seconds[b] for key, (a, b) in pairs.items() if a in seconds and b in seconds}
    many = next((row for row in rows if str(row["case"]).endswith("_queries") and "seconds" in row), None)
    if many is not None:
        passes = many["queries"] * many["classes"]
        if "single_class" in seconds:
            ratios["queries_case_over_queries_x_classes_single_class"] = many["seconds"] / (
                passes * seconds["single_class"]
            )
        if "encode_task" in seconds and "one_shot_cached" in seconds:
            parts = seconds["encode_task"] + many["queries"] * seconds["one_shot_cached"]
            ratios["queries_case_over_encode_plus_queries_one_shot"] = many["seconds"] / parts
    sliding = next((row for row in rows if row["case"] == "sliding_window" and "seconds" in row), None)
    if sliding is not None and "one_shot_cached" in seconds:
        ratios["sliding_window_over_windows_x_one_shot_cached"] = sliding["seconds"] / (
            sliding["windows"] * seconds["one_shot_cached"]
        )
    return ratios


if __name__ == "__main__":
    main()
