"""Device resolution and per-device presets (CUDA / MPS mocked at the availability checks)."""

import os
import subprocess
import sys

import pytest
import torch

from recipes import RecipeError
from recipes.device import PRESETS, best_available_device, resolve_device, set_mps_fallback_env
from recipes.hparams import load_recipe


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_best_available_prefers_cuda_then_mps(monkeypatch, no_gpu):
    assert best_available_device() == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert best_available_device() == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert best_available_device() == "cuda"


def test_resolve_device(monkeypatch, no_gpu):
    assert resolve_device(None) == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(RecipeError, match="cuda"):
        resolve_device("cuda")
    with pytest.raises(RecipeError, match="mps"):
        resolve_device("mps")
    with pytest.raises(RecipeError, match="expected cuda"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda"
    assert resolve_device("cuda", local_rank="1") == "cuda:1"  # torchrun: one GPU per process
    assert resolve_device("cuda:0", local_rank="1") == "cuda:0"  # explicit index kept


def test_mps_fallback_env_is_set_before_torch(monkeypatch, repo_root):
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    assert set_mps_fallback_env(["x.yaml", "--device", "cpu"]) is None
    assert "PYTORCH_ENABLE_MPS_FALLBACK" not in os.environ
    note = set_mps_fallback_env(["x.yaml", "--device=mps"])
    assert os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] == "1" and "before importing torch" in note
    # The check must not import torch (PyTorch reads the variable at import time).
    code = ("import sys; from recipes.device import set_mps_fallback_env; "
            "set_mps_fallback_env(['--device', 'mps']); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=True)


TINY_CTC = "hparams/CTC/tiny.yaml"


@pytest.mark.parametrize("device", ["cpu", "mps", "cuda:0"])
def test_presets_apply_when_unset(repo_root, tmp_path, device):
    hp, _, settings = load_recipe(str(repo_root / TINY_CTC), {"output_folder": str(tmp_path)},
                                  device=device)
    kind = device.split(":")[0]
    for key, value in PRESETS[kind].items():
        assert settings[key] == (value, f"{kind} preset")
        assert hp[key] == value
    assert hp["train_dataloader_opts"]["batch_size"] == PRESETS[kind]["batch_size"]
    assert hp["train_dataloader_opts"]["num_workers"] == PRESETS[kind]["num_workers"]


def test_expected_preset_values():
    assert PRESETS["cuda"] == dict(precision="bf16", batch_size=32, grad_accumulation_factor=4,
                                   num_workers=16, dynamic_batching=True, fused_optimizer=True)
    assert PRESETS["mps"] == dict(precision="fp32", batch_size=8, grad_accumulation_factor=8,
                                  num_workers=4, dynamic_batching=False, fused_optimizer=False)
    assert PRESETS["cpu"]["precision"] == "fp32" and PRESETS["cpu"]["batch_size"] == 4
    assert PRESETS["cpu"]["num_workers"] == 2 and PRESETS["cpu"]["dynamic_batching"] is False
    assert PRESETS["cpu"]["fused_optimizer"] is True


@pytest.mark.parametrize("recipe", [TINY_CTC, "hparams/S2S/tiny.yaml"])
def test_optimizer_is_fused_by_the_preset_unless_set(repo_root, tmp_path, recipe):
    params = [torch.nn.Parameter(torch.zeros(3))]
    for overrides, fused in (({}, True), ({"fused_optimizer": False}, False)):
        hp, _, _ = load_recipe(str(repo_root / recipe),
                               {"output_folder": str(tmp_path), **overrides}, device="cpu")
        assert hp["opt_class"](params).defaults["fused"] is fused


def test_command_line_and_yaml_win_over_presets(repo_root, tmp_path):
    # S2S conmamba_small pins grad_accumulation_factor (official value 1) in its YAML.
    hp, _, settings = load_recipe(
        str(repo_root / "hparams/S2S/conmamba_small.yaml"),
        {"data_folder": "x", "output_folder": str(tmp_path), "batch_size": 3,
         "num_decoder_layers": 1, "num_encoder_layers": 1},
        device="cuda", cli_settings={"precision": "fp16"})
    assert settings["grad_accumulation_factor"] == (1, "yaml")
    assert settings["batch_size"] == (3, "command line") and hp["batch_size"] == 3
    assert settings["precision"] == ("fp16", "command line")
    assert settings["num_workers"] == (16, "cuda preset")


def test_mamba_scan_start_up_line(monkeypatch):
    """The recipes' start-up line comes from the scan module's resolver (the one that decides)."""
    from modules.mamba import scan_cpu
    from modules.mamba.scan import describe_backend

    monkeypatch.delenv("MAMBA_SCAN_BACKEND", raising=False)
    monkeypatch.setenv("MAMBA_SCAN_NUMBA", "0")
    assert describe_backend("cpu") == (
        "Mamba selective scan: pure-PyTorch scan (backend 'torch': tensors on cpu)")
    monkeypatch.setenv("MAMBA_SCAN_NUMBA", "1")
    if scan_cpu.available():  # training on CPU runs the compiled kernels
        assert describe_backend("cpu") == (
            "Mamba selective scan: compiled CPU scan (numba kernels) (backend 'torch': tensors "
            "on cpu)")
        assert describe_backend("cpu", precision="bf16") == (  # bf16 activations: not compiled
            "Mamba selective scan: pure-PyTorch scan (backend 'torch': tensors on cpu; the "
            "compiled kernels take float32, this run is bf16)")
    assert describe_backend("mps") == (
        "Mamba selective scan: pure-PyTorch scan (backend 'torch': tensors on mps)")
