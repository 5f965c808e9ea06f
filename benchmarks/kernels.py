"""``python -m benchmarks.kernels``: every kernel launch that happens, compiled ahead of time, no GPU needed.

The fused kernels' launches come from their launchers (``benchmarks/launches.py`` runs
``forward_stats`` and ``backward`` on meta tensors at real shapes and records each launch
and each config the autotuner's pruning keeps for it). Every distinct specialization (the
constexprs, the integer arguments equal to 1 that the JIT turns into constants, the ones
divisible by 16, the pointers' alignment, the config) is compiled with ``triton.compile``
for a ``GPUTarget`` (sm_90: H100/H200, sm_80: A100), and its registers, spill bytes (the
cubin's stack frame: ptxas puts spills there; these kernels make no calls and hold no local
arrays), shared memory and resident programs per SM are read (``kernels/occupancy.py``: the
function the launcher itself sizes with). A row fits when it spills nothing, its shared memory
is within the card's limit, an SM holds at least one program and, for the token-major kernels
whose vocabulary splits are sized in waves of SMs x resident programs, the launcher sized the
splits from this very specialization (it compiles the launch's kernel before the launch and
reads its registers, warps and shared memory: the recorded lookup and the launch specialize
alike).

``--python`` also compiles the same jobs with another interpreter (e.g. a venv with the GPU
image's Triton 3.6: ``python3 -m venv /tmp/venv36 && /tmp/venv36/bin/pip install
triton==3.6.0``) and merges its rows; that interpreter needs Triton only (the jobs travel
as JSON: ``--jobs FILE``). ``--write`` puts the table in ``benchmarks/KERNELS.md``.
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

from .launches import TOKEN_MAJOR  # kernels whose vocabulary splits are sized from the compiled kernel

ROOT = Path(__file__).resolve().parent.parent
KERNELS_MD = Path(__file__).resolve().parent / "KERNELS.md"

# target -> (compute capability, shared memory one block may use (bytes), the SM's limits' name in occupancy)
TARGETS = {"sm_90": (90, 227 * 1024, "SM_90"), "sm_80": (80, 163 * 1024, "SM_80")}
DTYPES = ("bf16", "fp16", "fp32")
MAX_REGISTERS = 255  # per thread; more is impossible, so 255 with no spills is the real limit


def _ptr(dtype):
    return {"ptr": dtype, "align16": True}


# Row kernels (kernels/logsoftmax_gather.py): example launch arguments of one GEMM tile
# [token_chunk, vocab_block] of a bf16 batch, every optional feature on. One small table
# on purpose: the row kernels' arguments change with their owner's work.
ROW_TILE_ROWS, ROW_TILE_COLS = 2048, 16384


def _row_kernel_args(dtype):
    # float16 batches get float32 logits tiles and a float16 gradient tile (chunked.logits_dtype).
    tile_dtype = "fp32" if dtype == "fp16" else dtype
    common = dict(tile_ptr=_ptr(tile_dtype), tile_row_stride=ROW_TILE_COLS, labels_ptr=_ptr("i64"),
                  vocab_start=ROW_TILE_COLS * 3, n_cols=ROW_TILE_COLS, ignore_index=-1,
                  scale=0.5, softcap=30.0, inv_temperature=0.7)
    return {
        "_row_stats_kernel": dict(common, stats_ptr=_ptr("fp32"), stats_stride=ROW_TILE_ROWS),
        "_row_grad_kernel": dict(common, out_ptr=_ptr(dtype), out_row_stride=ROW_TILE_COLS, lse_ptr=_ptr("fp64"),
                                 grad_logp_ptr=_ptr("fp32"), entropy_ptr=_ptr("fp32"),
                                 grad_entropy_ptr=_ptr("fp32")),
    }


ROW_CONSTEXPRS = dict(HAS_SOFTCAP=True, HAS_ENTROPY_GRAD=True)


def _occupancy():
    """``kernels/occupancy.py`` (pure: a bare Triton venv imports it too), as the launchers import it."""
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("kernels.occupancy")


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
        if fn.params[i].do_not_specialize and isinstance(value, int) and not isinstance(value, bool):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"  # neither a constant nor aligned
            continue
        if isinstance(value, dict):  # a pointer
            signature[name] = "*" + value["ptr"]
            if value["align16"]:
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
        elif value is None:
            signature[name], consts[name] = "constexpr", None
        else:
            signature[name] = "fp32"
    return signature, consts, attrs


def specialization(job, fn=None) -> str:
    """What the JIT specializes beyond dtype and config, in words: flags on, integers equal to 1,
    integers not divisible by 16, unaligned pointers (not the arguments ``fn`` does not specialize on)."""
    unspecialized = {p.name for p in fn.params if p.do_not_specialize} if fn is not None else set()
    flags = [k.replace("HAS_", "").lower() for k, v in sorted(job["constexprs"].items())
             if v is True]
    ints = []
    for name, value in job["values"].items():
        if name in unspecialized:
            continue
        if isinstance(value, dict):
            if not value["align16"]:
                ints.append(f"{name} unaligned")
        elif isinstance(value, int) and not isinstance(value, bool):
            if value == 1:
                ints.append(f"{name}=1")
            elif value % 16:
                ints.append(f"{name}%16!=0")
    return " ".join(flags or ["no flags"]) + ("; " + ", ".join(ints) if ints else "")


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


def resident_programs(registers: int, warps: int, shared: int, target: str) -> int:
    """Programs one SM of ``target`` holds at once: ``occupancy.resident_programs``, the launcher's own
    arithmetic (registers allocated per warp in units of 256, warps, blocks, shared memory with 1 KB
    reserved per block)."""
    occupancy = _occupancy()
    return occupancy.resident_programs(registers, warps, shared, getattr(occupancy, TARGETS[target][2]))


def compile_one(job):
    """Compile one (kernel, specialization, config, target) job; returns its table row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fused, rows = _load_kernels()
    module = fused if job["family"] == "fused" else rows
    fn = _jit_fn(getattr(module, job["kernel"]))
    signature, consts, attrs = _specialize(fn, job["values"], job["constexprs"])
    capability, smem_limit, _ = TARGETS[job["target"]]
    options = {k: job[k] for k in ("num_warps", "num_stages", "maxnreg") if job.get(k) is not None}
    row = {k: job.get(k) for k in ("kernel", "config", "spec", "launches", "dtype", "target", "default",
                                    "sizing")}
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
    row["programs"] = resident_programs(registers, row["warps"], row["shared"], job["target"])
    row["fits"] = (row["spill_bytes"] == 0 and row["shared"] <= smem_limit and row["programs"] >= 1
                   and row["sizing"] in (None, "compiled"))
    return row


def _config_name(constexprs, warps, stages, maxnreg=None):
    kw = ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in sorted(constexprs.items())
                  if k.startswith("BLOCK"))
    precision = constexprs.get("DOT_PRECISION")
    return (kw + (f",{precision}" if precision else "") + f" w{warps} s{stages}"
            + (f" r{maxnreg}" if maxnreg else ""))


def _job_key(fn, target, launch):
    """What makes a compiled kernel: the specialization of the launch's arguments, its constexprs and config."""
    signature, consts, attrs = _specialize(fn, launch["values"], launch["constexprs"])
    return json.dumps([launch["kernel"], target, signature, consts, sorted(map(str, attrs.items())),
                       launch["num_warps"], launch["num_stages"], launch["maxnreg"]], sort_keys=True)


def _sizing(fn, target, launch, key):
    """For a token-major launch: "compiled" where the launcher sized its splits from the kernel this launch
    runs (the recorded lookup specializes as the launch does), else "another kernel"; None otherwise."""
    if launch["kernel"] not in TOKEN_MAJOR:
        return None
    sized = launch.get("sized_from")
    return "compiled" if sized is not None and _job_key(fn, target, sized) == key else "another kernel"


def fused_jobs(targets=tuple(TARGETS)):
    """One job per distinct specialization of the fused kernels' recorded launches."""
    from . import launches

    fused, _ = _load_kernels()
    by_key = {}
    for target in targets:
        for scenario in launches.SCENARIOS:
            for dtype in scenario.dtypes:
                for launch in launches.record(scenario, dtype, target, fused):
                    fn = _jit_fn(getattr(fused, launch["kernel"]))
                    key = _job_key(fn, target, launch)
                    sizing = _sizing(fn, target, launch, key)
                    if key in by_key:
                        job = by_key[key]
                        if scenario.name not in job["launches"]:
                            job["launches"].append(scenario.name)
                        if sizing != "compiled":
                            job["sizing"] = sizing
                        continue
                    job = dict(launch, family="fused", launches=[scenario.name], sizing=sizing)
                    del job["scenario"], job["sized_from"]
                    job["spec"] = specialization(job, fn)
                    job["config"] = _config_name(launch["constexprs"], launch["num_warps"], launch["num_stages"],
                                                 launch["maxnreg"])
                    job["default"] = None
                    if not any(isinstance(v, dict) and v["ptr"] == dtype for v in job["values"].values()):
                        job["dtype"] = "fp32"  # no operand of the batch's dtype (the split merge): statistics only
                    by_key[key] = job
    return list(by_key.values())


def row_jobs(targets=tuple(TARGETS), dtypes=DTYPES):
    """The row kernels at one example tile, every optional feature on."""
    _, rows = _load_kernels()
    out = []
    for target in targets:
        for dtype in dtypes:
            for kernel, values in _row_kernel_args(dtype).items():
                block = rows._block_for(values["n_cols"])
                fn = _jit_fn(getattr(rows, kernel))
                constexprs = {k: v for k, v in dict(ROW_CONSTEXPRS, BLOCK=block).items() if k in fn.arg_names}
                warps = rows.ROW_WARPS[kernel][constexprs["HAS_SOFTCAP"]]  # as the launcher passes them
                job = dict(family="rows", kernel=kernel, config=f"BLOCK={block} w{warps} s3", dtype=dtype,
                           target=target, default=True, values=values, constexprs=constexprs, num_warps=warps,
                           num_stages=None,
                           launches=["one tile"], sizing=None)
                job["spec"] = specialization(job)
                out.append(job)
    return out


def jobs(targets=tuple(TARGETS)):
    return fused_jobs(targets) + row_jobs(targets)


def run_jobs(todo, workers=None):
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(compile_one, todo))


def _other_python(python, todo):
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(todo, f)
        f.flush()
        done = subprocess.run([python, "-m", "benchmarks.kernels", "--jobs", f.name, "--json"], cwd=ROOT,
                              capture_output=True, text=True,
                              env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    if not done.stdout.strip():
        raise SystemExit(f"{python} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def markdown(rows):
    lines = [
        "# Kernel resources, compiled ahead of time",
        "",
        "Written by `python -m benchmarks.kernels --python <venv with triton 3.6>/bin/python --write` (see its "
        "docstring). One row per distinct specialization of a kernel launch that happens: the fused kernels' "
        "launches are recorded from their launchers at the shapes of `benchmarks/launches.py` (`launches`), "
        "one row per config the autotuner's pruning keeps; the row kernels at one example tile. `specialization` "
        "lists the constexpr flags on and the integer arguments the JIT specializes (equal to 1: a constant; "
        "not a multiple of 16; the split count is not specialized on). Registers per thread; spill bytes per "
        "thread (stack frame); shared memory per block against the card's limit (227 KB sm_90, 163 KB sm_80); "
        "programs one SM holds (`kernels/occupancy.py`), and \"sizes splits\" where the launcher sizes the "
        "vocabulary splits in waves of SMs x this number, read from this same specialization compiled before "
        "the launch (token-major kernels on CUDA; the recorded lookup specializes as the launch does). No GPU "
        "was used.",
        "",
        "| kernel | dtype | config | specialization | launches | target | triton | registers | spill bytes "
        "| shared KB | programs/SM | fits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    key = lambda r: (r["kernel"], r["dtype"], r["config"], r["spec"], r["target"], r["triton"])  # noqa: E731
    for r in sorted(rows, key=key):
        head = (f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['spec']} | {', '.join(r['launches'])} | "
                f"{r['target']} | {r['triton']} |")
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | | **no** |")
            continue
        sizing = {None: "", "compiled": " (sizes splits)"}.get(r.get("sizing"), f" (splits sized from {r['sizing']})")
        lines.append(f"{head} {r['registers']} | {r['spill_bytes']} | {r['shared'] / 1024:.0f} | "
                     f"{r['programs']}{sizing} | {'yes' if r['fits'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", default=[], help="another interpreter to run (repeatable)")
    parser.add_argument("--jobs", help="compile the jobs in this JSON file (written by this tool; no torch needed)")
    parser.add_argument("--list", action="store_true", help="print the jobs as JSON, compile nothing")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--write", action="store_true", help=f"write {KERNELS_MD.name}")
    args = parser.parse_args(argv)
    todo = json.loads(Path(args.jobs).read_text()) if args.jobs else jobs()
    if args.list:
        print(json.dumps(todo))
        return 0
    rows = run_jobs(todo)
    for python in args.python:
        rows += _other_python(python, todo)
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
