"""Mamba block configuration: the ``mamba_config`` mapping of the YAMLs, validated, and the
Mamba / BiMamba block it describes."""

from torch import nn

from .mamba_blocks import BiMamba, Mamba

MAMBA_DEFAULTS = {"d_state": 16, "expand": 2, "d_conv": 4, "bidirectional": True}
# Optional Mamba constructor arguments that may also be set through mamba_config.
MAMBA_OPTIONAL_KEYS = (
    "dt_rank",
    "dt_min",
    "dt_max",
    "dt_init",
    "dt_scale",
    "dt_init_floor",
    "conv_bias",
    "bias",
    "bimamba_merge",  # "mean" (default) or "sum" of the two directions, bidirectional blocks only
)


def check_mamba_config(mamba_config) -> dict:
    """Validated copy of ``mamba_config`` with defaults filled in (the argument is never
    mutated)."""
    if mamba_config is None:
        return dict(MAMBA_DEFAULTS)
    if not hasattr(mamba_config, "keys"):
        raise TypeError(
            f"mamba_config must be a mapping like {MAMBA_DEFAULTS}, "
            f"got {type(mamba_config).__name__}"
        )
    allowed = set(MAMBA_DEFAULTS) | set(MAMBA_OPTIONAL_KEYS)
    for key in mamba_config:
        if key not in allowed:
            raise ValueError(
                f"mamba_config: unknown key {key!r}; allowed keys: {', '.join(sorted(allowed))} "
                "(fix the mamba_config entry of your hparams YAML)"
            )
    config = {**MAMBA_DEFAULTS, **mamba_config}
    for key in ("d_state", "d_conv"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"mamba_config: {key} must be a whole number >= 1, got {value!r}")
    expand = config["expand"]
    if isinstance(expand, bool) or not isinstance(expand, (int, float)) or expand <= 0:
        raise ValueError(f"mamba_config: expand must be a number > 0, got {expand!r}")
    if not isinstance(config["bidirectional"], bool):
        raise ValueError("mamba_config: bidirectional must be True or False, got "
                         f"{config['bidirectional']!r}")
    if config.get("bimamba_merge", "mean") not in ("mean", "sum"):
        raise ValueError("mamba_config: bimamba_merge must be 'mean' or 'sum', got "
                         f"{config['bimamba_merge']!r}")
    return config


def build_mamba(d_model: int, mamba_config: dict, bidirectional: bool) -> nn.Module:
    """Mamba or BiMamba (bimamba v2) from a validated config; ``bidirectional`` overrides the
    config's."""
    kwargs = {k: v for k, v in mamba_config.items() if k not in ("bidirectional", "bimamba_merge")}
    if bidirectional:
        merge = mamba_config.get("bimamba_merge", "mean")
        return BiMamba(d_model=d_model, bimamba_type="v2", merge=merge, **kwargs)
    return Mamba(d_model=d_model, **kwargs)
