#!/usr/bin/env python3
"""`make demo`: trains a small ConMamba CTC model (hparams/CTC/demo.yaml) on the bundled corpus
on the CPU, reports WER/CER on the corpus's synthetic test split and on real speech (CTC beam
search alone, then with a token 6-gram LM of the corpus' sentence pool without its valid, test
and real sentences, its weight and word score chosen on the valid split), transcribes one file with the
exported model and prints a summary table.

    python demo.py                      # full demo: 7 epochs, ~13 min on 2 CPU cores
    python demo.py --epochs 3           # the time budget knob: ~1.6 min per epoch on 2 cores
    python demo.py --resume             # continue an interrupted run in the same folder
    python demo.py --quick              # smoke run (~1 min): tiny model, few utterances
    python demo.py --streaming          # the causal model (hparams/CTC/demo_streaming.yaml), also
                                        # decoded by StreamingTranscriber in 160 ms pieces

Training runs train_CTC.py in a subprocess (its progress bar and logs go to this terminal);
everything it writes (checkpoints, wer_*.txt / cer_*.txt, inference/) and summary.json land in
--output-folder (default demo_results/). Every option is checked before anything is written.
Without --resume a run starts afresh in a new or empty folder, or replaces a folder of an
earlier demo run: one holding the marker file demo_output.txt that demo.py writes in the folders
it starts (or, from a demo.py older than the marker, a finished run's summary.json,
hyperparams.yaml and train_log.txt), and nothing but what demo.py and train_CTC.py write there.
Any other non-empty folder is refused and left as it is.
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

from recipes import RecipeError, manifest, run_cli
from recipes.hparams import yaml_int
from recipes.run_settings import RECORD

REPO = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(REPO, "data", "mini_corpus")
HPARAMS = os.path.join(REPO, "hparams", "CTC", "demo.yaml")
STREAMING_HPARAMS = os.path.join(REPO, "hparams", "CTC", "demo_streaming.yaml")
STREAM_PIECE_SECONDS = 0.16
SPLITS = ("train", "valid", "test", "real")
TEST_SETS = ("test", "real")  # test_csv of demo.yaml, in this order
# token-LM settings tried on the valid split: weight of the LM's log10 probability, and score
# per word start (> 0 favours more words)
LM_WEIGHTS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0)
WORD_SCORES = (-1.0, 0.0, 1.0)
# --quick: a model that trains in seconds, and utterances per split
QUICK_MODEL = {"d_model": 32, "nhead": 2, "num_encoder_layers": 2, "d_ffn": 64, "d_state": 4,
               "beam_size": 2}
QUICK_UTTERANCES = {"train": 24, "valid": 4, "test": 4, "real": 2}
RATE_LINE = re.compile(r"^%WER ([0-9.]+) \[ (\d+) / (\d+)")
# written in the output folders demo.py starts: a later run (without --resume) may replace them
MARKER = "demo_output.txt"
# what a demo run writes at the top of its output folder (demo.py, train_CTC.py, SpeechBrain),
# besides wer_<set>.txt / cer_<set>.txt; .DS_Store: macOS Finder's
DEMO_NAMES = frozenset({
    MARKER, "summary.json", "hyperparams.yaml", "train_log.txt", "log.txt", "env.log",
    RECORD, "train_CTC.py", "run.py", "save", "inference", "inference_cache",
    "quick_data", "tensorboard", ".DS_Store"})
DEMO_RATE_FILE = re.compile(r"[wc]er_[\w.-]+\.txt")
# a finished run of a demo.py older than MARKER holds these
LEGACY_DEMO_FILES = ("summary.json", "hyperparams.yaml", "train_log.txt")
QUICK_WARMUP_STEPS = 2


class DemoError(RecipeError):
    """Something the user can fix; the message says what."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs over the 4500 bundled utterances (default: demo.yaml's)")
    p.add_argument("--output-folder", default=None,
                   help="default: demo_results/ (demo_streaming_results/ with --streaming); "
                        "a new or empty folder, or one of an earlier demo run (replaced "
                        "unless --resume)")
    p.add_argument("--resume", action="store_true",
                   help="keep the output folder and continue from its last checkpoint "
                        "(default: start afresh)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's choice, one per core)")
    p.add_argument("--device", default="cpu", help="cpu (the demo's target), cuda or mps")
    p.add_argument("--corpus", default=CORPUS,
                   help="folder with train/valid/test/real CSVs, e.g. a bigger corpus made by "
                        "tools/make_corpus.py (default: the bundled data/mini_corpus)")
    p.add_argument("--file", default=None,
                   help="audio file to transcribe at the end (default: the first test utterance)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny model, 1 epoch on a few utterances (for tests)")
    p.add_argument("--streaming", action="store_true",
                   help="train the causal streaming model (hparams/CTC/demo_streaming.yaml) and "
                        "also report its error rates when streamed in 160 ms pieces")
    args = p.parse_args(argv)
    if args.output_folder is None:
        args.output_folder = os.path.join(
            REPO, "demo_streaming_results" if args.streaming else "demo_results")
    args.corpus = os.path.abspath(args.corpus)
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads} (leave it out for one per core)")
    return args


def check_output_folder(out):
    """Raises DemoError when the folder out (absolute) is a file, lies under a file or is not
    writable."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DemoError(f"--output-folder {out} is a file, not a folder: pass another "
                        "--output-folder")
    existing = out
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DemoError(f"--output-folder {out}: {existing} is a file, not a folder: pass "
                        "another --output-folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DemoError(f"--output-folder {out}: no permission to write in {existing}: pass a "
                        "folder you can write to")


def prepare_output_folder(out, resume):
    """Makes the folder out ready for a run. --resume keeps it as it is. Otherwise a run starts
    afresh: out is made (or kept when empty) or, when it is the folder of an earlier demo run,
    emptied; either way it gets MARKER. An earlier demo run's folder holds MARKER, or, from a
    demo.py older than MARKER, LEGACY_DEMO_FILES, and nothing but DEMO_NAMES and wer_/cer_
    files; any other non-empty folder raises DemoError, untouched."""
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and resume:
        return
    if entries:
        foreign = [e for e in entries if e not in DEMO_NAMES and not DEMO_RATE_FILE.fullmatch(e)]
        if MARKER not in entries and not all(f in entries for f in LEGACY_DEMO_FILES):
            what = (f"is not empty and is not the folder of a demo run (it has no {MARKER}, nor "
                    f"the {', '.join(LEGACY_DEMO_FILES)} of a finished run of an older demo.py)")
        elif foreign:
            shown = ", ".join(foreign[:3]) + (f" (and {len(foreign) - 3} more)"
                                              if len(foreign) > 3 else "")
            what = f"holds {shown}, which a demo run does not write"
        else:
            what = None
        if what:
            raise DemoError(f"--output-folder {out} {what}; it was left as it is. Pass another "
                            "--output-folder (new or empty), or --resume to continue a demo run "
                            "there")
        try:  # the folder itself stays (it may be a link, or have its own permissions)
            for entry in entries:
                path = os.path.join(out, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        except OSError as e:
            raise DemoError(f"--output-folder {out}: cannot delete the earlier demo run's "
                            f"{e.filename or out} ({e.strerror or e}): delete that folder "
                            "yourself or pass "
                            "another --output-folder") from e
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, MARKER), "w") as f:
            f.write("Made by demo.py: `python demo.py` (without --resume) with this folder as "
                    "--output-folder replaces everything in it.\n")
    except OSError as e:
        raise DemoError(f"--output-folder {out}: cannot write there ({e}): pass another "
                        "--output-folder") from e


def hparams_value(path, key, top_level=False):
    """The integer value of key in a hparams YAML file (its first `key: <int>` line)."""
    with open(path) as f:
        return yaml_int(f.read(), key, top_level)


def warmup_steps(args, train_rows, out):
    """The learning-rate warm-up of this run (optimizer steps): the recipe's (or --quick's),
    capped at a quarter of the run's fewest possible steps (epochs x the train audio over
    max_batch_length_train seconds), so that short runs (--epochs 1, a small --corpus) have a
    warm-up below their steps, as train_CTC.py requires. --resume takes the one recorded in
    out, so that more --epochs continue the run."""
    hparams = STREAMING_HPARAMS if args.streaming else HPARAMS
    record = os.path.join(out, RECORD)
    if args.resume and os.path.isfile(record):
        try:
            with open(record) as f:
                return int(json.load(f)["n_warmup_steps"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # train_CTC.py says what is wrong with the record
    default = QUICK_WARMUP_STEPS if args.quick else hparams_value(hparams, "n_warmup_steps")
    epochs = args.epochs or (1 if args.quick else hparams_value(hparams, "number_of_epochs"))
    try:
        seconds = sum(float(r["duration"]) for r in train_rows)
    except (KeyError, TypeError, ValueError):
        return default  # train_CTC.py names the bad row
    batches = math.ceil(seconds / hparams_value(hparams, "max_batch_length_train"))
    return min(default, epochs * batches // 4)


def read_rows(split, corpus):
    path = os.path.join(corpus, f"{split}.csv")
    if not os.path.isfile(path):
        hint = ("restore data/mini_corpus from the repository (git checkout data/mini_corpus)"
                if corpus == CORPUS else "make it with tools/make_corpus.py (--real-csv for real), "
                "or pass another --corpus")
        raise DemoError(f"{path} is missing: {hint}")
    return manifest.read_rows(path)


def write_subset(folder, counts, corpus):
    """Writes the first counts[split] rows of each bundled CSV to folder/<split>.csv with
    absolute wav paths; returns {split: csv path}."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for split, n in counts.items():
        rows = read_rows(split, corpus)[:n]
        for row in rows:
            row["wav"] = os.path.join(corpus, row["wav"])
        paths[split] = os.path.join(folder, f"{split}.csv")
        manifest.write_manifest(paths[split], rows)
    return paths


def train_command(args, out, train_rows):
    """The train_CTC.py command line for this demo run; train_rows: the rows it trains on."""
    hparams = STREAMING_HPARAMS if args.streaming else HPARAMS
    cmd = [sys.executable, os.path.join(REPO, "train_CTC.py"), hparams, "--device", args.device,
           "--output_folder", out]
    warmup = warmup_steps(args, train_rows, out)
    if args.quick or warmup != hparams_value(hparams, "n_warmup_steps"):
        cmd += ["--n_warmup_steps", str(warmup)]
    if args.quick:
        csvs = write_subset(os.path.join(out, "quick_data"), QUICK_UTTERANCES, args.corpus)
        cmd += ["--train_csv", csvs["train"], "--valid_csv", csvs["valid"],
                "--test_csv", f"[{csvs['test']}, {csvs['real']}]", "--number_of_epochs",
                str(args.epochs or 1), "--noprogressbar"]
        for key, value in QUICK_MODEL.items():
            cmd += [f"--{key}", str(value)]
    elif args.corpus != CORPUS:
        csv_path = {s: os.path.join(args.corpus, f"{s}.csv") for s in SPLITS}
        cmd += ["--data_folder", args.corpus, "--train_csv", csv_path["train"],
                "--valid_csv", csv_path["valid"],
                "--test_csv", f"[{csv_path['test']}, {csv_path['real']}]"]
    if args.epochs is not None and not args.quick:
        cmd += ["--number_of_epochs", str(args.epochs)]
    return cmd


def read_error_rate(path):
    """(rate in %, errors, reference units) from a wer_*.txt / cer_*.txt file of SpeechBrain."""
    if not os.path.isfile(path):
        raise DemoError(f"{path} was not written: training or testing failed (see the log above "
                        "and train_log.txt in the output folder)")
    with open(path) as f:
        match = RATE_LINE.match(f.readline())
    if not match:
        raise DemoError(f"{path} does not start with a '%WER x [ e / n' line")
    return float(match.group(1)), int(match.group(2)), int(match.group(3))


def try_add_ctc_lm(inference_folder, corpus):
    """Token 6-gram LM of the corpus' sentence pool (sentences.txt, else train.csv) without the
    valid, test and real sentences, in the exported folder; False when flashlight-text (the
    decoder) is not installed."""
    try:
        import flashlight.lib.text  # noqa: F401
    except ImportError:
        print("flashlight-text is not installed (pip install -r requirements-lm.txt): "
              "skipping LM decoding", flush=True)
        return False
    from inference.word_lm import add_ctc_lm

    pool = os.path.join(corpus, "sentences.txt")
    sources = [pool if os.path.isfile(pool) else os.path.join(corpus, "train.csv")]
    held_out = [os.path.join(corpus, f"{split}.csv") for split in ("valid", *TEST_SETS)]
    add_ctc_lm(inference_folder, sources, "token", exclude=held_out)
    return True


class _KeepLogProbs:
    """Stands in for a Transcriber's LM decoder: keeps each batch's CTC log-probabilities, so
    that many LM settings are tried on one encoder pass. Its "transcripts" are keys ("b:i", row
    i of batch b) that transcribe_files returns in file order (it decodes longest first)."""

    def __init__(self):
        self.batches = []

    def __call__(self, log_probs, rel_lengths):
        self.batches.append((log_probs, rel_lengths))
        return [f"{len(self.batches) - 1}:{i}" for i in range(len(log_probs))]

    def transcripts(self, keys, decode):
        """decode's transcripts of the kept batches, in the order of keys."""
        texts = {f"{b}:{i}": text for b, (log_probs, rel) in enumerate(self.batches)
                 for i, text in enumerate(decode(log_probs, rel))}
        unknown = [key for key in keys if key not in texts]
        if unknown:
            raise DemoError(f"{len(unknown)} valid files were cut into chunks (longer than "
                            "the transcriber's chunk_seconds): tune the LM on shorter files")
        return [texts[key] for key in keys]


def tune_lm(asr, inference_folder, valid_rows, corpus):
    """Decodes the valid split with each LM weight and word score (LM_WEIGHTS x WORD_SCORES),
    keeps the setting with the lowest CER (then WER, then the smaller weight), records it in the
    folder and sets it on ``asr``. The valid split is encoded once.

    Returns (weight, word score, {(weight, word score): (WER, CER)})."""
    from inference.word_lm import CTCLMDecoder, write_lm_settings

    kept = asr.word_lm = _KeepLogProbs()
    keys = asr.transcribe_files([os.path.join(corpus, r["wav"]) for r in valid_rows])
    ids = [r["ID"] for r in valid_rows]
    rates = {}
    for weight in LM_WEIGHTS:
        for score in WORD_SCORES:
            decode = CTCLMDecoder(inference_folder, asr.asr.tokenizer,
                                  asr.asr.hparams.blank_index, lm_weight=weight,
                                  word_score=score)
            rates[weight, score] = recipe_error_rates(ids, kept.transcripts(keys, decode),
                                                      valid_rows)
    best = min(rates, key=lambda ws: (rates[ws][1], rates[ws][0], ws[0], abs(ws[1])))
    write_lm_settings(inference_folder, "token", *best)
    asr.word_lm = CTCLMDecoder(inference_folder, asr.asr.tokenizer, asr.asr.hparams.blank_index)
    return best[0], best[1], rates


def oov_rate(rows, train_rows):
    """% of the word tokens of rows that the training transcripts lack."""
    vocab = {w for r in train_rows for w in r["wrd"].split()}
    words = [w for r in rows for w in r["wrd"].split()]
    return 100 * sum(w not in vocab for w in words) / max(1, len(words))


def recipe_error_rates(ids, hyps, rows):
    """(WER, CER) in % of transcripts against CSV rows, as train_CTC.py computes them for its
    test sets (CER over the characters of the words, spaces not counted)."""
    from speechbrain.utils.metric_stats import ErrorRateStats

    wer, cer = ErrorRateStats(), ErrorRateStats(split_tokens=True)
    for stats in (wer, cer):
        stats.append(ids, [h.split() for h in hyps], [r["wrd"].split() for r in rows])
    return wer.summarize("error_rate"), cer.summarize("error_rate")


def error_rates(asr, rows, corpus):
    """(WER, CER) in % of a Transcriber on CSV rows (wav paths relative to corpus)."""
    hyps = asr.transcribe_files([os.path.join(corpus, r["wav"]) for r in rows])
    return recipe_error_rates([r["ID"] for r in rows], hyps, rows)


def streaming_error_rates(inference_folder, rows, corpus, device):
    """(WER, CER) in % of StreamingTranscriber (greedy) fed STREAM_PIECE_SECONDS pieces."""
    from inference.streaming import StreamingTranscriber
    from recipes.audio import load_audio

    asr = StreamingTranscriber.from_folder(
        inference_folder, device=device,
        savedir=os.path.join(os.path.dirname(inference_folder), "inference_cache"))
    piece = round(STREAM_PIECE_SECONDS * asr.sample_rate)
    hyps = []
    for row in rows:
        wav = load_audio(os.path.join(corpus, row["wav"]), asr.sample_rate)
        hyps += [t for _, t, _, final in asr.transcribe_pieces(wav, piece) if final]
    return recipe_error_rates([r["ID"] for r in rows], hyps, rows)


def load_transcriber(inference_folder, device):
    from inference import Transcriber

    return Transcriber.from_folder(inference_folder, device=device,
                                   savedir=os.path.join(os.path.dirname(inference_folder),
                                                        "inference_cache"))



def format_table(summary):
    rows = [("device", summary["device"]),
            ("train utterances", f"{summary['train_utterances']} "
                                 f"({summary['train_hours']:.2f} h), {summary['epochs']} epochs"),
            ("parameters", f"{summary['parameters']:,}"),
            ("train + test time", f"{summary['train_seconds'] / 60:.1f} min"),
            ("total demo time", f"{summary['total_seconds'] / 60:.1f} min")]
    for name in TEST_SETS:
        s = summary[name]
        rows.append((f"{name} ({s['utterances']} utt., {s['oov']:.1f} % OOV)",
                     f"WER {s['WER']:.2f} %   CER {s['CER']:.2f} %   (CTC beam search)"))
        if "word_lm" in s:
            rows.append((f"{name} + token LM", f"WER {s['word_lm']['WER']:.2f} %   "
                         f"CER {s['word_lm']['CER']:.2f} %   (LM weight "
                         f"{summary['lm_weight']}, word score {summary['word_score']}, "
                         "chosen on valid)"))
        if "streaming" in s:
            rows.append((f"{name} streamed", f"WER {s['streaming']['WER']:.2f} %   "
                         f"CER {s['streaming']['CER']:.2f} %   (greedy, "
                         f"{STREAM_PIECE_SECONDS * 1000:.0f} ms pieces)"))
    rows += [("file", summary["file"]), ("reference", summary["reference"]),
             ("transcript", summary["transcript"])]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(str(v)) for _, v in rows))
    body = "\n".join(f"{k:<{width}} | {v}" for k, v in rows)
    return f"{line}\nConMamba CTC demo: summary\n{line}\n{body}\n{line}"


def demo_file(args, test_rows):
    """(path, reference transcript or '') of the file to transcribe; --file must decode."""
    if args.file:
        from recipes.audio import AudioError, check_audio

        if not os.path.isfile(args.file):
            raise DemoError(f"--file {args.file}: no such file")
        try:
            check_audio(args.file)
        except AudioError as e:
            raise DemoError(f"--file: {e}") from e
        return os.path.abspath(args.file), ""
    row = test_rows[0]
    return os.path.join(args.corpus, row["wav"]), row["wrd"]


def run_training(cmd, env):
    """Runs train_CTC.py and returns its exit status. It ignores Ctrl-C (it would print a
    traceback of its own): on Ctrl-C here it is stopped (SIGTERM; its checkpoints are written
    atomically) before the KeyboardInterrupt goes on."""
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by train_CTC.py
    proc = None
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env)
        signal.signal(signal.SIGINT, handler)
        return proc.wait()
    except KeyboardInterrupt:
        if proc is not None:
            proc.terminate()
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGINT, handler)


def training_failed(out, resume=False):
    """The DemoError of a failed train_CTC.py run, naming its log file if it wrote one; after
    --resume, also demo.py's own ways out (train_CTC.py's message names its options)."""
    log = os.path.join(out, "log.txt")
    details = f"; details in {log}" if os.path.isfile(log) else ""
    fix = (". With demo.py: run without --resume to start over in that folder, or pass "
           "--output-folder DIR" if resume else "")
    return DemoError(f"train_CTC.py failed (its error is above{details}){fix}")


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    out = os.path.abspath(args.output_folder)
    # every option is checked before the output folder is touched
    check_output_folder(out)
    rows = {split: read_rows(split, args.corpus) for split in SPLITS}
    # the rows this run trains and tests on: with --quick the first QUICK_UTTERANCES of each
    used = {split: rows[split][:QUICK_UTTERANCES[split]] if args.quick else rows[split]
            for split in SPLITS}
    wav, reference = demo_file(args, rows["test"])
    from recipes.device import resolve_device

    resolve_device(args.device)  # RecipeError for an unknown or unavailable device
    prepare_output_folder(out, args.resume)
    env = dict(os.environ)
    # OpenMP's default (spinning) wait policy: with OMP_WAIT_POLICY=PASSIVE training took 1.8x
    # as long per step on an idle 2-core machine (2.5 vs 4.5 steps/s, data loader worker beside it)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # read by PyTorch in train_CTC.py
        import torch

        torch.set_num_threads(args.threads)  # for the transcription here
    cmd = train_command(args, out, used["train"])
    print("Training:", " ".join(cmd), flush=True)
    t0 = time.time()
    if run_training(cmd, env) != 0:
        raise training_failed(out, args.resume)
    train_seconds = time.time() - t0

    epochs = hparams_value(os.path.join(out, "hyperparams.yaml"), "number_of_epochs",
                           top_level=True)
    inference = os.path.join(out, "inference")
    # then transcribe.py and the Transcriber decode with the token LM by default
    word_lm = try_add_ctc_lm(inference, args.corpus)
    asr = load_transcriber(inference, args.device)  # one load for the file and the test sets
    lm_weight, word_score, valid_lm = (
        tune_lm(asr, inference, used["valid"], args.corpus) if word_lm
        else (None, None, {}))
    transcript = asr.transcribe_files([wav])[0]
    params = sum(p.numel() for p in asr.asr.hparams.model.parameters())  # frozen: count all
    summary = {
        "device": args.device, "epochs": epochs, "train_utterances": len(used["train"]),
        "train_hours": sum(float(r["duration"]) for r in used["train"]) / 3600,
        "parameters": params, "train_seconds": train_seconds,
        "file": os.path.relpath(wav, REPO), "reference": reference, "transcript": transcript,
        "lm_weight": lm_weight, "word_score": word_score,
        "valid_lm": [{"lm_weight": w, "word_score": ws, "WER": r[0], "CER": r[1]}
                     for (w, ws), r in valid_lm.items()],
    }
    for name in TEST_SETS:
        wer, _, _ = read_error_rate(os.path.join(out, f"wer_{name}.txt"))
        cer, _, _ = read_error_rate(os.path.join(out, f"cer_{name}.txt"))
        summary[name] = {"WER": wer, "CER": cer, "utterances": len(used[name]),
                         "oov": oov_rate(used[name], used["train"])}
        if word_lm:
            wer_lm, cer_lm = error_rates(asr, used[name], args.corpus)
            summary[name]["word_lm"] = {"WER": wer_lm, "CER": cer_lm}
        if args.streaming:
            wer_s, cer_s = streaming_error_rates(inference, used[name], args.corpus,
                                                 args.device)
            summary[name]["streaming"] = {"WER": wer_s, "CER": cer_s}
    summary["total_seconds"] = time.time() - start
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_table(summary), flush=True)
    return summary


def interrupted(argv):
    """The line printed on Ctrl-C: how to continue the run."""
    command = shlex.join(["python", "demo.py", *argv] + ([] if "--resume" in argv else
                                                         ["--resume"]))
    return (f"ERROR: interrupted; to continue from the last checkpoint, run the same command "
            f"with --resume: {command}")


if __name__ == "__main__":
    try:
        sys.exit(run_cli(main, sys.argv[1:]))
    except KeyboardInterrupt:
        print("\n" + interrupted(sys.argv[1:]), file=sys.stderr, flush=True)
        sys.exit(130)
