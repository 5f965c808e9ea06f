"""The cost model prices what runs (issue 19 item 1).

Each route is traced op by op on the CUDA code path (``benchmarks/trace.py``: every aten op
and every Triton launch with the bytes it moves, on small CPU tensors) and the planner's
paper cost must match the trace: HBM bytes and loss memory within 3%, GEMM FLOPs exactly.
Shapes are scaled down so the trace stays fast; ragged tiles and odd piece sizes are on purpose.
"""

import pytest
import torch

import dpo_fast
from dpo_fast import api, cost_model as cm, planner
from dpo_fast.integrations.trl import ChunkedLogProb

from benchmarks.trace import trace_call
from helpers import cpu_by_design

pytestmark = cpu_by_design("the CUDA code path traced on small CPU tensors (a dispatch mode counting every op's bytes)")

TOLERANCE = 0.03


def _batch(pairs, seq, hidden, vocab, dtype, prompt=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * pairs, seq, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.1).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2 * pairs, seq), generator=g)
    labels[:, :prompt] = -100
    return h, w, labels


def _traced_dpo(h, w, labels, budget, **kw):
    plans = []
    original = api._plan_loss

    def spy(*a, **k):
        plans.append(original(*a, **k))
        return plans[-1]

    def step():
        dpo_fast.dpo_loss(h, w, labels, impl="torch", memory_budget=budget, **kw).loss.backward()

    api._plan_loss = spy
    try:
        trace, memory = trace_call(step, h, w)
    finally:
        api._plan_loss = original
    (plan,) = plans
    return plan, trace, memory


def _assert_priced(cost, trace, memory):
    assert cost.flops == pytest.approx(trace.flops, rel=1e-9)
    assert cost.hbm_bytes == pytest.approx(trace.bytes, rel=TOLERANCE), trace.by_name()
    assert cost.memory_bytes == pytest.approx(memory, rel=TOLERANCE)


def _one_buffer(p):
    """A split pair of a single-margin loss: both sides in one float32 [V, H] sum."""
    return p.chunks[0].split and p.chunks[0].rejected_scale is not None


def _two_buffers(p):
    return p.chunks[0].split and p.chunks[0].rejected_scale is None


# (pairs, tokens per sequence, prompt tokens, dtype, budget, what the plan must be[, loss_type])
ROUTES = {
    "one chunk": (2, 64, 0, torch.bfloat16, 1 << 40, lambda p: len(p.chunks) == 1 and not p.chunks[0].split),
    "several chunks": (4, 64, 0, torch.bfloat16, 6 << 20, lambda p: len(p.chunks) > 1 and p.accumulate),
    "several chunks, prompts gathered": (4, 64, 16, torch.bfloat16, 6 << 20, lambda p: len(p.chunks) > 1),
    "split pair, one buffer": (1, 250, 0, torch.bfloat16, 4 << 20, _one_buffer),
    "split pair, one buffer, float32": (1, 250, 0, torch.float32, 5 << 20, _one_buffer),
    "split pair, one buffer, ipo": (1, 250, 40, torch.bfloat16, 4 << 20, _one_buffer, "ipo"),
    "split pair, two buffers (orpo)": (1, 250, 0, torch.bfloat16, 5 << 20, _two_buffers, "orpo"),
    "split pair, two buffers, float32 (orpo)": (1, 250, 0, torch.float32, 6 << 20, _two_buffers, "orpo"),
    "two-pass": (2, 61, 3, torch.bfloat16, 2 << 20, lambda p: p.route == "two-pass"),
}


@pytest.mark.parametrize("name", list(ROUTES))
def test_dpo_routes_are_priced_as_traced(name):
    pairs, seq, prompt, dtype, budget, expected, *loss = ROUTES[name]
    h, w, labels = _batch(pairs, seq, 64, 4096 if name != "two-pass" else 4000, dtype, prompt)
    if loss:  # a different length per side: ipo's ratio -L_c / L_r is not -1
        labels[1, -30:] = -100
    plan, trace, memory = _traced_dpo(h, w, labels, budget, **(dict(loss_type=loss[0]) if loss else {}))
    assert expected(plan), plan
    assert plan.route == "two-pass" or plan.route == "whole-pairs"
    _assert_priced(plan.cost, trace, memory)
    # No zero-fill where a GEMM writes first: what is still zeroed is per-token statistics only.
    ops = trace.by_name()
    assert ops.get("zeros", 0) + ops.get("zero_", 0) + ops.get("new_zeros", 0) < 0.005 * trace.bytes


# Split pairs whose gradient is kept whole (planner.Chunk.keep_gradient): (pairs, tokens per sequence, hidden,
# prompt tokens, budget MiB, loss, rejected tokens masked). The host read that keeps tiny shapes off this route
# is priced 0 here, so the planner takes it where its bytes are fewer.
KEPT_ROUTES = {
    "one pair, one scale (grad_weight in bf16 by one GEMM)": (1, 250, 64, 0, 4.5, "sigmoid", 0),
    "one pair, two scales (float32 sum, cast)": (1, 250, 128, 0, 6.5, "orpo", 30),
    "three pairs, one scale (rows gathered)": (3, 200, 128, 20, 5.75, "sigmoid", 0),
    "three pairs, two scales": (3, 200, 128, 20, 5.75, "orpo", 0),
}


@pytest.mark.parametrize("name", list(KEPT_ROUTES))
def test_kept_gradient_routes_are_priced_as_traced(name, monkeypatch):
    pairs, seq, hidden, prompt, mib, loss_type, masked = KEPT_ROUTES[name]
    monkeypatch.setattr(cm, "HOST_READ_SECONDS", 0.0)
    h, w, labels = _batch(pairs, seq, hidden, 4096, torch.bfloat16, prompt)
    if masked:
        labels[pairs, -masked:] = -100
    plan, trace, memory = _traced_dpo(h, w, labels, int(mib * 2**20), loss_type=loss_type)
    assert plan.route == "whole-pairs" and all(c.keep_gradient for c in plan.chunks if c.split), plan
    assert all((c.rejected_scale is None) == (loss_type == "orpo") for c in plan.chunks if c.split)
    assert ("fp32" not in plan.cost.route) == (pairs == 1 and loss_type == "sigmoid")
    _assert_priced(plan.cost, trace, memory)
    ops = trace.by_name()
    assert ops.get("zeros", 0) + ops.get("zero_", 0) + ops.get("new_zeros", 0) < 0.005 * trace.bytes


# Split pairs with unit sums whose gradient rows are grouped (planner.Chunk.group_tokens: logits pieces of 256
# rows, one unit GEMM per group): (tokens per sequence, hidden, budget MiB, loss, rejected tokens masked).
GROUPED_ROUTES = {
    "one scale": (600, 256, 10.0, "sigmoid", 0),
    "two scales": (600, 256, 15.25, "orpo", 30),
}


@pytest.mark.parametrize("name", list(GROUPED_ROUTES))
def test_grouped_unit_routes_are_priced_as_traced(name):
    seq, hidden, mib, loss_type, masked = GROUPED_ROUTES[name]
    h, w, labels = _batch(1, seq, hidden, 4096, torch.bfloat16)
    if masked:
        labels[1, -masked:] = -100
    plan, trace, memory = _traced_dpo(h, w, labels, int(mib * 2**20), loss_type=loss_type)
    (chunk,) = plan.chunks
    assert chunk.split and not chunk.keep_gradient and chunk.group_tokens > chunk.piece_tokens, plan
    _assert_priced(plan.cost, trace, memory)


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_split_pair_then_whole_chunks_is_priced_as_traced(loss_type):
    """A long pair split in pieces (its merge becomes the running sum), then short pairs in one chunk; the split
    pair in one float32 [V, H] sum (sigmoid) or two (orpo)."""
    h, w, labels = _batch(3, 200, 64, 4096, torch.bfloat16)
    for row in (1, 2, 4, 5):
        labels[row, :180] = -100
    plan, trace, memory = _traced_dpo(h, w, labels, 5 << 20, loss_type=loss_type)
    assert [c.split for c in plan.chunks] == [True, False]
    assert (plan.chunks[0].rejected_scale is None) == (loss_type == "orpo")
    _assert_priced(plan.cost, trace, memory)


def test_split_pair_pieces_are_even():
    """Pieces of a split pair are cut evenly per side (no small remainder piece)."""
    assert cm.even_pieces(250, 127) == [125, 125]
    assert cm.even_pieces(8192, 1706) == [1638, 1638, 1639, 1638, 1639]
    assert sum(cm.even_pieces(8191, 2048)) == 8191 and max(cm.even_pieces(8191, 2048)) <= 2048


def test_trl_drop_in_per_token_route_is_priced_as_traced():
    """GRPO-shaped: TRL hands over only scored tokens; the per-token (two-pass) route, ragged tiles."""
    g = torch.Generator().manual_seed(1)
    n, hidden, vocab, budget = 300, 64, 3000, 2 << 20
    h = torch.randn(n, hidden, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    advantages = torch.randn(n, generator=g)

    def step():
        logps = ChunkedLogProb(impl="torch", memory_budget=budget).apply(h, w, None, targets)[0]
        (logps * advantages).sum().backward()

    trace, memory = trace_call(step, h, w)
    tiles = planner.engine_tiles(n, vocab, hidden, torch.bfloat16, "cuda", budget, True, True)
    forward = planner.engine_tiles(n, vocab, hidden, torch.bfloat16, "cuda", budget, False, False)
    assert n % tiles.token_chunk or vocab % tiles.vocab_block  # a ragged last tile, priced at its size
    cost = cm.two_pass(cm.Shape(n, hidden, vocab, 2), tiles.token_chunk, tiles.vocab_block,
                       forward_tiles=(forward.token_chunk, forward.vocab_block))
    _assert_priced(cost, trace, memory)
    assert "index" not in trace.by_name()  # TRL compacted the tokens: no gather, no scatter back


def test_grad_loss_of_one_moves_nothing_and_other_values_scale_in_place():
    """The whole-pair backward scales its saved gradients in place, not at all when grad_loss is 1."""
    h, w, labels = _batch(2, 16, 32, 512, torch.float32)
    out = dpo_fast.dpo_loss(h, w, labels, impl="torch")
    (gh, gw) = torch.autograd.grad(out.loss, (h, w), retain_graph=True)
    out2 = dpo_fast.dpo_loss(h, w, labels, impl="torch")
    (gh3, gw3) = torch.autograd.grad(out2.loss * 3.0, (h, w))
    torch.testing.assert_close(gh3, 3 * gh, rtol=1e-6, atol=0)
    torch.testing.assert_close(gw3, 3 * gw, rtol=1e-6, atol=0)
    # A second backward through the retained graph gets new tensors at its own scale; the first call's
    # results are left as they were returned.
    first = gh.clone()
    (gh2, gw2) = torch.autograd.grad(out.loss * 2.0, (h, w))
    torch.testing.assert_close(gh2, 2 * first, rtol=1e-6, atol=0)
    torch.testing.assert_close(gw2, 2 * gw, rtol=1e-6, atol=0)
    assert torch.equal(gh, first)


def test_scale_and_merge_kernels():
    """kernels/scale.py under the interpreter: scaling by 1 leaves every bit; merges are one float32 pass."""
    pytest.importorskip("triton")
    from dpo_fast.rows import triton_runs_on

    if not triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton kernels do not run on CPU tensors here")
    from dpo_fast.kernels.scale import merge_scaled, scale_unless_one

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5001, generator=g)
    y = x.clone()
    scale_unless_one(y, torch.ones(1))
    assert torch.equal(y, x)
    scale_unless_one(y, torch.full((1,), 2.5))
    assert torch.equal(y, x * 2.5)
    a, b, running = (torch.randn(3, 4099, generator=g) for _ in range(3))
    ga, gb = torch.full((1,), -0.75), torch.full((1,), 1.5)
    want = a * ga + b * gb + running
    out = torch.empty_like(a)
    merge_scaled(out, a, ga, b, gb, running)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    merge_scaled(a, a, ga, b, gb)  # in place, no running sum
    torch.testing.assert_close(a, want - running, rtol=1e-6, atol=1e-6)


def test_default_budgets(monkeypatch):
    """Per-token work: 1 GiB whatever the card; DPO: a quarter of the free memory, capped (issue 19 item 3)."""
    cuda = torch.device("cuda", 0)
    for free, want in [(79 * 2**30, planner.DPO_BUDGET_CAP), (12 * 2**30, 3 * 2**30), (2 * 2**30, 2**30)]:
        monkeypatch.setattr(planner, "_free_cuda_memory", lambda device, free=free: free)
        assert planner.default_memory_budget(cuda) == want
        assert planner.default_memory_budget(cuda, per_token=True) == planner.PER_TOKEN_BUDGET
    assert planner.default_memory_budget(torch.device("cpu")) == planner.CPU_MEMORY_BUDGET
    # The per-token default holds less than TRL 1.16's loss memory at a real head (Qwen2.5-7B GRPO, 16k tokens).
    shape = cm.Shape(16384, 3584, 152064, 2)
    tiles = planner.engine_tiles(16384, 152064, 3584, torch.bfloat16, "cuda", planner.PER_TOKEN_BUDGET, True, True)
    ours = cm.two_pass(shape, tiles.token_chunk, tiles.vocab_block)
    assert ours.memory_bytes < cm.trl_chunked(shape).memory_bytes
    assert tiles.token_chunk >= 1024  # still GEMM-sized tiles
