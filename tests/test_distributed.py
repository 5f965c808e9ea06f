"""Past one process: vocabulary-parallel heads, DDP, FSDP2 and ZeRO-3 against a single process.

Two CPU ranks on the gloo backend (a file store in a tmp dir: no port). Starting a rank
costs seconds (importing torch twice on two cores), so one spawn serves the module: the
ranks run every scenario in turn and write each one's report as it finishes; the tests
assert on them. Every rank builds the same inputs from one seed, runs the single-process
computation itself as the baseline, then the distributed one, and reports the largest
relative errors. Kernels run under the Triton interpreter in the children
(TRITON_INTERPRET=1 is set for them before triton loads), on CPU tensors on any machine.
"""

import json
import os
import sys
import types

import pytest
import torch
import torch.distributed as dist

import dpo_fast
from dpo_fast import distributed as dfd
from dpo_fast import reference
from dpo_fast.api import make_engine
from dpo_fast.function import TokenLogpsFunction
from dpo_fast.transform import LogitTransform
from _ranks import WORLD, deepspeed_installed, run_ranks
from helpers import make_batch, rel_err

TOL = 1e-5  # float32, only the order of a few sums differs from one process


# ----------------------------------------------------------------------------------------
# harness
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rank_reports(tmp_path_factory):
    seed = 20261126  # fixed: the same inputs on every run and machine
    reports, error = run_ranks(SCENARIOS, tmp_path_factory.mktemp("ranks"), seed)
    print(f"seed {seed}\n{json.dumps(reports, indent=1)}")
    return reports, error, seed


def _check(rank_reports, name, expected_entries, tol=TOL):
    reports, error, seed = rank_reports
    assert name in reports, f"scenario {name} did not finish (seed {seed}): {error}"
    for rank, report in enumerate(reports[name]):
        assert len(report) == expected_entries, sorted(report)
        for key, err in report.items():
            assert err < tol, f"rank {rank}, seed {seed}: {key} differs by {err:.3g} (relative) from one process"


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)


# ----------------------------------------------------------------------------------------
# vocabulary-parallel head
# ----------------------------------------------------------------------------------------

SPLIT = (31, 22)  # unequal shards of a 53-row head


def _shard_rows(rank):
    start = sum(SPLIT[:rank])
    return slice(start, start + SPLIT[rank])


def _vocab_parallel_worker(rank, impl):
    group = dist.group.WORLD
    rows = _shard_rows(rank)
    vocab = sum(SPLIT)
    report = {}

    def shard(t):
        return None if t is None else t.detach()[rows].clone().requires_grad_(t.requires_grad)

    # Statistics, tie-break of the argmax included: rows 3 (rank 0) and 40 (rank 1) give the
    # same logit exactly (zero weight, equal bias), often the largest; the first, 3, must win.
    h, w, b, labels = make_batch(2, 7, 16, vocab, bias=True)
    with torch.no_grad():
        w[3], w[40] = 0.0, 0.0
        b[3], b[40] = 2.5, 2.5
    kept = labels.reshape(-1) != -100
    hk, lk = h.detach().reshape(-1, 16)[kept], labels.reshape(-1)[kept]
    transform = LogitTransform(0.8, 3.0, 0.9)
    single = make_engine(impl, None).forward_stats(hk, w.detach(), b.detach(), lk, transform)
    engine = dfd.VocabParallelEngine(make_engine(impl, None), group)
    merged = engine.forward_stats(hk, w.detach()[rows], b.detach()[rows], lk, transform)
    assert engine.vocab_size == vocab
    report["stats"] = rel_err(merged, single)
    assert torch.equal(merged[5], single[5]), "argmax must be the first maximum of the full row"
    report["argmax_ties_seen"] = 0.0 if bool((single[5] == 3).any()) else 1.0  # the tie must be exercised

    # token_logps: values and gradients to hidden, this rank's weight rows and bias rows.
    upstream = torch.randn(labels.shape)
    kwargs = dict(impl=impl, logit_scale=0.8, softcap=3.0, temperature=0.9)
    h1, w1, b1 = _leaf(h), _leaf(w), _leaf(b)
    base = dpo_fast.token_logps(h1, w1, labels, bias=b1, **kwargs)
    (base * upstream).sum().backward()
    h2, w2, b2 = _leaf(h), shard(w), shard(b)
    ours = dpo_fast.token_logps(h2, w2, labels, bias=b2, process_group=group, **kwargs)
    (ours * upstream).sum().backward()
    oracle, _ = reference.token_outputs(h.detach().double(), w.detach().double(), labels, bias=b.detach().double(),
                                        transform=transform)
    report["token_logps"] = rel_err(ours, base)
    report["token_logps_vs_float64"] = rel_err(ours, oracle)
    report["token_grad_hidden"] = rel_err(h2.grad, h1.grad)
    report["token_grad_weight"] = rel_err(w2.grad, w1.grad[rows])
    report["token_grad_bias"] = rel_err(b2.grad, b1.grad[rows])

    # Entropy's gradient, which the public functions keep detached, through the Function.
    g_logp, g_ent = torch.randn(hk.shape[0]), torch.randn(hk.shape[0])
    grads = []
    for weight, bias, eng in ((w, b, make_engine(impl, None)),
                              (w.detach()[rows], b.detach()[rows], dfd.VocabParallelEngine(make_engine(impl, None),
                                                                                             group))):
        hh, ww, bb = hk.clone().requires_grad_(), weight.detach().clone().requires_grad_(), bias.detach().clone()
        logps, entropy, *_ = TokenLogpsFunction.apply(hh, ww, bb, lk, eng, transform)
        grads.append(torch.autograd.grad((logps * g_logp + entropy * g_ent).sum(), [hh, ww]) + (entropy,))
    report["entropy"] = rel_err(grads[1][2], grads[0][2])
    report["entropy_grad_hidden"] = rel_err(grads[1][0], grads[0][0])
    report["entropy_grad_weight"] = rel_err(grads[1][1], grads[0][1][rows])

    # sequence_logps: forward-only (reference model), then a frozen head with grad to hidden.
    with torch.no_grad():
        report["sequence_logps_no_grad"] = rel_err(
            dpo_fast.sequence_logps(h, w[rows], labels, bias=b[rows], impl=impl, process_group=group),
            dpo_fast.sequence_logps(h, w, labels, bias=b, impl=impl))
    h1, h2 = _leaf(h), _leaf(h)
    base = dpo_fast.sequence_logps(h1, w.detach(), labels, impl=impl, average=True)
    ours = dpo_fast.sequence_logps(h2, w.detach()[rows], labels, impl=impl, average=True, process_group=group)
    up = torch.randn(base.shape)
    (base * up).sum().backward()
    (ours * up).sum().backward()
    report["sequence_logps"] = rel_err(ours, base)
    report["sequence_grad_hidden"] = rel_err(h2.grad, h1.grad)

    # dpo_loss: loss, metrics and gradients (one process takes the 6NHV whole-pair route;
    # the vocabulary-parallel call must take the two-pass route and agree with it).
    ref_c, ref_r = torch.randn(2) - 10, torch.randn(2) - 10
    kwargs = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=0.3, impl=impl, softcap=3.0)
    h1, w1, b1 = _leaf(h), _leaf(w), _leaf(b)
    base = dpo_fast.dpo_loss(h1, w1, labels, bias=b1, **kwargs)
    base.loss.backward()
    h2, w2, b2 = _leaf(h), shard(w), shard(b)
    ours = dpo_fast.dpo_loss(h2, w2, labels, bias=b2, process_group=group, **kwargs)
    ours.loss.backward()
    for field in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "chosen_logits_mean",
                  "rejected_logits_mean", "token_accuracy", "entropy"):
        report[f"dpo_{field}"] = rel_err(getattr(ours, field), getattr(base, field))
    # The margin is a difference of rewards that may nearly cancel: its error is judged on the rewards' scale.
    reward_scale = torch.cat([base.chosen_rewards, base.rejected_rewards]).abs().max()
    report["dpo_reward_margin"] = float((ours.reward_margin - base.reward_margin).abs() / reward_scale)
    report["dpo_grad_hidden"] = rel_err(h2.grad, h1.grad)
    report["dpo_grad_weight"] = rel_err(w2.grad, w1.grad[rows])
    report["dpo_grad_bias"] = rel_err(b2.grad, b1.grad[rows])
    return report


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_vocab_parallel_matches_one_process(impl, rank_reports):
    _check(rank_reports, f"vocab_parallel_{impl}", 25)


# ----------------------------------------------------------------------------------------
# data parallel: the loss runs inside the wrapped module's forward
# ----------------------------------------------------------------------------------------

VOCAB, HIDDEN, PAIRS, SEQ = 41, 12, 4, 6


class TinyPolicy(torch.nn.Module):
    """Backbone + lm_head whose forward returns the DPO loss (how trainers call a fused loss)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.mix = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def hidden(self, input_ids):
        return torch.tanh(self.mix(self.embed(input_ids)))

    def forward(self, input_ids, labels, ref_chosen, ref_rejected, budget=None):
        weight, bias = dfd.head_params(self.head)
        return dpo_fast.dpo_loss(self.hidden(input_ids), weight, labels, bias=bias, ref_chosen_logps=ref_chosen,
                                 ref_rejected_logps=ref_rejected, beta=0.5, impl="torch", memory_budget=budget).loss


def _dpo_batch():
    input_ids = torch.randint(0, VOCAB, (2 * PAIRS, SEQ))
    labels = torch.randint(0, VOCAB, (2 * PAIRS, SEQ))
    labels[:, :2] = -100
    labels[1, 4:] = -100
    return input_ids, labels, torch.randn(PAIRS) - 8, torch.randn(PAIRS) - 8


def _local_pairs(batch, rank):
    """This rank's pairs, still laid out [chosen..., rejected...]."""
    input_ids, labels, ref_c, ref_r = batch
    per = PAIRS // WORLD
    pairs = torch.arange(rank * per, (rank + 1) * per)
    rows = torch.cat([pairs, pairs + PAIRS])
    return input_ids[rows], labels[rows], ref_c[pairs], ref_r[pairs]


def _one_process_step(model, batch, budget):
    """Loss, gradients and parameters after one SGD step on the whole batch."""
    model.zero_grad()
    loss = model(*batch, budget=budget)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    return loss.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _ddp_worker(rank):
    from torch.nn.parallel import DistributedDataParallel

    report = {}
    batch = _dpo_batch()
    init = TinyPolicy().state_dict()
    # None: the whole-pair (6NHV) route; 600 bytes: no pair fits, the two-pass route.
    for budget in (None, 600):
        single = TinyPolicy()
        single.load_state_dict(init)
        loss_1, grads_1, params_1 = _one_process_step(single, batch, budget)
        model = TinyPolicy()
        model.load_state_dict(init)
        ddp = DistributedDataParallel(model)
        loss = ddp(*_local_pairs(batch, rank), budget=budget)
        loss.backward()  # DDP averages gradients over ranks: the whole batch's mean-over-pairs gradient
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        report[f"loss[{budget}]"] = rel_err(mean_loss / WORLD, loss_1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                report[f"grad {name}[{budget}]"] = rel_err(p.grad, grads_1[name])
                p -= 0.1 * p.grad
                report[f"param {name}[{budget}]"] = rel_err(p, params_1[name])
    return report


def test_ddp_step_matches_one_process(rank_reports):
    _check(rank_reports, "ddp", 2 * (1 + 2 * 5))  # loss, then grad and param of 5 tensors, per budget


class LossHead(torch.nn.Linear):
    """An lm_head that FSDP2 shards on its own: the loss is one of its methods, registered with
    ``register_fsdp_forward_method`` so its parameters are unsharded for the call."""

    def dpo(self, hidden, labels, ref_chosen, ref_rejected):
        weight, bias = dfd.head_params(self)
        return dpo_fast.dpo_loss(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_chosen,
                                 ref_rejected_logps=ref_rejected, beta=0.5, impl="torch").loss


class PolicyWithLossHead(TinyPolicy):
    def __init__(self, through_head):
        super().__init__()
        self.head = LossHead(HIDDEN, VOCAB)
        self.through_head = through_head

    def forward(self, input_ids, labels, ref_chosen, ref_rejected, budget=None):
        if self.through_head:
            return self.head.dpo(self.hidden(input_ids), labels, ref_chosen, ref_rejected)
        return super().forward(input_ids, labels, ref_chosen, ref_rejected, budget)


def _fsdp2_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh("cpu", (WORLD,))
    report = {}
    batch = _dpo_batch()
    init = PolicyWithLossHead(True).state_dict()

    def check_step(model, tag):
        single = PolicyWithLossHead(True)
        single.load_state_dict(init)
        loss_1, grads_1, params_1 = _one_process_step(single, batch, None)
        optim = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(*_local_pairs(batch, rank))
        loss.backward()  # reduce-scatter averages over ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        report[f"loss[{tag}]"] = rel_err(mean_loss / WORLD, loss_1)
        for name, p in model.named_parameters():
            report[f"grad {name}[{tag}]"] = rel_err(p.grad.full_tensor(), grads_1[name])
        optim.step()
        for name, p in model.named_parameters():
            report[f"param {name}[{tag}]"] = rel_err(p.full_tensor(), params_1[name])

    # Head in the root's parameter group: inside the root's forward it is a plain tensor.
    model = PolicyWithLossHead(False)
    model.load_state_dict(init)
    fully_shard(model.mix, mesh=mesh)
    fully_shard(model, mesh=mesh)
    check_step(model, "root head")

    # Head sharded on its own: read from the root's forward it is still a DTensor shard,
    # which must be refused with advice; the loss as a registered method of the head works.
    model = PolicyWithLossHead(False)
    model.load_state_dict(init)
    fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for call, key in ((lambda: model(*_local_pairs(batch, rank)), "dtensor refused by head_params"),
                      (lambda: dpo_fast.dpo_loss(model.hidden(batch[0]), model.head.weight, batch[1], impl="torch"),
                       "dtensor refused by dpo_loss")):
        try:
            call()
            report[key] = 1.0
        except TypeError as err:
            report[key] = 0.0 if "register_fsdp_forward_method" in str(err) else 1.0
    model = PolicyWithLossHead(True)
    model.load_state_dict(init)
    fully_shard(model.head, mesh=mesh)
    register_fsdp_forward_method(model.head, "dpo")
    fully_shard(model, mesh=mesh)
    check_step(model, "registered head method")
    return report


def test_fsdp2_step_matches_one_process(rank_reports):
    _check(rank_reports, "fsdp2", 2 * (1 + 2 * 5) + 2)


SCENARIOS = {
    "vocab_parallel_torch": (_vocab_parallel_worker, ("torch",)),
    "vocab_parallel_chunked": (_vocab_parallel_worker, ("chunked",)),
    "ddp": (_ddp_worker, ()),
    "fsdp2": (_fsdp2_worker, ()),
}


# ----------------------------------------------------------------------------------------
# ZeRO-3 plumbing, against a stand-in for DeepSpeed's partitioned parameters
# ----------------------------------------------------------------------------------------

class _FakeZero3:
    """What dpo_fast relies on from DeepSpeed ZeRO-3: a partitioned parameter's ``.data`` is
    empty (``ds_status`` NOT_AVAILABLE) except between ``all_gather`` and ``partition``, which
    ``GatheredParameters`` calls and which refuse a parameter in the wrong state."""

    def __init__(self):
        import enum

        self.Status = enum.Enum("ZeroParamStatus", "AVAILABLE NOT_AVAILABLE INFLIGHT")
        self.gathers = 0

        class GatheredParameters:
            def __init__(self, params, modifier_rank=None):
                self.params = list(params)

            def __enter__(self):
                self.params[0].all_gather(param_list=self.params)

            def __exit__(self, *exc):
                self.params[0].partition(param_list=self.params, has_been_updated=False)

        deepspeed = types.ModuleType("deepspeed")
        deepspeed.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
        partition = types.ModuleType("deepspeed.runtime.zero.partition_parameters")
        partition.ZeroParamStatus = self.Status
        self.modules = {"deepspeed": deepspeed, "deepspeed.runtime": types.ModuleType("deepspeed.runtime"),
                        "deepspeed.runtime.zero": types.ModuleType("deepspeed.runtime.zero"),
                        "deepspeed.runtime.zero.partition_parameters": partition}

    def all_gather(self, param_list):
        for p in param_list:
            assert p.ds_status == self.Status.NOT_AVAILABLE, "gathering a parameter that is already gathered"
            p.data = p.ds_full
            p.ds_status = self.Status.AVAILABLE
        self.gathers += 1

    def release(self, param_list, has_been_updated):
        for p in param_list:
            assert p.ds_status == self.Status.AVAILABLE and not p.ds_active_sub_modules
            p.data = torch.empty(0, dtype=p.dtype)
            p.ds_status = self.Status.NOT_AVAILABLE

    def partition(self, tensor, ds_id):
        p = torch.nn.Parameter(tensor.detach().clone())
        p.ds_id, p.ds_full, p.ds_active_sub_modules = ds_id, p.data, set()
        p.all_gather, p.partition = self.all_gather, self.release
        p.data, p.ds_status = torch.empty(0, dtype=p.dtype), self.Status.NOT_AVAILABLE
        return p


@pytest.mark.parametrize("budget", [None, 3000], ids=["default-budget", "small-budget"])
def test_zero3_partitioned_head_is_gathered_in_forward_and_backward(budget, monkeypatch):
    """Outside DeepSpeed's forward the head arrives as an empty partition: gathered for the
    call, gathered again in backward and held until its gradient is accumulated."""
    fake = _FakeZero3()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    h, w, b, labels = make_batch(2, 6, 16, 37, bias=True)
    ref_c, ref_r = torch.randn(2) - 9, torch.randn(2) - 9
    kwargs = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, impl="torch", memory_budget=budget)
    base = dpo_fast.dpo_loss(h, w, labels, bias=b, **kwargs)
    base.loss.backward()

    wz, bz = fake.partition(w, 0), fake.partition(b, 1)
    hz = h.detach().clone().requires_grad_()
    out = dpo_fast.dpo_loss(hz, wz, labels, bias=bz, **kwargs)
    assert wz.shape == (0,) and bz.shape == (0,), "partitions must be released after the call"
    assert fake.gathers == 1
    out.loss.backward()
    assert fake.gathers == 2, "backward recomputes the logits: one more gather"
    assert wz.shape == (0,) and bz.shape == (0,), "partitions must be released once gradients are accumulated"
    assert rel_err(out.loss, base.loss) < TOL
    assert rel_err(hz.grad, h.grad) < TOL
    assert rel_err(wz.grad, w.grad) < TOL and rel_err(bz.grad, b.grad) < TOL

    # Policy and reference through one head: one gather for both calls (and one in backward).
    fake.gathers = 0
    with dfd.gathered(wz, bz, wz):
        with torch.no_grad():
            ref = dpo_fast.sequence_logps(hz, wz, labels, bias=bz, impl="torch")
        policy = dpo_fast.sequence_logps(hz, wz, labels, bias=bz, impl="torch")
    assert fake.gathers == 1
    policy.sum().backward()
    assert fake.gathers == 2 and wz.shape == (0,)
    assert rel_err(policy, ref) < TOL


# ----------------------------------------------------------------------------------------
# real DeepSpeed ZeRO-3, whenever it is installed (make test installs it; its first start on
# CPU compiles a communication op, about a minute). Several steps: test_distributed_training.py
# ----------------------------------------------------------------------------------------

def _zero3_worker(rank):
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # takes over the process group already set up
    config = {"train_micro_batch_size_per_gpu": PAIRS // WORLD, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True}
    report, batch = {}, _dpo_batch()
    init = TinyPolicy().state_dict()

    def run(module, ids, labels, ref_c, ref_r, outside, budget):
        if not outside:  # loss inside the forward: DeepSpeed gathers the head on access
            return module(ids, labels, ref_c, ref_r, budget)
        inner = getattr(module, "module", module)  # loss outside: dpo-fast gathers it
        hidden = inner.hidden(ids) if module is inner else module(ids, None, None, None, "hidden")
        return dpo_fast.dpo_loss(hidden, inner.head.weight, labels, bias=inner.head.bias, ref_chosen_logps=ref_c,
                                 ref_rejected_logps=ref_r, beta=0.5, impl="torch", memory_budget=budget).loss

    class Policy(TinyPolicy):
        def forward(self, input_ids, labels, ref_chosen, ref_rejected, budget=None):
            if budget == "hidden":
                return self.hidden(input_ids)
            return super().forward(input_ids, labels, ref_chosen, ref_rejected, budget)

    for outside in (False, True):
        for budget in (None, 600):
            tag = f"{'outside' if outside else 'inside'} forward, budget {budget}"
            single = Policy()
            single.load_state_dict(init)
            loss_1 = run(single, *batch, outside, budget)
            loss_1.backward()
            with deepspeed.zero.Init(config_dict_or_path=config):
                model = Policy()
            for name, p in model.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if rank == 0:
                        p.data.copy_(init[name])
            engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
            loss = run(engine, *_local_pairs(batch, rank), outside, budget)
            engine.backward(loss)
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            report[f"loss[{tag}]"] = rel_err(mean_loss / WORLD, loss_1)
            for name, p in engine.module.named_parameters():
                full = deepspeed.utils.safe_get_full_grad(p)
                report[f"grad {name}[{tag}]"] = rel_err(full, dict(single.named_parameters())[name].grad)
            report[f"head released[{tag}]"] = float(engine.module.head.weight.numel() != 0)
            engine.step()
    return report


@pytest.mark.skipif(not deepspeed_installed(), reason="deepspeed is not installed (make test installs it)")
def test_deepspeed_zero3_matches_one_process(tmp_path):
    seed = 20261126  # fixed: the same inputs on every run and machine
    reports, error = run_ranks({"zero3": (_zero3_worker, ())}, tmp_path, seed)
    print(f"seed {seed}\n{json.dumps(reports, indent=1)}")
    _check((reports, error, seed), "zero3", 4 * (1 + 5 + 1))
