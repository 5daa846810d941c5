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
import pickle
import shutil
import zlib

import yaml

from speechbrain.utils.checkpoints import CKPT_PREFIX, METAFNAME, Checkpointer
from speechbrain.utils.distributed import ddp_barrier, if_main_process

from recipes import RecipeError, faults

logger = logging.getLogger(__name__)
PARTIAL = ".partial-"  # prefix of folders being written or deleted: never loaded
FILES = "files"  # CKPT.yaml key: {file name: size in bytes}
CRC = "crc32"  # CKPT.yaml key: {file name: CRC-32 of its bytes}, checked when loaded
# what torch.load and load_state_dict raise for damaged files or other sizes
LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, OSError)


def _crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def verify_files(folder, names=None):
    """Raises the damaged_checkpoint error when a file of checkpoint ``folder`` (those in names,
    default all) no longer has the CRC-32 its CKPT.yaml recorded; folders without a record
    (older checkpoints) pass."""
    folder = pathlib.Path(folder)
    try:
        with open(folder / METAFNAME, encoding="utf-8") as f:
            sums = (yaml.safe_load(f) or {}).get(CRC) or {}
    except FileNotFoundError:
        return
    for name, crc in sums.items():
        if (names is None or name in names) and _crc32(folder / name) != crc:
            raise damaged_checkpoint(folder, ValueError(
                f"{name} does not have the CRC-32 recorded in {METAFNAME} when it was saved"))


def damaged_checkpoint(folder, error):
    """The RecipeError for a checkpoint folder whose files cannot be loaded."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return RecipeError(
        f"Cannot load the checkpoint in {folder} ({type(error).__name__}: {first[:200]}): its "
        "files are damaged, or were saved by a model of other sizes. Delete that folder "
        f"(rm -r {folder}) to resume from the checkpoint before it, or train in a new "
        "--output_folder.")


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
        for recoverable in self.recoverables.values():  # (all processes) states to gather
            if hasattr(recoverable, "gather"):  # first, as recipes.resume.RandomState's
                recoverable.gather()
        self._writing = True  # SpeechBrain writes into the folder named by *_dirpath below
        try:
            checkpoint = super().save_checkpoint(meta, end_of_epoch, name, logging.DEBUG)
        finally:
            self._writing = False
        if checkpoint is None:  # not the main process: wait until the checkpoint is in place,
            ddp_barrier()  # else its list of checkpoints to delete differs from the main one's
            return None
        final = checkpoint.path.with_name(checkpoint.path.name[len(PARTIAL):])
        files = [p for p in checkpoint.path.iterdir() if p.name != METAFNAME]
        sizes = {p.name: p.stat().st_size for p in files}
        sums = {p.name: _crc32(p) for p in files}
        meta = self._save_checkpoint_metafile(
            checkpoint.path / METAFNAME, {**checkpoint.meta, FILES: sizes, CRC: sums},
            end_of_epoch)
        _fsync_tree(checkpoint.path)
        os.rename(checkpoint.path, final)
        ddp_barrier()
        kind = "end-of-epoch" if end_of_epoch else "intra-epoch"
        logger.log(verbosity, f"Saved an {kind} checkpoint in {final}")
        faults.inject("checkpoint_saved")
        paramfiles = {k: final / p.name for k, p in checkpoint.paramfiles.items()}
        return checkpoint._replace(path=final, meta=meta, paramfiles=paramfiles)

    def load_checkpoint(self, checkpoint):
        verify_files(checkpoint.path)
        try:
            super().load_checkpoint(checkpoint)
        except LOAD_ERRORS as e:
            raise damaged_checkpoint(checkpoint.path, e) from e

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
            logger.warning(f"Removing {ckpt_dir}: its files do not have the sizes its {METAFNAME} "
                           "lists (a deletion or copy stopped halfway, or a damaged disk); it is "
                           "never loaded")
            doomed = ckpt_dir.with_name(PARTIAL + ckpt_dir.name)
            os.rename(ckpt_dir, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return False
