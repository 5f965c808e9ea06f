"""Switch LLaMA-Factory's DPO trainer to dpo-fast: ``patch_llamafactory()`` once, before training.

LLaMA-Factory (0.9.x) computes the log-probs of DPO, ORPO, SimPO and BCO (``stage: dpo`` with
``pref_loss`` sigmoid / orpo / simpo / bco / ...) in ``CustomDPOTrainer.concatenated_forward``, which
overrides TRL's: full logits, copied to float32, ``get_batch_logps``. The reference pass
(``compute_reference_log_probs``, under ``no_grad``) goes through the same method. The replacement runs
the backbone inside the model's forward and returns the same keys from dpo-fast's per-token path:
``chosen_logps`` / ``rejected_logps`` (sums; means under ipo, orpo and simpo), ``chosen_logps_avg``, and
as ``chosen_logits`` / ``rejected_logits`` the per-position vocabulary means ``[B, T]``, whose mean is the
mean of the full ``[B, T, V]`` logits that LLaMA-Factory logs (the only use it makes of them).

Settings dpo-fast does not implement run LLaMA-Factory's own method, with one warning naming the setting:
``ld_alpha`` on the policy pass, vision-language inputs, and a model whose head dpo-fast cannot read.

KTO (``CustomKTOTrainer``) has its own ``forward`` / ``concatenated_forward`` (a KL batch beside the
target batch) and is not patched: it runs LLaMA-Factory's full-logits code.
"""

from typing import Optional

from ..hf import fused_forward, resolve_head
from .patching import Patches
from .trl import PositionOutputsComputation

VERIFIED_VERSIONS = ("0.9.5",)
_LENGTH_AVERAGED = ("ipo", "orpo", "simpo")  # LLaMA-Factory divides these by the scored-token count
_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "token_type_ids",
                "input_features", "mm_token_type_ids")

_patches = Patches()  # what patch_llamafactory replaced, so unpatch_llamafactory can put it back


def _unsupported(trainer, model, batch, is_ref_model) -> Optional[str]:
    if getattr(trainer, "ld_alpha", None) is not None and not is_ref_model:
        return "ld_alpha"
    if any(key in batch for key in _VISION_KEYS):
        return "a vision-language batch"
    try:
        resolve_head(model)
    except (NotImplementedError, TypeError, AttributeError, ValueError) as exc:
        return f"this model ({str(exc).split(';')[0]})"
    return None


def _fused_concatenated_forward(self, model, batch, is_ref_model=False):
    """``CustomDPOTrainer.concatenated_forward`` without [N, V] logits (see the module docstring)."""
    reason = _unsupported(self, model, batch, is_ref_model)
    if reason is not None:
        _patches.warn_fallback(reason, "LLaMA-Factory's own CustomDPOTrainer.concatenated_forward (full logits)")
        return _patches.original("concatenated_forward")(self, model, batch, is_ref_model)
    batch = dict(batch)  # LLaMA-Factory pops "labels" from its (cloned) batch; the caller's stays whole
    labels = batch.pop("labels")
    settings = _patches.settings
    computation = PositionOutputsComputation(settings["impl"], settings["memory_budget"])
    with self.accelerator.autocast(), fused_forward(model, computation) as call:
        log_probs, mean_logits, targets = call(**batch, labels=labels)
    scored = targets != -100
    all_logps, valid_length = (log_probs * scored).sum(-1), scored.sum(-1)
    if self.loss_type in _LENGTH_AVERAGED:
        all_logps = all_logps / valid_length
    pairs = batch["input_ids"].size(0) // 2
    chosen_logps, rejected_logps = all_logps.split(pairs, dim=0)
    chosen_logits, rejected_logits = mean_logits.split(pairs, dim=0)
    chosen_length, _ = valid_length.split(pairs, dim=0)
    chosen_logps_avg = chosen_logps if self.loss_type in _LENGTH_AVERAGED else chosen_logps / chosen_length
    return {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps, "chosen_logits": chosen_logits,
            "rejected_logits": rejected_logits, "chosen_logps_avg": chosen_logps_avg}


def patch_llamafactory(impl: str = "auto", memory_budget: Optional[int] = None) -> None:
    """Make ``CustomDPOTrainer.concatenated_forward`` run dpo-fast. :func:`unpatch_llamafactory` undoes it."""
    from llamafactory.train.dpo.trainer import CustomDPOTrainer

    from .. import api

    api.check.check_impl(impl)
    _patches.settings = dict(impl=impl, memory_budget=memory_budget)
    _patches.swap(CustomDPOTrainer, "concatenated_forward", _fused_concatenated_forward)


def unpatch_llamafactory() -> None:
    """Undo :func:`patch_llamafactory` (no-op when nothing is patched)."""
    _patches.restore()


def is_patched() -> bool:
    return _patches.holds()


__all__ = ["patch_llamafactory", "unpatch_llamafactory", "is_patched", "VERIFIED_VERSIONS"]
