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


def test_after_a_cuda_error_later_rows_are_skipped_not_failed(monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "_CUDA_ERROR", [])

    def crash():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    assert gpu_check.guarded("scan", "triton", "bf16", crash)[0][3].startswith("FAIL")
    assert gpu_check.guarded("scan", "torch", "bf16", lambda: [("row",)]) == [
        ("scan", "torch", "bf16", "SKIP (after the CUDA error in scan triton bf16)", "", "")]


def test_parity_turns_tf32_off_and_back_on(monkeypatch):
    import torch

    from benchmarks import gpu_check

    seen = []
    monkeypatch.setattr(gpu_check, "_parity_rows", lambda *a: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)) or [])
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        gpu_check.parity_rows(["torch"], "cpu", (1, 4, 2, 3))
        assert seen == [(False, False)]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_scan_timings_use_the_training_layout_and_leave_no_gradients():
    """As a BiMamba layer passes them: channels innermost, B and C shared by two channel groups;
    the timed call's results equal the reference's on those tensors."""
    import torch

    import modules.mamba.scan as ss
    from benchmarks import gpu_check

    inputs = gpu_check.make_inputs(2, 8, 4, 6, "cpu", training_layout=True)
    assert inputs["u"].shape == (2, 8, 6) and inputs["u"].stride()[1] == 1
    assert inputs["B"].shape == (2, 2, 4, 6) and inputs["B"].stride()[2] == 1
    args = [inputs[k] for k in gpu_check.ARG_NAMES]
    torch.testing.assert_close(ss.selective_scan(*args, delta_softplus=True, backend="torch"),
                               ss.selective_scan(*args, delta_softplus=True, backend="ref"),
                               rtol=1e-5, atol=1e-5)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    gpu_check.timed_scan("torch", leaves, torch.ones(2, 8, 6), backward=True)
    assert all(v.grad is None for v in leaves.values())


def test_converge_not_run_is_not_a_pass(repo_root):
    proc = _run(repo_root, "--cpu-dry-run", "--budget-s", "0")
    assert proc.returncode == 1
    assert "not run (over --budget-s): not checked" in proc.stdout
