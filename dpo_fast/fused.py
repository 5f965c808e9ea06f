"""impl="fused": a forward with no logits in memory; the backward the arithmetic below picks.

Forward (2NHV, ``kernels/fused_linear_logps``): every (token block x vocabulary tile) of
logits goes from the ``tl.dot`` accumulator straight into the per-token statistics;
vocabulary splits are merged in split order. No logits tile ever exists in memory.

Backward, two routes (N tokens, H hidden, V vocabulary, e bytes per logits element):

- *tiled* (the chunked engine's, ``ChunkedEngine(TritonRows()).backward``): cuBLAS writes
  each logits tile into a bounded workspace, a Triton row kernel turns it into the
  softmax gradient in place, and two cuBLAS GEMMs consume it. FLOPs: 2NHV recompute +
  2NHV per gradient (6NHV with a trainable head, 4NHV frozen). Extra HBM bytes: the tile
  written, read and rewritten by the row kernel, and read once per gradient GEMM:
  about NV (2 e_logits + e_grad (1 + gradients)); at Llama-3-8B's head in bf16 (N=8192,
  H=4096, V=128256) 10.5 GB, ~3 ms at 3.35 TB/s against ~26 ms of GEMMs.
- *fused* (``_grad_hidden_kernel`` / ``_grad_weight_kernel``): each kernel recomputes the
  logits in registers (2NHV each) and adds its product (2NHV) into float32 rows it owns in
  HBM, re-read and re-written once per tile: 8 H bytes per (token, vocabulary tile) for
  grad_hidden, per (vocabulary row, token block) for grad_weight, i.e. 8NHV/BLOCK_V +
  8NHV/BLOCK_N bytes. At the shape above with 128 x 128 tiles that is 270 GB per gradient
  (~80 ms each on an H100): 5-7x the 6NHV floor, whatever the GEMM speed.

In FLOP-equivalents (bytes x the card's FLOP/byte balance: ~239 for an H100 at the 800 TFLOP/s
an 8192^3 bf16 GEMM reaches, over 3.35 TB/s of HBM; ~295 at its datasheet 989), with G gradients (hidden and/or weight), R recomputing
kernels (one per gradient kind), a fraction ``kept`` of tiles surviving gradient filtering
(1 without it), per NHV:

    fused = 2 R + kept (2 G + balance x 8 (1/BLOCK_V [if hidden] + 1/BLOCK_N [if weight]))
    tiled = 2 + 2 G + balance x (2 e_logits + e_grad (1 + G)) / H

At Llama-3-8B's head (bf16, 128 x 128 tiles): fused 4 + 33.9 kept, tiled 6.82 (trainable);
fused 2 + 16.9 kept, tiled 4.70 (frozen). A bias gradient adds a tile read to the tiled
route and, alone, one recomputing kernel to the fused one. The arithmetic lives in
:func:`dpo_fast.cost_model.fused_backward_wins`, beside every other route's cost.

So the fused backward wins only where H is small (frozen bf16 head: H < ~128 at 128-wide
tiles), or where filtering skips most tiles (``filter_eps > 0``; trainable head at
Llama-3-8B's shape: kept < ~8%, frozen < ~16% at balance 239; ~7% and ~14% at 295). :func:`fused_backward_wins` is that
rule; the engine applies it with kept = 1, and ``filter_eps > 0`` always takes the fused
backward because no other route filters. Memory beyond the gradients: O(tokens) plus
``memory_budget`` (tiled: the workspace; fused: float32 split partials and scratch).
"""

from typing import Optional

import torch

from dpo_fast.kernels import fused_linear_logps as kernels

from . import cost_model as cm
from .chunked import ChunkedEngine, logits_dtype
from .rows import TritonRows
from .transform import LogitTransform

BACKWARD_ROUTES = ("fused", "tiled")


def fused_backward_wins(tokens: int, hidden_size: int, vocab: int, input_dtype: torch.dtype, *,
                        need_hidden: bool = True, need_weight: bool = True, need_bias: bool = False,
                        kept_fraction: float = 1.0, card: cm.Card = cm.DEFAULT_CARD) -> bool:
    """The rule of the module docstring for these kernels' tiles and dtypes: the arithmetic itself is
    :func:`dpo_fast.cost_model.fused_backward_wins`, beside every other route's cost."""
    block_n, block_v = kernels.default_blocks(input_dtype)
    return cm.fused_backward_wins(tokens, hidden_size, vocab, input_dtype.itemsize,
                                  logits_dtype(input_dtype).itemsize, block_n=block_n, block_v=block_v,
                                  need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
                                  kept_fraction=kept_fraction, card=card)


def _dense(bias):
    """The kernels read bias[v] at ``b_ptr + v`` and hidden/weight at their strides: a strided bias view
    (``bias[::2]``, a column of a parameter block) is copied once (V elements), not misread."""
    return None if bias is None else bias.contiguous()


class FusedEngine:
    """Engine (see ``function.py``): fused forward; backward by :func:`fused_backward_wins`.

    ``filter_eps > 0`` turns on gradient filtering (fused backward only): a tile whose every
    ``|d loss / d z|`` (for log-probs: ``|g| * |onehot - softmax|``) is below ``filter_eps``
    is skipped. Gradients are then *approximate* (each skipped entry is under
    ``filter_eps`` times ``dz/ds``); the default 0 keeps them exact. ``memory_budget``
    bounds the tiled backward's workspace or the fused backward's float32 scratch.
    ``vocab_splits`` fixes the vocabulary split count (None: from the GPU's size).
    ``backward_route`` ('fused' or 'tiled') overrides the rule (tests, measurements).
    """

    name = "fused"

    def __init__(self, filter_eps: float = 0.0, memory_budget: Optional[int] = None,
                 vocab_splits: Optional[int] = None, backward_route: Optional[str] = None):
        if backward_route is not None and backward_route not in BACKWARD_ROUTES:
            raise ValueError(f"backward_route must be one of {BACKWARD_ROUTES} or None, got {backward_route!r}")
        if backward_route == "tiled" and filter_eps > 0:
            raise ValueError("filter_eps > 0 needs the fused backward (backward_route='fused' or None)")
        self.filter_eps = float(filter_eps)
        self.memory_budget = memory_budget or kernels.DEFAULT_WORKSPACE_BYTES
        self.vocab_splits = vocab_splits
        self.backward_route = backward_route

    def forward_stats(self, hidden, weight, bias, labels, transform: LogitTransform) -> torch.Tensor:
        return kernels.forward_stats(hidden, weight, _dense(bias), labels.contiguous(),
                                     num_splits=self.vocab_splits, **transform.kernel_args())

    def route(self, hidden, weight, needs) -> str:
        if self.backward_route is not None:
            return self.backward_route
        if self.filter_eps > 0:
            return "fused"
        n, hidden_size = hidden.shape
        wins = fused_backward_wins(n, hidden_size, weight.shape[0], hidden.dtype, need_hidden=needs[0],
                                   need_weight=needs[1], need_bias=needs[2])
        return "fused" if wins else "tiled"

    def backward(self, hidden, weight, bias, labels, transform: LogitTransform, lse, grad_logp, entropy=None,
                 grad_entropy=None, needs=(True, True, True)):
        """Gradients of sum(grad_logp * logp + grad_entropy * entropy) to (hidden, weight, bias)."""
        if self.route(hidden, weight, needs) == "tiled":
            return ChunkedEngine(TritonRows(), self.memory_budget).backward(
                hidden, weight, bias, labels, transform, lse, grad_logp, entropy=entropy,
                grad_entropy=grad_entropy, needs=needs)
        need_hidden, need_weight, need_bias = needs
        return kernels.backward(
            hidden, weight, _dense(bias), labels.contiguous(), lse, grad_logp, entropy=entropy,
            grad_entropy=grad_entropy,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, filter_eps=self.filter_eps,
            num_splits=self.vocab_splits, workspace_bytes=self.memory_budget, **transform.kernel_args(),
        )
