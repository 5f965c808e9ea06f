"""The row kernels compile for an H100 (sm_90), float64 lse included.

The CPU interpreter never compiles a kernel, so GPU-only compile errors (float64 loads and
conversions in ``split_lse``, types, constexpr branches) would otherwise surface first on a GPU.
"""

import os
import subprocess
import sys

_COMPILE_FOR_HOPPER = r"""
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dpo_fast.kernels import logsoftmax_gather as L

def compile_one(fn, signature, constexprs):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

common = dict(labels_ptr="*i64", vocab_start="i32", n_cols="i32", ignore_index="i32", scale="fp32", softcap="fp32",
              inv_temperature="fp32")
cases = [(tile, "fp64", flag, flag) for tile, flag in itertools.product(("bf16", "fp16", "fp32"), (False, True))]
cases.append(("bf16", "fp32", True, True))  # a float32 lse still compiles (less exact: see split_lse)
for tile, lse, softcap, entropy in cases:
    compile_one(L._row_grad_kernel,
                dict(common, tile_ptr="*" + tile, tile_row_stride="i32", out_ptr="*" + tile, out_row_stride="i32",
                     lse_ptr="*" + lse, grad_logp_ptr="*fp32", entropy_ptr="*fp32", grad_entropy_ptr="*fp32"),
                dict(HAS_SOFTCAP=softcap, HAS_ENTROPY_GRAD=entropy, BLOCK=4096))
for tile in ("bf16", "fp32"):
    compile_one(L._row_stats_kernel,
                dict(common, tile_ptr="*" + tile, tile_row_stride="i32", stats_ptr="*fp32", stats_stride="i32"),
                dict(HAS_SOFTCAP=True, BLOCK=4096))
print("compiled")
"""


def test_row_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]
