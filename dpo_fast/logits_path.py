"""Log-probs from logits a trainer already holds: one pass forward, one pass backward.

Forward reads each row once (online log-sum-exp, target gather, metric statistics) and
keeps only float32 per-row statistics. Backward writes ``g * (onehot - softmax)`` in one
pass, into a new tensor or, with ``inplace=True``, over the logits buffer itself (no
second ``[N, V]`` tensor; the logits must not be read again afterwards).
"""

from typing import List

import torch

from .function import refuse_second_order
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


def has_internal_overlap(tensor: torch.Tensor) -> bool:
    """True unless every element provably has its own memory (an expanded, stride-0 view has not).

    Sufficient test: with dims sorted by stride, each stride must step past the whole
    extent of the smaller ones.
    """
    extent = 0
    for stride, size in sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s > 1):
        if stride <= extent:
            return True
        extent += (size - 1) * stride
    return False


def check_inplace_logits(logits: torch.Tensor) -> None:
    """``inplace=True`` writes the gradient over the logits: each element needs its own memory."""
    if has_internal_overlap(logits):
        raise ValueError(
            f"inplace=True needs logits whose elements do not share memory; got shape {tuple(logits.shape)} "
            f"with strides {logits.stride()} (an expanded or otherwise overlapping view): pass "
            "logits.contiguous() or use inplace=False")


class LogitsLogpsFunction(torch.autograd.Function):
    """Per-token log-probs (and metrics) from logits, one read forward and one write backward.

    Math: ``logp = z[label] - lse`` with ``z = logits / temperature``; backward
    ``dlogits = g (onehot - softmax(z)) / temperature``. FLOPs: O(NV) each way. Memory:
    saves the logits (a reference, no copy when their last stride is 1) and a float64 lse
    per row; backward allocates one ``[N, V]`` gradient, or none with ``inplace=True``,
    where it overwrites the logits and bumps their version counter so that any other
    saved use of them fails loudly in its own backward, as a PyTorch in-place op would.
    First order only.
    """

    @staticmethod
    def forward(ctx, logits, labels, rows, transform: LogitTransform, ignore_index: int, inplace: bool):
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        if inplace:
            check_inplace_logits(logits)
        # The row kernels read labels[row] at labels_ptr + row: a strided view (labels[::2]) is copied once.
        flat_labels = labels.reshape(-1).contiguous()
        stats = init_stats(flat_labels.numel(), logits.device, rows.stats_dtype(logits.dtype))
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
        refuse_second_order("the log-probs from logits")
        logits, labels, lse = ctx.saved_tensors
        grad = logits if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = None if ctx.inplace else grad.view(-1, logits.shape[-1])
        grad_logps = grad_logps.to(ctx.rows.stats_dtype(logits.dtype)).contiguous()
        offset = 0
        for block in row_blocks(logits):
            end = offset + block.shape[0]
            ctx.rows.grad(block, labels[offset:end], lse[offset:end], grad_logps[offset:end],
                          block if ctx.inplace else grad_rows[offset:end], vocab_start=0,
                          ignore_index=ctx.ignore_index, transform=ctx.transform)
            offset = end
        if ctx.inplace:
            # Kernels write through a raw pointer: tell autograd the logits changed, so a
            # backward that saved them (another op, or a second call on the same logits) errors
            # instead of reading gradients as logits.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None
