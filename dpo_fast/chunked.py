"""impl="chunked" (and, with PyTorch rows, impl="torch"): GEMM tiles into a bounded workspace.

Logits exist only as one ``[token_chunk, vocab_block]`` tile at a time, written by a
cuBLAS GEMM into a reused buffer and folded by the row kernels (``rows.py``).

- Two-pass (8NHV): forward folds tiles into per-token statistics (2NHV); backward walks
  the vocabulary block by block, recomputes each tile, turns it into the softmax
  gradient in place and accumulates ``grad_hidden`` and that block of ``grad_weight`` in
  float32 (4NHV + 2NHV of recompute). Only one vocabulary block of float32 weight
  gradient is alive at a time.
- Whole pairs (6NHV, :class:`PairChunkLoss`): when the loss of a pair depends on that
  pair alone, a chunk's full-vocabulary logits are computed once, the pair losses and
  their gradients are taken inside the chunk, and the tile becomes the softmax gradient
  before the two gradient GEMMs; across chunks grad_weight is summed in float32.

Which route, and the tile and chunk sizes, come from ``planner.py``. Logits tiles are
float32 for every input dtype (``logits_dtype``).
"""

from typing import Callable, List, Sequence, Tuple

import torch

from . import planner
from .cost_model import COPY_SLAB_BYTES
from .function import refuse_second_order
from .planner import Chunk, plan_tiles  # noqa: F401  (tile sizes live in the planner; re-exported)
from .rows import KEPT_ONLY, TorchRows, finish_stats, init_stats
from .transform import LogitTransform

DEFAULT_MEMORY_BUDGET = planner.CPU_MEMORY_BUDGET  # see planner.default_memory_budget for CUDA devices


def _slab_rows(cols: int) -> int:
    return max(1, COPY_SLAB_BYTES // (4 * max(cols, 1)))


def mm_float32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (float32) = a @ b for 16-bit operands, never rounded to 16 bits.

    cuBLAS writes float32 straight from 16-bit operands (``out_dtype``, checked once per
    device type by ``planner.float32_gemm_out``); elsewhere ``b`` is staged to float32 in
    slabs of rows of ``b.T`` (1 MiB each) so no float32 copy of a whole weight block exists.
    """
    if planner.float32_gemm_out(out.device.type):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    a32 = a.float()
    step = _slab_rows(b.shape[0])
    if step >= b.shape[1]:
        return torch.mm(a32, b.float(), out=out)
    for c0 in range(0, b.shape[1], step):
        out[:, c0:c0 + step].copy_(a32 @ b[:, c0:c0 + step].float())
    return out


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc`` without rounding ``a @ b`` to a 16-bit dtype first."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif planner.float32_gemm_out(acc.device.type):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # staged a slab of rows of ``a`` at a time
        b32 = b.float()
        step = _slab_rows(a.shape[1])
        for r0 in range(0, a.shape[0], step):
            acc[r0:r0 + step].addmm_(a[r0:r0 + step].float(), b32)


def logits_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the logits tiles: float32 for 16-bit inputs, else the inputs'.

    A 16-bit GEMM result rounded before the softmax puts ~0.04 nats of noise on a bf16
    head's log-probs and overflows float16 past 65504; cuBLAS accumulates in float32
    anyway, so writing that accumulator costs only the wider tile. The gradient tile
    (``Workspace.gradient_tile``) stays 16-bit so the gradient GEMMs run on 16-bit operands.
    """
    return torch.float32 if input_dtype in (torch.float16, torch.bfloat16) else input_dtype


def _matmul_float32(hidden_chunk, weight_block, bias_block, out):
    """out (float32) = hidden @ weight^T (+ bias) for 16-bit operands, without a 16-bit result."""
    mm_float32(hidden_chunk, weight_block.t(), out)
    if bias_block is not None:
        out += bias_block.float()
    return out


class Workspace:
    """Reused buffers that hold every logits tile (and, for float16 inputs, its gradient tile)."""

    def __init__(self, numel: int, input_dtype, device, with_gradient: bool = False):
        self.input_dtype = input_dtype
        self.buffer = torch.empty(numel, dtype=logits_dtype(input_dtype), device=device)
        separate = with_gradient and self.buffer.dtype != input_dtype
        self.grad_buffer = torch.empty(numel, dtype=input_dtype, device=device) if separate else None

    def logits(self, hidden_chunk, weight_block, bias_block) -> torch.Tensor:
        rows, cols = hidden_chunk.shape[0], weight_block.shape[0]
        out = self.buffer[: rows * cols].view(rows, cols)
        if out.dtype != hidden_chunk.dtype:
            return _matmul_float32(hidden_chunk, weight_block, bias_block, out)
        if bias_block is None:
            return torch.mm(hidden_chunk, weight_block.t(), out=out)
        return torch.addmm(bias_block, hidden_chunk, weight_block.t(), out=out)

    def gradient_tile(self, tile: torch.Tensor) -> torch.Tensor:
        """Where the row kernels write the tile's gradient: the tile itself (in place) or the 16-bit buffer."""
        if self.grad_buffer is None:
            return tile
        return self.grad_buffer[: tile.numel()].view(tile.shape)


def _ranges(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(total, start + step)


class ChunkedEngine:
    """Per-token statistics and their backward over bounded GEMM tiles.

    ``batch_invariant=True``: the forward runs fixed-shape tiles (:meth:`_invariant_forward_stats`),
    so a token's statistics are bitwise the same whatever else is in the batch; the backward is unchanged.
    """

    def __init__(self, rows, memory_budget: int = DEFAULT_MEMORY_BUDGET, batch_invariant: bool = False):
        self.rows = rows
        self.memory_budget = memory_budget
        self.batch_invariant = batch_invariant

    def _plan(self, hidden, weight, backward: bool, weight_grad: bool = False):
        return planner.engine_tiles(hidden.shape[0], weight.shape[0], weight.shape[1], hidden.dtype,
                                    hidden.device.type, self.memory_budget, backward, weight_grad)

    def forward_stats(self, hidden, weight, bias, labels, transform: LogitTransform,
                      ignore_index: int = KEPT_ONLY) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # the tiles' precision is chosen here
            return self._forward_stats(hidden, weight, bias, labels, transform, ignore_index)

    def _forward_stats(self, hidden, weight, bias, labels, transform, ignore_index):
        if self.batch_invariant:
            return self._invariant_forward_stats(hidden, weight, bias, labels, transform, ignore_index)
        n, vocab = hidden.shape[0], weight.shape[0]
        plan = self._plan(hidden, weight, backward=False)
        stats = init_stats(n, hidden.device)
        workspace = Workspace(min(n, plan.token_chunk) * plan.vocab_block, hidden.dtype, hidden.device)
        for t0, t1 in _ranges(n, plan.token_chunk):
            for v0, v1 in _ranges(vocab, plan.vocab_block):
                tile = workspace.logits(hidden[t0:t1], weight[v0:v1], None if bias is None else bias[v0:v1])
                self.rows.stats(tile, labels[t0:t1], stats[:, t0:t1], vocab_start=v0,
                                ignore_index=ignore_index, transform=transform)
        return stats

    def _invariant_forward_stats(self, hidden, weight, bias, labels, transform, ignore_index):
        """Every GEMM and row pass sees the same shapes and buffers whatever the batch.

        Each token tile, the last one too, is copied into one fixed ``[INVARIANT_TOKEN_TILE, H]``
        buffer (zero rows past the end, labelled ignored), multiplied by the same vocabulary blocks
        (``planner.invariant_tiles``: fixed by V alone) and folded by the row kernels into a fixed
        statistics buffer, block by block in vocabulary order. A BLAS or cuBLAS call then never sees
        another shape (it picks kernels, blocking and split-K by shape), and a row's position in its
        tile changes only which rows of the same kernels it occupies. PyTorch rows process the
        whole tile at once (their slabs would otherwise put a lone last row in a shape of its own).
        """
        n, vocab = hidden.shape[0], weight.shape[0]
        plan = planner.invariant_tiles(vocab)
        tokens, block = plan.token_chunk, plan.vocab_block
        rows = TorchRows(slab_elements=tokens * block) if isinstance(self.rows, TorchRows) else self.rows
        stats = init_stats(n, hidden.device)
        workspace = Workspace(tokens * block, hidden.dtype, hidden.device)
        tile_hidden = hidden.new_zeros(tokens, hidden.shape[1])
        tile_labels = labels.new_full((tokens,), ignore_index)
        for t0, t1 in _ranges(n, tokens):
            tile_hidden.zero_()
            tile_hidden[:t1 - t0] = hidden[t0:t1]
            tile_labels.fill_(ignore_index)
            tile_labels[:t1 - t0] = labels[t0:t1]
            tile_stats = init_stats(tokens, hidden.device)
            for v0, v1 in _ranges(vocab, block):
                tile = workspace.logits(tile_hidden, weight[v0:v1], None if bias is None else bias[v0:v1])
                rows.stats(tile, tile_labels, tile_stats, vocab_start=v0, ignore_index=ignore_index,
                           transform=transform)
            stats[:, t0:t1] = tile_stats[:, :t1 - t0]
        return stats

    def backward(self, hidden, weight, bias, labels, transform: LogitTransform, lse, grad_logp,
                 entropy=None, grad_entropy=None, needs=(True, True, True), ignore_index: int = KEPT_ONLY):
        """Gradients of sum(grad_logp * logp + grad_entropy * entropy) to (hidden, weight, bias)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self._backward(hidden, weight, bias, labels, transform, lse, grad_logp, entropy, grad_entropy,
                                  needs, ignore_index)

    def _backward(self, hidden, weight, bias, labels, transform, lse, grad_logp, entropy, grad_entropy, needs,
                  ignore_index):
        need_hidden, need_weight, need_bias = needs
        n, vocab = hidden.shape[0], weight.shape[0]
        plan = self._plan(hidden, weight, backward=True, weight_grad=need_weight)
        workspace = Workspace(min(n, plan.token_chunk) * plan.vocab_block, hidden.dtype, hidden.device,
                              with_gradient=True)
        grad_hidden_acc = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
        grad_logp = grad_logp.float().contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        # Vocabulary-major: each block of grad_weight is finished in float32, then written once.
        for v0, v1 in _ranges(vocab, plan.vocab_block):
            weight_block = weight[v0:v1]
            block_acc = torch.zeros(v1 - v0, weight.shape[1], dtype=torch.float32,
                                    device=weight.device) if need_weight else None
            for t0, t1 in _ranges(n, plan.token_chunk):
                logits = workspace.logits(hidden[t0:t1], weight_block, None if bias is None else bias[v0:v1])
                tile = workspace.gradient_tile(logits)  # the logits tile itself unless inputs are float16
                self.rows.grad(logits, labels[t0:t1], lse[t0:t1], grad_logp[t0:t1], tile, vocab_start=v0,
                               ignore_index=ignore_index, transform=transform,
                               entropy=None if grad_entropy is None else entropy[t0:t1],
                               grad_entropy=None if grad_entropy is None else grad_entropy[t0:t1])
                if need_hidden:
                    addmm_fp32(grad_hidden_acc[t0:t1], tile, weight_block)
                if need_weight:
                    addmm_fp32(block_acc, tile.t(), hidden[t0:t1])
                if need_bias:
                    grad_bias[v0:v1] += tile.sum(dim=0, dtype=torch.float32)
            if need_weight:
                grad_weight[v0:v1] = block_acc
        return (
            None if grad_hidden_acc is None else grad_hidden_acc.to(hidden.dtype),
            grad_weight,
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )


# ----------------------------------------------------------------------------------------
# Whole pairs per chunk (6NHV)
# ----------------------------------------------------------------------------------------

class PairChunkLoss(torch.autograd.Function):
    """Loss over whole pairs, logits computed once per chunk; gradients made in forward (6NHV).

    For a chunk of whole pairs: logits ``z = h W^T`` (float32 tile, 2 t H V FLOPs), per-token
    log-probs, the chunk's pair losses ``L_p(S_c, S_r)`` and ``g = dL/dS`` by autograd on
    ``[pairs]`` tensors, the tile turned into ``g (onehot - softmax(z)) dz`` (16-bit for 16-bit
    inputs), then ``grad_hidden = tile W`` and ``grad_weight += tile^T h`` (4 t H V). The
    sum over chunks of a 16-bit head's grad_weight runs in a float32 ``[V, H]`` accumulator
    cast once (a float32 head sums into grad_weight itself); a single chunk writes it with
    one GEMM. A pair larger than a chunk (``Chunk.split``) runs in pieces with ``g = 1``:
    its chosen and rejected unit gradients wait in two float32 ``[V, H]`` buffers (and
    float32 grad_hidden rows) until the pair's loss gives ``g_c``, ``g_r``; the sum is
    linear in ``g``, so this is exact. Memory: what ``planner.plan_loss`` priced.

    ``chunk_loss(first, last, chosen, rejected, ref_chosen, ref_rejected)`` returns pairs
    ``[first, last)``'s share of the batch loss, differentiable in its four ``[pairs]``
    arguments. Outputs: the loss and the per-token statistics (detached). Gradients reach
    hidden, weight, bias and the reference log-probs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_chosen, ref_rejected, rows, transform: LogitTransform,
                spans: Sequence[Tuple[int, int]], lengths: torch.Tensor, chunks: Sequence[Chunk],
                chunk_loss: Callable):
        """``hidden`` rows are kept tokens ordered [chosen_0 .. chosen_B-1, rejected_0 ..]; ``spans[s]`` is
        the (start, end) of sequence ``s`` in that order (host ints) and ``lengths`` the same lengths on
        the device."""
        with torch.autocast(hidden.device.type, enabled=False):  # the tiles' precision is chosen here
            run = _PairRun(hidden, weight, bias, labels, (ref_chosen, ref_rejected), rows, transform, spans,
                           lengths, chunks, chunk_loss, ctx.needs_input_grad)
            for chunk in chunks:
                (run.split_pair if chunk.split else run.whole_pairs)(chunk)
            grads = run.finish()
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(run.stats)
        return run.loss, run.stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        refuse_second_order("dpo_loss (whole-pair route)")  # the saved gradients carry no graph
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        grad_hidden, grad_weight, grad_bias, grad_ref_c, grad_ref_r = map(scale, ctx.saved_tensors)
        return grad_hidden, grad_weight, grad_bias, None, grad_ref_c, grad_ref_r, None, None, None, None, None, None


class _PairRun:
    """State of one PairChunkLoss forward: the workspace and the gradients being summed."""

    def __init__(self, hidden, weight, bias, labels, refs, rows, transform, spans, lengths, chunks, chunk_loss,
                 needs):
        self.hidden, self.weight, self.bias, self.labels = hidden, weight, bias, labels
        self.refs, self.rows, self.transform, self.spans, self.chunk_loss = refs, rows, transform, spans, chunk_loss
        self.lengths = lengths  # per sequence, on the device (spans holds the same on the host)
        self.single_gemm = len(chunks) == 1 and not chunks[0].split
        self.need_hidden, self.need_weight, self.need_bias = needs[:3]
        self.need_refs = needs[4:6]
        self.pairs = len(spans) // 2
        device, n, vocab = hidden.device, hidden.shape[0], weight.shape[0]
        self.stats = init_stats(n, device)
        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.grad_hidden = torch.zeros_like(hidden) if self.need_hidden else None
        self.grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if self.need_bias else None
        self.grad_refs = [torch.zeros(self.pairs, dtype=torch.float32, device=device) if need else None
                          for need in self.need_refs]
        self.grad_weight = None  # the float32 sum (or, for one chunk of whole pairs, the result itself)
        self.sum_dtype = torch.promote_types(weight.dtype, torch.float32)
        # One workspace for the largest chunk (or piece), reused by every other.
        self.workspace = Workspace(max(_chunk_tokens(c, spans) for c in chunks) * vocab, hidden.dtype, device,
                                   with_gradient=True)

    # -- helpers ------------------------------------------------------------------------

    def _logps(self, h, labels, segments):
        """Logits of ``h``, folded into the statistics of the kept rows ``segments`` (host ranges)."""
        logits = self.workspace.logits(h, self.weight, self.bias)
        chunk_stats = init_stats(h.shape[0], h.device)
        self.rows.stats(logits, labels, chunk_stats, vocab_start=0, ignore_index=KEPT_ONLY, transform=self.transform)
        offset = 0
        for start, end in segments:
            self.stats[:, start:end] = chunk_stats[:, offset:offset + end - start]
            offset += end - start
        return logits, finish_stats(chunk_stats, labels, self.weight.shape[0], ignore_index=KEPT_ONLY)

    def _gradient_tile(self, logits, labels, lse, grad_logps):
        tile = self.workspace.gradient_tile(logits)  # the logits tile itself unless inputs are 16-bit
        self.rows.grad(logits, labels, lse, grad_logps.float().contiguous(), tile, vocab_start=0,
                       ignore_index=KEPT_ONLY, transform=self.transform)
        return tile

    def _weight_sum(self) -> torch.Tensor:
        if self.grad_weight is None:
            self.grad_weight = torch.zeros(self.weight.shape, dtype=self.sum_dtype, device=self.weight.device)
        return self.grad_weight

    def _pair_loss(self, first, last, chosen, rejected):
        """Loss share of pairs [first, last) and its gradients to (chosen, rejected) sums; reference grads kept."""
        refs = [None if r is None else r[first:last].detach().requires_grad_(need)
                for r, need in zip(self.refs, self.need_refs)]
        chosen, rejected = chosen.detach().requires_grad_(), rejected.detach().requires_grad_()
        with torch.enable_grad():
            part = self.chunk_loss(first, last, chosen, rejected, *refs)
            wrt = [chosen, rejected] + [r for r, need in zip(refs, self.need_refs) if need]
            grads = torch.autograd.grad(part, wrt, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads)]
        for target, need in zip(self.grad_refs, self.need_refs):
            if need:
                target[first:last] = grads.pop(2).float()
        self.loss += part.detach().float()
        return grads[0], grads[1]

    # -- the two kinds of chunk ----------------------------------------------------------

    def whole_pairs(self, chunk: Chunk):
        spans, pairs = self.spans, self.pairs
        c0, c1 = spans[chunk.first][0], spans[chunk.last - 1][1]
        r0, r1 = spans[pairs + chunk.first][0], spans[pairs + chunk.last - 1][1]
        h = torch.cat([self.hidden[c0:c1], self.hidden[r0:r1]])
        labels = torch.cat([self.labels[c0:c1], self.labels[r0:r1]])
        logits, finished = self._logps(h, labels, [(c0, c1), (r0, r1)])
        lengths = [e - s for s, e in spans[chunk.first:chunk.last]] + \
                  [e - s for s, e in spans[pairs + chunk.first:pairs + chunk.last]]
        sums = _segment_sums(finished.logps.detach(), lengths)
        g_c, g_r = self._pair_loss(chunk.first, chunk.last, sums[:len(sums) // 2], sums[len(sums) // 2:])
        # Per-token upstream gradient: each sequence's dL/dS on its tokens (device lengths: no host sync).
        counts = torch.cat([self.lengths[chunk.first:chunk.last], self.lengths[pairs + chunk.first:pairs + chunk.last]])
        grad_logps = torch.repeat_interleave(torch.cat([g_c, g_r]).float(), counts, output_size=h.shape[0])
        tile = self._gradient_tile(logits, labels, finished.lse, grad_logps)
        nc = c1 - c0
        if self.need_hidden:
            torch.mm(tile[:nc], self.weight, out=self.grad_hidden[c0:c1])
            torch.mm(tile[nc:], self.weight, out=self.grad_hidden[r0:r1])
        if self.need_weight:
            if self.single_gemm:  # one GEMM sums every token in float32 inside cuBLAS
                self.grad_weight = torch.mm(tile.t(), h)
            else:
                addmm_fp32(self._weight_sum(), tile.t(), h)
        if self.need_bias:
            self.grad_bias += tile.sum(dim=0, dtype=torch.float32)

    def split_pair(self, chunk: Chunk):
        p, spans, vocab = chunk.first, self.spans, self.weight.shape[0]
        sides = (spans[p], spans[self.pairs + p])
        device, H = self.hidden.device, self.hidden.shape[1]
        tokens = sum(e - s for s, e in sides)
        unit_hidden = torch.empty(tokens, H, dtype=self.sum_dtype, device=device) if self.need_hidden else None
        unit_weight = [torch.zeros(vocab, H, dtype=self.sum_dtype, device=device) if self.need_weight else None
                       for _ in sides]
        unit_bias = [torch.zeros(vocab, dtype=torch.float32, device=device) if self.need_bias else None
                     for _ in sides]
        sums, offset = [], 0
        for side, (s0, s1) in enumerate(sides):
            total = torch.zeros((), dtype=torch.float32, device=device)
            for t0 in range(s0, s1, chunk.piece_tokens):
                t1 = min(s1, t0 + chunk.piece_tokens)
                h, labels = self.hidden[t0:t1], self.labels[t0:t1]
                logits, finished = self._logps(h, labels, [(t0, t1)])
                total = total + finished.logps.detach().sum()
                tile = self._gradient_tile(logits, labels, finished.lse, torch.ones_like(finished.logps))
                if self.need_hidden:
                    rows_out = unit_hidden[offset:offset + t1 - t0]
                    if tile.dtype == rows_out.dtype:
                        torch.mm(tile, self.weight, out=rows_out)
                    else:
                        mm_float32(tile, self.weight, rows_out)
                if self.need_weight:
                    addmm_fp32(unit_weight[side], tile.t(), h)
                if self.need_bias:
                    unit_bias[side] += tile.sum(dim=0, dtype=torch.float32)
                offset += t1 - t0
            sums.append(total.reshape(1))
        g = self._pair_loss(p, p + 1, sums[0], sums[1])
        offset = 0
        for side, (s0, s1) in enumerate(sides):
            scale = g[side].float()
            if self.need_hidden:
                self.grad_hidden[s0:s1] = unit_hidden[offset:offset + s1 - s0] * scale
            if self.need_bias:
                self.grad_bias += unit_bias[side] * scale
            offset += s1 - s0
        if self.need_weight:
            # g_c A + g_r B in two passes (scalars stay on the device: no host read).
            merged = unit_weight[0].mul_(g[0].float()).addcmul_(unit_weight[1], g[1].float())
            del unit_weight
            if self.grad_weight is None:
                self.grad_weight = merged
            else:
                self.grad_weight += merged

    def finish(self):
        grad_weight = self.grad_weight
        if grad_weight is not None and grad_weight.dtype != self.weight.dtype:
            grad_weight = grad_weight.to(self.weight.dtype)  # the float32 sum, cast once
        grad_bias = None if self.grad_bias is None else self.grad_bias.to(self.bias.dtype)
        return self.grad_hidden, grad_weight, grad_bias, *self.grad_refs


def _chunk_tokens(chunk: Chunk, spans) -> int:
    """Rows of the largest logits tile of ``chunk``."""
    pairs = len(spans) // 2
    tokens = sum(e - s for s, e in spans[chunk.first:chunk.last]) + \
        sum(e - s for s, e in spans[pairs + chunk.first:pairs + chunk.last])
    return min(tokens, chunk.piece_tokens) if chunk.split else tokens


def _segment_sums(values: torch.Tensor, lengths: List[int]) -> torch.Tensor:
    """Sums of consecutive segments of ``values`` (host ``lengths``), in a fixed order."""
    parts = torch.split(values, lengths)
    return torch.stack([part.sum() for part in parts]) if parts else values.new_zeros(0)
