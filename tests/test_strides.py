"""Every tensor argument of every public function, on every impl, at any strides, against the float64 oracle.

Non-contiguous views are what real callers pass: hidden states sliced from a wider buffer, a weight
stored transposed (column-major) or taken every other row, a bias that is a column of a parameter
block (``bias[::2]``: impl="fused" read it as ``b_ptr + v`` and gave log-probs 3 nats wrong),
labels sliced from a padded batch, logits with a vocabulary stride. Each is either read at its
strides or copied once (``dpo_fast/fused.py``, ``dpo_fast/logits_path.py``).
"""

import pytest
import torch

import dpo_fast
from dpo_fast import reference
from helpers import rel_err

IMPLS = ["torch", "chunked", "fused", "auto"]
WEIGHT_LAYOUTS = ["column-major", "every-other-row", "every-other-column"]
ROWS, T, H, V = 4, 7, 24, 97


def _strided_inputs(weight_layout, gen, device):
    """Views of leaf tensors (gradients reach the bases, as a model's parameters would get them)."""
    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()

    hidden = leaf(ROWS, T, 2 * H)[..., ::2]  # hidden size stride 2
    if weight_layout == "column-major":
        weight = leaf(H, V, scale=H ** -0.5).t()  # weight.t().contiguous().t()
    elif weight_layout == "every-other-row":
        weight = leaf(2 * V, H, scale=H ** -0.5)[::2]
    else:
        weight = leaf(V, 2 * H, scale=H ** -0.5)[:, ::2]
    bias = leaf(2 * V, scale=0.5)[::2]
    labels = torch.randint(0, V, (ROWS, 2 * T), generator=gen).to(device)[:, ::2]
    labels[:, :2] = -100
    labels[1, 5:] = -100
    for t in (hidden, weight, bias, labels):
        assert not t.is_contiguous()
    return hidden, weight, bias, labels


@pytest.mark.parametrize("weight_layout", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_hidden_state_functions_at_any_strides(impl, weight_layout, device):
    gen = torch.Generator().manual_seed(IMPLS.index(impl) * 10 + WEIGHT_LAYOUTS.index(weight_layout))
    hidden, weight, bias, labels = _strided_inputs(weight_layout, gen, device)
    h64, w64, b64 = (t.detach().double().contiguous().requires_grad_() for t in (hidden, weight, bias))
    want = reference.token_outputs(h64.reshape(-1, H), w64, labels.reshape(-1), bias=b64)[0].view(ROWS, T)

    logps = dpo_fast.token_logps(hidden, weight, labels, bias=bias, impl=impl)
    assert rel_err(logps, want) < 1e-5
    upstream = torch.randn(ROWS, T, generator=gen).to(device)
    got = torch.autograd.grad((logps * upstream).sum(), (hidden, weight, bias))
    expected = torch.autograd.grad((want * upstream.double()).sum(), (h64, w64, b64))
    for name, g, e in zip(("hidden", "weight", "bias"), got, expected):
        assert rel_err(g, e) < 1e-5, name

    sums = dpo_fast.sequence_logps(hidden, weight, labels, bias=bias, impl=impl)
    assert rel_err(sums, want.sum(-1)) < 1e-5

    want_loss = reference.dpo_loss(h64, w64, labels, bias=b64).loss
    for out in (dpo_fast.dpo_loss(hidden, weight, labels, bias=bias, impl=impl),
                dpo_fast.DPOLoss(impl=impl)(hidden, weight, labels, bias=bias)):
        assert rel_err(out.loss, want_loss) < 1e-5
        got = torch.autograd.grad(out.loss, (hidden, weight, bias))
        expected = torch.autograd.grad(want_loss, (h64, w64, b64), retain_graph=True)
        for name, g, e in zip(("hidden", "weight", "bias"), got, expected):
            assert rel_err(g, e) < 1e-5, name


@pytest.mark.parametrize("impl", ["torch", "chunked", "auto"])
def test_logits_functions_at_any_strides(impl, device):
    gen = torch.Generator().manual_seed(7)
    wide = (torch.randn(ROWS, T, 2 * V, generator=gen) * 2).to(device).requires_grad_()
    logits = wide[..., ::2]  # a vocabulary stride of 2
    labels = torch.randint(0, V, (ROWS, 2 * T), generator=gen).to(device)[:, ::2]
    labels[:, :2] = -100
    flat_logits = wide.reshape(-1, 2 * V)[::2, ::2]  # 1-D labels, strided too
    flat_labels = torch.randint(0, V, (ROWS * T,), generator=gen).to(device)[::2]
    for t in (logits, labels, flat_logits, flat_labels):
        assert not t.is_contiguous()

    def oracle(z, y):
        return reference.token_outputs_from_logits(z.detach().double().contiguous().requires_grad_(), y)[0]

    want = oracle(logits, labels)
    assert rel_err(dpo_fast.token_logps_from_logits(logits, labels, impl=impl), want) < 1e-5
    assert rel_err(dpo_fast.sequence_logps_from_logits(logits, labels, impl=impl), want.sum(-1)) < 1e-5
    assert rel_err(dpo_fast.token_logps_from_logits(flat_logits, flat_labels, impl=impl),
                   oracle(flat_logits, flat_labels)) < 1e-5

    z64 = logits.detach().double().contiguous().requires_grad_()
    want_loss = reference.dpo_loss_from_logits(z64, labels).loss
    out = dpo_fast.dpo_loss_from_logits(logits, labels, impl=impl)
    assert rel_err(out.loss, want_loss) < 1e-5
    (grad,) = torch.autograd.grad(out.loss, (logits,))
    (grad64,) = torch.autograd.grad(want_loss, (z64,))
    assert rel_err(grad, grad64) < 1e-5
