"""Runs tests/interpreted_scan_triton.py in a process of its own with TRITON_INTERPRET=1.

Triton decides between compiling and interpreting when it is imported, so the interpreter cannot be
switched on inside this test process without affecting every other test.
"""

import os
import re
import subprocess
import sys


def test_triton_scan_under_the_interpreter(repo_root):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
         str(repo_root / "tests" / "interpreted_scan_triton.py")],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed(, \d+ warnings?)? in .*", summary), report
