"""Which route a hidden-state call takes, and its tile sizes, chosen once within ``memory_budget``.

Every candidate route is priced by ``cost_model`` (paper time on the card, memory of
every buffer it allocates) and the fastest one whose memory fits the budget wins:

- **whole pairs, one chunk** (6NHV): every pair's logits in one float32 workspace;
- **whole pairs, several chunks** (6NHV): chunks of whole pairs; grad_weight of a 16-bit
  head summed across chunks in one float32 ``[V, H]`` accumulator, cast once; a pair larger
  than a chunk runs in pieces whose unit gradients wait in two more float32 ``[V, H]``
  buffers until the pair's loss gives their scale;
- **two-pass** (8NHV): per-token statistics forward, recomputed tiles backward; always fits.

Budget floor: no tile is smaller than ``MIN_TILE_TOKENS`` tokens by ``MIN_VOCAB_BLOCK``
vocabulary rows (or the whole dimension when smaller), whatever the budget: a budget below
that runs those tiles (about 16 KiB of float32 logits) rather than 1 x 1 GEMMs.
"""

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import cost_model as cm

MIN_TILE_TOKENS = 16
MIN_VOCAB_BLOCK = 128
# Longest whole-pair chunk (tokens) when several chunks are needed anyway: at 2048 rows the
# float32 accumulate of grad_weight (2048 FLOPs per byte of [V, H] traffic) is compute-bound
# on every card in cost_model.CARDS, so longer chunks only cost memory.
MAX_CHUNK_TOKENS = 2048
CPU_MEMORY_BUDGET = 512 * 2**20
# batch_invariant=True: every forward logits GEMM is [INVARIANT_TOKEN_TILE x INVARIANT_VOCAB_BLOCK] (the
# last token tile padded with zero rows; the last vocabulary block is as long as V leaves it, the same
# on every call), whatever the number of tokens and the memory budget, so no row's reduction order
# depends on what else is in the batch. 256 rows keep a bf16 GEMM near the FLOP-per-byte balance of the
# cards in cost_model.CARDS (each token tile re-reads its weight block); the float32 tile is 8 MiB.
INVARIANT_TOKEN_TILE = 256
INVARIANT_VOCAB_BLOCK = 8192
GPU_MEMORY_FRACTION = 10  # default budget: a tenth of the card (8 GB of an 80 GB card)


@functools.lru_cache(maxsize=None)
def _device_memory(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).total_memory


def default_memory_budget(device: torch.device) -> int:
    """``memory_budget=None``: a tenth of a CUDA device's memory, 512 MiB elsewhere."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _device_memory(index) // GPU_MEMORY_FRACTION
    return CPU_MEMORY_BUDGET


@functools.lru_cache(maxsize=None)
def float32_gemm_out(device_type: str) -> bool:
    """Whether cuBLAS writes float32 straight from 16-bit operands here (``torch.mm(..., out_dtype=)``,
    torch >= 2.8 on CUDA). Checked once; elsewhere the operands are staged to float32 a slab at a time."""
    if device_type != "cuda":
        return False
    supported = hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")
    if not supported:
        import warnings

        warnings.warn(f"torch {torch.__version__} has no mm(out_dtype=float32): 16-bit logits tiles are "
                      "staged through float32 copies (slower); torch >= 2.8 avoids this", stacklevel=3)
    return supported


# ----------------------------------------------------------------------------------------
# two-pass tiles
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TilePlan:
    token_chunk: int
    vocab_block: int


def bytes_per_logit(element_size: int, with_gradient: bool, staged: bool = False) -> int:
    """Workspace bytes per tile element: the float32 logits, a 16-bit gradient tile beside them
    for 16-bit inputs, and (``staged``: no float32-output GEMM) a float32 copy of that tile."""
    separate = cm.gradient_tile_bytes(element_size) if with_gradient else 0
    return cm.LOGIT_BYTES + separate + (4 if staged and separate else 0)


def plan_tiles(num_tokens: int, vocab: int, hidden_size: int, element_size: int, memory_budget: int,
               weight_grad: bool, staged_hidden: int = 0) -> TilePlan:
    """Largest tiles that keep the workspace (and the float32 weight-gradient block) in budget.

    ``element_size`` is the workspace's bytes per logit (:func:`bytes_per_logit`);
    ``staged_hidden`` the bytes per weight row of float32 copies (``4 * H`` on CPU for
    16-bit inputs, else 0). Tiles never go below the floor in the module docstring.
    """
    tile_budget = memory_budget // 2 if weight_grad else memory_budget
    vocab_block = vocab
    row_bytes = (4 * hidden_size if weight_grad else 0) + staged_hidden
    if row_bytes:  # a float32 [vocab_block, H] accumulator (and staging) take the other half
        vocab_block = min(vocab, max(1, (memory_budget // 2) // row_bytes))
    # Leave room for at least a few dozen tokens per tile so the GEMMs stay efficient.
    vocab_block = min(vocab_block, max(1, tile_budget // (element_size * min(max(num_tokens, 1), 64))))
    if vocab_block < vocab and vocab_block >= 256:
        vocab_block -= vocab_block % 256
    vocab_block = max(vocab_block, min(vocab, MIN_VOCAB_BLOCK))
    token_chunk = max(1, min(max(num_tokens, 1), tile_budget // (element_size * vocab_block)))
    token_chunk = max(token_chunk, min(max(num_tokens, 1), MIN_TILE_TOKENS))
    return TilePlan(token_chunk=token_chunk, vocab_block=vocab_block)


def invariant_tiles(vocab: int) -> TilePlan:
    """The batch-invariant forward's tiles: fixed, from the vocabulary size alone."""
    return TilePlan(token_chunk=INVARIANT_TOKEN_TILE, vocab_block=min(vocab, INVARIANT_VOCAB_BLOCK))


def engine_tiles(num_tokens: int, vocab: int, hidden_size: int, input_dtype: torch.dtype, device_type: str,
                 memory_budget: int, backward: bool, weight_grad: bool) -> TilePlan:
    """Tiles of the two-pass engine for these inputs on this device."""
    e = input_dtype.itemsize
    staged = e < 4 and not float32_gemm_out(device_type)
    return plan_tiles(num_tokens, vocab, hidden_size, bytes_per_logit(e, backward, staged), memory_budget,
                      weight_grad, staged_hidden=4 * hidden_size if staged else 0)


# ----------------------------------------------------------------------------------------
# the loss: whole pairs or two-pass
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """Pairs ``[first, last)`` whose logits are computed together; ``piece_tokens`` > 0: one pair too
    large for a chunk, run in pieces of at most that many tokens."""

    first: int
    last: int
    piece_tokens: int = 0

    @property
    def split(self) -> bool:
        return self.piece_tokens > 0


@dataclass(frozen=True)
class Plan:
    route: str  # "whole-pairs" or "two-pass"
    cost: cm.Cost
    chunks: Tuple[Chunk, ...] = ()
    accumulate: bool = False  # grad_weight of a 16-bit head summed in a float32 [V, H] buffer


def _group_pairs(pair_tokens: Sequence[int], limit: int) -> List[Chunk]:
    """Consecutive pairs into chunks of at most ``limit`` tokens; a larger pair becomes a split chunk."""
    chunks, first, used = [], 0, 0
    for p, tokens in enumerate(pair_tokens):
        if tokens > limit:
            if p > first:
                chunks.append(Chunk(first, p))
            chunks.append(Chunk(p, p + 1, piece_tokens=limit))
            first, used = p + 1, 0
            continue
        if used + tokens > limit and p > first:
            chunks.append(Chunk(first, p))
            first, used = p, 0
        used += tokens
    if first < len(pair_tokens):
        chunks.append(Chunk(first, len(pair_tokens)))
    return chunks


def _whole_pair_cost(shape: cm.Shape, pair_tokens, chunks: List[Chunk], limit: int, staged: bool, card) -> cm.Cost:
    split = [c for c in chunks if c.split]
    rounds = sum(math.ceil(pair_tokens[c.first] / c.piece_tokens) if c.split else 1 for c in chunks)
    first_split = next((i for i, c in enumerate(chunks) if c.split), None)
    largest = max((sum(pair_tokens[c.first:c.last]) for c in chunks if not c.split), default=0)
    tile = min(max(largest, limit if split else 0), shape.tokens)
    return cm.whole_pairs(shape, tile, rounds, split_pairs=len(split),
                          split_tokens=max((pair_tokens[c.first] for c in split), default=0),
                          accumulator_before_split=bool(first_split) or len(split) > 1,
                          card=card, float32_gemm_out=not staged)


def plan_loss(pair_tokens: Sequence[int], vocab: int, hidden_size: int, input_dtype: torch.dtype,
              trainable_head: bool, memory_budget: int, device_type: str = "cuda", whole_pairs: bool = True,
              card: cm.Card = cm.DEFAULT_CARD, batch_invariant: bool = False) -> Plan:
    """The fastest route for a loss over pairs of ``pair_tokens`` kept tokens each (chosen + rejected).

    ``whole_pairs=False`` (not pair-local, no gradient, a vocabulary-parallel head...) leaves
    the two-pass route only. ``batch_invariant=True`` takes the two-pass route with the fixed-tile
    forward (:func:`invariant_tiles`): the whole-pair route's GEMMs are shaped by the chunk.
    """
    e = input_dtype.itemsize
    staged = e < 4 and not float32_gemm_out(device_type)
    n = int(sum(pair_tokens))
    shape = cm.Shape(max(n, 1), hidden_size, vocab, e, trainable_head)
    tiles = engine_tiles(n, vocab, hidden_size, input_dtype, device_type, memory_budget, True, trainable_head)
    two_pass = Plan("two-pass", cm.two_pass(shape, tiles.token_chunk, tiles.vocab_block, card,
                                            float32_gemm_out=not staged))
    if batch_invariant:
        fixed = invariant_tiles(vocab)
        return Plan("two-pass", cm.batch_invariant_two_pass(shape, fixed.token_chunk, fixed.vocab_block,
                                                            tiles.token_chunk, tiles.vocab_block, card,
                                                            float32_gemm_out=not staged))
    if not whole_pairs or n == 0 or not pair_tokens:
        return two_pass
    candidates = [two_pass]
    one = [Chunk(0, len(pair_tokens))]
    cost = _whole_pair_cost(shape, pair_tokens, one, n, staged, card)
    if cost.memory_bytes <= memory_budget:
        candidates.append(Plan("whole-pairs", cost, tuple(one), accumulate=False))
    else:
        for limit in _chunk_limits(shape, pair_tokens, memory_budget, staged, card):
            chunks = _group_pairs(pair_tokens, limit)
            cost = _whole_pair_cost(shape, pair_tokens, chunks, limit, staged, card)
            candidates.append(Plan("whole-pairs", cost, tuple(chunks), accumulate=trainable_head and e < 4))
    fitting = [p for p in candidates if p.cost.memory_bytes <= memory_budget] or [two_pass]
    return min(fitting, key=lambda p: (p.cost.seconds(card), p.route != "whole-pairs"))


def _largest_fitting(fits, low: int, high: int) -> int:
    """Largest limit in [low, high] with fits(limit), for fits monotone (true then false); 0 if none."""
    if high < low or not fits(low):
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _chunk_limits(shape: cm.Shape, pair_tokens, memory_budget: int, staged: bool, card) -> List[int]:
    """Chunk sizes worth pricing: the largest that splits no pair, and the largest that splits some.

    Within each regime memory grows with the chunk (the tile), so each is found by bisection;
    across them it does not (splitting adds float32 [V, H] buffers), hence two searches.
    """
    def fits(limit):
        chunks = _group_pairs(pair_tokens, limit)
        return _whole_pair_cost(shape, pair_tokens, chunks, limit, staged, card).memory_bytes <= memory_budget

    longest = max(pair_tokens)
    whole = _largest_fitting(fits, max(longest, MIN_TILE_TOKENS), max(longest, min(MAX_CHUNK_TOKENS, shape.tokens)))
    split = _largest_fitting(fits, MIN_TILE_TOKENS, min(longest - 1, MAX_CHUNK_TOKENS))
    return [limit for limit in (whole, split) if limit]


def choose_impl(impl: str, device: torch.device, triton_available: bool, why_not: Optional[str] = None) -> str:
    """'auto' -> 'chunked' where Triton runs, else 'torch'. ``why_not``: why Triton cannot run here, for the error.

    Both take the routes of :func:`plan_loss`; 'fused' (no logits in memory forward, priced by
    ``cost_model.fused_forward_tiled_backward``) costs 8NHV with a trainable head, never less
    than the whole-pair route, so 'auto' picks it only on request.
    """
    if impl == "auto":
        return "chunked" if triton_available else "torch"
    if impl in ("chunked", "fused") and not triton_available:
        why = f" ({why_not})" if why_not else ""
        raise ValueError(f"impl={impl!r} needs Triton on a CUDA device (or TRITON_INTERPRET=1 for CPU tensors); "
                         f"got a tensor on {device}{why}: use impl='torch' or 'auto'")
    return impl
