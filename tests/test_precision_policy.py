"""Float32 precision policy: a float32 head is IEEE float32 on every path, whatever torch's TF32 switch says.

- Fused kernels: ``tl.dot`` of float32 operands asks for "ieee". With the GPU's arithmetic
  emulated (tests/gpu_arith.py) the default "tf32x3" gave confident-token gradients 4-7x naive
  float32's error; "ieee" stays within the bound of tests/test_confident_tokens.py.
- cuBLAS GEMMs (impl="chunked"/"torch", the fused path's tiled backward): torch's global TF32
  switch is turned off around dpo-fast's float32 GEMMs and restored after. CPU matmuls ignore
  the switch, so a dispatch mode records what every GEMM saw, and another rounds GEMM operands
  to TF32 whenever the switch is on, as cuBLAS does on the card.
"""

import contextlib

import pytest
import torch

import dpo_fast
import gpu_arith
from dpo_fast import reference
from dpo_fast.function import TokenLogpsFunction
from dpo_fast.fused import FusedEngine
from dpo_fast.kernels import fused_linear_logps
from dpo_fast.precision import ieee_float32_matmul, tf32_enabled
from dpo_fast.transform import LogitTransform
from helpers import make_batch, rel_err
from test_confident_tokens import FACTOR, OFFSETS, _grads, _peaked_head, _rel
from torch.utils._python_dispatch import TorchDispatchMode
from helpers import cpu_by_design

pytestmark = cpu_by_design("cuBLAS TF32 and tl.dot emulated inside Triton's interpreter; on a GPU benchmarks/gpu_checks.py checks the real switch")

TF32_SETTERS = ["set_float32_matmul_precision", "allow_tf32"] + (
    ["fp32_precision"] if hasattr(torch.backends.cuda.matmul, "fp32_precision") else [])


@contextlib.contextmanager
def tf32_switched_on(how):
    """torch's TF32 switch on, the way users turn it on; everything restored after."""
    before = torch.get_float32_matmul_precision()
    try:
        if how == "set_float32_matmul_precision":
            torch.set_float32_matmul_precision("high")
        elif how == "allow_tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        else:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert tf32_enabled()
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False  # one consistent state for both APIs
        torch.set_float32_matmul_precision(before)


class GemmSwitchRecorder(TorchDispatchMode):
    """Records, for every float32 GEMM, whether torch's TF32 switch was on when it ran."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = gpu_arith.gemm_operands(func)
        if operands and all(args[i].dtype == torch.float32 for i in operands):
            self.seen.append(tf32_enabled())
        return func(*args, **(kwargs or {}))


def _setting():
    matmul = torch.backends.cuda.matmul
    return matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32


@pytest.mark.parametrize("how", TF32_SETTERS)
@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_float32_gemms_run_with_tf32_off_and_the_switch_is_restored(impl, how):
    h, w, _, labels = make_batch(2, 6, 16, 40)
    with tf32_switched_on(how):
        before = _setting()
        recorder = GemmSwitchRecorder()
        with recorder:
            logps = dpo_fast.token_logps(h, w, labels, impl=impl, memory_budget=4096)
            logps.sum().backward()
            out = dpo_fast.dpo_loss(h, w, labels, impl=impl)  # the whole-pair route for torch/chunked
            out.loss.backward()
        assert _setting() == before and tf32_enabled()
        if how == "set_float32_matmul_precision":
            assert torch.get_float32_matmul_precision() == "high"
    assert recorder.seen, "no float32 GEMM ran"
    assert not any(recorder.seen), f"{sum(recorder.seen)} of {len(recorder.seen)} float32 GEMMs ran with TF32 on"


def test_fused_tiled_backward_runs_its_gemms_with_tf32_off():
    h, w, b, labels = make_batch(1, 5, 16, 40, bias=True)
    h2, kept = h.reshape(-1, 16), labels.reshape(-1) != -100
    with tf32_switched_on("set_float32_matmul_precision"):
        recorder = GemmSwitchRecorder()
        with recorder:
            logps, *_ = TokenLogpsFunction.apply(h2[kept], w, b, labels.reshape(-1)[kept],
                                                 FusedEngine(backward_route="tiled"), LogitTransform())
            logps.sum().backward()
        assert tf32_enabled()
    assert recorder.seen and not any(recorder.seen)


def test_switch_is_left_alone_for_16_bit_heads_and_nesting_restores_once():
    with tf32_switched_on("allow_tf32"):
        with ieee_float32_matmul(torch.bfloat16):
            assert tf32_enabled()
        with ieee_float32_matmul(torch.float32):
            with ieee_float32_matmul(torch.float32):
                assert not tf32_enabled()
            assert not tf32_enabled()  # the outer call still runs
        assert tf32_enabled()
    assert not tf32_enabled()


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_float32_results_match_float64_with_the_tf32_switch_on(impl):
    """With cuBLAS's TF32 emulated, a float32 head stays at float32 accuracy (naive PyTorch does not)."""
    h, w, b, labels = make_batch(2, 7, 64, 300, bias=True, scale=3.0)
    h64, w64, b64 = (t.detach().double() for t in (h, w, b))
    want = reference.token_outputs(h64.reshape(-1, 64), w64, labels.reshape(-1), bias=b64)[0]
    kept = labels.reshape(-1) != -100
    with tf32_switched_on("set_float32_matmul_precision"), gpu_arith.cublas_tf32_mode(tf32_enabled):
        ours = dpo_fast.token_logps(h.detach(), w.detach(), labels, bias=b.detach(), impl=impl)
        naive = torch.log_softmax(h.detach() @ w.detach().t() + b.detach(), -1).gather(
            -1, labels.clamp(min=0)[..., None]).squeeze(-1)
    ours, naive = ours.reshape(-1)[kept], naive.reshape(-1)[kept]
    assert rel_err(naive, want[kept]) > 2e-5  # the emulated switch does bite (~1e-3 nats here)
    assert rel_err(ours, want[kept]) < 2e-6, rel_err(ours, want[kept])


@pytest.mark.parametrize("offset", OFFSETS)
def test_fused_float32_confident_tokens_with_gpu_arithmetic(offset):
    """tests/test_confident_tokens.py's bound for impl="fused", with tl.dot computing as on the GPU."""
    assert fused_linear_logps._dot_precision(torch.float32) == "ieee"
    with gpu_arith.emulate_gpu_arithmetic():
        for seed in (0, 1, 2):
            hidden, weight, labels, upstream = _peaked_head(8, 300, 32, offset, seed)
            exact = _grads(lambda h, w: reference.token_outputs(h, w, labels)[0], [hidden, weight], upstream,
                           torch.float64)
            naive = _grads(lambda h, w: reference.token_outputs(h, w, labels, dtype=None)[0], [hidden, weight],
                           upstream, torch.float32)
            ours = _grads(lambda h, w: dpo_fast.token_logps(h, w, labels, impl="fused"), [hidden, weight], upstream,
                          torch.float32)
            for name, o, n, e in zip(("hidden", "weight"), ours, naive, exact):
                assert _rel(o, e) < FACTOR * _rel(n, e), (name, seed, _rel(o, e), _rel(n, e))
