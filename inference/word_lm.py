"""CTC decoding with an n-gram LM (torchaudio's flashlight decoder), two kinds:

- ``token``: a token n-gram LM (``token_lm.arpa``, e.g. 6-grams of characters) and lexicon-free
  beam search: the LM favours likely spellings and word sequences, and any word can still come
  out, including words the LM text never had.
- ``lexicon``: ``lexicon.txt`` (each word spelled with the model's tokenizer pieces) and a word
  n-gram LM (``word_lm.arpa``): only lexicon words come out, so a new word is always an error.

    python -m inference.make_word_lm MODEL_DIR text.txt --exclude test.csv   # token LM (default)
    Transcriber.from_folder(MODEL_DIR)                                   # then uses it

The LMs are back-off n-gram models (absolute discounting with Ney's discount per order).
Hypotheses are scored by the acoustic log-probabilities plus lm_weight * LM log-probability
plus word_score per word; ``ctc_lm.json`` in the folder records the kind and the weights to use
(tune them on a validation set). Needs the ``flashlight-text`` package (requirements-lm.txt).
"""

import collections
import contextlib
import json
import math
import os
import tempfile

from inference.model_folder import TranscriberError
from recipes import RecipeError
from recipes.atomic import replace_atomically  # an interrupted build keeps the previous LM

LEXICON, ARPA, TOKEN_ARPA = "lexicon.txt", "word_lm.arpa", "token_lm.arpa"
LM_FILES = {"token": (TOKEN_ARPA,), "lexicon": (LEXICON, ARPA)}
NO_FLASHLIGHT = ("LM decoding needs flashlight-text: pip install -r requirements-lm.txt (or "
                 "decode without the LM)")
SETTINGS = "ctc_lm.json"  # {"kind": "token" | "lexicon", "lm_weight": w, "word_score": s}
LM_KINDS = ("token", "lexicon")
DEFAULT_ORDER = {"token": 6, "lexicon": 3}
# weights for folders without ctc_lm.json (lexicon LMs written before it existed)
DEFAULT_WEIGHTS = {"lm_weight": 2.0, "word_score": 0.0}
WORD_START = "\u2581"  # SentencePiece's word-start piece
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
UNK_LOG10 = -7.0  # unknown words are not decoded (they are not in the lexicon)


def lm_settings(folder):
    """{"kind", "lm_weight", "word_score"} of the folder's CTC LM, or None when it has none."""
    path = os.path.join(folder, SETTINGS)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                settings = json.load(f)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise TranscriberError(f"{path} is damaged ({e}); rebuild the LM with `python -m "
                                   "inference.make_word_lm`, or delete the file to decode without "
                                   "it") from e
        if not isinstance(settings, dict):
            raise TranscriberError(f"{path} is damaged (not a JSON object); rebuild the LM with "
                                   "`python -m inference.make_word_lm`")
        for key in DEFAULT_WEIGHTS:
            value = settings.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise TranscriberError(f"{path}: {key} must be a finite number, got {value!r}; "
                                       "rebuild the LM with `python -m inference.make_word_lm`")
        if settings.get("kind") not in LM_KINDS:
            raise RecipeError(f"{path}: kind must be one of {LM_KINDS}, got "
                              f"{settings.get('kind')!r}; rebuild it with "
                              "`python -m inference.make_word_lm`")
        missing = [f for f in LM_FILES[settings["kind"]]
                   if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise RecipeError(f"{path} names a {settings['kind']} LM but {', '.join(missing)} "
                              "is missing; rebuild it with `python -m inference.make_word_lm`")
        return {**DEFAULT_WEIGHTS, **settings}
    if all(os.path.isfile(os.path.join(folder, name)) for name in (LEXICON, ARPA)):
        return {"kind": "lexicon", **DEFAULT_WEIGHTS}
    return None


def has_word_lm(folder):
    """True when the folder holds a CTC LM of either kind."""
    return lm_settings(folder) is not None


def write_lexicon(words, tokenizer, path):
    """One line per word: WORD piece piece ... (the tokenizer's spelling, without a standalone
    word-start piece: that one is the decoder's silence between words). Words that the
    tokenizer can only spell with its unknown piece are left out; returns how many were."""
    skipped = 0
    with replace_atomically(path) as f:
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


def read_transcripts(csv_path, column="wrd", hint=" (or pass the transcript column: --column)"):
    """Word lists of a SpeechBrain CSV manifest's transcript column, upper-cased as read_text's
    (so that sentences compare equal whatever file and case they come from)."""
    from recipes.manifest import read_rows

    rows = read_rows(csv_path, required=[column], hint=hint)
    return [row[column].upper().split() for row in rows]


def read_text(path, column="wrd", hint=" (or pass the transcript column: --column)"):
    """Word lists of a text source: a CSV manifest (its transcript column) or a plain text file
    (one sentence per line). Words are upper-cased, as the recipes' transcripts are."""
    if path.endswith(".csv"):
        return read_transcripts(path, column, hint)
    if os.path.isdir(path):
        raise RecipeError(f"{path} is a directory; pass text files (one sentence per line) or "
                          "CSV manifests")
    if not os.path.isfile(path):
        raise RecipeError(f"Text file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.upper().split() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} is not UTF-8 text ({e}); pass text files (one sentence per "
                          "line) or CSV manifests (.csv)") from e


def build_word_lm(sentences, tokenizer, folder, order=3):
    """Writes lexicon.txt and word_lm.arpa into folder; returns (words, words skipped)."""
    words = {w for s in sentences for w in s}
    skipped = write_lexicon(words, tokenizer, os.path.join(folder, LEXICON))
    with replace_atomically(os.path.join(folder, ARPA)) as f:
        f.write(build_arpa(sentences, order))
    return len(words), skipped


def token_lm_pieces(tokenizer, words):
    """The pieces of a sentence as the lexicon-free decoder queries the token LM: word starts
    between words (the LM also models word boundaries), none before the first word (the
    decoder starts in the silence state, so a leading word start is never scored)."""
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode(" ".join(words))]
    return pieces[1:] if pieces[:1] == [WORD_START] else pieces


def build_token_lm(sentences, tokenizer, folder, order=6):
    """Writes token_lm.arpa: an n-gram LM over the tokenizer's pieces of each sentence
    (token_lm_pieces); returns the number of sentences."""
    pieces = [token_lm_pieces(tokenizer, words) for words in sentences if words]
    with replace_atomically(os.path.join(folder, TOKEN_ARPA)) as f:
        f.write(build_arpa(pieces, order))
    return len(pieces)


def write_lm_settings(folder, kind, lm_weight, word_score=0.0):
    """Records which LM the folder's decoder uses and with which weights."""
    with replace_atomically(os.path.join(folder, SETTINGS)) as f:
        json.dump({"kind": kind, "lm_weight": lm_weight, "word_score": word_score}, f, indent=1)


def add_ctc_lm(model_dir, sources, kind="token", order=None, exclude=(), column="wrd",
               lm_weight=None, word_score=0.0):
    """Builds a CTC LM of ``kind`` into an exported folder, spelled with its tokenizer.ckpt.

    sources: CSV manifests and/or text files (one sentence per line) whose sentences train the
    LM; exclude: CSVs/text files whose sentences are left out (the evaluation sets).
    Returns {"kind", "order", "sentences", "excluded", "words", "skipped"}.
    """
    import sentencepiece as spm

    if kind not in LM_KINDS:
        raise RecipeError(f"LM kind must be one of {LM_KINDS}, got {kind!r}")
    order = DEFAULT_ORDER[kind] if order is None else order
    if order < 1:
        raise RecipeError(f"The n-gram order (--order) must be >= 1, got {order}")
    for name, value in (("lm_weight", lm_weight), ("word_score", word_score)):
        if value is not None and not math.isfinite(value):
            raise RecipeError(f"{name} (--{name.replace('_', '-')}) must be a finite number, "
                              f"got {value}")
    held_out = {tuple(s) for path in exclude for s in read_text(path, column)}
    sentences = [s for path in sources for s in read_text(path, column)]
    kept = [s for s in sentences if tuple(s) not in held_out]
    tokenizer = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.ckpt"))
    report = {"kind": kind, "order": order, "sentences": len(kept),
              "excluded": len(sentences) - len(kept), "words": len({w for s in kept for w in s}),
              "skipped": 0}
    if kind == "token":
        build_token_lm(kept, tokenizer, model_dir, order)
    else:
        report["words"], report["skipped"] = build_word_lm(kept, tokenizer, model_dir, order)
    if lm_weight is None:
        lm_weight = 0.5 if kind == "token" else DEFAULT_WEIGHTS["lm_weight"]
    write_lm_settings(model_dir, kind, lm_weight, word_score)
    for other in LM_KINDS:  # the other kind's files, now unused
        for name in LM_FILES[other] if other != kind else ():
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(model_dir, name))
    return report


def add_word_lm(model_dir, csv_paths, order=3, column="wrd"):
    """Lexicon + word LM of the transcripts of CSV manifests in an exported folder; returns
    (words, words skipped, sentences)."""
    report = add_ctc_lm(model_dir, csv_paths, "lexicon", order, column=column)
    return report["words"], report["skipped"], report["sentences"]


def _load_decoder(ctc_decoder, folder, kind, **options):
    """torchaudio's flashlight decoder; RecipeError naming the LM files when they cannot be read
    (flashlight-text missing, or a damaged file)."""
    try:
        return ctc_decoder(**options)
    except RuntimeError as err:
        if "flashlight" in str(err).lower():
            raise RecipeError(NO_FLASHLIGHT) from err
        files = " and ".join(LM_FILES[kind])
        raise RecipeError(f"The CTC LM in {folder} cannot be loaded ({files}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}); "
                          "rebuild it with `python -m inference.make_word_lm` MODEL_DIR TEXT, or "
                          "decode without it (--no-lm)") from err


class CTCLMDecoder:
    """CTC log-probabilities -> transcripts, beam search with the folder's LM (either kind).

    log_probs (batch, frames, vocab) on any device, rel_lengths (batch,) in (0, 1].
    lm_weight / word_score None: the folder's ctc_lm.json values."""

    def __init__(self, folder, tokenizer, blank_index, beam_size=50, lm_weight=None,
                 word_score=None):
        try:
            from torchaudio.models.decoder import ctc_decoder
        except (ImportError, RuntimeError) as err:  # no flashlight-text (RuntimeError: 2.11)
            raise RecipeError(NO_FLASHLIGHT) from err
        settings = lm_settings(folder)
        if settings is None:
            raise RecipeError(f"{folder} has no CTC LM ({TOKEN_ARPA}, or {LEXICON} and {ARPA}); "
                              "make one with `python -m inference.make_word_lm` MODEL_DIR TEXT")
        self.kind = settings["kind"]
        self.lm_weight = settings["lm_weight"] if lm_weight is None else lm_weight
        self.word_score = settings["word_score"] if word_score is None else word_score
        self.tokenizer = tokenizer
        tokens = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size())]
        self.blank_index = blank_index
        with tempfile.TemporaryDirectory() as tmp:
            lm_dict = None
            if self.kind == "token":
                # The LM's dictionary must list the tokens in emission order: the decoder scores
                # token i as the LM word at index i. Without lm_dict, torchaudio builds it from
                # an unordered map, which scores a permutation of the tokens.
                lm_dict = os.path.join(tmp, "tokens.txt")
                with open(lm_dict, "w", encoding="utf-8") as f:
                    f.write("\n".join(tokens) + "\n")
            self.decoder = _load_decoder(
                ctc_decoder, folder, self.kind,
                lexicon=os.path.join(folder, LEXICON) if self.kind == "lexicon" else None,
                tokens=tokens, lm_dict=lm_dict,
                lm=os.path.join(folder, ARPA if self.kind == "lexicon" else TOKEN_ARPA),
                nbest=1, beam_size=beam_size, lm_weight=self.lm_weight,
                word_score=self.word_score, unk_word=UNK,
                # lexicon-free search has no words: its per-word score is one per word start
                sil_score=self.word_score if self.kind == "token" else 0.0,
                blank_token=tokens[blank_index],
                sil_token=WORD_START if WORD_START in tokens else tokens[blank_index])
        self.vocab_size = len(tokens)

    def _text(self, hyp):
        if self.kind == "lexicon":
            return " ".join(hyp.words)
        ids = [int(t) for t in hyp.tokens if int(t) != self.blank_index]
        return " ".join(self.tokenizer.decode_ids(ids).split())

    def __call__(self, log_probs, rel_lengths):
        frames = log_probs.shape[1]
        lengths = (rel_lengths.float() * frames).round().clamp(1, frames).int().cpu()
        emissions = log_probs[..., : self.vocab_size].float().cpu().contiguous()
        return [self._text(h[0]) if h else "" for h in self.decoder(emissions, lengths)]
