"""impl="chunked" (and, with PyTorch rows, impl="torch"): GEMM tiles into a bounded workspace.

Logits exist only as one ``[token_chunk, vocab_block]`` tile at a time, written by a
cuBLAS GEMM into a reused buffer and folded by the row kernels (``rows.py``).

- Two-pass (8NHV): forward folds tiles into per-token statistics (2NHV); backward walks
  the vocabulary block by block, recomputes each tile, turns it into the softmax
  gradient in place and accumulates ``grad_hidden`` and that block of ``grad_weight`` in
  float32 (4NHV + 2NHV of recompute). Only one vocabulary block of float32 weight
  gradient is alive at a time.
- Whole pairs (6NHV, :func:`pair_chunk_loss`): when the loss of a pair depends on that
  pair alone and complete pairs fit the budget, a chunk's full-vocabulary logits are
  computed once, the pair losses and their gradients are taken inside the chunk, and
  the tile becomes the softmax gradient in place before the two gradient GEMMs.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .function import refuse_second_order
from .rows import KEPT_ONLY, finish_stats, init_stats
from .transform import LogitTransform

DEFAULT_MEMORY_BUDGET = 512 * 2**20  # bytes of logits workspace plus float32 weight-gradient block


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc`` without rounding ``a @ b`` to a 16-bit dtype first."""
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):  # torch without out_dtype for addmm
            pass
    acc.addmm_(a.float(), b.float())


@dataclass(frozen=True)
class TilePlan:
    token_chunk: int
    vocab_block: int


def plan_tiles(num_tokens: int, vocab: int, hidden_size: int, element_size: int, memory_budget: int,
               weight_grad: bool) -> TilePlan:
    """Largest tiles that keep the workspace (and the float32 weight-gradient block) in budget."""
    tile_budget = memory_budget // 2 if weight_grad else memory_budget
    vocab_block = vocab
    if weight_grad:  # a float32 [vocab_block, H] accumulator takes the other half
        vocab_block = min(vocab, max(1, (memory_budget // 2) // (4 * hidden_size)))
    # Leave room for at least a few dozen tokens per tile so the GEMMs stay efficient.
    vocab_block = min(vocab_block, max(1, tile_budget // (element_size * min(max(num_tokens, 1), 64))))
    if vocab_block < vocab and vocab_block >= 256:
        vocab_block -= vocab_block % 256
    token_chunk = max(1, min(max(num_tokens, 1), tile_budget // (element_size * vocab_block)))
    return TilePlan(token_chunk=token_chunk, vocab_block=vocab_block)


def logits_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the logits tiles: the inputs', but float32 for float16 inputs.

    float16 logits overflow past 65504 (bfloat16 shares float32's range). Their gradient
    (|dz| <= |g|) fits float16, so the gradient GEMMs still run on float16 operands.
    """
    return torch.float32 if input_dtype == torch.float16 else input_dtype


def bytes_per_logit(input_dtype: torch.dtype, with_gradient: bool) -> int:
    """Workspace bytes per tile element: the logits, plus a separate gradient tile when their dtypes differ."""
    tile = logits_dtype(input_dtype)
    separate = with_gradient and tile != input_dtype
    return tile.itemsize + (input_dtype.itemsize if separate else 0)


def _matmul_float32(hidden_chunk, weight_block, bias_block, out):
    """out (float32) = hidden @ weight^T (+ bias) for 16-bit operands, without a 16-bit result."""
    if out.device.type == "cuda":
        try:  # cuBLAS writes float32 straight from 16-bit operands (torch >= 2.8)
            torch.mm(hidden_chunk, weight_block.t(), out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError):
            torch.mm(hidden_chunk.float(), weight_block.float().t(), out=out)
    else:
        torch.mm(hidden_chunk.float(), weight_block.float().t(), out=out)
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
    """Per-token statistics and their backward over bounded GEMM tiles."""

    def __init__(self, rows, memory_budget: int = DEFAULT_MEMORY_BUDGET):
        self.rows = rows
        self.memory_budget = memory_budget

    def _plan(self, hidden, weight, backward: bool, weight_grad: bool = False):
        return plan_tiles(hidden.shape[0], weight.shape[0], weight.shape[1],
                          bytes_per_logit(hidden.dtype, with_gradient=backward), self.memory_budget, weight_grad)

    def forward_stats(self, hidden, weight, bias, labels, transform: LogitTransform,
                      ignore_index: int = KEPT_ONLY) -> torch.Tensor:
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

    def backward(self, hidden, weight, bias, labels, transform: LogitTransform, lse, grad_logp,
                 entropy=None, grad_entropy=None, needs=(True, True, True), ignore_index: int = KEPT_ONLY):
        """Gradients of sum(grad_logp * logp + grad_entropy * entropy) to (hidden, weight, bias)."""
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

def plan_pair_chunks(pair_tokens: List[int], vocab: int, input_dtype: torch.dtype,
                     memory_budget: int) -> Optional[List[List[int]]]:
    """Group consecutive pairs into chunks whose full-vocabulary logits fit the budget.

    None when a single pair does not fit (the caller then takes the two-pass route).
    """
    max_tokens = memory_budget // (bytes_per_logit(input_dtype, with_gradient=True) * vocab)
    chunks, current, used = [], [], 0
    for pair, tokens in enumerate(pair_tokens):
        if tokens > max_tokens:
            return None
        if current and used + tokens > max_tokens:
            chunks.append(current)
            current, used = [], 0
        current.append(pair)
        used += tokens
    if current:
        chunks.append(current)
    return chunks


class PairChunkLoss(torch.autograd.Function):
    """Loss over whole pairs, logits computed once per chunk; gradients made in forward.

    ``chunk_loss(chunk_pairs, chosen_logps, rejected_logps)`` returns the chunk's share of
    the batch loss (its pairs' losses over the batch's pair count), differentiable in the
    two log-prob vectors. Outputs: the loss and the per-token statistics (detached).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, transform: LogitTransform, tokens_by_pair,
                chunks, chunk_loss: Callable):
        """``hidden`` rows are kept tokens ordered [chosen_0 .. chosen_B-1, rejected_0 ..]; ``tokens_by_pair``
        holds, for pair p, the (start, end) of its chosen and rejected tokens in that order."""
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        stats = init_stats(n, hidden.device)
        largest = max(sum(_span(tokens_by_pair[p]) for p in chunk) for chunk in chunks)
        workspace = Workspace(largest * vocab, hidden.dtype, hidden.device, with_gradient=True)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for chunk in chunks:
            token_index = torch.cat([_token_range(tokens_by_pair[p], hidden.device) for p in chunk])
            h = hidden[token_index]
            chunk_labels = labels[token_index]
            logits = workspace.logits(h, weight, bias)
            chunk_stats = init_stats(h.shape[0], hidden.device)
            rows.stats(logits, chunk_labels, chunk_stats, vocab_start=0, ignore_index=KEPT_ONLY, transform=transform)
            stats[:, token_index] = chunk_stats
            finished = finish_stats(chunk_stats, chunk_labels, vocab, ignore_index=KEPT_ONLY)
            logps = finished.logps.detach().requires_grad_(True)
            with torch.enable_grad():
                chosen, rejected = _pair_sums(logps, [tokens_by_pair[p] for p in chunk])
                part = chunk_loss(chunk, chosen, rejected)
                (grad_logps,) = torch.autograd.grad(part, logps)
            loss += part.detach().float()
            tile = workspace.gradient_tile(logits)  # the logits tile itself unless inputs are float16
            rows.grad(logits, chunk_labels, finished.lse, grad_logps.float().contiguous(), tile, vocab_start=0,
                      ignore_index=KEPT_ONLY, transform=transform)
            if need_hidden:
                grad_hidden[token_index] = torch.mm(tile, weight)
            if need_weight:
                # One chunk: a single GEMM accumulates in float32. Several chunks add into
                # grad_weight, which the dispatcher allows only for float32 weights.
                grad_weight.addmm_(tile.t(), h)
            if need_bias:
                grad_bias += tile.sum(dim=0, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(bias.dtype))
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        refuse_second_order("dpo_loss (whole-pair route)")  # the saved gradients carry no graph
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(grad_hidden), scale(grad_weight), scale(grad_bias), None, None, None, None, None, None


def _span(spans) -> int:
    (c0, c1), (r0, r1) = spans
    return (c1 - c0) + (r1 - r0)


def _token_range(spans, device) -> torch.Tensor:
    (c0, c1), (r0, r1) = spans
    return torch.cat([torch.arange(c0, c1, device=device), torch.arange(r0, r1, device=device)])


def _pair_sums(logps, spans_of_pairs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunk-local log-probs laid out pair by pair (chosen, then rejected) -> two [pairs] sums."""
    chosen, rejected, offset = [], [], 0
    for (c0, c1), (r0, r1) in spans_of_pairs:
        chosen.append(logps[offset: offset + c1 - c0].sum())
        offset += c1 - c0
        rejected.append(logps[offset: offset + r1 - r0].sum())
        offset += r1 - r0
    return torch.stack(chosen), torch.stack(rejected)
