"""Checks manifests and their audio before the first training step, reporting every bad row at once.

    python -m tools.check_data data/mini_corpus/train.csv data/mini_corpus/valid.csv
    python train_CTC.py hparams/CTC/conmamba_large.yaml --data_folder ... --check_data

Each row is checked for an empty or duplicate ID, an empty transcript and an unparsable duration;
each audio file's header is decoded (in parallel threads: libsndfile releases the GIL) for a
missing, unreadable or empty file, audio shorter than min_duration and a sample rate other than
the model's. A file whose header is fine but whose data is damaged is found only when training
reads it (bad_data: skip / error).

Training runs the check by default (check_data: auto) when the manifests hold at most
AUTO_MAX_FILES rows, and on request (--check_data) above that.
"""

import collections
import concurrent.futures
import csv
import logging
import os
import time

import soundfile

from recipes import RecipeError
from recipes.data import REQUIRED_COLUMNS, resolve_wav

logger = logging.getLogger(__name__)

AUTO_MAX_FILES = 20000
# kind -> whether training can go on with such a row (a wrong rate is resampled on the fly)
KINDS = {"missing": False, "unreadable": False, "empty": False, "too_short": False,
         "empty_id": False, "duplicate_id": False, "empty_text": False, "bad_duration": False,
         "sample_rate": True, "no_manifest": False, "bad_header": False, "no_rows": False}
Problem = collections.namedtuple("Problem", "csv line utt_id kind message")


def _header(path, sample_rate, min_duration):
    """(kind, message) of an audio file's problem, or None."""
    if not os.path.isfile(path):
        return "missing", f"audio file {path} not found"
    try:
        info = soundfile.info(path)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        return "unreadable", f"cannot decode {path}: {' '.join(str(e).split())}"
    if info.frames == 0:
        return "empty", f"{path} has no samples"
    seconds = info.frames / info.samplerate
    if seconds < min_duration:
        return "too_short", (f"{path} lasts {seconds:.3f} s, less than min_duration "
                             f"{min_duration} s")
    if info.samplerate != sample_rate:
        return "sample_rate", (f"{path} is at {info.samplerate} Hz, not {sample_rate} Hz "
                               "(resampled on the fly every epoch: works, costs CPU)")
    return None


def _row_problems(row, seen):
    """(kind, message) of each problem of a manifest row that needs no audio."""
    if not row["ID"]:
        yield "empty_id", "empty ID"
    elif row["ID"] in seen:
        yield "duplicate_id", f"ID {row['ID']} appears earlier in the file"
    if not (row["wrd"] or "").strip():
        yield "empty_text", "empty transcript (wrd)"
    try:
        float(row["duration"])
    except (TypeError, ValueError):
        yield "bad_duration", f"duration {row['duration']!r} is not a number"


def check_manifests(csv_paths, data_root=None, sample_rate=16000, min_duration=0.0,
                    workers=None):
    """Checks every row of the manifests.

    Arguments
    ---------
    csv_paths : list of manifest paths (columns ID, duration, wav, wrd).
    data_root : root of relative wav paths (None: each manifest's own folder).
    sample_rate, min_duration : the recipe's.
    workers : threads decoding headers (None: 4 per CPU, at most 32).

    Returns (problems: list of Problem in manifest order, number of rows checked).
    """
    problems, jobs, rows = [], [], 0
    for csv_path in csv_paths:
        whole = manifest_problems([csv_path])
        problems += whole
        if whole:
            continue
        root = data_root if data_root is not None else os.path.dirname(os.path.abspath(csv_path))
        seen = set()
        with open(csv_path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                rows += 1
                problems += [Problem(csv_path, line, row["ID"] or "", kind, message)
                             for kind, message in _row_problems(row, seen)]
                seen.add(row["ID"])
                jobs.append((csv_path, line, row["ID"] or "", resolve_wav(row["wav"] or "", root)))
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        found = pool.map(lambda job: _header(job[3], sample_rate, min_duration), jobs,
                         chunksize=64)
        for (csv_path, line, utt, _), problem in zip(jobs, found):
            if problem:
                problems.append(Problem(csv_path, line, utt, *problem))
    problems.sort(key=lambda p: (csv_paths.index(p.csv) if p.csv in csv_paths else 0, p.line))
    return problems, rows


def report(problems, rows, seconds):
    """Text of the check: one line per problem, then counts per kind."""
    lines = [f"{p.csv}, line {p.line} (ID {p.utt_id or '?'}): {p.kind}: {p.message}"
             for p in problems]
    counts = collections.Counter(p.kind for p in problems)
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "no problem"
    lines.append(f"Checked {rows} rows in {seconds:.1f} s: {summary}.")
    return "\n".join(lines)


def blocking(problems):
    """The problems training cannot go on with."""
    return [p for p in problems if not KINDS.get(p.kind, False)]


def flag_argv(argv):
    """Lets ``--check_data`` stand alone on the command line (SpeechBrain wants a value)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--check_data" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "True")
    return argv


def check_before_training(hparams):
    """Runs the check on train/valid/test manifests when check_data asks for it (True, or
    'auto' and at most AUTO_MAX_FILES rows). Logs the report; with bad_data: error raises
    RecipeError listing every blocking row, with bad_data: skip lets training drop them."""
    mode = hparams.get("check_data", "auto")
    tests = hparams["test_csv"]
    csvs = [hparams["train_csv"], hparams["valid_csv"],
            *([tests] if isinstance(tests, str) else tests)]
    _stop_on_manifest_problems(manifest_problems(csvs), len(csvs))  # always: cheap
    if mode == "auto":
        rows = sum(_count_rows(c) for c in csvs)
        if rows > AUTO_MAX_FILES:
            logger.info(f"check_data: auto skips the check of {rows} rows (more than "
                        f"{AUTO_MAX_FILES}); --check_data True runs it")
            return
    elif not mode:
        return
    start = time.time()
    problems, rows = check_manifests(csvs, hparams["data_folder"], hparams["sample_rate"],
                                     hparams.get("min_duration", 0.0))
    text = report(problems, rows, time.time() - start)
    stop = blocking(problems)
    if stop and hparams.get("bad_data", "error") == "error":
        raise RecipeError(f"The data check found problems before training:\n{text}\nFix or "
                          "remove these rows, or set bad_data: skip to train without them "
                          "(check_data: False skips the check).")
    (logger.warning if problems else logger.info)(f"Data check:\n{text}")
    if problems:
        print(text.splitlines()[-1], flush=True)


def manifest_problems(csv_paths):
    """Problems of whole manifests (missing, a required column missing, no rows), reading only
    each file's header and first row."""
    problems = []
    for csv_path in csv_paths:
        if not os.path.isfile(csv_path):
            problems.append(Problem(csv_path, 0, "", "no_manifest",
                                    f"manifest {csv_path} not found"))
            continue
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                problems.append(Problem(csv_path, 1, "", "bad_header",
                                        f"missing column(s) {', '.join(missing)}"))
            elif next(reader, None) is None:
                problems.append(Problem(csv_path, 1, "", "no_rows",
                                        "no rows under the header: no utterance to use"))
    return problems


def _stop_on_manifest_problems(problems, n_manifests):
    if problems:
        text = report(problems, n_manifests, 0.0).rsplit("\n", 1)[0]
        raise RecipeError(f"Problems with the manifests:\n{text}\nGive manifests that exist "
                          "and have rows with the columns "
                          f"{', '.join(REQUIRED_COLUMNS)} (--train_csv, --valid_csv, "
                          "--test_csv; after LibriSpeech preparation: <output_folder>/<split>.csv"
                          " for the train_splits, dev_splits and test_splits).")


def _count_rows(csv_path):
    if not os.path.isfile(csv_path):
        return 0
    with open(csv_path, "rb") as f:
        return max(0, sum(1 for _ in f) - 1)
