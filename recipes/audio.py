"""Reading audio, for training (recipes.data) and for transcription (inference.transcriber):
files are decoded with soundfile, channels averaged and resampled with torchaudio; every failure
is an AudioError naming the file (and the manifest's utterance ID when there is one)."""

import numbers
import os

import numpy as np
import soundfile
import torch
import torchaudio

from recipes import RecipeError


class AudioError(RecipeError, RuntimeError):
    """An audio file (or waveform) that cannot be used; the message names it and what to do."""


def _where(path, utt_id):
    return f"{path} (ID {utt_id})" if utt_id else str(path)


def _undecodable(path, utt_id, error):
    fix = "; or remove its row from the manifest" if utt_id else ""
    return AudioError(f"Cannot read audio {_where(path, utt_id)}. Cannot decode it ({error}); "
                      f"convert it to WAV or FLAC (ffmpeg -i {path} out.wav){fix}")


def _empty(path, utt_id):
    fix = "remove its row from the manifest" if utt_id else "remove it from the list"
    return AudioError(f"Audio file {_where(path, utt_id)} is empty (0 samples); {fix}")


def check_audio(path, utt_id=None):
    """Cheap check (header only) that a file exists, decodes and has samples.

    Returns its duration in seconds; raises AudioError naming the file otherwise.
    """
    if os.path.isdir(path):
        raise AudioError(f"Audio file {_where(path, utt_id)} is a directory, not a file; pass the "
                         "audio files in it (e.g. DIR/*.wav)")
    if not os.path.isfile(path):
        raise AudioError(f"Audio file {_where(path, utt_id)} does not exist")
    try:
        info = soundfile.info(path)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise _undecodable(path, utt_id, e) from e
    if info.frames == 0:
        raise _empty(path, utt_id)
    return info.frames / info.samplerate


def check_finite(wav, what="Audio", channel_dim=None):
    """AudioError when a float waveform holds NaN or infinite samples (they would silently turn
    a whole transcript, or a stream from then on, into nothing). wav: (samples,), or 2-D with
    its channels along channel_dim (default: the smaller dimension, as downmix reads it)."""
    bad = ~torch.isfinite(wav)
    if bad.any():
        if wav.dim() == 2:  # a sample is bad when any of its channels is
            bad = bad.any(dim=_channel_dim(wav) if channel_dim is None else channel_dim)
        raise AudioError(f"{what} has {int(bad.sum())} NaN or infinite sample(s), the first at "
                         f"sample {int(bad.nonzero()[0])}; replace them (e.g. "
                         "numpy.nan_to_num) or drop the audio")


def read_audio(path, utt_id=None):
    """A file as float32 (samples, channels) and its sample rate; AudioError naming the file
    (and utt_id) when it cannot be decoded, is empty or holds NaN / infinite samples."""
    try:
        audio, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError...)
        raise _undecodable(path, utt_id, e) from e
    if audio.shape[0] == 0:
        raise _empty(path, utt_id)
    audio = torch.from_numpy(audio)
    check_finite(audio, f"Audio file {_where(path, utt_id)}", channel_dim=1)
    return audio, sample_rate


# integer PCM -> float in [-1, 1): (x - offset) / scale
PCM_SCALES = {torch.uint8: (128, 2 ** 7), torch.int8: (0, 2 ** 7), torch.int16: (0, 2 ** 15),
              torch.int32: (0, 2 ** 31)}


def to_float(wav):
    """A waveform (tensor, numpy array, list) as float32 of the same shape: integer PCM scaled to
    [-1, 1) (int16 / 2^15, int32 / 2^31, int8 / 2^7, uint8 (x - 128) / 2^7), floats as they are.
    AudioError for other types (int64, bool...), whose full scale is unknown, and for NaN or
    infinite samples."""
    wav = torch.as_tensor(wav)
    if wav.dtype in PCM_SCALES:
        offset, scale = PCM_SCALES[wav.dtype]
        return (wav.float() - offset) / scale
    if not wav.is_floating_point():
        raise AudioError(f"Audio samples of type {wav.dtype} have no known full scale; pass float "
                         "samples in [-1, 1] or int8 / int16 / int32 / uint8 PCM (e.g. "
                         "x.astype('int16') for 16-bit samples held in a wider type)")
    wav = wav.float()
    check_finite(wav)
    return wav


def _channel_dim(wav):
    """The channel dimension of 2-D audio: the smaller one."""
    return 1 if wav.shape[1] <= wav.shape[0] else 0


def downmix(wav):
    """(samples,) or 2-D float audio (channels = the smaller dimension) -> (samples,)."""
    if wav.numel() == 0:
        return wav.reshape(0)
    if wav.dim() == 2:
        return wav.mean(dim=_channel_dim(wav))
    if wav.dim() != 1:
        raise AudioError(f"Expected audio of shape (samples,) or (samples, channels), "
                         f"got {tuple(wav.shape)}")
    return wav


def to_mono(wav, sample_rate, target_rate):
    """(samples,) or 2-D audio (channels = the smaller dimension), float or integer PCM (see
    to_float) -> mono float32 (samples,) at target_rate."""
    if not (isinstance(sample_rate, numbers.Real) and not isinstance(sample_rate, bool)
            and sample_rate > 0 and float(sample_rate).is_integer()):
        raise AudioError(f"sample_rate must be a positive whole number of samples per second, "
                         f"got {sample_rate!r}")
    wav = downmix(to_float(wav))
    if wav.numel() == 0:
        raise AudioError("Empty waveform (0 samples)")
    if sample_rate != target_rate:
        wav = torchaudio.functional.resample(wav, int(sample_rate), int(target_rate))
    return wav


def load_audio(path, sample_rate, utt_id=None, min_duration=0.0):
    """A file as a mono float32 tensor (samples,) at ``sample_rate``.

    Raises AudioError naming the file (and utt_id) when it cannot be decoded, is empty or is
    shorter than ``min_duration`` seconds (whatever a manifest's duration column says).
    """
    audio, sr = read_mono(path, utt_id)
    if audio.shape[0] < min_duration * sr:
        raise AudioError(f"Audio {_where(path, utt_id)} lasts {audio.shape[0] / sr:.3f} s, less "
                         f"than min_duration {min_duration} s (too short for the front end's 4x "
                         "subsampling); remove its row from the manifest")
    return to_mono(audio, sr, sample_rate)


MONO_BLOCK = 1 << 20  # frames decoded at a time by read_mono


def read_mono(path, utt_id=None):
    """A file as float32 mono (samples,) (channels averaged) and its sample rate, decoded in
    blocks of MONO_BLOCK frames so that only the mono samples are held whole (a 2-hour 44.1 kHz
    stereo file: 1.3 GB instead of 2.5 GB decoded plus its copies); the errors of read_audio."""
    try:
        with soundfile.SoundFile(path) as f:
            sample_rate, audio, filled = f.samplerate, np.empty(f.frames, np.float32), 0
            for block in f.blocks(MONO_BLOCK, dtype="float32", always_2d=True):
                audio[filled: filled + len(block)] = block.mean(axis=1)
                filled += len(block)
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError...)
        raise _undecodable(path, utt_id, e) from e
    if filled == 0:
        raise _empty(path, utt_id)
    # (fewer frames than the header announced: what decodes); a NaN or infinity in any channel
    # is one in the average
    audio = torch.from_numpy(audio[:filled])
    check_finite(audio, f"Audio file {_where(path, utt_id)}")
    return audio, sample_rate
