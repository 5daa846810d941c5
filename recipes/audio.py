"""Reading audio, for training (recipes.data) and for transcription (inference.transcriber):
files are decoded with soundfile, channels averaged and resampled with torchaudio; every failure
is an AudioError naming the file (and the manifest's utterance ID when there is one)."""

import os

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
    if not os.path.isfile(path):
        raise AudioError(f"Audio file {_where(path, utt_id)} does not exist")
    try:
        info = soundfile.info(path)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise _undecodable(path, utt_id, e) from e
    if info.frames == 0:
        raise _empty(path, utt_id)
    return info.frames / info.samplerate


def read_audio(path, utt_id=None):
    """A file as float32 (samples, channels) and its sample rate; AudioError naming the file
    (and utt_id) when it cannot be decoded or is empty."""
    try:
        audio, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError...)
        raise _undecodable(path, utt_id, e) from e
    if audio.shape[0] == 0:
        raise _empty(path, utt_id)
    return torch.from_numpy(audio), sample_rate


def to_mono(wav, sample_rate, target_rate):
    """(samples,) or 2-D audio (channels = the smaller dimension) -> mono float32 (samples,) at
    target_rate."""
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if wav.dim() == 2:
        wav = wav.mean(dim=1 if wav.shape[1] <= wav.shape[0] else 0)
    elif wav.dim() != 1:
        raise AudioError(f"Expected audio of shape (samples,) or (samples, channels), "
                         f"got {tuple(wav.shape)}")
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
    audio, sr = read_audio(path, utt_id)
    if audio.shape[0] < min_duration * sr:
        raise AudioError(f"Audio {_where(path, utt_id)} lasts {audio.shape[0] / sr:.3f} s, less "
                         f"than min_duration {min_duration} s (too short for the front end's 4x "
                         "subsampling); remove its row from the manifest")
    return to_mono(audio.mean(dim=1), sr, sample_rate)
