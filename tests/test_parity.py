"""Float32-head parity: dpo-fast's log-probs from bf16 operands equal a float32 LM head's to float32 rounding.

A float32 head (vLLM's ``head_dtype=float32``, TRL's ``cast_lm_head_to_fp32``) upcasts the same
bf16 values; dpo-fast multiplies the bf16 operands with float32 accumulation. Each bf16 x bf16
product is exact in float32, so the two logits differ only in the order of H float32 additions:
``benchmarks.parity.float32_head_bound`` turns that into a per-token bound from H and |h| |W|.
Every token must lie within it, while naive bf16 logits (rounded to 8 bits of mantissa before the
softmax) break it on many tokens: the bound tells the two apart.
"""

import pytest
import torch

import dpo_fast
from benchmarks.parity import float32_head_bound, float32_head_logps, naive_bf16_logps

N, H, V = 64, 576, 4096  # SmolLM2-135M's hidden size


def _inputs():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, H, generator=g) * 2.0
    hidden[:8] *= 8.0  # a few tokens with large logits (confident predictions)
    weight = torch.randn(V, H, generator=g) * 0.08
    labels = torch.randint(0, V, (N,), generator=g)
    # Half the labels are each token's argmax: log p near 0, where a float32 head and bf16 logits differ most.
    top = (hidden.bfloat16().float() @ weight.bfloat16().float().T).argmax(-1)
    labels[::2] = top[::2]
    return hidden.bfloat16(), weight.bfloat16(), labels


@pytest.mark.cpu_tensors("SmolLM2-135M runs on the CPU here; its chunked variant needs the interpreter")
@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_dpo_fast_matches_a_float32_head_within_the_rounding_bound(impl):
    hidden, weight, labels = _inputs()
    head32 = float32_head_logps(hidden, weight, labels).double()
    ours = dpo_fast.token_logps(hidden, weight, labels, impl=impl).double()
    bound = float32_head_bound(hidden, weight)
    excess = (ours - head32).abs() - bound
    assert float(excess.max()) <= 0, f"token {int(excess.argmax())} exceeds the bound by {float(excess.max()):.3g}"
    # The bound (worst case over summation orders) is below what bf16 logits cost on many tokens (42% here),
    # and the error actually seen is four orders of magnitude below theirs (1.9e-6 against 0.19 nats).
    naive = naive_bf16_logps(hidden, weight, labels).double()
    assert float(((naive - head32).abs() > bound).double().mean()) >= 0.25
    assert float((ours - head32).abs().max()) <= 1e-3 * float((naive - head32).abs().max())
