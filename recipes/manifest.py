"""Manifests: CSV files with one utterance per row (columns ID, duration, wav, spk_id, wrd).

The one place that knows the header: LibriSpeech preparation, the bundled corpus, the word LM's
transcripts and the tests write and read manifests through HEADER / write_manifest / read_rows.
"""

import csv
import os

HEADER = ("ID", "duration", "wav", "spk_id", "wrd")
REQUIRED_COLUMNS = ("ID", "duration", "wav", "wrd")  # spk_id is optional


def write_manifest(path, rows):
    """Writes rows (dicts with the HEADER keys; extra keys are ignored) as a manifest, atomically;
    returns ``path``."""
    parent = os.path.dirname(str(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)  # no half-written manifest if interrupted
    return str(path)


def read_rows(path):
    """The rows of a manifest as dicts (column -> str), unchecked (recipes.data.read_manifest
    checks them for training)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
