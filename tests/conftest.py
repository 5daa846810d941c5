import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The machine running CI has 2 cores; parallel BLAS threads only add contention in small tests.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def repo_root():
    return REPO


@pytest.fixture
def unloaded_kernels(monkeypatch):
    """start(load_after): the compiled CPU kernels' loading policy from scratch (MAMBA_SCAN_NUMBA
    unset, nothing loaded, no pure-PyTorch work counted, scan_cpu.LOAD_AFTER = load_after);
    returns a list that gets one item per forward-kernel run. Skips without numba."""
    from modules.mamba import scan_cpu

    def start(load_after):
        monkeypatch.delenv("MAMBA_SCAN_NUMBA", raising=False)
        if not scan_cpu.available():
            pytest.skip("numba is not installed: no compiled CPU kernel")
        monkeypatch.setattr(scan_cpu, "LOAD_AFTER", load_after)
        monkeypatch.setattr(scan_cpu, "_torch_work", 0)
        monkeypatch.setattr(scan_cpu, "_KERNELS", {})
        runs = []
        kernel = scan_cpu.fused_forward
        monkeypatch.setattr(scan_cpu, "fused_forward",
                            lambda *a, **k: runs.append(1) or kernel(*a, **k))
        return runs
    return start
