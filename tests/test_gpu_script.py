"""benchmarks/gpu.sh proven on CPU: ``--dry-run`` runs its whole flow at tiny shapes, then
``python -m benchmarks.record`` turns what it wrote into a RESULTS.md section.

The GPU run has one chance (a lent machine, 15 minutes): every stage it would run is run here,
from installing carried wheels into a scratch folder to the files it leaves, so a broken script
fails CI instead of that chance. CI has no ``.whl/`` folder, so the install step is proven with
a small wheel built here.
"""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import record
from benchmarks.cases import ALL_CASES, GPU_CASES
from benchmarks.methods import BY_NAME
from benchmarks.sweep import run_order
from benchmarks.timing import time_ms

ROOT = Path(__file__).resolve().parent.parent
PROBE = "dpo_fast_gpu_probe"


def _wheel(folder: Path, module: str = PROBE, version: str = "1.0", requires=()) -> Path:
    """A minimal valid pure-Python wheel (one module), so the install step runs on any machine."""
    info = f"{module}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{module}/__init__.py": b"VALUE = 42\n", f"{info}/METADATA": metadata.encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record_lines = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record_lines.append(f"{name},sha256={digest},{len(data)}")
    record_lines.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record_lines) + "\n").encode()
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-sh")
    wheels, out, site = tmp / "wheels", tmp / "out", tmp / "site"
    wheels.mkdir()
    _wheel(wheels)
    env = dict(os.environ, OUT=str(out), SITE=str(site), WHEELS=str(wheels), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, out, site


def _log(out: Path, name: str) -> str:
    return (out / name).read_text()


def test_dry_run_installs_into_the_scratch_folder(dry_run):
    proc, out, site = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sh_log = _log(out, "gpu_sh.log")
    assert "installed 1 wheels" in sh_log
    assert (site / PROBE / "__init__.py").read_text() == "VALUE = 42\n"
    # dpo-fast laid out as installed, and it is the copy the stages import, not the source folder.
    assert (site / "dpo_fast" / "kernels" / "fused_linear_logps.py").exists()
    assert re.search(r"^dpo-fast \d", sh_log, re.M)
    assert "import dpo_fast ok" in sh_log and f"from {site}/dpo_fast/__init__.py" in sh_log


def test_dry_run_stages_in_order_and_partial_files(dry_run):
    proc, out, _ = dry_run
    sh_log = _log(out, "gpu_sh.log")
    stages = ["gpu checks: python -m benchmarks.gpu_checks", "environment (at most", "python -m benchmarks plan",
              "pytest tests/test_gpu_smoke.py", "headline: python -m benchmarks", "rest: python -m benchmarks",
              "done; files in"]
    positions = [sh_log.find(s) for s in stages]
    assert -1 not in positions and positions == sorted(positions), sh_log
    # Every GPU check gave its one verdict line (in the dry run: tiny shapes, or SKIP with its reason).
    from benchmarks.gpu_checks import CHECKS

    verdicts = {name: status for status, name in re.findall(r"^(PASS|FAIL|SKIP) (\w+): ", sh_log, re.M)}
    assert set(verdicts) == set(CHECKS), sh_log
    assert "FAIL" not in verdicts.values() and verdicts["non_current_device"] == "SKIP", verdicts
    assert "gpu checks exit code 0" in sh_log
    tests_log = _log(out, "gpu_tests.log")
    assert re.search(r"^=* ?\d+ passed, \d+ deselected in", tests_log, re.M)
    assert re.search(r"^tests/test_gpu_smoke.py::\S+ PASSED", tests_log, re.M)  # -v: verdicts as they come
    assert "pytest exit code 0" in sh_log and "headline exit code 0" in sh_log and "rest exit code 0" in sh_log

    headline = json.loads(next((out / "headline").glob("*.json")).read_text())
    rest = json.loads(next((out / "rest").glob("*.json")).read_text())
    assert [e["name"] for e in headline["cases"]] == ["tiny 2x32"]
    assert [e["name"] for e in rest["cases"]] == ["small 2x128"]
    for report in (headline, rest):
        results = {r["method"]: r for r in report["cases"][0]["results"]}
        assert {results[m]["status"] for m in ("naive-eager", "dpo-fast-torch")} == {"ok"}
        assert results["dpo-fast-torch"]["loss_err"] < 1e-5
    # dpo-fast ran before the peer though it was named after it.
    bench_log = _log(out, "gpu_bench.log")
    assert bench_log.index("ok: dpo-fast-torch @ tiny") < bench_log.index("ok: naive-eager @ tiny")

    # What comes back from the device machine: at most 8 files, 2 folders down, plain names.
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(f.parts) <= 3 and re.fullmatch(r"[A-Za-z0-9._-]+", part) for f in files for part in f.parts)


def test_record_writes_the_results_section(dry_run, tmp_path):
    _, out, _ = dry_run
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text((ROOT / "benchmarks" / "RESULTS.md").read_text())
    stem = record.record([out], results_md, tmp_path / "results", tmp_path / "charts")
    text = results_md.read_text()
    title = next(line for line in text.splitlines() if line.startswith("## CPU (gpu.sh --dry-run)"))
    assert "### tiny 2x32" in text and "### small 2x128" in text and re.search(r"oracle\): \d+ passed", text)
    assert text.index("### tiny 2x32") < text.index("### small 2x128")  # headline first
    assert stem.with_suffix(".json").exists() and stem.with_suffix(".md").exists()
    assert f"![fwd+bwd time and peak memory per case](charts/{stem.name}.png)" in text
    assert (tmp_path / "charts" / f"{stem.name}.png").stat().st_size > 1000
    record.record([out], results_md, tmp_path / "results", tmp_path / "charts")  # again: replaced, not repeated
    assert results_md.read_text().count(title) == 1


def test_the_documented_device_call_is_the_same_everywhere():
    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    call = re.search(r"^#   (run\(command=\"bash benchmarks/gpu.sh\".*\))$", script, re.M).group(1)
    assert '".whl"' in call and "timeout_s=" in call
    assert call in (ROOT / "README.md").read_text()
    total_s = int(re.search(r'TOTAL_S="\$\{TOTAL_S:-(\d+)\}"', script).group(1))
    assert total_s + 30 <= int(re.search(r"timeout_s=(\d+)", call).group(1)) <= 600


def test_gpu_sh_names_real_cases_and_methods():
    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    headline_dry, headline_gpu = re.findall(r'^  HEADLINE="([^"]+)"$', script, re.M)
    rest_dry = re.search(r'^  REST_CASES="([^"]+)"$', script, re.M).group(1)
    assert headline_gpu in [c.name for c in GPU_CASES]
    assert {headline_dry, *rest_dry.split(",")} <= set(ALL_CASES)
    for methods in re.findall(r'--methods "([^"]+)"', script):
        assert set(methods.split(",")) <= set(BY_NAME)


def test_run_order_puts_dpo_fast_first_and_compilers_last():
    names = [m.name for m in run_order(list(BY_NAME.values()))]
    ours = [n for n in names if n.startswith("dpo-fast")]
    assert names[: len(ours)] == ours
    assert names.index("naive-eager") < names.index("naive-compile")
    assert names[-2:] == sorted(names[-2:], key=list(BY_NAME).index) and set(names[-2:]) == {"naive-compile",
                                                                                           "liger-dpo"}


def test_gpu_record_replaces_the_placeholder():
    text = "# Measured results\n\nintro\n\n## GPU\n\nnot run yet\n\n## CPU: x\n\ncpu\n"
    new = "## GPU: NVIDIA H200, 2026-12-01\n\ntables\n"
    merged = record.insert_section(text, new, is_gpu=True)
    assert merged == "# Measured results\n\nintro\n\n" + new + "\n## CPU: x\n\ncpu\n"
    again = record.insert_section(merged, new.replace("tables", "tables 2"), is_gpu=True)
    assert again.count("## GPU: NVIDIA H200") == 1 and "tables 2" in again
    other = record.insert_section(merged, "## GPU: NVIDIA H100, 2026-12-02\n\nx\n", is_gpu=True)
    assert other.index("NVIDIA H100") < other.index("NVIDIA H200")  # newest first, both kept


def test_test_summary_names_the_failures(tmp_path):
    (tmp_path / "gpu_tests.log").write_text(
        ".F.\nFAILED tests/test_gpu_smoke.py::test_x[bfloat16-fused] - AssertionError: worse\n"
        "1 failed, 2 passed in 81.30s (0:01:21)\n")
    summary = record.test_summary(tmp_path)
    assert summary.startswith("1 failed, 2 passed in 81.30s")
    assert summary.endswith("failed: tests/test_gpu_smoke.py::test_x[bfloat16-fused]")
    (tmp_path / "gpu_tests.log").write_text(  # killed by its time limit before the closing line
        "tests/test_gpu_smoke.py::test_x[a] PASSED [ 4%]\ntests/test_gpu_smoke.py::test_x[b] FAILED [ 8%]\n")
    assert record.test_summary(tmp_path).startswith("1 passed, 1 failed, 0 error before its time limit")


def test_cpu_timer_reports_median_and_quantiles():
    import torch

    calls = []
    timed = time_ms(lambda: calls.append(1), torch.device("cpu"), repeats=5, budget_s=10.0)
    assert timed["reps"] == len(calls) == 5
    assert timed["q20_ms"] <= timed["ms"] <= timed["q80_ms"]


def test_cuda_timer_is_do_bench_median_and_quantiles(monkeypatch):
    import torch
    import triton.testing

    seen = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        for _ in range(7):
            fn()
        return [2.0, 1.5, 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    calls = []
    timed = time_ms(lambda: calls.append(1), torch.device("cuda"), repeats=10, budget_s=0.5)
    assert timed == dict(ms=2.0, q20_ms=1.5, q80_ms=3.0, calls=7) and len(calls) == 7
    assert seen["quantiles"] == [0.5, 0.2, 0.8] and seen["rep"] == 500.0


def test_card_reads_the_nvidia_smi_line(tmp_path):
    (tmp_path / "gpu_sh.log").write_text(
        "[gpu.sh 0s] start\nname, memory.total [MiB], driver_version\nNVIDIA H200, 143771 MiB, 580.159.04\n")
    assert record.card(tmp_path) == "name NVIDIA H200; memory.total [MiB] 143771 MiB; driver_version 580.159.04"
    (tmp_path / "gpu_sh.log").write_text("nvidia-smi: not found\n")
    assert record.card(tmp_path) is None


def test_wheel_check_finds_unmet_and_met_requirements(tmp_path, capsys):
    from benchmarks import wheel_check

    _wheel(tmp_path, "dill", "0.4.0")
    _wheel(tmp_path, "peer", "1.0", requires=["dill<0.4.1", "transformers>=5", "pandas",
                                              'colorama; sys_platform == "win32"', "pytest[testing]; extra == 'dev'"])
    assert wheel_check.check(tmp_path) == 0
    printed = capsys.readouterr().out
    assert "ok    dill<0.4.1  (carried 0.4.0)" in printed and "ok    transformers>=5  (image 5.17.0)" in printed
    assert "check pandas" in printed and "colorama" not in printed and "pytest" not in printed
    _wheel(tmp_path, "other", "1.0", requires=["torch>=99", "not-on-the-image"])
    assert wheel_check.check(tmp_path) == 1
    printed = capsys.readouterr().out
    assert "FAIL  torch>=99  (image 2.11.0)" in printed and "FAIL  not-on-the-image  (MISSING" in printed
    assert wheel_check.check(tmp_path, installed=True) == 1  # against this Python's own packages
    printed = capsys.readouterr().out
    assert "FAIL  not-on-the-image  (NOT INSTALLED)" in printed


def test_gpu_check_verdicts_go_on_after_a_crash_and_keep_the_budget(monkeypatch, capsys):
    from benchmarks import gpu_checks

    def crashes(dry_run):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setitem(gpu_checks.CHECKS, "row_offsets_2_31", crashes)
    assert gpu_checks.run_one("row_offsets_2_31", True) == (
        "FAIL row_offsets_2_31: RuntimeError: CUDA error: an illegal memory access was encountered")
    assert gpu_checks.run_all(list(gpu_checks.CHECKS), dry_run=False, budget_s=0) == 0  # nothing started
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"SKIP {name}: the stage's 0 s were spent" for name in gpu_checks.CHECKS]
    assert set(gpu_checks.PER_CHECK_S) == set(gpu_checks.CHECKS)
