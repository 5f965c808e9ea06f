"""The framework suites that run apart from .venv (tests/suite_<framework>.py).

A framework whose pins conflict with .venv's gets its own environment from ``make test`` (``make
frameworks``): verl 0.9.1 (transformers < 5.11) a venv, ``.venv-verl``; LLaMA-Factory 0.9.5 (trl <= 0.24)
a folder put first on PYTHONPATH over .venv, ``.venv-llamafactory``. Its suite runs there in one pytest
subprocess, and this test passes only when that run passes with nothing skipped. It skips, with the
reason, only when the environment could not be built.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# framework: (environment folder, whether it is a venv (else a PYTHONPATH folder over .venv), extra env)
SUITES = {
    "verl": (".venv-verl", True, {}),
    # LLaMA-Factory checks its pinned versions at import; here it runs on .venv's transformers.
    "llamafactory": (".venv-llamafactory", False, {"DISABLE_VERSION_CHECK": "1"}),
}


@pytest.mark.parametrize("framework", sorted(SUITES))
def test_framework_suite(framework):
    folder, is_venv, extra = SUITES[framework]
    place = REPO / folder
    failed = place / "BUILD_FAILED"
    if failed.exists():
        pytest.skip(f"{folder} could not be built (make frameworks): {failed.read_text().strip()}")
    if not (place / ".installed").exists():
        pytest.skip(f"{folder} does not exist: `make test` (or `make frameworks`) builds it")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DPO_FAST_VERL")}
    env.update(extra)  # (DPO_FAST_VERL is removed: the suites check that nothing is patched without it)
    python = str(place / "bin" / "python") if is_venv else sys.executable
    if not is_venv:
        env["PYTHONPATH"] = str(place)
    done = subprocess.run([python, "-m", "pytest", f"tests/suite_{framework}.py", "-q", "-ra",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)
    summary = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, summary
    last = done.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, summary
