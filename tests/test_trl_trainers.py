"""TRL's SFT, KTO, GRPO and RLOO trainers under ``patch_trl()`` give the stock trainer's numbers.

On trl >= 1.15 these trainers score tokens through ``_ChunkedLogProbFunction`` (TRL's fused
LM head), which ``patch_trl()`` replaces. Each test trains a tiny random Llama for a few
steps, stock and patched, from the same seed, data and initial weights, and compares the
logged metrics of every step and the final parameters.

Two things make every call count:

- a shadow check: during the patched run every call to dpo-fast is also run through TRL's
  own function on detached copies of its inputs, and all five per-token outputs (log-probs,
  entropy, log(sum p^2), mean logit, top-1 flag) are compared, whichever ones the trainer
  asked for; the call count must equal the stock run's.
- two ways TRL hands tokens over: on CPU it passes every position (labels clamped to 0); on
  CUDA only the scored ones (``hidden[mask]``). The Triton-engine runs switch TRL to the
  CUDA way (``trl.trainer.utils._use_triton``), so that masking path runs here too.

GRPO and RLOO sample their completions once (``num_iterations`` = steps) from the identical
initial policy, so stock and patched runs train on the same completions.
"""

import copy
import os
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

trl = pytest.importorskip("trl")
from packaging.version import Version  # noqa: E402

import _trl_harness as harness  # noqa: E402
from dpo_fast.integrations import trl as dpo_trl  # noqa: E402

if Version(trl.__version__) < Version(dpo_trl.FUSED_HEAD_SINCE):
    pytest.skip(f"fused-head trainers need trl >= {dpo_trl.FUSED_HEAD_SINCE}", allow_module_level=True)

import trl.trainer.utils as trl_utils  # noqa: E402

STEPS = 3
LR = 0.5
# Metrics that are wall-clock or bookkeeping, not results of the computation.
UNTIMED = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch",
           "total_flos", "train_loss")
# Discrete metrics: an exact match is required, unless a tie decides them (checked by the shadow).
DISCRETE = ("mean_token_accuracy",)
PROMPTS = [p for p, _, _ in harness.PAIRS]


@pytest.fixture(autouse=True)
def _always_unpatch():
    yield
    dpo_trl.unpatch_trl()


def _sft(args_dir, policy, tok, **extra):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"prompt": PROMPTS, "completion": [c for _, c, _ in harness.PAIRS]})
    args = SFTConfig(output_dir=args_dir, per_device_train_batch_size=4, max_steps=STEPS, learning_rate=LR,
                     **_common(), **extra)
    return SFTTrainer(model=policy, args=args, train_dataset=data, processing_class=tok)


def _kto(args_dir, policy, tok, **extra):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = [(p, c, True) for p, c, _ in harness.PAIRS] + [(p, r, False) for p, _, r in harness.PAIRS]
    data = Dataset.from_dict({"prompt": [r[0] for r in rows], "completion": [r[1] for r in rows],
                              "label": [r[2] for r in rows]})
    args = KTOConfig(output_dir=args_dir, per_device_train_batch_size=8, max_steps=STEPS, learning_rate=LR,
                     beta=0.5, **_common(), **extra)
    return KTOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=args, train_dataset=data,
                      processing_class=tok)


def _length_reward(completions, **kwargs):
    """A reward that tells completions apart: shorter is better, 'paris' is best."""
    return [float("paris" in c) - 0.1 * len(c.split()) for c in completions]


def _rl_config(config_class, args_dir, **extra):
    # One generation (num_iterations = steps), reused for every step: completions sampled once from the
    # identical initial policy. A reference model (beta > 0) adds the KL term and its forward-only calls.
    return config_class(output_dir=args_dir, per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=4, num_iterations=STEPS, max_steps=STEPS, learning_rate=LR,
                        beta=0.1, temperature=0.9, **_common(), **extra)


def _grpo(args_dir, policy, tok, **extra):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    data = Dataset.from_dict({"prompt": PROMPTS[:1]})
    return GRPOTrainer(model=policy, reward_funcs=_length_reward, args=_rl_config(GRPOConfig, args_dir, **extra),
                       train_dataset=data, processing_class=tok)


def _rloo(args_dir, policy, tok, **extra):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    data = Dataset.from_dict({"prompt": PROMPTS[:1]})
    return RLOOTrainer(model=policy, reward_funcs=_length_reward, args=_rl_config(RLOOConfig, args_dir, **extra),
                       train_dataset=data, processing_class=tok)


def _preference_data():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS, "chosen": [c for _, c, _ in harness.PAIRS],
                              "rejected": [r for _, _, r in harness.PAIRS]})


def _cpo(args_dir, policy, tok, **extra):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(output_dir=args_dir, per_device_train_batch_size=4, max_steps=STEPS, learning_rate=LR, beta=0.5,
                     **_common(), **extra)
    return CPOTrainer(model=policy, args=args, train_dataset=_preference_data(), processing_class=tok)


def _orpo(args_dir, policy, tok, **extra):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(output_dir=args_dir, per_device_train_batch_size=4, max_steps=STEPS, learning_rate=LR,
                      beta=0.5, **_common(), **extra)
    return ORPOTrainer(model=policy, args=args, train_dataset=_preference_data(), processing_class=tok)


TRAINERS = {"sft": _sft, "kto": _kto, "grpo": _grpo, "rloo": _rloo, "cpo": _cpo, "orpo": _orpo}
# Trainers that build full logits in TRL; patch_trl replaces their concatenated_forward.
FULL_LOGITS = {"cpo": "trl.experimental.cpo.CPOTrainer", "orpo": "trl.experimental.orpo.ORPOTrainer"}


def _common():
    # Plain SGD: a parameter's change is lr times its gradient, so float32 gradient differences stay float32-sized
    # in the parameters (Adam divides by sqrt(v) and turns rounding in near-zero gradients into lr-sized steps).
    return dict(optim="sgd", logging_steps=1, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)


class _Shadow:
    """Wraps dpo-fast's ChunkedLogProb.apply: counts calls and checks all five outputs against TRL's function."""

    def __init__(self, trl_function):
        self.trl_function, self.calls, self.worst = trl_function, 0, {}
        self.original = dpo_trl.ChunkedLogProb.apply

    def __call__(self, chunked, hidden, weight, bias, targets, *settings):
        self.calls += 1
        self.check(chunked, hidden, weight, bias, targets, settings[:4])
        return self.original(chunked, hidden, weight, bias, targets, *settings)

    def check(self, chunked, hidden, weight, bias, targets, settings):
        hidden, weight = hidden.detach().float(), weight.detach().float()
        bias = None if bias is None else bias.detach().float()
        with torch.no_grad():
            ours = self.original(chunked, hidden, weight, bias, targets, *settings, dpo_trl.TRL_OUTPUTS[1:])
            kept = targets != -100
            theirs = self.trl_function.apply(hidden[kept], weight, bias, targets[kept], *settings,
                                             dpo_trl.TRL_OUTPUTS[1:])
        # A token's top-1 flag is decided by a tie when its two largest logits are within rounding.
        logits = hidden[kept] @ weight.T
        top2 = logits.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 1e-5 * top2.abs().amax(-1).clamp(min=1)
        for name, a, b in zip(dpo_trl.TRL_OUTPUTS, ours, theirs):
            a = a[kept]
            if a.dtype == torch.bool:
                assert torch.equal(a[decided], b[decided]), f"{name} differs from TRL's on a call"
                continue
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
            self.worst[name] = max(self.worst.get(name, 0.0), float((a - b).abs().max()) if a.numel() else 0.0)


def _run(trainer_name, patched, impl="torch", compact=False, monkeypatch=None, **extra):
    """Logged metrics per step, final parameters and fused-head call count of one short run."""
    tok = harness.tokenizer()
    policy = harness.model(len(tok), seed=0)
    if trainer_name in ("grpo", "rloo"):
        # TRL builds the reference from the hub name of the policy; offline, hand it a copy of the policy.
        import importlib

        module = importlib.import_module(f"trl.trainer.{trainer_name}_trainer")
        initial = copy.deepcopy(policy)
        monkeypatch.setattr(module, "create_model_from_path", lambda *a, **k: copy.deepcopy(initial))
    # compact=True: TRL passes only the scored positions, as it does on CUDA.
    monkeypatch.setattr(trl_utils, "_use_triton", (lambda device: True) if compact else (lambda device: False))
    stock_calls = []
    trl_function = trl_utils._ChunkedLogProbFunction
    shadow = _Shadow(trl_function)
    if trainer_name in FULL_LOGITS:
        # Calls of concatenated_forward (stock) against forwards that went through dpo-fast (patched).
        import importlib

        module_name, class_name = FULL_LOGITS[trainer_name].rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        if patched:
            assert dpo_trl.patch_trl(impl=impl) == "fused_head"
            counted, target, attr = dpo_trl.fused_forward, dpo_trl, "fused_forward"
        else:
            counted, target, attr = cls.concatenated_forward, cls, "concatenated_forward"

        def counting(*args, **kwargs):
            stock_calls.append(1)
            return counted(*args, **kwargs)

        monkeypatch.setattr(target, attr, counting)
        shadow.calls = None
    elif patched:
        assert dpo_trl.patch_trl(impl=impl) == "fused_head"
        monkeypatch.setattr(dpo_trl.ChunkedLogProb, "apply", lambda chunked, *args: shadow(chunked, *args))
    else:
        original_apply = trl_function.apply

        class Counted:  # the stock function, counted
            @staticmethod
            def apply(*args):
                stock_calls.append(1)
                return original_apply(*args)

        monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counted)
    torch.manual_seed(0)
    try:
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = TRAINERS[trainer_name](out, policy, tok, **extra)
            trainer.train()
    finally:
        dpo_trl.unpatch_trl()
        monkeypatch.undo()
    history = [{k: v for k, v in entry.items() if k not in UNTIMED} for entry in trainer.state.log_history
               if "loss" in entry]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    calls = shadow.calls if patched and shadow.calls is not None else len(stock_calls)
    return dict(history=history, params=params, calls=calls,
                worst=shadow.worst, fallbacks=[str(w.message) for w in caught if "dpo-fast" in str(w.message)])


def _compare(stock, fused, rtol=1e-4, atol=1e-5):
    """Per step every logged metric (discrete ones exactly), then every final parameter."""
    assert len(stock["history"]) == len(fused["history"]) == STEPS, (stock["history"], fused["history"])
    assert not fused["fallbacks"], fused["fallbacks"]
    assert fused["calls"] == stock["calls"] > 0, (stock["calls"], fused["calls"])
    for step, (a, b) in enumerate(zip(stock["history"], fused["history"])):
        assert set(a) == set(b), f"step {step}: metrics differ: {sorted(set(a) ^ set(b))}"
        for key, value in a.items():
            if not isinstance(value, (int, float)):
                assert value == b[key], f"step {step} {key}"
            elif key in DISCRETE:
                assert value == b[key], f"step {step} {key}: stock {value} vs dpo-fast {b[key]}"
            else:
                assert abs(value - b[key]) <= atol + rtol * abs(value), \
                    f"step {step} {key}: stock {value} vs dpo-fast {b[key]}"
    for name, p in stock["params"].items():
        torch.testing.assert_close(fused["params"][name], p, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _moved(stock):
    """The run trained: parameters left their initial values (else equal parameters prove nothing)."""
    tok = harness.tokenizer()
    initial = dict(harness.model(len(tok), seed=0).named_parameters())
    return max(float((p - initial[n].detach()).abs().max()) for n, p in stock["params"].items())


_STOCK = {}


def _stock(name, compact, monkeypatch, **extra):
    key = (name, compact, tuple(sorted(extra.items())))
    if key not in _STOCK:
        _STOCK[key] = _run(name, patched=False, compact=compact, monkeypatch=monkeypatch, **extra)
    return _STOCK[key]


@pytest.mark.cpu_tensors(reason="the trainers run on CPU (use_cpu=True)")
@pytest.mark.parametrize("name", [name for name in TRAINERS if name not in FULL_LOGITS])
@pytest.mark.parametrize("impl, compact", [("torch", False), ("chunked", True)],
                         ids=["torch-every-position", "triton-scored-only"])
def test_trainer_matches_stock(name, impl, compact, monkeypatch):
    stock = _stock(name, compact, monkeypatch)
    assert _moved(stock) > 1e-3, "the stock run did not train"
    fused = _run(name, patched=True, impl=impl, compact=compact, monkeypatch=monkeypatch)
    _compare(stock, fused)
    print(f"{name} {impl}: {fused['calls']} dpo-fast calls; worst per-token output differences {fused['worst']}")


@pytest.mark.parametrize("name, extra", [("cpo", {}), ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0}),
                                         ("orpo", {})], ids=["cpo-sigmoid-nll", "cpo-simpo", "orpo"])
@pytest.mark.cpu_tensors(reason="the trainers run on CPU (use_cpu=True)")
@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_full_logits_trainer_matches_stock(name, extra, impl, monkeypatch):
    """CPO and ORPO (trl.experimental) build [B, T, V] logits; patched, their concatenated_forward runs dpo-fast."""
    stock = _stock(name, False, monkeypatch, **extra)
    assert _moved(stock) > 1e-3, "the stock run did not train"
    fused = _run(name, patched=True, impl=impl, monkeypatch=monkeypatch, **extra)
    _compare(stock, fused)


def _head_inputs(n=24, h=16, v=200, dtype=torch.float32):
    hidden = torch.randn(n, h).to(dtype).requires_grad_()
    weight = (torch.randn(v, h) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,))
    return hidden, weight, targets


def test_an_argument_dpo_fast_lacks_runs_trls_function_with_one_warning():
    """TRL's dev branch passes ``sampling_mask [N, K]``: that call goes to TRL's function, never a TypeError."""
    calls = []

    class TRLFunction:  # stands in for a newer TRL's function that takes the extra argument
        @staticmethod
        def apply(*args, **kwargs):
            calls.append((len(args), sorted(kwargs)))
            return trl_utils._ChunkedLogProbFunction.apply(*args[:9])

    hidden, weight, targets = _head_inputs()
    chunked = dpo_trl.ChunkedLogProb(impl="torch", fallback=TRLFunction)
    mask = torch.ones(hidden.shape[0], 4, dtype=torch.bool)
    dpo_trl._patches.rearm_warnings()
    with pytest.warns(UserWarning, match="sampling_mask") as caught:
        out = chunked.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("entropy",), sampling_mask=mask)
        chunked.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("entropy",), sampling_mask=mask)
        chunked.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("entropy",), mask)  # positional
    assert len([w for w in caught if "sampling_mask" in str(w.message)]) == 1, "one warning per argument"
    assert calls == [(9, ["sampling_mask"]), (9, ["sampling_mask"]), (10, [])]
    out[0].sum().backward()  # TRL's own function, differentiable as ever
    # An argument passed as None asks for nothing dpo-fast lacks: dpo-fast serves the call.
    calls.clear()
    chunked.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("entropy",), sampling_mask=None)
    assert calls == []


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
def test_cast_lm_head_to_fp32_keeps_a_float32_head(weight_dtype):
    """``cast_lm_head_to_fp32=True`` hands over float32 hidden states outside autocast with a 16-bit head:
    TRL computes the products in float32, and so must the drop-in (not round the hidden states to 16 bits)."""
    hidden, weight, targets = _head_inputs(dtype=torch.float32)
    weight = weight.detach().to(weight_dtype).requires_grad_()
    ours = dpo_trl.ChunkedLogProb(impl="torch").apply(hidden, weight, None, targets, 1.0, 64, None, 1.0,
                                                      dpo_trl.TRL_OUTPUTS[1:])
    theirs = trl_utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0,
                                                     dpo_trl.TRL_OUTPUTS[1:])
    exact = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None])[:, 0]
    for name, a, b in zip(dpo_trl.TRL_OUTPUTS, ours, theirs):
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # float32 precision, far inside 16-bit rounding of the hidden states (~4e-3 relative for bf16)
    torch.testing.assert_close(ours[0].double(), exact, rtol=1e-5, atol=1e-5)
    grads_ours = torch.autograd.grad(ours[0].sum(), (hidden, weight))
    grads_theirs = torch.autograd.grad(theirs[0].sum(), (hidden, weight))
    assert grads_ours[1].dtype == weight_dtype
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if a.dtype != torch.float32 else 1e-5, atol=1e-5)


def test_dpo_wpo_weighting_uses_log_sum_sq_probs_like_stock():
    """DPOTrainer's WPO weighting (``use_weighting``) is the one TRL 1.16 metric path that reads
    ``log_sum_sq_probs``: patched, it must give stock's losses and metrics too."""
    stock = harness.run(patched=False, use_weighting=True, optim="sgd")
    fused = harness.run(patched=True, use_weighting=True, optim="sgd")
    assert fused["patch"] == "fused_head" and not fused["fallbacks"], fused["fallbacks"]
    harness.compare(stock, fused)
    assert abs(stock["head"] - fused["head"]) <= 1e-5 * max(1.0, abs(stock["head"]))


def test_cpo_orpo_settings_without_a_fused_equivalent_run_trl_code():
    from types import SimpleNamespace

    base = dict(is_encoder_decoder=False, aux_loss_enabled=False)
    assert dpo_trl._unsupported_preference_forward(SimpleNamespace(**base)) is None
    for change in (dict(is_encoder_decoder=True), dict(aux_loss_enabled=True)):
        assert dpo_trl._unsupported_preference_forward(SimpleNamespace(**dict(base, **change))) is not None
    # A LoRA adapter on lm_head: dpo-fast would read the base weight alone, so TRL's code runs.
    peft = pytest.importorskip("peft")
    tok = harness.tokenizer()
    plain = harness.model(len(tok))
    assert dpo_trl._unsupported_preference_forward(SimpleNamespace(**base), plain) is None
    adapted = peft.get_peft_model(harness.model(len(tok)), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    reason = dpo_trl._unsupported_preference_forward(SimpleNamespace(**base), adapted)
    assert reason is not None and "PEFT adapter" in reason, reason


def test_patch_reaches_cpo_and_orpo_and_unpatch_restores_them():
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    originals = CPOTrainer.concatenated_forward, ORPOTrainer.concatenated_forward
    dpo_trl.patch_trl(impl="torch")
    assert CPOTrainer.concatenated_forward is dpo_trl._fused_cpo_forward
    assert ORPOTrainer.concatenated_forward is dpo_trl._fused_orpo_forward
    dpo_trl.unpatch_trl()
    assert (CPOTrainer.concatenated_forward, ORPOTrainer.concatenated_forward) == originals
