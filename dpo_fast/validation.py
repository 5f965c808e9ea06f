"""Argument checks for every public entry point, in one place.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape or value) naming the argument and what was expected, before any kernel runs. Checks
of tensor values (label range, packing) read no value themselves: their device scalars
travel in the layout's one host read (:class:`DeferredChecks`), and they raise right after it.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .losses import LOSSES

IMPLS = ("auto", "chunked", "fused", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    # The paths index, reshape and hand raw pointers to kernels: only a dense strided tensor has them.
    if x.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got a nested tensor: pack its sequences into one tensor "
                        f"(padded rows, or tokens with cu_seqlens/sequence_ids)")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (torch.strided) tensor, got layout {x.layout}: call .to_dense()")


def _holds_data(name, x):
    """Called once every tensor of a call is known to share ``x``'s device."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (shapes only, no values): materialize the tensors "
                         f"(e.g. model.to_empty(device=...) and load the weights) before computing a loss")


def _float_tensor(name, x):
    _tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {x.dtype}")


def _int_labels(name, labels):
    _tensor(name, labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")


def _token_ids(name, labels):
    """Token ids must be int64 or int32: in a narrower dtype ignore_index (-100) wraps around
    (a uint8 label 156 compares equal to -100), and gathers want 32/64-bit indices."""
    _int_labels(name, labels)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor of token ids, got dtype {labels.dtype}")


def check_token_ids(**tensors):
    """Entry points that hand token ids on (``dpo_fast.hf``, the TRL integration) check them first, under
    their own argument names, before any model or kernel runs."""
    for name, ids in tensors.items():
        _token_ids(name, ids)


def check_flags(**flags):
    """Switches must be bool: a string such as "False" is truthy and would silently turn the switch on."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_process_group(process_group, name="process_group"):
    """None, or a torch.distributed ProcessGroup (e.g. ``dist.new_group(ranks)``, ``dist.group.WORLD``)."""
    if process_group is None:
        return
    group_type = getattr(torch.distributed, "ProcessGroup", None) if torch.distributed.is_available() else None
    if group_type is None or not isinstance(process_group, group_type):
        raise TypeError(f"{name} must be None or a torch.distributed.ProcessGroup (e.g. "
                        f"torch.distributed.new_group(ranks)), got {type(process_group).__name__}")


def _finite(value) -> bool:
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float setting read
    # from a default or an attribute arrives as a SymFloat, which math.isfinite cannot trace.
    return -math.inf < value < math.inf  # False for NaN too


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")


# ----------------------------------------------------------------------------------------
# numeric settings: one table of valid ranges
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NumberRange:
    """The valid values of a numeric setting: finite, in [low, high] (an end open where said), and why."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    nonzero: bool = False
    why: str = ""

    def contains(self, value) -> bool:
        if not _finite(value) or (self.nonzero and value == 0):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "a finite, non-zero number" if self.nonzero else "a finite number"
        if self.high == math.inf:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        return (f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")


# Every numeric setting of the public functions (dpo_loss, DPOLoss, the *_logps functions), checked on
# every call. The loss formulas are TRL's (losses.py); TRL itself checks only robust's and exo_pair's
# label_smoothing, so the other ranges say where a formula stops meaning what its name says.
# label_smoothing is read by sigmoid, exo_pair, robust, aot, aot_unpaired, simpo and cpo; the other types
# ignore it, as TRL's do (its trainers pass their label_smoothing whatever the loss type), so it is not
# refused there.
NUMERIC_SETTINGS = {
    "beta": NumberRange(0, low_open=True, why="the scale of the implicit reward: at 0 the preference term "
                        "vanishes, and ipo and sppo_hard divide by it; a negative beta trains the preference "
                        "backwards"),
    "label_smoothing": NumberRange(0, 0.5, why="the probability that a preference label is flipped (TRL's "
                                   "convention): past 0.5 the flipped label is the likelier one, so the loss "
                                   "would train the preference backwards"),
    "gamma": NumberRange(why="SimPO's target reward margin, subtracted inside the logsigmoid: any finite "
                         "margin leaves the loss decreasing in the chosen-minus-rejected reward"),
    "discopop_tau": NumberRange(0, low_open=True, why="the temperature of DiscoPOP's sigmoid mix, which "
                                "divides by it"),
    "cpo_alpha": NumberRange(0, why="the weight of CPO's chosen NLL term: a negative weight would ascend it"),
    "loss_weights": NumberRange(0, why="a negative weight would ascend that loss"),
    "temperature": NumberRange(0, low_open=True, why="every logit is divided by it"),
    "softcap": NumberRange(0, low_open=True, why="softcap * tanh(logit / softcap) divides by it"),
    "logit_scale": NumberRange(nonzero=True, why="every logit is multiplied by it: at 0 all are equal (a "
                               "negative scale negates the head, an unusual but well-defined model)"),
    "filter_eps": NumberRange(0, why="a bound on the |d loss / d logit| that gradient filtering skips; 0 "
                              "is exact"),
}
# Loss types that narrow a shared setting further: (loss type, setting) -> its range for that type.
LOSS_TYPE_RANGES = {
    ("robust", "label_smoothing"): NumberRange(0, 0.5, high_open=True, why="robust divides by "
                                               "1 - 2 * label_smoothing"),
    ("exo_pair", "label_smoothing"): NumberRange(0, 0.5, low_open=True, why="exo_pair takes log(label_smoothing) "
                                                 "(the EXO paper suggests 1e-3)"),
}


def check_setting(name: str, value, loss_type: Optional[str] = None):
    """``value`` of the numeric setting ``name`` lies in its :data:`NUMERIC_SETTINGS` range (and, with
    ``loss_type``, in that type's :data:`LOSS_TYPE_RANGES` one): TypeError for a non-number, else ValueError."""
    _number(name, value)
    valid = LOSS_TYPE_RANGES.get((loss_type, name), NUMERIC_SETTINGS[name])
    if not valid.contains(value):
        which = f" for loss_type {loss_type!r}" if loss_type is not None else ""
        raise ValueError(f"{name} must be {valid.describe()}{which}, got {value!r}: {valid.why}")


def check_ignore_index(ignore_index, labels_dtype=torch.int64):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if labels_dtype.is_floating_point or labels_dtype.is_complex or labels_dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels_dtype}")
    info = torch.iinfo(labels_dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(f"ignore_index={ignore_index} does not fit labels' dtype {labels_dtype}")


def _same_device(**tensors):
    # Non-tensors are left to the type checks that name them.
    named = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: "
                             f"all tensors must be on one device")


def check_transform(temperature, logit_scale, softcap):
    check_setting("temperature", temperature)
    check_setting("logit_scale", logit_scale)
    if softcap is not None:
        check_setting("softcap", softcap)


def check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_impl_dtype(impl: str, dtype: torch.dtype, name: str = "hidden"):
    """float64 inputs mean float64 math: only the PyTorch rows (impl='torch', which 'auto' picks for float64)
    compute in it; the Triton kernels compute in float32 and would hand float32 back."""
    if dtype == torch.float64 and impl in ("chunked", "fused"):
        raise TypeError(f"{name} is float64, but impl={impl!r} computes in float32 (Triton kernels) and would return "
                        f"float32: use impl='torch' or 'auto' (both compute float64 inputs in float64), or "
                        f"dpo_fast.reference (materialized logits, float64)")


def labels_out_of_range(labels, vocab_size, ignore_index) -> torch.Tensor:
    """Device count of labels outside [0, vocab_size) and not ignore_index (read with the layout's lengths)."""
    return (((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)).sum()


def check_labels_range(labels, vocab_size, ignore_index, bad_count: Optional[int] = None):
    """``bad_count``: :func:`labels_out_of_range` already read on the host (no second sync when 0)."""
    if labels.numel() == 0 or bad_count == 0:
        return
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(bad.any()):
        value = labels[bad].reshape(-1)[0].item()
        raise ValueError(f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
                         f"found {value}")


def check_hidden_inputs(hidden, weight, labels, bias=None, sequence_ids=None, cu_seqlens=None):
    """hidden [R, T, H] with labels [R, T], or hidden [N, H] with labels [N]; weight [V, H].

    Metadata only (shapes, dtypes, devices), no read of tensor values: what a torch.compile
    trace can check too (``ops.py``). The values (label range, packing) are checked by
    :func:`value_checks`, on the layout's one host read.
    """
    _float_tensor("hidden", hidden)
    _float_tensor("weight", weight)
    _token_ids("labels", labels)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [rows, seq, hidden] or [tokens, hidden], got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dim ({hidden.shape[-1]}) must equal weight.shape[1] ({weight.shape[1]})")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
                         f"got {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if bias is not None:
        _float_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) must have weight's dtype ({weight.dtype})")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if weight.shape[1] == 0:
        raise ValueError("weight must have a non-empty hidden dimension (weight.shape[1] > 0)")
    _same_device(hidden=hidden, weight=weight, labels=labels, bias=bias, sequence_ids=sequence_ids,
                 cu_seqlens=cu_seqlens)
    _holds_data("hidden", hidden)
    check_packing(labels, sequence_ids, cu_seqlens)


def check_packing(labels, sequence_ids, cu_seqlens):
    """Kinds and shapes of the packing arguments; their values: :func:`value_checks`."""
    if sequence_ids is not None and cu_seqlens is not None:
        raise ValueError("pass sequence_ids or cu_seqlens, not both")
    if labels.dim() == 2 and (sequence_ids is not None or cu_seqlens is not None):
        raise ValueError("sequence_ids/cu_seqlens are for packed 1-D labels; labels [rows, seq] already "
                         "give one sequence per row")
    if sequence_ids is not None:
        _int_labels("sequence_ids", sequence_ids)
        if tuple(sequence_ids.shape) != tuple(labels.shape):
            raise ValueError(f"sequence_ids must have labels' shape {tuple(labels.shape)}, "
                             f"got {tuple(sequence_ids.shape)}")
    if cu_seqlens is not None:
        _int_labels("cu_seqlens", cu_seqlens)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")


# ----------------------------------------------------------------------------------------
# value checks: device scalars read with the layout's lengths
# ----------------------------------------------------------------------------------------

class DeferredChecks:
    """Checks of tensor values that make no host read of their own.

    Each check puts device scalars in :attr:`flags` and registers the function that judges
    their host values. ``layout.build_layout`` carries the flags in its one host read (with
    the sequence lengths) and calls this object with their values right after that read,
    before anything is sized by it and before any kernel or GEMM runs: a bad input raises
    there, with the message of the check.
    """

    def __init__(self):
        self.flags = []
        self._judges = []  # (how many flags, judge(*values))

    def add(self, scalars, judge):
        self.flags.extend(s.reshape(()).to(torch.int64) for s in scalars)
        self._judges.append((len(scalars), judge))

    def __call__(self, values):
        values = list(values)
        if len(values) != len(self.flags):
            raise AssertionError(f"{len(self.flags)} flags were sent to the host, {len(values)} came back")
        for count, judge in self._judges:
            judge(*values[:count])
            values = values[count:]


def value_checks(labels, sequence_ids=None, cu_seqlens=None, vocab_size=None, ignore_index=-100,
                 num_sequences=None) -> DeferredChecks:
    """The value checks of a call from hidden states, after :func:`check_hidden_inputs`.

    The packing (``cu_seqlens``, ``sequence_ids`` with the caller's ``num_sequences``, see
    :func:`_sequence_id_checks`), then the label range when ``vocab_size`` is known (under a
    process_group the ranks check it together instead).
    """
    checks = DeferredChecks()
    if cu_seqlens is not None:
        _cu_seqlens_checks(checks, labels, cu_seqlens)
    if sequence_ids is not None and sequence_ids.numel():
        _sequence_id_checks(checks, sequence_ids, num_sequences)
    if vocab_size is not None:
        checks.add([labels_out_of_range(labels, vocab_size, ignore_index)],
                   lambda bad: check_labels_range(labels, vocab_size, ignore_index, bad_count=bad))
    return checks


def _cu_seqlens_checks(checks, labels, cu_seqlens):
    n = labels.numel()
    bounds = cu_seqlens.to(torch.int64)

    def judge(first, last, decreasing):
        if first != 0 or last != n:
            raise ValueError(f"cu_seqlens must start at 0 and end at the token count {n}, got {first}..{last}")
        if decreasing:
            raise ValueError("cu_seqlens must be non-decreasing")

    checks.add([bounds[0], bounds[-1], (bounds[1:] < bounds[:-1]).any()], judge)


def _sequence_id_checks(checks, sequence_ids, num_sequences=None):
    """Ids are sequence indices 0..R-1: R is ``num_sequences`` when given, else the largest id + 1.

    Without ``num_sequences`` the ids bound R by the token count N before anything is sized by
    them: a stray id of 2**40 must not allocate 2**40 counters (N tokens fill at most N
    sequences; ``build_layout`` counts into N slots and reads R only once this check has
    passed). An id below R that no token carries is an empty sequence (0 tokens, as a
    zero-length span of cu_seqlens). A sequence after the last id cannot be seen at all:
    hence ``num_sequences``, which a paired loss requires (:func:`check_sequence_count`).
    """
    ids = sequence_ids.reshape(-1).to(torch.int64)
    n = ids.numel()
    bound = n if num_sequences is None else num_sequences
    low, high = torch.aminmax(ids)

    def judge(low, high):
        if low < 0:
            raise ValueError(f"sequence_ids must be >= 0 (sequence indices 0..R-1), found {low}")
        if num_sequences is not None and high >= bound:
            raise ValueError(f"sequence_ids must be sequence indices 0..R-1 with R = num_sequences={num_sequences}; "
                             f"found {high}")
        if high >= bound:
            raise ValueError(f"sequence_ids must be sequence indices 0..R-1 with R at most the token count ({n}); "
                             f"found {high}. Renumber arbitrary ids with torch.unique(ids, return_inverse=True)[1]")

    checks.add([low, high], judge)


def check_sequence_count(sequence_ids, num_sequences, paired: bool):
    """``num_sequences``: the number of packed ``sequence_ids`` sequences, stated by the caller.

    Ids cannot show a sequence after the last id that no token carries (a rejected answer
    truncated away entirely): counted from the ids, such trailing sequences vanish. For a
    paired loss that shifts every pair (sequence k is paired with k + R/2), so a paired loss
    with ``sequence_ids`` requires the count; elsewhere it is optional (without it, R is the
    largest id + 1). Rows and ``cu_seqlens`` state their count themselves.
    """
    if num_sequences is None:
        if paired and sequence_ids is not None:
            raise ValueError("a paired loss with sequence_ids needs num_sequences=R, the number of packed "
                             "sequences [chosen_1..chosen_B, rejected_1..rejected_B]: sequence_ids cannot show "
                             "trailing sequences that no token carries, and sequence k is paired with k + R/2")
        return
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int):
        raise TypeError(f"num_sequences must be an int, got {num_sequences!r}")
    if sequence_ids is None:
        raise ValueError("num_sequences is for packed sequence_ids; labels [rows, seq] and cu_seqlens state the "
                         "number of sequences themselves")
    if num_sequences < 0:
        raise ValueError(f"num_sequences must be >= 0, got {num_sequences}")


def check_logits_inputs(logits, labels):
    _float_tensor("logits", logits)
    _token_ids("labels", labels)
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension [..., V]")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} (logits without the vocab dim), "
                         f"got {tuple(labels.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    _same_device(logits=logits, labels=labels)
    _holds_data("logits", logits)


def normalize_loss_types(loss_type, loss_weights):
    """``loss_type`` str or list; ``loss_weights`` None or a list of the same length."""
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type) if isinstance(loss_type, (list, tuple)) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"loss_type must be a name or a non-empty list of names, got {loss_type!r}")
    for name in names:
        if name not in LOSSES:
            raise ValueError(f"unknown loss_type {name!r}; expected one of {sorted(LOSSES)}")
    if loss_weights is None:
        weights = [1.0] * len(names)
    else:
        if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(names):
            raise ValueError(f"loss_weights must be a list with one weight per loss_type ({len(names)}), "
                             f"got {loss_weights!r}")
        for w in loss_weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise TypeError(f"loss_weights must hold numbers, got {loss_weights!r}")
            if not NUMERIC_SETTINGS["loss_weights"].contains(w):
                raise ValueError(f"loss_weights must be finite and >= 0 ({NUMERIC_SETTINGS['loss_weights'].why}), "
                                 f"got {loss_weights!r}")
        weights = [float(w) for w in loss_weights]
    return names, weights


def check_loss_settings(loss_types: Sequence[str], beta, label_smoothing, has_reference: bool, discopop_tau=0.05,
                        gamma=0.5, cpo_alpha=1.0):
    """Every numeric loss setting against :data:`NUMERIC_SETTINGS`, whatever the loss types (a setting a type
    does not read is still checked, so a bad value fails now, not when the loss type changes), then the
    narrower ranges of :data:`LOSS_TYPE_RANGES` for the types given."""
    settings = dict(beta=beta, label_smoothing=label_smoothing, gamma=gamma, discopop_tau=discopop_tau,
                    cpo_alpha=cpo_alpha)
    for name, value in settings.items():
        check_setting(name, value)
    for loss_type, name in LOSS_TYPE_RANGES:
        if loss_type in loss_types:
            check_setting(name, settings[name], loss_type)
    if not has_reference:
        needing = [n for n in loss_types if LOSSES[n].needs_reference]
        if needing:
            raise ValueError(f"loss_type {needing} needs ref_chosen_logps and ref_rejected_logps "
                             f"(log-probs of the reference model)")


def check_pairs(num_sequences: int, ref_chosen_logps, ref_rejected_logps, device):
    if num_sequences == 0 or num_sequences % 2:
        raise ValueError(f"labels must hold an even, non-zero number of sequences (rows, or packed sequences "
                         f"of sequence_ids/cu_seqlens) for a paired loss: [chosen_1..chosen_B, "
                         f"rejected_1..rejected_B]; got {num_sequences}")
    pairs = num_sequences // 2
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if ref is None:
            continue
        _float_tensor(name, ref)
        if tuple(ref.shape) != (pairs,):
            raise ValueError(f"{name} must have shape ({pairs},) (one per pair), got {tuple(ref.shape)}")
        if ref.device != device:
            raise ValueError(f"{name} is on {ref.device} but hidden is on {device}")


def check_finite(**tensors):
    for name, t in tensors.items():
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")


def check_filter_eps(filter_eps, impl: str):
    """Gradient filtering (approximate) exists only in the fused kernels."""
    check_setting("filter_eps", filter_eps)
    if filter_eps > 0 and impl != "fused":
        raise ValueError(f"filter_eps applies to impl='fused' only (got impl={impl!r}); leave it 0 elsewhere")


def check_memory_budget(memory_budget: Optional[int]):
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)):
        raise TypeError(f"memory_budget must be None or an int number of bytes, got {memory_budget!r}")
    if memory_budget is not None and memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
