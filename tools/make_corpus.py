#!/usr/bin/env python3
"""Synthesize a small English ASR corpus with espeak-ng (16 kHz mono).

Writes ``{out}/{train,valid,test}.csv`` (header ``ID,duration,wav,spk_id,wrd``, ``wav``
relative to ``out``) and the audio under ``{out}/audio/{split}/``. Sentences are split so
that no sentence occurs in two splits; valid/test sentences are drawn from sentences whose
words (all but ``--max-oov`` of them) occur in the train split. Each utterance gets a random
voice+variant, speed and pitch from a generator seeded by ``--seed``, so a run is
reproducible (audio identical up to the Ogg stream serial numbers). The real recordings of
``--real-csv`` (default: the bundled ones) are copied as an extra ``real`` test set.

Example (the bundled corpus):
    python tools/make_corpus.py --out data/mini_corpus \
        --real-csv ../shared/data/real_speech/real_speech.csv
A bigger corpus:
    python tools/make_corpus.py --out corpus_big --n-train 8000 --max-words 16 --max-oov 1
"""

import argparse
import csv
import random
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SENTENCES = REPO / "data" / "mini_corpus" / "sentences.txt"
DEFAULT_REAL_CSV = REPO / "data" / "mini_corpus" / "real.csv"
VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-us-nyc",
          "en-gb-x-gbcwmd", "en-gb-x-gbclan"]
VARIANTS = [f"m{i}" for i in range(1, 8)] + [f"f{i}" for i in range(1, 6)]
# format name -> (file extension, soundfile format, soundfile subtype)
FORMATS = {"ogg": ("ogg", "OGG", "OPUS"), "flac": ("flac", "FLAC", "PCM_16"),
           "wav": ("wav", "WAV", "PCM_16")}
SPLIT_PREFIX = {"train": "tr", "valid": "va", "test": "te"}
SAMPLE_RATE = 16000
HEADER = ["ID", "duration", "wav", "spk_id", "wrd"]
WORD_RE = re.compile(r"^[A-Z']+$")


def check_tools():
    """Exit with an actionable message if espeak-ng or sox is missing from PATH."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        sys.exit(
            f"error: {' and '.join(missing)} not found on PATH; make_corpus.py needs both.\n"
            "  Debian/Ubuntu: sudo apt-get install espeak-ng sox\n"
            "  macOS:         brew install espeak-ng sox"
        )


def read_sentences(path, min_words, max_words):
    """Unique sentences of ``path`` (upper-case words, letters and apostrophes) within the
    word-count range, in file order. Bad lines raise ValueError naming file and line."""
    seen, out = set(), []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            words = line.split()
            if not words:
                continue
            bad = [w for w in words if not WORD_RE.match(w)]
            if bad:
                raise ValueError(
                    f"{path}:{lineno}: word {bad[0]!r} is not upper-case letters/apostrophes; "
                    "normalise the sentence file (one upper-case sentence per line)")
            sentence = " ".join(words)
            if min_words <= len(words) <= max_words and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


def split_sentences(sentences, n_train, n_valid, n_test, max_oov, rng):
    """Shuffle and split into disjoint train/valid/test sentence lists.

    Train takes the first ``n_train`` shuffled sentences; valid and test take, in order, the
    remaining sentences with at most ``max_oov`` words unseen in train.
    """
    pool = list(sentences)
    rng.shuffle(pool)
    train = pool[:n_train]
    if len(train) < n_train:
        raise ValueError(f"only {len(pool)} sentences in the word range, --n-train is {n_train}")
    vocab = {w for s in train for w in s.split()}
    held_out = [s for s in pool[n_train:] if sum(w not in vocab for w in s.split()) <= max_oov]
    if len(held_out) < n_valid + n_test:
        raise ValueError(
            f"only {len(held_out)} held-out sentences have <= {max_oov} out-of-vocabulary words, "
            f"need {n_valid + n_test}; lower --n-train/--n-valid/--n-test or raise --max-oov")
    return {"train": train, "valid": held_out[:n_valid],
            "test": held_out[n_valid:n_valid + n_test]}


def plan_utterances(splits, voices, variants, speed, pitch, rng):
    """One job dict per utterance: ID, split, text, voice, speed, pitch (all drawn here, in
    one process, so the corpus does not depend on the number of workers)."""
    jobs = []
    for split, sentences in splits.items():
        for i, text in enumerate(sentences, 1):
            jobs.append({
                "ID": f"{SPLIT_PREFIX[split]}_{i:05d}", "split": split, "wrd": text,
                "voice": f"{rng.choice(voices)}+{rng.choice(variants)}",
                "speed": rng.randint(*speed), "pitch": rng.randint(*pitch)})
    return jobs


def trim_silence(audio, sr, threshold=0.01, lead=0.05, tail=0.15):
    """Cut espeak-ng's leading/trailing silence (it ends each utterance with ~0.3 s),
    keeping ``lead``/``tail`` seconds around the samples above ``threshold`` * peak."""
    loud = np.flatnonzero(np.abs(audio) > threshold * np.abs(audio).max())
    if loud.size == 0:
        return audio
    start = max(0, loud[0] - int(lead * sr))
    return audio[start:loud[-1] + int(tail * sr)]


def synthesize(job, out_dir, fmt, opus_level, tmp_dir):
    """Speak ``job['wrd']`` with espeak-ng, resample to 16 kHz mono with sox, trim and write
    ``out_dir/audio/{split}/{ID}.{ext}``. Returns the CSV row."""
    ext, sf_format, subtype = FORMATS[fmt]
    raw = Path(tmp_dir) / f"{job['ID']}_22k.wav"
    resampled = Path(tmp_dir) / f"{job['ID']}_16k.wav"
    # Lower case: espeak-ng spells out some all-capital words letter by letter.
    run(["espeak-ng", "-v", job["voice"], "-s", str(job["speed"]), "-p", str(job["pitch"]),
          "-w", str(raw), job["wrd"].lower()])
    # -D: no dither, so the output (and the trimmed duration) is the same on every run.
    run(["sox", "-D", "-G", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16",
         str(resampled)])
    audio, sr = sf.read(resampled, dtype="float32")
    raw.unlink()
    resampled.unlink()
    rel = Path("audio") / job["split"] / f"{job['ID']}.{ext}"
    extra = {"compression_level": opus_level} if subtype == "OPUS" else {}
    sf.write(out_dir / rel, trim_silence(audio, sr), sr, format=sf_format, subtype=subtype, **extra)
    info = sf.info(out_dir / rel)
    return {"ID": job["ID"], "duration": f"{info.frames / info.samplerate:.3f}",
            "wav": rel.as_posix(), "spk_id": job["voice"], "wrd": job["wrd"]}


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")


def copy_real(real_csv, out_dir):
    """Copy the recordings listed in ``real_csv`` (``wav`` relative to the CSV's folder) to
    ``out_dir/audio/real/`` and return their rows (duration read from the files)."""
    real_csv = Path(real_csv)
    dest = out_dir / "audio" / "real"
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(real_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            src = real_csv.parent / row["wav"]
            target = dest / src.name
            if src.resolve() != target.resolve():
                shutil.copyfile(src, target)
            info = sf.info(target)
            if info.samplerate != SAMPLE_RATE or info.channels != 1:
                raise ValueError(f"{src}: need 16 kHz mono, got {info.samplerate} Hz, "
                                 f"{info.channels} channels")
            rows.append({"ID": row["ID"], "duration": f"{info.frames / info.samplerate:.3f}",
                         "wav": target.relative_to(out_dir).as_posix(),
                         "spk_id": row["spk_id"], "wrd": row["wrd"].upper()})
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)


def summarize(out_dir, rows_by_split):
    """Print utterances, hours, MB and bytes per second of audio per split; test OOV rate."""
    vocab = {w for r in rows_by_split.get("train", []) for w in r["wrd"].split()}
    print(f"{'split':6} {'utts':>6} {'hours':>6} {'MB':>6} {'bytes/s':>8} {'OOV%':>6}")
    for split, rows in rows_by_split.items():
        seconds = sum(float(r["duration"]) for r in rows)
        size = sum((out_dir / r["wav"]).stat().st_size for r in rows)
        words = [w for r in rows for w in r["wrd"].split()]
        oov = 100 * sum(w not in vocab for w in words) / max(1, len(words))
        print(f"{split:6} {len(rows):6d} {seconds / 3600:6.3f} {size / 1e6:6.2f} "
              f"{size / max(seconds, 1e-9):8.0f} {oov:6.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--sentences", type=Path, default=DEFAULT_SENTENCES,
                   help="one upper-case sentence per line (default: the bundled list)")
    p.add_argument("--n-train", type=int, default=2150)
    p.add_argument("--n-valid", type=int, default=120)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--format", choices=sorted(FORMATS), default="ogg",
                   help="ogg = Opus in Ogg (~2.9 kB/s), flac (~19 kB/s), wav (32 kB/s)")
    p.add_argument("--opus-level", type=float, default=0.94,
                   help="libsndfile Opus compression level in [0, 1] (higher = smaller file); "
                        "0.94 is ~22 kbit/s")
    p.add_argument("--min-words", type=int, default=4)
    p.add_argument("--max-words", type=int, default=12)
    p.add_argument("--max-oov", type=int, default=0,
                   help="max words per valid/test sentence that train lacks")
    p.add_argument("--voices", default=",".join(VOICES), help="comma-separated espeak-ng voices")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated espeak-ng variants (+m1.. +f1..)")
    p.add_argument("--speed", type=int, nargs=2, default=(150, 195), metavar=("MIN", "MAX"),
                   help="words per minute range")
    p.add_argument("--pitch", type=int, nargs=2, default=(25, 75), metavar=("MIN", "MAX"))
    p.add_argument("--real-csv", type=Path, default=DEFAULT_REAL_CSV,
                   help="CSV of real 16 kHz recordings (wav relative to it) copied as the "
                        "'real' test set (default: the bundled one)")
    p.add_argument("--no-real", action="store_true", help="do not add a 'real' test set")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing train/valid/test audio in --out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_tools()
    from tqdm import tqdm

    if not args.sentences.exists():
        sys.exit(f"error: sentence file {args.sentences} not found; pass --sentences FILE")
    if not args.no_real and not args.real_csv.exists():
        sys.exit(f"error: {args.real_csv} not found; pass --real-csv FILE or --no-real")
    out = args.out
    if not args.overwrite and any((out / "audio" / split).exists() for split in SPLIT_PREFIX):
        sys.exit(f"error: {out / 'audio'} already holds a corpus; pass --overwrite or a new --out")
    rng = random.Random(args.seed)
    try:
        sentences = read_sentences(args.sentences, args.min_words, args.max_words)
        splits = split_sentences(sentences, args.n_train, args.n_valid, args.n_test,
                                 args.max_oov, rng)
    except ValueError as e:
        sys.exit(f"error: {e}")
    jobs = plan_utterances(splits, args.voices.split(","), args.variants.split(","),
                           args.speed, args.pitch, rng)

    for split in SPLIT_PREFIX:
        shutil.rmtree(out / "audio" / split, ignore_errors=True)
        (out / "audio" / split).mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.workers) as pool:
        work = partial(synthesize, out_dir=out, fmt=args.format, opus_level=args.opus_level,
                       tmp_dir=tmp)
        results = pool.map(work, jobs)
        rows = list(tqdm(results, total=len(jobs), desc="synthesizing", unit="utt"))

    rows_by_split = {split: [r for r in rows if r["ID"].startswith(prefix + "_")]
                     for split, prefix in SPLIT_PREFIX.items()}
    if not args.no_real:
        try:
            rows_by_split["real"] = copy_real(args.real_csv, out)
        except ValueError as e:
            sys.exit(f"error: {e}")
    for split, split_rows in rows_by_split.items():
        write_csv(out / f"{split}.csv", split_rows)
    summarize(out, rows_by_split)


if __name__ == "__main__":
    main()
