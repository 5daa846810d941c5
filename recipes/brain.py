"""The recipe skeleton shared by train_CTC.py and train_S2S.py: a SpeechBrain Brain that owns the
front end (features, normalisation, augmentation and the matching label replication), Noam steps,
checkpoint averaging before evaluation, the per-stage statistics and logging (text +
TensorBoard), and the per-test-set error-rate files.

A recipe subclasses RecipeBrain with SpeechBrain's hooks ``compute_forward`` and
``compute_objectives`` and one statistics hook, ``stage_stats``.
"""

import logging
import os

import torch

import speechbrain as sb
from speechbrain.utils.checkpoints import average_checkpoints
from speechbrain.utils.distributed import if_main_process

from recipes import RecipeError
from recipes.checkpoints import LOAD_ERRORS, damaged_checkpoint, verify_files
from recipes.robust import FaultTolerance

logger = logging.getLogger(__name__)


def load_model_params(path, map_location=None):
    """A checkpoint's model parameters (weights only); a damaged file is a RecipeError."""
    verify_files(os.path.dirname(path), [os.path.basename(path)])
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except LOAD_ERRORS as e:
        raise damaged_checkpoint(os.path.dirname(path), e) from e


class RecipeBrain(FaultTolerance, sb.core.Brain):
    """sb.Brain + the parts common to both recipes.

    Arguments
    ---------
    modules, opt_class, hparams, run_opts, checkpointer : as sb.Brain.
    tokenizer : sentencepiece.SentencePieceProcessor (decodes hypotheses into words).
    test_searcher : callable decoding the test sets (the recipe's searcher).
    tensorboard : speechbrain TensorboardLogger or None.

    Subclasses set ``kind`` ('CTC' | 'S2S'), ``ckpt_key`` / ``ckpt_max`` (the validation
    statistic that ranks checkpoints), implement ``compute_forward``, ``compute_objectives``
    (filling ``wer_metric`` / ``cer_metric`` with ``append_error_rates``) and ``stage_stats``.
    """

    kind = None
    ckpt_key = "ACC"
    ckpt_max = True

    def __init__(self, *args, tokenizer, test_searcher=None, tensorboard=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = tokenizer
        self.test_searcher = test_searcher
        self.tensorboard = tensorboard
        self.result_files = {}  # {"wer": path, "cer": path} of the test set being evaluated
        self.test_name = None  # and its name

    def on_fit_start(self):
        super().on_fit_start()  # recovers the last checkpoint
        scheduler = getattr(self.hparams, "noam_annealing", None)
        if getattr(scheduler, "fitted_steps", None) is not None:  # see run.fit_schedule_to_data
            scheduler.num_training_steps = scheduler.fitted_steps

    # --- front end: augmentation and the labels it replicates, together -----------------------

    def _augmenting(self, stage):
        return stage == sb.Stage.TRAIN and self.hparams.fea_augment is not None

    def front_end(self, wavs, wav_lens, stage):
        """Waveforms (B, samples) -> CNN output (B', T/4, 32 * n_mels / 4); in training the batch
        is speed-perturbed (with speed_perturb_per: batch) and the features augmented, where B'
        may exceed B (see ``replicate_labels``). Relative lengths are unchanged by either."""
        if (stage == sb.Stage.TRAIN and getattr(self.hparams, "speed_perturb", None) is not None
                and getattr(self.hparams, "speed_perturb_per", None) == "batch"):
            wavs = self.hparams.speed_perturb(wavs)  # draws from the checkpointed global RNG
        feats = self.hparams.compute_features(wavs)  # (B, T, n_mels)
        feats = self.modules.normalize(feats, wav_lens, epoch=self.hparams.epoch_counter.current)
        if self._augmenting(stage):
            feats, _ = self.hparams.fea_augment(feats, wav_lens)
        return self.modules.CNN(feats)

    def replicate_labels(self, stage, *labels):
        """Label tensors (B, ...) matched to ``front_end``'s batch of B' utterances: replicated
        as the feature augmentation replicated the batch (training only). Returns a tuple."""
        if not self._augmenting(stage):
            return labels
        return tuple(self.hparams.fea_augment.replicate_labels(x) for x in labels)

    # --- statistics --------------------------------------------------------------------------

    def stage_stats(self, stage):
        """The recipe's statistics of a VALID or TEST stage ({name: value}, besides the loss);
        ``ckpt_key`` must be among the VALID ones."""
        raise NotImplementedError

    def reset_error_rates(self):
        self.wer_metric = self.hparams.wer_computer()
        self.cer_metric = self.hparams.cer_computer()

    def append_error_rates(self, batch, words):
        """words: one list of words per utterance of ``batch``."""
        targets = [wrd.split() for wrd in batch.wrd]
        self.wer_metric.append(batch.id, words, targets)
        self.cer_metric.append(batch.id, words, targets)

    def error_rates(self):
        return {"WER": self.wer_metric.summarize("error_rate"),
                "CER": self.cer_metric.summarize("error_rate")}

    def on_stage_start(self, stage, epoch=None):
        if stage != sb.Stage.TRAIN:
            self.reset_error_rates()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Training: keeps the loss for the epoch's log line. Validation: logs the epoch and keeps
        the best checkpoints. Test: logs and writes the error-rate files."""
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats.update(self.stage_stats(stage))
        if stage == sb.Stage.VALID:
            self.log_valid(stats, epoch)
        else:
            self.log_test(stats)

    # --- training steps and checkpoints ------------------------------------------------------

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
                f"{self.checkpointer.checkpoints_dir}: train first (without --test_only, "
                "skip_train False)")
        state = average_checkpoints(ckpts, recoverable_name="model",
                                    parameter_loader=load_model_params)
        self.hparams.model.load_state_dict(state, strict=True)
        self.hparams.model.eval()
        logger.info(f"Evaluating the average of {len(ckpts)} checkpoint(s): "
                    + ", ".join(c.path.name for c in ckpts))
        if len(ckpts) < self.hparams.avg_checkpoints:
            logger.warning(f"avg_checkpoints is {self.hparams.avg_checkpoints} but "
                           f"{self.checkpointer.checkpoints_dir} holds {len(ckpts)} checkpoint(s) "
                           f"with a {max_key or min_key} value: averaging {len(ckpts)} (the run "
                           "kept the avg_checkpoints it trained with)")

    def evaluate_best(self, test_set, **kwargs):
        """evaluate() with the checkpoints ranked by this recipe's validation statistic."""
        key = {"max_key" if self.ckpt_max else "min_key": self.ckpt_key}
        return self.evaluate(test_set, **key, **kwargs)

    def test(self, tests, wer_name="wer"):
        """Evaluates every test set ({name: dataset}) with the averaged best checkpoints, writing
        <output_wer_folder>/<wer_name>_<name>.txt and the CER beside it (wer_no_lm ->
        cer_no_lm)."""
        folder = self.hparams.output_wer_folder
        os.makedirs(folder, exist_ok=True)
        for name, dataset in tests.items():
            self.test_name = name
            self.result_files = {"wer": os.path.join(folder, f"{wer_name}_{name}.txt"),
                                 "cer": os.path.join(folder, wer_name.replace("wer", "cer", 1)
                                                     + f"_{name}.txt")}
            self.evaluate_best(dataset, test_loader_kwargs=self.hparams.test_dataloader_opts)

    # --- logging -----------------------------------------------------------------------------

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

    def log_test(self, stage_stats):
        """Logs test statistics and writes the error rates to ``result_files`` (main process)."""
        self.hparams.train_logger.log_stats(
            stats_meta={"Epoch loaded": self.hparams.epoch_counter.current,
                        "test set": self.test_name},
            test_stats=stage_stats)
        if if_main_process():
            for metric, key in ((self.wer_metric, "wer"), (self.cer_metric, "cer")):
                with open(self.result_files[key], "w") as w:
                    metric.write_stats(w)
