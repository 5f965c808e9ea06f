"""Context parallelism: a sequence's tokens split across the ranks of a ``sequence_group``.

Ring attention, Ulysses and load-balanced zig-zag splits leave each rank with contiguous
slices of every sequence (the split is the caller's). The log-prob of a token needs only its
own hidden state and the head, so each rank computes its tokens' log-probs and folds them
into per-sequence partial sums; one all-reduce over the group turns them into the sums of the
whole sequences. Every rank then computes the same pair losses and metrics.

Gradients. Every rank computes the same loss ``L(S)`` of the global sums ``S = sum_r s_r``,
and ``dS / ds_r = 1``: the all-reduce's backward is the identity, so rank ``r``'s gradients
are exactly the part of the full gradient that flows through its own tokens (its slice of
``grad_hidden`` and its tokens' share of ``grad_weight``). Summing the local head gradients
over the group gives the whole batch's: a data-parallel reduction that AVERAGES over the
context-parallel ranks too (DDP/FSDP over a dp x cp mesh) divides it by the group size, so
scale the loss by the group size there, as Megatron does. Backward has no collective here.

Agreement. As for a vocabulary-parallel group (``distributed.agree``), the first collective
on the group is one all_reduce(MAX) that carries each rank's outcome and what must agree
(the number of sequences, the hidden size, the logit settings, the loss settings), so a
check that fails on one rank (a label out of range, a NaN) raises on every rank at once. A
rank that fails after agreeing still joins the one sum all-reduce, flagged, so its peers
raise too instead of waiting for a collective timeout.
"""

import contextvars
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .distributed import _ERROR_CODES, _error_code, _exchange, _raise_shared_failure
from .validation import check_process_group

_NAME = "sequence_group"
# How the sequences are given; the ranks must agree on it. sequence_ids: R = the largest id over ranks + 1.
PADDED, CU_SEQLENS, SEQUENCE_IDS, SINGLE = 0, 1, 2, 3


@dataclass
class SequenceCall:
    """One public call under a ``sequence_group``: where it stands with its peers."""

    group: object
    agreed: bool = False  # the agreement exchange has run
    done: bool = False  # no further collective on the group is pending (reduced, or the agreement raised)
    num_sequences: int = 0  # agreed
    reduce_rows: int = 0  # rows of the sum all-reduce, so a failing rank can join it


_CALL: contextvars.ContextVar = contextvars.ContextVar("dpo_fast_sequence_call", default=None)


def over_sequence_group(fn):
    """Decorator for a public function with a ``sequence_group=`` keyword.

    A rank that raises before the agreement announces its error in the agreement's exchange; one
    that raises after it joins the sum all-reduce with its error code. Either way its peers raise too.
    """

    @functools.wraps(fn)
    def call(*args, **kwargs):
        group = kwargs.get(_NAME)
        if group is None:
            return fn(*args, **kwargs)
        check_process_group(group, name=_NAME)
        state = SequenceCall(group)
        token = _CALL.set(state)
        try:
            return fn(*args, **kwargs)
        except BaseException as error:
            device = _device(group, args)
            if not state.agreed:
                state.agreed = state.done = True
                failed, _, _ = _exchange(group, device, _error_code(error))
                _raise_shared_failure(group, failed, error, group_name=_NAME)
            if not state.done:
                state.done = True
                _flagged_reduce(group, state.reduce_rows, device, _error_code(error))
            raise
        finally:
            _CALL.reset(token)

    return call


def _device(group, args):
    for t in args:
        if torch.is_tensor(t):
            return t.device
    backend = str(dist.get_backend(group))
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def _state(group) -> SequenceCall:
    state = _CALL.get()
    if state is None or state.group is not group:  # called below the decorator (internal use)
        state = SequenceCall(group)
    return state


def agree(group, *, mode: int, num_sequences: int, hidden_size: int, head_rows: int, transform,
          loss_key: float = 0.0, per_sequence: int, device) -> int:
    """The group's first collective. Returns the number of sequences of the whole batch.

    Raises the same error on every rank when a rank failed before this point, or when the ranks
    disagree on how sequences are given, their number (sequence_ids: the largest id over ranks
    decides, since a rank may hold no token of the last sequences), the hidden size, the head's
    rows, the logit settings or the loss settings (``loss_key``). ``per_sequence``: how many values
    per sequence the call's one sum all-reduce (:func:`reduce_sequences`) will carry.
    """
    state = _state(group)
    state.agreed = True
    softcap = -1.0 if transform.softcap is None else transform.softcap
    exact_count = -1.0 if mode == SEQUENCE_IDS else float(num_sequences)
    values = [float(mode), exact_count, float(num_sequences), float(hidden_size), float(head_rows),
              transform.scale, softcap, transform.temperature, float(loss_key)]
    failed, _, reduced = _exchange(group, device, 0, 0, values)
    if any(code > 0 for code in failed):
        state.done = True
        _raise_shared_failure(group, failed, group_name=_NAME)
    count = len(values)
    high, low = reduced[:count], [-x for x in reduced[count:2 * count]]
    names = ("how sequences are given (rows, cu_seqlens or sequence_ids)", "the number of sequences", None,
             "hidden sizes", "the head's rows", "logit_scale", "softcap", "temperature",
             "the loss settings (loss_type, loss_weights, beta, ...)")
    for i, name in enumerate(names):
        if name is not None and high[i] != low[i]:
            state.done = True
            raise ValueError(f"{_NAME}: the ranks disagree on {name} ({low[i]:g} vs {high[i]:g}). Every rank of a "
                             "context-parallel group passes its slices of the same sequences, in the same order, "
                             "with the same settings")
    state.num_sequences = int(high[2])
    state.reduce_rows = state.num_sequences * per_sequence
    return state.num_sequences


def pad_sequences(values: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """[R_local] -> [R] with zeros: a rank that holds no token of the last sequences (sequence_ids)."""
    missing = num_sequences - values.shape[0]
    return values if missing == 0 else torch.nn.functional.pad(values, (0, missing))


class _Global(torch.autograd.Function):
    """Value: the group's total. Gradient to the local sums: the identity (see the module docstring)."""

    @staticmethod
    def forward(ctx, local, total):
        return total.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reduce_sequences(group, sums: torch.Tensor, extras: Optional[torch.Tensor] = None):
    """One all-reduce over ``group``: (global sums, differentiable as above; global extras, detached).

    ``sums`` [R] are this rank's per-sequence sums; ``extras`` [k, R] what else adds up per
    sequence (token counts, metric sums). The reduction runs in float64: R partial sums
    rounded once, alike on every rank.
    """
    state = _state(group)
    rows = sums.numel() + (0 if extras is None else extras.numel())
    if state.reduce_rows and rows != state.reduce_rows:  # a bug here, not the caller's
        raise RuntimeError(f"reduce_sequences: {rows} values, the agreement announced {state.reduce_rows}")
    world = dist.get_world_size(group)
    vec = torch.zeros(rows + world, dtype=torch.float64, device=sums.device)
    vec[:sums.numel()] = sums.detach().reshape(-1)
    if extras is not None:
        vec[sums.numel():rows] = extras.detach().reshape(-1)
    dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
    state.done = True
    _raise_if_flagged(vec[rows:].tolist())
    total = _Global.apply(sums, vec[:sums.numel()].to(sums.dtype).view(sums.shape))
    return total, None if extras is None else vec[sums.numel():rows].view(extras.shape)


def _flagged_reduce(group, rows: int, device, code: int) -> None:
    """A failing rank's part in the sum all-reduce: zeros, and its error code."""
    world = dist.get_world_size(group)
    vec = torch.zeros(rows + world, dtype=torch.float64, device=device)
    vec[rows + dist.get_rank(group)] = code
    dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)


def _raise_if_flagged(codes) -> None:
    for rank, code in enumerate(codes):
        if code > 0:
            cls = _ERROR_CODES.get(int(code), RuntimeError)
            raise cls(f"rank {rank} of the {_NAME} failed after the ranks agreed (every rank raises this); its own "
                      "error is in its log")
