"""The planner and cost model: route choices at given budgets, FLOPs counted on real calls, the
whole-pair route's split pairs and reference gradients, autocast, host syncs, budget floor."""

import contextlib
import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import dpo_fast
from dpo_fast import chunked, cost_model as cm, planner, reference
from dpo_fast.losses import LOSSES, PairTerms, rejected_gradient_ratio
import gpu_arith
from helpers import AllocationRecorder, make_batch, rel_err

GB = 10**9
LLAMA = dict(vocab=128256, hidden_size=4096)


def _plan(pair_tokens, budget, dtype=torch.bfloat16, trainable=True, vocab=128256, hidden_size=4096, **kw):
    return planner.plan_loss(pair_tokens, vocab, hidden_size, dtype, trainable, budget, "cuda", **kw)


def _floor(n, hidden, vocab):
    return 6.0 * n * hidden * vocab


# ----------------------------------------------------------------------------------------
# route choices on paper
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["sigmoid", "orpo"])
def test_llama_1x8192_takes_6nhv_within_a_tenth_of_an_80gb_card(loss):
    """Issue 11 item 3: one pair of 2 x 8192 tokens, bf16 trainable head, the default 8 GB budget. Issue 19
    item 2: sigmoid DPO there within 1.13x of the floor on an H100 (the pair's gradient kept whole: no float32
    [V, H] at all, grad_weight written by one GEMM), in a quarter of naive's memory."""
    scales = [rejected_gradient_ratio([loss], [1.0], 8192, 8192)]
    plan = _plan([16384], 8 * GB, rejected_scales=scales)
    shape = cm.Shape(16384, 4096, 128256, 2)
    assert plan.route == "whole-pairs" and plan.chunks[0].split
    assert plan.cost.flops == pytest.approx(shape.floor_flops())
    assert plan.cost.memory_bytes <= 8 * GB
    if loss == "sigmoid":
        assert plan.chunks[0].keep_gradient and "fp32 [V,H]" not in plan.cost.route
        assert plan.cost.memory_bytes <= cm.naive(shape).memory_bytes / 4
        assert plan.cost.bound(shape) <= 1.13
    assert plan.cost.bound(shape) <= 1.15


def test_small_budget_takes_two_pass_and_large_budget_one_chunk():
    small = _plan([2048] * 4, 512 * 2**20)  # cannot hold one float32 [V, H] accumulator (2.1 GB)
    assert small.route == "two-pass" and small.cost.flops == pytest.approx(_floor(8192, 4096, 128256) * 4 / 3)
    large = _plan([2048] * 4, 40 * GB)
    assert large.route == "whole-pairs" and len(large.chunks) == 1 and not large.accumulate
    assert large.cost.seconds() < small.cost.seconds()


@pytest.mark.parametrize("budget", [2**20, 256 * 2**20, 3 * GB, 5 * GB, 8 * GB, 16 * GB, 64 * GB])
@pytest.mark.parametrize("pair_tokens", [[2048] * 4, [16384], [300, 5000, 40, 9000]])
def test_whole_pair_plans_stay_in_budget_and_cover_every_pair(budget, pair_tokens):
    plan = _plan(pair_tokens, budget)
    if plan.route == "whole-pairs":
        assert plan.cost.memory_bytes <= budget
        covered = [p for c in plan.chunks for p in range(c.first, c.last)]
        assert covered == list(range(len(pair_tokens)))
        assert all(c.last == c.first + 1 for c in plan.chunks if c.split)
        assert plan.cost.flops == pytest.approx(_floor(sum(pair_tokens), 4096, 128256))


def test_float32_weight_buffers_by_head_dtype():
    """float32 [V, H] buffers the route holds, as its label and memory give them: several chunks of a 16-bit head
    sum in one (a float32 head sums into grad_weight itself; a frozen head has none; one chunk writes it with one
    GEMM); a split pair adds two unit sums, one for a single-margin loss, none when its gradient is kept."""
    def route(e=2, trainable=True, chunks=4, split=0, **kw):
        shape = cm.Shape(8192, 4096, 128256, e, trainable)
        return cm.whole_pairs(shape, 8192 // chunks if not split else 1024, chunks, split, 4096 if split else 0, **kw)

    def buffers(cost):
        label = cost.route.split(", ")[-1]
        return int(label.split()[0]) if label.endswith("fp32 [V,H]") else 0

    assert buffers(route()) == 1 and buffers(route(e=4)) == 0 and buffers(route(trainable=False)) == 0
    assert buffers(route(chunks=1)) == 0
    assert buffers(route(split=1)) == 2 and buffers(route(split=1, merged=True)) == 1
    # memory: each unit sum is 4 V H bytes
    vh = 4096 * 128256
    assert route(split=1).memory_bytes - route(split=1, merged=True).memory_bytes == pytest.approx(4 * vh)


def _split_cost(pair_tokens, limit, scales, keep, budget_shape=LLAMA):
    """The planner's price of ``pair_tokens`` cut at ``limit`` (split pairs of the given kind), bf16, on paper."""
    shape = cm.Shape(sum(pair_tokens), budget_shape["hidden_size"], budget_shape["vocab"], 2)
    chunks = planner._group_pairs(pair_tokens, limit, scales, keep)
    sides = [(t - t // 2, t // 2) for t in pair_tokens]
    return planner._whole_pair_cost(shape, sides, chunks, False, cm.DEFAULT_CARD)


def test_single_margin_split_pair_priced_with_one_buffer():
    """Llama-3-8B 1 x 8192, bf16: the split pair of sigmoid DPO holds one float32 [V, H] sum, not two (2.1 GB
    less), merges by reading one, and so fits TRL 1.16's memory at 6NHV, faster than TRL there."""
    shape = cm.Shape(16384, 4096, 128256, 2)
    sigmoid = [rejected_gradient_ratio(["sigmoid"], [1.0], 8192, 8192)]
    assert sigmoid == [-1.0]
    limit = _plan([16384], 8 * GB, rejected_scales=sigmoid).chunks[0].piece_tokens
    two = planner.Plan("whole-pairs", _split_cost([16384], limit, None, False))
    one = planner.Plan("whole-pairs", _split_cost([16384], limit, sigmoid, False))
    assert two.cost.memory_bytes - one.cost.memory_bytes == pytest.approx(4 * shape.vh, rel=1e-6)
    # The merge reads one float32 [V, H] fewer; the rejected side's first GEMM accumulates instead (reads it
    # inside a compute-bound GEMM): the same bytes, one memory-bound pass less.
    assert two.cost.hbm_bytes == pytest.approx(one.cost.hbm_bytes, rel=1e-9)
    assert two.cost.gemm_s == pytest.approx(one.cost.gemm_s, rel=1e-9)
    assert two.cost.seconds() - one.cost.seconds() == pytest.approx(4 * shape.vh / 3.35e12, rel=1e-6)
    assert "1 fp32 [V,H]" in one.cost.route and "2 fp32 [V,H]" in two.cost.route
    trl = cm.trl_chunked(shape)
    at_trl = _plan([16384], int(trl.memory_bytes), rejected_scales=sigmoid)
    assert at_trl.route == "whole-pairs" and at_trl.cost.memory_bytes <= trl.memory_bytes
    assert at_trl.cost.bound(shape) < trl.bound(shape)
    assert _plan([16384], int(trl.memory_bytes)).route == "two-pass"  # two buffers do not fit there


@pytest.mark.parametrize("scales", [[-1.0], None], ids=["one scale", "two scales"])
def test_kept_gradient_priced_against_unit_buffers(scales):
    """Llama-3-8B 1 x 8192, bf16, the same pieces: keeping the pair's gradient ([N, V] bf16, 4.2 GB) instead of
    float32 [V, H] units moves no float32 [V, H] per piece, merges nothing and, with one scale, writes
    grad_weight in bf16 with its one GEMM (no cast); it costs memory where the pair is longer than 2H."""
    shape = cm.Shape(16384, 4096, 128256, 2)
    units, kept = (_split_cost([16384], 2048, scales, keep) for keep in (False, True))
    assert kept.flops == units.flops == pytest.approx(shape.floor_flops())
    assert kept.seconds() < units.seconds() and kept.hbm_bytes < units.hbm_bytes
    assert kept.host_s == cm.HOST_READ_SECONDS and units.host_s == 0
    assert kept.memory_bytes > units.memory_bytes
    if scales:  # one GEMM in bf16: no float32 [V, H] sum, cast or merge (6 bytes per element less than the merge)
        assert "fp32" not in kept.route
        assert units.row_bytes - kept.row_bytes > 6 * shape.vh
    else:  # two scales: the float32 sum, cast once
        assert "1 fp32 [V,H]" in kept.route


def test_kept_gradient_beats_trl_at_its_memory_with_several_pairs():
    """Llama-3-8B 4 x 1024 at TRL 1.16's loss memory: each pair's gradient kept (0.5 GB) beside one float32
    [V, H] sum is 6NHV where unit buffers (two [V, H]) do not fit and two-pass only tied TRL."""
    shape = cm.Shape(8192, 4096, 128256, 2)
    trl = cm.trl_chunked(shape)
    plan = _plan([2048] * 4, int(trl.memory_bytes), rejected_scales=[-1.0] * 4)
    assert plan.route == "whole-pairs" and all(c.keep_gradient for c in plan.chunks)
    assert plan.cost.memory_bytes <= trl.memory_bytes and plan.cost.bound(shape) < 0.8 * trl.bound(shape)


@pytest.mark.parametrize("model,hidden,vocab,scale,most", [("llama3-8b", 4096, 128256, -1.0, 1.15),
                                                              ("gemma2-2b", 2304, 256000, -1.0, 1.47)])
def test_grouped_rows_at_trl_memory(model, hidden, vocab, scale, most):
    """1 x 8192 at TRL 1.16's loss memory: short logits pieces (the float32 [V, H] unit sum takes most of it) with
    their bf16 gradient rows grouped, so the unit accumulate's inner dimension is a group, not a piece:
    compute-bound where ungrouped pieces made it memory-bound (Gemma-2-2B: ungrouped 1.70x, two-pass 1.57x
    tied TRL)."""
    shape = cm.Shape(16384, hidden, vocab, 2)
    trl = cm.trl_chunked(shape)
    plan = _plan([16384], int(trl.memory_bytes), vocab=vocab, hidden_size=hidden, rejected_scales=[scale])
    (chunk,) = plan.chunks
    assert chunk.group_tokens > chunk.piece_tokens and plan.cost.memory_bytes <= trl.memory_bytes
    assert plan.cost.bound(shape) <= most < trl.bound(shape)
    ungrouped = _split_cost([16384], chunk.piece_tokens, [scale], False,
                            budget_shape=dict(hidden_size=hidden, vocab=vocab))
    assert plan.cost.seconds() < ungrouped.seconds()


def test_host_reads_keep_tiny_shapes_off_the_kept_route(monkeypatch):
    """A kept pair reads its scales to the host once: priced at cost_model.HOST_READ_SECONDS, which the kept
    route saves only at real sizes. Tiny pairs keep the route without reads, unless the read is free."""
    args = ([500], 1024, 256, torch.bfloat16, True, 2 << 20, "cuda")
    plan = planner.plan_loss(*args, sides=[(250, 250)], rejected_scales=[-1.0])
    assert plan.route == "whole-pairs" and not any(c.keep_gradient for c in plan.chunks)
    monkeypatch.setattr(cm, "HOST_READ_SECONDS", 0.0)
    plan = planner.plan_loss(*args, sides=[(250, 250)], rejected_scales=[-1.0])
    assert plan.chunks[0].keep_gradient


def test_not_pair_local_takes_two_pass():
    assert _plan([2048] * 4, 64 * GB, whole_pairs=False).route == "two-pass"


def test_fused_costs():
    shape = cm.Shape(16384, 4096, 128256, 2)
    full = cm.fully_fused(shape)
    # float32 rows of grad_hidden and grad_weight read and written per 128-wide tile: N V H / 128 * 16 bytes.
    assert full.hbm_bytes == pytest.approx(shape.nv * 4096 / 128 * 16 + 3 * (shape.nh + shape.vh) * 2)
    assert full.bound(shape) > 3
    tiled = cm.fused_forward_tiled_backward(shape, 4096, 32768)
    assert tiled.flops == pytest.approx(shape.floor_flops() * 4 / 3)
    assert tiled.seconds() < cm.two_pass(shape, 4096, 32768).seconds()


def test_budget_floor_never_plans_one_by_one_tiles():
    plan = planner.plan_tiles(1000, 50000, 64, 6, 1, weight_grad=True)
    assert plan.token_chunk >= planner.MIN_TILE_TOKENS and plan.vocab_block >= planner.MIN_VOCAB_BLOCK
    small = planner.plan_tiles(5, 40, 64, 6, 1, weight_grad=True)  # dimensions below the floor: whole
    assert (small.token_chunk, small.vocab_block) == (5, 40)


def test_budget_of_one_byte_runs_floor_tiles(device, monkeypatch):
    h, w, _, labels = make_batch(2, 12, 16, 300, device=device)
    sizes = []
    workspace = chunked.Workspace.__init__
    monkeypatch.setattr(chunked.Workspace, "__init__",
                        lambda self, numel, *a, **k: sizes.append(numel) or workspace(self, numel, *a, **k))
    out = dpo_fast.dpo_loss(h, w, labels, impl="torch", memory_budget=1)
    grads = _grads(out.loss, (h, w))
    h64, w64 = _as64(h, w)
    oracle = reference.dpo_loss(h64, w64, labels)
    assert sizes and min(sizes) >= min(planner.MIN_TILE_TOKENS, int((labels != -100).sum())) * planner.MIN_VOCAB_BLOCK
    assert all(rel_err(g, x) < 1e-5 for g, x in zip(grads, _grads(oracle.loss, (h64, w64))))


# ----------------------------------------------------------------------------------------
# real calls
# ----------------------------------------------------------------------------------------

def _pair_tokens(labels):
    lengths = (labels != -100).sum(1).tolist()
    pairs = len(lengths) // 2
    return [lengths[p] + lengths[p + pairs] for p in range(pairs)]


def _as64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def test_bf16_head_with_logits_twice_the_budget_costs_6nhv(device):
    """Issue 11 item 1: several whole-pair chunks of a trainable bf16 head, counted with FlopCounterMode."""
    pairs, seq, hidden, vocab = 6, 16, 16, 512
    h, w, _, labels = make_batch(pairs, seq, hidden, vocab, dtype=torch.bfloat16, device=device)
    labels = torch.randint(0, vocab, labels.shape, device=device)
    labels[:, :2] = -100  # equal lengths: the chunking below does not depend on the draw
    n = int((labels != -100).sum())
    tokens = _pair_tokens(labels)
    one_chunk = planner.plan_loss(tokens, vocab, hidden, torch.bfloat16, True, 2**40, device.type)
    assert len(one_chunk.chunks) == 1
    budget = int(one_chunk.cost.memory_bytes) // 2  # the batch's logits workspace: twice the budget
    plan = planner.plan_loss(tokens, vocab, hidden, torch.bfloat16, True, budget, device.type)
    assert plan.route == "whole-pairs" and len(plan.chunks) >= 2 and plan.accumulate
    counter = FlopCounterMode(display=False)
    with counter:
        out = dpo_fast.dpo_loss(h, w, labels, impl="torch", memory_budget=budget)
        grads = _grads(out.loss, (h, w))
    assert counter.get_total_flops() <= 1.06 * _floor(n, hidden, vocab)
    naive = reference.dpo_loss(h, w, labels, dtype=None)
    h64, w64 = _as64(h, w)
    oracle = reference.dpo_loss(h64, w64, labels)
    for got, base, want in zip(grads, _grads(naive.loss, (h, w)), _grads(oracle.loss, (h64, w64))):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) <= rel_err(base, want) + 2e-3
    assert rel_err(out.chosen_logps, oracle.chosen_logps) <= rel_err(naive.chosen_logps, oracle.chosen_logps) + 1e-4


def _force_chunks(monkeypatch, chunks):
    """Make the planner answer with these whole-pair chunks (the executor is what is under test); split ones
    carry the loss's ``rejected_scales`` as the planner's would. Returns the plans handed out."""
    original = planner.plan_loss
    plans = []

    def plan_loss(*args, **kwargs):
        plan = original(*args, **kwargs)
        scales = kwargs.get("rejected_scales")
        forced = tuple(dataclasses.replace(c, rejected_scale=scales[c.first]) if c.split and scales else c
                       for c in chunks)
        plans.append(planner.Plan("whole-pairs", plan.cost, forced, accumulate=True))
        return plans[-1]

    monkeypatch.setattr(planner, "plan_loss", plan_loss)
    return plans


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [(planner.Chunk(0, 1, 7), planner.Chunk(1, 2, 5)),
                                    (planner.Chunk(0, 1), planner.Chunk(1, 2, 16))], ids=["split-split", "whole-split"])
def test_split_pairs_match_the_oracle(impl, dtype, chunks, device, monkeypatch):
    """Pairs longer than a chunk run in pieces; their gradients are scaled when the pair closes."""
    h, w, b, labels = make_batch(2, 24, 16, 96, dtype=dtype, device=device, bias=True)
    _force_chunks(monkeypatch, chunks)
    budget = None
    ref_c = (torch.randn(2, device=device) - 40).requires_grad_()
    ref_r = (torch.randn(2, device=device) - 40).requires_grad_()
    out = dpo_fast.dpo_loss(h, w, labels, bias=b, impl=impl, memory_budget=budget, ref_chosen_logps=ref_c,
                            ref_rejected_logps=ref_r, beta=0.5)
    h64, w64, b64, rc64, rr64 = _as64(h, w, b, ref_c, ref_r)
    oracle = reference.dpo_loss(h64, w64, labels, bias=b64, ref_chosen_logps=rc64, ref_rejected_logps=rr64,
                                cfg=dpo_fast.objective.LossConfig(beta=0.5))
    ours = _grads(out.loss, (h, w, b, ref_c, ref_r))
    want = _grads(oracle.loss, (h64, w64, b64, rc64, rr64))
    if dtype == torch.float32:
        assert rel_err(out.loss, oracle.loss) < 1e-5
        assert all(rel_err(g, x) < 1e-5 for g, x in zip(ours, want))
    else:
        naive = reference.dpo_loss(h, w, labels, bias=b, dtype=None, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                   cfg=dpo_fast.objective.LossConfig(beta=0.5))
        base = _grads(naive.loss, (h, w, b, ref_c, ref_r))
        # Triton's CPU interpreter truncates float32 -> bfloat16 stores (compiled kernels round to nearest),
        # which doubles the rounding error of the gradient tile there.
        slack = 2.0 if impl == "chunked" and device.type == "cpu" else 1.0
        assert all(rel_err(g, x) <= slack * rel_err(n, x) + 2e-3 for g, n, x in zip(ours, base, want))


def _random_terms(pairs, seed):
    g = torch.Generator().manual_seed(seed)
    sums = [(-60 - 20 * torch.rand(pairs, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(2)]
    refs = [s.detach() + torch.randn(pairs, generator=g, dtype=torch.float64) for s in sums]
    lengths = [torch.randint(1, 40, (pairs,), generator=g).double() for _ in range(2)]
    return PairTerms(sums[0], sums[1], refs[0], refs[1], lengths[0], lengths[1], beta=0.3, label_smoothing=0.1,
                     gamma=0.5, discopop_tau=0.05, cpo_alpha=1.0, total_chosen_tokens=float(lengths[0].sum()),
                     num_pairs=pairs), sums, lengths


@pytest.mark.parametrize("seed", [0, 1])
def test_declared_margins_give_the_gradient_ratio(seed):
    """Every loss type that declares a margin has dL/dS_r = k dL/dS_c with k from host lengths alone (what a
    split pair sums its rejected side with); those without one do not (each would be a wrong declaration)."""
    for name, spec in LOSSES.items():
        if not spec.pair_local:
            continue
        terms, (chosen, rejected), (lc, lr) = _random_terms(64, seed)
        g_c, g_r = torch.autograd.grad(spec.formula(terms).sum(), (chosen, rejected), allow_unused=True)
        g_r = torch.zeros_like(g_c) if g_r is None else g_r
        ratios = [rejected_gradient_ratio([name], [1.0], int(a), int(b)) for a, b in zip(lc.tolist(), lr.tolist())]
        if spec.margin is None:
            assert all(k is None for k in ratios), name
            assert not torch.allclose(g_r, g_c * (-lc / lr)) and not torch.allclose(g_r, -g_c), name
        else:
            torch.testing.assert_close(g_r, g_c * torch.tensor(ratios, dtype=torch.float64), rtol=1e-12, atol=1e-300,
                                       msg=name)
    # Mixes: one ratio when every component has it, else none.
    assert rejected_gradient_ratio(["sigmoid", "hinge"], [1.0, 0.5], 10, 30) == -1.0
    assert rejected_gradient_ratio(["ipo", "simpo"], [1.0, 0.5], 10, 30) == pytest.approx(-1 / 3)
    assert rejected_gradient_ratio(["sigmoid", "ipo"], [1.0, 1.0], 10, 30) is None
    assert rejected_gradient_ratio(["sigmoid", "ipo"], [1.0, 1.0], 20, 20) == -1.0
    assert rejected_gradient_ratio(["sigmoid", "orpo"], [1.0, 1.0], 20, 20) is None
    assert rejected_gradient_ratio(["sigmoid", "orpo"], [1.0, 0.0], 20, 20) == -1.0  # a weight of 0 adds nothing
    assert rejected_gradient_ratio(["ipo"], [1.0], 0, 5) == -1 / 5  # lengths clamped at 1, as the formula does


SPLIT_LOSSES = [n for n, spec in LOSSES.items() if spec.pair_local] + [("sigmoid", "hinge"), ("sigmoid", "ipo")]


@pytest.mark.parametrize("impl,seed", [("torch", 0), ("torch", 1), ("torch", 2), ("chunked", 3)])
@pytest.mark.parametrize("loss_type", SPLIT_LOSSES, ids=lambda t: t if isinstance(t, str) else "+".join(t))
def test_split_pairs_of_every_loss_type_match_the_oracle(loss_type, impl, seed, device, monkeypatch):
    """Both pairs split: a single-margin loss (the loss table's ``margin``) sums each pair's rejected side into
    the chosen side's float32 buffer with the ratio of their gradients, every other loss keeps two buffers;
    loss, log-probs and the gradients of hidden, weight, bias and reference log-probs against float64."""
    torch.manual_seed(seed)
    h, w, b, labels = make_batch(2, 24, 16, 96, device=device, bias=True)
    labels[3, 20:] = -100  # a rejected side shorter than its chosen side: ipo's ratio is not -1
    labels[1, :] = torch.randint(0, 96, (24,), device=device)
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(names)
    plans = _force_chunks(monkeypatch, (planner.Chunk(0, 1, 7), planner.Chunk(1, 2, 5)))
    h64, w64, b64 = _as64(h, w, b)
    with torch.no_grad():  # references near the policy's sums: the losses away from saturation
        sums = reference.sequence_logps(h64, w64, labels, bias=b64)
    ref_c = (sums[:2] + torch.randn(2, dtype=torch.float64, device=device)).float().requires_grad_()
    ref_r = (sums[2:] + torch.randn(2, dtype=torch.float64, device=device)).float().requires_grad_()
    rc64, rr64 = _as64(ref_c, ref_r)
    settings = dict(beta=0.3, label_smoothing=0.1)
    out = dpo_fast.dpo_loss(h, w, labels, bias=b, impl=impl, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                            loss_type=names, loss_weights=weights, **settings)
    oracle = reference.dpo_loss(h64, w64, labels, bias=b64, ref_chosen_logps=rc64, ref_rejected_logps=rr64,
                                cfg=dpo_fast.objective.LossConfig(names, weights, **settings))
    lengths = (labels != -100).sum(1).tolist()
    (plan,) = plans
    for chunk in plan.chunks:  # what the executor ran: one buffer where a ratio is set, else two
        assert chunk.rejected_scale == rejected_gradient_ratio(names, weights, lengths[chunk.first],
                                                               lengths[2 + chunk.first])
    merged = [c.rejected_scale is not None for c in plan.chunks]
    if any(LOSSES[n].margin is None for n in names):
        assert not any(merged)
    elif len(names) == 1:
        assert all(merged)
    if names == ["ipo"]:
        assert plan.chunks[1].rejected_scale == pytest.approx(-lengths[1] / lengths[3]) and lengths[1] != lengths[3]
    assert rel_err(out.loss, oracle.loss) < 1e-5
    assert rel_err(out.chosen_logps, oracle.chosen_logps) < 1e-5
    assert rel_err(out.rejected_logps, oracle.rejected_logps) < 1e-5
    ours = _grads_or_zeros(out.loss, (h, w, b, ref_c, ref_r))
    want = _grads_or_zeros(oracle.loss, (h64, w64, b64, rc64, rr64))
    # d loss / d ref is a second derivative of the loss times float32 rounding of the sums (~1e-6 of them
    # here): looser than the hidden and weight gradients, whose size the first derivative sets. discopop's
    # exp(x / tau) (tau 0.05) amplifies that rounding ten times more (5e-5 seen on the one-chunk route too).
    slack = 10 if "discopop" in names else 1
    for name, got, x, tol in zip(("hidden", "weight", "bias", "ref_chosen", "ref_rejected"), ours, want,
                                 (1e-5, 1e-5, 1e-5, 1e-4, 1e-4)):
        assert rel_err(got, x) < slack * tol, (name, rel_err(got, x))


KEPT_LAYOUTS = {
    "one pair": (1, (planner.Chunk(0, 1, 9, keep_gradient=True),)),
    "kept-kept": (2, (planner.Chunk(0, 1, 7, keep_gradient=True), planner.Chunk(1, 2, 5, keep_gradient=True))),
    "whole-kept": (2, (planner.Chunk(0, 1), planner.Chunk(1, 2, 16, keep_gradient=True))),
    # unit sums, gradient rows grouped (Chunk.group_tokens): groups of 2-3 pieces, a ragged last group
    "grouped": (1, (planner.Chunk(0, 1, 4, group_tokens=10),)),
    "grouped-whole": (2, (planner.Chunk(0, 1, 3, group_tokens=7), planner.Chunk(1, 2))),
}


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                        ("chunked", torch.float32), ("chunked", torch.bfloat16)])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "orpo", ("sigmoid", "hinge")],
                         ids=lambda t: t if isinstance(t, str) else "+".join(t))
@pytest.mark.parametrize("layout", list(KEPT_LAYOUTS))
def test_kept_pairs_match_the_oracle(layout, loss_type, impl, dtype, device, monkeypatch):
    """Split pairs whose gradient rows wait whole (``Chunk.keep_gradient``), then their GEMMs scaled by the pair's
    loss: one scale (rejected rows written times the known ratio) or two (orpo); alone in the batch (grad_weight
    written by one GEMM in the head's dtype), beside other kept pairs or whole chunks (the float32 sum). And
    split pairs with unit sums whose rows are grouped (``Chunk.group_tokens``). Loss, log-probs and the gradients
    of hidden, weight, bias and reference log-probs against float64; bf16 no further from it than naive bf16."""
    pairs, chunks = KEPT_LAYOUTS[layout]
    torch.manual_seed(len(layout) + len(loss_type))
    h, w, b, labels = make_batch(pairs, 24, 16, 96, dtype=dtype, device=device, bias=True)
    labels[2 * pairs - 1, 18:] = -100  # a rejected side shorter than its chosen side: ipo's ratio is not -1
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(names)
    plans = _force_chunks(monkeypatch, chunks)
    h64, w64, b64 = _as64(h, w, b)
    with torch.no_grad():  # references near the policy's sums: the losses away from saturation
        sums = reference.sequence_logps(h64, w64, labels, bias=b64)
    ref_c = (sums[:pairs] + torch.randn(pairs, dtype=torch.float64, device=device)).float().requires_grad_()
    ref_r = (sums[pairs:] + torch.randn(pairs, dtype=torch.float64, device=device)).float().requires_grad_()
    rc64, rr64 = _as64(ref_c, ref_r)
    cfg = dict(beta=0.3, label_smoothing=0.1)
    # bf16 rows on the interpreter: stores rounded to nearest as on the GPU (it truncates, and a bias gradient,
    # a sum of truncated rows, then carries their bias: 3.5x naive's error seen on orpo, on every split route)
    emulate = impl == "chunked" and device.type == "cpu" and dtype == torch.bfloat16
    with gpu_arith.emulate_gpu_arithmetic() if emulate else contextlib.nullcontext():
        out = dpo_fast.dpo_loss(h, w, labels, bias=b, impl=impl, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                loss_type=names, loss_weights=weights, **cfg)
        ours = _grads_or_zeros(out.loss, (h, w, b, ref_c, ref_r))
    oracle = reference.dpo_loss(h64, w64, labels, bias=b64, ref_chosen_logps=rc64, ref_rejected_logps=rr64,
                                cfg=dpo_fast.objective.LossConfig(names, weights, **cfg))
    (plan,) = plans
    assert [dataclasses.replace(c, rejected_scale=None) for c in plan.chunks] == list(chunks)
    assert all((c.rejected_scale is None) == (loss_type == "orpo") for c in plan.chunks if c.split)
    want = _grads_or_zeros(oracle.loss, (h64, w64, b64, rc64, rr64))
    assert all(g.dtype == x.dtype for g, x in zip(ours, (h, w, b, ref_c, ref_r)))
    if dtype == torch.float32:
        assert rel_err(out.loss, oracle.loss) < 1e-5
        assert rel_err(out.chosen_logps, oracle.chosen_logps) < 1e-5
        assert rel_err(out.rejected_logps, oracle.rejected_logps) < 1e-5
        for name, got, x, tol in zip(("hidden", "weight", "bias", "ref_chosen", "ref_rejected"), ours, want,
                                     (1e-5, 1e-5, 1e-5, 1e-4, 1e-4)):
            assert rel_err(got, x) < tol, (name, rel_err(got, x))
        return
    naive = reference.dpo_loss(h, w, labels, bias=b, dtype=None, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                               cfg=dpo_fast.objective.LossConfig(names, weights, **cfg))
    base = _grads_or_zeros(naive.loss, (h, w, b, ref_c, ref_r))
    # The bias gradient is a column sum of bf16 gradient rows that largely cancel: rows rounded at unit scale and
    # then scaled (every split route, grouped or not, the same bits) can land one bf16 step (2^-8) of the
    # largest entry away where naive's rounding of the scaled rows happened to be luckier (ipo: 4.9e-3 vs 2.3e-3).
    margins = {"bias": torch.finfo(torch.bfloat16).eps}
    for name, got, n, x in zip(("hidden", "weight", "bias", "ref_chosen", "ref_rejected"), ours, base, want):
        assert rel_err(got, x) <= rel_err(n, x) + margins.get(name, 2e-3), (name, rel_err(got, x), rel_err(n, x))


@pytest.mark.parametrize("layout", ["kept-kept", "grouped-whole"])
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_kept_and_grouped_pairs_with_a_frozen_input(layout, frozen, device, monkeypatch):
    """A frozen head (or hidden states that need no gradient): the kept and grouped pairs skip that side's GEMMs
    and the other gradient still matches float64."""
    pairs, chunks = KEPT_LAYOUTS[layout]
    torch.manual_seed(5)
    h, w, _, labels = make_batch(pairs, 24, 16, 96, device=device)
    h, w = (h, w.detach()) if frozen == "weight" else (h.detach(), w)
    _force_chunks(monkeypatch, chunks)
    out = dpo_fast.dpo_loss(h, w, labels, impl="torch")
    leaf = h if frozen == "weight" else w
    h64, w64 = h.detach().double(), w.detach().double()
    leaf64 = (h64 if frozen == "weight" else w64).requires_grad_()
    oracle = reference.dpo_loss(h64, w64, labels)
    assert rel_err(out.loss, oracle.loss) < 1e-5
    assert rel_err(_grads(out.loss, (leaf,))[0], _grads(oracle.loss, (leaf64,))[0]) < 1e-5


def test_kept_pair_with_a_zero_gradient_is_exact(device, monkeypatch):
    """hinge past its margin: alpha = g = 0 makes both gradient GEMMs of the kept pair write exact zeros."""
    h, w, _, labels = make_batch(1, 24, 16, 96, device=device)
    plans = _force_chunks(monkeypatch, (planner.Chunk(0, 1, 7, keep_gradient=True),))
    ref_c, ref_r = torch.tensor([-1e4], device=device), torch.tensor([0.0], device=device)
    out = dpo_fast.dpo_loss(h, w, labels, impl="torch", loss_type="hinge", ref_chosen_logps=ref_c,
                            ref_rejected_logps=ref_r)
    assert plans[0].chunks[0].keep_gradient
    gh, gw = _grads(out.loss, (h, w))
    assert float(out.loss.detach()) == 0.0 and not gh.any() and not gw.any()


@pytest.mark.parametrize("layout", ["one pair", "kept-kept"])
def test_kept_pairs_read_their_scales_once_each(layout, device, monkeypatch):
    """The one host read per call (test_one_host_sync_per_call), plus one per kept pair: its two scales, which
    cuBLAS takes as a host alpha (priced: cost_model.HOST_READ_SECONDS)."""
    pairs, chunks = KEPT_LAYOUTS[layout]
    h, w, _, labels = make_batch(pairs, 24, 16, 96, device=device)
    _force_chunks(monkeypatch, chunks)
    tolist = torch.Tensor.tolist
    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append("tolist") or tolist(self))
    counter = _SyncCounter()
    with counter:
        out = dpo_fast.dpo_loss(h, w, labels, impl="torch").loss
        out.backward()
    assert len(counter.syncs) + len(reads) == 1 + len(chunks), counter.syncs + reads


def _grads_or_zeros(loss, inputs):
    """Gradients, zeros for inputs the loss does not read (reference log-probs of a reference-free loss)."""
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def test_split_pair_with_a_zero_gradient_is_exact(device, monkeypatch):
    """hinge past its margin: g_c = g_r = 0 scales the one merged buffer to exact zeros."""
    h, w, _, labels = make_batch(1, 24, 16, 96, device=device)
    plans = _force_chunks(monkeypatch, (planner.Chunk(0, 1, 7),))
    ref_c, ref_r = torch.tensor([-1e4], device=device), torch.tensor([0.0], device=device)
    out = dpo_fast.dpo_loss(h, w, labels, impl="torch", loss_type="hinge", ref_chosen_logps=ref_c,
                            ref_rejected_logps=ref_r)
    assert plans[0].chunks[0].rejected_scale == -1.0
    gh, gw = _grads(out.loss, (h, w))
    assert float(out.loss) == 0.0 and not gh.any() and not gw.any()


@pytest.mark.parametrize("budget", [None, 6000])
def test_reference_logps_get_their_gradients(budget, device):
    """Issue 12 item 4: the whole-pair route gives d loss / d ref_*_logps like the two-pass route and the oracle."""
    h, w, _, labels = make_batch(3, 8, 16, 64, device=device)
    ref_c = (torch.randn(3, device=device) - 20).requires_grad_()
    ref_r = (torch.randn(3, device=device) - 20).requires_grad_()
    h64, w64, rc64, rr64 = _as64(h, w, ref_c, ref_r)
    for loss_type in ("sigmoid", "aot"):  # whole pairs; not pair-local (two-pass)
        out = dpo_fast.dpo_loss(h, w, labels, impl="torch", memory_budget=budget, ref_chosen_logps=ref_c,
                                ref_rejected_logps=ref_r, loss_type=loss_type)
        oracle = reference.dpo_loss(h64, w64, labels, ref_chosen_logps=rc64, ref_rejected_logps=rr64,
                                    cfg=dpo_fast.objective.LossConfig([loss_type]))
        got = _grads(out.loss, (ref_c, ref_r, h))
        want = _grads(oracle.loss, (rc64, rr64, h64))
        assert all(rel_err(g, x) < 1e-5 for g, x in zip(got, want)), loss_type


@pytest.mark.parametrize("budget", [None, 6000])
def test_float32_inputs_under_bf16_autocast(budget, device):
    """Issue 12 item 1: float32 master weights under torch.autocast(bf16) run in bf16 like the model's lm_head."""
    h, w, _, labels = make_batch(2, 8, 16, 64, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = dpo_fast.dpo_loss(h, w, labels, impl="torch", memory_budget=budget)
    grads = _grads(out.loss, (h, w))
    assert all(g.dtype == torch.float32 for g in grads)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    cast = dpo_fast.dpo_loss(hb, wb, labels, impl="torch", memory_budget=budget)
    assert torch.equal(out.loss, cast.loss)
    for got, want in zip(grads, _grads(cast.loss, (hb, wb))):
        assert torch.equal(got, want.float())


class _SyncCounter(TorchDispatchMode):
    """Ops that make a CUDA host wait: scalar reads, data-dependent output sizes."""

    NAMES = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::unique", "aten::_unique",
             "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::masked_select",
             "aten::bincount", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.syncs = []
        self.ops = set()  # every op seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.ops.add(name)
        if name in self.NAMES:
            self.syncs.append(name)
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
            self.syncs.append(name)
        elif name == "aten::index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                          for i in (args[1] if len(args) > 1 else ())):
            self.syncs.append("boolean index")
        return func(*args, **kwargs)


def _packed(h, labels, packing):
    """Rows [R, T] packed into tokens [N] with ragged sequence lengths (row r keeps T - r tokens)."""
    rows, seq = labels.shape
    keep = torch.arange(seq, device=labels.device)[None, :] < (seq - torch.arange(rows, device=labels.device))[:, None]
    hidden = h.detach()[keep].requires_grad_()
    flat = labels[keep]
    lengths = keep.sum(1)
    if packing == "cu_seqlens":
        return hidden, flat, dict(cu_seqlens=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]))
    ids = torch.repeat_interleave(torch.arange(rows, device=labels.device), lengths)
    order = torch.randperm(ids.numel(), device=labels.device)  # ids in any token order
    return hidden.detach()[order].requires_grad_(), flat[order], dict(sequence_ids=ids[order], num_sequences=rows)


@pytest.mark.parametrize("packing", ["rows", "cu_seqlens", "sequence_ids"])
@pytest.mark.parametrize("fn", ["dpo_loss", "sequence_logps"])
@pytest.mark.parametrize("budget", [None, 3000, 8000])
def test_one_host_sync_per_call(budget, fn, packing, device, monkeypatch):
    """Issue 11 item 7: one host read per call (forward and backward), none per chunk, whatever the packing:
    the packing checks (cu_seqlens bounds and order, sequence_ids range and gaps) and the number of
    sequence_ids' sequences ride on the layout's one transfer with the lengths and the label check."""
    h, w, _, labels = make_batch(3, 10, 16, 64, device=device)
    ref_c, ref_r = torch.randn(3, device=device) - 20, torch.randn(3, device=device) - 20
    packed = {}
    if packing != "rows":
        h, labels, packed = _packed(h, labels, packing)
    tolist = torch.Tensor.tolist
    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append("tolist") or tolist(self))
    counter = _SyncCounter()
    with counter:
        if fn == "dpo_loss":
            out = dpo_fast.dpo_loss(h, w, labels, impl="torch", memory_budget=budget, ref_chosen_logps=ref_c,
                                    ref_rejected_logps=ref_r, **packed).loss
        else:
            out = dpo_fast.sequence_logps(h, w, labels, impl="torch", memory_budget=budget, **packed).sum()
        out.backward()
    assert len(counter.syncs) + len(reads) <= 1, counter.syncs + reads
    assert torch.isfinite(out) and h.grad is not None and w.grad is not None
    assert counter.ops & {"aten::mm", "aten::addmm"}  # the counter sees the GEMMs (test below)


@pytest.mark.parametrize("pack,message", [
    (dict(cu_seqlens=[0, 7, 5, 12]), "non-decreasing"),
    (dict(cu_seqlens=[0, 6, 11]), "end at the token count 12"),
    (dict(sequence_ids=[0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4], num_sequences=4), "num_sequences=4; found 4"),
    (dict(sequence_ids=[0] * 11 + [2 ** 40], num_sequences=2), "num_sequences=2; found 1099511627776"),
    (dict(sequence_ids=[0, 0, 1, 1, 2, 2, 3, 3, -1, 0, 1, 2], num_sequences=4), ">= 0"),
])
def test_packing_checks_raise_on_the_one_read(pack, message, device, monkeypatch):
    """A bad packing is refused on the layout's one read, before any GEMM (the check reads nothing itself)."""
    hidden, weight = torch.randn(12, 8, device=device), torch.randn(20, 8, device=device)
    labels = torch.randint(0, 20, (12,), device=device)
    pack = {k: torch.tensor(v, device=device) if isinstance(v, list) else v for k, v in pack.items()}
    tolist = torch.Tensor.tolist
    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append("tolist") or tolist(self))
    counter = _SyncCounter()
    with counter, pytest.raises(ValueError, match=message):
        dpo_fast.dpo_loss(hidden, weight, labels, impl="torch", **pack)
    assert len(counter.syncs) + len(reads) <= 1, counter.syncs + reads
    assert not counter.ops & {"aten::mm", "aten::addmm", "aten::matmul", "aten::bmm"}, "a GEMM ran before the check"


def test_float16_on_cpu_stays_near_its_budget(device):
    """Issue 12 item 7: 16-bit operands are staged to float32 in blocks the planner counts (before, a
    forward weight block sized for the logits tile alone was copied to float32: 4x the budget here)."""
    h, w, _, labels = make_batch(2, 16, 256, 8192, dtype=torch.float16, device=device)
    w.requires_grad_(False)  # no grad_weight: nothing of V x H is unavoidable
    budget = 256 * 1024
    recorder = AllocationRecorder()
    with recorder:
        out = dpo_fast.dpo_loss(h, w, labels, impl="torch", memory_budget=budget, loss_type="aot_unpaired")
        torch.autograd.grad(out.loss, (h,))
    unavoidable = h.numel() * 4  # grad_hidden summed in float32
    assert max(n * e for n, e, _ in recorder.sizes) <= max(budget, unavoidable)


def test_plan_command_table():
    """`python -m benchmarks plan` prints, per GPU case, dpo-fast's routes beside naive PyTorch and the peers."""
    from benchmarks.cases import GPU_CASES
    from benchmarks.plan import markdown, rows_for

    case = next(c for c in GPU_CASES if c.name == "llama3-8b 1x8192")
    rows = {r[0]: r for r in rows_for(case, cm.CARDS["H100"])}
    default = rows["dpo-fast (default budget)"]
    assert default[2] == "1.00" and float(default[5]) <= 0.25  # 6NHV within a quarter of naive's memory
    assert rows["TRL 1.16 chunked"][2] == "1.33" and rows["naive PyTorch"][5] == "1.00"
    text = markdown([case], cm.CARDS["H200"])
    assert "Liger DPO" in text and "CCE exact" in text and "989 TFLOP/s" in text and "datasheet" in text
    assert "measured" in markdown([case], cm.CARDS["H200-measured"])
