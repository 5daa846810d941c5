"""Loading a recipe YAML: command-line overrides routed into its included common file, device
presets, and one flat hparams dict for the Brain.

A recipe file (hparams/CTC/*.yaml, hparams/S2S/*.yaml) writes its values once, in an anchored
block, and YAML merge keys give them both to the shared file it includes and to its own top level
(so that plain ``load_hyperpyyaml`` sees them too)::

    recipe_hparams: &recipe_hparams
        d_model: 512
        ...
    <<: *recipe_hparams
    recipe: !include:../common/S2S.yaml
        <<: *recipe_hparams

Merge keys copy values when the file is parsed, so a ``--key value`` override of a key of that
block is written to the block, the top level and the include; a key of the included file alone
goes into the include, a top-level key (data_folder) to the top level. Unknown keys are an error
(no silent typos).
"""

import difflib
import os
import re
from io import StringIO

import ruamel.yaml
from hyperpyyaml import load_hyperpyyaml, resolve_references

from recipes import RecipeError
from recipes.device import PRESETS

RECIPE_BLOCK = "recipe_hparams"  # the recipes' anchored block of values (see above)


def yaml_int(text, key, top_level=False):
    """The integer of the first ``key: <int>`` line of YAML text (a trailing comment allowed;
    indented too unless top_level), or None: a plain value read without building anything."""
    indent = "" if top_level else r"[ \t]*"
    match = re.search(rf"^{indent}{re.escape(key)}:[ \t]*(\d+)[ \t]*(?:#.*)?$", text, re.M)
    return None if match is None else int(match.group(1))


def _read_tree(path):
    with open(path) as f:
        return ruamel.yaml.YAML().load(f) or {}


def _include_key(tree):
    """(key, included file name) of the top-level ``!include:`` node, or (None, None)."""
    for key, node in tree.items():
        tag = getattr(getattr(node, "tag", None), "value", None) or ""
        if tag.startswith("!include:"):
            return key, tag[len("!include:"):]
    return None, None


def _block_key(tree, inc_key):
    """The top-level key of the anchored block merged into the include node, or None."""
    merged = [id(m) for m in getattr(tree[inc_key], "merge", None) or []] if inc_key else []
    return next((k for k, node in tree.items() if id(node) in merged), None)


def parse_overrides(overrides):
    """Overrides as a dict; accepts None, a dict or the YAML string of sb.parse_arguments."""
    if not overrides:
        return {}
    if isinstance(overrides, str):
        try:
            return dict(ruamel.yaml.YAML().load(overrides) or {})
        except ruamel.yaml.constructor.DuplicateKeyError as e:
            key = getattr(e.problem_mark, "line", None)
            line = overrides.splitlines()[key] if key is not None else ""
            name = line.split(":", 1)[0].strip() or "a key"
            raise RecipeError(f"--{name} is given more than once on the command line: give it "
                              "once") from e
    return dict(overrides)


def route_overrides(path, overrides, free_keys=()):
    """Returns the overrides nested for ``path``: keys of the included file go under its key.

    Keys in ``free_keys`` that neither file defines go to the top level; any other unknown key
    raises RecipeError naming it and the closest known ones.
    """
    tree = _read_tree(path)
    inc_key, inc_file = _include_key(tree)
    if inc_key is None and hasattr(tree.get("recipe"), "keys") and "recipe_hparams" in tree:
        raise RecipeError(
            f"{path} is the resolved hyperparams.yaml a run writes into its output folder, not a "
            "recipe: rerun with the recipe it was made from (hparams/CTC/... or hparams/S2S/...) "
            "and the same --key value options (the folder's run_settings.json lists the run's "
            "values)")
    inner = {}
    if inc_key is not None:
        inner = _read_tree(os.path.join(os.path.dirname(os.path.abspath(path)), inc_file))
    block_key = _block_key(tree, inc_key)
    block = tree[block_key] if block_key else {}
    routed, nested, in_block = {}, {}, {}
    for key, value in parse_overrides(overrides).items():
        for source in (block, inner, tree):
            if key in source:
                _check_type(key, value, source[key])
                break
        if key in block:  # merged at parse time: every copy gets the new value
            routed[key] = nested[key] = in_block[key] = value
        elif key in inner and key not in tree:
            nested[key] = value
        elif (key in tree and key not in (inc_key, block_key)) or key in free_keys:
            routed[key] = value
        else:
            known = [k for k in dict.fromkeys([*tree, *inner]) if not str(k).startswith("__")]
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise RecipeError(f"Unknown hyperparameter '{key}' for {path} (not in the file nor in "
                           f"its included {inc_file or 'file'}).{hint}")
    if nested:
        routed[inc_key] = nested
    if in_block:
        routed[block_key] = in_block
    return routed, inc_key


def _check_type(key, value, default):
    """An override of a True/False key must be True or False (YAML reads ``no`` as a string);
    one of a number must be a number, or null (e.g. max_batch_ex: no cap; check_sizes refuses
    null sizes)."""
    if value is None and not isinstance(default, bool):
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"--{key} takes True or False, got {value!r}")
    elif _is_number(default) and not _is_number(value):
        raise RecipeError(f"--{key} takes a number (default {default}), got {value!r}")


# sizes that must be positive integers (expand: a positive number), where a recipe has them
POSITIVE_INTS = ("d_model", "nhead", "num_encoder_layers", "d_ffn", "d_state", "d_conv",
                 "output_neurons", "n_mels", "number_of_epochs", "lm_d_model", "lm_nhead",
                 "lm_num_layers", "lm_d_ffn", "avg_checkpoints")
ATTENTION_ENCODERS = ("conformer", "transformer", "branchformer")


def check_sizes(values):
    """RecipeError naming the key when a model size of ``values`` (a resolved recipe: preview)
    cannot build a model: sizes below 1, expand <= 0, attention widths not divisible by their
    number of heads."""
    for key in POSITIVE_INTS:
        value = values.get(key)
        if key in values and value is None:
            raise RecipeError(f"{key} is null: give a whole number >= 1")
        if value is not None and _is_number(value) and (int(value) != value or value < 1):
            hint = (" (to test a trained run without training: --test_only)"
                    if key == "number_of_epochs" else "")
            raise RecipeError(f"{key} is {value}: give a whole number >= 1{hint}")
    layers = values.get("num_decoder_layers")
    if _is_number(layers) and (int(layers) != layers or layers < 0):
        raise RecipeError(f"num_decoder_layers is {layers}: give a whole number >= 0")
    if _is_number(layers) and "seq_cost" in values and layers < 1:  # an S2S recipe
        raise RecipeError("num_decoder_layers is 0: an attention (S2S) recipe decodes with its "
                          "decoder; give a whole number >= 1 (for no decoder, train_CTC.py)")
    if _is_number(layers) and "seq_cost" not in values and "inter_ctc_weight" in values \
            and layers > 0:  # a CTC recipe
        raise RecipeError(f"num_decoder_layers is {layers}: a CTC recipe has no decoder (it "
                          "would be built and trained for nothing); leave it at 0, or use "
                          "train_S2S.py")
    expand = values.get("expand")
    if expand is not None and _is_number(expand) and expand <= 0:
        raise RecipeError(f"expand is {expand}: give a number > 0 (d_inner = expand * d_model)")
    attention = (values.get("encoder_module") in ATTENTION_ENCODERS
                 or (values.get("decoder_module") == "transformer"
                     and (values.get("num_decoder_layers") or 0) > 0))
    pairs = [("d_model", "nhead")] if attention else []
    pairs.append(("lm_d_model", "lm_nhead"))
    for width, heads in pairs:
        w, h = values.get(width), values.get(heads)
        if _is_number(w) and _is_number(h) and h >= 1 and w % h:
            raise RecipeError(f"{width} {w} is not divisible by {heads} {h}: attention splits "
                              f"{width} into {heads} equal heads; choose values that divide")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten(hparams, inc_key):
    """Merges the included file's dict into the top level (top-level keys win); drops '__' keys
    and the recipe's block of values (they are top-level keys already)."""
    flat = dict(hparams[inc_key]) if inc_key in hparams else {}
    flat.update({k: v for k, v in hparams.items() if k != inc_key})
    return {k: v for k, v in flat.items()
            if not str(k).startswith("__") and k != RECIPE_BLOCK}


def preview(path, routed, inc_key):
    """The recipe with references resolved but no object built: a flat dict of ruamel nodes
    (plain values, and tagged mappings for the objects: ``!new:...``). A key the recipe leaves
    for the command line (``!PLACEHOLDER``) and the overrides do not set is a RecipeError."""
    with open(path) as f:
        try:
            text = resolve_references(f, routed).getvalue()
        except ValueError as e:
            match = re.search(r"'(\w+)' is a !PLACEHOLDER", str(e))
            if match is None:
                raise
            key = match.group(1)
            what = (" (the LibriSpeech folder, or the folder the wav paths of your CSVs are "
                    "relative to)" if key == "data_folder" else "")
            raise RecipeError(f"{path} has no value for {key}: give --{key} VALUE{what}") from e
    return flatten(ruamel.yaml.YAML().load(StringIO(text)) or {}, inc_key)


def resolved_yaml(path, routed, inc_key):
    """The text of ``preview``: the recipe as one flat YAML file, every value resolved."""
    out = StringIO()
    ruamel.yaml.YAML().dump(preview(path, routed, inc_key), out)
    return out.getvalue()


def load_recipe(path, overrides=None, device="cpu", cli_settings=None):
    """Loads a recipe for ``device``.

    Arguments
    ---------
    path : str, recipe YAML.
    overrides : dict or YAML string of ``--key value`` pairs.
    device : str, the resolved device (cuda[:i] | mps | cpu).
    cli_settings : dict of preset keys given as SpeechBrain run options on the command line
        (precision, grad_accumulation_factor) -> value.

    Returns
    -------
    hparams : flat dict of built objects and values (hparams["model"] is the trainable model;
        hparams["recipe_yaml"] is the recipe resolved as text, which recipes.export reuses).
    routed : the overrides as applied (nested), for saving the resolved YAML.
    settings : {key: (value, source)} for the device-dependent keys.
    """
    cli_settings = dict(cli_settings or {})
    user = parse_overrides(overrides)
    config = user.get("mamba_config")
    both = [k for k in (config if hasattr(config, "keys") else {}) if k in user
            and user[k] != config[k]]
    if both:
        raise RecipeError(
            "Given twice with different values, as a key and in mamba_config: "
            + ", ".join(f"{k} ({user[k]} and {config[k]})" for k in both)
            + "; give each once")
    routed, inc_key = route_overrides(path, user)
    seen = preview(path, routed, inc_key)
    check_sizes(seen)
    kind = device.split(":")[0]
    settings = {}
    for key, preset in PRESETS[kind].items():
        if key in cli_settings:
            settings[key] = (cli_settings[key], "command line")
        elif key in user:
            settings[key] = (user[key], "command line")
        elif seen.get(key) is not None:
            settings[key] = (seen[key], "yaml")
        else:
            settings[key] = (preset, f"{kind} preset")
    fill = {k: v for k, (v, src) in settings.items() if src != "yaml" and k not in user}
    routed, inc_key = route_overrides(path, {**user, **fill}, free_keys=tuple(PRESETS[kind]))
    with open(path) as f:
        try:
            hparams = flatten(load_hyperpyyaml(f, routed, overrides_must_match=False), inc_key)
        except (ValueError, AssertionError) as e:  # a module refusing its arguments
            what = str(e).strip() or "an assertion without a message (an unknown option value?)"
            raise RecipeError(f"{path} cannot be built with these values: {type(e).__name__}: "
                              f"{what}") from e
    hparams["recipe_yaml"] = resolved_yaml(path, routed, inc_key)
    return hparams, routed, settings
