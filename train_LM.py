#!/usr/bin/env python3
"""Language-model recipe: a SpeechBrain TransformerLM over SentencePiece tokens, trained on text,
for the shallow fusion of the S2S recipes.

    python train_LM.py hparams/LM/transformer.yaml                 # bundled sentence pool
    python train_LM.py hparams/LM/transformer.yaml --text "[corpus.txt, train.csv]" \
        --exclude "[dev.csv, test.csv]" --output_neurons 5000 --lm_d_model 512 --lm_num_layers 6

Text comes from text files (one sentence per line) and CSV manifests (their wrd column); the
sentences of --exclude (evaluation sets) are left out, and valid_fraction of the rest measures
perplexity. The tokenizer is trained on the same text. At the end <output_folder> holds lm.ckpt
(the checkpoint with the lowest valid loss) and tokenizer.ckpt, the layout train_S2S.py loads:

    python train_S2S.py hparams/S2S/conmamba_small.yaml --pretrained_lm_tokenizer_path \
        <output_folder> --output_neurons 5000 --lm_d_model 512 --lm_num_layers 6 ...

(the S2S model then uses this tokenizer, so the two always match).
"""

import dataclasses
import math
import os
import random
import shutil
import sys

from recipes import RecipeError
from recipes.device import set_mps_fallback_env

MPS_NOTE = set_mps_fallback_env(sys.argv[1:])  # must precede `import torch`

import speechbrain as sb  # noqa: E402
import torch  # noqa: E402
from hyperpyyaml import load_hyperpyyaml  # noqa: E402
from speechbrain.dataio.dataset import DynamicItemDataset  # noqa: E402

from inference.word_lm import read_text  # noqa: E402
from recipes import run_cli  # noqa: E402
from recipes.brain import load_model_params  # noqa: E402
from recipes.device import resolve_device  # noqa: E402
from recipes.hparams import check_sizes, preview, route_overrides  # noqa: E402
from recipes.run_settings import check_same_run, record_run  # noqa: E402
from recipes.tokenizer import train_tokenizer  # noqa: E402

TEXT_HINT = " (train_LM.py reads the wrd column of CSV manifests)"


class LM(sb.core.Brain):
    def compute_forward(self, batch, stage):
        """Tokens with <bos> (B, U+1) -> log-probabilities of the next token (B, U+1, vocab)."""
        batch = batch.to(self.device)
        tokens_bos, _ = batch.tokens_bos
        return self.hparams.log_softmax(self.modules.model(tokens_bos))

    def compute_objectives(self, predictions, batch, stage):
        """Negative log-likelihood per token of the sentence followed by <eos>."""
        tokens_eos, lengths = batch.tokens_eos
        return self.hparams.compute_cost(predictions, tokens_eos, length=lengths)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if should_step:
            self.hparams.lr_annealing(self.optimizer)

    def on_stage_end(self, stage, stage_loss, epoch):
        stats = {"loss": stage_loss, "perplexity": math.exp(min(stage_loss, 50.0))}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        meta = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        self.hparams.train_logger.log_stats(stats_meta=meta, train_stats=self.train_stats,
                                            valid_stats=stats)
        self.checkpointer.save_and_keep_only(meta={"loss": stage_loss}, min_keys=["loss"],
                                             num_to_keep=self.hparams.avg_checkpoints)


def _paths(value):
    """A list of paths from a YAML value: a list, or one path given without brackets."""
    return [value] if isinstance(value, str) else list(value or [])


def read_sentences(hparams):
    """The training text: sentences of hparams['text'] not in hparams['exclude'] (word lists)."""
    held_out = {tuple(s) for path in _paths(hparams["exclude"])
                for s in read_text(path, hint=TEXT_HINT)}
    sentences = [s for path in _paths(hparams["text"]) for s in read_text(path, hint=TEXT_HINT)
                 if s]
    kept = [s for s in sentences if tuple(s) not in held_out]
    if len(kept) < 10:
        raise RecipeError(f"Only {len(kept)} sentences left in {hparams['text']} after leaving "
                          f"out those of {hparams['exclude']}: an LM needs more text")
    return kept


def dataio_prepare(hparams, tokenizer, sentences):
    """Train and valid DynamicItemDatasets (valid: a seeded valid_fraction of the sentences)
    with tokens_bos / tokens_eos."""
    order = list(range(len(sentences)))
    random.Random(hparams["seed"]).shuffle(order)
    fraction = hparams["valid_fraction"]
    n_valid = max(1, int(round(fraction * len(order))))
    if not 0 < fraction < 1 or n_valid >= len(order):
        raise RecipeError(f"valid_fraction is {fraction} of {len(order)} sentences: give a "
                          "fraction in (0, 1) that leaves sentences to train on (0.05 by default)")
    splits = {"valid": order[:n_valid], "train": order[n_valid:]}
    bos, eos = hparams["bos_index"], hparams["eos_index"]

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens_bos", "tokens_eos")
    def text_pipeline(wrd):
        ids = tokenizer.encode_as_ids(wrd)
        yield torch.LongTensor([bos] + ids)
        yield torch.LongTensor(ids + [eos])

    datasets = {}
    for name, rows in splits.items():
        data = {f"s{i}": {"wrd": " ".join(sentences[i])} for i in rows}
        datasets[name] = DynamicItemDataset(data, dynamic_items=[text_pipeline],
                                            output_keys=["id", "tokens_bos", "tokens_eos"])
    return datasets["train"], datasets["valid"]


def write_text_csv(sentences, path):
    """The sentences as a manifest (only wrd matters) for the tokenizer trainer."""
    from recipes.manifest import write_manifest

    write_manifest(path, [{"ID": f"s{i}", "duration": 0.0, "wav": "-", "spk_id": "-",
                           "wrd": " ".join(s)} for i, s in enumerate(sentences)])


def export_lm(hparams, brain, tokenizer_file):
    """Writes lm.ckpt (the average of the avg_checkpoints checkpoints of lowest valid loss) and
    tokenizer.ckpt into output_folder; returns it."""
    from speechbrain.utils.checkpoints import average_checkpoints

    ckpts = brain.checkpointer.find_checkpoints(
        min_key="loss", max_num_checkpoints=hparams["avg_checkpoints"])
    if not ckpts:
        raise RecipeError(f"No LM checkpoint in {hparams['save_folder']}: train first")
    hparams["model"].load_state_dict(average_checkpoints(
        ckpts, recoverable_name="model", parameter_loader=load_model_params))
    folder = hparams["output_folder"]
    state = {k: v.detach().float().cpu() for k, v in hparams["model"].state_dict().items()}
    torch.save(state, os.path.join(folder, "lm.ckpt"))
    shutil.copyfile(tokenizer_file, os.path.join(folder, "tokenizer.ckpt"))
    return folder


def main(argv):
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    device = resolve_device(run_opts.device if "device" in run_opts.overridden_args else None)
    run_opts = dataclasses.replace(run_opts, device=device,
                                   overridden_args=run_opts.overridden_args | {"device"})
    routed, _ = route_overrides(hparams_file, overrides)  # unknown keys are an error
    check_sizes(preview(hparams_file, routed, None))
    with open(hparams_file) as f:
        hparams = load_hyperpyyaml(f, routed)
    check_same_run(hparams)
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file, overrides=routed)
    record_run(hparams)
    sentences = read_sentences(hparams)
    text_csv = os.path.join(hparams["output_folder"], "lm_text.csv")
    write_text_csv(sentences, text_csv)
    tokenizer, tokenizer_file = train_tokenizer({**hparams, "train_csv": text_csv})
    train, valid = dataio_prepare(hparams, tokenizer, sentences)
    brain = LM(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
               run_opts=run_opts, checkpointer=hparams["checkpointer"])
    loader = {"batch_size": hparams["batch_size"]}
    brain.fit(hparams["epoch_counter"], train, valid, train_loader_kwargs={**loader,
              "shuffle": True}, valid_loader_kwargs=loader)
    folder = export_lm(hparams, brain, tokenizer_file)
    print(f"LM and tokenizer in {folder} (lm.ckpt, tokenizer.ckpt): train_S2S.py "
          f"--pretrained_lm_tokenizer_path {folder} --output_neurons {hparams['output_neurons']}"
          f" --lm_d_model {hparams['lm_d_model']} --lm_nhead {hparams['lm_nhead']} "
          f"--lm_num_layers {hparams['lm_num_layers']} --lm_d_ffn {hparams['lm_d_ffn']}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
