"""Scaling by device scalars: in place, skipped on the device when the scalar is 1; and the scaled merge
of a split pair's two weight-gradient sums, in one pass.

``loss.backward()`` hands the whole-pair route a ``grad_loss`` of exactly 1, a device
scalar: reading it on the host would stall the stream. Every program reads the scalar
and masks its loads and stores off when it is 1, so the common case moves no bytes
(one launch) and any other value scales the tensor in place (one read and one write),
with no second copy.
"""

import triton
import triton.language as tl

from .launch import launch


@triton.jit
def _scale_unless_one_kernel(x_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr).to(tl.float32)
    live = tl.where(scale != 1.0, numel, 0)  # no element is live when the scale is 1
    mask = offsets < live
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(x_ptr + offsets, (x.to(tl.float32) * scale).to(x_ptr.dtype.element_ty), mask=mask)


def scale_unless_one(x, scale, block: int = 4096) -> None:
    """``x *= scale`` in place (``x`` contiguous, ``scale`` a one-element tensor on x's device),
    with no memory traffic when ``scale == 1``."""
    numel = x.numel()
    if numel == 0:
        return
    launch(_scale_unless_one_kernel, (triton.cdiv(numel, block),), x, scale, numel, BLOCK=block)


@triton.jit
def _merge_scaled_kernel(a_ptr, b_ptr, running_ptr, out_ptr, ga_ptr, gb_ptr, numel, HAS_B: tl.constexpr,
                         HAS_RUNNING: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    value = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * tl.load(ga_ptr).to(tl.float32)
    if HAS_B:
        value += tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * tl.load(gb_ptr).to(tl.float32)
    if HAS_RUNNING:
        value += tl.load(running_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=mask)


def merge_scaled(out, a, scale_a, b=None, scale_b=None, running=None, block: int = 4096) -> None:
    """``out = scale_a * a (+ scale_b * b) (+ running)`` in one pass, in float32, stored in out's dtype
    (``out`` may be ``a``). All contiguous and of one shape; the scales are one-element device tensors."""
    numel = out.numel()
    if numel == 0:
        return
    launch(
        _merge_scaled_kernel, (triton.cdiv(numel, block),), a, a if b is None else b, a if running is None else running, out, scale_a,
        scale_a if scale_b is None else scale_b, numel, HAS_B=b is not None, HAS_RUNNING=running is not None,
        BLOCK=block)
