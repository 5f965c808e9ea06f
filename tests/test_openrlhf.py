"""OpenRLHF 0.11.2's Actor.forward, stock against patched with dpo-fast, on a tiny Llama on CPU.

OpenRLHF is installed without its declared dependencies (the Makefile: flash-attn builds CUDA code,
and it pins transformers==5.15.0; here it runs on .venv's transformers). ``flash_attn``, which
OpenRLHF imports at module import, is replaced by tests/_flash_attn_stand_in.py.
"""

import copy
import types
import warnings

import pytest
import torch

import _flash_attn_stand_in

_flash_attn_stand_in.install()
actor_module = pytest.importorskip("openrlhf.models.actor")

from dpo_fast.integrations import openrlhf as dpo_openrlhf  # noqa: E402

EPS = torch.finfo(torch.float32).eps
VOCAB = 61


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    dpo_openrlhf.unpatch_openrlhf()


def _actor(temperature, packing=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=64)
    # No KV cache, as in training: dpo-fast's backbone call runs without one, and with a cache transformers
    # does not read packed sequences from position_ids (the stock forward would attend across them).
    config.use_cache = False
    actor = actor_module.Actor(LlamaForCausalLM(config).float(), temperature=temperature)
    actor.packing_samples = packing  # Actor leaves it unset when handed a model instance
    return actor


def _batch(seed=1):
    """Left-padded prompts, right-padded responses (OpenRLHF's rollout layout) and the action mask."""
    g = torch.Generator().manual_seed(seed)
    sequences = torch.randint(1, VOCAB, (3, 12), generator=g)
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :2] = 0  # left padding of a short prompt
    attention_mask[1, 10:] = 0  # a response that ended early
    sequences[attention_mask == 0] = 0
    action_mask = attention_mask[:, -5:].bool()
    return sequences, attention_mask, action_mask


def _step(actor, patched, call, grads_of):
    """Outputs of ``call(actor)`` and the gradients of every parameter of a scalar made from them."""
    if patched:
        dpo_openrlhf.patch_openrlhf(impl="torch")
    outputs = call(actor)
    grads_of(outputs).backward()
    dpo_openrlhf.unpatch_openrlhf()
    return outputs, {n: p.grad.clone() for n, p in actor.named_parameters()}


def _assert_close(name, ours, ref, terms):
    tol = 4 * EPS * terms ** 0.5 * (1.0 + float(ref.detach().abs().max()))
    err = float((ours.detach() - ref.detach()).abs().max())
    assert err <= tol, f"{name}: {err:.3g} > {tol:.3g}"


def _compare(make_actor, call, grads_of, outputs_of):
    stock_actor = make_actor()
    patched_actor = copy.deepcopy(stock_actor)
    ref, ref_grads = _step(stock_actor, False, call, grads_of)
    ours, grads = _step(patched_actor, True, call, grads_of)
    for name, a, b in zip(("first output", "second output"), outputs_of(ours), outputs_of(ref)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        _assert_close(name, a, b, 32 + VOCAB)
    for name, ref_grad in ref_grads.items():
        _assert_close(name, grads[name], ref_grad, 36 * VOCAB)


@pytest.mark.parametrize("packing", [False, True])
def test_ppo_actor_log_probs_and_entropy(packing):
    """PPO/GRPO's call: action log-probs and (differentiable) entropy at temperature != 1, padded batch."""
    sequences, attention_mask, action_mask = _batch()
    g = torch.Generator().manual_seed(2)
    advantages = torch.randn(action_mask.shape, generator=g)

    def call(actor):
        return actor(sequences, action_mask, attention_mask, return_output=True, return_entropy=True)

    def grads_of(outputs):
        log_probs, output = outputs
        entropy = output.entropy[:, -action_mask.shape[1]:]
        return -(log_probs * advantages).sum() - 0.01 * (entropy * action_mask).sum()

    _compare(lambda: _actor(0.7, packing), call, grads_of, lambda out: (out[0], out[1].entropy))


def test_dpo_concatenated_forward_and_loss():
    """OpenRLHF's DPO: DPOTrainer.concatenated_forward (return_logprobs) and its DPOLoss, policy and reference."""
    from openrlhf.models import DPOLoss
    from openrlhf.trainer.dpo_trainer import DPOTrainer

    g = torch.Generator().manual_seed(3)
    chosen = torch.randint(1, VOCAB, (2, 10), generator=g)
    rejected = torch.randint(1, VOCAB, (2, 8), generator=g)
    c_mask, r_mask = torch.ones_like(chosen), torch.ones_like(rejected)
    c_mask[1, 8:] = 0
    prompt_lens = [3, 4]  # a list, as OpenRLHF's collate gives it (concatenated_inputs repeats it)
    trainer = DPOTrainer.__new__(DPOTrainer)  # only the methods the forward uses, and what they read
    trainer.tokenizer = types.SimpleNamespace(pad_token_id=0)
    trainer.strategy = types.SimpleNamespace(ring_attn_group=None)
    reference = _actor(1.0, seed=5)

    def call(actor):
        with torch.no_grad():
            ref_chosen, ref_rejected, _, _ = trainer.concatenated_forward(reference, chosen, c_mask, rejected,
                                                                          r_mask, prompt_lens)
        chosen_logps, rejected_logps, _, nll = trainer.concatenated_forward(actor, chosen, c_mask, rejected, r_mask,
                                                                            prompt_lens)
        loss = DPOLoss(0.1)(chosen_logps, rejected_logps, ref_chosen, ref_rejected)[0]
        return loss, nll

    _compare(lambda: _actor(1.0), call, lambda out: out[0] + out[1], lambda out: out)


def test_call_for_logits_runs_openrlhf_forward_with_one_warning():
    sequences, attention_mask, _ = _batch()
    actor = _actor(0.7)
    stock = actor(sequences, attention_mask=attention_mask, return_output=True)
    dpo_openrlhf.patch_openrlhf(impl="torch")
    dpo_openrlhf._patches.rearm_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = actor(sequences, attention_mask=attention_mask, return_output=True)
    messages = [str(c.message) for c in caught if "dpo-fast" in str(c.message)]
    assert len(messages) == 1 and "logits" in messages[0]
    assert torch.equal(out["logits"], stock["logits"])  # OpenRLHF's own full logits


def test_unpatch_restores_actor_forward():
    stock = vars(actor_module.Actor)["forward"]
    dpo_openrlhf.patch_openrlhf()
    assert actor_module.Actor.forward is not stock and dpo_openrlhf.is_patched()
    dpo_openrlhf.unpatch_openrlhf()
    assert vars(actor_module.Actor)["forward"] is stock and not dpo_openrlhf.is_patched()
