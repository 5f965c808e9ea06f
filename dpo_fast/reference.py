"""The float64 oracle, and the naive computation trainers run today.

Materialize the logits, post-process them, ``log_softmax``, gather at the label, mask
and sum per sequence, then the shared loss table. With ``dtype=torch.float64`` (the
default) every input is upcast first: that is the oracle every path is tested against.
With ``dtype=None`` it is the naive trainer: logits in the inputs' dtype, upcast to
float32 for the log-softmax.

Nothing here is clever, on purpose: it must be obviously right.
"""

from typing import Optional

import torch

from .objective import DPOOutput, LossConfig, batch_loss, dpo_output
from .transform import LogitTransform


def _logits(hidden, weight, bias, dtype):
    if dtype is None:
        return torch.nn.functional.linear(hidden, weight, bias).float()
    return torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def token_outputs_from_logits(logits, labels, *, ignore_index=-100, transform=LogitTransform(), dtype=torch.float64):
    """Per-token log-probs and metrics shaped like ``labels`` (zeros where ignored)."""
    z = transform.apply(logits.float() if dtype is None else logits.to(dtype))
    log_probs = torch.log_softmax(z, dim=-1)
    kept = labels != ignore_index
    safe_labels = torch.where(kept, labels, torch.zeros_like(labels)).long()
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    logps = torch.where(kept, log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1), zero)
    with torch.no_grad():
        probs = log_probs.exp()
        entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)
        metrics = dict(
            entropy=torch.where(kept, entropy, zero),
            log_sum_sq_probs=torch.where(kept, torch.logsumexp(2 * log_probs, dim=-1), zero),
            mean_logits=torch.where(kept, z.mean(-1), zero),
            is_top1=kept & (z.argmax(-1) == labels),
        )
    return logps, metrics


def token_outputs(hidden, weight, labels, *, bias=None, ignore_index=-100, transform=LogitTransform(),
                  dtype=torch.float64):
    return token_outputs_from_logits(_logits(hidden, weight, bias, dtype), labels, ignore_index=ignore_index,
                                     transform=transform, dtype=dtype)


def sequence_index(labels, sequence_ids=None, cu_seqlens=None, num_sequences=None):
    """(sequence of every token [N], number of sequences) for [R, T] or packed labels; ``num_sequences``:
    the count of ``sequence_ids`` sequences (else the largest id + 1)."""
    if labels.dim() == 2:
        rows, cols = labels.shape
        return torch.arange(rows, device=labels.device).repeat_interleave(cols), rows
    if cu_seqlens is not None:
        positions = torch.arange(labels.numel(), device=labels.device)
        return torch.searchsorted(cu_seqlens.long(), positions, right=True) - 1, cu_seqlens.numel() - 1
    if sequence_ids is not None:
        ids = sequence_ids.reshape(-1).long()
        return ids, int(ids.max()) + 1 if num_sequences is None else num_sequences
    return torch.zeros(labels.numel(), dtype=torch.long, device=labels.device), 1


def per_sequence(values, labels, sequence_ids=None, cu_seqlens=None, num_sequences=None):
    """Sum per-token values into sequences."""
    seq, count = sequence_index(labels, sequence_ids, cu_seqlens, num_sequences)
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, seq, values.reshape(-1))


def sequence_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, transform=LogitTransform(),
                   sequence_ids=None, cu_seqlens=None, average=False, dtype=torch.float64, num_sequences=None):
    logps, _ = token_outputs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, transform=transform,
                             dtype=dtype)
    sums = per_sequence(logps, labels, sequence_ids, cu_seqlens, num_sequences)
    if not average:
        return sums
    lengths = per_sequence((labels != ignore_index).to(sums.dtype), labels, sequence_ids, cu_seqlens, num_sequences)
    return sums / lengths.clamp(min=1)


def dpo_loss_from_token_outputs(logps, metrics, labels, *, ignore_index, ref_chosen_logps, ref_rejected_logps,
                                cfg: LossConfig, sequence_ids=None, cu_seqlens=None, num_sequences=None) -> DPOOutput:
    def seq(values):
        return per_sequence(values, labels, sequence_ids, cu_seqlens, num_sequences)

    lengths = seq((labels != ignore_index).to(logps.dtype))
    sequence = seq(logps)
    loss = batch_loss(sequence, lengths, ref_chosen_logps, ref_rejected_logps, cfg)
    return dpo_output(loss, sequence, lengths, ref_chosen_logps, ref_rejected_logps, cfg,
                      seq(metrics["mean_logits"]), seq(metrics["is_top1"].to(logps.dtype)), seq(metrics["entropy"]))


def dpo_loss(hidden, weight, labels, *, bias=None, ignore_index=-100, transform=LogitTransform(),
             ref_chosen_logps=None, ref_rejected_logps=None, cfg: Optional[LossConfig] = None,
             sequence_ids=None, cu_seqlens=None, dtype=torch.float64, num_sequences=None) -> DPOOutput:
    logps, metrics = token_outputs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                   transform=transform, dtype=dtype)
    return dpo_loss_from_token_outputs(logps, metrics, labels, ignore_index=ignore_index,
                                       ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                       cfg=cfg or LossConfig(), sequence_ids=sequence_ids, cu_seqlens=cu_seqlens,
                                       num_sequences=num_sequences)


def dpo_loss_from_logits(logits, labels, *, ignore_index=-100, transform=LogitTransform(), ref_chosen_logps=None,
                         ref_rejected_logps=None, cfg: Optional[LossConfig] = None, dtype=torch.float64) -> DPOOutput:
    logps, metrics = token_outputs_from_logits(logits, labels, ignore_index=ignore_index, transform=transform,
                                               dtype=dtype)
    return dpo_loss_from_token_outputs(logps, metrics, labels, ignore_index=ignore_index,
                                       ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                       cfg=cfg or LossConfig())
