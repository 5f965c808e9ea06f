"""``loss_type="orpo"``: the odds-ratio loss with its NLL term, against TRL's ORPOTrainer formula and Liger.

ORPO (Hong et al. 2024): ``loss = NLL(chosen) - beta * mean_pairs(logsigmoid(log_odds))``,
``log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r))`` with ``c``, ``r`` the mean token
log-probs of the chosen and rejected completions, and the NLL the mean over chosen
completion tokens. The truth here is float64: exact log-softmax of float64 logits fed to
TRL's own ``odds_ratio_loss``. Liger's ``LigerFusedLinearORPOLoss`` (pure PyTorch, so it runs
on CPU uncompiled) computes the same loss in float32 and must agree too.
"""

from types import SimpleNamespace

import pytest
import torch

import dpo_fast


def _batch(seed, pairs=3, length=9, hidden_size=16, vocab=203):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.3
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    # a prompt of 1..4 tokens and right padding of 0..2 tokens per row, never an empty completion
    for row in range(2 * pairs):
        prompt = int(torch.randint(1, 5, (1,), generator=g))
        pad = int(torch.randint(0, 3, (1,), generator=g))
        labels[row, :prompt] = -100
        if pad:
            labels[row, -pad:] = -100
    return hidden, weight, labels


def _trl_orpo(hidden, weight, labels, beta):
    """TRL's ORPO loss in float64: its own odds_ratio_loss on exact mean log-probs, plus the chosen NLL."""
    orpo = pytest.importorskip("trl.experimental.orpo")
    logits = hidden.double() @ weight.double().T
    kept = labels != -100
    token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * kept
    mean = token.sum(-1) / kept.sum(-1)
    pairs = labels.shape[0] // 2
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=hidden.device))
    losses, *_ = orpo.ORPOTrainer.odds_ratio_loss(trainer, mean[:pairs], mean[pairs:])
    nll = -token[:pairs].sum() / kept[:pairs].sum()
    return nll - losses.mean()


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_orpo_matches_trl_formula_and_gradients(impl, seed, device):
    hidden, weight, labels = (t.to(device) for t in _batch(seed))
    beta = 0.25
    hidden.requires_grad_(), weight.requires_grad_()
    ours = dpo_fast.dpo_loss(hidden, weight, labels, loss_type="orpo", beta=beta, impl=impl)
    grads = torch.autograd.grad(ours.loss, (hidden, weight))

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    truth = _trl_orpo(h64, w64, labels, beta)
    truth_grads = torch.autograd.grad(truth, (h64, w64))
    # float32 sums over V=203 logits and ~8 tokens per sequence: ~1e-6 relative; 1e-5 leaves room.
    torch.testing.assert_close(ours.loss.double(), truth, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, truth_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    module = dpo_fast.DPOLoss(loss_type="orpo", beta=beta, impl=impl)
    torch.testing.assert_close(module(hidden, weight, labels).loss, ours.loss, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_orpo_matches_liger(seed):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, labels = _batch(seed)
    beta = 0.25
    hidden.requires_grad_(), weight.requires_grad_()
    ours = dpo_fast.dpo_loss(hidden, weight, labels, loss_type="orpo", beta=beta, impl="torch")
    grads = torch.autograd.grad(ours.loss, (hidden, weight))
    theirs = liger.LigerFusedLinearORPOLoss(beta=beta, compiled=False)(weight, hidden, labels)[0]
    their_grads = torch.autograd.grad(theirs, (hidden, weight))
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_orpo_is_reference_free():
    """Reference log-probs do not enter ORPO: passing them changes nothing."""
    hidden, weight, labels = _batch(3)
    plain = dpo_fast.dpo_loss(hidden, weight, labels, loss_type="orpo", impl="torch").loss
    refs = torch.randn(3), torch.randn(3)
    with_ref = dpo_fast.dpo_loss(hidden, weight, labels, loss_type="orpo", impl="torch", ref_chosen_logps=refs[0],
                                 ref_rejected_logps=refs[1]).loss
    assert torch.equal(plain, with_ref)
    assert "orpo" in dpo_fast.LOSS_TYPES


def test_confident_sequences_keep_a_finite_odds_ratio():
    """Mean log-probs near 0 (p -> 1): log(1 - e^c) is taken from expm1 there, so no cancellation to -inf."""
    from dpo_fast.losses import _log1mexp

    mpmath = pytest.importorskip("mpmath")  # ships with torch (sympy)
    points = [-1e-12, -1e-6, -0.5, -0.7, -5.0, -50.0]
    mpmath.mp.dps = 50
    exact = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(x)))) for x in points], dtype=torch.float64)
    torch.testing.assert_close(_log1mexp(torch.tensor(points, dtype=torch.float64)), exact, rtol=1e-14, atol=0)
    assert torch.isfinite(_log1mexp(torch.tensor([-1e-30], dtype=torch.float64))).all()
