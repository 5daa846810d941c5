"""Files written whole or not at all: a run stopped mid-write leaves the previous file intact."""

import contextlib
import os


@contextlib.contextmanager
def replace_atomically(path, newline=None):
    """A text file (UTF-8) opened for writing beside ``path`` that replaces ``path`` once the
    block completes (os.replace, atomic within a folder); on an error it is removed and
    ``path`` is left as it was."""
    tmp = f"{path}.partial"
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
