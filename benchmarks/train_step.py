"""Training step of Iris against an nnU-Net 3d_fullres PlainConvUNet, side by side in one process.

For each batch size, each model runs full training steps (forward under autocast, loss, backward,
gradient clipping, optimizer step) on random data at S³ crops; reported per model and batch:

* step time (median of ``--repeats`` after ``--warmup``) and samples/s (Iris: episodes, i.e. one query
  plus one reference with K class masks; nnU-Net: images);
* FLOPs of one step by ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward, counted once,
  eagerly; on CPU with SDPA's math kernel so that attention is counted, see _common.count_flops) and the
  achieved TFLOP/s = FLOPs / median step time;
* peak memory of the timed steps (CUDA: max_memory_allocated and max_memory_reserved; CPU: RSS rise,
  see _common); the warm-up steps run before the measured block.

Every figure is also given as a ratio, Iris over nnU-Net at the same batch in the same run
(``iris_over_nnunet_ratios``: TFLOP/s, step time, samples/s, peak memory). The one that matters is
achieved TFLOP/s (target ≥ 1.0 on an H100 in bf16; the reference reaches roughly 70–90 TFLOP/s there). Both
models get the same optimizer, precision, compile and memory-format settings. The memory-bank EMA update
of the real loop is left out (memory_bank_size = 0).

    python benchmarks/train_step.py --device cuda --batch 2 4 --json results/train_step.json
    python benchmarks/train_step.py --quick          # CPU smoke run, tiny models at 32³
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    IncrementalReport,
    PeakMemory,
    add_common_args,
    autocast,
    count_flops,
    error_row,
    finish_args,
    free_memory,
    iris_config,
    maybe_compile,
    print_table,
    report_header,
    set_fast_math,
    summarise,
    synchronize,
    time_calls,
    to_channels_last,
)
from plain_unet import NNUNET_3D_FULLRES_FEATURES, NNUNET_3D_FULLRES_STRIDES, PlainConvUNet  # noqa: E402

from iris_pipelines.model import Iris, count_parameters, segmentation_loss  # noqa: E402

QUICK_UNET = {"features": (8, 16, 32, 32), "strides": (1, 2, 2, 2)}


def make_optimizer(name: str, params, device: torch.device) -> torch.optim.Optimizer:
    """AdamW/SGD use the fused CUDA kernels on GPU (foreach on CPU); Lamb (the paper's optimizer) comes
    from pytorch_optimizer or timm, whichever is installed, and has no fused kernel."""
    params = list(params)
    fused = device.type == "cuda"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5, fused=fused or None)
    if name == "sgd":  # nnU-Net's own optimizer
        return torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, fused=fused or None)
    try:
        from pytorch_optimizer import Lamb
    except ImportError:
        from timm.optim import Lamb
    return Lamb(params, lr=1e-4, weight_decay=1e-5)


def blob_masks(
    batch: int, k: int, size: int, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """(B, K, S, S, S) {0, 1} float masks of blocky blobs (a coarse random grid, upsampled)."""
    coarse = max(1, size // 8)
    grid = (torch.rand(batch, k, coarse, coarse, coarse, generator=generator) > 0.7).float()
    return F.interpolate(grid, size=(size,) * 3, mode="nearest").to(device)


def nnunet_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """nnU-Net's Dice + CE: softmax cross-entropy plus soft Dice over the foreground classes, in fp32."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)
    onehot = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1), 1.0)
    dims = (2, 3, 4)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + 1e-5) / (denominator + 1e-5)
    return ce + (1 - dice[:, 1:]).mean()


def build_case(args, which: str, batch: int, device: torch.device):
    """(model, loss function of no arguments' inputs, inputs, samples per step) for one model."""
    gen = torch.Generator().manual_seed(0)
    size, cl = args.size, args.channels_last
    if which == "iris":
        model = Iris(iris_config(args.model, memory_bank_size=0)).to(device)
        k = args.classes
        inputs = (
            to_channels_last(torch.randn(batch, 1, size, size, size, generator=gen).to(device), cl),
            to_channels_last(torch.randn(batch, 1, size, size, size, generator=gen).to(device), cl),
            to_channels_last(blob_masks(batch, k, size, device, gen), cl),
            blob_masks(batch, k, size, device, gen),
            torch.ones(batch, k, dtype=torch.bool, device=device),
        )

        def loss_fn(query, ref_image, ref_masks, query_masks, class_mask):
            with autocast(device, args.precision):
                # The class mask reaches the attention as in the train loop: a boolean key mask picks
                # another SDPA kernel on CUDA than no mask does.
                logits = model.segment(query, model.encode_task(ref_image, ref_masks), class_mask)
            return segmentation_loss(logits, query_masks, class_mask).total

    else:
        unet_kwargs = QUICK_UNET if args.quick else {}
        model = PlainConvUNet(num_classes=args.classes + 1, **unet_kwargs).to(device)
        labels = torch.randint(0, args.classes + 1, (batch, max(1, size // 8), *(max(1, size // 8),) * 2))
        target = F.interpolate(labels[:, None].float(), size=(size,) * 3, mode="nearest")[:, 0].long()
        inputs = (
            to_channels_last(torch.randn(batch, 1, size, size, size, generator=gen).to(device), cl),
            target.to(device),
        )

        def loss_fn(image, target):
            with autocast(device, args.precision):
                logits = model(image)
            return nnunet_loss(logits, target)

    if cl:
        model = model.to(memory_format=torch.channels_last_3d)
    return model, loss_fn, inputs


def measure(args, which: str, batch: int, device: torch.device) -> dict[str, Any]:
    model, eager_loss, inputs = build_case(args, which, batch, device)
    model.train()
    row: dict[str, Any] = {"model": which, "batch": batch, "params_m": count_parameters(model) / 1e6}
    optimizer = make_optimizer(args.optimizer, model.parameters(), device)

    flops = count_flops(lambda: eager_loss(*inputs).backward(), device)
    optimizer.zero_grad(set_to_none=True)
    loss_fn: Callable = maybe_compile(eager_loss, args.compile, args.compile_mode)

    def step() -> None:
        loss = loss_fn(*inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Warm-up steps (compilation, cuDNN autotuning, the optimizer's state) run before the measured
    # block, as inference.py's untimed call does: the peak is that of the timed steps alone.
    for _ in range(args.warmup):
        step()
    synchronize(device)
    free_memory(device)  # the FLOP-counting pass's and warm-up's cached blocks are not this step's peak
    with PeakMemory(device) as memory:
        times = time_calls(step, device, args.repeats, warmup=0)
    stats = summarise(times)
    row.update(
        {
            "step_ms": stats["median_s"] * 1e3,
            "step_ms_min": stats["min_s"] * 1e3,
            "step_ms_mean": stats["mean_s"] * 1e3,
            "samples_per_s": batch / stats["median_s"],
            "gflop_per_step": flops / 1e9,
            "tflops": flops / stats["median_s"] / 1e12,
            **memory.as_dict(),
        }
    )
    return row  # the caller frees the memory once this frame (model, optimizer, inputs) is gone


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (2 4)")
    parser.add_argument("--classes", type=int, default=4, help="K class masks per Iris episode (max_classes)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd", "lamb"), default="adamw")
    parser.add_argument("--models", nargs="+", choices=("iris", "nnunet"), default=["nnunet", "iris"])
    args = finish_args(
        parser.parse_args(argv),
        full={"size": 128, "batch": [2, 4], "repeats": 20, "warmup": 5},
        quick={"size": 32, "batch": [1], "repeats": 3, "warmup": 1, "classes": 2},
    )
    if args.quick:
        args.classes = min(args.classes, 2)
    device = torch.device(args.device)
    set_fast_math(device)
    print(f"train_step: {vars(args)}", flush=True)

    unet = (
        dict(QUICK_UNET)
        if args.quick
        else {
            "features": NNUNET_3D_FULLRES_FEATURES,
            "strides": NNUNET_3D_FULLRES_STRIDES,
        }
    )
    report = IncrementalReport(args.json, report_header("train_step", argv, device, args, nnunet=unet))
    targets = {"tflops_iris_over_nnunet": 1.0}
    rows: list[dict[str, Any]] = []
    for batch in args.batch:
        for which in args.models:
            try:
                rows.append(measure(args, which, batch, device))
            except Exception as error:  # OOM, or a kernel that fails on this GPU: keep the other rows
                rows.append({"model": which, "batch": batch, **error_row(error)})
            # Outside the except block: its traceback would keep the failed case's tensors alive.
            free_memory(device)
            print_table(rows[-1:], list(rows[-1]))
            report.update(results=rows, ratios=iris_over_nnunet_ratios(rows), targets=targets)

    ratios = iris_over_nnunet_ratios(rows)
    print()
    columns = ["model", "batch", "step_ms", "samples_per_s", "gflop_per_step", "tflops", "peak_memory_mib"]
    print_table(rows, columns)
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}{'  (target >= 1.0)' if key.startswith('tflops_') else ''}")
    payload = report.finish(results=rows, ratios=ratios, targets=targets)
    if all("error" in row for row in rows):
        raise SystemExit(f"every configuration failed; the first: {rows[0]['error']}")
    return payload


# Ratio key prefix -> the row field divided, Iris's over nnU-Net's at the same batch.
RATIO_FIELDS = {
    "tflops": "tflops",
    "step_time": "step_ms",
    "samples_per_s": "samples_per_s",
    "peak_memory": "peak_memory_mib",
    "peak_reserved": "peak_reserved_mib",  # CUDA only
}


def iris_over_nnunet_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Iris's figures over nnU-Net's, per batch size where both rows succeeded, measured in this run.

    ``{what}_iris_over_nnunet_b{batch}`` for achieved TFLOP/s (the target, ≥ 1.0), median step time,
    samples/s and peak memory (allocated; on CUDA also reserved). A ratio whose denominator is zero or
    missing (a CPU RSS rise of 0) is left out.
    """
    ratios = {}
    for batch in dict.fromkeys(r["batch"] for r in rows):
        by_model = {r["model"]: r for r in rows if r["batch"] == batch and "tflops" in r}
        if not {"iris", "nnunet"} <= set(by_model):
            continue
        iris, nnunet = by_model["iris"], by_model["nnunet"]
        for what, field in RATIO_FIELDS.items():
            if iris.get(field) is not None and nnunet.get(field):
                ratios[f"{what}_iris_over_nnunet_b{batch}"] = iris[field] / nnunet[field]
    return ratios


if __name__ == "__main__":
    main()
