"""The settings a run's checkpoints were made with, kept in its output folder, so that a command
with other settings (a sweep's next value, a typo) does not silently resume or re-test that run.

A rerun in a folder that holds checkpoints resumes from them (and a finished run is only tested
again): right for an interrupted run, wrong for a new experiment that reuses the default
``results/<kind>/<experiment>/<seed>`` folder. ``check_same_run`` compares the plain values
(numbers, strings, booleans, lists of them) of the recipe with those recorded by the run that
made the checkpoints and refuses when one differs, except for the keys a continued or re-tested
run may change (RESUMABLE, and the device presets).
"""

import glob
import json
import os

from recipes import RecipeError
from recipes.atomic import replace_atomically
from recipes.device import PRESETS

RECORD = "run_settings.json"
RESUMABLE = frozenset({
    # more epochs, where the data lives, what runs, how it is checkpointed and loaded
    "number_of_epochs", "data_folder", "skip_prep", "skip_train", "num_workers", "check_data",
    "bad_data", "cache_audio", "ckpt_interval_minutes", "ckpt_interval_steps",
    "encoder_gradient_checkpointing", "fused_optimizer", "max_batch_length_val",
    # testing and decoding
    "test_csv", "test_splits", "avg_checkpoints", "beam_size", "test_beam_size",
    "valid_beam_size", "valid_search_interval", "ctc_weight_decode", "lm_weight",
    "max_decode_ratio", "min_decode_ratio", "temperature", "beam_prune_logp",
    "token_prune_min_logp", "prune_history",
    # the folder's own paths and name
    "experiment", "output_folder", "output_wer_folder", "save_folder", "train_log",
    "tensorboard_folder", "inference_folder",
})
# also free when a run only tests: decoding without its LM, and what only training reads
TESTING_ONLY = frozenset({
    "no_lm", "train_csv", "train_splits", "valid_csv", "dev_splits", "sorting", "shuffle",
    "batch_ordering", "num_bucket", "max_batch_length_train", "max_batch_ex", "seed",
    "lr_model", "lr_adam", "lr_peak", "n_warmup_steps", "weight_decay", "max_grad_norm",
    "label_smoothing", "ctc_weight", "inter_ctc_weight", "inter_ctc_layer", "transformer_dropout",
    "cnn_dropout", "speed_perturb_per",
})


def _scalar(value):
    return isinstance(value, (bool, int, float, str)) or value is None


# mappings recorded too: model settings not all given by plain keys (bimamba_merge, dt_rank...);
# the others (data loader and searcher options) only repeat plain keys
MAPPINGS = ("mamba_config",)


def _plain(value):
    """Numbers, strings, booleans, None, and lists of them."""
    if _scalar(value):
        return True
    return isinstance(value, (list, tuple)) and all(_scalar(v) for v in value)


def run_settings(hparams):
    """{key: value} of the plain values of a loaded recipe (JSON types)."""
    plain = {k: v for k, v in hparams.items() if k != "recipe_yaml" and _plain(v)}
    plain.update({k: dict(hparams[k]) for k in MAPPINGS if hasattr(hparams.get(k), "keys")})
    return json.loads(json.dumps(plain, sort_keys=True))


def _has_checkpoints(hparams):
    save = hparams.get("save_folder")
    return bool(save) and bool(glob.glob(os.path.join(save, "CKPT+*")))


def check_same_run(hparams, testing_only=False):
    """Raises RecipeError when hparams["output_folder"] holds checkpoints of a run recorded with
    other settings (see the module docstring). A folder without a record is not checked.
    testing_only (--test_only, skip_train): the TESTING_ONLY keys may change as well (a
    re-test need not repeat the training options)."""
    folder = hparams["output_folder"]
    path = os.path.join(folder, RECORD)
    if not (os.path.isfile(path) and _has_checkpoints(hparams)):
        return
    try:
        with open(path) as f:
            before = json.load(f)
    except (OSError, ValueError) as e:
        raise RecipeError(f"Cannot read {path} ({e}): delete it to resume the run in {folder} "
                          "with this command's settings") from e
    now = run_settings(hparams)
    free = RESUMABLE | set(PRESETS["cpu"]) | set(PRESETS["cuda"]) | set(PRESETS["mps"])
    free |= TESTING_ONLY if testing_only else set()
    changed = [k for k in sorted(set(before) | set(now))
               if k not in free and before.get(k) != now.get(k)
               and not (k in MAPPINGS and k not in before)]  # records made before they were
    if not changed:
        return
    shown = "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in changed[:6])
    more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
    raise RecipeError(
        f"{folder} holds checkpoints of a run made with other settings ({shown}{more}). A rerun "
        "in that folder would resume or re-test that run, not train this one: give this run its "
        "own folder (--output_folder PATH, or --experiment NAME), or delete that folder to start "
        f"over. To continue that run with the new settings, delete {path}.")


def record_run(hparams):
    """Writes the recipe's plain values to <output_folder>/run_settings.json (main process, by a
    run that trains: a test-only run leaves the record of the run that made the checkpoints)."""
    with replace_atomically(os.path.join(hparams["output_folder"], RECORD)) as f:
        json.dump(run_settings(hparams), f, indent=1, sort_keys=True)
