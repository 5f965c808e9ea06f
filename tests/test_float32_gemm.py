"""Issue 18 item 2 and issue 19 item 6: the float32-output GEMM is probed, not assumed, and where it is
missing the float32 staging of 16-bit operands is proportionate and priced.

CUDA builds of torch 2.8/2.9 expose ``mm(..., out_dtype=)`` but refuse mixed dtypes ("self and mat2
must have the same dtype"); CPU builds have no kernel for it. Both answers are simulated here by
replacing ``torch.mm`` / ``torch.addmm``: one that refuses as old torch did, one that accepts
(computing in float32, as cuBLAS does), and every hidden-state route must agree with the float64
oracle either way.
"""

import math
import warnings

import pytest
import torch

import dpo_fast
from dpo_fast import cost_model as cm
from dpo_fast import gemm, reference
from helpers import AllocationRecorder, make_batch, rel_err
from helpers import cpu_by_design

pytestmark = cpu_by_design("the float32-output GEMM's refusal simulated on CPU")

_mm, _addmm = torch.mm, torch.addmm


def _refusing(calls):
    def mm(*args, out_dtype=None, **kwargs):
        if out_dtype is not None:
            calls.append("refused")
            raise RuntimeError("self and mat2 must have the same dtype, but got BFloat16 and Float")
        return _mm(*args, **kwargs)

    def addmm(*args, out_dtype=None, **kwargs):
        if out_dtype is not None:
            calls.append("refused")
            raise RuntimeError("self and mat2 must have the same dtype, but got BFloat16 and Float")
        return _addmm(*args, **kwargs)

    return mm, addmm


def _accepting(calls):
    """A build with the mixed-dtype kernel: 16-bit operands, float32 products and sums, float32 result."""

    def mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return _mm(a, b, out=out) if out is not None else _mm(a, b)
        calls.append("mm")
        return _mm(a.float(), b.float(), out=out) if out is not None else _mm(a.float(), b.float())

    def addmm(acc, a, b, *, out_dtype=None, out=None, **kwargs):
        if out_dtype is None:
            return _addmm(acc, a, b, out=out, **kwargs) if out is not None else _addmm(acc, a, b, **kwargs)
        calls.append("addmm")
        result = _addmm(acc, a.float(), b.float(), **kwargs)  # beta, alpha
        return out.copy_(result) if out is not None else result

    return mm, addmm


@pytest.fixture
def fresh_probe():
    gemm._probe.cache_clear()
    yield
    gemm._probe.cache_clear()


def test_probe_matches_what_this_build_does(fresh_probe):
    a = torch.ones(4, 4, dtype=torch.bfloat16)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        works = True
    except (RuntimeError, TypeError):
        works = False
    assert gemm.float32_gemm_out("cpu", torch.bfloat16) is works
    assert gemm.float32_gemm_out("cpu", torch.float32) is False  # float32 operands need no such GEMM


@pytest.mark.parametrize("answer", ["refuses", "accepts"])
def test_probe_decides_by_a_real_call(answer, monkeypatch, fresh_probe):
    calls = []
    mm, addmm = (_refusing if answer == "refuses" else _accepting)(calls)
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    assert gemm.float32_gemm_out("cpu", torch.bfloat16) is (answer == "accepts")
    assert calls, "the probe made no call"
    calls.clear()
    assert gemm.float32_gemm_out("cpu", torch.bfloat16) is (answer == "accepts")
    assert not calls, "the answer is cached per device and dtype"


def test_probe_warns_on_cuda_devices_only(monkeypatch, fresh_probe):
    """A refused CUDA probe says so (slower route); on CPU staging is the expected route, said nothing."""
    monkeypatch.setattr(torch, "mm", _refusing([])[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gemm._probe("cpu", torch.float16) is False


@pytest.mark.parametrize("answer", ["refuses", "accepts"])
@pytest.mark.parametrize("budget", [None, 40_000])  # one whole-pair chunk; small tiles (two-pass / chunks)
def test_bf16_loss_exact_either_way(answer, budget, monkeypatch, fresh_probe):
    calls = []
    mm, addmm = (_refusing if answer == "refuses" else _accepting)(calls)
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    torch.manual_seed(0)
    h, w, _, labels = make_batch(3, 12, 32, 200, dtype=torch.bfloat16)
    out = dpo_fast.dpo_loss(h, w, labels, impl="torch", memory_budget=budget)
    out.loss.backward()
    if answer == "accepts":
        assert {"mm", "addmm"} & set(calls), "the float32-output GEMM was not used"
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    oracle = reference.dpo_loss(h64, w64, labels)
    oracle.loss.backward()
    naive = reference.dpo_loss(h.detach().requires_grad_(), w.detach().requires_grad_(), labels, dtype=None)
    # float32 logits from bf16 operands: as close as float32 arithmetic on the same operands.
    assert abs(float(out.loss.detach()) - float(oracle.loss.detach())) <= 1e-5
    assert rel_err(out.chosen_logps, oracle.chosen_logps) <= rel_err(naive.chosen_logps, oracle.chosen_logps) + 1e-5
    assert rel_err(h.grad, h64.grad) <= 1e-2 and rel_err(w.grad, w64.grad) <= 1e-2  # bf16 gradients


SHAPES = [(1, 1, 1), (7, 300, 33), (64, 4096, 256), (300, 64, 4096), (64, 256, 4096), (4096, 256, 64),
          (2048, 4096, 1024), (16, 128256, 4096), (8192, 4096, 128256), (128256, 4096, 8192)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_staging_is_proportionate(m, n, k):
    """Every staged copy is made once, and what is re-read per block is at most what is copied: the
    staging traffic stays within 2x of copying both operands once (the 1 MiB slabs re-read the whole
    float32 copy of the other operand per slab: ~100x at Llama's head)."""
    blocks = cm.staging_blocks(m, n, k)
    copies = 8 * (m * k + k * n)
    assert blocks.traffic(2) <= 2 * copies + 8 * m * n
    assert blocks.step >= 1 and blocks.memory >= 4 * min(m * k + k * n, blocks.step)


@pytest.mark.parametrize("m,n,k", [(7, 300, 33), (64, 2048, 96), (300, 64, 600), (40, 48, 5000), (513, 1, 70)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_staged_gemm_exact_and_within_its_price(m, n, k, accumulate):
    torch.manual_seed(m + n + k)
    a = torch.randn(m, k).to(torch.bfloat16)
    b = torch.randn(n, k).to(torch.bfloat16).t()  # a transposed view, as the paths pass the weight
    start = torch.randn(m, n)
    expected = (start if accumulate else 0) + a.double() @ b.double()
    out = start.clone() if accumulate else torch.empty(m, n)
    recorder = AllocationRecorder()
    with recorder:
        (gemm._staged(a, b, out, accumulate=True) if accumulate else gemm._staged(a, b, out, accumulate=False))
    # float32 products of exact bf16 values: the float32 sum's rounding only.
    assert (out.double() - expected).abs().max() <= 4 * math.sqrt(k) * 2 ** -24 * (expected.abs().max() + k ** 0.5)
    largest = max((count * size for count, size, _ in recorder.sizes), default=0)
    assert largest <= cm.staging_blocks(m, n, k).memory


def test_planner_prices_staging(fresh_probe):
    """Without the float32-output GEMM the cost model adds the staging's memory and bytes."""
    shape = cm.Shape(4096, 4096, 128256, 2, True)
    fast = cm.whole_pairs(shape, 1024, 4, float32_gemm_out=True)
    staged = cm.whole_pairs(shape, 1024, 4, float32_gemm_out=False)
    logits = cm.staging_blocks(1024, 128256, 4096)
    weight = cm.staging_blocks(128256, 4096, 1024)
    assert staged.memory_bytes - fast.memory_bytes == max(logits.memory, weight.memory)
    assert staged.row_bytes - fast.row_bytes == pytest.approx(4 * (logits.traffic(2) + weight.traffic(2)))
    # Proportionate: staging at Llama-3-8B 4 x 1024 costs a fraction of the GEMMs' own traffic, not a multiple.
    assert staged.hbm_bytes <= 2.5 * fast.hbm_bytes
