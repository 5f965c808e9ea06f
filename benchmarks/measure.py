"""Measure one method on one case: warm-up, peak memory, error against the oracle, timings.

Order matters: the warm-up call compiles and allocates persistent workspaces (cuBLAS,
torch.compile caches) so they are not charged to the loss; the memory call runs once
from a clean state with no gradients held, and its loss and gradients are scored
against the float64 oracle; the timed calls come last.

"forward" is the training forward: the loss with autograd recording (for Liger, whose
forward also computes the gradients, it is most of the work). "forward+backward" adds
``loss.backward()`` into fresh ``.grad`` tensors.
"""

import gc
import math
import traceback

import torch

from .oracle import Oracle, oracle_sequence_logps
from .timing import peak_for, sync, time_ms


def relative_max_error(value, expected) -> float:
    if value is None:
        return math.nan
    scale = float(expected.abs().max())
    err = float((value.to(expected.dtype) - expected).abs().max())
    return err / scale if scale > 0 else err


def _logps_error(inputs, oracle) -> float:
    got = getattr(inputs, "sequence_logps", None)
    if got is None:
        return math.nan
    if getattr(oracle, "sequence_logps", None) is None:  # computed once per case, float64
        oracle.sequence_logps = oracle_sequence_logps(inputs.hidden.detach(), inputs.weight.detach(), inputs.labels,
                                                      inputs.transform)
    return float((got.double().reshape(-1) - oracle.sequence_logps.reshape(-1)).abs().max())


def _clear_grads(inputs):
    inputs.hidden.grad = None
    inputs.weight.grad = None


def run_method(method, inputs, oracle: Oracle, device: torch.device, repeats: int, budget_s: float) -> dict:
    """Result dict for ``method`` on ``inputs``; status 'ok', 'skipped' (with reason) or 'error'."""
    result = dict(method=method.name, exact=method.exact, summary=method.summary)
    try:
        loss_fn = method.build(inputs)
    except Exception as exc:  # typically an ImportError: the peer is installed but broken here
        return dict(result, status="skipped", reason=f"could not set up: {type(exc).__name__}: "
                                                      f"{str(exc).splitlines()[0][:200]}")
    if getattr(loss_fn, "note", None):
        result["note"] = loss_fn.note
    try:
        result.update(_measure(loss_fn, inputs, oracle, device, repeats, budget_s), status="ok")
    except torch.cuda.OutOfMemoryError:
        result.update(status="error", reason="out of memory")
    except Exception as exc:  # a peer failing on this shape/version is a result, not a crash
        result.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                      traceback=traceback.format_exc(limit=4))
    _clear_grads(inputs)
    del loss_fn  # compiled graphs and workspaces go before the next method is measured
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _measure(loss_fn, inputs, oracle: Oracle, device, repeats: int, budget_s: float) -> dict:
    peak = peak_for(device)
    out = {}

    def forward():
        loss_fn()

    def forward_backward():
        _clear_grads(inputs)
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    forward_backward()  # warm-up: compilation, autotuning, workspaces
    sync(device)
    _clear_grads(inputs)

    inputs.sequence_logps = None  # set by methods that expose their per-sequence log-probs
    peak.start()
    loss = float(forward_backward())
    out["peak_bytes"] = peak.stop()

    out["loss"] = loss
    out["loss_err"] = abs(loss - oracle.loss)
    out["grad_hidden_err"] = relative_max_error(inputs.hidden.grad, oracle.grad_hidden)
    out["grad_weight_err"] = relative_max_error(inputs.weight.grad, oracle.grad_weight)
    # Largest per-sequence log-prob error in nats against float64 (NaN where a method hides its log-probs).
    out["logps_err"] = _logps_error(inputs, oracle)
    _clear_grads(inputs)

    for name, fn, seconds in (("fwd", forward, budget_s / 3), ("fwd_bwd", forward_backward, budget_s)):
        timed = time_ms(fn, device, repeats, seconds)
        out[f"{name}_ms"] = timed.pop("ms")
        out.update({f"{name}_{key}": value for key, value in timed.items()})  # fwd_q20_ms, fwd_reps, ...
    return out
