"""Every kernel launch that happens, compiled ahead of time for an H100 (sm_90) and an A100 (sm_80).

No GPU needed: ``python -m benchmarks.kernels`` records the launches the fused kernels'
launchers make at real shapes (``benchmarks/launches.py``: every optional flag on, DPO's flags,
n = 1, n not a multiple of 16, one vocabulary split, GPT-2, Gemma-2 with softcap; every
config the autotuner's pruning keeps), compiles each distinct specialization with
``triton.compile`` (ptxas from the Triton wheel) and reports registers, spill bytes, shared
memory and the programs one SM holds. Under the interpreter nothing compiles, so these are
the only checks of what the GPU will run: spills cost local-memory traffic on every tile,
shared memory over the card's limit is an OutOfResources at launch, and a kernel that fits
a different number of programs per SM than the vocabulary-split sizing used leaves waves
part empty (so the launcher sizes the splits from the compiled kernel itself, with the
arithmetic of ``kernels/occupancy.py`` that this table uses; ``tests/test_occupancy.py``
tests that arithmetic and the launcher's use of it on CPU).

The installed Triton compiles live; ``DPO_FAST_TRITON_PYTHONS`` (interpreters separated by
``:``, e.g. a venv with the GPU image's Triton 3.6) adds others. ``benchmarks/KERNELS.md``
must list every launch as fitting for Triton 3.6 and 3.9 (regenerate it with
``python -m benchmarks.kernels --python <venv with triton 3.6>/bin/python --write``).
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
from benchmarks import launches  # noqa: E402

TABLE_VERSIONS = ("3.6", "3.9")  # the GPU image's Triton and the newest one KERNELS.md was written with
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}


@pytest.fixture(scope="module")
def jobs():
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--list"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.stdout, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def rows():
    others = [p for p in os.environ.get("DPO_FAST_TRITON_PYTHONS", "").split(":") if p]
    command = [sys.executable, "-m", "benchmarks.kernels", "--json"] + [a for p in others for a in ("--python", p)]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=3600)
    assert done.stdout, done.stderr[-4000:]
    return json.loads(done.stdout)


def _label(row):
    return (f"{row['kernel']} {row['dtype']} {row['config']} [{row['spec']}] ({', '.join(row['launches'])}) "
            f"{row['target']} triton {row['triton']}")


def test_launches_cover_the_specializations_real_calls_make(jobs):
    """The recorded launches include what the every-flag-on table missed: flags off, n = 1 and n = 1 split
    as constants, n and V not multiples of 16, softcap alone, for every kernel, dtype and target."""
    specs = {}
    for job in jobs:
        specs.setdefault((job["kernel"], job["dtype"], job["target"]), set()).add(job["spec"])
    for target in table.TARGETS:
        for dtype in table.DTYPES:
            for kernel in ("_forward_kernel", "_grad_hidden_kernel", "_grad_weight_kernel"):
                found = specs.get((kernel, dtype, target), set())
                flags = [set(s.split(";")[0].split()) for s in found]
                assert any(not f & {"bias", "softcap", "entropy_grad"} for f in flags), (kernel, dtype, target)
                assert any("n%16!=0" in s for s in found), (kernel, dtype, target)
        for kernel in ("_forward_kernel", "_grad_hidden_kernel"):
            for dtype in ("bf16", "fp32"):
                found = specs[(kernel, dtype, target)]
                assert any("n=1" in s for s in found)
                assert not any("num_splits" in s for s in found)  # never specialized: SPLIT_COUNT_ARGS
                assert any("V%16!=0" in s for s in found) and any(s.startswith("softcap;") for s in found)
    assert {"_merge_splits_kernel", "_row_stats_kernel", "_row_grad_kernel"} <= {j["kernel"] for j in jobs}


def test_every_autotune_config_is_compiled_somewhere(jobs):
    """Each config of each element size's list survives pruning in at least one recorded launch."""
    names = {(j["kernel"], j["dtype"], j["config"]) for j in jobs}
    for dtype, size in SIZES.items():
        precision = "tf32" if size == 2 else fused.FLOAT32_DOT_PRECISION
        for kernel in ("forward", "grad_hidden"):
            for block_v, block_k, warps, stages in fused._TOKEN_MAJOR[kernel][size]:
                assert any(k == f"_{kernel}_kernel" and d == dtype and f"K={block_k}," in c and f"V={block_v}," in c
                           and f"w{warps} s{stages}" in c for k, d, c in names), (kernel, dtype, block_v, block_k)
        for block_n, block_v, block_k, warps, stages in fused._VOCAB_MAJOR[size]:
            config = table._config_name(dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k,
                                             DOT_PRECISION=precision), warps, stages,
                                        fused.MAX_REGISTERS["grad_weight"].get(size))
            assert ("_grad_weight_kernel", dtype, config) in names, config


def test_every_launch_compiled_for_every_target(rows, jobs):
    errors = [f"{_label(r)}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    for version in {r["triton"] for r in rows}:
        compiled = [r for r in rows if r["triton"] == version]
        assert len(compiled) == len(jobs), version


def test_no_spills_and_shared_memory_within_the_card(rows):
    for r in rows:
        print(f"{_label(r)}: {r['registers']} registers, {r['spill_bytes']} spill bytes, "
              f"{r['shared'] / 1024:.0f} KB shared, {r['programs']} programs/SM")
    spills = [f"{_label(r)}: {r['spill_bytes']} bytes" for r in rows if r["spill_bytes"] > 0]
    too_big = [f"{_label(r)}: {r['shared']} > {r['shared_limit']}" for r in rows if r["shared"] > r["shared_limit"]]
    assert not spills, "\n".join(spills)
    assert not too_big, "\n".join(too_big)
    assert all(0 < r["registers"] <= table.MAX_REGISTERS for r in rows)


def test_occupancy_is_what_the_split_sizing_uses(rows, jobs):
    """Token-major kernels: the launcher sizes the vocabulary splits from the kernel each launch runs
    (compiled before the launch: ``fused_linear_logps._resident_programs``), with the arithmetic this table
    uses. Every recorded lookup specializes as its launch does (the split count and the split buffer
    change no compiled kernel), so the programs per SM each row reports are the ones its grid was sized for."""
    token_major = [j for j in jobs if j["kernel"] in launches.TOKEN_MAJOR]
    assert {(j["kernel"], j["dtype"], j["target"]) for j in token_major} >= {
        (k, d, t) for k in launches.TOKEN_MAJOR for d in table.DTYPES for t in table.TARGETS}
    wrong = [f"{j['kernel']} {j['dtype']} [{j['spec']}] {j['target']}: sized from {j['sizing']}"
             for j in token_major if j["sizing"] != "compiled"]
    assert not wrong, "\n".join(wrong)
    assert all(r["sizing"] == "compiled" and r["programs"] >= 1 for r in rows if r["kernel"] in launches.TOKEN_MAJOR)
    # one function for the table and the launcher
    assert Path(table._occupancy().__file__).resolve() == Path(fused.occupancy.__file__).resolve()


def test_resident_programs_counts_registers_warps_and_shared_memory():
    assert table.resident_programs(168, 4, 16 * 1024, "sm_90") == 3  # 168 x 32 = 21 x 256 per warp
    assert table.resident_programs(172, 4, 16 * 1024, "sm_90") == 2  # 176 x 32 x 4 x 3 > 65536
    assert table.resident_programs(128, 8, 72 * 1024, "sm_90") == 2
    assert table.resident_programs(129, 8, 72 * 1024, "sm_90") == 1
    assert table.resident_programs(32, 4, 100 * 1024, "sm_80") == 1  # by shared memory: 164 KB per SM


@pytest.mark.parametrize("tokens", [1024, 1100, 1536, 2048, 3000, 4096, 6000, 8192, 16384, 65536])
@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 256000])
def test_token_major_grids_fill_the_waves(tokens, vocab):
    """The launcher's vocabulary splits, sized for the token block that runs and the programs per SM of
    the compiled kernel (1-4 across KERNELS.md's launches), fill >= 90% of the waves of 132 (H100) and
    108 (A100) SMs."""
    for sms in launches.SMS.values():
        for kernel in ("forward", "grad_hidden"):
            for size in (2, 4):
                for programs in (1, 2, 3, 4):
                    block_n, block_v = fused.TOKEN_BLOCK[size], fused._TOKEN_MAJOR[kernel][size][0][0]
                    token_blocks, vocab_tiles = triton.cdiv(tokens, block_n), triton.cdiv(vocab, block_v)
                    splits = fused.splits_for_waves(token_blocks, vocab_tiles, sms * programs,
                                                    max_splits=min(64, triton.cdiv(vocab, 512)))
                    fill = fused.wave_fill(token_blocks, splits, vocab_tiles, sms * programs)
                    assert fill >= 0.9, (sms, kernel, size, programs, splits, fill)


def test_kernels_md_programs_are_within_the_waves_checked(rows):
    """The programs per SM of every token-major launch, compiled here and in KERNELS.md (both Tritons), are
    among those the wave test above covers."""
    listed = [int(cells[10].split()[0]) for cells in _kernels_md_cells() if cells[0] in launches.TOKEN_MAJOR]
    assert listed and set(listed) <= {1, 2, 3, 4}
    assert {r["programs"] for r in rows if r["kernel"] in launches.TOKEN_MAJOR} <= {1, 2, 3, 4}


def _kernels_md_cells():
    for line in (ROOT / "benchmarks" / "KERNELS.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[0].startswith("_"):
            yield cells


def _kernels_md_rows():
    out = {}
    for cells in _kernels_md_cells():
        kernel, dtype, config, spec, launched, target, version = cells[:7]
        out[(kernel, dtype, config, spec, target, version.rsplit(".", 1)[0])] = cells[11] == "yes"
    return out


def test_kernels_md_lists_every_launch_as_fitting_for_both_tritons(jobs):
    """Every launch the launchers make today is in benchmarks/KERNELS.md, compiled by Triton 3.6 and 3.9
    on sm_80 and sm_90 with no spills, within shared memory, token-major splits sized from the kernel itself."""
    listed = _kernels_md_rows()
    missing = []
    for job in jobs:
        for version in TABLE_VERSIONS:
            key = (job["kernel"], job["dtype"], job["config"], job["spec"], job["target"], version)
            if not listed.get(key):
                missing.append(key)
    assert not missing, f"{len(missing)} launches missing from benchmarks/KERNELS.md or not fitting: {missing[:5]}"
