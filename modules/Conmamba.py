"""ConMamba encoder (arXiv 2407.09732): Conformer layers with (bidirectional) Mamba in place of
self-attention.

Assembled from SpeechBrain parts (ConvolutionModule, PositionalwiseFeedForward, LayerNorm) and the
Mamba core in ``modules.mamba``. Submodule names equal those of the official xi-j/Mamba-ASR
checkpoints. Unlike the official code, padding is honoured: an utterance in a padded batch gives the
same output as alone (Mamba scans get ``pad_mask``, the depthwise convolution never reads padded
frames).

Shapes: B batch, L frames, D d_model. Padding masks are (B, L) bool, True at padded frames
(SpeechBrain's key-padding convention), right padding only.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule
from speechbrain.nnet.attention import PositionalwiseFeedForward
from speechbrain.nnet.normalization import LayerNorm

from modules.mamba.config import build_mamba, check_mamba_config
from modules.mamba_encoder import EncoderStack, mamba_mix, no_chunking


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


def depthwise_conv1d(x, weight, bias, left, right):
    """Depthwise convolution as shifted multiply-adds: x (B, C, L), weight (C, 1, K), bias (C,)
    or None, zero padding left / right -> (B, C, L + left + right - K + 1).

    At inference on CPU this is 1.2-2x faster than the (mkldnn) grouped convolution for the
    conv module's kernel of 31 at batch 1 (one vectorised pass over the sequence per tap); with
    gradients the convolution's backward is faster, so training keeps it.
    """
    padded = F.pad(x, (left, right))
    taps = weight[:, 0, :]
    length = padded.shape[-1] - taps.shape[-1] + 1
    out = padded[..., :length] * taps[:, :1]
    if bias is not None:
        out.add_(bias[:, None])
    for k in range(1, taps.shape[-1]):
        out.addcmul_(padded[..., k:k + length], taps[:, k:k + 1])
    return out


class MaskedConvolutionModule(ConvolutionModule):
    """SpeechBrain's Conformer convolution module that never reads padded frames.

    Padded frames are zeroed after the pointwise conv + GLU, i.e. right before the depthwise
    convolution, which therefore sees the same zeros as at the end of an unpadded sequence.
    """

    def forward(self, x, pad_mask: Optional[torch.Tensor] = None, dynchunktrain_config=None,
                cache=None):
        """x: (B, L, D), pad_mask: (B, L) bool or None -> (B, L, D).

        cache (causal modules, streaming): an object whose ``conv`` attribute holds the last
        ``padding`` depthwise-conv inputs (B, D, padding) of the previous piece; it replaces the
        zero left padding and is updated in place.
        """
        no_chunking(dynchunktrain_config)
        # the pointwise conv + GLU as a linear layer on (B, L, D): one matmul instead of a
        # 1x1 convolution on the transposed activations (same parameters and output)
        pointwise = self.bottleneck[0]
        out = F.glu(F.linear(self.layer_norm(x), pointwise.weight[..., 0], pointwise.bias))
        if pad_mask is not None:
            out = out.masked_fill(pad_mask.unsqueeze(-1), 0.0)
        out = out.transpose(1, 2)  # (B, D, L)
        conv = self.conv
        shifted = (out.device.type == "cpu" and conv.dilation == (1,)
                   and out.dtype == conv.weight.dtype
                   and not (torch.is_grad_enabled() and out.requires_grad))
        if cache is not None:
            if not self.causal:
                raise ValueError("Only a causal convolution module can carry a streaming cache")
            full = torch.cat([cache.conv.to(out.dtype), out], dim=-1)
            cache.conv.copy_(full[..., full.shape[-1] - self.padding:].detach())
            if shifted:
                out = depthwise_conv1d(full, conv.weight, conv.bias, 0, 0)
            else:
                out = F.conv1d(full, conv.weight, conv.bias, dilation=conv.dilation,
                               groups=conv.groups)
        elif shifted:  # causal: the left padding only (the right one's outputs are cut)
            pad = conv.padding[0]
            out = depthwise_conv1d(out, conv.weight, conv.bias, pad, 0 if self.causal else pad)
        else:
            out = conv(out)
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

    def forward(self, x, src_key_padding_mask=None, lengths=None, cache=None):
        """x: (B, L, D), src_key_padding_mask: (B, L) bool or None, lengths: its valid frames
        (B,) or None -> (B, L, D).

        cache: streaming state of a causal layer (``modules.streaming.LayerCache``: ``mamba``
        MambaCache, ``conv`` conv-module context), updated in place; None offline.
        """
        x = x + 0.5 * self.ffn_module1(x)
        x = x + mamba_mix(self.mamba, self.norm1(x), src_key_padding_mask, lengths,
                          None if cache is None else cache.mamba)
        x = x + self.convolution_module(x, src_key_padding_mask, cache=cache)
        return self.norm2(x + 0.5 * self.ffn_module2(x))


class ConmambaEncoder(EncoderStack):
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
