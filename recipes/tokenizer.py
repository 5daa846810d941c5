"""Tokenizer (SentencePiece) and pretrained LM loading for the recipes."""

import os
import re

import sentencepiece as spm

from speechbrain.tokenizers.SentencePiece import SentencePiece
from speechbrain.utils.distributed import run_on_main
from speechbrain.utils.parameter_transfer import Pretrainer

from recipes import RecipeError
from recipes.hparams import yaml_int


def train_tokenizer(hparams):
    """Trains (or reloads, when already trained) SentencePiece on the train_csv transcripts.

    Returns (processor, model file path). Raises RecipeError when the vocabulary does not fit
    output_neurons (e.g. characters of another alphabet than LibriSpeech's).
    """
    build = lambda: SentencePiece(  # noqa: E731
        model_dir=hparams["save_folder"],
        vocab_size=hparams["output_neurons"],
        annotation_train=hparams["train_csv"],
        annotation_read="wrd",
        model_type=hparams["token_type"],
        character_coverage=hparams["character_coverage"],
        bos_id=hparams["bos_index"],
        eos_id=hparams["eos_index"],
    )
    try:
        # SentencePiece decides whether to train (and so whether to enter a DDP barrier) by
        # checking for the model file, which a fast main process may already have written:
        # train on main first, then every process finds the file and only loads it.
        run_on_main(lambda: build() and None)
        wrapper = build()
    except RuntimeError as e:  # SentencePiece's trainer errors, e.g. too little text
        raise RecipeError(f"Could not train a {hparams['token_type']} tokenizer of "
                          f"{hparams['output_neurons']} tokens on {hparams['train_csv']}: "
                          f"{str(e).splitlines()[0]} (set --output_neurons accordingly)") from e
    _check_vocab(wrapper.sp, hparams["output_neurons"], hparams["train_csv"])
    return wrapper.sp, wrapper.prefix_model_file + ".model"


def _check_vocab(sp, output_neurons, origin, exact=False):
    """exact: an S2S model's decoder needs one output per token, no more."""
    if sp.vocab_size() > output_neurons or (exact and sp.vocab_size() != output_neurons):
        more = "" if exact else " (or more)"
        raise RecipeError(f"The tokenizer from {origin} has {sp.vocab_size()} tokens but the model "
                         f"has output_neurons: {output_neurons}; pass --output_neurons "
                         f"{sp.vocab_size()}{more}")


def decode_words(tokenizer, ids):
    """Token ids -> list of words (no empty ones: a lone word-start piece adds no word). Ids
    beyond the tokenizer's vocabulary (possible when output_neurons exceeds it, e.g. characters
    of a small corpus) are dropped: they are never targets."""
    size = tokenizer.vocab_size()
    return tokenizer.decode_ids([int(i) for i in ids if int(i) < size]).split()


def is_hub_id(path):
    """True when ``path`` names a Hugging Face repository ("namespace/name") rather than a local
    folder."""
    return (not os.path.isdir(path) and not path.startswith((".", "~"))
            and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None)


LM_SIZE_KEYS = ("output_neurons", "lm_d_model", "lm_nhead", "lm_num_layers", "lm_d_ffn")


def _check_lm_sizes(hparams, source):
    """RecipeError when the hyperparams.yaml that train_LM.py leaves in a local LM folder records
    other LM sizes than hparams' (lm_nhead cannot be read from lm.ckpt's shapes)."""
    path = os.path.join(source, "hyperparams.yaml")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    recorded = {k: v for k in LM_SIZE_KEYS
                if (v := yaml_int(text, k, top_level=True)) is not None}
    wrong = [k for k, v in recorded.items() if hparams.get(k) is not None and hparams[k] != v]
    if wrong:
        raise RecipeError(
            f"The LM in {source} was trained with "
            + ", ".join(f"{k} {recorded[k]}" for k in wrong) + " (its hyperparams.yaml), this "
            "run has " + ", ".join(f"{k} {hparams[k]}" for k in wrong) + ": pass "
            + " ".join(f"--{k} {recorded[k]}" for k in wrong))


def load_pretrained(hparams, lm_model=None):
    """Loads tokenizer.ckpt (and lm.ckpt into ``lm_model`` when given) from
    pretrained_lm_tokenizer_path (Hugging Face id or local folder).

    Returns (processor, tokenizer file path). Raises RecipeError with what to do when the
    files cannot be fetched (no network, unknown id, missing files).
    """
    source = str(hparams["pretrained_lm_tokenizer_path"])
    if not os.path.isdir(source) and not is_hub_id(source):
        raise RecipeError(f"pretrained_lm_tokenizer_path {source} is not a folder (nor a Hugging "
                          "Face id like speechbrain/asr-transformer-transformerlm-librispeech): "
                          "give the folder that train_LM.py wrote (lm.ckpt, tokenizer.ckpt), or "
                          "--no_lm True")
    tokenizer = spm.SentencePieceProcessor()
    loadables = {"tokenizer": tokenizer}
    if lm_model is not None:
        loadables["lm"] = lm_model
        if os.path.isdir(source):
            _check_lm_sizes(hparams, source)
    pretrainer = Pretrainer(
        collect_in=hparams["save_folder"],
        loadables=loadables,
        paths={k: f"{source}/{k}.ckpt" for k in loadables},
    )
    try:
        run_on_main(pretrainer.collect_files)
        pretrainer.load_collected()
    except Exception as e:  # hub/network/file errors come in many types
        if isinstance(e, RuntimeError) and "loading state_dict" in str(e):  # shapes differ
            raise RecipeError(
                f"lm.ckpt of {source} does not fit the recipe's lm_model "
                f"({str(e).splitlines()[0]}): {lm_size_flags(hparams)}") from e
        missing = [f"{k}.ckpt" for k in loadables
                   if not os.path.isfile(os.path.join(source, f"{k}.ckpt"))]
        where = ("the Hugging Face hub is not reachable or has no such repository"
                 if is_hub_id(source) else f"{source} lacks " + " and ".join(missing)
                 if missing else "its files could not be loaded")
        raise RecipeError(
            f"Could not load {' and '.join(f'{k}.ckpt' for k in loadables)} from "
            f"pretrained_lm_tokenizer_path={source!r}: {where} ({type(e).__name__}: {e}). "
            "Use --pretrained_lm_tokenizer_path /local/folder (holding lm.ckpt and "
            "tokenizer.ckpt), or --no_lm True to decode without LM and train the tokenizer on "
            "your transcripts.") from e
    _check_vocab(tokenizer, hparams["output_neurons"], source, exact=True)
    return tokenizer, os.path.join(hparams["save_folder"], "tokenizer.ckpt")


def lm_size_flags(hparams):
    """What to pass so that lm_model fits the LM in pretrained_lm_tokenizer_path (read from the
    shapes of its lm.ckpt, a SpeechBrain TransformerLM state_dict)."""
    import torch

    path = os.path.join(hparams["save_folder"], "lm.ckpt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        vocab, d_model = state["custom_src_module.emb.Embedding.weight"].shape
        d_ffn = state["encoder.layers.0.pos_ffn.ffn.0.weight"].shape[0]
        layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    except Exception:  # not a TransformerLM state_dict: no sizes to suggest
        return ("pass the sizes it was trained with (--lm_d_model, --lm_nhead, --lm_num_layers, "
                "--lm_d_ffn; train_LM.py prints them)")
    return (f"it was trained with --output_neurons {vocab} --lm_d_model {d_model} "
            f"--lm_num_layers {layers} --lm_d_ffn {d_ffn} (and its --lm_nhead; train_LM.py "
            "prints it): pass these")


def s2s_tokenizer(hparams, lm_model=None):
    """S2S: tokenizer (+ LM weights into ``lm_model``) from the pretrained folder, or trained
    on the transcripts when no_lm is True and no local tokenizer.ckpt is given."""
    source = str(hparams["pretrained_lm_tokenizer_path"] or "")
    if not hparams["no_lm"]:
        tokenizer, path = load_pretrained(hparams, lm_model)
    elif source and os.path.isfile(os.path.join(source, "tokenizer.ckpt")):
        tokenizer, path = load_pretrained(hparams)
    else:
        tokenizer, path = train_tokenizer(hparams)
    if tokenizer.vocab_size() != hparams["output_neurons"]:
        raise RecipeError(f"The tokenizer has {tokenizer.vocab_size()} tokens but output_neurons "
                          f"is {hparams['output_neurons']}: they must match for the attention "
                          f"decoder; pass --output_neurons {tokenizer.vocab_size()}")
    return tokenizer, path
