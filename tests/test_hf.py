"""dpo_fast.hf on real transformers architectures (tiny random-init configs, offline).

For each model, dpo_forward's loss, metrics and the gradient of every parameter must match
the naive computation on the same model: ``model(...).logits`` -> the float64 reference
loss (dpo_fast.reference), reference log-probs the same way from the reference model.
"""

import copy
import sys
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import dpo_fast  # noqa: E402
from dpo_fast import hf, reference  # noqa: E402
from dpo_fast.objective import LossConfig  # noqa: E402
from dpo_fast.transform import LogitTransform  # noqa: E402

VOCAB, HIDDEN, PAIRS, SEQ = 320, 32, 2, 10
SMALL = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _llama(tied):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=tied))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=False))


def _gemma2():
    config = transformers.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0, query_pre_attn_scalar=8,
                                       sliding_window=4)
    config._attn_implementation = "eager"
    return transformers.Gemma2ForCausalLM(config)


def _cohere():
    return transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=2.5,
                                                                    tie_word_embeddings=False))


def _granite():
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(**SMALL, logits_scaling=4.0,
                                                                      tie_word_embeddings=False))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4,
                                                                n_positions=64))


def _phi():
    return transformers.PhiForCausalLM(transformers.PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                                              intermediate_size=64, num_hidden_layers=2,
                                                              num_attention_heads=4, max_position_embeddings=64))


ARCHITECTURES = {
    "llama-untied": lambda: _llama(False),
    "llama-tied": lambda: _llama(True),
    "qwen2": _qwen2,
    "gemma2-softcap": _gemma2,
    "cohere-logit_scale": _cohere,
    "granite-logits_scaling": _granite,
    "gpt2-tied": _gpt2,
    "phi-bias": _phi,
}


def build(name):
    model = ARCHITECTURES[name]().float().eval()  # eval: no dropout, so both passes see one function
    with torch.no_grad():  # logits of a few units, so scale and softcap change the numbers
        head = model.get_output_embeddings()
        head.weight.mul_(6.0 / head.weight.std().clamp(min=1e-6) / HIDDEN ** 0.5)
        if head.bias is not None:
            head.bias.normal_(0, 0.5)
    reference_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, reference_model


def batch(pairs=PAIRS, seq=SEQ, vocab=VOCAB):
    """[chosen; rejected] rows: a shared-length prompt (not scored), completions, right padding."""
    input_ids = torch.randint(0, vocab, (2 * pairs, seq))
    attention_mask = torch.ones_like(input_ids)
    for row in range(2 * pairs):
        pad = int(torch.randint(0, 3, ()))
        if pad:
            attention_mask[row, -pad:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    return input_ids, attention_mask, labels


def naive(model, reference_model, input_ids, attention_mask, labels, cfg, temperature=1.0):
    """The full-logits computation trainers run, with a float64 loss head."""
    transform = LogitTransform(temperature=temperature)
    with torch.no_grad():
        ref_logits = reference_model(input_ids=input_ids, attention_mask=attention_mask).logits
        ref_logps, _ = reference.token_outputs_from_logits(ref_logits[:, :-1], labels[:, 1:], transform=transform)
        ref_logps = ref_logps.sum(-1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    pairs = labels.shape[0] // 2
    return reference.dpo_loss_from_logits(logits[:, :-1], labels[:, 1:], transform=transform,
                                          ref_chosen_logps=ref_logps[:pairs], ref_rejected_logps=ref_logps[pairs:],
                                          cfg=cfg)


def gradients(model):
    return {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()}


def compare(model, reference_model, impl="torch", temperature=1.0, loss_type="sigmoid", rtol=2e-4):
    """Run both paths; assert loss, metrics and every gradient agree. Returns the largest differences."""
    input_ids, attention_mask, labels = batch()
    cfg = LossConfig(loss_types=[loss_type], beta=0.2)
    out = hf.dpo_forward(model, input_ids, attention_mask, labels, ref_model=reference_model, beta=0.2,
                         loss_type=loss_type, temperature=temperature, impl=impl)
    out.loss.backward()
    fused = gradients(model)
    model.zero_grad(set_to_none=True)
    expected = naive(model, reference_model, input_ids, attention_mask, labels, cfg, temperature)
    expected.loss.backward()
    plain = gradients(model)
    model.zero_grad(set_to_none=True)

    torch.testing.assert_close(out.loss.double(), expected.loss, rtol=1e-5, atol=1e-6)
    for field in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "chosen_logits_mean",
                  "rejected_logits_mean", "entropy"):
        torch.testing.assert_close(getattr(out, field).double(), getattr(expected, field).double(), rtol=1e-5,
                                   atol=1e-4, msg=field)
    # A float32 argmax may break a near-tie (softcapped logits crowd at the cap) differently from
    # float64: allow one chosen token of difference, no more.
    chosen_tokens = int((labels[: labels.shape[0] // 2, 1:] != -100).sum())
    assert abs(float(out.token_accuracy) - float(expected.token_accuracy)) <= 1.0 / chosen_tokens + 1e-6
    worst = 0.0
    for name, g in plain.items():
        if g is None:  # frozen
            assert fused[name] is None, f"{name} is frozen but dpo_forward gave it a gradient"
            continue
        assert fused[name] is not None, f"{name} got no gradient from dpo_forward"
        scale = g.abs().max().clamp(min=1e-12)
        error = float((fused[name] - g).abs().max() / scale)
        worst = max(worst, error)
        assert error <= rtol, f"{name}: gradient differs by {error:.3g} of its largest entry"
    return dict(loss=abs(out.loss.item() - expected.loss.item()), grad=worst)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_dpo_forward_matches_naive(name):
    model, reference_model = build(name)
    diff = compare(model, reference_model)
    print(f"{name}: loss diff {diff['loss']:.2e}, worst gradient diff {diff['grad']:.2e} (relative)")


def test_resolved_head_per_architecture():
    expectations = {  # name -> (scale, softcap, has bias, tied)
        "llama-untied": (1.0, None, False, False),
        "llama-tied": (1.0, None, False, True),
        "gemma2-softcap": (1.0, 2.0, False, True),
        "cohere-logit_scale": (2.5, None, False, False),
        "granite-logits_scaling": (0.25, None, False, False),
        "gpt2-tied": (1.0, None, False, True),
        "phi-bias": (1.0, None, True, False),
    }
    for name, (scale, softcap, has_bias, tied) in expectations.items():
        head = hf.resolve_head(ARCHITECTURES[name]())
        assert (head.transform.scale, head.transform.softcap) == (scale, softcap), name
        assert (head.bias is not None, head.tied) == (has_bias, tied), name


def test_hyperclovax_multiplies_by_logits_scaling():
    config = transformers.PretrainedConfig(logits_scaling=4.0)
    config.model_type = "hyperclovax"
    assert hf.logit_transform_from_config(config).scale == 4.0
    config.model_type = "granite"
    assert hf.logit_transform_from_config(config).scale == 0.25


def test_softcap_then_temperature_with_triton_rows():
    """Gemma-2's softcap in the Triton row kernels (interpreter on CPU), with a sampling temperature."""
    model, reference_model = build("gemma2-softcap")
    compare(model, reference_model, impl="auto", temperature=0.7)


def test_two_pass_route_matches_naive():
    """A loss that couples pairs (aot sorts across the batch) takes the two-pass route."""
    model, reference_model = build("llama-untied")
    compare(model, reference_model, loss_type="aot")


def test_reconstruction_mismatch_is_refused_or_falls_back():
    model, _ = build("llama-untied")
    model.config.logit_scale = 3.0  # Llama's forward ignores it, so the rebuilt logits are 3x too large
    input_ids, attention_mask, labels = batch()
    with pytest.raises(hf.ReconstructionError, match="model_type='llama'"):
        hf.dpo_forward(model, input_ids, attention_mask, labels, impl="torch")

    out = hf.dpo_forward(model, input_ids, attention_mask, labels, impl="torch", fallback="naive")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = reference.dpo_loss_from_logits(logits[:, :-1], labels[:, 1:], cfg=LossConfig())
    torch.testing.assert_close(out.loss.double(), expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_logps.double(), expected.chosen_logps.double(), rtol=1e-5, atol=1e-4)
    assert "forward" not in model.__dict__, "the model's forward must be restored"


def test_wrapper_hooks_fire_and_forward_is_restored():
    """Called through a DDP-like wrapper: the inner model's forward hooks run (what DDP/FSDP/ZeRO rely on)."""
    model, reference_model = build("qwen2")

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append("inner"))
    wrapped = Wrapper(model)
    input_ids, attention_mask, labels = batch()
    out = hf.dpo_forward(wrapped, input_ids, attention_mask, labels, ref_model=reference_model, impl="torch")
    out.loss.backward()
    assert "inner" in calls
    assert all(p.grad is not None for p in model.parameters())
    assert "forward" not in model.__dict__
    # The model works as before afterwards.
    assert model(input_ids=input_ids).logits.shape == (*input_ids.shape, VOCAB)


def test_precomputed_reference_and_reference_free():
    model, reference_model = build("llama-tied")
    input_ids, attention_mask, labels = batch()
    ref = hf.reference_logps(reference_model, input_ids, attention_mask, labels, impl="torch")
    with torch.no_grad():
        logits = reference_model(input_ids=input_ids, attention_mask=attention_mask).logits
        expected, _ = reference.token_outputs_from_logits(logits[:, :-1], labels[:, 1:])
    torch.testing.assert_close(ref.double(), expected.sum(-1), rtol=1e-5, atol=1e-4)
    a = hf.dpo_forward(model, input_ids, attention_mask, labels, ref_model=reference_model, impl="torch")
    b = hf.dpo_forward(model, input_ids, attention_mask, labels, ref_chosen_logps=ref[:PAIRS],
                       ref_rejected_logps=ref[PAIRS:], impl="torch")
    torch.testing.assert_close(a.loss, b.loss)
    free = hf.dpo_forward(model, input_ids, attention_mask, labels, loss_type="simpo", impl="torch")
    assert torch.isfinite(free.loss)
    with pytest.raises(ValueError, match="not both"):
        hf.dpo_forward(model, input_ids, attention_mask, labels, ref_model=reference_model,
                       ref_chosen_logps=ref[:PAIRS], ref_rejected_logps=ref[PAIRS:])


def _peft():
    try:
        import peft as module
    except ImportError:  # pragma: no cover - peft is in the dev extra
        pytest.fail("peft is not installed: pip install -e '.[dev]'")
    return module


def test_peft_lora_frozen_head_matches_naive():
    """LoRA on attention, head frozen: only adapter weights get gradients, equal to the naive ones."""
    peft_module = _peft()
    model, reference_model = build("llama-untied")
    config = peft_module.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                    init_lora_weights=False)
    wrapped = peft_module.get_peft_model(model, config)
    head = wrapped.get_base_model().get_output_embeddings()
    assert not head.weight.requires_grad
    compare(wrapped, reference_model)
    assert head.weight.grad is None


def test_peft_modules_to_save_head_matches_naive():
    """The head trained in full next to a LoRA adapter (modules_to_save): its trainable copy gets the gradient."""
    peft_module = _peft()
    model, reference_model = build("llama-untied")
    config = peft_module.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                    init_lora_weights=False)
    wrapped = peft_module.get_peft_model(model, config)
    head = wrapped.get_base_model().get_output_embeddings()
    assert head.weight is head.modules_to_save["default"].weight and head.weight.requires_grad
    compare(wrapped, reference_model)  # every trainable parameter, the head copy included, matches naive


def test_peft_lora_on_head_is_refused():
    peft_module = _peft()
    model, _ = build("llama-untied")
    config = peft_module.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    wrapped = peft_module.get_peft_model(model, config)
    input_ids, attention_mask, labels = batch()
    with pytest.raises(NotImplementedError, match="PEFT adapter layer"):
        hf.dpo_forward(wrapped, input_ids, attention_mask, labels, impl="torch")


def test_autocast_no_worse_than_naive_under_autocast():
    """bfloat16 autocast over float32 weights: the head runs in bfloat16 like the model's own lm_head call
    (Cohere: its logit scale is applied to bfloat16 logits, which the one-time check must not mistake).

    The DPO loss is a small difference of large sequence sums: run through a bf16 backbone, two
    bf16 answers can differ from the float32 one by several percent either way (measured over
    seeds: neither path is systematically closer). So precision is judged where it is well
    conditioned: the sequence log-probs of the head, from the same bf16 hidden states, against
    float64. The training call itself must run, keep the float32 master gradients, and give the
    naive path's sequence log-probs to bf16 accuracy."""
    model, reference_model = build("cohere-logit_scale")
    input_ids, attention_mask, labels = batch()
    targets = labels[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hf.dpo_forward(model, input_ids, attention_mask, labels, ref_model=reference_model, beta=0.2,
                             impl="torch")
        with torch.no_grad():
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            naive_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.lm_head.weight.grad.dtype == torch.float32  # master gradient

    head = hf.resolve_head(model)
    weight16 = head.weight.detach().to(torch.bfloat16)
    hidden16 = hidden[:, :-1].to(torch.bfloat16)
    exact = reference.sequence_logps(hidden16.double(), weight16.double(), targets, transform=head.transform)
    naive_seq = reference.token_outputs_from_logits(naive_logits[:, :-1], targets, dtype=None)[0].sum(-1)
    with torch.no_grad():
        ours = dpo_fast.sequence_logps(hidden16, weight16, targets, logit_scale=head.transform.scale, impl="torch")
    error = lambda x: float((x.double() - exact).abs().max() / exact.abs().max())  # noqa: E731
    # Both round the same bf16 logits; naive rounds the scaled logits once more, which may cancel
    # part of the first rounding by chance: allow a quarter of bf16's epsilon on top of naive's error.
    assert error(ours) <= error(naive_seq) + torch.finfo(torch.bfloat16).eps / 4
    pairs = labels.shape[0] // 2
    torch.testing.assert_close(out.chosen_logps.double(), naive_seq[:pairs].double(), rtol=1e-2, atol=1e-2)


def test_ignore_index_other_than_minus_100():
    """Labels marked with ignore_index=-1: the shift pads with it too, on every path (fused, reference model,
    naive fallback, averaged reference log-probs)."""
    model, reference_model = build("llama-untied")
    input_ids, attention_mask, labels = batch()
    minus_one = labels.masked_fill(labels == -100, -1)
    expected = hf.dpo_forward(model, input_ids, attention_mask, labels, ref_model=reference_model, impl="torch")
    out = hf.dpo_forward(model, input_ids, attention_mask, minus_one, ref_model=reference_model, impl="torch",
                         ignore_index=-1)
    for field in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(out, field), getattr(expected, field), rtol=0, atol=0, msg=field)

    model.config.logit_scale = 3.0  # Llama ignores it: the rebuild mismatches, the naive fallback runs
    expected = hf.dpo_forward(model, input_ids, attention_mask, labels, impl="torch", fallback="naive")
    out = hf.dpo_forward(model, input_ids, attention_mask, minus_one, impl="torch", fallback="naive", ignore_index=-1)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    averaged = [hf.reference_logps(model, input_ids, attention_mask, marked, average=True, fallback="naive",
                                   impl="torch", ignore_index=index) for marked, index in ((labels, -100),
                                                                                          (minus_one, -1))]
    torch.testing.assert_close(averaged[1], averaged[0], rtol=0, atol=0)


def _naive_reference_logps(model, input_ids, attention_mask, labels):
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return reference.token_outputs_from_logits(logits[:, :-1], labels[:, 1:])[0].sum(-1)


def test_logit_settings_are_read_where_the_forward_reads_them():
    """Issue 22 item 6: Cohere copies config.logit_scale into ``model.logit_scale`` when it is built and its
    forward multiplies by that copy. After a verified call, editing the copy must change dpo-fast's log-probs
    as it changes the model's (it used to keep the old scale: -24.957 against the model's -25.165); editing
    only the config, which the forward no longer reads, must change nothing."""
    model, _ = build("cohere-logit_scale")
    input_ids, attention_mask, labels = batch()
    ours = hf.reference_logps(model, input_ids, attention_mask, labels, impl="torch")  # verified at scale 2.5
    torch.testing.assert_close(ours.double(), _naive_reference_logps(model, input_ids, attention_mask, labels),
                               rtol=1e-5, atol=1e-4)

    model.logit_scale = 5.0  # what the forward multiplies by; the config still says 2.5
    assert hf.resolve_head(model).transform.scale == 5.0
    changed = hf.reference_logps(model, input_ids, attention_mask, labels, impl="torch")
    naive = _naive_reference_logps(model, input_ids, attention_mask, labels)
    assert (changed - ours).abs().max() > 1.0  # the new scale moves the log-probs far beyond tolerance
    torch.testing.assert_close(changed.double(), naive, rtol=1e-5, atol=1e-4)

    model.config.logit_scale = 1.0  # the forward ignores the config now: same numbers, checked again
    again = hf.reference_logps(model, input_ids, attention_mask, labels, impl="torch")
    torch.testing.assert_close(again.double(), naive, rtol=1e-5, atol=1e-4)


def test_falcon_h1_scale_is_read_from_its_backbone():
    """FalconH1's forward multiplies by ``self.model.lm_head_multiplier`` (the backbone's copy)."""
    config = transformers.FalconH1Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, mamba_d_ssm=32, mamba_n_heads=4,
                                         mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8,
                                         lm_head_multiplier=0.5, tie_word_embeddings=False)
    model = transformers.FalconH1ForCausalLM(config).float().eval()
    input_ids, attention_mask, labels = batch()
    attention_mask = torch.ones_like(attention_mask)  # Mamba layers: no padding inside the check
    labels = input_ids.clone()
    labels[:, :3] = -100
    model.model.lm_head_multiplier = 3.0
    assert hf.resolve_head(model).transform.scale == 3.0
    ours = hf.reference_logps(model, input_ids, attention_mask, labels, impl="torch")
    torch.testing.assert_close(ours.double(), _naive_reference_logps(model, input_ids, attention_mask, labels),
                               rtol=1e-5, atol=1e-4)


def test_float_labels_are_refused_before_the_model_runs():
    """Issue 22 item 5: float labels used to crash deep inside (torch.iinfo() requires an integer input type);
    every HF entry point refuses them first, naming the argument, before any forward runs."""
    model, reference_model = build("llama-untied")
    input_ids, attention_mask, labels = batch()
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append("forward"))
    for call in (lambda: hf.dpo_forward(model, input_ids, attention_mask, labels.float(), impl="torch"),
                 lambda: hf.dpo_forward(model, input_ids, attention_mask, labels.float(), ref_model=reference_model),
                 lambda: hf.reference_logps(model, input_ids, attention_mask, labels.float())):
        with pytest.raises(TypeError, match="labels must be an integer tensor"):
            call()
    with pytest.raises(TypeError, match="input_ids"):
        hf.reference_logps(model, input_ids.float(), attention_mask, labels)
    assert not calls


def test_runs_where_deepspeed_cannot_be_imported(monkeypatch):
    """Most users have no DeepSpeed: with no ZeRO-3 parameter in sight, the HF path (one-time check included)
    must never import it. ``sys.modules[name] = None`` makes every import of it fail, as if uninstalled."""
    for name in [m for m in list(sys.modules) if m == "deepspeed" or m.startswith("deepspeed.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    model, reference_model = build("llama-untied")
    input_ids, attention_mask, labels = batch()
    hf._VERIFIED.pop(model, None)
    out = hf.dpo_forward(model, input_ids, attention_mask, labels, ref_model=reference_model, impl="torch")
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.lm_head.weight.grad is not None
