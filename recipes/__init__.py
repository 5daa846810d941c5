"""Training support of train_CTC.py and train_S2S.py (devices, hparams loading, data, export).

Importing this package does not import torch: ``recipes.device.set_mps_fallback_env`` must run
before torch is imported.
"""


class RecipeError(Exception):
    """A problem the user can fix (bad data, missing files, unreachable hub...): the training
    scripts print its message without a traceback and exit with status 1."""


def run_cli(main, argv, errors=(RecipeError,)):
    """Runs ``main(argv)``; an exception of ``errors`` (user-fixable: its message says what to do)
    becomes one line 'ERROR: <message>' on stderr and exit status 1. Returns the exit status for
    ``sys.exit``: main's own when it returns an int, else 0."""
    import sys

    try:
        status = main(argv)
    except errors as e:
        print("ERROR: " + user_message(e), file=sys.stderr, flush=True)
        return 1
    return status if isinstance(status, int) else 0


def user_message(error):
    """The message of a user-fixable error for the terminal: its lines with runs of spaces
    collapsed. An error re-raised from a DataLoader worker carries the worker's traceback in
    its message: only the original message (the traceback's last line) is kept."""
    text = str(error).strip()
    if "Original Traceback (most recent call last):" in text:
        last = text.rstrip().splitlines()[-1]
        prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())
