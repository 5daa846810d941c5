"""Decoded audio kept in memory for small corpora (``cache_audio: True``): every file is decoded
once, before training, instead of once per epoch. On a few CPU cores the decoding of compressed
audio (Opus, MP3) otherwise runs beside the training threads every epoch and slows them more than
its own cost (OpenMP threads wait for the core the decoder holds).

Samples are kept as int16 (2 bytes per sample; 1/32767 resolution, below any 16-bit source's
noise floor); a file with samples beyond [-1, 1] is kept as float32 instead of being clipped.
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from recipes import RecipeError

logger = logging.getLogger(__name__)

BYTES_PER_SAMPLE = 2
MAX_SHARE_OF_MEMORY = 0.5  # refuse to cache more than this share of the machine's memory


def physical_memory_bytes():
    """The machine's memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(seconds, sample_rate, memory_bytes=None):
    """Raises RecipeError when ``seconds`` of audio would take more than MAX_SHARE_OF_MEMORY of
    the machine's memory. Returns the estimated size in bytes."""
    size = int(seconds * sample_rate * BYTES_PER_SAMPLE)
    memory = physical_memory_bytes() if memory_bytes is None else memory_bytes
    if memory is not None and size > MAX_SHARE_OF_MEMORY * memory:
        raise RecipeError(
            f"cache_audio: {seconds / 3600:.1f} h of audio would take {size / 2**30:.1f} GB in "
            f"memory, more than {MAX_SHARE_OF_MEMORY:.0%} of this machine's "
            f"{memory / 2**30:.1f} GB: set cache_audio: False (decoding in the data loader "
            "workers) for this corpus")
    return size


class AudioCache:
    """``load(wav, sample_rate, utt_id, min_duration)`` with the results kept in memory.

    Arguments
    ---------
    load : the uncached loader (recipes.audio.load_audio, or its skip_unreadable wrapper, which
        returns None for an unreadable file: None is cached too).
    """

    def __init__(self, load):
        self.load = load
        self.items = {}

    def preload(self, rows, sample_rate, min_duration, threads=None):
        """Decodes the files of ``rows`` ([(utt_id, wav path)]) in ``threads`` threads (default:
        torch's thread count); the first error (e.g. an AudioError naming the file) is raised."""
        todo = [(utt_id, wav) for utt_id, wav in rows if wav not in self.items]
        threads = threads or torch.get_num_threads()

        def decode(row):
            utt_id, wav = row
            return wav, _pack(self.load(wav, sample_rate, utt_id, min_duration))

        with ThreadPoolExecutor(max(1, threads)) as pool:  # libsndfile releases the GIL
            for wav, packed in pool.map(decode, todo):
                self.items[wav] = packed
        return len(todo)

    def __call__(self, wav, sample_rate, utt_id=None, min_duration=0.0):
        if wav not in self.items:
            self.items[wav] = _pack(self.load(wav, sample_rate, utt_id, min_duration))
        return _unpack(self.items[wav])

    def nbytes(self):
        return sum(x.numel() * x.element_size() for x in self.items.values() if x is not None)


def _pack(sig):
    """float32 (samples,) in [-1, 1] -> int16; louder files stay float32; None stays None."""
    if sig is None or sig.numel() == 0 or sig.abs().max() > 1.0:
        return sig
    return torch.round(sig * 32767.0).to(torch.int16)


def _unpack(packed):
    if packed is None:
        return None
    if packed.dtype != torch.int16:
        return packed.clone()  # the caller may change it in place
    return packed.to(torch.float32) / 32767.0
