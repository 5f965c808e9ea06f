"""``python -m benchmarks``: dpo-fast against naive PyTorch and the peers, one table per shape.

``python -m benchmarks plan [--card H100|H200|A100]`` prints the paper costs instead (no run).
``python -m benchmarks parity`` measures per-token log-prob error against a float32 head and float64.

On a CUDA machine it runs the GPU shapes (Llama-3-8B, Qwen2.5-7B and Gemma-2-2B heads at
4 pairs x 1024 and 1 pair x 8192 completion tokens, bf16); elsewhere small float32 CPU
shapes that finish in about two minutes. Results go to
``benchmarks/results/<device>-<date>.{json,md,png}`` (or ``--out``).
"""

import argparse
import math
import sys
from pathlib import Path

import torch

from .cases import ALL_CASES, CPU_CASES, GPU_CASES
from .methods import BY_NAME, METHODS
from .report import text_tables, write_all
from .sweep import run_sweep

RESULTS = Path(__file__).resolve().parent / "results"


def _names(value, known, what):
    if not value:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from: {', '.join(known)}")
    return names


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # paper costs of every GPU case (benchmarks/plan.py)
        from .plan import main as plan_main

        return plan_main(argv[1:])
    if argv[:1] == ["parity"]:  # per-token log-prob error against a float32 head and float64 (benchmarks/parity.py)
        from .parity import main as parity_main

        return parity_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--cases", help="comma-separated case names (see --list)")
    parser.add_argument("--methods", help="comma-separated method names (see --list)")
    parser.add_argument("--quick", action="store_true", help="GPU: the first three cases only; CPU: tiny and small")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (GPU 10, CPU 3)")
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="stop starting new runs after this many seconds (the rest are reported as skipped)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (default 1 on CPU: on a shared machine, two OpenMP threads "
                             "wait on each other whenever another process holds a core; the GPU run keeps torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--list", action="store_true", help="list cases and methods, then exit")
    args = parser.parse_args(argv)

    if args.list:
        for case in ALL_CASES.values():
            print(f"case   {case.name:22s} H={case.hidden_size} V={case.vocab_size} N={case.num_tokens} {case.dtype}")
        for m in METHODS:
            print(f"method {m.name:22s} {'exact ' if m.exact else 'approx'} {m.summary}")
        return 0

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    default_cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    case_names = _names(args.cases, list(ALL_CASES), "cases")
    cases = [ALL_CASES[n] for n in case_names] if case_names else list(default_cases)
    if args.quick and not case_names:
        cases = cases[:3] if device.type == "cuda" else cases[:2]
    method_names = _names(args.methods, list(BY_NAME), "methods")
    methods = [BY_NAME[n] for n in method_names] if method_names else list(METHODS)
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)  # CPU workers inherit it (OMP_NUM_THREADS)

    print(f"dpo-fast benchmarks on {device}: {len(cases)} cases x {len(methods)} methods", flush=True)
    # Partial results are written as the sweep goes, so a run cut short still leaves its tables.
    report = run_sweep(cases, methods, device, repeats, args.budget_s, progress=not args.no_progress,
                       on_update=lambda partial: write_all(partial, args.out, make_plot=False))
    print(text_tables(report))
    written = write_all(report, args.out, make_plot=not args.no_plot)
    print(f"\nsweep wall time {report['environment']['wall_s']} s; wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
