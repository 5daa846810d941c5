"""Mamba core: selective scan (pure PyTorch / Triton / mamba-ssm CUDA; see ``scan``) and the Mamba /
BiMamba mixers."""

from .config import MAMBA_DEFAULTS, build_mamba, check_mamba_config
from .mamba_blocks import BiMamba, Mamba, MambaCache, reset_mamba_parameters
from .scan import selective_scan, selective_scan_ref, selective_scan_torch

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_torch", "Mamba", "BiMamba",
           "MambaCache", "reset_mamba_parameters", "MAMBA_DEFAULTS", "build_mamba",
           "check_mamba_config"]
