"""Test set-up: tests run on the device they target, CUDA when present, else CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection time, ahead of every test module. The one device choice is ``helpers.TEST_DEVICE``,
handed to tests by the ``device`` fixture: a test that runs Triton kernels makes its tensors
there. On a CUDA machine the interpreter is off, so Triton cannot run CPU tensors (the planner
raises); a test that builds CPU tensors on purpose (a trainer run with ``use_cpu=True``) says so
with ``@pytest.mark.cpu_tensors`` and its Triton variants are skipped there.

Every test is audited as it runs (``_kernels_run_on_the_test_device``): a test that did not take
the ``device`` fixture yet asked for ``impl="chunked"``/``"fused"`` on CPU tensors, or launched a
kernel directly on them, fails, so a test that would raise on a CUDA machine fails here first.
"""

import importlib.util
import os
import shutil
import zlib

if not shutil.which("nvidia-smi") and os.environ.get("TRITON_INTERPRET") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import TEST_DEVICE, record_launches  # noqa: E402

DEVICE = TEST_DEVICE
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
TRITON_IMPLS = ("chunked", "fused")


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


def _cpu_runs_triton() -> bool:
    from dpo_fast.rows import triton_runs_on

    return triton_runs_on(torch.device("cpu"))


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("cpu_tensors")
    params = getattr(getattr(item, "callspec", None), "params", {})
    if marker is not None and params.get("impl") in TRITON_IMPLS and not _cpu_runs_triton():
        pytest.skip(f"impl={params['impl']!r} on CPU tensors needs Triton's interpreter, off on this CUDA machine "
                    f"({marker.kwargs.get('reason', marker.args[0] if marker.args else 'CPU tensors by design')})")


@pytest.fixture(autouse=True)
def _kernels_run_on_the_test_device(request):
    """Fail a test that would raise on a CUDA machine: see the module docstring.

    There the interpreter is off, so a Triton impl asked for CPU tensors raises, and a kernel
    launched directly on CPU tensors cannot run. Here both run: every impl resolution
    (``api.resolve_impl``) and every kernel launch is recorded and judged after the test.
    ``impl="auto"`` on CPU tensors is fine: on a CUDA machine it takes the PyTorch rows.
    """
    if importlib.util.find_spec("triton") is None:
        yield
        return
    from dpo_fast import api

    resolved = []
    real_resolve = api.resolve_impl

    def resolve(impl, device, *args, **kwargs):
        resolved.append((impl, torch.device(device)))
        return real_resolve(impl, device, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:  # its own: a test's monkeypatch.undo() leaves it in place
        patch.setattr(api, "resolve_impl", resolve)
        launches = record_launches(patch)
        yield
    if request.node.get_closest_marker("cpu_tensors") is not None:
        return
    fix = "make its tensors on the `device` fixture (CUDA when present) or mark the test cpu_tensors"
    if "device" not in request.fixturenames:
        asked = sorted({f"impl={impl!r} on {d}" for impl, d in resolved if impl in TRITON_IMPLS and d.type == "cpu"})
        if asked:
            pytest.fail(f"{request.node.nodeid} asked for {asked}: that raises on a CUDA machine; {fix}",
                        pytrace=False)
        if launches and not resolved:  # kernels called directly, on CPU tensors
            pytest.fail(f"{request.node.nodeid} launched Triton kernels "
                        f"{sorted({seen.kernel for seen in launches})} on CPU tensors; {fix}", pytrace=False)
    elsewhere = sorted({str(d) for seen in launches for d in seen.tensor_devices if d.type != DEVICE.type})
    if elsewhere and "device" in request.fixturenames:
        pytest.fail(f"{request.node.nodeid} launched Triton kernels on tensors on {elsewhere}, not on the `device` "
                    f"fixture's {DEVICE}", pytrace=False)


def pytest_collection_modifyitems(config, items):
    # The suite's GPU-relevant part (benchmarks/gpu.sh runs it with -m device): every test on the device fixture.
    for item in items:
        if "device" in item.fixturenames:
            item.add_marker(pytest.mark.device)


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
    config.addinivalue_line("markers", "device: runs on the `device` fixture, CUDA when present (set by conftest; "
                                       "benchmarks/gpu.sh runs these)")
    config.addinivalue_line("markers", "cpu_tensors(reason): builds CPU tensors by design; where Triton cannot run "
                                       "them (a CUDA machine) its impl='chunked'/'fused' variants are skipped")
