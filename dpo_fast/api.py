"""Public functions: validate, drop ignored tokens, dispatch to a path, apply the loss table."""

import functools
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from . import validation as check
from . import planner
from . import context_parallel as cp
from .chunked import ChunkedEngine, rows_workspace
from .distributed import gathers_head, two_pass_only, wrap_engine
from .function import TokenLogpsFunction
from .layout import TokenLayout, build_layout
from .logits_path import LogitsLogpsFunction
from .losses import all_pair_local, pair_losses, rejected_gradient_ratio
from .objective import DPOOutput, LossConfig, batch_loss, dpo_output, pair_terms
from .rows import KEPT_ONLY, TokenStats, TorchRows, TritonRows, finish_stats, triton_cpu_problem, triton_runs_on
from .torch_path import torch_engine
from .transform import LogitTransform
from .whole_pairs import PairChunkLoss


# torch.compile: dpo_fast/ops.py (which sits above this module) registers here a custom-op twin of
# each public function; while torch.compile traces, the public function calls its twin, an opaque op
# with fake shapes, so a compiled step has no graph break. The twin is called inside the autocast cast
# (``_in_autocast_dtype`` wraps the routing), so a compiled call computes in eager's precision.
COMPILE_TWINS = {}
# Keyword switches of the public functions (all keyword-only): bool, never truthy strings.
_FLAGS = ("average", "inplace", "check_finite", "metrics", "batch_invariant")


def _routes_when_compiling(name: str):
    def wrap(eager):
        @functools.wraps(eager)
        def call(*args, **kwargs):
            # Before routing, so an eager call and its compile twin refuse the same settings.
            check.check_flags(**{key: kwargs[key] for key in _FLAGS if key in kwargs})
            check.check_process_group(kwargs.get("process_group"))
            check.check_process_group(kwargs.get("sequence_group"), name="sequence_group")
            # Group calls and the batch-invariant forward stay eager (a graph break): the twins have neither.
            eager_only = (kwargs.get("process_group") is not None or kwargs.get("sequence_group") is not None
                          or kwargs.get("batch_invariant", False))
            if torch.compiler.is_compiling() and not eager_only and name in COMPILE_TWINS:
                twin_kwargs = {k: v for k, v in kwargs.items() if k not in ("sequence_group", "batch_invariant")}
                return COMPILE_TWINS[name](*args, **twin_kwargs)
            return eager(*args, **kwargs)

        return call

    return wrap


def _in_autocast_dtype(fn):
    """Run ``fn(hidden, weight, labels, *, bias, ...)`` in the precision ``torch.autocast`` asks for.

    Under autocast a model's own ``lm_head`` call multiplies in the autocast dtype; the
    same happens here: floating hidden/weight/bias are cast to it (differentiable, so
    float32 master weights get their gradients) and autocast is switched off inside, so
    every tile, buffer and gradient has the dtype the paths chose for it (mixing the two
    made the whole-pair route write bf16 GEMM results into float32 buffers).
    """

    @functools.wraps(fn)
    def call(hidden, weight, labels, *args, **kwargs):
        device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else None
        # Devices without autocast (meta, ...) reach validation, which names what is wrong with them.
        if (device_type is None or not torch.amp.is_autocast_available(device_type)
                or not torch.is_autocast_enabled(device_type)):
            return fn(hidden, weight, labels, *args, **kwargs)
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):  # autocast's own rule: floating tensors but float64
            eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            return t.to(dtype) if eligible else t

        if "bias" in kwargs:
            kwargs["bias"] = cast(kwargs["bias"])
        with torch.autocast(device_type, enabled=False):
            return fn(cast(hidden), cast(weight), labels, *args, **kwargs)

    return call


# ----------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------

def resolve_impl(impl: str, device: torch.device, dtype: Optional[torch.dtype] = None, name: str = "hidden") -> str:
    """The impl a call runs (``planner.choose_impl``), after checking the name.

    float64 inputs (``dtype``, the dtype of the input ``name``) are computed in float64, which only the
    PyTorch rows do: 'auto' takes impl='torch' for them, and the Triton impls refuse them.
    """
    check.check_impl(impl)
    if impl == "auto" and dtype == torch.float64:
        return "torch"
    runs = triton_runs_on(device)
    why_not = triton_cpu_problem() if not runs and device.type == "cpu" else None
    resolved = planner.choose_impl(impl, device, runs, why_not)
    if dtype is not None:
        check.check_impl_dtype(resolved, dtype, name)
    return resolved


def make_engine(impl: str, memory_budget: Optional[int], filter_eps: float = 0.0, device=None, metrics: bool = True,
                batch_invariant: bool = False):
    """``metrics=False``: the caller reads log-probs only (PyTorch rows then skip the metric statistics)."""
    # The engine tiles per-token (two-pass) work: its default is sized for GEMM efficiency, not by the card.
    budget = memory_budget or planner.default_memory_budget(torch.device(device or "cpu"), per_token=True)
    if impl == "fused":
        from .fused import FusedEngine

        return FusedEngine(filter_eps=filter_eps, memory_budget=budget)
    if impl == "torch":
        return torch_engine(budget, metrics=metrics, batch_invariant=batch_invariant)
    return ChunkedEngine(TritonRows(), budget, batch_invariant=batch_invariant)


@dataclass
class _Prepared:
    layout: TokenLayout
    hidden: torch.Tensor  # [n, H] kept tokens, grouped by sequence
    labels: torch.Tensor  # [n]
    transform: LogitTransform
    impl: str
    engine: object
    vocab_size: Optional[int]  # rows of the full head; None under a process_group (see full_vocab)
    two_pass_only: bool  # vocabulary-parallel, or a trainable ZeRO-3 head (distributed.py)
    batch_invariant: bool = False  # fixed-tile forward, fixed-order sequence sums

    def sequence_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums; in a batch-independent order under ``batch_invariant``."""
        if self.batch_invariant:
            return self.layout.sequence_sum_fixed_order(values)
        return self.layout.sequence_sum(values)

    @property
    def full_vocab(self) -> int:
        """Rows of the full head (under a process_group: read after the forward statistics)."""
        return self.engine.vocab_size if self.vocab_size is None else self.vocab_size


def _prepare(hidden, weight, labels, bias, ignore_index, temperature, logit_scale, softcap, impl, sequence_ids,
             cu_seqlens, memory_budget, check_finite, process_group=None, filter_eps=0.0, paired=False,
             num_sequences=None, metrics: bool = True, batch_invariant=False) -> _Prepared:
    check.check_hidden_inputs(hidden, weight, labels, bias, sequence_ids, cu_seqlens)
    check.check_sequence_count(sequence_ids, num_sequences, paired)
    check.check_transform(temperature, logit_scale, softcap)
    check.check_memory_budget(memory_budget)
    check.check_ignore_index(ignore_index, labels.dtype)
    impl = resolve_impl(impl, hidden.device, hidden.dtype)
    check.check_filter_eps(filter_eps, impl)
    if batch_invariant and impl == "fused":
        raise ValueError("batch_invariant=True runs the fixed-tile forward of impl='chunked' (or 'torch', or 'auto'); "
                         "impl='fused' sizes its vocabulary splits and tiles by the batch")
    engine = wrap_engine(make_engine(impl, memory_budget, filter_eps, hidden.device, metrics, batch_invariant),
                         weight, bias, process_group)
    # Under a process_group the full vocabulary (all shards together) is known once the ranks agree
    # (distributed.agree), which also checks the label range on every rank at once. Otherwise the
    # label check, like the packing checks, rides on the layout's one host read, and raises right
    # after it, before any kernel or GEMM.
    vocab_size = weight.shape[0] if process_group is None else None
    values = check.value_checks(labels, sequence_ids, cu_seqlens, vocab_size, ignore_index, num_sequences)
    layout = build_layout(labels, ignore_index, sequence_ids, cu_seqlens, flags=values.flags, check=values,
                          num_sequences=num_sequences)
    if check_finite:
        check.check_finite(hidden=hidden, weight=weight, bias=bias)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    # Nothing dropped (TRL's CUDA path hands over only scored tokens): the rows themselves, no copy.
    kept_hidden = flat_hidden if layout.identity else flat_hidden[layout.kept_index]
    transform = LogitTransform(float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    return _Prepared(layout, kept_hidden, layout.kept_labels.contiguous(), transform, impl, engine, vocab_size,
                     two_pass_only(weight, bias, process_group), batch_invariant)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kept_token_outputs(prep: _Prepared, weight, bias) -> TokenStats:
    """Per-kept-token log-probs (differentiable) and metrics; forward-only when no grad is needed."""
    if _needs_grad(prep.hidden, weight, bias):
        logps, entropy, log_sum_sq, mean_logits, is_top1 = TokenLogpsFunction.apply(
            prep.hidden, weight, bias, prep.labels, prep.engine, prep.transform)
        return TokenStats(logps, None, entropy, log_sum_sq, mean_logits, is_top1)
    with torch.no_grad():  # reference model: no saved tensors, no gradient work
        stats = prep.engine.forward_stats(prep.hidden, weight, bias, prep.labels, prep.transform)
        return finish_stats(stats, prep.labels, prep.full_vocab, KEPT_ONLY)


# ----------------------------------------------------------------------------------------
# from hidden states
# ----------------------------------------------------------------------------------------

@gathers_head
@_in_autocast_dtype
@_routes_when_compiling("token_logps")
def token_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, logit_scale=1.0,
                softcap=None, impl="auto", memory_budget=None, check_finite=False,
                process_group=None, filter_eps=0.0, batch_invariant=False) -> torch.Tensor:
    """Per-token log p(label) from hidden states and the lm_head weight, shaped like ``labels``.

    float32, 0 where ``labels == ignore_index``; differentiable to hidden, weight and bias.
    ``process_group``: the head is sharded by vocabulary rows across it (this rank passes its
    rows; labels stay global ids); see :mod:`dpo_fast.distributed`. ``filter_eps`` (impl="fused" only):
    approximate gradients that skip tiles whose every |d logp / d logit| is below it; 0 is exact.
    ``batch_invariant``: a token's log-prob is bitwise the same whatever else is in the batch (its
    padding, packing, position, the memory budget); see the README's RL section for its cost.
    """
    prep = _prepare(hidden, weight, labels, bias, ignore_index, temperature, logit_scale, softcap, impl, None, None,
                    memory_budget, check_finite, process_group, filter_eps=filter_eps, metrics=False,
                    batch_invariant=batch_invariant)
    return prep.layout.scatter(_kept_token_outputs(prep, weight, bias).logps)


@gathers_head
@cp.over_sequence_group
@_in_autocast_dtype
@_routes_when_compiling("sequence_logps")
def sequence_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, logit_scale=1.0,
                   softcap=None, impl="auto", average=False, sequence_ids=None, cu_seqlens=None,
                   memory_budget=None, check_finite=False, process_group=None, filter_eps=0.0,
                   num_sequences=None, sequence_group=None, batch_invariant=False) -> torch.Tensor:
    """Sum (``average=True``: mean) of completion-token log-probs per sequence, shape ``[rows]``.

    Under ``torch.no_grad()`` this is the forward-only path for reference-model log-probs.
    ``num_sequences`` (with ``sequence_ids``): how many sequences were packed, so one whose every
    token was dropped after the last id still gets its row (0); without it, the largest id + 1.
    ``sequence_group``: context parallelism, this rank holds slices of every sequence; the sums
    (and the token counts of ``average``) are those of the whole sequences, on every rank
    (:mod:`dpo_fast.context_parallel`). ``batch_invariant``: as for :func:`token_logps`, the sums too.
    """
    prep = _prepare(hidden, weight, labels, bias, ignore_index, temperature, logit_scale, softcap, impl,
                    sequence_ids, cu_seqlens, memory_budget, check_finite, process_group, filter_eps=filter_eps,
                    num_sequences=num_sequences, metrics=False, batch_invariant=batch_invariant)
    if sequence_group is not None:
        count = _agree_sequences(sequence_group, prep, hidden, weight, labels, sequence_ids, cu_seqlens, 2)
        local = cp.pad_sequences(prep.sequence_sum(_kept_token_outputs(prep, weight, bias).logps), count)
        sums, extras = cp.reduce_sequences(sequence_group, local,
                                           cp.pad_sequences(prep.layout.lengths, count)[None].double())
        return sums / extras[0].clamp(min=1).to(sums.dtype) if average else sums
    sums = prep.sequence_sum(_kept_token_outputs(prep, weight, bias).logps)
    return sums / prep.layout.lengths.clamp(min=1).to(sums.dtype) if average else sums


def _agree_sequences(group, prep: _Prepared, hidden, weight, labels, sequence_ids, cu_seqlens, per_sequence,
                     cfg=None) -> int:
    """The sequence group's agreement (:func:`context_parallel.agree`): the whole batch's sequence count."""
    mode = (cp.PADDED if labels.dim() == 2 else cp.CU_SEQLENS if cu_seqlens is not None
            else cp.SEQUENCE_IDS if sequence_ids is not None else cp.SINGLE)
    loss_key = 0.0 if cfg is None else float(zlib.crc32(repr(cfg).encode()))
    return cp.agree(group, mode=mode, num_sequences=prep.layout.num_sequences, hidden_size=hidden.shape[-1],
                    head_rows=weight.shape[0], transform=prep.transform, loss_key=loss_key,
                    per_sequence=per_sequence, device=hidden.device)


@gathers_head
@cp.over_sequence_group
@_in_autocast_dtype
@_routes_when_compiling("dpo_loss")
def dpo_loss(hidden, weight, labels, *, ref_chosen_logps=None, ref_rejected_logps=None, beta=0.1,
             loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, gamma=0.5, discopop_tau=0.05,
             cpo_alpha=1.0, bias=None, ignore_index=-100, temperature=1.0, logit_scale=1.0, softcap=None,
             impl="auto", sequence_ids=None, cu_seqlens=None, memory_budget=None,
             check_finite=False, process_group=None, filter_eps=0.0, num_sequences=None,
             metrics=True, sequence_group=None, batch_invariant=False) -> DPOOutput:
    """The DPO-family loss straight from hidden states: no ``[N, V]`` logits.

    Sequences are ``[chosen_1..chosen_B, rejected_1..rejected_B]``; ``labels[i]`` is the
    target of ``hidden[i]`` (already shifted). Reference log-probs of None mean 0
    (reference-free; when given and requiring grad, they get their gradients). Returns the
    loss (mean over pairs) and detached metrics.

    ``memory_budget``: bytes the loss may allocate beyond its inputs and the gradients it
    returns; None is a quarter of the CUDA device's free memory, at most 8 GiB (two-pass tiles:
    1 GiB; see ``planner.default_memory_budget``), and 512 MiB on CPU. Within it
    ``dpo_fast.planner`` takes the fastest route (whole pairs at 6NHV, else two-pass at
    8NHV); tiles never go below 16 tokens x 128 vocabulary rows, whatever the budget.
    Under ``torch.autocast`` floating inputs run in the autocast dtype. ``metrics=False``
    leaves the token metrics (``chosen_logits_mean``, ``rejected_logits_mean``,
    ``token_accuracy``, ``entropy``) None, and impl="torch" skips computing them.

    Packed sequences: ``cu_seqlens``, or ``sequence_ids`` with ``num_sequences`` (required: ids
    cannot show trailing sequences that no token carries, and each would shift the pairing).

    ``sequence_group``: context parallelism (:mod:`dpo_fast.context_parallel`): this rank holds
    slices of every sequence; every rank gets the loss and metrics of the whole batch, and its
    local gradients (two-pass route). ``batch_invariant``: each sequence's log-probs and metric
    sums (entropy, logits means, token accuracy) are bitwise the same whatever else is in the batch
    (two-pass route with the fixed-tile forward); the loss, a mean over the batch, is not.
    """
    cfg = _loss_config(loss_type, loss_weights, beta, label_smoothing, gamma, discopop_tau, cpo_alpha,
                       ref_chosen_logps is not None or ref_rejected_logps is not None)
    # Under a sequence_group a rank may hold no token of some sequence ids: gaps are judged over the group.
    prep = _prepare(hidden, weight, labels, bias, ignore_index, temperature, logit_scale, softcap, impl,
                    sequence_ids, cu_seqlens, memory_budget, check_finite, process_group, filter_eps=filter_eps,
                    paired=sequence_group is None, num_sequences=num_sequences, metrics=metrics,
                    batch_invariant=batch_invariant)
    if sequence_group is not None:
        return _context_parallel_loss(prep, sequence_group, cfg, hidden, weight, bias, labels, sequence_ids,
                                      cu_seqlens, ref_chosen_logps, ref_rejected_logps, check_finite)
    layout = prep.layout
    check.check_pairs(layout.num_sequences, ref_chosen_logps, ref_rejected_logps, hidden.device)
    if check_finite:
        check.check_finite(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)

    plan = _plan_loss(prep, weight, bias, cfg, memory_budget)
    if plan.route == "whole-pairs":
        loss, stats = _pair_chunk_route(prep, weight, bias, cfg, plan.chunks, ref_chosen_logps, ref_rejected_logps)
        out = finish_stats(stats, prep.labels, prep.full_vocab, KEPT_ONLY)
    else:
        out = _kept_token_outputs(prep, weight, bias)
        loss = batch_loss(prep.sequence_sum(out.logps), layout.lengths, ref_chosen_logps, ref_rejected_logps, cfg)
    seq = prep.sequence_sum
    if not metrics:
        return dpo_output(loss, seq(out.logps.detach()), layout.lengths, ref_chosen_logps, ref_rejected_logps, cfg)
    return dpo_output(loss, seq(out.logps.detach()), layout.lengths, ref_chosen_logps, ref_rejected_logps, cfg,
                      seq(out.mean_logits), seq(out.is_top1.float()), seq(out.entropy.detach()))


def _context_parallel_loss(prep: _Prepared, group, cfg: LossConfig, hidden, weight, bias, labels, sequence_ids,
                           cu_seqlens, ref_chosen, ref_rejected, check_finite) -> DPOOutput:
    """dpo_loss over a sequence group: local two-pass log-probs, one all-reduce of per-sequence sums."""
    count = _agree_sequences(group, prep, hidden, weight, labels, sequence_ids, cu_seqlens, 6, cfg)
    check.check_pairs(count, ref_chosen, ref_rejected, hidden.device)
    if check_finite:
        check.check_finite(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    out = _kept_token_outputs(prep, weight, bias)
    layout = prep.layout

    def seq(values):
        return cp.pad_sequences(prep.sequence_sum(values), count).double()

    if labels.dim() != 2 and cu_seqlens is None and sequence_ids is not None:
        # Tokens (ignored ones too) carrying each id: an id no rank carries is a gap.
        ids = sequence_ids.reshape(-1).to(torch.int64).clamp(0, max(count - 1, 0))
        carried = torch.zeros(count, dtype=torch.float64, device=hidden.device).index_add_(
            0, ids, torch.ones_like(ids, dtype=torch.float64))
    else:
        carried = torch.ones(count, dtype=torch.float64, device=hidden.device)
    extras = torch.stack([cp.pad_sequences(layout.lengths, count).double(), seq(out.mean_logits),
                          seq(out.is_top1.float()), seq(out.entropy.detach()), carried])
    sums, (lengths, logit_means, top1, entropy, carried) = cp.reduce_sequences(
        group, cp.pad_sequences(prep.sequence_sum(out.logps), count), extras)
    gaps = (carried == 0).nonzero()
    if gaps.numel():  # the same values on every rank: every rank raises alike
        raise ValueError(f"sequence_ids must number the sequences of a paired loss 0..R-1 with no gap; over the "
                         f"sequence_group no rank carries id {int(gaps[0])} (R = {count})")
    loss = batch_loss(sums, lengths, ref_chosen, ref_rejected, cfg)
    return dpo_output(loss, sums.detach(), lengths, ref_chosen, ref_rejected, cfg, logit_means, top1, entropy)


def _loss_config(loss_type, loss_weights, beta, label_smoothing, gamma, discopop_tau, cpo_alpha, has_reference):
    names, weights = check.normalize_loss_types(loss_type, loss_weights)
    check.check_loss_settings(names, beta, label_smoothing, has_reference, discopop_tau, gamma, cpo_alpha)
    return LossConfig(names, weights, float(beta), float(label_smoothing), float(gamma), float(discopop_tau),
                      float(cpo_alpha))


def _plan_loss(prep: _Prepared, weight, bias, cfg: LossConfig, memory_budget) -> planner.Plan:
    """The planner's route for this call. Whole pairs need: gradients, a path that tiles with cuBLAS
    (chunked or torch), a head held whole on this rank, kept tokens, and pair-local loss types."""
    whole_pairs = (prep.impl in ("chunked", "torch") and _needs_grad(prep.hidden, weight, bias)
                   and not prep.two_pass_only and prep.layout.num_kept > 0 and all_pair_local(cfg.loss_types))
    lengths = prep.layout.lengths_host
    pairs = len(lengths) // 2
    budget = memory_budget or planner.default_memory_budget(prep.hidden.device)
    rows = getattr(prep.engine, "rows", None)
    workspace = rows_workspace(rows, prep.hidden.shape[0], weight.shape[0], prep.hidden.dtype) if rows else 0
    # A split pair of a single-margin loss sums both sides in one float32 [V, H] buffer (losses.py).
    scales = ([rejected_gradient_ratio(cfg.loss_types, cfg.loss_weights, lengths[p], lengths[p + pairs])
               for p in range(pairs)] if whole_pairs else None)
    return planner.plan_loss([lengths[p] + lengths[p + pairs] for p in range(pairs)], weight.shape[0],
                             weight.shape[1], prep.hidden.dtype, torch.is_grad_enabled() and weight.requires_grad,
                             budget, prep.hidden.device.type, whole_pairs=whole_pairs,
                             sides=[(lengths[p], lengths[p + pairs]) for p in range(pairs)],
                             gathered_input=not prep.layout.identity,
                             input_tokens=prep.layout.labels_shape.numel(),
                             two_pass_budget=getattr(prep.engine, "memory_budget", budget),
                             rows_workspace=workspace, batch_invariant=prep.batch_invariant,
                             rejected_scales=scales)


def _pair_chunk_route(prep: _Prepared, weight, bias, cfg: LossConfig, chunks, ref_chosen, ref_rejected):
    layout = prep.layout
    spans = list(layout.sequence_slices())
    pairs = len(spans) // 2
    lengths = layout.lengths
    total_chosen = float(sum(layout.lengths_host[:pairs]))

    def chunk_loss(first, last, chosen, rejected, ref_c, ref_r):
        terms = pair_terms(chosen, rejected, ref_c, ref_r, lengths[first:last], lengths[pairs + first:pairs + last],
                           cfg, total_chosen, pairs)
        return pair_losses(terms, cfg.loss_types, cfg.loss_weights).sum() / pairs

    return PairChunkLoss.apply(prep.hidden, weight, bias, prep.labels, ref_chosen, ref_rejected, prep.engine.rows,
                               prep.transform, spans, lengths, chunks, chunk_loss)


class DPOLoss(torch.nn.Module):
    """:func:`dpo_loss` with its settings held by a module."""

    def __init__(self, beta=0.1, loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, gamma=0.5,
                 discopop_tau=0.05, cpo_alpha=1.0, ignore_index=-100, temperature=1.0, logit_scale=1.0,
                 softcap=None, impl="auto", memory_budget=None, check_finite=False, filter_eps=0.0,
                 process_group=None, metrics=True, sequence_group=None, batch_invariant=False):
        super().__init__()
        self.settings = dict(beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                             label_smoothing=label_smoothing, gamma=gamma, discopop_tau=discopop_tau,
                             cpo_alpha=cpo_alpha, ignore_index=ignore_index, temperature=temperature,
                             logit_scale=logit_scale, softcap=softcap, impl=impl, memory_budget=memory_budget,
                             check_finite=check_finite, filter_eps=filter_eps, process_group=process_group,
                             metrics=metrics, sequence_group=sequence_group, batch_invariant=batch_invariant)
        # Fail at construction, not at the first batch.
        _loss_config(loss_type, loss_weights, beta, label_smoothing, gamma, discopop_tau, cpo_alpha, True)
        check.check_transform(temperature, logit_scale, softcap)
        check.check_impl(impl)
        check.check_ignore_index(ignore_index)
        check.check_memory_budget(memory_budget)
        check.check_filter_eps(filter_eps, impl)
        check.check_flags(check_finite=check_finite, metrics=metrics, batch_invariant=batch_invariant)
        check.check_process_group(process_group)
        check.check_process_group(sequence_group, name="sequence_group")

    def forward(self, hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None, bias=None,
                sequence_ids=None, cu_seqlens=None, num_sequences=None) -> DPOOutput:
        return dpo_loss(hidden, weight, labels, ref_chosen_logps=ref_chosen_logps,
                        ref_rejected_logps=ref_rejected_logps, bias=bias, sequence_ids=sequence_ids,
                        cu_seqlens=cu_seqlens, num_sequences=num_sequences, **self.settings)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items() if v is not None)


# ----------------------------------------------------------------------------------------
# from logits a trainer already holds
# ----------------------------------------------------------------------------------------

def _logits_outputs(logits, labels, ignore_index, temperature, inplace, impl, check_finite=False):
    check.check_logits_inputs(logits, labels)
    check.check_transform(temperature, 1.0, None)
    check.check_ignore_index(ignore_index, labels.dtype)
    impl = resolve_impl(impl, logits.device, logits.dtype, "logits")
    if impl == "fused":
        raise ValueError("impl='fused' works from hidden states; for logits use impl='chunked', 'torch' or 'auto'")
    check.check_labels_range(labels, logits.shape[-1], ignore_index)
    if check_finite:
        check.check_finite(logits=logits)
    rows = TritonRows() if impl == "chunked" else TorchRows()
    transform = LogitTransform(temperature=float(temperature))
    outputs = LogitsLogpsFunction.apply(logits, labels, rows, transform, ignore_index, bool(inplace))
    return [o.view(labels.shape) for o in outputs]


@_routes_when_compiling("token_logps_from_logits")
def token_logps_from_logits(logits, labels, *, ignore_index=-100, temperature=1.0, inplace=False,
                            impl="auto", check_finite=False) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at ``labels``: float32, shaped like labels, 0 where ignored.

    ``inplace=True`` lets backward overwrite ``logits`` with its gradient (no second [N, V]
    buffer); only use it when nothing reads those logits afterwards.
    """
    return _logits_outputs(logits, labels, ignore_index, temperature, inplace, impl, check_finite)[0]


@_routes_when_compiling("sequence_logps_from_logits")
def sequence_logps_from_logits(logits, labels, *, ignore_index=-100, temperature=1.0, inplace=False,
                               impl="auto", check_finite=False) -> torch.Tensor:
    """Per-row sums of :func:`token_logps_from_logits` over the last label dim: ``[rows]``."""
    return token_logps_from_logits(logits, labels, ignore_index=ignore_index, temperature=temperature,
                                   inplace=inplace, impl=impl, check_finite=check_finite).sum(-1)


@_routes_when_compiling("dpo_loss_from_logits")
def dpo_loss_from_logits(logits, labels, *, ref_chosen_logps=None, ref_rejected_logps=None, beta=0.1,
                         loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, gamma=0.5, discopop_tau=0.05,
                         cpo_alpha=1.0, ignore_index=-100, temperature=1.0, inplace=False, impl="auto",
                         check_finite=False) -> DPOOutput:
    """DPO loss from logits ``[2B, T, V]`` and labels ``[2B, T]`` (chosen rows first)."""
    cfg = _loss_config(loss_type, loss_weights, beta, label_smoothing, gamma, discopop_tau, cpo_alpha,
                       ref_chosen_logps is not None or ref_rejected_logps is not None)
    check.check_logits_inputs(logits, labels)
    if labels.dim() != 2:
        raise ValueError(f"labels must be [rows, seq] (a sequence per row), got shape {tuple(labels.shape)}")
    check.check_pairs(labels.shape[0], ref_chosen_logps, ref_rejected_logps, logits.device)
    if check_finite:
        check.check_finite(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    logps, entropy, _, mean_logits, is_top1 = _logits_outputs(logits, labels, ignore_index, temperature, inplace,
                                                              impl, check_finite)
    lengths = (labels != ignore_index).sum(-1)
    sequence = logps.sum(-1)
    loss = batch_loss(sequence, lengths, ref_chosen_logps, ref_rejected_logps, cfg)
    return dpo_output(loss, sequence, lengths, ref_chosen_logps, ref_rejected_logps, cfg, mean_logits.sum(-1),
                      is_top1.float().sum(-1), entropy.sum(-1))
