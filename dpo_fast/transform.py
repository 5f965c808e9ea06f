"""Logit post-processing shared by every path: scale, then softcap, then temperature.

This is the order Hugging Face models apply (Cohere's ``logit_scale``, Gemma-2's
``final_logit_softcapping``), followed by the trainer's sampling temperature. The
Triton kernels carry the same three numbers into registers (``kernels/``).
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class LogitTransform:
    scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None and self.temperature == 1.0

    def kernel_args(self) -> dict:
        """Keyword arguments for the row kernels in ``dpo_fast.kernels``."""
        return dict(scale=self.scale, softcap=self.softcap, inv_temperature=self.inv_temperature)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """z = softcap * tanh(logits * scale / softcap) / temperature, differentiable."""
        z = logits * self.scale if self.scale != 1.0 else logits
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature if self.temperature != 1.0 else z

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` in place on a float buffer (the same operations in the same order)."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.temperature != 1.0:
            z.div_(self.temperature)
        return z

    def apply_with_derivative_(self, z: torch.Tensor, dz: torch.Tensor):
        """(z, dz/dlogits) elementwise, in place, for hand-written backward passes: ``z`` holds the logits
        and becomes the transformed logits; the derivative ``scale (1 - t^2) / temperature`` is written into
        ``dz`` (a buffer like ``z``) under a softcap, else it is the constant ``scale / temperature`` (None
        when 1). The operations of :meth:`apply`; a multiply or divide by 1 is skipped (exact anyway)."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            t = z.div_(self.softcap).tanh_()
            torch.mul(t, t, out=dz).neg_().add_(1).mul_(self.scale).div_(self.temperature)
            return t.mul_(self.softcap).div_(self.temperature), dz
        if self.temperature != 1.0:
            z.div_(self.temperature)
        constant = self.scale / self.temperature
        return z, (None if constant == 1.0 else constant)
