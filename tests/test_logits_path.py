"""Log-probs and DPO loss from logits a trainer already holds, against the float64 reference."""

import pytest
import torch

import dpo_fast
from dpo_fast import reference
from dpo_fast.objective import LossConfig
from dpo_fast.transform import LogitTransform
from helpers import abs_or_rel_err, rel_err

IMPLS = ["chunked", "torch"]


def _labels(shape, vocab, device, ignore_frac=0.3):
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = -100
    return labels


def _check_logits_path(logits_leaf, view, labels, impl, temperature=1.0, inplace=False, tol=1e-5):
    ours = dpo_fast.token_logps_from_logits(view, labels, impl=impl, temperature=temperature, inplace=inplace)
    assert ours.dtype == torch.float32 and ours.shape == labels.shape
    oracle, _ = reference.token_outputs_from_logits(view.detach(), labels,
                                                    transform=LogitTransform(temperature=temperature))
    assert rel_err(ours, oracle) < tol
    assert torch.all(ours[labels == -100] == 0)
    upstream = torch.randn_like(ours)
    (grad,) = torch.autograd.grad((ours * upstream).sum(), logits_leaf)
    leaf64 = logits_leaf.detach().double().requires_grad_()  # contiguous, like the leaf
    view64 = leaf64.as_strided(view.shape, view.stride(), view.storage_offset())  # the same view, in float64
    oracle64, _ = reference.token_outputs_from_logits(view64, labels, transform=LogitTransform(temperature=temperature))
    (grad64,) = torch.autograd.grad((oracle64 * upstream.double()).sum(), leaf64)
    return grad, grad64


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (1, 7), (6, 37), (5, 1000), (3, 50_000)])
def test_float32_matches_reference(impl, rows, vocab, device):
    logits = (torch.randn(rows, vocab, device=device) * 3).requires_grad_()
    labels = _labels((rows,), vocab, device, ignore_frac=0.2)
    grad, grad64 = _check_logits_path(logits, logits, labels, impl, temperature=0.7)
    assert rel_err(grad, grad64) < 1e-5
    assert torch.all(grad[labels == -100] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_three_dim_sliced_and_strided_logits(impl, device):
    # logits[:, :-1] (the usual next-token shift) cannot be flattened without a copy;
    # a vocab slice of a wider buffer has a row stride larger than V.
    wide = (torch.randn(3, 9, 130, device=device) * 2).requires_grad_()
    view = wide[:, :-1, 3:120]
    labels = _labels(view.shape[:-1], view.shape[-1], device)
    grad, grad64 = _check_logits_path(wide, view, labels, impl)
    assert rel_err(grad, grad64) < 1e-5
    assert torch.all(grad[:, -1] == 0) and torch.all(grad[..., :3] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_reuses_the_logits_buffer(impl, device):
    leaf = torch.randn(4, 6, 50, device=device, requires_grad=True)
    logits = leaf * 2  # a non-leaf activation, like an lm_head output
    labels = _labels((4, 6), 50, device)
    seen = {}
    logits.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    logps = dpo_fast.token_logps_from_logits(logits, labels, impl=impl, inplace=True)
    oracle, _ = reference.token_outputs_from_logits(logits.detach(), labels)
    assert rel_err(logps, oracle) < 1e-5
    upstream = torch.randn_like(logps)
    ptr = logits.data_ptr()
    (grad,) = torch.autograd.grad((logps * upstream).sum(), leaf)
    assert seen["ptr"] == ptr  # the gradient was written over the logits
    leaf64 = leaf.detach().double().requires_grad_()
    oracle64, _ = reference.token_outputs_from_logits(leaf64 * 2, labels)
    (grad64,) = torch.autograd.grad((oracle64 * upstream.double()).sum(), leaf64)
    assert rel_err(grad, grad64) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_naive(impl, dtype, device):
    logits = (torch.randn(8, 300, device=device) * 4).to(dtype).requires_grad_()
    labels = _labels((8,), 300, device)
    upstream = torch.randn(8, device=device)
    ours = dpo_fast.token_logps_from_logits(logits, labels, impl=impl)
    (grad,) = torch.autograd.grad((ours * upstream).sum(), logits)
    naive, _ = reference.token_outputs_from_logits(logits, labels, dtype=None)  # upcast to float32, as trainers do
    (naive_grad,) = torch.autograd.grad((naive * upstream).sum(), logits)
    leaf64 = logits.detach().double().requires_grad_()
    oracle, _ = reference.token_outputs_from_logits(leaf64, labels)
    (grad64,) = torch.autograd.grad((oracle * upstream.double()).sum(), leaf64)
    assert ours.dtype == torch.float32 and grad.dtype == dtype
    assert rel_err(ours, oracle) <= rel_err(naive, oracle) + 1e-5
    assert rel_err(grad, grad64) <= rel_err(naive_grad, grad64) + 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_neg_inf_and_huge_logits_and_ignored_rows(impl, device):
    logits = torch.randn(5, 40, device=device) * 1e4
    logits[0, 5:] = float("-inf")  # a row where most of the vocabulary is masked out
    logits[1, :] = float("-inf")  # a fully masked row, ignored
    logits.requires_grad_()
    labels = torch.tensor([2, -100, 7, -100, 39], device=device)
    logps = dpo_fast.token_logps_from_logits(logits, labels, impl=impl)
    oracle, _ = reference.token_outputs_from_logits(logits.detach(), labels)
    assert torch.isfinite(logps).all()
    assert rel_err(logps, oracle) < 1e-5
    (grad,) = torch.autograd.grad(logps.sum(), logits)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[1] == 0) and torch.all(grad[3] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logps_from_logits(impl, device):
    logits = torch.randn(4, 7, 60, device=device, requires_grad=True)
    labels = _labels((4, 7), 60, device)
    labels[2] = -100  # a row with no completion token sums to 0
    seq = dpo_fast.sequence_logps_from_logits(logits, labels, impl=impl)
    oracle, _ = reference.token_outputs_from_logits(logits.detach(), labels)
    assert seq.shape == (4,)
    assert rel_err(seq, oracle.sum(-1)) < 1e-5 and seq[2] == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_loss_from_logits(impl, loss_type, device):
    pairs, seq, vocab = 3, 6, 45
    logits = torch.randn(2 * pairs, seq, vocab, device=device, requires_grad=True)
    labels = _labels((2 * pairs, seq), vocab, device)
    labels[:, -1] = 3  # every row has at least one completion token
    ref_c, ref_r = torch.randn(pairs, device=device) * 3, torch.randn(pairs, device=device) * 3
    kwargs = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=0.2, loss_type=loss_type,
                  label_smoothing=0.1 if loss_type == "robust" else 0.0)
    out = dpo_fast.dpo_loss_from_logits(logits, labels, impl=impl, **kwargs)
    leaf64 = logits.detach().double().requires_grad_()
    cfg = LossConfig([loss_type], [1.0], 0.2, kwargs["label_smoothing"])
    oracle = reference.dpo_loss_from_logits(leaf64, labels, ref_chosen_logps=ref_c.double(),
                                            ref_rejected_logps=ref_r.double(), cfg=cfg)
    assert rel_err(out.loss, oracle.loss) < 1e-5
    for field in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "reward_margin",
                  "chosen_logits_mean", "rejected_logits_mean", "entropy"):
        # Vocab-mean logits sit near 0 (cancellation), so they are compared on a unit scale.
        assert abs_or_rel_err(getattr(out, field), getattr(oracle, field)) < 1e-5, field
    assert out.reward_accuracy == oracle.reward_accuracy and out.token_accuracy == oracle.token_accuracy
    (grad,) = torch.autograd.grad(out.loss, logits)
    (grad64,) = torch.autograd.grad(oracle.loss, leaf64)
    assert rel_err(grad, grad64) < 1e-5


def test_argmax_ties_go_to_the_first_maximum(device):
    logits = torch.zeros(3, 20, device=device)
    logits[:, 4] = logits[:, 9] = 5.0  # two maxima
    labels = torch.tensor([4, 9, 4], device=device)
    labels2 = labels.view(1, 3).repeat(2, 1)
    out = dpo_fast.dpo_loss_from_logits(logits.view(1, 3, 20).repeat(2, 1, 1), labels2, impl="chunked")
    assert float(out.token_accuracy) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------
# inplace=True: the gradient overwrites the logits, so aliasing must be refused or detected
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_refuses_expanded_logits_before_any_kernel(impl, device):
    base = torch.randn(1, 6, 50, device=device, requires_grad=True)
    logits = base.expand(4, 6, 50)  # stride 0: four rows share each element
    labels = _labels((4, 6), 50, device)
    with pytest.raises(ValueError, match="inplace=True needs logits whose elements do not share memory"):
        dpo_fast.token_logps_from_logits(logits, labels, impl=impl, inplace=True)
    # Without inplace the same expanded logits are read only, and the gradient sums over the copies.
    logps = dpo_fast.token_logps_from_logits(logits, labels, impl=impl)
    upstream = torch.randn_like(logps)
    (grad,) = torch.autograd.grad((logps * upstream).sum(), base)
    base64 = base.detach().double().requires_grad_()
    oracle, _ = reference.token_outputs_from_logits(base64.expand(4, 6, 50), labels)
    (grad64,) = torch.autograd.grad((oracle * upstream.double()).sum(), base64)
    assert rel_err(grad, grad64) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_over_logits_another_op_saved_fails_like_pytorch(impl, device):
    leaf = torch.randn(3, 5, 40, device=device, requires_grad=True)
    labels = _labels((3, 5), 40, device)
    logits = leaf * 2
    saved_by_pow = (logits ** 2).sum()  # pow saves the logits; its backward runs after ours
    logps = dpo_fast.token_logps_from_logits(logits, labels, impl=impl, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logps.sum() + saved_by_pow).backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_when_the_other_saved_use_is_done_first_is_exact(impl, device):
    leaf = torch.randn(3, 5, 40, device=device, requires_grad=True)
    labels = _labels((3, 5), 40, device)
    logits = leaf * 2
    logps = dpo_fast.token_logps_from_logits(logits, labels, impl=impl, inplace=True)
    saved_by_pow = (logits ** 2).sum()  # made later, so its backward runs before ours overwrites
    (grad,) = torch.autograd.grad(logps.sum() + saved_by_pow, leaf)
    leaf64 = leaf.detach().double().requires_grad_()
    oracle, _ = reference.token_outputs_from_logits(leaf64 * 2, labels)
    (grad64,) = torch.autograd.grad(oracle.sum() + ((leaf64 * 2) ** 2).sum(), leaf64)
    assert rel_err(grad, grad64) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("second_inplace", [True, False])
def test_inplace_logits_used_by_two_calls_fails_like_pytorch(impl, second_inplace, device):
    leaf = torch.randn(3, 5, 40, device=device, requires_grad=True)
    labels = _labels((3, 5), 40, device)
    logits = leaf * 2
    first = dpo_fast.token_logps_from_logits(logits, labels, impl=impl, inplace=second_inplace)
    second = dpo_fast.token_logps_from_logits(logits, labels, impl=impl, inplace=True)  # its backward runs first
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (first.sum() + second.sum()).backward()


# ----------------------------------------------------------------------------------------
# float64 logits: computed in float64 on PyTorch rows; the Triton rows compute in float32
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,vocab,scale", [(1, 7, 3.0), (6, 300, 3.0), (5, 1000, 1e3)])
def test_float64_logits_on_torch_rows_are_float64_exact(rows, vocab, scale, device):
    logits = (torch.randn(rows, vocab, device=device, dtype=torch.float64) * scale).requires_grad_()
    labels = _labels((rows,), vocab, device, ignore_frac=0.2)
    labels[0] = 0
    ours = dpo_fast.token_logps_from_logits(logits, labels, impl="torch", temperature=0.7)
    oracle, _ = reference.token_outputs_from_logits(logits, labels, transform=LogitTransform(temperature=0.7))
    assert ours.dtype == torch.float64
    upstream = torch.randn_like(ours)
    (grad,) = torch.autograd.grad((ours * upstream).sum(), logits)
    (grad64,) = torch.autograd.grad((oracle * upstream).sum(), logits)
    # float64 rounding of sums over V terms: far below anything float32 statistics could give (~1e-7).
    assert rel_err(ours, oracle) < 1e-12 and rel_err(grad, grad64) < 1e-12


def test_float64_logits_take_the_float64_rows(device):
    """The Triton row kernels compute in float32: 'auto' gives float64 logits to the PyTorch rows (float64
    in, float64 out), and impl='chunked' refuses them rather than hand float32 back (issue 22 item 7)."""
    logits = torch.randn(4, 50, dtype=torch.float64, device=device) * 3
    labels = torch.randint(0, 50, (4,), device=device)
    ours = dpo_fast.token_logps_from_logits(logits, labels, impl="auto")
    oracle, _ = reference.token_outputs_from_logits(logits, labels)
    assert ours.dtype == torch.float64 and rel_err(ours, oracle) < 1e-12
    with pytest.raises(TypeError, match="logits is float64.*impl='torch'"):
        dpo_fast.token_logps_from_logits(logits, labels, impl="chunked")
