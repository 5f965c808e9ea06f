"""Switch OpenRLHF's actor to dpo-fast: ``patch_openrlhf()`` once, before training.

OpenRLHF (0.11.x) computes every log-prob of its policy and reference in
``openrlhf.models.actor.Actor.forward``: full logits, copied to float32, divided by the
temperature in place, the entropy over the full softmax, then ``log_probs_from_logits``. PPO,
GRPO, REINFORCE++ (``return_entropy`` included) and DPO (``dpo_trainer.concatenated_forward``,
``return_logprobs=True``) all go through it. The replacement runs the backbone for hidden states
and dpo-fast for the log-probs (and entropy, differentiable) of each position's rolled target,
on the local ring-attention slice when samples are packed, and returns the same outputs: action
log-probs ``[B, A]`` masked by ``action_mask``, or all log-probs ``[B, T-1]``; with
``return_output`` a ``CausalLMOutputWithPast`` whose ``entropy`` is set as OpenRLHF sets it, and
whose ``logits`` are None: no ``[T, V]`` logits exist.

Settings dpo-fast does not implement run OpenRLHF's own forward, with one warning naming the
setting: a call that wants the logits themselves (neither ``action_mask`` nor
``return_logprobs``), vision-language inputs, a MoE model that returns an auxiliary loss, and a
model whose head dpo-fast cannot read.

Verified against the stock ``Actor.forward`` on OpenRLHF 0.11.2 (tests/test_openrlhf.py), with
``flash_attn`` (imported by OpenRLHF at module import, needed only for packed samples) replaced
by a plain-torch stand-in of the helpers it uses.
"""

import sys
from typing import Optional

import torch

from .. import api
from ..hf import HeadComputation, fused_forward, head_precision, resolve_head
from .patching import Patches

VERIFIED_VERSIONS = ("0.11.2",)

_patches = Patches()  # what patch_openrlhf replaced, so unpatch_openrlhf can put it back


def _no_ignore(labels: torch.Tensor) -> int:
    """An ignore index no token id takes: every rolled target is scored, as OpenRLHF scores it."""
    return torch.iinfo(labels.dtype).min


class ActorComputation(HeadComputation):
    """Log-probs of each position's (already rolled) target at ``temperature``, and its entropy when asked.

    Returns ``(log_probs [B, T], entropy [B, T] or None)``, float32, both differentiable.
    """

    shift_labels = False

    def __init__(self, temperature: float, entropy: bool, impl: str, memory_budget: Optional[int]):
        self.temperature, self.entropy = float(temperature), entropy
        self.impl, self.memory_budget = impl, memory_budget

    def from_hidden(self, hidden, targets, head):
        t = head.transform
        with head_precision(hidden, head.weight, head.bias) as (hidden, weight, bias):
            prep = api._prepare(hidden, weight, targets, bias, _no_ignore(targets), self.temperature, t.scale,
                                t.softcap, self.impl, None, None, self.memory_budget, False)
            kept = api._kept_token_outputs(prep, weight, bias)
            scatter = prep.layout.scatter
            return scatter(kept.logps.float()), scatter(kept.entropy.float()) if self.entropy else None

    def from_logits(self, logits, targets):
        impl = "auto" if self.impl == "fused" else self.impl
        log_probs, entropy, *_ = api._logits_outputs(logits.float(), targets, _no_ignore(targets),
                                                     self.temperature, False, impl)
        return log_probs, entropy if self.entropy else None


def _unsupported(actor, action_mask, return_logprobs, mm_inputs) -> Optional[str]:
    """Why this ``Actor.forward`` call must run OpenRLHF's own code, or None."""
    if action_mask is None and not return_logprobs:
        return "a call for the logits (neither action_mask nor return_logprobs)"
    if mm_inputs or getattr(actor, "is_vlm", False):
        return "a vision-language model"
    config = getattr(actor.model, "config", None)
    if getattr(config, "output_router_logits", False):
        return "a MoE auxiliary loss (output_router_logits)"
    try:
        resolve_head(actor.model)
    except (NotImplementedError, TypeError, AttributeError, ValueError) as exc:
        return f"this model ({str(exc).split(';')[0]})"
    return None


def _fused_actor_forward(self, sequences, action_mask=None, attention_mask=None, return_output=False,
                         allgather_logits=False, return_logprobs=False, ring_attn_group=None, packed_seq_lens=None,
                         return_entropy=False, **mm_inputs):
    """``Actor.forward`` with the log-probs and entropy from dpo-fast (see the module docstring)."""
    original = _patches.original("forward")
    reason = _unsupported(self, action_mask, return_logprobs, mm_inputs)
    if reason is not None:
        _patches.warn_fallback(reason, "OpenRLHF's own Actor.forward (full logits)")
        return original(self, sequences, action_mask=action_mask, attention_mask=attention_mask,
                        return_output=return_output, allgather_logits=allgather_logits,
                        return_logprobs=return_logprobs, ring_attn_group=ring_attn_group,
                        packed_seq_lens=packed_seq_lens, return_entropy=return_entropy, **mm_inputs)
    actor_module = sys.modules[original.__module__]  # OpenRLHF's own packing helpers, as its forward uses them
    batch, seqlen = sequences.size()
    if self.packing_samples:
        sequences, position_ids, rolled_sequences, ring_attn_pad_len, indices = actor_module.unpad_and_slice_tensor(
            sequences, attention_mask, ring_attn_group)
        forward_attention_mask = None
    else:
        rolled_sequences = torch.roll(sequences, shifts=-1, dims=1)
        forward_attention_mask = attention_mask
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)

    settings = _patches.settings
    computation = ActorComputation(self.temperature, return_entropy, settings["impl"], settings["memory_budget"])
    with fused_forward(self.model, computation, fallback="naive") as call:
        log_probs, entropy = call(sequences, attention_mask=forward_attention_mask, position_ids=position_ids,
                                  labels=rolled_sequences)

    def unpacked(values):
        if not self.packing_samples:
            return values
        return actor_module.gather_and_pad_tensor(values, ring_attn_group, ring_attn_pad_len, indices, batch, seqlen)

    output = None
    if return_output:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        output = CausalLMOutputWithPast(logits=None)
    if return_entropy:
        assert return_output  # as OpenRLHF asserts
        setattr(output, "entropy", unpacked(entropy)[:, :-1])
    log_probs = unpacked(log_probs)[:, :-1]
    if action_mask is None:  # return_logprobs
        return (log_probs, output) if return_output else log_probs
    action_log_probs = log_probs[:, -action_mask.shape[1]:] * action_mask.float()
    return (action_log_probs, output) if return_output else action_log_probs


def patch_openrlhf(impl: str = "auto", memory_budget: Optional[int] = None) -> None:
    """Make ``openrlhf.models.actor.Actor.forward`` run dpo-fast. :func:`unpatch_openrlhf` undoes it.

    ``impl`` and ``memory_budget`` are :func:`dpo_fast.token_logps`'s.
    """
    from openrlhf.models.actor import Actor

    api.check.check_impl(impl)
    _patches.settings = dict(impl=impl, memory_budget=memory_budget)
    _patches.swap(Actor, "forward", _fused_actor_forward)


def unpatch_openrlhf() -> None:
    """Undo :func:`patch_openrlhf` (no-op when nothing is patched)."""
    _patches.restore()


def is_patched() -> bool:
    return _patches.holds()


__all__ = ["ActorComputation", "patch_openrlhf", "unpatch_openrlhf", "is_patched", "VERIFIED_VERSIONS"]
