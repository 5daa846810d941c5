"""Real-time transcription with a causal CTC model (hparams/CTC/conmamba_streaming.yaml,
demo_streaming.yaml): audio goes in as pieces of any size, partial text comes out.

    from inference.streaming import StreamingTranscriber
    asr = StreamingTranscriber.from_folder("demo_streaming_results/inference")
    for piece in pieces:                  # (samples,) at asr.sample_rate, any length
        print(asr.push(piece))            # text so far
    print(asr.finish())                   # final text; then ready for a new stream

The model state (features, CNN, every layer's Mamba and conv state: ``modules.streaming``) and
the greedy CTC state (the previous frame's best token) are carried between pieces and have a
fixed size. The text equals greedy CTC decoding of the whole file with the same model (a stream
shorter than the model's minimum is zero-padded to it at its end, as whole files are).
"""

import math
import time

import torch

from inference.transcriber import Transcriber, TranscriberError
from recipes.audio import AudioError, downmix, load_audio, to_float
from modules.mamba.scan import load_cpu_kernels
from modules.streaming import StreamingEncoder, StreamingError


class StreamingTranscriber:
    """Greedy CTC transcription of one audio stream at a time.

    Arguments
    ---------
    encoder : modules.streaming.StreamingEncoder (modules in eval mode).
    tokenizer : SentencePieceProcessor of the model.
    blank_index : CTC blank id.
    sample_rate : rate of the audio pushed.
    min_samples : a shorter stream is zero-padded to it when it finishes (Transcriber.min_samples:
        what whole files are padded to).
    """

    def __init__(self, encoder: StreamingEncoder, tokenizer, blank_index=0, sample_rate=16000,
                 min_samples=0):
        self.encoder, self.tokenizer = encoder, tokenizer
        self.blank_index, self.sample_rate = blank_index, int(sample_rate)
        self.min_samples = min_samples
        vocab = tokenizer.vocab_size()
        # what each token adds to the text (SentencePiece: "▁" starts a word; control tokens
        # such as <s> add nothing, as in decode_ids)
        self._pieces = ["" if tokenizer.is_control(i) else
                        " \u2047 " if tokenizer.is_unknown(i) else
                        tokenizer.id_to_piece(i).replace("\u2581", " ") for i in range(vocab)]
        self.reset()

    @classmethod
    def from_folder(cls, model_dir, device=None, savedir=None):
        """Loads an exported CTC folder of a causal model (train_CTC.py with
        hparams/CTC/conmamba_streaming.yaml or demo_streaming.yaml). A word LM in the folder
        is not used: streaming decodes greedily."""
        base = Transcriber.from_folder(model_dir, device=device, use_lm=False, savedir=savedir)
        if base.kind != "CTC":
            raise TranscriberError(f"{model_dir} holds an attention (S2S) model; streaming decodes "
                                   "causal CTC models (hparams/CTC/conmamba_streaming.yaml)")
        front = base.asr.mods.encoder
        try:
            encoder = StreamingEncoder(front.compute_features, front.normalize, front.CNN,
                                       front.transformer_encoder.transformer, front.ctc_lin)
        except StreamingError as e:
            raise TranscriberError(f"{model_dir} cannot stream: {e}") from e
        asr = cls(encoder, base.asr.tokenizer, base.asr.hparams.blank_index,
                  base.asr.hparams.sample_rate, base.min_samples)
        # Pieces continue a state, so they never load the compiled CPU scan kernels lazily;
        # loaded here (~0.5 s, once), they make pieces of 160 ms and more 8-20 % faster.
        load_cpu_kernels(next(base.asr.mods.parameters()))
        asr.push(torch.zeros(asr.sample_rate // 2))  # warm-up: one-time allocations, not in
        asr.reset()  # the first live piece's latency
        return asr

    def reset(self):
        """Forgets the current stream (state, text): the next push starts a new one."""
        self.state = self.encoder.new_state()
        self._previous = -1  # best token of the last frame (CTC merges repeats across pieces)
        self._space = False  # a word ended: the next character starts a new one
        self.text = ""  # the text so far, words separated by single spaces
        self.frames = 0

    def push(self, audio):
        """audio: (samples,) at ``sample_rate`` (numpy or tensor, any length; float, or integer
        PCM scaled as recipes.audio.to_float does), or 2-D with channels (the smaller dimension,
        averaged) -> text so far."""
        self._decode(self.encoder.push(self.state, downmix(to_float(audio))))
        return self.text

    def finish(self):
        """Ends the stream: decodes its last frames, returns the final text and resets."""
        short = self.min_samples - self.state.received
        if 0 < short < self.min_samples:  # as a whole file this short is padded
            self._decode(self.encoder.push(self.state, torch.zeros(short)))
        self._decode(self.encoder.finish(self.state))
        text = self.text
        self.reset()
        return text

    def _decode(self, log_probs):
        """Greedy CTC over (1, n, vocab) frames, continuing from the previous piece."""
        if log_probs.shape[1] == 0:
            return
        self.frames += log_probs.shape[1]
        best = log_probs[0, :, : len(self._pieces)].argmax(-1).tolist()
        for token in best:
            if token != self._previous and token != self.blank_index and self._pieces[token]:
                self._append(self._pieces[token])
            self._previous = token

    def _append(self, piece):
        for word in piece.split(" "):  # "" before/after a space: a word boundary
            if word:
                self.text += (" " if self._space and self.text else "") + word
                self._space = False
            else:
                self._space = True

    def transcribe_pieces(self, wav, piece_samples):
        """Streams a waveform (samples,) in pieces of piece_samples; yields
        (audio seconds pushed, text so far, compute seconds of the piece, final) per piece and
        once more for the end of the stream (final True)."""
        if piece_samples < 1:
            raise TranscriberError(
                f"The piece size must be at least one sample, got {piece_samples}")
        wav = downmix(to_float(wav))
        for start in range(0, len(wav), piece_samples):
            t0 = time.perf_counter()
            text = self.push(wav[start: start + piece_samples])
            pushed = min(start + piece_samples, len(wav)) / self.sample_rate
            yield pushed, text, time.perf_counter() - t0, False
        t0 = time.perf_counter()
        text = self.finish()
        yield len(wav) / self.sample_rate, text, time.perf_counter() - t0, True


PARTIAL_CHARS = 100  # of the text so far on a --stream progress line


def percentile(values, q):
    """The q-th percentile (nearest rank) of a non-empty list of numbers."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def stream_files(asr, paths, piece_seconds, text_only=False, out=None, err=None,
                 on_error=None):
    """``transcribe.py --stream``: each file streamed as if live, in pieces of piece_seconds.

    Prints a line whenever the text changes, ``[audio s | compute ms] TEXT`` (its last
    PARTIAL_CHARS characters: the output stays linear in the stream's length), then
    ``PATH<TAB>FINAL TEXT`` (--text-only: the final text only); compute statistics go to err.
    on_error : None (a file that cannot be read raises AudioError) or on_error(path, error),
        called for such a file before going on with the next (--text-only: an empty line).
    """
    import sys

    if not 0 < piece_seconds < math.inf:
        raise TranscriberError(f"The piece length must be > 0 and finite, got {piece_seconds} s")
    out, err = out or sys.stdout, err or sys.stderr
    piece = max(1, round(piece_seconds * asr.sample_rate))
    for path in paths:
        try:
            wav = load_audio(path, asr.sample_rate)
        except AudioError as e:
            if on_error is None:
                raise
            on_error(path, e)
            if text_only:
                print("", file=out, flush=True)
            continue
        shown, compute = "", []
        for pushed, text, seconds, final in asr.transcribe_pieces(wav, piece):
            compute.append(seconds)
            if final:
                print(text if text_only else f"{path}\t{text}", file=out, flush=True)
            elif text != shown and not text_only:
                tail = text if len(text) <= PARTIAL_CHARS else "..." + text[3 - PARTIAL_CHARS:]
                print(f"[{pushed:8.2f} s | {seconds * 1000:6.1f} ms] {tail}", file=out,
                      flush=True)
                shown = text
        duration = len(wav) / asr.sample_rate
        print(f"{path}: {duration:.2f} s streamed in {len(compute) - 1} pieces of "
              f"{piece / asr.sample_rate * 1000:.0f} ms; compute per piece p50 "
              f"{percentile(compute, 50) * 1000:.1f} ms, p95 {percentile(compute, 95) * 1000:.1f}"
              f" ms; real-time factor {sum(compute) / max(duration, 1e-9):.3f}", file=err,
              flush=True)


def require_sounddevice():
    """The sounddevice module, or TranscriberError saying how to get it."""
    try:
        import sounddevice
    except (ImportError, OSError) as e:  # OSError: the package without its PortAudio library
        raise TranscriberError(f"--mic needs the sounddevice package and PortAudio ({e}): "
                               "pip install sounddevice; or stream a file with --stream") from e
    return sounddevice


def stream_microphone(asr, piece_seconds, seconds=None, out=None):
    """``transcribe.py --mic``: transcribes the default input device until Ctrl-C (or for
    ``seconds``); needs the optional sounddevice package."""
    import sys

    out = out or sys.stdout
    sounddevice = require_sounddevice()
    piece = max(1, round(piece_seconds * asr.sample_rate))
    pushed, shown = 0, ""
    print(f"Listening at {asr.sample_rate} Hz in {piece_seconds * 1000:.0f} ms pieces "
          "(Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        with sounddevice.InputStream(samplerate=asr.sample_rate, channels=1, dtype="float32",
                                     blocksize=piece) as stream:
            while seconds is None or pushed < seconds * asr.sample_rate:
                block, _ = stream.read(piece)
                pushed += len(block)
                text = asr.push(torch.from_numpy(block[:, 0].copy()))
                if text != shown:
                    print(f"[{pushed / asr.sample_rate:8.2f} s] {text}", file=out, flush=True)
                    shown = text
    except KeyboardInterrupt:
        pass
    print(asr.finish(), file=out, flush=True)

