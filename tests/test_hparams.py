"""Every recipe YAML builds its model from the YAML alone; parameter counts, official state_dict
layouts, command-line knobs (Mamba sizes, encoder choice) and override checking."""

import json
import os
import re
from pathlib import Path

import pytest
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
from speechbrain.nnet.linear import Linear

from modules.TransformerASR import TransformerASR
from recipes import RecipeError
from recipes.hparams import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(REPO)) for p in REPO.glob("hparams/[CS]*/*.yaml"))
OFFICIAL = REPO / "tests" / "data" / "official_state_dict"
COUNTS = {  # trainable parameters of `model` (the official recipes' counts, and our CTC small)
    "hparams/S2S/conformer_small.yaml": 13_327_296,
    "hparams/S2S/conmamba_small.yaml": 14_075_520,
    "hparams/S2S/conmambamamba_small.yaml": 14_570_880,
    "hparams/S2S/conformer_large.yaml": 109_136_048,
    "hparams/S2S/conmamba_large.yaml": 115_187_888,
    "hparams/S2S/conmambamamba_large.yaml": 122_917_040,
    "hparams/CTC/conformer_large.yaml": 28_786_111,
    "hparams/CTC/conmamba_large.yaml": 31_555_519,
    "hparams/CTC/conformer_small.yaml": 19_256_767,
    "hparams/CTC/conmamba_small.yaml": 20_808_127,
}
LAYOUTS = {"hparams/S2S/conmamba_small.yaml": "S2S_conmamba_small.txt",
           "hparams/S2S/conmambamamba_small.yaml": "S2S_conmambamamba_small.txt",
           "hparams/CTC/conmamba_large.yaml": "CTC_conmamba_large.txt"}
SIZE_KEYS = ["d_model", "nhead", "num_encoder_layers", "d_ffn", "output_neurons"]
MAMBA_KEYS = ["d_state", "expand", "d_conv", "bidirectional"]


def count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds each recipe once, exactly as documented: load_hyperpyyaml(f, {data_folder})."""
    cache, cwd = {}, os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))  # the checkpointer creates results/... folders

    def build(rel):
        if rel not in cache:
            with open(REPO / rel) as f:
                cache[rel] = load_hyperpyyaml(f, {"data_folder": "/no/data/needed"})
        return cache[rel]
    yield build
    os.chdir(cwd)


def test_recipe_set_is_complete():
    names = {Path(r).stem for r in RECIPES if "/S2S/" in r}
    assert {"conformer_small", "conformer_large", "conmamba_small", "conmamba_large",
            "conmambamamba_small", "conmambamamba_large"} <= names
    names = {Path(r).stem for r in RECIPES if "/CTC/" in r}
    assert {"conformer_small", "conformer_large", "conmamba_small", "conmamba_large"} <= names


@pytest.mark.parametrize("rel", RECIPES)
def test_yaml_builds_its_model(built, rel):
    hp = built(rel)
    model = hp["model"]
    assert all(k in hp for k in SIZE_KEYS + ["num_decoder_layers"] * ("/S2S/" in rel))
    # the Mamba sweep keys are the recipe's own keys exactly when it has Mamba layers
    uses_mamba = "mamba" in f"{hp['encoder_module']} {hp.get('decoder_module')}"
    assert all((k in hp) == uses_mamba for k in MAMBA_KEYS), rel
    kinds = [ConvolutionFrontEnd, TransformerASR] + [Linear] * (2 if "/S2S/" in rel else 1)
    assert [type(m) for m in model] == kinds  # [CNN, Transformer, (seq_lin,) ctc_lin]
    if rel in COUNTS:
        assert count(model) == pytest.approx(COUNTS[rel], abs=100_000)
        assert count(model) == COUNTS[rel]


@pytest.mark.parametrize("rel", sorted(LAYOUTS))
def test_official_state_dict_layout(built, rel):
    expected = [(k, json.loads(s)) for k, s in (line.split("\t") for line in
                (OFFICIAL / LAYOUTS[rel]).read_text().splitlines())]
    ours = [(k, list(v.shape)) for k, v in built(rel)["model"].state_dict().items()]
    assert ours == expected


def test_common_fragments_need_a_recipe(repo_root):
    with open(repo_root / "hparams/common/CTC.yaml") as f:
        with pytest.raises(ValueError, match="PLACEHOLDER"):
            load_hyperpyyaml(f, {"data_folder": "x"})


def _tiny(repo_root, tmp_path, kind="CTC", **overrides):
    hp, _, _ = load_recipe(str(repo_root / f"hparams/{kind}/tiny.yaml"),
                           {"output_folder": str(tmp_path), **overrides})
    return hp


def _mamba_keys(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if ".mamba." in k}


def test_mamba_knobs_change_the_model(repo_root, tmp_path):
    base = _tiny(repo_root, tmp_path)
    d_model, layers, d_inner = base["d_model"], base["num_encoder_layers"], 2 * base["d_model"]
    # d_state: A_log (d_inner x N) and x_proj's B, C rows (2N x d_inner), in both directions
    bigger = _tiny(repo_root, tmp_path, d_state=12)
    assert count(bigger["model"]) - count(base["model"]) == layers * 2 * d_inner * 3 * (12 - 4)
    assert _mamba_keys(bigger["model"])["1.encoder.layers.0.mamba.A_log"] == (d_inner, 12)
    wide = _mamba_keys(_tiny(repo_root, tmp_path, expand=4)["model"])
    assert wide["1.encoder.layers.0.mamba.in_proj.weight"] == (2 * 4 * d_model, d_model)
    conv = _mamba_keys(_tiny(repo_root, tmp_path, d_conv=3)["model"])
    assert conv["1.encoder.layers.0.mamba.conv1d.weight"] == (d_inner, 1, 3)
    uni = _tiny(repo_root, tmp_path, bidirectional=False)
    assert not any("_b" in k.rsplit(".", 2)[-2] for k in _mamba_keys(uni["model"]))
    assert count(uni["model"]) < count(base["model"])


@pytest.mark.parametrize("kind", ["CTC", "S2S"])
def test_cnn_dropout_knob(repo_root, tmp_path, kind):
    def rates(hp):
        return [m.p for m in hp["CNN"].modules() if isinstance(m, torch.nn.Dropout)]

    assert rates(_tiny(repo_root, tmp_path, kind)) == [0.1, 0.1]  # SpeechBrain's default
    assert rates(_tiny(repo_root, tmp_path, kind, cnn_dropout=0.0)) == [0.0, 0.0]


def test_knobs_from_the_command_line(repo_root, tmp_path):
    """The scripts' path: sb.parse_arguments leaves --d_state etc. as a YAML overrides string."""
    import speechbrain as sb

    argv = [str(repo_root / "hparams/CTC/tiny.yaml"), "--d_state", "12", "--bidirectional",
            "False", "--output_folder", str(tmp_path), "--device", "cpu"]
    path, run_opts, overrides = sb.parse_arguments(argv)
    hp, _, _ = load_recipe(path, overrides, device=run_opts.device)
    assert hp["mamba_config"] == {"d_state": 12, "expand": 2, "d_conv": 4, "bidirectional": False}
    assert _mamba_keys(hp["model"])["1.encoder.layers.0.mamba.A_log"] == (128, 12)


def test_sweep_on_a_paper_recipe(repo_root, tmp_path):
    """The issue's example: --d_state 32 --expand 4 on a ConMamba recipe."""
    hp, _, _ = load_recipe(str(repo_root / "hparams/S2S/conmamba_small.yaml"),
                           {"data_folder": "x", "output_folder": str(tmp_path),
                            "d_state": 32, "expand": 4})
    keys = _mamba_keys(hp["model"])
    assert keys["1.encoder.layers.0.mamba.A_log"] == (4 * 144, 32)
    assert count(hp["model"]) > COUNTS["hparams/S2S/conmamba_small.yaml"]
    assert hp["mamba_config"] == {"d_state": 32, "expand": 4, "d_conv": 4, "bidirectional": True}


@pytest.mark.parametrize("rel", [r for r in RECIPES if "small" in r or "tiny" in r])
def test_transformer_encoder_by_override(repo_root, tmp_path, rel):
    overrides = dict(data_folder="x", output_folder=str(tmp_path), encoder_module="transformer")
    hp, _, _ = load_recipe(str(repo_root / rel), overrides)
    encoder = hp["model"][1].encoder
    assert type(encoder).__name__ == "TransformerEncoder"
    if "tiny" in rel:  # and it runs
        feats = torch.randn(2, 60, 80)
        out = hp["model"][1].encode(hp["model"][0](feats), torch.tensor([1.0, 0.7]))
        assert out.shape == (2, 15, hp["d_model"])


def test_overrides_are_routed_and_checked(repo_root, tmp_path):
    hp = _tiny(repo_root, tmp_path, number_of_epochs=7, d_model=48)
    assert hp["epoch_counter"].limit == 7  # key of the included common file
    assert hp["model"][1].encoder.layers[0].mamba.in_proj.in_features == 48  # recipe key
    with pytest.raises(RecipeError, match="Unknown hyperparameter 'd_stat'.*Did you mean: d_state"):
        _tiny(repo_root, tmp_path, d_stat=8)


def test_a_key_given_twice_on_the_command_line_is_refused(repo_root, tmp_path):
    _, _, overrides = sb.parse_arguments([str(repo_root / "hparams/CTC/tiny.yaml"),
                                          "--number_of_epochs", "1", "--d_model", "48",
                                          "--number_of_epochs", "3"])
    with pytest.raises(RecipeError, match="--number_of_epochs is given more than once"):
        load_recipe(str(repo_root / "hparams/CTC/tiny.yaml"), overrides, device="cpu")


@pytest.mark.parametrize("rel", RECIPES)
def test_recipe_values_are_written_once(rel):
    """No pass-through lines (``key: !ref <key>``): the recipe's block reaches the included file
    and the top level through YAML merge keys."""
    text = (REPO / rel).read_text()
    include = re.search(r"^recipe: !include:.*\n((?:[ #].*\n|\n)*)", text, re.M).group(1)
    assert include.split() == ["<<:", "*recipe_hparams"]
    assert not re.search(r"^\s+(\w+): !ref <\1>\s*(#.*)?$", text.split("\nrecipe:")[0], re.M)
    assert text.count("<<: *recipe_hparams") == 2


def test_override_of_a_recipe_value_reaches_every_copy(repo_root, tmp_path):
    hp = _tiny(repo_root, tmp_path, d_model=48, number_of_epochs=3)  # both set by tiny.yaml
    assert hp["d_model"] == 48 and hp["model"][1].encoder.layers[0].mamba.in_proj.in_features == 48
    assert hp["number_of_epochs"] == 3 and hp["epoch_counter"].limit == 3


@pytest.mark.parametrize("overrides, message", [
    ({"d_state": 0}, "d_state is 0: give a whole number >= 1"),
    ({"expand": -1}, "expand is -1: give a number > 0"),
    ({"d_conv": 0}, "d_conv is 0: give a whole number >= 1"),
    ({"number_of_epochs": 0}, "number_of_epochs is 0: .*--test_only"),
    ({"bidirectional": "no"}, "--bidirectional takes True or False, got 'no'"),
    ({"d_state": "big"}, "--d_state takes a number"),
    ({"d_state": None}, "d_state is null"),
    ({"nhead": 3}, "d_model 512 is not divisible by nhead 3"),
    ({"lm_d_model": 128}, "lm_d_model 128 is not divisible by lm_nhead 12"),
    ({"avg_checkpoints": 0}, "avg_checkpoints is 0: give a whole number >= 1"),
    ({"num_decoder_layers": 0}, "num_decoder_layers is 0: an attention \\(S2S\\) recipe"),
    ({"d_model": 511, "nhead": 1}, "cannot be built with these values: ValueError: .*odd"),
    ({"mamba_config": {"bimamba_merge": "max"}}, "cannot be built.*bimamba_merge"),
])
def test_sizes_that_cannot_build_a_model_are_refused(overrides, message, repo_root, tmp_path):
    """Checked before anything is built, with the key named (they used to fail deep inside
    the model, or at the first step, or silently: 'no' is a true string)."""
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(repo_root / "hparams/S2S/conmamba_large.yaml"),
                    {"output_folder": str(tmp_path), "data_folder": str(tmp_path), **overrides})


def test_null_is_a_value_for_number_keys_that_take_it(repo_root, tmp_path):
    assert _tiny(repo_root, tmp_path, max_batch_ex=None)["max_batch_ex"] is None  # no cap


def test_attention_heads_only_checked_where_attention_is_used(repo_root, tmp_path):
    """A ConMamba CTC model has no attention: any nhead builds; a Conformer needs a divisor."""
    hp = _tiny(repo_root, tmp_path, nhead=3, d_model=32)
    assert hp["model"][1].encoder.layers[0].mamba is not None
    with pytest.raises(RecipeError, match="d_model 32 is not divisible by nhead 3"):
        _tiny(repo_root, tmp_path, nhead=3, d_model=32, encoder_module="conformer")


def test_mamba_config_values_are_checked():
    from modules.mamba import check_mamba_config

    assert check_mamba_config({"d_state": 8, "expand": 1.5})["expand"] == 1.5
    for bad, message in (({"d_state": 0}, "d_state must be a whole number >= 1"),
                         ({"d_conv": 2.5}, "d_conv must be a whole number"),
                         ({"expand": 0}, "expand must be a number > 0"),
                         ({"bidirectional": "no"}, "bidirectional must be True or False"),
                         ({"bimamba_merge": "max"}, "bimamba_merge must be 'mean' or 'sum'")):
        with pytest.raises(ValueError, match=message):
            check_mamba_config(bad)


def test_a_value_left_for_the_command_line_is_asked_for(repo_root, tmp_path):
    with pytest.raises(RecipeError, match="has no value for data_folder: give --data_folder"):
        load_recipe(str(repo_root / "hparams/S2S/conmamba_large.yaml"),
                    {"output_folder": str(tmp_path)})


def test_yaml_int_reads_plain_integers_only():
    from recipes.hparams import yaml_int

    text = ("block:\n  n_warmup_steps: 150\nnumber_of_epochs: 7  # comment\nlm_d_model: 12 \n"
            "lr: 3.5\nd_state: !ref <x>\n")
    assert yaml_int(text, "n_warmup_steps") == 150
    assert yaml_int(text, "n_warmup_steps", top_level=True) is None
    assert yaml_int(text, "number_of_epochs", top_level=True) == 7
    assert yaml_int(text, "lm_d_model", top_level=True) == 12
    assert yaml_int(text, "lr") is None and yaml_int(text, "d_state") is None
    assert yaml_int("lm_d_model2: 5\n", "lm_d_model") is None


def test_ctc_decoder_layers_and_resolved_yaml_are_refused(repo_root, tmp_path):
    with pytest.raises(RecipeError, match="num_decoder_layers is 2: a CTC recipe has no decoder"):
        _tiny(repo_root, tmp_path, num_decoder_layers=2)
    saved = tmp_path / "hyperparams.yaml"  # as a run writes it: the included recipe resolved
    text = (repo_root / "hparams/CTC/tiny.yaml").read_text()
    common = (repo_root / "hparams/common/CTC.yaml").read_text()
    inlined = text.split("recipe: !include:")[0] + "recipe:\n" + "".join(
        f"    {line}\n" for line in common.splitlines() if line.strip())
    saved.write_text(inlined.replace("<<: *recipe_hparams  #", "#"))
    with pytest.raises(RecipeError, match="resolved hyperparams.yaml a run writes"):
        load_recipe(str(saved), {"output_folder": str(tmp_path)})


def test_a_mamba_key_given_twice_with_two_values_is_refused(repo_root, tmp_path):
    with pytest.raises(RecipeError, match=r"d_state \(4 and 16\); give each once"):
        _tiny(repo_root, tmp_path, d_state=4, mamba_config={"d_state": 16})
    assert _tiny(repo_root, tmp_path, d_state=16, mamba_config={"d_state": 16})["d_state"] == 16
