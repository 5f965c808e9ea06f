"""The one place every Triton kernel of dpo-fast is launched: on the device of its tensors.

Triton launches on the *current* CUDA device and that device's current stream, whatever
device the tensors it is given live on. A head on ``cuda:1`` (``device_map``, pipeline
stages) while ``cuda:0`` is current would run on the wrong GPU (an illegal-address crash)
or, with peer access, on another device's stream, unordered after the cuBLAS GEMM that
wrote its input (a race). :func:`launch` makes the tensors' device current for the launch
(``torch.cuda.device``): Triton then takes that device and its current stream, which is
the stream torch's own ops on those tensors use, so a kernel runs after the GEMM that wrote
its input and before the op that reads its output, as any torch op would. On CPU tensors
(Triton's interpreter) there is nothing to enter.

Launchers call ``launch(kernel, grid, *args, **kwargs)`` instead of ``kernel[grid](...)``;
``tests/test_launch_device.py`` checks that no kernel is launched any other way. A launcher
that sizes its grid from the kernel it is about to run gets that kernel, compiled and loaded
but not run, from :func:`compiled_kernels`, under the same device.
"""

import contextlib

try:  # the launchers need torch; compiling the kernels ahead of time (benchmarks/kernels.py) does not
    import torch
except ImportError:  # pragma: no cover - a bare Triton venv
    torch = None


def device_of(kernel, args) -> "torch.device":
    """The device of the tensors among ``args``: the first one's, which every other must share.

    A kernel reads and writes all its tensors on one device; one elsewhere would be read
    through a pointer of another GPU. The public functions check devices before any
    kernel runs; this guards the launchers themselves.
    """
    device = None
    for position, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            if device is None:
                device = arg.device
            elif arg.device != device:
                raise ValueError(f"{_name(kernel)}: tensor argument {position} is on {arg.device}, the first "
                                 f"tensor argument on {device}: every tensor of a launch must be on one device")
    if device is None:
        raise ValueError(f"{_name(kernel)}: a launch needs at least one tensor argument to take its device from")
    return device


def device_context(device: "torch.device"):
    """The context a launch for tensors on ``device`` runs in: that CUDA device current, else nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` with the device of the tensor arguments current."""
    with device_context(device_of(kernel, args)):
        return kernel[grid](*args, **kwargs)


def compiled_kernels(kernel, *args, **kwargs) -> list:
    """The kernels ``launch(kernel, grid, *args, **kwargs)`` would run, compiled (or found in Triton's cache)
    and loaded on the tensors' device, not run: one per config the autotuner's pruning keeps.

    Triton's ``warmup`` (the JIT's own launch path with ``warmup=True``: the same specialization and cache
    key as the launch; a ``torch.dtype`` stands for a pointer argument, aligned); ``_init_handles`` loads
    the binary, which sets ``n_regs`` (Triton's fused-softmax tutorial reads occupancy the same way).
    Empty where this Triton does not offer that (then the caller falls back to its own numbers).
    """
    warmup = getattr(kernel, "warmup", None)
    if warmup is None:
        return []
    with device_context(device_of(kernel, args)):
        found = warmup(*args, grid=(1,), **kwargs)
        out = []
        for compiled in found if isinstance(found, (list, tuple)) else [found]:
            if hasattr(compiled, "result"):  # Triton's asynchronous compile mode hands back futures
                compiled = compiled.result()
            init = getattr(compiled, "_init_handles", None)
            if compiled is None or init is None:
                return []
            init()
            out.append(compiled)
        return out


def _name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)  # an Autotuner wraps the jitted function
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", repr(kernel))
