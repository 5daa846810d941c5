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
