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
The skeleton (front end, statistics, checkpoints, logging) is recipes.brain.RecipeBrain's.
"""

import sys

from recipes import run_cli
from recipes.device import set_mps_fallback_env

MPS_NOTE = set_mps_fallback_env(sys.argv[1:])  # must precede `import torch`

import speechbrain as sb  # noqa: E402
from speechbrain.decoders.scorer import ScorerBuilder, TransformerLMScorer  # noqa: E402

from recipes.brain import RecipeBrain  # noqa: E402
from recipes.run import train_test_export  # noqa: E402
from recipes.tokenizer import decode_words  # noqa: E402


class ASR(RecipeBrain):
    kind, ckpt_key, ckpt_max = "S2S", "ACC", True

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
        src = self.front_end(wavs, wav_lens, stage)  # (B, T/4, 32 * n_mels / 4)
        tokens_bos, = self.replicate_labels(stage, batch.tokens_bos.data)
        enc_out, dec_out = self.modules.Transformer(src, tokens_bos, wav_lens,
                                                    pad_idx=self.hparams.pad_index)
        p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(enc_out))
        p_seq = self.hparams.log_softmax(self.modules.seq_lin(dec_out))
        hyps = None
        if self._search_now(stage):
            searcher = self.test_searcher if stage == sb.Stage.TEST else \
                self.hparams.valid_search
            hyps, _, _, _ = searcher(enc_out.detach(), wav_lens)
        return p_ctc, p_seq, wav_lens, hyps

    def compute_objectives(self, predictions, batch, stage):
        """ctc_weight * CTC + (1 - ctc_weight) * KL-div; accuracy and WER/CER outside training."""
        p_ctc, p_seq, wav_lens, hyps = predictions
        tokens, tokens_lens, tokens_eos, tokens_eos_lens = self.replicate_labels(
            stage, *batch.tokens, *batch.tokens_eos)
        loss_seq = self.hparams.seq_cost(p_seq, tokens_eos, length=tokens_eos_lens).sum()
        loss_ctc = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens).sum()
        w = self.hparams.ctc_weight
        loss = w * loss_ctc + (1 - w) * loss_seq
        if stage != sb.Stage.TRAIN:
            self.acc_metric.append(p_seq, tokens_eos, tokens_eos_lens)
            if hyps is not None:
                self.append_error_rates(batch, [decode_words(self.tokenizer, h) for h in hyps])
        return loss

    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        if stage != sb.Stage.TRAIN:
            self.acc_metric = self.hparams.acc_computer()

    def stage_stats(self, stage):
        """Accuracy always; WER/CER in the stages that ran the beam search."""
        return {"ACC": self.acc_metric.summarize(),
                **(self.error_rates() if self._search_now(stage) else {})}


def test_searcher(hparams, tokenizer, lm_model):
    """The recipe's test searcher (test_search) with the CTC scorer, plus the Transformer LM
    when one is used."""
    scorers, weights = [hparams["ctc_scorer"]], {"ctc": hparams["ctc_weight_decode"]}
    if lm_model is not None:
        scorers.append(TransformerLMScorer(language_model=lm_model,
                                           temperature=hparams["temperature"]))
        weights["transformerlm"] = hparams["lm_weight"]
    return hparams["test_search"](scorer=ScorerBuilder(full_scorers=scorers, weights=weights))


if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: train_test_export(argv, ASR, test_searcher, MPS_NOTE),
                     sys.argv[1:]))
