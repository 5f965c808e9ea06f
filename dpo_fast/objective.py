"""From per-sequence log-probs to the DPO loss and TRL's metrics, shared by every path.

Sequences are ``[chosen_1..chosen_B, rejected_1..rejected_B]``. The loss is the weighted
sum over loss types of the mean over pairs (``losses.pair_losses``); rewards are
``beta * (logp - ref logp)`` and, like every metric here, detached.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .losses import PairTerms, pair_losses


@dataclass(frozen=True)
class LossConfig:
    loss_types: List[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: List[float] = field(default_factory=lambda: [1.0])
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5  # SimPO margin
    discopop_tau: float = 0.05
    cpo_alpha: float = 1.0


@dataclass
class DPOOutput:
    """The loss (differentiable) and detached per-batch metrics, named as TRL logs them."""

    loss: torch.Tensor
    chosen_logps: torch.Tensor  # [B] sums over completion tokens
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor  # [B] beta * (logp - ref logp)
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor  # mean(chosen_rewards > rejected_rewards)
    reward_margin: torch.Tensor  # mean(chosen_rewards - rejected_rewards)
    chosen_logits_mean: Optional[torch.Tensor] = None  # mean over chosen tokens of the vocab-mean logit
    rejected_logits_mean: Optional[torch.Tensor] = None
    token_accuracy: Optional[torch.Tensor] = None  # argmax == label over chosen tokens
    entropy: Optional[torch.Tensor] = None  # mean predictive entropy over completion tokens


def pair_terms(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
               rejected_lengths, cfg: LossConfig, total_chosen_tokens: float, num_pairs: int) -> PairTerms:
    # The formulas run in float64: on [pairs] tensors that costs nothing, and some of them
    # (discopop's exp(x / tau), ipo's squares) would amplify float32 rounding of the sums.
    chosen_logps, rejected_logps = chosen_logps.double(), rejected_logps.double()
    zeros = torch.zeros_like(chosen_logps)
    return PairTerms(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=zeros if ref_chosen_logps is None else ref_chosen_logps.to(chosen_logps.dtype),
        ref_rejected_logps=zeros if ref_rejected_logps is None else ref_rejected_logps.to(chosen_logps.dtype),
        chosen_lengths=chosen_lengths.to(chosen_logps.dtype),
        rejected_lengths=rejected_lengths.to(chosen_logps.dtype),
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        gamma=cfg.gamma,
        discopop_tau=cfg.discopop_tau,
        cpo_alpha=cfg.cpo_alpha,
        # A 0-d tensor stays one: under torch.compile the count is not known on the host (ops.py).
        total_chosen_tokens=(total_chosen_tokens if torch.is_tensor(total_chosen_tokens)
                             else float(total_chosen_tokens)),
        num_pairs=num_pairs,
    )


def batch_loss(sequence_logps, lengths, ref_chosen_logps, ref_rejected_logps, cfg: LossConfig) -> torch.Tensor:
    """Differentiable loss from [2B] sequence log-probs and [2B] completion lengths."""
    pairs = sequence_logps.shape[0] // 2
    chosen_lengths, rejected_lengths = lengths[:pairs], lengths[pairs:]
    terms = pair_terms(sequence_logps[:pairs], sequence_logps[pairs:], ref_chosen_logps, ref_rejected_logps,
                       chosen_lengths, rejected_lengths, cfg, chosen_lengths.sum(), pairs)  # no host read
    return pair_losses(terms, cfg.loss_types, cfg.loss_weights).mean().to(sequence_logps.dtype)


def dpo_output(loss, sequence_logps, lengths, ref_chosen_logps, ref_rejected_logps, cfg: LossConfig,
               sequence_logit_means=None, sequence_top1=None, sequence_entropy=None) -> DPOOutput:
    """Assemble the output; ``sequence_*`` are per-sequence sums over completion tokens."""
    with torch.no_grad():
        # float32, or float64 where the log-probs were computed in float64 (float64 inputs on PyTorch rows).
        wide = torch.promote_types(sequence_logps.dtype, torch.float32)
        seq = sequence_logps.detach().to(wide)
        pairs = seq.shape[0] // 2
        chosen, rejected = seq[:pairs], seq[pairs:]
        ref_c = torch.zeros_like(chosen) if ref_chosen_logps is None else ref_chosen_logps.detach().to(wide)
        ref_r = torch.zeros_like(rejected) if ref_rejected_logps is None else ref_rejected_logps.detach().to(wide)
        chosen_rewards, rejected_rewards = cfg.beta * (chosen - ref_c), cfg.beta * (rejected - ref_r)
        count = lengths.float()
        chosen_tokens, rejected_tokens = count[:pairs].sum().clamp(min=1), count[pairs:].sum().clamp(min=1)
        all_tokens = count.sum().clamp(min=1)

        def chosen_mean(x):
            return None if x is None else x[:pairs].float().sum() / chosen_tokens

        return DPOOutput(
            loss=loss,
            chosen_logps=chosen,
            rejected_logps=rejected,
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            reward_accuracy=(chosen_rewards > rejected_rewards).float().mean(),
            reward_margin=(chosen_rewards - rejected_rewards).mean(),
            chosen_logits_mean=chosen_mean(sequence_logit_means),
            rejected_logits_mean=None if sequence_logit_means is None
            else sequence_logit_means[pairs:].float().sum() / rejected_tokens,
            token_accuracy=chosen_mean(sequence_top1),
            entropy=None if sequence_entropy is None else sequence_entropy.float().sum() / all_tokens,
        )
