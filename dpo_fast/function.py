"""The autograd Function every hidden-state path runs through.

An *engine* (``ChunkedEngine`` with Triton or PyTorch rows, ``FusedEngine``) supplies two
operations on kept tokens only:

- ``forward_stats(hidden, weight, bias, labels, transform) -> stats[NUM_STATS, n]``
- ``backward(hidden, weight, bias, labels, transform, lse, grad_logp, entropy, grad_entropy,
  needs) -> (grad_hidden, grad_weight, grad_bias)``

This Function turns them into per-token outputs with TRL's five-tuple meaning: log-probs
and entropy (both differentiable), log(sum p^2), the vocab-mean logit and the top-1 flag.
"""

import torch

from .rows import KEPT_ONLY, finish_stats


class TokenLogpsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, engine, transform):
        ctx.set_materialize_grads(False)
        stats = engine.forward_stats(hidden, weight, bias, labels, transform)
        # A vocabulary-parallel engine knows the full head's size; others see it whole.
        out = finish_stats(stats, labels, getattr(engine, "vocab_size", weight.shape[0]), KEPT_ONLY)
        ctx.save_for_backward(hidden, weight, bias, labels, out.lse, out.entropy)
        ctx.engine, ctx.transform = engine, transform
        ctx.mark_non_differentiable(out.log_sum_sq_probs, out.mean_logits, out.is_top1)
        return out.logps, out.entropy, out.log_sum_sq_probs, out.mean_logits, out.is_top1

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_unused):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        if grad_logps is None:
            grad_logps = torch.zeros_like(lse)
        grad_hidden, grad_weight, grad_bias = ctx.engine.backward(
            hidden, weight, bias, labels, ctx.transform, lse, grad_logps, entropy=entropy,
            grad_entropy=grad_entropy, needs=tuple(ctx.needs_input_grad[:3]),
        )
        return grad_hidden, grad_weight, grad_bias, None, None, None
