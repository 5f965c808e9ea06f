"""Which tokens count, and which sequence each belongs to.

Ignored tokens are dropped here, before any matmul: the paths see only the kept tokens,
grouped sequence by sequence. Sequence sums are taken by a padded gather and a row sum,
which is deterministic on every device (no atomics).
"""

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class TokenLayout:
    labels_shape: torch.Size
    kept_index: torch.Tensor  # [n] flat positions of kept tokens, grouped by sequence
    kept_labels: torch.Tensor  # [n]
    num_sequences: int
    lengths: torch.Tensor  # [R] kept tokens per sequence (int64, on device)
    lengths_host: List[int]

    @property
    def num_kept(self) -> int:
        return self.kept_index.numel()

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """Kept-token values -> tensor shaped like the labels, zero where ignored."""
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

    def sequence_slices(self):
        """Host-side (start, end) of each sequence in the kept order."""
        start = 0
        for length in self.lengths_host:
            yield start, start + length
            start += length


def build_layout(labels: torch.Tensor, ignore_index: int, sequence_ids: Optional[torch.Tensor] = None,
                 cu_seqlens: Optional[torch.Tensor] = None) -> TokenLayout:
    """Labels [R, T] (a sequence per row) or [N] with ``sequence_ids`` / ``cu_seqlens`` (packed)."""
    flat = labels.reshape(-1)
    kept_mask = flat != ignore_index
    kept_index = kept_mask.nonzero().squeeze(1)
    if labels.dim() == 2:
        num_sequences = labels.shape[0]
        seq_of_kept = kept_index // labels.shape[1]
    elif cu_seqlens is not None:
        num_sequences = cu_seqlens.numel() - 1
        seq_of_kept = torch.searchsorted(cu_seqlens.to(kept_index.device, torch.int64), kept_index, right=True) - 1
    elif sequence_ids is not None:
        ids = sequence_ids.reshape(-1).to(torch.int64)
        num_sequences = int(ids.max().item()) + 1 if ids.numel() else 0
        seq_of_kept = ids[kept_index]
        order = torch.sort(seq_of_kept, stable=True).indices
        kept_index, seq_of_kept = kept_index[order], seq_of_kept[order]
    else:  # tokens without sequences: one pseudo-sequence holds them all
        num_sequences = 1
        seq_of_kept = torch.zeros_like(kept_index)
    lengths = torch.bincount(seq_of_kept, minlength=num_sequences)[:num_sequences]
    return TokenLayout(
        labels_shape=labels.shape,
        kept_index=kept_index,
        kept_labels=flat[kept_index],
        num_sequences=num_sequences,
        lengths=lengths,
        lengths_host=lengths.tolist(),
    )
