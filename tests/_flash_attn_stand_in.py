"""A plain-torch stand-in for the few ``flash_attn`` helpers OpenRLHF imports at module import.

flash-attn builds CUDA code on install, so a CPU machine cannot have it. OpenRLHF's
``ring_attn_utils`` imports ``flash_attn.bert_padding`` (``index_first_axis``, ``pad_input``,
``unpad_input``, ``rearrange``) and ``flash_attn.utils.distributed.all_gather``; its packed-sample
path calls the padding helpers, reproduced here after flash-attn's own definitions. The ring
all-gather is not (no ring-attention group on one CPU process). ``flash_attn.ops`` stays absent,
so OpenRLHF's ``log_probs_from_logits`` takes its torch branch.
"""

import importlib.machinery
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F


def index_first_axis(values, indices):
    return values.reshape(values.shape[0], -1)[indices].reshape(-1, *values.shape[1:])


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, int(seqlens.max()), seqlens


def pad_input(hidden_states, indices, batch, seqlen):
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_put((indices,), hidden_states)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])


def _all_gather(*args, **kwargs):
    raise NotImplementedError("the flash_attn stand-in has no ring-attention all_gather")


def install() -> bool:
    """Put the stand-in in sys.modules unless the real flash_attn imports; returns whether it did."""
    if importlib.util.find_spec("flash_attn") is not None:
        return False
    from einops import rearrange

    root = types.ModuleType("flash_attn")
    # Found by importlib.util.find_spec (transformers asks), but with no distribution metadata, so
    # transformers still counts flash-attn as not installed.
    root.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.index_first_axis, padding.pad_input, padding.unpad_input = index_first_axis, pad_input, unpad_input
    padding.rearrange = rearrange
    utils = types.ModuleType("flash_attn.utils")
    distributed = types.ModuleType("flash_attn.utils.distributed")
    distributed.all_gather = _all_gather
    root.bert_padding, root.utils, utils.distributed = padding, utils, distributed
    sys.modules.update({"flash_attn": root, "flash_attn.bert_padding": padding, "flash_attn.utils": utils,
                        "flash_attn.utils.distributed": distributed})
    return True
