"""Shared pieces of the GPU benchmarks: timing, peak memory, FLOP counting, machine facts, output.

Everything here needs torch alone (numpy/psutil when present), because the GPU machine has torch, timm,
safetensors, numpy, pandas and scikit-learn but no Kedro, MONAI or SimpleITK. Scripts add ``src/`` to
``sys.path`` (via :data:`SRC`) and import only torch-only modules of the project.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # runs from a checkout, no install
MIB = 2**20


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_precision(device: torch.device) -> str:
    """bf16 on CUDA (what training and inference run), fp32 on CPU (CPU bf16 autocast is slow)."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options every script shares; ``None`` defaults are filled by :func:`finish_args`."""
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--size", type=int, default=None, help="crop / window edge in voxels (128)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions first")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (CUDA default)"
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | "
        "max-autotune-no-cudagraphs",
    )
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="bf16 on CUDA by default")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last 3-D weights and inputs (CUDA default)",
    )
    parser.add_argument(
        "--model", choices=("paper", "cpu", "tiny"), default=None, help="IrisConfig preset (cpu: make run's)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs)")
    parser.add_argument("--quick", action="store_true", help="CPU-small smoke settings")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def fill_unset(args: argparse.Namespace, values: dict[str, Any]) -> None:
    """Give every option the command line left at None its value from ``values``."""
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def finish_args(args: argparse.Namespace, full: dict[str, Any], quick: dict[str, Any]) -> argparse.Namespace:
    """Fill unset options: ``quick`` values under ``--quick`` (which also forces the CPU), else ``full``."""
    if args.quick and args.device == "auto":
        args.device = "cpu"
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    base = {
        "compile": on_cuda,
        "precision": default_precision(device),
        "channels_last": on_cuda,
        "model": "paper",
        **full,
    }
    if args.quick:
        base.update({"compile": False, "channels_last": False, "model": "tiny", **quick})
    fill_unset(args, base)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = str(device)
    return args


def iris_config(preset: str, **overrides: Any):
    from iris_pipelines.model import IrisConfig

    return getattr(IrisConfig, preset)(**overrides)


def to_channels_last(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d) if enabled and x.dim() == 5 else x


def maybe_compile(fn: Callable, enabled: bool, mode: str) -> Callable:
    if not enabled:
        return fn
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones, synchronised per call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summarise(times: Sequence[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
    }


class _RssSampler:
    """Peak RSS of this process sampled every ``interval_s`` in a thread (psutil), as in preprocess.py."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.start_rss = self._process.memory_info().rss
        self.peak = self.start_rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
        return self.peak - self.start_rss


class PeakMemory:
    """Peak memory of a block, in MiB, with the name of what was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, weights and inputs included: absolute, not
    the rise over entry) and ``max_memory_reserved`` (the caching allocator's pool, closer to what
    nvidia-smi shows), both reset at entry. CPU: the rise of the
    process's RSS over its value at entry, sampled with psutil every 5 ms; without psutil the rise of
    ``getrusage().ru_maxrss``, a high-water mark that only shows growth beyond the process's earlier peak.
    CPU figures include allocator caching and are approximate.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = 0.0
        self.reserved_mib: float | None = None
        self.metric = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.metric = "cuda_max_memory_allocated"
        else:
            try:
                self._sampler: _RssSampler | None = _RssSampler()
                self.metric = "cpu_peak_rss_rise_psutil"
            except ImportError:
                self._sampler = None
                self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                self.metric = "cpu_ru_maxrss_rise"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB
            self.reserved_mib = torch.cuda.max_memory_reserved(self.device) / MIB
        elif self._sampler is not None:
            self.peak_mib = self._sampler.stop() / MIB
        else:
            self.peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base) / MIB

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peak_memory_mib": self.peak_mib, "memory_metric": self.metric}
        if self.reserved_mib is not None:
            out["peak_reserved_mib"] = self.reserved_mib
        return out


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def count_flops(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """FLOPs of one call of ``fn`` (run eagerly) by ``torch.utils.flop_counter.FlopCounterMode``.

    It counts matmuls, convolutions (also transposed) and SDPA, forward and backward, as 2 FLOPs per
    multiply-add; norms, activations and other elementwise work are not counted, for either model.
    ``device`` is where ``fn`` computes. The counter has formulas for SDPA's CUDA kernels (flash,
    memory-efficient, cuDNN) but not for the CPU flash kernel, which it would count as 0 FLOPs; on CPU
    the counted call therefore runs SDPA through its math kernel (``SDPBackend.MATH``: two matmuls the
    counter sees, 4·B·H·Lq·Lk·D forward, twice that backward). Only this counted call is affected: the
    backend choice is restored on return, so timed calls keep the default kernels.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    on_cpu = torch.device(device).type == "cpu"
    backends = sdpa_kernel(SDPBackend.MATH) if on_cpu else contextlib.nullcontext()
    counter = FlopCounterMode(display=False)
    with backends, counter:
        fn()
    return int(counter.get_total_flops())


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    with contextlib.suppress(OSError):
        info["load_avg_1m"] = os.getloadavg()[0]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            {
                "gpu": props.name,
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
            }
        )
    else:
        info["cpu"] = _cpu_model()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def set_fast_math(device: torch.device) -> None:
    """cuDNN autotuning (fixed shapes) and TF32 for any fp32 matmul/conv left under bf16 autocast."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def report_header(
    name: str, argv: Sequence[str] | None, device: torch.device, args: argparse.Namespace, **settings: Any
) -> dict[str, Any]:
    """What every benchmark JSON starts with: which script, its command line, the machine, its settings
    (the parsed options plus ``settings``)."""
    return {
        "benchmark": name,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(device),
        "settings": {**vars(args), "json": str(args.json), **settings},
    }


def write_json(path: Path | None, payload: dict[str, Any], quiet: bool = False) -> None:
    """Write ``payload`` atomically: a step stopped mid-write (the device suite's time limit) leaves the
    previous complete file, never a truncated one."""
    text = json.dumps(payload, indent=2, default=str)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text + "\n")
    os.replace(partial, path)
    if not quiet:
        print(f"wrote {path}")


class IncrementalReport:
    """A benchmark's JSON rewritten after every finished row with ``"partial": true``, so rows measured
    before a time limit or a crash of a later row survive; :meth:`finish` writes the final payload."""

    def __init__(self, path: Path | None, header: dict[str, Any]) -> None:
        self.path, self.header = path, header

    def update(self, **fields: Any) -> None:
        write_json(self.path, {**self.header, **fields, "partial": True}, quiet=True)

    def finish(self, **fields: Any) -> dict[str, Any]:
        payload = {**self.header, **fields, "partial": False}
        write_json(self.path, payload)
        return payload


def error_row(error: BaseException) -> dict[str, str]:
    """What a row records when its measurement raised: the type and the start of the message."""
    return {"error": f"{type(error).__name__}: {error}"[:300]}


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    print(f"  {label}: {time.perf_counter() - start:.2f} s", flush=True)
