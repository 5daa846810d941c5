"""A SpeechBrain Checkpointer whose checkpoints are complete or absent, whenever the process dies.

SpeechBrain writes CKPT.yaml first and then each recoverable's file into the final CKPT+...
folder, and deletes old checkpoints with rmtree: a kill in either leaves a folder that looks
like a checkpoint, and the next run loads it and crashes (missing or truncated file). Here a
checkpoint is written into a ``.partial-CKPT+...`` folder that is renamed to CKPT+... once every
file is flushed, and a checkpoint is deleted by renaming it away first; renames within a folder
are atomic. Leftovers of interrupted writes or deletions are removed with a warning when the
checkpointer lists its folder.
"""

import logging
import os
import pathlib
import shutil

from speechbrain.utils.checkpoints import CKPT_PREFIX, Checkpointer
from speechbrain.utils.distributed import if_main_process

from recipes import faults

logger = logging.getLogger(__name__)
PARTIAL = ".partial-"  # prefix of folders being written or deleted: never loaded


def _fsync_tree(folder):
    for path in sorted(pathlib.Path(folder).iterdir()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointer(Checkpointer):
    """speechbrain.utils.checkpoints.Checkpointer with atomic saving and deletion."""

    _writing = False

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):
        self._writing = True  # SpeechBrain writes into the folder named by *_dirpath below
        try:
            checkpoint = super().save_checkpoint(meta, end_of_epoch, name, logging.DEBUG)
        finally:
            self._writing = False
        if checkpoint is None:  # not the main process
            return None
        final = checkpoint.path.with_name(checkpoint.path.name[len(PARTIAL):])
        _fsync_tree(checkpoint.path)
        os.rename(checkpoint.path, final)
        kind = "end-of-epoch" if end_of_epoch else "intra-epoch"
        logger.log(verbosity, f"Saved an {kind} checkpoint in {final}")
        faults.inject("checkpoint_saved")
        paramfiles = {k: final / p.name for k, p in checkpoint.paramfiles.items()}
        return checkpoint._replace(path=final, paramfiles=paramfiles)

    def _new_checkpoint_dirpath(self):
        path = super()._new_checkpoint_dirpath()
        return path.with_name(PARTIAL + path.name) if self._writing else path

    def _custom_checkpoint_dirpath(self, name):
        path = super()._custom_checkpoint_dirpath(name)
        return path.with_name(PARTIAL + path.name) if self._writing else path

    @staticmethod
    def _delete_checkpoint(checkpoint, verbosity=logging.INFO):
        if not if_main_process():
            return
        if not Checkpointer._is_checkpoint_dir(checkpoint.path):
            raise RuntimeError(f"{checkpoint.path} does not appear to be a checkpoint")
        doomed = checkpoint.path.with_name(PARTIAL + checkpoint.path.name)
        os.rename(checkpoint.path, doomed)
        shutil.rmtree(doomed)
        logger.log(verbosity, f"Deleted checkpoint in {checkpoint.path}")

    def _list_checkpoint_dirs(self):
        if if_main_process():
            for leftover in self.checkpoints_dir.glob(PARTIAL + CKPT_PREFIX + "*"):
                logger.warning(f"Removing {leftover}: an incomplete checkpoint (the process was "
                               "stopped while writing or deleting it); it is never loaded")
                shutil.rmtree(leftover, ignore_errors=True)
        return super()._list_checkpoint_dirs()
