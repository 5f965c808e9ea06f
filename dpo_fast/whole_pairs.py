"""The whole-pair route (6NHV): a chunk of complete pairs has its logits computed once.

When the loss of a pair depends on that pair alone, a chunk's full-vocabulary logits are
computed once (``chunked.Workspace``), the pair losses and their gradients are taken inside the
chunk, and the tile becomes the softmax gradient before the two gradient GEMMs; across chunks
grad_weight is summed in float32. A pair longer than a chunk runs in pieces: unit gradients
summed per group of pieces into float32 ``[V, H]`` buffers and scaled once its loss is known, or
its gradient rows kept whole and its GEMMs run then, scaled by ``alpha`` (``planner.Chunk``).
Which chunks, and their sizes, come from ``planner.py``, priced by ``cost_model.whole_pair_route``.
"""

from typing import Callable, List, Sequence, Tuple

import torch

from . import cost_model as cm
from .chunked import Workspace, _accumulator_dtype
from .function import refuse_second_order
from .gemm import addmm_fp32, mm_float32, scaled_mm, write_fp32
from .planner import Chunk
from .precision import ieee_float32_matmul
from .rows import HAS_TRITON, KEPT_ONLY, finish_stats, init_stats
from .transform import LogitTransform


def scale_by_grad_loss(tensors, grad_loss: torch.Tensor) -> None:
    """Each tensor ``*= grad_loss`` in place (no second copy), with no host read of ``grad_loss``.

    On CUDA a Triton kernel reads the device scalar itself and moves no bytes when it is 1
    (``loss.backward()``): one launch per tensor. Elsewhere an in-place multiply. The saved
    tensors' version counters are left alone (``.data``): the caller records the scale it
    applied, so a later backward through a retained graph rescales instead of failing.
    """
    tensors = [t.data for t in tensors if t is not None and t.numel()]
    if tensors and tensors[0].device.type == "cuda" and HAS_TRITON:
        from dpo_fast.kernels.scale import scale_unless_one

        scale = grad_loss.detach().reshape(1).float()
        for t in tensors:
            if t.is_contiguous():  # the kernel walks the elements flat
                scale_unless_one(t, scale)
            else:
                t.mul_(scale)
        return
    for t in tensors:
        t.mul_(grad_loss.detach().to(torch.float32))



class PairChunkLoss(torch.autograd.Function):
    """Loss over whole pairs, logits computed once per chunk; gradients made in forward (6NHV).

    For a chunk of whole pairs: logits ``z = h W^T`` (float32 tile, 2 t H V FLOPs), per-token
    log-probs, the chunk's pair losses ``L_p(S_c, S_r)`` and ``g = dL/dS`` by autograd on
    ``[pairs]`` tensors, the tile turned into ``g (onehot - softmax(z)) dz`` (16-bit for 16-bit
    inputs), then ``grad_hidden = tile W`` and ``grad_weight += tile^T h`` (4 t H V). The
    sum over chunks of a 16-bit head's grad_weight runs in a float32 ``[V, H]`` accumulator
    cast once (a float32 head sums into grad_weight itself); a single chunk writes it with
    one GEMM. A pair larger than a chunk (``Chunk.split``) runs in pieces with ``g = 1``:
    its chosen and rejected unit gradients wait in two float32 ``[V, H]`` buffers (and
    float32 grad_hidden rows) until the pair's loss gives ``g_c``, ``g_r``; the sum is
    linear in ``g``, so this is exact. Where the chunk carries ``rejected_scale = k``
    (``g_r = k g_c`` whatever the sums: a single-margin loss, ``losses.rejected_gradient_ratio``)
    the rejected pieces are summed into the chosen side's buffer with ``alpha = k`` and the merge
    scales that one buffer by ``g_c`` (exact for ``g_c = 0`` too). ``Chunk.group_tokens``: the unit
    GEMMs run once per group of pieces, on its gradient rows gathered in one buffer.
    ``Chunk.keep_gradient``: no unit buffers; the pair's gradient rows wait whole and its GEMMs
    run with the pair's scales once they are known (:meth:`_PairRun.kept_pair`). Memory: what
    ``planner.plan_loss`` priced.

    ``chunk_loss(first, last, chosen, rejected, ref_chosen, ref_rejected)`` returns pairs
    ``[first, last)``'s share of the batch loss, differentiable in its four ``[pairs]``
    arguments. Outputs: the loss and the per-token statistics (detached). Gradients reach
    hidden, weight, bias and the reference log-probs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_chosen, ref_rejected, rows, transform: LogitTransform,
                spans: Sequence[Tuple[int, int]], lengths: torch.Tensor, chunks: Sequence[Chunk],
                chunk_loss: Callable):
        """``hidden`` rows are kept tokens ordered [chosen_0 .. chosen_B-1, rejected_0 ..]; ``spans[s]`` is
        the (start, end) of sequence ``s`` in that order (host ints) and ``lengths`` the same lengths on
        the device."""
        # The tiles' precision is chosen here: no autocast, and a float32 head in IEEE float32 (precision.py).
        with torch.autocast(hidden.device.type, enabled=False), ieee_float32_matmul(hidden.dtype):
            run = _PairRun(hidden, weight, bias, labels, (ref_chosen, ref_rejected), rows, transform, spans,
                           lengths, chunks, chunk_loss, ctx.needs_input_grad)
            grads = run.run()
        ctx.save_for_backward(*grads)
        ctx.applied = None  # the grad_loss the first backward scaled them by, in place
        ctx.mark_non_differentiable(run.stats)
        return run.loss, run.stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        refuse_second_order("dpo_loss (whole-pair route)")  # the saved gradients carry no graph
        grads = ctx.saved_tensors
        if ctx.applied is None:
            # In place (no second copy); free when grad_loss is 1, the common loss.backward().
            scale_by_grad_loss(grads, grad_loss)
            ctx.applied = grad_loss.detach().clone()
        else:
            # A later backward through a retained graph (retain_graph=True, gradcheck): the gradients
            # were scaled by the first grad_loss; this one gets new tensors (the first call's results
            # stay as they were returned). One host read, on this rare path only.
            if bool((ctx.applied == 0).any()):
                raise RuntimeError("dpo_loss (whole-pair route): a second backward through a retained graph after a "
                                   "first backward with grad_loss 0 cannot be recovered; call dpo_loss again")
            ratio = grad_loss.detach() / ctx.applied
            grads = [None if g is None else g * ratio.to(g.dtype) for g in grads]
        grad_hidden, grad_weight, grad_bias, grad_ref_c, grad_ref_r = grads
        return grad_hidden, grad_weight, grad_bias, None, grad_ref_c, grad_ref_r, None, None, None, None, None, None


class _PairRun:
    """State of one PairChunkLoss forward: the workspace and the gradients being summed."""

    def __init__(self, hidden, weight, bias, labels, refs, rows, transform, spans, lengths, chunks, chunk_loss,
                 needs):
        self.hidden, self.weight, self.bias, self.labels = hidden, weight, bias, labels
        self.refs, self.rows, self.transform, self.spans, self.chunk_loss = refs, rows, transform, spans, chunk_loss
        self.lengths = lengths  # per sequence, on the device (spans holds the same on the host)
        # Split pairs first: the first one's merged weight gradient becomes the running sum.
        self.chunks = sorted(chunks, key=lambda c: not c.split)
        # grad_weight written by one GEMM in the head's dtype: one chunk of whole pairs, or one kept pair
        # with one scale (cost_model.whole_pair_route prices the same)
        self.single_gemm = len(chunks) == 1 and (not chunks[0].split or (chunks[0].keep_gradient
                                                                         and chunks[0].rejected_scale is not None))
        self.fused_merge = HAS_TRITON and rows.name == "triton"  # one-pass merge kernel (kernels/scale.py)
        self.need_hidden, self.need_weight, self.need_bias = needs[:3]
        self.need_refs = needs[4:6]
        self.pairs = len(spans) // 2
        device, n, vocab = hidden.device, hidden.shape[0], weight.shape[0]
        self.stats_dtype = rows.stats_dtype(hidden.dtype)
        self.sum_dtype = _accumulator_dtype(weight.dtype)
        self.stats = init_stats(n, device, self.stats_dtype)
        self.loss = torch.zeros((), dtype=self.stats_dtype, device=device)
        self.grad_hidden = torch.empty_like(hidden) if self.need_hidden else None  # every row is written
        self.grad_bias = torch.zeros(vocab, dtype=self.sum_dtype, device=device) if self.need_bias else None
        self.grad_refs = [torch.zeros(self.pairs, dtype=self.stats_dtype, device=device) if need else None
                          for need in self.need_refs]
        self.grad_weight = None  # the float32 sum (or, for one chunk of whole pairs, the result itself)
        # One workspace for the largest chunk (or piece), reused by every other; kept and grouped split pairs
        # write their gradient rows into a buffer of their own, so the gradient tile serves the others only.
        tiled = [_chunk_tokens(c, spans) for c in chunks if not c.keep_gradient and not c.group_tokens]
        self.workspace = Workspace(max(_chunk_tokens(c, spans) for c in chunks) * vocab, hidden.dtype, device,
                                   with_gradient=bool(tiled), gradient_numel=max(tiled, default=0) * vocab)

    def run(self):
        """Every chunk, then the gradients to save."""
        for i, chunk in enumerate(self.chunks):
            if chunk.keep_gradient:
                self.kept_pair(chunk)
            elif chunk.split:
                self.split_pair(chunk, last=i == len(self.chunks) - 1)
            else:
                self.whole_pairs(chunk)
        return self.finish()

    # -- helpers ------------------------------------------------------------------------

    def _logps(self, h, labels, segments):
        """Logits of ``h``, folded into the statistics of the kept rows ``segments`` (host ranges)."""
        logits = self.workspace.logits(h, self.weight, self.bias)
        chunk_stats = init_stats(h.shape[0], h.device, self.stats_dtype)
        self.rows.stats(logits, labels, chunk_stats, vocab_start=0, ignore_index=KEPT_ONLY, transform=self.transform)
        offset = 0
        for start, end in segments:
            self.stats[:, start:end] = chunk_stats[:, offset:offset + end - start]
            offset += end - start
        return logits, finish_stats(chunk_stats, labels, self.weight.shape[0], ignore_index=KEPT_ONLY)

    def _gradient_tile(self, logits, labels, lse, grad_logps, out=None):
        """The tile's softmax gradient for ``grad_logps``, written into ``out`` (rows of a kept or grouped
        pair's buffer) or the workspace's gradient tile (the logits tile itself unless inputs are 16-bit)."""
        tile = self.workspace.gradient_tile(logits) if out is None else out
        self.rows.grad(logits, labels, lse, grad_logps.to(self.stats_dtype).contiguous(), tile, vocab_start=0,
                       ignore_index=KEPT_ONLY, transform=self.transform)
        return tile

    def _add_weight_grad(self, a, b, alpha: float = 1.0):
        """grad_weight (+)= alpha a @ b: the first product writes the float32 sum (beta=0, no zero-fill)."""
        if self.single_gemm:  # one GEMM sums every token in float32 inside cuBLAS
            self.grad_weight = torch.mm(a, b) if alpha == 1.0 else scaled_mm(a, b, alpha, a.new_empty(
                a.shape[0], b.shape[1]))
        elif self.grad_weight is None:
            self.grad_weight = write_fp32(self._new_weight_sum(), a, b, alpha)
        else:
            addmm_fp32(self.grad_weight, a, b, alpha)

    def _new_weight_sum(self) -> torch.Tensor:
        return torch.empty(self.weight.shape, dtype=self.sum_dtype, device=self.weight.device)

    def _pair_loss(self, first, last, chosen, rejected):
        """Loss share of pairs [first, last) and its gradients to (chosen, rejected) sums; reference grads kept."""
        refs = [None if r is None else r[first:last].detach().requires_grad_(need)
                for r, need in zip(self.refs, self.need_refs)]
        chosen, rejected = chosen.detach().requires_grad_(), rejected.detach().requires_grad_()
        with torch.enable_grad():
            part = self.chunk_loss(first, last, chosen, rejected, *refs)
            wrt = [chosen, rejected] + [r for r, need in zip(refs, self.need_refs) if need]
            grads = torch.autograd.grad(part, wrt, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads)]
        for target, need in zip(self.grad_refs, self.need_refs):
            if need:
                target[first:last] = grads.pop(2).to(target.dtype)
        self.loss += part.detach().to(self.loss.dtype)
        return grads[0], grads[1]

    # -- the two kinds of chunk ----------------------------------------------------------

    def whole_pairs(self, chunk: Chunk):
        spans, pairs = self.spans, self.pairs
        c0, c1 = spans[chunk.first][0], spans[chunk.last - 1][1]
        r0, r1 = spans[pairs + chunk.first][0], spans[pairs + chunk.last - 1][1]
        contiguous = c1 == r0  # every pair of the batch in one chunk: its rows are one range, no copy
        if contiguous:
            h, labels = self.hidden[c0:r1], self.labels[c0:r1]
        else:
            h = torch.cat([self.hidden[c0:c1], self.hidden[r0:r1]])
            labels = torch.cat([self.labels[c0:c1], self.labels[r0:r1]])
        logits, finished = self._logps(h, labels, [(c0, c1), (r0, r1)])
        lengths = [e - s for s, e in spans[chunk.first:chunk.last]] + \
                  [e - s for s, e in spans[pairs + chunk.first:pairs + chunk.last]]
        sums = _segment_sums(finished.logps.detach(), lengths)
        g_c, g_r = self._pair_loss(chunk.first, chunk.last, sums[:len(sums) // 2], sums[len(sums) // 2:])
        # Per-token upstream gradient: each sequence's dL/dS on its tokens (device lengths: no host sync).
        counts = torch.cat([self.lengths[chunk.first:chunk.last], self.lengths[pairs + chunk.first:pairs + chunk.last]])
        grad_logps = torch.repeat_interleave(torch.cat([g_c, g_r]).to(self.stats_dtype), counts,
                                             output_size=h.shape[0])
        tile = self._gradient_tile(logits, labels, finished.lse, grad_logps)
        if self.need_weight:
            self._add_weight_grad(tile.t(), h)
        if self.need_bias:
            self.grad_bias += tile.sum(dim=0, dtype=self.sum_dtype)
        if self.need_hidden:
            # One GEMM reads the weight once; chosen and rejected rows are then copied to their places
            # through the chunk's gathered rows (free after the weight GEMM): 4 t H bytes, not another V H.
            if contiguous:
                torch.mm(tile, self.weight, out=self.grad_hidden[c0:r1])
            else:
                torch.mm(tile, self.weight, out=h)
                nc = c1 - c0
                self.grad_hidden[c0:c1] = h[:nc]
                self.grad_hidden[r0:r1] = h[nc:]

    def split_pair(self, chunk: Chunk, last: bool = False):
        """One pair in pieces (unit gradients), merged with the pair's scales. ``last``: no chunk after it
        adds to grad_weight, so the merge writes the head's dtype directly (no separate cast).

        ``chunk.rejected_scale = k`` (``g_r = k g_c``): one weight buffer. Its owner is the first side
        with tokens; when that is the chosen side the rejected pieces add ``k`` times their product
        (GEMM alpha) and the buffer is scaled by ``g_c``, otherwise it holds the rejected side alone,
        scaled by ``g_r``."""
        p, spans, vocab = chunk.first, self.spans, self.weight.shape[0]
        sides = (spans[p], spans[self.pairs + p])
        device, H = self.hidden.device, self.hidden.shape[1]
        tokens = sum(e - s for s, e in sides)
        unit_hidden = torch.empty(tokens, H, dtype=self.sum_dtype, device=device) if self.need_hidden else None
        unit_weight = [None, None]  # written by each side's first piece (beta=0)
        merged = chunk.rejected_scale is not None
        owner = 0 if sides[0][1] > sides[0][0] else 1  # the side whose first piece writes the merged buffer
        unit_bias = [torch.zeros(vocab, dtype=self.sum_dtype, device=device) if self.need_bias else None
                     for _ in sides]
        # Gradient rows of a group of pieces wait in one buffer (``Chunk.group_tokens``); without groups
        # a group is one piece and its rows are the workspace's gradient tile.
        group_limit = chunk.group_tokens or chunk.piece_tokens
        group_rows = None
        if chunk.group_tokens:
            longest = max((g1 - g0 for s0, s1 in sides for g0, g1 in _even_pieces(s0, s1, group_limit)), default=0)
            group_rows = torch.empty(longest, vocab, dtype=self.hidden.dtype, device=device)
        sums, offset = [], 0
        for side, (s0, s1) in enumerate(sides):
            total = torch.zeros((), dtype=self.stats_dtype, device=device)
            for t0, t1 in _even_pieces(s0, s1, group_limit):  # a group: its pieces, then its gradient GEMMs
                for p0, p1 in _even_pieces(t0, t1, chunk.piece_tokens):
                    labels = self.labels[p0:p1]
                    logits, finished = self._logps(self.hidden[p0:p1], labels, [(p0, p1)])
                    total = total + finished.logps.detach().sum()
                    tile = self._gradient_tile(logits, labels, finished.lse, torch.ones_like(finished.logps),
                                               None if group_rows is None else group_rows[p0 - t0:p1 - t0])
                if group_rows is not None:
                    tile = group_rows[:t1 - t0]
                h = self.hidden[t0:t1]
                if self.need_hidden:
                    rows_out = unit_hidden[offset:offset + t1 - t0]
                    if tile.dtype == rows_out.dtype:
                        torch.mm(tile, self.weight, out=rows_out)
                    else:
                        mm_float32(tile, self.weight, rows_out)
                if self.need_weight:
                    slot = owner if merged else side
                    alpha = chunk.rejected_scale if merged and side != owner else 1.0
                    if unit_weight[slot] is None:
                        unit_weight[slot] = write_fp32(self._new_weight_sum(), tile.t(), h)
                    else:
                        addmm_fp32(unit_weight[slot], tile.t(), h, alpha)
                if self.need_bias:
                    unit_bias[side] += tile.sum(dim=0, dtype=self.sum_dtype)
                offset += t1 - t0
            sums.append(total.reshape(1))
        g = self._pair_loss(p, p + 1, sums[0], sums[1])
        offset = 0
        for side, (s0, s1) in enumerate(sides):
            scale = g[side].to(self.sum_dtype)
            if self.need_hidden:  # scaled and cast in one pass
                torch.mul(unit_hidden[offset:offset + s1 - s0], scale, out=self.grad_hidden[s0:s1])
            if self.need_bias:
                self.grad_bias += unit_bias[side] * scale
            offset += s1 - s0
        if self.need_weight:
            out_dtype = self.weight.dtype if last else self.sum_dtype
            self.grad_weight = _merge_scaled(unit_weight, [g[0].to(self.sum_dtype), g[1].to(self.sum_dtype)],
                                             self.grad_weight, out_dtype, self.fused_merge)
            del unit_weight

    def kept_pair(self, chunk: Chunk):
        """One pair in pieces whose gradient rows wait whole (``Chunk.keep_gradient``), then its gradient
        GEMMs with the pair's scale as ``alpha``: no ``[V, H]`` unit sum, merge or scale pass.

        Each piece's gradient pass writes ``dL/dz`` for ``g = 1`` on the chosen side and ``g = k`` on
        the rejected side where ``g_r = k g_c`` is known (``rejected_scale``), into its rows of one
        ``[tokens, V]`` buffer in the input dtype. Once the pair's loss gives ``g``, a single-scale pair
        runs one grad_weight and one grad_hidden GEMM over all its rows (``alpha = g`` of the side whose
        rows are unscaled), otherwise one per side. ``alpha`` is a host number for cuBLAS: the two
        scales are read to the host, one synchronization per kept pair (its GEMMs wait on its loss anyway).
        """
        p, spans, vocab = chunk.first, self.spans, self.weight.shape[0]
        sides = (spans[p], spans[self.pairs + p])
        device = self.hidden.device
        tokens = sum(e - s for s, e in sides)
        merged = chunk.rejected_scale is not None
        owner = 0 if sides[0][1] > sides[0][0] else 1  # the side whose rows carry g = 1 when merged
        gradient = torch.empty(tokens, vocab, dtype=self.hidden.dtype, device=device)
        sums, offset = [], 0
        for side, (s0, s1) in enumerate(sides):
            total = torch.zeros((), dtype=self.stats_dtype, device=device)
            factor = chunk.rejected_scale if merged and side != owner else 1.0
            for t0, t1 in _even_pieces(s0, s1, chunk.piece_tokens):
                h, labels = self.hidden[t0:t1], self.labels[t0:t1]
                logits, finished = self._logps(h, labels, [(t0, t1)])
                total = total + finished.logps.detach().sum()
                self._gradient_tile(logits, labels, finished.lse, torch.full_like(finished.logps, factor),
                                    gradient[offset:offset + t1 - t0])
                offset += t1 - t0
            sums.append(total.reshape(1))
        g = self._pair_loss(p, p + 1, sums[0], sums[1])
        scales = torch.cat([g[0], g[1]]).double().tolist()  # the host read
        ranges, offset = [], 0  # (side, start, end, first row in the gradient buffer) of each side with tokens
        for side, (s0, s1) in enumerate(sides):
            if s1 > s0:
                ranges.append((side, s0, s1, offset))
            offset += s1 - s0
        if merged:
            alpha = scales[owner]
            contiguous = len(ranges) == 1 or ranges[0][2] == ranges[1][1]
            start, end = ranges[0][1], ranges[-1][2]
            h = (self.hidden[start:end] if contiguous
                 else torch.cat([self.hidden[s0:s1] for _, s0, s1, _ in ranges]))
            if self.need_weight:
                self._add_weight_grad(gradient.t(), h, alpha)
            if self.need_bias:
                self.grad_bias += gradient.sum(dim=0, dtype=self.sum_dtype) * alpha
            if self.need_hidden:
                if contiguous:
                    scaled_mm(gradient, self.weight, alpha, self.grad_hidden[start:end])
                else:  # into the gathered rows (free after the weight GEMM), then to their places
                    scaled_mm(gradient, self.weight, alpha, h)
                    for _, s0, s1, at in ranges:
                        self.grad_hidden[s0:s1] = h[at:at + s1 - s0]
            return
        for side, s0, s1, at in ranges:
            alpha, rows = scales[side], gradient[at:at + s1 - s0]
            if self.need_weight:
                self._add_weight_grad(rows.t(), self.hidden[s0:s1], alpha)
            if self.need_bias:
                self.grad_bias += rows.sum(dim=0, dtype=self.sum_dtype) * alpha
            if self.need_hidden:
                scaled_mm(rows, self.weight, alpha, self.grad_hidden[s0:s1])

    def finish(self):
        grad_weight = self.grad_weight
        if grad_weight is not None and grad_weight.dtype != self.weight.dtype:
            grad_weight = grad_weight.to(self.weight.dtype)  # the float32 sum, cast once
        grad_bias = None if self.grad_bias is None else self.grad_bias.to(self.bias.dtype)
        return self.grad_hidden, grad_weight, grad_bias, *self.grad_refs


def _merge_scaled(units, scales, running, out_dtype, fused: bool):
    """``g_c A + g_r B (+ running)`` (scalars stay on the device: no host read), in ``out_dtype``.

    Written into the running sum, else into A, else (``out_dtype`` narrower than the float32
    sums: the last weight work of the call) into a new tensor of the head's dtype, so the
    merge is the cast. ``fused``: one pass of the Triton kernel (reads A, B and the running
    sum once, writes once); otherwise PyTorch ops in place.
    """
    units = [(u, g) for u, g in zip(units, scales) if u is not None]
    if not units:
        return running
    (a, g_a), b_pair = units[0], (units[1] if len(units) > 1 else (None, None))
    b, g_b = b_pair
    if out_dtype != a.dtype:
        out = torch.empty(a.shape, dtype=out_dtype, device=a.device)
    else:
        out = running if running is not None else a
    if fused:
        _merge_kernel(out, a, g_a, b, g_b, running)
        return out
    merged = a.mul_(g_a)
    if b is not None:
        merged.addcmul_(b, g_b)
    if running is not None:
        merged = running.add_(merged) if out is running else merged.add_(running)
    if out is not merged:
        out.copy_(merged)
    return out


def _merge_kernel(out, a, g_a, b, g_b, running):
    """The Triton launch of :func:`_merge_scaled` (a module function: benchmarks/trace.py counts it)."""
    from dpo_fast.kernels.scale import merge_scaled

    merge_scaled(out, a, g_a.reshape(1), b, None if g_b is None else g_b.reshape(1), running)


def _even_pieces(start: int, end: int, limit: int):
    """[start, end) cut into the pieces ``cost_model.even_pieces`` prices (the fewest of at most ``limit``
    rows, of equal size within one row), as (start, end) ranges."""
    for size in cm.even_pieces(end - start, limit):
        yield start, start + size
        start += size


def _chunk_tokens(chunk: Chunk, spans) -> int:
    """Rows of the largest logits tile of ``chunk``."""
    pairs = len(spans) // 2
    tokens = sum(e - s for s, e in spans[chunk.first:chunk.last]) + \
        sum(e - s for s, e in spans[pairs + chunk.first:pairs + chunk.last])
    if not chunk.split:
        return tokens
    sides = (spans[chunk.first], spans[pairs + chunk.first])
    group_limit = chunk.group_tokens or chunk.piece_tokens
    return max((p1 - p0 for s0, s1 in sides for t0, t1 in _even_pieces(s0, s1, group_limit)
                for p0, p1 in _even_pieces(t0, t1, chunk.piece_tokens)), default=0)


def _segment_sums(values: torch.Tensor, lengths: List[int]) -> torch.Tensor:
    """Sums of consecutive segments of ``values`` (host ``lengths``), in a fixed order."""
    parts = torch.split(values, lengths)
    return torch.stack([part.sum() for part in parts]) if parts else values.new_zeros(0)
