"""Row kernels over a tile of logits: log-softmax statistics, target gather, softmax gradient.

A tile is ``[rows, cols]`` of raw logits (any float dtype, any row stride, unit column
stride) holding the vocabulary slice ``[vocab_start, vocab_start + cols)``. Each program
owns one row and walks its columns ``BLOCK`` at a time, so the same kernels serve a full
row of logits (``vocab_start=0``, ``cols=V``) and one vocabulary block of a GEMM tile.

Raw logits ``s`` are post-processed in registers exactly as Hugging Face models do:
``z = softcap * tanh(s * scale / softcap) / temperature`` (softcap optional).

Statistics are kept in one float32 tensor ``stats[NUM_STATS, rows]`` (``stats_layout``) so
that a row can be folded over several vocabulary blocks (online log-sum-exp) and finished
later.
"""

import triton
import triton.language as tl

from . import stats_layout
from .launch import launch
from .tl_math import one_minus_exp, tanh_and_sech2

# Triton kernels read module globals only as constexpr.
STAT_MAX = tl.constexpr(stats_layout.STAT_MAX)
STAT_SUMEXP = tl.constexpr(stats_layout.STAT_SUMEXP)
STAT_ZEXP = tl.constexpr(stats_layout.STAT_ZEXP)
STAT_SQEXP = tl.constexpr(stats_layout.STAT_SQEXP)
STAT_ZSUM = tl.constexpr(stats_layout.STAT_ZSUM)
STAT_ARGMAX = tl.constexpr(stats_layout.STAT_ARGMAX)
STAT_TARGET = tl.constexpr(stats_layout.STAT_TARGET)

@triton.jit
def _post_process(s, scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """Raw logit -> (z, dz/ds) in float32."""
    u = s * scale
    # One return statement: the GPU compiler type-checks every return, even under a
    # constexpr branch, and the two branches' dz/ds differ in shape (block vs scalar).
    if HAS_SOFTCAP:
        # tl has no tanh on every backend and the interpreter; tl_math's is as accurate as
        # torch.tanh on the GPU too (no ex2.approx), and div_rn keeps div.full's 2 ulp out of u / softcap.
        t, sech2 = tanh_and_sech2(tl.math.div_rn(u, softcap))
        z = softcap * t * inv_temperature
        dz_ds = scale * sech2 * inv_temperature
    else:
        z = u * inv_temperature
        dz_ds = scale * inv_temperature
    return z, dz_ds


@triton.jit
def split_lse(lse):
    """A log-sum-exp (float64, or float32) -> float32 ``(hi, lo)`` with ``hi + lo == lse`` to float64 accuracy.

    ``log p = (z - hi) - lo``: for the tokens that carry probability ``z`` lies within a
    factor of two of ``hi``, so ``z - hi`` is exact (Sterbenz) and only the small result is
    rounded. A single float32 lse would instead put half an ulp of ``lse`` into every
    ``log p``: 1 - p(target) of a confident token cancels to a 5-100x worse gradient than
    float32 ``log_softmax``, and at ``|z| ~ 1e3`` every p is off by ~1e-4. An infinite lse
    (a row without gradient) gives ``lo = 0``.
    """
    hi = lse.to(tl.float32)
    finite = tl.abs(hi) < float("inf")
    # Zero both sides where infinite: inf - inf would be NaN (and a warning in the interpreter).
    lo = (tl.where(finite, lse.to(tl.float64), 0.0) - tl.where(finite, hi, 0.0).to(tl.float64)).to(tl.float32)
    return hi, lo


@triton.jit
def _row_stats_kernel(
    tile_ptr,
    tile_row_stride,
    labels_ptr,
    stats_ptr,
    stats_stride,
    vocab_start,
    n_cols,
    ignore_index,
    scale,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        return
    row_ptr = tile_ptr + row * tile_row_stride
    # STAT_TARGET * stats_stride passes 2^31 from ~358M tokens on: multiply in int64.
    # (tl.cast, not .to: a stride of 1 may arrive as a constexpr.)
    stats_stride = tl.cast(stats_stride, tl.int64)
    m = tl.load(stats_ptr + STAT_MAX * stats_stride + row)
    sum_exp = tl.load(stats_ptr + STAT_SUMEXP * stats_stride + row)
    z_exp = tl.load(stats_ptr + STAT_ZEXP * stats_stride + row)
    sq_exp = tl.load(stats_ptr + STAT_SQEXP * stats_stride + row)
    z_sum = tl.load(stats_ptr + STAT_ZSUM * stats_stride + row)
    arg = tl.load(stats_ptr + STAT_ARGMAX * stats_stride + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        s = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        z, _ = _post_process(s, scale, softcap, inv_temperature, HAS_SOFTCAP)
        z_sum += tl.sum(tl.where(in_row, z, 0.0), axis=0)
        z = tl.where(in_row, z, float("-inf"))
        block_max = tl.max(z, axis=0)
        # Blocks arrive in vocabulary order and only a strictly larger max moves the
        # argmax, so the first maximum wins ties, as torch.argmax does.
        block_arg = tl.argmax(z, axis=0).to(tl.float32) + (vocab_start + start).to(tl.float32)
        arg = tl.where(block_max > m, block_arg, arg)
        new_m = tl.maximum(m, block_max)
        # A row that is -inf so far has nothing to rescale; keep exp() away from inf - inf.
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)
        rescale = tl.exp(m - shift)
        e = tl.exp(z - shift)
        sum_exp = sum_exp * rescale + tl.sum(e, axis=0)
        # e == 0 where z is -inf (masked or a -inf logit): keep 0 * -inf out of the sum.
        z_exp = z_exp * rescale + tl.sum(e * tl.where(e > 0, z, 0.0), axis=0)
        sq_exp = sq_exp * rescale * rescale + tl.sum(e * e, axis=0)
        m = new_m
    tl.store(stats_ptr + STAT_MAX * stats_stride + row, m)
    tl.store(stats_ptr + STAT_SUMEXP * stats_stride + row, sum_exp)
    tl.store(stats_ptr + STAT_ZEXP * stats_stride + row, z_exp)
    tl.store(stats_ptr + STAT_SQEXP * stats_stride + row, sq_exp)
    tl.store(stats_ptr + STAT_ZSUM * stats_stride + row, z_sum)
    tl.store(stats_ptr + STAT_ARGMAX * stats_stride + row, arg)
    local = label - vocab_start
    if (local >= 0) & (local < n_cols):
        s = tl.load(row_ptr + local).to(tl.float32)
        z, _ = _post_process(s, scale, softcap, inv_temperature, HAS_SOFTCAP)
        tl.store(stats_ptr + STAT_TARGET * stats_stride + row, z)


@triton.jit
def _row_grad_kernel(
    tile_ptr,
    tile_row_stride,
    out_ptr,
    out_row_stride,
    labels_ptr,
    lse_ptr,
    grad_logp_ptr,
    entropy_ptr,
    grad_entropy_ptr,
    vocab_start,
    n_cols,
    ignore_index,
    scale,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + row * tile_row_stride
    out_row_ptr = out_ptr + row * out_row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    lse = tl.load(lse_ptr + row).to(tl.float64)
    # Ignored rows, and rows whose logits are all -inf (no distribution), get no gradient:
    # an lse of +inf makes every p exactly 0 without overflowing exp().
    no_grad = ignored | (lse == float("-inf"))
    g = tl.where(no_grad, 0.0, tl.load(grad_logp_ptr + row))
    lse_hi, lse_lo = split_lse(tl.where(no_grad, float("inf"), lse))
    if HAS_ENTROPY_GRAD:
        g_entropy = tl.where(ignored, 0.0, tl.load(grad_entropy_ptr + row))
        entropy = tl.load(entropy_ptr + row)
    local = label - vocab_start
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        s = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        z, dz_ds = _post_process(s, scale, softcap, inv_temperature, HAS_SOFTCAP)
        log_p = (z - lse_hi) - lse_lo
        p = tl.exp(log_p)
        # d log p_label / dz = onehot - p; 1 - p of the label from log p (one_minus_exp: exact as p -> 1)
        grad = g * tl.where(cols == local, one_minus_exp(log_p, p), -p)
        if HAS_ENTROPY_GRAD:
            # d entropy / dz_j = -p_j (log p_j + entropy); p_j = 0 contributes nothing.
            grad -= tl.where(p > 0, g_entropy * p * (log_p + entropy), 0.0)
        grad = tl.where(ignored, 0.0, grad * dz_ds)
        tl.store(out_row_ptr + cols, grad.to(out_ptr.dtype.element_ty), mask=in_row)


# Warps per row kernel and softcap specialization. The softcap's tanh (tl_math.tanh_and_sech2: a
# polynomial, an exp and an IEEE division per element) holds more values per column: 4096 columns
# over 4 warps spilled 16-24 bytes in _row_stats_kernel (Triton 3.9, sm_80 and sm_90); over 8 warps,
# 16 columns per thread, nothing spills (benchmarks/KERNELS.md). One row per program either way.
ROW_WARPS = {"_row_stats_kernel": {False: 4, True: 8}, "_row_grad_kernel": {False: 4, True: 4}}


def _block_for(n_cols: int) -> int:
    # Wide blocks keep a row's loop short; 4096 float32 values stay in registers on a GPU
    # and make the interpreter (vectorised per block) fast.
    return max(16, min(4096, triton.next_power_of_2(max(n_cols, 1))))


def row_stats(tile, labels, stats, *, vocab_start, ignore_index, scale, softcap, inv_temperature):
    """Fold ``tile`` (rows x cols, one vocabulary block) into ``stats`` in place.

    ``stats`` must start as :func:`init_stats` made it; rows whose label is
    ``ignore_index`` are left untouched.
    """
    rows, cols = tile.shape
    if rows == 0:
        return
    launch(
        _row_stats_kernel, (rows,),
        tile, tile.stride(0), labels, stats, stats.stride(0), vocab_start, cols, ignore_index,
        float(scale), float(softcap or 1.0), float(inv_temperature),
        HAS_SOFTCAP=softcap is not None, BLOCK=_block_for(cols),
        num_warps=ROW_WARPS["_row_stats_kernel"][softcap is not None],
    )


def row_grad(tile, labels, lse, grad_logp, out, *, vocab_start, ignore_index, scale, softcap,
             inv_temperature, entropy=None, grad_entropy=None):
    """Write d(sum_r g_r log p_r + ge_r entropy_r) / d(raw logits) of ``tile`` into ``out``.

    ``lse`` is best float64 (see :func:`split_lse`); a float32 one works, less exactly.

    ``out`` may be ``tile`` itself (in place: no second tile is allocated). Rows whose
    label is ``ignore_index`` get zeros.
    """
    rows, cols = tile.shape
    if rows == 0:
        return
    has_entropy_grad = grad_entropy is not None
    launch(
        _row_grad_kernel, (rows,),
        tile, tile.stride(0), out, out.stride(0), labels, lse, grad_logp,
        entropy if has_entropy_grad else lse, grad_entropy if has_entropy_grad else lse,
        vocab_start, cols, ignore_index,
        float(scale), float(softcap or 1.0), float(inv_temperature),
        HAS_SOFTCAP=softcap is not None, HAS_ENTROPY_GRAD=has_entropy_grad, BLOCK=_block_for(cols),
        num_warps=ROW_WARPS["_row_grad_kernel"][softcap is not None],
    )
