"""Shared helpers: timing with warm-up and repeats, and writing JSON + a markdown table."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median and min wall time of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def median_spread(values: list[float]) -> tuple[float, float]:
    """Median and inter-quartile range (the spread reported next to every median)."""
    if len(values) < 2:
        return (float(values[0]) if values else float("nan")), 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return float(statistics.median(values)), float(q[2] - q[0])


class PeakMemory:
    """Peak memory of a code block above the memory in use when it starts, in bytes.

    CUDA: `torch.cuda.max_memory_allocated` (reset at the start), the allocator's exact peak of live tensors.
    CPU (Linux): the peak resident set size (`VmHWM`, reset through `/proc/self/clear_refs`) minus the resident
    size at the start. Why that measures tensors: `fixed_mmap_threshold()` makes glibc serve every allocation of
    64 KiB or more (all but the smallest tensors) by its own mmap, returned to the system when freed, so the
    resident size follows the live tensors (autograd's saved activations included) instead of the heap's
    high-water mark, and `malloc_trim(0)` before the block returns the free heap pages that smaller allocations
    left resident. `tracemalloc` would not see them at all (torch does not allocate through Python), and
    `ru_maxrss` cannot be reset, so it only ever grows within one process. Elsewhere `ru_maxrss` is the fallback.
    """

    _threshold_set = False

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0.0
        self.method = ("cuda max_memory_allocated" if self.device.type == "cuda" else
                       "peak RSS (VmHWM reset, mmap threshold 64 KiB)" if Path("/proc/self/clear_refs").exists()
                       else "ru_maxrss (not reset)")

    @classmethod
    def fixed_mmap_threshold(cls) -> None:
        if cls._threshold_set:
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD; a fixed value ends its adaptation
        cls._threshold_set = True

    @staticmethod
    def _status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1]) * 1024
        return float("nan")

    @contextlib.contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak_bytes = float(torch.cuda.max_memory_allocated(self.device) - start)
            return
        if self.method.startswith("peak RSS"):
            self.fixed_mmap_threshold()
            gc.collect()
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            start = self._status("VmRSS")
            yield self
            self.peak_bytes = self._status("VmHWM") - start
            return
        import resource

        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        yield self
        self.peak_bytes = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start)


def machine() -> dict[str, str | int]:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def write_results(name: str, rows: list[dict], columns: list[str], meta: dict) -> Path:
    """`results/<name>.json` with rows and meta, and `results/<name>.md` with a table of `columns`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md
