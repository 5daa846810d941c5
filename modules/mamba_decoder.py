"""Mamba decoder (ConMamba paper's "Mamba decoder"): per layer a causal self-Mamba over the
target prefix, a cross-Mamba over [memory; prefix] whose outputs at the prefix are kept, and an
FFN; with recurrent state for O(1)-per-token decoding (``init_state`` / ``step``).

Shapes: B batch, L source frames, T target tokens, D d_model. The memory padding mask is (B, L)
bool, True at padded frames (right padding only); each utterance's cross-Mamba scans only its
valid memory.
"""

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from speechbrain.nnet.attention import PositionalwiseFeedForward
from speechbrain.nnet.normalization import LayerNorm

from modules.mamba.config import build_mamba, check_mamba_config
from modules.mamba.mamba_blocks import valid_lengths


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
        mem_lens=None,
    ):
        """tgt (B, T, D), memory (B, L, D) -> ((B, T, D), None, None). The Mamba scans are causal,
        so tgt_mask / tgt padding (right) are implied; memory padding is removed per utterance
        (mem_lens (B,): valid memory frames, else derived from memory_key_padding_mask)."""
        if mem_lens is None:
            mem_lens = valid_lengths(memory, memory_key_padding_mask)

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
        mem_lens = valid_lengths(memory, memory_key_padding_mask)  # once for every layer
        for layer in self.layers:
            output, _, _ = layer(output, memory, mem_lens=mem_lens)
        return self.norm(output), [None], [None]

    @torch.no_grad()
    def init_state(self, memory, mem_lens=None) -> MambaDecoderState:
        """Decoding state before the first token; memory (B, L, D), mem_lens (B,) valid frames."""
        if mem_lens is None:
            mem_lens = valid_lengths(memory)
        elif (mem_lens.shape != memory.shape[:1] or mem_lens.is_floating_point()
              or (len(mem_lens) and not 0 <= int(mem_lens.min()) <= int(mem_lens.max())
                  <= memory.shape[1])):
            raise ValueError(
                f"mem_lens must be integer frame counts in [0, {memory.shape[1]}], one per "
                f"sequence (shape ({memory.shape[0]},)), got {mem_lens.dtype} "
                f"{mem_lens.tolist() if mem_lens.numel() <= 8 else tuple(mem_lens.shape)} "
                "(relative lengths: multiply by the frame count and round)")
        mem_lens = mem_lens.to(memory.device).long()
        return MambaDecoderState([layer.init_caches(memory, mem_lens) for layer in self.layers])

    @torch.no_grad()
    def step(self, x, state: MambaDecoderState):
        """x (N, 1, D) embedded token at position state.step -> (N, 1, D); advances ``state``."""
        for layer, (self_cache, cross_cache) in zip(self.layers, state.caches):
            x = layer.step(x, self_cache, cross_cache)
        state.step += 1
        return self.norm(x)
