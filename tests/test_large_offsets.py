"""Index arithmetic past 2^31 elements, without allocating tensors that large.

A [rows x V] tile or a [V x H] weight passes 2^31 elements at realistic sizes (16384 tokens
x 152064 vocabulary rows is 2.5e9). What matters is that every offset which scales with a
row index times a row stride is computed in int64. Each test builds a *view* with a huge
row stride over a storage that is only touched where the view's few rows lie: on CPU the
storage is a sparse file mapped into memory (untouched pages cost nothing), on a GPU a plain
uninitialised allocation. The kernels run on that view and must agree with a compact copy
of the same values. An int32 offset would wrap and read or write elsewhere: wrong values,
or a crash.
"""

import importlib.util

import pytest
import torch

import dpo_fast
from dpo_fast.kernels import logsoftmax_gather
from dpo_fast.rows import init_stats
from dpo_fast.transform import LogitTransform

IMPLS = ["torch", "chunked"] + (["fused"] if importlib.util.find_spec("dpo_fast.fused") is not None else [])
# (rows, row stride): row 2 of an int32 stride passes 2^31 (N * V > 2^31, the common case);
# strides just past int32 and past uint32 arrive as wider integer types.
TILE_SHAPES = [(3, 2**30 + 64), (2, 2**31 + 64), (2, 2**32 + 64)]


@pytest.fixture
def huge_view(tmp_path, device):
    """``make(shape, stride, dtype)``: a strided view whose storage spans max offset + 1 elements."""

    def make(shape, stride, dtype):
        numel = sum((n - 1) * s for n, s in zip(shape, stride)) + 1
        if device.type == "cuda":
            storage = torch.empty(numel, dtype=dtype, device=device)
        else:
            path = tmp_path / f"sparse-{len(list(tmp_path.iterdir()))}"
            with open(path, "wb") as f:
                f.truncate(numel * torch.finfo(dtype).bits // 8)  # a hole: no disk, no memory
            storage = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
        view = storage.as_strided(shape, stride)
        view.zero_()  # touches only the view's elements
        return view

    return make


@pytest.mark.parametrize("rows,row_stride", TILE_SHAPES)
def test_row_kernels_with_tile_offsets_past_int32(rows, row_stride, huge_view, device):
    cols = 48
    tile = huge_view((rows, cols), (row_stride, 1), torch.float16)
    tile.copy_(torch.randn(rows, cols, device=device) * 3)
    compact = tile.contiguous()
    labels = torch.tensor([5, 40, 47][:rows], device=device)
    kwargs = dict(vocab_start=0, ignore_index=-100, **LogitTransform(softcap=20.0).kernel_args())
    got, want = init_stats(rows, device), init_stats(rows, device)
    logsoftmax_gather.row_stats(tile, labels, got, **kwargs)
    logsoftmax_gather.row_stats(compact, labels, want, **kwargs)
    assert torch.equal(got, want)
    lse = torch.logsumexp(compact.float(), dim=1)
    grad_logp = torch.tensor([1.0, -0.5, 2.0][:rows], device=device)
    out = huge_view((rows, cols), (row_stride, 1), torch.float16)
    logsoftmax_gather.row_grad(tile, labels, lse, grad_logp, out, **kwargs)
    expected = torch.empty_like(compact)
    logsoftmax_gather.row_grad(compact, labels, lse, grad_logp, expected, **kwargs)
    assert torch.equal(out, expected) and expected.abs().sum() > 0
    logsoftmax_gather.row_grad(tile, labels, lse, grad_logp, tile, **kwargs)  # in place over the huge view
    assert torch.equal(tile, expected)


def test_row_stats_with_a_statistics_stride_past_int32(huge_view, device):
    """stats[k, row] lies at k * stride + row: k = 6 passes 2^31 for a stride of 4e8 tokens."""
    stride = 400_000_000
    stats = huge_view((7, 3), (stride, 1), torch.float32)
    stats.copy_(init_stats(3, device))
    tile = torch.randn(3, 70, device=device)
    labels = torch.tensor([0, -100, 69], device=device)
    kwargs = dict(vocab_start=0, ignore_index=-100, scale=1.0, softcap=None, inv_temperature=1.0)
    logsoftmax_gather.row_stats(tile, labels, stats, **kwargs)
    expected = init_stats(3, device)
    logsoftmax_gather.row_stats(tile, labels, expected, **kwargs)  # the same kernel on compact statistics
    assert torch.equal(stats, expected)
    assert torch.isfinite(expected[:, [0, 2]]).all() and torch.all(expected[:, 1] == init_stats(1, device)[:, 0])


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_logits_path_with_rows_past_int32(impl, huge_view, device):
    vocab = 40
    logits = huge_view((3, vocab), (2**30 + 64, 1), torch.float32)
    logits.copy_(torch.randn(3, vocab, device=device))
    logits.requires_grad_()
    compact = logits.detach().clone().requires_grad_()
    labels = torch.tensor([3, 31, 39], device=device)
    got = dpo_fast.token_logps_from_logits(logits, labels, impl=impl)
    want = dpo_fast.token_logps_from_logits(compact, labels, impl=impl)
    assert torch.equal(got, want)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    (expected,) = torch.autograd.grad(want.sum(), compact)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_with_rows_past_int32(impl, huge_view, device):
    """A [V, H] head viewed with a 2^28-element row stride: V * stride passes 2^31."""
    vocab, hidden = 9, 16
    weight = huge_view((vocab, hidden), (2**28 + 32, 1), torch.float32)
    weight.copy_(torch.randn(vocab, hidden, device=device))
    weight.requires_grad_()
    compact = weight.detach().clone().requires_grad_()
    h = torch.randn(2, 3, hidden, device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 3), device=device)
    labels[0, 0] = vocab - 1  # the last row, at the largest offset
    got = dpo_fast.token_logps(h, weight, labels, impl=impl)
    want = dpo_fast.token_logps(h, compact, labels, impl=impl)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    grad_h, grad_w = torch.autograd.grad(got.sum(), (h, weight))
    want_h, want_w = torch.autograd.grad(want.sum(), (h, compact))
    assert torch.allclose(grad_h, want_h, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_w, want_w, rtol=1e-5, atol=1e-6)
