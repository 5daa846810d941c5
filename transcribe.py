#!/usr/bin/env python3
"""Transcribe audio files with an exported model folder (<output_folder>/inference of
train_CTC.py / train_S2S.py).

    python transcribe.py demo_results/inference a.wav b.flac
    python transcribe.py MODEL_DIR talk.wav --chunk-seconds 60 --overlap-seconds 4 --device cpu
    python transcribe.py MODEL_DIR a.wav --beam-size 10 --no-lm          # without the LM
    python transcribe.py STREAMING_MODEL_DIR a.wav --stream --piece-ms 160  # as a live stream
    python transcribe.py STREAMING_MODEL_DIR --mic                         # microphone

Output: one line per file, in the order given: PATH<TAB>TRANSCRIPT (--text-only: TRANSCRIPT, an
empty line for a file that failed). Options may come before, between or after the files.
Any sample rate and channel count (resampled to the model's rate, channels averaged); formats
that libsndfile reads (WAV, FLAC, OGG, ...). Audio longer than --chunk-seconds is split into
chunks overlapping by --overlap-seconds whose transcripts are merged, so the model's memory stays bounded (the file is
read into memory whole).
An unreadable or empty audio file is reported on stderr and the others are transcribed (exit
status 1 when any failed; --fail-fast stops at the first, before decoding anything when its
header is bad; --stream too). A model folder error (missing or damaged folder, a hyperparams.yaml
that asks for code this project never writes) stops at once.
"""

import argparse
import math
import os
import sys

from recipes import run_cli, user_message
from recipes.device import set_mps_fallback_env


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Output: one line per file, in order: PATH<TAB>TRANSCRIPT, or only TRANSCRIPT "
               "with --text-only. Options may come before, between or after the files.")
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="exported folder (hyperparams.yaml, model.ckpt, tokenizer.ckpt...)")
    parser.add_argument("audio", metavar="AUDIO", nargs="*", help="audio files")
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:N | mps (default: best available)")
    parser.add_argument("--beam-size", type=int, default=None,
                        help="CTC: 1 (default) = greedy, N > 1 = prefix beam search; "
                             "S2S: beam width (default: the model's test_beam_size)")
    parser.add_argument("--no-lm", action="store_true",
                        help="decode without the folder's language model (S2S: lm.ckpt; CTC: "
                             "the n-gram LM from `python -m inference.make_word_lm`)")
    parser.add_argument("--lm-weight", type=float, default=None,
                        help="CTC LM: weight of the LM log-probability (default: the folder's "
                             "ctc_lm.json, tuned when the LM was added)")
    parser.add_argument("--word-score", type=float, default=None,
                        help="CTC LM: score added per decoded word (default: ctc_lm.json's)")
    parser.add_argument("--ctc-weight", type=float, default=None,
                        help="S2S: weight of the CTC scorer in [0, 1] (default: the model's "
                             "ctc_weight_decode; 0 = attention only)")
    parser.add_argument("--ctc-partial", action="store_true",
                        help="S2S: the CTC scorer rescores only the 2 x beam best tokens per step "
                             "(much faster on CPU than scoring the whole vocabulary)")
    parser.add_argument("--chunk-seconds", type=float, default=None,
                        help="longer audio is split into chunks of at most this length (default "
                             "from the model folder: 300 for CTC models with a Mamba encoder, "
                             "linear in time and memory; 30 for attention encoders and S2S)")
    parser.add_argument("--overlap-seconds", type=float, default=None,
                        help="overlap between consecutive chunks (4; at most half a chunk); "
                             "their transcripts are joined at the middle of the longest word "
                             "run both transcribe where the overlap is (else each drops its "
                             "half of the overlap's words; 0: joined as they are)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="files or chunks decoded together (4)")
    parser.add_argument("--text-only", action="store_true",
                        help="print only the transcripts (an empty line for a file that failed)")
    parser.add_argument("--fail-fast", action="store_true",
                        help="stop at the first unreadable audio file, before decoding anything "
                             "(default: report it on stderr, transcribe the others, exit 1)")
    parser.add_argument("--stream", action="store_true",
                        help="causal CTC models (hparams/CTC/conmamba_streaming.yaml): feed each "
                             "file as a live stream in pieces of --piece-ms and print the partial "
                             "text with its audio time and the piece's compute time")
    parser.add_argument("--piece-ms", type=float, default=160.0,
                        help="--stream / --mic: audio per piece in ms (160)")
    parser.add_argument("--mic", action="store_true",
                        help="stream the microphone until Ctrl-C (needs the sounddevice package)")
    parser.add_argument("--mic-seconds", type=float, default=None,
                        help="--mic: stop after this many seconds")
    args = parser.parse_intermixed_args(argv)
    if not args.audio and not args.mic:
        parser.error("the following arguments are required: AUDIO (or --mic)")
    if not 0 < args.piece_ms < math.inf:
        parser.error(f"--piece-ms must be a positive number of milliseconds, got {args.piece_ms}")
    if args.mic_seconds is not None and not (args.mic and 0 < args.mic_seconds < math.inf):
        parser.error("--mic-seconds must be a positive number of seconds, with --mic")
    if args.stream or args.mic:
        offline = [option for option, value in [
            ("--beam-size", args.beam_size), ("--no-lm", args.no_lm or None),
            ("--lm-weight", args.lm_weight), ("--word-score", args.word_score),
            ("--ctc-weight", args.ctc_weight), ("--ctc-partial", args.ctc_partial or None),
            ("--chunk-seconds", args.chunk_seconds), ("--overlap-seconds", args.overlap_seconds),
            ("--batch-size", args.batch_size)] if value is not None]
        if offline:
            parser.error(f"{', '.join(offline)}: not for --stream / --mic, which decode greedily "
                         "without an LM, piece by piece (--piece-ms); drop them")
    return args


def main(argv):
    """Transcribes and prints; returns the exit status (1 when a file failed) and raises
    RecipeError for user-fixable problems that stop everything."""
    args = parse_args(argv)
    set_mps_fallback_env(["--device", args.device] if args.device else [])  # before torch
    if args.stream or args.mic:  # small per-piece work: spinning OpenMP threads cost more than
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # they save on a shared CPU

    from inference.transcriber import Transcriber, model_kind
    from recipes.audio import AudioError, check_audio

    model_kind(args.model_dir)  # check the folder and every file's header before loading
    failed = set()

    def report(path, error):
        if args.fail_fast:
            raise error
        failed.add(path)
        print("ERROR: " + user_message(error), file=sys.stderr, flush=True)

    for path in args.audio:
        try:
            check_audio(path)
        except AudioError as e:
            report(path, e)
    todo = [p for p in args.audio if p not in failed]
    if args.audio and not todo:
        if args.text_only:
            print("\n" * len(args.audio), end="", flush=True)
        return 1
    if args.stream or args.mic:
        from inference.streaming import (StreamingTranscriber, require_sounddevice, stream_files,
                                         stream_microphone)

        if args.mic:
            require_sounddevice()
        streamer = StreamingTranscriber.from_folder(args.model_dir, device=args.device)
        for path in args.audio:  # in order, an empty --text-only line for a file that failed
            if path not in failed:
                stream_files(streamer, [path], args.piece_ms / 1000, args.text_only,
                             on_error=report)
            elif args.text_only:
                print(flush=True)
        if args.mic:
            stream_microphone(streamer, args.piece_ms / 1000, args.mic_seconds)
        return 1 if failed else 0
    chunking = {"chunk_seconds": args.chunk_seconds, "overlap_seconds": args.overlap_seconds,
                "batch_size": args.batch_size}
    asr = Transcriber.from_folder(
        args.model_dir, device=args.device, beam_size=args.beam_size,
        use_lm=False if args.no_lm else None, ctc_weight=args.ctc_weight,
        ctc_partial=args.ctc_partial, lm_weight=args.lm_weight, word_score=args.word_score,
        **{key: value for key, value in chunking.items() if value is not None})
    texts = dict(zip(todo, asr.transcribe_files(todo, on_error=report)))
    for path in args.audio:  # in order, an empty --text-only line for a file that failed
        text = texts.get(path)
        if text is not None:
            print(text if args.text_only else f"{path}\t{text}", flush=True)
        elif args.text_only:
            print(flush=True)
    return 1 if failed else 0


def run(argv):
    """main() with user-fixable errors as one 'ERROR: ...' line on stderr; returns the exit
    status (0 or 1)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
