"""The GPU-arithmetic emulation (tests/gpu_arith.py) and the kernels' math under it.

The emulation is checked on values whose GPU result is known by construction (tf32 rounding,
a bf16 halfway case, the tf32x3 split); then ``kernels/tl_math.tanh_and_sech2`` is checked to
stay as accurate as ``torch.tanh`` with the GPU's exp and division, where ``2 sigmoid(2x) - 1``
is not.
"""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import gpu_arith
from dpo_fast.kernels.tl_math import tanh_and_sech2
from dpo_fast.rows import triton_runs_on
from helpers import cpu_by_design

pytestmark = cpu_by_design("it tests the emulation of the GPU's arithmetic inside Triton's CPU interpreter")


@pytest.fixture(autouse=True)
def _interpreter_only(device):
    if device.type != "cpu" or not triton_runs_on(device):
        pytest.skip("emulates the GPU inside Triton's CPU interpreter")
    if gpu_arith.active():  # DPO_FAST_EMULATE_GPU=1 for the session: these compare against the plain interpreter
        pytest.skip("checks the emulation against the plain interpreter; run without DPO_FAST_EMULATE_GPU")


# ----------------------------------------------------------------------------------------
# the numpy model
# ----------------------------------------------------------------------------------------

def test_tf32_rounding_of_known_values():
    one_plus = np.float32(1 + 2 ** -11)  # exactly half a tf32 ulp above 1: ties away from zero
    assert gpu_arith.tf32_round(np.array([one_plus]))[0] == np.float32(1 + 2 ** -10)
    assert gpu_arith.tf32_truncate(np.array([one_plus]))[0] == np.float32(1.0)
    just_below = np.float32(1 + 2 ** -11 - 2 ** -23)
    assert gpu_arith.tf32_round(np.array([just_below]))[0] == np.float32(1.0)
    x = np.array([-3.14159265, 1e-3, 65504.0, np.inf, -np.inf], dtype=np.float32)
    rounded = gpu_arith.tf32_round(x)
    assert np.all((rounded.view(np.uint32) & 0x1FFF) == 0)
    assert np.all(np.abs(rounded[:3] - x[:3]) <= np.abs(x[:3]) * 2.0 ** -11)
    assert np.array_equal(rounded[3:], x[3:])
    assert np.isnan(gpu_arith.tf32_round(np.array([np.nan], dtype=np.float32))[0])


def test_bf16_round_to_nearest_even():
    # 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: even is 1.0. 1 + 3 * 2^-8 is halfway
    # between 1 + 2^-7 (odd) and 1 + 2^-6: even is up. Truncation would give 1.0 and 1 + 2^-7.
    halfway = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 3 * 2 ** -8), 1 + 2 ** -8 + 2 ** -20], dtype=np.float32)
    got = torch.from_numpy(gpu_arith.bf16_bits_rne(halfway).view(np.int16)).view(torch.bfloat16).float()
    assert got.tolist() == [1.0, 1 + 2 ** -6, -(1 + 2 ** -6), 1 + 2 ** -7]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000)).astype(np.float32)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)  # torch rounds RNE
    assert np.array_equal(gpu_arith.bf16_bits_rne(x), want)
    x64 = x.astype(np.float64) * (1 + 1e-12)
    want64 = torch.from_numpy(x64).to(torch.float32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.mean(gpu_arith.bf16_bits_rne_from_f64(x64) == want64) > 0.999


def test_tf32x3_split_product():
    a = np.array([[1 + 2 ** -11 + 2 ** -20]], dtype=np.float32)
    b = np.array([[3.0]], dtype=np.float32)
    zero = np.zeros((1, 1), np.float32)
    big = np.float32(1 + 2 ** -10)
    assert gpu_arith.dot(a, b, zero, "tf32")[0, 0] == np.float32(3.0)  # truncated operand
    # big * 3 + (a - big) * 3, the small part read at tf32 (exact here)
    assert gpu_arith.dot(a, b, zero, "tf32x3")[0, 0] == np.float32(3 * float(a[0, 0]))
    assert gpu_arith.dot(a, b, zero, "ieee")[0, 0] == np.float32(3 * float(a[0, 0]))
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((16, 64)).astype(np.float32), rng.standard_normal((64, 16)).astype(np.float32)
    exact = x.astype(np.float64) @ y.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(y).astype(np.float64)
    err = {p: np.max(np.abs(gpu_arith.dot(x, y, np.zeros((16, 16), np.float32), p) - exact) / scale)
           for p in ("tf32", "tf32x3", "ieee")}
    assert 2 ** -13 < err["tf32"] < 2 ** -9
    assert err["tf32x3"] < 2 ** -19 and err["ieee"] < 2 ** -20
    # One product each (K = 1): ieee rounds it once; tf32x3 drops small_a * small_b and truncates the
    # small parts to tf32, a few float32 ulps at most.
    u, v = x[:, :1], y[:1, :]
    exact = u.astype(np.float64) @ v.astype(np.float64)
    rel = {p: np.max(np.abs(gpu_arith.dot(u, v, np.zeros((16, 16), np.float32), p) - exact) / np.abs(exact))
           for p in ("tf32x3", "ieee")}
    assert rel["ieee"] <= 2 ** -24 < rel["tf32x3"] < 2 ** -20


def test_approximate_exp_and_division_stay_within_their_bounds():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(100000) * 20).astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    got = gpu_arith.exp_approx(x).astype(np.float64)
    normal = (exact > np.finfo(np.float32).tiny) & (exact < np.finfo(np.float32).max)
    rel = np.abs(got - exact)[normal] / exact[normal]
    # x * log2e rounds to float32 (and log2e itself is rounded: 0.22 of 2^-24), then 2 ulp + rounding
    bound = np.abs(x[normal]) * 1.25 * 2.0 ** -24 + (gpu_arith.APPROX_ULPS + 0.5) * 2.0 ** -23
    assert np.all(rel <= bound)
    assert np.mean(got[normal] != exact[normal].astype(np.float32)) > 0.5  # the emulation does move results
    assert np.all(got[exact < np.finfo(np.float32).tiny] == 0)  # flushed to zero
    a, b = x[:5000], x[5000:10000] + 0.5
    q = gpu_arith.div_full(a, b).astype(np.float64)
    want = a.astype(np.float64) / b
    assert np.all(np.abs(q - want) <= (gpu_arith.APPROX_ULPS + 0.5) * np.spacing(np.abs(want).astype(np.float32)))
    assert np.array_equal(gpu_arith.exp_approx(x), gpu_arith.exp_approx(x))  # deterministic


# ----------------------------------------------------------------------------------------
# the interpreter patch
# ----------------------------------------------------------------------------------------

@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                PRECISION: tl.constexpr):
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(out_ptr + m[:, None] * N + n[None, :], tl.dot(a, b, input_precision=PRECISION))


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, exp_ptr, div_ptr, bf16_ptr, cast_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    y = tl.load(y_ptr + i)
    tl.store(exp_ptr + i, tl.exp(x))
    tl.store(div_ptr + i, x / y)
    tl.store(bf16_ptr + i, x)  # float32 stored through a bfloat16 pointer
    tl.store(cast_ptr + i, x.to(tl.bfloat16).to(tl.float32))


def _run_elementwise(x, y):
    n = x.numel()
    outs = [torch.empty(n), torch.empty(n), torch.empty(n, dtype=torch.bfloat16), torch.empty(n)]
    _elementwise_kernel[(1,)](x, y, *outs, N=n)
    return outs


@pytest.mark.parametrize("precision", ["tf32", "tf32x3", "ieee"])
def test_dot_follows_input_precision_under_emulation(precision):
    a = torch.randn(16, 32) * 3
    b = torch.randn(32, 16)
    out = torch.empty(16, 16)
    with gpu_arith.emulate_gpu_arithmetic():
        _dot_kernel[(1,)](a, b, out, M=16, K=32, N=16, PRECISION=precision)
    want = gpu_arith.dot(a.numpy(), b.numpy(), np.zeros((16, 16), np.float32), precision)
    assert np.array_equal(out.numpy(), want)
    plain = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, plain, M=16, K=32, N=16, PRECISION=precision)  # emulation off again
    if precision == "tf32":
        assert not torch.equal(plain, out)
    assert float((plain.double() - a.double() @ b.double()).abs().max()) < 1e-4


def test_elementwise_ops_under_emulation():
    x = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 0.3, -7.25] * 16)
    y = torch.tensor([3.0, 7.0, -11.0, 0.1] * 16)
    exp, div, bf16, cast = _run_elementwise(x, y)
    assert bf16[0].item() == 1.0 and bf16[1].item() == 1 + 2 ** -7  # the interpreter truncates
    with gpu_arith.emulate_gpu_arithmetic():
        assert gpu_arith.active()
        exp_gpu, div_gpu, bf16_gpu, cast_gpu = _run_elementwise(x, y)
    assert not gpu_arith.active()
    assert torch.equal(bf16_gpu.float(), x.to(torch.bfloat16).float())  # nearest even, like torch and the GPU
    assert torch.equal(cast_gpu, x.to(torch.bfloat16).float())
    assert np.array_equal(exp_gpu.numpy(), gpu_arith.exp_approx(x.numpy()))
    assert np.array_equal(div_gpu.numpy(), gpu_arith.div_full(x.numpy(), y.numpy()))
    assert not torch.equal(exp_gpu, exp) or not torch.equal(div_gpu, div)


def test_emulation_fails_loudly_without_its_hooks(monkeypatch):
    from triton.runtime import interpreter

    monkeypatch.delattr(interpreter.InterpreterBuilder, "create_exp2")
    with pytest.raises(RuntimeError, match="create_exp2"):
        with gpu_arith.emulate_gpu_arithmetic():
            pass
    assert not gpu_arith.active()


# ----------------------------------------------------------------------------------------
# tanh: as accurate as torch.tanh, with or without the GPU's exp and division
# ----------------------------------------------------------------------------------------

@triton.jit
def _tanh_kernel(x_ptr, t_ptr, d_ptr, old_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    t, sech2 = tanh_and_sech2(x)
    tl.store(t_ptr + i, t)
    tl.store(d_ptr + i, sech2)
    tl.store(old_ptr + i, 2.0 * tl.sigmoid(2.0 * x) - 1.0)  # the formulation it replaces


def _ulp_errors(x):
    n = x.numel()
    t, d, old = torch.empty(n), torch.empty(n), torch.empty(n)
    _tanh_kernel[(1,)](x, t, d, old, N=n)
    exact = torch.tanh(x.double())
    ulp = torch.from_numpy(np.spacing(exact.abs().float().numpy())).double()
    err = lambda v: ((v.double() - exact).abs() / ulp)  # noqa: E731
    sech2_rel = ((d.double() - (1 - exact ** 2)) / (1 - exact ** 2)).abs()
    return err(t), err(torch.tanh(x)), err(old), sech2_rel


@pytest.mark.parametrize("emulate", [False, True], ids=["interpreter", "gpu-arith"])
def test_tanh_as_accurate_as_torch(emulate):
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-12, 12, 8192 - 2048 - 16), torch.randn(2048, generator=gen) * 0.7])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-30, 0.625, -0.625, 0.62499994, 9.9, 1e4] + [0.5] * 8)])
    with gpu_arith.emulate_gpu_arithmetic() if emulate else _nothing():
        ours, torch_err, old, sech2_rel = _ulp_errors(x)
    assert float(torch_err.max()) <= 1.0
    assert float(ours.max()) <= 1.5, float(ours.max())
    assert float(ours.mean()) <= 1.2 * float(torch_err.mean())
    assert float(old.max()) > 4 * float(ours.max())  # what the test would catch: the old formula
    big = torch.tanh(x.double()).abs() < 0.9999  # 1 - t^2 relative where it is not ~0
    assert float(sech2_rel[big].max()) < 2e-6


def _nothing():
    import contextlib

    return contextlib.nullcontext()
