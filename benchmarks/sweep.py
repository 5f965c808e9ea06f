"""Run every method on every case and collect one report dict.

On CUDA everything runs in this process (peak memory is per call via the caching
allocator's statistics). On CPU the inputs and float64 oracle of each case are written to
a temporary file, and each method runs in its own process over those files
(``benchmarks.worker``), so resident-set peaks belong to that method alone.
"""

import datetime
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, List, Optional

import torch

from .cases import Case, make_inputs
from .floor import gemm_floor
from .measure import run_method
from .methods import BASELINE, Method
from .oracle import compute_oracle
from .worker import MARKER

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("torch", "triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "dpo-fast")
# Seconds a method needs at least before the GPU budget runs out (compilers need more).
MIN_SECONDS = {"naive-compile": 60.0, "liger-dpo": 60.0}
DEFAULT_MIN_SECONDS = 15.0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict:
    versions = {}
    for name in PEERS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        slug = name
    else:
        name = f"{os.cpu_count()}-core CPU ({_cpu_name()})"
        slug = f"cpu-{os.cpu_count()}core"
    return dict(date=datetime.date.today().isoformat(), device=name,
                device_slug="".join(c if c.isalnum() else "-" for c in slug.lower()).strip("-"),
                device_type=device.type, cuda=torch.version.cuda, python=platform.python_version(),
                threads=torch.get_num_threads(), load_average_start=_load_average(), versions=versions)


def derive(entry: dict) -> None:
    """Add ratios against naive eager, the GEMM floor and achieved TFLOP/s to each result."""
    case = Case(**entry["case"])
    base = next((r for r in entry["results"] if r["method"] == BASELINE and r["status"] == "ok"), None)
    floor_ms = entry["floor"]["floor_ms"]
    for r in entry["results"]:
        if r["status"] != "ok":
            continue
        r["tflops"] = case.flops(3) / (r["fwd_bwd_ms"] * 1e-3) / 1e12
        r["fwd_tflops"] = case.flops(1) / (r["fwd_ms"] * 1e-3) / 1e12
        r["floor_fraction"] = floor_ms / r["fwd_bwd_ms"]
        r["grad_err"] = max(r["grad_hidden_err"], r["grad_weight_err"])
        if base is not None:
            r["speedup"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["fwd_speedup"] = base["fwd_ms"] / r["fwd_ms"]
            r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None


def run_order(methods: List[Method]) -> List[Method]:
    """The order methods are run in (tables keep the given order): dpo-fast first, so a budget cut
    short on a GPU still measures it; then the peers, those that compile (MIN_SECONDS) last."""
    def priority(method: Method):
        return (not method.name.startswith("dpo-fast"), MIN_SECONDS.get(method.name, DEFAULT_MIN_SECONDS))

    return sorted(methods, key=priority)  # stable: the given order within each group


def _skip(method: Method, case: Case, reason: str) -> dict:
    return dict(method=method.name, exact=method.exact, summary=method.summary, case=case.name, status="skipped",
                reason=reason)


def run_sweep(cases: List[Case], methods: List[Method], device: torch.device, repeats: int, budget_s: float,
              progress: bool = True, on_update: Optional[Callable[[dict], None]] = None) -> dict:
    """Measure ``methods`` on ``cases`` (in ``run_order``); ``on_update(report)`` is called after each
    method with the results so far, so an interrupted run still leaves files behind."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    deadline = started + budget_s
    env = environment(device)
    bar = tqdm(total=len(cases) * len(methods), unit="run", disable=not progress, dynamic_ncols=True)
    say = bar.write if progress else functools.partial(print, flush=True)
    entries = [dict(case=c.as_dict(), name=c.name, results=[]) for c in cases]
    order = {m.name: i for i, m in enumerate(methods)}

    def snapshot() -> dict:
        report = dict(environment=dict(env, wall_s=round(time.monotonic() - started, 1),
                                       load_average_end=_load_average()), cases=[])
        for entry in entries:
            entry = dict(entry, results=sorted((dict(r) for r in entry["results"]), key=lambda r: order[r["method"]]))
            if "floor" in entry:
                derive(entry)
            report["cases"].append(entry)
        return report

    def checkpoint():
        if on_update is not None:
            on_update(snapshot())

    run = _run_cuda if device.type == "cuda" else _run_cpu
    run(cases, run_order(methods), device, repeats, entries, deadline, bar, say, checkpoint)
    bar.close()
    return snapshot()


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _record(entry, result, bar, say):
    entry["results"].append(result)
    if result["status"] != "ok":
        say(f"  {result['status']}: {result['method']} @ {entry['name']}: {result.get('reason')}")
    elif bar.disable:  # no progress bar (logs): one line per run instead
        say(f"  ok: {result['method']} @ {entry['name']}: fwd {result['fwd_ms']:.4g} ms, fwd+bwd "
            f"{result['fwd_bwd_ms']:.4g} ms, peak {result['peak_bytes'] / 2**20:.4g} MiB, "
            f"grad err {max(result['grad_hidden_err'], result['grad_weight_err']):.1e}")
    bar.update(1)


def _prepare(case: Case, device, entry, say):
    start = time.monotonic()
    inputs = make_inputs(case, device)
    oracle = compute_oracle(inputs, keep_dtype=torch.float64 if device.type == "cpu" else torch.float32)
    entry["calibration"] = inputs.calibration
    entry["oracle_loss"] = oracle.loss
    entry["floor"] = gemm_floor(case, device)
    say(f"{case.name}: inputs + float64 oracle + GEMM floor in {time.monotonic() - start:.1f} s "
        f"(logit std {inputs.calibration['logit_std']}, mean NLL {inputs.calibration['mean_nll']}, "
        f"top-1 {inputs.calibration['top1_rate']})")
    return inputs, oracle


def _run_cuda(cases, methods, device, repeats, entries, deadline, bar, say, checkpoint):
    for case, entry in zip(cases, entries):
        if deadline - time.monotonic() < 2 * DEFAULT_MIN_SECONDS:
            for m in methods:
                _record(entry, _skip(m, case, "time budget (--budget-s) spent"), bar, say)
            checkpoint()
            continue
        bar.set_postfix_str(f"{case.name}: preparing")
        inputs, oracle = _prepare(case, device, entry, say)
        checkpoint()
        for m in methods:
            bar.set_postfix_str(f"{case.name}: {m.name}")
            reason = m.unavailable(case, device)
            if reason is None and deadline - time.monotonic() < MIN_SECONDS.get(m.name, DEFAULT_MIN_SECONDS):
                reason = "time budget (--budget-s) spent"
            if reason:
                result = _skip(m, case, reason)
            else:
                result = dict(run_method(m, inputs, oracle, device, repeats, budget_s=1.0), case=case.name)
            _record(entry, result, bar, say)
            checkpoint()
        del inputs, oracle
        gc.collect()
        torch.cuda.empty_cache()


def _run_cpu(cases, methods, device, repeats, entries, deadline, bar, say, checkpoint):
    with tempfile.TemporaryDirectory(prefix="dpo-fast-bench-") as tmp:
        files = {}
        for i, (case, entry) in enumerate(zip(cases, entries)):
            bar.set_postfix_str(f"{case.name}: preparing")
            inputs, oracle = _prepare(case, device, entry, say)
            files[case.name] = os.path.join(tmp, f"case{i}.pt")
            torch.save(dict(case=case.as_dict(), tensors=inputs.tensors(), calibration=inputs.calibration,
                            oracle=dict(loss=oracle.loss, grad_hidden=oracle.grad_hidden,
                                        grad_weight=oracle.grad_weight)), files[case.name])
            del inputs, oracle
        by_name = {e["name"]: e for e in entries}
        for m in methods:
            runnable = []
            for case in cases:
                reason = m.unavailable(case, device)
                if reason is None and time.monotonic() > deadline:
                    reason = "time budget (--budget-s) spent"
                if reason:
                    _record(by_name[case.name], _skip(m, case, reason), bar, say)
                else:
                    runnable.append(case)
            if runnable:
                bar.set_postfix_str(m.name)
                _run_worker(m, [files[c.name] for c in runnable], runnable, repeats, by_name, bar, say)
            checkpoint()


def _run_worker(method, paths, cases, repeats, by_name, bar, say, timeout_per_case=300):
    """One process for ``method`` over ``paths``; results stream back one line per case."""
    # ROOT goes last on the path: a dpo-fast copy placed ahead of it (gpu.sh's fallback) must win.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p))
    if method.triton_interpreter:
        env["TRITON_INTERPRET"] = "1"
    safe_path = ["-P"] if getattr(sys.flags, "safe_path", False) else []
    cmd = [sys.executable, *safe_path, "-m", "benchmarks.worker", "--method", method.name, "--repeats", str(repeats),
           *paths]
    done = set()
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                               stderr=err, text=True) as proc:
        watchdog = threading.Timer(timeout_per_case * len(paths), proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                if line.startswith(MARKER):
                    result = json.loads(line[len(MARKER):])
                    done.add(result["case"])
                    _record(by_name[result["case"]], result, bar, say)
            proc.wait()
        finally:
            watchdog.cancel()
        err.seek(0)
        tail = " | ".join(err.read().strip().splitlines()[-3:])
    for case in cases:
        if case.name not in done:
            result = _skip(method, case, f"worker exited {proc.returncode}: {tail[:300]}")
            result["status"] = "error"
            _record(by_name[case.name], result, bar, say)
