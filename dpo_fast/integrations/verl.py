"""Switch verl's fused log-prob/entropy kernel to dpo-fast: ``patch_verl()``, or ``DPO_FAST_VERL=1``.

verl (0.9.x) with ``actor_rollout_ref.model.use_fused_kernels=True`` and
``fused_kernel_options.impl_backend=triton`` computes every log-prob and entropy of the actor
(and reference) through ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``::

    (hidden [..., H], weight [V_local, H], labels [...], temperature: float, reduction="none",
     dist_process_group=None) -> (logprobs [N] float32, entropy [N] float32)

with ``N = labels.numel()`` (flat, as verl's kernel returns them), both differentiable, and no
ignore index (the labels are the rolled input ids: every token is scored). The FSDP engine
imports that name inside the model's forward on every call, so replacing the module attribute
is enough; the Megatron engine binds it at import in ``verl.models.mcore.model_forward_fused``
and ``verl.models.mcore.model_forward_1f1b_overlap``: those are patched where they are already
imported, and a later import binds the patched attribute.

Under tensor parallelism (``dist_process_group``: the head is sharded by vocabulary rows) the
forward merges the statistics of every shard, as verl's kernel does, and the backward returns
each rank's *partial* grad_hidden, as verl's does: Megatron's sequence-parallel gather, whose
backward is a reduce-scatter, sums them. (dpo-fast's own vocabulary-parallel calls sum
grad_hidden themselves; here that sum is left to verl.)

A setting dpo-fast does not implement runs verl's own kernel, with one warning naming it:
``reduction`` other than "none" (verl's callers never pass one) and a tensor ``temperature``.
verl's own refusals, raised by its engines before this function is reached, stay as they are:
per-sample temperature and ``calculate_sum_pi_squared`` with ``use_fused_kernels``.

Activation without user code: verl loads the ``verl.plugins`` entry points on ``import verl``
in every worker; dpo-fast's (:mod:`dpo_fast.integrations.verl_plugin`) calls :func:`patch_verl`
only when the environment has ``DPO_FAST_VERL=1``, so installing dpo-fast never changes verl's
numbers by itself.

Verified against ``verl.utils.experimental.torch_functional.FusedLinearForPPO(impl_backend="torch")``
on verl 0.9.1 (tests/suite_verl.py).
"""

import importlib
import sys
from typing import Optional

import torch

from .. import api
from ..distributed import gathers_head, leave_grad_hidden_partial
from .patching import Patches

VERIFIED_VERSIONS = ("0.9.1",)
KERNEL_MODULE = "verl.utils.kernel.linear_cross_entropy"
# Megatron engine modules that bind the kernel with ``from ... import linear_cross_entropy``.
BOUND_AT_IMPORT = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")
NAME = "linear_cross_entropy"

_patches = Patches()  # what patch_verl replaced, so unpatch_verl can put it back


@gathers_head
@api._in_autocast_dtype
def _logprobs_and_entropy(hidden, weight, labels, *, temperature, impl, memory_budget, process_group):
    """verl's contract on dpo-fast's per-token path: flat float32 log-probs and entropy, no ignored token."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    # verl has no ignore index: the one dpo-fast needs is a value no token id takes (any other
    # negative id is refused as out of range).
    try:
        no_ignore = torch.iinfo(labels.dtype).min
    except TypeError:  # not an integer dtype: validation names it
        no_ignore = -100
    prep = api._prepare(hidden, weight, labels, None, no_ignore, temperature, 1.0, None, impl, None, None,
                        memory_budget, False, process_group)
    if process_group is not None:
        leave_grad_hidden_partial(prep.engine)
    if prep.layout.num_kept == 0:  # no token: empty outputs that stay connected to the graph
        empty = (hidden.sum() * 0.0 + weight.sum() * 0.0).float() + torch.zeros(0, device=hidden.device)
        return empty, empty
    kept = api._kept_token_outputs(prep, weight, None)
    return prep.layout.scatter(kept.logps.float()), prep.layout.scatter(kept.entropy.float())


class LinearCrossEntropy:
    """Drop-in for ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (see the module docstring).

    ``impl`` and ``memory_budget`` are :func:`dpo_fast.token_logps`'s. ``fallback``: verl's own
    function, for the settings dpo-fast does not implement.
    """

    def __init__(self, impl: str = "auto", memory_budget: Optional[int] = None, fallback=None):
        self.impl, self.memory_budget, self.fallback = impl, memory_budget, fallback

    def __call__(self, hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        reason = _unsupported(temperature, reduction)
        if reason is not None:
            return self._verl_function(reason)(hidden, weight, labels, temperature, reduction, dist_process_group)
        return _logprobs_and_entropy(hidden, weight, labels, temperature=float(temperature), impl=self.impl,
                                     memory_budget=self.memory_budget, process_group=dist_process_group)

    def _verl_function(self, reason):
        _patches.warn_fallback(reason, "verl's own linear_cross_entropy")
        if self.fallback is not None:
            return self.fallback
        from verl.utils.kernel.linear_cross_entropy import LinearCrossEntropy as VerlFunction

        return VerlFunction.apply


def _unsupported(temperature, reduction) -> Optional[str]:
    """Why this call must run verl's own kernel, or None."""
    if not isinstance(reduction, str) or reduction.lower() != "none":
        return f"reduction={reduction!r}"
    if isinstance(temperature, torch.Tensor) or isinstance(temperature, bool) or not isinstance(temperature,
                                                                                               (int, float)):
        return f"temperature of type {type(temperature).__name__} (dpo-fast takes one float per call)"
    return None


def patch_verl(impl: str = "auto", memory_budget: Optional[int] = None) -> list:
    """Make verl's fused log-prob/entropy kernel run dpo-fast. Returns the modules whose name was replaced.

    Takes effect where verl runs ``use_fused_kernels=True`` with ``impl_backend=triton``; call it in
    every worker (the ``verl.plugins`` entry point with ``DPO_FAST_VERL=1`` does). :func:`unpatch_verl` undoes it.
    """
    api.check.check_impl(impl)
    kernel = importlib.import_module(KERNEL_MODULE)
    original = _patches.original(KERNEL_MODULE) if _patches.holds(KERNEL_MODULE) else vars(kernel)[NAME]
    replacement = LinearCrossEntropy(impl, memory_budget, fallback=original)
    _patches.swap(kernel, NAME, replacement, key=KERNEL_MODULE)
    patched = [KERNEL_MODULE]
    for name in BOUND_AT_IMPORT:  # imported later, they bind the patched attribute themselves
        module = sys.modules.get(name)
        if module is not None and hasattr(module, NAME):
            _patches.swap(module, NAME, replacement, key=name)
            patched.append(name)
    return patched


def unpatch_verl() -> None:
    """Undo :func:`patch_verl` (no-op when nothing is patched), in modules imported since the patch too."""
    if not _patches.holds(KERNEL_MODULE):
        return
    original = _patches.original(KERNEL_MODULE)
    _patches.restore()
    for name in BOUND_AT_IMPORT:  # imported after the patch: they bound the replacement
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, NAME, None), LinearCrossEntropy):
            setattr(module, NAME, original)


def is_patched() -> bool:
    return _patches.holds(KERNEL_MODULE)


__all__ = ["LinearCrossEntropy", "patch_verl", "unpatch_verl", "is_patched", "VERIFIED_VERSIONS"]
