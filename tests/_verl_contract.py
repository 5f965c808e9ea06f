"""Inputs in verl's kernel contract, and the two-rank worker of tests/suite_verl.py.

Kept apart from the suite so that the spawned ranks import dpo-fast only: importing verl (Ray,
transformers) in every child would cost far more than the check. The worker calls
:class:`dpo_fast.integrations.verl.LinearCrossEntropy`, the object ``patch_verl`` installs.
"""

import torch
import torch.distributed as dist


def inputs(rows=2, length=9, hidden=48, vocab=67, pad=3, seed=0):
    """hidden [rows, length, H], head [V, H], labels [rows, length] (right padding: pad id 0 after the text),
    upstream gradients masked at the padding (verl's response mask)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, length, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    labels = torch.randint(1, vocab, (rows, length), generator=g)
    mask = torch.ones(rows, length)
    labels[0, length - pad:] = 0
    mask[0, length - pad:] = 0
    grad_logp = torch.randn(rows, length, generator=g) * mask
    grad_entropy = torch.randn(rows, length, generator=g) * mask
    return h, w, labels, grad_logp, grad_entropy


def run(fn, h, w, labels, grad_logp, grad_entropy, temperature):
    """fn's (logprobs, entropy) and the gradients of sum(logprobs * g + entropy * g') to hidden and weight."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, entropy = fn(h, w, labels, temperature)
    (logp.reshape(labels.shape) * grad_logp + entropy.reshape(labels.shape).float() * grad_entropy).sum().backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


def tp_worker(rank, temperature, world):
    """This rank's rows of the head, verl's call with dist_process_group: outputs and gradients."""
    from dpo_fast.integrations.verl import LinearCrossEntropy

    kernel = LinearCrossEntropy(impl="torch")
    h, w, labels, grad_logp, grad_entropy = inputs(vocab=64)
    rows = w.shape[0] // world
    shard = w[rank * rows:(rank + 1) * rows]

    def call(h, w, labels, t):
        return kernel(h, w, labels, t, "none", dist.group.WORLD)

    logp, entropy, grad_h, grad_w = run(call, h, shard, labels, grad_logp, grad_entropy, temperature)
    return dict(logp=logp.tolist(), entropy=entropy.tolist(), grad_hidden=grad_h.tolist(),
                grad_weight=grad_w.tolist())
