"""Behaviour shared by the CTC and S2S Brains: Noam steps, checkpoint averaging before
evaluation, logging (text + TensorBoard) and per-test-set error-rate files."""

import functools
import logging

import torch

import speechbrain as sb
from speechbrain.utils.checkpoints import average_checkpoints
from speechbrain.utils.distributed import if_main_process

from recipes import RecipeError
from recipes.robust import FaultTolerance

logger = logging.getLogger(__name__)


class RecipeBrain(FaultTolerance, sb.core.Brain):
    """sb.Brain + the parts common to both recipes.

    Subclasses set ``ckpt_key`` / ``ckpt_max`` (the validation statistic that ranks checkpoints)
    and fill ``wer_metric`` / ``cer_metric`` with ``append_error_rates`` during evaluation.
    """

    ckpt_key = "ACC"
    ckpt_max = True
    tensorboard = None  # TensorboardLogger (set by recipes.run.attach_tensorboard)

    def front_end(self, wavs, wav_lens, stage):
        """Waveforms (B, samples) -> CNN output (B, T/4, 640); features augmented in training."""
        feats = self.hparams.compute_features(wavs)  # (B, T, n_mels)
        feats = self.modules.normalize(feats, wav_lens, epoch=self.hparams.epoch_counter.current)
        if stage == sb.Stage.TRAIN and self.hparams.fea_augment is not None:
            feats, _ = self.hparams.fea_augment(feats, wav_lens)
        return self.modules.CNN(feats)

    def reset_error_rates(self):
        self.wer_metric = self.hparams.wer_computer()
        self.cer_metric = self.hparams.cer_computer()

    def append_error_rates(self, batch, words):
        """words: one list of words per utterance of ``batch``."""
        targets = [wrd.split(" ") for wrd in batch.wrd]
        self.wer_metric.append(batch.id, words, targets)
        self.cer_metric.append(batch.id, words, targets)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if should_step:
            self.hparams.noam_annealing(self.optimizer)

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Loads the average of the ``avg_checkpoints`` best checkpoints into the model."""
        super().on_evaluate_start()
        ckpts = self.checkpointer.find_checkpoints(
            max_key=max_key, min_key=min_key,
            max_num_checkpoints=self.hparams.avg_checkpoints)
        if not ckpts:
            raise RecipeError(
                f"No checkpoint with a {max_key or min_key} value in "
                f"{self.checkpointer.checkpoints_dir}: train first (skip_train False)")
        load = functools.partial(torch.load, weights_only=True)
        state = average_checkpoints(ckpts, recoverable_name="model", parameter_loader=load)
        self.hparams.model.load_state_dict(state, strict=True)
        self.hparams.model.eval()
        logger.info(f"Evaluating the average of {len(ckpts)} checkpoint(s): "
                    + ", ".join(c.path.name for c in ckpts))

    def evaluate_best(self, test_set, **kwargs):
        """evaluate() with the checkpoints ranked by this recipe's validation statistic."""
        key = {"max_key" if self.ckpt_max else "min_key": self.ckpt_key}
        return self.evaluate(test_set, **key, **kwargs)

    def log_valid(self, stage_stats, epoch):
        """Logs an epoch and keeps the ``avg_checkpoints`` best checkpoints."""
        meta = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                "steps": self.optimizer_step}
        self.hparams.train_logger.log_stats(stats_meta=meta, train_stats=self.train_stats,
                                            valid_stats=stage_stats)
        if self.tensorboard is not None:
            self.tensorboard.log_stats(stats_meta=meta, train_stats=self.train_stats,
                                       valid_stats=stage_stats)
        keep = {"max_keys" if self.ckpt_max else "min_keys": [self.ckpt_key]}
        self.checkpointer.save_and_keep_only(
            meta={self.ckpt_key: stage_stats[self.ckpt_key], "epoch": epoch},
            num_to_keep=self.hparams.avg_checkpoints, **keep)

    def log_test(self, stage_stats, files):
        """Logs test statistics and writes each ErrorRateStats to its file (main process)."""
        self.hparams.train_logger.log_stats(
            stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
            test_stats=stage_stats)
        if if_main_process():
            for metric, path in files.items():
                with open(path, "w") as w:
                    metric.write_stats(w)
