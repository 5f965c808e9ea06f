"""The suite runs on the device it targets: conftest's audit fails, here on CPU, the tests that would raise on
a CUDA machine (where Triton's interpreter is off and CPU tensors cannot reach a Triton impl).

A scratch suite with this suite's conftest and helpers runs in a subprocess: a test asking for
``impl="chunked"`` on CPU tensors without the ``device`` fixture fails, as does one launching a
kernel directly on them; the same test on the ``device`` fixture, ``impl="auto"`` on CPU tensors
(the PyTorch rows on a CUDA machine) and a test marked ``cpu_tensors`` pass. ``-m device`` (what
``benchmarks/gpu.sh`` runs) selects exactly the tests on the fixture.
"""

from pathlib import Path

import pytest
import torch

pytest_plugins = "pytester"

HERE = Path(__file__).resolve().parent

SCRATCH_TESTS = '''
import pytest
import torch

import dpo_fast
from dpo_fast.kernels import logsoftmax_gather
from dpo_fast.rows import init_stats


def _logits(device="cpu"):
    return torch.randn(3, 20, device=device), torch.randint(0, 20, (3,), device=device)


def test_chunked_on_cpu_tensors():
    dpo_fast.token_logps_from_logits(*_logits(), impl="chunked")


def test_fused_on_cpu_tensors():
    h, w, labels = torch.randn(3, 8), torch.randn(20, 8), torch.randint(0, 20, (3,))
    dpo_fast.token_logps(h, w, labels, impl="fused")


def test_kernel_on_cpu_tensors():
    logits, labels = _logits()
    logsoftmax_gather.row_stats(logits, labels, init_stats(3, "cpu"), vocab_start=0, ignore_index=-100, scale=1.0,
                                softcap=None, inv_temperature=1.0)


def test_chunked_on_the_device(device):
    dpo_fast.token_logps_from_logits(*_logits(device), impl="chunked")


def test_auto_on_cpu_tensors():
    dpo_fast.token_logps_from_logits(*_logits())


@pytest.mark.cpu_tensors(reason="a trainer on CPU")
@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_marked(impl):
    dpo_fast.token_logps_from_logits(*_logits(), impl=impl)
'''


def _scratch_suite(pytester):
    pytester.makeconftest((HERE / "conftest.py").read_text())
    pytester.makepyfile(helpers=(HERE / "helpers.py").read_text(), gpu_arith=(HERE / "gpu_arith.py").read_text(),
                        test_scratch=SCRATCH_TESTS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine those tests fail by themselves")
def test_the_audit_fails_what_would_raise_on_a_cuda_machine(pytester):
    _scratch_suite(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rE")
    # pytest.fail in the audit's teardown: the test's call passed, its teardown errs.
    result.assert_outcomes(passed=7, errors=3)
    result.stdout.fnmatch_lines_random([
        "test_scratch.py::test_chunked_on_cpu_tensors asked for*impl='chunked' on cpu*raises on a CUDA machine*",
        "test_scratch.py::test_fused_on_cpu_tensors asked for*impl='fused' on cpu*raises on a CUDA machine*",
        "test_scratch.py::test_kernel_on_cpu_tensors launched Triton kernels*_row_stats_kernel*on CPU tensors*",
    ])


def test_dash_m_device_selects_the_tests_on_the_fixture(pytester):
    _scratch_suite(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "device", "--collect-only", "-q")
    assert [line for line in result.outlines if "::" in line] == ["test_scratch.py::test_chunked_on_the_device"]
