"""Past one device: vocabulary-parallel heads, and the lm_head under DDP, FSDP2 and ZeRO-3.

Vocabulary-parallel head (tensor parallel, Megatron's layout): rank ``r`` of a process
group holds rows ``[offset_r, offset_r + V_r)`` of the head. :class:`VocabParallelEngine`
wraps any engine (``chunked.ChunkedEngine``, ...): the inner engine folds the local shard
into per-token statistics, three small collectives merge them into those of the full
vocabulary, and the backward runs locally with the global log-sum-exp; only the
``grad_hidden`` partial sums cross ranks. No rank ever holds more than its shard. The
whole-pair (6NHV) route is not taken: a vocabulary-parallel call runs two-pass (8NHV).

Data-parallel wrappers: a fused loss reads ``lm_head.weight`` without calling the module,
so the wrapper's hooks never fire for it.

- DDP: nothing to do as long as the loss runs inside the wrapped module's ``forward``.
- FSDP2: inside the root module's forward the head's parameters are plain tensors; a
  head sharded on its own stays a ``DTensor`` unless the call goes through that module
  (``register_fsdp_forward_method``). :func:`gathers_head` refuses a ``DTensor`` with that
  advice instead of failing deep inside a matmul.
- DeepSpeed ZeRO-3: inside the wrapped module's forward DeepSpeed gathers the head on
  access (and again for backward). Outside, the public functions gather it for the call
  (:func:`gathers_head`) and again in backward, which recomputes logits
  (:class:`GatherInBackward`). Holding :func:`gathered` around the policy and reference
  calls makes them share one gather.
"""

import contextlib
import contextvars
import functools
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from dpo_fast.kernels.stats_layout import (
    STAT_ARGMAX, STAT_MAX, STAT_SQEXP, STAT_SUMEXP, STAT_TARGET, STAT_ZEXP, STAT_ZSUM,
)

from .validation import check_process_group


# ----------------------------------------------------------------------------------------
# vocabulary-parallel head
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VocabShard:
    """Where this rank's rows sit in the full vocabulary."""

    offset: int  # first global row held here
    rows: int  # rows held here
    vocab_size: int  # rows of the full head, all ranks together

    def local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Global label ids -> ids in this shard.

        A label held elsewhere becomes ``rows`` (one past the shard): the row kernels gather
        a target only for ``0 <= label - vocab_start < cols``, so it is never found. It must
        not become negative: -1 is the kept-token ignore index, which would skip the row.
        """
        owned = (labels >= self.offset) & (labels < self.offset + self.rows)
        return torch.where(owned, labels - self.offset, torch.full_like(labels, self.rows))


def vocab_shard(local_rows: int, process_group, device) -> VocabShard:
    """Offsets from every rank's row count (one all_reduce); shards may differ in size."""
    sizes = torch.zeros(dist.get_world_size(process_group), dtype=torch.int64, device=device)
    rank = dist.get_rank(process_group)
    sizes[rank] = local_rows
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM, group=process_group)
    sizes = sizes.tolist()
    return VocabShard(offset=sum(sizes[:rank]), rows=local_rows, vocab_size=sum(sizes))


# ----------------------------------------------------------------------------------------
# agreement across the ranks of a vocabulary-parallel group, before any other collective
# ----------------------------------------------------------------------------------------
#
# A check that passes on one rank and raises on another (a NaN in one shard, a 0-row shard,
# labels or an ignore mask that differ, one rank without requires_grad) would leave the
# peers blocked in the merge's all-reduce until the collective timeout. So the first
# collective of every call is one all_reduce(MAX) of a small float64 vector that carries
# each rank's outcome and what must agree; every rank reads the same result and raises the
# same error, or none does. It replaces the all_reduce of the row counts that every call
# already made, so the agreement costs no extra collective: a vector of 2W + 22 values for W
# ranks, one GEMV over the kept hidden states (2nH FLOPs against the shard's 2nHV/W) and
# one host sync, which the row counts already needed.

# Error classes a failing rank reports by code, so that its peers raise the same class.
_ERROR_CODES = {1: ValueError, 2: TypeError, 3: RuntimeError}
# Relative to ||hidden||: float32 rounding differences (~1e-7) pass, other hidden states do not.
_HIDDEN_TOLERANCE = 1e-4
_AGREED_VALUES = 11  # what agree() sends beside the outcomes and row counts
_MOD = 65521  # prime: label checksum terms below 2^32, sums below 2^63, reduced below 2^52 (exact in float64)


def _error_code(error: BaseException) -> int:
    return 2 if isinstance(error, TypeError) else 1 if isinstance(error, ValueError) else 3


@dataclass
class GroupCall:
    """One public call under a ``process_group``: whether it has agreed with its peers yet."""

    process_group: object
    needs_grad: bool
    agreed: bool = False


_GROUP_CALL: contextvars.ContextVar = contextvars.ContextVar("dpo_fast_group_call", default=None)


def _fingerprint(hidden: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float, float]:
    """(projection of hidden, ||hidden||, label checksum): equal on ranks that pass equal inputs.

    The projection sum_i a_i (h_i . b) with fixed a, b of entries ~ +-1 differs by about
    ||h - h'|| between different hidden states and moves with any reordering of rows.
    """
    n, width = hidden.shape
    device = hidden.device
    b = torch.cos(torch.arange(width, device=device, dtype=torch.float32) * 1.7 + 0.3)
    a = torch.cos(torch.arange(n, device=device, dtype=torch.float64) * 0.9 + 0.7)
    projection = torch.zeros((), dtype=torch.float64, device=device)
    square = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n, 4096):  # float32 copies of 4096 rows at a time
        rows = hidden[start:start + 4096].float()
        p = torch.nan_to_num((rows @ b).double(), nan=0.0, posinf=0.0, neginf=0.0)
        projection += (p * a[start:start + 4096]).sum()
        square += torch.nan_to_num(rows.double().square().sum(), nan=0.0, posinf=0.0)
    index = torch.arange(n, device=device, dtype=torch.int64) % _MOD + 1
    checksum = ((labels.long() % _MOD + 1) * index).sum() % (1 << 52)
    return projection, square.sqrt(), checksum.double()


def _exchange(process_group, device, rank_failed: int, rows: int = 0, values=None):
    """The one all_reduce(MAX). Returns (failed codes [W], rows [W], reduced values)."""
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    vec = torch.full((2 * world + 2 * _AGREED_VALUES,), float("-inf"), dtype=torch.float64, device=device)
    vec[:2 * world] = 0.0
    vec[rank] = rank_failed
    vec[world + rank] = rows
    if values is not None:
        tail = torch.stack([v if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64, device=device)
                            for v in values]).to(device=device, dtype=torch.float64)
        vec[2 * world:2 * world + 2 * len(tail)] = torch.cat([tail, -tail])
    dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=process_group)
    vec = vec.tolist()
    return vec[:world], vec[world:2 * world], vec[2 * world:]


def _raise_shared_failure(process_group, failed, own_error=None, group_name="process_group"):
    """Every rank learns every failing rank's message (an object all_gather, on this error path only)."""
    messages = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(messages, None if own_error is None else f"{own_error}", group=process_group)
    if own_error is not None:
        raise own_error
    first = next(r for r, code in enumerate(failed) if code > 0)
    cls = _ERROR_CODES.get(int(failed[first]), RuntimeError)
    raise cls(f"rank {first} of the {group_name} rejected the call (every rank raises this): {messages[first]}")


def announce_failure(call: GroupCall, error: BaseException, device) -> None:
    """This rank failed before agreeing: take part in the exchange with its error, then re-raise it."""
    call.agreed = True
    failed, _, _ = _exchange(call.process_group, device, _error_code(error))
    _raise_shared_failure(call.process_group, failed, error)


def agree(process_group, hidden, labels, local_rows: int, transform) -> "VocabShard":
    """The first collective of a vocabulary-parallel call: shard offsets, and one outcome for every rank.

    ``hidden [n, H]`` and ``labels [n]`` are the kept tokens. Raises the same ValueError on every
    rank when a peer failed before this point, or when what must agree does not: the number of
    kept tokens (the ignore mask), the hidden size, whether gradients are needed, the logit
    transform, the labels (a checksum) and the hidden states (a projection), or a label falls
    outside the full vocabulary.
    """
    call = _GROUP_CALL.get()
    if call is not None and call.process_group is not process_group:
        call = None
    if call is not None:
        call.agreed = True
    needs_grad = call.needs_grad if call is not None else False
    projection, norm, checksum = _fingerprint(hidden, labels)
    kept = labels.numel()
    top = labels.max() if kept else torch.tensor(-1, device=labels.device)
    bottom = labels.min() if kept else torch.tensor(0, device=labels.device)
    softcap = -1.0 if transform.softcap is None else transform.softcap
    values = [float(kept), float(hidden.shape[-1]), float(needs_grad), transform.scale, softcap,
              transform.temperature, checksum, projection, norm, top.double(), -bottom.double()]
    failed, rows, reduced = _exchange(process_group, hidden.device, 0, local_rows, values)
    if any(code > 0 for code in failed):
        _raise_shared_failure(process_group, failed)
    count = len(values)
    high, low = reduced[:count], [-x for x in reduced[count:2 * count]]
    vocab_size = int(sum(rows))
    label_max, label_min = high[9], -high[10]
    if label_max >= vocab_size or label_min < 0:
        bad = int(label_max) if label_max >= vocab_size else int(label_min)
        raise ValueError(f"labels: id {bad} (on at least one rank) is outside [0, {vocab_size}), the vocabulary of "
                         "all shards of process_group together")
    names = ("scored tokens (labels != ignore_index)", "hidden sizes", "requires_grad / grad mode",
             "logit_scale", "softcap", "temperature")
    for i, name in enumerate(names):
        if high[i] != low[i]:
            raise ValueError(f"process_group: the ranks disagree on {name} ({low[i]:g} vs {high[i]:g}). Every rank of "
                             "a vocabulary-parallel group passes the same hidden states, labels and settings, and "
                             "all of them or none need gradients")
    if high[6] != low[6]:
        raise ValueError("process_group: the labels differ across ranks (checksum). Every rank of a vocabulary-"
                         "parallel group passes the same global label ids")
    if high[7] - low[7] > _HIDDEN_TOLERANCE * max(high[8], 1e-30):
        raise ValueError("process_group: the hidden states differ across ranks (their projections differ by "
                         f"{high[7] - low[7]:.3g}, ||hidden|| = {high[8]:.3g}). Every rank of a vocabulary-parallel "
                         "group passes the same hidden states; its own rows of the weight only")
    rank = dist.get_rank(process_group)
    local = [int(r) for r in rows]
    return VocabShard(offset=sum(local[:rank]), rows=local_rows, vocab_size=vocab_size)


def agreed_max(value: float, device) -> float:
    """The largest ``value`` over all ranks of the default group (one all_reduce); ``value`` alone without one.

    For a decision every data-parallel rank must take alike from its own data: the one-time
    reconstruction check of ``dpo_fast.hf`` (fused, naive or raise), whose collectives
    (FSDP2's, DeepSpeed's) would otherwise desynchronise when ranks decide differently.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    finite = value if value == value else float("inf")  # NaN: as bad as it gets
    total = torch.tensor([finite], dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return float(total.item())


# Rows of the statistics that add up across shards once rescaled to the global max.
_SUMMED = (STAT_SUMEXP, STAT_ZEXP, STAT_SQEXP, STAT_ZSUM, STAT_TARGET)


def merge_vocab_shards(stats: torch.Tensor, shard: VocabShard, process_group) -> torch.Tensor:
    """Per-token statistics of this shard -> those of the full vocabulary, on every rank.

    Expects ARGMAX in local ids and TARGET filled only where this shard holds the label
    (zero elsewhere). Three all_reduces (max; rescaled sums; first argmax), the only
    collectives every backend supports on device tensors.
    """
    local_max = stats[STAT_MAX]
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=process_group)
    shift = torch.where(global_max == float("-inf"), torch.zeros_like(global_max), global_max)
    rescale = torch.exp(local_max - shift)  # 0 for a shard whose logits are all -inf
    sums = torch.stack([
        stats[STAT_SUMEXP] * rescale,
        stats[STAT_ZEXP] * rescale,
        stats[STAT_SQEXP] * rescale * rescale,  # a sum of exp(2 (z - max))
        stats[STAT_ZSUM],
        stats[STAT_TARGET],
    ])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
    # Shards lie in rank order, so the smallest global id among the shards that hold the
    # maximum is the first maximum of the full row, the one torch.argmax picks.
    first_arg = torch.where(local_max == global_max, stats[STAT_ARGMAX] + float(shard.offset),
                            torch.full_like(local_max, float("inf")))
    dist.all_reduce(first_arg, op=dist.ReduceOp.MIN, group=process_group)

    merged = stats.clone()
    merged[STAT_MAX] = global_max
    merged[STAT_ARGMAX] = torch.where(torch.isinf(first_arg), torch.zeros_like(first_arg), first_arg)
    for row, values in zip(_SUMMED, sums):
        merged[row] = values
    return merged


class VocabParallelEngine:
    """An engine over a head sharded by vocabulary rows across ``process_group``.

    Every rank passes the same hidden states and global labels and its own rows of the
    weight (and bias). Forward statistics come out as if computed over the full head;
    backward returns the full ``grad_hidden`` on every rank (already summed: do not reduce
    it again across this group) and this rank's rows of ``grad_weight``/``grad_bias``.
    With ``sum_grad_hidden=False`` backward returns this rank's partial ``grad_hidden``
    instead, for callers whose own collective sums it (Megatron's sequence-parallel gather,
    whose backward is a reduce-scatter: verl's kernel contract).
    """

    def __init__(self, inner, process_group, sum_grad_hidden: bool = True):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("process_group given but torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group first")
        self.inner = inner
        self.process_group = process_group
        self.sum_grad_hidden = sum_grad_hidden
        self._shard: Optional[VocabShard] = None

    def shard(self, local_rows: int, device="cpu") -> VocabShard:
        # Known from the agreement of forward_stats; otherwise one all_reduce of the row counts.
        if self._shard is None or self._shard.rows != local_rows:
            self._shard = vocab_shard(local_rows, self.process_group, device)
        return self._shard

    @property
    def vocab_size(self) -> int:
        """Rows of the full head (known once :meth:`shard` has run)."""
        if self._shard is None:
            raise RuntimeError("vocab_size is known after shard() or forward_stats()")
        return self._shard.vocab_size

    def forward_stats(self, hidden, weight, bias, labels, transform) -> torch.Tensor:
        # The first collective of the call: every rank agrees on the outcome of its checks first.
        shard = self._shard = agree(self.process_group, hidden, labels, weight.shape[0], transform)
        stats = self.inner.forward_stats(hidden, weight, bias, shard.local_labels(labels), transform)
        owned = (labels >= shard.offset) & (labels < shard.offset + shard.rows)
        stats[STAT_TARGET] = torch.where(owned, stats[STAT_TARGET], torch.zeros_like(stats[STAT_TARGET]))
        return merge_vocab_shards(stats, shard, self.process_group)

    def backward(self, hidden, weight, bias, labels, transform, lse, grad_logp, entropy=None, grad_entropy=None,
                 needs=(True, True, True)):
        # Softmax over the full vocabulary restricted to this shard's columns: the global lse
        # and entropy make every local term exact.
        shard = self.shard(weight.shape[0], weight.device)
        grad_hidden, grad_weight, grad_bias = self.inner.backward(
            hidden, weight, bias, shard.local_labels(labels), transform, lse, grad_logp, entropy=entropy,
            grad_entropy=grad_entropy, needs=needs)
        if grad_hidden is not None and self.sum_grad_hidden:
            # Sum in float32 so 16-bit partials are rounded once, after the sum.
            total = grad_hidden.float()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.process_group)
            grad_hidden = total.to(grad_hidden.dtype)
        return grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3
# ----------------------------------------------------------------------------------------
#
# Inside the forward of a module DeepSpeed wraps, reading ``lm_head.weight`` already gathers
# it: DeepSpeed registers it as an external parameter of the running module and gathers it
# again for that module's backward. Then everything below is a no-op. Outside such a forward
# (loss computed on hidden states a trainer got back) the head is an empty partition: the
# public functions gather it for the call, and the backward, which recomputes the logits,
# gathers it again and keeps it until autograd has accumulated its gradient (autograd checks
# the gradient against the parameter's shape at that moment).

def is_zero3_param(x) -> bool:
    """A parameter that DeepSpeed ZeRO-3 partitions (its ``.data`` is empty outside a gather)."""
    return x is not None and hasattr(x, "ds_id")


def _needs_gather(x) -> bool:
    if not is_zero3_param(x):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return x.ds_status == ZeroParamStatus.NOT_AVAILABLE


def _to_gather(items) -> List[torch.Tensor]:
    params = []
    for item in items:
        if isinstance(item, torch.nn.Module):
            params.extend(item.parameters(recurse=False))
        elif item is not None:
            params.append(item)
    todo, seen = [], set()
    for p in params:  # a tied or shared parameter is gathered once
        if id(p) not in seen and _needs_gather(p):
            seen.add(id(p))
            todo.append(p)
    return todo


@contextlib.contextmanager
def gathered(*params_or_modules):
    """Gather the ZeRO-3 partitions among ``params_or_modules`` (modules: their own parameters) for the block.

    Yields the parameters it gathered. Parameters that are not ZeRO-3's, or are already
    gathered (an enclosing ``gathered``, a ``GatheredParameters``, DeepSpeed's own hooks),
    are left alone, so the context nests, and a head shared by policy and reference is
    gathered once when it wraps both calls. Read-only: nothing is broadcast back on exit.

    It gathers and partitions directly rather than through ``deepspeed.zero.GatheredParameters``:
    DeepSpeed's module hooks may partition a parameter an enclosing context holds (the
    head's own forward, run by the one-time check of ``dpo_fast.hf``, releases it on exit),
    and DeepSpeed refuses a ``GatheredParameters`` nested in another over the same parameter.
    """
    todo = _gather_now(params_or_modules)
    try:
        yield todo
    finally:
        _release(todo)


def _gather_now(params) -> List[torch.Tensor]:
    """Gather the partitioned ones among ``params`` (modules: their own) until :func:`_release`; returns them."""
    todo = _to_gather(params)
    if todo:
        todo[0].all_gather(param_list=todo)
    return todo


def _release(params) -> None:
    """Partition ``params`` again, except those a DeepSpeed submodule is using right now (a
    head tied to the input embedding, during the embedding's backward): DeepSpeed frees
    those itself when that submodule is done."""
    if not params:  # nothing was gathered (no ZeRO-3 parameter): DeepSpeed need not even be installed
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    free = [p for p in params
            if p.ds_status == ZeroParamStatus.AVAILABLE and not getattr(p, "ds_active_sub_modules", None)]
    if free:
        free[0].partition(param_list=free, has_been_updated=False)


def _release_after_accumulation(params: List[torch.Tensor]) -> None:
    """:func:`_release` ``params`` once autograd has accumulated a gradient into each."""
    pending = {id(p) for p in params}
    handles = []

    def accumulated(param):
        pending.discard(id(param))
        if not pending:
            for handle in handles:
                handle.remove()
            _release(params)

    handles.extend(p.register_post_accumulate_grad_hook(accumulated) for p in params)


class GatherInBackward:
    """Wraps an engine whose weight/bias are ZeRO-3 parameters: gathers them for its work.

    Other attributes (``rows``, ``vocab_size``, ``shard``) are the inner engine's.
    """

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward_stats(self, hidden, weight, bias, labels, transform):
        with gathered(weight, bias):
            return self.inner.forward_stats(hidden, weight, bias, labels, transform)

    def backward(self, hidden, weight, bias, labels, transform, lse, grad_logp, entropy=None, grad_entropy=None,
                 needs=(True, True, True)):
        held = _gather_now([weight, bias])
        try:
            grads = self.inner.backward(hidden, weight, bias, labels, transform, lse, grad_logp, entropy=entropy,
                                        grad_entropy=grad_entropy, needs=needs)
        except BaseException:
            _release(held)
            raise
        with_grad = {id(p) for p, g in ((weight, grads[1]), (bias, grads[2])) if g is not None}
        _release([p for p in held if id(p) not in with_grad])
        accumulating = [p for p in held if id(p) in with_grad]
        if accumulating:
            _release_after_accumulation(accumulating)
        return grads


# ----------------------------------------------------------------------------------------
# FSDP2 DTensor
# ----------------------------------------------------------------------------------------

def is_dtensor(x) -> bool:
    # No DTensor can exist before its module is imported: avoid importing it here.
    module = sys.modules.get("torch.distributed.tensor")
    return x is not None and module is not None and isinstance(x, module.DTensor)


def shards_own_params(module) -> bool:
    """Whether ``module`` is an FSDP2 module with its own parameter group (``fully_shard(module)``).

    Its parameters are ``DTensor`` shards except while its own forward runs: only calling
    the module unshards them (and casts them under a ``MixedPrecisionPolicy``), and only the
    hooks of that call reduce-scatter their gradients.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # nothing is FSDP2-wrapped before it is imported
    cls = getattr(fsdp, "FSDPModule", None)
    return cls is not None and isinstance(module, cls)


def call_through_module(module: torch.nn.Module, fn, *args):
    """``fn(*args)`` run as ``module``'s forward, inside ``module(*args)``.

    Calling the module fires every hook its wrappers registered on it. Under FSDP2: before,
    unshard its parameters (plain tensors for ``fn`` to read from ``module``), cast them and
    the floating-point ``args`` to the mixed-precision ``param_dtype``; after, reshard; in
    backward, unshard again before the gradient reaches ``fn``'s outputs, and reduce-scatter
    the parameters' gradients once ``args``' gradients are computed (at the end of backward
    when no arg needs a gradient). This is the root fix for a loss that reads a head FSDP2
    shards on its own, where ``full_tensor()`` would skip the cast and the reduce-scatter.
    """
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


FSDP2_ADVICE = (
    "is an FSDP2 DTensor shard: the lm_head was read outside the forward that unshards it. Compute the loss "
    "inside the forward of the module fully_shard() wrapped around the head (for a head sharded on its own: "
    "define the loss as a method of that module and call torch.distributed.fsdp.register_fsdp_forward_method"
    "(module, 'method_name')), so the head's parameters are plain tensors during the call; dpo_fast.hf and the "
    "TRL integration do this themselves. Calling .full_tensor() instead bypasses FSDP2's mixed-precision cast "
    "and its reduce-scatter: every rank would keep the gradient of its own micro-batch."
)


def check_not_dtensor(**tensors) -> None:
    for name, x in tensors.items():
        if is_dtensor(x):
            raise TypeError(f"{name} {FSDP2_ADVICE}")


# ----------------------------------------------------------------------------------------
# what the public API uses
# ----------------------------------------------------------------------------------------

def gathers_head(fn):
    """Decorator for ``fn(hidden, weight, labels, *, bias=None, ...)``.

    Refuses FSDP2 ``DTensor`` inputs with advice, and runs ``fn`` with ZeRO-3 partitioned
    weight/bias gathered; the call is untouched otherwise. Under a ``process_group``, an
    error raised on this rank before the ranks agreed (:func:`agree`) is announced to the
    peers first, so that they raise it too instead of waiting in a collective.
    """

    @functools.wraps(fn)
    def call(hidden, weight, labels, *args, **kwargs):
        group = kwargs.get("process_group")
        if group is None:
            return run(hidden, weight, labels, *args, **kwargs)
        check_process_group(group)  # before the group is asked its size: a wrong type raises here, alike on every rank
        tensors = [t for t in (hidden, weight, kwargs.get("bias")) if torch.is_tensor(t)]
        state = GroupCall(group, torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        token = _GROUP_CALL.set(state)
        try:
            return run(hidden, weight, labels, *args, **kwargs)
        except BaseException as error:
            if not state.agreed:
                announce_failure(state, error, _collective_device(group, tensors))
            raise
        finally:
            _GROUP_CALL.reset(token)

    def run(hidden, weight, labels, *args, **kwargs):
        bias = kwargs.get("bias")
        check_not_dtensor(hidden=hidden, weight=weight, bias=bias)
        if not (is_zero3_param(weight) or is_zero3_param(bias)):
            return fn(hidden, weight, labels, *args, **kwargs)
        with gathered(weight, bias):
            return fn(hidden, weight, labels, *args, **kwargs)

    return call


def _collective_device(process_group, tensors):
    """Where the peers' agreement vector lives: their hidden states' device (NCCL: the current GPU)."""
    if tensors:
        return tensors[0].device
    backend = str(dist.get_backend(process_group))
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def wrap_engine(engine, weight, bias, process_group):
    """The engine a call runs: vocabulary-parallel under ``process_group``; gathering ZeRO-3 params."""
    if process_group is not None:
        engine = VocabParallelEngine(engine, process_group)
    if is_zero3_param(weight) or is_zero3_param(bias):
        engine = GatherInBackward(engine)
    return engine


def leave_grad_hidden_partial(engine) -> None:
    """Make the vocabulary-parallel engine in ``engine`` (possibly wrapped) return each rank's partial
    ``grad_hidden``: see :class:`VocabParallelEngine`'s ``sum_grad_hidden``."""
    while not isinstance(engine, VocabParallelEngine):
        engine = engine.inner
    engine.sum_grad_hidden = False


def two_pass_only(weight, bias, process_group) -> bool:
    """Whether the whole-pair (6NHV) route is out for this call.

    Its gradients are made in forward and handed to autograd with no engine call in
    backward, so there is no place to run the vocabulary-parallel reduction, nor to gather
    a trainable ZeRO-3 head before autograd accumulates its gradient: whoever gathered it
    for the forward (this call, an enclosing :func:`gathered`, DeepSpeed's hooks) may have
    partitioned it again by then.
    """
    if process_group is not None:
        return True
    return any(p is not None and p.requires_grad and is_zero3_param(p) for p in (weight, bias))


def head_params(head: torch.nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight, bias)`` of an lm_head (or of a model's ``get_output_embeddings()``) for the loss.

    Call it inside the forward of the wrapped model. Under DDP and FSDP2 (root-wrapped head)
    these are the plain tensors the wrapper tracks; an FSDP2 ``DTensor`` raises with advice.
    A ZeRO-3 parameter is returned as is: the dpo_fast functions gather it themselves.
    """
    if hasattr(head, "get_output_embeddings") and not hasattr(head, "weight"):
        head = head.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    check_not_dtensor(weight=weight, bias=bias)
    return weight, bias


def head_weight(head: torch.nn.Module) -> torch.Tensor:
    """The weight of :func:`head_params`."""
    return head_params(head)[0]
