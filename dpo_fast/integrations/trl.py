"""Switch TRL's trainers to dpo-fast: ``patch_trl()`` once, before ``trainer.train()``.

How the switch is made depends on the installed TRL:

- trl >= 1.15: every trainer that uses TRL's fused LM head (``add_fused_lm_head``: DPO,
  SFT, KTO, GRPO, RLOO) calls ``trl.trainer.utils._ChunkedLogProbFunction.apply`` at call
  time. That name is pointed at :class:`ChunkedLogProb`, which takes the same arguments and
  returns the same five per-token tensors (log-probs, entropy, log(sum p^2), mean logit,
  top-1 flag), computed by dpo-fast. TRL keeps its loss, its metrics and its distributed
  plumbing (the call already runs inside the model's forward, under ZeRO-3 gathering).
  ``trl.experimental``'s CPOTrainer and ORPOTrainer, which build full logits, get a
  ``concatenated_forward`` that returns the same values from dpo-fast's per-token path.
- 0.29 <= trl < 1.15: ``DPOTrainer._compute_loss`` builds full logits. It is replaced by a
  version that runs the backbone once inside the model's forward and takes the loss and
  every logged metric from :func:`dpo_fast.dpo_loss`, under the same metric names and
  reductions; ``compute_ref_log_probs`` (precomputed reference log-probs) runs forward-only
  through dpo-fast as well. Settings dpo-fast does not implement (f-divergences other than
  reverse KL, ``ld_alpha``, WPO weighting, MoE auxiliary loss, ``return_outputs``) run TRL's
  own code, with a warning.
- 0.28 <= trl < 0.29: ``DPOTrainer.concatenated_forward`` builds full logits. It is replaced
  by a version that builds the same inputs (TRL's own flush/truncation helpers), runs the
  backbone inside the model's forward and returns the same keys from dpo-fast's per-token
  log-probs and mean logits (``chosen_logps``, ``rejected_logps``, ``mean_chosen_logits``,
  ``mean_rejected_logits``, ``nll_loss``); TRL's ``get_batch_loss_metrics`` keeps the loss
  and metrics, and ``compute_ref_log_probs`` goes through the same method. Encoder-decoder
  and vision models, ``padding_free``, MoE auxiliary loss, WPO weighting and ``ld_alpha``
  (policy) run TRL's own method, with a warning. ``use_logits_to_keep`` needs nothing: no
  logits are built.
- older TRL is refused with an error.

Verified against the stock trainer in the test suite: DPO on trl 1.16.0, 1.14.2, 0.29.1 and
0.28.0 (1.15.0 by reading its source: the same fused-head call as 1.16.0); SFT, KTO, GRPO,
RLOO, CPO and ORPO on trl 1.16.0 (tests/test_trl_trainers.py).
"""

import contextlib
import sys
from typing import Optional

import torch

from .. import api
from ..losses import pair_losses
from ..objective import dpo_output, pair_terms
from ..distributed import gathered
from ..hf import (DPOComputation, HeadComputation, SequenceLogpsComputation, fused_forward, head_precision,
                  resolve_head, shift_targets)
from .patching import Patches

FUSED_HEAD_SINCE = "1.15.0"  # first TRL whose DPOTrainer routes through _ChunkedLogProbFunction
COMPUTE_LOSS_SINCE = "0.29.0"  # first TRL whose DPOTrainer has _compute_loss (full logits)
CONCATENATED_FORWARD_SINCE = "0.28.0"  # oldest TRL whose concatenated_forward was checked
VERIFIED_VERSIONS = ("0.28.0", "0.29.1", "1.14.2", "1.15.0", "1.16.0")
# The per-token outputs TRL's ChunkedLogProbFunction returns, in order.
TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

_patches = Patches()  # what patch_trl replaced, so unpatch_trl can put it back


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

    The products run in TRL's compute dtype: the autocast dtype under autocast, else the
    hidden states' dtype (so ``cast_lm_head_to_fp32=True``, which hands over float32 hidden
    states outside autocast, keeps a float32 head over a 16-bit weight).

    An argument TRL adds in a later version (its development branch has ``sampling_mask``)
    that dpo-fast does not implement sends that call to TRL's own function (``fallback``),
    with one warning naming the argument: never a TypeError in the middle of training.

    TRL calls it inside the model's forward with a ZeRO-3 head already gathered; the
    backward gathers it again (``dpo_fast.distributed``), as TRL's own function does.
    """

    def __init__(self, impl: str = "auto", memory_budget: Optional[int] = None, fallback=None,
                 batch_invariant: bool = False):
        self.impl, self.memory_budget, self.fallback = impl, memory_budget, fallback
        self.batch_invariant = batch_invariant

    def apply(self, hidden, weight, bias, targets, temperature=1.0, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=TRL_OUTPUTS[1:], *more, **named):
        unknown = [f"argument {9 + i}" for i, value in enumerate(more) if value is not None]
        unknown += [name for name, value in named.items() if value is not None]
        if unknown:
            return self._trl_function(", ".join(unknown)).apply(
                hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs,
                *more, **named)
        api.check.check_token_ids(targets=targets)
        with _trl_compute_precision(hidden, weight, bias) as (hidden, weight, bias):
            prep = api._prepare(hidden, weight, targets, bias, -100, float(temperature),
                                1.0 if logit_scale is None else float(logit_scale), final_logit_softcapping,
                                self.impl, None, None, self.memory_budget, False,
                                batch_invariant=self.batch_invariant)
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

    def _trl_function(self, what):
        _warn_fallback(f"{what} of TRL's chunked log-prob function", "_ChunkedLogProbFunction")
        if self.fallback is not None:
            return self.fallback
        from trl.kernels import ChunkedLogProbFunction

        return ChunkedLogProbFunction


@contextlib.contextmanager
def _trl_compute_precision(hidden, weight, bias):
    """(hidden, weight, bias) in TRL's compute dtype: autocast's when it is on, else the hidden states' dtype."""
    if torch.is_autocast_enabled(hidden.device.type):
        with head_precision(hidden, weight, bias) as cast:
            yield cast
        return
    dtype = hidden.dtype
    if weight.dtype != dtype:  # differentiable casts: the gradient reaches the head in its own dtype
        with gathered(weight, bias):
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    elif bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    yield hidden, weight, bias


def _patch_fused_head(impl, memory_budget, batch_invariant=False):
    import trl.trainer.utils as trl_utils

    original = (_patches.original("fused_head") if _patches.holds("fused_head")
                else vars(trl_utils)["_ChunkedLogProbFunction"])
    _patches.swap(trl_utils, "_ChunkedLogProbFunction",
                  ChunkedLogProb(impl, memory_budget, fallback=original, batch_invariant=batch_invariant),
                  key="fused_head")


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


def _warn_fallback(reason, method="_compute_loss (full logits)"):
    _patches.warn_fallback(reason, f"TRL's own {method}")


def _trainer_module():
    """trl.trainer.dpo_trainer, whose namespace holds the helpers its _compute_loss uses in this version."""
    return sys.modules[_patches.original("compute_loss").__module__]


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
    module, settings = _trainer_module(), _patches.settings
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
        return _patches.original("compute_ref_log_probs")(self, *args)
    model, inputs = (args[0] if len(args) > 1 else None), args[-1]
    input_ids, attention_mask, completion_mask, extra = _model_inputs(self, inputs)
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    return _reference_logps(self, input_ids, attention_mask, labels, extra, model).chunk(2)


def _fused_compute_loss(self, model, inputs, return_outputs=False):
    """``DPOTrainer._compute_loss`` for 0.29 <= trl < 1.15 with the loss and metrics from dpo-fast."""
    reason = _unsupported_setting(self, return_outputs)
    if reason is not None:
        _warn_fallback(reason)
        return _patches.original("compute_loss")(self, model, inputs, return_outputs)
    settings = _patches.settings
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
    divisor = _trl_length_divisor(self.loss_types, completion_mask)
    computation = (DPOComputation(ref_chosen, ref_rejected, loss_kwargs) if divisor is None
                   else TokenOutputsComputation(settings["impl"], settings["memory_budget"]))
    # The trainer's model call normally carries accelerate's autocast; this forward is ours, so enter it here.
    with self.accelerator.autocast(), fused_forward(model, computation) as call:
        out = call(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)
    if divisor is not None:
        out = _loss_with_trl_lengths(out, divisor, ref_chosen, ref_rejected, loss_kwargs)
    _log_metrics(self, mode, out, inputs, completion_mask)
    return out.loss


# Loss types whose TRL 0.29-1.14 formula divides by the completion length.
_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")


def _trl_length_divisor(loss_types, completion_mask):
    """TRL 0.29-1.14's ipo and sigmoid_norm divide by ``completion_mask.sum(-1)``: the unshifted mask, which
    counts one token more than are scored when a completion starts at position 0 (an empty prompt, or a
    prompt cut away by truncation). dpo-fast divides by the scored tokens. Returns TRL's divisor [2B] where
    the two differ for this batch, else None (then the loss runs on dpo_loss's own route, pairs included)."""
    if not any(name in _LENGTH_NORMALISED for name in loss_types):
        return None
    divisor = completion_mask.sum(-1)
    return divisor if bool((divisor != completion_mask[..., 1:].sum(-1)).any()) else None


def _loss_with_trl_lengths(token_outputs, divisor, ref_chosen, ref_rejected, loss_kwargs):
    """dpo_loss's output from per-token outputs, with TRL's length divisor in the length-normalised formulas
    (token means in the metrics and the sft NLL keep the scored-token counts, as TRL's do)."""
    log_probs, entropy, mean_logits, is_top1, targets = token_outputs
    scored = targets != -100
    lengths = scored.sum(-1)
    pairs = lengths.shape[0] // 2
    cfg = api._loss_config(loss_kwargs["loss_type"], loss_kwargs["loss_weights"], loss_kwargs["beta"],
                           loss_kwargs["label_smoothing"], 0.5, loss_kwargs["discopop_tau"], 1.0, True)
    sequence = log_probs.sum(-1)
    divisor = divisor.to(sequence.device)
    terms = pair_terms(sequence[:pairs], sequence[pairs:], ref_chosen, ref_rejected, divisor[:pairs], divisor[pairs:],
                       cfg, float(lengths[:pairs].sum()), pairs)
    loss = pair_losses(terms, cfg.loss_types, cfg.loss_weights).mean().to(sequence.dtype)
    return dpo_output(loss, sequence.detach(), lengths, ref_chosen, ref_rejected, cfg, mean_logits.sum(-1),
                      is_top1.float().sum(-1), entropy.sum(-1))


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
    _patches.settings = dict(impl=impl, memory_budget=memory_budget)
    for name, attr, replacement in (("compute_loss", "_compute_loss", _fused_compute_loss),
                                    ("compute_ref_log_probs", "compute_ref_log_probs", _fused_compute_ref_log_probs)):
        _patches.swap(DPOTrainer, attr, replacement, key=name)


# ----------------------------------------------------------------------------------------
# 0.28 <= trl < 0.29: DPOTrainer.concatenated_forward
# ----------------------------------------------------------------------------------------

# Inputs that make TRL 0.28 build the model call differently (images, token types): TRL's own code runs.
_VISION_BATCH_KEYS = ("pixel_values", "pixel_attention_mask", "image_sizes", "token_type_ids")


class _TokenPathComputation(HeadComputation):
    """A computation on dpo-fast's per-token path (targets marked with -100, as TRL marks them)."""

    def __init__(self, impl, memory_budget):
        self.impl, self.memory_budget = impl, memory_budget

    def _prepare(self, hidden, weight, bias, targets, transform):
        return api._prepare(hidden, weight, targets, bias, -100, 1.0, transform.scale, transform.softcap, self.impl,
                            None, None, self.memory_budget, False)


class TokenOutputsComputation(_TokenPathComputation):
    """Per-token log-probs (differentiable), entropy, vocab-mean logits and top-1 flags, shaped like the targets.

    Returns ``(log_probs, entropy, mean_logits, is_top1, targets)``, each ``[rows, T]`` (0 where
    not scored): small tensors from which the caller takes whichever per-sequence reductions its
    trainer version logs.
    """

    def from_hidden(self, hidden, targets, head):
        with head_precision(hidden, head.weight, head.bias) as (hidden, weight, bias):
            prep = self._prepare(hidden, weight, bias, targets, head.transform)
            kept = api._kept_token_outputs(prep, weight, bias)
            scatter = prep.layout.scatter
            return (scatter(kept.logps), scatter(kept.entropy.detach()), scatter(kept.mean_logits.detach().float()),
                    scatter(kept.is_top1), targets)

    def from_logits(self, logits, targets):
        impl = "auto" if self.impl == "fused" else self.impl
        log_probs, entropy, _, mean_logits, is_top1 = api._logits_outputs(logits, targets, -100, 1.0, False, impl)
        return log_probs, entropy.detach(), mean_logits, is_top1, targets


def _unsupported_forward(trainer, batch, is_ref_model) -> Optional[str]:
    """Why this ``concatenated_forward`` call must run TRL's own code, or None."""
    if trainer.is_encoder_decoder:
        return "an encoder-decoder model"
    if getattr(trainer, "is_vision_model", False) or any(k in batch for k in _VISION_BATCH_KEYS):
        return "a vision model (image inputs / token_type_ids)"
    if trainer.padding_free:
        return "padding_free"
    if trainer.aux_loss_enabled:
        return "a MoE auxiliary loss"
    if trainer.use_weighting:
        return "use_weighting (WPO)"
    if trainer.args.ld_alpha is not None and not is_ref_model:  # TRL applies it to the policy only
        return "ld_alpha"
    return None


def _concatenated_model_inputs(trainer, batch):
    """(input_ids, attention_mask, completion_mask) [2B, T] as TRL 0.28 builds them: prompt + completion,
    flushed left and truncated to ``max_length`` with TRL's own helpers."""
    module = sys.modules[_patches.original("concatenated_forward").__module__]
    joined = trainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id)
    prompt_mask = joined["prompt_attention_mask"]
    input_ids = torch.cat((joined["prompt_input_ids"], joined["completion_input_ids"]), dim=1)
    attention_mask = torch.cat((prompt_mask, joined["completion_attention_mask"]), dim=1)
    loss_mask = torch.cat((torch.zeros_like(prompt_mask), joined["completion_attention_mask"]), dim=1)
    limit = trainer.max_length
    if limit is not None and limit < attention_mask.size(1):
        if trainer.truncation_mode == "keep_start":
            attention_mask, input_ids, loss_mask = module.flush_left(attention_mask, input_ids, loss_mask)
            return input_ids[:, :limit], attention_mask[:, :limit], loss_mask[:, :limit]
        if trainer.truncation_mode != "keep_end":
            raise ValueError(f"Unknown truncation mode: {trainer.truncation_mode!r}")
        attention_mask, input_ids, loss_mask = module.flush_right(attention_mask, input_ids, loss_mask)
        attention_mask, input_ids, loss_mask = attention_mask[:, -limit:], input_ids[:, -limit:], loss_mask[:, -limit:]
    attention_mask, input_ids, loss_mask = module.flush_left(attention_mask, input_ids, loss_mask)
    return input_ids, attention_mask, loss_mask


def _fused_concatenated_forward(self, model, batch, is_ref_model=False):
    """``DPOTrainer.concatenated_forward`` for trl 0.28: the same output keys and meanings, no [N, V] logits.

    ``chosen_logps`` / ``rejected_logps``: sums over completion tokens (means under ``ipo``),
    differentiable; ``mean_chosen_logits`` / ``mean_rejected_logits``: the mean logit over
    completion tokens and vocabulary; ``nll_loss`` (with ``rpo_alpha`` or ``sft``): the
    mean NLL of chosen completion tokens, skipping target id 0 as TRL 0.28's
    ``cross_entropy(..., ignore_index=0)`` does.
    """
    reason = _unsupported_forward(self, batch, is_ref_model)
    if reason is not None:
        _warn_fallback(reason, "concatenated_forward (full logits)")
        return _patches.original("concatenated_forward")(self, model, batch, is_ref_model)
    settings = _patches.settings
    input_ids, attention_mask, loss_mask = _concatenated_model_inputs(self, batch)
    labels = input_ids.masked_fill(loss_mask == 0, -100)
    computation = TokenOutputsComputation(settings["impl"], settings["memory_budget"])
    with self.accelerator.autocast(), fused_forward(model, computation) as call:
        log_probs, _, mean_logits, _, targets = call(input_ids=input_ids, attention_mask=attention_mask,
                                                     labels=labels)
    scored = targets != -100
    pairs = batch["prompt_input_ids"].shape[0]
    lengths = scored.sum(-1)
    sequence_logps = log_probs.sum(-1)
    output = {}
    if self.args.rpo_alpha is not None or "sft" in self.loss_type:
        nll_tokens = scored[:pairs] & (targets[:pairs] != 0)
        output["nll_loss"] = -(log_probs[:pairs] * nll_tokens).sum() / nll_tokens.sum()
    if "ipo" in self.loss_type:
        sequence_logps = sequence_logps / lengths
    output["chosen_logps"], output["rejected_logps"] = sequence_logps[:pairs], sequence_logps[pairs:]
    logit_sums = mean_logits.sum(-1)  # each token's mean over the vocabulary: equal weights per token
    output["mean_chosen_logits"] = logit_sums[:pairs].sum() / lengths[:pairs].sum()
    output["mean_rejected_logits"] = logit_sums[pairs:].sum() / lengths[pairs:].sum()
    return output


def _patch_concatenated_forward(impl, memory_budget):
    from trl import DPOTrainer

    if not hasattr(DPOTrainer, "concatenated_forward"):
        raise RuntimeError(f"trl {trl_version()}: DPOTrainer has no concatenated_forward; dpo-fast cannot patch it")
    _patches.settings = dict(impl=impl, memory_budget=memory_budget)
    _patches.swap(DPOTrainer, "concatenated_forward", _fused_concatenated_forward)


# ----------------------------------------------------------------------------------------
# trl.experimental CPOTrainer and ORPOTrainer: concatenated_forward
# ----------------------------------------------------------------------------------------

class PositionOutputsComputation(_TokenPathComputation):
    """Per-token log-probs (differentiable) at scored positions and the vocab-mean logit at every position.

    Returns ``(log_probs, mean_logits, targets)``, each ``[rows, T]``. CPO and ORPO log the
    mean of their full ``[rows, T, V]`` logits, padding and prompt positions included; each
    position has V logits, so that is the mean of ``mean_logits``. Without a softcap the
    vocab-mean logit is linear in the hidden state (``scale * (h . mean(W) + mean(b))``):
    one [N, H] x [H] product covers every position; with a softcap the unscored positions
    take a forward-only pass of the kernel.
    """

    def from_hidden(self, hidden, targets, head):
        t = head.transform
        with head_precision(hidden, head.weight, head.bias) as (hidden, weight, bias):
            prep = self._prepare(hidden, weight, bias, targets, t)
            log_probs = prep.layout.scatter(api._kept_token_outputs(prep, weight, bias).logps)
            with torch.no_grad():
                if t.softcap is None:
                    mean_w = weight.float().mean(0)
                    mean_b = 0.0 if bias is None else bias.float().mean()
                    mean_logits = (hidden.float() @ mean_w + mean_b) * t.scale
                else:
                    every = self._prepare(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                          targets.clamp(min=0), t)
                    stats = api._kept_token_outputs(every, weight.detach(), None if bias is None else bias.detach())
                    mean_logits = every.layout.scatter(stats.mean_logits.float())
        return log_probs, mean_logits, targets

    def from_logits(self, logits, targets):
        impl = "auto" if self.impl == "fused" else self.impl
        log_probs = api._logits_outputs(logits, targets, -100, 1.0, False, impl)[0]
        return log_probs, logits.detach().float().mean(-1), targets


def _unsupported_preference_forward(trainer, model=None) -> Optional[str]:
    """Why this CPO/ORPO ``concatenated_forward`` must run TRL's own code, or None."""
    if trainer.is_encoder_decoder:
        return "an encoder-decoder model"
    if trainer.aux_loss_enabled:
        return "a MoE auxiliary loss"
    if model is not None:
        try:  # a head dpo-fast cannot read (a PEFT adapter on lm_head, no separate backbone)
            resolve_head(model)
        except (NotImplementedError, TypeError) as exc:
            return f"this model ({str(exc).split(';')[0]})"
    return None


def _preference_forward(trainer, model, batch, padding_value, targets_of):
    """Runs the backbone on TRL's concatenated batch; ``targets_of(concatenated, pairs)`` gives the labels.

    Returns (log_probs, mean_logits, shifted targets, shifted completion mask, pairs)."""
    concatenated = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=padding_value,
                                               device=trainer.accelerator.device)
    pairs = batch["chosen_labels"].shape[0]
    labels = targets_of(concatenated, pairs)
    settings = _patches.settings
    computation = PositionOutputsComputation(settings["impl"], settings["memory_budget"])
    with trainer.accelerator.autocast(), fused_forward(model, computation) as call:
        log_probs, mean_logits, targets = call(input_ids=concatenated["concatenated_input_ids"],
                                               attention_mask=concatenated["concatenated_attention_mask"],
                                               labels=labels)
    completion = shift_targets(concatenated["concatenated_labels"].to(targets.device)) != -100
    return log_probs, mean_logits, targets, completion, pairs


def _fused_cpo_forward(self, model, batch):
    """``CPOTrainer.concatenated_forward`` without [N, V] logits: the same five outputs and meanings.

    ``chosen_logps`` / ``rejected_logps``: sums over completion tokens (means under ``ipo``
    and ``simpo``); the "logits" are the per-position vocab-mean logits ``[B, T]``, whose
    mean is the mean of TRL's logits; ``nll_loss``: mean NLL over chosen completion tokens
    (0 when ``cpo_alpha == 0``). TRL's ``cpo_loss`` and ``get_batch_loss_metrics`` run as they are.
    """
    reason = _unsupported_preference_forward(self, model)
    if reason is not None:
        _warn_fallback(reason, "CPOTrainer.concatenated_forward (full logits)")
        return _patches.original("cpo")(self, model, batch)
    log_probs, mean_logits, _, completion, pairs = _preference_forward(
        self, model, batch, self.pad_token_id, lambda concatenated, pairs: concatenated["concatenated_labels"])
    sums, counts = (log_probs * completion).sum(-1), completion.sum(-1)
    logps = sums / counts if self.loss_type in ("ipo", "simpo") else sums
    if self.cpo_alpha == 0:
        nll_loss = torch.tensor(0.0, device=self.accelerator.device)
    else:
        nll_loss = -sums[:pairs].sum() / counts[:pairs].sum()
    return logps[:pairs], logps[pairs:], mean_logits[:pairs], mean_logits[pairs:], nll_loss


def _orpo_targets(concatenated, pairs):
    """ORPO's NLL covers the chosen prompt and response (every attended token); the odds ratio the
    rejected completion: chosen rows score every attended token, rejected rows their completion."""
    input_ids, attention = concatenated["concatenated_input_ids"], concatenated["concatenated_attention_mask"]
    chosen = input_ids[:pairs].masked_fill(attention[:pairs] == 0, -100)
    return torch.cat((chosen, concatenated["concatenated_labels"][pairs:]))


def _fused_orpo_forward(self, model, batch):
    """``ORPOTrainer.concatenated_forward`` without [N, V] logits: the same five outputs and meanings.

    ``chosen_logps`` / ``rejected_logps``: means over completion tokens; the "logits" are the
    vocab-mean logits of every position but the last ``[B, T - 1]`` (TRL's ``logits[:, :-1]``);
    ``nll_loss``: mean NLL over every attended chosen token, prompt included. TRL's
    ``odds_ratio_loss`` and ``get_batch_loss_metrics`` run as they are.
    """
    reason = _unsupported_preference_forward(self, model)
    if reason is not None:
        _warn_fallback(reason, "ORPOTrainer.concatenated_forward (full logits)")
        return _patches.original("orpo")(self, model, batch)
    log_probs, mean_logits, targets, completion, pairs = _preference_forward(self, model, batch, self.padding_value,
                                                                            _orpo_targets)
    nll_tokens = targets[:pairs] != -100
    nll_loss = -(log_probs[:pairs] * nll_tokens).sum() / nll_tokens.sum()
    logps = (log_probs * completion).sum(-1) / completion.sum(-1)
    mean_logits = mean_logits[:, :-1]
    return logps[:pairs], logps[pairs:], mean_logits[:pairs], mean_logits[pairs:], nll_loss


def _patch_preference_trainers(impl, memory_budget):
    """CPOTrainer and ORPOTrainer of trl.experimental, where this TRL has them."""
    import importlib

    patched = []
    for name, module_name, class_name, replacement in (
            ("cpo", "trl.experimental.cpo", "CPOTrainer", _fused_cpo_forward),
            ("orpo", "trl.experimental.orpo", "ORPOTrainer", _fused_orpo_forward)):
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        if "concatenated_forward" not in vars(cls):
            continue
        _patches.settings = dict(impl=impl, memory_budget=memory_budget)
        _patches.swap(cls, "concatenated_forward", replacement, key=name)
        patched.append(name)
    return patched


# ----------------------------------------------------------------------------------------
# public switch
# ----------------------------------------------------------------------------------------

BATCH_INVARIANT_ENV = "DPO_FAST_BATCH_INVARIANT"


def patch_trl(impl: str = "auto", memory_budget: Optional[int] = None, batch_invariant: Optional[bool] = None) -> str:
    """Make TRL's trainers run dpo-fast. Returns which patch was applied ('fused_head', 'compute_loss' or
    'concatenated_forward'); with 'fused_head', trl.experimental's CPO and ORPO trainers are patched too.

    ``impl`` and ``memory_budget`` are :func:`dpo_fast.dpo_loss`'s. ``batch_invariant=True`` (None: the
    environment variable DPO_FAST_BATCH_INVARIANT=1) gives TRL's per-token log-probs and entropy (GRPO,
    RLOO, DPO... on trl >= 1.15) the batch-invariant forward of :func:`dpo_fast.token_logps`. Call
    :func:`unpatch_trl` to undo.
    """
    import os

    from packaging.version import Version

    api.check.check_impl(impl)
    if batch_invariant is None:
        batch_invariant = os.environ.get(BATCH_INVARIANT_ENV, "0") == "1"
    api.check.check_flags(batch_invariant=batch_invariant)
    version = trl_version()
    if batch_invariant and version < Version(FUSED_HEAD_SINCE):
        raise ValueError(f"batch_invariant=True patches TRL's fused LM head, which trl >= {FUSED_HEAD_SINCE} has; "
                         f"installed trl {version}")
    if version >= Version(FUSED_HEAD_SINCE):
        _patch_fused_head(impl, memory_budget, batch_invariant)
        _patch_preference_trainers(impl, memory_budget)
        return "fused_head"
    if version >= Version(COMPUTE_LOSS_SINCE):
        _patch_compute_loss(impl, memory_budget)
        return "compute_loss"
    if version >= Version(CONCATENATED_FORWARD_SINCE):
        _patch_concatenated_forward(impl, memory_budget)
        return "concatenated_forward"
    raise RuntimeError(
        f"dpo_fast.integrations.trl supports trl >= {CONCATENATED_FORWARD_SINCE} (verified: "
        f"{', '.join(VERIFIED_VERSIONS)}); installed trl {version} is older and its concatenated_forward was never "
        "checked against dpo-fast. Upgrade trl, or call dpo_fast.hf.dpo_forward from your own training step.")


def unpatch_trl() -> None:
    """Undo :func:`patch_trl` (no-op when nothing is patched)."""
    _patches.restore()


def is_patched() -> bool:
    return _patches.holds("fused_head", "compute_loss", "concatenated_forward")


__all__ = ["ChunkedLogProb", "patch_trl", "unpatch_trl", "is_patched", "VERIFIED_VERSIONS"]
