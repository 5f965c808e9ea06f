"""Programs (thread blocks) of one compiled kernel that an SM holds at once.

The token-major fused kernels size their vocabulary splits in waves of SMs x this number
(``fused_linear_logps._resident_programs``: from the kernel the launch runs, compiled before
the launch); ``benchmarks/kernels.py`` reports it for every launch compiled ahead of time with
the same function, so ``benchmarks/KERNELS.md`` shows the arithmetic the launcher uses. Pure:
no torch, no device.

The limits, as NVIDIA's occupancy calculator counts them for sm_70 and later: registers are
allocated per warp in units of 256, and to warps in groups of 4 (one per SM sub-partition, each
with a quarter of the register file); the SM holds at most ``max_warps`` warps and
``max_blocks`` blocks; a block's shared memory is what the compiler asked for plus 1 KB the
driver reserves per block (sm_80 and later).
"""

from typing import NamedTuple

REGISTER_UNIT = 256  # registers per warp are allocated in units of this
WARP_GROUP = 4  # warps get registers in groups of this many (SM sub-partitions)


class SMLimits(NamedTuple):
    registers: int = 65536  # 32-bit registers per SM
    max_warps: int = 64  # resident warps per SM (2048 threads)
    max_blocks: int = 32  # resident blocks per SM
    shared: int = 228 * 1024  # shared memory per SM, bytes
    reserved_shared: int = 1024  # shared memory the driver reserves per block


SM_90 = SMLimits(shared=228 * 1024)  # H100 / H200
SM_80 = SMLimits(shared=164 * 1024)  # A100

# Resident blocks per SM where it is not 32 (CUDA C programming guide, compute capability table).
MAX_BLOCKS = {(7, 5): 16, (8, 6): 16, (8, 7): 16, (8, 9): 24}
SHARED_PER_SM = {(7, 0): 96 * 1024, (7, 5): 64 * 1024, (8, 0): 164 * 1024, (8, 6): 100 * 1024,
                 (8, 7): 164 * 1024, (8, 9): 100 * 1024, (9, 0): 228 * 1024}


def resident_programs(registers: int, warps: int, shared: int, limits: SMLimits) -> int:
    """Programs of a kernel using ``registers`` per thread, ``warps`` warps and ``shared`` bytes of shared
    memory per program that one SM with ``limits`` holds at once (0: it cannot run there)."""
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    warps_by_registers = limits.registers // per_warp // WARP_GROUP * WARP_GROUP
    by_shared = limits.shared // (shared + limits.reserved_shared)
    return min(warps_by_registers // warps, limits.max_warps // warps, limits.max_blocks, by_shared)


def limits_of(props) -> SMLimits:
    """The SM limits of a CUDA device from ``torch.cuda.get_device_properties`` (fields older torch lacks
    default to the device's compute capability)."""
    capability = (props.major, props.minor)
    warp_size = getattr(props, "warp_size", 32) or 32
    threads = getattr(props, "max_threads_per_multi_processor", None) or 2048
    shared = getattr(props, "shared_memory_per_multiprocessor", None) or SHARED_PER_SM.get(capability, 100 * 1024)
    return SMLimits(registers=getattr(props, "regs_per_multiprocessor", None) or 65536,
                    max_warps=threads // warp_size, max_blocks=MAX_BLOCKS.get(capability, 32), shared=shared)


def of_compiled(kernel, limits: SMLimits):
    """``resident_programs`` of a Triton ``CompiledKernel`` whose handles are loaded (``n_regs`` is set by
    ``_init_handles``); None where the kernel does not say (another Triton's attribute names)."""
    registers = getattr(kernel, "n_regs", None)
    metadata = getattr(kernel, "metadata", None)
    warps, shared = getattr(metadata, "num_warps", None), getattr(metadata, "shared", None)
    if not registers or not warps or shared is None:
        return None
    return resident_programs(registers, warps, shared, limits)
