"""Every Triton launch runs on its tensors' device (``kernels/launch.py``).

Triton launches on the current CUDA device and its current stream; a head on ``cuda:1`` while
``cuda:0`` is current would otherwise run on the wrong GPU. The interpreter has no devices, so
the tests check the plumbing: every kernel that runs, in every public function on every Triton
impl, ran inside ``launch``'s device context with its own tensors' device; no launcher
subscripts a kernel itself; and a launch for a (simulated) non-current CUDA device makes that
device current for the kernel and restores the old one after.
"""

import contextlib
import re
from pathlib import Path

import pytest
import torch

import dpo_fast
from dpo_fast.kernels import fused_linear_logps, launch, logsoftmax_gather, scale
from dpo_fast.transform import LogitTransform
from helpers import make_batch, record_launches

ROOT = Path(__file__).resolve().parent.parent
KERNEL_MODULES = (logsoftmax_gather, fused_linear_logps, scale)


def _kernel_names():
    """Every launchable kernel of dpo-fast (jitted or autotuned), found in the kernel modules."""
    from triton.runtime.jit import KernelInterface

    return sorted(name for module in KERNEL_MODULES for name, obj in vars(module).items()
                  if isinstance(obj, KernelInterface) and name.endswith("_kernel"))


def test_the_kernel_list_is_complete():
    assert set(_kernel_names()) == {"_row_stats_kernel", "_row_grad_kernel", "_forward_kernel",
                                    "_merge_splits_kernel", "_grad_hidden_kernel", "_grad_weight_kernel",
                                    "_scale_unless_one_kernel", "_merge_scaled_kernel"}


def test_no_kernel_is_launched_but_through_launch():
    """Static: ``name[grid](...)`` appears nowhere in dpo-fast; ``launch(name, grid, ...)`` everywhere."""
    pattern = re.compile(r"\b(" + "|".join(_kernel_names()) + r")\s*\[")
    sources = [*sorted((ROOT / "kernels").glob("*.py")), *sorted((ROOT / "dpo_fast").rglob("*.py"))]
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in sources
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "kernels launched without kernels/launch.py:\n" + "\n".join(found)
    launches = sum(len(re.findall(r"\blaunch\(\s*_\w+_kernel\b", m.__loader__.get_source(m.__name__)))
                   for m in KERNEL_MODULES)
    assert launches == len(_kernel_names())  # one launch site per kernel


def _hidden_calls(impl):
    """(name, call) for each public function from hidden states; each call runs forward and backward."""
    def run(fn):
        def call(device):
            h, w, b, labels = make_batch(1, 6, 16, 40, device=device, bias=True)
            out = fn(h, w, b, labels)
            loss = out.loss if isinstance(out, dpo_fast.DPOOutput) else out.sum()
            loss.backward()
        return call

    kwargs = dict(impl=impl)
    return [
        ("token_logps", run(lambda h, w, b, y: dpo_fast.token_logps(h, w, y, bias=b, **kwargs))),
        ("sequence_logps", run(lambda h, w, b, y: dpo_fast.sequence_logps(h, w, y, bias=b, **kwargs))),
        ("dpo_loss", run(lambda h, w, b, y: dpo_fast.dpo_loss(h, w, y, bias=b, **kwargs))),
        # A budget below one pair: the two-pass route, or split pairs.
        ("dpo_loss small budget", run(lambda h, w, b, y: dpo_fast.dpo_loss(h, w, y, bias=b, memory_budget=1,
                                                                          **kwargs))),
        ("DPOLoss", run(lambda h, w, b, y: dpo_fast.DPOLoss(**kwargs)(h, w, y, bias=b))),
    ]


def _logits_calls():
    def run(fn, inplace=False):
        def call(device):
            logits = torch.randn(4, 5, 40, device=device, requires_grad=True)
            labels = torch.randint(0, 40, (4, 5), device=device)
            labels[:, :2] = -100
            source = logits.clone() if inplace else logits
            out = fn(source, labels)
            (out.loss if isinstance(out, dpo_fast.DPOOutput) else out.sum()).backward()
        return call

    return [
        ("token_logps_from_logits", run(lambda z, y: dpo_fast.token_logps_from_logits(z, y, impl="chunked"))),
        ("sequence_logps_from_logits", run(lambda z, y: dpo_fast.sequence_logps_from_logits(z, y, impl="chunked"))),
        ("sequence_logps_from_logits inplace", run(
            lambda z, y: dpo_fast.sequence_logps_from_logits(z, y, impl="chunked", inplace=True), inplace=True)),
        ("dpo_loss_from_logits", run(lambda z, y: dpo_fast.dpo_loss_from_logits(z, y, impl="chunked"))),
    ]


def _filtered_fused(device):
    # filter_eps > 0 always takes the fully fused backward: _grad_hidden_kernel and _grad_weight_kernel.
    h, w, b, labels = make_batch(1, 6, 16, 40, device=device, bias=True)
    dpo_fast.token_logps(h, w, labels, bias=b, impl="fused", filter_eps=1e-30).sum().backward()


CALLS = ([(f"chunked {name}", call) for name, call in _hidden_calls("chunked")]
         + [(f"fused {name}", call) for name, call in _hidden_calls("fused")]
         + [("fused filtered backward", _filtered_fused)]
         + [(f"chunked {name}", call) for name, call in _logits_calls()])


def _check_launches(launches, device):
    assert launches, "no Triton kernel ran"
    for seen in launches:
        assert seen.entered is not None, f"{seen.kernel} was launched outside kernels/launch.py"
        assert seen.tensor_devices == {seen.entered}, seen
        assert seen.entered.type == device.type, seen


@pytest.mark.parametrize("name, call", CALLS, ids=[name for name, _ in CALLS])
def test_every_launch_enters_the_tensors_device(name, call, device, monkeypatch):
    launches = record_launches(monkeypatch)
    call(device)
    _check_launches(launches, device)


def test_every_kernel_is_seen_entering_its_device(device, monkeypatch):
    """The calls above reach every kernel between them; the split merge needs an explicit split count."""
    launches = record_launches(monkeypatch)
    for _, call in CALLS:
        call(device)
    h, w, _, labels = make_batch(1, 6, 16, 40, device=device)
    fused_linear_logps.forward_stats(h.detach().reshape(-1, 16), w.detach(), None,
                                     labels.reshape(-1).clamp(min=0), num_splits=2)
    # kernels/scale.py runs where these small calls do not reach it (a CUDA grad_loss, a split pair's merge).
    x, two = torch.ones(64, device=device), torch.full((1,), 2.0, device=device)
    scale.scale_unless_one(x, two)
    scale.merge_scaled(x, x, two)
    _check_launches(launches, device)
    assert {seen.kernel for seen in launches} == set(_kernel_names())


# ----------------------------------------------------------------------------------------
# a non-current CUDA device, simulated
# ----------------------------------------------------------------------------------------

class _OnCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: what ``launch`` reads to pick the device to enter."""

    fake_device = torch.device("cuda", 1)

    @property
    def device(self):
        return self.fake_device


def _fake_cuda(tensor, index=1):
    fake = torch.Tensor._make_subclass(_OnCuda, tensor)
    fake.fake_device = torch.device("cuda", index)
    return fake


class _FakeCuda:
    """``torch.cuda.device`` as a context manager over a simulated current device (cuda:0 at first)."""

    def __init__(self):
        self.current = 0
        self.entered = []

    def device(self, device):
        fake = self

        @contextlib.contextmanager
        def enter():
            previous, fake.current = fake.current, torch.device(device).index
            fake.entered.append(torch.device(device))
            try:
                yield
            finally:
                fake.current = previous

        return enter()


class _RecordingKernel:
    """A kernel stand-in: ``kernel[grid](*args)`` records the grid, arguments and the current device."""

    def __init__(self, cuda):
        self.cuda, self.calls = cuda, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs, self.cuda.current))


def test_a_launch_enters_a_non_current_device_and_leaves_it(monkeypatch):
    cuda = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    kernel = _RecordingKernel(cuda)
    tile, out = _fake_cuda(torch.zeros(3, 4)), _fake_cuda(torch.zeros(3, 4))
    launch.launch(kernel, (3,), tile, 4, out, BLOCK=16)
    assert cuda.entered == [torch.device("cuda", 1)]
    ((grid, args, kwargs, current),) = kernel.calls
    assert current == 1 and grid == (3,) and args[1] == 4 and kwargs == {"BLOCK": 16}
    assert args[0] is tile and args[2] is out  # the tensors themselves, not copies
    assert cuda.current == 0  # the caller's device is current again


def test_a_launch_refuses_tensors_on_two_devices(monkeypatch):
    cuda = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    kernel = _RecordingKernel(cuda)
    with pytest.raises(ValueError, match=r"tensor argument 2 is on cuda:0, the first tensor argument on cuda:1"):
        launch.launch(kernel, (1,), _fake_cuda(torch.zeros(2)), 7, _fake_cuda(torch.zeros(2), index=0))
    with pytest.raises(ValueError, match="at least one tensor"):
        launch.launch(kernel, (1,), 7)
    assert kernel.calls == [] and cuda.entered == []


def test_a_cpu_launch_enters_nothing(monkeypatch):
    cuda = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    kernel = _RecordingKernel(cuda)
    launch.launch(kernel, (1,), torch.zeros(2))
    assert len(kernel.calls) == 1 and cuda.entered == []


def test_a_row_kernel_launcher_passes_its_tensors_device(monkeypatch):
    """The real launchers hand ``launch`` the tile's device: simulated CUDA tensors reach the context."""
    cuda = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    kernel = _RecordingKernel(cuda)
    monkeypatch.setattr(logsoftmax_gather, "_row_stats_kernel", kernel)
    monkeypatch.setattr(logsoftmax_gather, "_row_grad_kernel", kernel)
    tile = _fake_cuda(torch.zeros(3, 8))
    labels, stats = _fake_cuda(torch.zeros(3, dtype=torch.long)), _fake_cuda(torch.zeros(7, 3))
    args = dict(vocab_start=0, ignore_index=-100, **LogitTransform().kernel_args())
    logsoftmax_gather.row_stats(tile, labels, stats, **args)
    lse, grad = _fake_cuda(torch.zeros(3, dtype=torch.float64)), _fake_cuda(torch.zeros(3))
    logsoftmax_gather.row_grad(tile, labels, lse, grad, tile, **args)
    assert cuda.entered == [torch.device("cuda", 1)] * 2 and [c[3] for c in kernel.calls] == [1, 1]
