"""FLOPs, HBM bytes and memory of every route, from the shapes, the dtype and a card's peak numbers.

Nothing here touches a tensor: the planner (``planner.py``) asks it what a route would
cost before choosing one, and ``python -m benchmarks plan`` prints the same numbers for
the benchmark shapes beside those of naive PyTorch and the peers.

Time on paper: every GEMM runs at ``max(FLOPs / peak, bytes / bandwidth)`` (a GEMM whose
float32 output is read and written back, as an accumulating ``addmm``, turns
memory-bound once its inner dimension falls below the card's FLOP-per-byte balance);
the row passes over logits tiles are memory-bound (``bytes / bandwidth``); phases do not
overlap. The floor is 6NHV at peak: the three GEMMs any exact method runs.

Words: N kept tokens, H hidden size, V vocabulary rows, ``e`` bytes per input element.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

# Logits tiles are float32 whatever the inputs (see chunked.logits_dtype): 4 bytes per logit,
# plus a 16-bit gradient tile beside them when the inputs are 16-bit.
LOGIT_BYTES = 4
STATS_BYTES_PER_TOKEN = 7 * 4 + 6 * 4 + 8  # NUM_STATS float32 rows, finished outputs, labels


@dataclass(frozen=True)
class Card:
    name: str
    tflops: float  # dense bf16/fp16 GEMM, TFLOP/s
    tbps: float  # HBM bandwidth, TB/s
    memory_gb: float
    source: str  # where the two numbers come from


CARDS = {
    "H100": Card("H100 SXM 80GB", 800.0, 3.35, 80.0,
                 "GEMM: ~800 TFLOP/s reached by an 8192^3 bf16 matmul (reported by others, not measured here; "
                 "datasheet 989); HBM: datasheet"),
    "H200": Card("H200 141GB", 788.0, 4.8, 141.0,
                 "GEMM: 788 TFLOP/s measured (8192^3 bf16 matmul, 2026-10); HBM: datasheet (copy measured 4.3)"),
    "A100": Card("A100 SXM 80GB", 312.0, 2.0, 80.0, "both datasheet"),
}
DEFAULT_CARD = CARDS["H100"]


@dataclass(frozen=True)
class Shape:
    tokens: int  # N kept tokens
    hidden: int  # H
    vocab: int  # V
    element_size: int = 2  # bytes per hidden/weight element
    trainable_head: bool = True

    @property
    def nv(self) -> int:
        return self.tokens * self.vocab

    @property
    def vh(self) -> int:
        return self.vocab * self.hidden

    @property
    def nh(self) -> int:
        return self.tokens * self.hidden

    def floor_flops(self) -> float:
        """6NHV with a trainable head (logits, grad_hidden, grad_weight), 4NHV frozen."""
        return 2.0 * self.nv * self.hidden * (3 if self.trainable_head else 2)


@dataclass(frozen=True)
class Cost:
    """What one forward+backward of the loss costs on paper."""

    route: str
    flops: float
    gemm_s: float  # GEMM time at max(compute, memory) each
    row_bytes: float  # HBM bytes of the non-GEMM passes
    hbm_bytes: float  # every byte, GEMMs included
    memory_bytes: float  # loss-attributable memory: beyond the inputs and the returned gradients
    exact: bool = True
    note: str = ""

    def seconds(self, card: Card = DEFAULT_CARD) -> float:
        return self.gemm_s + self.row_bytes / (card.tbps * 1e12)

    def bound(self, shape: Shape, card: Card = DEFAULT_CARD) -> float:
        """Paper time as a multiple of the floor (6NHV at peak)."""
        return self.seconds(card) / (shape.floor_flops() / (card.tflops * 1e12))


def gemm_time(m: int, n: int, k: int, element_size: int, out_bytes: int, accumulate: bool, card: Card) -> float:
    """Seconds of one [m, k] x [k, n] GEMM: the slower of its FLOPs and its operand/result traffic."""
    flops = 2.0 * m * n * k
    traffic = (m * k + k * n) * element_size + m * n * out_bytes * (2 if accumulate else 1)
    return max(flops / (card.tflops * 1e12), traffic / (card.tbps * 1e12))


def gemm_bytes(m: int, n: int, k: int, element_size: int, out_bytes: int, accumulate: bool) -> float:
    return (m * k + k * n) * element_size + m * n * out_bytes * (2 if accumulate else 1)


def gradient_tile_bytes(element_size: int) -> int:
    """Bytes per logit of the separate 16-bit gradient tile (0 for float32 inputs: in place)."""
    return element_size if element_size < LOGIT_BYTES else 0


def weight_accumulators(element_size: int, trainable_head: bool, chunks: int, split_pairs: int,
                        accumulator_before_split: bool) -> int:
    """float32 [V, H] buffers alive at once on the whole-pair route.

    One chunk writes grad_weight with a single GEMM (float32 inside cuBLAS): none. Several
    chunks of a 16-bit head add into one float32 accumulator (a float32 head adds into
    grad_weight itself). A pair split into pieces keeps its chosen and rejected unit
    gradients apart until the pair's loss gives their scales: two more.
    """
    if not trainable_head:
        return 0
    main = 1 if (chunks > 1 or split_pairs) and element_size < 4 else 0
    if not split_pairs:
        return main
    return 2 + (main if accumulator_before_split else 0)


def whole_pairs(shape: Shape, chunk_tokens: int, chunks: int, split_pairs: int = 0, split_tokens: int = 0,
                accumulator_before_split: bool = False, card: Card = DEFAULT_CARD,
                float32_gemm_out: bool = True) -> Cost:
    """Whole pairs per chunk (6NHV): logits of at most ``chunk_tokens`` x V once, gradients in the chunk.

    ``chunks``: GEMM rounds (chunks of whole pairs plus pieces of split pairs). ``split_pairs``
    pairs larger than a chunk run as pieces whose unit gradients are scaled when the pair
    closes; ``split_tokens`` (tokens of the largest) sizes their waiting float32 grad_hidden rows.
    """
    N, H, V, e = shape.tokens, shape.hidden, shape.vocab, shape.element_size
    tile = gradient_tile_bytes(e) or LOGIT_BYTES  # what the gradient GEMMs read
    accumulators = weight_accumulators(e, shape.trainable_head, chunks, split_pairs, accumulator_before_split)
    accumulate = shape.trainable_head and (chunks > 1 or split_pairs > 0)
    t = max(1, min(chunk_tokens, N))
    rounds = N / t
    gemm_s = rounds * (gemm_time(t, V, H, e, LOGIT_BYTES, False, card)
                       + gemm_time(t, H, V, tile, 4 if split_pairs else e, False, card))
    hbm = rounds * (gemm_bytes(t, V, H, e, LOGIT_BYTES, False) + gemm_bytes(t, H, V, tile, e, False))
    if shape.trainable_head:
        out = 4 if accumulate else e
        gemm_s += rounds * gemm_time(V, H, t, tile, out, accumulate, card)
        hbm += rounds * gemm_bytes(V, H, t, tile, out, accumulate)
    # Row passes: the stats pass reads the float32 tile; the gradient pass reads it and writes the gradient tile.
    row_bytes = shape.nv * (LOGIT_BYTES + LOGIT_BYTES + tile)
    if split_pairs:  # A *= g_c; A += g_r B (20 VH bytes); then into the running sum (12 VH) unless it is the first
        added = split_pairs - (0 if accumulator_before_split else 1)
        row_bytes += (20 * split_pairs + 12 * added) * shape.vh
    if accumulators and e < 4:  # the float32 accumulator cast to the head's dtype once
        row_bytes += (4 + e) * shape.vh
    memory = (t * V * (LOGIT_BYTES + gradient_tile_bytes(e))  # logits tile and gradient tile
              + t * H * e  # the chunk's hidden rows, gathered
              + accumulators * 4 * shape.vh
              + (4 * split_tokens * H if split_pairs else 0)
              + STATS_BYTES_PER_TOKEN * N)
    if not float32_gemm_out and e < 4:
        memory += staging_bytes(t, H, V)
    if chunks == 1 and not split_pairs:
        route = "whole pairs, 1 chunk"
    else:
        route = f"whole pairs, {chunks} chunks" + (f" ({split_pairs} pair split)" if split_pairs else "")
        route += f", {accumulators} fp32 [V,H]" if accumulators else ""
    return Cost(route, shape.floor_flops(), gemm_s, row_bytes, hbm + row_bytes, memory)


# Float32 staging of 16-bit GEMM operands where cuBLAS cannot write float32 from them (CPU): a slab at a time.
COPY_SLAB_BYTES = 1 << 20


def staging_bytes(tokens: int, hidden: int, vocab: int) -> int:
    """float32 copies of 16-bit operands alive at once without float32-output GEMMs (chunked.mm_float32,
    chunked.addmm_fp32): the token rows, and a slab of weight rows or of the gradient tile."""
    return 4 * tokens * hidden + min(COPY_SLAB_BYTES, 4 * vocab * max(hidden, tokens))


def two_pass(shape: Shape, token_chunk: int, vocab_block: int, card: Card = DEFAULT_CARD,
             float32_gemm_out: bool = True) -> Cost:
    """Forward folds tiles into per-token statistics (2NHV); backward recomputes them (6NHV more)."""
    N, H, V, e = shape.tokens, shape.hidden, shape.vocab, shape.element_size
    g = gradient_tile_bytes(e)
    token_blocks = math.ceil(N / max(token_chunk, 1))
    vocab_blocks = math.ceil(V / max(vocab_block, 1))
    tiles = token_blocks * vocab_blocks
    t, vb = min(token_chunk, N), min(vocab_block, V)
    logits = tiles * gemm_time(t, vb, H, e, LOGIT_BYTES, False, card)
    gemm_s = 2 * logits
    hbm = 2 * tiles * gemm_bytes(t, vb, H, e, LOGIT_BYTES, False)
    # grad_hidden: float32 rows [t, H] read and written once per vocabulary block.
    gemm_s += tiles * gemm_time(t, H, vb, g or LOGIT_BYTES, 4, True, card)
    hbm += tiles * gemm_bytes(t, H, vb, g or LOGIT_BYTES, 4, True)
    if shape.trainable_head:
        gemm_s += tiles * gemm_time(vb, H, t, g or LOGIT_BYTES, 4, True, card)
        hbm += tiles * gemm_bytes(vb, H, t, g or LOGIT_BYTES, 4, True)
    row_bytes = shape.nv * (LOGIT_BYTES + LOGIT_BYTES + (g or LOGIT_BYTES))
    flops = 2.0 * shape.nv * H * (4 if shape.trainable_head else 3)
    memory = (t * vb * (LOGIT_BYTES + g) + (4 * vb * H if shape.trainable_head else 0)
              + 4 * shape.nh + STATS_BYTES_PER_TOKEN * N)
    if not float32_gemm_out and e < 4:
        memory += staging_bytes(t, H, vb)
    return Cost("two-pass", flops, gemm_s, row_bytes, hbm + row_bytes, memory)


def batch_invariant_two_pass(shape: Shape, tile_tokens: int, tile_vocab: int, token_chunk: int, vocab_block: int,
                             card: Card = DEFAULT_CARD, float32_gemm_out: bool = True) -> Cost:
    """Two-pass whose forward is batch-invariant: every logits GEMM is [tile_tokens x tile_vocab],
    the last token tile padded with zero rows, whatever N and the budget (planner.invariant_tiles).

    Against :func:`two_pass` at the budget's tiles: the padding (< tile_tokens rows of 2HV FLOPs),
    the weight re-read once per token tile (V H e bytes per tile_tokens tokens), the padded token
    tile copied once per tile; the backward is two-pass's (its gradients are not batch-invariant).
    """
    base = two_pass(shape, token_chunk, vocab_block, card, float32_gemm_out)
    N, H, V, e = shape.tokens, shape.hidden, shape.vocab, shape.element_size
    t, vb = min(token_chunk, N), min(vocab_block, V)
    budget_tiles = math.ceil(N / max(t, 1)) * math.ceil(V / max(vb, 1))
    forward_s = budget_tiles * gemm_time(t, vb, H, e, LOGIT_BYTES, False, card)
    forward_bytes = budget_tiles * gemm_bytes(t, vb, H, e, LOGIT_BYTES, False)
    token_tiles = math.ceil(N / tile_tokens)
    padded = token_tiles * tile_tokens
    vocab_tiles = math.ceil(V / tile_vocab)
    fixed_s = token_tiles * vocab_tiles * gemm_time(tile_tokens, tile_vocab, H, e, LOGIT_BYTES, False, card)
    fixed_bytes = token_tiles * vocab_tiles * gemm_bytes(tile_tokens, tile_vocab, H, e, LOGIT_BYTES, False)
    copies = 2 * padded * H * e  # each token tile copied into the fixed-shape buffer
    extra_rows = (padded - N) * V * LOGIT_BYTES * 2  # the padding's logits, written and read by the rows
    memory = max(base.memory_bytes, base.memory_bytes - t * vb * (LOGIT_BYTES + gradient_tile_bytes(e))
                 + tile_tokens * tile_vocab * LOGIT_BYTES + tile_tokens * (H * e + STATS_BYTES_PER_TOKEN))
    return Cost("two-pass, batch-invariant forward", base.flops + 2.0 * (padded - N) * H * V,
                base.gemm_s - forward_s + fixed_s, base.row_bytes + extra_rows + copies,
                base.hbm_bytes - forward_bytes + fixed_bytes + extra_rows + copies, memory)


def fused_forward_tiled_backward(shape: Shape, token_chunk: int, vocab_block: int,
                                 card: Card = DEFAULT_CARD) -> Cost:
    """impl='fused' rebuilt: a forward with no logits in memory (2NHV, operand bytes only), then the
    two-pass backward (recomputed tiles, cuBLAS gradient GEMMs): 8NHV with a trainable head."""
    back = two_pass(shape, token_chunk, vocab_block, card)
    N, H, V, e = shape.tokens, shape.hidden, shape.vocab, shape.element_size
    t, vb = min(token_chunk, N), min(vocab_block, V)
    tiles = math.ceil(N / max(t, 1)) * math.ceil(V / max(vb, 1))
    tiled_forward_s = tiles * gemm_time(t, vb, H, e, LOGIT_BYTES, False, card)
    tiled_forward_bytes = tiles * gemm_bytes(t, vb, H, e, LOGIT_BYTES, False) + shape.nv * LOGIT_BYTES
    fused_bytes = (shape.nh + shape.vh) * e
    fused_s = max(2.0 * shape.nv * H / (card.tflops * 1e12), fused_bytes / (card.tbps * 1e12))
    return Cost("fused fwd + tiled bwd", back.flops, back.gemm_s - tiled_forward_s + fused_s,
                back.row_bytes - shape.nv * LOGIT_BYTES, back.hbm_bytes - tiled_forward_bytes + fused_bytes,
                back.memory_bytes)


def fully_fused(shape: Shape, block: int = 128, card: Card = DEFAULT_CARD, accumulate_bytes: int = 4,
                name: str = "fully fused", exact: bool = True) -> Cost:
    """tl.dot tiles never leave registers; backward recomputes logits and reads and writes the
    gradient rows of grad_hidden and grad_weight (``accumulate_bytes`` each) once per tile:
    about N*V*H/block * 4 * accumulate_bytes bytes (16 for float32 at block 128)."""
    N, H, e = shape.tokens, shape.hidden, shape.element_size
    flops = 2.0 * shape.nv * H * (4 if shape.trainable_head else 3)
    sides = 2 if shape.trainable_head else 1
    rmw = shape.nv * H / block * 2 * accumulate_bytes * sides
    operands = 3 * (shape.nh + shape.vh) * e
    seconds = max(flops / (card.tflops * 1e12), (rmw + operands) / (card.tbps * 1e12))
    return Cost(name, flops, seconds, 0.0, rmw + operands, STATS_BYTES_PER_TOKEN * N
                + (4 * (shape.nh + shape.vh) if accumulate_bytes == 4 and e < 4 else 0), exact)


def fused_backward_wins(tokens: int, hidden: int, vocab: int, element_size: int, logits_bytes: int, *,
                        block_n: int, block_v: int, need_hidden: bool = True, need_weight: bool = True,
                        need_bias: bool = False, kept_fraction: float = 1.0, card: Card = DEFAULT_CARD) -> bool:
    """Whether impl='fused' should keep its fully fused backward rather than the tiled one (``fused.py``).

    Time in FLOP-equivalents: GEMM FLOPs plus HBM bytes times the card's FLOP-per-byte balance.
    Fused: a recomputing kernel per gradient kind, and each product added into float32 rows it
    owns in HBM, read and written once per tile (8 H bytes per token x vocabulary tile for
    grad_hidden, per vocabulary row x token block for grad_weight); ``kept_fraction`` of the
    tiles survive gradient filtering. Tiled: one recompute, then the logits tile written, rewritten
    by the row kernel as its gradient and read by each consumer. Operand reads are alike and left out.
    """
    gradients = int(need_hidden) + int(need_weight)
    if gradients == 0 and not need_bias:
        return False
    balance = card.tflops / card.tbps  # FLOP per byte (both in units of 1e12)
    nhv = float(tokens) * hidden * vocab
    kernel_runs = int(need_hidden) + int(need_weight or need_bias)
    product_bytes = 8.0 * nhv * (need_hidden / block_v + need_weight / block_n)
    fused = 2 * kernel_runs * nhv + kept_fraction * (2 * gradients * nhv + balance * product_bytes)
    tile_bytes = float(tokens) * vocab * (2 * logits_bytes + element_size * (1 + gradients + int(need_bias)))
    tiled = (2 + 2 * gradients) * nhv + balance * tile_bytes
    return fused < tiled


# ----------------------------------------------------------------------------------------
# naive PyTorch and the peers, on paper
# ----------------------------------------------------------------------------------------

def naive(shape: Shape, card: Card = DEFAULT_CARD) -> Cost:
    """Eager: 16-bit logits [N, V], their float32 upcast, log_softmax (saved), gather; backward
    allocates the float32 gradient of log_softmax's output and input and casts it to 16 bits.
    Peak ~ 2 + 4 + 4 (forward) and 4 + 4 + 4 (backward, saved output included): 12 bytes per logit."""
    N, H, V, e = shape.tokens, shape.hidden, shape.vocab, shape.element_size
    gemm_s = (gemm_time(N, V, H, e, e, False, card) + gemm_time(N, H, V, e, e, False, card)
              + (gemm_time(V, H, N, e, e, False, card) if shape.trainable_head else 0))
    row_bytes = shape.nv * (2 * e + 4 + 3 * 4 + 4 + 4 * 3 + 4 + e)  # upcast, log_softmax, gather, backward, cast
    return Cost("naive PyTorch", shape.floor_flops(), gemm_s, row_bytes, row_bytes, 12.0 * shape.nv)


def trl_chunked(shape: Shape, chunk_tokens: int = 4096, chunk_vocab: int = 32768, card: Card = DEFAULT_CARD) -> Cost:
    """TRL 1.16 ChunkedLogProbFunction: two-pass (8NHV) over 16-bit tiles with a float32 [V, H]
    grad_weight accumulator and float32 [N, H] grad_hidden."""
    base = two_pass(shape, chunk_tokens, chunk_vocab, card)
    e = shape.element_size
    memory = (chunk_tokens * chunk_vocab * (e + 4) + 4 * shape.nh
              + (4 * shape.vh if shape.trainable_head else 0) + STATS_BYTES_PER_TOKEN * shape.tokens)
    return Cost("TRL 1.16 chunked", base.flops, base.gemm_s, base.row_bytes, base.hbm_bytes, memory)


def liger(shape: Shape, pair_tokens: int, card: Card = DEFAULT_CARD) -> Cost:
    """Liger LigerFusedLinearDPOLoss: one pair per chunk, float32 [2T, V] logits and their gradient
    (at least 8 bytes per logit of the chunk), grads formed in forward (6NHV) plus the reference
    forward it recomputes (2NHV); grad_weight summed in the head's dtype (not exact for bf16)."""
    N, H, V = shape.tokens, shape.hidden, shape.vocab
    chunks = max(1, N // max(pair_tokens, 1))
    per = whole_pairs(Shape(pair_tokens, H, V, shape.element_size, shape.trainable_head), pair_tokens, 1, card=card)
    gemm_s = per.gemm_s * chunks * 4 / 3
    memory = 8.0 * pair_tokens * V + STATS_BYTES_PER_TOKEN * N
    return Cost("Liger DPO", shape.floor_flops() * 4 / 3, gemm_s, per.row_bytes * chunks, per.hbm_bytes * chunks,
                memory, exact=shape.element_size == 4,
                note="bf16 grad_weight summed across pairs; recomputes reference logits")


def cce_exact(shape: Shape, card: Card = DEFAULT_CARD) -> Cost:
    """Cut Cross-Entropy, filter_eps=None: fully fused, 16-bit gradient rows under locks."""
    return fully_fused(shape, 128, card, accumulate_bytes=shape.element_size, name="CCE exact",
                       exact=shape.element_size == 4)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def describe(cost: Cost, shape: Shape, card: Card = DEFAULT_CARD, naive_cost: Optional[Cost] = None) -> dict:
    naive_cost = naive_cost or naive(shape, card)
    return dict(route=cost.route, flops_over_6nhv=cost.flops / (2.0 * shape.nv * shape.hidden * 3),
                hbm_gb=cost.hbm_bytes / 1e9, memory_gb=cost.memory_bytes / 1e9,
                memory_vs_naive=cost.memory_bytes / naive_cost.memory_bytes, bound=cost.bound(shape, card),
                exact=cost.exact)
