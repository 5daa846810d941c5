#!/usr/bin/env python3
"""CTC recipe: CNN front end + ConMamba/Conformer/Transformer encoder + CTC over characters.

    python train_CTC.py hparams/CTC/conmamba_large.yaml --data_folder /data/LibriSpeech
    python train_CTC.py hparams/CTC/conmamba_small.yaml --data_folder ... --device mps
    python train_CTC.py hparams/CTC/conmamba_large.yaml --data_folder ... --d_state 32 --expand 4
    torchrun --nproc-per-node 4 train_CTC.py hparams/CTC/conmamba_large.yaml --data_folder ...

Any CSV manifests (ID, duration, wav, wrd; wav relative to data_folder) instead of LibriSpeech:
    python train_CTC.py hparams/CTC/conmamba_small.yaml --skip_prep True --data_folder DIR \
        --train_csv DIR/train.csv --valid_csv DIR/valid.csv --test_csv "[DIR/test.csv]"

Validation decodes greedily; testing uses the CTC prefix beam search on the average of the
avg_checkpoints best checkpoints (lowest valid WER). At the end the model is exported to
<output_folder>/inference for speechbrain.inference.ASR.EncoderASR.from_hparams.
"""

import sys

from recipes import RecipeError
from recipes.device import set_mps_fallback_env

MPS_NOTE = set_mps_fallback_env(sys.argv[1:])  # must precede `import torch`

import speechbrain as sb  # noqa: E402
from speechbrain.decoders.ctc import CTCBeamSearcher, ctc_greedy_decode  # noqa: E402
from speechbrain.utils.distributed import run_on_main  # noqa: E402

from recipes.brain import RecipeBrain  # noqa: E402
from recipes.data import dataio_prepare, loader_kwargs  # noqa: E402
from recipes.export import export_inference_folder  # noqa: E402
from recipes.run import attach_tensorboard, fit_and_test, setup  # noqa: E402
from recipes.tokenizer import decode_words, train_tokenizer  # noqa: E402


class ASR(RecipeBrain):
    ckpt_key, ckpt_max = "WER", False

    def compute_forward(self, batch, stage):
        """Waveforms (B, samples) -> CTC log-probabilities (B, T', vocab)."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        src = self.front_end(wavs, wav_lens, stage)  # (B, T/4, 640)
        enc_out, _ = self.modules.Transformer(src, tgt=None, wav_len=wav_lens)
        p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(enc_out))
        hyps = None
        if stage != sb.Stage.TRAIN:
            # Outputs beyond the tokenizer's vocabulary are never targets: decode without them.
            p_dec = p_ctc[..., : self.tokenizer.vocab_size()].log_softmax(-1)
            if stage == sb.Stage.VALID:
                hyps = ctc_greedy_decode(p_dec, wav_lens, blank_id=self.hparams.blank_index)
            else:
                hyps = self.test_searcher(p_dec, wav_lens)
        return p_ctc, wav_lens, hyps

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss; WER/CER statistics outside training."""
        p_ctc, wav_lens, hyps = predictions
        tokens, tokens_lens = batch.tokens
        if stage == sb.Stage.TRAIN and self.hparams.fea_augment is not None:
            tokens = self.hparams.fea_augment.replicate_labels(tokens)
            tokens_lens = self.hparams.fea_augment.replicate_labels(tokens_lens)
        loss = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens).sum()
        if stage != sb.Stage.TRAIN:
            if stage == sb.Stage.VALID:
                words = [decode_words(self.tokenizer, h) for h in hyps]
            else:
                words = [h[0].text.split(" ") for h in hyps]
            self.append_error_rates(batch, words)
        return loss

    def on_stage_start(self, stage, epoch):
        if stage != sb.Stage.TRAIN:
            self.reset_error_rates()

    def on_stage_end(self, stage, stage_loss, epoch):
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats["CER"] = self.cer_metric.summarize("error_rate")
        stats["WER"] = self.wer_metric.summarize("error_rate")
        if stage == sb.Stage.VALID:
            self.log_valid(stats, epoch)
        else:
            self.log_test(stats, {self.wer_metric: self.result_files["wer"],
                                  self.cer_metric: self.result_files["cer"]})


def main(argv):
    _, hparams, run_opts = setup(argv, "CTC", MPS_NOTE)
    tokenizer, tokenizer_file = train_tokenizer(hparams)
    train, valid, tests, train_sampler, valid_sampler = dataio_prepare(
        hparams, tokenizer, with_bos_eos=False)
    train_opts, valid_opts = loader_kwargs(hparams, train_sampler, valid_sampler)

    brain = ASR(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                run_opts=run_opts, checkpointer=hparams["checkpointer"])
    brain.tokenizer = tokenizer
    vocab = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size())]
    brain.test_searcher = CTCBeamSearcher(**hparams["test_beam_search"], vocab_list=vocab)
    attach_tensorboard(brain, hparams)

    fit_and_test(brain, hparams, run_opts, train, valid, tests, train_opts, valid_opts, "wer")
    run_on_main(export_inference_folder, args=[hparams, "CTC", tokenizer_file])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except RecipeError as e:  # user-fixable: the message says what to do
        sys.exit(f"ERROR: {e}")
