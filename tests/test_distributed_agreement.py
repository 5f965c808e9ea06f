"""Per-rank conditions under a vocabulary-parallel ``process_group``: every rank raises, promptly, the same error.

A check that fails on one rank only (a NaN in its shard, an out-of-range label, a 0-row
shard, no ``requires_grad``, another ignore mask, other hidden states or labels) must not
leave its peer waiting in the merge's all-reduce. Two gloo ranks with a 30 s collective
timeout: a rank left waiting would fail with a transport error after 30 s, which these
tests tell apart from the agreed ValueError/TypeError by its class, message and time.
"""

import json
import os
import time

import pytest
import torch
import torch.distributed as dist

import dpo_fast
from _ranks import WORLD, run_ranks
from helpers import make_batch, rel_err

SPLIT, HIDDEN = (13, 10), 8
VOCAB = sum(SPLIT)
PROMPT_S = 15.0  # far below the 30 s timeout, far above two CPU ranks doing a few tiny all-reduces


def _inputs(rank, seed):
    """The same batch on every rank (``seed``), and this rank's rows of the head; the full head last."""
    torch.manual_seed(seed)
    h, w, _, labels = make_batch(2, 5, HIDDEN, VOCAB)
    start = sum(SPLIT[:rank])
    return h.detach(), w.detach()[start:start + SPLIT[rank]].clone(), labels, w.detach()


def _spoil(case, rank, h, w, labels, kwargs):
    """This rank's inputs for ``case``: only rank 1 deviates."""
    kept = (labels != -100).flatten().nonzero().flatten()
    if case == "labels permuted":  # two scored tokens with different labels, on every rank
        labels = labels.clone()
        labels.view(-1)[kept[:2]] = torch.tensor([1, 2])
    if rank != 1:
        return h, w, labels
    if case == "nan in one shard":
        w[2, 3] = float("nan")
        kwargs["check_finite"] = True
    elif case == "label out of range on one rank":
        labels = labels.clone()
        labels.view(-1)[kept[0]] = VOCAB + 3
    elif case == "0-row shard":
        w = w[:0]
    elif case == "requires_grad on one rank only":
        h = h.clone().requires_grad_()
    elif case == "ignore mask differs":
        labels = labels.clone()
        labels.view(-1)[kept[-1]] = -100
    elif case == "hidden states differ":
        h = h + 0.5 * torch.randn_like(h)
    elif case == "labels permuted":
        labels.view(-1)[kept[:2]] = torch.tensor([2, 1])
    elif case == "float labels on one rank":
        labels = labels.float()
    return h, w, labels


CASES = {  # case -> (error class, words its message must contain)
    "nan in one shard": ("ValueError", "finite"),
    "label out of range on one rank": ("ValueError", "outside [0, 23)"),
    "0-row shard": ("ValueError", "at least one vocabulary row"),
    "requires_grad on one rank only": ("ValueError", "requires_grad"),
    "ignore mask differs": ("ValueError", "scored tokens"),
    "hidden states differ": ("ValueError", "hidden states differ"),
    "labels permuted": ("ValueError", "labels differ"),
    "float labels on one rank": ("TypeError", "labels"),
}


def _agreement_worker(rank):
    group = dist.group.WORLD
    seed = torch.initial_seed()
    report = {}
    for i, case in enumerate(CASES):
        h, w, labels, _ = _inputs(rank, seed + i)
        kwargs = dict(impl="torch", process_group=group)
        h, w, labels = _spoil(case, rank, h, w, labels, kwargs)
        start = time.perf_counter()
        try:
            dpo_fast.sequence_logps(h, w, labels, **kwargs)
            report[case] = dict(error=None, message="", seconds=time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 - the class is what is checked
            report[case] = dict(error=type(err).__name__, message=str(err), seconds=time.perf_counter() - start)
    # Afterwards the group still works and agrees with one process.
    h, w, labels, full_w = _inputs(rank, seed + len(CASES))
    ours = dpo_fast.sequence_logps(h, w, labels, impl="torch", process_group=group)
    report["exact afterwards"] = rel_err(ours, dpo_fast.sequence_logps(h, full_w, labels, impl="torch"))
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    seed = 20261126  # fixed: the same inputs on every run and machine
    found, error = run_ranks({"agreement": (_agreement_worker, ())}, tmp_path_factory.mktemp("ranks"), seed,
                             timeout_s=30)
    print(f"seed {seed}\n{json.dumps(found, indent=1)}")
    assert "agreement" in found, f"ranks did not finish (seed {seed}): {error}"
    return found["agreement"]


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_raises_the_same_error_promptly(case, reports):
    error, words = CASES[case]
    for rank, report in enumerate(reports):
        got = report[case]
        assert got["error"] == error, f"rank {rank}: {got}"
        assert words in got["message"], f"rank {rank}: {got['message']}"
        assert got["seconds"] < PROMPT_S, f"rank {rank} waited {got['seconds']:.1f} s"


def test_group_still_works_after_the_errors(reports):
    for report in reports:
        assert report["exact afterwards"] < 1e-5


# ----------------------------------------------------------------------------------------
# the one-time reconstruction check of dpo_fast.hf decides alike on every rank
# ----------------------------------------------------------------------------------------

def _reconstruction_worker(rank):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from dpo_fast import hf

    report = {}
    for fallback in ("raise", "naive"):
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=16,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=16)
        model = transformers.LlamaForCausalLM(config).eval()
        if rank == 1:  # a config that misdescribes the logits on this rank only: its check fails, rank 0's passes
            model.config.logit_scale = 3.0
        input_ids = torch.randint(0, VOCAB, (4, 6))
        labels = input_ids.clone()
        labels[:, :2] = -100
        try:
            hf.dpo_forward(model, input_ids, None, labels, impl="torch", fallback=fallback)
            report[fallback] = hf._VERIFIED.get(model, (None, "none"))[1]  # (what was read, verdict)
        except hf.ReconstructionError:
            report[fallback] = "ReconstructionError"
    return report


@pytest.fixture(scope="module")
def reconstruction(tmp_path_factory):
    seed = 20261126  # fixed: the same inputs on every run and machine
    found, error = run_ranks({"check": (_reconstruction_worker, ())}, tmp_path_factory.mktemp("ranks"), seed,
                             timeout_s=30)
    assert "check" in found, f"ranks did not finish (seed {seed}): {error}"
    return found["check"]


def test_reconstruction_check_decides_alike_on_every_rank(reconstruction):
    """Rank 1's check fails, rank 0's passes: both raise, or (fallback='naive') both run the naive path."""
    assert [r["raise"] for r in reconstruction] == ["ReconstructionError"] * WORLD
    assert [r["naive"] for r in reconstruction] == ["naive"] * WORLD
