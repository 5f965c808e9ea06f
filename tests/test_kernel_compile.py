"""Every kernel's default configs, compiled ahead of time for an H100 (sm_90) and an A100 (sm_80).

No GPU needed: ``python -m benchmarks.kernels`` compiles each kernel x default config x dtype
x target with ``triton.compile`` (ptxas from the Triton wheel), its arguments specialized as
the JIT specializes a real launch, and reports registers, spill bytes and shared memory. A
target that cannot be compiled here fails the test. Under the interpreter nothing compiles,
so these are the only checks of what the GPU will run: spills cost local-memory traffic on
every tile, and shared memory over the card's limit is an OutOfResources at launch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from dpo_fast.kernels import fused_linear_logps as fused

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import kernels as table  # noqa: E402

SMS = 132  # an H100 SXM / H200


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.stdout, done.stderr[-4000:]
    return json.loads(done.stdout)


def _label(row):
    return f"{row['kernel']} {row['config']} {row['dtype']} {row['target']} triton {row['triton']}"


def test_every_kernel_dtype_and_target_compiled(rows):
    errors = [f"{_label(r)}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    compiled = {(r["kernel"], r["dtype"], r["target"]) for r in rows}
    kernels = {"_forward_kernel", "_grad_hidden_kernel", "_grad_weight_kernel", "_row_stats_kernel",
               "_row_grad_kernel"}
    want = {(k, d, t) for k in kernels for d in table.DTYPES for t in table.TARGETS}
    want |= {("_merge_splits_kernel", "fp32", t) for t in table.TARGETS}
    assert want <= compiled, sorted(want - compiled)


def test_no_spills_and_shared_memory_within_the_card(rows):
    for r in rows:
        print(f"{_label(r)}: {r['registers']} registers, {r['spill_bytes']} spill bytes, "
              f"{r['shared'] / 1024:.0f} KB shared")
    spills = [_label(r) for r in rows if r["spill_bytes"] > 0]
    too_big = [f"{_label(r)}: {r['shared']} > {r['shared_limit']}" for r in rows if r["shared"] > r["shared_limit"]]
    assert not spills, spills
    assert not too_big, too_big
    assert all(0 < r["registers"] <= table.MAX_REGISTERS for r in rows)


def _resident(row):
    """Programs one SM holds by registers (65536, allocated per warp in units of 256) and shared memory."""
    per_warp = -(-row["registers"] * 32 // 256) * 256
    by_registers = 65536 // (per_warp * row["warps"])
    by_shared = (row["shared_limit"] + 1024) // max(1, row["shared"] + 1024)
    return min(by_registers, by_shared)


@pytest.mark.parametrize("tokens", [1024, 1100, 1536, 2048, 3000, 4096, 6000, 8192, 16384, 65536])
@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 256000])
def test_token_major_grids_fill_the_waves_of_an_h100(rows, tokens, vocab):
    """The launcher's vocabulary splits, sized for the token block that runs, fill >= 90% of the waves
    of 132 SMs, each holding as many programs as the compiled sm_90 kernel's resources allow."""
    checked = 0
    for kernel in ("forward", "grad_hidden"):
        for dtype, size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
            block_n, block_v = fused.TOKEN_BLOCK[size], fused._TOKEN_MAJOR[size][0][0]
            token_blocks, vocab_tiles = triton.cdiv(tokens, block_n), triton.cdiv(vocab, block_v)
            splits = fused.splits_for_waves(token_blocks, vocab_tiles, SMS * fused.RESIDENT_PROGRAMS[kernel][size],
                                            max_splits=min(64, triton.cdiv(vocab, 512)))
            for r in rows:
                if r["kernel"] == f"_{kernel}_kernel" and r["dtype"] == dtype and r["target"] == "sm_90" \
                        and r["default"] and "flags off" not in r["config"]:
                    assert _resident(r) == fused.RESIDENT_PROGRAMS[kernel][size], _label(r)
                    fill = fused.wave_fill(token_blocks, splits, vocab_tiles, SMS * _resident(r))
                    assert fill >= 0.9, (_label(r), splits, fill)
                    checked += 1
    assert checked == 6


def test_kernels_md_lists_every_autotune_config_as_fitting_for_both_tritons():
    """Autotuning lists hold only configs that fit: each entry must appear in benchmarks/KERNELS.md
    (regenerate: ``python -m benchmarks.kernels --all --python <venv with triton 3.6>/bin/python --write``)
    as compiled without spills and within shared memory by Triton 3.6 and 3.9, on sm_80 and sm_90."""
    fits = {}
    for line in (ROOT / "benchmarks" / "KERNELS.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].startswith("_"):
            kernel, config, _default, dtype, target, version = cells[:6]
            fits[(kernel, config, dtype, target, version.rsplit(".", 1)[0])] = cells[9] == "yes"
    checked = 0
    for dtype in table.DTYPES:
        for kernel, cfg, _default in fused.compile_configs(dtype, every_config=True):
            for target in table.TARGETS:
                for version in ("3.6", "3.9"):
                    key = (kernel, table._config_name(cfg), dtype, target, version)
                    assert fits.get(key), f"{key} missing from benchmarks/KERNELS.md or does not fit"
                    checked += 1
    assert checked >= 4 * len(table.DTYPES) * 3  # three kernels per dtype at least, two targets, two versions
