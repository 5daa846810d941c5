"""Randomly initialised models exported as inference folders, and speech-like test audio: what the
tests and benchmarks transcribe with when no trained model is at hand (no training, seconds)."""

import glob
import os

import numpy as np
import soundfile
import torch

from recipes.manifest import write_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = os.path.join(REPO, "data", "mini_corpus", "sentences.txt")
SAMPLE_RATE = 16000


def speech_like(seconds, seed=0):
    """float32 (samples,) at 16 kHz: bundled corpus speech looped to `seconds`, else noise."""
    files = sorted(glob.glob(os.path.join(REPO, "data", "mini_corpus", "audio", "*", "*.*")))
    need = int(seconds * SAMPLE_RATE)
    pieces, total = [], 0
    for path in files[:400]:
        audio, sr = soundfile.read(path, dtype="float32", always_2d=True)
        if sr != SAMPLE_RATE:
            continue
        pieces.append(audio.mean(axis=1))
        total += len(pieces[-1])
        if total >= need:
            break
    if not pieces:
        rng = np.random.default_rng(seed)
        return (0.1 * rng.standard_normal(need)).astype("float32")
    loop = np.concatenate(pieces)
    return np.resize(loop, need).astype("float32")


def train_text_csv(path, n_sentences=10000):
    """Writes a manifest of the first n_sentences of data/mini_corpus/sentences.txt (text only:
    what a tokenizer trains on; the audio columns are dummies). Returns its path."""
    with open(SENTENCES) as f:
        lines = [line.strip() for line in f if line.strip()][:n_sentences]
    return write_manifest(path, [{"ID": f"s{i}", "duration": 1.0, "wav": "unused.wav",
                                  "spk_id": "spk", "wrd": line} for i, line in enumerate(lines)])


def export_untrained(recipe, kind, folder, overrides=None, n_sentences=10000):
    """Exports a randomly initialised model of `recipe` ('CTC'|'S2S') as an inference folder.

    The tokenizer is trained as the recipe does (SentencePiece, recipe's token type and
    output_neurons) on the first n_sentences of data/mini_corpus/sentences.txt, or, for S2S with
    overrides {"no_lm": False, "pretrained_lm_tokenizer_path": ...}, loaded with the LM, which
    is then exported too; the feature
    normaliser gets its statistics from 20 s of speech_like audio. Returns the folder.
    """
    from recipes.export import export_inference_folder
    from recipes.hparams import load_recipe
    from recipes.run import recipe_tokenizer

    os.makedirs(os.path.join(folder, "save"), exist_ok=True)
    text_csv = train_text_csv(os.path.join(folder, "sentences.csv"), n_sentences)
    values = {"output_folder": folder, "train_csv": text_csv, "skip_prep": True,
              "data_folder": folder}
    if kind == "S2S":
        values["no_lm"] = True  # unless overrides give an LM folder and no_lm False
    hparams, _, _ = load_recipe(recipe, {**values, **(overrides or {})}, "cpu")
    _, tokenizer_file, lm_model = recipe_tokenizer(hparams, kind, "cpu")
    with torch.no_grad():
        wav = torch.from_numpy(speech_like(20.0)).unsqueeze(0)
        hparams["normalize"].train()
        hparams["normalize"](hparams["compute_features"](wav), torch.ones(1), epoch=0)
    return export_inference_folder(hparams, kind, tokenizer_file, lm_model=lm_model)
