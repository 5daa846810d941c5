"""Padding masks become valid lengths once per forward: the encoder and decoder stacks derive
them and pass them to every Mamba layer."""

import torch

import modules.mamba.mamba_blocks as blocks
from modules.Conmamba import ConmambaEncoder
from modules.mamba_decoder import MambaDecoder
from modules.mamba_encoder import MambaEncoder

CONFIG = {"d_state": 4, "expand": 2, "d_conv": 4, "bidirectional": True}


def _counting(monkeypatch):
    calls = []
    original = blocks._lengths

    def counted(pad_mask, x):
        calls.append(tuple(pad_mask.shape))
        return original(pad_mask, x)

    monkeypatch.setattr(blocks, "_lengths", counted)
    return calls


def _batch():
    x = torch.randn(2, 9, 16)
    mask = torch.arange(9)[None, :] >= torch.tensor([9, 6])[:, None]  # True at padding
    return x, mask


def test_encoders_derive_lengths_once(monkeypatch):
    calls = _counting(monkeypatch)
    x, mask = _batch()
    for encoder in (ConmambaEncoder(3, 16, 32, mamba_config=CONFIG),
                    MambaEncoder(3, 16, 32, mamba_config=CONFIG)):
        calls.clear()
        out, _ = encoder.eval()(x, src_key_padding_mask=mask)
        assert calls == [(2, 9)]
        alone, _ = encoder(x[1:, :6])  # what the lengths stand for: padding is ignored
        torch.testing.assert_close(out[1:, :6], alone, rtol=1e-5, atol=1e-5)


def test_decoder_derives_memory_lengths_once(monkeypatch):
    calls = _counting(monkeypatch)
    memory, mask = _batch()
    decoder = MambaDecoder(3, 16, 32, mamba_config={**CONFIG, "bidirectional": False}).eval()
    tgt = torch.randn(2, 4, 16)
    out, _, _ = decoder(tgt, memory, memory_key_padding_mask=mask)
    assert calls == [(2, 9)]
    alone, _, _ = decoder(tgt[1:], memory[1:, :6])
    torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-5)
