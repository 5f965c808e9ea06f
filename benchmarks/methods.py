"""The methods under test, each computing the same sigmoid DPO loss on a ``cases.Inputs``.

A method is a name, whether it is exact, a check that says why it cannot run here (None
when it can), and a builder returning a zero-argument loss function differentiable with
respect to ``inputs.hidden`` and ``inputs.weight``. Peers that return per-token
log-probs (or NLLs) are summed per sequence and fed to ``dpo_fast.objective.batch_loss``,
so every method ends in the same loss formula.
"""

import importlib
import importlib.util
import sys
import types
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from dpo_fast import reference
from dpo_fast.objective import LossConfig, batch_loss

from .cases import BETA, Case, Inputs

IGNORE = -100
CONFIG = LossConfig(beta=BETA)
# Largest N*V the Triton interpreter gets through in a few seconds on CPU (the tiny case).
INTERPRETER_MAX_LOGITS = 1 << 18


@dataclass(frozen=True)
class Method:
    name: str
    exact: bool
    summary: str
    unavailable: Callable[[Case, torch.device], Optional[str]]  # the reason it cannot run, or None
    build: Callable[[Inputs], Callable[[], torch.Tensor]]  # may set a ``note`` attribute on what it returns
    triton_interpreter: bool = False  # needs TRITON_INTERPRET=1 on CPU


def dpo_from_token_logps(token_logps: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """Per-token log-probs shaped like (or flattened from) the labels -> the shared DPO loss."""
    labels = inputs.labels
    sequence = token_logps.reshape(labels.shape).float().sum(-1)
    inputs.sequence_logps = sequence.detach()  # scored against float64 by measure.py
    return batch_loss(sequence, (labels != IGNORE).sum(-1), inputs.ref_chosen_logps, inputs.ref_rejected_logps,
                      CONFIG)


def _missing(module: str) -> Optional[str]:
    """Why ``module`` cannot be found, or None. Only locates it: importing a peer can take seconds, so
    a peer that is present but fails to import is reported by the run itself (as skipped)."""
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return f"{top} is not installed"
    if top == "dpo_fast" and importlib.util.find_spec(module) is None:
        return f"{module} does not exist yet"
    return None


def _needs_cuda(device: torch.device, what: str) -> Optional[str]:
    return None if device.type == "cuda" else f"{what} needs a CUDA device"


# ---------------------------------------------------------------------------------------
# naive PyTorch: materialize [N, V] logits, log_softmax in float32, gather
# ---------------------------------------------------------------------------------------

def _naive_loss(hidden, weight, labels, ref_chosen, ref_rejected, transform):
    return reference.dpo_loss(hidden, weight, labels, transform=transform, ref_chosen_logps=ref_chosen,
                              ref_rejected_logps=ref_rejected, cfg=CONFIG, dtype=None)


def _naive_token_outputs(hidden, weight, labels, transform):
    return reference.token_outputs(hidden, weight, labels, transform=transform, dtype=None)


def _build_naive(inputs: Inputs):
    def fn():
        out = _naive_loss(inputs.hidden, inputs.weight, inputs.labels, inputs.ref_chosen_logps,
                          inputs.ref_rejected_logps, inputs.transform)
        _keep_sequence_logps(inputs, out)
        return out.loss

    return fn


def _keep_sequence_logps(inputs: Inputs, out) -> None:
    """Per-sequence log-probs of a DPOOutput, [chosen..., rejected...], for measure.py's log-prob error."""
    inputs.sequence_logps = torch.cat([out.chosen_logps, out.rejected_logps]).detach().float()


def _build_naive_plain(inputs: Inputs):
    """The plainest trainer code: full logits, float32 log_softmax, gather; no metrics at all."""
    labels = inputs.labels

    def fn():
        logits = torch.nn.functional.linear(inputs.hidden, inputs.weight).float()
        logps = torch.log_softmax(inputs.transform.apply(logits), dim=-1)
        kept = labels != IGNORE
        token = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * kept
        return dpo_from_token_logps(token, inputs)

    return fn


def _build_naive_compiled(inputs: Inputs):
    # The token part (logits, log_softmax, gather, the same metrics) is compiled; the per-sequence
    # sums and the loss stay eager, as in the reference (Inductor's CPU codegen rejects its index_add).
    token_outputs = torch.compile(_naive_token_outputs, dynamic=False)

    def fn():
        logps, metrics = token_outputs(inputs.hidden, inputs.weight, inputs.labels, inputs.transform)
        return reference.dpo_loss_from_token_outputs(logps, metrics, inputs.labels, ignore_index=IGNORE,
                                                     ref_chosen_logps=inputs.ref_chosen_logps,
                                                     ref_rejected_logps=inputs.ref_rejected_logps,
                                                     cfg=CONFIG).loss

    return fn


# ---------------------------------------------------------------------------------------
# TRL >= 1.15: cuBLAS tiles + Triton online-LSE fold, backward recomputes (8NHV)
# ---------------------------------------------------------------------------------------

TRL_OUTPUTS = ("entropy", "mean_logits", "is_top1")  # what DPOTrainer asks for besides log-probs


def _trl_unavailable(case, device):
    return _missing("trl")


def _trl_backward_imports() -> Optional[str]:
    """The backward imports trl.trainer.utils (accelerate, datasets, pandas...) for a ZeRO-3 helper.

    Where that stack is missing, the helper (a null context outside ZeRO-3) is provided
    here, so the kernel itself can still be measured; the note says so.
    """
    try:
        importlib.import_module("trl.trainer.utils")
        return None
    except Exception as exc:  # e.g. datasets missing or too new for the image's pyarrow
        shim = types.ModuleType("trl.trainer.utils")
        shim.maybe_gather_lm_head_ctx = lambda *params: nullcontext()
        sys.modules["trl.trainer.utils"] = shim
        return (f"trl.trainer.utils not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]}); "
                f"its ZeRO-3 gather helper (a null context outside ZeRO-3) replaced by a no-op")


def _build_trl(inputs: Inputs):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    shimmed = _trl_backward_imports()
    chunk = getattr(sys.modules["trl.trainer.utils"], "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)  # TRL 1.16's value
    labels, softcap = inputs.labels, inputs.case.softcap

    def fn():
        mask = labels != IGNORE
        logps = ChunkedLogProbFunction.apply(inputs.hidden[mask], inputs.weight, None, labels[mask], 1.0, chunk,
                                             softcap, 1.0, TRL_OUTPUTS)[0]
        return dpo_from_token_logps(logps.new_zeros(labels.shape).masked_scatter(mask, logps), inputs)

    fn.note = shimmed
    return fn


# ---------------------------------------------------------------------------------------
# Liger: one pair per chunk, gradients computed in forward with torch.func (6NHV)
# ---------------------------------------------------------------------------------------

def _liger_unavailable(case, device):
    if case.softcap is not None:
        return "LigerFusedLinearDPOLoss has no logit softcapping"
    return _missing("liger_kernel")


def _build_liger(inputs: Inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # Liger takes no precomputed reference log-probs: it recomputes them from the reference
    # model's hidden states (an extra forward-only 2NHV), as its DPO users run it.
    loss = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, use_ref_model=True,
                                   compiled=inputs.hidden.device.type == "cuda")
    return lambda: loss(inputs.weight, inputs.hidden, inputs.labels, ref_input=inputs.ref_hidden,
                        ref_weight=inputs.weight.detach())[0]


# ---------------------------------------------------------------------------------------
# Cut Cross-Entropy: fused Triton kernels; "cce" skips small gradient entries
# ---------------------------------------------------------------------------------------

def _cce_unavailable(case, device):
    return _needs_cuda(device, "Cut Cross-Entropy's Triton kernels") or _missing("cut_cross_entropy")


def _cce_compile_unavailable(case, device):
    if device.type == "cuda":
        return "same design as naive-compile (full logits under torch.compile); run on CPU only"
    return _missing("cut_cross_entropy")


def _build_cce(inputs: Inputs, impl: str, filter_eps="high"):
    from cut_cross_entropy import linear_cross_entropy

    kwargs = dict(filter_eps=filter_eps) if impl == "cce" else {}

    def fn():
        nll = linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels, ignore_index=IGNORE,
                                   softcap=inputs.case.softcap, reduction="none", impl=impl, **kwargs)
        return dpo_from_token_logps(-nll, inputs)

    return fn


# ---------------------------------------------------------------------------------------
# PyTorch's own F.linear_cross_entropy (chunked when given LinearCrossEntropyOptions)
# ---------------------------------------------------------------------------------------

def _torch_lce_unavailable(case, device):
    if not (hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions"
    if case.softcap is not None:
        return "F.linear_cross_entropy has no logit softcapping"
    return None


def _build_torch_lce(inputs: Inputs):
    F = torch.nn.functional
    options = torch.nn.LinearCrossEntropyOptions()
    H = inputs.case.hidden_size

    def fn():
        nll = F.linear_cross_entropy(inputs.hidden.reshape(-1, H), inputs.weight, inputs.labels.reshape(-1),
                                     reduction="none", ignore_index=IGNORE, options=options)
        return dpo_from_token_logps(-nll, inputs)

    return fn


# ---------------------------------------------------------------------------------------
# dpo-fast
# ---------------------------------------------------------------------------------------

def _dpo_fast_unavailable(impl):
    def check(case, device):
        if impl == "fused":
            missing = _missing("dpo_fast.fused")
            if missing:
                return missing
        if impl in ("chunked", "fused") and device.type != "cuda":
            if _missing("triton"):
                return "Triton is not installed"
            if case.num_tokens * case.vocab_size > INTERPRETER_MAX_LOGITS:
                return "Triton interpreter on CPU: run at the tiny case only"
        return None

    return check


def _build_dpo_fast(inputs: Inputs, impl: str, metrics: bool = True):
    import dpo_fast

    def fn():
        out = dpo_fast.dpo_loss(inputs.hidden, inputs.weight, inputs.labels, ref_chosen_logps=inputs.ref_chosen_logps,
                                ref_rejected_logps=inputs.ref_rejected_logps, beta=BETA,
                                softcap=inputs.case.softcap, impl=impl, metrics=metrics)
        _keep_sequence_logps(inputs, out)
        return out.loss

    return fn


METHODS: List[Method] = [
    Method("naive-eager", True, "full logits, float32 log_softmax, gather, with TRL's metrics "
           "(dpo_fast.reference, dtype=None)", lambda case, device: None, _build_naive),
    Method("naive-plain", True, "full logits, float32 log_softmax, gather, no metrics",
           lambda case, device: None, _build_naive_plain),
    Method("naive-compile", True, "the naive token log-probs and metrics under torch.compile",
           lambda case, device: None, _build_naive_compiled),
    Method("trl-chunked", True, "TRL ChunkedLogProbFunction: cuBLAS tiles, online LSE, recompute in backward",
           _trl_unavailable, _build_trl),
    Method("liger-dpo", True, "Liger LigerFusedLinearDPOLoss: pair chunks, grads in forward, +ref forward",
           _liger_unavailable, _build_liger),
    Method("cce", False, "Cut Cross-Entropy impl=cce, gradient filtering (filter_eps='high')",
           _cce_unavailable, lambda inputs: _build_cce(inputs, "cce")),
    Method("cce-exact", True, "Cut Cross-Entropy impl=cce, filter_eps=None (no filtering)",
           _cce_unavailable, lambda inputs: _build_cce(inputs, "cce", None)),
    Method("cce-compile", True, "Cut Cross-Entropy impl=torch_compile",
           _cce_compile_unavailable, lambda inputs: _build_cce(inputs, "torch_compile")),
    Method("torch-lce", True, "F.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions())",
           _torch_lce_unavailable, _build_torch_lce),
    Method("dpo-fast-torch", True, "dpo_fast.dpo_loss impl='torch', with TRL's metrics",
           _dpo_fast_unavailable("torch"), lambda inputs: _build_dpo_fast(inputs, "torch")),
    Method("dpo-fast-torch-plain", True, "dpo_fast.dpo_loss impl='torch', metrics=False (log-probs and loss only)",
           _dpo_fast_unavailable("torch"), lambda inputs: _build_dpo_fast(inputs, "torch", metrics=False)),
    Method("dpo-fast-chunked", True, "dpo_fast.dpo_loss impl='chunked' (cuBLAS tiles + Triton rows)",
           _dpo_fast_unavailable("chunked"), lambda inputs: _build_dpo_fast(inputs, "chunked"),
           triton_interpreter=True),
    Method("dpo-fast-fused", True, "dpo_fast.dpo_loss impl='fused' (one Triton kernel family)",
           _dpo_fast_unavailable("fused"), lambda inputs: _build_dpo_fast(inputs, "fused"),
           triton_interpreter=True),
]



# ---------------------------------------------------------------------------------------
# GRPO-shaped cases: per-token log-probs and entropy of a group of completions
# ---------------------------------------------------------------------------------------

def grpo_advantages(rows: int, device) -> torch.Tensor:
    """Group-normalised advantages of a group whose completions alternate between two rewards: +-1."""
    return torch.tensor([1.0, -1.0], device=device).repeat((rows + 1) // 2)[:rows]


def grpo_loss(sequence_logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """GRPO's on-policy loss (TRL's loss_type "dapo": token sum over the batch's tokens), from sequence sums.

    Per token ``-A * exp(logp - logp.detach())``: the ratio is 1 in value and its gradient is the
    log-prob's, so the loss is linear in the sequence sums: ``-sum_i A_i (s_i - s_i.detach() + T_i) / sum T``.
    """
    advantages = grpo_advantages(sequence_logps.shape[0], sequence_logps.device).to(sequence_logps.dtype)
    ratio_sums = sequence_logps - sequence_logps.detach() + lengths.to(sequence_logps.dtype)
    return -(advantages * ratio_sums).sum() / lengths.sum()


def _grpo_from_token_logps(token_logps: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    labels = inputs.labels
    return grpo_loss(token_logps.reshape(labels.shape).float().sum(-1), (labels != IGNORE).sum(-1))


def _objective_only(objective: str, check):
    def unavailable(case, device):
        if case.objective != objective:
            return f"a {objective} method; this is a {case.objective} case"
        return check(case, device)

    return unavailable


def _build_naive_grpo(inputs: Inputs):
    def fn():
        logps, metrics = _naive_token_outputs(inputs.hidden, inputs.weight, inputs.labels, inputs.transform)
        fn.entropy = metrics["entropy"]  # computed in the same pass, as TRL's GRPO logs it
        return _grpo_from_token_logps(logps, inputs)

    return fn


def _build_trl_grpo(inputs: Inputs):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    shimmed = _trl_backward_imports()
    chunk = getattr(sys.modules["trl.trainer.utils"], "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    H = inputs.case.hidden_size

    def fn():
        logps, fn.entropy = ChunkedLogProbFunction.apply(inputs.hidden.reshape(-1, H), inputs.weight, None,
                                                         inputs.labels.reshape(-1), 1.0, chunk, inputs.case.softcap,
                                                         1.0, ("entropy",))[:2]
        return _grpo_from_token_logps(logps, inputs)

    fn.note = shimmed
    return fn


def _liger_grpo_unavailable(case, device):
    if case.softcap is not None:
        return "LigerFusedLinearGRPOLoss has no logit softcapping"
    return _missing("liger_kernel")


def _build_liger_grpo(inputs: Inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # beta=0 (no reference model, TRL's default), on-policy (old log-probs = current), token-sum loss.
    loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                    compiled=inputs.hidden.device.type == "cuda")
    mask = (inputs.labels != IGNORE).float()
    advantages = grpo_advantages(inputs.labels.shape[0], inputs.labels.device)
    fn = lambda: loss(inputs.hidden, inputs.weight, inputs.labels, mask, advantages)[0]  # noqa: E731
    fn.note = "Liger's GRPO loss returns no per-token entropy"
    return fn


def _verl_unavailable(case, device, triton=False):
    if case.softcap is not None:
        return "verl's log-prob kernels have no logit softcapping"
    if triton:
        if case.hidden_size % 128:
            return "verl's Triton kernel asserts hidden_size % 128 == 0"
        return _needs_cuda(device, "verl's Triton kernel") or _missing("verl")
    return _missing("verl")


def _build_verl_grpo(inputs: Inputs, backend: str):
    """verl's log-prob + entropy head as its actor calls it: ``FusedLinearForPPO`` (use_fused_kernels with
    impl_backend="torch", chunks of 512 tokens) or its Triton kernel (impl_backend="triton"; verl's own class,
    never the name patch_verl() replaces)."""
    H = inputs.case.hidden_size
    if backend == "torch":
        from verl.utils.experimental.torch_functional import FusedLinearForPPO

        head = FusedLinearForPPO(impl_backend="torch")
        call = lambda: head(inputs.hidden.reshape(-1, H), inputs.weight, inputs.labels.reshape(-1), 1.0)  # noqa: E731
    else:
        from verl.utils.kernel.linear_cross_entropy import LinearCrossEntropy

        call = lambda: LinearCrossEntropy.apply(inputs.hidden.reshape(-1, H), inputs.weight,  # noqa: E731
                                                inputs.labels.reshape(-1), 1.0, "none", None)

    def fn():
        logps, fn.entropy = call()
        return _grpo_from_token_logps(logps, inputs)

    return fn


def _build_dpo_fast_grpo(inputs: Inputs, impl: str):
    from dpo_fast.integrations.trl import ChunkedLogProb

    chunked, H = ChunkedLogProb(impl=impl), inputs.case.hidden_size

    def fn():  # the call TRL's GRPOTrainer makes under patch_trl()
        logps, fn.entropy = chunked.apply(inputs.hidden.reshape(-1, H), inputs.weight, None,
                                          inputs.labels.reshape(-1), 1.0, None, inputs.case.softcap, 1.0,
                                          ("entropy",))[:2]
        return _grpo_from_token_logps(logps, inputs)

    return fn


METHODS = [Method(m.name, m.exact, m.summary, _objective_only("dpo", m.unavailable), m.build, m.triton_interpreter)
           for m in METHODS] + [
    Method("naive-grpo", True, "full logits, float32 log_softmax, gather, entropy; GRPO loss",
           _objective_only("grpo", lambda case, device: None), _build_naive_grpo),
    Method("trl-chunked-grpo", True, "TRL ChunkedLogProbFunction (log-probs + entropy) as GRPOTrainer calls it",
           _objective_only("grpo", _trl_unavailable), _build_trl_grpo),
    Method("liger-grpo", True, "Liger LigerFusedLinearGRPOLoss (beta=0, loss_type='dapo'), no entropy",
           _objective_only("grpo", _liger_grpo_unavailable), _build_liger_grpo),
    Method("verl-torch-grpo", True, "verl FusedLinearForPPO(impl_backend='torch'): 512-token chunks, + entropy",
           _objective_only("grpo", _verl_unavailable), lambda inputs: _build_verl_grpo(inputs, "torch")),
    Method("verl-triton-grpo", True, "verl's Triton linear_cross_entropy (use_fused_kernels, impl_backend=triton)",
           _objective_only("grpo", lambda case, device: _verl_unavailable(case, device, triton=True)),
           lambda inputs: _build_verl_grpo(inputs, "triton")),
    Method("dpo-fast-grpo-torch", True, "dpo-fast's TRL drop-in (log-probs + entropy) impl='torch'",
           _objective_only("grpo", _dpo_fast_unavailable("torch")),
           lambda inputs: _build_dpo_fast_grpo(inputs, "torch")),
    Method("dpo-fast-grpo-chunked", True, "dpo-fast's TRL drop-in (log-probs + entropy) impl='chunked'",
           _objective_only("grpo", _dpo_fast_unavailable("chunked")),
           lambda inputs: _build_dpo_fast_grpo(inputs, "chunked"), triton_interpreter=True),
]

BY_NAME: Dict[str, Method] = {m.name: m for m in METHODS}
BASELINE = "naive-eager"
