"""impl="fused": tl.dot kernels that never write logits to memory (``kernels/fused_linear_logps``).

Forward folds every (token block x vocabulary tile) of logits, straight out of the GEMM
accumulator, into the per-token statistics (2NHV). Backward recomputes the tiles twice,
once in a token-major kernel for grad_hidden and once in a vocabulary-major kernel for
grad_weight and grad_bias, so each float32 accumulator has a single owner: exact and
bit-for-bit repeatable without atomics (8NHV for both gradients, 4NHV for a frozen head).
Memory beyond the gradients themselves is O(tokens) plus bounded float32 scratch.
"""

from typing import Optional

import torch

from dpo_fast.kernels import fused_linear_logps as kernels

from .transform import LogitTransform


class FusedEngine:
    """Engine (see ``function.py``) over the fused kernels.

    ``filter_eps > 0`` turns on gradient filtering: backward skips a tile whose every
    ``|d loss / d z|`` (for log-probs: ``|g| * |onehot - softmax|``) is below ``filter_eps``.
    That makes gradients *approximate* (each skipped entry is under ``filter_eps`` times
    ``dz/ds``); the default 0 keeps them exact. ``memory_budget`` bounds the float32
    scratch (grad_hidden split partials, weight-gradient rows for 16-bit weights);
    ``vocab_splits`` fixes the vocabulary split count (None: from the GPU's size).
    """

    name = "fused"

    def __init__(self, filter_eps: float = 0.0, memory_budget: Optional[int] = None,
                 vocab_splits: Optional[int] = None):
        self.filter_eps = float(filter_eps)
        self.memory_budget = memory_budget or kernels.DEFAULT_WORKSPACE_BYTES
        self.vocab_splits = vocab_splits

    def forward_stats(self, hidden, weight, bias, labels, transform: LogitTransform) -> torch.Tensor:
        return kernels.forward_stats(hidden, weight, bias, labels.contiguous(), num_splits=self.vocab_splits,
                                     **transform.kernel_args())

    def backward(self, hidden, weight, bias, labels, transform: LogitTransform, lse, grad_logp, entropy=None,
                 grad_entropy=None, needs=(True, True, True)):
        """Gradients of sum(grad_logp * logp + grad_entropy * entropy) to (hidden, weight, bias)."""
        need_hidden, need_weight, need_bias = needs
        return kernels.backward(
            hidden, weight, bias, labels, lse, grad_logp, entropy=entropy, grad_entropy=grad_entropy,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, filter_eps=self.filter_eps,
            num_splits=self.vocab_splits, workspace_bytes=self.memory_budget, **transform.kernel_args(),
        )
