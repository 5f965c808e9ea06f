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

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

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
    "H100": Card("H100 SXM 80GB", 989.0, 3.35, 80.0, "datasheet: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3"),
    "H200": Card("H200 141GB", 989.0, 4.8, 141.0, "datasheet: 989 TFLOP/s dense bf16, 4.8 TB/s HBM3e"),
    "H200-measured": Card("H200 141GB (measured)", 788.0, 4.3, 141.0,
                          "measured 2026-10: 788 TFLOP/s (8192^3 bf16 matmul), 4.3 TB/s (device-to-device copy)"),
    "A100": Card("A100 SXM 80GB", 312.0, 2.0, 80.0, "datasheet: 312 TFLOP/s dense bf16, 2.0 TB/s HBM2e"),
}
DEFAULT_CARD = CARDS["H100"]


@dataclass(frozen=True)
class Shape:
    tokens: int  # N kept tokens
    hidden: int  # H
    vocab: int  # V
    element_size: int = 2  # bytes per hidden/weight element
    trainable_head: bool = True
    input_tokens: int = 0  # rows of the padded hidden states the kept tokens come from (0: N)

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
    host_s: float = 0.0  # the device idle while the host reads a value back (HOST_READ_SECONDS each)

    def seconds(self, card: Card = DEFAULT_CARD) -> float:
        return self.gemm_s + self.host_s + self.row_bytes / (card.tbps * 1e12)

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


# A value read back to the host in the middle of a call (a kept split pair's scales, which cuBLAS takes as
# a host alpha): the queue drains, then the device waits for the host's next launches. Priced so that
# a route with such reads wins only where they are a rounding error (tiny shapes keep the route
# without them, and the one read per call of ``layout.py``).
HOST_READ_SECONDS = 50e-6

# Bytes per kept token of the small per-token work every route does besides the tiles: the
# statistics rows (zero-fill, fold, copy, finish), labels, sequence sums and the pair losses.
# Counted from the traced ops (tests/test_cost_trace.py), where they are about 1% of the total.
SMALL_BYTES_PER_TOKEN = 1000


@dataclass(frozen=True)
class PairChunkRun:
    """What the whole-pair route runs for one chunk: ``tokens`` rows of whole pairs (``gathered``:
    copied together, their grad_hidden rows copied back; not when one chunk holds every pair), or
    one split pair whose chosen and rejected sides (``sides``) run in pieces of equal size of at
    most ``piece_limit`` rows; ``merged``: both sides' weight gradients summed in one float32
    ``[V, H]`` buffer (the rejected side times its known gradient ratio, ``planner.Chunk``)."""

    tokens: int
    gathered: bool = False
    sides: Tuple[int, int] = (0, 0)
    piece_limit: int = 0
    merged: bool = False
    kept: bool = False  # split pair whose gradient tiles wait whole ([tokens, V]) instead of [V, H] sums
    contiguous: bool = False  # a kept pair's rows are one range of the batch (a batch of one pair)
    group_limit: int = 0  # split pair with unit sums: gradient rows of up to this many tokens per GEMM (0: a piece)

    @property
    def split(self) -> bool:
        return self.piece_limit > 0

    def weight_units(self) -> int:
        """float32 [V, H] unit sums a split pair keeps until its loss is known: one per side with tokens,
        one in all when ``merged``, none when ``kept``."""
        if not self.split or self.kept:
            return 0
        return 1 if self.merged else max(1, sum(1 for side in self.sides if side))

    def kept_gemms(self) -> List[int]:
        """Rows of each gradient GEMM pair (grad_weight, grad_hidden) a kept pair runs once its loss is
        known: one over the whole pair when ``merged`` (one scale), else one per side with tokens."""
        if self.merged:
            return [self.tokens]
        return [side for side in self.sides if side]

    def groups(self) -> Tuple[Tuple[Tuple[int, ...], ...], ...]:
        """A split pair's sides, each a list of groups (rows whose gradient GEMMs run together), each a list
        of its pieces (rows of one logits GEMM): a side is cut evenly into groups of at most ``group_limit``
        rows, each group evenly into pieces of at most ``piece_limit`` (no ``group_limit``: a group per piece;
        whole_pairs._PairRun.split_pair cuts the same)."""
        return _groups(tuple(self.sides), self.group_limit or self.piece_limit, self.piece_limit)

    def rounds(self) -> List[int]:
        """Rows of each logits GEMM (a whole chunk is one; a split pair one per piece)."""
        if not self.split:
            return [self.tokens]
        return [n for side in self.groups() for group in side for n in group]


# The planner prices a few hundred candidate cuts per call (bisections over chunk, piece and group sizes):
# the cuts are cached, as each candidate's GEMMs are within one pricing (whole_pair_route).
@functools.lru_cache(maxsize=1 << 16)
def _even_cut(rows: int, limit: int) -> Tuple[int, ...]:
    count = -(-rows // limit) if rows > 0 else 0
    return tuple(rows * (i + 1) // count - rows * i // count for i in range(count))


@functools.lru_cache(maxsize=1 << 14)
def _groups(sides: Tuple[int, ...], group_limit: int, piece_limit: int):
    return tuple(tuple(_even_cut(group, piece_limit) for group in _even_cut(side, group_limit)) for side in sides)


def even_pieces(rows: int, limit: int) -> List[int]:
    """Sizes of the fewest pieces of at most ``limit`` rows that cover ``rows``, equal within one row
    (whole_pairs._even_pieces cuts by it)."""
    return list(_even_cut(rows, limit))


def whole_pair_route(shape: Shape, chunks: Sequence[PairChunkRun], gathered_input: bool = False,
                     card: Card = DEFAULT_CARD, float32_gemm_out: bool = True) -> Cost:
    """Whole pairs per chunk (6NHV), op by op as ``whole_pairs._PairRun`` runs them (split pairs first).

    Per GEMM round of r rows: the logits GEMM (r H + V H operands, r V float32 written), the
    statistics pass (reads the tile), the gradient pass (reads it, writes the 16-bit gradient
    tile, or in place for float32), grad_weight (first product written with beta=0, later ones
    accumulated into float32 [V, H]; one chunk writes the head's dtype directly) and grad_hidden
    (one GEMM: the weight is read once; a gathered chunk's rows are copied in and back out).
    A split pair then writes its grad_hidden scaled and cast in one pass, and merges
    g_c A + g_r B (+ the running sum) in one pass of a Triton kernel (reading each float32
    [V, H] once), written in the head's dtype when no chunk follows; a ``merged`` split pair
    summed its rejected pieces into A (``alpha`` of their GEMMs, which then accumulate) and
    merges g_c A (+ the running sum): one float32 [V, H] fewer to hold and to read. A ``kept`` split
    pair runs no gradient GEMM per piece: each piece's gradient pass writes its rows of one
    ``[tokens, V]`` gradient buffer (the rejected rows times the known ratio when ``merged``), and
    once the pair's loss is known the gradient GEMMs run over the whole pair with its scale as
    ``alpha`` (:meth:`PairChunkRun.kept_gemms`; a host number: one read of the scales per kept
    pair, ``HOST_READ_SECONDS``); grad_hidden is written in the input dtype; a
    merged pair alone in the batch writes grad_weight in the head's dtype with its one GEMM, and
    a merged pair whose rows are not one range gathers them and copies its grad_hidden rows back
    (as a gathered chunk). Otherwise the float32
    sum is cast to the head's dtype once at the end (none for a float32 head). ``grad_loss``
    of 1 (``loss.backward()``) costs nothing; ``gathered_input``: the kept tokens are gathered
    from padded hidden states (N H copied; backward zero-fills the padded gradient and scatters).
    """
    N, H, V, e = shape.tokens, shape.hidden, shape.vocab, shape.element_size
    g = gradient_tile_bytes(e) or LOGIT_BYTES  # bytes per element of the tile the gradient GEMMs read
    single = len(chunks) == 1 and not chunks[0].split
    # grad_weight written by one GEMM in the head's dtype: one chunk of whole pairs, or one kept merged pair
    direct = single or (len(chunks) == 1 and chunks[0].kept and chunks[0].merged)
    sum_bytes = e if direct else 4  # the float32 sum (or the float32 head's grad_weight itself)
    gemm_s = hbm = row_bytes = 0.0

    staged_gemms = []  # float32 results of 16-bit operands where no float32-output GEMM exists
    priced = {}  # (m, n, k, a_bytes, out_bytes, accumulate) -> (seconds, bytes): a split pair repeats its GEMMs

    def gemm(m, n, k, a_bytes, out_bytes, accumulate):
        nonlocal gemm_s, hbm
        key = (m, n, k, a_bytes, out_bytes, accumulate)
        if key not in priced:
            priced[key] = (_gemm_seconds(m, n, k, a_bytes, e, out_bytes, accumulate, card),
                           _gemm_traffic(m, n, k, a_bytes, e, out_bytes, accumulate))
        seconds, traffic = priced[key]
        gemm_s += seconds
        hbm += traffic
        if not float32_gemm_out and e < 4 and out_bytes == 4:
            staged_gemms.append((m, n, k, 1))

    ordered = sorted(chunks, key=lambda c: not c.split)
    have_sum = False
    for chunk in ordered:
        if chunk.kept:
            for r in chunk.rounds():
                gemm(r, V, H, e, LOGIT_BYTES, False)  # logits
                row_bytes += r * V * (LOGIT_BYTES + LOGIT_BYTES + e)  # stats pass; gradient pass into the buffer
            for i, r in enumerate(chunk.kept_gemms()):
                if shape.trainable_head:  # the first product writes the sum (beta=0) unless one already exists
                    gemm(V, H, r, e, sum_bytes, have_sum or i > 0)
                gemm(r, H, V, e, e, False)  # grad_hidden, in the input dtype
            if chunk.merged and not chunk.contiguous:
                row_bytes += 4 * chunk.tokens * H * e  # rows gathered, grad_hidden rows copied back
            have_sum = have_sum or shape.trainable_head
            continue
        if not chunk.split:
            r = chunk.tokens
            gemm(r, V, H, e, LOGIT_BYTES, False)  # logits (both operands in the input dtype)
            row_bytes += r * V * (LOGIT_BYTES + LOGIT_BYTES + g)  # stats pass; gradient pass
            if shape.trainable_head:
                gemm(V, H, r, g, sum_bytes, have_sum)
            gemm(r, H, V, g, e, False)  # grad_hidden: the weight read once
            if chunk.gathered:
                row_bytes += 4 * r * H * e  # rows copied in (torch.cat) and grad_hidden rows copied back
        else:  # per group: its pieces' logits and row passes, then its unit gradient GEMMs
            buffer_written = [False, False]  # the chosen and rejected unit sums (one when merged)
            for side, groups in enumerate(chunk.groups()):
                for pieces in groups:
                    for r in pieces:
                        gemm(r, V, H, e, LOGIT_BYTES, False)
                        row_bytes += r * V * (LOGIT_BYTES + LOGIT_BYTES + g)
                    rows = sum(pieces)
                    if shape.trainable_head:
                        slot = 0 if chunk.merged else side
                        gemm(V, H, rows, g, sum_bytes, buffer_written[slot])
                        buffer_written[slot] = True
                    gemm(rows, H, V, g, 4, False)  # unit grad_hidden rows, float32
        if chunk.split:
            row_bytes += sum(chunk.sides) * H * (4 + e)  # unit grad_hidden scaled and cast in one pass
            if shape.trainable_head:  # one pass: read A (and B, and the running sum), write the result
                last = chunk is ordered[-1]
                row_bytes += (4 * (chunk.weight_units() + have_sum) + (e if last else 4)) * shape.vh
        have_sum = have_sum or shape.trainable_head
    accumulators = 0 if direct or not shape.trainable_head else 1
    merged_last = ordered[-1].split and not ordered[-1].kept  # its merge wrote the head's dtype
    if shape.trainable_head and not direct and e < 4 and not merged_last:
        row_bytes += (4 + e) * shape.vh  # the float32 sum cast to the head's dtype once
    if gathered_input:
        row_bytes += 2 * N * H * e  # kept rows gathered
        row_bytes += (shape.input_tokens or N) * H * e + 3 * N * H * e  # backward: zero-fill, scatter-add
    row_bytes += SMALL_BYTES_PER_TOKEN * N

    # Memory: the workspace for the largest round, then the larger of the split phase (two
    # unit sums, one when merged; float32 grad_hidden rows of the pair; the running sum if one exists) and the
    # whole-chunk phase (the running sum, the gathered rows of the largest gathered chunk).
    largest = max((r for c in chunks for r in c.rounds()), default=0)
    # the workspace's separate gradient tile serves whole chunks and ungrouped pieces; kept and grouped
    # split pairs write their gradient rows into a buffer of their own
    largest_tiled = max((r for c in chunks if not c.kept and not c.group_limit for r in c.rounds()), default=0)
    memory = largest * V * LOGIT_BYTES + largest_tiled * V * gradient_tile_bytes(e) + STATS_BYTES_PER_TOKEN * N
    # A 16-bit head's running sum is float32 loss memory; a float32 head sums into grad_weight itself.
    running = 4 * shape.vh if (shape.trainable_head and not direct and e < 4) else 0
    phases, have_running = [0.0], False
    for chunk in ordered:
        if chunk.kept:  # the pair's gradient buffer (and its gathered rows), beside the running sum
            gathered_rows = chunk.tokens * H * e if chunk.merged and not chunk.contiguous else 0
            phases.append(chunk.tokens * V * e + gathered_rows + running)
        elif chunk.split:
            units = chunk.weight_units() if shape.trainable_head else 0
            if units and e == 4 and not have_running:
                units -= 1  # a float32 head's first merged buffer is grad_weight itself (returned)
            group_rows = max((sum(p) for side in chunk.groups() for p in side), default=0) if chunk.group_limit else 0
            phases.append(units * 4 * shape.vh + (running if have_running else 0) + 4 * sum(chunk.sides) * H
                          + group_rows * V * e)
        else:
            phases.append(running + (chunk.tokens * H * e if chunk.gathered else 0))
        have_running = True
    memory += max(phases)
    if gathered_input:
        memory += 2 * N * H * e  # the gathered kept rows and their grad_hidden (not the returned gradient)
    if staged_gemms:
        staged, moved = staging(staged_gemms, e)
        memory += staged
        row_bytes += moved
    if single:
        route = "whole pairs, 1 chunk"
    else:
        split_count = sum(c.split for c in chunks)
        rounds_total = sum(len(c.rounds()) for c in chunks)
        how = (", gradient kept" if any(c.kept for c in chunks) else "") + \
            (", rows grouped" if any(c.group_limit for c in chunks) else "")
        route = f"whole pairs, {rounds_total} GEMM rounds" + (f" ({split_count} pair split{how})" if split_count else "")
        fp32 = max(1 if accumulators and e < 4 else 0,
                   max((c.weight_units() + (1 if i > 0 else 0) for i, c in enumerate(ordered) if c.split),
                       default=0))
        route += f", {fp32} fp32 [V,H]" if fp32 and shape.trainable_head else ""
    host_reads = sum(1 for c in chunks if c.kept)
    return Cost(route, shape.floor_flops(), gemm_s, row_bytes, hbm + row_bytes, memory,
                host_s=HOST_READ_SECONDS * host_reads)


def _gemm_seconds(m, n, k, a_bytes, b_bytes, out_bytes, accumulate, card):
    flops = 2.0 * m * n * k
    return max(flops / (card.tflops * 1e12), _gemm_traffic(m, n, k, a_bytes, b_bytes, out_bytes, accumulate)
               / (card.tbps * 1e12))


def _gemm_traffic(m, n, k, a_bytes, b_bytes, out_bytes, accumulate):
    """[m, k] x [k, n]: the two operands read once, the output written (and read first when accumulating)."""
    return m * k * a_bytes + k * n * b_bytes + m * n * out_bytes * (2 if accumulate else 1)


def whole_pairs(shape: Shape, chunk_tokens: int, chunks: int, split_pairs: int = 0, split_tokens: int = 0,
                card: Card = DEFAULT_CARD, float32_gemm_out: bool = True, merged: bool = False) -> Cost:
    """Uniform chunks of ``chunk_tokens`` (and ``split_pairs`` pairs of ``split_tokens`` run in pieces of
    that size, ``merged`` as :class:`PairChunkRun`): :func:`whole_pair_route` for a batch described by
    counts only (the peers' pricing)."""
    t = max(1, min(chunk_tokens, shape.tokens))
    runs = [PairChunkRun(t, gathered=chunks > 1) for _ in range(max(1, round((shape.tokens - split_pairs * split_tokens)
                                                                           / t)) if shape.tokens > split_pairs * split_tokens else 0)]
    runs += [PairChunkRun(split_tokens, sides=(split_tokens - split_tokens // 2, split_tokens // 2), piece_limit=t,
                          merged=merged) for _ in range(split_pairs)]
    return whole_pair_route(shape, runs or [PairChunkRun(t)], card=card, float32_gemm_out=float32_gemm_out)


# Float32 staging of 16-bit GEMM operands where no float32-output GEMM exists (CPU; CUDA torch < 2.8 or a
# build that refuses mixed dtypes: ``gemm.float32_gemm_out``). No staged block is smaller than this
# (unless the whole operand is), so per-op overhead stays amortized.
COPY_SLAB_BYTES = 1 << 20


@dataclass(frozen=True)
class StagingBlocks:
    """How ``gemm._staged`` runs one ``[m, k] x [k, n]`` GEMM of 16-bit operands in float32.

    ``along`` "n": ``a`` staged whole, ``b`` ``step`` columns at a time (each product lands in a
    ``[m, step]`` temporary, then in the strided output); "m": ``b`` staged whole, ``a`` ``step``
    rows at a time; "k": both a ``step``-wide slice of the reduction at a time, the float32 output
    read and written once per slice. ``memory``: float32 bytes alive at once.
    """

    along: str
    step: int
    memory: int
    m: int
    n: int
    k: int

    def traffic(self, element_size: int) -> float:
        """Bytes the staging adds to the GEMM itself: every operand element read (16-bit) and written
        (float32) once, the float32 copy read by the GEMM instead of the 16-bit original, and what is
        re-read per block (the whole-staged operand, or the float32 output per reduction slice)."""
        m, n, k, e = self.m, self.n, self.k, element_size
        blocks = math.ceil((self.k if self.along == "k" else self.n if self.along == "n" else self.m) / self.step)
        copies = 8 * (m * k + k * n)  # read e + write 4 + the GEMM reads 4 bytes where it read e
        if self.along == "n":
            reread = 4 * m * k * (blocks - 1) + (8 * m * n if blocks > 1 else 0)  # and the temporaries' copy
        elif self.along == "m":
            reread = 4 * k * n * (blocks - 1)
        else:
            reread = 8 * m * n * (blocks - 1)
        return copies + reread


def _min_rows(cols: int) -> int:
    return max(1, COPY_SLAB_BYTES // (4 * max(cols, 1)))


def staging_blocks(m: int, n: int, k: int) -> StagingBlocks:
    """The blocking of a staged ``[m, k] x [k, n]`` GEMM: the least memory among three proportionate ones.

    Each keeps what is re-read per block no larger than what is copied: staging the operand with
    the smaller free dimension whole and the other in blocks at least that wide re-reads the
    whole copy at most once per its own width (at most the other operand's copy in all); blocking
    the reduction in slices of at least ``2mn / (m + n)`` re-reads the float32 output no more
    than the slices copy.
    """
    m, n, k = max(m, 1), max(n, 1), max(k, 1)
    if m <= n:
        step = min(n, max(m, _min_rows(k)))
        whole = StagingBlocks("n", step, 4 * m * k + 4 * k * step + (4 * m * step if step < n else 0), m, n, k)
    else:
        step = min(m, max(n, _min_rows(k)))
        whole = StagingBlocks("m", step, 4 * k * n + 4 * step * k, m, n, k)
    kstep = min(k, max(math.ceil(2 * m * n / (m + n)), _min_rows(m + n)))
    sliced = StagingBlocks("k", kstep, 4 * (m + n) * kstep, m, n, k)
    return min((whole, sliced), key=lambda b: (b.memory, b.along != "k"))


def staging(gemms, element_size: int):
    """(largest float32 staging alive at once, staging bytes moved) of GEMMs ``[(m, n, k, count), ...]``
    that run one after another."""
    memory, traffic = 0, 0.0
    for m, n, k, count in gemms:
        if count:
            blocks = staging_blocks(m, n, k)
            memory = max(memory, blocks.memory)
            traffic += count * blocks.traffic(element_size)
    return memory, traffic


def _blocks(total: int, step: int):
    """``range(0, total, step)`` as (size, count, not the first) groups: the first block, the other
    full ones, the ragged last one."""
    sizes = [min(step, total)]
    full_rest = max(0, total // step - 1) if total >= step else 0
    groups = [(sizes[0], 1, False)] if total > 0 else []
    if full_rest:
        groups.append((step, full_rest, True))
    if total > step and total % step:
        groups.append((total % step, 1, True))
    return groups


def two_pass(shape: Shape, token_chunk: int, vocab_block: int, card: Card = DEFAULT_CARD,
             float32_gemm_out: bool = True, gathered_input: bool = False,
             forward_tiles: Optional[Tuple[int, int]] = None) -> Cost:
    """Forward folds tiles into per-token statistics (2NHV); backward recomputes them (6NHV more).

    ``forward_tiles``: (token_chunk, vocab_block) of the forward when it differs from the backward's
    (no gradient tile nor weight block to hold: larger tiles, fewer weight reads).

    As ``chunked.ChunkedEngine`` runs it: per tile the logits GEMM and the statistics pass
    (forward), again the logits GEMM, the gradient pass, and grad_hidden and the vocabulary
    block of grad_weight accumulated in float32 (the first product of each written with beta=0);
    each finished block is cast into grad_weight, and grad_hidden cast once at the end.
    Ragged last tiles are priced at their size.
    """
    N, H, V, e = shape.tokens, shape.hidden, shape.vocab, shape.element_size
    g = gradient_tile_bytes(e)
    t, vb = max(1, min(token_chunk, N)), max(1, min(vocab_block, V))
    gemm_s = hbm = 0.0
    tf, vf = forward_tiles or (t, vb)
    for cols, v_count, _ in _blocks(V, max(1, min(vf, V))):
        for rows, t_count, _ in _blocks(N, max(1, min(tf, N))):
            gemm_s += v_count * t_count * _gemm_seconds(rows, cols, H, e, e, LOGIT_BYTES, False, card)
            hbm += v_count * t_count * _gemm_traffic(rows, cols, H, e, e, LOGIT_BYTES, False)
    for cols, v_count, v_later in _blocks(V, vb):
        for rows, t_count, t_later in _blocks(N, t):
            count = v_count * t_count
            gemm_s += count * _gemm_seconds(rows, cols, H, e, e, LOGIT_BYTES, False, card)
            hbm += count * _gemm_traffic(rows, cols, H, e, e, LOGIT_BYTES, False)
            gemm_s += count * _gemm_seconds(rows, H, cols, g or LOGIT_BYTES, e, 4, v_later, card)
            hbm += count * _gemm_traffic(rows, H, cols, g or LOGIT_BYTES, e, 4, v_later)
            if shape.trainable_head:
                gemm_s += count * _gemm_seconds(cols, H, rows, g or LOGIT_BYTES, e, 4, t_later, card)
                hbm += count * _gemm_traffic(cols, H, rows, g or LOGIT_BYTES, e, 4, t_later)
    row_bytes = shape.nv * (LOGIT_BYTES + LOGIT_BYTES + (g or LOGIT_BYTES))
    if shape.trainable_head:
        row_bytes += (4 + e) * shape.vh  # each float32 block cast into grad_weight
    row_bytes += (4 + e) * shape.nh  # grad_hidden cast once
    if gathered_input:
        row_bytes += 2 * shape.nh * e + (shape.input_tokens or N) * H * e + 3 * shape.nh * e
    row_bytes += SMALL_BYTES_PER_TOKEN * N
    flops = 2.0 * shape.nv * H * (4 if shape.trainable_head else 3)
    memory = max(t * vb * (LOGIT_BYTES + g) + (4 * vb * H if shape.trainable_head else 0) + 4 * shape.nh,
                 min(tf, N) * min(vf, V) * LOGIT_BYTES)  # backward, or the forward's (larger) tile
    memory += STATS_BYTES_PER_TOKEN * N
    if gathered_input:
        memory += 2 * shape.nh * e  # the gathered kept rows (saved for backward) and their gradient
    if not float32_gemm_out and e < 4:  # logits twice (forward, recompute), grad_hidden, grad_weight
        tiles = math.ceil(N / t) * math.ceil(V / vb)
        forward = math.ceil(N / max(1, min(tf, N))) * math.ceil(V / max(1, min(vf, V)))
        staged, moved = staging([(min(tf, N), min(vf, V), H, forward), (t, vb, H, tiles), (t, H, vb, tiles),
                                 (vb, H, t, tiles if shape.trainable_head else 0)], e)
        memory += staged
        row_bytes += moved
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
