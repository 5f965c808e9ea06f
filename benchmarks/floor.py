"""The 6NHV floor: the three GEMMs any exact method must run, timed alone with cuBLAS / CPU BLAS.

logits = hidden @ weight.T        [N, V]  (2NHV)
grad_hidden = dlogits @ weight    [N, H]  (2NHV)
grad_weight = dlogits.T @ hidden  [V, H]  (2NHV)

A method's ``floor_fraction`` is floor_ms / its forward+backward ms: 1.0 would mean the
softmax, the loss and all bookkeeping were free.
"""

import torch

from .cases import Case
from .timing import time_ms


@torch.no_grad()
def gemm_floor(case: Case, device: torch.device, repeats: int = 10, budget_s: float = 2.0) -> dict:
    N, H, V, dtype = case.num_tokens, case.hidden_size, case.vocab_size, case.torch_dtype
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(N, H, generator=gen, device=device, dtype=dtype)
    weight = torch.randn(V, H, generator=gen, device=device, dtype=dtype)
    dlogits = torch.randn(N, V, generator=gen, device=device, dtype=dtype)
    logits = torch.empty(N, V, device=device, dtype=dtype)
    grad_hidden = torch.empty(N, H, device=device, dtype=dtype)
    grad_weight = torch.empty(V, H, device=device, dtype=dtype)
    gemms = {
        "logits_ms": lambda: torch.mm(hidden, weight.T, out=logits),
        "grad_hidden_ms": lambda: torch.mm(dlogits, weight, out=grad_hidden),
        "grad_weight_ms": lambda: torch.mm(dlogits.T, hidden, out=grad_weight),
    }
    out = {}
    for name, gemm in gemms.items():
        gemm()  # warm-up
        out[name] = time_ms(gemm, device, repeats, budget_s / 3, min_repeats=3)["ms"]
    out["floor_ms"] = sum(out.values())
    out["floor_tflops"] = case.flops(3) / (out["floor_ms"] * 1e-3) / 1e12
    return out
