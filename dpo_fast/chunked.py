"""impl="chunked" (and, with PyTorch rows, impl="torch"): GEMM tiles into a bounded workspace.

Logits exist only as one ``[token_chunk, vocab_block]`` tile at a time, written by a
cuBLAS GEMM into a reused buffer and folded by the row kernels (``rows.py``).

- Two-pass (8NHV): forward folds tiles into per-token statistics (2NHV); backward walks
  the vocabulary block by block, recomputes each tile, turns it into the softmax
  gradient in place and accumulates ``grad_hidden`` and that block of ``grad_weight`` in
  float32 (4NHV + 2NHV of recompute). Only one vocabulary block of float32 weight
  gradient is alive at a time.
- Whole pairs (6NHV): ``whole_pairs.py``, on this module's workspace.

Which route, and the tile and chunk sizes, come from ``planner.py``. Logits tiles are
float32 for 16-bit inputs (``logits_dtype``). float64 inputs on PyTorch rows compute in
float64 throughout (tiles, statistics, accumulators: ``TorchRows.stats_dtype``); the Triton
rows compute in float32, so the public functions refuse float64 for them (``api.resolve_impl``).
"""

from typing import Optional

import torch

from . import planner
from .gemm import addmm_fp32, mm_float32, write_fp32
from .precision import ieee_float32_matmul
from .planner import plan_tiles  # noqa: F401  (tile sizes live in the planner; re-exported)
from .rows import KEPT_ONLY, TorchRows, init_stats
from .transform import LogitTransform

DEFAULT_MEMORY_BUDGET = planner.CPU_MEMORY_BUDGET  # see planner.default_memory_budget for CUDA devices


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

    def __init__(self, numel: int, input_dtype, device, with_gradient: bool = False,
                 gradient_numel: Optional[int] = None):
        """``gradient_numel``: elements of the 16-bit gradient tile when it serves smaller tiles than the
        logits (default ``numel``)."""
        self.input_dtype = input_dtype
        self.buffer = torch.empty(numel, dtype=logits_dtype(input_dtype), device=device)
        separate = with_gradient and self.buffer.dtype != input_dtype
        self.grad_buffer = (torch.empty(numel if gradient_numel is None else gradient_numel, dtype=input_dtype,
                                        device=device) if separate else None)

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


def _accumulator_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Gradient sums: float32 for 16-bit and float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(input_dtype, torch.float32)


def rows_workspace(rows, tokens: int, vocab: int, input_dtype: torch.dtype) -> int:
    """Bytes a row backend allocates per call on a tile of at most ``tokens x vocab`` (0 for the kernels)."""
    return rows.workspace_bytes(tokens, vocab, input_dtype) if hasattr(rows, "workspace_bytes") else 0


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
                                    hidden.device, self.memory_budget, backward, weight_grad,
                                    rows_workspace(self.rows, hidden.shape[0], weight.shape[0], hidden.dtype))

    def forward_stats(self, hidden, weight, bias, labels, transform: LogitTransform,
                      ignore_index: int = KEPT_ONLY) -> torch.Tensor:
        # The tiles' precision is chosen here: no autocast, and a float32 head in IEEE float32 (precision.py).
        with torch.autocast(hidden.device.type, enabled=False), ieee_float32_matmul(hidden.dtype):
            return self._forward_stats(hidden, weight, bias, labels, transform, ignore_index)

    def _forward_stats(self, hidden, weight, bias, labels, transform, ignore_index):
        if self.batch_invariant:
            return self._invariant_forward_stats(hidden, weight, bias, labels, transform, ignore_index)
        n, vocab = hidden.shape[0], weight.shape[0]
        plan = self._plan(hidden, weight, backward=False)
        stats = init_stats(n, hidden.device, self.rows.stats_dtype(hidden.dtype))
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
        rows = (TorchRows(slab_elements=tokens * block, metrics=self.rows.metrics) if isinstance(self.rows, TorchRows)
                else self.rows)
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
        with torch.autocast(hidden.device.type, enabled=False), ieee_float32_matmul(hidden.dtype):
            return self._backward(hidden, weight, bias, labels, transform, lse, grad_logp, entropy, grad_entropy,
                                  needs, ignore_index)

    def _backward(self, hidden, weight, bias, labels, transform, lse, grad_logp, entropy, grad_entropy, needs,
                  ignore_index):
        need_hidden, need_weight, need_bias = needs
        n, vocab = hidden.shape[0], weight.shape[0]
        plan = self._plan(hidden, weight, backward=True, weight_grad=need_weight)
        workspace = Workspace(min(n, plan.token_chunk) * plan.vocab_block, hidden.dtype, hidden.device,
                              with_gradient=True)
        # float32 sums written by their first product (beta=0), never zero-filled first.
        acc = _accumulator_dtype(hidden.dtype)
        grad_hidden_acc = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_bias else None
        stats_dtype = self.rows.stats_dtype(hidden.dtype)
        grad_logp = grad_logp.to(stats_dtype).contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.to(stats_dtype).contiguous()
        # Vocabulary-major: each block of grad_weight is finished in float32, then written once.
        # One float32 block buffer serves every block (the ragged last one uses its head).
        block_buffer = None
        if need_weight:  # no token to write it when none is kept: zeros then
            block_buffer = (torch.empty if n else torch.zeros)(min(plan.vocab_block, vocab), weight.shape[1],
                                                               dtype=acc, device=weight.device)
        for v0, v1 in _ranges(vocab, plan.vocab_block):
            weight_block = weight[v0:v1]
            block_acc = block_buffer[:v1 - v0] if need_weight else None
            for t0, t1 in _ranges(n, plan.token_chunk):
                logits = workspace.logits(hidden[t0:t1], weight_block, None if bias is None else bias[v0:v1])
                tile = workspace.gradient_tile(logits)  # the logits tile itself unless inputs are float16
                self.rows.grad(logits, labels[t0:t1], lse[t0:t1], grad_logp[t0:t1], tile, vocab_start=v0,
                               ignore_index=ignore_index, transform=transform,
                               entropy=None if grad_entropy is None else entropy[t0:t1],
                               grad_entropy=None if grad_entropy is None else grad_entropy[t0:t1])
                if need_hidden:
                    (write_fp32 if v0 == 0 else addmm_fp32)(grad_hidden_acc[t0:t1], tile, weight_block)
                if need_weight:
                    (write_fp32 if t0 == 0 else addmm_fp32)(block_acc, tile.t(), hidden[t0:t1])
                if need_bias:
                    grad_bias[v0:v1] += tile.sum(dim=0, dtype=acc)
            if need_weight:
                grad_weight[v0:v1] = block_acc
        return (
            None if grad_hidden_acc is None else grad_hidden_acc.to(hidden.dtype),
            grad_weight,
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
