"""In-context tuning: ``tune_task_embedding`` against re-segmenting the reference every step.

``tune_task_embedding`` optimises only T, so the reference's encoder features are the same at every step;
it computes them once (``Iris.encode_query``) and runs only the decoder per step. The reference measured
in the same run is the plain loop that calls ``model.segment(image, T)`` each step (what the function did
before). Both start from the same T and take the same Adam steps; the script checks that their final
losses agree, then reports the time per tuning and the ratio ``segment_every_step_over_encode_once``
(seconds of the reference over seconds of ``tune_task_embedding``: the speed-up). Runs interleave so
load hits both alike.

    .venv/bin/python benchmarks/tuning.py --quick --threads 1        # CPU, tiny model, 32³
    python benchmarks/tuning.py --device cuda --json results/tuning.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_common_args,
    autocast,
    finish_args,
    iris_config,
    print_table,
    report_header,
    summarise,
    synchronize,
    write_json,
)

from iris_pipelines.inference.strategies import TUNING_LR, TUNING_STEPS, frozen, tune_task_embedding  # noqa: E402
from iris_pipelines.model import Iris, segmentation_loss  # noqa: E402


def segment_every_step(model: Iris, task: torch.Tensor, image, masks, steps: int, lr: float) -> list[float]:
    """The reference: the same Adam loop, with the whole network run on the reference each step."""
    tuned = task.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([tuned], lr=lr)
    losses = []
    with frozen(model), torch.enable_grad():
        for step in range(steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = segmentation_loss(model.segment(image, tuned), masks).total
            losses.append(float(loss.detach()))
            if step == steps:
                break
            loss.backward()
            optimizer.step()
    return losses


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--classes", type=int, default=None, help="K (15)")
    parser.add_argument("--steps", type=int, default=TUNING_STEPS, help="Adam steps per tuning (evaluate's)")
    parser.add_argument("--lr", type=float, default=TUNING_LR)
    args = finish_args(
        parser.parse_args(argv),
        full={"size": 128, "repeats": 5, "warmup": 1, "classes": 15},
        quick={"size": 32, "repeats": 5, "warmup": 1, "classes": 4},
    )
    if args.compile or args.channels_last:
        print("tuning: --compile and --channels-last are not used here (eager, contiguous)", flush=True)
    device = torch.device(args.device)
    print(f"tuning: {vars(args)}", flush=True)
    torch.manual_seed(0)
    model = Iris(iris_config(args.model)).to(device).eval()
    size, k = args.size, args.classes
    image = torch.randn(1, 1, size, size, size, device=device)
    coarse = (torch.rand(1, k, *(max(1, size // 8),) * 3) > 0.7).float()
    masks = F.interpolate(coarse, size=(size,) * 3, mode="nearest").to(device)
    with torch.no_grad():
        task = model.encode_task(image, masks)

    variants = {
        "segment every step (reference)": lambda: segment_every_step(
            model, task, image, masks, args.steps, args.lr
        ),
        "tune_task_embedding (encode once)": lambda: (
            tune_task_embedding(model, task, [(image, masks)], steps=args.steps, lr=args.lr).losses
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    final_loss: dict[str, float] = {}
    with autocast(device, args.precision):
        for round_index in range(args.warmup + args.repeats):
            for name, run in variants.items():
                synchronize(device)
                started = time.perf_counter()
                losses = run()
                synchronize(device)
                if round_index >= args.warmup:
                    times[name].append(time.perf_counter() - started)
                final_loss[name] = losses[-1]
    reference = summarise(times["segment every step (reference)"])["median_s"]
    rows = []
    for name, measured in times.items():
        stats = summarise(measured)
        rows.append(
            {
                "variant": name,
                "median_s": stats["median_s"],
                "min_s": stats["min_s"],
                "speedup_vs_reference": reference / stats["median_s"],
                "final_loss": round(final_loss[name], 6),
            }
        )
    print_table(rows, list(rows[0]))
    losses = list(final_loss.values())
    agree = abs(losses[0] - losses[1]) <= 1e-3 * max(1.0, abs(losses[0]))
    print(f"final losses agree: {agree} ({losses[0]:.6f} vs {losses[1]:.6f})", flush=True)
    payload = {
        **report_header("tuning", argv, device, args),
        "results": rows,
        # seconds(reference) / seconds(encode once): the speed-up, named as the other scripts' ratios.
        "ratios": {"segment_every_step_over_encode_once": rows[1]["speedup_vs_reference"]},
        "losses_agree": agree,
    }
    write_json(args.json, payload)
    if not agree:
        raise SystemExit("the two tuning loops disagree: the encode-once path changed the result")
    return payload


if __name__ == "__main__":
    main()
