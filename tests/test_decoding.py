"""Stateful Mamba-decoder beam search equals SpeechBrain's stateless recomputation."""

import pytest
import torch

from speechbrain.decoders import S2STransformerBeamSearcher
from speechbrain.decoders.scorer import CTCScorer, ScorerBuilder, TransformerLMScorer
from speechbrain.lobes.models.transformer.TransformerLM import TransformerLM
from speechbrain.nnet.linear import Linear

from modules.decoding import S2SMambaBeamSearcher
from modules.TransformerASR import TransformerASR

VOCAB, BOS, EOS = 40, 1, 2


def make_model(decoder="mamba", normalize_before=True):
    """Tiny ConMamba model made 'decisive' (sharp output layer, small token embeddings, strong and
    slowly decaying cross-Mamba) so that hypotheses depend on the utterance, some end early and
    beams get reordered."""
    torch.manual_seed(0)
    net = TransformerASR(
        VOCAB,
        24,
        d_model=32,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        d_ffn=64,
        encoder_module="conmamba",
        decoder_module=decoder,
        attention_type="RelPosMHAXL",
        normalize_before=True,
        causal=False,
        mamba_config={"d_state": 8},
    ).eval()
    seq_lin, ctc_lin = Linear(input_size=32, n_neurons=VOCAB), Linear(
        input_size=32, n_neurons=VOCAB
    )
    with torch.no_grad():
        seq_lin.w.weight.mul_(8)
        seq_lin.w.bias[EOS] += 2.0
        net.custom_tgt_module.layers[0].emb.Embedding.weight.mul_(0.2)
        if decoder == "mamba":
            for layer in net.decoder.layers:
                layer.normalize_before = normalize_before
                layer.cross_mamba.dt_proj.bias.fill_(-4.0)
                layer.cross_mamba.out_proj.weight.mul_(8)
    return net, seq_lin, ctc_lin


def encoded(net, lengths=(25, 15, 21)):
    torch.manual_seed(1)
    L = max(lengths)
    wav_len = torch.tensor(lengths, dtype=torch.float) / L
    with torch.no_grad():
        return net.encode(torch.randn(len(lengths), L, 24), wav_len), wav_len


@pytest.mark.parametrize("normalize_before", [True, False])
def test_decode_step_equals_full_decode(normalize_before):
    net, seq_lin, _ = make_model(normalize_before=normalize_before)
    enc, wav_len = encoded(net)
    enc_len = torch.round(wav_len * enc.shape[1]).int()
    tokens = torch.randint(3, VOCAB, (3, 12))
    full, _ = net.decode(tokens, enc, enc_len)
    state = net.init_decoder_state(enc, enc_len)
    steps = torch.cat([net.decode_step(tokens[:, t], state) for t in range(12)], dim=1)
    assert state.step == 12
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    logp = lambda h: seq_lin(h).log_softmax(-1)  # noqa: E731
    torch.testing.assert_close(logp(steps), logp(full), atol=1e-4, rtol=0)
    for bad in (wav_len, enc_len[:2], enc_len + enc.shape[1], -enc_len):
        with pytest.raises(ValueError, match="mem_lens must be integer frame counts"):
            net.init_decoder_state(enc, bad)  # relative lengths, wrong count, out of range


def make_scorer(kind, ctc_lin):
    if kind is None:
        return None
    ctc = CTCScorer(ctc_fc=ctc_lin, blank_index=0, eos_index=EOS)
    if kind == "ctc":
        return ScorerBuilder(full_scorers=[ctc], weights={"ctc": 0.4})
    torch.manual_seed(2)
    lm = TransformerLM(
        vocab=VOCAB,
        d_model=32,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=0,
        d_ffn=64,
        dropout=0.0,
        activation=torch.nn.GELU,
        normalize_before=False,
    ).eval()
    lm_scorer = TransformerLMScorer(language_model=lm, temperature=1.15)
    return ScorerBuilder(full_scorers=[lm_scorer, ctc], weights={"ctc": 0.4, "transformerlm": 0.6})


def search(searcher_cls, net, seq_lin, scorer, enc, wav_len, **kw):
    searcher = searcher_cls(
        modules=[net, seq_lin],
        bos_index=BOS,
        eos_index=EOS,
        min_decode_ratio=0.0,
        max_decode_ratio=1.0,
        beam_size=4,
        using_eos_threshold=False,
        length_normalization=True,
        temperature=1.15,
        scorer=scorer,
        **kw,
    )
    with torch.no_grad():
        return searcher(enc, wav_len)


@pytest.mark.parametrize("scorer", [None, "ctc", "ctc+lm"])
def test_stateful_search_equals_stateless(scorer):
    net, seq_lin, ctc_lin = make_model()
    enc, wav_len = encoded(net)
    hyps, lens, scores, log_probs = search(
        S2SMambaBeamSearcher, net, seq_lin, make_scorer(scorer, ctc_lin), enc, wav_len
    )
    ref_hyps, ref_lens, ref_scores, ref_log_probs = search(
        S2SMambaBeamSearcher,
        net,
        seq_lin,
        make_scorer(scorer, ctc_lin),
        enc,
        wav_len,
        stateful=False,
    )
    assert hyps == ref_hyps and torch.equal(lens, ref_lens)
    assert len({tuple(h) for h in hyps}) == 3  # utterances decode differently
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(log_probs, ref_log_probs, atol=1e-4, rtol=0)


def test_beam_reordering_matters(monkeypatch):
    """Guard for the test above: without reordering the caches the search goes wrong."""
    net, seq_lin, _ = make_model()
    enc, wav_len = encoded(net)
    hyps, _, scores, _ = search(S2SMambaBeamSearcher, net, seq_lin, None, enc, wav_len)
    monkeypatch.setattr(S2SMambaBeamSearcher, "permute_mem", lambda self, memory, index: memory)
    bad_hyps, _, bad_scores, _ = search(S2SMambaBeamSearcher, net, seq_lin, None, enc, wav_len)
    assert bad_hyps != hyps or not torch.allclose(bad_scores, scores, atol=1e-4)


def test_transformer_decoder_is_searched_like_speechbrain():
    net, seq_lin, ctc_lin = make_model(decoder="transformer")
    enc, wav_len = encoded(net)
    ours = search(S2SMambaBeamSearcher, net, seq_lin, make_scorer("ctc", ctc_lin), enc, wav_len)
    ref = search(
        S2STransformerBeamSearcher, net, seq_lin, make_scorer("ctc", ctc_lin), enc, wav_len
    )
    assert ours[0] == ref[0]
    torch.testing.assert_close(ours[2], ref[2])


def test_speechbrain_searcher_runs_mamba_decoder():
    """SpeechBrain's own (stateless) searcher works with the Mamba decoder unchanged."""
    net, seq_lin, _ = make_model()
    enc, wav_len = encoded(net)
    ours = search(S2SMambaBeamSearcher, net, seq_lin, None, enc, wav_len)
    ref = search(S2STransformerBeamSearcher, net, seq_lin, None, enc, wav_len)
    assert ours[0] == ref[0]
    torch.testing.assert_close(ours[2], ref[2], atol=1e-4, rtol=0)


def test_decoded_words_are_never_empty():
    """A lone word-start piece (or an empty hypothesis) adds no empty word to the WER."""
    from recipes.tokenizer import decode_words

    class Pieces:
        def __init__(self, text):
            self.text = text

        def vocab_size(self):
            return 5

        def decode_ids(self, ids):
            return self.text

    assert decode_words(Pieces("THE "), [1, 2]) == ["THE"]
    assert decode_words(Pieces(""), []) == []
    assert decode_words(Pieces(" A  B"), [1]) == ["A", "B"]
