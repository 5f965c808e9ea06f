"""Which tokens count, and which sequence each belongs to.

Ignored tokens are dropped here, before any matmul: the paths see only the kept tokens,
grouped sequence by sequence. Sequence sums are taken by a padded gather and a row sum,
which is deterministic on every device (no atomics).
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch


@dataclass
class TokenLayout:
    labels_shape: torch.Size
    kept_index: torch.Tensor  # [n] flat positions of kept tokens, grouped by sequence
    kept_labels: torch.Tensor  # [n]
    num_sequences: int
    lengths: torch.Tensor  # [R] kept tokens per sequence (int64, on device)
    lengths_host: List[int]
    # Every token kept, already in sequence order (no packing ids to sort by): the kept rows are
    # the input rows themselves, so no gather (nor its backward scatter) is needed.
    identity: bool = False

    @property
    def num_kept(self) -> int:
        return self.kept_index.numel()

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """Kept-token values -> tensor shaped like the labels, zero where ignored."""
        if self.identity:
            return values.view(self.labels_shape)
        full = values.new_zeros(self.labels_shape.numel())
        return full.index_put((self.kept_index,), values).view(self.labels_shape)

    def sequence_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[n] kept-token values -> [R] per-sequence sums, in a fixed order."""
        # No early exit when no token is kept: the empty gather below keeps the sums in the
        # autograd graph, so a loss over a fully ignored batch still backpropagates (zeros).
        longest = max(self.lengths_host, default=0)
        starts = torch.cumsum(self.lengths, 0) - self.lengths
        offsets = torch.arange(longest, device=values.device)
        index = starts[:, None] + offsets[None, :]
        inside = offsets[None, :] < self.lengths[:, None]
        padded = values[index.clamp(max=self.num_kept - 1)]
        return torch.where(inside, padded, torch.zeros_like(padded)).sum(dim=1)

    def sequence_sum_fixed_order(self, values: torch.Tensor) -> torch.Tensor:
        """[n] -> [R] like :meth:`sequence_sum`, in an order fixed by each token's position in its sequence.

        A pairwise tree of elementwise adds: level by level, positions (2i, 2i + 1) are added.
        Which values meet depends on nothing but their positions, and the zeros that pad a
        sequence to the batch's longest add exactly, so a sequence's sum is bitwise the same
        whatever else is in the batch (a reduction kernel picks its order by shape and thread count).
        """
        longest = max(self.lengths_host, default=0)
        width = 1 << max(longest - 1, 0).bit_length() if longest else 1
        starts = torch.cumsum(self.lengths, 0) - self.lengths
        offsets = torch.arange(width, device=values.device)
        index = starts[:, None] + offsets[None, :]
        inside = offsets[None, :] < self.lengths[:, None]
        padded = values[index.clamp(min=0, max=max(self.num_kept - 1, 0))] if self.num_kept else \
            values.new_zeros(index.shape) + values.sum()
        level = torch.where(inside, padded, torch.zeros_like(padded))
        while level.shape[1] > 1:
            level = level[:, 0::2] + level[:, 1::2]
        return level[:, 0]

    def sequence_slices(self):
        """Host-side (start, end) of each sequence in the kept order."""
        start = 0
        for length in self.lengths_host:
            yield start, start + length
            start += length


def build_layout(labels: torch.Tensor, ignore_index: int, sequence_ids: Optional[torch.Tensor] = None,
                 cu_seqlens: Optional[torch.Tensor] = None, flags: Sequence[torch.Tensor] = (),
                 check: Optional[Callable[[List[int]], None]] = None,
                 num_sequences: Optional[int] = None) -> TokenLayout:
    """Labels [R, T] (a sequence per row) or [N] with ``sequence_ids`` / ``cu_seqlens`` (packed);
    ``num_sequences``: R for ``sequence_ids`` as the caller states it (else the largest id + 1).

    One host read, whatever the packing: the per-sequence lengths, with the device scalars
    ``flags`` (a caller's checks) in the same transfer. ``check`` gets the flags' values right
    after that read, before anything is sized by it; the kept positions then come from
    ``nonzero_static`` with the size known. Nothing before the read
    trusts the packing's values (``check`` judges them): ``cu_seqlens`` are clamped to [0, N]
    before they index, and ``sequence_ids``, whose count R = max + 1 is known only from the
    read, are counted into N slots (ids clamped to 0..N-1; R <= N once checked): all N counts
    travel with the largest id, and the first R are the lengths (memory O(N)). With the caller's
    ``num_sequences`` the ids are counted into R slots (clamped to 0..R-1, checked below R).
    """
    flat = labels.reshape(-1)
    n = flat.numel()
    kept_mask = flat != ignore_index
    ids = None
    head = []  # device values the layout reads before the lengths (the largest sequence id)
    if labels.dim() == 2:
        num_sequences = labels.shape[0]
        lengths = kept_mask.view(labels.shape).sum(1)
    elif cu_seqlens is not None:
        num_sequences = cu_seqlens.numel() - 1
        kept_before = torch.cat([kept_mask.new_zeros(1, dtype=torch.int64), kept_mask.cumsum(0)])
        bounds = cu_seqlens.to(flat.device, torch.int64).clamp(0, n)
        lengths = kept_before[bounds[1:]] - kept_before[bounds[:-1]]
    elif sequence_ids is not None:
        ids = sequence_ids.reshape(-1).to(torch.int64)
        # Without the caller's count: the largest id + 1, known after the read, at most N.
        slots = n if num_sequences is None else num_sequences
        lengths = torch.zeros(slots, dtype=torch.int64, device=flat.device)
        if n and slots:
            lengths.scatter_add_(0, ids.clamp(0, slots - 1), kept_mask.to(torch.int64))
            if num_sequences is None:
                head = [ids.max().reshape(1)]
    else:  # tokens without sequences: one pseudo-sequence holds them all
        num_sequences = 1
        lengths = kept_mask.sum().reshape(1)
    lengths = lengths.to(torch.int64)
    host = torch.cat(head + [lengths] + [f.reshape(1).to(lengths) for f in flags]).tolist()  # the host read
    if ids is not None and num_sequences is None:
        num_sequences = host[0] + 1 if head else 0
        host = host[len(head):]
    values, flags_host = host[:lengths.numel()], host[lengths.numel():]
    if check is not None:
        check(flags_host)
    lengths_host = values[:num_sequences]
    lengths = lengths[:num_sequences]
    identity = ids is None and sum(lengths_host) == n
    kept_index = torch.nonzero_static(kept_mask, size=sum(lengths_host)).squeeze(1)
    if ids is not None:
        order = torch.sort(ids[kept_index], stable=True).indices
        kept_index = kept_index[order]
    return TokenLayout(
        labels_shape=labels.shape,
        kept_index=kept_index,
        kept_labels=flat if identity else flat[kept_index],
        num_sequences=num_sequences,
        lengths=lengths,
        lengths_host=lengths_host,
        identity=identity,
    )
