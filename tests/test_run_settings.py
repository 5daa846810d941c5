"""recipes.run_settings: a folder holding checkpoints keeps the settings of the run that made
them (the end-to-end refusal is in test_recipes.py)."""

import pytest

from recipes import RecipeError
from recipes.run_settings import check_same_run, record_run


def _run(tmp_path, **values):
    hparams = {"output_folder": str(tmp_path), "save_folder": str(tmp_path / "save"),
               "d_state": 16, "no_lm": False, "number_of_epochs": 5, "model": object(),
               "mamba_config": {"d_state": 16}, **values}
    return hparams


def test_only_changed_settings_that_matter_are_refused(tmp_path):
    record_run(_run(tmp_path))
    check_same_run(_run(tmp_path, d_state=32))  # no checkpoint yet: a fresh start, fine
    (tmp_path / "save" / "CKPT+2026").mkdir(parents=True)
    check_same_run(_run(tmp_path, number_of_epochs=9))  # continuing with more epochs
    with pytest.raises(RecipeError, match="d_state: 16 there, 32 now"):
        check_same_run(_run(tmp_path, d_state=32))
    with pytest.raises(RecipeError, match="no_lm: False there, True now"):
        check_same_run(_run(tmp_path, no_lm=True))
    check_same_run(_run(tmp_path, no_lm=True), testing_only=True)  # testing without the LM
    with pytest.raises(RecipeError, match="mamba_config: .*bimamba_merge"):  # mappings count
        check_same_run(_run(tmp_path, mamba_config={"d_state": 16, "bimamba_merge": "sum"}))
    check_same_run(_run(tmp_path, sorting="random", lr_model=0.01, train_csv="other.csv"),
                   testing_only=True)  # training options a re-test need not repeat
    with pytest.raises(RecipeError, match="sorting: None there, 'random' now"):
        check_same_run(_run(tmp_path, sorting="random"))
    with pytest.raises(RecipeError, match="d_state: 16 there, 8 now"):
        check_same_run(_run(tmp_path, d_state=8, sorting="random"), testing_only=True)
    (tmp_path / "run_settings.json").write_text("{not json")
    with pytest.raises(RecipeError, match="Cannot read .*run_settings.json"):
        check_same_run(_run(tmp_path))
