"""Fault injection for tests: the training code calls ``inject(point)`` at a few places, and the
environment variable MAMBA_ASR_FAULT makes the process die there exactly as under ``kill -9``.

    MAMBA_ASR_FAULT=train_batch:7        SIGKILL before the 7th training batch of this process
    MAMBA_ASR_FAULT=valid_batch:2        ... before the 2nd validation batch
    MAMBA_ASR_FAULT=checkpoint_saved:3   ... right after the 3rd checkpoint is complete
    MAMBA_ASR_FAULT=checkpoint_write:2   ... while writing the 2nd checkpoint (some files written)
    MAMBA_ASR_FAULT=nan_loss:3-5         the loss of training batches 3 to 5 becomes NaN

Several faults are separated by commas. Counts are per process (a resumed run counts anew), so
a test kills a run with the variable set and resumes it without. Unset, ``inject`` is a dict
lookup and nothing else.
"""

import os
import signal

ENV = "MAMBA_ASR_FAULT"
_counts = {}


def _spec():
    """{point: (first, last)} parsed from MAMBA_ASR_FAULT."""
    spec = {}
    for item in filter(None, os.environ.get(ENV, "").split(",")):
        point, _, when = item.strip().partition(":")
        first, _, last = when.partition("-")
        spec[point] = (int(first or 1), int(last or first or 1))
    return spec


def hit(point):
    """Counts one pass through ``point``; True when MAMBA_ASR_FAULT asks for a fault here."""
    window = _spec().get(point)
    if window is None:
        return False
    _counts[point] = _counts.get(point, 0) + 1
    return window[0] <= _counts[point] <= window[1]


def inject(point):
    """Kills this process with SIGKILL (no cleanup, no flush: a real ``kill -9``) when
    MAMBA_ASR_FAULT asks for it at this pass through ``point``."""
    if hit(point):
        os.kill(os.getpid(), signal.SIGKILL)
