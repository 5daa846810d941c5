"""ConMamba vs Conformer encoders, and the Mamba decoder's beam-search step, on CPU.

    python -m benchmarks.bench_models           # full grid (minutes; rows that would exceed
                                                # --max-mem-gb / --max-run-s are skipped)
    python -m benchmarks.bench_models --quick   # small encoders, 10/30/300 s, short decoder sweep
    python -m benchmarks.bench_models --threads 1   # on a machine shared with other jobs

Encoders: the official S2S small (d_model 144, 12 layers) and large (d_model 512, 12 layers) dims,
TransformerASR.encode() on (batch, frames, 640) inputs, i.e. what follows the CNN front end:
100 feature frames/s of audio, /4 after the front end -> 25 encoder frames per second of audio.
forward: eval mode, no_grad. forward+backward: train mode, sum of the output backpropagated.
Each (model, length) first runs once untimed, measuring memory (and warming up at that length);
times are then medians of 3 runs when a run is under 2 s, else of 1 run. Conformer and ConMamba
alternate at each length, so machine load hits both alike; ratio = Conformer time / ConMamba time
(> 1: ConMamba faster). The allocator is the platform default (glibc's malloc on Linux), untuned.
Peak memory: resident set size at the peak of the untimed run minus the resident size just before
it (Linux: malloc_trim(0) first returns freed heap pages to the OS, then VmHWM is reset through
/proc/self/clear_refs; "n/a" elsewhere): pages held at the peak (activations, gradients,
allocator slack), not bytes requested; buffers kept across calls (the scan's scratch) are not
counted.

Decoder: Mamba decoder with the official S2S small dims (d_model 144, 4 layers, 5000 tokens) and
seq_lin, 10 s of audio (250 memory frames), 10 hypotheses (batch 1 x beam 10). Time (median) of one
search step (decoder + output layer + log-softmax) at a given prefix length: stateful (one
recurrent step, caches reordered by a random beam permutation) vs stateless (SpeechBrain's
decode() over the whole prefix, which for the Mamba decoder rescans [memory; prefix], as the
official code does).

ConMamba's scan: compiled when numba is installed (modules/mamba/scan_cpu.py); for comparable
rows set MAMBA_SCAN_NUMBA=1 (always compiled) or 0 (pure PyTorch): unset, the kernels load at the
first scan with gradients or once the pure-PyTorch scans add up to scan_cpu.LOAD_AFTER state
updates, so short forward rows measured before it run the pure-PyTorch scan.

Machine load matters: other processes on the same cores make every figure noisy; the load average is
printed with the results.
"""

import argparse
import ctypes
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from speechbrain.nnet.linear import Linear

from benchmarks import busy_machine_note, positive
from inference.transcriber import ENCODER_FRAMES_PER_SECOND
from modules.TransformerASR import TransformerASR, count_parameters

SMALL = dict(d_model=144, nhead=4, num_encoder_layers=12, d_ffn=1024)
LARGE = dict(d_model=512, nhead=8, num_encoder_layers=12, d_ffn=2048)
MAMBA_CONFIG = {"d_state": 16, "expand": 2, "d_conv": 4, "bidirectional": True}
STEPS = 9  # stateful steps timed per prefix length (median)


def build_encoder(dims, encoder_module):
    return TransformerASR(
        tgt_vocab=5000,
        input_size=640,
        num_decoder_layers=0,
        dropout=0.1,
        activation=torch.nn.GELU,
        encoder_module=encoder_module,
        attention_type="RelPosMHAXL",
        normalize_before=True,
        causal=False,
        mamba_config=MAMBA_CONFIG if encoder_module == "conmamba" else None,
        **dims,
    )


# ---- memory -------------------------------------------------------------------------------------


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def _malloc_trim():
    """Hands glibc's free heap pages back to the OS, so the next peak RSS is this run's own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_memory_mb(fn):
    """Run fn(); return (result, peak RSS above the RSS before, MB or None when not measurable)."""
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _rss_kb("VmRSS:")
    except OSError:
        return fn(), None
    result = fn()
    return result, max(0, _rss_kb("VmHWM:") - before) / 1024


def memory_estimate_gb(module, dims, batch, frames, backward):
    """Rough peak of the largest activations, calibrated on measured rows (S dims, 1 thread):
    Conformer: ~15 (T x T) attention-sized tensors alive in a RelPosMHAXL forward, ~5 per layer
    kept for backward; ConMamba: scan states kept for backward (2 directions x d_inner x d_state
    per frame and layer, x1.3)."""
    if module == "conformer":
        matrix = batch * dims["nhead"] * frames**2 * 4
        kept = 5 * matrix * dims["num_encoder_layers"] if backward else 0
        return max(15 * matrix, kept) / 2**30
    if not backward:
        return 0.0
    d_inner = 2 * dims["d_model"]
    return 1.3 * 2 * batch * frames * d_inner * 16 * 4 * dims["num_encoder_layers"] / 2**30


def encoder_run(model, batch, frames, backward):
    x = torch.randn(batch, frames, 640)
    if backward:
        model.train()
        model.encode(x).sum().backward()
        model.zero_grad(set_to_none=True)
    else:
        model.eval()
        with torch.no_grad():
            model.encode(x)


def timed(fn):
    """Seconds of one run of fn."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def predicted_s(history, batch, frames, exponent):
    """Time predicted from the last measured batch-1 (frames, seconds): linear in the batch,
    frames**exponent in the length."""
    if not history:
        return 0.0
    last_frames, last_s = history[-1]
    return batch * last_s * (frames / last_frames) ** exponent


def encoder_sizes(args):
    return args.sizes or (["S"] if args.quick else ["S", "L"])


def bench_encoders(args):
    """Conformer and ConMamba measured alternately (so machine load hits both alike)."""
    sizes = {k: v for k, v in {"S": SMALL, "L": LARGE}.items() if k in encoder_sizes(args)}
    seconds = args.seconds or ([10, 30, 300] if args.quick else [10, 30, 60, 120, 300])
    cases = [(1, s) for s in seconds] + ([] if args.no_batch else [(8, 10)])
    exponents = {"conformer": 2.0, "conmamba": 1.0}  # attention is quadratic in length
    rows = []
    for size, dims in sizes.items():
        models = {}
        for module in exponents:
            torch.manual_seed(0)
            models[module] = build_encoder(dims, module)
            n = count_parameters(models[module]) / 1e6
            print(f"# {module}-{size}: {n:.2f} M parameters (encoder + front linear)", flush=True)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            history = {module: [] for module in models}
            for model in models.values():
                encoder_run(model, 1, 50, backward)  # warm-up
            for batch, sec in cases:
                frames = sec * ENCODER_FRAMES_PER_SECOND
                run = {}
                for module, model in models.items():
                    row = dict(
                        model=f"{module}-{size}",
                        mode=mode,
                        batch=batch,
                        seconds=sec,
                        frames=frames,
                        time_s=None,
                        peak_mb=None,
                        skipped=None,
                    )
                    est = memory_estimate_gb(module, dims, batch, frames, backward)
                    guess = predicted_s(history[module], batch, frames, exponents[module])
                    if est > args.max_mem_gb:
                        row["skipped"] = f"needs ~{est:.0f} GB > --max-mem-gb"
                    elif guess > args.max_run_s:
                        row["skipped"] = f"predicted {guess:.0f} s > --max-run-s"
                    else:
                        run[module] = (model, row)
                    rows.append(row)
                for module, (model, row) in run.items():  # untimed: memory, warm-up
                    row["peak_mb"] = peak_memory_mb(
                        lambda: encoder_run(model, batch, frames, backward))[1]
                times = {module: [] for module in run}
                for _ in range(3):
                    for module, (model, row) in run.items():
                        times[module].append(
                            timed(lambda: encoder_run(model, batch, frames, backward)))
                    if not times or max(t[0] for t in times.values()) > 2.0:
                        break  # long runs: one is enough
                for module, (model, row) in run.items():
                    row["time_s"] = statistics.median(times[module])
                    if batch == 1:
                        history[module].append((frames, row["time_s"]))
                for row in rows[-len(models) :]:
                    print_row(row)
                print(f"  {'':12s} {mode:8s} B={batch} {sec:4d} s  conformer / conmamba time: "
                      f"{time_ratio(rows[-len(models):])}", flush=True)
        del models
    return rows


def bench_checkpointing(args):
    """ConMamba encoder fwd+bwd with and without encoder_gradient_checkpointing."""
    sizes = {k: v for k, v in {"S": SMALL, "L": LARGE}.items() if k in encoder_sizes(args)}
    rows, sec = [], 60
    for size, dims in sizes.items():
        models = {}
        for flag in (False, True):
            torch.manual_seed(0)
            models[flag] = build_encoder(dims, "conmamba")
            if flag:
                models[flag].enable_encoder_gradient_checkpointing()
            encoder_run(models[flag], 1, 50, True)
        for flag, model in models.items():
            frames = sec * ENCODER_FRAMES_PER_SECOND
            peak = peak_memory_mb(lambda: encoder_run(model, 1, frames, True))[1]
            t = timed(lambda: encoder_run(model, 1, frames, True))
            rows.append(
                dict(
                    model=f"conmamba-{size}",
                    checkpointing=flag,
                    seconds=sec,
                    time_s=t,
                    peak_mb=peak,
                )
            )
            mem = "n/a" if peak is None else f"{peak:.0f} MB"
            print(
                f"  conmamba-{size} fwd+bwd {sec} s, gradient checkpointing {flag!s:5s}: "
                f"{t:7.2f} s, peak {mem}",
                flush=True,
            )
    return rows


def time_ratio(pair):
    """'x.xx' = conformer time / conmamba time of two rows of one case, '-' if one is missing."""
    times = {r["model"].split("-")[0]: r["time_s"] for r in pair}
    if times.get("conformer") is None or times.get("conmamba") is None:
        return "-"
    return f"{times['conformer'] / times['conmamba']:.2f}"


def print_row(row):
    t = "skipped: " + row["skipped"] if row["skipped"] else f"{row['time_s']:8.3f} s"
    mem = "" if row["peak_mb"] is None else f"  peak {row['peak_mb']:8.0f} MB"
    print(
        f"  {row['model']:12s} {row['mode']:8s} B={row['batch']} {row['seconds']:4d} s "
        f"({row['frames']:5d} frames): {t}{mem}",
        flush=True,
    )


def encoder_table(rows):
    lines = [
        "",
        "Encoders (CPU): time in s [peak MB]; ratio = conformer time / conmamba time",
        f"{'size':4s} {'mode':8s} {'audio':>9s} {'conformer':>20s} {'conmamba':>20s} {'ratio':>6s}",
    ]
    index = {(r["model"], r["mode"], r["batch"], r["seconds"]): r for r in rows}
    for size in ("S", "L"):
        for mode in ("fwd", "fwd+bwd"):
            keys = sorted(
                {(r["batch"], r["seconds"]) for r in rows if r["model"].endswith(size)},
                key=lambda k: (k[0] != 1, k[1]),
            )
            for batch, sec in keys:
                cells, pair = [], []
                for module in ("conformer", "conmamba"):
                    r = index.get((f"{module}-{size}", mode, batch, sec))
                    if r is None or r["time_s"] is None:
                        cells.append("skipped" if r else "-")
                        continue
                    pair.append(r)
                    mem = "" if r["peak_mb"] is None else f" [{r['peak_mb']:.0f}]"
                    cells.append(f"{r['time_s']:.3f}{mem}")
                ratio = time_ratio(pair)
                audio = f"{batch}x{sec}s"
                lines.append(
                    f"{size:4s} {mode:8s} {audio:>9s} {cells[0]:>20s} {cells[1]:>20s} {ratio:>6s}"
                )
    return "\n".join(lines)


# ---- decoder ------------------------------------------------------------------------------------


def bench_decoder(args):
    torch.manual_seed(0)
    model = TransformerASR(
        tgt_vocab=5000,
        input_size=640,
        d_model=144,
        nhead=4,
        num_encoder_layers=1,
        num_decoder_layers=4,
        d_ffn=1024,
        activation=torch.nn.GELU,
        encoder_module="conmamba",
        decoder_module="mamba",
        attention_type="RelPosMHAXL",
        normalize_before=True,
        causal=False,
        mamba_config=MAMBA_CONFIG,
    ).eval()
    seq_lin = Linear(input_size=144, n_neurons=5000)
    hyps, frames = 10, 10 * ENCODER_FRAMES_PER_SECOND
    memory = torch.randn(hyps, frames, 144)
    enc_len = torch.full((hyps,), frames)
    prefixes = [5, 20, 50, 200] if args.quick else [5, 10, 20, 50, 100, 200]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 5000, (hyps, max(prefixes) + STEPS + 1), generator=g)

    def stateful_steps(state, start, n):
        for t in range(start, start + n):
            pred = model.decode_step(tokens[:, t], state)
            seq_lin(pred).log_softmax(-1)
            state = state.index_select(torch.randperm(hyps, generator=g))
        return state

    with torch.no_grad():
        t = time.perf_counter()
        model.init_decoder_state(memory[:1], enc_len[:1])
        init_s = time.perf_counter() - t
        state = model.init_decoder_state(memory, enc_len)
        rows, done = [], 0
        for p in prefixes:
            state = stateful_steps(state, done, p - done)  # advance to prefix length p
            step_times = []
            for t in range(p, p + STEPS):
                start = time.perf_counter()
                state = stateful_steps(state, t, 1)
                step_times.append(time.perf_counter() - start)
            stateful = statistics.median(step_times)
            done = p + STEPS

            def stateless():
                pred, _ = model.decode(tokens[:, : p + 1], memory, enc_len)
                seq_lin(pred[:, -1:]).log_softmax(-1)

            stateless()
            times = []
            for _ in range(3):
                t = time.perf_counter()
                stateless()
                times.append(time.perf_counter() - t)
            rows.append(
                dict(
                    prefix=p,
                    stateful_ms=1e3 * stateful,
                    stateless_ms=1e3 * statistics.median(times),
                )
            )
            print(
                f"  prefix {p:4d}: stateful {rows[-1]['stateful_ms']:7.2f} ms   "
                f"stateless {rows[-1]['stateless_ms']:8.2f} ms",
                flush=True,
            )
    return rows, init_s


def decoder_table(rows, init_s):
    lines = [
        "",
        f"Mamba decoder beam-search step (S2S small dims, {10} hyps, 250 memory frames)",
        f"stateful: memory scanned once per utterance at the first step ({1e3 * init_s:.1f} ms)",
        f"{'prefix':>6s} {'stateful ms':>12s} {'stateless ms':>13s} {'speed-up':>9s}",
    ]
    for r in rows:
        lines.append(
            f"{r['prefix']:6d} {r['stateful_ms']:12.2f} {r['stateless_ms']:13.2f} "
            f"{r['stateless_ms'] / r['stateful_ms']:9.1f}"
        )
    s = [r["stateful_ms"] for r in rows]
    lines.append(
        f"stateful step time, longest / shortest prefix: {s[-1] / s[0]:.2f} "
        f"(max/min over prefixes {max(s) / min(s):.2f})"
    )
    return "\n".join(lines)


def plot(enc_rows, dec_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["model"] for r in enc_rows):
        for mode, style in (("fwd", "-"), ("fwd+bwd", "--")):
            pts = [
                (r["seconds"], r["time_s"])
                for r in enc_rows
                if r["model"] == name
                and r["mode"] == mode
                and r["batch"] == 1
                and r["time_s"] is not None
            ]
            if pts:
                ax1.plot(*zip(*pts), style, marker="o", label=f"{name} {mode}")
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="audio (s), batch 1",
        ylabel="time (s)",
        title="Encoder time on CPU",
    )
    ax1.legend(fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)
    x = [r["prefix"] for r in dec_rows]
    ax2.plot(x, [r["stateful_ms"] for r in dec_rows], marker="o", label="stateful (caches)")
    ax2.plot(x, [r["stateless_ms"] for r in dec_rows], marker="o", label="stateless (rescan)")
    ax2.set(
        xlabel="prefix length (tokens)",
        ylabel="ms per step (10 hyps)",
        yscale="log",
        title="Mamba decoder beam-search step",
    )
    ax2.legend()
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small encoders, fewer lengths")
    parser.add_argument(
        "--threads", type=positive(int), default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--max-mem-gb",
        type=positive(float),
        default=6.0,
        help="skip rows whose largest activations would exceed this (estimate)",
    )
    parser.add_argument(
        "--max-run-s",
        type=positive(float),
        default=120.0,
        help="skip longer inputs of a model once one run took longer than this",
    )
    parser.add_argument("--sizes", nargs="+", choices=["S", "L"], default=None,
                        help="encoder dims (default: S and L; --quick: S)")
    parser.add_argument("--seconds", type=positive(int), nargs="+", default=None,
                        help="audio lengths at batch 1 (default 10 30 60 120 300)")
    parser.add_argument("--no-batch", action="store_true", help="skip the batch 8 x 10 s rows")
    parser.add_argument("--skip-checkpointing", action="store_true")
    parser.add_argument("--skip-encoders", action="store_true")
    parser.add_argument("--skip-decoder", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/bench/bench_models.png"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from modules.mamba import scan_cpu

    scan = {"0": "pure PyTorch", "1": "compiled (numba)"}.get(
        os.environ.get("MAMBA_SCAN_NUMBA"),
        f"compiled once pure-PyTorch scans reach {scan_cpu.LOAD_AFTER} state updates")
    print(f"CPU scan: {scan if scan_cpu.available() else 'pure PyTorch (numba not installed)'}")
    tuned = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()}, allocator "
        f"{'settings ' + str(tuned) if tuned else 'defaults'}"
    )
    note = busy_machine_note(torch.get_num_threads())
    if note:
        print(note)
    enc_rows = [] if args.skip_encoders else bench_encoders(args)
    ckpt_rows = [] if args.skip_encoders or args.skip_checkpointing else bench_checkpointing(args)
    dec_rows, init_s = ([], 0.0) if args.skip_decoder else bench_decoder(args)
    if enc_rows:
        print(encoder_table(enc_rows))
    if ckpt_rows:
        print("\nGradient checkpointing (ConMamba encoder, fwd+bwd, batch 1 x 60 s)")
        for r in ckpt_rows:
            mem = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f} MB"
            print(
                f"{r['model']:12s} checkpointing {r['checkpointing']!s:5s} {r['time_s']:7.2f} s "
                f"peak {mem}"
            )
    if dec_rows:
        print(decoder_table(dec_rows, init_s))
    print(f"\nload average after: {os.getloadavg()}")
    plot(enc_rows, dec_rows, args.out)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "encoders": enc_rows,
                "checkpointing": ckpt_rows,
                "decoder": dec_rows,
                "decoder_init_s": init_s,
            },
            indent=1,
        )
    )
    print(f"plot: {args.out}, data: {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
