"""Float32 matmul policy: a float32 head is multiplied in IEEE float32 on every path.

cuBLAS honours torch's global TF32 switch (``torch.backends.cuda.matmul.allow_tf32``,
``torch.set_float32_matmul_precision("high")``, Hugging Face ``tf32=True``); with it on, a
float32 head's logits carry TF32's 10-bit operands: ~1e-3 nats per token, hundreds of times
float32's error. dpo-fast turns the switch off around its own float32 GEMMs and restores it
after (:func:`ieee_float32_matmul`); the fused kernels ask ``tl.dot`` for ``"ieee"``
(``kernels/fused_linear_logps.FLOAT32_DOT_PRECISION``). 16-bit heads are unaffected (their
products are exact in float32 either way).

The switch is process-wide. Entering is reference-counted under a lock: the first caller saves
the user's setting and turns TF32 off, the last one out restores it, so concurrent calls from
several threads restore the user's value, not each other's. While a call runs, float32 GEMMs
of other threads run in IEEE float32 too.
"""

import contextlib
import threading

import torch

_lock = threading.Lock()
_depth = 0
_restore = None  # how to put the user's setting back, set by the first caller in


def _matmul_backend():
    return torch.backends.cuda.matmul


def _has_new_api() -> bool:
    # torch >= 2.9: fp32_precision ("ieee"/"tf32"/"none"). Reading the legacy allow_tf32 raises there
    # once a user set the new API, so the new one is read whenever it exists.
    return hasattr(_matmul_backend(), "fp32_precision")


def tf32_enabled() -> bool:
    """Whether cuBLAS may run float32 GEMMs in TF32 now (torch's global switch)."""
    if _has_new_api():
        return _matmul_backend().fp32_precision == "tf32"
    return bool(_matmul_backend().allow_tf32)


def _turn_off():
    """Turn TF32 off; return a function that restores the setting found."""
    matmul = _matmul_backend()
    if not _has_new_api():
        matmul.allow_tf32 = False
        return lambda: setattr(matmul, "allow_tf32", True)
    try:  # set through the legacy API: there, "high"/"medium"; restoring it keeps both APIs consistent
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the user set the new API only (torch calls that a mix): restore exactly that
        legacy = None
    saved = matmul.fp32_precision
    # The legacy setter sets both APIs' state, so every reader inside sees "off" without a mix error.
    matmul.allow_tf32 = False
    if legacy is not None and legacy != "highest":
        return lambda: torch.set_float32_matmul_precision(legacy)
    return lambda: setattr(matmul, "fp32_precision", saved)


@contextlib.contextmanager
def ieee_float32_matmul(dtype: torch.dtype):
    """Within the block, float32 GEMMs of ``dtype`` operands run in IEEE float32 (a no-op for other dtypes)."""
    global _depth, _restore
    if dtype != torch.float32:
        yield
        return
    with _lock:
        if _depth == 0:
            _restore = _turn_off() if tf32_enabled() else None
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _restore is not None:
                restore, _restore = _restore, None
                restore()
