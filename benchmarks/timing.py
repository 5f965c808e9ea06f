"""Clocks and peak-memory probes for CUDA and for CPU processes.

CUDA: CUDA events around each call; peak = ``torch.cuda.max_memory_allocated`` above what
was allocated just before the call (inputs, oracle and any persistent workspace).

CPU: wall time; peak = the process's resident-set high-water mark above its resident set
just before the call. ``/proc/self/clear_refs`` (writing 5) resets the high-water mark,
so one process can measure several cases in a row; glibc's malloc is told to map and
unmap each tensor for the memory call only (see ``CpuPeak``). Without clear_refs the
process's ``ru_maxrss`` is used (then only the first measurement in a process is right).
"""

import ctypes
import gc
import resource
import statistics
import time
from typing import Callable, List, Optional, Tuple

import torch


class CudaClock:
    def __init__(self, device):
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def sync(self):
        torch.cuda.synchronize(self.device)


class CpuClock:
    def __call__(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def sync(self):
        pass


def clock_for(device: torch.device):
    return CudaClock(device) if device.type == "cuda" else CpuClock()


def median_ms(fn: Callable[[], object], clock, repeats: int, budget_s: float,
              min_repeats: int = 1) -> Tuple[float, int]:
    """Median over up to ``repeats`` timed calls, stopping early once ``budget_s`` is spent."""
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max(repeats, min_repeats):
        if len(times) >= min_repeats and time.perf_counter() - start > budget_s:
            break
        times.append(clock(fn))
    return statistics.median(times), len(times)


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
