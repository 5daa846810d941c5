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
        print("ERROR: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
        return 1
    return status if isinstance(status, int) else 0
