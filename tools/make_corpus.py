#!/usr/bin/env python3
"""Synthesize a small English ASR corpus with espeak-ng, flite and festival (16 kHz mono).

Writes ``{out}/{train,valid,test}.csv`` (header ``ID,duration,wav,spk_id,wrd``, ``wav``
relative to ``out``) and the audio under ``{out}/audio/{split}/``. Sentences are split so that
no sentence occurs in two splits. Valid and test sentences are new sentences whose words mostly
occur in train: each has at most ``--max-oov`` words that train lacks, and they are drawn so
that the share of such word tokens is about ``--oov-rate`` (a few percent, as in real use).
Each utterance gets a random engine, voice, speed, pitch and mild augmentation (tempo, pitch
shift, reverberation, background noise) from a generator seeded by ``--seed``, so a run is
reproducible (audio identical up to the Ogg stream serial numbers). The real recordings of
``--real-csv`` (default: the bundled ones) are copied as an extra ``real`` test set.

Engines (``--engines``; Debian packages in brackets):
- espeak: espeak-ng formant voices, 8 English accents x 12 variants [espeak-ng]
- flite: CMU Flite voices built from recordings of real speakers: awb, rms, slt, kal16 [flite]
- festival: festival's kal_diphone and the HTS voice cmu_us_slt_arctic_hts
  [festival festvox-kallpc16k festvox-us-slt-hts]
sox does the resampling and the effects [sox].

Example (the bundled corpus):
    python -m tools.make_corpus --out data/mini_corpus --overwrite
A bigger corpus:
    python -m tools.make_corpus --out corpus_big --n-train 8000 --max-words 16
"""

import argparse
import csv
import io
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
ESPEAK_VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-us-nyc",
                 "en-gb-x-gbcwmd", "en-gb-x-gbclan"]
ESPEAK_VARIANTS = [f"m{i}" for i in range(1, 8)] + [f"f{i}" for i in range(1, 6)]
FLITE_VOICES = ["awb", "rms", "slt", "kal16"]
FESTIVAL_VOICES = ["kal_diphone", "cmu_us_slt_arctic_hts"]
# engine -> (programs it runs, install hint)
ENGINES = {
    "espeak": (["espeak-ng"], "apt-get install espeak-ng (macOS: brew install espeak-ng)"),
    "flite": (["flite"], "apt-get install flite (macOS: brew install flite)"),
    "festival": (["text2wave"],
                 "apt-get install festival festvox-kallpc16k festvox-us-slt-hts"),
}
DEFAULT_ENGINE_WEIGHTS = "espeak:0.5,flite:0.35,festival:0.15"
# format name -> (file extension, soundfile format, soundfile subtype)
FORMATS = {"ogg": ("ogg", "OGG", "OPUS"), "flac": ("flac", "FLAC", "PCM_16"),
           "wav": ("wav", "WAV", "PCM_16")}
SPLIT_PREFIX = {"train": "tr", "valid": "va", "test": "te"}
SAMPLE_RATE = 16000
HEADER = ["ID", "duration", "wav", "spk_id", "wrd"]
STAGING = ".make_corpus_new"  # folder in --out where a run builds the new corpus
WORD_RE = re.compile(r"^[A-Z']+$")


class CorpusError(Exception):
    """A missing tool or voice, or options that cannot be satisfied; the message says what to do."""


def parse_engine_weights(text):
    """'espeak:0.5,flite:0.5' -> {'espeak': 0.5, 'flite': 0.5} (weights need not sum to 1)."""
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition(":")
        name = name.strip()
        if name not in ENGINES:
            raise CorpusError(f"--engines: unknown engine {name!r}; choose from "
                              f"{', '.join(ENGINES)} (e.g. {DEFAULT_ENGINE_WEIGHTS})")
        try:
            weights[name] = float(value) if value else 1.0
        except ValueError:
            raise CorpusError(f"--engines: weight of {name} must be a number, got {value!r}")
    if not weights or sum(weights.values()) <= 0:
        raise CorpusError("--engines: give at least one engine with a positive weight")
    return weights


def check_tools(engines, which=shutil.which):
    """Raise CorpusError naming every missing program of the requested engines (and sox) with
    the command that installs it."""
    missing = [] if which("sox") else [("sox", "apt-get install sox (macOS: brew install sox)")]
    for engine in engines:
        programs, hint = ENGINES[engine]
        missing += [(f"{prog} (engine {engine})", hint) for prog in programs if not which(prog)]
    if missing:
        raise CorpusError("missing on PATH: " + "; ".join(
            f"{name}: {hint}" for name, hint in missing))


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


def split_sentences(sentences, n_train, n_valid, n_test, max_oov, rng, oov_rate=0.0):
    """Shuffle and split into disjoint train/valid/test sentence lists.

    Train takes the first ``n_train`` shuffled sentences. Valid, then test, take remaining
    sentences with at most ``max_oov`` words unseen in train: a sentence with unseen words is
    taken while the split's share of unseen word tokens is below ``oov_rate``, one without
    while it is not, so each held-out split ends near ``oov_rate``. A ValueError says which
    kind of sentence ran out and which options give more of it.
    """
    pool = list(sentences)
    rng.shuffle(pool)
    train = pool[:n_train]
    if len(train) < n_train:
        raise ValueError(f"only {len(pool)} sentences in the word range, --n-train is {n_train}")
    if len(pool) - n_train < n_valid + n_test:
        raise ValueError(f"only {len(pool) - n_train} sentences in the word range are left after "
                         f"--n-train {n_train}, --n-valid and --n-test need {n_valid + n_test}: "
                         "lower --n-train, --n-valid or --n-test, or give more sentences "
                         "(--sentences, --min-words/--max-words)")
    vocab = {w for s in train for w in s.split()}
    candidates = [(s, sum(w not in vocab for w in s.split())) for s in pool[n_train:]]
    candidates = [(s, oov) for s, oov in candidates if oov <= max_oov]
    used, held = set(), {}
    for split, count in (("valid", n_valid), ("test", n_test)):
        chosen, tokens, unseen = [], 0, 0
        for sentence, oov in candidates:
            if len(chosen) == count:
                break
            if sentence in used or (oov > 0) != (unseen < oov_rate * max(tokens, 1)):
                continue
            chosen.append(sentence)
            used.add(sentence)
            tokens += len(sentence.split())
            unseen += oov
        if len(chosen) < count:
            if unseen < oov_rate * max(tokens, 1):  # it needed sentences with unseen words
                short = (f"sentences with 1 to {max_oov} words that train lacks, to reach the "
                         f"OOV rate of {oov_rate:.1%}")
                advice = ("raise --max-oov, lower --oov-rate, or lower --n-train (more "
                          "sentences left out of train)")
            else:  # a small train set has a small vocabulary; a big one leaves few sentences
                short = "sentences whose words all occur in train"
                advice = ("raise --n-train (a bigger training vocabulary) or --oov-rate"
                          if len(pool) - n_train > n_train else
                          "lower --n-train (more sentences left out of train) or give more "
                          "sentences (--sentences, --max-words)")
            raise ValueError(
                f"only {len(chosen)} held-out sentences for {split}, need {count}: too few "
                f"{short} among the {len(pool) - n_train} sentences left after --n-train "
                f"{n_train}; {advice}, or lower --n-valid/--n-test")
        held[split] = chosen
    return {"train": train, **held}


def plan_utterances(splits, engine_weights, speed, pitch, rng, noise_prob=0.0, reverb_prob=0.0):
    """One job dict per utterance: ID, split, text, engine, voice, speaking rate and pitch, and
    augmentation (sox tempo factor and pitch shift for flite/festival, reverberance, noise SNR
    and seed). Everything is drawn here, in one process, so the corpus does not depend on the
    number of workers."""
    engines = list(engine_weights)
    weights = [engine_weights[e] for e in engines]
    jobs = []
    for split, sentences in splits.items():
        for i, text in enumerate(sentences, 1):
            engine = rng.choices(engines, weights)[0]
            job = {"ID": f"{SPLIT_PREFIX[split]}_{i:05d}", "split": split, "wrd": text,
                   "engine": engine, "tempo": 1.0, "cents": 0, "speed": None, "pitch": None}
            if engine == "espeak":
                job["voice"] = f"{rng.choice(ESPEAK_VOICES)}+{rng.choice(ESPEAK_VARIANTS)}"
                job["speed"], job["pitch"] = rng.randint(*speed), rng.randint(*pitch)
            else:  # voices of real speakers: vary them with sox instead
                job["voice"] = rng.choice(FLITE_VOICES if engine == "flite" else FESTIVAL_VOICES)
                job["tempo"] = round(rng.uniform(0.88, 1.15), 3)
                job["cents"] = rng.randint(-250, 250)
            job["reverb"] = rng.randint(10, 50) if rng.random() < reverb_prob else 0
            job["snr_db"] = round(rng.uniform(15, 35), 1) if rng.random() < noise_prob else None
            job["noise_seed"] = rng.randrange(2 ** 31)
            jobs.append(job)
    return jobs


def speak_command(job, raw, text_file):
    """The engine's command writing ``job['wrd']`` to the WAV file ``raw``. Lower case: the
    engines spell some all-capital words letter by letter."""
    text = job["wrd"].lower()
    if job["engine"] == "espeak":
        return ["espeak-ng", "-v", job["voice"], "-s", str(job["speed"]), "-p",
                str(job["pitch"]), "-w", str(raw), text]
    if job["engine"] == "flite":
        return ["flite", "-voice", job["voice"], "-t", text, "-o", str(raw)]
    Path(text_file).write_text(text + "\n")
    return ["text2wave", "-eval", f"(voice_{job['voice']})", str(text_file), "-o", str(raw)]


def sox_effects(job):
    """sox effects of the job's augmentation, applied before resampling to 16 kHz."""
    effects = []
    if job["tempo"] != 1.0:
        effects += ["tempo", "-s", str(job["tempo"])]
    if job["cents"]:
        effects += ["pitch", str(job["cents"])]
    if job["reverb"]:
        effects += ["reverb", str(job["reverb"]), "50", "40"]
    return effects


def add_noise(audio, snr_db, seed):
    """audio + white noise at ``snr_db`` dB below the speech power (same length, float32),
    scaled down if the sum would clip."""
    rng = np.random.default_rng(seed)
    power = float(np.mean(audio ** 2)) or 1e-10
    noisy = audio + rng.standard_normal(audio.shape).astype(np.float32) * np.sqrt(
        power / 10 ** (snr_db / 10))
    peak = np.abs(noisy).max()
    return (noisy / peak * 0.99 if peak > 0.99 else noisy).astype(np.float32)


def probe_voices(engine_weights, tmp_dir):
    """Synthesizes one word with every voice of the requested engines; raises CorpusError
    naming the voices that do not work and how to install them."""
    broken = []
    for engine in engine_weights:
        voices = {"espeak": ESPEAK_VOICES, "flite": FLITE_VOICES,
                  "festival": FESTIVAL_VOICES}[engine]
        for voice in voices:
            job = {"engine": engine, "voice": voice, "wrd": "HELLO", "speed": 170, "pitch": 50}
            raw = Path(tmp_dir) / "probe.wav"
            result = subprocess.run(speak_command(job, raw, Path(tmp_dir) / "probe.txt"),
                                    capture_output=True, text=True)
            if result.returncode != 0 or not raw.is_file() or raw.stat().st_size < 1000:
                broken.append(f"{engine} voice {voice}")
            raw.unlink(missing_ok=True)
    if broken:
        hints = {ENGINES[e][1] for e in engine_weights if any(b.startswith(e) for b in broken)}
        raise CorpusError(f"these voices do not synthesize: {', '.join(broken)}; install them "
                          f"({'; '.join(sorted(hints))}) or leave their engine out of --engines")


def trim_silence(audio, sr, threshold=0.01, lead=0.05, tail=0.15):
    """Cut the engines' leading/trailing silence (espeak-ng ends each utterance with ~0.3 s),
    keeping ``lead``/``tail`` seconds around the samples above ``threshold`` * peak."""
    loud = np.flatnonzero(np.abs(audio) > threshold * np.abs(audio).max())
    if loud.size == 0:
        return audio
    start = max(0, loud[0] - int(lead * sr))
    return audio[start:loud[-1] + int(tail * sr)]


def synthesize(job, out_dir, fmt, opus_level, tmp_dir):
    """Speak ``job['wrd']`` with the job's engine, apply its sox effects, resample to 16 kHz
    mono, trim, add its noise and write ``out_dir/audio/{split}/{ID}.{ext}``. Returns the CSV
    row."""
    ext, sf_format, subtype = FORMATS[fmt]
    raw = Path(tmp_dir) / f"{job['ID']}_raw.wav"
    resampled = Path(tmp_dir) / f"{job['ID']}_16k.wav"
    text_file = Path(tmp_dir) / f"{job['ID']}.txt"
    run(speak_command(job, raw, text_file))
    # -D: no dither, so the output (and the trimmed duration) is the same on every run.
    run(["sox", "-D", "-G", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16",
         str(resampled), *sox_effects(job)])
    audio, sr = sf.read(resampled, dtype="float32")
    for path in (raw, resampled, text_file):
        path.unlink(missing_ok=True)
    audio = trim_silence(audio, sr)
    if job["snr_db"] is not None:
        audio = add_noise(audio, job["snr_db"], job["noise_seed"])
    rel = Path("audio") / job["split"] / f"{job['ID']}.{ext}"
    extra = {"compression_level": opus_level} if subtype == "OPUS" else {}
    encoded = io.BytesIO()
    sf.write(encoded, audio, sr, format=sf_format, subtype=subtype, **extra)
    data = encoded.getvalue()
    (out_dir / rel).write_bytes(strip_opus_tags_padding(data) if subtype == "OPUS" else data)
    info = sf.info(out_dir / rel)
    return {"ID": job["ID"], "duration": f"{info.frames / info.samplerate:.3f}",
            "wav": rel.as_posix(), "spk_id": f"{job['engine']}:{job['voice']}",
            "wrd": job["wrd"]}


def _ogg_crc(data):
    """The Ogg page checksum: CRC-32, polynomial 0x04C11DB7, no reflection, initial value 0."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else crc << 1
    return crc


def strip_opus_tags_padding(data):
    """An Ogg Opus file's bytes without the zero padding that libsndfile appends to the OpusTags
    header (~0.75 kB per file, a sixth of a 3 s utterance at 14 kbit/s): the page that holds the
    tags packet is rewritten with the packet cut after its last comment (padding is optional in
    RFC 7845) and its checksum recomputed. Audio pages are untouched, so the decoded samples are
    the same. Bytes of any other layout are returned unchanged."""
    def page_at(pos):
        if data[pos:pos + 4] != b"OggS" or len(data) < pos + 27:
            return None
        n_segs = data[pos + 26]
        lacing = data[pos + 27:pos + 27 + n_segs]
        body = pos + 27 + n_segs
        return n_segs, lacing, body, body + sum(lacing)

    first = page_at(0)
    if first is None or data[first[2]:first[2] + 8] != b"OpusHead":
        return data
    start = first[3]
    second = page_at(start)
    if second is None:
        return data
    n_segs, lacing, body, end = second
    packet = data[body:end]
    # one whole packet on the page (its last lacing value < 255), not continued
    if not packet.startswith(b"OpusTags") or lacing[-1] == 255 or data[start + 5] & 1:
        return data
    pos = 8
    vendor = int.from_bytes(packet[pos:pos + 4], "little")
    pos += 4 + vendor
    count = int.from_bytes(packet[pos:pos + 4], "little")
    pos += 4
    for _ in range(count):
        pos += 4 + int.from_bytes(packet[pos:pos + 4], "little")
    if pos > len(packet) or any(packet[pos:]):  # malformed, or data after the comments
        return data
    packet = packet[:pos]
    new_lacing = bytes([255] * (len(packet) // 255) + [len(packet) % 255])
    header = bytearray(data[start:start + 27])
    header[22:26] = b"\0\0\0\0"
    header[26] = len(new_lacing)
    page = bytearray(header + new_lacing + packet)
    page[22:26] = _ogg_crc(page).to_bytes(4, "little")
    return data[:start] + bytes(page) + data[end:]


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CorpusError(f"{' '.join(cmd)} failed ({result.returncode}): "
                          f"{result.stderr.strip()}")


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
            if not src.is_file():
                raise CorpusError(f"{real_csv}: recording {src} (row {row['ID']}) not found; fix "
                                  "the CSV, or pass --no-real")
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
    """Print utterances, hours, MB, bytes per second of audio and the share of word tokens
    that train lacks, per split, and the utterances per engine."""
    vocab = {w for r in rows_by_split.get("train", []) for w in r["wrd"].split()}
    print(f"{'split':6} {'utts':>6} {'hours':>6} {'MB':>6} {'bytes/s':>8} {'OOV%':>6}")
    for split, rows in rows_by_split.items():
        seconds = sum(float(r["duration"]) for r in rows)
        size = sum((out_dir / r["wav"]).stat().st_size for r in rows)
        words = [w for r in rows for w in r["wrd"].split()]
        oov = 100 * sum(w not in vocab for w in words) / max(1, len(words))
        print(f"{split:6} {len(rows):6d} {seconds / 3600:6.3f} {size / 1e6:6.2f} "
              f"{size / max(seconds, 1e-9):8.0f} {oov:6.2f}")
    engines = {}
    for rows in rows_by_split.values():
        for r in rows:
            engine = r["spk_id"].split(":")[0] if ":" in r["spk_id"] else "real"
            engines[engine] = engines.get(engine, 0) + 1
    print("utterances per engine: " + ", ".join(f"{k} {v}" for k, v in sorted(engines.items())))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--sentences", type=Path, default=DEFAULT_SENTENCES,
                   help="one upper-case sentence per line (default: the bundled list)")
    p.add_argument("--n-train", type=int, default=4500)
    p.add_argument("--n-valid", type=int, default=120)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--engines", default=DEFAULT_ENGINE_WEIGHTS,
                   help="engine:weight list; each utterance picks an engine with these odds")
    p.add_argument("--format", choices=sorted(FORMATS), default="ogg",
                   help="ogg = Opus in Ogg (~1.4 kB/s at the default level), flac (~19 kB/s), "
                        "wav (32 kB/s)")
    p.add_argument("--opus-level", type=float, default=0.98,
                   help="libsndfile Opus compression level in [0, 1] (higher = smaller file); "
                        "0.98 is ~13 kbit/s; above ~0.985 libopus cuts the band to 4 kHz")
    p.add_argument("--min-words", type=int, default=4)
    p.add_argument("--max-words", type=int, default=12)
    p.add_argument("--max-oov", type=int, default=2,
                   help="max words per valid/test sentence that train lacks")
    p.add_argument("--oov-rate", type=float, default=0.03,
                   help="share of valid/test word tokens that train lacks, a fraction in "
                        "[0, 1] (default 0.03: 3 %%; 0: none)")
    p.add_argument("--speed", type=int, nargs=2, default=(150, 195), metavar=("MIN", "MAX"),
                   help="espeak-ng words per minute range")
    p.add_argument("--pitch", type=int, nargs=2, default=(25, 75), metavar=("MIN", "MAX"),
                   help="espeak-ng pitch range")
    p.add_argument("--noise-prob", type=float, default=0.4,
                   help="share of utterances with white noise at 15-35 dB SNR, a fraction "
                        "in [0, 1]")
    p.add_argument("--reverb-prob", type=float, default=0.3,
                   help="share of utterances with sox reverberation, a fraction in [0, 1]")
    p.add_argument("--real-csv", type=Path, default=DEFAULT_REAL_CSV,
                   help="CSV of real 16 kHz recordings (wav relative to it) copied as the "
                        "'real' test set (default: the bundled one)")
    p.add_argument("--no-real", action="store_true", help="do not add a 'real' test set")
    p.add_argument("--workers", type=int, default=2, help="synthesis threads (>= 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing train/valid/test audio in --out")
    return p.parse_args(argv)


def check_options(args):
    """Raises CorpusError naming the first option with a value that cannot work (before any
    file is read or written)."""
    counts = {"--n-train": (args.n_train, 1), "--n-valid": (args.n_valid, 0),
              "--n-test": (args.n_test, 0), "--min-words": (args.min_words, 1),
              "--max-oov": (args.max_oov, 0), "--workers": (args.workers, 1)}
    for option, (value, least) in counts.items():
        if value < least:
            raise CorpusError(f"{option} must be >= {least}, got {value}")
    if args.min_words > args.max_words:
        raise CorpusError(f"--min-words {args.min_words} is above --max-words {args.max_words}")
    for option, value in (("--oov-rate", args.oov_rate), ("--noise-prob", args.noise_prob),
                          ("--reverb-prob", args.reverb_prob), ("--opus-level", args.opus_level)):
        if not 0 <= value <= 1:
            hint = (" (a fraction: 0.03 for 3 %)" if option != "--opus-level" else
                    " (libsndfile's Opus compression level; default 0.98)")
            raise CorpusError(f"{option} must be in [0, 1]{hint}, got {value}")
    if args.oov_rate > 0 and args.max_oov == 0:
        raise CorpusError(f"--oov-rate {args.oov_rate} needs held-out sentences with words train "
                          "lacks: raise --max-oov above 0, or pass --oov-rate 0")
    for option, (low, high), limits in (("--speed", args.speed, (80, 450)),
                                        ("--pitch", args.pitch, (0, 99))):
        if not limits[0] <= low <= high <= limits[1]:
            raise CorpusError(f"{option} {low} {high}: need MIN <= MAX, both within espeak-ng's "
                              f"{limits[0]}-{limits[1]}")


def main(argv=None):
    args = parse_args(argv)
    try:
        make_corpus(args)
    except (CorpusError, ValueError) as e:
        sys.exit(f"ERROR: {e}")


def make_corpus(args):
    check_options(args)
    engine_weights = parse_engine_weights(args.engines)
    check_tools(engine_weights)
    from tqdm import tqdm

    if not args.sentences.exists():
        raise CorpusError(f"sentence file {args.sentences} not found; pass --sentences FILE")
    if not args.no_real and not args.real_csv.exists():
        raise CorpusError(f"{args.real_csv} not found; pass --real-csv FILE or --no-real")
    out = args.out
    if not args.overwrite and any((out / "audio" / split).exists() for split in SPLIT_PREFIX):
        raise CorpusError(f"{out / 'audio'} already holds a corpus; pass --overwrite or a new "
                          "--out")
    rng = random.Random(args.seed)
    sentences = read_sentences(args.sentences, args.min_words, args.max_words)
    splits = split_sentences(sentences, args.n_train, args.n_valid, args.n_test, args.max_oov,
                             rng, oov_rate=args.oov_rate)
    jobs = plan_utterances(splits, engine_weights, args.speed, args.pitch, rng,
                           noise_prob=args.noise_prob, reverb_prob=args.reverb_prob)
    staging = out / STAGING  # the new corpus, moved into place once it is complete
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            probe_voices(engine_weights, tmp)
            rows_by_split = {}
            for split in SPLIT_PREFIX:
                (staging / "audio" / split).mkdir(parents=True)
            with ThreadPoolExecutor(args.workers) as pool:
                work = partial(synthesize, out_dir=staging, fmt=args.format,
                               opus_level=args.opus_level, tmp_dir=tmp)
                rows = list(tqdm(pool.map(work, jobs), total=len(jobs), desc="synthesizing",
                                 unit="utt"))
        for split, prefix in SPLIT_PREFIX.items():
            rows_by_split[split] = [r for r in rows if r["ID"].startswith(prefix + "_")]
        if not args.no_real:
            rows_by_split["real"] = copy_real(args.real_csv, staging)
        for split, split_rows in rows_by_split.items():
            write_csv(staging / f"{split}.csv", split_rows)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, (CorpusError, ValueError)):
            raise CorpusError(f"{e}\nNothing in {out} was changed.") from e
        raise
    replace_splits(staging, out, list(rows_by_split))
    summarize(out, rows_by_split)


def replace_splits(staging, out, splits):
    """Move each split's CSV and audio folder from ``staging`` into ``out`` (replacing the old
    ones), then remove ``staging``; other files in ``out`` are left alone."""
    old = staging / "old"
    old.mkdir()
    for split in splits:
        for name in (f"{split}.csv", f"audio/{split}"):
            target = out / name
            if target.exists():
                (old / name).parent.mkdir(parents=True, exist_ok=True)
                target.rename(old / name)
            target.parent.mkdir(parents=True, exist_ok=True)
            (staging / name).rename(target)
    shutil.rmtree(staging)

if __name__ == "__main__":
    main()
