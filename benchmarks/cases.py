"""Benchmark shapes and their inputs.

A case is one lm_head (hidden size H, vocabulary V, optional softcap) and one batch
layout (pairs x completion tokens per sequence). Every label is a completion token, so
every method does the same N = 2 * pairs * tokens rows of work.

Random weights and hidden states give a flat softmax (every log-prob near -log V),
which is not what a DPO head sees: a trained model puts most of the mass on a few
tokens. The inputs are therefore shaped in two steps:

1. Background: weight rows ~ N(0, I/H) (unit norm), hidden entries ~ N(0, LOGIT_STD^2),
   so every raw logit has standard deviation ~LOGIT_STD (2.5: an assumed spread of a few
   units, wide enough that the softmax tail carries real mass).
2. Target and competitor: each hidden state is moved within the span of its target's
   weight row and one random competitor's row until the target's (post-softcap) logit
   sits DELTA above the log-sum-exp L of its background logits and the competitor's sits
   DELTA_C above L, with DELTA ~ N(MARGIN_MEAN, MARGIN_STD^2) and DELTA_C ~
   N(COMPETITOR_MEAN, MARGIN_STD^2) per token. The target's log-prob is then about
   -log(1 + e^-DELTA + e^(DELTA_C - DELTA)): it is the argmax for about two tokens in three
   and the mean NLL is about a nat, as on completions a policy was trained towards. The
   move adds a little spread to the other logits (its norm over sqrt(H)), most at small H.

The measured logit std, mean NLL and top-1 rate are stored with each result.

The reference model is the same head applied to slightly perturbed hidden states
(``ref_hidden``): its sequence log-probs are precomputed once in float64 and passed as
``ref_chosen_logps`` / ``ref_rejected_logps``, as trainers that precompute them do.
The perturbation is sized so that beta * margin is O(1) and the sigmoid is not saturated.
"""

import math
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

from dpo_fast.transform import LogitTransform

LOGIT_STD = 2.5
MARGIN_MEAN = 1.0
COMPETITOR_MEAN = -0.5
MARGIN_STD = 2.0
BETA = 0.1


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # the head it imitates
    hidden_size: int
    vocab_size: int
    pairs: int
    tokens: int  # completion tokens per sequence
    dtype: str  # "bfloat16" or "float32"
    softcap: Optional[float] = None
    # "dpo": the sigmoid DPO loss; "grpo": per-token log-probs and entropy of 2 * pairs completions
    # (a GRPO group), policy-gradient loss with advantages +-1 (benchmarks.methods.grpo_loss)
    objective: str = "dpo"

    @property
    def num_tokens(self) -> int:
        return 2 * self.pairs * self.tokens

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def transform(self) -> LogitTransform:
        return LogitTransform(softcap=self.softcap)

    def flops(self, passes: int) -> float:
        """passes=1: the logits GEMM (2NHV); passes=3: logits + both gradient GEMMs (6NHV)."""
        return 2.0 * passes * self.num_tokens * self.hidden_size * self.vocab_size

    def as_dict(self) -> dict:
        return asdict(self)


def _gpu(model, hidden, vocab, pairs, tokens, softcap=None):
    return Case(f"{model} {pairs}x{tokens}", model, hidden, vocab, pairs, tokens, "bfloat16", softcap)


# Ordered by priority: a time budget cuts the tail of the list first.
GPU_CASES: List[Case] = [
    _gpu("llama3-8b", 4096, 128256, 4, 1024),
    _gpu("gemma2-2b", 2304, 256000, 1, 8192, softcap=30.0),
    _gpu("qwen2.5-7b", 3584, 152064, 4, 1024),
    _gpu("llama3-8b", 4096, 128256, 1, 8192),
    _gpu("gemma2-2b", 2304, 256000, 4, 1024, softcap=30.0),
    _gpu("qwen2.5-7b", 3584, 152064, 1, 8192),
    # GRPO: a group of 8 completions of 2048 tokens, log-probs + entropy, forward+backward.
    Case("qwen2.5-7b grpo 8x2048", "qwen2.5-7b", 3584, 152064, 4, 2048, "bfloat16", objective="grpo"),
]

# CPU shapes keep `make bench` near two minutes on two cores. The tiny case is the only one
# where the Triton interpreter (dpo-fast chunked/fused on CPU) finishes in seconds.
CPU_CASES: List[Case] = [
    Case("tiny 2x32", "tiny", 64, 1024, 2, 32, "float32"),
    Case("small 2x128", "small", 256, 8192, 2, 128, "float32"),
    Case("medium 2x128", "medium", 512, 32000, 2, 128, "float32"),
    Case("grpo tiny 8x16", "tiny", 64, 1024, 4, 16, "float32", objective="grpo"),
]
# Not in the default CPU sweep (time): a softcapped head, for `--cases "softcap 2x128"`.
EXTRA_CASES: List[Case] = [
    Case("softcap 2x128", "small, softcap 30", 256, 8192, 2, 128, "float32", softcap=30.0),
]

ALL_CASES = {c.name: c for c in GPU_CASES + CPU_CASES + EXTRA_CASES}


@dataclass
class Inputs:
    case: Case
    hidden: torch.Tensor  # [2B, T, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    labels: torch.Tensor  # [2B, T]
    ref_hidden: torch.Tensor  # [2B, T, H], the reference model's hidden states
    ref_chosen_logps: torch.Tensor  # [B] float32
    ref_rejected_logps: torch.Tensor  # [B] float32
    calibration: dict  # logit std, mean NLL, top-1 rate of the policy inputs
    sequence_logps: Optional[torch.Tensor] = None  # the last measured call's, [chosen..., rejected...]

    @property
    def transform(self) -> LogitTransform:
        return self.case.transform

    def tensors(self) -> dict:
        return {k: getattr(self, k).detach() for k in
                ("hidden", "weight", "labels", "ref_hidden", "ref_chosen_logps", "ref_rejected_logps")}

    @classmethod
    def from_tensors(cls, case: Case, tensors: dict, calibration: dict, device) -> "Inputs":
        t = {k: v.to(device) for k, v in tensors.items()}
        return cls(case, t["hidden"].requires_grad_(), t["weight"].requires_grad_(), t["labels"], t["ref_hidden"],
                   t["ref_chosen_logps"], t["ref_rejected_logps"], calibration)


def _row_chunks(n: int, vocab: int, budget_elems: int = 1 << 27):
    """Token chunks whose float32 [rows, V] logits stay near 512 MB."""
    step = max(1, budget_elems // vocab)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _inverse_transform(z: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """Raw logit that the transform maps to z (softcap: atanh, clamped inside the cap)."""
    if transform.softcap is None:
        return z
    cap = transform.softcap
    return cap * torch.atanh((z / cap).clamp(-0.98, 0.98))


@torch.no_grad()
def _lse_and_target(hidden, weight, labels, transform):
    """Per-token log-sum-exp and target logit of transform(hidden @ weight.T) in float32 chunks,
    plus the logit standard deviation and the share of tokens whose target is the argmax."""
    n = hidden.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    target = torch.empty_like(lse)
    total, total_sq, top1 = 0.0, 0.0, 0
    weight = weight.float()
    for s, e in _row_chunks(n, weight.shape[0]):
        z = transform.apply(hidden[s:e].float() @ weight.T)
        lse[s:e] = torch.logsumexp(z, dim=-1)
        target[s:e] = z.gather(1, labels[s:e, None]).squeeze(1)
        total += float(z.double().sum())
        total_sq += float(z.double().square().sum())
        top1 += int((z.argmax(-1) == labels[s:e]).sum())
    count = n * weight.shape[0]
    std = math.sqrt(max(total_sq / count - (total / count) ** 2, 0.0))
    return lse, target, std, top1 / n


@torch.no_grad()
def _gather_logits(hidden, weight, tokens, transform):
    return transform.apply((hidden * weight[tokens]).sum(-1))


@torch.no_grad()
def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    """Deterministic inputs for ``case`` on ``device`` (see the module docstring for their shape)."""
    from .oracle import oracle_sequence_logps

    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    V, H, N, rows = case.vocab_size, case.hidden_size, case.num_tokens, 2 * case.pairs
    transform = case.transform

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    weight = randn(V, H) / math.sqrt(H)
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    hidden = randn(N, H) * LOGIT_STD

    # Move each hidden state within the span of its target's and a competitor's weight rows so that
    # both logits land where wanted (a 2x2 solve per token), leaving the rest of the row alone.
    lse, target, _, _ = _lse_and_target(hidden, weight, labels, transform)
    competitor = (labels + torch.randint(1, V, (N,), generator=gen, device=device)) % V
    competitor_now = _gather_logits(hidden, weight, competitor, transform)
    wanted = torch.stack([lse + MARGIN_MEAN + MARGIN_STD * randn(N), lse + COMPETITOR_MEAN + MARGIN_STD * randn(N)], 1)
    now = torch.stack([target, competitor_now], 1)
    rows_w = torch.stack([weight[labels], weight[competitor]], 1)  # [N, 2, H]
    gram = rows_w @ rows_w.transpose(1, 2)
    shift = _inverse_transform(wanted, transform) - _inverse_transform(now, transform)
    coef = torch.linalg.solve(gram, shift.unsqueeze(-1))  # [N, 2, 1]
    hidden += (coef * rows_w).sum(1)

    weight = weight.to(case.torch_dtype)
    hidden = hidden.to(case.torch_dtype)
    lse, target, logit_std, top1 = _lse_and_target(hidden, weight, labels, transform)
    calibration = dict(logit_std=round(logit_std, 3), mean_nll=round(float((lse - target).mean()), 3),
                       top1_rate=round(top1, 3))

    # Reference model: perturbed hidden states, so per-sequence margins are a few nats.
    noise = 5.0 / math.sqrt(case.tokens)
    ref_hidden = (hidden.float() + noise * randn(N, H)).to(case.torch_dtype)
    labels2d = labels.view(rows, case.tokens)
    ref = oracle_sequence_logps(ref_hidden.view(rows, case.tokens, H), weight, labels2d, transform).float()
    return Inputs(case, hidden.view(rows, case.tokens, H).requires_grad_(), weight.requires_grad_(), labels2d,
                  ref_hidden.view(rows, case.tokens, H), ref[: case.pairs].contiguous(),
                  ref[case.pairs:].contiguous(), calibration)
