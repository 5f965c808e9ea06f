"""Numerical edge cases against the float64 reference (``dpo_fast.reference``), for every impl.

Documented behaviour checked here:

- Logits of magnitude 1e4 and more: exact to float32 rounding (the statistics are an online
  log-sum-exp in float32, shifted by the running max).
- float16 inputs whose logits pass float16's range (|logit| > 65504): every impl stays finite
  and exact where the naive float16 path gives inf/NaN. impl="fused" keeps its logits in a
  float32 accumulator; impl="torch" and "chunked" compute float16 inputs' logits tiles in
  float32 (their gradient tile, which fits float16, feeds the gradient GEMMs).
- -inf bias entries (masked vocabulary): those entries get probability 0 and no gradient;
  a label on one gets log-prob -inf, as ``torch.log_softmax`` gives.
- softcap with extreme or infinite logits: saturates at +-softcap with zero derivative.
- A row whose every label is ignored: log-prob 0, zero gradient, no NaN; a batch where every
  token is ignored: zero log-probs, the loss of all-zero log-probs, zero gradients.
- V=1: every log-prob is 0. V=256000 with a few tokens: as exact as small vocabularies.
- NaN/Inf in inputs propagate (a NaN hidden row makes that token's log-prob NaN, a NaN in
  the weight makes every log-prob NaN), like the naive path; ``check_finite=True`` raises
  ValueError before any work instead.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import dpo_fast
from dpo_fast import reference
from dpo_fast.objective import LossConfig
from dpo_fast.transform import LogitTransform
from helpers import float32_sum_tol, make_batch, rel_err

HAS_FUSED = importlib.util.find_spec("dpo_fast.fused") is not None
IMPLS = ["torch", "chunked"] + (["fused"] if HAS_FUSED else [])
ON_GPU = torch.cuda.is_available()


def _as64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def _grads(out, inputs, upstream=None):
    target = out if upstream is None else (out * upstream).sum()
    return torch.autograd.grad(target, [t for t in inputs if t is not None], allow_unused=True, retain_graph=True)


def _check_token_logps(impl, h, w, labels, bias=None, transform=LogitTransform(), tol=1e-5, grad_tol=None):
    """Our log-probs and gradients vs float64, for an arbitrary upstream gradient; returns ours."""
    ours = dpo_fast.token_logps(h, w, labels, bias=bias, impl=impl, logit_scale=transform.scale,
                                softcap=transform.softcap, temperature=transform.temperature)
    h64, w64, b64 = _as64(h, w, bias)
    oracle, _ = reference.token_outputs(h64, w64, labels, bias=b64, transform=transform)
    finite = torch.isfinite(oracle)
    assert torch.equal(torch.isfinite(ours), finite)
    assert torch.equal(ours[~finite], oracle[~finite].float())  # -inf where the reference says -inf
    assert rel_err(ours[finite], oracle[finite]) < tol
    upstream = torch.randn_like(ours)
    for got, want in zip(_grads(ours, (h, w, bias), upstream), _grads(oracle, (h64, w64, b64), upstream.double())):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < (grad_tol or tol)
    return ours


# ----------------------------------------------------------------------------------------
# large logits
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_logits_of_magnitude_1e4(impl, device):
    h, w, b, labels = make_batch(2, 6, 16, 64, device=device, bias=True, scale=1.0)
    with torch.no_grad():
        h.mul_(3e4 / (h.detach() @ w.detach().t()).abs().max())  # largest logit ~3e4, a sharp softmax
        largest = float((h @ w.t() + b).abs().max())
        assert largest > 1e4
    # Every path carries a token's log-sum-exp as one float32 number (~3e4 here): the backward's
    # softmax exp(z - lse) then has an exponent off by up to half an ulp of 3e4 (1e-3), a relative
    # error in p of that size. Plain PyTorch keeps z - max exact and does better at this scale;
    # at everyday logit sizes (|z| < 100) the difference is below float32 rounding of the rest.
    _check_token_logps(impl, h, w, labels, bias=b, grad_tol=torch.finfo(torch.float32).eps * largest)
    out = dpo_fast.dpo_loss(h, w, labels, bias=b, impl=impl)
    h64, w64, b64 = _as64(h, w, b)
    oracle = reference.dpo_loss(h64, w64, labels, bias=b64)
    # The same half-ulp of the log-sum-exp, per completion token, bounds the sequence sums; the
    # sigmoid loss moves by at most beta (0.1) times the error of the chosen-rejected difference.
    logp_tol = torch.finfo(torch.float32).eps * largest * labels.shape[1]
    assert float((out.chosen_logps.double() - oracle.chosen_logps).abs().max()) <= logp_tol
    assert float((out.rejected_logps.double() - oracle.rejected_logps).abs().max()) <= logp_tol
    assert abs(float(out.loss) - float(oracle.loss)) <= 0.1 * 2 * logp_tol


def _fp16_beyond_range(device):
    """float16 hidden/weight whose exact logits reach 1.2e5 (> 65504) in a few places; every token kept."""
    h, w, _, labels = make_batch(2, 5, 16, 40, device=device)
    labels = torch.randint(0, 40, labels.shape, device=device)  # an ignored token would hide its overflow
    with torch.no_grad():
        w16 = (w.detach() * 4).half()
        largest = (h.detach().double() @ w16.double().t()).abs().max()
        h16 = (h.detach() * (1.2e5 / largest)).half().requires_grad_()
        w16.requires_grad_()
    exact = h16.detach().double() @ w16.detach().double().t()
    assert exact.abs().max() > 65504
    return h16, w16, labels


@pytest.mark.parametrize("impl", IMPLS)
def test_float16_logits_beyond_float16_range(impl, device):
    h16, w16, labels = _fp16_beyond_range(device)
    oracle, _ = reference.token_outputs(h16, w16, labels)
    naive, _ = reference.token_outputs(h16, w16, labels, dtype=None)
    assert torch.isfinite(oracle).all()
    assert not torch.isfinite(naive).all()  # what a trainer gets today
    ours = dpo_fast.token_logps(h16, w16, labels, impl=impl)
    assert torch.isfinite(ours).all(), "log-probs are not finite where the float64 answer is"
    assert rel_err(ours, oracle) < 1e-4
    # A small upstream gradient: gradients of hidden states ~1e4 must themselves fit float16.
    grads = _grads(ours, (h16, w16), torch.randn_like(ours) * 1e-3)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_float16_logits_inside_float16_range(impl, device):
    """Large but representable float16 logits (|logit| up to ~6e4): finite, and no worse than naive."""
    h16, w16, labels = _fp16_beyond_range(device)
    with torch.no_grad():
        h16.mul_(0.5)
    exact = h16.detach().double() @ w16.detach().double().t()
    assert 1e4 < exact.abs().max() < 65504
    oracle, _ = reference.token_outputs(h16, w16, labels)
    naive, _ = reference.token_outputs(h16, w16, labels, dtype=None)
    ours = dpo_fast.token_logps(h16, w16, labels, impl=impl)
    assert torch.isfinite(ours).all()
    # float16 logits of ~6e4 are rounded by up to 32: the error scale is the naive path's.
    assert rel_err(ours, oracle) <= rel_err(naive, oracle) + 1e-3


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_float16_logits_input_near_float16_max(impl, device):
    """Logits a trainer holds in float16 can only be finite: the statistics (float32) never overflow."""
    logits = (torch.rand(4, 6, 50, device=device) * 1.3e5 - 6.5e4).clamp(-65000, 65000).half().requires_grad_()
    labels = torch.randint(0, 50, (4, 6), device=device)
    ours = dpo_fast.token_logps_from_logits(logits, labels, impl=impl)
    oracle, _ = reference.token_outputs_from_logits(logits.detach().double().requires_grad_(), labels)
    finite = torch.isfinite(oracle)
    # Gaps of thousands between logits: most labels sit at log-prob -1e4 or so, a few at 0.
    assert torch.equal(torch.isfinite(ours), finite)
    assert rel_err(ours[finite], oracle[finite]) < 1e-6
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------
# -inf and softcap
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_bias_entries(impl, device):
    h, w, b, labels = make_batch(2, 6, 16, 45, device=device, bias=True)
    masked = torch.arange(45, device=device) % 3 == 0
    with torch.no_grad():
        b[masked] = float("-inf")
        labels[labels % 3 == 0] += 1  # labels on allowed tokens only
        labels[0, 3] = 0  # ... but one: its log-prob is -inf
    ours = _check_token_logps(impl, h, w, labels, bias=b)
    assert ours[0, 3] == float("-inf")
    (grad_b,) = _grads(ours[1].sum(), (b,))
    assert torch.all(grad_b[masked] == 0)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_minus_inf_logits_and_a_row_without_any_finite_logit(impl, device):
    logits = torch.randn(3, 40, device=device)
    logits[:, ::4] = float("-inf")
    logits[2] = float("-inf")  # no distribution at all
    logits.requires_grad_()
    labels = torch.tensor([1, 6, 2], device=device)
    ours = dpo_fast.token_logps_from_logits(logits, labels, impl=impl)
    oracle, _ = reference.token_outputs_from_logits(logits.detach().double(), labels)
    assert rel_err(ours[:2], oracle[:2]) < 1e-6
    assert torch.isnan(ours[2]) and torch.isnan(oracle[2])  # as torch.log_softmax
    (grad,) = torch.autograd.grad(ours[:2].sum(), logits)
    assert torch.isfinite(grad).all() and torch.all(grad[2] == 0) and torch.all(grad[:, ::4] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("magnitude", [1e3, 1e30])
def test_softcap_with_extreme_logits(impl, magnitude, device):
    h, w, b, labels = make_batch(2, 5, 16, 48, device=device, bias=True)
    with torch.no_grad():
        h.mul_(magnitude)
        b[::5] = float("-inf")  # softcap maps -inf to -softcap: a finite logit again
        b[1::5] = float("inf") if magnitude > 1e3 else 0.0
    transform = LogitTransform(scale=0.5, softcap=30.0, temperature=0.7)
    # Raw logits of thousands carry ~1e-3 of float32 GEMM rounding (any summation order) into
    # the few unsaturated, O(30) softcapped logits: gradients then differ from float64 by up to
    # ~1e-4 relative, and so does plain float32 PyTorch (5e-5 over 30 seeds); 5e-4 leaves room.
    ours = _check_token_logps(impl, h, w, labels, bias=b, transform=transform, tol=5e-4)
    assert torch.isfinite(ours).all()


# ----------------------------------------------------------------------------------------
# ignored tokens, tiny completions, vocabulary extremes
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_row_with_every_label_ignored(impl, device):
    h, w, b, labels = make_batch(2, 6, 16, 37, device=device, bias=True, empty_rows=(1, 2))
    out = dpo_fast.dpo_loss(h, w, labels, bias=b, impl=impl, loss_type=["sigmoid", "ipo", "sft"],
                            loss_weights=[1.0, 0.1, 0.5])
    h64, w64, b64 = _as64(h, w, b)
    oracle = reference.dpo_loss(h64, w64, labels, bias=b64, cfg=LossConfig(["sigmoid", "ipo", "sft"],
                                                                         [1.0, 0.1, 0.5]))
    assert out.chosen_logps[1] == 0 and out.rejected_logps[0] == 0
    assert rel_err(out.loss, oracle.loss) < 1e-5
    grads = _grads(out.loss, (h, w, b))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][1] == 0) and torch.all(grads[0][2] == 0)
    for got, want in zip(grads, _grads(oracle.loss, (h64, w64, b64))):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token_completions(impl, device):
    h, w, _, labels = make_batch(3, 5, 16, 29, device=device)
    with torch.no_grad():
        labels[:, :] = -100
        labels[torch.arange(6), torch.randint(0, 5, (6,))] = torch.randint(0, 29, (6,)).to(device)
    for loss_type in ("sigmoid", "ipo", "simpo"):
        out = dpo_fast.dpo_loss(h, w, labels, impl=impl, loss_type=loss_type)
        h64, w64 = _as64(h, w)
        oracle = reference.dpo_loss(h64, w64, labels, cfg=LossConfig([loss_type]))
        assert rel_err(out.loss, oracle.loss) < 1e-5
        for got, want in zip(_grads(out.loss, (h, w)), _grads(oracle.loss, (h64, w64))):
            assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_every_token_of_the_batch_ignored(impl, device):
    h, w, b, labels = make_batch(2, 4, 16, 30, device=device, bias=True)
    labels = torch.full_like(labels, -100)
    assert torch.all(dpo_fast.token_logps(h, w, labels, bias=b, impl=impl) == 0)
    assert torch.all(dpo_fast.sequence_logps(h, w, labels, bias=b, impl=impl) == 0)
    out = dpo_fast.dpo_loss(h, w, labels, bias=b, impl=impl)
    oracle = reference.dpo_loss(*_as64(h, w), labels, bias=b.detach().double())
    assert rel_err(out.loss, oracle.loss) < 1e-6  # log 2: all log-ratios are zero
    grads = _grads(out.loss, (h, w, b))
    assert all(g is not None and torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_every_token_ignored_from_logits(impl, device):
    logits = torch.randn(4, 3, 11, device=device, requires_grad=True)
    labels = torch.full((4, 3), -100, device=device)
    out = dpo_fast.dpo_loss_from_logits(logits, labels, impl=impl)
    oracle = reference.dpo_loss_from_logits(logits.detach().double(), labels)
    assert rel_err(out.loss, oracle.loss) < 1e-6
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocabulary_of_one(impl, device):
    h, w, _, labels = make_batch(2, 4, 8, 1, device=device)
    ours = _check_token_logps(impl, h, w, labels)
    assert torch.all(ours == 0)
    out = dpo_fast.dpo_loss(h, w, labels, impl=impl)
    assert torch.all(out.chosen_logps == 0) and out.entropy == 0


# The fused kernels run tl.dot tile by tile in the interpreter: this shape takes minutes there,
# so on CPU only the cuBLAS-tiled paths take it (on a GPU every impl does).
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "fused" or ON_GPU])
def test_vocabulary_of_256000_with_few_tokens(impl, device):
    vocab = 256000
    h, w, b, labels = make_batch(1, 3, 8, vocab, device=device, bias=True, prompt=0)
    ours = dpo_fast.token_logps(h, w, labels, bias=b, impl=impl)
    kept = labels != -100
    naive = torch.log_softmax(h @ w.t() + b, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * kept
    h64, w64, b64 = _as64(h, w, b)
    oracle, _ = reference.token_outputs(h64, w64, labels, bias=b64)
    # The log-sum-exp sums 256000 float32 terms: sqrt(V) ulps.
    assert rel_err(ours, oracle) < float32_sum_tol(vocab)
    # grad_hidden = g * (w_target - sum_j p_j w_j) sums 256000 terms that largely cancel, so its error
    # relative to its own size depends on the draw and on the BLAS summation order: each gradient is
    # judged against naive float32 log_softmax's on the same inputs (and sqrt(V) ulps).
    upstream = torch.randn_like(ours)
    for got, plain, want in zip(_grads(ours, (h, w, b), upstream), _grads(naive, (h, w, b), upstream),
                                _grads(oracle, (h64, w64, b64), upstream.double())):
        assert rel_err(got, want) <= max(float32_sum_tol(vocab), 1.25 * rel_err(plain, want))


# ----------------------------------------------------------------------------------------
# NaN / Inf inputs
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_inf_inputs_propagate(impl, device):
    h, w, _, labels = make_batch(2, 5, 16, 33, device=device, prompt=0)
    with torch.no_grad():
        labels[:, :] = torch.randint(0, 33, labels.shape, device=device)
        bad_h = h.detach().clone()
        bad_h[0, 2, 3] = float("nan")
        bad_h[3, 1, 0] = float("inf")
    ours = dpo_fast.token_logps(bad_h, w.detach(), labels, impl=impl)
    oracle, _ = reference.token_outputs(bad_h.double(), w.detach().double(), labels)
    poisoned = ~torch.isfinite(oracle)
    assert poisoned[0, 2] and poisoned[3, 1] and poisoned.sum() == 2
    assert torch.equal(~torch.isfinite(ours), poisoned)  # non-finite exactly where the reference is
    assert torch.isnan(ours[0, 2])
    assert rel_err(ours[~poisoned], oracle[~poisoned]) < 1e-5
    bad_w = w.detach().clone()
    bad_w[7, 1] = float("nan")
    assert torch.isnan(dpo_fast.token_logps(h.detach(), bad_w, labels, impl=impl)).all()
    assert torch.isnan(dpo_fast.dpo_loss(h.detach(), bad_w, labels, impl=impl).loss)
    for kwargs in (dict(hidden=bad_h, weight=w), dict(hidden=h, weight=bad_w)):
        with pytest.raises(ValueError, match="hidden|weight"):
            dpo_fast.dpo_loss(kwargs["hidden"], kwargs["weight"], labels, impl=impl, check_finite=True)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_nan_logits_propagate_per_row(impl, device):
    logits = torch.randn(3, 4, 21, device=device)
    logits[1, 2, 5] = float("nan")
    labels = torch.randint(0, 21, (3, 4), device=device)
    ours = dpo_fast.token_logps_from_logits(logits, labels, impl=impl)
    assert torch.isnan(ours[1, 2]) and torch.isnan(ours).sum() == 1
    with pytest.raises(ValueError, match="logits"):
        dpo_fast.token_logps_from_logits(logits, labels, impl=impl, check_finite=True)


# ----------------------------------------------------------------------------------------
# the loss table at extreme margins
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_every_loss_formula_is_finite_in_float32_at_extreme_margins(beta):
    """Sequence log-probs of thousands (long completions) push beta * margin far past exp()'s float32 range
    (about 88): every formula must stay finite wherever the float64 one is, gradients included."""
    from dpo_fast.losses import LOSSES, pair_losses
    from dpo_fast.objective import pair_terms

    values = [-3000.0, -500.0, -100.0, -1.0, 0.0]
    chosen = torch.tensor([a for a in values for _ in values])
    rejected = torch.tensor([b for _ in values for b in values])
    lengths = torch.full_like(chosen, 7.0)
    for name in sorted(LOSSES):
        cfg = LossConfig([name], [1.0], beta, 0.1 if name in ("exo_pair", "robust") else 0.0)

        def loss_and_grad(dtype):
            c = chosen.to(dtype).requires_grad_()
            terms = pair_terms(c, rejected.to(dtype), torch.full_like(c, -50.0), torch.full_like(c, -60.0), lengths,
                               lengths, cfg, float(lengths.sum()), len(values) ** 2)
            loss = pair_losses(terms, [name], [1.0])
            return loss, torch.autograd.grad(loss.sum(), c)[0]

        (loss32, grad32), (loss64, grad64) = loss_and_grad(torch.float32), loss_and_grad(torch.float64)
        assert torch.isfinite(loss64).all() and torch.isfinite(grad64).all(), name
        assert torch.isfinite(loss32).all() and torch.isfinite(grad32).all(), name
        # ipo squares margins of hundreds: float32 keeps ~1e-5 of it.
        assert ((loss32.double() - loss64).abs() / loss64.abs().clamp(min=1)).max() < 1e-4, name


_INTERPRET_SET_LATE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch
import dpo_fast
os.environ["TRITON_INTERPRET"] = "1"  # too late: triton already built its own functions for the GPU
logits, labels = torch.randn(3, 20), torch.randint(0, 20, (3,))
h, w = torch.randn(3, 8), torch.randn(20, 8)
for call in (lambda: dpo_fast.token_logps_from_logits(logits, labels, impl="chunked"),
             lambda: dpo_fast.token_logps(h, w, labels, impl="chunked"),
             lambda: dpo_fast.token_logps(h, w, labels, impl="fused")):
    try:
        call()
        raise SystemExit("no error")
    except ValueError as e:
        assert "TRITON_INTERPRET=1 was set after triton was imported" in str(e), e
# impl="auto" takes the PyTorch rows, exactly.
expected = torch.log_softmax(logits.double(), -1).gather(1, labels[:, None]).squeeze(1)
assert torch.allclose(dpo_fast.token_logps_from_logits(logits, labels).double(), expected, rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors only reach Triton through the interpreter")
def test_triton_interpret_set_after_import_is_a_clear_value_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _INTERPRET_SET_LATE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
