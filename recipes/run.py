"""What train_CTC.py and train_S2S.py run: set-up (command line, device presets, recipe, DDP,
experiment folder, LibriSpeech preparation) and the train / test / export sequence."""

import dataclasses
import glob
import logging
import math
import os
import shutil
import sys

import speechbrain as sb
import torch
from speechbrain.utils.distributed import if_main_process, run_on_main

from modules.mamba.scan import describe_backend, load_cpu_kernels
from recipes import RecipeError
from recipes.check_data import check_before_training, flag_argv
from recipes.device import RUN_OPTION_KEYS, resolve_device
from recipes.hparams import load_recipe
from recipes.run_settings import check_same_run, record_run

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

    _one_checkpoint_interval(hparams, run_opts)
    changes = {"device": device}
    if (os.environ.get("RANK") is not None and not device.startswith("cuda")
            and "distributed_backend" not in run_opts.overridden_args):
        changes["distributed_backend"] = "gloo"  # nccl needs CUDA
    elif (run_opts.distributed_backend == "nccl" and not device.startswith("cuda")
          and "distributed_backend" in run_opts.overridden_args):
        raise RecipeError(f"--distributed_backend nccl needs CUDA devices, and this run is on "
                          f"{device}: pass --distributed_backend gloo, or leave the option out")
    run_opts = dataclasses.replace(
        run_opts, **changes, overridden_args=run_opts.overridden_args | set(changes))
    sb.utils.distributed.ddp_init_group(run_opts)

    testing_only = bool(hparams["skip_train"] or run_opts.test_only)
    check_same_run(hparams, testing_only)  # before hyperparams.yaml is overwritten
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file, overrides=routed)
    if if_main_process() and not testing_only:
        record_run(hparams)
    if if_main_process() and os.path.isfile(sys.argv[0]):  # keep the script next to its results
        shutil.copy(sys.argv[0], hparams["output_folder"])
    lines = [f"train_{kind}.py {hparams_file}: device {device}"]
    lines += [f"  {k}: {v} ({src})" for k, (v, src) in settings.items()]
    if settings["dynamic_batching"][0]:
        lines.append(f"  (dynamic batches of up to {hparams['max_batch_length_train']} s of "
                     "audio; batch_size unused)")
    if "mamba" in f"{hparams.get('encoder_module')} {hparams.get('decoder_module')}":
        try:  # the scan module's own decision, made again at each scan
            lines.append(f"  {describe_backend(device, precision=hparams.get('precision'))}")
        except ValueError as err:  # a forced backend (MAMBA_SCAN_BACKEND) that cannot run here
            raise RecipeError(str(err)) from err
        # Every scan of the run on the compiled CPU kernels, as training's: else validation or
        # testing before the first training step (a resumed or --test_only run) would run the
        # pure-PyTorch scan and differ from an uninterrupted run in the last digits.
        if torch.device(device).type == "cpu":
            load_cpu_kernels(torch.zeros(1))
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


def _one_checkpoint_interval(hparams, run_opts):
    """Intra-epoch checkpoints every ckpt_interval_steps steps replace the recipe's
    ckpt_interval_minutes (SpeechBrain takes one or the other); both on the command line, each
    above 0, is an error."""
    given = run_opts.overridden_args
    steps = run_opts.ckpt_interval_steps if "ckpt_interval_steps" in given else \
        hparams.get("ckpt_interval_steps", 0)
    if not steps or steps <= 0:
        return
    if "ckpt_interval_minutes" in given and run_opts.ckpt_interval_minutes > 0:
        raise RecipeError(f"--ckpt_interval_minutes {run_opts.ckpt_interval_minutes} and "
                          f"--ckpt_interval_steps {steps}: give one of them (intra-epoch "
                          "checkpoints every N minutes or every N steps)")
    if hparams.get("ckpt_interval_minutes"):
        logger.info("ckpt_interval_steps %s replaces the recipe's ckpt_interval_minutes %s",
                    steps, hparams["ckpt_interval_minutes"])
        hparams["ckpt_interval_minutes"] = 0


def recipe_tokenizer(hparams, kind, device):
    """(tokenizer, tokenizer file, LM or None): CTC trains its tokenizer on train_csv; S2S takes
    tokenizer and LM from pretrained_lm_tokenizer_path (no_lm: no LM, tokenizer trained)."""
    from recipes.tokenizer import s2s_tokenizer, train_tokenizer

    if kind == "CTC":
        return (*train_tokenizer(hparams), None)
    lm_model = None if hparams["no_lm"] else hparams["lm_model"]()
    tokenizer, tokenizer_file = s2s_tokenizer(hparams, lm_model)
    if lm_model is not None:
        lm_model.to(device).eval().requires_grad_(False)
    return tokenizer, tokenizer_file, lm_model


def fit_schedule_to_data(hparams, train, train_sampler, world_size=1):
    """A LinearWarmupScheduler (``noam_annealing``) decays to 0 at the run's last step: its
    ``num_training_steps`` is set here to epochs x optimizer steps per epoch of this train data
    (batches per epoch, per DDP process, over ``grad_accumulation_factor``), so that any corpus,
    batch length or epoch count gets the whole schedule. Other schedulers are left alone.

    Returns the number of steps set, or None."""
    from speechbrain.nnet.schedulers import LinearWarmupScheduler

    scheduler = hparams.get("noam_annealing")
    if not isinstance(scheduler, LinearWarmupScheduler):
        return None
    if train_sampler is not None:
        batches = len(train_sampler)
    else:
        batches = math.ceil(len(train) / hparams["batch_size"])
    batches = math.ceil(batches / world_size)
    # sb.Brain steps on every grad_accumulation_factor-th batch of an epoch (the rest are dropped)
    steps_per_epoch = max(1, batches // (hparams.get("grad_accumulation_factor") or 1))
    scheduler.num_training_steps = hparams["number_of_epochs"] * steps_per_epoch
    # a checkpoint's load restores the length it was saved with; RecipeBrain.on_fit_start puts
    # this run's back (continuing with more epochs stretches the decay)
    scheduler.fitted_steps = scheduler.num_training_steps
    if scheduler.num_training_steps <= scheduler.num_warmup_steps:
        raise RecipeError(
            f"n_warmup_steps ({scheduler.num_warmup_steps}) must be below the run's "
            f"{scheduler.num_training_steps} optimizer steps ({hparams['number_of_epochs']} "
            f"epochs x {steps_per_epoch}): lower --n_warmup_steps or raise --number_of_epochs")
    logger.info("learning rate: linear warm-up over %d steps, then linear decay to 0 at step %d "
                "(%d epochs x %d steps)", scheduler.num_warmup_steps,
                scheduler.num_training_steps, hparams["number_of_epochs"], steps_per_epoch)
    return scheduler.num_training_steps


def interrupted_message(save_folder):
    """What to do after Ctrl-C during training."""
    if glob.glob(os.path.join(save_folder, "CKPT+*")):
        return (f"interrupted; rerun the same command to continue from the last checkpoint in "
                f"{save_folder}")
    return "interrupted before the first checkpoint; rerun the same command to start over"


def train_test_export(argv, brain_class, make_test_searcher, mps_note=None):
    """The whole recipe: set-up, tokenizer (+ LM), data, training (unless skip_train /
    --test_only), testing with the averaged best checkpoints, export to inference_folder.

    brain_class : a RecipeBrain subclass (its ``kind`` is 'CTC' or 'S2S').
    make_test_searcher : (hparams, tokenizer, lm_model or None) -> the test searcher.
    """
    from recipes.data import dataio_prepare, loader_kwargs
    from recipes.export import export_inference_folder

    kind = brain_class.kind
    _, hparams, run_opts = setup(argv, kind, mps_note)
    tokenizer, tokenizer_file, lm_model = recipe_tokenizer(hparams, kind, run_opts.device)
    train, valid, tests, train_sampler, valid_sampler = dataio_prepare(
        hparams, tokenizer, with_bos_eos=kind == "S2S")
    train_opts, valid_opts = loader_kwargs(hparams, train_sampler, valid_sampler)
    fit_schedule_to_data(hparams, train, train_sampler, world_size=(
        torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1))
    tensorboard = hparams.get("tensorboard_logger")
    brain = brain_class(
        modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
        run_opts=run_opts, checkpointer=hparams["checkpointer"], tokenizer=tokenizer,
        test_searcher=make_test_searcher(hparams, tokenizer, lm_model),
        # on every process: its log_stats synchronises them and writes on the main one only
        tensorboard=tensorboard() if tensorboard is not None else None)
    if not hparams["skip_train"] and not run_opts.test_only:
        try:
            brain.fit(brain.hparams.epoch_counter, train, valid,
                      train_loader_kwargs=train_opts, valid_loader_kwargs=valid_opts)
        except KeyboardInterrupt:
            raise RecipeError(interrupted_message(hparams["save_folder"])) from None
    brain.test(tests, wer_name="wer_no_lm" if kind == "S2S" and lm_model is None else "wer")
    run_on_main(export_inference_folder, args=[hparams, kind, tokenizer_file],
                kwargs={"lm_model": lm_model})
    if torch.distributed.is_initialized():  # left to interpreter exit, gloo's threads may abort it
        torch.distributed.destroy_process_group()
