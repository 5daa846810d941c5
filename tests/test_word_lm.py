"""Word n-gram LM (ARPA back-off model), lexicon, lexicon-constrained CTC decoding, and their
use by the Transcriber and transcribe.py."""

import collections
import math
import os
import re
import shutil

import pytest
import torch

from recipes import RecipeError
from inference.word_lm import (ARPA, LEXICON, build_arpa, build_word_lm, read_transcripts,
                             write_lexicon)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CSV = os.path.join(REPO, "data", "mini_corpus", "train.csv")
SENTENCES = [s.split() for s in [
    "THE CAT SAT ON THE MAT", "THE DOG SAT ON THE LOG", "A CAT AND A DOG", "THE CAT RAN",
    "HELLO WORLD", "HELLO THERE WORLD", "THE WORLD IS ROUND", "A DOG RAN ON THE MAT"]]


def parse_arpa(text):
    """{order: {ngram tuple: (log10 prob, log10 backoff)}} of an ARPA text."""
    grams, order, counts = collections.defaultdict(dict), None, {}
    for line in text.splitlines():
        if line.startswith("ngram "):
            n, c = line[6:].split("=")
            counts[int(n)] = int(c)
        elif line.endswith("-grams:"):
            order = int(line[1:].split("-")[0])
        elif line.strip() and order and not line.startswith("\\"):
            fields = line.split("\t")
            gram = tuple(fields[1].split())
            grams[order][gram] = (float(fields[0]), float(fields[2]) if len(fields) > 2 else 0.0)
    assert {n: len(g) for n, g in grams.items()} == counts  # the header's counts
    return grams


def backoff_prob(grams, history, word):
    """P(word | history) the way KenLM reads a back-off ARPA model."""
    gram = history + (word,)
    if gram in grams[len(gram)]:
        return 10 ** grams[len(gram)][gram][0]
    weight = grams[len(history)].get(history, (0, 0.0))[1] if history else 0.0
    return 10 ** weight * backoff_prob(grams, history[1:], word)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_arpa_probabilities_sum_to_one_after_every_history(order):
    grams = parse_arpa(build_arpa(SENTENCES, order))
    vocab = [g[0] for g in grams[1] if g[0] != "<s>"]
    histories = [()] + [g for n in range(1, order) for g in grams[n] if g[-1] != "</s>"]
    for history in histories:
        total = sum(backoff_prob(grams, history, w) for w in vocab)
        assert math.isclose(total, 1.0, rel_tol=1e-5), (history, total)
    if order >= 2:  # a seen continuation beats its unigram probability and unseen words
        p = backoff_prob(grams, ("HELLO",), "WORLD")
        assert p > 2 * backoff_prob(grams, (), "WORLD")
        assert p > 2 * backoff_prob(grams, ("HELLO",), "MAT")


def test_arpa_errors():
    with pytest.raises(RecipeError, match="no words"):
        build_arpa([[], []])
    with pytest.raises(RecipeError, match="order"):
        build_arpa(SENTENCES, 0)


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    text = folder / "text.txt"
    text.write_text("\n".join(" ".join(s) for s in SENTENCES) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "char"),
                                   model_type="char", vocab_size=24, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(folder / "char.model"))


def test_lexicon_spells_words_with_the_tokenizer(char_tokenizer, tmp_path):
    skipped = write_lexicon({"HELLO", "CAT", "ZEBRA"}, char_tokenizer, tmp_path / "lex.txt")
    lines = (tmp_path / "lex.txt").read_text().splitlines()
    assert lines == ["CAT C A T", "HELLO H E L L O"]  # "▁" separates words when decoding
    assert skipped == 1  # Z, B are not in the tokenizer's alphabet


def _emissions(tokenizer, text, sharp=8.0):
    """Log-probs (1, frames, vocab) that spell `text` one piece per frame, blanks between
    repeated pieces."""
    pieces = tokenizer.encode(text, out_type=str)
    frames = []
    for i, piece in enumerate(pieces):
        if i and pieces[i - 1] == piece:
            frames.append(0)  # blank (id 0)
        frames.append(tokenizer.piece_to_id(piece))
    logits = torch.zeros(1, len(frames), tokenizer.vocab_size())
    logits[0, torch.arange(len(frames)), torch.tensor(frames)] = sharp
    return logits.log_softmax(-1)


def test_lexicon_decoder_outputs_lexicon_words(char_tokenizer, tmp_path):
    pytest.importorskip("flashlight.lib.text")
    from inference.word_lm import CTCLMDecoder

    build_word_lm(SENTENCES, char_tokenizer, tmp_path)
    decode = CTCLMDecoder(str(tmp_path), char_tokenizer, blank_index=0, beam_size=20)
    clean = _emissions(char_tokenizer, "HELLO WORLD")
    assert decode(clean, torch.ones(1)) == ["HELLO WORLD"]
    # greedy CTC reads "HALLO WARLD" here; only lexicon words come out
    misspelt = _emissions(char_tokenizer, "HALLO WARLD", sharp=2.0)
    assert decode(misspelt, torch.ones(1)) == ["HELLO WORLD"]
    # relative lengths cut the emissions: the first 6 frames spell "▁HELLO" (blank between Ls)
    both = torch.cat([clean, clean])
    assert decode(both, torch.tensor([1.0, 7 / clean.shape[1]])) == ["HELLO WORLD", "HELLO"]


def test_lexicon_decoder_needs_the_files(char_tokenizer, tmp_path):
    pytest.importorskip("flashlight.lib.text")
    from inference.word_lm import CTCLMDecoder

    with pytest.raises(RecipeError, match="inference.make_word_lm"):
        CTCLMDecoder(str(tmp_path), char_tokenizer, blank_index=0)


def _blend(tokenizer, text_a, text_b):
    """Emissions equally likely to spell text_a or text_b (same number of pieces)."""
    a, b = _emissions(tokenizer, text_a), _emissions(tokenizer, text_b)
    assert a.shape == b.shape
    return torch.logaddexp(a, b) - math.log(2)


def test_token_lm_decoder_spells_new_words_and_prefers_seen_spellings(char_tokenizer, tmp_path):
    pytest.importorskip("flashlight.lib.text")
    from inference.word_lm import CTCLMDecoder, build_token_lm, write_lm_settings

    build_token_lm(SENTENCES, char_tokenizer, str(tmp_path), order=4)
    write_lm_settings(str(tmp_path), "token", lm_weight=1.0)
    decode = CTCLMDecoder(str(tmp_path), char_tokenizer, blank_index=0, beam_size=20)
    assert decode.kind == "token" and decode.lm_weight == 1.0
    # clear acoustics: a word the LM text never had still comes out (a lexicon cannot do this)
    assert decode(_emissions(char_tokenizer, "HELLO WARLD"), torch.ones(1)) == ["HELLO WARLD"]
    # an O/A tie in the second word: the LM picks the spelling its text had, in either order
    for first, second in (("HELLO WORLD", "HELLO WARLD"), ("HELLO WARLD", "HELLO WORLD")):
        assert decode(_blend(char_tokenizer, first, second), torch.ones(1)) == ["HELLO WORLD"]
    # an explicit weight overrides ctc_lm.json's
    assert CTCLMDecoder(str(tmp_path), char_tokenizer, 0, lm_weight=0.0).lm_weight == 0.0


def test_interrupted_lm_build_keeps_the_previous_lm_and_damage_is_named(char_tokenizer,
                                                                         tmp_path, monkeypatch):
    pytest.importorskip("flashlight.lib.text")
    from inference import word_lm
    from inference.word_lm import TOKEN_ARPA, CTCLMDecoder, build_token_lm, write_lm_settings

    build_token_lm(SENTENCES, char_tokenizer, str(tmp_path), order=4)
    write_lm_settings(str(tmp_path), "token", lm_weight=1.0)
    before = (tmp_path / TOKEN_ARPA).read_text()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(word_lm, "build_arpa", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_token_lm(SENTENCES[:1], char_tokenizer, str(tmp_path), order=2)
    assert (tmp_path / TOKEN_ARPA).read_text() == before  # not truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TOKEN_ARPA, "ctc_lm.json"])
    CTCLMDecoder(str(tmp_path), char_tokenizer, blank_index=0)
    (tmp_path / TOKEN_ARPA).write_text("")  # damaged some other way
    with pytest.raises(RecipeError, match=f"CTC LM in {tmp_path} cannot be loaded "
                                          f"\\({TOKEN_ARPA}.*rebuild it"):
        CTCLMDecoder(str(tmp_path), char_tokenizer, blank_index=0)


@pytest.mark.parametrize("text", ["THE CAT SAT ON THE MAT", "HELLO WARLD"])
def test_token_lm_scores_each_token_with_its_own_lm_probability(char_tokenizer, tmp_path, text):
    """The decoder's score of a clear path is its acoustic score plus lm_weight times the
    ARPA model's log10 probability of exactly those tokens (torchaudio, left to itself, maps
    the LM's words to the tokens in an arbitrary order)."""
    pytest.importorskip("flashlight.lib.text")
    from inference.word_lm import (TOKEN_ARPA, CTCLMDecoder, build_token_lm, token_lm_pieces,
                                   write_lm_settings)

    build_token_lm(SENTENCES, char_tokenizer, str(tmp_path), order=3)
    write_lm_settings(str(tmp_path), "token", lm_weight=0.7)
    decode = CTCLMDecoder(str(tmp_path), char_tokenizer, blank_index=0, beam_size=5)
    emissions = _emissions(char_tokenizer, text, sharp=30.0)
    hyp = decode.decoder(emissions.contiguous(), torch.tensor([emissions.shape[1]],
                                                              dtype=torch.int32))[0][0]
    pieces = token_lm_pieces(char_tokenizer, text.split())
    assert pieces[0] == text[0]  # no leading word start: the decoder never scores one
    with open(tmp_path / TOKEN_ARPA) as f:
        grams = parse_arpa(f.read())
    history, lm_log10 = ("<s>",), 0.0
    for piece in pieces + ["</s>"]:
        lm_log10 += math.log10(backoff_prob(grams, history[-2:], piece))
        history += (piece,)
    acoustic = emissions[0].max(-1).values.sum().item()
    assert decode(emissions, torch.ones(1)) == [text]
    assert hyp.score == pytest.approx(acoustic + 0.7 * lm_log10, abs=1e-3)


def test_lm_settings_name_missing_files(tmp_path):
    from inference.word_lm import lm_settings, write_lm_settings

    assert lm_settings(str(tmp_path)) is None
    write_lm_settings(str(tmp_path), "token", lm_weight=0.7)
    with pytest.raises(RecipeError, match="token_lm.arpa is missing"):
        lm_settings(str(tmp_path))
    (tmp_path / "token_lm.arpa").write_text("")
    assert lm_settings(str(tmp_path)) == {"kind": "token", "lm_weight": 0.7, "word_score": 0.0}


def test_read_transcripts_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,duration,wav,text\n1,1.0,a.wav,HELLO\n")
    with pytest.raises(RecipeError, match="no 'wrd' column"):
        read_transcripts(str(bad))
    with pytest.raises(RecipeError, match="does not exist"):
        read_transcripts(str(tmp_path / "missing.csv"))
    assert read_transcripts(str(bad), "text") == [["HELLO"]]


# --- exported folders ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctc_with_lm(tmp_path_factory):
    pytest.importorskip("flashlight.lib.text")
    from recipes.untrained import export_untrained

    folder = export_untrained(os.path.join(REPO, "hparams/CTC/tiny.yaml"), "CTC",
                              str(tmp_path_factory.mktemp("ctc_lm")), n_sentences=2000)
    plain = str(tmp_path_factory.mktemp("ctc_plain") / "model")
    shutil.copytree(folder, plain)
    from inference.make_word_lm import main

    main([folder, TRAIN_CSV, "--kind", "lexicon", "--order", "2"])
    return folder, plain


def test_transcriber_decodes_with_the_folders_word_lm(ctc_with_lm):
    from inference.transcriber import Transcriber, TranscriberError

    folder, plain = ctc_with_lm
    assert os.path.isfile(os.path.join(folder, LEXICON))
    assert os.path.isfile(os.path.join(folder, ARPA))
    lexicon = {line.split()[0] for line in open(os.path.join(folder, LEXICON))}
    wav = torch.randn(16000 * 3) * 0.1
    with_lm = Transcriber.from_folder(folder, device="cpu")
    assert with_lm.word_lm is not None
    words = with_lm.transcribe_waveform(wav, 16000).split()
    assert set(words) <= lexicon
    without = Transcriber.from_folder(folder, device="cpu", use_lm=False)
    assert without.word_lm is None
    assert without.transcribe_waveform(wav, 16000) == \
        Transcriber.from_folder(plain, device="cpu").transcribe_waveform(wav, 16000)
    with pytest.raises(TranscriberError, match="inference.make_word_lm"):
        Transcriber.from_folder(plain, device="cpu", use_lm=True)


def test_token_lm_leaves_out_excluded_sentences_and_is_used_by_default(ctc_with_lm, tmp_path):
    from inference.transcriber import Transcriber
    from inference.word_lm import TOKEN_ARPA, lm_settings
    from inference.make_word_lm import main

    _, plain = ctc_with_lm
    folder = str(tmp_path / "model")
    shutil.copytree(plain, folder)
    text = tmp_path / "text.txt"
    text.write_text("the quick fox\nzebras quiz jovial wolves\n")
    held_out = tmp_path / "test.csv"
    held_out.write_text("ID,duration,wav,spk_id,wrd\nt1,1.0,a.wav,s,ZEBRAS QUIZ JOVIAL WOLVES\n")
    main([folder, str(text), "--exclude", str(held_out), "--lm-weight", "0.3"])
    assert lm_settings(folder) == {"kind": "token", "lm_weight": 0.3, "word_score": 0.0}
    unigrams = open(os.path.join(folder, TOKEN_ARPA)).read().split("\\2-grams:")[0]
    assert "\tQ\t" in unigrams and "\tZ\t" not in unigrams  # only the excluded sentence has Z
    asr = Transcriber.from_folder(folder, device="cpu")
    assert asr.word_lm.kind == "token" and asr.word_lm.lm_weight == 0.3
    assert isinstance(asr.transcribe_waveform(torch.randn(16000) * 0.1, 16000), str)
    # switching kinds leaves no unused LM files behind
    main([folder, str(text), "--kind", "lexicon"])
    assert not os.path.exists(os.path.join(folder, TOKEN_ARPA))
    assert os.path.isfile(os.path.join(folder, LEXICON))
    main([folder, str(text)])
    assert os.path.isfile(os.path.join(folder, TOKEN_ARPA))
    assert not any(os.path.exists(os.path.join(folder, f)) for f in (LEXICON, ARPA))


def test_make_word_lm_refuses_s2s_and_bad_csv(tmp_path):
    from inference.make_word_lm import main

    folder = tmp_path / "s2s"
    folder.mkdir()
    for name in ("model.ckpt", "normalizer.ckpt", "tokenizer.ckpt"):
        (folder / name).write_text("")
    (folder / "hyperparams.yaml").write_text("x: 1\ndecoder: 2\n")
    with pytest.raises(RecipeError, match="S2S model"):
        main([str(folder), TRAIN_CSV])


def test_damaged_lm_settings_are_named(tmp_path):
    from inference.transcriber import TranscriberError
    from inference.word_lm import SETTINGS, TOKEN_ARPA, lm_settings

    (tmp_path / TOKEN_ARPA).write_text("")
    path = tmp_path / SETTINGS
    for text, message in [('{"kind": "token", "lm_we', "is damaged"),
                          ('["token"]', "is damaged"),
                          ('{"kind": "token", "lm_weight": NaN}', "lm_weight must be a finite"),
                          ('{"kind": "token", "word_score": "x"}', "word_score must be a finite")]:
        path.write_text(text)
        with pytest.raises(TranscriberError, match=message) as e:
            lm_settings(str(tmp_path))
        assert str(path) in str(e.value) and "inference.make_word_lm" in str(e.value)


@pytest.mark.parametrize("args,message", [
    (["--order", "0"], "order (--order) must be >= 1, got 0"),
    (["--order", "-2"], "order (--order) must be >= 1, got -2"),
    (["--lm-weight", "nan"], "lm_weight (--lm-weight) must be a finite number, got nan"),
    (["--word-score", "inf"], "word_score (--word-score) must be a finite number, got inf"),
])
def test_make_word_lm_refuses_bad_numbers(ctc_with_lm, tmp_path, args, message):
    from inference.word_lm import SETTINGS, TOKEN_ARPA
    from inference.make_word_lm import main

    _, plain = ctc_with_lm
    folder = str(tmp_path / "model")
    shutil.copytree(plain, folder)
    with pytest.raises(RecipeError, match=re.escape(message)):
        main([folder, TRAIN_CSV, *args])
    assert not os.path.exists(os.path.join(folder, SETTINGS))
    assert not os.path.exists(os.path.join(folder, TOKEN_ARPA))


def test_make_word_lm_order_and_text_errors(ctc_with_lm, tmp_path, capsys):
    from inference.make_word_lm import main

    _, plain = ctc_with_lm
    folder = str(tmp_path / "model")
    shutil.copytree(plain, folder)
    binary = tmp_path / "audio.bin"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(RecipeError, match=f"{binary} is not UTF-8 text"):
        main([folder, str(binary)])
    with pytest.raises(RecipeError, match=f"{tmp_path} is a directory"):
        main([folder, str(tmp_path)])
    text = tmp_path / "text.txt"
    text.write_text("the cat sat\nthe dog ran\n")
    main([folder, str(text), "--order", "2"])
    assert "token 2-gram LM" in capsys.readouterr().out
    assert "\\3-grams:" not in open(os.path.join(folder, "token_lm.arpa")).read()


def test_lm_options_need_the_lm(ctc_with_lm):
    from inference.transcriber import Transcriber, TranscriberError

    folder, _ = ctc_with_lm
    with pytest.raises(TranscriberError, match="use_lm=False \\(--no-lm\\) leaves out"):
        Transcriber.from_folder(folder, device="cpu", use_lm=False, lm_weight=1.0)
    with pytest.raises(TranscriberError, match="word_score must be a finite number"):
        Transcriber.from_folder(folder, device="cpu", word_score=math.inf)
