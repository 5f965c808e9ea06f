"""Context parallelism (``sequence_group=``): each rank holds slices of every sequence.

Against float64 of the whole batch on one process: the loss and every metric on every rank,
each rank's slice of grad_hidden, and the head's gradient summed over the ranks (each rank's
local gradient is its tokens' exact share: the all-reduce's backward is the identity, so
the sum is not multiplied by the world size). Splits: even, uneven, zig-zag (rank r holds
chunks r and 2W-1-r, as load-balanced ring attention gives), a sequence absent on some
ranks, packed (cu_seqlens, sequence_ids with the last sequence absent on a rank). On 2 and
4 gloo ranks; one run of each spawn serves the module.
"""

import json
import time

import pytest
import torch
import torch.distributed as dist

import dpo_fast
from dpo_fast import reference
from dpo_fast.api import _loss_config
from dpo_fast.transform import LogitTransform
from _ranks import run_ranks
from helpers import make_batch, rel_err

PAIRS, SEQ, HIDDEN, VOCAB = 2, 13, 8, 37
TOL = 1e-5  # float32 sums of a few dozen terms; only their order differs from one process
PROMPT_S = 15.0  # far below the 30 s collective timeout of the error cases
SEED = 20261202

LOSSES = {  # name -> (loss_type, with reference log-probs)
    "sigmoid": ("sigmoid", True),
    "ipo": ("ipo", True),
    "simpo": ("simpo", False),
    "orpo": ("orpo", False),
}


def _positions(split, rank, world):
    """This rank's token positions along the sequence dimension (contiguous slices, the caller's split)."""
    if split in ("even", "absent"):
        cuts = [SEQ * r // world for r in range(world + 1)]
        return list(range(cuts[rank], cuts[rank + 1]))
    if split == "uneven":
        cuts = {2: [0, 4, SEQ], 4: [0, 2, 3, 9, SEQ]}[world]
        return list(range(cuts[rank], cuts[rank + 1]))
    if split == "zigzag":
        cuts = [SEQ * c // (2 * world) for c in range(2 * world + 1)]
        first, second = rank, 2 * world - 1 - rank
        return list(range(cuts[first], cuts[first + 1])) + list(range(cuts[second], cuts[second + 1]))
    raise ValueError(split)


def _batch(split, world):
    h, w, b, labels = make_batch(PAIRS, SEQ, HIDDEN, VOCAB, bias=True)
    if split == "absent":  # sequence 1 lives in the first ranks' slices only; sequence 2 in the last rank's only
        labels[1, SEQ // world:] = -100
        labels[2, :SEQ * (world - 1) // world] = -100
        labels[2, -1] = 5
    ref_c, ref_r = torch.randn(PAIRS) - 9, torch.randn(PAIRS) - 9
    return h.detach(), w.detach(), b.detach(), labels, ref_c, ref_r


def _oracle(h, w, b, labels, loss, ref_c, ref_r, transform):
    loss_type, with_ref = LOSSES[loss]
    cfg = _loss_config(loss_type, None, 0.3, 0.0, 0.5, 0.05, 1.0, with_ref)
    h64, w64, b64 = (t.double().requires_grad_() for t in (h, w, b))
    out = reference.dpo_loss(h64, w64, labels, bias=b64, transform=transform, cfg=cfg,
                             ref_chosen_logps=ref_c.double() if with_ref else None,
                             ref_rejected_logps=ref_r.double() if with_ref else None)
    out.loss.backward()
    return out, h64.grad, w64.grad, b64.grad


FIELDS = ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "chosen_logits_mean",
          "rejected_logits_mean", "token_accuracy", "entropy", "reward_margin")


def _summed(t, group):
    total = t.detach().clone()
    dist.all_reduce(total, group=group)
    return total


def _loss_worker(rank, world, split, loss, impl):
    group = dist.group.WORLD
    h, w, b, labels, ref_c, ref_r = _batch(split, world)
    kwargs = dict(logit_scale=0.9, softcap=4.0, temperature=1.1)
    transform = LogitTransform(kwargs["logit_scale"], kwargs["softcap"], kwargs["temperature"])
    oracle, gh, gw, gb = _oracle(h, w, b, labels, loss, ref_c, ref_r, transform)
    loss_type, with_ref = LOSSES[loss]
    pos = _positions(split, rank, world)
    hr = h[:, pos].clone().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    refs = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r) if with_ref else {}
    out = dpo_fast.dpo_loss(hr, wr, labels[:, pos].contiguous(), bias=br, beta=0.3, loss_type=loss_type,
                            impl=impl, sequence_group=group, **refs, **kwargs)
    out.loss.backward()
    report = {f: rel_err(getattr(out, f), getattr(oracle, f)) for f in FIELDS if f != "reward_margin"}
    scale = torch.cat([oracle.chosen_rewards, oracle.rejected_rewards]).abs().max()
    report["reward_margin"] = float((out.reward_margin - oracle.reward_margin).abs() / scale)
    report["reward_accuracy"] = float(out.reward_accuracy != oracle.reward_accuracy)
    report["grad_hidden"] = rel_err(hr.grad, gh[:, pos])
    # Each rank's head gradient is its tokens' share: their sum is the whole batch's, not world x it.
    report["grad_weight_summed"] = rel_err(_summed(wr.grad, group), gw)
    report["grad_bias_summed"] = rel_err(_summed(br.grad, group), gb)
    # sequence_logps, averaged over the whole sequences' token counts, with its gradient.
    hs = h[:, pos].clone().requires_grad_()
    ours = dpo_fast.sequence_logps(hs, w, labels[:, pos].contiguous(), bias=b, impl=impl, average=True,
                                   sequence_group=group, **kwargs)
    h64 = h.double().requires_grad_()
    expected = reference.sequence_logps(h64, w.double(), labels, bias=b.double(), transform=transform, average=True)
    up = torch.randn(expected.shape)  # the same on every rank (seeded)
    (ours * up).sum().backward()
    (expected * up.double()).sum().backward()
    report["sequence_logps_average"] = rel_err(ours, expected)
    report["sequence_grad_hidden"] = rel_err(hs.grad, h64.grad[:, pos])
    return report


def _packed_worker(rank, world, packing):
    """Packed slices: cu_seqlens, or sequence_ids where the last sequence has no token on rank 1."""
    group = dist.group.WORLD
    h, w, b, labels, ref_c, ref_r = _batch("zigzag", world)
    rows = labels.shape[0]
    if packing == "sequence_ids":
        labels[rows - 1, :] = -100  # the last sequence: scored on rank 0 only, absent from rank 1's tokens
        labels[rows - 1, 0] = 3
    transform = LogitTransform()
    oracle, gh, gw, _ = _oracle(h, w, torch.zeros_like(b), labels, "sigmoid", ref_c, ref_r, transform)
    pos = _positions("zigzag", rank, world)
    hs, ls = h[:, pos], labels[:, pos]
    keep = [(r, p) for r in range(rows) for p in range(len(pos))]
    if packing == "sequence_ids" and rank == 1:
        keep = [(r, p) for r, p in keep if r != rows - 1]
    packed_h = torch.stack([hs[r, p] for r, p in keep]).requires_grad_()
    packed_l = torch.stack([ls[r, p] for r, p in keep])
    extra = {}
    if packing == "cu_seqlens":
        extra["cu_seqlens"] = torch.tensor([0] + [len(pos) * (r + 1) for r in range(rows)])
    else:
        extra["sequence_ids"] = torch.tensor([r for r, _ in keep])
    wr = w.clone().requires_grad_()
    out = dpo_fast.dpo_loss(packed_h, wr, packed_l, bias=torch.zeros_like(b), ref_chosen_logps=ref_c,
                            ref_rejected_logps=ref_r, beta=0.3, impl="torch", sequence_group=group, **extra)
    out.loss.backward()
    report = {f: rel_err(getattr(out, f), getattr(oracle, f)) for f in ("loss", "chosen_logps", "rejected_logps",
                                                                          "token_accuracy", "entropy")}
    expected_h = torch.stack([gh[:, pos][r, p] for r, p in keep])
    report["grad_hidden"] = rel_err(packed_h.grad, expected_h)
    report["grad_weight_summed"] = rel_err(_summed(wr.grad, group), gw)
    return report


def _with_vocab_parallel_worker(rank):
    """4 ranks as a 2 x 2 mesh: sequence groups {0,1}, {2,3}; vocabulary groups {0,2}, {1,3}."""
    seq_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    vocab_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    shard, piece = rank // 2, rank % 2
    h, w, b, labels, ref_c, ref_r = _batch("uneven", 2)
    transform = LogitTransform(1.0, 5.0, 1.0)
    oracle, gh, gw, gb = _oracle(h, w, b, labels, "sigmoid", ref_c, ref_r, transform)
    split = (20, VOCAB - 20)
    rows = slice(sum(split[:shard]), sum(split[:shard + 1]))
    pos = _positions("uneven", piece, 2)
    hr = h[:, pos].clone().requires_grad_()
    wr, br = w[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
    out = dpo_fast.dpo_loss(hr, wr, labels[:, pos].contiguous(), bias=br, ref_chosen_logps=ref_c,
                            ref_rejected_logps=ref_r, beta=0.3, softcap=5.0, impl="torch",
                            process_group=vocab_groups[piece], sequence_group=seq_groups[shard])
    out.loss.backward()
    report = {f: rel_err(getattr(out, f), getattr(oracle, f)) for f in FIELDS if f != "reward_margin"}
    report["grad_hidden"] = rel_err(hr.grad, gh[:, pos])
    report["grad_weight_summed"] = rel_err(_summed(wr.grad, seq_groups[shard]), gw[rows])
    report["grad_bias_summed"] = rel_err(_summed(br.grad, seq_groups[shard]), gb[rows])
    return report


def _errors_worker(rank):
    """Bad calls on one rank: every rank raises the same class, promptly."""
    group = dist.group.WORLD
    report = {}
    for case in ERROR_CASES:
        h, w, b, labels, ref_c, ref_r = _batch("even", 2)
        pos = _positions("even", rank, 2)
        hr, lr = h[:, pos], labels[:, pos].clone()
        refs = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
        if rank == 1:
            if case == "pair counts differ":
                hr, lr = torch.cat([hr, hr[:2]]), torch.cat([lr, lr[:2]])
                refs = dict(ref_chosen_logps=torch.cat([ref_c, ref_c[:1]]),
                            ref_rejected_logps=torch.cat([ref_r, ref_r[:1]]))
            elif case == "label out of range on one rank":
                lr[0, -1] = VOCAB + 4
            elif case == "reference shape on one rank":  # found after the ranks agreed
                refs["ref_chosen_logps"] = ref_c[:1]
            elif case == "loss settings differ":
                refs["beta"] = 0.5
        start = time.perf_counter()
        try:
            dpo_fast.dpo_loss(hr, w, lr, impl="torch", sequence_group=group, **refs)
            report[case] = dict(error=None, message="", seconds=time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 - the class is what is checked
            report[case] = dict(error=type(err).__name__, message=str(err), seconds=time.perf_counter() - start)
    h, w, b, labels, ref_c, ref_r = _batch("even", 2)  # the group still works afterwards
    pos = _positions("even", rank, 2)
    ours = dpo_fast.sequence_logps(h[:, pos], w, labels[:, pos].contiguous(), impl="torch", sequence_group=group)
    report["exact afterwards"] = rel_err(ours, reference.sequence_logps(h.double(), w.double(), labels))
    return report


ERROR_CASES = {  # case -> (error class, words every rank's message contains)
    "pair counts differ": ("ValueError", "number of sequences"),
    "label out of range on one rank": ("ValueError", "labels"),
    "reference shape on one rank": ("ValueError", ""),
    "loss settings differ": ("ValueError", "loss settings"),
}

SPLITS = ("even", "uneven", "zigzag", "absent")


def _scenarios(world):
    found = {f"{split}_{loss}": (_loss_worker, (world, split, loss, "torch")) for split in SPLITS for loss in LOSSES}
    found["packed_cu_seqlens"] = (_packed_worker, (world, "cu_seqlens"))
    found["packed_sequence_ids"] = (_packed_worker, (world, "sequence_ids"))
    if world == 2:
        found["zigzag_sigmoid_chunked"] = (_loss_worker, (world, "zigzag", "sigmoid", "chunked"))
        found["errors"] = (_errors_worker, ())
    else:
        found["with_vocab_parallel"] = (_with_vocab_parallel_worker, ())
    return found


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def world_reports(request, tmp_path_factory):
    world = request.param
    found, error = run_ranks(_scenarios(world), tmp_path_factory.mktemp("ranks"), SEED, timeout_s=30, world=world)
    print(f"seed {SEED}, {world} ranks\n{json.dumps(found, indent=1)}")
    return world, found, error


def _check(world_reports, name, tol=TOL):
    world, found, error = world_reports
    if name not in _scenarios(world):
        pytest.skip(f"{name} runs on the other world size")
    assert name in found, f"{name} did not finish on {world} ranks: {error}"
    for rank, report in enumerate(found[name]):
        for key, err in report.items():
            assert err <= tol, f"{world} ranks, rank {rank}, {name}: {key} differs by {err:.3g} from float64"


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("split", SPLITS)
def test_loss_metrics_and_gradients_match_the_whole_batch(world_reports, split, loss):
    _check(world_reports, f"{split}_{loss}")


@pytest.mark.parametrize("packing", ["cu_seqlens", "sequence_ids"])
def test_packed_slices(world_reports, packing):
    _check(world_reports, f"packed_{packing}")


def test_triton_rows(world_reports):
    _check(world_reports, "zigzag_sigmoid_chunked")


def test_combined_with_vocab_parallel_head(world_reports):
    _check(world_reports, "with_vocab_parallel")


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_call_raises_alike_on_every_rank(world_reports, case):
    world, found, error = world_reports
    if world != 2:
        pytest.skip("the error cases run on 2 ranks")
    assert "errors" in found, f"error cases did not finish: {error}"
    cls, words = ERROR_CASES[case]
    for rank, report in enumerate(found["errors"]):
        got = report[case]
        assert got["error"] == cls, f"rank {rank}: {got}"
        assert words in got["message"], f"rank {rank}: {got['message']}"
        assert got["seconds"] < PROMPT_S, f"rank {rank} waited {got['seconds']:.1f} s"
    for report in found["errors"]:
        assert report["exact afterwards"] < TOL
