"""``python -m benchmarks plan``: what each GPU case costs on paper, from ``dpo_fast.cost_model``.

For every GPU case of the sweep: the route ``dpo_fast.planner`` picks at the default budget
(on an idle card: a quarter of its memory, capped) and at the budget of its fastest route, the
fused routes, and naive
PyTorch, TRL 1.16's chunked function, Liger's DPO loss and Cut Cross-Entropy (exact mode)
priced by the same model. Columns: GEMM FLOPs over 6NHV, HBM bytes, loss-attributable
memory (beyond inputs and returned gradients), that memory over naive PyTorch's, and the
paper bound: modelled time over the 6NHV floor at the card's peak. Under each DPO table, a
Pareto view: dpo-fast's bound within each peer's memory and its memory at each peer's bound.
Peaks are datasheet figures unless the card's name says measured. Nothing here is measured.
"""

import argparse
import sys

import torch

from dpo_fast import cost_model as cm
from dpo_fast import planner
from dpo_fast.losses import rejected_gradient_ratio

from .cases import GPU_CASES


def _shape(case) -> cm.Shape:
    return cm.Shape(case.num_tokens, case.hidden_size, case.vocab_size, case.torch_dtype.itemsize, True)


def dpo_fast_plan(case, card: cm.Card, budget: int, loss_type: str = "sigmoid") -> planner.Plan:
    """dpo-fast's route for this case within ``budget`` (the whole batch kept: no gather), for
    ``loss_type`` (the sigmoid DPO default: a split pair sums both sides in one float32 [V, H])."""
    scale = rejected_gradient_ratio([loss_type], [1.0], case.tokens, case.tokens)
    return planner.plan_loss([2 * case.tokens] * case.pairs, case.vocab_size, case.hidden_size, case.torch_dtype,
                             True, budget, "cuda", card=card,
                             two_pass_budget=min(budget, planner.PER_TOKEN_BUDGET),
                             rejected_scales=[scale] * case.pairs)


def per_token_cost(case, card: cm.Card, budget: int = planner.PER_TOKEN_BUDGET) -> cm.Cost:
    """The per-token route (TRL drop-in, token_logps): two-pass tiles at the per-token default."""
    n, H, V = case.num_tokens, case.hidden_size, case.vocab_size
    tiles = planner.engine_tiles(n, V, H, case.torch_dtype, "cuda", budget, True, True)
    forward = planner.engine_tiles(n, V, H, case.torch_dtype, "cuda", budget, False, False)
    return cm.two_pass(_shape(case), tiles.token_chunk, tiles.vocab_block, card,
                       forward_tiles=(forward.token_chunk, forward.vocab_block))


def peers(case, card: cm.Card):
    shape = _shape(case)
    out = [("naive PyTorch", cm.naive(shape, card)), ("TRL 1.16 chunked", cm.trl_chunked(shape, card=card))]
    if case.objective == "dpo":
        out.append(("Liger DPO", cm.liger(shape, 2 * case.tokens, card)))
    out.append(("CCE exact", cm.cce_exact(shape, card)))
    return out


def rows_for(case, card: cm.Card):
    n, H, V = case.num_tokens, case.hidden_size, case.vocab_size
    shape = _shape(case)
    naive = cm.naive(shape, card)

    def row(name, cost, budget=""):
        d = cm.describe(cost, shape, card, naive)
        return [name, d["route"], f"{d['flops_over_6nhv']:.2f}", f"{d['hbm_gb']:.0f}", f"{d['memory_gb']:.2f}",
                f"{d['memory_vs_naive']:.2f}", f"{d['bound']:.2f}", "yes" if d["exact"] else "no", budget]

    tiles = planner.engine_tiles(n, V, H, case.torch_dtype, "cuda", planner.PER_TOKEN_BUDGET, True, True)
    fused_rows = [
        row("dpo-fast fused fwd + tiled bwd", cm.fused_forward_tiled_backward(shape, tiles.token_chunk,
                                                                              tiles.vocab_block, card)),
        row("dpo-fast fully fused bwd", cm.fully_fused(shape, 128, card)),
    ]
    peer_rows = [row(name, cost) for name, cost in peers(case, card)]
    if case.objective != "dpo":  # per-token work: the default is sized for GEMM efficiency, not by the card
        return [row("dpo-fast per-token (default)", per_token_cost(case, card),
                    f"{planner.PER_TOKEN_BUDGET / 2**30:.0f} GiB")] + fused_rows + peer_rows
    default_budget = planner.paper_default_budget(card.memory_gb * 1e9)
    default = dpo_fast_plan(case, card, default_budget)
    fastest = dpo_fast_plan(case, card, 2**50)
    return [
        row("dpo-fast (default budget)", default.cost, f"{default_budget / 2**30:.1f} GiB"),
        row("dpo-fast (fastest budget)", fastest.cost, f"{fastest.cost.memory_bytes / 1e9:.1f} GB"),
        row("dpo-fast two-pass", cm.two_pass(shape, tiles.token_chunk, tiles.vocab_block, card)),
    ] + fused_rows + peer_rows


# Budgets tried for the Pareto view: 1/8 GB steps to 4 GB, then 1/2 GB steps to 64 GB.
_BUDGETS = [int(k * 0.125e9) for k in range(1, 33)] + [int(k * 0.5e9) for k in range(9, 129)]


def pareto_rows(case, card: cm.Card):
    """Per peer: dpo-fast's paper time within the peer's memory, and the least memory at which
    dpo-fast's paper time is no more than the peer's (same model, same card)."""
    shape = _shape(case)
    plans = [(b, dpo_fast_plan(case, card, b)) for b in _BUDGETS]
    out = []
    for name, cost in peers(case, card):
        at_memory = dpo_fast_plan(case, card, max(1, int(cost.memory_bytes)))
        fits = at_memory.cost.memory_bytes <= max(cost.memory_bytes, 1)
        faster = [p.cost.memory_bytes for _, p in plans if p.cost.bound(shape, card) <= cost.bound(shape, card)]
        out.append([name, f"{cost.memory_bytes / 1e9:.2f}", f"{cost.bound(shape, card):.2f}",
                    f"{at_memory.cost.bound(shape, card):.2f}" if fits else "does not fit",
                    at_memory.cost.route if fits else "",
                    f"{min(faster) / 1e9:.2f}" if faster else "never"])
    return out


PARETO_HEADER = ["peer", "peer mem GB", "peer bound", "dpo-fast bound at peer's memory", "dpo-fast route there",
                 "dpo-fast mem GB at peer's time"]


HEADER = ["method", "route", "FLOPs/6NHV", "HBM GB", "loss mem GB", "mem/naive", "bound (x floor)", "exact",
          "budget"]


def markdown(cases, card: cm.Card) -> str:
    out = [f"Paper costs on {card.name} ({card.tflops:.0f} TFLOP/s, {card.tbps} TB/s: {card.source}); "
           f"floor = 6NHV at peak; bound = the sum over every op of max(FLOPs/peak, bytes/bandwidth), no overlap. "
           f"dpo-fast's default DPO budget on an idle card: a quarter of its memory, at most "
           f"{planner.DPO_BUDGET_CAP / 2**30:.0f} GiB. Generated by `python -m benchmarks plan --card {_key(card)}`.",
           ""]
    for case in cases:
        floor_ms = 6.0 * case.num_tokens * case.hidden_size * case.vocab_size / (card.tflops * 1e12) * 1e3
        out.append(f"### {case.name}: H={case.hidden_size}, V={case.vocab_size}, N={case.num_tokens}, {case.dtype}"
                   + (f", softcap {case.softcap}" if case.softcap else "") + f" (floor {floor_ms:.1f} ms)")
        out.append("")
        out.append("| " + " | ".join(HEADER) + " |")
        out.append("|" + "---|" * len(HEADER))
        for r in rows_for(case, card):
            out.append("| " + " | ".join(r) + " |")
        out.append("")
        if case.objective == "dpo":
            out.append("Pareto view (paper): dpo-fast at each peer's memory, and the memory it needs for each "
                       "peer's time.")
            out.append("")
            out.append("| " + " | ".join(PARETO_HEADER) + " |")
            out.append("|" + "---|" * len(PARETO_HEADER))
            for r in pareto_rows(case, card):
                out.append("| " + " | ".join(r) + " |")
            out.append("")
    return "\n".join(out)


def _key(card):
    return next(k for k, v in cm.CARDS.items() if v is card)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default="H100", choices=sorted(cm.CARDS))
    parser.add_argument("--cases", help="comma-separated GPU case names (default: all)")
    args = parser.parse_args(argv)
    cases = GPU_CASES
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",")]
        cases = [c for c in GPU_CASES if c.name in wanted]
    # The planner's capability probe looks at torch, not at a device: price cuBLAS float32 output.
    assert hasattr(torch.ops.aten.mm, "dtype_out")
    print(markdown(cases, cm.CARDS[args.card]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
