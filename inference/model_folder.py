"""Model folders are data, not code.

An exported folder's hyperparams.yaml is read by HyperPyYAML, whose ``!new:``, ``!name:``,
``!apply:`` and ``!module:`` tags import and call any Python callable: a folder from an unknown
source could run ``!apply:os.system``. ``check_hyperparams`` walks the YAML's node graph
without building anything and accepts only what recipes/export.py writes: the classes and
functions of ``ALLOWED`` (through ``!new:`` / ``!name:``), ``!ref`` / ``!copy`` / ``!tuple``,
and plain YAML values. ``weights_only_loads`` makes every ``torch.load`` while the folder is
loaded, SpeechBrain's included, unpickle tensors and plain containers only.
"""

import contextlib
import os

import ruamel.yaml

from recipes import RecipeError

# Every !new: / !name: target that recipes/export.py writes (CTC and S2S, with or without LM).
ALLOWED = frozenset({
    "speechbrain.lobes.features.Fbank",
    "modules.streaming.CausalFbank",  # streaming recipes
    "speechbrain.processing.features.InputNormalization",
    "speechbrain.lobes.models.convolution.ConvolutionFrontEnd",
    "modules.TransformerASR.TransformerASR",
    "speechbrain.nnet.linear.Linear",
    "sentencepiece.SentencePieceProcessor",
    "torch.nn.LogSoftmax",
    "torch.nn.ModuleList",
    # activations a recipe may set (activation, conformer_activation, ...: --activation ...)
    "torch.nn.GELU", "torch.nn.ReLU", "torch.nn.SiLU", "torch.nn.Identity", "torch.nn.Tanh",
    "torch.nn.LeakyReLU", "speechbrain.nnet.activations.Swish",
    "speechbrain.nnet.containers.LengthsCapableSequential",
    "speechbrain.lobes.models.transformer.TransformerASR.EncoderWrapper",
    "speechbrain.decoders.ctc.CTCBeamSearcher",
    "speechbrain.decoders.scorer.CTCScorer",
    "speechbrain.decoders.scorer.ScorerBuilder",
    "speechbrain.decoders.scorer.TransformerLMScorer",
    "speechbrain.lobes.models.transformer.TransformerLM.TransformerLM",
    "modules.decoding.S2SMambaBeamSearcher",
    "speechbrain.utils.parameter_transfer.Pretrainer",
})
PLAIN_TAGS = frozenset({"!ref", "!copy", "!tuple"})
# Pretrainer arguments that would fetch files from elsewhere (paths: any URL, hub id or file)
# or write elsewhere (collect_in): an exported folder has only its loadables.
PRETRAINER_KEYS = frozenset({"loadables"})


class TranscriberError(RecipeError):
    """A model folder or an option that cannot be used; the message says which and why (audio
    problems are recipes.audio.AudioError). Also importable from inference.transcriber."""


class UnsafeModelFolder(TranscriberError):
    """A model folder whose hyperparams.yaml asks for something this project never writes."""


REEXPORT = ("re-export the model (train_CTC.py / train_S2S.py --test_only) or download the "
            "folder again")


def _walk(node, path):
    yield node, path
    if isinstance(node, ruamel.yaml.MappingNode):
        for key, value in node.value:
            yield from _walk(value, f"{path}.{key.value}" if path else str(key.value))
    elif isinstance(node, ruamel.yaml.SequenceNode):
        for i, value in enumerate(node.value):
            yield from _walk(value, f"{path}[{i}]")


def check_hyperparams(path):
    """Raises UnsafeModelFolder naming the key and the tag when ``path`` (a hyperparams.yaml)
    uses a tag or a callable outside the allowlist, TranscriberError when it is damaged (not
    YAML, empty, not a mapping); builds nothing, imports nothing."""
    try:
        with open(path, encoding="utf-8") as f:
            root = ruamel.yaml.YAML().compose(f.read())
    except (ruamel.yaml.YAMLError, UnicodeDecodeError) as e:
        raise TranscriberError(f"{path} is damaged: it is not valid YAML ({e}); {REEXPORT}") \
            from e
    if not isinstance(root, ruamel.yaml.MappingNode):
        what = "empty" if root is None else "not a mapping of keys"
        raise TranscriberError(f"{path} is damaged: it is {what}, not an exported model's "
                               f"hyperparams; {REEXPORT}")
    for node, key in _walk(root, ""):
        tag = node.tag.value if hasattr(node.tag, "value") else str(node.tag)
        if tag is None or tag.startswith("tag:yaml.org,2002:") and "python" not in tag:
            continue  # plain YAML values
        kind, _, target = tag.partition(":")
        if tag in PLAIN_TAGS or (kind in ("!new", "!name") and target in ALLOWED):
            if target.endswith(".Pretrainer") and isinstance(node, ruamel.yaml.MappingNode):
                extra = {k.value for k, _ in node.value} - PRETRAINER_KEYS
                if extra:
                    raise UnsafeModelFolder(
                        f"Refusing to load {path}: {key} (Pretrainer) sets {', '.join(extra)}, "
                        "which could fetch or write files outside the folder; an exported model "
                        "folder has only 'loadables'")
            continue
        raise UnsafeModelFolder(
            f"Refusing to load {path}: {key or 'the document'} uses the tag {tag}, which this "
            "project never writes into a model folder (HyperPyYAML would import and run "
            f"{target or tag} while loading). Nothing was loaded. Use a folder exported by "
            "train_CTC.py / train_S2S.py, or re-export the model from its checkpoints.")


@contextlib.contextmanager
def weights_only_loads():
    """Within the block every torch.load, also SpeechBrain's (which do not pass weights_only),
    reads tensors and plain containers only, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",
                                                   "TORCH_FORCE_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
