"""A SpeechBrain Checkpointer whose checkpoints are complete or never loaded, whenever the
process dies.

SpeechBrain writes CKPT.yaml first and then each recoverable's file into the final CKPT+...
folder, and deletes old checkpoints with rmtree: a kill in either leaves a folder that looks
like a checkpoint, and the next run loads it and crashes (missing or truncated file). Here a
checkpoint is written into a ``.partial-CKPT+...`` folder, CKPT.yaml is rewritten last with the
size of every file, and the folder is renamed to CKPT+... once everything is flushed (a rename
within a folder is atomic). When listing, a checkpoint whose files do not match its CKPT.yaml
(a deletion killed halfway) and leftover partial folders are removed with a warning.
"""

import logging
import os
import pathlib
import shutil

import yaml

from speechbrain.utils.checkpoints import CKPT_PREFIX, METAFNAME, Checkpointer
from speechbrain.utils.distributed import if_main_process

from recipes import faults

logger = logging.getLogger(__name__)
PARTIAL = ".partial-"  # prefix of folders being written or deleted: never loaded
FILES = "files"  # CKPT.yaml key: {file name: size in bytes}


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
    """speechbrain.utils.checkpoints.Checkpointer: atomic saving, checked listing."""

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
        sizes = {p.name: p.stat().st_size for p in checkpoint.path.iterdir()
                 if p.name != METAFNAME}
        meta = self._save_checkpoint_metafile(checkpoint.path / METAFNAME,
                                              {**checkpoint.meta, FILES: sizes}, end_of_epoch)
        _fsync_tree(checkpoint.path)
        os.rename(checkpoint.path, final)
        kind = "end-of-epoch" if end_of_epoch else "intra-epoch"
        logger.log(verbosity, f"Saved an {kind} checkpoint in {final}")
        faults.inject("checkpoint_saved")
        paramfiles = {k: final / p.name for k, p in checkpoint.paramfiles.items()}
        return checkpoint._replace(path=final, meta=meta, paramfiles=paramfiles)

    def _new_checkpoint_dirpath(self):
        path = super()._new_checkpoint_dirpath()
        return path.with_name(PARTIAL + path.name) if self._writing else path

    def _custom_checkpoint_dirpath(self, name):
        path = super()._custom_checkpoint_dirpath(name)
        return path.with_name(PARTIAL + path.name) if self._writing else path

    def _list_checkpoint_dirs(self):
        if if_main_process():
            leftovers = [*self.checkpoints_dir.glob(PARTIAL + CKPT_PREFIX + "*"),
                         *(d for d in self.checkpoints_dir.glob(CKPT_PREFIX + "+*")
                           if d.is_dir() and not (d / METAFNAME).exists())]
            for leftover in leftovers:
                logger.warning(f"Removing {leftover}: an incomplete checkpoint (the process was "
                               "stopped while writing or deleting it); it is never loaded")
                shutil.rmtree(leftover, ignore_errors=True)
        return [d for d in super()._list_checkpoint_dirs() if self._complete(d)]

    def _complete(self, ckpt_dir):
        """False (and the folder removed, with a warning) when a file listed in CKPT.yaml is
        missing or has another size; checkpoints written without the list are trusted."""
        try:
            with open(ckpt_dir / METAFNAME, encoding="utf-8") as f:
                files = (yaml.safe_load(f) or {}).get(FILES)
        except FileNotFoundError:  # removed meanwhile (by the main process)
            return False
        if not files or all((ckpt_dir / name).is_file() and (ckpt_dir / name).stat().st_size ==
                            size for name, size in files.items()):
            return True
        if if_main_process():
            logger.warning(f"Removing {ckpt_dir}: its files do not match its {METAFNAME} (the "
                           "process was stopped while deleting it); it is never loaded")
            doomed = ckpt_dir.with_name(PARTIAL + ckpt_dir.name)
            os.rename(ckpt_dir, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return False
