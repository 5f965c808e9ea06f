"""CPU worker: one process per method, measuring it on each case file it is given.

Run by ``benchmarks.sweep`` as ``python -m benchmarks.worker --method NAME CASE_FILE...``
(with ``TRITON_INTERPRET=1`` for Triton paths and the sweep's thread count); prints
one ``BENCH_RESULT {json}`` line per case. A separate process keeps one method's
imports, compiled code and allocator state from touching another's peak memory.
"""

import argparse
import gc
import json
import sys

import torch

from .cases import Case, Inputs
from .measure import run_method
from .methods import BY_NAME
from .oracle import Oracle

MARKER = "BENCH_RESULT "


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True, choices=sorted(BY_NAME))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=3.0)
    parser.add_argument("case_files", nargs="+")
    args = parser.parse_args(argv)
    method, device = BY_NAME[args.method], torch.device("cpu")
    for path in args.case_files:
        data = torch.load(path, weights_only=False)
        case = Case(**data["case"])
        inputs = Inputs.from_tensors(case, data["tensors"], data["calibration"], device)
        oracle = Oracle(**data["oracle"])
        del data
        result = run_method(method, inputs, oracle, device, args.repeats, args.budget_s)
        result["case"] = case.name
        print(MARKER + json.dumps(result), flush=True)
        del inputs, oracle
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
