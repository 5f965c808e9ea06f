"""The fused kernels' autotuning, run for real on CPU (Triton's interpreter).

Triton's autotuner times each config on the launch's own buffers, so a kernel that adds
into an output would hand back the sum of every timing run as well: ``reset_to_zero`` (or
``restore_value``) must name each such output. Here each autotuned kernel gets several
interpreter-sized configs and the autotuner's real logic (``PrunedAutotuner``: Triton's
``run``, ``prune_configs`` and ``_bench``), with ``do_bench`` replaced by a deterministic timer
that runs the kernel like the real one and ranks a config other than the first fastest. The
tuned result must equal, bit for bit, the result of the chosen config launched alone.
"""

import pytest
import torch
import triton

from dpo_fast.kernels import fused_linear_logps as fused
from helpers import cpu_by_design

pytestmark = cpu_by_design("the autotuner's logic run under the interpreter with a fake timer; on a GPU benchmarks/gpu_checks.py compares first and second calls")

if not fused.INTERPRETED:  # pragma: no cover - a GPU run compiles every config; these shapes are for numpy
    pytest.skip("runs the autotuner under Triton's interpreter", allow_module_level=True)

TOKEN_MAJOR_CONFIGS = [  # BLOCK_N comes from the launcher
    triton.Config({"BLOCK_V": 64, "BLOCK_K": 32}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_V": 32, "BLOCK_K": 16}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_V": 16, "BLOCK_K": 32}, num_warps=1, num_stages=1),
]
VOCAB_MAJOR_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_K": 32}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 16, "BLOCK_K": 32}, num_warps=1, num_stages=1),
]
N, H, V = 45, 40, 150  # nothing a multiple of a tile: masks everywhere


class FakeTimer:
    """``do_bench`` stand-in: runs the kernel call ``runs`` times, as the real one does (warm-up and
    repetitions), and reports times from ``times`` in call order: the second config timed wins."""

    def __init__(self, times=(3.0, 1.0, 2.0), runs=2):
        self.times, self.runs, self.calls = times, runs, 0

    def __call__(self, kernel_call, quantiles=None):
        for _ in range(self.runs):
            kernel_call()
        t = self.times[self.calls % len(self.times)]
        self.calls += 1
        return [t, t, t]


def _tuner(real, configs, timer, prune=None, **lists):
    """A PrunedAutotuner over ``real``'s kernel with ``configs``, its keys and (unless overridden) its
    reset/restore lists and pruning."""
    return fused.PrunedAutotuner(
        real.fn, real.arg_names, configs=configs, key=real.keys,
        reset_to_zero=lists.get("reset_to_zero", real.reset_to_zero),
        restore_value=lists.get("restore_value", real.restore_value),
        prune_configs_by={"early_config_prune": prune or real.early_config_prune}, do_bench=timer)


def _inputs(dtype, tokens=N):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    labels = torch.randint(0, V, (tokens,), generator=g)
    logits = 30.0 * torch.tanh((hidden.double() @ weight.double().T + bias.double()) / 30.0)
    lse = torch.logsumexp(logits, dim=-1)
    grad_logp = torch.randn(tokens, generator=g)
    return hidden, weight, bias, labels, lse, grad_logp


def _run(kernel_name, inputs):
    hidden, weight, bias, labels, lse, grad_logp = inputs
    if kernel_name == "_forward_kernel":
        return (fused.forward_stats(hidden, weight, bias, labels, softcap=30.0),)
    grads = fused.backward(hidden, weight, bias, labels, lse, grad_logp,
                           need_hidden=kernel_name == "_grad_hidden_kernel",
                           need_weight=kernel_name == "_grad_weight_kernel",
                           need_bias=kernel_name == "_grad_weight_kernel", softcap=30.0)
    return tuple(g for g in grads if g is not None)


KERNELS = {"_forward_kernel": TOKEN_MAJOR_CONFIGS, "_grad_hidden_kernel": TOKEN_MAJOR_CONFIGS,
           "_grad_weight_kernel": VOCAB_MAJOR_CONFIGS}


def test_every_fused_kernel_is_autotuned_by_pruned_autotuner():
    tuned = {name for name in dir(fused) if isinstance(getattr(fused, name), triton.runtime.autotuner.Autotuner)}
    assert tuned == set(KERNELS)
    assert all(isinstance(getattr(fused, name), fused.PrunedAutotuner) for name in tuned)


@pytest.mark.parametrize("kernel_name, dtype", [("_forward_kernel", torch.float32),
                                               ("_grad_hidden_kernel", torch.bfloat16),
                                               ("_grad_weight_kernel", torch.float32)])
def test_tuned_results_bit_identical_to_untuned(monkeypatch, kernel_name, dtype):
    real = getattr(fused, kernel_name)
    configs = KERNELS[kernel_name]
    inputs = _inputs(dtype)

    timer = FakeTimer()
    tuner = _tuner(real, configs, timer)
    monkeypatch.setattr(fused, kernel_name, tuner)
    tuned_first = _run(kernel_name, inputs)
    assert timer.calls == len(configs), "every config is timed on the first launch of a key"
    assert tuner.best_config is configs[1], "the fake timer ranks the second config fastest"
    tuned_again = _run(kernel_name, inputs)  # the key is cached now: no timing
    assert timer.calls == len(configs)

    alone = FakeTimer()
    monkeypatch.setattr(fused, kernel_name, _tuner(real, [configs[1]], alone))
    untuned = _run(kernel_name, inputs)
    assert alone.calls == 0
    for a, b, c in zip(tuned_first, tuned_again, untuned):
        assert torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.parametrize("kernel_name", ["_grad_hidden_kernel", "_grad_weight_kernel"])
def test_without_reset_lists_tuning_changes_accumulated_gradients(monkeypatch, kernel_name):
    """The control: the kernels that add into their outputs are kept equal by the reset lists alone."""
    real = getattr(fused, kernel_name)
    configs = KERNELS[kernel_name]
    inputs = _inputs(torch.float32)
    monkeypatch.setattr(fused, kernel_name, _tuner(real, [configs[1]], FakeTimer()))
    untuned = _run(kernel_name, inputs)
    monkeypatch.setattr(fused, kernel_name, _tuner(real, configs, FakeTimer(), reset_to_zero=[], restore_value=[]))
    tuned = _run(kernel_name, inputs)
    assert any(not torch.equal(a, b) for a, b in zip(tuned, untuned))


def _gpu_lists(monkeypatch):
    """The kernels' GPU config lists and pruning, as a compiled launch sees them."""
    monkeypatch.setattr(fused, "INTERPRETED", False)
    return (fused._tuned(fused._TOKEN_MAJOR["forward"], fused._token_major_config, "forward"),
            fused._tuned(fused._VOCAB_MAJOR, fused._vocab_major_config, "grad_weight"))


def test_a_lone_survivor_of_pruning_runs_untimed(monkeypatch):
    """Triton times even one surviving config (0.6 s per key at Llama shapes); PrunedAutotuner does not."""
    token_major, _ = _gpu_lists(monkeypatch)
    assert len(token_major) > 1  # one entry per element size before pruning
    inputs = _inputs(torch.float32)
    timer = FakeTimer()
    prune = fused._prune_to_element_size(fused._TOKEN_MAJOR["forward"])
    tuner = _tuner(fused._forward_kernel, token_major, timer, prune=prune)
    monkeypatch.setattr(fused, "_forward_kernel", tuner)
    stats = _run("_forward_kernel", inputs)[0]
    assert timer.calls == 0
    assert fused._config_key(tuner.best_config) == fused._TOKEN_MAJOR["forward"][4][0]
    # the same launch through Triton's own autotuner times the lone survivor
    plain_timer = FakeTimer()
    plain = triton.runtime.autotuner.Autotuner(
        fused._forward_kernel.fn, fused._forward_kernel.arg_names, configs=token_major,
        key=tuner.keys, reset_to_zero=None, restore_value=None,
        prune_configs_by={"early_config_prune": prune}, do_bench=plain_timer)
    monkeypatch.setattr(fused, "_forward_kernel", plain)
    assert torch.equal(_run("_forward_kernel", inputs)[0], stats)
    print(f"Triton's own autotuner timed {plain_timer.calls} config(s) for one survivor")


@pytest.mark.parametrize("tokens, timed", [(20, 0), (45, 2)])
def test_grad_weight_pruning_keeps_token_blocks_the_batch_fills(monkeypatch, tokens, timed):
    """float32 grad_weight has two configs; a batch of <= 32 tokens keeps only the 32-token block (untimed)."""
    _, vocab_major = _gpu_lists(monkeypatch)
    inputs = _inputs(torch.float32, tokens)
    timer = FakeTimer(times=(2.0, 1.0))
    tuner = _tuner(fused._grad_weight_kernel, vocab_major, timer, prune=fused._prune_vocab_major)
    monkeypatch.setattr(fused, "_grad_weight_kernel", tuner)
    tuned = _run("_grad_weight_kernel", inputs)
    assert timer.calls == timed
    monkeypatch.setattr(fused, "_grad_weight_kernel",
                        _tuner(fused._grad_weight_kernel, [tuner.best_config], FakeTimer()))
    assert all(torch.equal(a, b) for a, b in zip(tuned, _run("_grad_weight_kernel", inputs)))
