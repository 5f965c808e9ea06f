"""Seeded random sweeps: every impl against the float64 reference over random problems.

Each case draws, from its own seed (so a failure is replayed by its test id): pairs and
sequence lengths, hidden and vocabulary sizes (including V=1 and sizes that are not
multiples of any block), dtype (float32 or bfloat16), prompt masks, ragged ends and empty
rows, a bias, the logit transform (scale, softcap, temperature), one or two loss types with
weights and the settings they need, reference log-probs, the layout (rows, cu_seqlens, or
shuffled sequence_ids), and a memory budget that forces many small tiles and the two-pass
route. float32 must match to 1e-5; bfloat16 must be no worse than the naive bfloat16 path
(logits in bfloat16, log-softmax in float32) plus a small margin. The case counts keep the
whole sweep near a minute on two CPU cores under the Triton interpreter.
"""

import importlib.util
import random
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

import dpo_fast
from dpo_fast import reference
from dpo_fast.losses import LOSSES
from dpo_fast.objective import LossConfig
from dpo_fast.transform import LogitTransform

HAS_FUSED = importlib.util.find_spec("dpo_fast.fused") is not None
CASES = {"torch": 120, "chunked": 80, **({"fused": 80} if HAS_FUSED else {})}
LOGITS_CASES = {"torch": 40, "chunked": 30}


def _err(got, want, floor=1e-6) -> float:
    """max |got - want| over max(max |want|, floor), in float64; NaN/Inf must match exactly."""
    got, want = got.detach().double(), want.detach().double()
    if got.numel() == 0:
        return 0.0
    same_nonfinite = torch.equal(torch.isfinite(got), torch.isfinite(want)) and torch.equal(
        got[~torch.isfinite(got)], want[~torch.isfinite(want)])
    if not same_nonfinite:
        return float("inf")
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    scale = want[finite].abs().max().clamp(min=floor)
    return float((got[finite] - want[finite]).abs().max() / scale)


@dataclass
class Case:
    seed: int
    dtype: torch.dtype
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: torch.Tensor
    pack: dict
    transform: LogitTransform
    cfg: LossConfig
    refs: tuple
    memory_budget: Optional[int]
    description: dict = field(default_factory=dict)


def draw_case(seed: int, device) -> Case:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pairs = rng.randint(1, 3)
    rows = 2 * pairs
    lengths = [rng.randint(1, 8) for _ in range(rows)]
    hidden_size = rng.choice([8, 16, 24, 40])
    vocab = rng.choice([1, 2, 7, 64, 129, 300])
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    layout = rng.choice(["rows", "rows", "cu_seqlens", "sequence_ids"])
    with_bias = rng.random() < 0.5
    transform = LogitTransform(scale=rng.choice([1.0, 0.5, 2.0]), softcap=rng.choice([None, None, 4.0, 30.0]),
                               temperature=rng.choice([1.0, 0.7, 1.6]))
    loss_types = rng.sample(sorted(LOSSES), rng.choice([1, 1, 2]))
    needs_ref = any(LOSSES[n].needs_reference for n in loss_types)
    with_refs = needs_ref or rng.random() < 0.5
    smoothing = 0.1 if {"exo_pair", "robust"} & set(loss_types) else rng.choice([0.0, 0.0, 0.2])
    cfg = LossConfig(loss_types, [rng.choice([1.0, 0.5, 2.0]) for _ in loss_types], beta=rng.choice([0.1, 0.5, 2.0]),
                     label_smoothing=smoothing, gamma=rng.choice([0.0, 0.5]), cpo_alpha=rng.choice([1.0, 0.3]))

    # Token labels per sequence: a prompt of ignored tokens, sometimes a whole ignored sequence.
    per_sequence = []
    for length in lengths:
        ids = torch.randint(0, vocab, (length,))
        ids[: rng.randint(0, length - 1)] = -100
        if rng.random() < 0.1:
            ids[:] = -100
        per_sequence.append(ids)
    h_scale = rng.choice([0.5, 1.0, 4.0])
    if layout == "rows":
        seq = max(lengths) + rng.randint(0, 2)  # padding at the end of every row
        labels = torch.full((rows, seq), -100, dtype=torch.long)
        for r, ids in enumerate(per_sequence):
            labels[r, : len(ids)] = ids
        hidden = torch.randn(rows, seq, hidden_size) * h_scale
        pack = {}
    else:
        labels = torch.cat(per_sequence)
        hidden = torch.randn(labels.numel(), hidden_size) * h_scale
        if layout == "cu_seqlens":
            pack = dict(cu_seqlens=torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist()))
        else:  # tokens of the sequences interleaved in a random order
            ids = torch.repeat_interleave(torch.arange(rows), torch.tensor(lengths))
            order = torch.randperm(ids.numel())
            labels, hidden, pack = labels[order], hidden[order], dict(sequence_ids=ids[order], num_sequences=rows)
    weight = torch.randn(vocab, hidden_size) / hidden_size ** 0.5
    bias = torch.randn(vocab) * 0.5 if with_bias else None
    refs = (torch.randn(pairs) * 3 - 20, torch.randn(pairs) * 3 - 20) if with_refs else (None, None)
    # None: default budget (one tile, whole pairs); otherwise tiles of a few tokens by a few dozen rows.
    memory_budget = rng.choice([None, None, 2000, 6000])

    def put(t, cast=True):
        if t is None:
            return None
        t = t.to(device)
        return t.to(dtype).requires_grad_() if cast else t

    return Case(seed, dtype, put(hidden), put(weight), put(bias), labels.to(device),
                {k: v.to(device) if torch.is_tensor(v) else v for k, v in pack.items()}, transform, cfg,
                tuple(None if r is None else r.to(device) for r in refs), memory_budget,
                dict(layout=layout, vocab=vocab, dtype=str(dtype), loss=loss_types, budget=memory_budget))


def _grads(loss, tensors):
    present = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, present, allow_unused=True)


def _dpo(case, fn, **kwargs):
    return fn(case.hidden, case.weight, case.labels, bias=case.bias, ref_chosen_logps=case.refs[0],
              ref_rejected_logps=case.refs[1], **kwargs)


def _reference(case, hidden, weight, bias, dtype):
    return reference.dpo_loss(hidden, weight, case.labels, bias=bias, transform=case.transform,
                              ref_chosen_logps=None if case.refs[0] is None else case.refs[0].double(),
                              ref_rejected_logps=None if case.refs[1] is None else case.refs[1].double(),
                              cfg=case.cfg, dtype=dtype, **case.pack)


@pytest.mark.parametrize("impl,seed", [(impl, seed) for impl, count in CASES.items() for seed in range(count)])
def test_fuzz_hidden_paths(impl, seed, device):
    case = draw_case(seed, device)
    cfg, t = case.cfg, case.transform
    out = dpo_fast.dpo_loss(
        case.hidden, case.weight, case.labels, bias=case.bias, ref_chosen_logps=case.refs[0],
        ref_rejected_logps=case.refs[1], loss_type=cfg.loss_types, loss_weights=cfg.loss_weights, beta=cfg.beta,
        label_smoothing=cfg.label_smoothing, gamma=cfg.gamma, cpo_alpha=cfg.cpo_alpha, temperature=t.temperature,
        logit_scale=t.scale, softcap=t.softcap, impl=impl, memory_budget=case.memory_budget, **case.pack)
    inputs = (case.hidden, case.weight, case.bias)
    as64 = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    oracle = _reference(case, *as64, dtype=torch.float64)
    ours_grads, oracle_grads = _grads(out.loss, inputs), _grads(oracle.loss, as64)
    pairs = [("loss", out.loss, oracle.loss), ("chosen_logps", out.chosen_logps, oracle.chosen_logps),
             ("rejected_logps", out.rejected_logps, oracle.rejected_logps)]
    pairs += [(f"grad_{n}", g, w) for n, g, w in zip(("hidden", "weight", "bias"), ours_grads, oracle_grads)]
    if case.dtype == torch.float32:
        for name, got, want in pairs:
            assert _err(got, want) < 1e-5, (name, case.description)
        return
    naive = _reference(case, *inputs, dtype=None)  # what a trainer computes in bfloat16 today
    naive_grads = _grads(naive.loss, inputs)
    baseline = [naive.loss, naive.chosen_logps, naive.rejected_logps, *naive_grads]
    for (name, got, want), base in zip(pairs, baseline):
        assert got.dtype == base.dtype
        margin = 2e-3 if "logps" in name or name == "loss" else 1e-2
        assert _err(got, want) <= _err(base, want) + margin, (name, case.description)


@pytest.mark.parametrize("impl,seed", [(impl, seed) for impl, count in LOGITS_CASES.items() for seed in range(count)])
def test_fuzz_logits_path(impl, seed, device):
    _logits_case(impl, draw_rows_case(1000 + seed, device))


def draw_rows_case(seed, device):
    """The first case from ``seed`` on whose layout is rows: the logits functions take [rows, seq] batches."""
    while True:
        case = draw_case(seed, device)
        if not case.pack:
            return case
        seed += 7919


def _logits_case(impl, case):
    cfg, t = case.cfg, case.transform
    with torch.no_grad():
        raw = torch.nn.functional.linear(case.hidden.float(), case.weight.float(),
                                         None if case.bias is None else case.bias.float())
    logits = raw.to(case.dtype).requires_grad_()
    out = dpo_fast.dpo_loss_from_logits(logits, case.labels, ref_chosen_logps=case.refs[0],
                                        ref_rejected_logps=case.refs[1], loss_type=cfg.loss_types,
                                        loss_weights=cfg.loss_weights, beta=cfg.beta,
                                        label_smoothing=cfg.label_smoothing, gamma=cfg.gamma, cpo_alpha=cfg.cpo_alpha,
                                        temperature=t.temperature, impl=impl)
    logits64 = logits.detach().double().requires_grad_()
    oracle = reference.dpo_loss_from_logits(
        logits64, case.labels, transform=LogitTransform(temperature=t.temperature), cfg=cfg,
        ref_chosen_logps=None if case.refs[0] is None else case.refs[0].double(),
        ref_rejected_logps=None if case.refs[1] is None else case.refs[1].double())
    (grad,), (want,) = _grads(out.loss, (logits,)), _grads(oracle.loss, (logits64,))
    # The logits are given exactly: only float32 statistics stand between us and float64.
    tol = 1e-5 if case.dtype == torch.float32 else 1e-2  # a bfloat16 gradient is rounded to 8 bits
    for name, got, exp in [("loss", out.loss, oracle.loss), ("chosen", out.chosen_logps, oracle.chosen_logps),
                           ("rejected", out.rejected_logps, oracle.rejected_logps)]:
        assert _err(got, exp) < 1e-5, (name, case.description)
    assert _err(grad, want) < tol, case.description


def test_sweep_covers_the_space(device):
    """The seeds above do reach every layout, both dtypes, tiny and odd vocabularies and both routes."""
    drawn = [draw_case(seed, device).description for seed in range(max(CASES.values()))]
    assert {d["layout"] for d in drawn} == {"rows", "cu_seqlens", "sequence_ids"}
    assert {d["dtype"] for d in drawn} == {"torch.float32", "torch.bfloat16"}
    assert {1, 129, 300} <= {d["vocab"] for d in drawn}
    assert {None, 2000} <= {d["budget"] for d in drawn}
    assert len({n for d in drawn for n in d["loss"]}) >= 12
