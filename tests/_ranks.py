"""Running scenarios on two CPU ranks (gloo, a file store in a tmp dir: no port).

Starting a rank costs seconds (importing torch twice on two cores), so one spawn serves a
test module: the ranks run every scenario in turn and write each one's report (a JSON
dict) as it finishes; the tests assert on them. Kernels run under the Triton interpreter in
the children (TRITON_INTERPRET=1 is set for them before triton loads).
"""

import datetime
import importlib.util
import json
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def deepspeed_installed() -> bool:
    # Found, not imported: importing DeepSpeed in the test process would pick its accelerator here.
    return importlib.util.find_spec("deepspeed") is not None


def run_ranks(scenarios, folder, seed, timeout_s=120, world=WORLD):
    """Run ``scenarios`` ({name: (worker, args)}) on ``world`` gloo ranks; ``worker(rank, *args)`` returns a report.

    Returns {name: [report of rank 0, report of rank 1, ...]} for the scenarios that finished
    and the error that stopped the ranks (None when all finished). ``timeout_s`` bounds
    every collective, so a rank left waiting by its peer fails instead of hanging.
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the children, which run on CPU tensors
    error = None
    try:
        mp.spawn(_entry, args=(scenarios, str(folder), seed, timeout_s, world), nprocs=world, join=True)
    except Exception as err:  # a rank raised: the others are stopped; keep what finished
        error = str(err)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    reports = {}
    for name in scenarios:
        paths = [folder / f"{name}.rank{r}.json" for r in range(world)]
        if all(p.exists() for p in paths):
            reports[name] = [json.loads(p.read_text()) for p in paths]
    return reports, error


def _entry(rank, scenarios, folder, seed, timeout_s, world=WORLD):
    torch.set_num_threads(1)  # two ranks on a two-core machine
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        for name, (worker, args) in scenarios.items():
            torch.manual_seed(seed)  # the same inputs on every rank
            try:
                report = worker(rank, *args)
            except Exception:
                raise RuntimeError(f"scenario {name} failed on rank {rank}:\n{traceback.format_exc()}")
            with open(os.path.join(folder, f"{name}.rank{rank}.json"), "w") as f:
                json.dump(report, f)
    finally:
        dist.destroy_process_group()
