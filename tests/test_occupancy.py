"""The vocabulary-split sizing reads the occupancy of the kernel each launch runs (``kernels/occupancy.py``).

On CUDA the token-major launchers compile (or find in Triton's cache) the kernel a launch will run,
read its registers, warps and shared memory, and size the splits in waves of SMs x the programs one
SM holds of it; ``benchmarks/KERNELS.md`` reports the same arithmetic for every launch compiled ahead
of time. No GPU here: the arithmetic is pure, and the launcher's CUDA branch runs against stand-in
compiled kernels and device properties.
"""

import types
import warnings

import pytest
import torch
import triton

from dpo_fast.kernels import fused_linear_logps as fused
from dpo_fast.kernels import launch as launch_module
from dpo_fast.kernels import occupancy


def test_registers_warps_blocks_and_shared_memory_bound_the_programs():
    sm90, sm80 = occupancy.SM_90, occupancy.SM_80
    assert occupancy.resident_programs(168, 4, 16 * 1024, sm90) == 3  # 168 x 32 = 21 x 256 per warp
    assert occupancy.resident_programs(172, 4, 16 * 1024, sm90) == 2  # 176 x 32 x 4 x 3 > 65536
    assert occupancy.resident_programs(128, 4, 12 * 1024, sm90) == 4  # the float32 forward at 128 registers
    assert occupancy.resident_programs(128, 8, 72 * 1024, sm90) == 2
    assert occupancy.resident_programs(129, 8, 72 * 1024, sm90) == 1
    assert occupancy.resident_programs(255, 8, 72 * 1024, sm90) == 1
    assert occupancy.resident_programs(32, 4, 100 * 1024, sm80) == 1  # by shared memory: 164 KB per SM
    assert occupancy.resident_programs(32, 4, 100 * 1024, sm90) == 2  # 228 KB
    assert occupancy.resident_programs(32, 4, 0, sm90) == 16  # by warps: 64 per SM
    assert occupancy.resident_programs(16, 1, 0, sm90) == 32  # by blocks
    assert occupancy.resident_programs(0, 4, 0, sm90) == 16  # no register count: not a division by zero
    # Registers go to warps in groups of 4 (a quarter of the register file each): 2-warp blocks at 200
    # registers get 8 warps (4 blocks), not the 10 warps (5 blocks) a flat division of 65536 would give.
    assert occupancy.resident_programs(200, 2, 0, sm90) == 4
    assert occupancy.resident_programs(129, 8, 0, sm90._replace(max_warps=48)) == 1  # sm_86-like
    assert occupancy.resident_programs(32, 4, 0, sm90._replace(max_warps=48)) == 12


def test_device_limits_from_torch_properties():
    h100 = types.SimpleNamespace(major=9, minor=0, warp_size=32, max_threads_per_multi_processor=2048,
                                 shared_memory_per_multiprocessor=233472, regs_per_multiprocessor=65536)
    assert occupancy.limits_of(h100) == occupancy.SM_90
    a100 = types.SimpleNamespace(major=8, minor=0)  # an older torch: fields from the compute capability
    assert occupancy.limits_of(a100) == occupancy.SM_80
    rtx = types.SimpleNamespace(major=8, minor=6, max_threads_per_multi_processor=1536,
                                shared_memory_per_multiprocessor=102400)
    assert occupancy.limits_of(rtx) == occupancy.SMLimits(max_warps=48, max_blocks=16, shared=102400)


def _compiled(registers, warps, shared):
    return types.SimpleNamespace(n_regs=registers, metadata=types.SimpleNamespace(num_warps=warps, shared=shared))


def test_programs_of_a_compiled_kernel():
    assert occupancy.of_compiled(_compiled(128, 4, 12 * 1024), occupancy.SM_90) == 4
    assert occupancy.of_compiled(_compiled(152, 4, 12 * 1024), occupancy.SM_90) == 3
    # a kernel whose handles were never loaded (n_regs unset), or another Triton's names: no answer
    assert occupancy.of_compiled(types.SimpleNamespace(metadata=_compiled(1, 4, 0).metadata), occupancy.SM_90) is None
    assert occupancy.of_compiled(object(), occupancy.SM_90) is None


class _Future:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Loadable:
    def __init__(self):
        self.loaded = False

    def _init_handles(self):
        self.loaded = True


def test_compiled_kernels_warms_up_and_loads_what_the_launch_would_run():
    calls = []
    found = [_Loadable(), _Loadable()]

    class Kernel:  # stands in for an Autotuner: a list, one per config kept (here one as a future)
        def warmup(self, *args, **kwargs):
            calls.append((args, kwargs))
            return [found[0], _Future(found[1])]

    x = torch.zeros(2)
    out = launch_module.compiled_kernels(Kernel(), x, torch.float32, 7, BLOCK_N=64)
    assert out == found and all(k.loaded for k in found)
    (args, kwargs), = calls
    assert args[0] is x and args[1] is torch.float32 and kwargs == dict(grid=(1,), BLOCK_N=64)

    class Jitted:  # a plain JITFunction: one compiled kernel
        def warmup(self, *args, **kwargs):
            return found[0]

    assert launch_module.compiled_kernels(Jitted(), x) == [found[0]]
    assert launch_module.compiled_kernels(object(), x) == []  # no warmup in this Triton
    with pytest.raises(ValueError, match="at least one tensor"):
        launch_module.compiled_kernels(Jitted(), torch.float32)


def _on_a_fake_h100(monkeypatch, compiled):
    """The launcher's CUDA branch without CUDA: 132 SMs of sm_90 limits, ``compiled`` for every lookup."""
    lookups = []

    def compiled_kernels(kernel, *args, **kwargs):
        lookups.append((kernel, args, kwargs))
        return compiled

    monkeypatch.setattr(fused, "compiled_kernels", compiled_kernels)
    monkeypatch.setattr(fused, "INTERPRETED", False)  # a CUDA machine's Triton compiles
    monkeypatch.setattr(fused, "_sm_limits", lambda device: occupancy.SM_90)
    monkeypatch.setattr(fused, "_multiprocessors", lambda device: 132)
    return lookups


@pytest.mark.parametrize("registers, programs", [(128, 4), (152, 3), (168, 3), (200, 2)])
def test_cuda_splits_are_sized_from_the_compiled_kernel(monkeypatch, registers, programs):
    lookups = _on_a_fake_h100(monkeypatch, [_compiled(registers, 4, 12 * 1024)])
    cuda = torch.device("cuda", 0)
    n, vocab, block_n = 396 * 64, 128256, 64
    args, kwargs = ("h", torch.float32, 2), dict(BLOCK_N=block_n)
    splits = fused._vocab_splits("kernel", "forward", n, vocab, block_n, 4, cuda, None, args, kwargs)
    token_blocks, vocab_tiles = triton.cdiv(n, block_n), triton.cdiv(vocab, fused._TOKEN_MAJOR["forward"][4][0][0])
    assert splits == fused.splits_for_waves(token_blocks, vocab_tiles, 132 * programs,
                                            max_splits=min(64, triton.cdiv(vocab, 512)))
    assert fused.wave_fill(token_blocks, splits, vocab_tiles, 132 * programs) >= 0.9
    assert lookups == [("kernel", args, kwargs)]  # the launch's own kernel, arguments and constexprs
    # A count the caller gives is taken as it is: nothing compiled for it.
    assert fused._vocab_splits("kernel", "forward", n, vocab, block_n, 4, cuda, 5, args, kwargs) == 5
    assert len(lookups) == 1


def test_cuda_without_a_register_count_falls_back_with_a_warning(monkeypatch):
    _on_a_fake_h100(monkeypatch, [])
    monkeypatch.setattr(fused, "_FALLBACK_WARNED", set())
    cuda = torch.device("cuda", 0)
    with pytest.warns(UserWarning, match="RESIDENT_PROGRAMS"):
        assert fused._resident_programs("k", "grad_hidden", 2, cuda, (), {}) == fused.RESIDENT_PROGRAMS["grad_hidden"][2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per kernel
        assert fused._resident_programs("k", "grad_hidden", 2, cuda, (), {}) == 1


def test_a_lookup_that_raises_falls_back_with_a_warning(monkeypatch):
    """A Triton whose warmup API differs costs the grid its best shape, never the training step."""
    _on_a_fake_h100(monkeypatch, [])

    def broken(kernel, *args, **kwargs):
        raise TypeError("warmup() got an unexpected keyword argument 'grid'")

    monkeypatch.setattr(fused, "compiled_kernels", broken)
    monkeypatch.setattr(fused, "_FALLBACK_WARNED", set())
    with pytest.warns(UserWarning, match="could not look up.*TypeError.*RESIDENT_PROGRAMS"):
        assert fused._resident_programs("k", "forward", 4, torch.device("cuda", 0), (), {}) == 3


def test_no_lookup_off_cuda_or_under_the_interpreter(monkeypatch):
    lookups = _on_a_fake_h100(monkeypatch, [_compiled(128, 4, 0)])
    assert fused._resident_programs("k", "forward", 4, torch.device("cpu"), (), {}) == 3
    monkeypatch.setattr(fused, "INTERPRETED", True)  # TRITON_INTERPRET=1 on a CUDA machine: nothing compiles
    assert fused._resident_programs("k", "forward", 4, torch.device("cuda", 0), (), {}) == 3
    assert not lookups


def test_launchers_look_up_the_kernel_they_launch(monkeypatch):
    """forward_stats and backward ask for the occupancy of the kernel, constexprs and arguments they then
    launch, the split buffer and split count as placeholders (a float32 dtype, an integer)."""
    asked, launched = [], []

    def resident_programs(kernel, name, element_size, device, args, kwargs):
        asked.append((kernel, name, args, kwargs))
        return 2

    def fake_launch(kernel, grid, *args, **kwargs):
        launched.append((kernel, grid, args, kwargs))

    monkeypatch.setattr(fused, "_resident_programs", resident_programs)
    monkeypatch.setattr(fused, "launch", fake_launch)
    meta = dict(device="meta")
    n, h, v = 300, 64, 5000
    hidden, weight = torch.empty(n, h, **meta), torch.empty(v, h, **meta)
    labels, per_token = torch.empty(n, dtype=torch.int64, **meta), torch.empty(n, **meta)
    fused.forward_stats(hidden, weight, None, labels)
    fused.backward(hidden, weight, None, labels, per_token, per_token, need_weight=False, need_bias=False)
    token_major = [entry for entry in launched if entry[0] in (fused._forward_kernel, fused._grad_hidden_kernel)]
    assert [a[1] for a in asked] == ["forward", "grad_hidden"] and len(token_major) == 2
    for (kernel, name, args, kwargs), (launched_kernel, grid, launch_args, launch_kwargs) in zip(asked, token_major):
        assert kernel is launched_kernel and kwargs == launch_kwargs and len(args) == len(launch_args)
        buffer = kernel.arg_names.index("partial_ptr" if name == "forward" else "dh_ptr")
        count = kernel.arg_names.index("num_splits")
        assert args[buffer] is torch.float32 and launch_args[buffer].dtype == torch.float32
        assert isinstance(args[count], int) and launch_args[count] == grid[1]
        for i, (a, b) in enumerate(zip(args, launch_args)):
            if i not in (buffer, count):
                assert a is b or (not isinstance(a, torch.Tensor) and a == b), kernel.arg_names[i]
