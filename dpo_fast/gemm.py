"""GEMMs with a float32 result from 16-bit operands, never rounded to 16 bits on the way.

Where the build can (``torch.mm(..., out_dtype=torch.float32)``, CUDA torch >= 2.8 once
the kernel accepts mixed dtypes), the GEMM writes its float32 accumulator directly. Whether
it can is decided by a tiny real call per device and dtype (:func:`float32_gemm_out`,
cached): CUDA builds of torch 2.8/2.9 expose the argument but refuse the call ("self and
mat2 must have the same dtype"), and CPU builds (torch 2.13 included) have no kernel for it.

Elsewhere the operands are *staged*: float32 copies of blocks of them, multiplied in float32.
The blocking (``cost_model.staging_blocks``, which also prices it) makes every staged copy
proportionate: each block of either operand is copied once, and what is re-read per block
(the other operand's staged copy, or the float32 result) is bounded by the copy traffic itself.
"""

import functools
import warnings

import torch

from . import cost_model as cm

# What refused calls raise: RuntimeError (a CUDA build before the mixed-dtype kernel, a CPU build
# without the kernel: NotImplementedError is a RuntimeError), TypeError (a torch without ``out_dtype``).
_REFUSALS = (RuntimeError, TypeError)


def _device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def float32_gemm_out(device, dtype: torch.dtype) -> bool:
    """Whether ``mm``/``addmm`` with ``out_dtype=torch.float32`` work for ``dtype`` operands on ``device``.

    Decided by a real call of both forms used here (cached per device and dtype). A CUDA
    device that is not present (planning on paper) is assumed to have it when this torch
    has the argument.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")
    return _probe(_device_key(device), dtype)


@functools.lru_cache(maxsize=None)
def _probe(device: str, dtype: torch.dtype) -> bool:
    # Small integers: every product and sum is exact in float32, so the check is exact too.
    a = (torch.arange(16 * 8, device=device) % 7 - 3).to(dtype).view(16, 8)
    b = (torch.arange(8 * 16, device=device) % 5 - 2).to(dtype).view(16, 8).t()  # a transposed view, as used
    expected = a.float() @ b.float()
    try:
        out = torch.empty(16, 16, dtype=torch.float32, device=device)
        torch.mm(a, b, out_dtype=torch.float32, out=out)
        acc = torch.ones(8, 8, dtype=torch.float32, device=device)
        # alpha as addmm_fp32 passes it (a split pair's rejected side, scaled by its gradient ratio)
        torch.addmm(acc, a.t(), b.t(), alpha=-2.0, out_dtype=torch.float32, out=acc)
        # and as write_fp32 does (beta=0 over whatever the buffer held: a kept pair's first scaled product)
        fresh = torch.full((16, 16), float("nan"), dtype=torch.float32, device=device)
        torch.addmm(fresh, a, b, beta=0, alpha=0.5, out_dtype=torch.float32, out=fresh)
        works = (bool(torch.equal(out, expected)) and bool(torch.equal(acc, 1 - 2 * (a.t().float() @ b.t().float())))
                 and bool(torch.equal(fresh, 0.5 * expected)))
    except _REFUSALS as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        works = False
    else:
        reason = "its result differed from float32 arithmetic"
    if not works and not device.startswith("cpu"):  # on CPU staging is the expected route, not news
        warnings.warn(f"dpo_fast: torch {torch.__version__} on {device} has no float32-output GEMM for {dtype} "
                      f"operands ({reason}); 16-bit GEMMs are staged through float32 copies (slower, priced by the "
                      "planner)", stacklevel=3)
    return works


def mm_float32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (float32) = a @ b, never rounded to a 16-bit dtype."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if float32_gemm_out(out.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    _staged(a, b, out, accumulate=False)
    return out


def scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """``out = alpha * (a @ b)`` with ``out`` in the operands' dtype: one GEMM (beta=0), the product
    scaled in its float32 accumulator and rounded once."""
    return torch.addmm(out, a, b, beta=0, alpha=alpha, out=out)


def write_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out = alpha * (a @ b)`` into a float32 (or same-dtype) ``out``: the GEMM writes it (beta=0, so
    whatever ``out`` held is ignored), no zero-fill first."""
    if alpha == 1.0:
        return mm_float32(a, b, out)
    if a.dtype == out.dtype and b.dtype == out.dtype:
        return scaled_mm(a, b, alpha, out)
    if float32_gemm_out(out.device, a.dtype):
        return torch.addmm(out, a, b, beta=0, alpha=alpha, out_dtype=torch.float32, out=out)
    _staged(a, b, out, accumulate=False, alpha=alpha)
    return out


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha * (a @ b)`` for a float32 ``acc``, without rounding ``a @ b`` to a 16-bit dtype first
    (``alpha``: a host number, applied by the GEMM to its float32 product)."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
    elif float32_gemm_out(acc.device, a.dtype):
        torch.addmm(acc, a, b, alpha=alpha, out_dtype=torch.float32, out=acc)
    else:
        _staged(a, b, acc, accumulate=True, alpha=alpha)


def _staged(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool, alpha: float = 1.0) -> None:
    """``out (+)= alpha * (a @ b)`` through float32 copies of blocks, blocked as ``cost_model.staging_blocks``
    says; every write of a product is an ``addmm`` (beta=0 where it does not accumulate), so ``alpha`` is
    applied by the GEMM."""
    m, k = a.shape
    n = b.shape[1]
    blocks = cm.staging_blocks(m, n, k)
    if blocks.along == "k":  # both operands staged a slice of the reduction at a time; out read once per slice
        for k0 in range(0, k, blocks.step):
            a32, b32 = a[:, k0:k0 + blocks.step].float(), b[k0:k0 + blocks.step].float()
            if accumulate or k0 > 0:
                out.addmm_(a32, b32, alpha=alpha)
            else:
                torch.addmm(out, a32, b32, beta=0, alpha=alpha, out=out)
            del a32, b32
        return
    if blocks.along == "n":  # a staged whole, b a block of columns at a time
        a32 = a.float()
        if blocks.step >= n:  # one block: straight into ``out``
            b32 = b.float()
            out.addmm_(a32, b32, alpha=alpha) if accumulate else torch.addmm(out, a32, b32, beta=0, alpha=alpha,
                                                                             out=out)
            return
        for c0 in range(0, n, blocks.step):
            b32 = b[:, c0:c0 + blocks.step].float()
            target = out[:, c0:c0 + blocks.step]  # a strided view: the product lands in a [m, step] temporary
            if accumulate:
                target.addmm_(a32, b32, alpha=alpha)
            else:
                target.copy_(scaled_mm(a32, b32, alpha, a32.new_empty(m, b32.shape[1])))
            del b32
        return
    b32 = b.float()  # "m": b staged whole, a a block of rows at a time
    for r0 in range(0, m, blocks.step):
        a32 = a[r0:r0 + blocks.step].float()
        if accumulate:
            out[r0:r0 + blocks.step].addmm_(a32, b32, alpha=alpha)
        else:
            target = out[r0:r0 + blocks.step]
            torch.addmm(target, a32, b32, beta=0, alpha=alpha, out=target)
        del a32
