"""Device selection and per-device training presets.

``set_mps_fallback_env`` is torch-free and must run before ``import torch``: PyTorch reads
PYTORCH_ENABLE_MPS_FALLBACK once, at import time.
"""

import os
import platform
import sys

from recipes import RecipeError

# Values a device applies unless the command line or the YAML sets them (YAML value null = unset).
# batch_size only matters with dynamic_batching False: dynamic batches are bounded by
# max_batch_length_train (seconds of audio) instead.
# fused_optimizer: AdamW's one-kernel update (AdamW(fused=True)), on CPU several times faster than
# its per-parameter loop for small models; left off on MPS (not tested there).
PRESETS = {
    "cuda": dict(precision="bf16", batch_size=32, grad_accumulation_factor=4, num_workers=16,
                 dynamic_batching=True, fused_optimizer=True),
    "mps": dict(precision="fp32", batch_size=8, grad_accumulation_factor=8, num_workers=4,
                dynamic_batching=False,  # fixed batches of 8: memory stays predictable
                fused_optimizer=False),
    "cpu": dict(precision="fp32", batch_size=4, grad_accumulation_factor=1, num_workers=2,
                dynamic_batching=False, fused_optimizer=True),
}
# Keys that SpeechBrain parses itself as run options (the others arrive as YAML overrides).
RUN_OPTION_KEYS = ("precision", "grad_accumulation_factor")


def _requested_device(argv):
    """The value of --device in argv (``--device x`` or ``--device=x``), or None."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


def set_mps_fallback_env(argv):
    """Sets PYTORCH_ENABLE_MPS_FALLBACK=1 when the run will (or may) use MPS; torch-free.

    MPS is the target when ``--device mps`` is given, or when no device is given on an Apple
    silicon Mac (the best available device there). Returns a log line, or None.
    """
    device = _requested_device(argv)
    on_apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    if (device or "").startswith("mps") or (device is None and on_apple_silicon):
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
        return ("PYTORCH_ENABLE_MPS_FALLBACK=%s set before importing torch: operators missing on "
                "MPS run on the CPU" % os.environ["PYTORCH_ENABLE_MPS_FALLBACK"])
    return None


def best_available_device():
    """'cuda' if CUDA is available, else 'mps' if MPS is available, else 'cpu'."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(requested=None, local_rank=None):
    """The device string to run on: ``requested`` (cuda[:i] | mps | cpu) or the best available.

    Under torchrun (``local_rank`` set) a bare 'cuda' becomes 'cuda:<local_rank>'.
    Raises RecipeError for unknown or unavailable devices.
    """
    import torch

    device = requested or best_available_device()
    kind = device.split(":")[0]
    if kind not in PRESETS:
        raise RecipeError(f"--device {device!r}: expected cuda, cuda:N, mps or cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RecipeError("--device cuda was requested but torch.cuda.is_available() is False; "
                         "use --device cpu (or mps on a Mac)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise RecipeError("--device mps was requested but torch.backends.mps.is_available() is "
                         "False; use --device cpu")
    if device == "cuda" and local_rank is not None:
        device = f"cuda:{local_rank}"
    return device
