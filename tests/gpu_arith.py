"""GPU arithmetic for Triton's CPU interpreter: compute where it matters as an NVIDIA GPU does.

The interpreter evaluates each Triton op with numpy. Four of those ops give different numbers
on an NVIDIA GPU (sm_80/sm_90, Triton 3.6 and later), and a kernel tested only under the
interpreter can be exact there and wrong on the card:

- ``tl.dot`` of float32 operands follows ``input_precision`` (the interpreter ignores it):
  ``"tf32"``: the tensor cores read the top 19 bits of each operand (1 + 8 + 10: the low 13
  mantissa bits are ignored, i.e. truncated); products are exact and summed in float32.
  ``"tf32x3"`` (Triton's F32DotTC pass): ``big = cvt.rna.tf32.f32(x)`` (round to nearest, ties
  away), ``small = x - big`` (exact); ``acc + (big_a big_b + (big_a small_b + small_a big_b))``,
  each product a tf32 dot (so ``small`` is truncated to tf32 too) and NaNs of the small terms
  zeroed. ``"ieee"``: plain float32 (as the interpreter).
- float32 -> bfloat16 conversions (``.to(tl.bfloat16)``, a float32 value stored through a bf16
  pointer) round to nearest even (``cvt.rn.bf16.f32``); the interpreter truncates. float64 ->
  bfloat16 (which the interpreter turns into an integer cast) rounds to nearest even as well.
- ``tl.exp(x)`` of float32 is ``ex2.approx.ftz.f32(x * log2(e))``: the product is rounded to
  float32 first (an absolute error of ``|x| 2^-24`` in the exponent), and ex2.approx is
  within 2 ulp (PTX ISA; modelled exact at integer powers of two), subnormal results flushed to
  zero. ``tl.exp2`` is ex2.approx alone.
- float32 ``/`` is ``div.full.f32``: within 2 ulp (PTX ISA), not correctly rounded
  (``tl.math.div_rn`` stays IEEE).

The two approximate instructions are modelled by their documented error bound, not their
exact bits (which no CPU reproduces): the correctly rounded value moved by -2..+2 ulp, the
offset a hash of the input bits, so a run is deterministic and a result that needs
correctly rounded ``exp``/``/`` shows it. Not modelled: the order in which a tensor core
sums within one mma, and the multiply-add fusion Triton 3.9 applies by default (explicit
``tl.fma`` is exact in both).

Use: ``with emulate_gpu_arithmetic(): ...`` (a test helper: ``tests/conftest.py`` turns it on
for a whole session when ``DPO_FAST_EMULATE_GPU=1``). It patches ``InterpreterBuilder`` of the
installed Triton and raises if a hook it needs is missing, rather than test nothing.
"""

import contextlib
import os
import threading

import numpy as np

ENV_VAR = "DPO_FAST_EMULATE_GPU"
LOG2E_F32 = np.float32(1.4426950408889634)
APPROX_ULPS = 2  # ex2.approx.f32 and div.full.f32: maximum error documented in the PTX ISA

_lock = threading.Lock()
_depth = 0
_saved = {}


def requested() -> bool:
    return os.environ.get(ENV_VAR, "0") == "1"


# ----------------------------------------------------------------------------------------
# the arithmetic, on numpy arrays (tested on known values in tests/test_gpu_arith.py)
# ----------------------------------------------------------------------------------------

def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def tf32_truncate(x: np.ndarray) -> np.ndarray:
    """What a tf32 mma reads of a float32 operand: the low 13 mantissa bits ignored."""
    return (_bits(x) & np.uint32(0xFFFFE000)).view(np.float32).reshape(np.shape(x))


def tf32_round(x: np.ndarray) -> np.ndarray:
    """``cvt.rna.tf32.f32``: round to 10 mantissa bits, ties away from zero; inf and NaN kept."""
    x = np.asarray(x, dtype=np.float32)
    bits = _bits(x)
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32).reshape(x.shape)
    return np.where(np.isfinite(x), rounded, x)


def bf16_bits_rne(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even (``cvt.rn.bf16.f32``); NaN stays NaN."""
    x = np.asarray(x, dtype=np.float32)
    bits = _bits(x).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    nan = ((bits >> np.uint64(16)) | np.uint64(0x0040)).astype(np.uint16)  # quiet NaN, sign kept
    return np.where(np.isnan(x), nan, rounded.astype(np.uint16)).reshape(x.shape)


def bf16_bits_rne_from_f64(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 bits, rounded once to nearest even (no double rounding through float32)."""
    x = np.asarray(x, dtype=np.float64)
    bits = x.view(np.uint64)
    shift = np.uint64(52 - 7)
    # Round the 52-bit mantissa to 7 bits (RNE); the result is exactly representable in float32
    # wherever it is a normal bfloat16, so the float32 bits' top half is the answer.
    rounded = ((bits + (np.uint64(1) << (shift - np.uint64(1))) - np.uint64(1) + ((bits >> shift) & np.uint64(1)))
               >> shift) << shift
    as_f32 = np.where(np.isfinite(x), rounded.view(np.float64), x).astype(np.float32)
    return (_bits(as_f32) >> np.uint32(16)).astype(np.uint16).reshape(x.shape)


def _hash_offset(*keys: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random integers in [-APPROX_ULPS, APPROX_ULPS] from input bits."""
    h = np.zeros(np.broadcast(*keys).shape, dtype=np.uint64)
    for key in keys:
        h = (h ^ np.broadcast_to(key, h.shape).astype(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
    return (h % np.uint64(2 * APPROX_ULPS + 1)).astype(np.int64) - APPROX_ULPS


def _perturb_ulps(value: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Move finite, nonzero float32 values by ``offset`` ulps (never onto inf or across zero)."""
    value = np.asarray(value, dtype=np.float32)
    bits = _bits(value).astype(np.int64)
    magnitude = bits & 0x7FFFFFFF
    moved = np.clip(magnitude + offset, 1, 0x7F7FFFFF)
    new_bits = ((bits & ~0x7FFFFFFF) | moved).astype(np.uint32).view(np.float32).reshape(value.shape)
    keep = ~np.isfinite(value) | (value == 0)
    return np.where(keep, value, new_bits)


def ex2_approx(y: np.ndarray) -> np.ndarray:
    """``ex2.approx.ftz.f32``: 2^y within 2 ulp; subnormal inputs and results flushed to zero."""
    y = np.asarray(y, dtype=np.float32)
    y = np.where(np.abs(y) < np.finfo(np.float32).tiny, np.float32(0), y)
    with np.errstate(over="ignore", under="ignore"):
        exact = np.exp2(y.astype(np.float64)).astype(np.float32)
    # Integer y (2^y a power of two, e.g. exp(0) of a row's maximum) comes out exact: the fraction's
    # table entry is exact there. Everything else moves within the bound.
    offset = np.where(y == np.floor(y), 0, _hash_offset(_bits(y)))
    result = _perturb_ulps(exact, offset)
    return np.where(np.abs(result) < np.finfo(np.float32).tiny, np.float32(0), result)


def exp_approx(x: np.ndarray) -> np.ndarray:
    """Triton's float32 ``tl.exp``: ``ex2.approx.ftz.f32(x * log2e)``, the product rounded to float32."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return ex2_approx(x * LOG2E_F32)


def div_full(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``div.full.f32``: a / b within 2 ulp."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        exact = (a.astype(np.float64) / b.astype(np.float64)).astype(np.float32)
    return _perturb_ulps(exact, _hash_offset(_bits(a), _bits(b)))


def dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray, precision: str) -> np.ndarray:
    """float32 ``acc + a @ b`` as ``tl.dot(a, b, acc, input_precision=precision)`` computes it on a GPU."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)

    def mm(x, y):  # a tf32 mma: operands read at tf32, exact products, float32 sums
        return np.matmul(tf32_truncate(x), tf32_truncate(y), dtype=np.float32)

    with np.errstate(invalid="ignore", over="ignore"):
        if precision == "ieee":
            return np.matmul(a, b, dtype=np.float32) + acc
        if precision == "tf32":
            return mm(a, b) + acc
        if precision == "tf32x3":
            a_big, b_big = tf32_round(a), tf32_round(b)
            small = mm(a_big, b - b_big) + mm(a - a_big, b_big)
            small = np.where(np.isnan(small), np.float32(0), small)
            return (mm(a_big, b_big) + small) + acc
    raise ValueError(f"unknown input_precision {precision!r}")


# ----------------------------------------------------------------------------------------
# the patch of Triton's interpreter
# ----------------------------------------------------------------------------------------

def _interpreter():
    from triton.runtime import interpreter

    missing = [name for name in ("InterpreterBuilder", "TensorHandle", "_ir") if not hasattr(interpreter, name)]
    if missing:
        raise RuntimeError(f"GPU arithmetic emulation: triton.runtime.interpreter has no {missing}; this Triton's "
                           f"interpreter changed, update tests/gpu_arith.py")
    return interpreter


_HOOKS = ("create_dot", "cast_impl", "create_exp", "create_exp2", "create_fdiv")


def _patched_methods(interp):
    import triton.language as tl

    builder = interp.InterpreterBuilder
    missing = [name for name in _HOOKS if not hasattr(builder, name)]
    if missing:
        raise RuntimeError(f"GPU arithmetic emulation: InterpreterBuilder has no {missing} in this Triton; "
                           f"update tests/gpu_arith.py")
    precisions = {}
    for name in ("IEEE", "TF32", "TF32x3"):
        if not hasattr(interp._ir.INPUT_PRECISION, name):
            raise RuntimeError(f"GPU arithmetic emulation: ir.INPUT_PRECISION has no {name}")
        precisions[getattr(interp._ir.INPUT_PRECISION, name)] = name.lower()
    handle = interp.TensorHandle
    original = {name: getattr(builder, name) for name in _HOOKS}

    def is_f32(h):
        return h.dtype.scalar == tl.float32

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (is_f32(a) and is_f32(b) and is_f32(d)):
            return original["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
        if input_precision not in precisions:
            raise RuntimeError(f"GPU arithmetic emulation: unknown input_precision {input_precision}")
        return handle(dot(a.data, b.data, d.data, precisions[input_precision]), d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if dst_ty == tl.bfloat16 and src_ty == tl.float32:
            return handle(bf16_bits_rne(src.data), dst_ty)
        if dst_ty == tl.bfloat16 and src_ty == tl.float64:
            return handle(bf16_bits_rne_from_f64(src.data), dst_ty)
        return original["cast_impl"](self, src, dst_type)

    def create_exp(self, arg):
        if arg.dtype.scalar != tl.float32:
            return original["create_exp"](self, arg)
        return handle(exp_approx(arg.data), arg.dtype.scalar)

    def create_exp2(self, arg):
        if arg.dtype.scalar != tl.float32:
            return original["create_exp2"](self, arg)
        return handle(ex2_approx(arg.data), arg.dtype.scalar)

    def create_fdiv(self, lhs, rhs):
        if lhs.dtype.scalar != tl.float32:
            return original["create_fdiv"](self, lhs, rhs)
        return handle(div_full(lhs.data, rhs.data), lhs.dtype.scalar)

    patched = dict(create_dot=create_dot, cast_impl=cast_impl, create_exp=create_exp, create_exp2=create_exp2,
                   create_fdiv=create_fdiv)
    return builder, original, patched


def active() -> bool:
    return _depth > 0


@contextlib.contextmanager
def emulate_gpu_arithmetic():
    """Within the block, Triton's interpreter computes dot/bf16 casts/exp/div as an NVIDIA GPU does."""
    global _depth
    with _lock:
        if _depth == 0:
            builder, original, patched = _patched_methods(_interpreter())
            _saved.update(builder=builder, original=original)
            for name, fn in patched.items():
                setattr(builder, name, fn)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                builder = _saved.pop("builder")
                for name, fn in _saved.pop("original").items():
                    setattr(builder, name, fn)


# ----------------------------------------------------------------------------------------
# cuBLAS under torch's TF32 switch (CPU matmuls ignore it)
# ----------------------------------------------------------------------------------------

_GEMM_OPERANDS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "baddbmm": (1, 2)}


def gemm_operands(func):
    """Positions of the two matrix operands of an aten GEMM overload, or None for other ops."""
    return _GEMM_OPERANDS.get(func.overloadpacket.__name__)


def _tf32_tensor(t):
    import torch

    rounded = tf32_round(t.detach().cpu().contiguous().numpy())
    return torch.from_numpy(rounded).to(t.device).view(t.shape)


def cublas_tf32_mode(tf32_enabled):
    """A TorchDispatchMode: float32 GEMMs round their operands to TF32 whenever ``tf32_enabled()``
    says torch's switch is on, as cuBLAS does on an Ampere or later GPU."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class CublasTF32(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            operands = gemm_operands(func)
            if operands and tf32_enabled() and all(args[i].dtype == torch.float32 for i in operands):
                args = list(args)
                for i in operands:
                    args[i] = _tf32_tensor(args[i])
            return func(*args, **kwargs)

    return CublasTF32()
