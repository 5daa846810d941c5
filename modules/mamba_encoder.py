"""Bidirectional-Mamba encoder (a pre-norm Transformer with Mamba instead of self-attention) and the
layer stack both Mamba encoders share (SpeechBrain's encoder call convention).

Shapes: B batch, L frames, D d_model; padding masks (B, L) bool, True at padded frames (right
padding only).
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from speechbrain.nnet.attention import PositionalwiseFeedForward
from speechbrain.nnet.normalization import LayerNorm

from modules.mamba.config import build_mamba, check_mamba_config
from modules.mamba.mamba_blocks import scan_work_per_frame, valid_lengths
from modules.mamba.scan import anticipate_cpu_scans


def no_chunking(dynchunktrain_config):
    if dynchunktrain_config is not None:
        raise ValueError(
            "Dynamic chunk training is not supported by Mamba encoders (a Mamba scan cannot be "
            "restricted to chunks); remove dynchunktrain_config for encoder_module conmamba/mamba"
        )


def mamba_mix(mamba, x, pad_mask=None, lengths=None, cache=None):
    """(Bi)Mamba block on x (B, L, D) (lengths: valid frames (B,) of pad_mask, when known). A
    single streamed frame goes through Mamba.step: the same output as a scan of length 1, with a
    fraction of its per-call overhead."""
    if cache is not None and pad_mask is None and x.shape[1] == 1:
        return mamba.step(x, cache)
    return mamba(x, pad_mask=pad_mask, cache=cache, lengths=lengths)


class EncoderStack(nn.Module):
    """Layer stack + final LayerNorm(eps 1e-6) with SpeechBrain's encoder call convention.

    forward(src, src_mask=None, src_key_padding_mask=None, pos_embs=None, dynchunktrain_config=None)
    -> (out (B, L, D), None) or (out, None, hidden_states) when output_hidden_states.
    src_mask and pos_embs are accepted for interface compatibility and ignored (Mamba needs
    neither).
    """

    def __init__(
        self,
        layers,
        d_model,
        output_hidden_states=False,
        layerdrop_prob=0.0,
        gradient_checkpointing=False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = LayerNorm(d_model, eps=1e-6)
        self.output_hidden_states = output_hidden_states
        self.layerdrop_prob = layerdrop_prob
        self.gradient_checkpointing = gradient_checkpointing
        self.scan_work_per_frame = scan_work_per_frame(self)  # state updates per frame

    def forward(
        self,
        src,
        src_mask=None,
        src_key_padding_mask=None,
        pos_embs=None,
        dynchunktrain_config=None,
        cache=None,
    ):
        """cache: one streaming state per layer (``modules.streaming.LayerCache``) or None."""
        no_chunking(dynchunktrain_config)
        lengths = None  # valid frames (B,), derived from the mask once for every layer
        if src_key_padding_mask is not None:
            lengths = valid_lengths(src, src_key_padding_mask)
        if cache is not None:  # streaming: every layer, no layerdrop nor checkpointing
            output = src
            for layer, layer_cache in zip(self.layers, cache):
                output = layer(output, src_key_padding_mask, lengths, cache=layer_cache)
            return self.norm(output), None
        # a long input: the CPU scans' compiled kernels are worth loading before the first layer
        anticipate_cpu_scans(src, src.shape[0] * src.shape[1] * self.scan_work_per_frame)
        output = src
        hidden_states = [output]
        drop = self.training and self.layerdrop_prob > 0.0
        keep = torch.rand(len(self.layers)) > self.layerdrop_prob if drop else None
        for i, layer in enumerate(self.layers):
            if keep is not None and not keep[i]:
                continue
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                output = checkpoint(layer, output, src_key_padding_mask, lengths,
                                    use_reentrant=False)
            else:
                output = layer(output, src_key_padding_mask, lengths)
            hidden_states.append(output)
        output = self.norm(output)
        if self.output_hidden_states:
            return output, None, hidden_states
        return output, None


class MambaEncoderLayer(nn.Module):
    """Pre-norm Transformer layer, self-attention replaced by (Bi)Mamba.

    x + Mamba(LN x); x + FFN(LN x).
    """

    def __init__(
        self, d_model, d_ffn, activation=nn.GELU, dropout=0.0, causal=False, mamba_config=None
    ):
        super().__init__()
        cfg = check_mamba_config(mamba_config)
        self.mamba = build_mamba(d_model, cfg, cfg["bidirectional"] and not causal)
        self.pos_ffn = PositionalwiseFeedForward(
            d_ffn=d_ffn, input_size=d_model, dropout=dropout, activation=activation
        )
        self.norm1 = LayerNorm(d_model)
        self.norm2 = LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x, src_key_padding_mask=None, lengths=None, cache=None):
        """x: (B, L, D), src_key_padding_mask: (B, L) bool or None, lengths: its valid frames
        (B,) or None -> (B, L, D); cache: see ConmambaEncoderLayer.forward (only its ``mamba``
        state is used)."""
        mamba_cache = None if cache is None else cache.mamba
        x = x + self.dropout1(mamba_mix(self.mamba, self.norm1(x), src_key_padding_mask,
                                        lengths, mamba_cache))
        return x + self.dropout2(self.pos_ffn(self.norm2(x)))


class MambaEncoder(EncoderStack):
    """N (bidirectional) Mamba layers + final LayerNorm(eps 1e-6)."""

    def __init__(
        self,
        num_layers,
        d_model,
        d_ffn,
        activation=nn.GELU,
        dropout=0.0,
        causal=False,
        mamba_config=None,
        **base_kwargs,
    ):
        layers = [
            MambaEncoderLayer(d_model, d_ffn, activation, dropout, causal, mamba_config)
            for _ in range(num_layers)
        ]
        super().__init__(layers, d_model, **base_kwargs)
