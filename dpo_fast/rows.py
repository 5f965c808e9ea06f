"""Row work over logits tiles: Triton kernels or their PyTorch twin, and the statistics they fill.

Both backends fold a ``[rows, cols]`` tile of raw logits into the float32 statistics of
``dpo_fast.kernels.stats_layout`` and write the softmax gradient of a tile (in place when
``out is tile``). The chunked and logits paths take either backend, so the GEMM tiling
and the autograd plumbing are written once.
"""

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from dpo_fast.kernels.stats_layout import (
    NUM_STATS, STAT_ARGMAX, STAT_MAX, STAT_SQEXP, STAT_SUMEXP, STAT_TARGET, STAT_ZEXP, STAT_ZSUM,
)
from .transform import LogitTransform

try:  # Triton is optional: CPU wheels of some platforms have none.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is missing
    HAS_TRITON = False


def _built_for_interpreter() -> bool:
    """Whether triton's own jit functions (``tl.sum``...) were made for the interpreter.

    Triton decides once, when ``triton.language`` is imported, from ``TRITON_INTERPRET``; our
    kernels decide when their module is first imported. Both must agree, or a kernel fails
    inside the interpreter ("Cannot call @triton.jit'd outside of the scope of a kernel").
    """
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language.standard as standard

    built = [getattr(standard, "sum", None)]
    kernels = sys.modules.get("dpo_fast.kernels.logsoftmax_gather")
    if kernels is not None:
        built.append(kernels._row_grad_kernel)
    return all(isinstance(fn, InterpretedFunction) for fn in built if fn is not None)


def triton_cpu_problem() -> Optional[str]:
    """Why Triton kernels cannot run on CPU tensors in this process; None when they can."""
    if not HAS_TRITON:
        return "triton is not installed"
    wanted = os.environ.get("TRITON_INTERPRET") == "1"
    built = _built_for_interpreter()
    if wanted and built:
        return None
    if wanted:
        return ("TRITON_INTERPRET=1 was set after triton was imported, which then built its kernels for the GPU: "
                "set it before the first import of triton or dpo_fast")
    if built:
        return ("triton was imported under TRITON_INTERPRET=1, which is no longer set: keep it at 1 for as long "
                "as dpo_fast runs CPU tensors")
    return "Triton runs CPU tensors only through its interpreter (TRITON_INTERPRET=1 before importing triton)"


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA, and on CPU tensors through the interpreter (:func:`triton_cpu_problem`)."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_cpu_problem() is None


# Ignore index for tensors of kept tokens only: their labels lie in [0, V), never here.
KEPT_ONLY = -1


def init_stats(num_rows: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    stats = torch.zeros(NUM_STATS, num_rows, dtype=dtype, device=device)
    stats[STAT_MAX] = float("-inf")
    return stats


@dataclass
class TokenStats:
    """Per-token results finished from the statistics.

    ``lse`` is float64: the backward forms ``log p = z - lse``, and a float32 lse would put
    half an ulp of ``lse`` into every log-prob (see ``logsoftmax_gather.split_lse``).
    ``is_top1`` is bool; the rest have the statistics' dtype (float32, or float64 where the
    rows computed in float64: :meth:`TorchRows.stats_dtype`).
    """

    logps: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    log_sum_sq_probs: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor

    def index(self, idx) -> "TokenStats":
        return TokenStats(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def finish_stats(stats: torch.Tensor, labels: torch.Tensor, vocab_size: int, ignore_index: int) -> TokenStats:
    """Turn folded statistics into log-probs and metrics; ignored rows give zeros."""
    active = labels != ignore_index
    sum_exp = stats[STAT_SUMEXP]
    lse = stats[STAT_MAX].double() + torch.log(sum_exp.double())
    with torch.no_grad():
        safe_sum = torch.where(sum_exp > 0, sum_exp, torch.ones_like(sum_exp)).double()
        entropy = (lse - stats[STAT_ZEXP].double() / safe_sum).to(stats.dtype)
        log_sum_sq = torch.log(stats[STAT_SQEXP]) - 2 * torch.log(sum_exp)
    zero = torch.zeros_like(sum_exp)
    return TokenStats(
        # (target - max) - log(sum) rather than target - lse: a confident token's log-prob is then
        # not the difference of two nearly equal large numbers (Sterbenz: target - max is exact).
        logps=torch.where(active, (stats[STAT_TARGET] - stats[STAT_MAX]) - torch.log(sum_exp), zero),
        lse=lse,
        entropy=torch.where(active, entropy, zero),
        log_sum_sq_probs=torch.where(active, log_sum_sq, zero),
        mean_logits=torch.where(active, stats[STAT_ZSUM] / vocab_size, zero),
        is_top1=active & (stats[STAT_ARGMAX] == labels.to(stats.dtype)),
    )


class TritonRows:
    """Row work through ``dpo_fast.kernels.logsoftmax_gather``."""

    name = "triton"

    @staticmethod
    def stats_dtype(input_dtype: torch.dtype) -> torch.dtype:
        """The kernels compute in float32 whatever the input dtype (float64 included)."""
        return torch.float32

    def stats(self, tile, labels, stats, *, vocab_start, ignore_index, transform: LogitTransform):
        from dpo_fast.kernels import logsoftmax_gather

        logsoftmax_gather.row_stats(tile, labels, stats, vocab_start=vocab_start, ignore_index=ignore_index,
                                    **transform.kernel_args())

    def grad(self, tile, labels, lse, grad_logp, out, *, vocab_start, ignore_index, transform: LogitTransform,
             entropy=None, grad_entropy=None):
        from dpo_fast.kernels import logsoftmax_gather

        logsoftmax_gather.row_grad(tile, labels, lse, grad_logp, out, vocab_start=vocab_start,
                                   ignore_index=ignore_index, entropy=entropy, grad_entropy=grad_entropy,
                                   **transform.kernel_args())


class TorchRows:
    """The same row work in PyTorch, a slab of rows at a time into reused buffers.

    Per call (one tile) it allocates ``WORK_BUFFERS`` slab buffers of ``slab_elements`` each in
    the statistics' dtype (:meth:`workspace_bytes`, which the planner counts against the budget)
    and nothing per element beyond them: the exponentials are computed in place, products of
    the metrics go into a scratch buffer, and an identity transform of float32 logits reads the
    tile itself (no copy). The statistics are those of the formulas (same operations per element;
    row sums may run in another order).
    ``metrics=False`` skips what only the metrics need (entropy, log sum p^2, vocab-mean logit,
    argmax): the log-probs and their gradients are unchanged, the metric statistics stay 0.
    """

    name = "torch"
    WORK_BUFFERS = 3  # stats: exp, transformed logits, scratch; grad: p, transformed logits or gradient, dz
    DEFAULT_SLAB_ELEMENTS = 1 << 20  # 4 MiB of float32 per buffer: large enough to amortize per-op overhead

    def __init__(self, slab_elements: int = DEFAULT_SLAB_ELEMENTS, metrics: bool = True):
        self.slab_elements = slab_elements
        self.metrics = metrics

    @staticmethod
    def stats_dtype(input_dtype: torch.dtype) -> torch.dtype:
        """float64 inputs are computed (and returned) in float64; every other dtype in float32."""
        return torch.float64 if input_dtype == torch.float64 else torch.float32

    @classmethod
    def slab_for_budget(cls, memory_budget: int) -> int:
        """Slab elements so the row buffers take at most an eighth of ``memory_budget`` (float32)."""
        return max(1, min(cls.DEFAULT_SLAB_ELEMENTS, memory_budget // (8 * 4 * cls.WORK_BUFFERS)))

    def slab_rows(self, cols: int) -> int:
        return max(1, self.slab_elements // max(cols, 1))

    def workspace_bytes(self, rows: int, cols: int, input_dtype: torch.dtype) -> int:
        """Bytes of the buffers one call on a ``[rows, cols]`` tile allocates (at least one row each)."""
        elements = min(max(rows, 1), self.slab_rows(cols)) * cols
        return self.WORK_BUFFERS * elements * self.stats_dtype(input_dtype).itemsize

    def _slabs(self, rows: int, cols: int):
        step = self.slab_rows(cols)
        for start in range(0, rows, step):
            yield start, min(rows, start + step)

    def _buffers(self, tile, dtype, wanted):
        """One flat slab buffer per true entry of ``wanted`` (None for the others)."""
        elements = min(tile.shape[0], self.slab_rows(tile.shape[1])) * tile.shape[1]
        return [torch.empty(elements, dtype=dtype, device=tile.device) if want else None for want in wanted]

    @staticmethod
    def _view(buffer, rows, cols):
        return buffer[: rows * cols].view(rows, cols)

    def stats(self, tile, labels, stats, *, vocab_start, ignore_index, transform: LogitTransform):
        rows, cols = tile.shape
        copy = tile.dtype != stats.dtype or not transform.is_identity
        exps, logits, scratch = self._buffers(tile, stats.dtype, (True, copy, self.metrics))
        for r0, r1 in self._slabs(rows, cols):
            n = r1 - r0
            z = transform.apply_(self._view(logits, n, cols).copy_(tile[r0:r1])) if copy else tile[r0:r1]
            active = labels[r0:r1] != ignore_index
            st = stats[:, r0:r1]
            old_max = st[STAT_MAX]
            block_max = z.amax(dim=1)
            new_max = torch.maximum(old_max, block_max)
            shift = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)
            rescale = torch.exp(old_max - shift)
            e = torch.sub(z, shift[:, None], out=self._view(exps, n, cols)).exp_()
            local = labels[r0:r1] - vocab_start
            has_target = (local >= 0) & (local < cols)
            target = z.gather(1, local.clamp(0, cols - 1)[:, None]).squeeze(1)
            names = [STAT_MAX, STAT_SUMEXP, STAT_TARGET]
            values = [new_max, st[STAT_SUMEXP] * rescale + e.sum(1), torch.where(has_target, target, st[STAT_TARGET])]
            if self.metrics:
                work = self._view(scratch, n, cols)
                block_arg = z.argmax(dim=1)  # first maximum, like the kernel
                names += [STAT_ZEXP, STAT_SQEXP, STAT_ZSUM, STAT_ARGMAX]
                values += [st[STAT_ZEXP] * rescale + _weighted_exp_sum(e, z, work),
                           st[STAT_SQEXP] * rescale * rescale + torch.mul(e, e, out=work).sum(1),
                           st[STAT_ZSUM] + z.sum(1),
                           torch.where(block_max > old_max, (block_arg + vocab_start).to(st.dtype), st[STAT_ARGMAX])]
            st[names] = torch.where(active, torch.stack(values), st[names])

    def grad(self, tile, labels, lse, grad_logp, out, *, vocab_start, ignore_index, transform: LogitTransform,
             entropy=None, grad_entropy=None):
        rows, cols = tile.shape
        dtype = self.stats_dtype(tile.dtype)
        copy = tile.dtype != dtype or not transform.is_identity
        # p; the transformed logits (later the gradient, when it is not written into ``out`` directly); dz.
        probs, logits, derivative = self._buffers(tile, dtype, (True, copy or out.dtype != dtype,
                                                               copy and transform.softcap is not None))
        for r0, r1 in self._slabs(rows, cols):
            n = r1 - r0
            dz = None
            if copy:
                z = self._view(logits, n, cols).copy_(tile[r0:r1])
                z, dz = transform.apply_with_derivative_(z, None if derivative is None else
                                                         self._view(derivative, n, cols))
            else:
                z = tile[r0:r1]
            row_lse = lse[r0:r1].double()
            ignored = (labels[r0:r1] == ignore_index) | (row_lse == float("-inf"))
            # +inf makes p exactly 0 on rows without gradient, with no overflow in exp().
            row_lse = torch.where(ignored, torch.full_like(row_lse, float("inf")), row_lse)
            p = self._view(probs, n, cols)
            if z.dtype == torch.float64:
                torch.sub(z, row_lse[:, None], out=p)
            else:
                lse_hi, lse_lo = split_lse(row_lse)
                torch.sub(z, lse_hi[:, None], out=p).sub_(lse_lo[:, None])
            g = torch.where(ignored, torch.zeros_like(grad_logp[r0:r1]), grad_logp[r0:r1]).to(z.dtype)
            local = (labels[r0:r1] - vocab_start)[:, None]
            if grad_entropy is not None:  # the entropy term needs log p beside p: the plain formula
                log_p = p.clone()
                p.exp_()
                onehot = (torch.arange(cols, device=tile.device)[None, :] == local).to(z.dtype)
                ge = torch.where(ignored, torch.zeros_like(g), grad_entropy[r0:r1].to(z.dtype))[:, None]
                grad = g[:, None] * (onehot - p)
                grad = grad - torch.where(p > 0, ge * p * (log_p + entropy[r0:r1][:, None]), torch.zeros_like(p))
                grad = torch.where(ignored[:, None], torch.zeros_like(grad), grad if dz is None else grad * dz)
                out[r0:r1] = grad.to(out.dtype)
                continue
            p.exp_()
            # g * (onehot - p): -g p everywhere, then g (1 - p) at the target (the same roundings as the formula).
            has_target = (local >= 0) & (local < cols)
            index = local.clamp(0, cols - 1)
            at_target = g[:, None] * (1 - p.gather(1, index))
            direct = out.dtype == dtype  # the gradient straight into ``out`` (the tile itself, in place)
            grad = out[r0:r1] if direct else self._view(logits, n, cols)
            torch.mul(p, -g[:, None], out=grad)
            grad.scatter_(1, index, torch.where(has_target, at_target, grad.gather(1, index)))
            if dz is not None:
                grad.mul_(dz)
            if not direct:
                out[r0:r1] = grad


def _weighted_exp_sum(e: torch.Tensor, z: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Per-row sum of e * z, with 0 where e is 0: a -inf logit gives 0 * -inf = nan, mapped back to 0
    (a nan logit already makes the row's sum of exponentials nan)."""
    return torch.mul(e, z, out=work).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf")).sum(1)


def split_lse(lse: torch.Tensor):
    """``logsoftmax_gather.split_lse`` in PyTorch: float64 lse -> float32 (hi, lo), hi + lo = lse."""
    hi = lse.float()
    lo = torch.where(torch.isfinite(hi), (lse.double() - hi.double()).float(), torch.zeros_like(hi))
    return hi, lo


def rows_for(device: torch.device, backend: Optional[str] = None):
    """``backend`` 'triton' or 'torch'; None picks Triton wherever it can run."""
    if backend == "torch" or (backend is None and not triton_runs_on(device)):
        return TorchRows()
    return TritonRows()
