"""Log-probs from logits a trainer already holds: one pass forward, one pass backward.

Forward reads each row once (online log-sum-exp, target gather, metric statistics) and
keeps only float32 per-row statistics. Backward writes ``g * (onehot - softmax)`` in one
pass, into a new tensor or, with ``inplace=True``, over the logits buffer itself (no
second ``[N, V]`` tensor; the logits must not be read again afterwards).
"""

from typing import List

import torch

from .rows import finish_stats, init_stats
from .transform import LogitTransform


def row_blocks(logits: torch.Tensor) -> List[torch.Tensor]:
    """2-D ``[rows, V]`` views with unit column stride covering every row in order, no copy.

    ``logits[:, :-1]`` cannot be flattened to one 2-D view; it becomes one view per leading
    index instead of a copy.
    """
    if logits.dim() == 1:
        return [logits.unsqueeze(0)]
    if logits.stride(-1) != 1:
        raise ValueError("logits must have unit stride along the vocabulary dimension")
    try:
        return [logits.view(-1, logits.shape[-1])]
    except RuntimeError:
        return [block for sub in logits.unbind(0) for block in row_blocks(sub)]


class LogitsLogpsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, rows, transform: LogitTransform, ignore_index: int, inplace: bool):
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        flat_labels = labels.reshape(-1)
        stats = init_stats(flat_labels.numel(), logits.device)
        offset = 0
        for block in row_blocks(logits):
            end = offset + block.shape[0]
            rows.stats(block, flat_labels[offset:end], stats[:, offset:end], vocab_start=0,
                       ignore_index=ignore_index, transform=transform)
            offset = end
        out = finish_stats(stats, flat_labels, logits.shape[-1], ignore_index)
        ctx.save_for_backward(logits, flat_labels, out.lse)
        ctx.rows, ctx.transform, ctx.ignore_index, ctx.inplace = rows, transform, ignore_index, inplace
        metrics = (out.entropy, out.log_sum_sq_probs, out.mean_logits, out.is_top1)
        ctx.mark_non_differentiable(*metrics)
        return (out.logps,) + metrics

    @staticmethod
    def backward(ctx, grad_logps, *_unused):
        logits, labels, lse = ctx.saved_tensors
        grad = logits if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = None if ctx.inplace else grad.view(-1, logits.shape[-1])
        grad_logps = grad_logps.float().contiguous()
        offset = 0
        for block in row_blocks(logits):
            end = offset + block.shape[0]
            ctx.rows.grad(block, labels[offset:end], lse[offset:end], grad_logps[offset:end],
                          block if ctx.inplace else grad_rows[offset:end], vocab_start=0,
                          ignore_index=ctx.ignore_index, transform=ctx.transform)
            offset = end
        return grad, None, None, None, None, None
