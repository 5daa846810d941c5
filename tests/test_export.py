"""recipes.export: the exported folder is the trained model (the recipe's own nodes and values),
and it records whether it is CTC or S2S."""

import shutil
from pathlib import Path

import pytest
import torch

from recipes import RecipeError
from recipes.export import exported_kind, export_inference_folder
from recipes.hparams import load_recipe
from recipes.untrained import speech_like, train_text_csv

REPO = Path(__file__).resolve().parents[1]
# Not the recipes' defaults (GELU, 80 mels): an export that re-defined the model would differ.
# `activation` is that of the Mamba encoder and of the Transformer decoder.
OVERRIDES = {"CTC": "activation: !name:torch.nn.ReLU\nn_mels: 64\nencoder_module: mamba\n",
             "S2S": "activation: !name:torch.nn.ReLU\nn_mels: 64\ndecoder_module: transformer\n"}


def _trained_and_exported(kind, tmp_path, extra=""):
    """(training hparams after a few steps, the EncoderASR / EncoderDecoderASR of its export)."""
    from speechbrain.inference.ASR import EncoderASR, EncoderDecoderASR

    from recipes.tokenizer import train_tokenizer

    text_csv = train_text_csv(str(tmp_path / "sentences.csv"), 500)
    hp, _, _ = load_recipe(str(REPO / f"hparams/{kind}/tiny.yaml"),
                           OVERRIDES[kind] + extra + f"output_folder: {tmp_path}\ntrain_csv: {text_csv}\n")
    assert hp["n_mels"] == 64
    _, tokenizer_file = train_tokenizer(hp)
    model, wav = hp["model"], torch.from_numpy(speech_like(3.0)).unsqueeze(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # weights away from their initialisation
        feats = hp["normalize"](hp["compute_features"](wav), torch.ones(1), epoch=0)
        enc = model[1].encode(model[0](feats), torch.ones(1))
        optimizer.zero_grad()
        enc.pow(2).mean().backward()
        optimizer.step()
    model.eval()
    hp["normalize"].eval()
    folder = export_inference_folder(hp, kind, tokenizer_file)
    interface = EncoderASR if kind == "CTC" else EncoderDecoderASR
    asr = interface.from_hparams(source=folder, savedir=folder, run_opts={"device": "cpu"})
    return hp, asr


# CTC: more outputs than the tokenizer's pieces (the export drops the extra ones); per-utterance
# feature normalisation (no statistics to learn: the export must not ask for them)
@pytest.mark.parametrize("kind, extra", [("CTC", "output_neurons: 40\n"),
                                         ("CTC", "norm_type: sentence\n"), ("S2S", "")])
def test_export_reproduces_the_trained_model(kind, extra, tmp_path):
    hp, asr = _trained_and_exported(kind, tmp_path, extra)
    assert exported_kind(hp["inference_folder"]) == kind
    def types(model):
        return sorted(type(m).__name__ for m in model.modules())

    assert "ReLU" in types(asr.hparams.Transformer)
    assert types(asr.hparams.Transformer) == types(hp["Transformer"])
    for part in ("Transformer", "CNN"):  # no dropout left (the tiny recipes train with 0.1)
        dropouts = [m.p for m in getattr(asr.hparams, part).modules()
                    if isinstance(m, torch.nn.Dropout)]
        assert dropouts and set(dropouts) == {0.0}, part
    wavs = torch.from_numpy(speech_like(4.0, seed=1)).unsqueeze(0)
    lens = torch.ones(1)
    with torch.no_grad():
        feats = hp["normalize"](hp["compute_features"](wavs), lens)
        assert feats.shape[-1] == 64
        trained = hp["model"][1].encode(hp["model"][0](feats), lens)
        if kind == "CTC":
            if "output_neurons" in extra:
                assert asr.tokenizer.vocab_size() < hp["output_neurons"]
            logits = hp["ctc_lin"](trained)[..., : asr.tokenizer.vocab_size()]
            assert torch.equal(asr.encode_batch(wavs, lens), logits.log_softmax(-1))
        else:
            assert torch.equal(asr.encode_batch(wavs, lens), trained)


def test_kind_of_a_folder_exported_before_it_was_recorded(tmp_path, caplog):
    hp, _ = _trained_and_exported("S2S", tmp_path)
    folder = Path(hp["inference_folder"])
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    text = (old / "hyperparams.yaml").read_text()
    (old / "hyperparams.yaml").write_text(text.replace("model_kind: S2S", ""))
    assert exported_kind(str(old)) == "S2S"  # the previous export wrote `decoder:` for S2S only
    assert "re-export" in caplog.text
    (old / "hyperparams.yaml").write_text(text.replace("model_kind: S2S", "model_kind: RNNT"))
    with pytest.raises(RecipeError, match="expected CTC or S2S"):
        exported_kind(str(old))
