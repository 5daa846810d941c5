"""Start-up and wrap-up shared by train_CTC.py and train_S2S.py."""

import dataclasses
import logging
import os
import shutil
import sys

import speechbrain as sb
from speechbrain.utils.distributed import if_main_process, run_on_main

from recipes.check_data import check_before_training, flag_argv
from recipes.device import RUN_OPTION_KEYS, mamba_scan_line, resolve_device
from recipes.hparams import load_recipe

logger = logging.getLogger(__name__)


def setup(argv, kind, mps_note=None):
    """Parses the command line, applies the device presets, loads the recipe, starts DDP, creates
    the experiment folder and prepares LibriSpeech manifests (unless skip_prep).

    Returns (hparams_file, hparams, run_opts); run_opts carries the resolved device.
    """
    hparams_file, run_opts, overrides = sb.parse_arguments(flag_argv(argv))
    local_rank = os.environ.get("LOCAL_RANK")
    device = resolve_device(run_opts.device, local_rank)
    cli = {k: run_opts[k] for k in RUN_OPTION_KEYS if k in run_opts.overridden_args}
    hparams, routed, settings = load_recipe(hparams_file, overrides, device, cli)

    changes = {"device": device}
    if (os.environ.get("RANK") is not None and not device.startswith("cuda")
            and "distributed_backend" not in run_opts.overridden_args):
        changes["distributed_backend"] = "gloo"  # nccl needs CUDA
    run_opts = dataclasses.replace(
        run_opts, **changes, overridden_args=run_opts.overridden_args | set(changes))
    sb.utils.distributed.ddp_init_group(run_opts)

    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file, overrides=routed)
    if if_main_process() and os.path.isfile(sys.argv[0]):  # keep the script next to its results
        shutil.copy(sys.argv[0], hparams["output_folder"])
    lines = [f"train_{kind}.py {hparams_file}: device {device}"]
    lines += [f"  {k}: {v} ({src})" for k, (v, src) in settings.items()]
    if settings["dynamic_batching"][0]:
        lines.append(f"  (dynamic batches of up to {hparams['max_batch_length_train']} s of "
                     "audio; batch_size unused)")
    if "mamba" in f"{hparams.get('encoder_module')} {hparams.get('decoder_module')}":
        lines.append(f"  {mamba_scan_line(device)}")
    lines += [f"  {mps_note}"] if mps_note else []
    lines.append(f"  output folder: {hparams['output_folder']}")
    if if_main_process():
        print("\n".join(lines), flush=True)
    for line in lines:
        logger.info(line)

    if not hparams["skip_prep"]:
        from recipes.librispeech import prepare_librispeech

        run_on_main(prepare_librispeech, kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["output_folder"],
            "tr_splits": hparams["train_splits"],
            "dev_splits": hparams["dev_splits"],
            "te_splits": hparams["test_splits"],
            "merge_lst": hparams["train_splits"],
            "merge_name": os.path.basename(hparams["train_csv"]),
        })
    if not hparams["skip_train"] and not run_opts.test_only:
        run_on_main(check_before_training, args=[hparams])
    return hparams_file, hparams, run_opts


def attach_tensorboard(brain, hparams):
    """Gives the Brain a TensorBoard logger (on every process: its log_stats synchronises them
    and writes on the main one only)."""
    if hparams.get("tensorboard_logger") is not None:
        brain.tensorboard = hparams["tensorboard_logger"]()


def fit_and_test(brain, hparams, run_opts, train, valid, tests, train_opts, valid_opts, wer_name):
    """Trains (unless skip_train / --test_only), then evaluates every test set with the
    averaged best checkpoints, writing <output_wer_folder>/{wer,cer}_<test set>.txt."""
    if not hparams["skip_train"] and not run_opts.test_only:
        brain.fit(brain.hparams.epoch_counter, train, valid,
                  train_loader_kwargs=train_opts, valid_loader_kwargs=valid_opts)
    os.makedirs(hparams["output_wer_folder"], exist_ok=True)
    for name, dataset in tests.items():
        brain.result_files = {
            "wer": os.path.join(hparams["output_wer_folder"], f"{wer_name}_{name}.txt"),
            "cer": os.path.join(hparams["output_wer_folder"], f"cer_{name}.txt"),
        }
        brain.evaluate_best(dataset, test_loader_kwargs=hparams["test_dataloader_opts"])
