"""What a checkpoint must hold, besides weights, for a resumed run to be bit-exact.

A run killed at any point and restarted with the same command must draw the same random numbers
in the same order as the uninterrupted run. Three sources are handled here:

* the process-wide generators (torch CPU and CUDA, NumPy, Python's ``random``) that dropout,
  SpecAugment (SpectrogramDrop, Augmenter) and the model draw from in the main process:
  ``RandomState`` is a SpeechBrain recoverable saved in every checkpoint;
* the DataLoader: creating an iterator draws the workers' base seed from the global torch
  generator, and a resumed run creates its iterator after restoring that generator, so the
  loaders get a generator of their own (``loader_generator``);
* augmentation in the data pipeline (speed perturbation), which runs in whichever worker gets
  the utterance: ``keyed_random`` seeds it from (seed, epoch, utterance ID), so it does not
  depend on worker seeding, worker count or batch order.

The sampler's position is SpeechBrain's SaveableDataLoader recoverable; the order of dynamic
batches is a function of the epoch once its sampler's ``set_epoch`` is called every epoch.
"""

import contextlib
import random
import zlib

import numpy as np
import torch

from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from recipes import faults


def _rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


@register_checkpoint_hooks
class RandomState:
    """The torch (CPU, CUDA), NumPy and Python random generators as a checkpoint recoverable, one
    set per DDP process: only the main process writes checkpoints, so every process hands its
    state over first (``gather``, from the checkpointer's save on all of them)."""

    def __init__(self):
        self.gathered = None  # every process's state (main process, DDP), from gather()

    @staticmethod
    def state():
        """This process's generators as a dict of tensors and plain values."""
        version, mt, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "python": [version, list(mt), gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def gather(self):
        """Called by every DDP process right before a checkpoint is saved."""
        if torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, self.state())
            self.gathered = states if _rank() == 0 else None

    @mark_as_saver
    def _save(self, path):
        # Saved after the model, optimizer-less recoverables: a kill here is one mid-checkpoint.
        faults.inject("checkpoint_write")
        states, self.gathered = self.gathered or [self.state()], None
        torch.save({"ranks": states}, path)

    @mark_as_loader
    def _load(self, path, end_of_epoch):
        del end_of_epoch
        saved = torch.load(path, weights_only=True)
        ranks = saved.get("ranks", [saved])  # checkpoints before per-process states: one
        state = ranks[_rank()] if _rank() < len(ranks) else ranks[0]
        torch.set_rng_state(state["torch"])
        version, mt, gauss = state["python"]
        random.setstate((version, tuple(mt), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available():  # per device, of those both have
            for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, index)


def loader_generator(seed):
    """A generator for a DataLoader's own draws (the workers' base seed), so that creating an
    iterator leaves the global torch generator untouched."""
    return torch.Generator().manual_seed(int(seed))


@contextlib.contextmanager
def keyed_random(seed, epoch, key):
    """Within the block, torch draws depend only on (seed, epoch, key): augmenting an utterance
    gives the same result in any worker, process or resumed run. The caller's generator state
    is restored on exit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}/{epoch}/{key}".encode()))
        yield
