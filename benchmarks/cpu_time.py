"""Process CPU time of forward+backward per method on one CPU case, round-robin (a shared machine's fair clock).

    python -m benchmarks.cpu_time [--case "medium 2x128"] [--repeats 5] [--methods naive-plain,dpo-fast-torch,...]

Wall time on a machine other jobs share measures the other jobs; the process's own CPU time does not
(one torch thread, so CPU time is the time this process computed). Each round runs every method once,
in turn, so drifting load touches all alike. Prints each method's median and minimum in ms.
"""

import argparse
import time

import torch

from .cases import ALL_CASES, make_inputs
from .methods import BY_NAME

DEFAULT_METHODS = "naive-plain,naive-eager,dpo-fast-torch,dpo-fast-torch-plain"


def measure(case_name: str, names, repeats: int) -> dict:
    torch.set_num_threads(1)
    inputs = make_inputs(ALL_CASES[case_name], torch.device("cpu"))
    fns = {name: BY_NAME[name].build(inputs) for name in names}

    def step(fn) -> float:
        inputs.hidden.grad = inputs.weight.grad = None
        start = time.process_time()
        fn().backward()
        return time.process_time() - start

    for name in names:  # warm-up
        step(fns[name])
    times = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            times[name].append(step(fns[name]))
    return {name: sorted(ts) for name, ts in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="medium 2x128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    args = parser.parse_args(argv)
    names = args.methods.split(",")
    results = measure(args.case, names, args.repeats)
    for name, ts in results.items():
        print(f"{name:22s} median {1e3 * ts[len(ts) // 2]:8.1f} ms   min {1e3 * ts[0]:8.1f} ms   "
              f"({BY_NAME[name].summary})")


if __name__ == "__main__":
    main()
