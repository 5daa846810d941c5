"""python -m benchmarks.gpu_check: exits 0 without a GPU; its sections run end to end (CPU dry run)."""

import os
import subprocess
import sys

import pytest


def _run(repo_root, *args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)


def test_without_a_gpu_it_says_so_and_exits_0(repo_root):
    proc = _run(repo_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("gpu_check: no CUDA GPU here")


@pytest.mark.slow
def test_cpu_dry_run_prints_every_section(repo_root):
    proc = _run(repo_root, "--cpu-dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["check", "backend", "case", "result", "time", "ms", "peak", "MiB"]
    checks = [line.split("  ")[0].strip() for line in lines[2:-1]]
    assert checks == ["parity"] * 2 + ["scan fwd", "scan fwd+bwd", "train step", "train step",
                                       "converge"]
    assert all(" ok" in line for line in lines if line.startswith("parity"))
    assert "falls" in lines[-2] and "NOT" not in lines[-2]


def test_a_failing_row_is_reported_not_fatal(repo_root):
    from benchmarks import gpu_check

    def broken():
        raise RuntimeError("no kernel image is available\nfor execution on the device")

    assert gpu_check.guarded("parity", "cuda", "fp32", broken) == [
        ("parity", "cuda", "fp32",
         "FAIL RuntimeError: no kernel image is available for execution on the device", "", "")]
    assert gpu_check.guarded("parity", "triton", "fp32", lambda: [("row",)]) == [("row",)]
