"""Clocks and peak-memory probes for CUDA and for CPU processes.

CUDA: CUDA events around each call; peak = ``torch.cuda.max_memory_allocated`` above what
was allocated just before the call (inputs, oracle and any persistent workspace).

CPU: wall time; peak = the process's resident-set high-water mark above its resident set
just before the call. ``/proc/self/clear_refs`` (writing 5) resets the high-water mark,
so one process can measure several cases in a row; the worker runs with
``MALLOC_MMAP_THRESHOLD_`` fixed so freed tensors go back to the system rather than
staying in malloc's heap and hiding the next call's peak. Without clear_refs the
process's ``ru_maxrss`` is used (then only the first measurement in a process is right).
"""

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


def median_ms(fn: Callable[[], object], clock, repeats: int, budget_s: float, min_repeats: int = 1,
              samples: Optional[List[float]] = None) -> Tuple[float, int]:
    """Median over up to ``repeats`` timed calls (counting ``samples`` already taken), stopping
    early once ``budget_s`` (seconds, including those samples) is spent."""
    times: List[float] = list(samples or [])
    start = time.perf_counter() - sum(times) / 1e3
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


class CpuPeak:
    """Resident-set growth of this process during a block (bytes)."""

    def __init__(self):
        self.can_reset = True

    def start(self):
        gc.collect()
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
