"""dpo-fast inside any Hugging Face causal LM: backbone, head and logit post-processing resolved once.

A causal LM computes ``logits = post(lm_head(base_model(x).last_hidden_state))``. This module
finds the three parts for any ``transformers`` model:

- the backbone, ``model.base_model`` (not ``get_decoder()``: multimodal wrappers inject
  their image features in ``base_model``);
- the head, ``model.get_output_embeddings()``: its weight (tied to the input embeddings
  or not), its bias, and whether it is frozen;
- the post-processing: a scale, then a softcap, then the temperature, each read where the
  model's own forward reads it (:func:`logit_transform_of`): an attribute of the model
  (Cohere's ``self.logit_scale``, copied from the config when the model is built), of its
  backbone (FalconH1's ``self.model.lm_head_multiplier``), else the config.

The first time a model is used, the reconstruction is checked against ``model(x).logits``
on a few tokens: a model that post-processes its logits in a way dpo-fast does not read
is refused with an error naming its type, or (``fallback="naive"``) run through its own
full-logits forward instead. The verdict is kept with what the rebuild read (every
candidate setting on the model, its backbone and its config, and the head's structure):
a later change of any of them, such as an edited ``model.logit_scale`` or
``config.logit_scale``, is checked again.

The fused computation runs *inside the model's forward*: :func:`fused_forward` swaps the
forward of the inner ``PreTrainedModel`` for one that runs the backbone and then the
dpo-fast head, and the caller calls the outer module (DDP, FSDP, DeepSpeed, PEFT), so
every wrapper's hooks fire as they would for an ordinary forward.
"""

import contextlib
import dataclasses
import types
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import api
from . import validation as check
from .distributed import agreed_max, call_through_module, gathered, shards_own_params
from .transform import LogitTransform

# Scale names, first found wins (this is also the order TRL reads them in).
_SCALE_MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier")
_SCALE_DIVISOR = "logits_scaling"  # divides (Granite, MiniCPM3), multiplies for HyperCLOVA X
_SOFTCAP = "final_logit_softcapping"
_SETTINGS = _SCALE_MULTIPLIERS + (_SCALE_DIVISOR, _SOFTCAP)
# Tokens of the one-time reconstruction check.
_CHECK_TOKENS = 8


class ReconstructionError(RuntimeError):
    """The model's logits are not lm_head(base_model(x)) post-processed as its config says."""


# ----------------------------------------------------------------------------------------
# resolving a model
# ----------------------------------------------------------------------------------------

def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``PreTrainedModel`` inside DDP / DeepSpeed / FSDP1 (``.module``), ``torch.compile``
    (``._orig_mod``) and PEFT (``get_base_model()``) wrappers."""
    inner = model
    while True:
        if isinstance(getattr(inner, "_orig_mod", None), torch.nn.Module):
            inner = inner._orig_mod
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        elif callable(getattr(inner, "get_base_model", None)) and hasattr(inner, "peft_config"):
            inner = inner.get_base_model()
        else:
            return inner


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _setting(name, holders):
    """The first number ``name`` holds among ``holders`` (modules, then the config), or None.

    A module attribute counts only as a plain number: a tensor of that name (CLIP's learned
    ``logit_scale``, a per-row scale) is not one of these settings, and a model that applies
    one fails the reconstruction check instead of being rebuilt without it.
    """
    for holder in holders:
        value = getattr(holder, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _transform_from(holders, model_type: str, temperature: float = 1.0) -> LogitTransform:
    scale = None
    for name in _SCALE_MULTIPLIERS:
        scale = _setting(name, holders)
        if scale is not None:
            break
    divisor = _setting(_SCALE_DIVISOR, holders)
    if scale is None and divisor is not None:
        scale = divisor if model_type.startswith("hyperclovax") else 1.0 / divisor
    softcap = _setting(_SOFTCAP, holders)
    return LogitTransform(scale=1.0 if scale is None else scale, softcap=softcap, temperature=float(temperature))


def logit_transform_from_config(config, temperature: float = 1.0) -> LogitTransform:
    """Scale, softcap and temperature a model applies to ``lm_head`` outputs, read from its config alone.

    Scale: ``logit_scale`` (Cohere), ``output_multiplier``, ``lm_head_multiplier`` (FalconH1) multiply;
    ``logits_scaling`` divides (Granite, MiniCPM3) except for HyperCLOVA X, which multiplies.
    Softcap: ``final_logit_softcapping`` (Gemma-2). The temperature is the caller's. A model whose
    forward reads a copy kept on the module: :func:`logit_transform_of`.
    """
    text = _text_config(config)
    return _transform_from((text,), str(getattr(text, "model_type", "")), temperature)


def _setting_holders(inner, backbone):
    """Where forwards read the settings, first found wins: the model's attribute (Cohere, Cohere2, DiffusionGemma,
    MistralLarge4 copy the config value at construction and multiply by the copy), the backbone's (FalconH1's
    ``self.model.lm_head_multiplier``), then the text config (Granite, Gemma-2, Gemma-3, HyperCLOVA X, ...)."""
    return (inner, backbone, _text_config(getattr(inner, "config", None)))


def logit_transform_of(model: torch.nn.Module) -> LogitTransform:
    """The scale and softcap ``model``'s own forward applies, read where it reads them (temperature 1)."""
    inner = unwrap_model(model)
    holders = _setting_holders(inner, inner.base_model)
    return _transform_from(holders, str(getattr(holders[-1], "model_type", "")))


def _is_lora_layer(module) -> bool:
    """A PEFT tuner layer (LoRA and friends) wraps the head: its ``.weight`` is only the base weight."""
    if hasattr(module, "base_layer") and hasattr(module, "active_adapters"):
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


@dataclass
class ResolvedHead:
    backbone: torch.nn.Module
    head: torch.nn.Module
    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]  # [V] or None
    transform: LogitTransform  # at temperature 1: what the model's own forward applies
    model_type: str
    settings_read: tuple = ()  # every candidate setting on (model, backbone, config): (holder, name, value)

    @property
    def tied(self) -> bool:
        embeddings = getattr(self.backbone, "get_input_embeddings", lambda: None)()
        return embeddings is not None and getattr(embeddings, "weight", None) is self.head.weight

    @property
    def frozen(self) -> bool:
        return not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)

    @property
    def reads(self) -> tuple:
        """What the rebuild takes from the model besides parameter values: a verdict holds while these hold."""
        t = self.transform
        return (self.model_type, t.scale, t.softcap, self.settings_read, type(self.backbone), type(self.head),
                self.bias is not None)

    @property
    def own_fsdp2_group(self) -> bool:
        """A head FSDP2 shards on its own: its weight is a DTensor shard outside its own forward."""
        return shards_own_params(self.head)

    def run(self, fn, hidden, *args):
        """``fn(hidden, *args, head)`` with this head's parameters as the model's own head call sees them.

        A head that FSDP2 shards on its own is called as a module around ``fn`` (see
        :func:`dpo_fast.distributed.call_through_module`): its hooks unshard and cast the
        parameters and reduce-scatter their gradients, as for the model's own ``lm_head`` call.
        """
        if not self.own_fsdp2_group:
            return fn(hidden, *args, self)

        def forward(hidden, *args):
            unsharded = dataclasses.replace(self, weight=self.head.weight, bias=getattr(self.head, "bias", None))
            return fn(hidden, *args, unsharded)

        return call_through_module(self.head, forward, hidden, *args)


def resolve_head(model: torch.nn.Module) -> ResolvedHead:
    """Backbone, head weight/bias and logit post-processing of a causal LM (wrappers are unwrapped)."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    model_type = str(getattr(_text_config(config), "model_type", type(inner).__name__))
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or getattr(head, "weight", None) is None:
        raise TypeError(f"{type(inner).__name__} ({model_type}) has no output embeddings: dpo_fast.hf needs a causal "
                        "LM whose get_output_embeddings() returns its lm_head")
    if _is_lora_layer(head):
        raise NotImplementedError(
            f"the lm_head of this {model_type} model is a PEFT adapter layer ({type(head).__name__}); dpo-fast reads "
            "the head weight directly and would ignore the adapter. Leave lm_head out of the adapter's "
            "target_modules (train it fully via modules_to_save, or keep it frozen), or merge the adapter first.")
    backbone = inner.base_model
    if backbone is inner:
        raise TypeError(f"{type(inner).__name__} ({model_type}) has no separate base_model (backbone)")
    # A ZeRO-3 partition is an empty tensor outside a gather: DeepSpeed keeps the full shape in ds_shape.
    shape = tuple(getattr(head.weight, "ds_shape", head.weight.shape))
    if len(shape) != 2:
        raise TypeError(f"lm_head weight of {model_type} must be [vocab, hidden], got shape {shape}")
    holders = _setting_holders(inner, backbone)
    # Every place a setting could be read, so that editing any of them (not only the one the rebuild took)
    # checks the model again: a forward that reads another copy than the rebuild does is caught that way.
    settings_read = tuple((where, name, _setting(name, (holder,)))
                          for where, holder in zip(("model", "backbone", "config"), holders) for name in _SETTINGS)
    return ResolvedHead(backbone, head, head.weight, getattr(head, "bias", None),
                        _transform_from(holders, model_type), model_type, settings_read)


@contextlib.contextmanager
def head_precision(hidden, weight, bias):
    """Yields (hidden, weight, bias) in the dtype the model's own ``lm_head`` call would use.

    Under autocast that is the autocast dtype (the casts are differentiable, so gradients
    reach float32 master weights), and autocast is switched off inside so the kernels see
    exactly these tensors; otherwise hidden states follow the head's dtype.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        # A ZeRO-3 head is a partition outside a gather: gather it for the cast; the cast
        # copies are full tensors, so the backward needs no second gather.
        with gathered(weight, bias):
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            yield hidden.to(dtype), weight, bias
    else:
        yield hidden.to(weight.dtype), weight, bias


# ----------------------------------------------------------------------------------------
# the one-time reconstruction check
# ----------------------------------------------------------------------------------------

# inner model -> (ResolvedHead.reads when checked, "fused" (reconstruction verified) or "naive" (mismatch,
# caller allowed the fallback)). The resolution is redone per call; a verdict is reused only for what it checked.
_VERIFIED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _check_tokens(input_ids, attention_mask):
    """A few real tokens of the longest row, as a [1, k] batch."""
    if attention_mask is None:
        return input_ids[:1, :_CHECK_TOKENS]
    row = int(attention_mask.sum(-1).argmax())
    tokens = input_ids[row][attention_mask[row].bool()]
    return tokens[:_CHECK_TOKENS].unsqueeze(0)


@contextlib.contextmanager
def _eval_mode(module):
    """Dropout off for the check, every submodule's mode restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def reconstruction_error(model, head: ResolvedHead, input_ids, attention_mask=None, original_forward=None) -> float:
    """max |rebuilt - model logits| / max(1, max |model logits|) on a few tokens."""
    tokens = _check_tokens(input_ids, attention_mask)
    forward = original_forward or model.forward
    # Autocast off: both sides in the weights' own precision, so rounding cannot pass for a mismatch.
    with torch.no_grad(), _eval_mode(model), torch.autocast(tokens.device.type, enabled=False):
        expected = forward(input_ids=tokens, use_cache=False).logits.float()
        hidden = head.backbone(input_ids=tokens, use_cache=False).last_hidden_state
        rebuilt = head.transform.apply(head.run(_head_logits, hidden.to(head.weight.device)).float())
    if rebuilt.shape != expected.shape:
        return float("inf")
    return float((rebuilt - expected.to(rebuilt.device)).abs().max() / expected.abs().max().clamp(min=1.0))


def _head_logits(hidden, head: ResolvedHead):
    with gathered(head.weight, head.bias):  # ZeRO-3: the head is read outside its module
        return F.linear(hidden.to(head.weight.dtype), head.weight, head.bias)


def _tolerance(dtype) -> float:
    # A config the rebuild misreads (a missing scale or softcap) is off by far more than rounding.
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def verify(model, head: ResolvedHead, input_ids, attention_mask=None, fallback: str = "raise",
           original_forward=None) -> str:
    """'fused' when lm_head(base_model(x)) post-processed per the config matches model(x).logits.

    Checked once per model and per :attr:`ResolvedHead.reads`: editing a setting the rebuild
    reads (e.g. ``config.logit_scale``, which Cohere's forward copied at construction) checks again.
    On mismatch raise :class:`ReconstructionError`, or return 'naive' when ``fallback="naive"``.
    """
    if fallback not in ("raise", "naive"):
        raise ValueError(f"fallback must be 'raise' or 'naive', got {fallback!r}")
    reads, decided = _VERIFIED.get(model, (None, None))
    if reads == head.reads and (decided == "fused" or (decided == "naive" and fallback == "naive")):
        return decided
    # Each rank checks its own tokens; all take the decision of the worst, so none diverges.
    error = agreed_max(reconstruction_error(model, head, input_ids, attention_mask, original_forward),
                       input_ids.device)
    if error <= _tolerance(head.weight.dtype):
        _VERIFIED[model] = (head.reads, "fused")
        return "fused"
    if fallback == "naive":
        _VERIFIED[model] = (head.reads, "naive")
        return "naive"
    t = head.transform
    raise ReconstructionError(
        f"dpo_fast.hf cannot rebuild the logits of model_type={head.model_type!r} ({type(model).__name__}): "
        f"lm_head(base_model(x)) with scale={t.scale}, softcap={t.softcap} read from its config differs from "
        f"model(x).logits by {error:.3g} (relative). The model post-processes its logits in a way dpo-fast does "
        "not know; pass fallback='naive' to run its own full-logits forward instead.")


# ----------------------------------------------------------------------------------------
# the fused forward
# ----------------------------------------------------------------------------------------

def shift_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets aligned with every position: ``labels[:, 1:]`` then one ignored column,
    so ``targets[:, t]`` is the target of ``hidden[:, t]`` and the hidden states need no slicing copy."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


class HeadComputation:
    """What the fused forward computes once the backbone has run.

    ``from_hidden(hidden, targets, head)`` is the dpo-fast path; ``from_logits(logits, targets)``
    the naive fallback. ``targets`` are already shifted (see :func:`shift_targets`), padded with
    ``ignore_index``, the value that marks unscored labels.
    """

    ignore_index = -100
    # False: the caller's labels are already each position's target (OpenRLHF rolls them itself).
    shift_labels = True

    def from_hidden(self, hidden, targets, head: ResolvedHead):  # pragma: no cover - interface
        raise NotImplementedError

    def from_logits(self, logits, targets):  # pragma: no cover - interface
        raise NotImplementedError


# A dataclass result (DPOOutput) crosses the wrapper's forward as a dict under this key: DeepSpeed's
# hooks find tensors only in tuples, lists and dicts, and without them it neither fetches a module's
# parameters for its backward nor releases them after (ZeRO-3 would keep the head gathered).
_PACKED = "__dpo_fast_dataclass__"
_PACKED_TYPES = {}


def _pack(result):
    if not dataclasses.is_dataclass(result) or isinstance(result, type):
        return result
    name = type(result).__qualname__
    _PACKED_TYPES[name] = type(result)
    return {_PACKED: name, **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)}}


def _unpack(result):
    if not (isinstance(result, dict) and result.get(_PACKED) in _PACKED_TYPES):
        return result
    fields = dict(result)
    return _PACKED_TYPES[fields.pop(_PACKED)](**fields)


def _fused_forward_method(original_forward, computation: HeadComputation, fallback: str):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            raise ValueError(f"the dpo-fast forward needs labels (ignore_index={computation.ignore_index} where "
                             f"a token is not scored)")
        if input_ids is None:
            raise ValueError("the dpo-fast forward needs input_ids (inputs_embeds is not supported)")
        check.check_token_ids(input_ids=input_ids, labels=labels)
        # Wrappers (PEFT) pass their optional arguments as None; the backbone takes only what is set.
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("return_dict", "logits_to_keep")}
        kwargs["use_cache"] = False
        # Looked up per call: FSDP and PEFT may replace the head after the model was built.
        head = resolve_head(self)
        mode = verify(self, head, input_ids, attention_mask, fallback, original_forward)
        check.check_ignore_index(computation.ignore_index, labels.dtype)
        targets = shift_targets(labels, computation.ignore_index) if computation.shift_labels else labels
        if mode == "naive":
            logits = original_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
            return _pack(computation.from_logits(logits, targets.to(logits.device)))
        hidden = head.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if hidden.shape[:-1] != targets.shape:
            raise ValueError(f"backbone returned hidden states {tuple(hidden.shape)} for labels {tuple(labels.shape)}")
        # With device_map the backbone may end on another device than the head.
        device = head.weight.device
        return _pack(head.run(computation.from_hidden, hidden.to(device), targets.to(device)))

    forward._dpo_fast_original = original_forward
    return forward


@contextlib.contextmanager
def fused_forward(model: torch.nn.Module, computation: HeadComputation, fallback: str = "raise"):
    """Inside, ``model(input_ids=..., attention_mask=..., labels=...)`` runs the backbone and ``computation``.

    ``model`` may be wrapped (DDP, FSDP, DeepSpeed, PEFT, torch.compile): the inner
    ``PreTrainedModel``'s forward is swapped, and calling the wrapper keeps its hooks.
    Yields a callable that calls ``model`` and returns ``computation``'s result. Nested use
    (a PEFT policy that is its own reference) is allowed.
    """
    inner = unwrap_model(model)
    had_own = "forward" in inner.__dict__
    previous = inner.__dict__.get("forward")
    # The full-logits forward (for the check and the fallback): whatever forward the model had,
    # TRL's or accelerate's wrappers included, but never a dpo-fast forward already in place.
    original = getattr(inner.forward, "_dpo_fast_original", inner.forward)
    inner.forward = types.MethodType(_fused_forward_method(original, computation, fallback), inner)
    try:
        yield lambda *args, **kwargs: _unpack(model(*args, **kwargs))
    finally:
        if had_own:
            inner.forward = previous
        else:
            del inner.forward


# ----------------------------------------------------------------------------------------
# DPO and reference log-probs from a model
# ----------------------------------------------------------------------------------------

# dpo_loss keywords that the logits (naive) path also takes.
_LOGITS_PATH_KEYS = ("beta", "loss_type", "loss_weights", "label_smoothing", "gamma", "discopop_tau", "cpo_alpha",
                     "temperature", "ignore_index")


class DPOComputation(HeadComputation):
    """dpo_fast.dpo_loss on the model's head (reference log-probs fixed at construction)."""

    def __init__(self, ref_chosen_logps, ref_rejected_logps, loss_kwargs):
        self.ref = dict(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
        self.loss_kwargs = dict(loss_kwargs)
        self.ignore_index = self.loss_kwargs.get("ignore_index", HeadComputation.ignore_index)

    def from_hidden(self, hidden, targets, head):
        t = head.transform
        with head_precision(hidden, head.weight, head.bias) as (hidden, weight, bias):
            return api.dpo_loss(hidden, weight, targets, bias=bias, logit_scale=t.scale, softcap=t.softcap,
                                **self.ref, **self.loss_kwargs)

    def from_logits(self, logits, targets):
        kwargs = {k: v for k, v in self.loss_kwargs.items() if k in _LOGITS_PATH_KEYS}
        return api.dpo_loss_from_logits(logits, targets, impl=_logits_impl(self.loss_kwargs), **self.ref, **kwargs)


class SequenceLogpsComputation(HeadComputation):
    """Per-sequence sums (or means) of next-token log-probs, forward-only under no_grad."""

    def __init__(self, temperature, impl, memory_budget, average, ignore_index=-100):
        self.temperature, self.impl, self.memory_budget, self.average = temperature, impl, memory_budget, average
        self.ignore_index = ignore_index

    def from_hidden(self, hidden, targets, head):
        t = head.transform
        with head_precision(hidden, head.weight, head.bias) as (hidden, weight, bias):
            return api.sequence_logps(hidden, weight, targets, bias=bias, logit_scale=t.scale, softcap=t.softcap,
                                      temperature=self.temperature, impl=self.impl, ignore_index=self.ignore_index,
                                      memory_budget=self.memory_budget, average=self.average)

    def from_logits(self, logits, targets):
        sums = api.sequence_logps_from_logits(logits, targets, temperature=self.temperature,
                                              ignore_index=self.ignore_index, impl=_logits_impl(dict(impl=self.impl)))
        if not self.average:
            return sums
        return sums / (targets != self.ignore_index).sum(-1).clamp(min=1).to(sums.dtype)


def _logits_impl(kwargs) -> str:
    impl = kwargs.get("impl", "auto")
    return "auto" if impl == "fused" else impl


def reference_logps(ref_model, input_ids, attention_mask, labels, *, temperature=1.0, impl="auto",
                    memory_budget=None, average=False, fallback="raise", ignore_index=-100) -> torch.Tensor:
    """Per-sequence sums of next-token log-probs under ``ref_model``, forward-only (no saved tensors).

    ``labels`` are unshifted (``labels[:, t]`` is token t, ``ignore_index`` where not scored), like
    :func:`dpo_forward`.
    """
    check.check_token_ids(input_ids=input_ids, labels=labels)
    computation = SequenceLogpsComputation(temperature, impl, memory_budget, average, ignore_index)
    with torch.no_grad(), fused_forward(ref_model, computation, fallback) as model:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def dpo_forward(model, input_ids, attention_mask, labels, *, ref_model=None, ref_chosen_logps=None,
                ref_rejected_logps=None, fallback="raise", **loss_kwargs):
    """DPO loss of a causal LM on a batch ``[chosen_1..chosen_B, rejected_1..rejected_B]``, no ``[N, V]`` logits.

    One backbone pass over all ``2B`` rows; ``labels[:, 1:]`` are the targets of the hidden
    states at ``[:, :-1]`` (``ignore_index``, -100 by default, for prompt and padding); then
    :func:`dpo_fast.dpo_loss` with the model's head and logit post-processing. Reference log-probs come from
    ``ref_model`` (forward-only, under ``torch.no_grad``) or are passed in; with neither the
    loss is reference-free. ``loss_kwargs`` are :func:`dpo_fast.dpo_loss`'s (``beta``,
    ``loss_type``, ``temperature``, ``impl``, ``memory_budget``, ...).

    ``model`` may be wrapped (DDP, FSDP, DeepSpeed, PEFT): the loss is computed inside its
    forward, so the wrappers' hooks fire. The model's own forward is replaced for the call,
    so a mixed-precision wrapper that lives in it (accelerate's) does not run: call this
    under ``accelerator.autocast()`` / ``torch.autocast`` for mixed precision.
    ``fallback="naive"``: a model whose logits cannot be rebuilt from its head and config
    runs its full-logits forward instead of raising :class:`ReconstructionError`.
    Returns a :class:`dpo_fast.DPOOutput`.
    """
    check.check_token_ids(input_ids=input_ids, labels=labels)
    if ref_model is not None:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("pass either ref_model or ref_chosen_logps/ref_rejected_logps, not both")
        ref = reference_logps(ref_model, input_ids, attention_mask, labels,
                              temperature=loss_kwargs.get("temperature", 1.0), impl=loss_kwargs.get("impl", "auto"),
                              memory_budget=loss_kwargs.get("memory_budget"), fallback=fallback,
                              ignore_index=loss_kwargs.get("ignore_index", -100))
        ref_chosen_logps, ref_rejected_logps = ref.chunk(2)
    computation = DPOComputation(ref_chosen_logps, ref_rejected_logps, loss_kwargs)
    with fused_forward(model, computation, fallback) as wrapped:
        return wrapped(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

