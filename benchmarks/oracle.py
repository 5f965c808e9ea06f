"""The float64 answer every method is scored against, computed in token chunks.

``dpo_fast.reference`` materializes ``[N, V]`` float64 logits, which at the GPU shapes is
16 GB per buffer. Here the same reference functions run on token chunks: sequence
log-probs first, then the loss and its gradient with respect to each sequence, then the
per-token upstream gradient pushed back through each chunk to accumulate grad_hidden
and grad_weight in float64.
"""

from dataclasses import dataclass

import torch

from dpo_fast import reference
from dpo_fast.objective import LossConfig, batch_loss

CHUNK_ELEMENTS = 1 << 25  # float64 [rows, V] buffers of 256 MB


def _token_chunks(n: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // vocab)
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


@torch.no_grad()
def oracle_sequence_logps(hidden, weight, labels, transform) -> torch.Tensor:
    """float64 sum of log p(label) per row of ``labels`` ([R, T]); hidden is [R, T, H]."""
    rows, tokens = labels.shape
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    weight64 = weight.double()
    logps = torch.empty(flat_y.numel(), dtype=torch.float64, device=hidden.device)
    for part in _token_chunks(flat_y.numel(), weight.shape[0]):
        logps[part], _ = reference.token_outputs(flat_h[part], weight64, flat_y[part], transform=transform)
    return logps.view(rows, tokens).sum(-1)


@dataclass
class Oracle:
    loss: float
    grad_hidden: torch.Tensor  # [2B, T, H]
    grad_weight: torch.Tensor  # [V, H]


def compute_oracle(inputs, keep_dtype=torch.float64, beta: float = 0.1) -> Oracle:
    """float64 loss and gradients for ``inputs`` (a ``cases.Inputs``); gradients kept in ``keep_dtype``."""
    hidden, weight, labels, transform = inputs.hidden.detach(), inputs.weight.detach(), inputs.labels, inputs.transform
    rows, tokens = labels.shape
    sequence = oracle_sequence_logps(hidden, weight, labels, transform).requires_grad_()
    lengths = (labels != -100).sum(-1)
    if inputs.case.objective == "grpo":
        from .methods import grpo_loss

        loss = grpo_loss(sequence, lengths)
    else:
        loss = batch_loss(sequence, lengths, inputs.ref_chosen_logps.double(), inputs.ref_rejected_logps.double(),
                          LossConfig(beta=beta))
    (grad_sequence,) = torch.autograd.grad(loss, sequence)
    grad_token = grad_sequence.repeat_interleave(tokens)  # d loss / d logp of every token

    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    weight64 = weight.double().requires_grad_()
    grad_hidden = torch.empty(flat_h.shape, dtype=keep_dtype, device=hidden.device)
    for part in _token_chunks(flat_y.numel(), weight.shape[0]):
        h = flat_h[part].double().requires_grad_()
        logps, _ = reference.token_outputs(h, weight64, flat_y[part], transform=transform)
        torch.autograd.backward(logps, grad_token[part])
        grad_hidden[part] = h.grad.to(keep_dtype)
    grad_weight = weight64.grad.to(keep_dtype)
    del weight64
    return Oracle(loss.item(), grad_hidden.view(hidden.shape), grad_weight)
