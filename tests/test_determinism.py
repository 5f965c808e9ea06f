"""Determinism: every path is deterministic always, so there is no ``deterministic`` switch.

No path uses atomics: sequence sums are a padded gather and a row sum (``layout.py``),
chunked weight gradients are accumulated block by block in a fixed order, and the fused
kernels give every float32 accumulator one owner and merge vocabulary splits in a fixed
order. What is and is not invariant:

- Repeated runs with the same inputs and settings: bit-identical losses, log-probs,
  metrics and gradients, for every impl and route.
- The token chunk (how many tokens share a GEMM tile) changes nothing per token: each
  token's logits row is folded over the vocabulary in the same order whatever its
  neighbours. So forward log-probs and ``grad_hidden`` are bit-identical across token
  chunks, *provided the GEMM itself computes a row the same way for any number of rows*.
  CPU BLAS does for two rows or more (a one-row product goes through gemv and may round
  differently, so the test keeps every tile at two rows or more); cuBLAS may pick another
  kernel for another row count (the "batch invariance" problem), so on a GPU these are
  compared to 1e-6 instead.
  ``grad_weight`` and ``grad_bias`` sum over tokens chunk by chunk: another chunk size is
  another float32 summation order, so they are compared to 1e-6, not bitwise.
- The vocabulary block changes the order of the float32 online log-sum-exp, so log-probs
  may move in the last bits; compared to 1e-6.
"""

import importlib.util
import warnings

import pytest
import torch

import dpo_fast
from dpo_fast.chunked import plan_tiles
from helpers import make_batch, rel_err

IMPLS = ["torch", "chunked"] + (["fused"] if importlib.util.find_spec("dpo_fast.fused") is not None else [])


def _run(fn, inputs):
    """Outputs and gradients of ``fn()`` as a flat list of detached tensors."""
    out = fn()
    if isinstance(out, dpo_fast.DPOOutput):
        scalar = out.loss
        values = [v for v in vars(out).values() if isinstance(v, torch.Tensor)]
    else:
        scalar = (out * torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)).sum()
        values = [out]
    grads = torch.autograd.grad(scalar, [t for t in inputs if t is not None])
    return [v.detach().clone() for v in values] + list(grads)


def _assert_all_equal(runs):
    first = runs[0]
    for other in runs[1:]:
        assert len(other) == len(first)
        for a, b in zip(first, other):
            assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                         and torch.equal(a[~a.isnan()], b[~b.isnan()]))


CALLS = {
    "token_logps": lambda h, w, b, l, impl: dpo_fast.token_logps(h, w, l, bias=b, impl=impl, softcap=5.0),
    "dpo_whole_pairs": lambda h, w, b, l, impl: dpo_fast.dpo_loss(h, w, l, bias=b, impl=impl),
    "dpo_two_pass": lambda h, w, b, l, impl: dpo_fast.dpo_loss(h, w, l, bias=b, impl=impl, memory_budget=3000,
                                                               loss_type=["sigmoid", "sft"]),
    "dpo_batch_wide_loss": lambda h, w, b, l, impl: dpo_fast.dpo_loss(h, w, l, bias=b, impl=impl,
                                                                      loss_type="aot_unpaired"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_repeated_runs_are_bit_identical(impl, call, device):
    h, w, b, labels = make_batch(2, 7, 16, 83, device=device, bias=True, empty_rows=(3,))
    runs = [_run(lambda: CALLS[call](h, w, b, labels, impl), (h, w, b)) for _ in range(3)]
    _assert_all_equal(runs)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("inplace", [False, True])
def test_repeated_runs_from_logits_are_bit_identical(impl, inplace, device):
    logits = torch.randn(4, 6, 50, device=device)
    labels = torch.randint(0, 50, (4, 6), device=device)
    labels[:, :2] = -100

    def once():
        leaf = logits.clone().requires_grad_()
        x = leaf * 1.0  # inplace=True overwrites its input: give it a fresh non-leaf
        out = dpo_fast.dpo_loss_from_logits(x, labels, impl=impl, inplace=inplace)
        return [out.loss.detach(), out.chosen_logps, out.entropy, *torch.autograd.grad(out.loss, leaf)]

    _assert_all_equal([once() for _ in range(3)])


def _budgets_with_fixed_vocab_block(n, vocab, hidden, weight_grad, chunks=(34, 50, 100)):
    """Memory budgets whose float32 tile plans keep the whole vocabulary in one block, with these token chunks.

    A tile of ``chunk`` tokens by ``vocab`` rows takes the whole budget in forward and half of
    it when a weight gradient is accumulated (the planner in ``chunked.plan_tiles``).
    """
    budgets = {chunk: 4 * vocab * chunk * (2 if weight_grad else 1) for chunk in chunks}
    for chunk, budget in budgets.items():
        plan = plan_tiles(n, vocab, hidden, 4, budget, weight_grad)
        assert (plan.token_chunk, plan.vocab_block) == (chunk, vocab)
    return budgets


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_token_chunk_does_not_change_per_token_results(impl, device):
    n, hidden, vocab = 100, 16, 96  # chunks of 34 (a last tile of 32), 50 and 100 tokens (the planner cuts equal tiles)
    h = torch.randn(n, hidden, device=device, requires_grad=True)
    w = torch.randn(vocab, hidden, device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), device=device)
    exact = device.type == "cpu"  # see the module docstring: cuBLAS need not be batch-invariant

    def same(a, b):
        return torch.equal(a, b) if exact else rel_err(a, b) < 1e-6

    forward = _budgets_with_fixed_vocab_block(n, vocab, hidden, weight_grad=False)
    assert len(forward) >= 3  # several token chunks, from a handful of tokens to all of them
    logps = [dpo_fast.token_logps(h.detach(), w.detach(), labels, impl=impl, memory_budget=b)
             for b in forward.values()]
    assert all(same(x, logps[0]) for x in logps)

    backward = _budgets_with_fixed_vocab_block(n, vocab, hidden, weight_grad=True)
    assert len(backward) >= 3
    upstream = torch.randn(n, device=device)
    grads = []
    for budget in backward.values():
        out = dpo_fast.token_logps(h, w, labels, impl=impl, memory_budget=budget)
        grads.append(torch.autograd.grad((out * upstream).sum(), (h, w)))
    assert all(same(g_h, grads[0][0]) for g_h, _ in grads)
    # grad_weight: another token chunk is another order of the sum over tokens.
    assert all(rel_err(g_w, grads[0][1]) < 1e-6 for _, g_w in grads)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_vocabulary_block_changes_only_rounding(impl, device):
    h, w, _, labels = make_batch(2, 8, 16, 300, device=device)
    n = int((labels != -100).sum())
    blocks = {}
    for budget in [4 * n * block for block in (37, 100, 200)] + [None]:
        plan = plan_tiles(n, 300, 16, 4, budget or 2**29, weight_grad=False)
        blocks[plan.vocab_block] = dpo_fast.token_logps(h.detach(), w.detach(), labels, impl=impl,
                                                        memory_budget=budget)
    assert len(blocks) >= 3
    first = next(iter(blocks.values()))
    assert all(rel_err(x, first) < 1e-6 for x in blocks.values())


@pytest.mark.parametrize("impl", IMPLS)
def test_no_op_needs_a_nondeterministic_kernel(impl, device):
    """Under torch.use_deterministic_algorithms every op we call has a deterministic kernel
    (on a GPU this flags atomics-based ops such as index_add_ or scatter_add_), and the
    results equal those of a normal run."""
    h, w, b, labels = make_batch(2, 6, 16, 40, device=device, bias=True)
    normal = _run(lambda: dpo_fast.dpo_loss(h, w, labels, bias=b, impl=impl, memory_budget=3000), (h, w, b))
    previous, previous_warn = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        # warn_only: cuBLAS's workspace-config warning is not ours; anything else is reported.
        torch.use_deterministic_algorithms(True, warn_only=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            strict = _run(lambda: dpo_fast.dpo_loss(h, w, labels, bias=b, impl=impl, memory_budget=3000),
                          (h, w, b))
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
    flagged = [str(x.message) for x in caught if "deterministic" in str(x.message) and "CUBLAS" not in str(x.message)]
    assert not flagged, flagged
    _assert_all_equal([normal, strict])
