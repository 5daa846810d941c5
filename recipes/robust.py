"""Training that survives faults: the Brain side of bit-exact resume, non-finite losses and
unreadable audio.

``FaultTolerance`` goes before ``sb.core.Brain`` in a Brain's bases. It

* adds the random generators (recipes.resume.RandomState) to the checkpointer;
* gives the DataLoaders their own generator and calls ``set_epoch`` on a batch sampler, so that
  the data order and the global generators do not depend on where a run was resumed;
* skips a training batch whose loss is NaN/inf before its backward pass (no gradient, optimizer
  or scheduler step), naming its utterances; more than ``nonfinite_patience`` (SpeechBrain run
  option, default 3) such batches in a row save a checkpoint and stop the run;
* when a training file cannot be decoded (``bad_data: error``), saves a checkpoint at the batch
  that failed before stopping, so that the rerun (file fixed or row removed) continues there;
  with ``bad_data: skip`` the data pipeline drops such files (``skip_unreadable``) and a batch
  left empty is skipped here.
"""

import logging

import torch

import speechbrain as sb
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.distributed import is_distributed_initialized

from recipes import RecipeError, faults
from recipes.audio import AudioError
from recipes.resume import RandomState, loader_generator

logger = logging.getLogger(__name__)


class NonFiniteLoss(Exception):
    """Raised inside fit_batch before backward() to skip a batch."""


class FaultTolerance:
    """Mixin for sb.core.Brain (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("random_state", RandomState())

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        if not isinstance(dataset, torch.utils.data.DataLoader):
            loader_kwargs.setdefault("generator",
                                     loader_generator(getattr(self.hparams, "seed", 0)))
        loader = super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        batch_sampler = loader_kwargs.get("batch_sampler")
        if stage == sb.Stage.TRAIN and self.train_sampler is None \
                and hasattr(batch_sampler, "set_epoch"):
            # sb.Brain calls set_epoch only on samplers it made; without it, a
            # DynamicBatchSampler's order depends on how many epochs this process has run.
            self.train_sampler = batch_sampler
        return loader

    def fit(self, *args, **kwargs):
        try:
            return super().fit(*args, **kwargs)
        except AudioError:
            if not (self.modules.training and self.checkpointer is not None):
                raise
            if is_distributed_initialized():  # saving is collective: the other processes
                logger.info("Stopping at an unreadable file: fix it or remove its row, then "
                            "rerun the same command to continue from the last checkpoint")
                raise  # are inside their next batch; torchrun stops them when this one exits
            self._save_intra_epoch_ckpt()  # a training batch
            logger.info("Saved a checkpoint before the unreadable file: fix the file or "
                        "remove its row, then rerun the same command to continue from it")
            raise

    def fit_batch(self, batch):
        faults.inject("train_batch")
        if batch is None:  # every file of the batch was unreadable (bad_data: skip)
            return torch.tensor(float("nan"))
        self._batch_ids = list(batch.id)
        try:
            return super().fit_batch(batch)
        except NonFiniteLoss as e:
            if self.step % self.grad_accumulation_factor == 0:  # this batch would have stepped:
                self.zero_grad(set_to_none=True)  # the window's gradients go with it (else the
            return e.args[0]  # next step would add them to its own window's)

    def evaluate_batch(self, batch, stage):
        if stage == sb.Stage.VALID:
            faults.inject("valid_batch")
        if batch is None:
            return torch.tensor(float("nan"))
        return super().evaluate_batch(batch, stage)

    def check_loss_isfinite(self, loss):
        """Raises NonFiniteLoss (the batch is skipped) when the loss is NaN/inf; RecipeError
        after more than nonfinite_patience such batches in a row."""
        loss = loss.detach()
        if faults.hit("nan_loss"):
            loss = loss * float("nan")
        bad = not torch.isfinite(loss)
        if is_distributed_initialized():  # every process skips the batch, or none does
            flag = torch.tensor(float(bad), device=loss.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = bool(flag.item())
        if not bad:
            self.nonfinite_count = 0
            return
        self.nonfinite_count += 1
        ids = ", ".join(self._batch_ids)
        if self.nonfinite_count > self.nonfinite_patience:
            if self.checkpointer is not None:
                self._save_intra_epoch_ckpt()
            raise RecipeError(
                f"The training loss was NaN/inf for {self.nonfinite_count} batches in a row "
                f"(the last one: {ids}); stopping (nonfinite_patience "
                f"{self.nonfinite_patience}). The weights are not affected: those batches were "
                "skipped, and a checkpoint was saved. Check these utterances' audio and "
                "transcripts, lower lr_model, or train in fp32 (--precision fp32), then rerun; "
                "--nonfinite_patience N allows longer runs of such batches.")
        logger.warning(f"Skipping a training batch with a non-finite loss ({float(loss)}): "
                       f"{ids} ({self.nonfinite_count} in a row, nonfinite_patience "
                       f"{self.nonfinite_patience})")
        raise NonFiniteLoss(torch.tensor(float("nan")))


def skip_unreadable(load, error_type):
    """Wraps an audio loader so that a file raising ``error_type`` is logged and gives None
    (dropped by ``collate_skipping``) instead of stopping the run."""

    def load_or_none(*args, **kwargs):
        try:
            return load(*args, **kwargs)
        except error_type as e:
            logger.warning(f"Skipping (bad_data: skip): {e}")
            return None

    return load_or_none


def collate_skipping(examples):
    """PaddedBatch of the examples whose audio could be read, or None when none could."""
    kept = [e for e in examples if e.get("sig") is not None]
    return PaddedBatch(kept) if kept else None
