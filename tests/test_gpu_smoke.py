"""Kernel correctness at GPU-sized shapes, for every impl and dtype: the GPU run's test stage.

``benchmarks/gpu.sh`` runs this file first in its test stage (the suite's tests on the ``device``
fixture follow, within a budget of 120 s, kernel compilation included; not yet measured on a GPU)
before timing anything, so a wrong kernel is reported before its speed is. Each case compares
``dpo_fast.dpo_loss`` (loss, sequence log-probs, both gradients) and ``token_logps_from_logits``
with the float64 oracle of ``dpo_fast.reference``. The bound is the naive path's own error in the
same dtype (``reference`` with ``dtype=None``: logits in the input dtype, log_softmax in float32)
plus a margin per dtype, so low precision is held to what plain PyTorch achieves and float32 to
about 1e-5.

On CUDA the shapes are real heads (Llama-3-8B: H=4096, V=128256; a Gemma-2-2B-like softcapped head
with an odd V=256001 that no block size divides); without a GPU the same tests run at small
shapes through the Triton interpreter, so CI proves the file.
"""

import functools

import pytest
import torch

import dpo_fast
from dpo_fast import reference
from dpo_fast.transform import LogitTransform
from helpers import TEST_DEVICE, rel_err

ON_GPU = TEST_DEVICE.type == "cuda"  # the shapes follow the suite's device (the `device` fixture)
IMPLS = ["fused", "chunked", "torch"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Beyond the naive path's own error (relative for log-probs and gradients, absolute for the loss):
# float32 stays near 1e-5; 16-bit gradients may carry one more rounding to the dtype than naive's (at
# most half an ulp of the largest entry: eps/2 relative; the margin is twice that).
MARGIN = {torch.float32: 1e-5, **{d: torch.finfo(d).eps for d in (torch.float16, torch.bfloat16)}}

# name: (pairs, tokens per sequence, H, V, softcap, seed)
SHAPES = {
    "llama3-8b-head": (1, 1024, 4096, 128256, None, 11) if ON_GPU else (1, 12, 32, 1031, None, 11),
    "softcap-odd-vocab": (2, 257, 2304, 256001, 30.0, 12) if ON_GPU else (2, 7, 24, 257, 30.0, 12),
}


@functools.lru_cache(maxsize=1)
def _case(shape: str, dtype: torch.dtype, device: torch.device):
    """Inputs, float64 oracle and the naive path's errors for one shape and dtype (shared by the impls)."""
    pairs, tokens, H, V, softcap, seed = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(seed * 10 + DTYPES.index(dtype))
    rows = 2 * pairs
    hidden = torch.randn(rows, tokens, H, generator=gen, device=device).to(dtype)
    weight = (torch.randn(V, H, generator=gen, device=device) / H ** 0.5).to(dtype)
    labels = torch.randint(0, V, (rows, tokens), generator=gen, device=device)
    labels[:, : max(1, tokens // 8)] = -100  # a prompt
    labels[1, tokens - tokens // 3:] = -100  # ragged end (padding)
    transform = LogitTransform(softcap=softcap)

    h64, w64 = (t.double().requires_grad_() for t in (hidden, weight))
    seq64 = reference.sequence_logps(h64, w64, labels, transform=transform)
    # Reference-model log-probs a few nats from the policy's, so the sigmoid is not saturated.
    ref = (seq64.detach() + 20 * torch.randn(rows, generator=gen, device=device, dtype=torch.float64)).float()
    kwargs = dict(ref_chosen_logps=ref[:pairs].contiguous(), ref_rejected_logps=ref[pairs:].contiguous())
    oracle = reference.dpo_loss(h64, w64, labels, transform=transform,
                                **{k: v.double() for k, v in kwargs.items()})
    oracle_grads = torch.autograd.grad(oracle.loss, (h64, w64))
    oracle = dict(loss=oracle.loss.detach(), logps=torch.cat([oracle.chosen_logps, oracle.rejected_logps]).detach(),
                  grads=oracle_grads)
    del h64, w64

    naive = _errors(*_run(lambda h, w: reference.dpo_loss(h, w, labels, transform=transform, dtype=None, **kwargs),
                          hidden, weight), oracle)
    return hidden, weight, labels, softcap, kwargs, oracle, naive


def _run(loss_fn, hidden, weight):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = loss_fn(h, w)
    grads = torch.autograd.grad(out.loss, (h, w))
    return out, grads


def _errors(out, grads, oracle) -> dict:
    logps = torch.cat([out.chosen_logps, out.rejected_logps])
    return dict(loss=abs(float(out.loss.detach()) - float(oracle["loss"])), logps=rel_err(logps, oracle["logps"]),
                grad_hidden=rel_err(grads[0], oracle["grads"][0]), grad_weight=rel_err(grads[1], oracle["grads"][1]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_dpo_loss_matches_float64_oracle(shape, dtype, impl, device):
    hidden, weight, labels, softcap, kwargs, oracle, naive = _case(shape, dtype, device)
    out, grads = _run(lambda h, w: dpo_fast.dpo_loss(h, w, labels, softcap=softcap, impl=impl, **kwargs),
                      hidden, weight)
    assert all(g.dtype == dtype for g in grads)
    ours = _errors(out, grads, oracle)
    bounds = {k: naive[k] + MARGIN[dtype] for k in naive}
    worse = {k: f"{ours[k]:.2e} > {bounds[k]:.2e} (naive {naive[k]:.2e})" for k in ours if not ours[k] <= bounds[k]}
    assert not worse, f"{impl} {dtype} {shape}: {worse}"


@pytest.mark.parametrize("impl", ["chunked", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_token_logps_from_logits_matches_float64_oracle(dtype, impl, device):
    pairs, tokens, H, V, _, seed = SHAPES["llama3-8b-head"]
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (3 * torch.randn(2 * pairs * tokens, V, generator=gen, device=device)).to(dtype)
    labels = torch.randint(0, V, (logits.shape[0],), generator=gen, device=device)
    labels[::7] = -100
    upstream = torch.randn(logits.shape[0], generator=gen, device=device)

    x = logits.clone().requires_grad_()
    ours = dpo_fast.token_logps_from_logits(x, labels, impl=impl)
    (grad,) = torch.autograd.grad(ours, x, upstream)
    x64 = logits.double().requires_grad_()
    oracle, _ = reference.token_outputs_from_logits(x64, labels)
    (grad64,) = torch.autograd.grad(oracle, x64, upstream.double())
    assert grad.dtype == dtype
    assert rel_err(ours, oracle) <= 1e-5  # float32 statistics of exactly represented inputs
    # The gradient is rounded to the input dtype once: half an ulp of the largest entry.
    assert rel_err(grad, grad64) <= torch.finfo(dtype).eps + 1e-5
