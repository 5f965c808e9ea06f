"""Shared test utilities: input makers, error measures, an allocation recorder, a kernel-launch recorder."""

import contextlib
from typing import List, NamedTuple, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The one device choice of the suite (conftest's `device` fixture hands it out): CUDA when present, else
# CPU, where Triton runs through its interpreter (conftest sets TRITON_INTERPRET=1).
TEST_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_by_design(reason: str) -> list:
    """``pytestmark`` of a test file that runs Triton kernels on CPU tensors on purpose (GPU arithmetic
    emulated in the interpreter, a traced CPU run, CPU allocator peaks): the suite's device audit lets it,
    and on a CUDA machine, where the interpreter is off, it is skipped with its reason."""
    import pytest

    return [pytest.mark.cpu_tensors(reason),
            pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason=f"runs on CPU tensors by design: {reason}")]


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max(max |expected|, tiny), in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp(min=1e-30) if expected.numel() else torch.tensor(1.0)
    return float((actual - expected).abs().max() / scale) if expected.numel() else 0.0


def float32_sum_tol(terms: int, floor: float = 1e-5) -> float:
    """Relative tolerance for a float32 result that sums ``terms`` values: rounding errors of a sum
    walk like sqrt(terms) ulps (in a CPU- and BLAS-dependent order), with ``floor`` for small sums."""
    return max(floor, terms ** 0.5 * torch.finfo(torch.float32).eps)


def abs_or_rel_err(actual, expected) -> float:
    """Relative error on a scale of at least 1 (absolute for values near zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1.0))


def make_batch(pairs, seq, hidden, vocab, dtype=torch.float32, device="cpu", prompt=2, empty_rows=(), scale=1.0,
               bias=False):
    """Hidden [2B, T, H], weight [V, H], labels [2B, T] with a prompt of ignored tokens and ragged ends."""
    rows = 2 * pairs
    h = (torch.randn(rows, seq, hidden, device=device) * scale).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) / hidden ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, device=device) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (rows, seq), device=device)
    labels[:, :prompt] = -100
    for r in range(rows):  # ragged completions: padding at the end
        cut = int(torch.randint(prompt + 1, seq + 1, ()).item())
        labels[r, cut:] = -100
    for r in empty_rows:
        labels[r] = -100
    return h, w, b, labels


class AllocationRecorder(TorchDispatchMode):
    """Records every new storage an op allocates (forward and backward): (elements, bytes per element, op).

    Views and in-place ops share an input's storage and are not counted.
    """

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((t.untyped_storage().nbytes() // t.element_size(), t.element_size(), str(func)))
        return out

    def largest(self):
        return max(self.sizes, default=(0, 0, ""))


class Launch(NamedTuple):
    """One Triton kernel run: its name, the device ``kernels/launch.py`` had entered (None: launched outside
    it) and the devices of its tensor arguments."""

    kernel: str
    entered: Optional[torch.device]
    tensor_devices: frozenset


def record_launches(monkeypatch) -> List[Launch]:
    """Record every Triton kernel that runs (interpreted or compiled) until ``monkeypatch`` is undone.

    Hooks Triton's own ``run`` (what ``kernel[grid](...)`` and the autotuner call), not dpo-fast's
    launch helper, so a kernel launched any other way is seen too, with ``entered=None``.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from dpo_fast.kernels import launch as launch_module

    launches, entered = [], []
    real_context = launch_module.device_context

    @contextlib.contextmanager
    def recording_context(device):
        entered.append(device)
        try:
            with real_context(device):
                yield
        finally:
            entered.pop()

    monkeypatch.setattr(launch_module, "device_context", recording_context)
    for cls in (InterpretedFunction, JITFunction):
        def run(self, *args, _real=cls.run, **kwargs):
            if not kwargs.get("warmup"):
                devices = frozenset(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
                launches.append(Launch(self.fn.__name__, entered[-1] if entered else None, devices))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return launches
def peak_allocated_bytes(fn):
    """(peak, retained): the most bytes ``fn()`` had allocated at once on the CPU beyond what existed
    before it (forward and backward alike), and what was still allocated when it returned.

    From torch.profiler's allocation records (every allocation and free of the CPU allocator,
    with its own time stamp), replayed in time order.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = []

    def walk(node):
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and str(fields.device) == "cpu":
            records.append((node.start_time_ns, fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(records, key=lambda r: r[0]):
        live += size
        peak = max(peak, live)
    return peak, live
