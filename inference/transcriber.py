"""Transcription with an exported model folder (recipes.export: <output_folder>/inference).

    from inference import Transcriber
    asr = Transcriber.from_folder("demo_results/inference", device="cpu")
    asr.transcribe_files(["a.wav", "b.flac"])        # -> ["TRANSCRIPT A", "TRANSCRIPT B"]
    asr.transcribe_waveform(wav, sample_rate=44100)  # wav (samples,) or 2-D with channels

Decoding is SpeechBrain's: EncoderASR (CTC: greedy by default, prefix beam search with
beam_size > 1) or EncoderDecoderASR (S2S: joint CTC/attention beam search, + the exported LM).
A CTC folder with an n-gram LM (`python -m inference.make_word_lm`) is decoded with it instead
(inference.word_lm: lexicon-free beam search with a token LM, or lexicon-constrained with a word
LM).
Any sample rate is resampled to the model's and channels are averaged; audio shorter than the
front end's window (min_samples: 60 ms for the recipes' CNN) is zero-padded to it. Audio longer
than chunk_seconds is cut into equal chunks overlapping by overlap_seconds, decoded in batches of
batch_size segments (the model's memory stays bounded whatever the file's length; the file is
held in memory whole) and merged (merge_words).
The default chunk length depends on the model (default_chunk_seconds): CTC models with a Mamba
encoder, linear in time and memory, take minutes in one piece; attention encoders, quadratic in
the chunk length, and every S2S model keep 30 s.
"""

import difflib
import functools
import math
import os
import re

import torch
from torch.nn import functional as F

from inference.model_folder import REEXPORT, TranscriberError, check_hyperparams
from modules.mamba import Mamba
from modules.mamba.scan import anticipate_cpu_scans, describe_backend
from recipes.audio import AudioError, check_audio, load_audio, to_float, to_mono
from recipes.export import exported_kind


ATTENTION_CHUNK_SECONDS = 30.0
MAMBA_CHUNK_SECONDS = 300.0
MAMBA_ENCODERS = ("conmamba", "mamba")
ENCODER_FRAMES_PER_SECOND = 25  # 10 ms feature hop, then the CNN front end's 4x subsampling


def default_chunk_seconds(encoder_module, kind):
    """Chunk length for a model: MAMBA_CHUNK_SECONDS for CTC models with a Mamba encoder
    (encoder_module 'conmamba' or 'mamba'), else ATTENTION_CHUNK_SECONDS. S2S models keep the
    short chunks whatever their encoder: their autoregressive decoder was trained on
    utterance-length outputs and its beam search grows faster than linearly with them."""
    if kind == "CTC" and str(encoder_module).lower() in MAMBA_ENCODERS:
        return MAMBA_CHUNK_SECONDS
    return ATTENTION_CHUNK_SECONDS


def model_kind(model_dir):
    """'CTC' or 'S2S' for an exported folder; raises TranscriberError when it is not one."""
    hparams_file = os.path.join(model_dir, "hyperparams.yaml")
    if not os.path.isdir(model_dir):
        raise TranscriberError(f"Model folder {model_dir} does not exist; pass the inference "
                               "folder a training run exported (<output_folder>/inference)")
    if not os.path.isfile(hparams_file):
        raise TranscriberError(f"{hparams_file} is missing: {model_dir} is not an exported model "
                               "folder; pass <output_folder>/inference of a finished training run")
    for name in ("model.ckpt", "normalizer.ckpt", "tokenizer.ckpt"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise TranscriberError(f"{os.path.join(model_dir, name)} is missing; re-export the "
                                   "model (train_CTC.py / train_S2S.py --test_only)")
    stat = os.stat(hparams_file)
    return _kind(os.path.abspath(model_dir), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _kind(model_dir, mtime_ns, size):
    """model_kind of a folder whose hyperparams.yaml has this modification time and size: read
    once per version of the file (so an old folder's warning is logged once)."""
    check_hyperparams(os.path.join(model_dir, "hyperparams.yaml"))  # damaged: a clear error
    return exported_kind(model_dir)


def damaged_file(model_dir):
    """(path, what it should be) of the folder's first checkpoint that does not load (tensors
    only, as from_folder loads them), or None when they all do."""
    import sentencepiece as spm

    for name in ("model.ckpt", "normalizer.ckpt", "lm.ckpt", "tokenizer.ckpt"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            if name == "tokenizer.ckpt":
                spm.SentencePieceProcessor(model_file=path)
            else:
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # any decoding error (UnpicklingError, RuntimeError, OSError...)
            return path, ("a SentencePiece model" if name == "tokenizer.ckpt" else
                          "a PyTorch checkpoint of tensors")
    return None


def min_samples(asr, kind):
    """Fewest samples the model decodes (Transcriber zero-pads shorter audio to it): the CNN
    front end needs its window of feature frames (fewer give no output with causal padding, an
    error with "same" padding), and S2S beam search int(encoder frames * max_decode_ratio) >= 1
    steps."""
    front = asr.mods.encoder
    frames = front.CNN.get_filter_properties().window_size
    ratio = asr.mods.decoder.max_decode_ratio if kind == "S2S" else 1.0
    if ratio > 0:
        zeros = next(front.CNN.parameters()).new_zeros
        n_mels = front.compute_features.compute_fbanks.n_mels
        with torch.inference_mode():
            while int(front.CNN(zeros(1, frames, n_mels)).shape[1] * ratio) < 1:
                frames += 1
    return (frames - 1) * front.compute_features.compute_STFT.hop_length  # 1 + N // hop frames


def chunk_bounds(n_samples, chunk_samples, overlap_samples):
    """[(start, end)] sample ranges covering n_samples: one range when it fits in chunk_samples,
    else the fewest equal chunks of at most chunk_samples overlapping by overlap_samples."""
    if n_samples <= chunk_samples:
        return [(0, n_samples)]
    if not 0 <= overlap_samples < chunk_samples:
        raise TranscriberError("overlap_seconds must be >= 0 and smaller than chunk_seconds")
    count = math.ceil((n_samples - overlap_samples) / (chunk_samples - overlap_samples))
    length = math.ceil((n_samples + (count - 1) * overlap_samples) / count)
    step = length - overlap_samples
    return [(i * step, min(i * step + length, n_samples)) for i in range(count)]


def merge_words(left, right, left_overlap_words, right_overlap_words):
    """Joins the words of two chunks that overlap in time (*_overlap_words: the words each is
    estimated to have in the overlap; both 0: no overlap, the chunks are joined as they are).

    The join is at the middle of the longest word run that both chunks transcribe in the overlap
    (left's last and right's first ~overlap_words + 2 words) and that lies where the overlap is:
    a word in the overlap has as many words after it in left's overlap as before it in right's
    overlap (together ~overlap_words), so a run placed otherwise (a common word such as THE
    matching another THE) is not used. Without such a run each side drops the words estimated
    to lie in its half of the overlap (half of *_overlap_words).
    """
    if left_overlap_words == 0 and right_overlap_words == 0:
        return left + right
    tail = max(0, len(left) - left_overlap_words - 2)
    head = min(len(right), right_overlap_words + 2)
    expected = (left_overlap_words + right_overlap_words) / 2
    best = None
    for a, b, size in difflib.SequenceMatcher(None, left[tail:], right[:head],
                                              autojunk=False).get_matching_blocks():
        offset = len(left) - (tail + a) + b  # == the overlap's words for a run inside it
        tolerance = (1 + 0.25 * expected) if size == 1 else (2 + 0.5 * expected)
        if size and abs(offset - expected) <= tolerance and (best is None or size > best[2]):
            best = (a, b, size)
    if best is not None:
        a, b, size = best
        cut = size // 2
        return left[: tail + a + cut] + right[b + cut:]
    return left[: len(left) - left_overlap_words // 2] + right[right_overlap_words // 2:]


class Transcriber:
    """Batched, chunked transcription around a SpeechBrain EncoderASR / EncoderDecoderASR.

    Arguments
    ---------
    asr : speechbrain.inference.ASR.EncoderASR or EncoderDecoderASR (already configured).
    kind : 'CTC' or 'S2S'.
    chunk_seconds, overlap_seconds : long-audio split (see chunk_bounds); chunk_seconds None:
        default_chunk_seconds of the model's encoder_module.
    batch_size : segments (files or chunks) decoded together; a batch also stops growing at
        BATCH_SECONDS of audio (so long chunks are decoded one at a time).
    """

    GROUP_SECONDS = 600.0
    BATCH_SECONDS = 120.0

    def __init__(self, asr, kind, chunk_seconds=None, overlap_seconds=4.0, batch_size=4,
                 word_lm=None):
        if chunk_seconds is None:
            chunk_seconds = default_chunk_seconds(getattr(asr.hparams, "encoder_module", None),
                                                  kind)
        self.sample_rate = int(asr.hparams.sample_rate)
        self.min_samples = min_samples(asr, kind)
        shortest = self.min_samples / self.sample_rate
        if not (shortest <= chunk_seconds < math.inf and 0 <= overlap_seconds <= chunk_seconds / 2):
            raise TranscriberError(
                f"Need chunk_seconds of at least {shortest:g} s (the model's shortest input) and "
                f"0 <= overlap_seconds <= chunk_seconds / 2 (a larger overlap decodes most audio "
                f"several times), got chunk_seconds {chunk_seconds} and overlap_seconds "
                f"{overlap_seconds} (the overlap's default is 4 s: --overlap-seconds sets it)")
        if batch_size < 1:
            raise TranscriberError(f"batch_size must be >= 1, got {batch_size}")
        self.asr, self.kind = asr, kind
        self.chunk_seconds, self.overlap_seconds = chunk_seconds, overlap_seconds
        self.batch_size = batch_size
        self.word_lm = word_lm  # inference.word_lm.CTCLMDecoder for CTC models, or None
        self.last_chunks = []  # chunk (start, end) sample ranges of each file of the last call

    @classmethod
    def from_folder(cls, model_dir, device=None, beam_size=None, use_lm=None, ctc_weight=None,
                    ctc_partial=False, savedir=None, lm_weight=None, word_score=None, **kwargs):
        """Loads an exported folder (no network).

        Arguments
        ---------
        model_dir : folder with hyperparams.yaml, model.ckpt, normalizer.ckpt, tokenizer.ckpt.
        device : 'cpu' | 'cuda[:i]' | 'mps' | None (best available).
        beam_size : CTC: None or 1 = greedy, N > 1 = prefix beam search of width N;
            S2S: beam width (None = the exported test_beam_size).
        use_lm : None = use the folder's LM when it has one (S2S: lm.ckpt; CTC: token_lm.arpa, or
            lexicon.txt and word_lm.arpa; see inference.word_lm), False = no LM, True = require
            it.
        ctc_weight : S2S only: weight of the CTC scorer (None = exported; 0 = attention only).
        ctc_partial : S2S only: the CTC scorer rescores only the 2 * beam_size best tokens of
            each step (SpeechBrain partial scorer) instead of the whole vocabulary: much faster
            on CPU with large vocabularies; the exported recipe scores the whole vocabulary.
        savedir : where SpeechBrain links the checkpoints (default: the model folder itself).
        lm_weight, word_score : CTC LM decoding: weight of the LM log-probability and score
            added per word (None: the folder's ctc_lm.json values; beam_size: its beam width,
            default 50)
        **kwargs : chunk_seconds (None: by encoder type, see default_chunk_seconds),
            overlap_seconds, batch_size (see the class).
        """
        from recipes.device import resolve_device
        from inference.model_folder import weights_only_loads
        from inference.word_lm import CTCLMDecoder, has_word_lm
        from speechbrain.inference.ASR import EncoderASR, EncoderDecoderASR

        model_dir = os.path.abspath(model_dir)
        kind = model_kind(model_dir)
        if kind == "CTC" and (ctc_weight is not None or ctc_partial):
            raise TranscriberError(f"{model_dir} holds a CTC model: the ctc_weight and "
                                   "ctc_partial options are for S2S models")
        if kind == "CTC":
            has_lm = has_word_lm(model_dir)
            missing = ("a CTC LM (make one with `python -m inference.make_word_lm` MODEL_DIR "
                       "TEXT)")
        else:
            has_lm = _s2s_has_lm(model_dir)
            missing = "lm.ckpt: this model was exported without an LM"
        if use_lm and not has_lm:
            raise TranscriberError(f"No LM in {model_dir}: it lacks {missing}; decode without "
                                   "it (use_lm=None or False, transcribe.py --no-lm)")
        if lm_weight is not None or word_score is not None:
            _check_lm_options(model_dir, kind, has_lm, use_lm, lm_weight, word_score)
        if beam_size is not None and beam_size < 1:
            raise TranscriberError(f"beam_size must be >= 1, got {beam_size}")
        device = resolve_device(device)
        interface = EncoderASR if kind == "CTC" else EncoderDecoderASR
        check_hyperparams(os.path.join(model_dir, "hyperparams.yaml"))  # data, not code
        with weights_only_loads():
            try:
                asr = interface.from_hparams(source=model_dir, savedir=savedir or model_dir,
                                             run_opts={"device": device})
            except Exception:  # a damaged file: say which (torch's advice is unsafe here)
                damaged = damaged_file(model_dir)
                if damaged is None:
                    raise
                raise TranscriberError(f"{damaged[0]} is damaged: it cannot be read as "
                                       f"{damaged[1]}; {REEXPORT}") from None
        if any(isinstance(m, Mamba) for m in asr.mods.modules()):
            try:  # a forced MAMBA_SCAN_BACKEND that cannot run here: now, not at the first scan
                describe_backend(device)
            except ValueError as e:
                raise TranscriberError(str(e)) from None
        word_lm = None
        if kind == "CTC" and has_lm and use_lm is not False:
            word_lm = CTCLMDecoder(model_dir, asr.tokenizer, asr.hparams.blank_index,
                                   beam_size=beam_size or 50, lm_weight=lm_weight,
                                   word_score=word_score)
        elif kind == "CTC":
            _configure_ctc(asr, beam_size)
        else:
            _configure_s2s(asr, beam_size, has_lm and use_lm is not False, ctc_weight,
                           ctc_partial, device)
        return cls(asr, kind, word_lm=word_lm, **kwargs)

    def load_audio(self, path):
        """Mono float32 (samples,) at the model's sample rate."""
        return load_audio(path, self.sample_rate)

    def transcribe_files(self, paths, on_error=None):
        """Transcripts (upper-case words) of audio files, in order. Every file is checked
        before any decoding; files are then read and decoded in groups of about
        GROUP_SECONDS of audio, so memory does not grow with the number of files.

        paths : a list of paths (a single path raises TypeError).
        on_error : None (a bad file raises AudioError before anything is decoded) or
            on_error(path, error), called for each file that cannot be read; its transcript
            is then None and the other files are transcribed.
        """
        if isinstance(paths, (str, bytes, os.PathLike)):
            raise TypeError(f"transcribe_files takes a list of paths, got the single path "
                            f"{paths!r}: pass [{paths!r}]")
        texts, chunks = [None] * len(paths), [[] for _ in paths]
        durations = {}
        for k, path in enumerate(paths):
            try:
                durations[k] = check_audio(path)
            except AudioError as e:
                if on_error is None:
                    raise
                on_error(path, e)
        self._anticipate_scans(sum(durations.values()))
        group, total = {}, 0.0
        for n, k in enumerate(durations):
            try:
                group[k] = self.load_audio(paths[k])
                total += durations[k]
            except AudioError as e:  # passed the header check, fails to decode
                if on_error is None:
                    raise
                on_error(paths[k], e)
            if group and (total >= self.GROUP_SECONDS or n == len(durations) - 1):
                for k2, text, bounds in zip(group, self.transcribe_waveforms(list(group.values())),
                                            self.last_chunks):
                    texts[k2], chunks[k2] = text, bounds
                group, total = {}, 0.0
        self.last_chunks = chunks
        return texts

    def _anticipate_scans(self, seconds):
        """Before transcribing ``seconds`` of audio: when the Mamba encoder's scans over all of
        it are worth the compiled CPU kernels, they load now rather than after enough slower
        pure-PyTorch scans (modules.mamba.scan.anticipate_cpu_scans; no-op off CPU)."""
        for module in self.asr.mods.modules():
            per_frame = getattr(module, "scan_work_per_frame", 0)
            if per_frame:
                anticipate_cpu_scans(next(module.parameters()),
                                     int(seconds * ENCODER_FRAMES_PER_SECOND * per_frame))

    def transcribe_waveform(self, wav, sample_rate):
        """Transcript of one waveform: (samples,), or 2-D (channels = the smaller dimension);
        float, or integer PCM (scaled to [-1, 1): recipes.audio.to_float)."""
        return self.transcribe_waveforms([to_mono(wav, sample_rate, self.sample_rate)])[0]

    def transcribe_waveforms(self, wavs):
        """Transcripts of mono waveforms (samples,) already at the model's sample rate (float,
        or integer PCM: see recipes.audio.to_float); audio shorter than min_samples is
        zero-padded to it."""
        wavs = [to_float(w) for w in wavs]
        for i, w in enumerate(wavs):
            if w.dim() != 1 or w.numel() == 0:
                raise AudioError(f"Waveform {i} has shape {tuple(w.shape)}: transcribe_waveforms "
                                 "takes mono waveforms (samples,) of at least one sample "
                                 "(transcribe_waveform also downmixes and resamples)")
        chunk = int(round(self.chunk_seconds * self.sample_rate))
        overlap = int(round(self.overlap_seconds * self.sample_rate))
        self.last_chunks = [chunk_bounds(len(w), chunk, overlap) for w in wavs]
        segments = [(i, j) for i, bounds in enumerate(self.last_chunks) for j in range(len(bounds))]
        segments.sort(key=lambda s: -_length(self.last_chunks[s[0]][s[1]]))  # little padding
        words = {}
        for batch in self._batches(segments):
            pieces = [wavs[i][slice(*self.last_chunks[i][j])] for i, j in batch]
            for seg, text in zip(batch, self._decode(pieces)):
                words[seg] = text.split()
        return [" ".join(self._merge(words, i, bounds))
                for i, bounds in enumerate(self.last_chunks)]

    def _batches(self, segments):
        """Consecutive runs of at most batch_size segments and BATCH_SECONDS of audio (at least
        one segment each)."""
        limit = self.BATCH_SECONDS * self.sample_rate
        batch, total = [], 0
        for seg in segments:
            size = _length(self.last_chunks[seg[0]][seg[1]])
            if batch and (len(batch) == self.batch_size or total + size > limit):
                yield batch
                batch, total = [], 0
            batch.append(seg)
            total += size
        if batch:
            yield batch

    def _merge(self, words, i, bounds):
        """Words of file i from its chunks' words (words[(i, j)]), left to right."""
        merged = words[(i, 0)]
        for j in range(1, len(bounds)):
            overlap = bounds[j - 1][1] - bounds[j][0]
            prev, cur = words[(i, j - 1)], words[(i, j)]
            merged = merge_words(merged, cur,
                                 round(len(prev) * overlap / _length(bounds[j - 1])),
                                 round(len(cur) * overlap / _length(bounds[j])))
        return merged

    @torch.inference_mode()
    def _decode(self, pieces):
        """Transcripts of a batch of mono waveforms.

        A waveform shorter than min_samples is first zero-padded to it. The front end (features,
        normalisation, CNN) runs on each waveform alone and its outputs are zero-padded: the
        encoders honour padding, so a CTC transcript does not depend on the batch it is decoded
        in (S2S: max_decode_ratio caps every hypothesis at the longest one's length). Then
        EncoderASR's decoding function / EncoderDecoderASR's searcher.
        """
        asr, front = self.asr, self.asr.mods.encoder
        pieces = [F.pad(p, (0, max(0, self.min_samples - len(p)))) for p in pieces]
        one = torch.ones(1, device=asr.device)
        feats = [front.CNN(front.normalize(front.compute_features(p[None].to(asr.device)), one))
                 for p in pieces]  # (1, T_i, 640)
        lengths = torch.tensor([f.shape[1] for f in feats], device=asr.device)
        x = feats[0].new_zeros(len(feats), int(lengths.max()), *feats[0].shape[2:])
        for row, f in zip(x, feats):
            row[: f.shape[1]] = f[0]
        rel = lengths / lengths.max()
        if self.kind == "S2S":
            tokens, _, _, _ = asr.mods.decoder(asr.mods.transformer.encode(x, rel), rel)
            return [asr.tokenizer.decode_ids(t) for t in tokens]
        log_probs = front.log_softmax(front.ctc_lin(front.transformer_encoder(x, rel)))
        if self.word_lm is not None:
            return self.word_lm(log_probs, rel)
        hyps = asr.decoding_function(log_probs, rel)
        if isinstance(asr.decoding_function, functools.partial):  # greedy: token ids
            return [asr.tokenizer.decode_ids(h) for h in hyps]
        return [h[0].text for h in hyps]  # CTCBeamSearcher: best hypothesis


def _length(bounds):
    return bounds[1] - bounds[0]


def _s2s_has_lm(model_dir):
    """An S2S folder's LM: lm.ckpt, and a hyperparams.yaml that defines its scorer (a folder
    re-exported without LM by an older version may keep a stale lm.ckpt)."""
    if not os.path.isfile(os.path.join(model_dir, "lm.ckpt")):
        return False
    with open(os.path.join(model_dir, "hyperparams.yaml"), encoding="utf-8") as f:
        return re.search(r"^lm_scorer:", f.read(), re.M) is not None


def _check_lm_options(model_dir, kind, has_lm, use_lm, lm_weight, word_score):
    """TranscriberError unless lm_weight / word_score (those not None) are finite and weigh an
    LM that decoding uses: a CTC folder's n-gram LM, not disabled."""
    for name, value in (("lm_weight", lm_weight), ("word_score", word_score)):
        if value is not None and not math.isfinite(value):
            raise TranscriberError(f"{name} must be a finite number, got {value}")
    given = "lm_weight / word_score (transcribe.py --lm-weight / --word-score)"
    if kind != "CTC":
        raise TranscriberError(f"{model_dir} holds an S2S model: {given} are for the n-gram LM "
                               "of a CTC model (inference.make_word_lm)")
    if not has_lm:
        raise TranscriberError(f"{model_dir} has no CTC LM for {given} to weigh; make one with "
                               "`python -m inference.make_word_lm` MODEL_DIR TEXT, or drop them")
    if use_lm is False:
        raise TranscriberError(f"{given} weigh the LM, which use_lm=False (--no-lm) leaves out; "
                               "drop one or the other")


def _configure_ctc(asr, beam_size):
    """Greedy decoding (argmax per frame, no search) unless beam_size > 1."""
    from speechbrain.decoders.ctc import ctc_greedy_decode

    if beam_size is None or beam_size == 1:
        asr.hparams.decoding_function = functools.partial(
            ctc_greedy_decode, blank_id=asr.hparams.blank_index)
    else:
        asr.hparams.test_beam_search = {**asr.hparams.test_beam_search, "beam_size": beam_size}
    delattr(asr, "decoding_function")  # the exported searcher is a registered child module
    asr.set_decoding_function()


def _configure_s2s(asr, beam_size, use_lm, ctc_weight, ctc_partial, device):
    """Replaces the exported searcher by one with the requested beam, scorers and weights."""
    from speechbrain.decoders.scorer import ScorerBuilder

    hp = asr.hparams
    ctc_weight = hp.ctc_weight_decode if ctc_weight is None else ctc_weight
    if not 0 <= ctc_weight <= 1:
        raise TranscriberError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
    full, partial, weights = [], [], {}
    if ctc_weight > 0:
        if ctc_partial and ctc_weight == 1:
            raise TranscriberError("ctc_partial (--ctc-partial) needs ctc_weight < 1: with "
                                   "weight 1 the CTC scorer alone ranks the tokens, so it scores "
                                   "them all")
        (partial if ctc_partial else full).append(hp.ctc_scorer)
        weights["ctc"] = ctc_weight
    if use_lm:
        full.append(hp.lm_scorer)
        weights["transformerlm"] = hp.lm_weight
    scorer = None
    if weights:
        scorer = ScorerBuilder(full_scorers=full, partial_scorers=partial, weights=weights,
                               scorer_beam_scale=2)
    old = asr.mods.decoder
    asr.mods.decoder = type(old)(
        modules=[hp.Transformer, hp.seq_lin], bos_index=hp.bos_index, eos_index=hp.eos_index,
        min_decode_ratio=hp.min_decode_ratio, max_decode_ratio=hp.max_decode_ratio,
        beam_size=beam_size or hp.test_beam_size, temperature=hp.temperature,
        using_eos_threshold=old.using_eos_threshold,
        length_normalization=old.length_normalization,
        scorer=scorer,
    ).to(device).eval()
