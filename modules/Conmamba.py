"""ConMamba encoder (arXiv 2407.09732), bidirectional-Mamba encoder and Mamba decoder.

Assembled from SpeechBrain parts (ConvolutionModule, PositionalwiseFeedForward, LayerNorm) and the
Mamba core in ``modules.mamba``. Submodule names equal those of the official xi-j/Mamba-ASR
checkpoints. Unlike the official code, padding is honoured: an utterance in a padded batch gives the
same output as alone (Mamba scans get ``pad_mask``, the depthwise convolution never reads padded
frames, the decoder's cross-Mamba scans ``[valid memory; target]`` per utterance).

Shapes: B batch, L source frames, T target tokens, D d_model. Padding masks are (B, L) bool, True at
padded frames (SpeechBrain's key-padding convention), right padding only.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule
from speechbrain.nnet.attention import PositionalwiseFeedForward
from speechbrain.nnet.normalization import LayerNorm

from modules.mamba import BiMamba, Mamba

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
    return {**MAMBA_DEFAULTS, **mamba_config}


def build_mamba(d_model: int, mamba_config: dict, bidirectional: bool) -> nn.Module:
    """Mamba or BiMamba (bimamba v2) from a validated config; ``bidirectional`` overrides the
    config's."""
    kwargs = {k: v for k, v in mamba_config.items() if k not in ("bidirectional", "bimamba_merge")}
    if bidirectional:
        merge = mamba_config.get("bimamba_merge", "mean")
        return BiMamba(d_model=d_model, bimamba_type="v2", merge=merge, **kwargs)
    return Mamba(d_model=d_model, **kwargs)


def _feed_forward(d_model, d_ffn, activation, dropout):
    """Pre-norm FFN of the macaron blocks: LayerNorm -> Linear -> act -> Dropout -> Linear ->
    Dropout."""
    return nn.Sequential(
        nn.LayerNorm(d_model),
        PositionalwiseFeedForward(
            d_ffn=d_ffn, input_size=d_model, dropout=dropout, activation=activation
        ),
        nn.Dropout(dropout),
    )


def _no_chunking(dynchunktrain_config):
    if dynchunktrain_config is not None:
        raise ValueError(
            "Dynamic chunk training is not supported by Mamba encoders (a Mamba scan cannot be "
            "restricted to chunks); remove dynchunktrain_config for encoder_module conmamba/mamba"
        )


class MaskedConvolutionModule(ConvolutionModule):
    """SpeechBrain's Conformer convolution module that never reads padded frames.

    Padded frames are zeroed after the pointwise conv + GLU, i.e. right before the depthwise
    convolution, which therefore sees the same zeros as at the end of an unpadded sequence.
    """

    def forward(self, x, pad_mask: Optional[torch.Tensor] = None, dynchunktrain_config=None):
        """x: (B, L, D), pad_mask: (B, L) bool or None -> (B, L, D)."""
        _no_chunking(dynchunktrain_config)
        out = self.bottleneck(self.layer_norm(x).transpose(1, 2))  # (B, D, L)
        if pad_mask is not None:
            out = out.masked_fill(pad_mask.unsqueeze(1), 0.0)
        out = self.conv(out)
        if self.causal:
            out = out[..., : -self.padding]
        return self.after_conv(out.transpose(1, 2))


class ConmambaEncoderLayer(nn.Module):
    """x + FFN/2; x + (Bi)Mamba(LN x); x + Conv(x); LN(x + FFN/2)  (official ConMamba order)."""

    def __init__(
        self,
        d_model,
        d_ffn,
        kernel_size=31,
        activation=nn.GELU,
        bias=True,
        dropout=0.0,
        causal=False,
        mamba_config=None,
    ):
        super().__init__()
        cfg = check_mamba_config(mamba_config)
        self.mamba = build_mamba(d_model, cfg, cfg["bidirectional"] and not causal)
        self.convolution_module = MaskedConvolutionModule(
            d_model, kernel_size, bias, activation, dropout, causal=causal
        )
        self.ffn_module1 = _feed_forward(d_model, d_ffn, activation, dropout)
        self.ffn_module2 = _feed_forward(d_model, d_ffn, activation, dropout)
        self.norm1 = LayerNorm(d_model)
        self.norm2 = LayerNorm(d_model)

    def forward(self, x, src_key_padding_mask=None):
        """x: (B, L, D), src_key_padding_mask: (B, L) bool or None -> (B, L, D)."""
        x = x + 0.5 * self.ffn_module1(x)
        x = x + self.mamba(self.norm1(x), pad_mask=src_key_padding_mask)
        x = x + self.convolution_module(x, src_key_padding_mask)
        return self.norm2(x + 0.5 * self.ffn_module2(x))


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

    def forward(self, x, src_key_padding_mask=None):
        """x: (B, L, D), src_key_padding_mask: (B, L) bool or None -> (B, L, D)."""
        x = x + self.dropout1(self.mamba(self.norm1(x), pad_mask=src_key_padding_mask))
        return x + self.dropout2(self.pos_ffn(self.norm2(x)))


class _MambaEncoderBase(nn.Module):
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

    def forward(
        self,
        src,
        src_mask=None,
        src_key_padding_mask=None,
        pos_embs=None,
        dynchunktrain_config=None,
    ):
        _no_chunking(dynchunktrain_config)
        output = src
        hidden_states = [output]
        drop = self.training and self.layerdrop_prob > 0.0
        keep = torch.rand(len(self.layers)) > self.layerdrop_prob if drop else None
        for i, layer in enumerate(self.layers):
            if keep is not None and not keep[i]:
                continue
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                output = checkpoint(layer, output, src_key_padding_mask, use_reentrant=False)
            else:
                output = layer(output, src_key_padding_mask)
            hidden_states.append(output)
        output = self.norm(output)
        if self.output_hidden_states:
            return output, None, hidden_states
        return output, None


class ConmambaEncoder(_MambaEncoderBase):
    """N ConMamba layers + final LayerNorm(eps 1e-6)."""

    def __init__(
        self,
        num_layers,
        d_model,
        d_ffn,
        kernel_size=31,
        activation=nn.GELU,
        bias=True,
        dropout=0.0,
        causal=False,
        mamba_config=None,
        **base_kwargs,
    ):
        layers = [
            ConmambaEncoderLayer(
                d_model, d_ffn, kernel_size, activation, bias, dropout, causal, mamba_config
            )
            for _ in range(num_layers)
        ]
        super().__init__(layers, d_model, **base_kwargs)


class MambaEncoder(_MambaEncoderBase):
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


def memory_lengths(memory, memory_key_padding_mask=None):
    """Valid frames per utterance (B,) long, from a (B, <=L) key-padding mask (None: all L)."""
    if memory_key_padding_mask is None:
        return torch.full(
            (memory.shape[0],), memory.shape[1], dtype=torch.long, device=memory.device
        )
    return (~memory_key_padding_mask).sum(dim=1).long()


def pack_memory_target(memory, tgt, mem_lens):
    """Per utterance [memory[:len]; tgt], right padded.

    memory (B, L, D), tgt (B, T, D), mem_lens (B,) -> packed (B, L+T, D) and out_index (B, T)
    such that packed[b, out_index[b, t]] == tgt[b, t]. Frames after an utterance's target repeat
    its last one (a causal scan never reads them). No host syncs: L + T frames for every batch.
    """
    L, T = memory.shape[1], tgt.shape[1]
    both = torch.cat([memory, tgt], dim=1)
    lens = mem_lens.to(tgt.device).unsqueeze(1)
    pos = torch.arange(L + T, device=tgt.device).unsqueeze(0)
    src = torch.where(pos < lens, pos, L + pos - lens).clamp(max=L + T - 1)
    packed = both.gather(1, src.unsqueeze(-1).expand(-1, -1, both.shape[-1]))
    out_index = lens + torch.arange(T, device=tgt.device).unsqueeze(0)
    return packed, out_index


@dataclass
class MambaDecoderState:
    """Per-hypothesis decoding state: for each layer (self_mamba cache, cross_mamba cache), and the
    number of target tokens consumed so far (the position of the next token)."""

    caches: List[tuple]
    step: int = 0

    def index_select(self, index):
        """State of the hypotheses ``index`` (beam reordering)."""
        return MambaDecoderState(
            [(s.index_select(index), c.index_select(index)) for s, c in self.caches], self.step
        )


class MambaDecoderLayer(nn.Module):
    """self-Mamba over the prefix; cross-Mamba over [memory; prefix] keeping the prefix; FFN.

    Each sub-block is ``x + f(LN x)`` (normalize_before) or ``LN(x + f(x))``; LayerNorms eps 1e-6.
    """

    def __init__(
        self,
        d_model,
        d_ffn,
        activation=nn.ReLU,
        dropout=0.0,
        normalize_before=False,
        mamba_config=None,
    ):
        super().__init__()
        cfg = check_mamba_config(mamba_config)
        self.self_mamba = build_mamba(d_model, cfg, bidirectional=False)
        self.cross_mamba = build_mamba(d_model, cfg, bidirectional=False)
        self.pos_ffn = PositionalwiseFeedForward(
            d_ffn=d_ffn, input_size=d_model, dropout=dropout, activation=activation
        )
        self.norm1 = LayerNorm(d_model, eps=1e-6)
        self.norm2 = LayerNorm(d_model, eps=1e-6)
        self.norm3 = LayerNorm(d_model, eps=1e-6)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _sub_block(self, x, fn, norm, dropout):
        if self.normalize_before:
            return x + dropout(fn(norm(x)))
        return norm(x + dropout(fn(x)))

    def _layer(self, tgt, self_mix, cross_mix):
        tgt = self._sub_block(tgt, self_mix, self.norm1, self.dropout1)
        tgt = self._sub_block(tgt, cross_mix, self.norm2, self.dropout2)
        return self._sub_block(tgt, self.pos_ffn, self.norm3, self.dropout3)

    def forward(
        self,
        tgt,
        memory,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        pos_embs_tgt=None,
        pos_embs_src=None,
    ):
        """tgt (B, T, D), memory (B, L, D) -> ((B, T, D), None, None). The Mamba scans are causal,
        so tgt_mask / tgt padding (right) are implied; memory padding is removed per utterance."""
        mem_lens = memory_lengths(memory, memory_key_padding_mask)

        def cross_mix(h):
            packed, out_index = pack_memory_target(memory, h, mem_lens)
            out = self.cross_mamba(packed)
            return out.gather(1, out_index.unsqueeze(-1).expand(-1, -1, out.shape[-1]))

        return self._layer(tgt, self.self_mamba, cross_mix), None, None

    def init_caches(self, memory, mem_lens):
        """(self cache, cross cache after each utterance's valid memory); memory (B, L, D)."""
        B = memory.shape[0]
        self_cache = self.self_mamba.allocate_inference_cache(B, device=memory.device)
        cross_cache = self.cross_mamba.allocate_inference_cache(B, device=memory.device)
        pad_mask = torch.arange(memory.shape[1], device=memory.device)[None] >= mem_lens[:, None]
        self.cross_mamba(memory, pad_mask=pad_mask, cache=cross_cache)
        return self_cache, cross_cache

    def step(self, x, self_cache, cross_cache):
        """One new token: x (N, 1, D) -> (N, 1, D); updates both caches in place."""
        return self._layer(
            x,
            lambda h: self.self_mamba.step(h, self_cache),
            lambda h: self.cross_mamba.step(h, cross_cache),
        )


class MambaDecoder(nn.Module):
    """N Mamba decoder layers + final LayerNorm(eps 1e-6), SpeechBrain's decoder call convention."""

    def __init__(
        self,
        num_layers,
        d_model,
        d_ffn,
        activation=nn.ReLU,
        dropout=0.0,
        normalize_before=False,
        mamba_config=None,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                MambaDecoderLayer(
                    d_model, d_ffn, activation, dropout, normalize_before, mamba_config
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = LayerNorm(d_model, eps=1e-6)

    def forward(
        self,
        tgt,
        memory,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        pos_embs_tgt=None,
        pos_embs_src=None,
    ):
        """tgt (B, T, D), memory (B, L, D) -> ((B, T, D), [None], [None])."""
        output = tgt
        for layer in self.layers:
            output, _, _ = layer(output, memory, memory_key_padding_mask=memory_key_padding_mask)
        return self.norm(output), [None], [None]

    @torch.no_grad()
    def init_state(self, memory, mem_lens=None) -> MambaDecoderState:
        """Decoding state before the first token; memory (B, L, D), mem_lens (B,) valid frames."""
        if mem_lens is None:
            mem_lens = memory_lengths(memory)
        mem_lens = mem_lens.to(memory.device).long()
        return MambaDecoderState([layer.init_caches(memory, mem_lens) for layer in self.layers])

    @torch.no_grad()
    def step(self, x, state: MambaDecoderState):
        """x (N, 1, D) embedded token at position state.step -> (N, 1, D); advances ``state``."""
        for layer, (self_cache, cross_cache) in zip(self.layers, state.caches):
            x = layer.step(x, self_cache, cross_cache)
        state.step += 1
        return self.norm(x)


__all__ = [
    "ConmambaEncoder",
    "ConmambaEncoderLayer",
    "MambaEncoder",
    "MambaEncoderLayer",
    "MambaDecoder",
    "MambaDecoderLayer",
    "MambaDecoderState",
    "MaskedConvolutionModule",
    "check_mamba_config",
    "build_mamba",
    "pack_memory_target",
]
