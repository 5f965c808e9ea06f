"""Multi-GPU DPO: TRL's DPOTrainer with dpo-fast, launched by accelerate under FSDP2 or ZeRO-3.

    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/dpo_trl_multigpu.py \
        --model Qwen/Qwen2.5-0.5B-Instruct --output_dir runs/dpo-fsdp2
    accelerate launch --config_file examples/accelerate_zero3.yaml examples/dpo_trl_multigpu.py \
        --model Qwen/Qwen2.5-0.5B-Instruct --output_dir runs/dpo-zero3

``dpo_fast.integrations.trl.patch_trl()`` switches TRL's log-prob computation to dpo-fast;
the data pipeline, reference model, optimizer and sharding stay TRL's and accelerate's.
``--dataset`` takes a Hugging Face preference set with prompt/chosen/rejected columns;
without it a small built-in set of factual questions is used.

Offline smoke test (a tiny random model, no download), one CPU process, or two (gloo):

    python examples/dpo_trl_multigpu.py --tiny --cpu --steps 2
    torchrun --nproc_per_node 2 examples/dpo_trl_multigpu.py --tiny --cpu --steps 2
"""

import argparse
import copy
import tempfile

import torch

# (prompt, chosen, rejected)
FACTS = [
    ("What is the capital of France?", " Paris.", " Berlin."),
    ("What is the capital of Japan?", " Tokyo.", " Beijing."),
    ("How many legs does a spider have?", " Eight.", " Six."),
    ("What is two plus two?", " Four.", " Five."),
    ("Which planet is closest to the Sun?", " Mercury.", " Jupiter."),
    ("What gas do plants absorb from the air?", " Carbon dioxide.", " Helium."),
    ("Who wrote Romeo and Juliet?", " Shakespeare.", " Dickens."),
    ("What is the largest ocean on Earth?", " The Pacific.", " The Arctic."),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face model id or local folder (a causal LM)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama and word-level tokenizer, offline")
    p.add_argument("--dataset", help="preference data set with prompt/chosen/rejected (default: built-in facts)")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (max_steps)")
    p.add_argument("--batch_size", type=int, default=2, help="pairs per device per step")
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss_type", default="sigmoid")
    p.add_argument("--impl", default="auto", help="dpo-fast path: auto, chunked, fused or torch")
    p.add_argument("--cpu", action="store_true", help="train on CPU in float32 (smoke tests)")
    args = p.parse_args()
    if not (args.model or args.tiny):
        p.error("give --model NAME_OR_PATH, or --tiny for an offline smoke test")
    return args


def tiny_model_and_tokenizer():
    """A 2-layer Llama over a word-level vocabulary of the built-in facts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({word for row in FACTS for text in row for word, _ in split.pre_tokenize_str(text)})
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(["<pad>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config), tokenizer


def main():
    args = parse_args()
    from datasets import Dataset, load_dataset
    from trl import DPOConfig, DPOTrainer

    from dpo_fast.integrations.trl import patch_trl

    # Before the trainer is built, so reference log-probs (precomputed or not) go through dpo-fast too.
    patch = patch_trl(impl=args.impl)

    if args.dataset:
        train = load_dataset(args.dataset, split="train")
    else:
        train = Dataset.from_dict({"prompt": [p for p, _, _ in FACTS], "chosen": [c for _, c, _ in FACTS],
                                   "rejected": [r for _, _, r in FACTS]})
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="dpo-fast-")
    config = DPOConfig(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=args.lr, beta=args.beta, loss_type=args.loss_type, logging_steps=1,
                       report_to="none", save_strategy="no", gradient_checkpointing=False,
                       use_cpu=args.cpu, bf16=not args.cpu and torch.cuda.is_bf16_supported())
    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer()
        # TRL would otherwise load the reference from the model's name; the tiny model has none.
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=config, train_dataset=train,
                             processing_class=tokenizer)
    else:
        # A model name lets TRL build the policy and the reference the way the launcher's sharding
        # (ZeRO-3 init, FSDP2 wrapping) needs.
        trainer = DPOTrainer(model=args.model, args=config, train_dataset=train)
    if trainer.accelerator.is_main_process:
        print(f"dpo-fast patch: {patch}; distributed: {trainer.accelerator.distributed_type}, "
              f"processes: {trainer.accelerator.num_processes}")
    trainer.train()
    if trainer.accelerator.is_main_process:
        for entry in trainer.state.log_history:
            if "loss" in entry:
                print({k: round(v, 5) for k, v in entry.items()
                       if k in ("step", "loss", "rewards/margins", "rewards/accuracies", "logps/chosen")})


if __name__ == "__main__":
    main()
