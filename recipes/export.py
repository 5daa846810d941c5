"""Export of a trained model as a folder that SpeechBrain's inference classes load:

    EncoderASR.from_hparams(source=folder)          # CTC recipes
    EncoderDecoderASR.from_hparams(source=folder)   # S2S recipes

The folder holds hyperparams.yaml (self-contained: the model sizes are written into it),
model.ckpt (the [CNN, Transformer, (seq_lin,) ctc_lin] state_dict, averaged as for testing),
normalizer.ckpt, tokenizer.ckpt and, for S2S with an LM, lm.ckpt. Loading it imports
modules.TransformerASR, so the repository root must be importable (run from it, or add it to
sys.path / PYTHONPATH).
"""

import os
import shutil

import torch

from recipes import RecipeError

COMMON_KEYS = ["sample_rate", "n_fft", "win_length", "n_mels", "d_model", "nhead",
               "num_encoder_layers", "num_decoder_layers", "d_ffn", "output_neurons",
               "encoder_module", "attention_type", "blank_index", "bos_index", "eos_index"]
CTC_KEYS = ["beam_size", "beam_prune_logp", "token_prune_min_logp", "prune_history"]
S2S_KEYS = ["decoder_module", "min_decode_ratio", "max_decode_ratio", "test_beam_size",
            "ctc_weight_decode", "lm_weight", "temperature"]

MODEL = """
compute_features: !new:speechbrain.lobes.features.Fbank
    sample_rate: !ref <sample_rate>
    n_fft: !ref <n_fft>
    win_length: !ref <win_length>
    n_mels: !ref <n_mels>

normalize: !new:speechbrain.processing.features.InputNormalization
    norm_type: global

CNN: !new:speechbrain.lobes.models.convolution.ConvolutionFrontEnd
    input_shape: (8, 10, 80)
    num_blocks: 2
    num_layers_per_block: 1
    out_channels: (64, 32)
    kernel_sizes: (3, 3)
    strides: (2, 2)
    residuals: (False, False)

Transformer: !new:modules.TransformerASR.TransformerASR
    input_size: 640
    tgt_vocab: !ref <output_neurons>
    d_model: !ref <d_model>
    nhead: !ref <nhead>
    num_encoder_layers: !ref <num_encoder_layers>
    num_decoder_layers: !ref <num_decoder_layers>
    d_ffn: !ref <d_ffn>
    dropout: 0.0
    activation: !name:torch.nn.GELU
    encoder_module: !ref <encoder_module>
    {decoder_line}
    attention_type: !ref <attention_type>
    normalize_before: True
    causal: False
    mamba_config: {mamba_config}

ctc_lin: !new:speechbrain.nnet.linear.Linear
    input_size: !ref <d_model>
    n_neurons: !ref <output_neurons>

tokenizer: !new:sentencepiece.SentencePieceProcessor
"""

CTC = """
log_softmax: !new:torch.nn.LogSoftmax
    dim: -1

model: !new:torch.nn.ModuleList
    - [!ref <CNN>, !ref <Transformer>, !ref <ctc_lin>]

encoder: !new:speechbrain.nnet.containers.LengthsCapableSequential
    compute_features: !ref <compute_features>
    normalize: !ref <normalize>
    CNN: !ref <CNN>
    transformer_encoder: !new:speechbrain.lobes.models.transformer.TransformerASR.EncoderWrapper
        transformer: !ref <Transformer>
    ctc_lin: !ref <ctc_lin>
    log_softmax: !ref <log_softmax>

decoding_function: !name:speechbrain.decoders.ctc.CTCBeamSearcher
test_beam_search:
    blank_index: !ref <blank_index>
    beam_size: !ref <beam_size>
    beam_prune_logp: !ref <beam_prune_logp>
    token_prune_min_logp: !ref <token_prune_min_logp>
    prune_history: !ref <prune_history>

modules:
    encoder: !ref <encoder>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        model: !ref <model>
        normalizer: !ref <normalize>
        tokenizer: !ref <tokenizer>
"""

S2S = """
seq_lin: !new:speechbrain.nnet.linear.Linear
    input_size: !ref <d_model>
    n_neurons: !ref <output_neurons>

model: !new:torch.nn.ModuleList
    - [!ref <CNN>, !ref <Transformer>, !ref <seq_lin>, !ref <ctc_lin>]

encoder: !new:speechbrain.nnet.containers.LengthsCapableSequential
    compute_features: !ref <compute_features>
    normalize: !ref <normalize>
    CNN: !ref <CNN>

ctc_scorer: !new:speechbrain.decoders.scorer.CTCScorer
    eos_index: !ref <eos_index>
    blank_index: !ref <blank_index>
    ctc_fc: !ref <ctc_lin>
{lm_block}
scorer: !new:speechbrain.decoders.scorer.ScorerBuilder
    full_scorers: [{scorers}]
    weights:
        {weights}

decoder: !new:modules.decoding.S2SMambaBeamSearcher
    modules: [!ref <Transformer>, !ref <seq_lin>]
    bos_index: !ref <bos_index>
    eos_index: !ref <eos_index>
    min_decode_ratio: !ref <min_decode_ratio>
    max_decode_ratio: !ref <max_decode_ratio>
    beam_size: !ref <test_beam_size>
    temperature: !ref <temperature>
    using_eos_threshold: False
    length_normalization: True
    scorer: !ref <scorer>

transformer_beam_search: True

modules:
    encoder: !ref <encoder>
    transformer: !ref <Transformer>
    decoder: !ref <decoder>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        model: !ref <model>
        normalizer: !ref <normalize>
        tokenizer: !ref <tokenizer>{lm_loadable}
"""

LM = """
lm_model: !new:speechbrain.lobes.models.transformer.TransformerLM.TransformerLM
    vocab: !ref <output_neurons>
    d_model: 768
    nhead: 12
    num_encoder_layers: 12
    num_decoder_layers: 0
    d_ffn: 3072
    dropout: 0.0
    activation: !name:torch.nn.GELU
    normalize_before: False

lm_scorer: !new:speechbrain.decoders.scorer.TransformerLMScorer
    language_model: !ref <lm_model>
    temperature: !ref <temperature>
"""


def _scalar(value):
    if isinstance(value, bool):
        return "True" if value else "False"
    return repr(value) if isinstance(value, str) else str(value)


def inference_yaml(hparams, kind, with_lm=False):
    """Text of the exported hyperparams.yaml for a 'CTC' or 'S2S' recipe."""
    keys = COMMON_KEYS + (CTC_KEYS if kind == "CTC" else S2S_KEYS)
    cls = "EncoderASR" if kind == "CTC" else "EncoderDecoderASR"
    head = [f"# {kind} model exported by train_{kind}.py ({hparams.get('experiment', '')}).",
            f"# Load: speechbrain.inference.ASR.{cls}.from_hparams(source=<this folder>)",
            "# (needs the repository root importable: modules.TransformerASR)", ""]
    head += [f"{k}: {_scalar(hparams[k])}" for k in keys]
    # the model's validated config, every key (d_state, ..., bimamba_merge) as it was trained
    mamba = ", ".join(f"{k}: {_scalar(v)}" for k, v in hparams["Transformer"].mamba_config.items())
    model = MODEL.replace("{mamba_config}", "{{" + mamba + "}}")  # braces survive .format
    if kind == "CTC":
        body = model.format(decoder_line="") + CTC
    else:
        body = model.format(decoder_line="decoder_module: !ref <decoder_module>") + S2S.format(
            lm_block=LM if with_lm else "",
            scorers="!ref <ctc_scorer>, !ref <lm_scorer>" if with_lm else "!ref <ctc_scorer>",
            weights=("ctc: !ref <ctc_weight_decode>\n        transformerlm: !ref <lm_weight>"
                     if with_lm else "ctc: !ref <ctc_weight_decode>"),
            lm_loadable="\n        lm: !ref <lm_model>" if with_lm else "")
    return "\n".join(head) + "\n" + body


def _vocab_size(tokenizer_file):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_file)).vocab_size()


def export_inference_folder(hparams, kind, tokenizer_file, lm_model=None):
    """Writes the inference folder (hparams["inference_folder"]) and returns its path.

    hparams["model"] must hold the weights to export (the averaged ones after testing).
    """
    if getattr(hparams["normalize"], "count", 1) == 0:
        raise RecipeError("Cannot export: the feature normalizer has seen no training batch, so "
                          "the exported model could not normalize its input; train for at least "
                          "one step first")
    folder = hparams["inference_folder"]
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
             for k, v in hparams["model"].state_dict().items()}
    values = dict(hparams)
    if kind == "CTC":  # keep only the outputs the tokenizer can spell (as the test decoding does)
        vocab = _vocab_size(tokenizer_file)
        if vocab < hparams["output_neurons"]:
            last = len(hparams["model"]) - 1  # ctc_lin
            for name in ("w.weight", "w.bias"):
                state[f"{last}.{name}"] = state[f"{last}.{name}"][:vocab]
            values["output_neurons"] = vocab
    with open(os.path.join(folder, "hyperparams.yaml"), "w") as f:
        f.write(inference_yaml(values, kind, with_lm=lm_model is not None))
    torch.save(state, os.path.join(folder, "model.ckpt"))
    hparams["normalize"]._save(os.path.join(folder, "normalizer.ckpt"))
    shutil.copyfile(tokenizer_file, os.path.join(folder, "tokenizer.ckpt"))
    if lm_model is not None:
        torch.save(lm_model.state_dict(), os.path.join(folder, "lm.ckpt"))
    return folder
