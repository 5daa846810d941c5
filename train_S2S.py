#!/usr/bin/env python3
"""Joint CTC/attention recipe: CNN front end + ConMamba/Conformer encoder + Transformer/Mamba
decoder, loss ctc_weight * CTC + (1 - ctc_weight) * KL-div (label smoothing).

    python train_S2S.py hparams/S2S/conmamba_large.yaml --data_folder /data/LibriSpeech
    python train_S2S.py hparams/S2S/conmamba_small.yaml --data_folder ... --device mps
    python train_S2S.py hparams/S2S/conmamba_large.yaml --data_folder ... --d_state 32 --expand 4
    torchrun --nproc-per-node 4 train_S2S.py hparams/S2S/conmamba_large.yaml --data_folder ...

The tokenizer and the Transformer LM come from pretrained_lm_tokenizer_path (Hugging Face id or
local folder with lm.ckpt + tokenizer.ckpt); --no_lm True decodes without LM and trains a
SentencePiece tokenizer on the training transcripts. Validation runs a CTC-joint beam search
every valid_search_interval epochs; testing adds the LM, on the average of the avg_checkpoints
best checkpoints (highest valid accuracy). At the end the model is exported to
<output_folder>/inference for speechbrain.inference.ASR.EncoderDecoderASR.from_hparams.
"""

import sys

from recipes import RecipeError
from recipes.device import set_mps_fallback_env

MPS_NOTE = set_mps_fallback_env(sys.argv[1:])  # must precede `import torch`

import speechbrain as sb  # noqa: E402
from speechbrain.decoders.scorer import ScorerBuilder, TransformerLMScorer  # noqa: E402
from speechbrain.utils.distributed import run_on_main  # noqa: E402

from recipes.brain import RecipeBrain  # noqa: E402
from recipes.data import dataio_prepare, loader_kwargs  # noqa: E402
from recipes.export import export_inference_folder  # noqa: E402
from recipes.run import attach_tensorboard, fit_and_test, setup  # noqa: E402
from recipes.tokenizer import decode_words, s2s_tokenizer  # noqa: E402


class ASR(RecipeBrain):
    ckpt_key, ckpt_max = "ACC", True

    def _search_now(self, stage):
        if stage == sb.Stage.TEST:
            return True
        return (stage == sb.Stage.VALID
                and self.hparams.epoch_counter.current % self.hparams.valid_search_interval == 0)

    def compute_forward(self, batch, stage):
        """Waveforms (B, samples) -> CTC log-probs (B, T', V), decoder log-probs (B, U+1, V)
        and, when searching, hypotheses (lists of token ids)."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        tokens_bos, _ = batch.tokens_bos
        src = self.front_end(wavs, wav_lens, stage)  # (B, T/4, 640)
        if stage == sb.Stage.TRAIN and self.hparams.fea_augment is not None:
            tokens_bos = self.hparams.fea_augment.replicate_labels(tokens_bos)
        enc_out, dec_out = self.modules.Transformer(src, tokens_bos, wav_lens,
                                                    pad_idx=self.hparams.pad_index)
        p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(enc_out))
        p_seq = self.hparams.log_softmax(self.modules.seq_lin(dec_out))
        hyps = None
        if self._search_now(stage):
            searcher = self.hparams.test_search if stage == sb.Stage.TEST else \
                self.hparams.valid_search
            hyps, _, _, _ = searcher(enc_out.detach(), wav_lens)
        return p_ctc, p_seq, wav_lens, hyps

    def compute_objectives(self, predictions, batch, stage):
        """ctc_weight * CTC + (1 - ctc_weight) * KL-div; accuracy and WER/CER outside training."""
        p_ctc, p_seq, wav_lens, hyps = predictions
        tokens, tokens_lens = batch.tokens
        tokens_eos, tokens_eos_lens = batch.tokens_eos
        if stage == sb.Stage.TRAIN and self.hparams.fea_augment is not None:
            replicate = self.hparams.fea_augment.replicate_labels
            tokens, tokens_lens = replicate(tokens), replicate(tokens_lens)
            tokens_eos, tokens_eos_lens = replicate(tokens_eos), replicate(tokens_eos_lens)
        loss_seq = self.hparams.seq_cost(p_seq, tokens_eos, length=tokens_eos_lens).sum()
        loss_ctc = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens).sum()
        w = self.hparams.ctc_weight
        loss = w * loss_ctc + (1 - w) * loss_seq
        if stage != sb.Stage.TRAIN:
            self.acc_metric.append(p_seq, tokens_eos, tokens_eos_lens)
            if hyps is not None:
                self.append_error_rates(batch, [decode_words(self.tokenizer, h) for h in hyps])
        return loss

    def on_stage_start(self, stage, epoch):
        if stage != sb.Stage.TRAIN:
            self.acc_metric = self.hparams.acc_computer()
            self.reset_error_rates()

    def on_stage_end(self, stage, stage_loss, epoch):
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats["ACC"] = self.acc_metric.summarize()
        if self._search_now(stage):
            stats["WER"] = self.wer_metric.summarize("error_rate")
            stats["CER"] = self.cer_metric.summarize("error_rate")
        if stage == sb.Stage.VALID:
            self.log_valid(stats, epoch)
        else:
            self.log_test(stats, {self.wer_metric: self.result_files["wer"],
                                  self.cer_metric: self.result_files["cer"]})


def build_test_search(hparams, lm_model):
    """The test searcher: CTC scorer, plus the Transformer LM when one is used."""
    scorers, weights = [hparams["ctc_scorer"]], {"ctc": hparams["ctc_weight_decode"]}
    if lm_model is not None:
        scorers.append(TransformerLMScorer(language_model=lm_model,
                                           temperature=hparams["temperature"]))
        weights["transformerlm"] = hparams["lm_weight"]
    return hparams["test_search"](scorer=ScorerBuilder(full_scorers=scorers, weights=weights))


def main(argv):
    _, hparams, run_opts = setup(argv, "S2S", MPS_NOTE)
    lm_model = None if hparams["no_lm"] else hparams["lm_model"]()
    tokenizer, tokenizer_file = s2s_tokenizer(hparams, lm_model)
    if lm_model is not None:
        lm_model.to(run_opts.device).eval().requires_grad_(False)
    hparams["test_search"] = build_test_search(hparams, lm_model)
    train, valid, tests, train_sampler, valid_sampler = dataio_prepare(
        hparams, tokenizer, with_bos_eos=True)
    train_opts, valid_opts = loader_kwargs(hparams, train_sampler, valid_sampler)

    brain = ASR(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                run_opts=run_opts, checkpointer=hparams["checkpointer"])
    brain.tokenizer = tokenizer
    attach_tensorboard(brain, hparams)

    fit_and_test(brain, hparams, run_opts, train, valid, tests, train_opts, valid_opts,
                 "wer_no_lm" if lm_model is None else "wer")
    run_on_main(export_inference_folder, args=[hparams, "S2S", tokenizer_file],
                kwargs={"lm_model": lm_model})


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except RecipeError as e:  # user-fixable: the message says what to do
        sys.exit(f"ERROR: {e}")
