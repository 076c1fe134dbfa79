"""The device suite: every benchmark in priority order, each step bounded, the targets summarised.

A lent GPU gives minutes; what matters is that a hung or slow step costs only its own row, that nothing
starts once the budget is spent, and that the summary judges the issues' targets from this run alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "device_suite.py"
GPU_IMAGE = Path(__file__).resolve().parent / "gpu_image"  # its sitecustomize hides what that image lacks


@pytest.fixture(scope="module")
def suite():
    # Loaded by path: benchmarks/ is not a package.
    spec = importlib.util.spec_from_file_location("device_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_suite_runs_on_the_gpu_image_and_feeds_the_loader_the_step_rate(tmp_path):
    """Run as on the GPU machine: no Kedro, MONAI, SimpleITK, MLflow or pytorch-optimizer importable."""
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(GPU_IMAGE)}
    steps = ["train_step_eager", "inference_eager", "dataloader"]
    command = [sys.executable, str(SUITE), "--out", str(out), "--quick", "--only", *steps]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    records = json.loads((out / "suite.json").read_text())
    assert [(r["step"], r["status"]) for r in records] == [(step, "ok") for step in steps]
    inference = json.loads((out / "inference_eager.json").read_text())
    assert inference["settings"]["sliding_window_impl"].startswith("torch fallback")  # MONAI was blocked
    loader = json.loads((out / "dataloader.json").read_text())
    assert loader["step_rate"]["source"].startswith(str(out / "train_step_eager.json"))
    summary = (out / "summary.md").read_text()
    assert "CPU smoke run" in summary and "not judged" in summary
    assert "train_step_eager: tflops_iris_over_nnunet_b1" in summary
    assert "inference_eager: K classes in one pass / one class" in summary
    assert "dataloader: 2 workers / step rate" in summary
    assert (out / "machine.txt").read_text().startswith("python ")


def test_the_gpu_image_emulation_blocks_what_the_machine_lacks():
    code = (
        "import importlib.util, torch, numpy; assert importlib.util.find_spec('monai') is None; import kedro"
    )
    env = {**os.environ, "PYTHONPATH": str(GPU_IMAGE)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "ModuleNotFoundError: No module named 'kedro'" in done.stderr


def test_a_step_over_its_limit_is_stopped_with_its_children(suite, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    child = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)"
    )
    started = time.monotonic()
    code, timed_out = suite._run_step([sys.executable, "-c", child], tmp_path / "step.log", limit_s=3)
    assert (code, timed_out) == (None, True)
    assert time.monotonic() - started < 30
    grandchild = int(pid_file.read_text())
    status = Path(f"/proc/{grandchild}/status")
    deadline = time.monotonic() + 10
    while status.exists() and "zombie" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not status.exists() or "zombie" in status.read_text()


def test_nothing_starts_once_the_budget_is_spent(suite, tmp_path):
    records = suite.run_suite(tmp_path, budget_s=0, quick=True)
    assert [r["step"] for r in records] == [step.name for step in suite.plan()]
    assert {r["status"] for r in records} == {"skipped: budget spent"}
    assert not list(tmp_path.glob("*.log"))
    summary = (tmp_path / "summary.md").read_text()
    assert "| train_step_eager | skipped: budget spent |" in summary


def test_summary_judges_the_targets_from_this_runs_steps_only(suite, tmp_path):
    def write(name, payload):
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))

    write(
        "train_step",
        {
            "results": [{"model": "iris", "batch": 2, "step_ms": 410.0, "peak_memory_mib": 30000.0}],
            "ratios": {"tflops_iris_over_nnunet_b2": 0.8},
        },
    )
    write(
        "inference",
        {
            "results": [{"case": "10_queries", "seconds": 0.4, "peak_memory_mib": 8000.0}],
            "ratios": {"k_one_pass_over_single_class": 1.2},
        },
    )
    write("dataloader", {"results": [{"workers": 8, "over_step_rate": 1.6}]})
    write("tuning", {"results": []})
    # A JSON from an earlier suite whose step did not finish this time: not to be judged.
    write("inference_eager", {"results": [{"case": "10_queries", "seconds": 9.0}]})
    ok = [{"step": name, "status": "ok"} for name in ("train_step", "inference", "dataloader")]
    records = [*ok, {"step": "inference_eager", "status": "timed out"}]

    rows = {
        line.split(" | ")[0].lstrip("| "): line
        for line in suite.summarise(tmp_path, records).splitlines()
        if line.startswith("| ")
    }
    assert rows["train_step: Iris step, batch 2"].endswith("| 410 | ms | report |")
    assert "≥ 1: missed" in rows["train_step: tflops_iris_over_nnunet_b2"]
    assert "≤ 0.5: met" in rows["inference: 10_queries"]
    assert "missed" in rows["inference: 10_queries peak memory"]
    assert "≤ 1.5: met" in rows["inference: K classes in one pass / one class"]
    assert "≥ 1.5: met" in rows["dataloader: 8 workers / step rate"]
    assert not any(label.startswith("inference_eager:") for label in rows)
    assert "| inference_eager | timed out |" in rows["inference_eager"]
