"""torch.compile support: the public functions as custom ops (``torch.library.custom_op``).

Dynamo cannot trace what the eager functions do on the host: drop ignored tokens
(``nonzero``), read per-sequence lengths (``.tolist()``), check label ranges, launch Triton
kernels. So while compiling, each public function (routed through ``api.COMPILE_TWINS``)
becomes a metadata-only check (shapes, dtypes, devices, settings) plus one opaque op:

- ``dpo_fast::sequence_outputs`` runs the eager preparation (every value check included)
  and the forward-only engine, and returns per-token log-probs and log-sum-exp (shaped
  like ``labels``) and per-sequence sums, completion lengths and metrics. Its fake
  implementation gives those shapes from the input shapes alone; with ``sequence_ids`` and
  no ``num_sequences`` the number of sequences is data-dependent and becomes an unbacked size.
- ``dpo_fast::sequence_outputs_backward`` turns the gradients of the token and sequence
  log-probs into per-kept-token gradients and runs the engine's backward.
- ``dpo_fast::logits_outputs`` / ``logits_outputs_backward``: the same for log-probs from
  logits (``*_from_logits``).

The loss head (``losses.py`` formulas on ``[pairs]`` tensors) stays in the graph, where
AOTAutograd differentiates it. Consequences: under torch.compile ``dpo_loss`` takes the
two-pass route (8NHV) even where eager takes the whole-pair route (6NHV), since that route
differentiates the loss inside its forward, which an op implementation (running below
autograd) cannot; ``inplace=True`` of the logits functions is ignored (an op may not
overwrite a saved input); a ``process_group`` call stays eager (graph breaks).
"""

from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from . import api
from . import validation as check
from .function import refuse_second_order
from .logits_path import LogitsLogpsFunction
from .losses import pair_losses
from .objective import dpo_output, pair_terms
from .rows import TorchRows, TritonRows
from .transform import LogitTransform

Tensor = torch.Tensor

# CUDA graphs (torch.compile(mode="reduce-overhead"), cudagraph trees): the ops cannot be captured. They
# read the host (kept-token counts, sequence lengths and the label checks travel in one transfer per
# call), size their buffers and chunks by those values, and a Triton kernel's first call at a new shape
# may autotune (timed launches). Tagged ``cudagraph_unsafe``, Inductor runs them eagerly between
# captured partitions (with graph partitioning, torch >= 2.9's default) or leaves the graph uncaptured;
# the GEMMs and kernels inside run as in eager mode. Torch builds without the tag (older than 2.8) get none.
CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
OP_TAGS = () if CUDAGRAPH_UNSAFE is None else (CUDAGRAPH_UNSAFE,)


def _rows(impl):
    """The row work of a resolved impl: Triton kernels, or the PyTorch twin for impl='torch'."""
    return TorchRows() if impl == "torch" else TritonRows()


# ----------------------------------------------------------------------------------------
# from hidden states
# ----------------------------------------------------------------------------------------

def _num_sequences_fake(labels, sequence_ids, cu_seqlens, num_sequences):
    if labels.dim() == 2:
        return labels.shape[0]
    if cu_seqlens is not None:
        return cu_seqlens.shape[0] - 1
    if sequence_ids is not None:
        return torch.library.get_ctx().new_dynamic_size() if num_sequences is None else num_sequences
    return 1


def _prepare(hidden, weight, bias, labels, sequence_ids, cu_seqlens, ignore_index, temperature, logit_scale, softcap,
             impl, memory_budget, check_finite, filter_eps, paired=False, num_sequences=None):
    return api._prepare(hidden, weight, labels, bias, ignore_index, temperature, logit_scale, softcap, impl,
                        sequence_ids, cu_seqlens, memory_budget, check_finite, filter_eps=filter_eps, paired=paired,
                        num_sequences=num_sequences)


@torch.library.custom_op("dpo_fast::sequence_outputs", mutates_args=(), tags=OP_TAGS)
def sequence_outputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                     sequence_ids: Optional[Tensor], cu_seqlens: Optional[Tensor],
                     ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], paired: bool,
                     ignore_index: int, temperature: float, logit_scale: float, softcap: Optional[float], impl: str,
                     memory_budget: Optional[int], check_finite: bool, filter_eps: float, num_sequences: Optional[int]
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(token log-probs, token lse, sequence log-probs, lengths, sequence entropy, mean-logit and top-1 sums).

    The reference log-probs are inputs only to be checked against the sequence count here,
    where it is known (``paired``: a DPO loss).
    """
    prep = _prepare(hidden, weight, bias, labels, sequence_ids, cu_seqlens, ignore_index, temperature, logit_scale,
                    softcap, impl, memory_budget, check_finite, filter_eps, paired, num_sequences)
    layout = prep.layout
    if paired:
        check.check_pairs(layout.num_sequences, ref_chosen_logps, ref_rejected_logps, hidden.device)
        if check_finite:
            check.check_finite(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    with torch.no_grad():
        out = api._kept_token_outputs(prep, weight, bias)
    seq = layout.sequence_sum
    return (layout.scatter(out.logps), layout.scatter(out.lse), seq(out.logps), layout.lengths.clone(),
            seq(out.entropy), seq(out.mean_logits), seq(out.is_top1.float()))


@sequence_outputs.register_fake
def _(hidden, weight, bias, labels, sequence_ids, cu_seqlens, ref_chosen_logps, ref_rejected_logps, paired,
      ignore_index, temperature, logit_scale, softcap, impl, memory_budget, check_finite, filter_eps, num_sequences):
    dtype = _rows(impl).stats_dtype(hidden.dtype)  # float64 hidden states (impl='torch') stay float64
    per_token = hidden.new_empty(labels.shape, dtype=dtype)
    lse = hidden.new_empty(labels.shape, dtype=torch.float64)  # float64: see rows.TokenStats
    rows = _num_sequences_fake(labels, sequence_ids, cu_seqlens, num_sequences)
    per_sequence = [hidden.new_empty((rows,), dtype=dtype) for _ in range(3)]  # log-probs, entropy, mean logit
    return (per_token, lse, per_sequence[0], hidden.new_empty((rows,), dtype=torch.int64), *per_sequence[1:],
            hidden.new_empty((rows,), dtype=torch.float32))  # top-1 counts


@torch.library.custom_op("dpo_fast::sequence_outputs_backward", mutates_args=(), tags=OP_TAGS)
def sequence_outputs_backward(grad_token: Tensor, grad_sequence: Tensor, hidden: Tensor, weight: Tensor,
                              bias: Optional[Tensor], labels: Tensor, sequence_ids: Optional[Tensor],
                              cu_seqlens: Optional[Tensor], lse: Tensor, ignore_index: int, temperature: float,
                              logit_scale: float, softcap: Optional[float], impl: str, memory_budget: Optional[int],
                              filter_eps: float, num_sequences: Optional[int], need_hidden: bool, need_weight: bool,
                              need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients to (hidden, weight, bias); an empty tensor where not needed."""
    prep = _prepare(hidden, weight, bias, labels, sequence_ids, cu_seqlens, ignore_index, temperature, logit_scale,
                    softcap, impl, memory_budget, False, filter_eps, num_sequences=num_sequences)
    layout = prep.layout
    kept = layout.kept_index
    # Kept tokens are grouped sequence by sequence, in order: repeat each sequence's gradient over its tokens.
    sequence_of_kept = torch.repeat_interleave(torch.arange(layout.num_sequences, device=kept.device), layout.lengths,
                                               output_size=layout.num_kept)
    grad_kept = grad_token.reshape(-1)[kept]  # the engine takes it to its statistics' dtype
    if grad_sequence.numel():  # empty: no gradient reached the sequence sums
        grad_kept = grad_kept + grad_sequence[sequence_of_kept]
    grads = prep.engine.backward(prep.hidden, weight, bias, prep.labels, prep.transform, lse.reshape(-1)[kept],
                                 grad_kept, needs=(need_hidden, need_weight, need_bias and bias is not None))
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        full = torch.zeros(labels.numel(), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        grad_hidden = full.index_copy_(0, kept, grad_hidden).view(hidden.shape)
    # A distinct empty tensor per missing gradient: op outputs may not alias one another.
    return tuple(hidden.new_empty((0,)) if g is None else g for g in (grad_hidden, grad_weight, grad_bias))


@sequence_outputs_backward.register_fake
def _(grad_token, grad_sequence, hidden, weight, bias, labels, sequence_ids, cu_seqlens, lse, ignore_index,
      temperature, logit_scale, softcap, impl, memory_budget, filter_eps, num_sequences, need_hidden, need_weight,
      need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty((0,)),
            torch.empty_like(weight) if need_weight else hidden.new_empty((0,)),
            torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty((0,)))


_SEQUENCE_SETTINGS = ("ignore_index", "temperature", "logit_scale", "softcap", "impl", "memory_budget", "filter_eps",
                      "num_sequences")


def _sequence_setup(ctx, inputs, output):
    (hidden, weight, bias, labels, sequence_ids, cu_seqlens, _ref_c, _ref_r, _paired, ignore_index, temperature,
     logit_scale, softcap, impl, memory_budget, _check_finite, filter_eps, num_sequences) = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, sequence_ids, cu_seqlens, output[1])
    ctx.settings = dict(zip(_SEQUENCE_SETTINGS, (ignore_index, temperature, logit_scale, softcap, impl, memory_budget,
                                                 filter_eps, num_sequences)))


def _sequence_backward(ctx, grad_token, _grad_lse, grad_sequence, *_metrics):
    refuse_second_order("token_logps / sequence_logps / dpo_loss (under torch.compile)")
    hidden, weight, bias, labels, sequence_ids, cu_seqlens, lse = ctx.saved_tensors
    grad_token = torch.zeros_like(lse) if grad_token is None else grad_token
    grad_sequence = lse.new_zeros(0) if grad_sequence is None else grad_sequence
    need = ctx.needs_input_grad
    grads = sequence_outputs_backward(grad_token, grad_sequence, hidden, weight, bias, labels, sequence_ids, cu_seqlens,
                                      lse, **ctx.settings, need_hidden=need[0], need_weight=need[1],
                                      need_bias=need[2])
    return (*(g if n else None for g, n in zip(grads, need[:3])),) + (None,) * 15


sequence_outputs.register_autograd(_sequence_backward, setup_context=_sequence_setup)


def _checked_sequence_outputs(hidden, weight, labels, bias, ignore_index, temperature, logit_scale, softcap, impl,
                              sequence_ids, cu_seqlens, memory_budget, check_finite, filter_eps,
                              refs=(None, None), paired=False, num_sequences=None):
    """Every check that needs no tensor values, at trace time; the op checks the values when it runs."""
    check.check_hidden_inputs(hidden, weight, labels, bias, sequence_ids, cu_seqlens)
    check.check_sequence_count(sequence_ids, num_sequences, paired)
    check.check_transform(temperature, logit_scale, softcap)
    check.check_memory_budget(memory_budget)
    check.check_ignore_index(ignore_index, labels.dtype)
    impl = api.resolve_impl(impl, hidden.device, hidden.dtype)
    check.check_filter_eps(filter_eps, impl)
    if paired:  # a paired loss with sequence_ids states num_sequences: the count is known here
        rows = (labels.shape[0] if labels.dim() == 2 else num_sequences if sequence_ids is not None
                else 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1)
        _check_pairs_at_trace(rows, refs, hidden.device)
    return sequence_outputs(hidden, weight, bias, labels, sequence_ids, cu_seqlens, *refs, paired, ignore_index,
                            float(temperature), float(logit_scale), None if softcap is None else float(softcap), impl,
                            memory_budget, bool(check_finite), float(filter_eps), num_sequences)


def _check_pairs_at_trace(rows, refs, device):
    """The pair checks that can run while tracing; an odd or zero count is left to the op.

    Raised here, a ValueError becomes ``torch._dynamo.exc.Unsupported`` ("Observed exception")
    under ``fullgraph=True``. The op checks the count again when it runs, before any kernel,
    and its ValueError leaves the compiled function as is; the graph around it is traced
    with ``rows // 2`` pairs (``_pair_loss_output``).
    """
    if rows >= 2 and rows % 2 == 0:
        check.check_pairs(rows, *refs, device)


def token_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, logit_scale=1.0,
                softcap=None, impl="auto", memory_budget=None, check_finite=False, process_group=None,
                filter_eps=0.0):
    return _checked_sequence_outputs(hidden, weight, labels, bias, ignore_index, temperature, logit_scale, softcap,
                                     impl, None, None, memory_budget, check_finite, filter_eps)[0]


def sequence_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, logit_scale=1.0,
                   softcap=None, impl="auto", average=False, sequence_ids=None, cu_seqlens=None, memory_budget=None,
                   check_finite=False, process_group=None, filter_eps=0.0, num_sequences=None):
    out = _checked_sequence_outputs(hidden, weight, labels, bias, ignore_index, temperature, logit_scale, softcap,
                                    impl, sequence_ids, cu_seqlens, memory_budget, check_finite, filter_eps,
                                    num_sequences=num_sequences)
    sums, lengths = out[2], out[3]
    return sums / lengths.clamp(min=1).to(sums.dtype) if average else sums


def dpo_loss(hidden, weight, labels, *, ref_chosen_logps=None, ref_rejected_logps=None, beta=0.1,
             loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, gamma=0.5, discopop_tau=0.05,
             cpo_alpha=1.0, bias=None, ignore_index=-100, temperature=1.0, logit_scale=1.0, softcap=None,
             impl="auto", sequence_ids=None, cu_seqlens=None, memory_budget=None, check_finite=False,
             process_group=None, filter_eps=0.0, num_sequences=None, metrics=True):
    cfg = api._loss_config(loss_type, loss_weights, beta, label_smoothing, gamma, discopop_tau, cpo_alpha,
                           ref_chosen_logps is not None or ref_rejected_logps is not None)
    out = _checked_sequence_outputs(hidden, weight, labels, bias, ignore_index, temperature, logit_scale, softcap,
                                    impl, sequence_ids, cu_seqlens, memory_budget, check_finite, filter_eps,
                                    refs=(ref_chosen_logps, ref_rejected_logps), paired=True,
                                    num_sequences=num_sequences)
    _, _, sequence, lengths, entropy, mean_logits, top1 = out
    if not metrics:  # computed by the op anyway (its outputs are fixed); not returned, as in eager
        mean_logits = top1 = entropy = None
    return _pair_loss_output(sequence, lengths, ref_chosen_logps, ref_rejected_logps, cfg, mean_logits, top1,
                             entropy)


def _pair_loss_output(sequence, lengths, ref_chosen, ref_rejected, cfg, mean_logits, top1, entropy):
    """``objective.batch_loss`` with the chosen-token count kept on the device (no host sync in the graph)."""
    pairs = sequence.shape[0] // 2  # an odd count never runs: the op refuses it (_check_pairs_at_trace)
    terms = pair_terms(sequence[:pairs], sequence[pairs:2 * pairs], ref_chosen, ref_rejected, lengths[:pairs],
                       lengths[pairs:2 * pairs], cfg, lengths[:pairs].sum().float(), pairs)
    loss = pair_losses(terms, cfg.loss_types, cfg.loss_weights).mean().to(sequence.dtype)
    return dpo_output(loss, sequence, lengths, ref_chosen, ref_rejected, cfg, mean_logits, top1, entropy)


# ----------------------------------------------------------------------------------------
# from logits
# ----------------------------------------------------------------------------------------

class _Saved(SimpleNamespace):
    """A stand-in autograd context: runs ``LogitsLogpsFunction``'s own forward and backward outside autograd."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass


@torch.library.custom_op("dpo_fast::logits_outputs", mutates_args=(), tags=OP_TAGS)
def logits_outputs(logits: Tensor, labels: Tensor, ref_chosen_logps: Optional[Tensor],
                   ref_rejected_logps: Optional[Tensor], ignore_index: int, temperature: float, impl: str,
                   check_finite: bool, paired: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(log-probs, entropy, log sum p^2, mean logit, top-1, lse), each shaped like ``labels``.

    The reference log-probs are inputs only for ``check_finite`` and, with ``paired``, the pair checks.
    """
    if paired:
        check.check_pairs(labels.shape[0], ref_chosen_logps, ref_rejected_logps, logits.device)
    check.check_labels_range(labels, logits.shape[-1], ignore_index)
    if check_finite:
        check.check_finite(logits=logits, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    ctx = _Saved()
    outputs = LogitsLogpsFunction.forward(ctx, logits, labels, _rows(impl),
                                              LogitTransform(temperature=temperature), ignore_index, False)
    lse = ctx.saved_tensors[2]
    return tuple(o.reshape(labels.shape).clone() for o in (*outputs, lse))


@logits_outputs.register_fake
def _(logits, labels, ref_chosen_logps, ref_rejected_logps, ignore_index, temperature, impl, check_finite, paired):
    dtype = _rows(impl).stats_dtype(logits.dtype)  # float64 logits on torch rows stay float64
    per_token = [logits.new_empty(labels.shape, dtype=dtype) for _ in range(4)]
    lse = logits.new_empty(labels.shape, dtype=torch.float64)  # float64: see rows.TokenStats
    return (*per_token, logits.new_empty(labels.shape, dtype=torch.bool), lse)


@torch.library.custom_op("dpo_fast::logits_outputs_backward", mutates_args=(), tags=OP_TAGS)
def logits_outputs_backward(grad_logps: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int,
                            temperature: float, impl: str) -> Tensor:
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()  # as the forward read it
    ctx = _Saved(saved_tensors=(logits, labels.reshape(-1), lse.reshape(-1)), rows=_rows(impl),
                 transform=LogitTransform(temperature=temperature), ignore_index=ignore_index, inplace=False)
    return LogitsLogpsFunction.backward(ctx, grad_logps.reshape(-1))[0]


@logits_outputs_backward.register_fake
def _(grad_logps, logits, labels, lse, ignore_index, temperature, impl):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _logits_setup(ctx, inputs, output):
    logits, labels, _ref_c, _ref_r, ignore_index, temperature, impl, _check_finite, _paired = inputs
    ctx.save_for_backward(logits, labels, output[5])
    ctx.settings = dict(ignore_index=ignore_index, temperature=temperature, impl=impl)


def _logits_backward(ctx, grad_logps, *_metrics):
    refuse_second_order("the log-probs from logits (under torch.compile)")
    logits, labels, lse = ctx.saved_tensors
    if grad_logps is None:
        grad_logps = torch.zeros_like(lse)
    return (logits_outputs_backward(grad_logps, logits, labels, lse, **ctx.settings),) + (None,) * 8


logits_outputs.register_autograd(_logits_backward, setup_context=_logits_setup)


def _checked_logits_outputs(logits, labels, ignore_index, temperature, impl, check_finite, refs=(None, None),
                            paired=False):
    check.check_logits_inputs(logits, labels)
    check.check_transform(temperature, 1.0, None)
    check.check_ignore_index(ignore_index, labels.dtype)
    impl = api.resolve_impl(impl, logits.device, logits.dtype, "logits")
    if impl == "fused":
        raise ValueError("impl='fused' works from hidden states; for logits use impl='chunked', 'torch' or 'auto'")
    return logits_outputs(logits, labels, *refs, ignore_index, float(temperature), impl, bool(check_finite),
                          paired)


def token_logps_from_logits(logits, labels, *, ignore_index=-100, temperature=1.0, inplace=False, impl="auto",
                            check_finite=False):
    return _checked_logits_outputs(logits, labels, ignore_index, temperature, impl, check_finite)[0]


def sequence_logps_from_logits(logits, labels, *, ignore_index=-100, temperature=1.0, inplace=False, impl="auto",
                               check_finite=False):
    return token_logps_from_logits(logits, labels, ignore_index=ignore_index, temperature=temperature, impl=impl,
                                   check_finite=check_finite).sum(-1)


def dpo_loss_from_logits(logits, labels, *, ref_chosen_logps=None, ref_rejected_logps=None, beta=0.1,
                         loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, gamma=0.5, discopop_tau=0.05,
                         cpo_alpha=1.0, ignore_index=-100, temperature=1.0, inplace=False, impl="auto",
                         check_finite=False):
    cfg = api._loss_config(loss_type, loss_weights, beta, label_smoothing, gamma, discopop_tau, cpo_alpha,
                           ref_chosen_logps is not None or ref_rejected_logps is not None)
    check.check_logits_inputs(logits, labels)
    if labels.dim() != 2:
        raise ValueError(f"labels must be [rows, seq] (a sequence per row), got shape {tuple(labels.shape)}")
    _check_pairs_at_trace(labels.shape[0], (ref_chosen_logps, ref_rejected_logps), logits.device)
    logps, entropy, _, mean_logits, top1, _ = _checked_logits_outputs(
        logits, labels, ignore_index, temperature, impl, check_finite, refs=(ref_chosen_logps, ref_rejected_logps),
        paired=True)
    lengths = (labels != ignore_index).sum(-1)
    return _pair_loss_output(logps.sum(-1), lengths, ref_chosen_logps, ref_rejected_logps, cfg, mean_logits.sum(-1),
                             top1.float().sum(-1), entropy.sum(-1))


# Register the twins with the public functions (api.py routes to them while torch.compile traces).
api.COMPILE_TWINS.update({name: globals()[name] for name in (
    "token_logps", "sequence_logps", "dpo_loss", "token_logps_from_logits", "sequence_logps_from_logits",
    "dpo_loss_from_logits")})
