"""torch.compile and autograd checks: the public functions under dynamo, and gradcheck.

While compiling, the public functions route to custom ops (``dpo_fast/ops.py``); a compiled
training step must trace in one graph (``fullgraph=True`` raises on any graph break) and
give eager's numbers. Compiled steps use impl="torch" and the ``aot_eager`` backend (the
fake implementations, AOTAutograd and the backward op are all exercised; one test also runs
inductor). gradcheck runs in float64 at tiny shapes on the PyTorch and Triton-interpreter
paths; their statistics are float32 by design, so finite differences use eps=1e-3 and
tolerances of 1e-3, which a wrong factor in any gradient term (a missed temperature,
softcap or transform derivative) exceeds by orders of magnitude.
"""

import importlib.util

import pytest
import torch
import torch._dynamo.testing

import dpo_fast
from dpo_fast import ops
from helpers import make_batch, rel_err

IMPLS = ["torch", "chunked"] + (["fused"] if importlib.util.find_spec("dpo_fast.fused") is not None else [])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class GraphRecorder:
    """A dynamo backend that keeps every graph it is given, then runs it through ``aot_eager`` (or inductor)."""

    def __init__(self, backend="aot_eager"):
        self.graphs = []
        self.inner = torch._dynamo.lookup_backend(backend)

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)

    def ops_called(self):
        return {str(node.target) for gm in self.graphs for node in gm.graph.nodes if node.op == "call_function"}


class TinyPolicy(torch.nn.Module):
    """A body and an lm_head: the loss reads ``lm_head.weight`` directly, as a trainer's fused loss does."""

    def __init__(self, vocab=40, hidden=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.body = torch.nn.Linear(hidden, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=True)

    def hidden(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


STEPS = {
    "token_logps": lambda m, ids, labels, refs: (dpo_fast.token_logps(
        m.hidden(ids), m.lm_head.weight, labels, bias=m.lm_head.bias, impl="torch", softcap=5.0) ** 2).mean(),
    "sequence_logps": lambda m, ids, labels, refs: dpo_fast.sequence_logps(
        m.hidden(ids), m.lm_head.weight, labels, bias=m.lm_head.bias, impl="torch", average=True).sum(),
    "dpo_loss": lambda m, ids, labels, refs: dpo_fast.dpo_loss(
        m.hidden(ids), m.lm_head.weight, labels, bias=m.lm_head.bias, impl="torch", ref_chosen_logps=refs[0],
        ref_rejected_logps=refs[1], loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3]).loss,
    "dpo_module": lambda m, ids, labels, refs: dpo_fast.DPOLoss(beta=0.2, loss_type="nca_pair", impl="torch")(
        m.hidden(ids), m.lm_head.weight, labels, *refs, bias=m.lm_head.bias).loss,
}


def _batch(device, pairs=2, seq=6, vocab=40):
    ids = torch.randint(0, vocab, (2 * pairs, seq), device=device)
    labels = torch.randint(0, vocab, (2 * pairs, seq), device=device)
    labels[:, :2] = -100
    labels[-1, 4:] = -100
    refs = (torch.randn(pairs, device=device) - 20, torch.randn(pairs, device=device) - 20)
    return ids, labels, refs


def _loss_and_grads(step, model, *batch):
    loss = step(model, *batch)
    return loss, torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("name", sorted(STEPS))
def test_compiled_training_step_is_one_graph(name, device):
    model = TinyPolicy().to(device)
    batch = _batch(device)
    recorder = GraphRecorder()
    compiled = torch.compile(STEPS[name], backend=recorder, fullgraph=True)
    loss, grads = _loss_and_grads(compiled, model, *batch)
    assert len(recorder.graphs) == 1
    assert any("dpo_fast.sequence_outputs" in target for target in recorder.ops_called())
    eager_loss, eager_grads = _loss_and_grads(STEPS[name], model, *batch)
    assert rel_err(loss, eager_loss) < 1e-6
    for got, want in zip(grads, eager_grads):
        assert rel_err(got, want) < 1e-5
    # A second batch of another length reuses or recompiles the graph, never breaks it.
    ids, labels, refs = _batch(device, seq=9)
    assert torch.isfinite(compiled(model, ids, labels, refs))


def _head_call(name, hidden, weight, bias, labels, refs):
    """Each public function on hidden states (or on the logits the head makes of them), reduced to a scalar."""
    if name.endswith("_from_logits"):
        logits = torch.nn.functional.linear(hidden, weight, bias)  # under autocast: the autocast dtype
        fn = getattr(dpo_fast, name)
        if name == "dpo_loss_from_logits":
            return fn(logits, labels, impl="torch", ref_chosen_logps=refs[0], ref_rejected_logps=refs[1]).loss
        return (fn(logits, labels, impl="torch") ** 2).mean()
    if name == "dpo_loss":
        return dpo_fast.dpo_loss(hidden, weight, labels, bias=bias, impl="torch", ref_chosen_logps=refs[0],
                                 ref_rejected_logps=refs[1], loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3]).loss
    if name == "dpo_module":
        return dpo_fast.DPOLoss(beta=0.2, impl="torch")(hidden, weight, labels, *refs, bias=bias).loss
    return (getattr(dpo_fast, name)(hidden, weight, labels, bias=bias, impl="torch") ** 2).mean()


AUTOCAST_CALLS = ["token_logps", "sequence_logps", "dpo_loss", "dpo_module", "token_logps_from_logits",
                  "sequence_logps_from_logits", "dpo_loss_from_logits"]


@pytest.mark.parametrize("hidden_dtype", [torch.bfloat16, torch.float32], ids=["bf16_hidden", "fp32_hidden"])
@pytest.mark.parametrize("name", AUTOCAST_CALLS)
def test_compiled_call_under_autocast_matches_eager(name, hidden_dtype, device):
    """Issue 22 items 1-2: under autocast a compiled call computes what the eager call computes. bf16 hidden
    states with a float32 head (a mixed-precision model) failed to trace (the compiled route skipped the
    autocast cast, so the dtype check raised while tracing); float32 inputs were computed in float32,
    1e-4 away from eager's bf16 products."""
    model = TinyPolicy().to(device)
    ids, labels, refs = _batch(device)

    def step(ids):
        hidden = model.hidden(ids).to(hidden_dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return _head_call(name, hidden, model.lm_head.weight, model.lm_head.bias, labels, refs)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(ids)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    eager = step(ids)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    # The same bf16 products on both sides: the loss agrees to float32 rounding (the bug was 1e-4 off).
    assert rel_err(loss, eager) < 1e-5, (float(loss), float(eager))
    # Gradients: eager's whole-pair route rounds its gradient GEMMs to bf16, the compiled two-pass route
    # sums them in float32: a few bf16 ulps apart.
    for got, want in zip(grads, eager_grads):
        assert rel_err(got, want) < 3e-2


def test_autocast_entered_inside_the_compiled_step(device):
    model = TinyPolicy().to(device)
    ids, labels, refs = _batch(device)

    def step(ids):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hidden = model.hidden(ids)  # bf16 under autocast; the head stays float32
            return _head_call("dpo_loss", hidden, model.lm_head.weight, model.lm_head.bias, labels, refs)

    recorder = GraphRecorder()
    loss = torch.compile(step, backend=recorder, fullgraph=True)(ids)
    assert len(recorder.graphs) == 1
    assert rel_err(loss, step(ids)) < 1e-5


def test_compiled_step_with_inductor(device):
    model = TinyPolicy().to(device)
    batch = _batch(device)
    recorder = GraphRecorder("inductor")
    compiled = torch.compile(STEPS["dpo_loss"], backend=recorder, fullgraph=True)
    loss, grads = _loss_and_grads(compiled, model, *batch)
    eager_loss, eager_grads = _loss_and_grads(STEPS["dpo_loss"], model, *batch)
    assert len(recorder.graphs) == 1
    assert rel_err(loss, eager_loss) < 1e-6
    for got, want in zip(grads, eager_grads):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("packing", ["cu_seqlens", "sequence_ids"])
def test_packed_sequences_compile(packing, device):
    """sequence_logps with sequence_ids and no num_sequences: the number of sequences is data-dependent, an
    unbacked size in the graph; dpo_loss states it (num_sequences) and has static shapes."""
    lengths = torch.tensor([5, 3, 4, 6], device=device)
    h, w, _, _ = make_batch(1, int(lengths.sum()), 16, 40, device=device)
    h = h.detach()[0].requires_grad_()
    labels = torch.randint(0, 40, (int(lengths.sum()),), device=device)
    labels[0] = -100
    pack = (dict(cu_seqlens=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])) if packing == "cu_seqlens"
            else dict(sequence_ids=torch.repeat_interleave(torch.arange(4, device=device), lengths)))

    count = dict(num_sequences=4) if packing == "sequence_ids" else {}

    def step(h, w):
        out = dpo_fast.dpo_loss(h, w, labels, impl="torch", **pack, **count)
        return out.loss + 0.1 * dpo_fast.sequence_logps(h, w, labels, impl="torch", **pack).sum()

    recorder = GraphRecorder()
    loss = torch.compile(step, backend=recorder, fullgraph=True)(h, w)
    eager = step(h, w)
    assert len(recorder.graphs) == 1 and rel_err(loss, eager) < 1e-6
    for got, want in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(eager, (h, w))):
        assert rel_err(got, want) < 1e-5


def test_logits_functions_compile(device):
    logits = torch.randn(4, 5, 30, device=device, requires_grad=True)
    labels = torch.randint(0, 30, (4, 5), device=device)
    labels[:, 0] = -100

    def step(x):
        scaled = x * 1.5
        out = dpo_fast.dpo_loss_from_logits(scaled, labels, impl="torch", loss_type="ipo", temperature=0.9)
        return out.loss + dpo_fast.sequence_logps_from_logits(scaled, labels, impl="torch").mean()

    recorder = GraphRecorder()
    loss = torch.compile(step, backend=recorder, fullgraph=True)(logits)
    eager = step(logits)
    assert len(recorder.graphs) == 1
    assert any("dpo_fast.logits_outputs" in target for target in recorder.ops_called())
    assert rel_err(loss, eager) < 1e-6
    (got,), (want,) = torch.autograd.grad(loss, logits), torch.autograd.grad(eager, logits)
    assert rel_err(got, want) < 1e-6


def test_dynamic_shapes_and_symbolic_settings(device):
    """dynamic=True makes sizes and float settings read from defaults or attributes symbolic."""
    model = TinyPolicy().to(device)
    loss_fn = dpo_fast.DPOLoss(beta=0.3, impl="torch")
    compiled = torch.compile(lambda ids, labels: loss_fn(model.hidden(ids), model.lm_head.weight, labels).loss,
                             backend="aot_eager", fullgraph=True, dynamic=True)
    for seq in (6, 8, 11):
        ids, labels, _ = _batch(device, seq=seq)
        assert rel_err(compiled(ids, labels), loss_fn(model.hidden(ids), model.lm_head.weight, labels).loss) < 1e-6


def test_value_checks_run_inside_the_compiled_graph(device):
    """Checks that read tensor values run when the op runs: the compiled function raises the same ValueError."""
    h, w, _, labels = make_batch(2, 5, 16, 40, device=device)
    compiled = torch.compile(lambda h, w, labels: dpo_fast.dpo_loss(h, w, labels, impl="torch").loss,
                             backend="aot_eager", fullgraph=True)
    assert torch.isfinite(compiled(h, w, labels))
    bad = labels.clone()
    bad[1, 3] = 40
    with pytest.raises(ValueError, match="labels"):
        compiled(h, w, bad)
    ids = torch.tensor([0, 0, 1, 1, 2], device=device)  # three sequences: no pairs
    packed = torch.compile(lambda h, w: dpo_fast.dpo_loss(h, w, labels[0], sequence_ids=ids, num_sequences=3,
                                                          impl="torch").loss, backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="even"):
        packed(h[0].detach(), w.detach())


def test_metadata_checks_fail_at_trace_time(device):
    """Shape and setting errors surface while tracing: with graph breaks allowed, as eager's ValueError."""
    h, w, _, labels = make_batch(2, 5, 16, 40, device=device)
    compiled = torch.compile(lambda h, w, labels: dpo_fast.dpo_loss(h, w, labels, impl="torch", beta=-1.0).loss,
                             backend="aot_eager")
    with pytest.raises(ValueError, match="beta"):
        compiled(h, w, labels)
    compiled = torch.compile(lambda h, w, labels: dpo_fast.dpo_loss(h, w, labels, impl="torch").loss,
                             backend="aot_eager")
    with pytest.raises(ValueError, match="labels"):
        compiled(h[:3], w, labels[:3])


def test_custom_ops_pass_opcheck(device):
    """torch.library.opcheck: schema, fake implementations and autograd registration agree with the real ops."""
    h, w, b, labels = make_batch(2, 5, 16, 40, device=device, bias=True)
    settings = (-100, 1.0, 1.0, 2.0, "torch", None, False, 0.0)
    ids = torch.tensor([0, 0, 1, 1, 1], device=device)
    as64 = [t.detach().double().requires_grad_() for t in (h, w, b)]
    for args in [(h, w, b, labels, None, None, None, None, True, *settings, None),
                 (h.detach()[0], w, None, labels[0], ids, None, None, None, False, *settings, None),
                 (h.detach()[0], w, None, labels[0], ids, None, None, None, True, *settings, 4),
                 # float64 inputs on PyTorch rows come back float64: the fake implementation says so too.
                 (*as64, labels, None, None, None, None, True, *settings, None)]:
        result = torch.library.opcheck(ops.sequence_outputs, args)
        assert set(result.values()) == {"SUCCESS"}, result
    logits = torch.randn(4, 5, 30, device=device, requires_grad=True)
    labels = torch.randint(0, 30, (4, 5), device=device)
    for paired in (False, True):
        result = torch.library.opcheck(ops.logits_outputs,
                                       (logits, labels, None, None, -100, 0.7, "torch", False, paired))
        assert set(result.values()) == {"SUCCESS"}, result
    # float64 logits on PyTorch rows come back float64: the fake implementation must say so too.
    result = torch.library.opcheck(ops.logits_outputs, (logits.detach().double().requires_grad_(), labels, None,
                                                        None, -100, 0.7, "torch", False, False))
    assert set(result.values()) == {"SUCCESS"}, result


_ODD_COUNT_CALLS = {
    "rows": lambda h, w, labels, packed: dpo_fast.dpo_loss(h, w, labels, impl="torch").loss,
    "one_row": lambda h, w, labels, packed: dpo_fast.dpo_loss(h[:1], w, labels[:1], impl="torch").loss,
    "with_refs": lambda h, w, labels, packed: dpo_fast.dpo_loss(
        h, w, labels, impl="torch", ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1)).loss,
    "cu_seqlens": lambda h, w, labels, packed: dpo_fast.dpo_loss(
        h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), impl="torch", cu_seqlens=packed).loss,
    "from_logits": lambda h, w, labels, packed: dpo_fast.dpo_loss_from_logits(h @ w.t(), labels, impl="torch").loss,
    "module": lambda h, w, labels, packed: dpo_fast.DPOLoss(impl="torch")(h, w, labels).loss,
}


@pytest.mark.parametrize("call", sorted(_ODD_COUNT_CALLS))
def test_odd_sequence_count_under_fullgraph_is_the_library_value_error(call, device):
    # Raised while tracing, the ValueError would become torch._dynamo.exc.Unsupported ("Observed exception")
    # under fullgraph=True; the op refuses the count when it runs, before any kernel.
    h, w, _, labels = make_batch(2, 5, 16, 40, device=device)
    h, labels = h[:3], labels[:3]
    labels[:, -1] = 1  # every sequence has a token
    packed = torch.tensor([0, 5, 10, 15], dtype=torch.int32, device=device)
    compiled = torch.compile(_ODD_COUNT_CALLS[call], fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="even, non-zero number of sequences"):
        compiled(h, w, labels, packed)


# ----------------------------------------------------------------------------------------
# gradcheck
# ----------------------------------------------------------------------------------------

def _tiny64(device, with_bias=True):
    torch.manual_seed(1234)  # gradcheck tolerances are for these inputs' scale
    h = torch.randn(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 7, (2, 3), device=device)
    labels[0, 0] = -100
    return h, w, b, labels


GRADCHECK = dict(eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("route", ["eager", "custom_op"])
def test_gradcheck_hidden_paths(route, device):
    """impl='torch' computes float64 inputs in float64 (the Triton impls refuse them: see below)."""
    h, w, b, labels = _tiny64(device)
    module = dpo_fast if route == "eager" else ops
    settings = dict(bias=None, impl="torch", softcap=3.0, temperature=0.8, logit_scale=1.3)

    def tokens(h, w, b):
        return module.token_logps(h, w, labels, **dict(settings, bias=b))

    def loss(h, w, b):
        return module.dpo_loss(h, w, labels, **dict(settings, bias=b), loss_type=["sigmoid", "sft"],
                               loss_weights=[1.0, 0.5], beta=0.5).loss

    assert tokens(h, w, b).dtype == torch.float64
    assert torch.autograd.gradcheck(tokens, (h, w, b), **GRADCHECK)
    assert torch.autograd.gradcheck(loss, (h, w, b), **GRADCHECK)


@pytest.mark.parametrize("impl", [impl for impl in IMPLS if impl != "torch"])
def test_gradcheck_triton_engines(impl, device):
    """The Triton engines compute in float32, so the public functions refuse float64 for them; their autograd
    Function still takes float64 operands: gradcheck it directly (random projections under the interpreter)."""
    from dpo_fast.api import make_engine
    from dpo_fast.function import TokenLogpsFunction
    from dpo_fast.transform import LogitTransform

    h, w, b, labels = _tiny64(device)
    keep = labels.reshape(-1) != -100
    kept_labels = labels.reshape(-1)[keep]
    engine = make_engine(impl, None)
    transform = LogitTransform(scale=1.3, softcap=3.0, temperature=0.8)

    def tokens(h, w, b):
        return TokenLogpsFunction.apply(h.reshape(-1, h.shape[-1])[keep], w, b, kept_labels, engine, transform)[0]

    assert torch.autograd.gradcheck(tokens, (h, w, b), fast_mode=device.type == "cpu", **GRADCHECK)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_gradcheck_logits_path(impl, device):
    torch.manual_seed(4321)
    logits = torch.randn(2, 3, 6, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([[1, -100, 5], [0, 2, 2]], device=device)
    # The public functions compute float64 logits in float64 on PyTorch rows and refuse the float32 Triton
    # rows for them; the op takes its impl as given, so the Triton rows are checked through it.
    calls = [lambda x: ops.logits_outputs(x, labels, None, None, -100, 0.7, impl, False, False)[0]]
    if impl == "torch":
        calls += [lambda x, module=module: module.token_logps_from_logits(x, labels, impl=impl, temperature=0.7)
                  for module in (dpo_fast, ops)]
    for call in calls:
        assert torch.autograd.gradcheck(call, (logits,), fast_mode=impl != "torch", **GRADCHECK)


def test_gradcheck_notices_a_wrong_gradient(device, monkeypatch):
    """The tolerances above are tight enough: a temperature missing from dz/ds fails gradcheck."""
    from dpo_fast.transform import LogitTransform

    h, w, b, labels = _tiny64(device)
    original = LogitTransform.apply_with_derivative_

    def wrong(self, logits, buffer):
        z, dz = original(self, logits, buffer)
        return z, dz * self.temperature

    monkeypatch.setattr(LogitTransform, "apply_with_derivative_", wrong)
    ok = torch.autograd.gradcheck(lambda h, w, b: dpo_fast.token_logps(h, w, labels, bias=b, impl="torch",
                                                                       temperature=0.8), (h, w, b),
                                  raise_exception=False, **GRADCHECK)
    assert not ok
