"""The fused kernels' launches at real shapes, recorded from their launchers.

``kernels/fused_linear_logps.py``'s launchers (``forward_stats``, ``backward``) run here on
meta tensors (shapes and dtypes, no memory, no device), told a GPU's SM count, and every
kernel launch they make is captured instead of run: its arguments, constexprs, grid and,
for an autotuned kernel, each config its own pruning keeps for that launch (the configs
the autotuner could run). ``benchmarks/kernels.py`` compiles every distinct specialization
ahead of time. So the compiled set follows the launcher's code: a new flag, token block or
split rule changes what is compiled without anyone copying it here.

The token-major kernels' launchers size their vocabulary splits from the kernel they are
about to launch (on CUDA they compile it first and read its occupancy:
``fused_linear_logps._resident_programs``). Here that lookup is recorded too (``sized_from``
of each launch, sized meanwhile with the fallback counts ``RESIDENT_PROGRAMS``), so the
compile tool can check that the kernel the splits were sized from is the kernel that runs.

``SCENARIOS`` are the launches real users make: Llama-3-8B's head with every optional
feature on and with DPO's flags (none; gradient filtering on, which is what sends a
Llama-sized head to the fused backward), a token count that is not a multiple of 16, one
token, a batch large enough for a single vocabulary split, GPT-2 (V = 50257, H = 768) and
Gemma-2-2B (V = 256000, softcap 30).

Needs torch (the launchers allocate their buffers with it); the records are plain JSON
(``job`` dicts) that a bare Triton venv compiles (``python -m benchmarks.kernels --jobs``).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

# Streaming multiprocessors of the card each target stands for: they size the vocabulary splits.
SMS = {"sm_90": 132, "sm_80": 108}  # H100 SXM / H200; A100
TOKEN_MAJOR = ("_forward_kernel", "_grad_hidden_kernel")  # grids sized in waves of SMs x resident programs


@dataclass(frozen=True)
class Scenario:
    name: str
    tokens: int
    hidden: int
    vocab: int
    dtypes: Tuple[str, ...] = ("bf16", "fp16", "fp32")
    bias: bool = False
    softcap: Optional[float] = None
    entropy_grad: bool = False
    filter_eps: float = 0.0
    backward: bool = True


LLAMA = dict(hidden=4096, vocab=128256)
SCENARIOS = (
    Scenario("llama-all-flags", 8192, **LLAMA, bias=True, softcap=30.0, entropy_grad=True, filter_eps=1e-4),
    Scenario("llama-dpo", 8191, **LLAMA, filter_eps=1e-4),  # n % 16 != 0
    Scenario("llama-n1", 1, **LLAMA, dtypes=("bf16", "fp32")),
    # 396 token blocks of 64: one split fills the waves of 132 SMs x 1 (16-bit) or x 3 (float32) programs;
    # grad_hidden's float32 rows (415 MB) leave room for one split in the 512 MiB workspace
    Scenario("llama-one-split", 396 * 64, **LLAMA, dtypes=("bf16", "fp32")),
    Scenario("llama-one-split-a100", 324 * 64, **LLAMA, dtypes=("fp32",)),  # the same on 108 SMs x 3
    Scenario("gpt2", 1000, hidden=768, vocab=50257, dtypes=("bf16", "fp32")),
    Scenario("gemma2-softcap", 4096, hidden=2304, vocab=256000, softcap=30.0, dtypes=("bf16", "fp32")),
)

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int64": "i64",
                "int32": "i32", "bool": "i1"}


def _jit_fn(kernel):
    import triton

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def _value(x):
    """A launch argument as JSON: pointers as {"ptr": type, "align16": bool}, numbers as they are."""
    import torch

    if isinstance(x, torch.Tensor):
        aligned = (x.storage_offset() * x.element_size()) % 16 == 0  # allocations themselves are aligned
        return {"ptr": TRITON_TYPES[str(x.dtype).replace("torch.", "")], "align16": aligned}
    if isinstance(x, torch.dtype):  # a placeholder pointer (Triton's warmup: an aligned MockTensor)
        return {"ptr": TRITON_TYPES[str(x).replace("torch.", "")], "align16": True}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"unexpected launch argument {x!r}")


class _Recorder:
    """Stands in for one kernel in the launcher's module: ``kernel[grid](...)`` records, runs nothing."""

    def __init__(self, name, kernel, log, lookups):
        self.name, self.kernel, self.log, self.lookups = name, kernel, log, lookups

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._record(grid, args, kwargs)

    def entries(self, grid, args, kwargs):
        """The launch ``kernel[grid](*args, **kwargs)`` as JSON, once per config the autotuner's pruning keeps."""
        from triton.runtime.autotuner import Autotuner

        fn = _jit_fn(self.kernel)
        named = dict(zip(fn.arg_names, args), **kwargs)
        if isinstance(self.kernel, Autotuner):
            self.kernel.nargs = dict(zip(self.kernel.arg_names, args))
            configs = self.kernel.prune_configs(kwargs)  # the autotuner's own pruning for this launch
            self.kernel.nargs = None
        else:
            configs = [None]
        out = []
        for config in configs:
            tuned = dict(config.kwargs) if config is not None else {}
            meta = dict(named, **tuned)
            launch_grid = list(grid(meta) if callable(grid) else grid)
            launch_grid += [1] * (3 - len(launch_grid))
            constexprs = {k: v for k, v in meta.items() if k in fn.arg_names and fn.params[
                fn.arg_names.index(k)].is_constexpr}
            out.append(dict(
                kernel=self.name,
                values={k: _value(v) for k, v in named.items() if k not in constexprs},
                constexprs=constexprs,
                num_warps=config.num_warps if config is not None else 4,
                num_stages=config.num_stages if config is not None else 3,
                maxnreg=getattr(config, "maxnreg", None) if config is not None else None,
                grid=launch_grid,
            ))
        return out

    def _record(self, grid, args, kwargs):
        entries = self.entries(grid, args, kwargs)
        # The compiled kernels the launcher sized this grid from (token-major kernels: one lookup
        # right before each launch), to be checked against the kernels the launch runs.
        sized_from = self.lookups.pop() if self.name in TOKEN_MAJOR and self.lookups else None
        for i, entry in enumerate(entries):
            entry["sized_from"] = sized_from[i] if sized_from and i < len(sized_from) else None
            self.log.append(entry)


def record(scenario: Scenario, dtype: str, target: str, fused):
    """Every launch ``fused``'s launchers make for ``scenario`` in ``dtype`` on a ``target`` card."""
    import torch

    log, lookups = [], []
    saved = {}
    names = [n for n in dir(fused) if n.endswith("_kernel") and hasattr(getattr(fused, n), "__getitem__")]
    fallback = fused._resident_programs

    def multiprocessors(device):
        return SMS[target]

    def resident_programs(kernel, name, element_size, device, args, kwargs):
        # On CUDA the launcher compiles this launch's kernel here and reads its occupancy; recorded
        # instead (a _Recorder stands in for the kernel), sized with the fallback counts. The split
        # count is not specialized on, so the grid it gives changes no compiled kernel.
        lookups.append(kernel.entries((1,), args, kwargs))
        return fallback(kernel, name, element_size, device, args, kwargs)

    try:
        for name in names:
            saved[name] = getattr(fused, name)
            setattr(fused, name, _Recorder(name, saved[name], log, lookups))
        saved["_multiprocessors"], fused._multiprocessors = fused._multiprocessors, multiprocessors
        saved["_resident_programs"], fused._resident_programs = fallback, resident_programs
        meta = dict(device="meta")
        dt = getattr(torch, TORCH_DTYPES[dtype])
        n, h, v = scenario.tokens, scenario.hidden, scenario.vocab
        hidden = torch.empty(n, h, dtype=dt, **meta)
        weight = torch.empty(v, h, dtype=dt, **meta)
        bias = torch.empty(v, dtype=dt, **meta) if scenario.bias else None
        labels = torch.empty(n, dtype=torch.int64, **meta)
        transform = dict(scale=1.0, softcap=scenario.softcap, inv_temperature=1.0)
        if scenario.bias or scenario.entropy_grad:  # the all-flags case: every transform argument off its default
            transform.update(scale=0.5, inv_temperature=1 / 0.7)
        fused.forward_stats(hidden, weight, bias, labels, **transform)
        if scenario.backward:
            per_token = torch.empty(n, dtype=torch.float32, **meta)
            entropy = dict(entropy=per_token, grad_entropy=per_token) if scenario.entropy_grad else {}
            fused.backward(hidden, weight, bias, labels, per_token, per_token, **entropy, need_bias=scenario.bias,
                           filter_eps=scenario.filter_eps, **transform)
    finally:
        for name, obj in saved.items():
            setattr(fused, name, obj)
    for entry in log:
        entry.update(scenario=scenario.name, dtype=dtype, target=target)
    return log
