"""Fully fused linear + log-softmax kernels: logits live only in registers.

Each program computes ``tl.dot`` tiles of ``hidden[BLOCK_N, H] @ weight[BLOCK_V, H]^T``
(float32 accumulation over ``BLOCK_K`` slices of H), adds the bias, post-processes the
tile in registers exactly like the row kernels (``logsoftmax_gather._post_process``) and
uses it at once. No logits tile, softmax or logits gradient is ever written to memory.

- Forward (2NHV): grid over (token blocks, vocabulary splits). A program walks its
  split's vocabulary tiles and folds them into the per-token statistics of
  ``stats_layout`` (online log-sum-exp, first-max argmax, target logit). Splits write
  ``partial[split, stat, token]``; a small kernel merges them in split order.
- Backward: two kernels, each recomputing the logits it needs (2NHV each) and forming
  ``d loss / d raw logit`` in registers:
  * ``grad_hidden``: grid over (token blocks, vocabulary splits); a program loops over
    its vocabulary tiles and adds ``dz @ W`` into its own float32 rows of grad_hidden.
  * ``grad_weight`` / ``grad_bias``: grid over vocabulary blocks; a program loops over
    all tokens and adds ``dz^T @ h`` into its own float32 rows of grad_weight.
  Backward with both gradients costs 8NHV (half of it recompute) plus, per tile, a float32
  read and write of the gradient rows it owns (8 H bytes per token per vocabulary tile and
  per vocabulary row per token block): memory-bound at real hidden sizes, so dpo_fast runs
  these kernels only where that arithmetic favours them (``dpo_fast/fused.py``), e.g. with
  gradient filtering. A bias gradient alone still runs the vocabulary-major kernel.

Operands go to ``tl.dot`` in their own dtype (bf16/fp16 on tensor cores; float32 in IEEE
float32, see ``FLOAT32_DOT_PRECISION``); the logits gradient is rounded to that dtype before
its two GEMMs, as the chunked path's in-place tile is. Every sum is float32.

Determinism: every float32 accumulator has exactly one owning program, which updates it
in a fixed loop order; split partials are reduced in split order. No atomics or locks,
so two runs with the same tile configuration give identical bits. (Autotuning picks the
configuration per shape; set ``DPO_FAST_FUSED_AUTOTUNE=0`` to pin the first one across
processes.)

Offsets that scale with N*V, N*H or V*H are computed in int64.
"""

import os
import warnings

import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from . import occupancy, stats_layout
from .launch import compiled_kernels, launch
from .logsoftmax_gather import (  # the statistics layout as Triton constexprs, defined once there
    STAT_ARGMAX, STAT_MAX, STAT_SQEXP, STAT_SUMEXP, STAT_TARGET, STAT_ZEXP, STAT_ZSUM, _post_process, split_lse,
)
from .tl_math import one_minus_exp

try:  # the launchers need torch; compiling the kernels ahead of time (benchmarks/kernels.py) does not
    import torch
except ImportError:  # pragma: no cover - a bare Triton venv
    torch = None

NUM_STATS = stats_layout.NUM_STATS
NUM_STATS_C = tl.constexpr(NUM_STATS)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter's tl.dot multiplies the raw bits of 16-bit floats: it gets float32 operands.
UPCAST_DOT_OPERANDS = tl.constexpr(INTERPRETED)


# ----------------------------------------------------------------------------------------
# tile configurations
# ----------------------------------------------------------------------------------------

# Configurations per operand element size (2: bf16/fp16, 4: fp32; float64 operands are loaded
# as such and multiplied in float32: they get the float32 tiles). The token-major kernels
# (forward, grad_hidden) get their token block from the launcher, which sizes the vocabulary
# splits in waves of SMs x the programs one SM holds of the kernel that launch runs
# (``_resident_programs``): so they have one config per element size, the one the grid is sized
# from (another tile or warp count would run a grid sized for someone else's occupancy, and
# could not win). grad_weight's grid does not depend on occupancy: its list is tuned. Every
# launch the launchers make at real shapes (benchmarks/launches.py: flags on and off, n = 1, n
# not a multiple of 16, one split, GPT-2, Gemma-2 with softcap) compiles with no register
# spills and within the card's shared memory, for sm_80 and sm_90 with Triton 3.6 and 3.9, and
# its splits are sized from that compiled specialization (tests/test_kernel_compile.py,
# benchmarks/KERNELS.md).
# Big tiles spill: 128 x 128 x 64 with 8 warps needs more than 255 registers per thread, and
# float32 operands multiply in IEEE float32 (FLOAT32_DOT_PRECISION "ieee": FMA units, operands held
# in registers), so float32 tiles are smaller: 64 tokens x 32 vocabulary columns x 16 of H in the
# token-major kernels, 8 warps in grad_weight (64 x 64 x 16 with 4 warps spilled 8-272 bytes).
# The first entry of each list is the default (the only one with DPO_FAST_FUSED_AUTOTUNE=0).
TOKEN_BLOCK = {2: 64, 4: 64, 8: 64}
_TOKEN_MAJOR = {  # kernel -> element size -> [(BLOCK_V, BLOCK_K, warps, stages)]: programs own token rows
    # (64, 64, 4, 3) left the 16-bit lists: 4 warps of it fit 2-3 programs per SM, not the one the
    # splits are sized for (and issue 18 saw its forward spill on sm_80 with Triton 3.6).
    # 16-bit grad_hidden: BLOCK_K 64 hit 255 registers and spilled 72-152 bytes on Triton 3.9 with
    # the label's 1 - p (tl_math.one_minus_exp) and softcap; BLOCK_K 16 keeps the 128-column tile
    # (the backward rule's traffic, default_blocks) at one program per SM, as sized. The float32
    # (ieee) forward with 64-column tiles spilled 8-272 bytes at its 168-register cap; 32 fit.
    "forward": {2: [(128, 64, 8, 3)], 4: [(32, 16, 4, 3)], 8: [(32, 16, 4, 3)]},
    "grad_hidden": {2: [(128, 16, 8, 3)], 4: [(32, 16, 4, 3)], 8: [(32, 16, 4, 3)]},
}
_VOCAB_MAJOR = {  # (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages): grad_weight, programs own vocabulary rows
    # (64, 128, 64, 8, 3) left the 16-bit list: with the float64 lse it spills 8 bytes on sm_90 (Triton 3.9);
    # (128, 64, 64, 8, 3) spilled 120-240 bytes on Triton 3.9 once the label's 1 - p came in (and
    # (128, 64, 32, 8, 3) 128); 32 vocabulary rows keep the 128-token block (default_blocks).
    2: [(128, 32, 64, 8, 3)],
    4: [(64, 64, 16, 8, 3), (32, 64, 16, 8, 3)],
    8: [(64, 64, 16, 8, 3)],
}
# Programs of a token-major tile one SM holds at once where no compiled kernel says (the
# interpreter; benchmarks/launches.py's recordings on meta tensors). On CUDA the launcher reads
# the kernel it is about to launch instead (``_resident_programs``): registers per thread are
# ptxas's choice, below a cap but not at it, and differ by specialization and Triton version
# (KERNELS.md: GPT-2's bf16 grad_hidden takes 128 registers on sm_80 with Triton 3.9, two
# programs per SM where these say one, 170 with Triton 3.6; n = 1 fits 2-4). These are the
# counts of the other launches: 16-bit tiles (8 warps, 138-255 registers) one; float32 tiles
# (4 warps) three in the forward (capped at 168 registers), two in grad_hidden (allowed 255: on
# sm_80 ptxas otherwise picks 128 or 168 itself and spills).
RESIDENT_PROGRAMS = {"forward": {2: 1, 4: 3, 8: 3}, "grad_hidden": {2: 1, 4: 2, 8: 2}}
# The split count is an ordinary integer argument, not specialized on (equal to 1 it would be a
# constant, and ptxas allocates that specialization differently): so the kernel compiled to size
# the splits is the one that runs, whatever split count it chooses.
SPLIT_COUNT_ARGS = ["num_splits"]
# Register caps (maxnreg) per kernel and element size, where ptxas's own choice is wrong:
# - float32 forward: at most 168 registers, so that three programs of 4 warps fit an SM (ptxas
#   takes 128-168 under the cap; the split sizing reads what it took);
# - float32 grad_hidden: as grad_weight below, on sm_80 ptxas held it at 128-168 registers and
#   spilled up to 16 bytes;
# - float32 grad_weight: uncapped, ptxas held it at 168 registers on sm_80 and spilled 16 bytes
#   (Triton 3.6 and 3.9); allowed 255 it spills nothing (occupancy plays no part there: its
#   grid is one program per vocabulary block).
MAX_REGISTERS = {"forward": {4: 168, 8: 168}, "grad_hidden": {4: 255, 8: 255}, "grad_weight": {4: 255, 8: 255}}
INTERPRETER_TILE = (32, 64, 32, 1, 1)  # numpy runs one program at a time: one small tile, no tuning
MERGE_BLOCK = 128


def _token_major_config(block_v, block_k, warps, stages, maxnreg=None):
    return triton.Config({"BLOCK_V": block_v, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages,
                         maxnreg=maxnreg)


def _vocab_major_config(block_n, block_v, block_k, warps, stages, maxnreg=None):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_K": block_k}, num_warps=warps,
                         num_stages=stages, maxnreg=maxnreg)


def _tuned(lists, make, kernel):
    """Autotuning list of ``kernel``: every element size's entries (pruned per launch to the operands' size)."""
    if INTERPRETED:
        return [make(*(INTERPRETER_TILE[1:] if make is _token_major_config else INTERPRETER_TILE))]
    pinned = os.environ.get("DPO_FAST_FUSED_AUTOTUNE", "1") == "0"
    caps = MAX_REGISTERS.get(kernel, {})
    configs, seen = [], set()
    for size, entries in lists.items():
        for entry in entries[:1] if pinned else entries:
            entry = entry + (caps.get(size),)
            if entry not in seen:
                seen.add(entry)
                configs.append(make(*entry))
    return configs


def _config_key(config):
    """The config's list entry: tile, warps, stages (its register cap follows from kernel and size)."""
    tile = tuple(config.kwargs[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K") if k in config.kwargs)
    return tile + (config.num_warps, config.num_stages)


def _prune_to_element_size(lists):
    """Pruning that keeps the entries of ``lists`` for the operands' element size (one per size for the
    token-major kernels: nothing left to time)."""
    def prune(configs, named_args, **kwargs):
        if INTERPRETED:
            return configs
        allowed = set(lists[named_args["h_ptr"].element_size()])
        return [c for c in configs if _config_key(c) in allowed]
    return prune


def _prune_vocab_major(configs, named_args, **kwargs):
    """As above, and drop token blocks far wider than the batch (128 tokens for 20 wastes 84%)."""
    if INTERPRETED:
        return configs
    allowed = set(_VOCAB_MAJOR[named_args["h_ptr"].element_size()])
    fits = [c for c in configs if _config_key(c) in allowed]
    narrow = [c for c in fits if c.kwargs["BLOCK_N"] <= max(32, named_args["n_bucket"])]
    return narrow or [min(fits, key=lambda c: c.kwargs["BLOCK_N"])]


class PrunedAutotuner(Autotuner):
    """Triton's autotuner, except that a key whose pruning leaves one config runs it untimed.

    Triton 3.6 (the GPU image's) times every config that survives ``early_config_prune`` on the
    first launch of each new key, a lone survivor too: issue 18 puts it at about 0.6 s of kernel
    runs per key at Llama-3-8B's head, for a choice already made (Triton 3.9 skips it itself). The pruning runs
    as before; when it leaves one config, the timing is skipped (the key is still cached).
    """

    def prune_configs(self, kwargs, *args, **more):
        pruned = super().prune_configs(kwargs, *args, **more)
        self._untimed = len(pruned) == 1
        return pruned

    def _bench(self, *args, config, **meta):
        if getattr(self, "_untimed", False):
            return [0.0, 0.0, 0.0]
        return super()._bench(*args, config=config, **meta)


def _autotune(configs, key, prune, reset_to_zero=None, restore_value=None):
    """``triton.autotune`` with :class:`PrunedAutotuner`. Every output a kernel accumulates into must be in
    ``reset_to_zero`` (or ``restore_value``): timing runs the kernel on the launch's own buffers."""
    def decorator(fn):
        return PrunedAutotuner(fn, fn.arg_names, configs=configs, key=key, reset_to_zero=reset_to_zero,
                               restore_value=restore_value, prune_configs_by={"early_config_prune": prune})
    return decorator


def _token_bucket(n: int) -> int:
    """Autotune key for the token count: powers of two up to 2^16."""
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def token_block(element_size: int, tokens: int) -> int:
    """Token block of the forward and grad_hidden kernels: the default, halved while the batch fits in half."""
    if INTERPRETED:
        return INTERPRETER_TILE[0]
    block = TOKEN_BLOCK[element_size]
    while block > 32 and block // 2 >= tokens:
        block //= 2
    return block


def default_blocks(dtype) -> tuple:
    """(token block of grad_weight, vocabulary tile of grad_hidden) of the default configs for ``dtype``.

    Each float32 gradient row is re-read and re-written once per such block: the backward
    rule of ``dpo_fast/fused.py`` counts those bytes.
    """
    size = dtype.itemsize
    return _VOCAB_MAJOR[size][0][0], _TOKEN_MAJOR["grad_hidden"][size][0][0]


# ----------------------------------------------------------------------------------------
# shared tile math
# ----------------------------------------------------------------------------------------

@triton.jit
def _operand(x):
    # float64 inputs are multiplied in float32 (tl.dot has no float64 path with a float32 accumulator).
    # Under the interpreter 16-bit values are widened exactly, so products stay those of the GPU.
    if (x.dtype == tl.float64) or UPCAST_DOT_OPERANDS:
        x = x.to(tl.float32)
    return x


@triton.jit
def _logits_tile(h_ptr, stride_hn, stride_hk, w_ptr, stride_wv, stride_wk, b_ptr, rows, row_ok, cols, col_ok, H,
                 HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Raw logits s[rows, cols] = hidden[rows] . weight[cols] (+ bias), float32, never stored."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows[:, None] * stride_hn
    w_cols = w_ptr + cols[None, :] * stride_wv
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_rows + ks[None, :] * stride_hk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(_operand(a), _operand(b), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _row_inputs(labels_ptr, lse_ptr, grad_logp_ptr, entropy_ptr, grad_entropy_ptr, rows, row_ok,
                HAS_ENTROPY_GRAD: tl.constexpr):
    """Per-token backward inputs; rows outside the batch or without a distribution get g = 0.

    ``lse`` (float64, or float32) comes back as float32 ``(lse_hi, lse_lo)``: see ``split_lse``.

    Their lse becomes +inf, as in the row kernels: every p is then exactly 0, and exp()
    never overflows into an inf * 0 = NaN.
    """
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
    dead = (~row_ok) | (lse == float("-inf"))
    g = tl.where(dead, 0.0, tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0))
    lse_hi, lse_lo = split_lse(tl.where(dead, float("inf"), lse))  # log p = (z - hi) - lo, exact near the max
    g_entropy = g * 0.0
    entropy = g * 0.0
    if HAS_ENTROPY_GRAD:
        g_entropy = tl.where(dead, 0.0, tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0))
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
    return label, lse_hi, lse_lo, g, entropy, g_entropy


@triton.jit
def _logits_grad(s, cols, col_ok, row_ok, label, lse_hi, lse_lo, g, entropy, g_entropy, scale, softcap,
                 inv_temperature, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr):
    """(d loss / d raw logit, d loss / d z) of a tile, float32, zero outside the batch and vocabulary.

    d log p_label / dz = onehot - p;  d entropy / dz = -p (log p + entropy), with
    log p = (z - lse_hi) - lse_lo (``split_lse``: exact near the max, so confident tokens keep 1 - p).
    """
    z, dz_ds = _post_process(s, scale, softcap, inv_temperature, HAS_SOFTCAP)
    z = tl.where(col_ok[None, :], z, float("-inf"))  # columns past the vocabulary: p = 0
    log_p = (z - lse_hi[:, None]) - lse_lo[:, None]
    p = tl.exp(log_p)
    # onehot - p, the label's 1 - p from log p (tl_math.one_minus_exp: exact as p -> 1 with the GPU's exp).
    # Computed per row, on the label's own log p (a max over the tile picks it out exactly; -inf where the
    # label is not in the tile, which is then not selected): the same value as evaluating it per element,
    # with the polynomial on a row vector instead of the whole tile (which spilled the 16-bit backward).
    is_label = cols[None, :] == label[:, None]
    log_p_label = tl.max(tl.where(is_label, log_p, float("-inf")), axis=1)
    one_minus_p = one_minus_exp(log_p_label, tl.exp(log_p_label))
    grad_z = g[:, None] * tl.where(is_label, one_minus_p[:, None], -p)
    if HAS_ENTROPY_GRAD:
        # Where p is 0 (masked columns, dead rows) z - lse may be -inf: use 0 to keep 0 * inf out.
        log_p = tl.where(p > 0, log_p, 0.0)
        grad_z -= g_entropy[:, None] * p * (log_p + entropy[:, None])
    grad_z = tl.where(row_ok[:, None] & col_ok[None, :], grad_z, 0.0)
    return grad_z * dz_ds, grad_z


@triton.jit
def _split_range(split, V, num_splits, BLOCK_V: tl.constexpr):
    """Whole BLOCK_V tiles per split so no tile straddles two splits; trailing splits may be empty."""
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), num_splits)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    return v_begin, v_end


# ----------------------------------------------------------------------------------------
# forward: per-token statistics
# ----------------------------------------------------------------------------------------

@triton.jit
def _worth_computing(grad_z, filter_eps, FILTER: tl.constexpr):
    """Gradient filtering (approximate, off unless FILTER): skip a tile whose every |dz| < filter_eps."""
    if FILTER:
        return tl.max(tl.max(tl.abs(grad_z), axis=1), axis=0) >= filter_eps
    return True


@triton.jit
def _add_product(out_rows, out_ok, lhs, rhs_rows, rhs_ok, stride_rk, H, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """out[:, k] += lhs @ rhs[:, k] in float32, one BLOCK_K slice of the hidden dimension at a time.

    ``out_rows``/``rhs_rows`` point at the start of each row; ``out`` rows have stride H.
    """
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        rhs = _operand(tl.load(rhs_rows + ks[None, :] * stride_rk, mask=rhs_ok[:, None] & k_ok[None, :], other=0.0))
        out = out_rows + ks[None, :]
        mask = out_ok[:, None] & k_ok[None, :]
        acc = tl.load(out, mask=mask, other=0.0)
        tl.store(out, tl.dot(lhs, rhs, acc, input_precision=DOT_PRECISION), mask=mask)


@triton.jit
def _store_stats(out, n, row_ok, m, sum_exp, z_exp, sq_exp, z_sum, arg, target):
    """Write the statistics of a block of rows; ``out`` points at the rows in a [NUM_STATS, n] layout."""
    tl.store(out + STAT_MAX * n, m, mask=row_ok)
    tl.store(out + STAT_SUMEXP * n, sum_exp, mask=row_ok)
    tl.store(out + STAT_ZEXP * n, z_exp, mask=row_ok)
    tl.store(out + STAT_SQEXP * n, sq_exp, mask=row_ok)
    tl.store(out + STAT_ZSUM * n, z_sum, mask=row_ok)
    tl.store(out + STAT_ARGMAX * n, arg, mask=row_ok)
    tl.store(out + STAT_TARGET * n, target, mask=row_ok)


@_autotune(configs=_tuned(_TOKEN_MAJOR["forward"], _token_major_config, "forward"),
           key=["H", "V", "n_bucket", "BLOCK_N"], prune=_prune_to_element_size(_TOKEN_MAJOR["forward"]))
@triton.jit(do_not_specialize=SPLIT_COUNT_ARGS)
def _forward_kernel(
    h_ptr, stride_hn, stride_hk, w_ptr, stride_wv, stride_wk, b_ptr, labels_ptr, partial_ptr,
    n, V, H, num_splits, n_bucket, scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    z_exp = tl.zeros((BLOCK_N,), tl.float32)
    sq_exp = tl.zeros((BLOCK_N,), tl.float32)
    z_sum = tl.zeros((BLOCK_N,), tl.float32)
    arg = tl.zeros((BLOCK_N,), tl.float32)
    target = tl.zeros((BLOCK_N,), tl.float32)
    v_begin, v_end = _split_range(split, V, num_splits, BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_end
        s = _logits_tile(h_ptr, stride_hn, stride_hk, w_ptr, stride_wv, stride_wk, b_ptr, rows, row_ok, cols,
                         col_ok, H, HAS_BIAS, BLOCK_K, BLOCK_N, BLOCK_V, DOT_PRECISION)
        z, _ = _post_process(s, scale, softcap, inv_temperature, HAS_SOFTCAP)
        # The label lies in exactly one tile of one split: the other tiles add exact zeros.
        target += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
        z_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        # Tiles come in vocabulary order and only a strictly larger max moves the argmax:
        # the first maximum wins, as in torch.argmax.
        tile_arg = tl.argmax(z, axis=1).to(tl.float32) + v0
        arg = tl.where(tile_max > m, tile_arg, arg)
        new_m = tl.maximum(m, tile_max)
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)
        rescale = tl.exp(m - shift)
        e = tl.exp(z - shift[:, None])
        sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
        z_exp = z_exp * rescale + tl.sum(e * tl.where(e > 0, z, 0.0), axis=1)
        sq_exp = sq_exp * rescale * rescale + tl.sum(e * e, axis=1)
        m = new_m
    _store_stats(partial_ptr + split.to(tl.int64) * NUM_STATS_C * n + rows, n, row_ok, m, sum_exp, z_exp, sq_exp,
                 z_sum, arg, target)



@triton.jit
def _merge_splits_kernel(partial_ptr, stats_ptr, n, num_splits, BLOCK: tl.constexpr):
    """stats[:, rows] = fold of partial[0..num_splits-1, :, rows], in split order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK,), tl.float32)
    z_exp = tl.zeros((BLOCK,), tl.float32)
    sq_exp = tl.zeros((BLOCK,), tl.float32)
    z_sum = tl.zeros((BLOCK,), tl.float32)
    arg = tl.zeros((BLOCK,), tl.float32)
    target = tl.zeros((BLOCK,), tl.float32)
    part = partial_ptr + rows
    for _split in range(0, num_splits):
        part_m = tl.load(part + STAT_MAX * n, mask=row_ok, other=float("-inf"))
        new_m = tl.maximum(m, part_m)
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)
        rescale = tl.exp(m - shift)
        part_rescale = tl.exp(part_m - shift)
        sum_exp = sum_exp * rescale + tl.load(part + STAT_SUMEXP * n, mask=row_ok, other=0.0) * part_rescale
        z_exp = z_exp * rescale + tl.load(part + STAT_ZEXP * n, mask=row_ok, other=0.0) * part_rescale
        sq_exp = (sq_exp * rescale * rescale
                  + tl.load(part + STAT_SQEXP * n, mask=row_ok, other=0.0) * part_rescale * part_rescale)
        z_sum += tl.load(part + STAT_ZSUM * n, mask=row_ok, other=0.0)
        # Splits cover increasing vocabulary ranges: a tie keeps the earlier split's index.
        arg = tl.where(part_m > m, tl.load(part + STAT_ARGMAX * n, mask=row_ok, other=0.0), arg)
        target += tl.load(part + STAT_TARGET * n, mask=row_ok, other=0.0)
        m = new_m
        part += NUM_STATS_C * n
    _store_stats(stats_ptr + rows, n, row_ok, m, sum_exp, z_exp, sq_exp, z_sum, arg, target)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------

@_autotune(configs=_tuned(_TOKEN_MAJOR["grad_hidden"], _token_major_config, "grad_hidden"),
           key=["H", "V", "n_bucket", "BLOCK_N"], prune=_prune_to_element_size(_TOKEN_MAJOR["grad_hidden"]),
           reset_to_zero=["dh_ptr"])
@triton.jit(do_not_specialize=SPLIT_COUNT_ARGS)
def _grad_hidden_kernel(
    h_ptr, stride_hn, stride_hk, w_ptr, stride_wv, stride_wk, b_ptr,
    labels_ptr, lse_ptr, grad_logp_ptr, entropy_ptr, grad_entropy_ptr, dh_ptr,
    n, V, H, num_splits, n_bucket, scale, softcap, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dh[split, rows, :] += sum over the split's vocabulary of dz[rows, v] * W[v, :] (float32)."""
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    label, lse_hi, lse_lo, g, entropy, g_entropy = _row_inputs(labels_ptr, lse_ptr, grad_logp_ptr, entropy_ptr,
                                                               grad_entropy_ptr, rows, row_ok, HAS_ENTROPY_GRAD)
    dh_rows = dh_ptr + split.to(tl.int64) * n * H + rows[:, None] * H
    v_begin, v_end = _split_range(split, V, num_splits, BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_end
        s = _logits_tile(h_ptr, stride_hn, stride_hk, w_ptr, stride_wv, stride_wk, b_ptr, rows, row_ok, cols,
                         col_ok, H, HAS_BIAS, BLOCK_K, BLOCK_N, BLOCK_V, DOT_PRECISION)
        grad_s, grad_z = _logits_grad(s, cols, col_ok, row_ok, label, lse_hi, lse_lo, g, entropy, g_entropy, scale,
                                      softcap, inv_temperature, HAS_SOFTCAP, HAS_ENTROPY_GRAD)
        if _worth_computing(grad_z, filter_eps, FILTER):
            # dz is rounded to the weight dtype, as the chunked path's in-place tile is.
            dz = _operand(grad_s.to(w_ptr.dtype.element_ty))
            _add_product(dh_rows, row_ok, dz, w_ptr + cols[:, None] * stride_wv, col_ok, stride_wk, H, BLOCK_K,
                         DOT_PRECISION)
        # The next tile re-reads these rows, possibly from other threads of this program.
        tl.debug_barrier()


@_autotune(configs=_tuned(_VOCAB_MAJOR, _vocab_major_config, "grad_weight"), key=["H", "V", "n_bucket"],
           prune=_prune_vocab_major, reset_to_zero=["dw_ptr", "db_ptr"])
@triton.jit
def _grad_weight_kernel(
    h_ptr, stride_hn, stride_hk, w_ptr, stride_wv, stride_wk, b_ptr,
    labels_ptr, lse_ptr, grad_logp_ptr, entropy_ptr, grad_entropy_ptr, dw_ptr, db_ptr,
    n, V, H, v_start, v_end, n_bucket, scale, softcap, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, FILTER: tl.constexpr,
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """For vocabulary rows in [v_start, v_end): dw[v - v_start, :] += sum over tokens of dz[t, v] h[t, :]
    and db[v] = sum over tokens of dz[t, v] (both float32)."""
    cols = v_start + tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_end
    dw_rows = dw_ptr + (cols - v_start)[:, None] * H
    db = tl.zeros((BLOCK_V,), tl.float32)
    for t0 in range(0, n, BLOCK_N):
        rows = t0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < n
        label, lse_hi, lse_lo, g, entropy, g_entropy = _row_inputs(labels_ptr, lse_ptr, grad_logp_ptr, entropy_ptr,
                                                                   grad_entropy_ptr, rows, row_ok, HAS_ENTROPY_GRAD)
        s = _logits_tile(h_ptr, stride_hn, stride_hk, w_ptr, stride_wv, stride_wk, b_ptr, rows, row_ok, cols,
                         col_ok, H, HAS_BIAS, BLOCK_K, BLOCK_N, BLOCK_V, DOT_PRECISION)
        grad_s, grad_z = _logits_grad(s, cols, col_ok, row_ok, label, lse_hi, lse_lo, g, entropy, g_entropy, scale,
                                      softcap, inv_temperature, HAS_SOFTCAP, HAS_ENTROPY_GRAD)
        if _worth_computing(grad_z, filter_eps, FILTER):
            if NEED_BIAS:
                db += tl.sum(grad_s, axis=0)
            if NEED_WEIGHT:
                dz_t = _operand(tl.trans(grad_s).to(h_ptr.dtype.element_ty))
                _add_product(dw_rows, col_ok, dz_t, h_ptr + rows[:, None] * stride_hn, row_ok, stride_hk, H,
                             BLOCK_K, DOT_PRECISION)
        tl.debug_barrier()
    if NEED_BIAS:
        tl.store(db_ptr + cols, db, mask=col_ok)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------

DEFAULT_WORKSPACE_BYTES = 512 * 2**20  # float32 split partials of grad_hidden and weight-gradient scratch


# tl.dot rounds float32 operands to TF32 (10-bit mantissa) by default on NVIDIA GPUs. dpo-fast's
# policy (dpo_fast/precision.py, README "Float32 precision policy"): a float32 head is multiplied in
# IEEE float32 on every path, so float32 operands ask for "ieee" (FMA units). "tf32x3" (three TF32
# tensor-core products, ~2^-22 per product) is faster but was measured too coarse for confident
# tokens under emulated GPU arithmetic (tests/test_precision_policy.py: gradients 4-7x naive
# float32's error at |z| 1e3-1e4); DPO_FAST_FUSED_FP32_DOT=tf32x3 opts into it.
FLOAT32_DOT_PRECISION = os.environ.get("DPO_FAST_FUSED_FP32_DOT", "ieee")


def _dot_precision(dtype) -> str:
    # 16-bit operands are multiplied exactly whatever this says; "tf32" is tl.dot's default.
    return FLOAT32_DOT_PRECISION if dtype in (torch.float32, torch.float64) else "tf32"


def _multiprocessors(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def wave_fill(token_blocks: int, splits: int, vocab_tiles: int, slots: int) -> float:
    """Share of the GPU's time a (token blocks x vocabulary splits) grid keeps busy.

    ``slots`` programs run at once (SMs x resident programs), so the grid runs in waves of
    ``slots``; a split holds whole vocabulary tiles, so the last split may be short.
    """
    programs = token_blocks * splits
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    return token_blocks * vocab_tiles / (triton.cdiv(programs, slots) * slots * tiles_per_split)


def splits_for_waves(token_blocks: int, vocab_tiles: int, slots: int, max_splits: int = 64) -> int:
    """Fewest vocabulary splits whose grid fills at least 90% of its waves, else the best filling."""
    candidates = range(1, max(1, min(max_splits, vocab_tiles)) + 1)
    good = [s for s in candidates if wave_fill(token_blocks, s, vocab_tiles, slots) >= 0.9]
    return good[0] if good else max(candidates, key=lambda s: wave_fill(token_blocks, s, vocab_tiles, slots))


def _sm_limits(device) -> occupancy.SMLimits:
    return occupancy.limits_of(torch.cuda.get_device_properties(device))


_FALLBACK_WARNED = set()


def _resident_programs(kernel, name: str, element_size: int, device, args, kwargs) -> int:
    """Programs of the launch ``kernel[grid](*args, **kwargs)`` one SM holds at once.

    On CUDA: of the kernel that launch runs, compiled (or found in Triton's cache) now, before the
    launch (``launch.compiled_kernels``), its registers, warps and shared memory counted against the
    device's limits by ``occupancy.resident_programs`` (what benchmarks/KERNELS.md reports for every
    launch). ``args`` holds placeholders for the split buffer (a dtype: an aligned pointer, as every
    fresh allocation is) and the split count (not specialized on: ``SPLIT_COUNT_ARGS``), so the
    kernel looked up is the one launched. Elsewhere (CPU tensors, or the interpreter whatever the
    device: nothing is compiled), or where this Triton's compiled kernel does not say,
    ``RESIDENT_PROGRAMS`` (the latter with a warning).
    """
    if device.type == "cuda" and not INTERPRETED:
        limits = _sm_limits(device)
        why = "did not report the registers of"
        try:
            counts = [occupancy.of_compiled(compiled, limits)
                      for compiled in compiled_kernels(kernel, *args, **kwargs)]
        except Exception as exc:  # a Triton whose warmup differs must cost a grid shape, never the call
            counts, why = [], f"could not look up ({type(exc).__name__}: {exc}) the registers of"
        if counts and None not in counts:
            return max(1, min(counts))
        if name not in _FALLBACK_WARNED:
            _FALLBACK_WARNED.add(name)
            warnings.warn(f"dpo_fast: Triton {triton.__version__} {why} the compiled fused {name} kernel; its "
                          "vocabulary splits are sized for RESIDENT_PROGRAMS instead")
    return RESIDENT_PROGRAMS[name][element_size]


def _vocab_splits(kernel, name: str, n: int, vocab: int, block_n: int, element_size: int, device, requested,
                  args, kwargs) -> int:
    """Splits sized for the token block and compiled kernel that run (``_resident_programs`` of the launch
    ``kernel[grid](*args, **kwargs)``); each split at least 512 columns."""
    if requested is not None:
        return max(1, min(int(requested), vocab))
    block_v = _TOKEN_MAJOR[name][element_size][0][0]
    slots = _multiprocessors(device) * _resident_programs(kernel, name, element_size, device, args, kwargs)
    return splits_for_waves(triton.cdiv(max(n, 1), block_n), triton.cdiv(vocab, block_v), slots,
                            max_splits=min(64, triton.cdiv(vocab, 512)))


def _common(hidden, weight, bias, scale, softcap, inv_temperature):
    return dict(
        args=(hidden, hidden.stride(0), hidden.stride(1), weight, weight.stride(0), weight.stride(1),
              weight if bias is None else bias),
        consts=dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                    DOT_PRECISION=_dot_precision(hidden.dtype)),
        transform=(float(scale), float(softcap or 1.0), float(inv_temperature)),
    )


def forward_stats(hidden, weight, bias, labels, *, scale=1.0, softcap=None, inv_temperature=1.0,
                  num_splits=None):
    """Per-token statistics ``stats[NUM_STATS, n]`` (float32) of ``hidden @ weight.T + bias``.

    ``labels`` (int, [n]) must all lie in [0, V). ``num_splits`` vocabulary splits (None:
    from the device) only change the order of float32 sums, never the memory bound.
    """
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    if n == 0:
        return torch.empty(NUM_STATS, 0, dtype=torch.float32, device=hidden.device)
    block_n = token_block(hidden.element_size(), n)
    c = _common(hidden, weight, bias, scale, softcap, inv_temperature)
    consts = dict(BLOCK_N=block_n, **c["consts"])

    def arguments(partial, splits):
        return (*c["args"], labels, partial, n, vocab, hidden_size, splits, _token_bucket(n), *c["transform"])

    splits = _vocab_splits(_forward_kernel, "forward", n, vocab, block_n, hidden.element_size(), hidden.device,
                           num_splits, arguments(torch.float32, 2), consts)
    partial = torch.empty(splits, NUM_STATS, n, dtype=torch.float32, device=hidden.device)
    launch(_forward_kernel, (triton.cdiv(n, block_n), splits), *arguments(partial, splits), **consts)
    if splits == 1:
        return partial[0]
    stats = torch.empty(NUM_STATS, n, dtype=torch.float32, device=hidden.device)
    block = MERGE_BLOCK if not INTERPRETED else 64
    launch(_merge_splits_kernel, (triton.cdiv(n, block),), partial, stats, n, splits, BLOCK=block)
    return stats


def backward(hidden, weight, bias, labels, lse, grad_logp, *, entropy=None, grad_entropy=None, need_hidden=True,
             need_weight=True, need_bias=True, scale=1.0, softcap=None, inv_temperature=1.0, filter_eps=0.0,
             num_splits=None, workspace_bytes=DEFAULT_WORKSPACE_BYTES):
    """Gradients of ``sum(grad_logp * logp + grad_entropy * entropy)`` to (hidden, weight, bias).

    ``lse`` and ``entropy`` come from the forward statistics. Returns grad_hidden in hidden's
    dtype, grad_weight and grad_bias in weight's dtype (None where not needed), all summed
    in float32. ``filter_eps > 0`` skips a (tokens x vocabulary) tile whose every
    ``|d loss / d z|`` is below it: approximate, off by default.
    """
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    need_bias = need_bias and bias is not None
    device = hidden.device
    grad_logp = grad_logp.float().contiguous()
    has_entropy_grad = grad_entropy is not None
    grad_entropy = grad_entropy.float().contiguous() if has_entropy_grad else grad_logp
    entropy = entropy.float().contiguous() if has_entropy_grad else grad_logp
    lse = lse.double().contiguous()  # float64: see logsoftmax_gather.split_lse
    labels = labels.contiguous()
    # Contiguous outputs: the kernels address float32 rows as row * H.
    grad_hidden = torch.zeros(n, hidden_size, dtype=hidden.dtype, device=device) if need_hidden else None
    grad_weight = torch.zeros(vocab, hidden_size, dtype=weight.dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=bias.dtype, device=device) if need_bias else None
    if n == 0 or not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight, grad_bias
    c = _common(hidden, weight, bias, scale, softcap, inv_temperature)
    row_args = (labels, lse, grad_logp, entropy, grad_entropy)
    filter_on = filter_eps > 0
    consts = dict(c["consts"], HAS_ENTROPY_GRAD=has_entropy_grad, FILTER=filter_on)
    tail = (*c["transform"], float(filter_eps))

    if need_hidden:
        block_n = token_block(hidden.element_size(), n)
        hidden_consts = dict(BLOCK_N=block_n, **consts)

        def arguments(acc, splits):
            return (*c["args"], *row_args, acc, n, vocab, hidden_size, splits, _token_bucket(n), *tail)

        splits = _vocab_splits(_grad_hidden_kernel, "grad_hidden", n, vocab, block_n, hidden.element_size(), device,
                               num_splits, arguments(torch.float32, 2), hidden_consts)
        # Every split needs its own float32 rows; stay within the workspace (one split always runs).
        splits = max(1, min(splits, workspace_bytes // max(1, 4 * n * hidden_size)))
        direct = splits == 1 and hidden.dtype == torch.float32
        acc = grad_hidden if direct else torch.zeros(splits, n, hidden_size, dtype=torch.float32, device=device)
        launch(_grad_hidden_kernel, (triton.cdiv(n, block_n), splits), *arguments(acc, splits), **hidden_consts)
        if not direct:
            total = acc[0]
            for split in range(1, splits):  # fixed order: deterministic
                total += acc[split]
            grad_hidden.copy_(total)

    if need_weight or need_bias:
        # Unused outputs point at a throwaway buffer: the autotuner zeroes output arguments.
        unused = torch.zeros(1, dtype=torch.float32, device=device)
        bias_acc = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias else unused
        if not need_weight:
            scratch, group = unused, vocab
        elif weight.dtype == torch.float32:
            scratch, group = grad_weight, vocab
        else:
            # A float32 scratch for a group of vocabulary rows, not a V x H float32 copy.
            group = max(256, workspace_bytes // (4 * hidden_size))
            group = min(vocab, group - group % 256)
            scratch = torch.empty(group, hidden_size, dtype=torch.float32, device=device)
        for v0 in range(0, vocab, group):
            v1 = min(vocab, v0 + group)
            if need_weight and scratch is not grad_weight:
                scratch.zero_()
            grid = lambda meta: (triton.cdiv(v1 - v0, meta["BLOCK_V"]),)  # noqa: E731
            launch(_grad_weight_kernel, grid, *c["args"], *row_args, scratch, bias_acc, n, vocab, hidden_size, v0,
                   v1, _token_bucket(n), *tail, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, **consts)
            if need_weight and scratch is not grad_weight:
                grad_weight[v0:v1].copy_(scratch[: v1 - v0])
        if need_bias:
            grad_bias.copy_(bias_acc)
    return grad_hidden, grad_weight, grad_bias
