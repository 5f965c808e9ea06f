"""Timers and peak-memory probes for CUDA and for CPU processes.

CUDA: ``triton.testing.do_bench``, the field's convention: warm-up, the L2 cache flushed before
every timed call (outside the timed region), CUDA events around each call, and the median with
the 20th and 80th percentiles; peak = ``torch.cuda.max_memory_allocated`` above what was
allocated just before the call (inputs, oracle and any persistent workspace).

CPU: wall time of up to ``repeats`` calls; peak = the process's resident-set high-water mark
above its resident set just before the call. ``/proc/self/clear_refs`` (writing 5) resets the
high-water mark, so one process can measure several cases in a row; glibc's malloc is told to
map and unmap each tensor for the memory call only (see ``CpuPeak``). Without clear_refs the
process's ``ru_maxrss`` is used (then only the first measurement in a process is right).
"""

import ctypes
import gc
import resource
import statistics
import time
from typing import Callable, List, Optional

import torch

# do_bench's warm-up, in milliseconds of calls (the first call, which compiles, is made before it).
WARMUP_MS = 25.0
QUANTILES = (0.5, 0.2, 0.8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float,
            min_repeats: int = 1) -> dict:
    """Median milliseconds of ``fn`` with its 20th and 80th percentiles: ``{"ms", "q20_ms", "q80_ms"}``
    plus ``"reps"`` (timed calls; CPU) or ``"calls"`` (every call do_bench made, its five-call estimate
    and warm-up included; CUDA). CUDA times calls for about ``budget_s``; CPU makes up to ``repeats``
    calls (at least ``min_repeats``), stopping early once ``budget_s`` is spent."""
    if device.type == "cuda":
        return _do_bench(fn, budget_s)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max(repeats, min_repeats):
        if len(times) >= min_repeats and time.perf_counter() - start > budget_s:
            break
        call_start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - call_start) * 1e3)
    q20, q80 = _quantiles(times)
    return dict(ms=statistics.median(times), q20_ms=q20, q80_ms=q80, reps=len(times))


def _quantiles(times: List[float]):
    """20th and 80th percentiles, linearly interpolated as torch.quantile does (do_bench's)."""
    ordered = sorted(times)

    def at(q):
        x = q * (len(ordered) - 1)
        low = int(x)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (x - low)

    return at(0.2), at(0.8)


def _do_bench(fn: Callable[[], object], budget_s: float) -> dict:
    from triton.testing import do_bench

    calls = 0

    def counted():
        nonlocal calls
        calls += 1
        fn()

    median, q20, q80 = do_bench(counted, warmup=WARMUP_MS, rep=max(1.0, budget_s * 1e3), quantiles=list(QUANTILES))
    return dict(ms=median, q20_ms=q20, q80_ms=q80, calls=calls)


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# glibc mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


class CpuPeak:
    """Resident-set growth of this process during a block (bytes).

    During the block malloc serves every allocation above 128 KiB with its own mapping,
    returned on free, so the high-water mark follows live memory instead of malloc's
    reuse of its heap; afterwards the thresholds go to glibc's own ceilings (32 MiB
    mappings, 64 MiB trim), which is how a warmed-up process runs the timed calls.
    """

    def __init__(self):
        self.can_reset = True
        self.libc = _glibc()

    def start(self):
        gc.collect()
        if self.libc is not None:
            self.libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
            self.libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
            self.libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.can_reset = False
        rss = _status_kb("VmRSS")
        self.base_kb = rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop(self) -> int:
        peak = _status_kb("VmHWM") if self.can_reset else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self.libc is not None:
            self.libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
            self.libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)
        return max(0, peak - self.base_kb) * 1024


class CudaPeak:
    def __init__(self, device):
        self.device = device

    def start(self):
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base


def peak_for(device: torch.device):
    return CudaPeak(device) if device.type == "cuda" else CpuPeak()
