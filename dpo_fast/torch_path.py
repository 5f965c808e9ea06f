"""impl="torch": the chunked algorithm with its row work in PyTorch.

For CPUs, and wherever Triton cannot run. Same tiling, same autograd Functions, same
numbers as impl="chunked" up to float32 summation order; peak memory stays bounded by
the same ``memory_budget`` (the row work upcasts a bounded slab of rows at a time).
"""

from .chunked import DEFAULT_MEMORY_BUDGET, ChunkedEngine
from .rows import TorchRows


def torch_engine(memory_budget: int = DEFAULT_MEMORY_BUDGET, batch_invariant: bool = False) -> ChunkedEngine:
    return ChunkedEngine(TorchRows(), memory_budget, batch_invariant=batch_invariant)
