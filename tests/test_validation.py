"""Bad inputs at every public entry point: the right exception, naming the argument, before any kernel runs.

One table of bad calls. Each row builds fresh valid inputs, spoils one thing and names the
exception type and the argument the message must mention. Every row runs with the row
kernels (Triton launchers and their PyTorch twin, and the fused kernels where present)
replaced by functions that fail the test, so a check that fires only after a kernel has
started is caught too. Tensors "on another device" live on the ``meta`` device.
"""

import importlib.util
import math
from typing import Callable, NamedTuple

import pytest
import torch

import dpo_fast
from dpo_fast import reference, rows
from dpo_fast import validation as check
from dpo_fast.kernels import logsoftmax_gather

V, H = 20, 8


def _inputs(device, rows_=4, seq=5, dtype=torch.float32):
    hidden = torch.randn(rows_, seq, H, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (rows_, seq), device=device)
    labels[:, 0] = -100
    return hidden, weight, labels


def _logits(device, rows_=4, seq=5):
    logits = torch.randn(rows_, seq, V, device=device, requires_grad=True)
    labels = torch.randint(0, V, (rows_, seq), device=device)
    labels[:, 0] = -100
    return logits, labels


# --- callers: each spoils one thing of a valid call --------------------------------------

def hidden_call(fn, **spoil):
    """``fn(hidden, weight, labels, **kwargs)`` with entries of ``spoil`` replacing inputs or adding kwargs."""

    def call(device):
        hidden, weight, labels = _inputs(device)
        args = dict(hidden=hidden, weight=weight, labels=labels)
        for key, value in spoil.items():
            args[key] = value(device, args) if callable(value) else value
        return fn(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)

    return call


def logits_call(fn, **spoil):
    def call(device):
        logits, labels = _logits(device)
        args = dict(logits=logits, labels=labels)
        for key, value in spoil.items():
            args[key] = value(device, args) if callable(value) else value
        return fn(args.pop("logits"), args.pop("labels"), **args)

    return call


def module_call(settings, **spoil):
    """``DPOLoss(**settings)(hidden, weight, labels, ...)``: construction errors count too."""

    def call(device):
        return hidden_call(dpo_fast.DPOLoss(**settings), **spoil)(device)

    return call


def _set(tensor_name, fn):
    """A spoiler that edits one of the valid inputs: ``fn(tensor) -> tensor``."""
    return lambda device, args: fn(args[tensor_name].detach().clone())


def _label_at(value):
    def edit(labels):
        labels[1, 2] = value
        return labels

    return _set("labels", edit)


def _nan_at(tensor):
    tensor.view(-1)[3] = float("nan")
    return tensor


class Bad(NamedTuple):
    id: str
    call: Callable
    error: type
    names: str  # the argument the message must name


tok, seq, dpo = dpo_fast.token_logps, dpo_fast.sequence_logps, dpo_fast.dpo_loss
tok_l, seq_l, dpo_l = dpo_fast.token_logps_from_logits, dpo_fast.sequence_logps_from_logits, \
    dpo_fast.dpo_loss_from_logits
meta = torch.device("meta")
packed_labels = lambda device, args: torch.randint(0, V, (12,), device=device)  # noqa: E731
packed_hidden = lambda device, args: torch.randn(12, H, device=device)  # noqa: E731


def _ids(*values):
    """Packed sequence_ids for the 12 tokens of packed_labels."""
    return lambda device, args: torch.tensor(values, device=device)


def _on_meta(tensor_name):
    return lambda device, args: torch.empty_like(args[tensor_name], device=meta)


def _jagged(device, args):
    """hidden as a nested tensor of two sequences (what a variable-length pipeline may hand over)."""
    return torch.nested.nested_tensor([torch.randn(2, H), torch.randn(3, H)], layout=torch.jagged, device=device)


def _group_of_ranks(device, args):
    return [0, 1]  # ranks, not a ProcessGroup: torch.distributed.new_group(ranks) makes one

BAD = [
    # --- token_logps: tensors --------------------------------------------------------------
    Bad("hidden-int", hidden_call(tok, hidden=_set("hidden", lambda t: t.long())), TypeError, "hidden"),
    Bad("hidden-bool", hidden_call(tok, hidden=_set("hidden", lambda t: t > 0)), TypeError, "hidden"),
    Bad("hidden-list", hidden_call(tok, hidden=[[0.0] * H]), TypeError, "hidden"),
    Bad("hidden-1d", hidden_call(tok, hidden=_set("hidden", lambda t: t.reshape(-1))), ValueError, "hidden"),
    Bad("hidden-4d", hidden_call(tok, hidden=_set("hidden", lambda t: t[None])), ValueError, "hidden"),
    Bad("weight-3d", hidden_call(tok, weight=_set("weight", lambda t: t[None])), ValueError, "weight"),
    Bad("weight-hidden-size", hidden_call(tok, weight=lambda d, a: torch.randn(V, H + 1, device=d)), ValueError,
        "weight"),
    Bad("weight-no-rows", hidden_call(tok, weight=lambda d, a: torch.randn(0, H, device=d)), ValueError, "weight"),
    Bad("weight-dtype", hidden_call(tok, weight=_set("weight", lambda t: t.double())), TypeError, "weight"),
    Bad("labels-shape", hidden_call(tok, labels=_set("labels", lambda t: t[:, 1:])), ValueError, "labels"),
    Bad("labels-float", hidden_call(tok, labels=_set("labels", lambda t: t.float())), TypeError, "labels"),
    Bad("labels-bool", hidden_call(tok, labels=_set("labels", lambda t: t > 0)), TypeError, "labels"),
    Bad("labels-uint8", hidden_call(tok, labels=_set("labels", lambda t: t.clamp(min=0).to(torch.uint8))),
        TypeError, "labels"),
    Bad("label-too-large", hidden_call(tok, labels=_label_at(V)), ValueError, "labels"),
    Bad("label-negative", hidden_call(tok, labels=_label_at(-1)), ValueError, "labels"),
    Bad("bias-shape", hidden_call(tok, bias=lambda d, a: torch.zeros(V + 1, device=d)), ValueError, "bias"),
    Bad("bias-dtype", hidden_call(tok, bias=lambda d, a: torch.zeros(V, device=d, dtype=torch.float64)), TypeError,
        "bias"),
    Bad("bias-int", hidden_call(tok, bias=lambda d, a: torch.zeros(V, device=d, dtype=torch.int64)), TypeError,
        "bias"),
    Bad("weight-other-device", hidden_call(tok, weight=lambda d, a: torch.empty(V, H, device=meta)), ValueError,
        "weight"),
    Bad("labels-other-device", hidden_call(tok, labels=lambda d, a: torch.zeros(4, 5, dtype=torch.long, device=meta)),
        ValueError, "labels"),
    Bad("bias-other-device", hidden_call(tok, bias=lambda d, a: torch.zeros(V, device=meta)), ValueError, "bias"),
    # --- token_logps: settings -------------------------------------------------------------
    Bad("impl-unknown", hidden_call(tok, impl="cuda"), ValueError, "impl"),
    Bad("temperature-zero", hidden_call(tok, temperature=0.0), ValueError, "temperature"),
    Bad("temperature-str", hidden_call(tok, temperature="1"), TypeError, "temperature"),
    Bad("temperature-inf", hidden_call(tok, temperature=math.inf), ValueError, "temperature"),
    Bad("softcap-negative", hidden_call(tok, softcap=-30.0), ValueError, "softcap"),
    Bad("logit-scale-nan", hidden_call(tok, logit_scale=math.nan), ValueError, "logit_scale"),
    Bad("logit-scale-zero", hidden_call(tok, logit_scale=0.0), ValueError, "logit_scale"),
    Bad("ignore-index-float", hidden_call(tok, ignore_index=-100.0), TypeError, "ignore_index"),
    Bad("ignore-index-overflows-int32",
        hidden_call(tok, labels=_set("labels", lambda t: t.int()), ignore_index=-2**40), ValueError, "ignore_index"),
    Bad("memory-budget-zero", hidden_call(tok, memory_budget=0), ValueError, "memory_budget"),
    Bad("memory-budget-float", hidden_call(tok, memory_budget=1e6), TypeError, "memory_budget"),
    Bad("check-finite-hidden", hidden_call(tok, hidden=_set("hidden", _nan_at), check_finite=True), ValueError,
        "hidden"),
    Bad("check-finite-weight", hidden_call(tok, weight=_set("weight", _nan_at), check_finite=True), ValueError,
        "weight"),
    # --- sequence_logps: packing -----------------------------------------------------------
    Bad("sequence-ids-with-rows", hidden_call(seq, sequence_ids=lambda d, a: torch.zeros(4, 5, dtype=torch.long,
                                                                                          device=d)),
        ValueError, "sequence_ids"),
    Bad("sequence-ids-float", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                          sequence_ids=lambda d, a: torch.zeros(12, device=d)), TypeError,
        "sequence_ids"),
    Bad("sequence-ids-list", hidden_call(seq, hidden=packed_hidden, labels=packed_labels, sequence_ids=[0] * 12),
        TypeError, "sequence_ids"),
    Bad("sequence-ids-shape", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                          sequence_ids=lambda d, a: torch.zeros(11, dtype=torch.long, device=d)),
        ValueError, "sequence_ids"),
    Bad("sequence-ids-negative", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                             sequence_ids=lambda d, a: torch.full((12,), -1, device=d)),
        ValueError, "sequence_ids"),
    Bad("cu-seqlens-end", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                      cu_seqlens=lambda d, a: torch.tensor([0, 5, 11], device=d)), ValueError,
        "cu_seqlens"),
    Bad("cu-seqlens-decreasing", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                             cu_seqlens=lambda d, a: torch.tensor([0, 7, 5, 12], device=d)),
        ValueError, "cu_seqlens"),
    Bad("cu-seqlens-other-device", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                               cu_seqlens=lambda d, a: torch.tensor([0, 12], device=meta)),
        ValueError, "cu_seqlens"),
    Bad("sequence-ids-huge", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                         sequence_ids=_ids(*[0] * 11, 2 ** 40)), ValueError, "sequence_ids"),
    Bad("sequence-ids-past-token-count", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                                     sequence_ids=_ids(*[0] * 11, 12)), ValueError, "sequence_ids"),
    # Issue 22 item 3: ids cannot show trailing sequences no token carries, so a paired loss needs the count.
    Bad("sequence-ids-paired-without-count", hidden_call(dpo, hidden=packed_hidden, labels=packed_labels,
                                                         sequence_ids=_ids(0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3)),
        ValueError, "num_sequences"),
    Bad("sequence-ids-past-count", hidden_call(dpo, hidden=packed_hidden, labels=packed_labels,
                                               sequence_ids=_ids(0, 0, 1, 1, 2, 2, 3, 3, 5, 5, 5, 5), num_sequences=4),
        ValueError, "num_sequences"),
    Bad("num-sequences-float", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                           sequence_ids=_ids(*[0] * 12), num_sequences=2.0), TypeError,
        "num_sequences"),
    Bad("num-sequences-negative", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                              sequence_ids=_ids(*[0] * 12), num_sequences=-1), ValueError,
        "num_sequences"),
    Bad("num-sequences-with-rows", hidden_call(dpo, num_sequences=4), ValueError, "num_sequences"),
    Bad("num-sequences-with-cu-seqlens", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                                     cu_seqlens=lambda d, a: torch.tensor([0, 12], device=d),
                                                     num_sequences=1), ValueError, "num_sequences"),
    Bad("num-sequences-odd", hidden_call(dpo, hidden=packed_hidden, labels=packed_labels,
                                         sequence_ids=_ids(*[0] * 12), num_sequences=3), ValueError, "labels"),
    Bad("num-sequences-refs", hidden_call(dpo, hidden=packed_hidden, labels=packed_labels,
                                          sequence_ids=_ids(*[0] * 12), num_sequences=6,
                                          ref_chosen_logps=lambda d, a: torch.zeros(2, device=d),
                                          ref_rejected_logps=lambda d, a: torch.zeros(2, device=d)), ValueError,
        "ref_chosen_logps"),
    Bad("both-packings", hidden_call(seq, hidden=packed_hidden, labels=packed_labels,
                                     sequence_ids=lambda d, a: torch.zeros(12, dtype=torch.long, device=d),
                                     cu_seqlens=lambda d, a: torch.tensor([0, 12], device=d)), ValueError,
        "cu_seqlens"),
    # --- dpo_loss -------------------------------------------------------------------------
    Bad("odd-rows", hidden_call(dpo, hidden=_set("hidden", lambda t: t[:3]), labels=_set("labels", lambda t: t[:3])),
        ValueError, "labels"),
    Bad("packed-without-sequences", hidden_call(dpo, hidden=packed_hidden, labels=packed_labels), ValueError,
        "labels"),
    Bad("packed-odd-sequences", hidden_call(dpo, hidden=packed_hidden, labels=packed_labels,
                                            cu_seqlens=lambda d, a: torch.tensor([0, 4, 8, 12], device=d)),
        ValueError, "labels"),
    Bad("ref-length", hidden_call(dpo, ref_chosen_logps=lambda d, a: torch.zeros(3, device=d),
                                  ref_rejected_logps=lambda d, a: torch.zeros(2, device=d)), ValueError,
        "ref_chosen_logps"),
    Bad("ref-2d", hidden_call(dpo, ref_chosen_logps=lambda d, a: torch.zeros(2, device=d),
                              ref_rejected_logps=lambda d, a: torch.zeros(2, 1, device=d)), ValueError,
        "ref_rejected_logps"),
    Bad("ref-only-one", hidden_call(dpo, ref_chosen_logps=lambda d, a: torch.zeros(2, device=d)), ValueError,
        "ref_rejected_logps"),
    Bad("ref-int", hidden_call(dpo, ref_chosen_logps=lambda d, a: torch.zeros(2, dtype=torch.long, device=d),
                               ref_rejected_logps=lambda d, a: torch.zeros(2, device=d)), TypeError,
        "ref_chosen_logps"),
    Bad("ref-float", hidden_call(dpo, ref_chosen_logps=0.0, ref_rejected_logps=0.0), TypeError, "ref_chosen_logps"),
    Bad("ref-other-device", hidden_call(dpo, ref_chosen_logps=lambda d, a: torch.zeros(2, device=d),
                                        ref_rejected_logps=lambda d, a: torch.zeros(2, device=meta)), ValueError,
        "ref_rejected_logps"),
    Bad("ref-not-finite", hidden_call(dpo, ref_chosen_logps=lambda d, a: torch.tensor([0.0, math.inf], device=d),
                                      ref_rejected_logps=lambda d, a: torch.zeros(2, device=d), check_finite=True),
        ValueError, "ref_chosen_logps"),
    Bad("loss-type-unknown", hidden_call(dpo, loss_type="dpo"), ValueError, "loss_type"),
    Bad("loss-type-none", hidden_call(dpo, loss_type=None), TypeError, "loss_type"),
    Bad("loss-type-empty", hidden_call(dpo, loss_type=[]), TypeError, "loss_type"),
    Bad("loss-needs-reference", hidden_call(dpo, loss_type="nca_pair"), ValueError, "ref_chosen_logps"),
    Bad("loss-mix-needs-reference", hidden_call(dpo, loss_type=["sigmoid", "apo_zero"]), ValueError,
        "ref_chosen_logps"),
    Bad("loss-weights-length", hidden_call(dpo, loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError,
        "loss_weights"),
    Bad("loss-weights-str", hidden_call(dpo, loss_weights=["one"]), TypeError, "loss_weights"),
    Bad("loss-weights-nan", hidden_call(dpo, loss_weights=[math.nan]), ValueError, "loss_weights"),
    Bad("loss-weights-negative", hidden_call(dpo, loss_type=["sigmoid", "sft"], loss_weights=[1.0, -0.5]), ValueError,
        "loss_weights"),
    Bad("beta-zero", hidden_call(dpo, beta=0.0), ValueError, "beta"),
    Bad("beta-negative", hidden_call(dpo, beta=-0.1), ValueError, "beta"),
    Bad("beta-nan", hidden_call(dpo, beta=math.nan), ValueError, "beta"),
    Bad("beta-tensor", hidden_call(dpo, beta=lambda d, a: torch.tensor(0.1)), TypeError, "beta"),
    Bad("label-smoothing-one", hidden_call(dpo, label_smoothing=1.0), ValueError, "label_smoothing"),
    Bad("label-smoothing-negative", hidden_call(dpo, label_smoothing=-0.1), ValueError, "label_smoothing"),
    Bad("label-smoothing-str", hidden_call(dpo, label_smoothing="0.1"), TypeError, "label_smoothing"),
    Bad("label-smoothing-past-half", hidden_call(dpo, label_smoothing=0.6), ValueError, "label_smoothing"),
    Bad("exo-label-smoothing-past-half", hidden_call(dpo, loss_type="exo_pair", label_smoothing=0.7), ValueError,
        "label_smoothing"),
    Bad("robust-label-smoothing", hidden_call(dpo, loss_type="robust", label_smoothing=0.5), ValueError,
        "label_smoothing"),
    Bad("exo-without-smoothing", hidden_call(dpo, loss_type="exo_pair"), ValueError, "label_smoothing"),
    Bad("gamma-inf", hidden_call(dpo, loss_type="simpo", gamma=math.inf), ValueError, "gamma"),
    Bad("gamma-nan", hidden_call(dpo, loss_type="simpo", gamma=math.nan), ValueError, "gamma"),
    Bad("cpo-alpha-str", hidden_call(dpo, loss_type="cpo", cpo_alpha="1"), TypeError, "cpo_alpha"),
    # Issue 22 item 4: a negative cpo_alpha ascends the NLL term, as a negative loss weight would.
    Bad("cpo-alpha-negative", hidden_call(dpo, loss_type="cpo", cpo_alpha=-1.0), ValueError, "cpo_alpha"),
    Bad("cpo-alpha-negative-unused", hidden_call(dpo, cpo_alpha=-1.0), ValueError, "cpo_alpha"),
    Bad("discopop-tau-zero", hidden_call(dpo, loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau"),
    Bad("discopop-tau-negative", hidden_call(dpo, loss_type="discopop", discopop_tau=-0.05), ValueError,
        "discopop_tau"),
    Bad("loss-weights-inf", hidden_call(dpo, loss_weights=[math.inf]), ValueError, "loss_weights"),
    Bad("softcap-inf", hidden_call(tok, softcap=math.inf), ValueError, "softcap"),
    Bad("logit-scale-inf", hidden_call(seq, logit_scale=-math.inf), ValueError, "logit_scale"),
    Bad("filter-eps-negative", hidden_call(tok, impl="fused", filter_eps=-1e-9), ValueError, "filter_eps"),
    Bad("filter-eps-nan", hidden_call(tok, impl="fused", filter_eps=math.nan), ValueError, "filter_eps"),
    Bad("filter-eps-bool", hidden_call(tok, impl="fused", filter_eps=True), TypeError, "filter_eps"),
    Bad("module-cpo-alpha", module_call(dict(loss_type="cpo", cpo_alpha=-0.5)), ValueError, "cpo_alpha"),
    Bad("dpo-logits-cpo-alpha", logits_call(dpo_l, loss_type="cpo", cpo_alpha=-2.0), ValueError, "cpo_alpha"),
    # Issue 22 item 7: the Triton impls compute in float32; float64 inputs mean float64 math.
    Bad("hidden-float64-chunked", hidden_call(tok, hidden=_set("hidden", lambda t: t.double()),
                                              weight=_set("weight", lambda t: t.double()), impl="chunked"),
        TypeError, "hidden"),
    Bad("hidden-float64-fused", hidden_call(dpo, hidden=_set("hidden", lambda t: t.double()),
                                            weight=_set("weight", lambda t: t.double()), impl="fused"),
        TypeError, "hidden"),
    Bad("logits-float64-chunked", logits_call(seq_l, logits=_set("logits", lambda t: t.double()), impl="chunked"),
        TypeError, "logits"),
    Bad("dpo-impl-unknown", hidden_call(dpo, impl="triton"), ValueError, "impl"),
    Bad("dpo-label-too-large", hidden_call(dpo, labels=_label_at(V + 7)), ValueError, "labels"),
    # --- switches and groups: a truthy string is not True ------------------------------------
    Bad("check-finite-str", hidden_call(tok, check_finite="no"), TypeError, "check_finite"),
    Bad("check-finite-int", hidden_call(dpo, check_finite=1), TypeError, "check_finite"),
    Bad("average-str", hidden_call(seq, average="no"), TypeError, "average"),
    Bad("process-group-int", hidden_call(dpo, process_group=42), TypeError, "process_group"),
    Bad("process-group-str", hidden_call(tok, process_group="world"), TypeError, "process_group"),
    Bad("process-group-ranks", hidden_call(seq, process_group=_group_of_ranks), TypeError, "process_group"),
    # --- tensors without dense values ------------------------------------------------------
    Bad("weight-sparse", hidden_call(tok, weight=_set("weight", lambda t: t.to_sparse())), TypeError, "weight"),
    Bad("labels-sparse", hidden_call(seq, labels=_set("labels", lambda t: t.to_sparse())), TypeError, "labels"),
    Bad("hidden-nested", hidden_call(tok, hidden=_jagged), TypeError, "hidden"),
    Bad("ref-sparse", hidden_call(dpo, ref_chosen_logps=lambda d, a: torch.zeros(2, device=d).to_sparse(),
                                  ref_rejected_logps=lambda d, a: torch.zeros(2, device=d)), TypeError,
        "ref_chosen_logps"),
    Bad("all-meta", hidden_call(dpo, hidden=_on_meta("hidden"), weight=_on_meta("weight"), labels=_on_meta("labels")),
        ValueError, "hidden"),
    # --- DPOLoss: construction and call ----------------------------------------------------
    Bad("module-beta", module_call(dict(beta=-1.0)), ValueError, "beta"),
    Bad("module-impl", module_call(dict(impl="gpu")), ValueError, "impl"),
    Bad("module-loss-type", module_call(dict(loss_type="kto")), ValueError, "loss_type"),
    Bad("module-ignore-index", module_call(dict(ignore_index=None)), TypeError, "ignore_index"),
    Bad("module-memory-budget", module_call(dict(memory_budget=-5)), ValueError, "memory_budget"),
    Bad("module-temperature", module_call(dict(temperature=-1.0)), ValueError, "temperature"),
    Bad("module-odd-rows", module_call({}, hidden=_set("hidden", lambda t: t[:1]), labels=_set("labels",
                                                                                             lambda t: t[:1])),
        ValueError, "labels"),
    Bad("module-needs-reference", module_call(dict(loss_type="bco_pair")), ValueError, "ref_chosen_logps"),
    Bad("module-process-group", module_call(dict(process_group=42)), TypeError, "process_group"),
    Bad("module-check-finite", module_call(dict(check_finite="False")), TypeError, "check_finite"),
    Bad("module-label-smoothing", module_call(dict(label_smoothing=0.75)), ValueError, "label_smoothing"),
    # --- from logits ----------------------------------------------------------------------
    Bad("logits-int", logits_call(tok_l, logits=_set("logits", lambda t: t.long())), TypeError, "logits"),
    Bad("logits-list", logits_call(tok_l, logits=[0.0] * V), TypeError, "logits"),
    Bad("logits-labels-shape", logits_call(tok_l, labels=_set("labels", lambda t: t[:, :-1])), ValueError, "labels"),
    Bad("logits-empty-vocab", logits_call(tok_l, logits=lambda d, a: torch.randn(4, 5, 0, device=d)), ValueError,
        "logits"),
    Bad("logits-label-too-large", logits_call(tok_l, labels=_label_at(V)), ValueError, "labels"),
    Bad("logits-label-int8", logits_call(tok_l, labels=_set("labels", lambda t: t.to(torch.int8))), TypeError,
        "labels"),
    Bad("logits-impl-fused", logits_call(tok_l, impl="fused"), ValueError, "impl"),
    Bad("logits-temperature", logits_call(tok_l, temperature=-2.0), ValueError, "temperature"),
    Bad("logits-ignore-index", logits_call(tok_l, ignore_index="pad"), TypeError, "ignore_index"),
    Bad("logits-other-device", logits_call(tok_l, labels=lambda d, a: torch.zeros(4, 5, dtype=torch.long,
                                                                                   device=meta)),
        ValueError, "labels"),
    Bad("logits-inplace-str", logits_call(tok_l, inplace="False"), TypeError, "inplace"),
    Bad("logits-check-finite-str", logits_call(seq_l, check_finite="no"), TypeError, "check_finite"),
    Bad("dpo-logits-inplace-int", logits_call(dpo_l, inplace=0), TypeError, "inplace"),
    Bad("logits-sparse", logits_call(tok_l, logits=_set("logits", lambda t: t.to_sparse())), TypeError, "logits"),
    Bad("logits-meta", logits_call(tok_l, logits=_on_meta("logits"), labels=_on_meta("labels")), ValueError,
        "logits"),
    Bad("dpo-logits-label-smoothing", logits_call(dpo_l, label_smoothing=0.9), ValueError, "label_smoothing"),
    Bad("logits-not-finite", logits_call(tok_l, logits=_set("logits", _nan_at), check_finite=True), ValueError,
        "logits"),
    Bad("seq-logits-labels-float", logits_call(seq_l, labels=_set("labels", lambda t: t.double())), TypeError,
        "labels"),
    Bad("seq-logits-impl", logits_call(seq_l, impl=None), ValueError, "impl"),
    Bad("dpo-logits-labels-1d", logits_call(dpo_l, logits=lambda d, a: torch.randn(4, V, device=d),
                                            labels=lambda d, a: torch.zeros(4, dtype=torch.long, device=d)),
        ValueError, "labels"),
    Bad("dpo-logits-odd-rows", logits_call(dpo_l, logits=_set("logits", lambda t: t[:3]),
                                           labels=_set("labels", lambda t: t[:3])), ValueError, "labels"),
    Bad("dpo-logits-ref-length", logits_call(dpo_l, **{k: (lambda d, a: torch.zeros(4, device=d))
                                                       for k in ("ref_chosen_logps", "ref_rejected_logps")}),
        ValueError, "ref_chosen_logps"),
    Bad("dpo-logits-loss-type", logits_call(dpo_l, loss_type="unknown"), ValueError, "loss_type"),
    Bad("dpo-logits-needs-reference", logits_call(dpo_l, loss_type="sppo_hard"), ValueError, "ref_chosen_logps"),
    Bad("dpo-logits-beta", logits_call(dpo_l, beta="big"), TypeError, "beta"),
]


@pytest.fixture
def no_kernels(monkeypatch):
    """Every kernel entry replaced by a function that fails the test if called."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the inputs were validated")

    monkeypatch.setattr(logsoftmax_gather, "row_stats", forbidden)
    monkeypatch.setattr(logsoftmax_gather, "row_grad", forbidden)
    monkeypatch.setattr(rows.TorchRows, "stats", forbidden)
    monkeypatch.setattr(rows.TorchRows, "grad", forbidden)
    if importlib.util.find_spec("dpo_fast.kernels.fused_linear_logps") is not None:
        from dpo_fast.kernels import fused_linear_logps

        monkeypatch.setattr(fused_linear_logps, "forward_stats", forbidden)
        monkeypatch.setattr(fused_linear_logps, "backward", forbidden)


def test_table_is_large_and_unique():
    assert len(BAD) >= 25
    assert len({bad.id for bad in BAD}) == len(BAD)


@pytest.mark.parametrize("bad", BAD, ids=[bad.id for bad in BAD])
def test_bad_input_is_rejected_before_any_kernel(bad, device, no_kernels):
    with pytest.raises(bad.error) as info:
        bad.call(device)
    assert bad.names in str(info.value), f"message does not name {bad.names!r}: {info.value}"


def test_forbidden_kernels_would_be_noticed(device, no_kernels):
    """The fixture is live: a valid call reaches a kernel and trips it."""
    hidden, weight, labels = _inputs(device)
    with pytest.raises(AssertionError, match="kernel ran"):
        dpo_fast.token_logps(hidden, weight, labels, impl="torch")
    logits, labels = _logits(device)
    with pytest.raises(AssertionError, match="kernel ran"):
        dpo_fast.token_logps_from_logits(logits, labels, impl="auto")


@pytest.mark.parametrize("fn", [tok, seq])
def test_valid_edge_settings_are_accepted(fn, device):
    """What the checks must not reject: an ignore_index inside [0, V), int32 labels, 2-D packed
    hidden without sequences, a negative logit_scale."""
    hidden, weight, labels = _inputs(device)
    out = fn(hidden, weight, labels.clamp(min=3).int(), ignore_index=3, logit_scale=-0.5, impl="torch")
    assert torch.isfinite(out).all()
    out = fn(hidden.reshape(-1, H), weight, labels.reshape(-1), impl="torch")
    assert torch.isfinite(out).all()


def test_sequence_ids_are_sequence_indices(device):
    """An id no token carries is an empty sequence for sequence_logps (0, as a zero-length cu_seqlens span);
    dpo_loss (with its num_sequences) accepts ids in any token order and a sequence whose tokens are all
    ignored."""
    hidden, weight = torch.randn(9, H, device=device), torch.randn(V, H, device=device)
    labels = torch.randint(0, V, (9,), device=device)
    with_gap = dpo_fast.sequence_logps(hidden, weight, labels, sequence_ids=torch.tensor([0, 0, 2, 2, 2, 3, 3, 3, 3],
                                                                                        device=device), impl="torch")
    spans = dpo_fast.sequence_logps(hidden, weight, labels, cu_seqlens=torch.tensor([0, 2, 2, 5, 9], device=device),
                                    impl="torch")
    assert with_gap[1] == 0
    torch.testing.assert_close(with_gap, spans, rtol=0, atol=0)

    labels[7:] = -100  # sequence 3 (a rejected answer) has every token ignored
    order = torch.randperm(9, device=device)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3], device=device)
    shuffled = dpo_fast.dpo_loss(hidden[order], weight, labels[order], sequence_ids=ids[order], num_sequences=4,
                                 impl="torch")
    spans = dpo_fast.dpo_loss(hidden, weight, labels, cu_seqlens=torch.tensor([0, 2, 5, 7, 9], device=device),
                              impl="torch")
    torch.testing.assert_close(shuffled.loss, spans.loss)


def test_settings_at_the_edge_of_their_range_are_accepted(device):
    """label_smoothing 0.5 (TRL's conservative-DPO bound) and a zero loss weight are valid."""
    hidden, weight, labels = _inputs(device)
    out = dpo_fast.dpo_loss(hidden, weight, labels, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.0],
                            label_smoothing=0.5, check_finite=True, impl="torch")
    assert torch.isfinite(out.loss)
    assert dpo_fast.DPOLoss(loss_type="exo_pair", label_smoothing=0.5, check_finite=False, process_group=None)


def test_trailing_sequences_without_tokens_are_counted_from_num_sequences(device):
    """Issue 22 item 3: three pairs whose last two rejected answers lost every token. Their ids occur nowhere,
    so counted from the ids the batch looked like two pairs (chosen_0..1 against chosen_2, rejected_0),
    silently. With num_sequences=6 they are empty sequences, exactly as zero-length cu_seqlens spans."""
    hidden = torch.randn(9, H, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, device=device, dtype=torch.float64)
    labels = torch.randint(0, V, (9,), device=device)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3], device=device)
    cu_seqlens = torch.tensor([0, 2, 5, 7, 9, 9, 9], device=device)
    with pytest.raises(ValueError, match="num_sequences"):
        dpo_fast.dpo_loss(hidden, weight, labels, sequence_ids=ids, impl="torch")
    packed = dpo_fast.dpo_loss(hidden, weight, labels, sequence_ids=ids, num_sequences=6, impl="torch")
    spans = dpo_fast.dpo_loss(hidden, weight, labels, cu_seqlens=cu_seqlens, impl="torch")
    oracle = reference.dpo_loss(hidden, weight, labels, sequence_ids=ids, num_sequences=6)
    assert packed.chosen_logps.shape == (3,) and bool((packed.rejected_logps[1:] == 0).all())
    torch.testing.assert_close(packed.loss, spans.loss, rtol=0, atol=0)
    torch.testing.assert_close(packed.loss, oracle.loss, rtol=1e-12, atol=1e-12)
    sums = dpo_fast.sequence_logps(hidden, weight, labels, sequence_ids=ids, num_sequences=6, impl="torch")
    assert sums.shape == (6,) and bool((sums[4:] == 0).all())
    torch.testing.assert_close(sums, dpo_fast.sequence_logps(hidden, weight, labels, cu_seqlens=cu_seqlens,
                                                             impl="torch"), rtol=0, atol=0)


def _setting_call(name, value, device):
    """A call that hands ``value`` to the numeric setting ``name``."""
    hidden, weight, labels = _inputs(device)
    if name in ("temperature", "softcap", "logit_scale", "filter_eps"):
        return dpo_fast.token_logps(hidden, weight, labels, impl="torch", **{name: value})
    if name == "loss_weights":
        return dpo_fast.dpo_loss(hidden, weight, labels, impl="torch", loss_weights=[value]).loss
    loss_type = {"gamma": "simpo", "cpo_alpha": "cpo", "discopop_tau": "discopop"}.get(name, "sigmoid")
    return dpo_fast.dpo_loss(hidden, weight, labels, impl="torch", loss_type=loss_type, **{name: value}).loss


def _edges(valid):
    """(values inside the range, values outside it), at and next to each end."""
    inside, outside = [], [math.nan, math.inf, -math.inf]
    for end, is_open, step in ((valid.low, valid.low_open, -1), (valid.high, valid.high_open, 1)):
        if math.isinf(end):
            inside.append(step * 1e30)
            continue
        beyond = end + step * max(1e-9, abs(end) * 1e-9)
        (outside if is_open else inside).append(end)
        outside.append(beyond)
    if valid.nonzero:
        outside.append(0.0)
    return [v for v in inside if not (valid.nonzero and v == 0)], outside


@pytest.mark.parametrize("name", sorted(check.NUMERIC_SETTINGS))
def test_every_numeric_setting_is_checked_against_its_range(name, device):
    """Issue 22 item 4: every numeric setting has a range in the table, and the public functions enforce it,
    at its ends (a closed end accepted, the value past it refused; an open end refused)."""
    valid = check.NUMERIC_SETTINGS[name]
    assert valid.why
    inside, outside = _edges(valid)
    for value in outside:
        with pytest.raises(ValueError, match=name):
            _setting_call(name, value, device)
    for value in inside:
        if abs(value) > 1e6 and name not in ("beta", "gamma", "discopop_tau", "cpo_alpha"):
            continue  # a logit transform or weight of 1e30 is valid, but no meaningful run (filter_eps: fused only)
        assert _setting_call(name, value, device) is not None


@pytest.mark.parametrize("loss_type,name", sorted(check.LOSS_TYPE_RANGES))
def test_loss_types_narrow_their_settings(loss_type, name, device):
    valid = check.LOSS_TYPE_RANGES[(loss_type, name)]
    hidden, weight, labels = _inputs(device)
    inside, outside = _edges(valid)
    narrower = [v for v in outside if check.NUMERIC_SETTINGS[name].contains(v)]  # the others: the test above
    assert narrower
    for value in narrower:
        with pytest.raises(ValueError, match=f"{name}.*{loss_type}"):
            dpo_fast.dpo_loss(hidden, weight, labels, impl="torch", loss_type=loss_type, **{name: value})
    for value in inside:
        assert torch.isfinite(dpo_fast.dpo_loss(hidden, weight, labels, impl="torch", loss_type=loss_type,
                                                **{name: value}).loss)
