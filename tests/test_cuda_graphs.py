"""CUDA graphs: dpo-fast's custom ops are tagged ``cudagraph_unsafe``, so torch.compile captures around them.

The ops read the host (token counts, sequence lengths, label checks) and may autotune Triton
kernels on a first call: captured in a CUDA graph they would fail (a sync while capturing) or
replay a stale plan. Tagged, Inductor's own rule (``get_first_incompatible_cudagraph_node``)
finds them and splits the graph around them (or leaves it uncaptured). On CPU the
``mode="reduce-overhead"`` compile runs without graphs; on a GPU it captures the rest.
"""

import pytest
import torch

import dpo_fast
from dpo_fast import ops
from helpers import make_batch, rel_err

OP_NAMES = ("sequence_outputs", "sequence_outputs_backward", "logits_outputs", "logits_outputs_backward")
needs_tag = pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"),
                               reason=f"torch {torch.__version__} has no cudagraph_unsafe tag")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@needs_tag
@pytest.mark.parametrize("name", OP_NAMES)
def test_every_op_is_tagged_cudagraph_unsafe(name):
    assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.dpo_fast, name).default.tags
    assert ops.OP_TAGS == (torch.Tag.cudagraph_unsafe,)


def _step(hidden, weight, labels):
    return dpo_fast.dpo_loss(hidden, weight, labels, impl="auto", beta=0.2).loss


def _logits_step(logits, labels):
    return dpo_fast.sequence_logps_from_logits(logits, labels, impl="auto").sum()


@needs_tag
@pytest.mark.parametrize("from_logits", [False, True], ids=["hidden", "logits"])
def test_inductor_finds_the_ops_in_forward_and_backward_graphs(from_logits, device):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    h, w, _, labels = make_batch(1, 6, 16, 40, device=device)
    args = (torch.randn(2, 6, 40, device=device, requires_grad=True), labels) if from_logits else (h, w, labels)
    step = _logits_step if from_logits else _step
    torch.compile(step, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)(*args).backward()
    assert len(graphs) == 2  # forward, backward
    for gm in graphs:
        node = get_first_incompatible_cudagraph_node(gm)
        assert node is not None and str(node.target).startswith("dpo_fast."), gm.graph


def test_reduce_overhead_compile_matches_eager(device):
    """Three calls: cudagraph trees warm up, record and replay the captured parts on a GPU."""
    h, w, _, labels = make_batch(1, 6, 16, 40, device=device)
    eager_loss = _step(h, w, labels)
    eager_grads = torch.autograd.grad(eager_loss, (h, w))
    compiled = torch.compile(_step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        loss = compiled(h, w, labels)
        grads = torch.autograd.grad(loss, (h, w))
        assert rel_err(loss, eager_loss) < 1e-6
        for got, want in zip(grads, eager_grads):
            assert rel_err(got, want) < 1e-5
