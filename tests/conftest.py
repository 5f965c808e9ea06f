"""Test set-up: without a GPU, Triton kernels run through its interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection time, ahead of every test module.
"""

import os
import shutil
import zlib

if not shutil.which("nvidia-smi") and os.environ.get("TRITON_INTERPRET") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    # Every test draws its inputs from a seed fixed by its own name: the same inputs on every run and
    # every machine, so a result never depends on the luck of a draw. Tests that need several draws
    # parametrize their own seeds on top of this one.
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield seed


@pytest.fixture(autouse=True, scope="session")
def _gpu_arithmetic():
    # DPO_FAST_EMULATE_GPU=1: the interpreter computes tl.dot, bf16 casts, exp and division as an
    # NVIDIA GPU does (tests/gpu_arith.py), so a kernel that is exact only in numpy's arithmetic fails.
    import gpu_arith

    if gpu_arith.requested() and os.environ.get("TRITON_INTERPRET") == "1":
        with gpu_arith.emulate_gpu_arithmetic():
            yield
    else:
        yield


def pytest_report_header(config):
    import gpu_arith

    emulated = gpu_arith.requested() and os.environ.get("TRITON_INTERPRET") == "1"
    return (f"dpo-fast tests on {DEVICE} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
            f"{', GPU arithmetic emulated' if emulated else ''})")


def pytest_configure(config):
    # `-m "not slow"` skips them locally; CI runs everything.
    config.addinivalue_line("markers", "slow: loads a real pretrained model (tests/test_smollm2.py)")
