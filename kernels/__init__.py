"""Triton kernels of dpo-fast, installed as ``dpo_fast.kernels``.

Ground floor only: kernels and their launchers, no autograd and no import of
``dpo_fast``. One kernel family per module:

- ``logsoftmax_gather``: row kernels over a tile of logits (online log-sum-exp,
  target gather and metric statistics; the softmax gradient, in place).
- ``fused_linear_logps``: tl.dot kernels that never write logits to memory.

Every launcher launches through ``launch.launch``: on its tensors' CUDA device and that
device's current stream, not on whichever device happens to be current.
"""
