"""The device suite: every benchmark in priority order, each step bounded, the targets summarised.

A lent GPU gives minutes; what matters is that a hung or slow step costs only its own row, that nothing
starts once the budget is spent, and that the summary judges the issues' targets from this run alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import re
import signal
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
    out, work = tmp_path / "results", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(GPU_IMAGE)}
    steps = ["train_step_eager", "inference_eager", "dataloader"]
    command = [
        sys.executable,
        str(SUITE),
        "--out",
        str(out),
        "--work",
        str(work),
        "--quick",
        "--only",
        *steps,
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    # The device tool brings back at most 8 files from $OUT: everything is in these two.
    assert sorted(path.name for path in out.iterdir()) == ["suite.json", "summary.md"]
    suite = json.loads((out / "suite.json").read_text())
    records = suite["steps"]
    assert [(r["step"], r["status"]) for r in records] == [(step, "ok") for step in steps]
    assert suite["machine"]["python"] and suite["work"] == str(work)
    by_step = {r["step"]: r for r in records}
    inference = by_step["inference_eager"]["results"]
    assert inference["partial"] is False
    assert inference["settings"]["sliding_window_impl"].startswith("torch fallback")  # MONAI was blocked
    assert "wrote" in by_step["inference_eager"]["log_tail"]
    loader = by_step["dataloader"]["results"]
    assert loader["step_rate"]["source"].startswith(str(work / "train_step_eager.json"))
    # The most workers first (the target's row), each row with its ratio.
    assert [r["workers"] for r in loader["results"]] == [2, 0]
    assert all(r["over_step_rate"] > 0 for r in loader["results"])
    # The GPU plan's own options are parsed under --quick too (the quick batch overrides 2 4).
    assert "--batch 2 4" in by_step["train_step_eager"]["command"]
    assert by_step["train_step_eager"]["results"]["settings"]["batch"] == [1]
    summary = (out / "summary.md").read_text()
    assert "CPU smoke run" in summary and "not judged" in summary
    assert "train_step_eager: tflops_iris_over_nnunet_b1" in summary
    assert "inference_eager: K classes in one pass / one class" in summary
    assert "dataloader: 2 workers / step rate" in summary


def _values(args: tuple[str, ...], option: str) -> list[str]:
    """The values after ``option`` in a step's arguments, up to the next option."""
    rest = args[args.index(option) + 1 :]
    return list(itertools.takewhile(lambda a: not a.startswith("--"), rest))


def test_the_plan_measures_the_targets_rows_first_and_compiles_few_configurations(suite):
    """Rows run in order and a step may be stopped at its limit: what a target is judged on comes first."""
    steps = {step.name: step for step in suite.plan()}
    # Issue 8: the loader sustains >= 1.5x the step rate with 8 workers; the slow 0-worker row goes last.
    loader = steps["dataloader"]
    assert _values(loader.args, "--workers")[0] == "8"
    assert _values(loader.args, "--workers")[-1] == "0"
    assert _values(loader.quick_args, "--workers") == ["2", "0"]
    # The eager step keeps batch 2 and 4; the compiled one compiles each model once, with few repeats.
    assert _values(steps["train_step_eager"].args, "--batch") == ["2", "4"]
    compiled = steps["train_step"].args
    assert "--no-compile" not in compiled and _values(compiled, "--batch") == ["2"]
    assert int(_values(compiled, "--warmup")[0]) <= 2 and int(_values(compiled, "--repeats")[0]) <= 10


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


def test_a_step_stopped_at_its_limit_keeps_the_rows_it_measured(suite, tmp_path):
    """The benchmarks rewrite their JSON after each row; the suite reads what a stopped step left."""
    script = tmp_path / "slow_benchmark.py"
    script.write_text(
        f"import sys, time; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "from pathlib import Path\n"
        "from _common import IncrementalReport\n"
        f"report = IncrementalReport(Path({str(tmp_path / 'slow.json')!r}), {{'benchmark': 'slow'}})\n"
        "report.update(results=[{'model': 'iris', 'batch': 2, 'step_ms': 410.0}])\n"
        "print('first row measured', flush=True)\n"
        "time.sleep(120)\n"
        "report.finish(results=[])\n"
    )
    code, timed_out = suite._run_step([sys.executable, str(script)], tmp_path / "slow.log", limit_s=5)
    assert (code, timed_out) == (None, True)
    results, log_tail = suite._step_outputs(tmp_path, "slow")
    assert results == {
        "benchmark": "slow",
        "results": [{"model": "iris", "batch": 2, "step_ms": 410.0}],
        "partial": True,
    }
    assert "first row measured" in log_tail and "KeyboardInterrupt" in log_tail


def test_nothing_starts_once_the_budget_is_spent(suite, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    records = suite.run_suite(out, budget_s=0, quick=True, work=work)
    assert [r["step"] for r in records] == [step.name for step in suite.plan()]
    assert all(r["status"].startswith("skipped: 0 s left") for r in records), records
    assert not list(work.iterdir())
    summary = (out / "summary.md").read_text()
    assert "| train_step_eager | skipped: 0 s left, needs 30 |" in summary


def test_a_skipped_step_never_claims_the_time_it_needs(suite, tmp_path):
    """29.99 s left for a step that needs 30 is skipped; the message must not say "30 s left, needs 30"."""
    records = suite.run_suite(
        tmp_path / "out",
        budget_s=suite.KILL_GRACE_S + 29.99,
        quick=True,
        only=["train_step_eager"],
        work=tmp_path / "work",
    )
    match = re.fullmatch(r"skipped: (\d+) s left, needs (\d+)", records[0]["status"])
    assert match, records
    assert int(match[1]) < int(match[2]) == 30, records


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_sigterm_stops_the_running_step_and_records_it(tmp_path):
    """`timeout` (the device tool's limit) sends SIGTERM: the running step's process group must die with
    the suite, and suite.json / summary.md must list the step with the rows it had measured."""
    out, work, ready = tmp_path / "out", tmp_path / "work", tmp_path / "ready"
    step = tmp_path / "fake_step.py"
    step.write_text(
        "import json, os, subprocess, sys, time\n"
        "from pathlib import Path\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "row = {'model': 'iris', 'batch': 2, 'step_ms': 410.0}\n"
        "payload = {'benchmark': 'fake', 'results': [row], 'partial': True}\n"
        "Path(sys.argv[sys.argv.index('--json') + 1]).write_text(json.dumps(payload))\n"
        "print('first row measured', flush=True)\n"
        f"Path({str(ready)!r} + '.tmp').write_text(f'{{os.getpid()}} {{child.pid}}')\n"
        f"os.replace({str(ready)!r} + '.tmp', {str(ready)!r})\n"
        "time.sleep(300)\n"
    )
    # The real main() (it installs the handler) with a plan of one step that measures a row, then hangs.
    code = (
        f"import sys; sys.path.insert(0, {str(SUITE.parent)!r}); import device_suite as ds\n"
        "ds.plan = lambda: [ds.Step('train_step_eager', 'train_step', (), 120, min_s=1)]\n"
        f"ds._command = lambda step, work, quick: [sys.executable, {str(step)!r}, "
        "'--json', str(work / f'{step.name}.json')]\n"
        "ds.main()\n"
    )
    command = [sys.executable, "-c", code, "--out", str(out), "--work", str(work), "--quick"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), process.communicate(timeout=30)[0] if process.poll() is not None else "slow"
        pids = [int(pid) for pid in ready.read_text().split()]
        assert all(_alive(pid) for pid in pids)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 128 + signal.SIGTERM, output
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in pids), "the step's process group outlived the suite"
        suite = json.loads((out / "suite.json").read_text())
        [record] = suite["steps"]
        assert record["step"] == "train_step_eager"
        assert record["status"] == "stopped: suite stopped by SIGTERM"
        assert record["exit_status"] is None and record["seconds"] >= 0
        assert record["results"]["results"] == [{"model": "iris", "batch": 2, "step_ms": 410.0}]
        assert "first row measured" in record["log_tail"]
        summary = (out / "summary.md").read_text()
        assert "| train_step_eager | stopped: suite stopped by SIGTERM |" in summary
        assert "train_step_eager (partial): Iris step, batch 2 | 410 |" in summary
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        # On failure leave nothing behind: the step leads its own process group, the sleeper's too.
        if pids and _alive(pids[0]) and os.getpgid(pids[0]) == pids[0]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pids[0], signal.SIGKILL)


def test_a_compiled_step_is_not_started_without_time_to_compile(suite, tmp_path):
    """The budget counts from the suite's start; a step that cannot finish in what is left is skipped."""
    started = time.monotonic() - 330  # 330 s of a 480 s budget spent: 140 s left, the step needs 150
    records = suite.run_suite(
        tmp_path / "out", budget_s=480, quick=True, only=["train_step"], work=tmp_path, started=started
    )
    assert re.fullmatch(r"skipped: 1[34]\d s left, needs 150", records[0]["status"]), records
    assert "command" not in records[0]


def test_summary_judges_the_targets_from_the_results_of_this_runs_steps(suite):
    def record(step, status, results):
        return {"step": step, "status": status, "seconds": 1.0, "results": results}

    records = [
        record(
            "train_step",
            "ok",
            {
                "results": [
                    {"model": "iris", "batch": 2, "step_ms": 410.0, "peak_memory_mib": 30000.0},
                    {"model": "iris", "batch": 4, "error": "OutOfMemoryError: CUDA out of memory"},
                ],
                "ratios": {"tflops_iris_over_nnunet_b2": 0.8},
            },
        ),
        record(
            "inference",
            "ok",
            {
                "results": [
                    {
                        "case": "10_queries",
                        "seconds": 0.4,
                        "peak_memory_mib": 6000.0,
                        "peak_reserved_mib": 8000.0,
                    }
                ],
                "ratios": {"k_one_pass_over_single_class": 1.2},
            },
        ),
        record("dataloader", "ok", {"results": [{"workers": 8, "over_step_rate": 1.6}]}),
        # Stopped at its limit after one row: the row counts, marked partial.
        record(
            "inference_eager",
            "timed out",
            {"results": [{"case": "10_queries", "seconds": 9.0}], "partial": True},
        ),
        {"step": "tuning", "status": "skipped: 12 s left, needs 30"},
    ]
    summary = suite.summarise(records)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines() if line.startswith("| ")}
    assert rows["train_step: Iris step, batch 2"].endswith("| 410 | ms | report |")
    assert "≥ 1: missed" in rows["train_step: tflops_iris_over_nnunet_b2"]
    assert "≤ 0.5: met" in rows["inference: 10_queries"]
    # The paper's 7.4 GB is what the device shows: the reserved pool is judged, not the tensors alone.
    assert rows["inference: 10_queries peak memory"].startswith(
        "| inference: 10_queries peak memory | 8000 |"
    )
    assert "missed" in rows["inference: 10_queries peak memory"]
    assert "≤ 1.5: met" in rows["inference: K classes in one pass / one class"]
    assert "≥ 1.5: met" in rows["dataloader: 8 workers / step rate"]
    assert "≤ 0.5: missed" in rows["inference_eager (partial): 10_queries"]
    assert "| tuning | skipped: 12 s left, needs 30 |" in rows["tuning"]
    assert "- train_step: model=iris, batch=4: OutOfMemoryError: CUDA out of memory" in summary


def test_summary_judges_only_the_tflops_ratio_and_reports_the_other_same_run_ratios(suite):
    """Iris taking 1.3× nnU-Net's step time is no target met: only TFLOP/s is judged against 1.0."""
    train_ratios = {
        "tflops_iris_over_nnunet_b2": 1.1,
        "step_time_iris_over_nnunet_b2": 1.3,
        "samples_per_s_iris_over_nnunet_b2": 0.77,
        "peak_memory_iris_over_nnunet_b2": 1.6,
    }
    inference_ratios = {
        "k_one_pass_over_single_class": 1.2,
        "queries_case_over_queries_x_classes_single_class": 0.05,
        "sliding_window_over_windows_x_one_shot_cached": 0.9,
    }
    records = [
        {"step": "train_step", "status": "ok", "results": {"results": [], "ratios": train_ratios}},
        {"step": "inference", "status": "ok", "results": {"results": [], "ratios": inference_ratios}},
    ]
    summary = suite.summarise(records)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines() if line.startswith("| ")}
    assert rows["train_step: tflops_iris_over_nnunet_b2"].endswith("| × | ≥ 1: met |")
    for key in ("step_time", "samples_per_s", "peak_memory"):
        assert rows[f"train_step: {key}_iris_over_nnunet_b2"].endswith("| × | report |"), summary
    assert rows["inference: K classes in one pass / one class"].endswith("| × | ≤ 1.5: met |")
    assert rows["inference: queries_case_over_queries_x_classes_single_class"].endswith(
        "| 0.05 | × | report |"
    )
    assert rows["inference: sliding_window_over_windows_x_one_shot_cached"].endswith("| 0.9 | × | report |")
