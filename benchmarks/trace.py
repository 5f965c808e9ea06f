"""Trace what a dpo-fast call launches: every aten op and every row-kernel launch, with the bytes it
reads and writes, its FLOPs, and the memory alive at each step, to check ``dpo_fast.cost_model``.

No GPU needed. The call runs on small real CPU tensors with the CUDA code path forced:
the planner is told cuBLAS writes float32 from 16-bit operands (as on CUDA with torch >= 2.8),
those GEMMs (``aten.mm.dtype_out``/``aten.addmm.dtype_out``, absent on CPU) are emulated and
counted as cuBLAS runs them, and the row work (Triton kernels on CUDA) runs through PyTorch
with its own ops hidden, counted as the kernels move bytes: each reads its tile once and
writes the gradient tile once.

Byte rules per aten op: views and allocations without a fill move nothing; GEMMs read both
operands and write the output (and read it first when accumulating); index/gather ops read
and write the rows they touch; copies and fills write their destination (copies read the
source); every other op reads its tensor inputs and writes its outputs (an in-place op reads
and writes its target). Memory: each new storage from its op until it is freed (polled
before each op); ``peak_excluding`` gives the peak beyond given storages (the returned
gradients).
"""

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.multiprocessing.reductions import StorageWeakRef

aten = torch.ops.aten

_GEMMS = {aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm.out, aten.addmm_.default,
          aten.mm.dtype_out, aten.addmm.dtype_out, aten.mm.dtype, aten.addmm.dtype}
_FILLS = {aten.zero_.default, aten.fill_.Scalar, aten.fill_.Tensor}
_FACTORIES_FILLED = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default, aten.full.default,
                     aten.full_like.default, aten.ones.default, aten.ones_like.default, aten.new_full.default,
                     aten.new_ones.default, aten.scalar_tensor.default}
_FACTORIES_EMPTY = {aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default,
                    aten.empty_strided.default, aten.new_empty_strided.default}
_INDEX_READ = {aten.index.Tensor, aten.index_select.default, aten.gather.default}
_INDEX_PUT = {aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for ``t``: broadcast (stride 0) dimensions count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


@dataclass
class Op:
    name: str
    read: int
    written: int
    flops: float = 0.0

    def seconds(self, tflops: float, tbps: float) -> float:
        return max(self.flops / (tflops * 1e12), (self.read + self.written) / (tbps * 1e12))


@dataclass
class Trace:
    ops: List[Op] = field(default_factory=list)
    events: List[tuple] = field(default_factory=list)  # (storage key, +bytes | -bytes)

    @property
    def bytes(self) -> int:
        return sum(op.read + op.written for op in self.ops)

    @property
    def flops(self) -> float:
        return sum(op.flops for op in self.ops)

    def seconds(self, tflops: float, tbps: float) -> float:
        """Sum over ops of max(FLOPs / peak, bytes / bandwidth): no overlap between ops."""
        return sum(op.seconds(tflops, tbps) for op in self.ops)

    def peak_excluding(self, excluded=()) -> int:
        """Largest total of live storages made during the trace, leaving out ``excluded`` keys."""
        live = peak = 0
        for key, delta in self.events:
            if key in excluded:
                continue
            live += delta
            peak = max(peak, live)
        return peak

    def live_at_peak(self, excluded=()) -> Dict[int, int]:
        """The storages alive when :meth:`peak_excluding` peaks: key -> bytes."""
        live, best, peak = {}, {}, 0
        for key, delta in self.events:
            if key in excluded:
                continue
            if delta > 0:
                live[key] = delta
            else:
                live.pop(key, None)
            if sum(live.values()) > peak:
                peak, best = sum(live.values()), dict(live)
        return best

    def by_name(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for op in self.ops:
            out[op.name] = out.get(op.name, 0) + op.read + op.written
        return out


class OpTracer(TorchDispatchMode):
    """Records every aten op (see the module docstring) into ``self.trace``."""

    def __init__(self):
        super().__init__()
        self.trace = Trace()
        self.paused = 0
        self._live: Dict[int, tuple] = {}  # data_ptr -> (key, weakref, bytes)
        self._serial = 0
        self.made_by: Dict[int, str] = {}  # storage key -> the op and shape that allocated it

    @contextlib.contextmanager
    def hidden(self):
        """Run ops without recording them (the row work standing in for a Triton kernel)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def launch(self, name: str, read: int, written: int) -> None:
        """A kernel launch dpo-fast makes outside aten (the Triton row kernels)."""
        self.trace.ops.append(Op(name, read, written))

    def storage_key(self, t: torch.Tensor):
        entry = self._live.get(t.untyped_storage().data_ptr())
        return None if entry is None else entry[0]

    def _poll(self):
        for ptr, (key, ref, nbytes) in list(self._live.items()):
            if ref.expired():
                del self._live[ptr]
                self.trace.events.append((key, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        self._poll()
        out = self._run(func, args, kwargs)
        self._count(func, args, kwargs, out)
        self._track(func, args, kwargs, out)
        return out

    def _run(self, func, args, kwargs):
        """The op itself; cuBLAS's float32-output GEMMs of 16-bit operands are emulated on the CPU."""
        if func in (aten.mm.dtype_out, aten.addmm.dtype_out) and args[0].device.type == "cpu":
            with self.hidden():
                out = kwargs["out"]
                if func is aten.mm.dtype_out:
                    out.copy_(torch.mm(args[0].float(), args[1].float()))
                else:
                    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
                    out.copy_(torch.addmm(args[0].float(), args[1].float(), args[2].float(), beta=beta,
                                          alpha=alpha))
            return out
        return func(*args, **kwargs)

    def _count(self, func, args, kwargs, out):
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        if getattr(func, "is_view", False) or func in _FACTORIES_EMPTY:
            return
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        written = sum(tensor_bytes(t) for t in outs)
        if func in _FACTORIES_FILLED or func in _FILLS:
            self.trace.ops.append(Op(name, 0, written))
            return
        schema = func._schema
        written_args, read = set(), 0
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if not isinstance(value, torch.Tensor):
                if isinstance(value, (list, tuple)):
                    read += sum(tensor_bytes(t) for t in value if isinstance(t, torch.Tensor))
                continue
            writes = arg.alias_info is not None and arg.alias_info.is_write
            if writes:
                written_args.add(id(value))
                if arg.kwarg_only or func is aten.copy_.default:
                    continue  # an out= argument (or copy_'s destination) is written, not read
            read += tensor_bytes(value)
        flops = 0.0
        if func in _GEMMS:
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
            beta = kwargs.get("beta", 1)
            if name == "addmm" and beta == 0:
                read -= tensor_bytes(args[0])
        elif func in _INDEX_READ:
            read = sum(tensor_bytes(t) for t in outs) + sum(
                tensor_bytes(t) for t in tree_leaves((args[1:], kwargs)) if isinstance(t, torch.Tensor)
                and not t.is_floating_point())
        elif func in _INDEX_PUT:
            values = args[2]
            indices = sum(tensor_bytes(t) for t in args[1] if isinstance(t, torch.Tensor))
            accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
            read = tensor_bytes(values) * (2 if accumulate else 1) + indices
            if func is aten.index_put.default:  # out of place: self copied first (read, and written in full)
                read += tensor_bytes(args[0])
            else:
                written = tensor_bytes(values)
        self.trace.ops.append(Op(name, read, written, flops))

    def _track(self, func, args, kwargs, out):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self._live:
                continue
            self._serial += 1
            self._live[ptr] = (self._serial, StorageWeakRef(storage), nbytes)
            self.trace.events.append((self._serial, nbytes))
            self.made_by[self._serial] = f"{func} {tuple(t.shape)} {t.dtype}"

    def finish(self):
        self._poll()


class TracedRows:
    """A row backend standing in for the Triton kernels: their bytes are recorded, their work done by
    ``inner`` (PyTorch) with its ops hidden from the tracer."""

    def __init__(self, inner, tracer: OpTracer):
        self.inner, self.tracer = inner, tracer
        self.name = "triton"

    def stats_dtype(self, input_dtype):
        return torch.float32

    def stats(self, tile, labels, stats, **kw):
        small = tensor_bytes(labels) + 2 * tensor_bytes(stats)
        self.tracer.launch("triton row_stats", tensor_bytes(tile) + small, 0)
        with self.tracer.hidden():
            self.inner.stats(tile, labels, stats, **kw)

    def grad(self, tile, labels, lse, grad_logp, out, **kw):
        small = sum(tensor_bytes(t) for t in (labels, lse, grad_logp) if t is not None)
        small += sum(tensor_bytes(t) for t in (kw.get("entropy"), kw.get("grad_entropy")) if t is not None)
        self.tracer.launch("triton row_grad", tensor_bytes(tile) + small, tensor_bytes(out))
        with self.tracer.hidden():
            self.inner.grad(tile, labels, lse, grad_logp, out, **kw)


@contextlib.contextmanager
def cuda_code_path(tracer: OpTracer):
    """dpo-fast as on CUDA with torch >= 2.8, on CPU tensors: float32-output GEMMs assumed, impl='torch'
    engines built with traced rows."""
    from dpo_fast import api, gemm, planner, rows
    from dpo_fast.chunked import ChunkedEngine

    from dpo_fast import whole_pairs

    def merge_kernel(out, a, g_a, b, g_b, running):  # kernels/scale.merge_scaled: one read of each, one write
        tracer.launch("triton merge_scaled", sum(tensor_bytes(t) for t in (a, b, running) if t is not None),
                      tensor_bytes(out))
        with tracer.hidden():
            value = a.float() * g_a
            if b is not None:
                value += b.float() * g_b
            if running is not None:
                value += running.float()
            out.copy_(value)

    def scale_by_grad_loss(tensors, grad_loss):  # kernels/scale.scale_unless_one: no bytes when grad_loss is 1
        with tracer.hidden():
            one = bool(grad_loss == 1)
            for t in tensors:
                if t is not None and t.numel():
                    tracer.launch("triton scale_unless_one", 0 if one else tensor_bytes(t),
                                  0 if one else tensor_bytes(t))
                    t.mul_(grad_loss.float())

    saved = (planner.float32_gemm_out, gemm.float32_gemm_out, api.torch_engine, whole_pairs._merge_kernel,
             whole_pairs.scale_by_grad_loss)
    planner.float32_gemm_out = gemm.float32_gemm_out = lambda device, dtype: dtype in (torch.float16, torch.bfloat16)
    api.torch_engine = lambda budget, metrics=True, batch_invariant=False: ChunkedEngine(
        TracedRows(rows.TorchRows(rows.TorchRows.slab_for_budget(budget), metrics), tracer), budget,
        batch_invariant=batch_invariant)
    whole_pairs._merge_kernel, whole_pairs.scale_by_grad_loss = merge_kernel, scale_by_grad_loss
    try:
        yield
    finally:
        (planner.float32_gemm_out, gemm.float32_gemm_out, api.torch_engine, whole_pairs._merge_kernel,
         whole_pairs.scale_by_grad_loss) = saved


def trace_call(fn, *leaves: Optional[torch.Tensor]):
    """Run ``fn()`` (forward and its backward) under the tracer on the CUDA code path; returns the
    trace and the loss memory: the peak of storages made during the call, the final gradients
    of ``leaves`` left out (they are returned, not the loss's)."""
    tracer = OpTracer()
    with cuda_code_path(tracer), tracer:
        fn()
        tracer.finish()
    keys = {tracer.storage_key(leaf.grad) for leaf in leaves if leaf is not None and leaf.grad is not None}
    keys -= {None}
    trace_call.last = (tracer, keys)
    return tracer.trace, tracer.trace.peak_excluding(keys)
