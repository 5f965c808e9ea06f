"""impl="torch": the chunked algorithm with its row work in PyTorch.

For CPUs, and wherever Triton cannot run. Same tiling, same autograd Functions, same
numbers as impl="chunked" up to float32 summation order; peak memory stays bounded by
the same ``memory_budget`` (the row work's slab buffers are part of what the planner counts).
"""

from .chunked import DEFAULT_MEMORY_BUDGET, ChunkedEngine
from .rows import TorchRows


def torch_engine(memory_budget: int = DEFAULT_MEMORY_BUDGET, metrics: bool = True,
                 batch_invariant: bool = False) -> ChunkedEngine:
    """Row buffers sized from the budget (``TorchRows.slab_for_budget``), counted by the planner."""
    return ChunkedEngine(TorchRows(TorchRows.slab_for_budget(memory_budget), metrics), memory_budget,
                         batch_invariant=batch_invariant)
