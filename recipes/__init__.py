"""Shared code of train_CTC.py and train_S2S.py (devices, hparams loading, data, export).

Importing this package does not import torch: ``recipes.device.set_mps_fallback_env`` must run
before torch is imported.
"""


class RecipeError(Exception):
    """A problem the user can fix (bad data, missing files, unreachable hub...): the training
    scripts print its message without a traceback and exit with status 1."""
