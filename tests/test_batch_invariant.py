"""batch_invariant=True: a sequence's log-probs and entropy are bitwise the same whatever else is in the batch.

One target sequence is scored alone, then among other sequences (other contents, other
padding, other row), packed at an offset (cu_seqlens), shuffled (sequence_ids), behind a
prompt, and under memory budgets that would change the default path's tiles. Tiles are
shrunk here (``planner.INVARIANT_*``) so the target crosses token tiles and vocabulary
blocks at different offsets in each batch. Gradients are not part of the promise.
"""

import pytest
import torch

import dpo_fast
from dpo_fast import planner
from dpo_fast import cost_model as cm
from dpo_fast.integrations.trl import ChunkedLogProb
from dpo_fast.reference import sequence_logps as reference_sequence_logps
from helpers import TEST_DEVICE

H, V, L = 16, 300, 23
IMPLS = ["torch", "chunked"]


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(planner, "INVARIANT_TOKEN_TILE", 16)
    monkeypatch.setattr(planner, "INVARIANT_VOCAB_BLOCK", 128)


def _target(dtype):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(L, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    labels = torch.randint(0, V, (L,), generator=g)
    labels[:3] = -100  # its prompt
    return hidden.to(TEST_DEVICE), weight.to(TEST_DEVICE), labels.to(TEST_DEVICE)


def _others(count, length, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(count, length, H, generator=g).to(dtype)
    labels = torch.randint(0, V, (count, length), generator=g)
    labels[:, :2] = -100
    return hidden.to(TEST_DEVICE), labels.to(TEST_DEVICE)


def _padded(hidden, labels, row, rows, width, seed, dtype):
    """The target at ``row`` of a [rows, width] batch of other sequences (ragged, padded with -100)."""
    others_h, others_l = _others(rows, width, seed, dtype)
    others_l[:, width - 3:] = -100
    others_h[row] = 0
    others_h[row, :L] = hidden
    others_l[row] = -100
    others_l[row, :L] = labels
    return others_h, others_l


def _variants(hidden, labels, dtype):
    """(name, hidden, labels, extra kwargs, where the target's tokens are in the flattened batch)."""
    out = [("alone", hidden[None], labels[None], {}, torch.arange(L))]
    for name, row, rows, width, seed in (("row 2 of 5", 2, 5, 40, 1), ("last of 3, no padding", 2, 3, L, 3)):
        h, lab = _padded(hidden, labels, row, rows, width, seed, dtype)
        out.append((name, h, lab, {}, row * width + torch.arange(L)))
    # Packed: other sequences before and after (cu_seqlens); 37 tokens before it shift every tile boundary.
    before_h, before_l = _others(1, 37, 4, dtype)
    after_h, after_l = _others(1, 11, 5, dtype)
    packed_h = torch.cat([before_h[0], hidden, after_h[0]])
    packed_l = torch.cat([before_l[0], labels, after_l[0]])
    cu = torch.tensor([0, 37, 37 + L, 48 + L])
    out.append(("packed cu_seqlens", packed_h, packed_l, dict(cu_seqlens=cu.to(TEST_DEVICE)), 37 + torch.arange(L)))
    # sequence_ids, the three sequences' tokens interleaved at random (each keeps its own order): the
    # target is sequence 1.
    ids = torch.tensor([0] * 37 + [1] * L + [2] * 11)
    slots = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(6))]
    order = torch.empty_like(ids)
    for k in range(3):  # the k-th sequence's tokens, in order, go to the slots that carry id k
        order[slots == k] = (ids == k).nonzero().flatten()
    where = (slots == 1).nonzero().flatten()
    out.append(("interleaved sequence_ids", packed_h[order], packed_l[order], dict(sequence_ids=slots.to(TEST_DEVICE)), where))
    return out


def _sequence_index(name, kwargs):
    return {"alone": 0, "row 2 of 5": 2, "last of 3, no padding": 2}.get(name, 1)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("impl,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                        ("chunked", torch.float32)])
def test_token_and_sequence_logps_are_bitwise_the_same_in_any_batch(impl, dtype, device):
    hidden, weight, labels = _target(dtype)
    seen_tokens, seen_sums = [], []
    variants = _variants(hidden, labels, dtype)
    if impl == "chunked":  # the interpreter runs a Triton launch per tile: three batches, the default budget
        variants = [v for v in variants if v[0] in ("alone", "row 2 of 5", "packed cu_seqlens")]
    for name, h, lab, kwargs, where in variants:
        for budget in ((None, 1) if impl == "torch" else (None,)):  # the floor changes the default path's tiles
            common = dict(impl=impl, batch_invariant=True, memory_budget=budget)
            if "sequence_ids" not in kwargs and "cu_seqlens" not in kwargs:
                tokens = dpo_fast.token_logps(h, weight, lab, **common).reshape(-1)[where]
            else:
                tokens = dpo_fast.token_logps(h, weight, lab, **common)[where]
            sums = dpo_fast.sequence_logps(h, weight, lab, **common, **kwargs)[_sequence_index(name, kwargs)]
            seen_tokens.append((name, budget, tokens))
            seen_sums.append((name, budget, sums))
    for name, budget, tokens in seen_tokens[1:]:
        assert torch.equal(tokens, seen_tokens[0][2]), f"{name}, budget {budget}: token log-probs differ"
    for name, budget, sums in seen_sums[1:]:
        assert torch.equal(sums, seen_sums[0][2]), f"{name}, budget {budget}: sequence sum differs"
    # And still right: against float64.
    expected = reference_sequence_logps(hidden[None].double(), weight.double(), labels[None])[0]
    assert abs(float(seen_sums[0][2]) - float(expected)) <= 1e-5 * max(1.0, abs(float(expected)))


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_and_metrics_through_the_trl_drop_in(impl, device):
    """TRL's per-token outputs (log-probs, entropy, ...) of the target, with every position handed over."""
    hidden, weight, labels = _target(torch.float32)
    fn = ChunkedLogProb(impl=impl, batch_invariant=True)
    seen = []
    for name, h, lab, kwargs, where in _variants(hidden, labels, torch.float32):
        if kwargs:
            continue  # TRL hands over [N, H] with its targets; packing is the trainer's
        outs = fn.apply(h.reshape(-1, H), weight, None, lab.reshape(-1))
        seen.append((name, [o[where] for o in outs if o is not None]))
    for name, outs in seen[1:]:
        for i, (a, b) in enumerate(zip(outs, seen[0][1])):
            assert torch.equal(a, b), f"{name}: output {i} differs"


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("impl", IMPLS)
def test_dpo_loss_sequence_metrics_do_not_depend_on_the_batch(impl, device):
    hidden, weight, labels = _target(torch.float32)
    h_a, l_a = _padded(hidden, labels, 0, 2, 30, 11, torch.float32)  # the target is pair 0's chosen
    h_b, l_b = _padded(hidden, labels, 1, 6, 26, 12, torch.float32)  # pair 1's chosen of three
    a = dpo_fast.dpo_loss(h_a.requires_grad_(), weight, l_a, impl=impl, batch_invariant=True)
    b = dpo_fast.dpo_loss(h_b.requires_grad_(), weight, l_b, impl=impl, batch_invariant=True, memory_budget=1)
    assert torch.equal(a.chosen_logps[0], b.chosen_logps[1])
    a.loss.backward()  # the two-pass backward runs under the invariant forward
    assert h_a.grad is not None and torch.isfinite(h_a.grad).all()


def test_fused_and_bad_flags_are_refused(device):
    hidden, weight, labels = _target(torch.float32)
    with pytest.raises(ValueError, match="batch_invariant"):
        dpo_fast.token_logps(hidden[None], weight, labels[None], impl="fused", batch_invariant=True)
    with pytest.raises(TypeError, match="batch_invariant"):
        dpo_fast.token_logps(hidden[None], weight, labels[None], batch_invariant="yes")
    with pytest.raises(TypeError, match="batch_invariant"):
        dpo_fast.DPOLoss(batch_invariant=1)


def test_planner_prices_the_fixed_tiles():
    """Llama-3-8B's head, 1000 tokens: two-pass with the padding's FLOPs and the fixed workspace."""
    tokens, hidden_size, vocab = 1000, 4096, 128256
    plan = planner.plan_loss([tokens], vocab, hidden_size, torch.bfloat16, True, 8 << 30, "cuda",
                             batch_invariant=True)
    default = planner.plan_loss([tokens], vocab, hidden_size, torch.bfloat16, True, 8 << 30, "cuda")
    assert plan.route == "two-pass" and "batch-invariant" in plan.cost.route
    padded = -(-tokens // planner.INVARIANT_TOKEN_TILE) * planner.INVARIANT_TOKEN_TILE
    shape = cm.Shape(tokens, hidden_size, vocab, 2, True)
    assert plan.cost.flops == pytest.approx(2.0 * tokens * hidden_size * vocab * 4
                                            + 2.0 * (padded - tokens) * hidden_size * vocab)
    assert plan.cost.seconds() >= default.cost.seconds()  # never cheaper than the planner's free choice
    # At datasheet peaks: 1.89x vs 1.12x here (8NHV, the padding, a weight re-read per fixed tile).
    assert plan.cost.bound(shape) < 2.0 * default.cost.bound(shape)
