"""impl="fused": tl.dot kernels with no logits in memory, against the float64 reference.

Shapes are small because the kernels run under the Triton interpreter on CPU. ``vocab_splits``
is forced in places so the split-merge paths run although the interpreter has no SMs to fill.
"""

import pytest
import torch

import dpo_fast
from dpo_fast import reference
from dpo_fast.function import TokenLogpsFunction
from dpo_fast.fused import BACKWARD_ROUTES, FusedEngine, fused_backward_wins
from dpo_fast.kernels.stats_layout import NUM_STATS, STAT_ARGMAX
from dpo_fast.objective import LossConfig
from dpo_fast.rows import KEPT_ONLY, finish_stats, triton_runs_on
from dpo_fast.transform import LogitTransform
from helpers import AllocationRecorder, abs_or_rel_err, make_batch, rel_err

TRANSFORMS = [LogitTransform(), LogitTransform(0.7, 2.5, 1.3)]
TRANSFORM_IDS = ["plain", "scale-softcap-temperature"]


@pytest.fixture(autouse=True)
def _needs_triton(device):
    if not triton_runs_on(device):  # conftest sets TRITON_INTERPRET=1 on CPU, so this should not happen
        pytest.fail("Triton cannot run on this device: the fused tests would test nothing")


def _as64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def _grads(out, inputs):
    return torch.autograd.grad(out, [t for t in inputs if t is not None])


def _tokens(n, hidden, vocab, dtype=torch.float32, device="cpu", bias=True, spread=1.0):
    """Packed kept tokens for the engine: hidden [n, H], weight [V, H], bias [V], labels [n]."""
    h = (torch.randn(n, hidden, device=device) * spread).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) / hidden ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, device=device) * 0.1).to(dtype).requires_grad_() if bias else None
    return h, w, b, torch.randint(0, vocab, (n,), device=device)


def _oracle_objective(h64, w64, b64, labels, transform, g, g_entropy):
    """sum(g * logp + g_entropy * entropy) in float64, differentiable (reference.py detaches entropy)."""
    z = transform.apply(torch.nn.functional.linear(h64, w64, b64))
    log_probs = torch.log_softmax(z, dim=-1)
    logp = log_probs.gather(1, labels[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return (g.double() * logp + g_entropy.double() * entropy).sum()


# ----------------------------------------------------------------------------------------
# engine level: statistics, metrics, gradients
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", BACKWARD_ROUTES)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
@pytest.mark.parametrize("splits", [None, 3], ids=["one-split", "three-splits"])
def test_outputs_and_gradients_with_entropy(transform, splits, route, device):
    """V = 251 (prime: no block divides it), entropy gradient on, every metric checked, both backwards."""
    h, w, b, labels = _tokens(70, 24, 251, device=device)
    logps, entropy, log_sum_sq, mean_logits, is_top1 = TokenLogpsFunction.apply(
        h, w, b, labels, FusedEngine(vocab_splits=splits, backward_route=route), transform)
    h64, w64, b64 = _as64(h, w, b)
    want_logps, want = reference.token_outputs(h64, w64, labels, bias=b64, transform=transform)
    assert rel_err(logps, want_logps) < 1e-5
    assert rel_err(entropy, want["entropy"]) < 1e-5
    assert rel_err(log_sum_sq, want["log_sum_sq_probs"]) < 1e-5
    assert rel_err(mean_logits, want["mean_logits"]) < 1e-5
    assert torch.equal(is_top1, want["is_top1"])
    g, g_entropy = torch.randn(70, device=device), torch.randn(70, device=device)
    got = _grads((g * logps + g_entropy * entropy).sum(), (h, w, b))
    expected = _grads(_oracle_objective(h64, w64, b64, labels, transform, g, g_entropy), (h64, w64, b64))
    for name, a, e in zip(("hidden", "weight", "bias"), got, expected):
        assert rel_err(a, e) < 1e-5, name


def test_first_maximum_wins_across_tiles_and_splits(device):
    """Equal maxima in different tiles and splits: the argmax is the first, as torch.argmax."""
    h, w, _, labels = _tokens(5, 16, 200, device=device, bias=False)
    w.data /= w.data.norm(dim=1, keepdim=True)  # unit rows: h = 10 w[10] scores highest on copies of w[10]
    w.data[100] = w.data[10]  # a copy in a later tile of the same split
    w.data[150] = w.data[10]  # and one in a later split
    h.data[:] = w.data[10] * 10
    labels[:] = 10
    stats = FusedEngine(vocab_splits=3).forward_stats(h.detach(), w.detach(), None, labels, LogitTransform())
    *_, is_top1 = TokenLogpsFunction.apply(h.detach(), w.detach(), None, labels, FusedEngine(vocab_splits=3),
                                           LogitTransform())
    assert torch.all(stats[STAT_ARGMAX] == 10)
    assert bool(is_top1.all())


def test_single_token_and_no_token(device):
    h, w, b, labels = _tokens(1, 16, 97, device=device)
    logps, *_ = TokenLogpsFunction.apply(h, w, b, labels, FusedEngine(), LogitTransform())
    h64, w64, b64 = _as64(h, w, b)
    want, _ = reference.token_outputs(h64, w64, labels, bias=b64)
    assert rel_err(logps, want) < 1e-5
    for a, e in zip(_grads(logps.sum(), (h, w, b)), _grads(want.sum(), (h64, w64, b64))):
        assert rel_err(a, e) < 1e-5
    engine = FusedEngine()
    empty_h = torch.zeros(0, 16, device=device)
    stats = engine.forward_stats(empty_h, w.detach(), b.detach(), labels[:0], LogitTransform())
    assert stats.shape == (NUM_STATS, 0)
    gh, gw, gb = engine.backward(empty_h, w.detach(), b.detach(), labels[:0], LogitTransform(),
                                 torch.zeros(0, device=device), torch.zeros(0, device=device))
    assert gh.shape == (0, 16) and not gw.any() and not gb.any()


@pytest.mark.parametrize("route", BACKWARD_ROUTES)
def test_needs_select_gradients(route, device):
    h, w, b, labels = _tokens(20, 16, 120, device=device)
    engine, transform = FusedEngine(backward_route=route), LogitTransform()
    stats = engine.forward_stats(h.detach(), w.detach(), b.detach(), labels, transform)
    lse = finish_stats(stats, labels, 120, KEPT_ONLY).lse
    g = torch.randn(20, device=device)
    args = (h.detach(), w.detach(), b.detach(), labels, transform, lse, g)
    full = engine.backward(*args, needs=(True, True, True))
    for needs in [(True, False, False), (False, True, False), (False, False, True)]:
        part = engine.backward(*args, needs=needs)
        for need, a, e in zip(needs, part, full):
            assert (a is None) != need
            if need:
                assert torch.equal(a, e)


LLAMA3_8B_HEAD = dict(tokens=8192, hidden_size=4096, vocab=128256, input_dtype=torch.bfloat16)


def test_backward_rule_at_llama_head():
    """The tiled backward at a real head; the fused one only where filtering skips most tiles.

    Thresholds from cost_model.fused_backward_wins on an H100 at datasheet peaks (989 TFLOP/s, 3.35 TB/s):
    kept < ~7.3% (trainable), < ~14% (frozen).
    """
    assert not fused_backward_wins(**LLAMA3_8B_HEAD)
    assert not fused_backward_wins(**LLAMA3_8B_HEAD, need_weight=False)
    assert fused_backward_wins(**LLAMA3_8B_HEAD, kept_fraction=0.07)
    assert not fused_backward_wins(**LLAMA3_8B_HEAD, kept_fraction=0.10)
    assert fused_backward_wins(**LLAMA3_8B_HEAD, need_weight=False, kept_fraction=0.14)
    assert not fused_backward_wins(**LLAMA3_8B_HEAD, need_weight=False, kept_fraction=0.18)
    # A tiny hidden size makes the tiled route's logits traffic dominate: fused wins there.
    assert fused_backward_wins(8192, 16, 128256, torch.bfloat16)


def test_engine_routes(device):
    h, w, _, _ = _tokens(64, 128, 300, dtype=torch.bfloat16, device=device, bias=False)
    needs = (True, True, False)
    assert FusedEngine().route(h, w, needs) == "tiled"  # H = 128: logits traffic is already the smaller cost
    assert FusedEngine(filter_eps=1e-3).route(h, w, needs) == "fused"  # only the fused backward filters
    assert FusedEngine(backward_route="fused").route(h, w, needs) == "fused"
    small_h, small_w, _, _ = _tokens(64, 16, 300, dtype=torch.bfloat16, device=device, bias=False)
    assert FusedEngine().route(small_h, small_w, needs) == "fused"
    with pytest.raises(ValueError, match="backward_route"):
        FusedEngine(backward_route="cublas")
    with pytest.raises(ValueError, match="filter_eps"):
        FusedEngine(filter_eps=1e-3, backward_route="tiled")


# ----------------------------------------------------------------------------------------
# public API: token, sequence and DPO losses
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_token_logps_api(transform, device):
    h, w, b, labels = make_batch(2, 9, 24, 101, device=device, bias=True, empty_rows=(1,))
    kwargs = dict(bias=b, logit_scale=transform.scale, softcap=transform.softcap, temperature=transform.temperature)
    ours = dpo_fast.token_logps(h, w, labels, impl="fused", **kwargs)
    h64, w64, b64 = _as64(h, w, b)
    oracle, _ = reference.token_outputs(h64, w64, labels, bias=b64, transform=transform)
    assert ours.shape == labels.shape and ours.dtype == torch.float32
    assert rel_err(ours, oracle) < 1e-5 and torch.all(ours[labels == -100] == 0)
    upstream = torch.randn_like(ours)
    got = _grads((ours * upstream).sum(), (h, w, b))
    expected = _grads((oracle * upstream.double()).sum(), (h64, w64, b64))
    for a, e in zip(got, expected):
        assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("packing", ["cu_seqlens", "sequence_ids"])
def test_packed_sequence_logps(packing, device):
    lengths = [5, 0, 7, 3]  # the second sequence is empty
    n = sum(lengths)
    h, w, b, labels = _tokens(n, 16, 90, device=device)
    labels[[0, 6]] = -100  # prompt tokens inside the pack
    seq_ids = torch.repeat_interleave(torch.arange(4, device=device), torch.tensor(lengths, device=device))
    cu = torch.tensor([0, 5, 5, 12, 15], device=device)
    pack = dict(cu_seqlens=cu) if packing == "cu_seqlens" else dict(sequence_ids=seq_ids)
    ours = dpo_fast.sequence_logps(h, w, labels, bias=b, impl="fused", **pack)
    h64, w64, b64 = _as64(h, w, b)
    oracle = reference.sequence_logps(h64, w64, labels, bias=b64, **pack)
    assert ours.shape == (4,) and ours[1] == 0
    assert rel_err(ours, oracle) < 1e-5
    upstream = torch.randn(4, device=device)
    got = _grads((ours * upstream).sum(), (h, w, b))
    expected = _grads((oracle * upstream.double()).sum(), (h64, w64, b64))
    for a, e in zip(got, expected):
        assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot"])
def test_dpo_loss_and_metrics(loss_type, device):
    h, w, b, labels = make_batch(3, 8, 16, 83, device=device, bias=True, empty_rows=(4,))
    ref_c, ref_r = torch.randn(3, device=device) - 20, torch.randn(3, device=device) - 20
    out = dpo_fast.dpo_loss(h, w, labels, bias=b, beta=0.3, loss_type=loss_type, ref_chosen_logps=ref_c,
                            ref_rejected_logps=ref_r, impl="fused", softcap=4.0)
    h64, w64, b64 = _as64(h, w, b)
    oracle = reference.dpo_loss(h64, w64, labels, bias=b64, transform=LogitTransform(softcap=4.0),
                                ref_chosen_logps=ref_c.double(), ref_rejected_logps=ref_r.double(),
                                cfg=LossConfig(loss_types=[loss_type], beta=0.3))
    assert rel_err(out.loss, oracle.loss) < 1e-5
    assert rel_err(out.chosen_logps, oracle.chosen_logps) < 1e-5
    # Metrics may sit near 0 (a vocabulary-mean logit): measured on a scale of at least 1.
    for field in ("rejected_logps", "chosen_rewards", "reward_margin", "chosen_logits_mean", "token_accuracy",
                  "entropy"):
        assert abs_or_rel_err(getattr(out, field), getattr(oracle, field)) < 1e-5, field
    assert out.rejected_logps[1] == 0  # row 4 (rejected of pair 1) has no completion token
    for a, e in zip(_grads(out.loss, (h, w, b)), _grads(oracle.loss, (h64, w64, b64))):
        assert rel_err(a, e) < 1e-5


def test_bfloat16_no_worse_than_naive(device):
    """Low precision: errors against float64 no worse than the naive bf16 path's, plus a small margin."""
    h, w, b, labels = make_batch(2, 12, 32, 150, dtype=torch.bfloat16, device=device, bias=True)
    ref_c, ref_r = torch.randn(2, device=device) - 30, torch.randn(2, device=device) - 30
    kwargs = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    out = dpo_fast.dpo_loss(h, w, labels, bias=b, impl="fused", **kwargs)
    naive = reference.dpo_loss(h, w, labels, bias=b, dtype=None, **kwargs)
    h64, w64, b64 = _as64(h, w, b)
    oracle = reference.dpo_loss(h64, w64, labels, bias=b64, ref_chosen_logps=ref_c.double(),
                                ref_rejected_logps=ref_r.double())
    assert rel_err(out.chosen_logps, oracle.chosen_logps) <= rel_err(naive.chosen_logps, oracle.chosen_logps) + 2e-3
    ours_g, naive_g = _grads(out.loss, (h, w, b)), _grads(naive.loss, (h, w, b))
    for got, base, want in zip(ours_g, naive_g, _grads(oracle.loss, (h64, w64, b64))):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) <= rel_err(base, want) + 1e-2


def test_bfloat16_weight_gradient_scratch_groups_change_nothing(device):
    """A small budget makes grad_weight go through several float32 scratch groups: same bits."""
    h, w, b, labels = _tokens(40, 16, 600, dtype=torch.bfloat16, device=device)
    g = torch.randn(40, device=device)
    results = []
    for budget in (None, 256 * 4 * 16):  # 256 float32 rows of H = 16 per group: 3 groups
        engine = FusedEngine(memory_budget=budget, backward_route="fused")
        logps, *_ = TokenLogpsFunction.apply(h, w, b, labels, engine, LogitTransform())
        results.append(_grads((logps * g).sum(), (h, w, b)))
    for a, e in zip(*results):
        assert torch.equal(a, e)


def test_float64_inputs_are_refused_by_the_float32_kernels(device):
    """Issue 22 item 7: the fused kernels compute in float32; float64 inputs (whose caller means float64) are
    refused with the way to float64 math, not computed in float32 and handed back as float32."""
    h, w, b, labels = _tokens(30, 16, 70, dtype=torch.float64, device=device)
    for call in (lambda: dpo_fast.token_logps(h, w, labels, bias=b, impl="fused"),
                 lambda: dpo_fast.sequence_logps(h, w, labels, bias=b, impl="chunked"),
                 lambda: dpo_fast.token_logps_from_logits(h @ w.t(), labels, impl="chunked")):
        with pytest.raises(TypeError, match="float64.*impl='torch'.*dpo_fast.reference"):
            call()


def test_the_engine_still_takes_float64_and_computes_in_float32(device):
    """Below the public functions the engine reads float64 operands (the gradcheck of tests/test_compile.py
    relies on it) and folds them into float32 statistics."""
    h, w, b, labels = _tokens(30, 16, 70, dtype=torch.float64, device=device)
    logps, *_ = TokenLogpsFunction.apply(h, w, b, labels, FusedEngine(), LogitTransform())
    want, _ = reference.token_outputs(h, w, labels, bias=b)
    assert logps.dtype == torch.float32 and rel_err(logps, want) < 1e-5
    for a, e in zip(_grads(logps.sum(), (h, w, b)), _grads(want.sum(), (h, w, b))):
        assert a.dtype == torch.float64 and rel_err(a, e) < 1e-5


# ----------------------------------------------------------------------------------------
# determinism, gradient filtering, memory
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", BACKWARD_ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeat_runs_are_bit_identical(dtype, route, device):
    h, w, b, labels = _tokens(50, 16, 130, dtype=dtype, device=device)
    g, g_entropy = torch.randn(50, device=device), torch.randn(50, device=device)
    runs = []
    for _ in range(2):
        engine = FusedEngine(vocab_splits=2, backward_route=route)
        logps, entropy, *metrics = TokenLogpsFunction.apply(h, w, b, labels, engine, LogitTransform(softcap=3.0))
        grads = _grads((g * logps + g_entropy * entropy).sum(), (h, w, b))
        runs.append([logps, entropy, *metrics, *grads])
    for a, e in zip(*runs):
        assert torch.equal(a, e)


def test_gradient_filtering_is_bounded_and_off_by_default(device):
    """filter_eps skips tiles whose every |g (onehot - p)| < eps: error under eps * sum |other factor|."""
    n, hidden, vocab = 64, 16, 512
    h = torch.randn(n, hidden, device=device).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) * 0.1).requires_grad_()  # near-uniform softmax
    labels = torch.randint(0, 32, (n,), device=device)  # labels in the first tile: later tiles only hold p
    # |g| = 0.01 and p < 0.01 make every label-free tile fall below eps = 1e-3: filtering must skip them.
    g = 0.01 * torch.randn(n, device=device).sign()

    def grads(engine):
        logps, *_ = TokenLogpsFunction.apply(h, w, None, labels, engine, LogitTransform())
        return _grads((g * logps).sum(), (h, w))

    exact = grads(FusedEngine(backward_route="fused"))
    assert all(torch.equal(a, e) for a, e in zip(grads(FusedEngine(filter_eps=1e-30)), exact))  # nothing skipped
    eps = 1e-3
    filtered = grads(FusedEngine(filter_eps=eps))
    err_h, err_w = [(a - e).abs() for a, e in zip(filtered, exact)]
    assert err_h.max() > 0  # some tiles were skipped
    # A skipped entry of d loss / d logit is below eps (dz/ds = 1 here), so each gradient entry
    # moves by at most eps times the sum of the other GEMM operand's magnitudes.
    assert bool((err_h <= eps * w.detach().abs().sum(0)[None, :] + 1e-6).all())
    assert bool((err_w <= eps * h.detach().abs().sum(0)[None, :] + 1e-6).all())
    print(f"filter_eps={eps}: max |error| / max |grad|: grad_hidden {rel_err(filtered[0], exact[0]):.2e}, "
          f"grad_weight {rel_err(filtered[1], exact[1]):.2e}")


def test_filter_eps_validation(device):
    h, w, _, labels = make_batch(1, 4, 16, 20, device=device)
    with pytest.raises(ValueError, match="filter_eps"):
        dpo_fast.token_logps(h, w, labels, impl="chunked", filter_eps=1e-3)
    with pytest.raises(ValueError, match="filter_eps"):
        dpo_fast.token_logps(h, w, labels, impl="fused", filter_eps=-1.0)
    with pytest.raises(TypeError, match="filter_eps"):
        dpo_fast.token_logps(h, w, labels, impl="fused", filter_eps="1e-3")
    out = dpo_fast.dpo_loss(h.repeat(2, 1, 1), w, labels.repeat(2, 1), impl="fused", filter_eps=1e-3)
    assert torch.isfinite(out.loss)


def test_no_logits_sized_tensor_in_forward_or_backward(device):
    """N = 256 tokens, V = 512, H = 16: N*V/8 = 16384 elements exceeds V*H, N*H and every gradient."""
    pairs, seq, hidden, vocab = 2, 64, 16, 512
    h, w, b, labels = make_batch(pairs, seq, hidden, vocab, device=device, prompt=0, bias=True)
    labels = torch.randint(0, vocab, labels.shape, device=device)  # every token counts: N = 256
    limit = labels.numel() * vocab // 8
    assert limit > max(w.numel(), h.numel())

    def largest(run_impl):
        recorder = AllocationRecorder()
        with recorder:
            run_impl()
        return recorder.largest()

    def fused():
        out = dpo_fast.dpo_loss(h, w, labels, bias=b, impl="fused", loss_type="sigmoid")
        torch.autograd.grad(out.loss, (h, w, b))

    def naive():  # the recorder must see what the fused path avoids
        torch.autograd.grad(reference.dpo_loss(h, w, labels, bias=b, dtype=None).loss, (h, w, b))

    numel, _, op = largest(fused)
    assert numel < limit, (numel, op)
    assert largest(naive)[0] >= limit
