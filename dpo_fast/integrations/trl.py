"""Switch TRL's DPO trainer to dpo-fast: ``patch_trl()`` once, before ``trainer.train()``.

How the switch is made depends on the installed TRL:

- trl >= 1.15: every trainer that uses TRL's fused LM head (``add_fused_lm_head``: DPO,
  SFT, KTO, GRPO, RLOO) calls ``trl.trainer.utils._ChunkedLogProbFunction.apply`` at call
  time. That name is pointed at :class:`ChunkedLogProb`, which takes the same arguments and
  returns the same five per-token tensors (log-probs, entropy, log(sum p^2), mean logit,
  top-1 flag), computed by dpo-fast. TRL keeps its loss, its metrics and its distributed
  plumbing (the call already runs inside the model's forward, under ZeRO-3 gathering).
- 0.29 <= trl < 1.15: ``DPOTrainer._compute_loss`` builds full logits. It is replaced by a
  version that runs the backbone once inside the model's forward and takes the loss and
  every logged metric from :func:`dpo_fast.dpo_loss`, under the same metric names and
  reductions; ``compute_ref_log_probs`` (precomputed reference log-probs) runs forward-only
  through dpo-fast as well. Settings dpo-fast does not implement (f-divergences other than
  reverse KL, ``ld_alpha``, WPO weighting, MoE auxiliary loss, ``return_outputs``) run TRL's
  own code, with a warning.
- older TRL (``concatenated_forward`` / ``get_batch_loss_metrics``) is refused with an error.

Verified against the stock trainer in the test suite: trl 1.16.0, 1.14.2 and 0.29.1; 1.15.0
by reading its source (the same fused-head call as 1.16.0).
"""

import contextlib
import sys
import warnings
from typing import Optional

import torch

from .. import api
from ..hf import DPOComputation, SequenceLogpsComputation, fused_forward, head_precision

FUSED_HEAD_SINCE = "1.15.0"  # first TRL whose DPOTrainer routes through _ChunkedLogProbFunction
COMPUTE_LOSS_SINCE = "0.29.0"  # first TRL whose DPOTrainer has _compute_loss (full logits)
VERIFIED_VERSIONS = ("0.29.1", "1.14.2", "1.15.0", "1.16.0")
# The per-token outputs TRL's ChunkedLogProbFunction returns, in order.
TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

_state = {}  # what patch_trl replaced, so unpatch_trl can put it back


def trl_version():
    import trl
    from packaging.version import Version

    return Version(trl.__version__)


# ----------------------------------------------------------------------------------------
# trl >= 1.15: the chunked log-prob function
# ----------------------------------------------------------------------------------------

class ChunkedLogProb:
    """Drop-in for ``trl.trainer.utils._ChunkedLogProbFunction``: ``apply(...)`` with TRL's arguments.

    ``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``targets [N]`` (-100: not
    scored; its outputs are 0 and get no gradient), ``temperature``, ``chunk_size`` (unused:
    dpo-fast tiles by ``memory_budget``), ``final_logit_softcapping``, ``logit_scale``,
    ``outputs`` (names of the optional outputs to return; the others are None).

    TRL calls it inside the model's forward with a ZeRO-3 head already gathered; the
    backward gathers it again (``dpo_fast.distributed``), as TRL's own function does.
    """

    def __init__(self, impl: str = "auto", memory_budget: Optional[int] = None):
        self.impl, self.memory_budget = impl, memory_budget

    def apply(self, hidden, weight, bias, targets, temperature=1.0, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=TRL_OUTPUTS[1:]):
        with head_precision(hidden, weight, bias) as (hidden, weight, bias):
            prep = api._prepare(hidden, weight, targets, bias, -100, float(temperature),
                                1.0 if logit_scale is None else float(logit_scale), final_logit_softcapping,
                                self.impl, None, None, self.memory_budget, False)
            if prep.layout.num_kept == 0:
                # Nothing scored: zeros that stay connected to the graph, so backward() still runs.
                zero = hidden.sum() * 0.0 + weight.sum() * 0.0
                full = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device) + zero.float()
                per_token = dict(log_probs=full, entropy=full, log_sum_sq_probs=full.detach(),
                                 mean_logits=full.detach(),
                                 is_top1=torch.zeros(targets.shape, dtype=torch.bool, device=hidden.device))
            else:
                kept = api._kept_token_outputs(prep, weight, bias)
                scatter = prep.layout.scatter
                per_token = dict(log_probs=scatter(kept.logps), entropy=scatter(kept.entropy),
                                 log_sum_sq_probs=scatter(kept.log_sum_sq_probs),
                                 mean_logits=scatter(kept.mean_logits), is_top1=scatter(kept.is_top1))
        return tuple(per_token[name] if name == "log_probs" or name in outputs else None for name in TRL_OUTPUTS)


def _patch_fused_head(impl, memory_budget):
    import trl.trainer.utils as trl_utils

    if "fused_head" not in _state:
        _state["fused_head"] = (trl_utils, trl_utils._ChunkedLogProbFunction)
    trl_utils._ChunkedLogProbFunction = ChunkedLogProb(impl, memory_budget)


# ----------------------------------------------------------------------------------------
# 0.29 <= trl < 1.15: DPOTrainer._compute_loss
# ----------------------------------------------------------------------------------------

_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
# 0.29 passes only these extra inputs to the model.
_MULTIMODAL_KEYS = ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes", "token_type_ids",
                    "mm_token_type_ids")


def _unsupported_setting(trainer, return_outputs) -> Optional[str]:
    """Why this step must run TRL's own ``_compute_loss``, or None."""
    if return_outputs:
        return "return_outputs=True (the caller wants the logits)"
    divergence = str(getattr(trainer, "f_divergence_type", "reverse_kl")).split(".")[-1].lower()
    alpha_is_kl = divergence == "alpha_divergence" and abs(getattr(trainer, "f_alpha_divergence_coef", 0) - 1) < 1e-6
    if divergence != "reverse_kl" and not alpha_is_kl:  # TRL: alpha = 1 is reverse KL
        return f"f_divergence_type={trainer.f_divergence_type!r}"
    if getattr(trainer, "ld_alpha", None) is not None:
        return "ld_alpha"
    if getattr(trainer, "use_weighting", False):
        return "use_weighting (WPO)"
    if getattr(trainer, "aux_loss_enabled", False):
        return "a MoE auxiliary loss"
    return None


def _warn_fallback(reason):
    seen = _state.setdefault("warned", set())
    if reason not in seen:
        seen.add(reason)
        warnings.warn(f"dpo-fast: {reason} is not supported by the fused DPO loss; this step runs TRL's own "
                      "_compute_loss (full logits)", stacklevel=3)


def _trainer_module():
    """trl.trainer.dpo_trainer, whose namespace holds the helpers its _compute_loss uses in this version."""
    return sys.modules[_state["compute_loss"][1].__module__]


def _model_inputs(trainer, inputs):
    """(input_ids, attention_mask, completion_mask, other model kwargs) the way this TRL version builds them."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    completion_mask = inputs["completion_mask"]
    if hasattr(trainer, "_truncate_inputs"):  # 0.29: truncation happens here, and only known keys reach the model
        input_ids, attention_mask, completion_mask = trainer._truncate_inputs(input_ids, attention_mask,
                                                                              completion_mask)
        extra = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
    else:
        extra = {k: v for k, v in inputs.items()
                 if k not in _NON_MODEL_KEYS and k not in ("input_ids", "attention_mask")}
    return input_ids, attention_mask, completion_mask, extra


def _reference_logps(trainer, input_ids, attention_mask, labels, extra, model=None):
    """[2B] reference sums, with the reference TRL picks: ``model`` when given (precompute), the
    separate reference model, or the policy with its PEFT adapter disabled."""
    module, settings = _trainer_module(), _state["settings"]
    computation = SequenceLogpsComputation(1.0, settings["impl"], settings["memory_budget"], False)
    no_checkpointing = module.disable_gradient_checkpointing(trainer.model,
                                                             trainer.args.gradient_checkpointing_kwargs)
    adapter = contextlib.nullcontext()
    if trainer.ref_model is None and module.is_peft_model(trainer.model):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        adapter = module.use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
    if model is None:  # (a module's truth value is not its presence: compare with None)
        model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    with torch.no_grad(), no_checkpointing, adapter, trainer.accelerator.autocast():
        with fused_forward(model, computation) as call:
            return call(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)


def _fused_compute_ref_log_probs(self, *args):
    """``compute_ref_log_probs([model,] inputs)`` (precomputed reference log-probs) through dpo-fast."""
    if getattr(self, "ld_alpha", None) is not None:
        _warn_fallback("ld_alpha")
        return _state["compute_ref_log_probs"][1](self, *args)
    model, inputs = (args[0] if len(args) > 1 else None), args[-1]
    input_ids, attention_mask, completion_mask, extra = _model_inputs(self, inputs)
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    return _reference_logps(self, input_ids, attention_mask, labels, extra, model).chunk(2)


def _fused_compute_loss(self, model, inputs, return_outputs=False):
    """``DPOTrainer._compute_loss`` for 0.29 <= trl < 1.15 with the loss and metrics from dpo-fast."""
    reason = _unsupported_setting(self, return_outputs)
    if reason is not None:
        _warn_fallback(reason)
        return _state["compute_loss"][1](self, model, inputs, return_outputs)
    settings = _state["settings"]
    mode = "train" if self.model.training else "eval"
    input_ids, attention_mask, completion_mask, extra = _model_inputs(self, inputs)
    labels = input_ids.masked_fill(completion_mask == 0, -100)

    if self.precompute_ref_logps:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = _reference_logps(self, input_ids, attention_mask, labels, extra).chunk(2)
    loss_kwargs = dict(beta=self.beta, loss_type=list(self.loss_types), loss_weights=list(self.loss_weights),
                       label_smoothing=self.label_smoothing, discopop_tau=self.args.discopop_tau,
                       impl=settings["impl"], memory_budget=settings["memory_budget"])
    computation = DPOComputation(ref_chosen, ref_rejected, loss_kwargs)
    # The trainer's model call normally carries accelerate's autocast; this forward is ours, so enter it here.
    with self.accelerator.autocast(), fused_forward(model, computation) as call:
        out = call(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)
    _log_metrics(self, mode, out, inputs, completion_mask)
    return out.loss


def _log_metrics(trainer, mode, out, inputs, completion_mask):
    """TRL's metric names and cross-process reductions, from dpo-fast's per-batch statistics."""
    acc, metrics = trainer.accelerator, trainer._metrics[mode]
    counts = completion_mask[..., 1:].sum(-1)
    pairs = counts.shape[0] // 2
    chosen_tokens, rejected_tokens = counts[:pairs].sum(), counts[pairs:].sum()
    all_tokens = chosen_tokens + rejected_tokens

    def gathered_sum(x):
        return acc.gather_for_metrics(x.detach().reshape(1).float()).sum().item()

    def weighted(mean, tokens):  # a per-token mean over this process -> the mean over all processes
        total = gathered_sum(tokens)
        return gathered_sum(mean * tokens) / total if total > 0 else 0.0

    metrics["entropy"].append(weighted(out.entropy, all_tokens))
    if mode == "train":
        tokens_in_batch = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        trainer._total_train_tokens += tokens_in_batch // getattr(trainer, "_tp_size", 1)
    metrics["num_tokens"] = [trainer._total_train_tokens]
    metrics["logits/chosen"].append(weighted(out.chosen_logits_mean, chosen_tokens))
    metrics["logits/rejected"].append(weighted(out.rejected_logits_mean, rejected_tokens))
    metrics["mean_token_accuracy"].append(weighted(out.token_accuracy, chosen_tokens))
    chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
    metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
    metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
    metrics["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
    metrics["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
    metrics["logps/chosen"].append(acc.gather(out.chosen_logps).mean().item())
    metrics["logps/rejected"].append(acc.gather(out.rejected_logps).mean().item())


def _patch_compute_loss(impl, memory_budget):
    from trl import DPOTrainer

    if not hasattr(DPOTrainer, "_compute_loss"):
        raise RuntimeError(f"trl {trl_version()}: DPOTrainer has no _compute_loss; dpo-fast cannot patch it")
    _state["settings"] = dict(impl=impl, memory_budget=memory_budget)
    for name, attr, replacement in (("compute_loss", "_compute_loss", _fused_compute_loss),
                                    ("compute_ref_log_probs", "compute_ref_log_probs", _fused_compute_ref_log_probs)):
        if name not in _state:
            _state[name] = (DPOTrainer, DPOTrainer.__dict__[attr], attr)
        setattr(DPOTrainer, attr, replacement)


# ----------------------------------------------------------------------------------------
# public switch
# ----------------------------------------------------------------------------------------

def patch_trl(impl: str = "auto", memory_budget: Optional[int] = None) -> str:
    """Make TRL's DPO training run dpo-fast. Returns which patch was applied ('fused_head' or 'compute_loss').

    ``impl`` and ``memory_budget`` are :func:`dpo_fast.dpo_loss`'s. Call :func:`unpatch_trl` to undo.
    """
    from packaging.version import Version

    api.check.check_impl(impl)
    version = trl_version()
    if version >= Version(FUSED_HEAD_SINCE):
        _patch_fused_head(impl, memory_budget)
        return "fused_head"
    if version >= Version(COMPUTE_LOSS_SINCE):
        _patch_compute_loss(impl, memory_budget)
        return "compute_loss"
    raise RuntimeError(
        f"dpo_fast.integrations.trl supports trl >= {COMPUTE_LOSS_SINCE} (verified: {', '.join(VERIFIED_VERSIONS)}); "
        f"installed trl {version} computes DPO in concatenated_forward/get_batch_loss_metrics, which dpo-fast does "
        "not patch. Upgrade trl, or call dpo_fast.hf.dpo_forward from your own training step.")


def unpatch_trl() -> None:
    """Undo :func:`patch_trl` (no-op when nothing is patched)."""
    if "fused_head" in _state:
        module, original = _state.pop("fused_head")
        module._ChunkedLogProbFunction = original
    for name in ("compute_loss", "compute_ref_log_probs"):
        if name in _state:
            cls, original, attr = _state.pop(name)
            setattr(cls, attr, original)
    _state.pop("settings", None)


def is_patched() -> bool:
    return "fused_head" in _state or "compute_loss" in _state


__all__ = ["ChunkedLogProb", "patch_trl", "unpatch_trl", "is_patched", "VERIFIED_VERSIONS"]
