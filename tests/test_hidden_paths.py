"""Log-probs and DPO losses from hidden states and the lm_head weight, for each impl, vs float64."""

import pytest
import torch

import dpo_fast
from dpo_fast import chunked, planner, reference, whole_pairs
from dpo_fast.losses import LOSSES
from dpo_fast.objective import LossConfig
from dpo_fast.transform import LogitTransform
from helpers import abs_or_rel_err, AllocationRecorder, make_batch, rel_err

IMPLS = ["torch", "chunked"]
# None: default budget (one tile, whole pairs). 3000 bytes: below the planner's floor, so tiles are
# 16 tokens by the whole (small) vocabulary, the token loop runs several times and the two-pass route is taken.
BUDGETS = [None, 3000]


def _grads(out, inputs, upstream=None):
    target = out if upstream is None else (out * upstream).sum()
    return torch.autograd.grad(target, [t for t in inputs if t is not None])


def _as64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(0.7, 2.5, 1.3)],
                         ids=["plain", "scale-softcap-temperature"])
def test_token_logps_and_gradients(impl, budget, transform, device):
    h, w, b, labels = make_batch(2, 9, 24, 101, device=device, bias=True, empty_rows=(1,))
    kwargs = dict(bias=b, logit_scale=transform.scale, softcap=transform.softcap, temperature=transform.temperature)
    ours = dpo_fast.token_logps(h, w, labels, impl=impl, memory_budget=budget, **kwargs)
    h64, w64, b64 = _as64(h, w, b)
    oracle, _ = reference.token_outputs(h64, w64, labels, bias=b64, transform=transform)
    assert ours.shape == labels.shape and ours.dtype == torch.float32
    assert rel_err(ours, oracle) < 1e-5
    assert torch.all(ours[labels == -100] == 0)
    upstream = torch.randn_like(ours)
    for got, want in zip(_grads(ours, (h, w, b), upstream), _grads(oracle, (h64, w64, b64), upstream.double())):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps(impl, average, device):
    h, w, _, labels = make_batch(3, 8, 16, 77, device=device, empty_rows=(4,))
    ours = dpo_fast.sequence_logps(h, w, labels, impl=impl, average=average, memory_budget=2000)
    h64, w64 = _as64(h, w)
    oracle = reference.sequence_logps(h64, w64, labels, average=average)
    assert ours.shape == (6,) and ours[4] == 0
    assert rel_err(ours, oracle) < 1e-5
    upstream = torch.randn(6, device=device)
    for got, want in zip(_grads(ours, (h, w), upstream), _grads(oracle, (h64, w64), upstream.double())):
        assert rel_err(got, want) < 1e-5


def _loss_kwargs(loss_type):
    smoothing = {"robust": 0.2, "exo_pair": 0.1, "aot": 0.1}.get(loss_type, 0.0)
    return dict(beta=0.3, loss_type=loss_type, label_smoothing=smoothing)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_every_loss_type(impl, loss_type, device):
    pairs = 3
    h, w, b, labels = make_batch(pairs, 7, 16, 53, device=device, bias=True)
    ref_c, ref_r = torch.randn(pairs, device=device) - 20, torch.randn(pairs, device=device) - 20
    kwargs = _loss_kwargs(loss_type)
    out = dpo_fast.dpo_loss(h, w, labels, bias=b, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, impl=impl,
                            **kwargs)
    h64, w64, b64 = _as64(h, w, b)
    cfg = LossConfig([loss_type], [1.0], kwargs["beta"], kwargs["label_smoothing"])
    oracle = reference.dpo_loss(h64, w64, labels, bias=b64, ref_chosen_logps=ref_c.double(),
                                ref_rejected_logps=ref_r.double(), cfg=cfg)
    assert torch.isfinite(out.loss)
    assert rel_err(out.loss, oracle.loss) < 1e-5
    for field in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "reward_margin",
                  "chosen_logits_mean", "rejected_logits_mean", "entropy"):
        # Vocab-mean logits sit near 0 (cancellation), so they are compared on a unit scale.
        assert abs_or_rel_err(getattr(out, field), getattr(oracle, field)) < 1e-5, field
    assert out.reward_accuracy == oracle.reward_accuracy and out.token_accuracy == oracle.token_accuracy
    for got, want in zip(_grads(out.loss, (h, w, b)), _grads(oracle.loss, (h64, w64, b64))):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_weighted_list_of_loss_types_and_routes(impl, budget, device):
    pairs = 2
    h, w, _, labels = make_batch(pairs, 6, 16, 61, device=device)
    kwargs = dict(loss_type=["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.5, 0.25], beta=0.2)
    out = dpo_fast.dpo_loss(h, w, labels, impl=impl, memory_budget=budget, **kwargs)
    h64, w64 = _as64(h, w)
    oracle = reference.dpo_loss(h64, w64, labels, cfg=LossConfig(kwargs["loss_type"], kwargs["loss_weights"], 0.2))
    assert rel_err(out.loss, oracle.loss) < 1e-5
    for got, want in zip(_grads(out.loss, (h, w)), _grads(oracle.loss, (h64, w64))):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_whole_pair_route_equals_two_pass_route(impl, device, monkeypatch):
    # Pairs longer than the 16-token tile floor, so that a chunk per pair can cost less memory than one chunk.
    h, w, _, labels = make_batch(3, 24, 16, 64, device=device)
    calls = []
    original = whole_pairs.PairChunkLoss.forward
    monkeypatch.setattr(whole_pairs.PairChunkLoss, "forward",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    whole = dpo_fast.dpo_loss(h, w, labels, impl=impl)  # fits the default budget: 6NHV
    assert calls, "the whole-pair route was not taken"
    calls.clear()
    two_pass = dpo_fast.dpo_loss(h, w, labels, impl=impl, loss_type="aot_unpaired")  # not pair-local
    assert not calls
    calls.clear()
    # A budget the planner answers with one pair per chunk: several chunks (6NHV still).
    lengths = (labels != -100).sum(1).tolist()
    pair_tokens = [lengths[p] + lengths[p + 3] for p in range(3)]
    kept = sum(pair_tokens)

    def chunks_at(b):  # the planner as the call asks it: with the rows' own buffers (impl='torch')
        workspace = chunked.rows_workspace(dpo_fast.api.make_engine(impl, b).rows, kept, 64, h.dtype)
        return len(planner.plan_loss(pair_tokens, 64, 16, h.dtype, True, b, "cpu", gathered_input=True,
                                     sides=[(lengths[p], lengths[p + 3]) for p in range(3)],
                                     input_tokens=labels.numel(), rows_workspace=workspace).chunks)

    budget = next(b for b in range(1000, 100000, 50) if chunks_at(b) >= 2)
    several = dpo_fast.dpo_loss(h, w, labels, impl=impl, memory_budget=budget)
    assert len(calls) == 1
    assert rel_err(several.loss, whole.loss) < 1e-6
    g_whole, g_several = _grads(whole.loss, (h, w)), _grads(several.loss, (h, w))
    for a, c in zip(g_whole, g_several):
        assert rel_err(c, a) < 1e-5
    assert torch.isfinite(two_pass.loss)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("packing", ["cu_seqlens", "sequence_ids"])
def test_packed_batches(impl, packing, device):
    lengths = [5, 1, 7, 4]  # two pairs, padding-free
    total, hidden, vocab = sum(lengths), 16, 47
    h = torch.randn(total, hidden, device=device, requires_grad=True)
    w = torch.randn(vocab, hidden, device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (total,), device=device)
    labels[0] = -100  # prompt token
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device)
    ids = torch.repeat_interleave(torch.arange(4, device=device), torch.tensor(lengths, device=device))
    pack = dict(cu_seqlens=cu) if packing == "cu_seqlens" else dict(sequence_ids=ids, num_sequences=4)
    seq = dpo_fast.sequence_logps(h, w, labels, impl=impl, **pack)
    h64, w64 = _as64(h, w)
    oracle = reference.sequence_logps(h64, w64, labels, **pack)
    assert rel_err(seq, oracle) < 1e-5
    out = dpo_fast.dpo_loss(h, w, labels, impl=impl, **pack)
    oracle_loss = reference.dpo_loss(h64, w64, labels, **pack)
    assert rel_err(out.loss, oracle_loss.loss) < 1e-5
    for got, want in zip(_grads(out.loss, (h, w)), _grads(oracle_loss.loss, (h64, w64))):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_skips_weight_gradient(impl, device, monkeypatch):
    h, w, _, labels = make_batch(2, 6, 16, 40, device=device)
    w.requires_grad_(False)
    out = dpo_fast.dpo_loss(h, w, labels, impl=impl, memory_budget=1500)
    (grad_h,) = torch.autograd.grad(out.loss, h)
    h64 = h.detach().double().requires_grad_()
    oracle = reference.dpo_loss(h64, w.double(), labels)
    (grad64,) = torch.autograd.grad(oracle.loss, h64)
    assert rel_err(grad_h, grad64) < 1e-5
    assert w.grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_embedding_gets_both_gradients(impl, device):
    vocab, hidden = 50, 16
    emb = torch.nn.Embedding(vocab, hidden).to(device)
    ids = torch.randint(0, vocab, (4, 6), device=device)
    labels = torch.randint(0, vocab, (4, 6), device=device)
    labels[:, :2] = -100
    out = dpo_fast.dpo_loss(torch.tanh(emb(ids)), emb.weight, labels, impl=impl)
    out.loss.backward()
    emb64 = torch.nn.Embedding(vocab, hidden).double().to(device)
    emb64.weight.data.copy_(emb.weight.data)
    oracle = reference.dpo_loss(torch.tanh(emb64(ids)), emb64.weight, labels)
    oracle.loss.backward()
    assert rel_err(emb.weight.grad, emb64.weight.grad) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_naive(impl, dtype, device):
    h, w, _, labels = make_batch(2, 8, 32, 97, dtype=dtype, device=device)
    ref_c, ref_r = torch.randn(2, device=device) - 30, torch.randn(2, device=device) - 30
    kwargs = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    out = dpo_fast.dpo_loss(h, w, labels, impl=impl, memory_budget=4000, **kwargs)
    naive = reference.dpo_loss(h, w, labels, dtype=None, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    h64, w64 = _as64(h, w)
    oracle = reference.dpo_loss(h64, w64, labels, ref_chosen_logps=ref_c.double(), ref_rejected_logps=ref_r.double())
    assert rel_err(out.chosen_logps, oracle.chosen_logps) <= rel_err(naive.chosen_logps, oracle.chosen_logps) + 2e-3
    ours_g, naive_g, oracle_g = _grads(out.loss, (h, w)), _grads(naive.loss, (h, w)), _grads(oracle.loss, (h64, w64))
    for got, base, want in zip(ours_g, naive_g, oracle_g):
        assert got.dtype == dtype
        assert rel_err(got, want) <= rel_err(base, want) + 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_reference_model_path_saves_nothing(impl, device):
    h, w, _, labels = make_batch(2, 6, 16, 40, device=device)
    with torch.no_grad():
        seq = dpo_fast.sequence_logps(h, w, labels, impl=impl)
    assert seq.grad_fn is None and not seq.requires_grad
    oracle = reference.sequence_logps(h.double(), w.double(), labels)
    assert rel_err(seq, oracle) < 1e-5


def test_dpo_loss_module_matches_function(device):
    h, w, _, labels = make_batch(2, 5, 16, 30, device=device)
    module = dpo_fast.DPOLoss(beta=0.5, loss_type="hinge", impl="torch")
    assert "hinge" in repr(module)
    a = module(h, w, labels).loss
    b = dpo_fast.dpo_loss(h, w, labels, beta=0.5, loss_type="hinge", impl="torch").loss
    assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_stays_within_budget(impl, device):
    """No tensor of N*V elements, and no single allocation above the budget, in forward and backward."""
    pairs, seq, hidden, vocab = 2, 32, 8, 512
    h, w, _, labels = make_batch(pairs, seq, hidden, vocab, device=device, prompt=0)
    labels = torch.randint(0, vocab, labels.shape, device=device)  # every token counts: N = 128
    n_tokens = labels.numel()
    # The unavoidable gradients (V*H = 4096, N*H = 1024 elements) stay below N*V/8 = 8192.
    budget = 16 * 1024  # bytes: far below the N*V*4 ~ 200 KB of full float32 logits
    for loss_type in ("sigmoid", "aot_unpaired"):  # pairs do not fit the budget: two-pass route
        recorder = AllocationRecorder()
        with recorder:
            out = dpo_fast.dpo_loss(h, w, labels, impl=impl, memory_budget=budget, loss_type=loss_type)
            torch.autograd.grad(out.loss, (h, w))
        numel, element, op = recorder.largest()
        assert numel < n_tokens * vocab / 8, (numel, op)
        assert max(n * e for n, e, _ in recorder.sizes) <= max(budget, w.numel() * 4, h.numel() * 4)


@pytest.mark.parametrize("route", ["whole-pairs", "split-pairs", "two-pass"])
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_float64_inputs_are_computed_in_float64(impl, route, device, monkeypatch):
    """Issue 22 item 7: float64 hidden states and head are computed in float64 (a caller who passes float64
    means it) and returned in float64, on every route of the PyTorch rows ('auto' takes them for float64):
    agreement with the float64 oracle to ~1e-12, where float32 statistics stop near 1e-7."""
    h, w, b, labels = make_batch(3, 9, 16, 70, dtype=torch.float64, device=device, bias=True)
    refs = ((torch.randn(3, device=device, dtype=torch.float64) - 20).requires_grad_(),
            (torch.randn(3, device=device, dtype=torch.float64) - 20).requires_grad_())
    settings = dict(impl=impl, bias=b, ref_chosen_logps=refs[0], ref_rejected_logps=refs[1], softcap=5.0,
                    temperature=0.9, logit_scale=1.3)
    if route == "split-pairs":  # pieces of 3 and 4 tokens around a whole pair
        original = planner.plan_loss
        chunks = (planner.Chunk(0, 1, 3), planner.Chunk(1, 2), planner.Chunk(2, 3, 4))
        monkeypatch.setattr(planner, "plan_loss", lambda *a, **k: planner.Plan(
            "whole-pairs", original(*a, **k).cost, chunks, accumulate=True))
    if route == "two-pass":
        settings["loss_type"] = "aot"  # couples pairs: never whole pairs
    cfg = LossConfig(loss_types=[settings.get("loss_type", "sigmoid")])
    transform = LogitTransform(scale=1.3, softcap=5.0, temperature=0.9)
    out = dpo_fast.dpo_loss(h, w, labels, **settings)
    oracle = reference.dpo_loss(h, w, labels, bias=b, transform=transform, ref_chosen_logps=refs[0],
                                ref_rejected_logps=refs[1], cfg=cfg)
    assert out.loss.dtype == out.chosen_logps.dtype == torch.float64
    assert rel_err(out.loss, oracle.loss) < 1e-12 and rel_err(out.chosen_logps, oracle.chosen_logps) < 1e-12
    for got, want in zip(_grads(out.loss, (h, w, b, *refs)), _grads(oracle.loss, (h, w, b, *refs))):
        assert got.dtype == torch.float64 and rel_err(got, want) < 1e-11
    tokens = dpo_fast.token_logps(h, w, labels, bias=b, impl=impl, softcap=5.0, temperature=0.9, logit_scale=1.3)
    want, _ = reference.token_outputs(h, w, labels, bias=b, transform=transform)
    assert tokens.dtype == torch.float64 and rel_err(tokens, want) < 1e-12
    with torch.no_grad():
        sums = dpo_fast.sequence_logps(h, w, labels, bias=b, impl=impl, softcap=5.0, temperature=0.9,
                                       logit_scale=1.3)
    assert sums.dtype == torch.float64 and rel_err(sums, want.sum(-1)) < 1e-12
