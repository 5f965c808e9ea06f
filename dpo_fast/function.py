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


def refuse_second_order(what: str) -> None:
    """Raise in a custom backward run with ``create_graph=True``.

    The backward kernels (and ``out=`` GEMMs) build no autograd graph, so a gradient made
    under ``create_graph=True`` would be silently first order: its own derivative would miss
    every path through the softmax. Grad mode is on inside a backward exactly when the
    caller asked for a graph.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"dpo_fast: {what} has no second-order gradient (create_graph=True / double backward): its "
            "backward runs kernels outside autograd. Take first-order gradients (create_graph=False), or use "
            "dpo_fast.reference (materialized logits) where higher-order gradients are needed.")


class TokenLogpsFunction(torch.autograd.Function):
    """Per-token log-probs and entropy from hidden states through an engine (see the module docstring).

    Math: ``logp_t = z_t[label_t] - lse_t``, ``z = transform(hidden @ weight^T + bias)``;
    backward ``dz = g (onehot - p) - ge p (log p + H)``, then ``dhidden = dz W``,
    ``dweight = dz^T hidden``. FLOPs: 2NHV forward; backward 4NHV plus the engine's
    recompute of the logits (2NHV). Memory: the engine's bounded workspace; saved are the
    inputs and per-token float64 lse and float32 entropy. First order only.
    """

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
        refuse_second_order("token_logps / sequence_logps / dpo_loss (two-pass route)")
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        if grad_logps is None:
            grad_logps = torch.zeros_like(lse)
        grad_hidden, grad_weight, grad_bias = ctx.engine.backward(
            hidden, weight, bias, labels, ctx.transform, lse, grad_logps, entropy=entropy,
            grad_entropy=grad_entropy, needs=tuple(ctx.needs_input_grad[:3]),
        )
        return grad_hidden, grad_weight, grad_bias, None, None, None
