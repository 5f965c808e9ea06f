"""The framework suites that run in a venv of their own (tests/suite_<framework>.py).

A framework whose pins conflict with .venv's (verl 0.9.1: transformers < 5.11) gets its venv from
``make test`` (``make frameworks``); its suite runs there in one pytest subprocess, and this test
passes only when that run passes. It skips, with the reason, only when the venv could not be built.
"""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITES = {"verl": ".venv-verl"}


@pytest.mark.parametrize("framework", sorted(SUITES))
def test_framework_suite(framework):
    venv = REPO / SUITES[framework]
    python = venv / "bin" / "python"
    failed = venv / "BUILD_FAILED"
    if failed.exists():
        pytest.skip(f"{SUITES[framework]} could not be built (make frameworks): {failed.read_text().strip()}")
    if not python.exists():
        pytest.skip(f"{SUITES[framework]} does not exist: `make test` (or `make frameworks`) builds it")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("DPO_FAST_VERL", None)  # the suites check that nothing is patched without it
    done = subprocess.run([str(python), "-m", "pytest", f"tests/suite_{framework}.py", "-q", "-ra",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    summary = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, summary
    assert " passed" in done.stdout and " skipped" not in done.stdout.splitlines()[-1], summary
