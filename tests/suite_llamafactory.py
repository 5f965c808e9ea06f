"""LLaMA-Factory 0.9.5's CustomDPOTrainer.concatenated_forward, stock against patched, on a tiny Llama on CPU.

LLaMA-Factory pins trl <= 0.24 and transformers <= 5.6: ``make frameworks`` installs it, trl 0.24.0 and what
its import needs into .venv-llamafactory (``pip --target``, no dependencies), which tests/test_frameworks.py
puts first on PYTHONPATH over .venv (transformers 5.24, with LLaMA-Factory's version check off:
DISABLE_VERSION_CHECK=1). torchaudio, imported by its multimodal plugin at module import, is a stand-in module.
"""

import contextlib
import importlib.machinery
import sys
import types
import warnings

import pytest
import torch

for _name in ("torchaudio",):  # imported at module import, used only for audio inputs
    if _name not in sys.modules:
        _stand_in = types.ModuleType(_name)
        _stand_in.__spec__ = importlib.machinery.ModuleSpec(_name, None)
        sys.modules[_name] = _stand_in

trainer_module = pytest.importorskip("llamafactory.train.dpo.trainer")

from dpo_fast.integrations import llamafactory as dpo_lf  # noqa: E402

EPS = torch.finfo(torch.float32).eps
VOCAB = 53


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    dpo_lf.unpatch_llamafactory()


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).float()


def _trainer(loss_type):
    """The attributes CustomDPOTrainer.concatenated_forward reads, on an instance built without __init__."""
    trainer = trainer_module.CustomDPOTrainer.__new__(trainer_module.CustomDPOTrainer)
    trainer.loss_type, trainer.ld_alpha = loss_type, None
    trainer.finetuning_args = types.SimpleNamespace(use_ref_model=True)
    trainer.accelerator = types.SimpleNamespace(autocast=contextlib.nullcontext)
    return trainer


def _batch(seed=1):
    """Two pairs, chosen rows first: right padding, prompts and padding marked -100 in the labels."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (4, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    attention_mask[3, 9:] = 0
    input_ids[attention_mask == 0] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _forward(loss_type, patched):
    if patched:
        dpo_lf.patch_llamafactory(impl="torch")
    trainer, model, reference = _trainer(loss_type), _model(), _model(seed=5)
    with torch.no_grad():  # the reference pass, as compute_reference_log_probs runs it
        ref = trainer.concatenated_forward(reference, _batch(), is_ref_model=True)
    out = trainer.concatenated_forward(model, _batch())
    # DPO's sigmoid loss on the log-ratios, plus LLaMA-Factory's SFT term (-chosen_logps_avg).
    ratio = (out["chosen_logps"] - ref["chosen_logps"]) - (out["rejected_logps"] - ref["rejected_logps"])
    loss = -torch.nn.functional.logsigmoid(0.1 * ratio).mean() - out["chosen_logps_avg"].mean()
    loss.backward()
    dpo_lf.unpatch_llamafactory()
    values = {k: v.detach() for k, v in out.items() if "logits" not in k}
    values.update({f"ref_{k}": v for k, v in ref.items() if "logits" not in k})
    values.update({k: v.detach().mean() for k, v in out.items() if "logits" in k})  # all LLaMA-Factory logs
    values["loss"] = loss.detach()
    return values, {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close(name, ours, ref, terms):
    tol = 4 * EPS * terms ** 0.5 * (1.0 + float(ref.abs().max()))
    err = float((ours - ref).abs().max())
    assert err <= tol, f"{name}: {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_concatenated_forward_matches_stock(loss_type):
    values, grads = _forward(loss_type, patched=True)
    ref_values, ref_grads = _forward(loss_type, patched=False)
    assert values.keys() == ref_values.keys()
    for name, ref in ref_values.items():
        assert values[name].shape == ref.shape, name
        _assert_close(name, values[name], ref, 11 * (32 + VOCAB))
    for name, ref in ref_grads.items():
        _assert_close(name, grads[name], ref, 44 * VOCAB)


def test_ld_alpha_runs_stock_method_with_one_warning():
    dpo_lf.patch_llamafactory(impl="torch")
    dpo_lf._patches.rearm_warnings()
    trainer, model = _trainer("sigmoid"), _model()
    trainer.ld_alpha = 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = trainer.concatenated_forward(model, _batch())
    messages = [str(c.message) for c in caught if "dpo-fast" in str(c.message)]
    assert len(messages) == 1 and "ld_alpha" in messages[0]
    assert out["chosen_logits"].shape[-1] == VOCAB  # LLaMA-Factory's own full logits


def test_unpatch_restores_stock_method():
    stock = vars(trainer_module.CustomDPOTrainer)["concatenated_forward"]
    dpo_lf.patch_llamafactory()
    assert trainer_module.CustomDPOTrainer.concatenated_forward is not stock
    dpo_lf.unpatch_llamafactory()
    assert vars(trainer_module.CustomDPOTrainer)["concatenated_forward"] is stock
