"""Which route a hidden-state call takes, and its tile sizes, chosen once within ``memory_budget``.

Every candidate route is priced by ``cost_model`` (paper time on the card, memory of
every buffer it allocates) and the fastest one whose memory fits the budget wins:

- **whole pairs, one chunk** (6NHV): every pair's logits in one float32 workspace;
- **whole pairs, several chunks** (6NHV): chunks of whole pairs; grad_weight of a 16-bit
  head summed across chunks in one float32 ``[V, H]`` accumulator, cast once; a pair larger
  than a chunk runs in pieces whose unit gradients wait in two more float32 ``[V, H]``
  buffers until the pair's loss gives their scale, or in one where the loss depends on the
  pair only through one weighted margin (``losses.rejected_gradient_ratio``: the rejected
  side is summed into the chosen side's buffer times the known ratio of their gradients);
  or, where it fits, with its gradient kept whole (``Chunk.keep_gradient``: a ``[tokens, V]``
  gradient buffer in the input dtype instead of the ``[V, H]`` units, its gradient GEMMs run
  once the loss is known, so no unit sum, merge or separate cast);
- **two-pass** (8NHV): per-token statistics forward, recomputed tiles backward; always fits.

Budget floor: no tile is smaller than ``MIN_TILE_TOKENS`` tokens by ``MIN_VOCAB_BLOCK``
vocabulary rows (or the whole dimension when smaller), whatever the budget: a budget below
that runs those tiles (about 16 KiB of float32 logits) rather than 1 x 1 GEMMs.
"""

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import cost_model as cm
from .gemm import float32_gemm_out

MIN_TILE_TOKENS = 16
MIN_VOCAB_BLOCK = 128
# Longest whole-pair chunk (tokens) when several chunks are needed anyway: at 2048 rows the
# float32 accumulate of grad_weight (2048 FLOPs per byte of [V, H] traffic) is compute-bound
# on every card in cost_model.CARDS, so longer chunks only cost memory.
MAX_CHUNK_TOKENS = 2048
CPU_MEMORY_BUDGET = 512 * 2**20
# CUDA defaults. DPO (the whole-pair route gets faster with memory up to one chunk of every pair):
# a quarter of the memory free when the call starts (what the driver reports free plus what
# PyTorch's caching allocator holds unused), at most DPO_BUDGET_CAP. Per-token work (token_logps,
# sequence_logps, the TRL drop-in, two-pass DPO) gains nothing from larger tiles once a GEMM
# tile holds a few thousand tokens: PER_TOKEN_BUDGET, whatever the card (at V=152k about 1,700
# tokens of float32 forward tile; backward half tile, half float32 weight block).
DPO_FREE_FRACTION = 4
DPO_BUDGET_CAP = 8 * 2**30
PER_TOKEN_BUDGET = 2**30

# batch_invariant=True: every forward logits GEMM is [INVARIANT_TOKEN_TILE x INVARIANT_VOCAB_BLOCK] (the
# last token tile padded with zero rows; the last vocabulary block is as long as V leaves it, the same
# on every call), whatever the number of tokens and the memory budget, so no row's reduction order
# depends on what else is in the batch. 256 rows keep a bf16 GEMM near the FLOP-per-byte balance of the
# cards in cost_model.CARDS (each token tile re-reads its weight block); the float32 tile is 8 MiB.
INVARIANT_TOKEN_TILE = 256
INVARIANT_VOCAB_BLOCK = 8192


def _free_cuda_memory(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def default_memory_budget(device: torch.device, per_token: bool = False) -> int:
    """``memory_budget=None``. CUDA: ``PER_TOKEN_BUDGET`` for per-token work (``per_token``), else a
    quarter of the free memory, at most ``DPO_BUDGET_CAP``. Elsewhere ``CPU_MEMORY_BUDGET``."""
    if device.type != "cuda":
        return CPU_MEMORY_BUDGET
    if per_token:
        return PER_TOKEN_BUDGET
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return max(PER_TOKEN_BUDGET, min(_free_cuda_memory(device) // DPO_FREE_FRACTION, DPO_BUDGET_CAP))


def paper_default_budget(card_memory_bytes: float) -> int:
    """The DPO default on an idle card of this size (benchmarks' paper tables)."""
    return max(PER_TOKEN_BUDGET, min(int(card_memory_bytes) // DPO_FREE_FRACTION, DPO_BUDGET_CAP))


# ----------------------------------------------------------------------------------------
# two-pass tiles
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TilePlan:
    token_chunk: int
    vocab_block: int


def bytes_per_logit(element_size: int, with_gradient: bool) -> int:
    """Workspace bytes per tile element: the float32 logits and a 16-bit gradient tile beside them
    for 16-bit inputs (float32 copies made without a float32-output GEMM: :func:`tile_memory`)."""
    separate = cm.gradient_tile_bytes(element_size) if with_gradient else 0
    return cm.LOGIT_BYTES + separate


def plan_tiles(num_tokens: int, vocab: int, hidden_size: int, element_size: int, memory_budget: int,
               weight_grad: bool) -> TilePlan:
    """Largest tiles that keep the workspace (and the float32 weight-gradient block) in budget.

    ``element_size`` is the workspace's bytes per logit (:func:`bytes_per_logit`). Tiles never
    go below the floor in the module docstring.
    """
    tile_budget = memory_budget // 2 if weight_grad else memory_budget
    vocab_block = vocab
    row_bytes = 4 * hidden_size if weight_grad else 0
    if row_bytes:  # a float32 [vocab_block, H] accumulator takes the other half
        vocab_block = min(vocab, max(1, (memory_budget // 2) // row_bytes))
    # Leave room for at least a few dozen tokens per tile so the GEMMs stay efficient.
    vocab_block = min(vocab_block, max(1, tile_budget // (element_size * min(max(num_tokens, 1), 64))))
    if vocab_block < vocab and vocab_block >= 256:
        vocab_block -= vocab_block % 256
    vocab_block = max(vocab_block, min(vocab, MIN_VOCAB_BLOCK))
    token_chunk = max(1, min(max(num_tokens, 1), tile_budget // (element_size * vocab_block)))
    token_chunk = max(token_chunk, min(max(num_tokens, 1), MIN_TILE_TOKENS))
    # Equal tiles: no ragged last tile of a few rows re-reading a whole weight block (floor kept).
    even = -(-max(num_tokens, 1) // -(-max(num_tokens, 1) // token_chunk))
    if even >= min(max(num_tokens, 1), MIN_TILE_TOKENS):
        token_chunk = even
    return TilePlan(token_chunk=token_chunk, vocab_block=vocab_block)


def tile_memory(tiles: TilePlan, num_tokens: int, vocab: int, hidden_size: int, element_size: int, backward: bool,
                weight_grad: bool, staged: bool, rows_workspace: int = 0) -> int:
    """Bytes the two-pass engine allocates for these tiles beyond per-token state: the logits (and
    gradient) tile, the float32 weight-gradient block, the row work's buffers and, without a
    float32-output GEMM, the largest float32 staging of one of its GEMMs (``cost_model.staging_blocks``)."""
    t, vb, H = min(tiles.token_chunk, max(num_tokens, 1)), min(tiles.vocab_block, vocab), hidden_size
    memory = t * vb * bytes_per_logit(element_size, backward) + (4 * vb * H if weight_grad else 0) + rows_workspace
    if staged:
        gemms = [(t, vb, H, 1)] + ([(t, H, vb, 1), (vb, H, t, int(weight_grad))] if backward else [])
        memory += cm.staging(gemms, element_size)[0]
    return memory


def invariant_tiles(vocab: int) -> TilePlan:
    """The batch-invariant forward's tiles: fixed, from the vocabulary size alone."""
    return TilePlan(token_chunk=INVARIANT_TOKEN_TILE, vocab_block=min(vocab, INVARIANT_VOCAB_BLOCK))


def engine_tiles(num_tokens: int, vocab: int, hidden_size: int, input_dtype: torch.dtype, device_type: str,
                 memory_budget: int, backward: bool, weight_grad: bool, rows_workspace: int = 0) -> TilePlan:
    """Tiles of the two-pass engine for these inputs on this device, every buffer of :func:`tile_memory`
    within ``memory_budget`` (down to the tile floor). ``rows_workspace``: bytes the row work allocates
    per tile (``TorchRows.workspace_bytes``; 0 for the Triton kernels)."""
    e = input_dtype.itemsize
    staged = e < 4 and not float32_gemm_out(device_type, input_dtype)
    budget = max(1, memory_budget - rows_workspace)
    tiles = plan_tiles(num_tokens, vocab, hidden_size, bytes_per_logit(e, backward), budget, weight_grad)
    floor_t = min(max(num_tokens, 1), MIN_TILE_TOKENS)
    floor_v = min(vocab, MIN_VOCAB_BLOCK)
    # Staging (no float32-output GEMM) is not in plan_tiles' closed form: shrink the larger side until it fits.
    while (staged and tile_memory(tiles, num_tokens, vocab, hidden_size, e, backward, weight_grad, True, 0) > budget
           and (tiles.token_chunk > floor_t or tiles.vocab_block > floor_v)):
        if tiles.vocab_block > floor_v and (tiles.vocab_block >= tiles.token_chunk or tiles.token_chunk <= floor_t):
            tiles = TilePlan(tiles.token_chunk, max(floor_v, tiles.vocab_block // 2))
        else:
            tiles = TilePlan(max(floor_t, tiles.token_chunk // 2), tiles.vocab_block)
    return tiles


# ----------------------------------------------------------------------------------------
# the loss: whole pairs or two-pass
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """Pairs ``[first, last)`` whose logits are computed together; ``piece_tokens`` > 0: one pair too
    large for a chunk, run in pieces of at most that many tokens. ``rejected_scale`` (split pairs):
    ``dL/dS_r / dL/dS_c`` of the pair, known before it runs (``losses.rejected_gradient_ratio``):
    its rejected unit gradients are summed into the chosen side's float32 ``[V, H]`` buffer times
    this, so one buffer waits for the pair's loss instead of two. None: two buffers.
    ``keep_gradient`` (split pairs): no ``[V, H]`` unit buffer at all; each piece's gradient pass
    writes its rows of a ``[tokens, V]`` buffer (rejected rows times ``rejected_scale`` where
    there is one) and the pair's gradient GEMMs run once its loss gives their scale (``alpha``).
    ``group_tokens`` (split pairs with unit sums): each side is cut into groups of at most that many
    rows and each group into pieces; a group's gradient rows (16-bit: half a float32 logits row) wait in
    one buffer and its unit GEMMs run once per group, so the float32 ``[V, H]`` accumulate has a deep
    enough inner dimension to stay compute-bound where the budget allows only short logits tiles."""

    first: int
    last: int
    piece_tokens: int = 0
    rejected_scale: Optional[float] = None
    keep_gradient: bool = False
    group_tokens: int = 0  # unit sums: gradient rows of up to this many tokens per gradient GEMM (0: one piece)

    @property
    def split(self) -> bool:
        return self.piece_tokens > 0


@dataclass(frozen=True)
class Plan:
    route: str  # "whole-pairs" or "two-pass"
    cost: cm.Cost
    chunks: Tuple[Chunk, ...] = ()
    accumulate: bool = False  # grad_weight of a 16-bit head summed in a float32 [V, H] buffer


def _group_pairs(pair_tokens: Sequence[int], limit: int,
                 rejected_scales: Optional[Sequence[Optional[float]]] = None, keep_gradient: bool = False,
                 group_tokens: int = 0) -> List[Chunk]:
    """Consecutive pairs into chunks of at most ``limit`` tokens; a larger pair becomes a split chunk
    (carrying its ``rejected_scales`` entry, ``keep_gradient`` and ``group_tokens``)."""
    chunks, first, used = [], 0, 0
    for p, tokens in enumerate(pair_tokens):
        if tokens > limit:
            if p > first:
                chunks.append(Chunk(first, p))
            chunks.append(Chunk(p, p + 1, piece_tokens=limit,
                                rejected_scale=None if rejected_scales is None else rejected_scales[p],
                                keep_gradient=keep_gradient, group_tokens=group_tokens))
            first, used = p + 1, 0
            continue
        if used + tokens > limit and p > first:
            chunks.append(Chunk(first, p))
            first, used = p, 0
        used += tokens
    if first < len(pair_tokens):
        chunks.append(Chunk(first, len(pair_tokens)))
    return chunks


def _whole_pair_cost(shape: cm.Shape, sides, chunks: List[Chunk], staged: bool, card,
                     gathered_input: bool = False, rows_workspace: int = 0) -> cm.Cost:
    """The cost model's price of these chunks: ``sides[p]`` is pair p's (chosen, rejected) kept tokens;
    ``rows_workspace``: the row work's own buffers (``TorchRows.workspace_bytes``), added to the memory."""
    every_pair = len(chunks) == 1 and not chunks[0].split
    runs = []
    for c in chunks:
        if c.split:
            runs.append(cm.PairChunkRun(sum(sides[c.first]), sides=tuple(sides[c.first]), piece_limit=c.piece_tokens,
                                        merged=c.rejected_scale is not None, kept=c.keep_gradient,
                                        contiguous=len(sides) == 1, group_limit=c.group_tokens))
        else:
            runs.append(cm.PairChunkRun(sum(a + b for a, b in sides[c.first:c.last]), gathered=not every_pair))
    cost = cm.whole_pair_route(shape, runs, gathered_input=gathered_input, card=card, float32_gemm_out=not staged)
    return dataclasses.replace(cost, memory_bytes=cost.memory_bytes + rows_workspace)


def plan_loss(pair_tokens: Sequence[int], vocab: int, hidden_size: int, input_dtype: torch.dtype,
              trainable_head: bool, memory_budget: int, device_type: str = "cuda", whole_pairs: bool = True,
              card: cm.Card = cm.DEFAULT_CARD, sides: Optional[Sequence[Tuple[int, int]]] = None,
              gathered_input: bool = False, input_tokens: int = 0, two_pass_budget: Optional[int] = None,
              rows_workspace: int = 0, batch_invariant: bool = False,
              rejected_scales: Optional[Sequence[Optional[float]]] = None) -> Plan:
    """The fastest route for a loss over pairs of ``pair_tokens`` kept tokens each (chosen + rejected).

    ``whole_pairs=False`` (not pair-local, no gradient, a vocabulary-parallel head...) leaves
    the two-pass route only. ``sides``: each pair's (chosen, rejected) kept tokens (a split pair's
    pieces are cut per side; default: halves). ``gathered_input``: the kept tokens were gathered
    from padded hidden states of ``input_tokens`` rows (priced on every route). ``two_pass_budget``: the
    budget the two-pass engine tiles by (default ``memory_budget``). ``rows_workspace``: bytes the row
    work allocates beside each tile (``TorchRows.workspace_bytes``; 0 for the Triton kernels), counted in
    every route's memory. ``batch_invariant=True`` takes the two-pass route with the fixed-tile
    forward (:func:`invariant_tiles`): the whole-pair route's GEMMs are shaped by the chunk.
    ``rejected_scales``: per pair, ``losses.rejected_gradient_ratio`` of the loss (None where it has
    none; default: none), which a split pair runs and is priced with (:class:`Chunk`).
    """
    if sides is None:
        sides = [(t - t // 2, t // 2) for t in pair_tokens]
    e = input_dtype.itemsize
    staged = e < 4 and not float32_gemm_out(device_type, input_dtype)
    n = int(sum(pair_tokens))
    shape = cm.Shape(max(n, 1), hidden_size, vocab, e, trainable_head, input_tokens)
    engine_budget = memory_budget if two_pass_budget is None else two_pass_budget
    tiles = engine_tiles(n, vocab, hidden_size, input_dtype, device_type, engine_budget, True, trainable_head,
                         rows_workspace)
    forward = engine_tiles(n, vocab, hidden_size, input_dtype, device_type, engine_budget, False, False,
                           rows_workspace)
    cost = cm.two_pass(shape, tiles.token_chunk, tiles.vocab_block, card, float32_gemm_out=not staged,
                       gathered_input=gathered_input, forward_tiles=(forward.token_chunk, forward.vocab_block))
    two_pass = Plan("two-pass", dataclasses.replace(cost, memory_bytes=cost.memory_bytes + rows_workspace))
    if batch_invariant:
        fixed = invariant_tiles(vocab)
        return Plan("two-pass", cm.batch_invariant_two_pass(shape, fixed.token_chunk, fixed.vocab_block,
                                                            tiles.token_chunk, tiles.vocab_block, card,
                                                            float32_gemm_out=not staged))
    if not whole_pairs or n == 0 or not pair_tokens:
        return two_pass
    candidates = [two_pass]
    one = [Chunk(0, len(pair_tokens))]
    cost = _whole_pair_cost(shape, sides, one, staged, card, gathered_input, rows_workspace)
    if cost.memory_bytes <= memory_budget:
        candidates.append(Plan("whole-pairs", cost, tuple(one), accumulate=False))
    else:
        for limit, keep, group in _chunk_limits(shape, pair_tokens, sides, memory_budget, staged, card,
                                                gathered_input, rows_workspace, rejected_scales):
            chunks = _group_pairs(pair_tokens, limit, rejected_scales, keep, group)
            cost = _whole_pair_cost(shape, sides, chunks, staged, card, gathered_input, rows_workspace)
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


# Logits tiles tried under a group of gradient rows (split pairs with unit sums): at 256-1024 rows a bf16
# logits GEMM nears the FLOP-per-byte balance of the cards in cost_model.CARDS (each piece re-reads the weight).
GROUPED_PIECE_TOKENS = (256, 512, 1024)


def _chunk_limits(shape: cm.Shape, pair_tokens, sides, memory_budget: int, staged: bool, card,
                  gathered_input: bool, rows_workspace: int = 0, rejected_scales=None) -> List[Tuple[int, bool, int]]:
    """(chunk size, keep_gradient, group_tokens) worth pricing: the largest size that splits no pair; the
    largest that splits some, with split pairs' gradients in ``[V, H]`` unit sums and kept whole; and unit
    sums with their gradient rows grouped, for each of ``GROUPED_PIECE_TOKENS``, the largest group that fits.

    Within each regime memory grows with the chunk (the tile) or the group, so each is found by bisection;
    across them it does not (splitting adds float32 [V, H] buffers or a pair's gradient), hence one search
    per regime.
    """
    def fits(limit, keep=False, group=0):
        chunks = _group_pairs(pair_tokens, limit, rejected_scales, keep, group)
        cost = _whole_pair_cost(shape, sides, chunks, staged, card, gathered_input, rows_workspace)
        return cost.memory_bytes <= memory_budget

    longest = max(pair_tokens)
    whole = _largest_fitting(fits, max(longest, MIN_TILE_TOKENS), max(longest, min(MAX_CHUNK_TOKENS, shape.tokens)))
    limits = [(whole, False, 0)]
    for keep in (False, True):
        split = _largest_fitting(lambda limit: fits(limit, keep), MIN_TILE_TOKENS, min(longest - 1, MAX_CHUNK_TOKENS))
        limits.append((split, keep, 0))
    ungrouped = limits[1][0]  # pieces at least this long fit ungrouped: a group of shorter ones may be deeper
    longest_side = max(max(side) for side in sides)
    for piece in GROUPED_PIECE_TOKENS:
        # a group of pieces needs a side longer than one piece, and pays only where ungrouped pieces are shorter
        # than the accumulate's compute-bound depth (MAX_CHUNK_TOKENS)
        if piece < longest_side and (ungrouped == 0 or piece < ungrouped < MAX_CHUNK_TOKENS):
            group = _largest_fitting(lambda g: fits(piece, False, g), piece + 1, longest_side)
            if group:
                limits.append((piece, False, group))
    return [(limit, keep, group) for limit, keep, group in limits if limit]


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
