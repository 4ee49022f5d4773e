"""The Triton kernels, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set before
triton is imported, so the checks in triton_checks.py run in their own process)."""
import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_triton_kernels_pass_their_checks_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
                        "tests/triton_checks.py"], cwd=TESTS.parent, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 50, r.stdout[-2000:]  # the checks ran, not skipped
