"""create_graph=True: every route refuses clearly instead of returning a first-order-only graph.

The backward kernels build no autograd graph; a gradient taken with ``create_graph=True``
would silently miss every path through the softmax (or, on the torch two-pass route, crash
inside ``mm(out=)``).
"""

import pytest
import torch

import dpo_fast
from helpers import make_batch


def _assert_refused(loss, inputs, route):
    with pytest.raises(RuntimeError, match="no second-order gradient") as info:
        torch.autograd.grad(loss, inputs, create_graph=True)
    assert "create_graph=True" in str(info.value) and route in str(info.value)


@pytest.mark.parametrize("impl", ["torch", "chunked", "fused"])
def test_two_pass_route_refuses_create_graph(impl, device):
    h, w, _, labels = make_batch(2, 5, 16, 40, device=device)
    loss = dpo_fast.sequence_logps(h, w, labels, impl=impl).sum()
    _assert_refused(loss, (h, w), "two-pass route")
    # First order still works on the same graph shape.
    loss = dpo_fast.sequence_logps(h, w, labels, impl=impl).sum()
    grads = torch.autograd.grad(loss, (h, w))
    assert all(torch.isfinite(g).all() for g in grads)


def test_whole_pair_route_refuses_create_graph(device):
    h, w, _, labels = make_batch(2, 5, 16, 40, device=device)
    loss = dpo_fast.dpo_loss(h, w, labels, impl="torch").loss
    _assert_refused(loss, (h, w), "whole-pair route")


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("inplace", [False, True])
def test_logits_path_refuses_create_graph(impl, inplace, device):
    leaf = torch.randn(3, 4, 30, device=device, requires_grad=True)
    labels = torch.randint(0, 30, (3, 4), device=device)
    logps = dpo_fast.token_logps_from_logits(leaf * 1.5, labels, impl=impl, inplace=inplace)
    _assert_refused(logps.sum(), (leaf,), "log-probs from logits")
