"""``python -m benchmarks.kernels``: every kernel's default configs compiled ahead of time, no GPU needed.

For each kernel x config x dtype x target (sm_90: H100/H200, sm_80: A100) this compiles
the kernel with ``triton.compile`` for a ``GPUTarget``, its arguments specialized as the
JIT specializes a real launch (at Llama-3-8B's head: N=8192 tokens, H=4096, V=128256),
and reads registers, spill bytes (the cubin's stack frame: ptxas puts spills there; these
kernels make no calls and hold no local arrays) and shared memory. ``--all`` adds every
autotuning config; ``--python`` also runs another interpreter (e.g. a venv with the GPU
image's Triton 3.6) and merges its rows. ``--write`` puts the table in ``benchmarks/KERNELS.md``.

Nothing here imports torch or dpo_fast: the kernels are loaded from ``kernels/`` directly,
so a bare ``pip install triton==X`` venv can compile them.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS_MD = Path(__file__).resolve().parent / "KERNELS.md"

# target -> (compute capability, shared memory one block may use, bytes)
TARGETS = {"sm_90": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}
DTYPES = ("bf16", "fp16", "fp32")
MAX_REGISTERS = 255  # per thread; more is impossible, so 255 with no spills is the real limit

# The launch the specialization imitates: Llama-3-8B's head, all tokens in one call.
TOKENS, HIDDEN, VOCAB = 8192, 4096, 128256


class Ptr:
    """A pointer argument of the given Triton element type (allocations are 16-byte aligned)."""

    def __init__(self, dtype):
        self.dtype = dtype


# Row kernels (kernels/logsoftmax_gather.py): example launch arguments of one GEMM tile
# [token_chunk, vocab_block] of a bf16 batch, every optional feature on. One small table
# on purpose: the row kernels' arguments change with their owner's work.
ROW_TILE_ROWS, ROW_TILE_COLS = 2048, 16384


def _row_kernel_args(dtype):
    # float16 batches get float32 logits tiles and a float16 gradient tile (chunked.logits_dtype).
    tile_dtype = "fp32" if dtype == "fp16" else dtype
    common = dict(tile_ptr=Ptr(tile_dtype), tile_row_stride=ROW_TILE_COLS, labels_ptr=Ptr("i64"),
                  vocab_start=ROW_TILE_COLS * 3, n_cols=ROW_TILE_COLS, ignore_index=-1,
                  scale=0.5, softcap=30.0, inv_temperature=0.7)
    return {
        "_row_stats_kernel": dict(common, stats_ptr=Ptr("fp32"), stats_stride=ROW_TILE_ROWS),
        "_row_grad_kernel": dict(common, out_ptr=Ptr(dtype), out_row_stride=ROW_TILE_COLS, lse_ptr=Ptr("fp64"),
                                 grad_logp_ptr=Ptr("fp32"), entropy_ptr=Ptr("fp32"), grad_entropy_ptr=Ptr("fp32")),
    }


ROW_CONSTEXPRS = dict(HAS_SOFTCAP=True, HAS_ENTROPY_GRAD=True)


def _fused_kernel_args(dtype, splits):
    """Every argument name any fused kernel takes, with its value at the reference launch."""
    return dict(
        h_ptr=Ptr(dtype), stride_hn=HIDDEN, stride_hk=1, w_ptr=Ptr(dtype), stride_wv=HIDDEN, stride_wk=1,
        b_ptr=Ptr(dtype), labels_ptr=Ptr("i64"), partial_ptr=Ptr("fp32"), stats_ptr=Ptr("fp32"),
        lse_ptr=Ptr("fp64"), grad_logp_ptr=Ptr("fp32"), entropy_ptr=Ptr("fp32"), grad_entropy_ptr=Ptr("fp32"),
        dh_ptr=Ptr("fp32"), dw_ptr=Ptr("fp32"), db_ptr=Ptr("fp32"),
        n=TOKENS, V=VOCAB, H=HIDDEN, num_splits=splits, n_bucket=TOKENS, v_start=0, v_end=VOCAB,
        scale=0.5, softcap=30.0, inv_temperature=0.7, filter_eps=1e-4,
    )


FUSED_CONSTEXPRS = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_ENTROPY_GRAD=True, FILTER=True, NEED_WEIGHT=True,
                        NEED_BIAS=True)
# The other side of every constexpr branch, with the arguments equal to 1 that the JIT turns
# into constants (one token, one split): compiled once per kernel (bf16, sm_90) so that a
# branch that only fails to compile on a GPU fails here.
FLAGS_OFF = dict(HAS_BIAS=False, HAS_SOFTCAP=False, HAS_ENTROPY_GRAD=False, FILTER=False, NEED_WEIGHT=False,
                 NEED_BIAS=True)


def _load_kernels():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 is set: unset it, kernels must be compiled for a GPU target")
    sys.path.insert(0, str(ROOT))
    fused = importlib.import_module("kernels.fused_linear_logps")
    rows = importlib.import_module("kernels.logsoftmax_gather")
    return fused, rows


def _jit_fn(kernel):
    import triton

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def _specialize(fn, values, constexprs):
    """(signature, constexprs, attrs) as the JIT builds them from a launch with ``values``."""
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], consts[name] = "constexpr", constexprs[name]
            continue
        value = values[name]
        if isinstance(value, Ptr):
            signature[name] = "*" + value.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # the JIT passes integers equal to 1 as constants
                signature[name], consts[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    return signature, consts, attrs


def _resources(cubin: bytes):
    """(registers, stack bytes, local bytes) from cuobjdump's resource usage of one kernel."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return int(fields["REG"]), int(fields["STACK"]), int(fields["LOCAL"])


def compile_one(job):
    """Compile one (kernel, config, dtype, target) job; returns its table row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fused, rows = _load_kernels()
    module = fused if job["family"] == "fused" else rows
    fn = _jit_fn(getattr(module, job["kernel"]))
    signature, consts, attrs = _specialize(fn, job["values"], job["constexprs"])
    capability, smem_limit = TARGETS[job["target"]]
    options = {k: job[k] for k in ("num_warps", "num_stages") if job.get(k) is not None}
    row = {k: job[k] for k in ("kernel", "config", "dtype", "target", "default")}
    row.update(triton=triton.__version__, warps=job.get("num_warps") or 4)
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as error:  # reported in the table; the test fails on it
        row.update(error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return row
    registers, stack, local = _resources(compiled.asm["cubin"])
    row.update(registers=registers, spill_bytes=stack + local, shared=compiled.metadata.shared,
               shared_limit=smem_limit)
    row["fits"] = row["spill_bytes"] == 0 and row["shared"] <= smem_limit
    return row


def _config_name(cfg):
    kw = ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in cfg["constexprs"].items())
    return f"{kw} w{cfg['num_warps']} s{cfg['num_stages']}"


def jobs(all_configs: bool = False, targets=tuple(TARGETS), dtypes=DTYPES):
    """Every compile to run: the kernels' own config tables (``compile_configs``) and the row kernels'."""
    fused, rows = _load_kernels()
    out = []
    for target in targets:
        for dtype in dtypes:
            for kernel, cfg, default in fused.compile_configs(dtype, all_configs):
                values = _fused_kernel_args(dtype, cfg.get("num_splits", 3))
                constexprs = dict(FUSED_CONSTEXPRS, **cfg["constexprs"])
                out.append(dict(family="fused", kernel=kernel, config=_config_name(cfg), dtype=dtype, target=target,
                                default=default, values=values, constexprs=constexprs,
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
                if default and dtype == "bf16" and target == "sm_90" and kernel != "_merge_splits_kernel":
                    out.append(dict(out[-1], config=_config_name(cfg) + " (flags off, n=1, 1 split)",
                                    values=dict(values, n=1, num_splits=1),
                                    constexprs=dict(constexprs, **FLAGS_OFF)))
            for kernel, values in _row_kernel_args(dtype).items():
                block = rows._block_for(values["n_cols"])
                fn = _jit_fn(getattr(rows, kernel))
                constexprs = {k: v for k, v in dict(ROW_CONSTEXPRS, BLOCK=block).items() if k in fn.arg_names}
                out.append(dict(family="rows", kernel=kernel, config=f"BLOCK={block} w4 s3", dtype=dtype,
                                target=target, default=True, values=values, constexprs=constexprs,
                                num_warps=None, num_stages=None))
    return out


def run_all(all_configs=False, workers=None, targets=tuple(TARGETS), dtypes=DTYPES):
    todo = jobs(all_configs, targets, dtypes)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(compile_one, todo))


def _other_python(python, all_configs):
    done = subprocess.run([python, "-m", "benchmarks.kernels", "--json"] + (["--all"] if all_configs else []),
                          cwd=ROOT, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    if done.returncode != 0:
        raise SystemExit(f"{python} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def markdown(rows):
    lines = [
        "# Kernel resources, compiled ahead of time",
        "",
        "Written by `python -m benchmarks.kernels --all --write` (see its docstring). Arguments are specialized "
        f"as the JIT specializes a launch at N={TOKENS}, H={HIDDEN}, V={VOCAB}, with every optional feature on "
        "(bias, softcap, entropy gradient, filtering). Registers per thread; spill bytes per thread (stack "
        "frame); shared memory per block against the card's limit (227 KB sm_90, 163 KB sm_80). `default` marks "
        "the config a launch uses without autotuning. No GPU was used.",
        "",
        "| kernel | config | default | dtype | target | triton | registers | spill bytes | shared KB | fits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["config"], r["dtype"], r["target"], r["triton"])):
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['config']} | {'yes' if r['default'] else ''} | {r['dtype']} | "
                         f"{r['target']} | {r['triton']} | error: {r['error']} | | | no |")
            continue
        lines.append(f"| {r['kernel']} | {r['config']} | {'yes' if r['default'] else ''} | {r['dtype']} | "
                     f"{r['target']} | {r['triton']} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['shared'] / 1024:.0f} | {'yes' if r['fits'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every autotuning config, not only the defaults")
    parser.add_argument("--python", action="append", default=[], help="another interpreter to run (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--write", action="store_true", help=f"write {KERNELS_MD.name}")
    args = parser.parse_args(argv)
    rows = run_all(args.all)
    for python in args.python:
        rows += _other_python(python, args.all)
    if args.json:
        print(json.dumps(rows))
    else:
        print(markdown(rows))
    if args.write:
        KERNELS_MD.write_text(markdown(rows))
    bad = [r for r in rows if not r.get("fits")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
