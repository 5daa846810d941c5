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
The skeleton (front end, statistics, checkpoints, logging) is recipes.brain.RecipeBrain's.
"""

import sys

from recipes import run_cli
from recipes.device import set_mps_fallback_env

MPS_NOTE = set_mps_fallback_env(sys.argv[1:])  # must precede `import torch`

import speechbrain as sb  # noqa: E402
from speechbrain.decoders.ctc import CTCBeamSearcher, ctc_greedy_decode  # noqa: E402

from recipes.brain import RecipeBrain  # noqa: E402
from recipes.inter_ctc import inter_ctc_layer, layer_output  # noqa: E402
from recipes.run import train_test_export  # noqa: E402
from recipes.tokenizer import decode_words  # noqa: E402


class ASR(RecipeBrain):
    kind, ckpt_key, ckpt_max = "CTC", "WER", False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inter_ctc_weight, self.inter_ctc_layer = inter_ctc_layer(vars(self.hparams))

    def compute_forward(self, batch, stage):
        """Waveforms (B, samples) -> CTC log-probabilities (B, T', vocab), those of the
        intermediate layer (training with inter_ctc_weight > 0, else None), lengths, hypotheses."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        src = self.front_end(wavs, wav_lens, stage)  # (B, T/4, 32 * n_mels / 4)
        inter = self.inter_ctc_layer if stage == sb.Stage.TRAIN else None
        with layer_output(self.modules.Transformer, inter) as kept:
            enc_out, _ = self.modules.Transformer(src, tgt=None, wav_len=wav_lens)
        p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(enc_out))
        p_inter = None
        if "out" in kept:  # the same output layer
            p_inter = self.hparams.log_softmax(self.modules.ctc_lin(kept["out"]))
        hyps = None
        if stage != sb.Stage.TRAIN:
            # Outputs beyond the tokenizer's vocabulary are never targets: decode without them.
            p_dec = p_ctc[..., : self.tokenizer.vocab_size()].log_softmax(-1)
            if stage == sb.Stage.VALID:
                hyps = ctc_greedy_decode(p_dec, wav_lens, blank_id=self.hparams.blank_index)
            else:
                hyps = self.test_searcher(p_dec, wav_lens)
        return p_ctc, p_inter, wav_lens, hyps

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss (mixed with the intermediate layer's, see recipes.inter_ctc); WER/CER
        statistics outside training."""
        p_ctc, p_inter, wav_lens, hyps = predictions
        tokens, tokens_lens = self.replicate_labels(stage, *batch.tokens)
        loss = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens).sum()
        if p_inter is not None:
            inter = self.hparams.ctc_cost(p_inter, tokens, wav_lens, tokens_lens).sum()
            loss = (1 - self.inter_ctc_weight) * loss + self.inter_ctc_weight * inter
        if stage == sb.Stage.VALID:
            self.append_error_rates(batch, [decode_words(self.tokenizer, h) for h in hyps])
        elif stage == sb.Stage.TEST:
            self.append_error_rates(batch, [h[0].text.split() for h in hyps])
        return loss

    def stage_stats(self, stage):
        return self.error_rates()


def test_searcher(hparams, tokenizer, lm_model):
    """CTC prefix beam search over the tokenizer's pieces."""
    vocab = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size())]
    return CTCBeamSearcher(**hparams["test_beam_search"], vocab_list=vocab)


if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: train_test_export(argv, ASR, test_searcher, MPS_NOTE),
                     sys.argv[1:]))
