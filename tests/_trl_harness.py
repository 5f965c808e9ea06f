"""A few steps of TRL's DPOTrainer on a tiny offline model, stock or with dpo-fast patched in.

Used in-process by tests/test_trl.py for the installed TRL, and as a script
(``python tests/_trl_harness.py``, printing JSON) for other TRL versions put first on
PYTHONPATH. Everything is built locally: a word-level tokenizer, a random-init Llama, a
small preference set. Same seed, same data order, same initial weights in every run.
"""

import copy
import json
import os
import sys
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

WORDS = ("what is the capital of france italy spain japan paris rome madrid tokyo berlin color sky grass "
         "blue green red two plus three four five six ? .").split()
PAIRS = [
    ("what is the capital of france ?", " paris .", " rome ."),
    ("what is the capital of italy ?", " rome .", " madrid ."),
    ("what is the capital of spain ?", " madrid .", " tokyo ."),
    ("what is the capital of japan ?", " tokyo .", " berlin ."),
    ("what color is the sky ?", " blue .", " green ."),
    ("what color is the grass ?", " green .", " red ."),
    ("what is two plus two ?", " four .", " five ."),
    ("what is three plus three ?", " six .", " four ."),
]
METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
           "num_tokens", "nll_loss")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "</s>"])  # split out of "paris</s>" before the whitespace split
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def model(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).float()


def run(patched, steps=3, seed=0, impl="torch", loss_type="sigmoid", precompute_ref=False, empty_prompts=False,
        **config):
    """Log history (one dict per step) of a DPOTrainer run; ``patched`` applies dpo_fast's patch_trl.

    ``empty_prompts``: every other example has an empty prompt, so its completion starts at position 0.
    ``config``: further DPOConfig fields (``rpo_alpha``, ``max_length``, ...)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dpo_fast.integrations import trl as dpo_trl

    tok = tokenizer()
    policy = model(len(tok), seed)
    prompts = [("" if empty_prompts and i % 2 else p) for i, (p, _, _) in enumerate(PAIRS)]
    data = Dataset.from_dict({"prompt": prompts, "chosen": [c for _, c, _ in PAIRS],
                              "rejected": [r for _, _, r in PAIRS]})
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-2,
                         logging_steps=1, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                         save_strategy="no", seed=seed, beta=0.5, loss_type=loss_type, disable_tqdm=True,
                         precompute_ref_log_probs=precompute_ref, dataloader_num_workers=0, **config)
        stock_methods = dict(vars(DPOTrainer))
        # Patched before the trainer is built, so precomputed reference log-probs go through dpo-fast too.
        kind = dpo_trl.patch_trl(impl=impl) if patched else None
        # Model calls that went through dpo-fast (the _compute_loss and concatenated_forward lines), and
        # dpo-fast's warnings: a step that fell back to TRL's code would match the stock run trivially.
        fused_calls, original_fused_forward = [], dpo_trl.fused_forward

        def counted_fused_forward(*args, **kwargs):
            fused_calls.append(1)
            return original_fused_forward(*args, **kwargs)

        dpo_trl.fused_forward = counted_fused_forward
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=args, train_dataset=data,
                                     processing_class=tok)
                trainer.train()
        finally:
            dpo_trl.fused_forward = original_fused_forward
            dpo_trl.unpatch_trl()
        fallbacks = [str(w.message) for w in caught if str(w.message).startswith("dpo-fast")]
        restored = dict(vars(DPOTrainer)) == stock_methods  # unpatch_trl put every method back
        steps_logged = [{k: v for k, v in entry.items() if k in METRICS} for entry in trainer.state.log_history
                        if "loss" in entry]
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return dict(history=steps_logged, patch=kind, fused_calls=len(fused_calls), fallbacks=fallbacks,
                restored=restored,
                weight_norm=sum(float(w.double().norm()) for w in weights.values()),
                head=weights["lm_head.weight"].double().sum().item())


# Fractions of pairs or tokens: each counts a strict comparison, so it is compared only where that
# comparison is not a tie.
DISCRETE = ("rewards/accuracies",)


def _rewards_tie(step, noise=1e-6):
    """True where every pair's chosen and rejected rewards are 0 up to rounding (the policy still equals the
    reference, as at the first step): ``chosen > rejected`` then flips with the last bit of either sum."""
    return max(abs(step["rewards/chosen"]), abs(step["rewards/rejected"]), abs(step["rewards/margins"])) <= noise


def compare(stock, fused, rtol=1e-4, atol=1e-5):
    """Largest difference per metric; raises AssertionError when one is out of tolerance."""
    assert len(stock["history"]) == len(fused["history"]) > 0, (stock["history"], fused["history"])
    worst = {}
    for step, (a, b) in enumerate(zip(stock["history"], fused["history"])):
        assert set(a) == set(b), f"step {step}: metrics differ: {sorted(set(a) ^ set(b))}"
        for key in a:
            if key in DISCRETE and _rewards_tie(a):
                continue
            diff = abs(a[key] - b[key])
            worst[key] = max(worst.get(key, 0.0), diff)
            assert diff <= atol + rtol * abs(a[key]), f"step {step} {key}: stock {a[key]} vs dpo-fast {b[key]}"
    return worst


def _tolerate_trl_028_probe():
    """trl 0.28 asks transformers' ``_is_package_available("weave")``, which in transformers 5 returns a
    (truthy) tuple, then imports the missing weave. Answer False when weave is not installed."""
    import importlib.util

    from trl import import_utils

    if importlib.util.find_spec("weave") is None:
        import_utils.is_weave_available = lambda: False


if __name__ == "__main__":
    import trl
    from packaging.version import Version

    if Version(trl.__version__) < Version("0.29"):
        _tolerate_trl_028_probe()

    # argv[1]: a JSON list of run() keyword sets; one stock and one patched run each.
    cases = json.loads(sys.argv[1]) if len(sys.argv) > 1 else [{}]
    results = [{"trl": trl.__version__, "options": options, "stock": run(False, **options),
                "fused": run(True, **options)} for options in cases]
    print("RESULT " + json.dumps(results))
