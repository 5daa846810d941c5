"""Real-time factor (processing time / audio duration) of transcription on CPU.

    python -m benchmarks.bench_rtf                    # 10, 60 and 600 s of audio, all models
    python -m benchmarks.bench_rtf --quick            # 10 and 60 s
    python -m benchmarks.bench_rtf --demo-model demo_results/inference   # + a trained one

What is timed: Transcriber.transcribe_files([one 16 kHz WAV]) of inference.transcriber, i.e. reading,
features, encoder, decoding and (beyond --chunk-seconds) chunking + merging; after a warm-up call
on 2 s. Median of 3 runs for audio up to 10 s (one when a run takes over 10 s), else one run.
Each (model, duration) row runs in its own process with torch.set_num_threads(--threads).
"time s": wall clock. "CPU s": the process's CPU time (all threads) in that run; on a busy machine
wall time mostly measures the other processes (and OpenMP threads spin while waiting for a
descheduled sibling), so with --threads 1 "CPU s" is close to what the run takes on an idle core. On a shared machine run it with
OMP_WAIT_POLICY=PASSIVE (inherited by the rows): threads then sleep instead of spinning, which
on this 2-core machine under load cut a 2-thread 10 s ConMamba CTC run from ~5 s to ~0.8 s.
"peak MB": the process's peak resident memory (VmHWM: imports + model + decoding; the imports of
torch and SpeechBrain alone take ~0.75 GB); "loaded MB": resident memory once the model is loaded;
the difference is what decoding added.

Models: random weights (RTF does not depend on them, except S2S decode lengths, see below),
exported with export_untrained() as inference folders from the official-size recipes:
ConMamba / Conformer CTC large (greedy CTC) and ConMamba S2S small (beam 10, with and without the
CTC scorer; "CTC top20": the CTC scorer rescores only the 20 best tokens per step, option
ctc_partial). A random S2S decoder hardly ever emits <eos>, so every hypothesis runs to
max_decode_ratio * encoder frames: the S2S rows cap it at --s2s-max-decode-ratio (0.2 = 5 tokens
per second of audio, about a trained 5000-unigram model's rate on read speech), which keeps the
number of decoding steps realistic. S2S rows stop at 60 s by default: the full-vocabulary CTC
scorer (SpeechBrain's CTCPrefixScore, 5000 tokens, a Python loop over frames at every step) is
slow on CPU, and longer audio only repeats the same 30 s chunks (time grows linearly with the
number of chunks, peak memory does not grow). The audio is speech from data/mini_corpus (looped),
or noise. The machine load (os.getloadavg) is printed: other processes on the cores slow every row.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import busy_machine_note, positive
from recipes.untrained import SAMPLE_RATE, export_untrained, speech_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def measure(folder, wav_path, options, threads, files=1):
    """One row, in this process: {'rtf', 'seconds', 'chunks', 'loaded_mb', 'peak_mb', ...};
    files > 1: one transcribe_files call on that many copies of the file, timed once (what a
    process transcribing a list of files takes, the compiled scan's loading included)."""
    import soundfile
    import torch

    from inference.transcriber import Transcriber

    torch.set_num_threads(threads)
    asr = Transcriber.from_folder(folder, device="cpu", **options)
    loaded = _rss_mb("VmRSS")
    audio, sr = soundfile.read(wav_path, dtype="float32")
    duration = len(audio) / sr
    asr.transcribe_waveform(audio[: 2 * sr], sr)  # warm-up
    runs = []
    while len(runs) < (3 if files == 1 and duration <= 10 and sum(r[0] for r in runs) < 10
                       else 1):
        start, cpu = time.perf_counter(), time.process_time()
        text = asr.transcribe_files([wav_path] * files)[0]
        runs.append((time.perf_counter() - start, time.process_time() - cpu))
    seconds, cpu = sorted(runs)[len(runs) // 2]
    return {"seconds": seconds, "rtf": seconds / (duration * files), "cpu": cpu,
            "chunks": len(asr.last_chunks[0]),
            "words": len(text.split()), "loaded_mb": loaded, "peak_mb": _rss_mb("VmHWM")}


def _rss_mb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # macOS: ru_maxrss in bytes (peak only)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def models(args):
    """[(name, decoding label, recipe, kind, export overrides, Transcriber options)]."""
    s2s = {"max_decode_ratio": args.s2s_max_decode_ratio}
    chunking = {"chunk_seconds": args.chunk_seconds, "overlap_seconds": args.overlap_seconds,
                "batch_size": args.batch_size}
    rows = [
        ("ConMamba CTC large", "greedy", "hparams/CTC/conmamba_large.yaml", "CTC", {}, {}),
        ("Conformer CTC large", "greedy", "hparams/CTC/conformer_large.yaml", "CTC", {}, {}),
        ("ConMamba S2S small", "beam 10 + CTC", "hparams/S2S/conmamba_small.yaml", "S2S", s2s,
         {"beam_size": 10}),
        ("ConMamba S2S small", "beam 10 + CTC top20", "hparams/S2S/conmamba_small.yaml", "S2S",
         s2s, {"beam_size": 10, "ctc_partial": True}),
        ("ConMamba S2S small", "beam 10, no CTC", "hparams/S2S/conmamba_small.yaml", "S2S", s2s,
         {"beam_size": 10, "ctc_weight": 0.0}),
    ]
    if args.demo_model:
        rows.insert(2, ("demo (trained)", "greedy", None, "CTC", None, {}))
    return [(n, d, r, k, o, {**opts, **chunking}) for n, d, r, k, o, opts in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 and 60 s only")
    parser.add_argument("--durations", type=positive(float), nargs="+", default=None,
                        help="audio lengths in seconds (default 10 60 600)")
    parser.add_argument("--demo-model", default=None, help="exported folder of a trained model")
    parser.add_argument("--threads", type=positive(int), default=2)
    parser.add_argument("--chunk-seconds", type=positive(float), default=None,
                        help="chunk length for every model (default: each model's own, see "
                             "inference.transcriber.default_chunk_seconds)")
    parser.add_argument("--overlap-seconds", type=float, default=4.0)
    parser.add_argument("--batch-size", type=positive(int), default=4)
    parser.add_argument("--files", type=positive(int), default=1,
                        help="transcribe this many copies of each audio in one call, timed once "
                             "(default 1: one file, median of 3 runs up to 10 s)")
    parser.add_argument("--s2s-max-decode-ratio", type=positive(float), default=0.2)
    parser.add_argument("--s2s-durations", type=positive(float), nargs="+", default=None,
                        help="audio lengths for the S2S rows (default: those of --durations up "
                             "to 60 s: beyond, chunks of the same size repeat, see the docstring)")
    parser.add_argument("--only", default=None, help="run the rows whose name contains this")
    parser.add_argument("--work-dir", default=None,
                        help="exported models and audio are kept here and reused (default: a "
                             "temporary folder, removed at the end)")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one row
    args = parser.parse_args(argv)
    if args.row:
        row = json.loads(args.row)
        print(json.dumps(measure(row["folder"], row["wav"], row["options"], args.threads,
                                 row["files"])))
        return 0
    durations = args.durations or ([10, 60] if args.quick else [10, 60, 600])
    s2s_durations = args.s2s_durations or [d for d in durations if d <= 60]
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_rtf_")
    os.makedirs(work, exist_ok=True)
    try:
        ran, failed = run_rows(args, durations, s2s_durations, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if not ran:
        print(f"no row ran: no model name contains {args.only!r}", file=sys.stderr)
    return 1 if failed or not ran else 0


def run_rows(args, durations, s2s_durations, work):
    """Export the models and time every row, one subprocess per row."""
    import soundfile

    wavs = {}
    for seconds in sorted(set(durations) | set(s2s_durations)):
        wavs[seconds] = os.path.join(work, f"audio_{seconds:g}s.wav")
        if not os.path.isfile(wavs[seconds]):
            soundfile.write(wavs[seconds], speech_like(seconds), SAMPLE_RATE)
    chunks = "model default" if args.chunk_seconds is None else f"{args.chunk_seconds:g} s"
    files = f"{args.files} files per call, " if args.files > 1 else ""
    print(f"bench_rtf: CPU, {files}{args.threads} torch threads, chunks {chunks} "
          f"overlapping {args.overlap_seconds:g} s, batch {args.batch_size}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}; load average at "
          f"start {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores",
          flush=True)
    note = busy_machine_note(args.threads)
    if note:
        print(note, flush=True)
    header = (f"{'model':<21} {'decoding':<20} {'audio s':>7} {'chunks':>6} {'time s':>8} "
              f"{'RTF':>7} {'CPU s':>7} {'loaded MB':>9} {'peak MB':>8}")
    print(header + "\n" + "-" * len(header), flush=True)
    ran = failed = 0
    for name, decoding, recipe, kind, overrides, options in models(args):
        if args.only and args.only.lower() not in name.lower():
            continue
        if recipe is None:
            folder = args.demo_model
        else:
            tag = os.path.splitext(os.path.basename(recipe))[0]
            folder = os.path.join(work, f"{kind}_{tag}", "inference")
            if not os.path.isfile(os.path.join(folder, "hyperparams.yaml")):
                export_untrained(os.path.join(REPO, recipe), kind, os.path.dirname(folder),
                                 overrides)
        for seconds in (durations if kind == "CTC" else s2s_durations):
            row = json.dumps({"folder": folder, "wav": wavs[seconds], "options": options,
                              "files": args.files})
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_rtf", "--row", row,
                                   "--threads", str(args.threads)],
                                  capture_output=True, text=True, cwd=REPO)
            ran += 1
            if proc.returncode:
                failed += 1
                line = f"{name:<21} {decoding:<20} {seconds:>7g} FAILED: " + \
                    (proc.stderr.strip().splitlines() or ["?"])[-1]
            else:
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                line = (f"{name:<21} {decoding:<20} {seconds:>7g} {r['chunks']:>6} "
                        f"{r['seconds']:>8.2f} {r['rtf']:>7.3f} {r['cpu']:>7.2f} "
                        f"{r['loaded_mb']:>9.0f} {r['peak_mb']:>8.0f}")
            print(line, flush=True)
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.work_dir:
        print(f"(models and audio kept in {work})")
    return ran, failed


if __name__ == "__main__":
    sys.exit(main())
