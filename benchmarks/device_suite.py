"""Every GPU benchmark in one prepared run, the most important first, each under its own time limit.

A lent GPU comes for minutes (the device tool: one machine start plus ~10 minutes per command). This runs
the benchmarks of docs/benchmarks.md ("Commands for the H100 run") as subprocesses in priority order, so a
step that hangs, runs out of memory or outlives its limit costs only its own row: the suite records it and
goes on, and it starts no step once the overall budget is spent. Eager runs come before compiled ones
because they answer the targets' questions without minutes of compilation.

Written to ``--out``: each step's JSON and log, ``machine.txt`` (nvidia-smi, torch build), ``suite.json``
(every step: exit status, seconds, timed out or skipped) and ``summary.md`` (the figures the issues ask
for against their targets, ready for docs/benchmarks.md).

    python3 benchmarks/device_suite.py --out "$OUT" --budget 480
    python3 benchmarks/device_suite.py --out /tmp/suite --quick      # CPU smoke run of the same plan
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# A step is not started with less than this left: its warm-up alone would use it up.
MIN_STEP_S = 20.0


@dataclass(frozen=True)
class Step:
    name: str
    script: str
    args: tuple[str, ...]
    limit_s: float  # on an H100; a step gets min(limit, budget left)
    quick_args: tuple[str, ...] = ("--threads", "1")


def plan() -> list[Step]:
    """Priority order: issue 4's bf16 paper step and issue 8's targets first, variants last."""
    return [
        Step("train_step_eager", "train_step", ("--batch", "2", "4", "--no-compile"), 150),
        Step("inference_eager", "inference", ("--no-compile",), 150),
        # The loader's target is a ratio to the step rate measured by the first step.
        Step(
            "dataloader",
            "dataloader",
            ("--workers", "0", "8", "--train-json", "{out}/train_step_eager.json"),
            120,
            quick_args=("--synthetic", "--workers", "0", "2", "--train-json", "{out}/train_step_eager.json"),
        ),
        Step("train_step", "train_step", ("--batch", "2", "4"), 300),
        Step("inference", "inference", ("--skip-sliding",), 240),
        Step("tuning", "tuning", ("--no-compile",), 120, quick_args=("--threads", "1", "--steps", "3")),
        Step("train_step_lamb", "train_step", ("--batch", "2", "--no-compile", "--optimizer", "lamb"), 90),
    ]


def _command(step: Step, out: Path, quick: bool) -> list[str]:
    extra = ("--quick", *step.quick_args) if quick else ("--device", "cuda", *step.args)
    args = [a.replace("{out}", str(out)) for a in extra]
    return [sys.executable, str(HERE / f"{step.script}.py"), *args, "--json", str(out / f"{step.name}.json")]


def _run_step(command: list[str], log: Path, limit_s: float) -> tuple[int | None, bool]:
    """Exit status (None when killed) and whether the limit was hit; the step's whole process group dies."""
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, cwd=HERE.parent, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=limit_s), False
        except subprocess.TimeoutExpired:
            # SIGINT first so Python unwinds (CUDA contexts close, the log gets its traceback); then kill.
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return None, True


def _machine(out: Path) -> None:
    lines = [f"python {sys.version.split()[0]}", f"date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]
    try:
        import torch

        lines.append(f"torch {torch.__version__}, cuda {torch.version.cuda}")
    except ImportError:
        lines.append("torch not importable")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False)
        lines.append(smi.stdout)
    (out / "machine.txt").write_text("\n".join(lines) + "\n")


def run_suite(out: Path, budget_s: float, quick: bool, only: list[str] | None = None) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    _machine(out)
    started = time.monotonic()
    records = []
    for step in plan():
        if only and step.name not in only:
            continue
        left = budget_s - (time.monotonic() - started)
        record: dict[str, Any] = {"step": step.name, "limit_s": round(min(step.limit_s, max(left, 0.0)), 1)}
        if left < MIN_STEP_S:
            record["status"] = "skipped: budget spent"
        else:
            command = _command(step, out, quick)
            # A JSON left by an earlier suite must not pass for this run's (the loader reads the step's).
            (out / f"{step.name}.json").unlink(missing_ok=True)
            record["command"] = " ".join(command)
            t0 = time.monotonic()
            code, timed_out = _run_step(command, out / f"{step.name}.log", record["limit_s"])
            record["seconds"] = round(time.monotonic() - t0, 1)
            record["exit_status"] = code
            record["status"] = "timed out" if timed_out else ("ok" if code == 0 else "failed")
        print(f"{step.name:18s} {record['status']:22s} {record.get('seconds', '-')}", flush=True)
        records.append(record)
        (out / "suite.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / "summary.md").write_text(summarise(out, records, quick))
    return records


def _load(out: Path, name: str, finished: set[str]) -> dict[str, Any] | None:
    if name not in finished:
        return None
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _verdict(value: float | None, target: float, at_most: bool) -> str:
    if value is None:
        return "not measured"
    met = value <= target if at_most else value >= target
    return "met" if met else "missed"


def summarise(out: Path, records: list[dict[str, Any]], quick: bool = False) -> str:
    """The issues' figures against their targets, from whichever steps finished.

    ``quick`` (CPU smoke) figures are listed without verdicts: the targets are about the GPU.
    """
    lines = ["CPU smoke run (--quick): the targets are judged on the GPU only.", ""] if quick else []
    lines += ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r.get('seconds', '')} |" for r in records]
    finished = {r["step"] for r in records if r["status"] == "ok"}
    checks: list[tuple[str, float | None, str, str]] = []

    def check(label: str, value: float | None, unit: str, target: float | None, at_most: bool = True) -> None:
        if target is None:
            verdict = "report"
        else:
            verdict = f"{'≤' if at_most else '≥'} {target:.4g}: {_verdict(value, target, at_most)}"
        checks.append((label, value, unit, verdict))

    for name in ("train_step", "train_step_eager"):
        payload = _load(out, name, finished) or {}
        for row in payload.get("results", []):
            if row.get("model") == "iris" and "step_ms" in row:
                check(f"{name}: Iris step, batch {row['batch']}", row["step_ms"], "ms", None)
                check(
                    f"{name}: Iris peak memory, batch {row['batch']}", row.get("peak_memory_mib"), "MiB", None
                )
        for key, value in payload.get("ratios", {}).items():
            check(f"{name}: {key}", value, "×", 1.0, at_most=False)
    for name in ("inference", "inference_eager"):
        payload = _load(out, name, finished)
        if payload is None:
            continue
        rows = {row.get("case"): row for row in payload.get("results", [])}
        queries = next((row for case, row in rows.items() if str(case).endswith("_queries")), None)
        if queries is not None:
            check(f"{name}: {queries['case']}", queries.get("seconds"), "s", 0.5)
            check(
                f"{name}: {queries['case']} peak memory", queries.get("peak_memory_mib"), "MiB", 7.4e9 / 2**20
            )
        ratio = payload.get("ratios", {}).get("k_one_pass_over_single_class")
        check(f"{name}: K classes in one pass / one class", ratio, "×", 1.5)
    for row in (_load(out, "dataloader", finished) or {}).get("results", []):
        target = 1.5 if row.get("workers") == 8 else None
        check(
            f"dataloader: {row.get('workers')} workers / step rate",
            row.get("over_step_rate"),
            "×",
            target,
            False,
        )
    lines += ["", "| figure | value | unit | target |", "|---|---|---|---|"]
    for label, value, unit, target in checks:
        shown = "—" if value is None else f"{value:.4g}"
        lines.append(f"| {label} | {shown} | {unit} | {'not judged' if quick else target} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSONs, logs and summary")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole suite")
    parser.add_argument("--quick", action="store_true", help="CPU smoke settings for every step")
    parser.add_argument("--only", nargs="+", default=None, help="run these steps only (names as in plan())")
    args = parser.parse_args()
    names = {step.name for step in plan()}
    if args.only and not set(args.only) <= names:
        parser.error(f"unknown steps {sorted(set(args.only) - names)}; known: {sorted(names)}")
    records = run_suite(args.out, args.budget, args.quick, args.only)
    print((args.out / "summary.md").read_text())
    sys.exit(0 if any(r["status"] == "ok" for r in records) else 1)


if __name__ == "__main__":
    main()
