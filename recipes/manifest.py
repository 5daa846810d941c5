"""Manifests: CSV files with one utterance per row (columns ID, duration, wav, spk_id, wrd).

The one place that knows the header: LibriSpeech preparation, the bundled corpus, the word LM's
transcripts and the tests write and read manifests through HEADER / write_manifest / read_rows.
"""

import csv
import os

from recipes import RecipeError
from recipes.atomic import replace_atomically

HEADER = ("ID", "duration", "wav", "spk_id", "wrd")
REQUIRED_COLUMNS = ("ID", "duration", "wav", "wrd")  # spk_id is optional


class ManifestError(RecipeError, ValueError):
    """A manifest (CSV) that cannot be used; the message names the file (and the row)."""


def write_manifest(path, rows):
    """Writes rows (dicts with the HEADER keys; extra keys are ignored) as a manifest, atomically;
    returns ``path``."""
    parent = os.path.dirname(str(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with replace_atomically(path, newline="") as f:  # no half-written manifest if interrupted
        writer = csv.DictWriter(f, fieldnames=HEADER, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def read_rows(path, required=(), hint=""):
    """The rows of a manifest as dicts (column -> str); the values are not checked
    (recipes.data.read_manifest checks them for training).

    Raises ManifestError when the file does not exist or lacks a column of ``required`` (the
    message ends with ``hint``, e.g. which option to change).
    """
    if not os.path.isfile(path):
        raise ManifestError(f"Manifest {path} does not exist{hint}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            names = ", ".join(repr(c) for c in missing)
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}: it has no "
                                f"{names} column (its columns: "
                                f"{', '.join(reader.fieldnames or [])}); a manifest has the "
                                f"header {','.join(HEADER)}{hint}")
        return list(reader)
