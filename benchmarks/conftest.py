"""pytest-benchmark suite set-up: without a GPU, Triton paths run through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection time, before torch is imported. ``pytest tests`` never reads this file;
``pytest benchmarks/ --benchmark-only`` does.
"""

import os
import shutil

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # As in `python -m benchmarks`: one thread, so another process holding a core does not stall
    # an OpenMP thread pair (timings on a shared two-core machine swing 30x otherwise).
    torch.set_num_threads(1)
