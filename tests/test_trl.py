"""dpo_fast.integrations.trl: TRL's DPOTrainer with patch_trl() gives the stock trainer's losses and metrics.

The installed TRL (>= 1.15: the chunked log-prob function is swapped) runs in-process;
TRL 1.14.2 and 0.29.1 (DPOTrainer._compute_loss replaced) and 0.28.0 (concatenated_forward
replaced) are installed with
``pip install --no-deps --target .venv/trl-<version>`` once and run in a subprocess with
that folder first on PYTHONPATH. Everything runs offline on CPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import trl  # noqa: F401
except ImportError:  # pragma: no cover - trl is in the dev extra
    pytest.fail("trl is not installed: pip install -e '.[dev]'", pytrace=False)

import _trl_harness as harness  # noqa: E402
from packaging.version import Version  # noqa: E402

from dpo_fast.integrations import trl as dpo_trl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# TRL versions of the _compute_loss line, each with the trainer settings it is run with.
OLDER_TRL = {
    # Empty prompts: TRL's ipo and sigmoid_norm divide by the unshifted completion mask (one token more than
    # are scored when a completion starts at position 0); the patched trainer must use TRL's divisor. Plain SGD:
    # Adam's first steps turn float32 rounding in near-zero gradients into lr-sized parameter changes.
    "1.14.2": [{"loss_type": ["sigmoid_norm", "ipo", "sft"], "empty_prompts": True, "optim": "sgd"},
               {"loss_type": ["sigmoid", "sft"]}, {"loss_type": "ipo", "precompute_ref": True}],
    "0.29.1": [{"loss_type": ["hinge", "sft"]},  # 0.29 refuses empty prompts; keep_end truncation cuts them away
               {"loss_type": "ipo", "max_length": 3, "truncation_mode": "keep_end", "optim": "sgd"}],
    # concatenated_forward: sums with the sft NLL and rpo_alpha, IPO's means with precomputed reference
    # log-probs, and left-truncation (max_length shorter than prompt + completion).
    "0.28.0": [{"loss_type": ["sigmoid", "sft"], "rpo_alpha": 0.5},
               {"loss_type": "ipo", "precompute_ref": True, "max_length": 8, "truncation_mode": "keep_end"}],
}
# The patch each TRL line gets.
PATCH_KIND = {"0.28.0": "concatenated_forward"}


@pytest.fixture(autouse=True)
def _always_unpatch():
    yield
    dpo_trl.unpatch_trl()


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_chunked_logprob_matches_trl_function(impl, device):
    """The drop-in against TRL's own ChunkedLogProbFunction: five outputs and all gradients, with targets that
    carry -100 (dropped before any product, outputs 0 there), on the PyTorch and Triton engines."""
    from trl.trainer.utils import _ChunkedLogProbFunction as trl_function

    n, h, v = 40, 24, 300
    hidden = torch.randn(n, h, dtype=torch.float64, device=device).float().requires_grad_()
    weight = (torch.randn(v, h, device=device) * 0.5).requires_grad_()
    bias = (torch.randn(v, device=device) * 0.1).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    targets[::7] = -100
    kept = targets != -100
    settings = (1.3, 128, 4.0, 0.8)  # temperature, chunk_size, softcap, logit_scale
    upstream = torch.randn(n, device=device), torch.randn(n, device=device)

    ours = dpo_trl.ChunkedLogProb(impl=impl).apply(hidden, weight, bias, targets, *settings, dpo_trl.TRL_OUTPUTS[1:])
    (ours[0] * upstream[0] + ours[1] * upstream[1]).sum().backward()
    our_grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    theirs = trl_function.apply(hidden[kept], weight, bias, targets[kept], *settings, dpo_trl.TRL_OUTPUTS[1:])
    (theirs[0] * upstream[0][kept] + theirs[1] * upstream[1][kept]).sum().backward()

    for name, a, b in zip(dpo_trl.TRL_OUTPUTS, ours, theirs):
        assert a.shape == targets.shape, name
        assert not a[~kept].any(), f"{name} must be 0 at ignored targets"
        if a.dtype == torch.bool:
            assert torch.equal(a[kept], b), name
        else:
            torch.testing.assert_close(a[kept], b, rtol=1e-5, atol=1e-5, msg=name)
    for name, a, t in zip(("hidden", "weight", "bias"), our_grads, (hidden, weight, bias)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-5, msg=name)

    only_logps = dpo_trl.ChunkedLogProb(impl=impl).apply(hidden, weight, bias, targets, *settings, ())
    assert only_logps[0] is not None and all(x is None for x in only_logps[1:])


def test_no_scored_token_gives_connected_zeros():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    out = dpo_trl.ChunkedLogProb(impl="torch").apply(hidden, weight, None, torch.full((5,), -100), 1.0, 64)
    assert not out[0].any()
    out[0].sum().backward()
    assert hidden.grad is not None and not hidden.grad.any()


def test_float_targets_are_refused_naming_the_argument():
    """Issue 22 item 5: TRL's drop-in checks its targets' dtype first, under TRL's name for them."""
    hidden, weight = torch.randn(5, 8), torch.randn(11, 8)
    for targets in (torch.zeros(5), torch.zeros(5, dtype=torch.bool)):
        with pytest.raises(TypeError, match="targets"):
            dpo_trl.ChunkedLogProb(impl="torch").apply(hidden, weight, None, targets, 1.0, 64)


def test_installed_trl_trainer_matches_stock():
    if Version(trl.__version__) < Version(dpo_trl.FUSED_HEAD_SINCE):
        pytest.fail(f"the dev extra pins trl >= {dpo_trl.FUSED_HEAD_SINCE}; found {trl.__version__}")
    calls = []
    original = dpo_trl.ChunkedLogProb.apply

    def counted(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return original(self, *args, **kwargs)

    stock = harness.run(patched=False)
    dpo_trl.ChunkedLogProb.apply = counted
    try:
        fused = harness.run(patched=True)
    finally:
        dpo_trl.ChunkedLogProb.apply = original
    assert fused["patch"] == "fused_head"
    assert len(calls) >= 2 * len(fused["history"]), "the trainer never reached dpo-fast"
    worst = harness.compare(stock, fused)
    assert abs(stock["weight_norm"] - fused["weight_norm"]) <= 1e-4 * stock["weight_norm"]
    print(f"trl {trl.__version__}: worst metric differences {worst}")


def _older_trl(version):
    """A folder holding trl==version (no dependencies: the installed ones serve), installed once under .venv."""
    target = REPO / ".venv" / f"trl-{version}"
    if not (target / "trl" / "__init__.py").exists():
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                                 f"trl=={version}"], capture_output=True, text=True)
        if result.returncode != 0:
            message = f"could not install trl=={version} into {target}:\n{result.stderr[-2000:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)  # an offline machine; CI reaches PyPI and must run this
    return target


@pytest.mark.parametrize("version", list(OLDER_TRL))
def test_compute_loss_line_matches_stock(version):
    target = _older_trl(version)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(REPO)]))
    result = subprocess.run([sys.executable, str(REPO / "tests" / "_trl_harness.py"), json.dumps(OLDER_TRL[version])],
                            env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    for case in json.loads(lines[0][len("RESULT "):]):
        assert case["trl"] == version
        assert case["fused"]["patch"] == PATCH_KIND.get(version, "compute_loss")
        assert not case["fused"]["fallbacks"], case["fused"]["fallbacks"]
        assert case["fused"]["restored"], "unpatch_trl left DPOTrainer patched"
        assert case["fused"]["fused_calls"] >= len(case["fused"]["history"]), "the trainer never reached dpo-fast"
        worst = harness.compare(case["stock"], case["fused"])
        print(f"trl {version} {case['options']}: worst metric differences {worst}")


def test_unpatch_restores_trl():
    import trl.trainer.utils as trl_utils

    original = trl_utils._ChunkedLogProbFunction
    assert dpo_trl.patch_trl(impl="torch") == "fused_head"
    assert isinstance(trl_utils._ChunkedLogProbFunction, dpo_trl.ChunkedLogProb) and dpo_trl.is_patched()
    dpo_trl.unpatch_trl()
    assert trl_utils._ChunkedLogProbFunction is original and not dpo_trl.is_patched()


def test_older_trl_is_refused(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "0.27.2")
    with pytest.raises(RuntimeError, match="0.28.0"):
        dpo_trl.patch_trl()


def test_settings_without_a_fused_equivalent_run_trl_code():
    base = dict(f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0, ld_alpha=None, use_weighting=False,
                aux_loss_enabled=False)
    assert dpo_trl._unsupported_setting(SimpleNamespace(**base), False) is None
    assert dpo_trl._unsupported_setting(SimpleNamespace(**base), True) is not None
    alpha_one = dict(base, f_divergence_type="alpha_divergence")
    assert dpo_trl._unsupported_setting(SimpleNamespace(**alpha_one), False) is None
    for change in (dict(f_divergence_type="js_divergence"), dict(ld_alpha=0.5), dict(use_weighting=True),
                   dict(aux_loss_enabled=True)):
        assert dpo_trl._unsupported_setting(SimpleNamespace(**dict(base, **change)), False) is not None, change


def test_concatenated_forward_settings_without_a_fused_equivalent_run_trl_code():
    def trainer(**change):
        base = dict(is_encoder_decoder=False, is_vision_model=False, padding_free=False, aux_loss_enabled=False,
                    use_weighting=False, args=SimpleNamespace(ld_alpha=None))
        return SimpleNamespace(**dict(base, **change))

    assert dpo_trl._unsupported_forward(trainer(), {}, False) is None
    # ld_alpha only changes the policy's log-probs: the reference pass stays fused.
    assert dpo_trl._unsupported_forward(trainer(args=SimpleNamespace(ld_alpha=0.5)), {}, True) is None
    assert dpo_trl._unsupported_forward(trainer(args=SimpleNamespace(ld_alpha=0.5)), {}, False) is not None
    assert dpo_trl._unsupported_forward(trainer(), {"pixel_values": None}, False) is not None
    for change in (dict(is_encoder_decoder=True), dict(is_vision_model=True), dict(padding_free=True),
                   dict(aux_loss_enabled=True), dict(use_weighting=True)):
        assert dpo_trl._unsupported_forward(trainer(**change), {}, False) is not None, change
