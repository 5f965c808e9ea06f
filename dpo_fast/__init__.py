"""dpo-fast: DPO losses and log-probs for LLMs without materializing [tokens x vocab] logits."""

from .api import (
    DPOLoss,
    dpo_loss,
    dpo_loss_from_logits,
    sequence_logps,
    sequence_logps_from_logits,
    token_logps,
    token_logps_from_logits,
)
from . import ops  # noqa: F401  (registers the torch.compile twins of the public functions)
from .losses import LOSSES
from .objective import DPOOutput, LossConfig

__version__ = "0.1.0"

LOSS_TYPES = tuple(LOSSES)

__all__ = [
    "DPOLoss", "DPOOutput", "LossConfig", "LOSS_TYPES", "dpo_loss", "dpo_loss_from_logits", "sequence_logps",
    "sequence_logps_from_logits", "token_logps", "token_logps_from_logits",
]
