"""LibriSpeech -> SpeechBrain CSV manifests (ID, duration, wav, spk_id, wrd).

Standard layout: <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac with
one <speaker>-<chapter>.trans.txt per chapter. One <split>.csv per split is written to
save_folder (wav paths relative to data_folder) and the training splits are merged into
merge_name. Work already done with the same options is skipped.

The command line is librispeech_prepare.py at the repository root.
"""

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import soundfile

from recipes import RecipeError
from recipes.manifest import write_manifest

logger = logging.getLogger(__name__)


class PrepareError(RecipeError, FileNotFoundError):
    """LibriSpeech folder, split or file missing."""


OPTIONS_FILE = "librispeech_prepare.json"


def prepare_librispeech(data_folder, save_folder, tr_splits=(), dev_splits=(), te_splits=(),
                        merge_lst=(), merge_name="train.csv", skip_prep=False):
    """Writes <save_folder>/<split>.csv for every split and merges ``merge_lst`` into merge_name.

    Raises PrepareError (before writing anything) when data_folder or a split is missing.
    """
    if skip_prep:
        return
    splits = list(dict.fromkeys([*tr_splits, *dev_splits, *te_splits]))
    options = {"data_folder": os.path.abspath(data_folder), "splits": splits,
               "merge_lst": list(merge_lst), "merge_name": merge_name}
    outputs = [os.path.join(save_folder, f"{s}.csv") for s in splits]
    if merge_lst:
        outputs.append(os.path.join(save_folder, merge_name))
    options_path = os.path.join(save_folder, OPTIONS_FILE)
    if all(map(os.path.isfile, outputs)) and _read_json(options_path) == options:
        logger.info(f"LibriSpeech manifests in {save_folder} are up to date, skipping preparation")
        return

    if not os.path.isdir(data_folder):
        raise PrepareError(f"LibriSpeech folder {data_folder} does not exist: pass the folder "
                           "holding the splits (--data_folder /path/to/LibriSpeech)")
    missing = [s for s in splits if not os.path.isdir(os.path.join(data_folder, s))]
    if missing:
        found = sorted(d for d in os.listdir(data_folder)
                       if os.path.isdir(os.path.join(data_folder, d)))
        raise PrepareError(
            f"Split(s) {', '.join(missing)} not found in {data_folder} (found: "
            f"{', '.join(found) or 'nothing'}); download them or change --train_splits, "
            "--dev_splits or --test_splits")

    os.makedirs(save_folder, exist_ok=True)
    rows = {}
    for split in splits:
        rows[split] = _split_rows(data_folder, split)
        write_manifest(os.path.join(save_folder, f"{split}.csv"), rows[split])
        logger.info(f"{split}: {len(rows[split])} utterances")
    if merge_lst:
        write_manifest(os.path.join(save_folder, merge_name),
                   [r for s in merge_lst for r in rows[s]])
    with open(options_path, "w") as f:
        json.dump(options, f)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _split_rows(data_folder, split):
    """Rows of one split, sorted by ID; durations read from the audio headers."""
    items = []
    for root, _, files in os.walk(os.path.join(data_folder, split)):
        for name in files:
            if not name.endswith(".trans.txt"):
                continue
            with open(os.path.join(root, name)) as f:
                for line in f:
                    if not line.strip():
                        continue
                    utt_id, _, text = line.strip().partition(" ")
                    audio = os.path.join(root, utt_id + ".flac")
                    if not os.path.isfile(audio):
                        raise PrepareError(f"{audio} listed in {os.path.join(root, name)} "
                                                "does not exist")
                    items.append((utt_id, audio, text))
    if not items:
        raise PrepareError(f"No *.trans.txt transcripts under {os.path.join(data_folder, split)}")
    items.sort()
    with ThreadPoolExecutor(max_workers=8) as pool:
        durations = list(pool.map(lambda it: soundfile.info(it[1]).duration, items))
    return [{"ID": utt_id, "duration": f"{d:.3f}", "wav": os.path.relpath(audio, data_folder),
             "spk_id": utt_id.split("-")[0], "wrd": " ".join(text.split())}
            for (utt_id, audio, text), d in zip(items, durations)]
