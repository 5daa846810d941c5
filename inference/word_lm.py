"""Lexicon-constrained CTC decoding with a word n-gram LM (torchaudio's flashlight decoder).

    python -m tools.make_word_lm MODEL_DIR data/mini_corpus/train.csv   # writes the two files
    Transcriber.from_folder(MODEL_DIR)                                  # then uses them

An exported CTC folder may hold ``lexicon.txt`` (each word spelled with the model's tokenizer
pieces) and ``word_lm.arpa`` (a back-off n-gram model of the training transcripts, absolute
discounting with Ney's discount per order). The decoder only outputs lexicon words, scored by
the acoustic log-probabilities plus lm_weight * LM log-probability plus word_score per word.
Needs the ``flashlight-text`` package (requirements-lm.txt).
"""

import collections
import math
import os

from recipes import RecipeError

LEXICON, ARPA = "lexicon.txt", "word_lm.arpa"
WORD_START = "\u2581"  # SentencePiece's word-start piece
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
UNK_LOG10 = -7.0  # unknown words are not decoded (they are not in the lexicon)


def has_word_lm(folder):
    return all(os.path.isfile(os.path.join(folder, name)) for name in (LEXICON, ARPA))


def write_lexicon(words, tokenizer, path):
    """One line per word: WORD piece piece ... (the tokenizer's spelling, without a standalone
    word-start piece: that one is the decoder's silence between words). Words that the
    tokenizer can only spell with its unknown piece are left out; returns how many were."""
    skipped = 0
    with open(path, "w") as f:
        for word in sorted(words):
            ids = tokenizer.encode(word)
            if not ids or tokenizer.unk_id() in ids:
                skipped += 1
                continue
            pieces = [tokenizer.id_to_piece(i) for i in ids]
            if len(pieces) > 1 and pieces[0] == WORD_START:
                pieces = pieces[1:]
            f.write(word + " " + " ".join(pieces) + "\n")
    return skipped


def _ngram_counts(sentences, order):
    """counts[n][(history tuple, word)] for n = 1..order, sentences padded with <s> ... </s>."""
    counts = [None] + [collections.Counter() for _ in range(order)]
    for words in sentences:
        seq = [BOS] + list(words) + [EOS]
        for i in range(1, len(seq)):
            for n in range(1, order + 1):
                if i - n + 1 < 0:
                    break
                counts[n][(tuple(seq[i - n + 1:i]), seq[i])] += 1
    return counts


def _discount(counter):
    """Ney's absolute discount n1 / (n1 + 2 n2), kept in [0.1, 0.9]."""
    n1 = sum(1 for c in counter.values() if c == 1)
    n2 = sum(1 for c in counter.values() if c == 2)
    return min(0.9, max(0.1, n1 / (n1 + 2 * n2) if n1 + n2 else 0.5))


def build_arpa(sentences, order=3):
    """ARPA text of a back-off n-gram model of ``sentences`` (lists of words).

    Unigrams: relative frequencies, with 1e-7 kept for <unk>. Order n > 1: seen n-grams get
    (count - D_n) / count(history); the freed mass goes to the lower order through the
    history's back-off weight, normalised over the words not seen after that history."""
    if order < 1:
        raise RecipeError(f"word LM order must be >= 1, got {order}")
    if not any(sentences):
        raise RecipeError("Cannot build a word LM: the transcripts hold no words")
    counts = _ngram_counts(sentences, order)
    total = sum(counts[1].values())
    unigram = {w: c / total * (1 - 10 ** UNK_LOG10) for (_, w), c in counts[1].items()}
    unigram[UNK] = 10 ** UNK_LOG10
    prob = [None, {((), w): p for w, p in unigram.items()}]  # prob[n][(h, w)]: explicit probs
    backoff = {}  # history tuple -> back-off weight

    def full_prob(history, word):
        """P(word | history) of the model built so far (orders <= len(history) + 1)."""
        p = prob[len(history) + 1].get((history, word))
        if p is not None:
            return p
        if not history:
            return unigram[UNK]
        return backoff.get(history, 1.0) * full_prob(history[1:], word)

    for n in range(2, order + 1):
        d = _discount(counts[n])
        by_history = collections.defaultdict(dict)
        for (h, w), c in counts[n].items():
            by_history[h][w] = c
        prob.append({})
        for h, followers in by_history.items():
            h_total = sum(followers.values())
            for w, c in followers.items():
                prob[n][(h, w)] = (c - d) / h_total
            freed = d * len(followers) / h_total
            lower = sum(full_prob(h[1:], w) for w in followers)
            backoff[h] = freed / max(1.0 - lower, 1e-12)

    lines = ["", "\\data\\"]
    lines += [f"ngram {n}={len(prob[n]) + (1 if n == 1 else 0)}" for n in range(1, order + 1)]
    for n in range(1, order + 1):
        lines += ["", f"\\{n}-grams:"]
        if n == 1:
            lines.append(f"-99\t{BOS}\t{math.log10(backoff.get((BOS,), 1.0)):.6f}")
        for (h, w), p in sorted(prob[n].items()):
            entry = f"{math.log10(p):.6f}\t{' '.join(h + (w,))}"
            if n < order and (h + (w,)) in backoff:
                entry += f"\t{math.log10(backoff[h + (w,)]):.6f}"
            lines.append(entry)
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


def read_transcripts(csv_path, column="wrd"):
    """Word lists of a SpeechBrain CSV manifest's transcript column."""
    from recipes.manifest import read_rows

    rows = read_rows(csv_path, required=[column], hint=" (or pass the transcript column: --column)")
    return [row[column].split() for row in rows]


def build_word_lm(sentences, tokenizer, folder, order=3):
    """Writes lexicon.txt and word_lm.arpa into folder; returns (words, words skipped)."""
    words = {w for s in sentences for w in s}
    skipped = write_lexicon(words, tokenizer, os.path.join(folder, LEXICON))
    with open(os.path.join(folder, ARPA), "w") as f:
        f.write(build_arpa(sentences, order))
    return len(words), skipped


def add_word_lm(model_dir, csv_paths, order=3, column="wrd"):
    """build_word_lm into an exported folder, spelled with its tokenizer.ckpt, from the
    transcripts of CSV manifests; returns (words, words skipped, sentences)."""
    import sentencepiece as spm

    tokenizer = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.ckpt"))
    sentences = [s for path in csv_paths for s in read_transcripts(path, column)]
    return (*build_word_lm(sentences, tokenizer, model_dir, order), len(sentences))


class LexiconDecoder:
    """CTC log-probabilities -> transcripts made of lexicon words.

    log_probs (batch, frames, vocab) on any device, rel_lengths (batch,) in (0, 1]."""

    def __init__(self, folder, tokenizer, blank_index, beam_size=50, lm_weight=2.0,
                 word_score=0.0):
        try:
            from torchaudio.models.decoder import ctc_decoder
        except ImportError as err:  # torchaudio raises it when flashlight-text is missing
            raise RecipeError("Word-LM decoding needs flashlight-text: pip install -r "
                              "requirements-lm.txt (or decode without the word LM)") from err
        if not has_word_lm(folder):
            raise RecipeError(f"{folder} has no {LEXICON} and {ARPA}; make them with "
                              "`python -m tools.make_word_lm` MODEL_DIR TRAIN_CSV")
        tokens = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size())]
        self.decoder = ctc_decoder(
            lexicon=os.path.join(folder, LEXICON), tokens=tokens,
            lm=os.path.join(folder, ARPA), nbest=1, beam_size=beam_size, lm_weight=lm_weight,
            word_score=word_score, unk_word=UNK, blank_token=tokens[blank_index],
            sil_token=WORD_START if WORD_START in tokens else tokens[blank_index])
        self.vocab_size = len(tokens)

    def __call__(self, log_probs, rel_lengths):
        frames = log_probs.shape[1]
        lengths = (rel_lengths.float() * frames).round().clamp(1, frames).int().cpu()
        emissions = log_probs[..., : self.vocab_size].float().cpu().contiguous()
        return [" ".join(h[0].words) if h else "" for h in self.decoder(emissions, lengths)]
