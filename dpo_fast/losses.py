"""One table of DPO-family loss formulas on per-sequence log-probs.

Every execution path and the float64 reference call :func:`pair_losses`, so a formula is
written once. Definitions follow TRL's ``DPOTrainer`` (``ipo`` and ``sigmoid_norm``
divide by the number of scored completion tokens, where TRL's DPOTrainer counts one more for
a completion that starts at position 0; ``sft`` is the mean NLL over chosen tokens), its
``CPOTrainer`` for the reference-free ``simpo`` and ``cpo``, and its ``ORPOTrainer``
for the reference-free ``orpo``.

A formula maps :class:`PairTerms` (tensors of shape ``[pairs]``) to a per-pair loss.
The batch loss is ``sum_k weight_k * mean_pairs(loss_k)``. ``pair_local`` formulas give
pair ``p`` a loss that depends on pair ``p`` alone (batch-wide constants such as the
chosen token count are passed in), which lets the chunked path finish whole pairs
inside one chunk and compute logits once.

``margin`` declares, where it holds, that a formula depends on the pair's policy sums
``S_c``, ``S_r`` only through one weighted margin ``a_c S_c - a_r S_r`` with
``(a_c, a_r) = margin(chosen tokens, rejected tokens)`` (host numbers, ``a_c > 0``; the
reference log-probs and constants may enter anywhere). Then ``dL/dS_r = -(a_r / a_c) dL/dS_c``
whatever the sums are (:func:`rejected_gradient_ratio`), which lets a pair run in pieces sum its
rejected side's unit gradients into its chosen side's buffer with that ratio, before the loss
is known. ``None``: no such margin (a separate term in ``S_c`` or ``S_r``, as ORPO's and CPO's
chosen NLL, sft, or each side through its own nonlinearity).
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass
class PairTerms:
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor  # completion tokens per chosen sequence
    rejected_lengths: torch.Tensor
    beta: float
    label_smoothing: float
    gamma: float  # SimPO target margin
    discopop_tau: float
    cpo_alpha: float
    total_chosen_tokens: float  # over the whole batch, for the token-mean NLL terms (a 0-d tensor under compile)
    num_pairs: int  # over the whole batch

    @property
    def chosen_logratios(self):
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self):
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def delta(self):
        return self.chosen_logratios - self.rejected_logratios

    def chosen_nll_share(self):
        """Per-pair share of the batch's mean chosen-token NLL (sums to it after mean)."""
        total = self.total_chosen_tokens
        total = total.clamp(min=1.0) if torch.is_tensor(total) else max(total, 1.0)
        return -self.chosen_logps * (self.num_pairs / total)


def _smoothed_logsigmoid(x, eps):
    """Conservative DPO: -(1 - eps) logsigmoid(x) - eps logsigmoid(-x)."""
    loss = -F.logsigmoid(x)
    return loss * (1 - eps) - F.logsigmoid(-x) * eps if eps else loss


def _sigmoid(t: PairTerms):
    return _smoothed_logsigmoid(t.beta * t.delta, t.label_smoothing)


def _hinge(t):
    return torch.relu(1 - t.beta * t.delta)


def _ipo(t):
    delta = t.chosen_logratios / t.chosen_lengths.clamp(min=1) - t.rejected_logratios / t.rejected_lengths.clamp(min=1)
    return (delta - 1 / (2 * t.beta)) ** 2


def _exo_pair(t):
    eps = t.label_smoothing
    x = t.beta * t.delta
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))


def _nca_pair(t):
    chosen, rejected = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(t):
    x, eps = t.beta * t.delta, t.label_smoothing
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def _bco_pair(t):
    return -F.logsigmoid(t.beta * t.chosen_logratios) - F.logsigmoid(-t.beta * t.rejected_logratios)


def _sppo_hard(t):
    return (t.chosen_logratios - 0.5 / t.beta) ** 2 + (t.rejected_logratios + 0.5 / t.beta) ** 2


def _aot(t):
    policy, _ = torch.sort(t.chosen_logps - t.rejected_logps, dim=0)
    reference, _ = torch.sort(t.ref_chosen_logps - t.ref_rejected_logps, dim=0)
    return _smoothed_logsigmoid(t.beta * (policy - reference), t.label_smoothing)


def _aot_unpaired(t):
    chosen, _ = torch.sort(t.chosen_logratios, dim=0)
    rejected, _ = torch.sort(t.rejected_logratios, dim=0)
    return _smoothed_logsigmoid(t.beta * (chosen - rejected), t.label_smoothing)


def _apo_zero(t):
    return 1 - torch.sigmoid(t.beta * t.chosen_logratios) + torch.sigmoid(t.beta * t.rejected_logratios)


def _apo_down(t):
    return torch.sigmoid(t.beta * t.chosen_logratios) + 1 - torch.sigmoid(t.beta * t.delta)


def _discopop(t):
    x = t.beta * t.delta
    mix = torch.sigmoid(x / t.discopop_tau)
    # exp(-x) * mix as one exponent: for x below about -88, exp(-x) overflows float32 while mix
    # underflows to 0, and inf * 0 gives NaN where the loss is ~|x|.
    return -F.logsigmoid(x) * (1 - mix) + torch.exp(F.logsigmoid(x / t.discopop_tau) - x)


def _sft(t):
    return t.chosen_nll_share()


def _sigmoid_norm(t):
    delta = t.chosen_logratios / t.chosen_lengths.clamp(min=1) - t.rejected_logratios / t.rejected_lengths.clamp(min=1)
    return -F.logsigmoid(t.beta * delta)


def _simpo(t):
    # Reference-free, length-normalized, with a target margin gamma (Meng et al. 2024).
    delta = t.chosen_logps / t.chosen_lengths.clamp(min=1) - t.rejected_logps / t.rejected_lengths.clamp(min=1)
    return _smoothed_logsigmoid(t.beta * delta - t.gamma, t.label_smoothing)


def _cpo(t):
    # Reference-free sigmoid on the policy log-ratio plus cpo_alpha times the chosen NLL.
    return (_smoothed_logsigmoid(t.beta * (t.chosen_logps - t.rejected_logps), t.label_smoothing)
            + t.cpo_alpha * t.chosen_nll_share())


_FLOAT32_HALF_ULP_OF_ONE = 2.0 ** -24


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, each branch where it does not cancel (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _orpo(t):
    # Odds ratio preference optimisation (Hong et al. 2024): the chosen NLL minus beta times
    # logsigmoid of the log odds ratio of the length-averaged log-probs,
    # log odds(y) = log p - log(1 - p) with log p the mean token log-prob.
    # A float32 mean log-prob of exactly 0 says only that 1 - p is below float32 rounding of 1
    # (2**-24); the odds are infinite at 0 (TRL's formula gives inf/NaN there), finite at that bound.
    chosen = (t.chosen_logps / t.chosen_lengths.clamp(min=1)).clamp(max=-_FLOAT32_HALF_ULP_OF_ONE)
    rejected = (t.rejected_logps / t.rejected_lengths.clamp(min=1)).clamp(max=-_FLOAT32_HALF_ULP_OF_ONE)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return t.chosen_nll_share() - t.beta * F.logsigmoid(log_odds)


def _unit_margin(chosen_tokens: int, rejected_tokens: int) -> Tuple[float, float]:
    """Margin weights of a formula of ``S_c - S_r`` (delta, or the policy log-ratio)."""
    return 1.0, 1.0


def _per_token_margin(chosen_tokens: int, rejected_tokens: int) -> Tuple[float, float]:
    """Margin weights of a formula of ``S_c / L_c - S_r / L_r`` (the lengths clamped at 1, as the formulas do)."""
    return 1.0 / max(chosen_tokens, 1), 1.0 / max(rejected_tokens, 1)


@dataclass(frozen=True)
class LossSpec:
    formula: Callable[[PairTerms], torch.Tensor]
    needs_reference: bool = False  # meaningless without the reference model's log-probs
    pair_local: bool = True  # pair p's loss depends on pair p only
    reference_free: bool = False  # ignores reference log-probs entirely
    # (chosen tokens, rejected tokens) -> (a_c, a_r): the loss depends on the policy sums only
    # through a_c S_c - a_r S_r (module docstring); None where it does not.
    margin: Optional[Callable[[int, int], Tuple[float, float]]] = None


LOSSES: Dict[str, LossSpec] = {
    "sigmoid": LossSpec(_sigmoid, margin=_unit_margin),  # f(beta * delta), label smoothing too
    "hinge": LossSpec(_hinge, margin=_unit_margin),
    "ipo": LossSpec(_ipo, margin=_per_token_margin),  # logratios over each side's length
    "exo_pair": LossSpec(_exo_pair, margin=_unit_margin),
    "nca_pair": LossSpec(_nca_pair, needs_reference=True),  # each side through its own logsigmoid
    "robust": LossSpec(_robust, margin=_unit_margin),
    "bco_pair": LossSpec(_bco_pair, needs_reference=True),
    "sppo_hard": LossSpec(_sppo_hard, needs_reference=True),
    "aot": LossSpec(_aot, needs_reference=True, pair_local=False),
    "aot_unpaired": LossSpec(_aot_unpaired, pair_local=False),
    "apo_zero": LossSpec(_apo_zero, needs_reference=True),
    "apo_down": LossSpec(_apo_down, needs_reference=True),
    "discopop": LossSpec(_discopop, margin=_unit_margin),
    "sft": LossSpec(_sft),
    "sigmoid_norm": LossSpec(_sigmoid_norm, margin=_per_token_margin),
    "simpo": LossSpec(_simpo, reference_free=True, margin=_per_token_margin),  # gamma is a constant
    "cpo": LossSpec(_cpo, reference_free=True),  # plus the chosen NLL
    "orpo": LossSpec(_orpo, reference_free=True),  # chosen NLL; log1mexp of each side
}


def pair_losses(terms: PairTerms, loss_types, loss_weights) -> torch.Tensor:
    """Weighted sum over loss types of per-pair losses, shape ``[pairs]``.

    ``pair_losses(...).mean()`` over the whole batch is the training loss.
    """
    total = 0.0
    for name, weight in zip(loss_types, loss_weights):
        total = total + weight * LOSSES[name].formula(terms)
    return total


def all_pair_local(loss_types) -> bool:
    return all(LOSSES[name].pair_local for name in loss_types)


def rejected_gradient_ratio(loss_types: Sequence[str], loss_weights: Sequence[float], chosen_tokens: int,
                            rejected_tokens: int) -> Optional[float]:
    """``k`` with ``dL/dS_r = k * dL/dS_c`` for a pair of these kept token counts, whatever its sums, or None.

    Every loss type of the mix (weight 0 aside) must declare a ``margin`` and all must give the
    same ratio ``-a_r / a_c`` (a mix of ``sigmoid`` and ``ipo`` does only for equal lengths).
    """
    ratio = None
    for name, weight in zip(loss_types, loss_weights):
        if weight == 0:
            continue
        margin = LOSSES[name].margin
        if margin is None:
            return None
        a_c, a_r = margin(chosen_tokens, rejected_tokens)
        k = -a_r / a_c
        if ratio is not None and not math.isclose(k, ratio, rel_tol=1e-12, abs_tol=0.0):
            return None
        ratio = k if ratio is None else ratio
    return ratio
