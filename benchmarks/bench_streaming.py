"""Streaming transcription speed and memory (inference.streaming.StreamingTranscriber) on CPU.

    python -m benchmarks.bench_streaming                # 2 threads, 60 s per piece size, 1 h memory
    python -m benchmarks.bench_streaming --quick        # 20 s per piece size, 10 min memory run

For each causal model (random weights, exported with export_untrained like the trained recipes):
"small" = hparams/CTC/demo_streaming.yaml (4 layers, d_model 128), "paper" =
hparams/CTC/conmamba_streaming.yaml (18 layers, d_model 256, the sizes of conmamba_large):

- per-piece compute latency (p50, p95 of the time push() takes: features, CNN, encoder, greedy
  CTC, text) and real-time factor (compute / audio) for 40, 160 and 640 ms pieces of speech
  (data/mini_corpus looped), after a 2 s warm-up stream;
- resident memory (VmRSS) after 1 minute and after 1 hour of streamed audio in one stream, fed
  as fast as it is computed, in 2 s pieces (the state is the same whatever the piece size), and
  the size of the stream's state (tensors it carries);
- the look-ahead of every part (modules.streaming.lookahead_ms), also for the offline recipes.

Each model runs in its own process with torch.set_num_threads(--threads). The machine load is
printed; on a shared machine run with OMP_WAIT_POLICY=PASSIVE.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import busy_machine_note, positive
from recipes.untrained import SAMPLE_RATE, export_untrained, speech_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"small": "hparams/CTC/demo_streaming.yaml",
          "paper": "hparams/CTC/conmamba_streaming.yaml"}
OFFLINE = {"demo (offline)": "hparams/CTC/demo.yaml",
           "conmamba_large (offline)": "hparams/CTC/conmamba_large.yaml"}
PIECES_MS = (40, 160, 640)
MEMORY_PIECE_S = 2.0


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def _state_bytes(state):
    tensors = [state.samples, state.features]
    for layer in state.layers:
        tensors += [layer.mamba.conv_state, layer.mamba.ssm_state]
        tensors += [layer.conv] if layer.conv is not None else []
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(folder, seconds, memory_seconds, threads):
    """One model, in this process: latency per piece size and the memory run."""
    import torch

    from inference.streaming import StreamingTranscriber, percentile

    torch.set_num_threads(threads)
    asr = StreamingTranscriber.from_folder(folder, device="cpu")
    params = sum(p.numel() for p in asr.encoder.transformer.parameters())
    audio = torch.from_numpy(speech_like(seconds))
    result = {"parameters": params, "pieces": {}}
    for piece_ms in PIECES_MS:
        piece = SAMPLE_RATE * piece_ms // 1000
        list(asr.transcribe_pieces(audio[: 2 * SAMPLE_RATE], piece))  # warm-up
        times = [t for _, _, t, final in asr.transcribe_pieces(audio, piece) if not final]
        result["pieces"][piece_ms] = {"p50_ms": 1000 * percentile(times, 50),
                                      "p95_ms": 1000 * percentile(times, 95),
                                      "rtf": sum(times) / seconds}
    # memory: one stream of memory_seconds, looping 60 s of speech
    loop = torch.from_numpy(speech_like(60.0, seed=1))
    piece = int(MEMORY_PIECE_S * SAMPLE_RATE)
    asr.reset()
    marks, pushed, start = {}, 0, time.perf_counter()
    while pushed < memory_seconds * SAMPLE_RATE:
        offset = pushed % len(loop)
        asr.push(loop[offset: offset + piece])
        pushed += min(piece, len(loop) - offset)
        for mark in (_first_mark(memory_seconds), memory_seconds):
            if mark not in marks and pushed >= mark * SAMPLE_RATE:
                marks[mark] = {"rss_mb": _rss_mb(), "state_bytes": _state_bytes(asr.state),
                               "text_chars": len(asr.text)}
    result["memory"] = {str(k): v for k, v in marks.items()}
    result["memory_run_rtf"] = (time.perf_counter() - start) / memory_seconds
    return result


def _first_mark(memory_seconds):
    """Seconds of streamed audio at which memory is first read: 1 minute, or the whole run."""
    return min(60.0, memory_seconds)


def memory_table(results, models, memory_seconds):
    """Markdown lines of the memory runs: {model: worker result} for the given models."""
    first_mark = _first_mark(memory_seconds)
    lines = [f"| model | RSS after {first_mark / 60:.3g} min | RSS after "
             f"{memory_seconds / 60:.3g} min | stream state | memory run RTF |",
             "|---|---|---|---|---|"]
    for name in models:
        m = results[name]["memory"]
        first, last = m[str(first_mark)], m[str(memory_seconds)]
        state = f"{first['state_bytes'] / 1024:.0f} KiB"
        if last["state_bytes"] != first["state_bytes"]:
            state += f" -> {last['state_bytes'] / 1024:.0f} KiB"
        lines.append(f"| {name} | {first['rss_mb']:.0f} MB | {last['rss_mb']:.0f} MB | {state} | "
                     f"{results[name]['memory_run_rtf']:.3f} |")
    return lines


def lookahead_rows():
    """{config: lookahead_ms dict} for the streaming and offline recipes (models built, not run)."""
    from modules.streaming import lookahead_ms
    from recipes.hparams import load_recipe

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in [*MODELS.items(), *OFFLINE.items()]:
            hp, _, _ = load_recipe(os.path.join(REPO, path),
                                   {"output_folder": tmp, "data_folder": tmp}, "cpu")
            rows[name] = lookahead_ms(hp["compute_features"], hp["CNN"], hp["Transformer"])
    return rows


def _fmt_ms(value):
    return "whole utterance" if math.isinf(value) else f"{value:g}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=positive(int), default=2)
    p.add_argument("--quick", action="store_true", help="20 s per piece size, 10 min memory run")
    p.add_argument("--seconds", type=positive(float), default=None,
                   help="audio per piece size (60)")
    p.add_argument("--memory-seconds", type=positive(float), default=None,
                   help="length of the memory run's stream (3600)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", nargs=4, metavar=("FOLDER", "SECONDS", "MEMORY_SECONDS", "OUT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        folder, seconds, memory_seconds, out = args.worker
        with open(out, "w") as f:
            json.dump(worker(folder, float(seconds), float(memory_seconds), args.threads), f)
        return None
    seconds = args.seconds or (20.0 if args.quick else 60.0)
    memory_seconds = args.memory_seconds or (600.0 if args.quick else 3600.0)
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    note = busy_machine_note(args.threads)
    if note:
        print(note, flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder = export_untrained(os.path.join(REPO, MODELS[name]), "CTC",
                                      os.path.join(tmp, name),
                                      overrides={"data_folder": tmp}, n_sentences=2000)
            out = os.path.join(tmp, f"{name}.json")
            subprocess.run([sys.executable, "-m", "benchmarks.bench_streaming", "--threads",
                            str(args.threads), "--worker", folder, str(seconds),
                            str(memory_seconds), out], cwd=REPO, check=True)
            with open(out) as f:
                results[name] = json.load(f)
            print(f"{name} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    results["lookahead_ms"] = lookahead_rows()

    print(f"\nPer-piece compute latency and real-time factor ({seconds:g} s of speech per piece "
          f"size, {args.threads} threads)\n")
    print("| model | parameters | piece | p50 ms | p95 ms | RTF |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        r = results[name]
        for piece_ms, row in r["pieces"].items():
            print(f"| {name} | {r['parameters'] / 1e6:.1f}M | {piece_ms} ms | {row['p50_ms']:.1f} "
                  f"| {row['p95_ms']:.1f} | {row['rtf']:.3f} |")
    print(f"\nResident memory of one stream ({MEMORY_PIECE_S:g} s pieces)\n")
    print("\n".join(memory_table(results, args.models, memory_seconds)))
    print("\nLook-ahead (ms) per part\n")
    print("| config | features | CNN | conv modules | Mamba | total | output period |")
    print("|---|---|---|---|---|---|---|")
    for name, la in results["lookahead_ms"].items():
        print(f"| {name} | {_fmt_ms(la['features'])} | {_fmt_ms(la['cnn'])} | "
              f"{_fmt_ms(la['conv_modules'])} | {_fmt_ms(la['mamba'])} | {_fmt_ms(la['total'])} "
              f"| {_fmt_ms(la['frame_period'])} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
