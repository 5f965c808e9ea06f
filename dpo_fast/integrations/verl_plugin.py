"""verl's ``verl.plugins`` entry point: ``import verl`` loads this module in every worker.

It calls :func:`dpo_fast.integrations.verl.patch_verl` only when the environment has
``DPO_FAST_VERL=1`` (``DPO_FAST_IMPL`` may name the impl); otherwise it does nothing, so that
installing dpo-fast never changes verl's numbers by itself. verl logs a failing plugin at debug
level only, so a failure here is also reported as a warning before it is raised.
"""

import os
import warnings

ENV_SWITCH = "DPO_FAST_VERL"


def activate_from_env() -> bool:
    """patch_verl() when ``DPO_FAST_VERL=1``; returns whether it patched."""
    value = os.environ.get(ENV_SWITCH, "").strip()
    if value in ("", "0"):
        return False
    if value != "1":
        warnings.warn(f"dpo-fast: {ENV_SWITCH}={value!r} is neither '1' nor '0'; verl is left unpatched")
        return False
    try:
        from .verl import patch_verl

        patch_verl(impl=os.environ.get("DPO_FAST_IMPL", "auto"))
    except Exception as error:
        warnings.warn(f"dpo-fast: {ENV_SWITCH}=1 but patching verl failed, verl runs its own kernel: {error!r}")
        raise
    return True


activate_from_env()
