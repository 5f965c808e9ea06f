"""verl 0.9.1 with dpo-fast patched in, against verl's own torch implementation.

Runs in .venv-verl (verl pins transformers < 5.11), started by tests/test_frameworks.py:
``.venv-verl/bin/python -m pytest tests/suite_verl.py``. Stock verl's Triton kernel needs
CUDA, so the reference on CPU is verl's ``FusedLinearForPPO(impl_backend="torch")``, the same
function verl's torch backend (``forward_with_torch_backend``) runs.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

verl = pytest.importorskip("verl")

from verl.utils.experimental.torch_functional import FusedLinearForPPO  # noqa: E402
from verl.utils.kernel import linear_cross_entropy as verl_kernel  # noqa: E402

from dpo_fast.integrations import verl as dpo_verl  # noqa: E402
from _ranks import WORLD, run_ranks  # noqa: E402
from _verl_contract import inputs as _inputs, run as _run, tp_worker  # noqa: E402

EPS = torch.finfo(torch.float32).eps
STOCK = verl_kernel.linear_cross_entropy


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    dpo_verl.unpatch_verl()


def float32_tol(reference: torch.Tensor, terms: int) -> float:
    """Float32 rounding of a value summed from ``terms`` products, at the reference's scale."""
    return 4 * EPS * terms ** 0.5 * (1.0 + float(reference.abs().max()))


def _torch_reference(h, w, labels, temperature):
    return FusedLinearForPPO(chunk_size=4, impl_backend="torch")(h, w, labels, temperature)


@pytest.mark.parametrize("impl", ["torch", "auto"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kernel_matches_verl_torch_implementation(impl, temperature):
    h, w, labels, grad_logp, grad_entropy = _inputs()
    patched = dpo_verl.patch_verl(impl=impl)
    assert patched[0] == "verl.utils.kernel.linear_cross_entropy"
    fused = verl_kernel.linear_cross_entropy  # the name verl's forwards import on every call

    def call(h, w, labels, t):
        return fused(h, w, labels, t, "none")

    ours = _run(call, h, w, labels, grad_logp, grad_entropy, temperature)
    ref = _run(_torch_reference, h, w, labels, grad_logp, grad_entropy, temperature)
    logp, entropy = ours[:2]
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.shape == (labels.numel(),) and entropy.shape == (labels.numel(),)  # flat, as verl's kernel
    vocab, width = w.shape
    for name, a, b, terms in (("logprobs", logp, ref[0].flatten(), width + vocab),
                              ("entropy", entropy, ref[1].flatten(), width + vocab),
                              ("grad_hidden", ours[2], ref[2], vocab * width),
                              ("grad_weight", ours[3], ref[3], labels.numel() * width)):
        err = float((a - b).abs().max())
        assert err <= float32_tol(b, terms), f"{name}: {err:.3g}"
    assert float(ours[2][0, -3:].abs().max()) == 0.0  # padded positions: no gradient reaches them


def test_unpatch_restores_verl_kernel():
    dpo_verl.patch_verl()
    assert isinstance(verl_kernel.linear_cross_entropy, dpo_verl.LinearCrossEntropy)
    dpo_verl.unpatch_verl()
    assert verl_kernel.linear_cross_entropy is STOCK
    assert not dpo_verl.is_patched()


def test_unsupported_reduction_runs_verl_kernel_with_one_warning():
    h, w, labels, _, _ = _inputs()
    dpo_verl.patch_verl(impl="torch")
    dpo_verl._patches.rearm_warnings()
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # verl's own Triton kernel runs, and on CPU it fails: proof the fallback was taken.
            with pytest.raises(Exception) as failure:
                verl_kernel.linear_cross_entropy(h, w, labels, 1.0, "mean")
            assert _raised_in_verl_kernel(failure)
        messages = [str(c.message) for c in caught if "dpo-fast" in str(c.message)]
        if _ == 0:
            assert len(messages) == 1 and "reduction='mean'" in messages[0]
        else:
            assert messages == []  # one warning, not one per call


def test_tensor_temperature_falls_back():
    h, w, labels, _, _ = _inputs()
    dpo_verl.patch_verl(impl="torch")
    with pytest.warns(UserWarning, match="temperature of type Tensor"), pytest.raises(Exception) as failure:
        verl_kernel.linear_cross_entropy(h, w, labels, torch.tensor(0.7), "none")
    assert _raised_in_verl_kernel(failure)  # verl's own function asserts a float temperature


def _raised_in_verl_kernel(failure) -> bool:
    return any("verl/utils/kernel" in str(entry.path) for entry in failure.traceback)


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).float()


def _ppo_step(forward_name, patched):
    """verl's model forward for fused kernels on a tiny Llama, then verl's PPO loss: loss and every gradient."""
    from verl.models.transformers import dense_common
    from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss

    if patched:
        dpo_verl.patch_verl(impl="torch")
    model = _tiny_llama()
    forward = getattr(dense_common, forward_name).__get__(model)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 61, (2, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding
    input_ids[1, 8:] = 0
    out = forward(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, temperature=0.8)
    log_probs, entropy = out.log_probs.reshape(2, 11), out.entropy.reshape(2, 11).float()
    response_mask = torch.roll(attention_mask, -1, -1).float()
    response_mask[:, -1] = 0
    response_mask[:, :3] = 0  # the prompt
    old = log_probs.detach() + 0.05 * torch.randn(log_probs.shape, generator=g)
    advantages = torch.randn(log_probs.shape, generator=g)
    pg_loss = compute_policy_loss(old, log_probs, advantages, response_mask, cliprange=0.2)[0]
    loss = pg_loss - 0.01 * agg_loss(entropy, response_mask, "token-mean")
    loss.backward()
    dpo_verl.unpatch_verl()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_ppo_step_on_tiny_llama_matches_torch_backend():
    """verl's triton-backend forward with dpo-fast patched in == verl's torch-backend forward: loss and gradients."""
    loss, grads = _ppo_step("forward_with_triton_backend", patched=True)
    ref_loss, ref_grads = _ppo_step("forward_with_torch_backend", patched=False)
    assert abs(float(loss - ref_loss)) <= float32_tol(ref_loss, 64 * 61), (float(loss), float(ref_loss))
    for name, ref in ref_grads.items():
        err = float((grads[name] - ref).abs().max())
        assert err <= 1e-4 * (1.0 + float(ref.abs().max())), f"{name}: {err:.3g}"


# ----------------------------------------------------------------------------------------
# tensor parallel: two gloo ranks, each with half the head's rows
# ----------------------------------------------------------------------------------------

def test_vocab_sharded_head_on_two_ranks_matches_full_head(tmp_path):
    """verl's contract under tensor parallelism: statistics of the full vocabulary on every rank, each
    rank's own rows of grad_weight, and each rank's *partial* grad_hidden (verl's gather sums them)."""
    temperature = 0.7
    reports, error = run_ranks({"tp": (tp_worker, (temperature, WORLD))}, tmp_path, seed=0)
    assert error is None, error
    h, w, labels, grad_logp, grad_entropy = _inputs(vocab=64)
    ref = _run(_torch_reference, h, w, labels, grad_logp, grad_entropy, temperature)
    vocab, width = w.shape
    ranks = reports["tp"]
    for report in ranks:
        for name, ref_value in (("logp", ref[0].flatten()), ("entropy", ref[1].flatten())):
            err = float((torch.tensor(report[name]) - ref_value).abs().max())
            assert err <= float32_tol(ref_value, width + vocab), f"{name}: {err:.3g}"
    partial = [torch.tensor(r["grad_hidden"]) for r in ranks]
    summed = partial[0] + partial[1]
    assert float((summed - ref[2]).abs().max()) <= float32_tol(ref[2], vocab * width)
    # Partial, not already summed: each rank's share alone is far from the full gradient.
    assert float((partial[0] - ref[2]).abs().max()) > 0.1 * float(ref[2].abs().max())
    grad_w = torch.cat([torch.tensor(r["grad_weight"]) for r in ranks])
    assert float((grad_w - ref[3]).abs().max()) <= float32_tol(ref[3], labels.numel() * width)


# ----------------------------------------------------------------------------------------
# activation through verl's plugin entry point
# ----------------------------------------------------------------------------------------

def test_installed_plugin_left_verl_unpatched():
    """This process imported verl without DPO_FAST_VERL (tests/test_frameworks.py removes it): dpo-fast's
    entry point loaded and did nothing."""
    from importlib.metadata import entry_points

    assert "DPO_FAST_VERL" not in os.environ
    plugins = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert plugins.get("dpo_fast") == "dpo_fast.integrations.verl_plugin"
    assert "dpo_fast.integrations.verl_plugin" in sys.modules  # loaded by `import verl`
    assert not isinstance(STOCK, dpo_verl.LinearCrossEntropy)


def test_plugin_entry_point_patches_with_env_switch():
    """A fresh `import verl` with DPO_FAST_VERL=1: the kernel name is dpo-fast's, without user code."""
    show = ("import verl; from verl.utils.kernel import linear_cross_entropy as k; "
            "print(type(k.linear_cross_entropy).__module__)")
    done = subprocess.run([sys.executable, "-c", show], env={**os.environ, "DPO_FAST_VERL": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "dpo_fast.integrations.verl", done.stdout + done.stderr[-2000:]


def test_plugin_switch_values(monkeypatch):
    from dpo_fast.integrations import verl_plugin

    monkeypatch.setenv("DPO_FAST_VERL", "0")
    assert verl_plugin.activate_from_env() is False and not dpo_verl.is_patched()
    monkeypatch.setenv("DPO_FAST_VERL", "yes")
    with pytest.warns(UserWarning, match="neither '1' nor '0'"):
        assert verl_plugin.activate_from_env() is False
    monkeypatch.setenv("DPO_FAST_VERL", "1")
    assert verl_plugin.activate_from_env() is True
    assert isinstance(verl_kernel.linear_cross_entropy, dpo_verl.LinearCrossEntropy)


def test_megatron_modules_bound_at_import_are_patched():
    """The Megatron engine's modules bind the kernel at import: patched when already imported, and a
    module imported after the patch binds the patched name; unpatch restores both."""
    import importlib

    before, after = dpo_verl.BOUND_AT_IMPORT
    early = importlib.import_module(before)  # megatron-core 0.16.1, installed without its dependencies
    assert early.linear_cross_entropy is STOCK
    patched = dpo_verl.patch_verl()
    assert before in patched and isinstance(early.linear_cross_entropy, dpo_verl.LinearCrossEntropy)
    sys.modules.pop(after, None)
    late = importlib.import_module(after)
    assert isinstance(late.linear_cross_entropy, dpo_verl.LinearCrossEntropy)
    dpo_verl.unpatch_verl()
    assert early.linear_cross_entropy is STOCK and late.linear_cross_entropy is STOCK
