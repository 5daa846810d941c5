"""Export of a trained model as a folder that SpeechBrain's inference classes load:

    EncoderASR.from_hparams(source=folder)          # CTC recipes
    EncoderDecoderASR.from_hparams(source=folder)   # S2S recipes

The folder holds hyperparams.yaml, model.ckpt (the [CNN, Transformer, (seq_lin,) ctc_lin]
state_dict, averaged as for testing), normalizer.ckpt, tokenizer.ckpt and, for S2S with an LM,
lm.ckpt. hyperparams.yaml is self-contained: its model nodes (features, normaliser, CNN,
Transformer, output layers, LM, test searcher) are the training recipe's own nodes with every
value resolved, so the exported model is the trained one (activation, n_mels, Mamba config...);
only dropout is set to 0. Its ``model_kind`` key says CTC or S2S (``exported_kind`` reads it).
Loading it imports modules.TransformerASR: install the repository (``pip install -e .``) or run
from its root.
"""

import copy
import logging
import os
import shutil
from io import StringIO

import ruamel.yaml
import torch
from ruamel.yaml.comments import TaggedScalar
from ruamel.yaml.tag import Tag

from recipes import RecipeError

logger = logging.getLogger(__name__)

KINDS = {"CTC": "EncoderASR", "S2S": "EncoderDecoderASR"}
# Plain values the inference classes and inference.transcriber read from the exported hparams.
COMMON_KEYS = ["sample_rate", "n_mels", "d_model", "output_neurons", "encoder_module",
               "blank_index", "bos_index", "eos_index"]
CTC_KEYS = ["beam_size", "beam_prune_logp", "token_prune_min_logp", "prune_history"]
S2S_KEYS = ["decoder_module", "min_decode_ratio", "max_decode_ratio", "test_beam_size",
            "ctc_weight_decode", "lm_weight", "temperature"]
# The recipe's nodes copied into the exported file (the trained model, as built for training).
MODEL_NODES = {"CTC": ["compute_features", "normalize", "CNN", "Transformer", "ctc_lin"],
               "S2S": ["compute_features", "normalize", "CNN", "Transformer", "seq_lin",
                       "ctc_lin"]}

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
"""

S2S = """
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
{lm_scorer}
scorer: !new:speechbrain.decoders.scorer.ScorerBuilder
    full_scorers: [{scorers}]
    weights:
        {weights}

transformer_beam_search: True

modules:
    encoder: !ref <encoder>
    transformer: !ref <Transformer>
    decoder: !ref <decoder>
"""

LM_SCORER = """
lm_scorer: !new:speechbrain.decoders.scorer.TransformerLMScorer
    language_model: !ref <lm_model>
    temperature: !ref <temperature>
"""

LOADING = """
tokenizer: !new:sentencepiece.SentencePieceProcessor

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        model: !ref <model>
        normalizer: !ref <normalize>
        tokenizer: !ref <tokenizer>{lm_loadable}
"""


def _scalar(value):
    if isinstance(value, bool):
        return "True" if value else "False"
    return repr(value) if isinstance(value, str) else str(value)


def _tag(node, tag):
    node.yaml_set_ctag(Tag(suffix=tag))
    return node


def _model_nodes(hparams, kind, with_lm):
    """The recipe's resolved nodes for inference: {name: ruamel node} (deep copies)."""
    if "recipe_yaml" not in hparams:
        raise RecipeError("hparams lack 'recipe_yaml' (the resolved recipe): load the recipe with "
                          "recipes.hparams.load_recipe to export it")
    tree = ruamel.yaml.YAML().load(hparams["recipe_yaml"])
    names = MODEL_NODES[kind] + (["lm_model"] if with_lm else []) + \
        (["test_search"] if kind == "S2S" else [])
    nodes = {name: tree[name] for name in names}
    nodes = copy.deepcopy(nodes)  # one deepcopy: shared sub-nodes stay shared
    transformer = nodes["Transformer"]
    for name in ("Transformer", "CNN"):  # inference: no dropout whatever the trained rate
        nodes[name]["dropout"] = 0.0
    transformer.pop("encoder_gradient_checkpointing", None)  # a training-time memory option
    transformer["tgt_vocab"] = hparams["output_neurons"]
    nodes["ctc_lin"]["n_neurons"] = hparams["output_neurons"]
    if with_lm:  # the recipe defines the LM class to build once it knows whether one is used
        _tag(nodes["lm_model"], "!new:" + nodes["lm_model"].tag.value[len("!name:"):])
    if kind == "S2S":  # the recipe's test searcher, with the exported scorer
        search = nodes.pop("test_search")
        _tag(search, "!new:" + search.tag.value[len("!name:"):])
        search["scorer"] = TaggedScalar("<scorer>", tag="!ref")  # the scorer defined below
        nodes["decoder"] = search
    return nodes


def inference_yaml(hparams, kind, with_lm=False):
    """Text of the exported hyperparams.yaml for a 'CTC' or 'S2S' recipe.

    hparams: the flat dict of recipes.hparams.load_recipe (its "recipe_yaml" is the resolved
    recipe); plain values may be changed in it (output_neurons: the exported vocabulary).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be 'CTC' or 'S2S', got {kind!r}")
    keys = COMMON_KEYS + (CTC_KEYS if kind == "CTC" else S2S_KEYS)
    head = [f"# {kind} model exported by train_{kind}.py ({hparams.get('experiment', '')}).",
            f"# Load: speechbrain.inference.ASR.{KINDS[kind]}.from_hparams(source=<this folder>)",
            "# (needs the modules package: pip install -e <repository>, or run from its root)",
            "# The nodes below model_kind are the training recipe's, values resolved.", ""]
    head += [f"{k}: {_scalar(hparams[k])}" for k in keys]
    head.append(f"model_kind: {kind}  # read back by recipes.export.exported_kind")
    text = StringIO()
    yaml = ruamel.yaml.YAML()
    yaml.width = 100
    yaml.dump(_model_nodes(hparams, kind, with_lm), text)
    body = text.getvalue()
    if kind == "CTC":
        body += CTC
    else:
        body += S2S.format(
            lm_scorer=LM_SCORER if with_lm else "",
            scorers="!ref <ctc_scorer>, !ref <lm_scorer>" if with_lm else "!ref <ctc_scorer>",
            weights=("ctc: !ref <ctc_weight_decode>\n        transformerlm: !ref <lm_weight>"
                     if with_lm else "ctc: !ref <ctc_weight_decode>"))
    body += LOADING.format(lm_loadable="\n        lm: !ref <lm_model>" if with_lm else "")
    return "\n".join(head) + "\n\n" + body


def exported_kind(model_dir):
    """'CTC' or 'S2S' as recorded in an exported folder's hyperparams.yaml (``model_kind``).

    Folders exported before the kind was recorded wrote a ``decoder`` node exactly for S2S
    models: their kind is read from that, with a log line asking to re-export.
    """
    path = os.path.join(model_dir, "hyperparams.yaml")
    with open(path) as f:
        tree = ruamel.yaml.YAML().load(f) or {}
    kind = tree.get("model_kind")
    if kind is None:
        kind = "S2S" if "decoder" in tree else "CTC"
        logger.warning(f"{path} predates the recorded model_kind (read as {kind}); re-export it "
                       f"to record it: python train_{kind}.py <its recipe YAML and overrides> "
                       "--test_only")
    if kind not in KINDS:
        raise RecipeError(f"{path}: model_kind is {kind!r}, expected CTC or S2S; re-export the "
                          "model with train_CTC.py / train_S2S.py --test_only")
    return kind


def _vocab_size(tokenizer_file):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_file)).vocab_size()


def export_inference_folder(hparams, kind, tokenizer_file, lm_model=None):
    """Writes the inference folder (hparams["inference_folder"]) and returns its path.

    hparams["model"] must hold the weights to export (the averaged ones after testing).
    """
    normalize = hparams["normalize"]
    if getattr(normalize, "norm_type", "global") == "global" and getattr(normalize, "count", 1) == 0:
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
    lm_file = os.path.join(folder, "lm.ckpt")
    if lm_model is not None:
        torch.save(lm_model.state_dict(), lm_file)
    elif os.path.exists(lm_file):  # an earlier export's: this hyperparams.yaml has no LM
        os.remove(lm_file)
    return folder
