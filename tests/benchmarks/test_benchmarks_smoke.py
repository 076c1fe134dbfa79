"""The GPU benchmarks run end to end on CPU at small size (``--quick``) and write the JSON the docs quote.

Each script runs in a subprocess, as a user runs it, with one torch thread (the CI box has 2 shared cores).
"""

from __future__ import annotations

import argparse
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


def _load(script: str):
    """A benchmark script as a module, loaded by path: ``inference`` is also the tests/inference package."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{script}", BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_reports_tflops_ratio_against_nnunet(tmp_path):
    payload = _run("train_step", tmp_path, "--threads", "1")
    rows = {r["model"]: r for r in payload["results"]}
    assert set(rows) == {"iris", "nnunet"}
    for row in rows.values():
        _positive(row, "step_ms", "samples_per_s", "gflop_per_step", "tflops", "params_m")
        assert row["memory_metric"] == "cpu_peak_rss_rise_psutil" and row["peak_memory_mib"] >= 0
    assert rows["iris"]["gflop_per_step"] > rows["nnunet"]["gflop_per_step"] > 0
    ratios = payload["ratios"]
    iris, nnunet = rows["iris"], rows["nnunet"]
    assert ratios["tflops_iris_over_nnunet_b1"] == pytest.approx(iris["tflops"] / nnunet["tflops"])
    # Issue 8: every figure also as a ratio to the reference measured in the same run.
    assert ratios["step_time_iris_over_nnunet_b1"] == pytest.approx(iris["step_ms"] / nnunet["step_ms"])
    assert ratios["samples_per_s_iris_over_nnunet_b1"] == pytest.approx(
        iris["samples_per_s"] / nnunet["samples_per_s"]
    )
    if nnunet["peak_memory_mib"] > 0:  # a CPU RSS rise can be 0: no ratio then
        assert ratios["peak_memory_iris_over_nnunet_b1"] == pytest.approx(
            iris["peak_memory_mib"] / nnunet["peak_memory_mib"]
        )
    else:
        assert "peak_memory_iris_over_nnunet_b1" not in ratios


def test_train_step_ratios_cover_time_rate_and_memory_per_batch():
    train_step = _load("train_step")

    def row(model, batch, step_ms, peak, reserved=None, **extra):
        out = {"model": model, "batch": batch, "step_ms": step_ms, "samples_per_s": batch / step_ms * 1e3,
               "tflops": 10.0 / step_ms, "peak_memory_mib": peak, **extra}  # fmt: skip
        return out if reserved is None else {**out, "peak_reserved_mib": reserved}

    rows = [
        row("nnunet", 2, 400.0, 20000.0, 24000.0),
        row("iris", 2, 500.0, 30000.0, 33000.0),
        row("nnunet", 4, 800.0, 0.0),  # a CPU RSS rise of 0: no memory ratio at batch 4
        row("iris", 4, 600.0, 10.0),
        {"model": "iris", "batch": 8, "error": "OutOfMemoryError"},
        row("nnunet", 8, 900.0, 1.0),
    ]
    assert train_step.iris_over_nnunet_ratios(rows) == pytest.approx(
        {
            "tflops_iris_over_nnunet_b2": 0.8,
            "step_time_iris_over_nnunet_b2": 1.25,
            "samples_per_s_iris_over_nnunet_b2": 0.8,
            "peak_memory_iris_over_nnunet_b2": 1.5,
            "peak_reserved_iris_over_nnunet_b2": 33000 / 24000,
            "tflops_iris_over_nnunet_b4": 800 / 600,
            "step_time_iris_over_nnunet_b4": 0.75,
            "samples_per_s_iris_over_nnunet_b4": 800 / 600,
        }
    )


def test_train_step_warmup_runs_before_the_peak_memory_block(monkeypatch):
    """Compilation and cuDNN autotuning happen in the warm-up steps: the peak must cover the timed ones."""
    train_step = _load("train_step")
    state = {"inside": False, "steps_inside": 0, "steps_outside": 0}

    class SpyPeakMemory(train_step.PeakMemory):
        def __enter__(self):
            state["inside"] = True
            return super().__enter__()

        def __exit__(self, *exc):
            state["inside"] = False
            return super().__exit__(*exc)

    clip = torch.nn.utils.clip_grad_norm_

    def counting_clip(*args, **kwargs):  # called once per training step
        state["steps_inside" if state["inside"] else "steps_outside"] += 1
        return clip(*args, **kwargs)

    monkeypatch.setattr(train_step, "PeakMemory", SpyPeakMemory)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting_clip)
    args = argparse.Namespace(size=16, channels_last=False, model="tiny", classes=1, precision="fp32",
                              quick=True, optimizer="adamw", compile=False, compile_mode="default",
                              repeats=3, warmup=2)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = train_step.measure(args, "nnunet", 1, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert (state["steps_inside"], state["steps_outside"]) == (args.repeats, args.warmup)
    assert row["step_ms"] > 0 and row["memory_metric"]


def test_count_flops_counts_attention_on_cpu():
    """The counter has no formula for SDPA's CPU kernel; the counted pass must still count attention."""
    common = _load("_common")
    b, h, lq, lk, d = 2, 3, 64, 16, 8
    q = torch.randn(b, h, lq, d, requires_grad=True)
    k = torch.randn(b, h, lk, d, requires_grad=True)
    v = torch.randn(b, h, lk, d, requires_grad=True)
    mask = torch.rand(b, 1, 1, lk) > 0.3
    mask[..., 0] = True
    forward = 4 * b * h * lq * lk * d  # QKᵀ and PV, 2 FLOPs per multiply-add
    sdpa = torch.nn.functional.scaled_dot_product_attention
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    assert common.count_flops(lambda: sdpa(q, k, v)) == forward
    assert common.count_flops(lambda: sdpa(q, k, v, attn_mask=mask), torch.device("cpu")) == forward
    assert common.count_flops(lambda: sdpa(q, k, v).sum().backward(), "cpu") == 3 * forward
    # Only the counted call runs the math kernel: the timed calls keep the default backends.
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == flags


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
    ratios = payload["ratios"]
    seconds = {case: row["seconds"] for case, row in rows.items()}
    assert ratios["k_one_pass_over_single_class"] == pytest.approx(
        seconds["k_one_pass"] / seconds["single_class"]
    )
    assert ratios["k_single_passes_over_k_one_pass"] == pytest.approx(
        seconds["k_single_passes"] / seconds["k_one_pass"]
    )
    # Issue 8: the Q × K case and the sliding window against references measured in the same run.
    many = rows["2_queries"]
    assert (many["queries"], many["classes"]) == (2, 3)
    assert ratios["queries_case_over_queries_x_classes_single_class"] == pytest.approx(
        seconds["2_queries"] / (2 * 3 * seconds["single_class"])
    )
    assert ratios["queries_case_over_encode_plus_queries_one_shot"] == pytest.approx(
        seconds["2_queries"] / (seconds["encode_task"] + 2 * seconds["one_shot_cached"])
    )
    assert ratios["sliding_window_over_windows_x_one_shot_cached"] == pytest.approx(
        seconds["sliding_window"] / (rows["sliding_window"]["windows"] * seconds["one_shot_cached"])
    )


def test_tuning_reports_the_encode_once_speedup_and_checks_the_losses_agree(tmp_path):
    payload = _run("tuning", tmp_path, "--threads", "1", "--steps", "3", "--repeats", "1")
    rows = {r["variant"]: r for r in payload["results"]}
    assert len(rows) == 2
    for row in rows.values():
        _positive(row, "median_s", "speedup_vs_reference")
    assert payload["losses_agree"]
    reference, ours = (row["final_loss"] for row in payload["results"])
    assert ours == pytest.approx(reference, abs=1e-4)
    # X_over_Y is seconds(X) / seconds(Y), as in the other scripts: here the encode-once speed-up.
    reference_s, ours_s = (row["median_s"] for row in payload["results"])
    assert payload["ratios"] == {"segment_every_step_over_encode_once": pytest.approx(reference_s / ours_s)}
    assert payload["results"][1]["speedup_vs_reference"] == pytest.approx(reference_s / ours_s)


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


def _run_loader(monkeypatch, tmp_path, measure, *workers: str) -> tuple[dict, list[dict]]:
    """dataloader.main in this process with ``measure`` for measure_loader, the step rate read from a
    train_step JSON (2 steps/s); also every partial JSON as it was on disk after each row."""
    dataloader = _load("dataloader")
    out, partials = tmp_path / "dataloader.json", []

    class Spy(dataloader.IncrementalReport):
        def update(self, **fields):
            super().update(**fields)
            partials.append(json.loads(out.read_text()))

    monkeypatch.setattr(dataloader, "IncrementalReport", Spy)
    monkeypatch.setattr(dataloader, "measure_loader", measure(dataloader.measure_loader))
    train_json = tmp_path / "train_step_eager.json"
    train_json.write_text(json.dumps({"results": [{"model": "iris", "batch": 1, "step_ms": 500.0}]}))
    argv = [
        "--quick",
        "--synthetic",
        "--workers",
        *workers,
        "--train-json",
        str(train_json),
        "--json",
        str(out),
    ]
    payload = dataloader.main(argv)
    assert json.loads(out.read_text())["results"] == payload["results"] and payload["partial"] is False
    return payload, partials


def test_every_partial_loader_report_has_the_ratio_to_the_step_rate(monkeypatch, tmp_path):
    """The device suite may stop the loader at its limit: the rows it left must carry the target's ratio."""

    def measure(real):
        return lambda sampler_mod, sampler, workers, args, device: {"workers": workers, "batches_per_s": 3.0}

    payload, partials = _run_loader(monkeypatch, tmp_path, measure, "8", "0")
    assert [len(p["results"]) for p in partials] == [1, 2] and all(p["partial"] for p in partials)
    for report in [*partials, payload]:
        ratios = [r.get("over_step_rate") for r in report["results"]]
        assert ratios == pytest.approx([1.5] * len(report["results"])), report["results"]
        assert report["step_rate"]["steps_per_s"] == pytest.approx(2.0)


def test_a_loader_row_that_raises_is_recorded_and_the_others_are_measured(monkeypatch, tmp_path):
    """8 workers can die (a small /dev/shm); the single-process row and its ratio must still be reported."""

    def measure(real):
        def flaky(sampler_mod, sampler, workers, args, device):
            if workers == 8:
                raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Bus error.")
            return real(sampler_mod, sampler, workers, args, device)

        return flaky

    payload, partials = _run_loader(monkeypatch, tmp_path, measure, "8", "0")
    failed, measured = payload["results"]
    assert failed == {
        "workers": 8,
        "error": "RuntimeError: DataLoader worker (pid 123) is killed by signal: Bus error.",
    }
    assert measured["workers"] == 0 and measured["batches_per_s"] > 0
    assert measured["over_step_rate"] == pytest.approx(measured["batches_per_s"] / 2.0)
    assert partials[0]["results"] == [failed] and partials[0]["step_rate"]["steps_per_s"] == pytest.approx(
        2.0
    )


def test_an_encoder_that_fails_is_recorded_and_the_cases_without_it_are_measured(monkeypatch, tmp_path):
    """Compiled, the first encode is the first compilation: its error must cost its cases, not the step."""
    inference = _load("inference")

    def broken(self, *args, **kwargs):
        raise RuntimeError("simulated compile error")

    monkeypatch.setattr(inference.Iris, "encode_task", broken)
    out = tmp_path / "inference.json"
    threads = torch.get_num_threads()
    try:
        payload = inference.main(["--quick", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text())["partial"] is False
    rows = {r["case"]: r for r in payload["results"]}
    assert rows["encode_task"]["error"] == "RuntimeError: simulated compile error"
    assert rows["resample"]["seconds"] > 0  # needs no encoder
    skipped = {
        "one_shot_cached",
        "2_queries",
        "single_class",
        "k_one_pass",
        "k_single_passes",
        "sliding_window",
    }
    assert {
        case for case, row in rows.items() if row.get("error") == "skipped: encode_task failed"
    } == skipped
    assert payload["ratios"] == {}
