"""SpeechBrain's TransformerASR with ConMamba / Mamba encoders and a Mamba decoder.

A subclass of ``speechbrain.lobes.models.transformer.TransformerASR.TransformerASR``: SpeechBrain
builds the positional encodings, the front linear layer and its own encoders/decoder; the Mamba
modules (``modules.Conmamba``, ``modules.mamba_encoder``, ``modules.mamba_decoder``) are swapped
in. forward / encode / decode are SpeechBrain's, so its beam searchers, scorers and inference
classes work unchanged. With the official dimensions the
state_dict has exactly the official xi-j/Mamba-ASR key names, shapes and order.

Deliberate difference from the official code: after SpeechBrain's xavier initialisation of every
>1-dim parameter, Mamba parameters get their own initialisation back (``reset_mamba_parameters``).
"""

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from speechbrain.lobes.models.transformer.Transformer import NormalizedEmbedding
from speechbrain.lobes.models.transformer.TransformerASR import TransformerASR as SBTransformerASR
from speechbrain.nnet.activations import Swish
from speechbrain.nnet.containers import ModuleList

from modules.Conmamba import ConmambaEncoder
from modules.mamba import reset_mamba_parameters
from modules.mamba.config import check_mamba_config
from modules.mamba_decoder import MambaDecoder, MambaDecoderState
from modules.mamba_encoder import MambaEncoder

SPEECHBRAIN_ENCODERS = ("transformer", "conformer", "branchformer")
MAMBA_ENCODERS = ("conmamba", "mamba")
DECODERS = ("transformer", "mamba")
# Registration order of the official checkpoints (optimizer states index parameters by this order).
MODULE_ORDER = (
    "positional_encoding",
    "positional_encoding_decoder",
    "encoder",
    "decoder",
    "custom_src_module",
    "custom_tgt_module",
)


def _checkpointed_forward(forward, *args, **kwargs):
    if torch.is_grad_enabled() and forward.__self__.training:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


class TransformerASR(SBTransformerASR):
    """TransformerASR with ``encoder_module`` in {transformer, conformer, branchformer, conmamba,
    mamba} and ``decoder_module`` in {transformer, mamba}.

    Arguments are SpeechBrain's TransformerASR arguments plus:
    decoder_module: "transformer" or "mamba" (unused when num_decoder_layers is 0, i.e. CTC only).
    conmamba_activation: activation of the ConMamba conv module and FFNs. GELU by default, which is
        what the official recipes run with (their ConMamba encoder receives
        ``branchformer_activation``).
    mamba_config: dict with d_state, expand, d_conv, bidirectional (and optionally dt_rank, dt_min,
        dt_max, dt_init, dt_scale, dt_init_floor, conv_bias, bias). Never mutated.
    encoder_gradient_checkpointing: recompute each encoder layer in the backward pass
        (torch.utils.checkpoint, non-reentrant): same loss and gradients, lower peak memory.

    Example
    -------
    >>> net = TransformerASR(50, 40, d_model=32, nhead=4, num_encoder_layers=2,
    ...     num_decoder_layers=2, d_ffn=64, encoder_module="conmamba", decoder_module="mamba",
    ...     attention_type="RelPosMHAXL", normalize_before=True, causal=False,
    ...     mamba_config={"d_state": 8, "bidirectional": True})
    >>> enc, dec = net(torch.rand(3, 20, 40), torch.randint(1, 50, (3, 7)))
    >>> enc.shape, dec.shape
    (torch.Size([3, 20, 32]), torch.Size([3, 7, 32]))
    """

    def __init__(
        self,
        tgt_vocab,
        input_size,
        d_model=512,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        d_ffn=2048,
        dropout=0.1,
        activation=nn.ReLU,
        positional_encoding="fixed_abs_sine",
        normalize_before=False,
        kernel_size=31,
        bias=True,
        encoder_module="transformer",
        decoder_module="transformer",
        conformer_activation=Swish,
        branchformer_activation=nn.GELU,
        conmamba_activation=nn.GELU,
        attention_type="regularMHA",
        max_length=2500,
        causal=None,
        csgu_linear_units=3072,
        gate_activation=nn.Identity,
        use_linear_after_conv=False,
        output_hidden_states=False,
        layerdrop_prob=0.0,
        mamba_config=None,
        encoder_gradient_checkpointing=False,
    ):
        if encoder_module not in SPEECHBRAIN_ENCODERS + MAMBA_ENCODERS:
            raise ValueError(
                f"encoder_module {encoder_module!r} is not one of "
                f"{', '.join(SPEECHBRAIN_ENCODERS + MAMBA_ENCODERS)}"
            )
        if decoder_module not in DECODERS:
            raise ValueError(
                f"decoder_module {decoder_module!r} is not one of {', '.join(DECODERS)}"
            )
        mamba_encoder = encoder_module in MAMBA_ENCODERS and num_encoder_layers > 0
        mamba_decoder = decoder_module == "mamba" and num_decoder_layers > 0
        mamba_cfg = check_mamba_config(mamba_config)
        if causal is None and mamba_encoder and (mamba_config or {}).get("bidirectional"):
            raise ValueError(
                "causal is not given: SpeechBrain then assumes causal=True, which makes the Mamba "
                "encoder unidirectional although mamba_config asks bidirectional=True; pass "
                "causal=False for a bidirectional encoder, or causal=True with bidirectional False")
        if encoder_module == "conmamba" and not normalize_before:
            raise ValueError(
                "normalize_before must be True for encoder_module conmamba (as for conformer)"
            )

        # SpeechBrain builds no encoder for an encoder_module it does not know; its decoder is
        # skipped by passing 0 decoder layers when ours is a Mamba decoder.
        super().__init__(
            tgt_vocab=tgt_vocab,
            input_size=input_size,
            d_model=d_model,
            nhead=nhead,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=0 if mamba_decoder else num_decoder_layers,
            d_ffn=d_ffn,
            dropout=dropout,
            activation=activation,
            positional_encoding=positional_encoding,
            normalize_before=normalize_before,
            kernel_size=kernel_size,
            bias=bias,
            encoder_module=encoder_module,
            conformer_activation=conformer_activation,
            branchformer_activation=branchformer_activation,
            attention_type=attention_type,
            max_length=max_length,
            causal=causal,
            csgu_linear_units=csgu_linear_units,
            gate_activation=gate_activation,
            use_linear_after_conv=use_linear_after_conv,
            output_hidden_states=output_hidden_states,
            layerdrop_prob=layerdrop_prob,
        )
        self.encoder_module = encoder_module
        self.decoder_module = decoder_module if num_decoder_layers > 0 else None
        self.num_decoder_layers = num_decoder_layers
        self.mamba_config = mamba_cfg

        new_modules = []
        if mamba_encoder:
            common = dict(
                num_layers=num_encoder_layers,
                d_model=d_model,
                d_ffn=d_ffn,
                dropout=dropout,
                causal=self.causal,
                mamba_config=mamba_cfg,
                output_hidden_states=output_hidden_states,
                layerdrop_prob=layerdrop_prob,
            )
            if encoder_module == "conmamba":
                self.encoder = ConmambaEncoder(
                    kernel_size=kernel_size, bias=bias, activation=conmamba_activation, **common
                )
            else:
                self.encoder = MambaEncoder(activation=activation, **common)
            new_modules.append(self.encoder)
        if mamba_decoder:
            self.decoder = MambaDecoder(
                num_layers=num_decoder_layers,
                d_model=d_model,
                d_ffn=d_ffn,
                activation=activation,
                dropout=dropout,
                normalize_before=normalize_before,
                mamba_config=mamba_cfg,
            )
            self.custom_tgt_module = ModuleList(NormalizedEmbedding(d_model, tgt_vocab))
            new_modules += [self.decoder, self.custom_tgt_module]
        for module in new_modules:  # same xavier init SpeechBrain gave the rest of the model
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_normal_(p)
        reset_mamba_parameters(self)

        for name in MODULE_ORDER:
            if name in self._modules:
                self._modules[name] = self._modules.pop(name)
        if encoder_gradient_checkpointing and num_encoder_layers > 0:
            self.enable_encoder_gradient_checkpointing()

    def enable_encoder_gradient_checkpointing(self):
        """Recompute every encoder layer during backward (training only; state_dict unchanged)."""
        if hasattr(self.encoder, "gradient_checkpointing"):
            self.encoder.gradient_checkpointing = True
            return
        for layer in self.encoder.layers:  # SpeechBrain encoders: wrap each layer's forward
            layer.forward = functools.partial(
                _checkpointed_forward, type(layer).forward.__get__(layer)
            )

    @torch.no_grad()
    def init_decoder_state(self, encoder_out, enc_len=None) -> MambaDecoderState:
        """Mamba-decoder state before the first token.

        encoder_out (N, L, D), enc_len (N,) absolute valid lengths or None (all L).
        """
        if self.decoder_module != "mamba":
            raise RuntimeError("init_decoder_state needs decoder_module 'mamba'")
        return self.decoder.init_state(encoder_out, enc_len)

    @torch.no_grad()
    def decode_step(self, tokens, state: MambaDecoderState):
        """Decoder output for one new token per hypothesis, in O(1) of the prefix length.

        tokens (N,) long -> (N, 1, D); ``state`` advances by one token. Equals the last frame of
        ``decode(prefix + [token], encoder_out, enc_len)``.
        """
        x = self.custom_tgt_module(tokens.reshape(-1, 1))
        pe = self._decoder_positional_encoding()
        if pe is not None:
            x = x + pe.pe[:, state.step : state.step + 1]
        return self.decoder.step(x, state)

    def _decoder_positional_encoding(self):
        """The positional encoding SpeechBrain's decode() adds to target embeddings, or None."""
        if self.attention_type in ("RelPosMHAXL", "RoPEMHA"):
            return self.positional_encoding_decoder
        if self.positional_encoding_type == "fixed_abs_sine":
            return self.positional_encoding
        return None


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["TransformerASR", "count_parameters"]
