"""The GPU benchmarks run end to end on CPU at small size (``--quick``) and write the JSON the docs quote.

Each script runs in a subprocess, as a user runs it, with one torch thread (the CI box has 2 shared cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, str(BENCHMARKS / f"{script}.py"), "--quick", "--json", str(out), *extra]
    done = subprocess.run(
        command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == script
    assert payload["machine"]["device"] == "cpu" and payload["machine"]["torch"]
    return payload


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert row[key] > 0, (key, row)


def test_train_step_reports_tflops_ratio_against_nnunet(tmp_path):
    payload = _run("train_step", tmp_path, "--threads", "1")
    rows = {r["model"]: r for r in payload["results"]}
    assert set(rows) == {"iris", "nnunet"}
    for row in rows.values():
        _positive(row, "step_ms", "samples_per_s", "gflop_per_step", "tflops", "params_m")
        assert row["memory_metric"] == "cpu_peak_rss_rise_psutil" and row["peak_memory_mib"] >= 0
    assert rows["iris"]["gflop_per_step"] > rows["nnunet"]["gflop_per_step"] > 0
    assert payload["ratios"]["tflops_iris_over_nnunet_b1"] == pytest.approx(
        rows["iris"]["tflops"] / rows["nnunet"]["tflops"]
    )


def test_inference_reports_every_case_and_the_k_class_ratio(tmp_path):
    payload = _run("inference", tmp_path, "--threads", "1")
    rows = {r["case"]: r for r in payload["results"]}
    expected = {"encode_task", "one_shot_cached", "2_queries", "single_class", "k_one_pass",
                "k_single_passes", "resample", "sliding_window"}  # fmt: skip
    assert set(rows) == expected
    for row in rows.values():
        _positive(row, "seconds")
        assert "peak_memory_mib" in row and row["memory_metric"]
    assert rows["sliding_window"]["windows"] > 1
    _positive(payload["ratios"], "k_one_pass_over_single_class", "k_single_passes_over_k_one_pass")


def test_tuning_reports_the_encode_once_speedup_and_checks_the_losses_agree(tmp_path):
    payload = _run("tuning", tmp_path, "--threads", "1", "--steps", "3", "--repeats", "1")
    rows = {r["variant"]: r for r in payload["results"]}
    assert len(rows) == 2
    for row in rows.values():
        _positive(row, "median_s", "speedup_vs_reference")
    assert payload["losses_agree"]
    reference, ours = (row["final_loss"] for row in payload["results"])
    assert ours == pytest.approx(reference, abs=1e-4)
    assert (
        payload["ratios"]["encode_once_over_segment_every_step"]
        == payload["results"][1]["speedup_vs_reference"]
    )


def test_dataloader_reports_episode_rate_against_the_step_rate(tmp_path):
    payload = _run("dataloader", tmp_path, "--synthetic", "--step-rate", "2.0")
    assert [r["workers"] for r in payload["results"]] == [0, 2]
    for row in payload["results"]:
        _positive(row, "batches_per_s", "episodes_per_s", "over_step_rate")
        assert row["over_step_rate"] == pytest.approx(row["batches_per_s"] / 2.0)
    assert payload["settings"]["data"].startswith("synthetic")


def test_augment_reports_the_boxed_speedup_on_identical_batches(tmp_path):
    payload = _run("augment", tmp_path)
    rows = {r["version"]: r for r in payload["results"]}
    assert set(rows) == {"dense", "boxed"}
    for row in rows.values():
        _positive(row, "batch_ms", "episodes_per_s")
    assert payload["identical"] is True
    assert payload["ratios"]["dense_over_boxed_batch_time"] == pytest.approx(
        rows["dense"]["batch_ms"] / rows["boxed"]["batch_ms"]
    )


def test_export_reports_the_cost_and_the_dice_of_interpolated_logits(tmp_path):
    payload = _run("export", tmp_path, "--threads", "1")
    rows = {(r["K"], r["case"]): r for r in payload["results"]}
    cases = {"nearest", "interpolated", "interpolated_probabilities"}
    assert set(rows) == {(k, case) for k in (1, 3) for case in cases}
    for (count, _), row in rows.items():
        _positive(row, "median_s", "mean_dice")
        assert row["x_nearest"] == pytest.approx(row["median_s"] / rows[(count, "nearest")]["median_s"])
    for count in (1, 3):  # the reason for the export: boundaries at the scan's resolution
        assert rows[(count, "interpolated")]["mean_dice"] > rows[(count, "nearest")]["mean_dice"]
        assert (
            rows[(count, "interpolated_probabilities")]["mean_dice"]
            == rows[(count, "interpolated")]["mean_dice"]
        )


def test_sampler_imports_without_the_train_loop_dependencies():
    """The GPU machine lacks pytorch_optimizer/tqdm/Kedro; the loader benchmark must still get the sampler."""
    code = (
        "import sys; sys.modules['pytorch_optimizer'] = None; sys.path.insert(0, 'benchmarks');"
        "import _common; from iris_pipelines.training import sampler as m;"
        "assert m.EpisodeSampler and m.StepDataset;"
        "assert 'iris_pipelines.training.loop' not in sys.modules; print('ok')"
    )
    command = [sys.executable, "-c", code]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_torch_sliding_window_matches_monai():
    """The torch-only fallback (for the GPU box without MONAI) blends like MONAI's Gaussian mode."""
    monai_inferers = pytest.importorskip("monai.inferers")
    # Loaded by path: the name "inference" is also the tests/inference package.
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("benchmark_inference", BENCHMARKS / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch_sliding_window = module.torch_sliding_window

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    volume = torch.randn(1, 1, 23, 30, 19)
    with torch.no_grad():
        ours = torch_sliding_window(conv, volume, roi_size=12, overlap=0.5, sw_batch_size=3)
        theirs = monai_inferers.sliding_window_inference(
            volume, (12, 12, 12), 3, conv, overlap=0.5, mode="gaussian", sigma_scale=0.125
        )
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)


def test_a_configuration_that_raises_is_recorded_and_the_others_are_measured(tmp_path):
    """A kernel that fails on the GPU (not only out of memory) costs its own row, not the step's others."""
    out = tmp_path / "train_step.json"
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import train_step\n"
        "real = train_step.measure\n"
        "def measure(args, which, batch, device):\n"
        "    if which == 'nnunet':\n"
        "        raise RuntimeError('CUDNN_STATUS_NOT_SUPPORTED')\n"
        "    return real(args, which, batch, device)\n"
        "train_step.measure = measure\n"
        f"train_step.main(['--quick', '--repeats', '1', '--warmup', '0', '--json', {str(out)!r}])\n"
        "def broken(*args):\n"
        "    raise RuntimeError('no kernel')\n"
        "train_step.measure = broken\n"
        f"train_step.main(['--quick', '--json', {str(tmp_path / 'all_failed.json')!r}])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert (
        done.returncode == 1
        and "every configuration failed; the first: RuntimeError: no kernel" in done.stderr
    )
    payload = json.loads(out.read_text())
    rows = {r["model"]: r for r in payload["results"]}
    assert rows["nnunet"] == {
        "model": "nnunet",
        "batch": 1,
        "error": "RuntimeError: CUDNN_STATUS_NOT_SUPPORTED",
    }
    assert rows["iris"]["step_ms"] > 0
    assert payload["ratios"] == {} and payload["partial"] is False
    assert json.loads((tmp_path / "all_failed.json").read_text())["partial"] is False


def test_the_loader_keeps_its_rows_when_the_training_step_left_no_rate(tmp_path):
    """In the device suite the loader runs after the training step, which may have timed out or failed."""
    missing = tmp_path / "train_step_eager.json"
    payload = _run("dataloader", tmp_path, "--synthetic", "--train-json", str(missing))
    assert [r["workers"] for r in payload["results"]] == [0, 2]
    assert all(r["over_step_rate"] is None and r["batches_per_s"] > 0 for r in payload["results"])
    assert payload["step_rate"] == {"steps_per_s": None, "source": f"no step rate: {missing} unreadable "
                                    f"([Errno 2] No such file or directory: '{missing}')"}  # fmt: skip
