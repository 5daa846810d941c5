"""Streaming a causal CTC model (features -> normaliser -> CNN -> ConMamba/Mamba encoder ->
CTC linear) over audio pieces of any size, with the same log-probabilities as on the whole
utterance.

A model streams when every part reads a bounded future:

- features: ``CausalFbank`` (SpeechBrain's Fbank without its per-utterance log floor); a centred
  STFT frame t reads samples up to ``t * hop + win_length / 2``: 12.5 ms of look-ahead;
- normaliser: global statistics, frozen (eval mode);
- CNN: SpeechBrain's ``ConvolutionFrontEnd`` with ``padding: causal`` (valid in time, padded in
  frequency): encoder frame j reads feature frames 4j .. 4j + 6 and nothing later;
- encoder: ``causal: True`` (unidirectional Mamba, causal convolution modules), no absolute
  positional encoding.

``StreamingEncoder`` carries, between calls: the samples of the last STFT window, the feature
frames the CNN has not consumed, and per encoder layer the Mamba conv/SSM state (``MambaCache``)
and the conv module's left context (``LayerCache``). All of it has a fixed size, so memory does
not grow with the stream.
"""

import math
from dataclasses import dataclass
from typing import List

import torch
from torch.nn import functional as F

from speechbrain.lobes.features import Fbank
from speechbrain.nnet.CNN import Conv2d

from modules.mamba import BiMamba, MambaCache


class StreamingError(ValueError):
    """A model that cannot stream, or a misuse of a stream; the message says what to do."""


class CausalFbank(Fbank):
    """SpeechBrain's Fbank (same arguments) whose log-Mel floor does not depend on the future.

    Fbank clips every utterance at its own maximum minus 80 dB, a statistic of the whole
    utterance: a stream cannot know it, and digital silence at the start of a stream would be
    clipped differently from the same silence in a whole file. Here only the fixed amin floor
    (-100 dB) remains, so each frame depends on its own STFT window alone.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compute_fbanks.top_db = math.inf


class LayerCache:
    """Streaming state of one encoder layer.

    mamba: MambaCache of the layer's Mamba block (conv_state (B, d_inner, d_conv),
        ssm_state (B, d_inner, d_state)).
    conv: (B, D, kernel_size - 1) last inputs of the conv module's depthwise convolution
        (ConMamba layers; None for pure Mamba layers).
    """

    def __init__(self, mamba: MambaCache, conv=None):
        self.mamba, self.conv = mamba, conv


@dataclass
class StreamState:
    """Everything a stream carries between pieces (one stream, batch 1).

    samples: (S,) audio from sample ``sample0`` on: the left context of the next STFT frames
        plus the samples not yet covered by a complete window (S < (ctx + 1) * hop + win).
    received: samples pushed so far. next_feature: index of the next feature frame.
    features: (F, n_mels) normalised feature frames from ``stride * next_output`` on that the
        CNN has not consumed (F < the CNN's window of 7 frames).
    next_output: index of the next encoder frame. layers: one LayerCache per encoder layer.
    """

    samples: torch.Tensor
    sample0: int
    features: torch.Tensor
    layers: List[LayerCache]
    received: int = 0
    next_feature: int = 0
    next_output: int = 0
    finished: bool = False


def check_streamable(compute_features, normalize, cnn, transformer):
    """Raises StreamingError naming the first part of the model that reads the future."""
    fix = ("train a causal model: hparams/CTC/conmamba_streaming.yaml, or any CTC recipe with "
           "--causal True --cnn_padding causal and compute_features modules.streaming.CausalFbank")
    if getattr(transformer, "num_decoder_layers", 0):
        raise StreamingError(f"Streaming decodes CTC models only; this model has an attention "
                             f"decoder ({fix})")
    if transformer.encoder_module not in ("conmamba", "mamba"):
        raise StreamingError(f"Streaming needs a ConMamba or Mamba encoder, this model has "
                             f"{transformer.encoder_module!r} ({fix})")
    if any(isinstance(m, BiMamba) for m in transformer.encoder.modules()):
        raise StreamingError("This model is bidirectional (offline): its Mamba layers also read "
                             "each utterance backwards, from its end, so it cannot stream; "
                             + fix)
    conv_modules = [layer.convolution_module for layer in transformer.encoder.layers
                    if hasattr(layer, "convolution_module")]
    if any(not m.causal for m in conv_modules):
        raise StreamingError("The encoder's convolution modules look ahead (causal: False), so "
                             "the model cannot stream; " + fix)
    absolute = (transformer.attention_type not in ("RelPosMHAXL", "RoPEMHA", "hypermixing")
                and transformer.positional_encoding_type == "fixed_abs_sine")
    if absolute:
        raise StreamingError("The encoder adds absolute positional encodings (attention_type "
                             f"{transformer.attention_type!r}), which a stream longer than "
                             "max_length cannot have; use attention_type RelPosMHAXL")
    paddings = {m.padding for m in cnn.modules() if isinstance(m, Conv2d)}
    if paddings != {"causal"}:
        raise StreamingError(f"The CNN front end pads time with {sorted(paddings)} padding, "
                             "which looks ahead and reflects the utterance's end; " + fix)
    stft = compute_features.compute_STFT
    if not stft.center or stft.pad_mode != "constant":
        raise StreamingError("The STFT must be centred with zero padding (SpeechBrain's default)")
    if math.isfinite(compute_features.compute_fbanks.top_db):
        raise StreamingError("The features clip each utterance at its maximum minus top_db, which "
                             "depends on the future; use modules.streaming.CausalFbank")
    if normalize is not None and normalize.norm_type != "global":
        raise StreamingError(f"The normaliser uses {normalize.norm_type!r} statistics of the "
                             "whole utterance; streaming needs norm_type global")


def _stft_window(stft):
    """(first, last + 1) sample offsets, relative to t * hop, that STFT frame t reads with a
    non-zero window (torch.stft centres the window in n_fft, and the frame at t * hop)."""
    first = (stft.n_fft - stft.win_length) // 2 - stft.n_fft // 2
    return first, first + stft.win_length


def lookahead_ms(compute_features, cnn, transformer):
    """Look-ahead of each part in ms (math.inf: the whole utterance) and their sum ("total").

    An encoder frame is placed at the time of the newest feature frame of its CNN window
    (causal CNN) or at its centre ("same" padding).
    """
    stft = compute_features.compute_STFT
    rate = stft.sample_rate
    hop_ms = 1000 * stft.hop_length / rate
    props = cnn.get_filter_properties()
    paddings = {m.padding for m in cnn.modules() if isinstance(m, Conv2d)}
    cnn_frames = 0 if paddings == {"causal"} else (props.window_size - 1) // 2
    frame_ms = hop_ms * props.stride
    encoder = transformer.encoder
    if any(isinstance(m, BiMamba) for m in encoder.modules()):
        mamba = math.inf
    else:
        mamba = 0.0
    conv = 0.0
    for layer in getattr(encoder, "layers", []):
        module = getattr(layer, "convolution_module", None)
        if module is not None and not module.causal:
            conv += (module.kernel_size - 1) // 2 * frame_ms
    parts = {
        "features": 1000 * _stft_window(stft)[1] / rate,
        "cnn": cnn_frames * hop_ms,
        "conv_modules": conv,
        "mamba": mamba,
    }
    parts["total"] = sum(parts.values())
    parts["frame_period"] = frame_ms
    return parts


class StreamingEncoder:
    """CTC log-probabilities of a causal model over a stream of audio pieces.

    Arguments
    ---------
    compute_features : CausalFbank (any centred Fbank without a per-utterance floor).
    normalize : speechbrain InputNormalization (global) or None.
    cnn : ConvolutionFrontEnd with causal padding.
    transformer : modules.TransformerASR.TransformerASR with a causal Mamba/ConMamba encoder.
    ctc_lin : the CTC output layer.

    ``push(state, samples)`` and ``finish(state)`` return (1, n, vocab) log-probabilities of the
    encoder frames that became computable; concatenated over a stream they equal the model's
    output on the whole utterance (``offline_log_probs``). Put the modules in eval mode first.
    """

    def __init__(self, compute_features, normalize, cnn, transformer, ctc_lin):
        check_streamable(compute_features, normalize, cnn, transformer)
        self.compute_features, self.normalize, self.cnn = compute_features, normalize, cnn
        self.transformer, self.ctc_lin = transformer, ctc_lin
        stft = compute_features.compute_STFT
        self.hop = stft.hop_length
        first, self.window_end = _stft_window(stft)
        self.context_frames = math.ceil(-first / self.hop)  # frames before t whose samples t reads
        props = cnn.get_filter_properties()
        self.cnn_window, self.cnn_stride = props.window_size, props.stride

    @property
    def device(self):
        return self.ctc_lin.w.weight.device

    def new_state(self) -> StreamState:
        """State before the first sample: zeros stand for the STFT's left centre padding."""
        layers = []
        for layer in self.transformer.encoder.layers:
            mamba = layer.mamba.allocate_inference_cache(1)
            conv = None
            module = getattr(layer, "convolution_module", None)
            if module is not None:
                conv = torch.zeros(1, module.conv.in_channels, module.padding,
                                   device=self.device, dtype=module.conv.weight.dtype)
            layers.append(LayerCache(mamba, conv))
        n_mels = self.compute_features.compute_fbanks.n_mels
        return StreamState(
            samples=torch.zeros(self.context_frames * self.hop, device=self.device),
            sample0=-self.context_frames * self.hop,
            features=torch.zeros(0, n_mels, device=self.device), layers=layers)

    @torch.inference_mode()
    def push(self, state: StreamState, samples) -> torch.Tensor:
        """samples: (N,) float audio at the model's rate, N >= 0 -> (1, n, vocab)."""
        if state.finished:
            raise StreamingError("This stream is finished: start a new one (new_state / reset)")
        samples = torch.as_tensor(samples, device=self.device)
        if not samples.is_floating_point():
            raise StreamingError(f"Push float audio in [-1, 1], got {samples.dtype} samples: scale "
                                 "integer PCM first (int16 / 32768), as "
                                 "inference.streaming.StreamingTranscriber.push does")
        if samples.dim() > 1 and samples.numel() not in (0, max(samples.shape)):
            raise StreamingError(f"Push mono audio (samples,), got shape {tuple(samples.shape)}: "
                                 "average the channels first, as "
                                 "inference.streaming.StreamingTranscriber.push does")
        samples = samples.float().reshape(-1)
        state.samples = torch.cat([state.samples, samples])
        state.received += samples.numel()
        # frame t is complete once its window's last sample, t * hop + window_end - 1, arrived
        last = (state.received - self.window_end) // self.hop
        return self._encode(state, self._features(state, last))

    @torch.inference_mode()
    def finish(self, state: StreamState) -> torch.Tensor:
        """Frames of the stream's end (the STFT's right zero padding, as on a whole file)."""
        if state.finished:
            raise StreamingError("This stream is already finished")
        state.finished = True
        if state.received == 0:
            return torch.zeros(1, 0, self.ctc_lin.w.out_features, device=self.device)
        return self._encode(state, self._features(state, state.received // self.hop))

    def _features(self, state, last):
        """Normalised feature frames next_feature .. last (inclusive), (k, n_mels)."""
        count = last - state.next_feature + 1
        if count <= 0:
            return state.features.new_zeros(0, state.features.shape[1])
        # Frames of this buffer: row r is global frame next_feature - context_frames + r; the
        # first context_frames rows read the buffer's own zero padding and are dropped.
        feats = self.compute_features(state.samples[None])[0]
        feats = feats[self.context_frames: self.context_frames + count]
        if self.normalize is not None:
            feats = self.normalize(feats[None], torch.ones(1, device=self.device))[0]
        state.next_feature = last + 1
        keep_from = (state.next_feature - self.context_frames) * self.hop
        state.samples = state.samples[keep_from - state.sample0:]
        state.sample0 = keep_from
        return feats

    def _encode(self, state, new_features):
        state.features = torch.cat([state.features, new_features])
        available = state.features.shape[0]
        vocab = self.ctc_lin.w.out_features
        if available < self.cnn_window:
            return new_features.new_zeros(1, 0, vocab)
        count = (available - self.cnn_window) // self.cnn_stride + 1
        used = self.cnn_stride * (count - 1) + self.cnn_window
        src = self.cnn(state.features[None, :used])  # (1, count, F', C)
        state.features = state.features[self.cnn_stride * count:]
        state.next_output += count
        return self.encode_frames(src, state.layers)

    def encode_frames(self, src, caches):
        """CNN output (1, n, F', C) -> log-probabilities (1, n, vocab), continuing ``caches``.

        The streaming counterpart of TransformerASR.encode (custom_src_module, encoder) with
        the layers' states carried; relative positional encodings are not inputs of Mamba.
        """
        src = self.transformer.custom_src_module(src.flatten(2))
        out, _ = self.transformer.encoder(src, cache=caches)
        return F.log_softmax(self.ctc_lin(out), dim=-1)

    @torch.inference_mode()
    def offline_log_probs(self, wav):
        """The same model on a whole utterance, wav (N,) -> (1, n, vocab) (the reference)."""
        wav = torch.as_tensor(wav, dtype=torch.float32, device=self.device).reshape(1, -1)
        feats = self.compute_features(wav)
        if self.normalize is not None:
            feats = self.normalize(feats, torch.ones(1, device=self.device))
        enc = self.transformer.encode(self.cnn(feats), torch.ones(1, device=self.device))
        return F.log_softmax(self.ctc_lin(enc), dim=-1)

    def lookahead_ms(self):
        return lookahead_ms(self.compute_features, self.cnn, self.transformer)
