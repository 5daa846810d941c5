"""Model folders are data, not code (inference.model_folder), and transcribe.py keeps going past
a bad file."""

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import transcribe
from inference.model_folder import UnsafeModelFolder, check_hyperparams, weights_only_loads
from inference.transcriber import Transcriber, TranscriberError
from recipes import user_message
from recipes.untrained import export_untrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "data", "mini_corpus")


@pytest.fixture(scope="module")
def ctc_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_ctc")
    return export_untrained(os.path.join(REPO, "hparams/CTC/tiny.yaml"), "CTC", str(folder),
                            n_sentences=2000)


@pytest.fixture
def evil_dir(ctc_dir, tmp_path):
    """The exported folder with one extra key that would create a file when built."""
    folder = tmp_path / "evil"
    shutil.copytree(ctc_dir, folder)
    marker = tmp_path / "PWNED"
    with open(folder / "hyperparams.yaml", "a") as f:
        f.write(f'\npayload: !apply:os.system ["touch {marker}"]\n')
    return str(folder), marker


@pytest.mark.parametrize("kind,with_lm", [("CTC", False), ("S2S", False), ("S2S", True)])
def test_every_exported_yaml_passes(kind, with_lm, tmp_path):
    from recipes.export import inference_yaml
    from recipes.hparams import load_recipe

    hparams, _, _ = load_recipe(os.path.join(REPO, f"hparams/{kind}/tiny.yaml"),
                                {"output_folder": str(tmp_path / "out")})
    path = tmp_path / "hyperparams.yaml"
    path.write_text(inference_yaml(hparams, kind, with_lm=with_lm))
    check_hyperparams(path)


@pytest.mark.parametrize("rel", sorted(os.path.relpath(p, REPO) for kind in ("CTC", "S2S")
                                       for p in glob.glob(os.path.join(REPO, "hparams", kind,
                                                                       "*.yaml"))))
def test_every_recipe_exports_a_folder_that_loads(rel, tmp_path):
    """Whatever recipe trained it (streaming features, another activation), the exported
    hyperparams.yaml passes the allowlist."""
    from recipes.export import inference_yaml
    from recipes.hparams import load_recipe

    kind = rel.split(os.sep)[1]
    out = tmp_path / "out"
    overrides = (f"output_folder: {out}\ndata_folder: {out}\nskip_prep: True\n"
                 "activation: !name:torch.nn.ReLU\n" + ("no_lm: True\n" if kind == "S2S" else ""))
    hparams, _, _ = load_recipe(os.path.join(REPO, rel), overrides)
    path = tmp_path / "hyperparams.yaml"
    path.write_text(inference_yaml(hparams, kind))
    check_hyperparams(path)


@pytest.mark.parametrize("line,refused", [
    ('x: !apply:os.system ["true"]', "!apply:os.system"),
    ("x: !new:subprocess.Popen [[true]]", "!new:subprocess.Popen"),
    ("x: !name:builtins.eval", "!name:builtins.eval"),
    ("x: !include:other.yaml", "!include:other.yaml"),
    ("x: !module:os", "!module:os"),
    ("x: [1, {y: !apply:os.system [true]}]", "x[1].y"),
    ("x: !!python/object/apply:os.system [true]", "python/object"),
])
def test_unknown_tags_are_refused(line, refused, tmp_path):
    path = tmp_path / "hyperparams.yaml"
    path.write_text(f"sample_rate: 16000\n{line}\n")
    with pytest.raises(UnsafeModelFolder, match="Refusing to load") as e:
        check_hyperparams(path)
    assert refused in str(e.value)


def test_pretrainer_may_not_fetch_from_elsewhere(tmp_path):
    path = tmp_path / "hyperparams.yaml"
    path.write_text("pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer\n"
                    "    loadables: {}\n    paths:\n        model: https://example.org/m.ckpt\n")
    with pytest.raises(UnsafeModelFolder, match="paths"):
        check_hyperparams(path)


def test_folder_calling_os_system_is_refused_and_nothing_runs(evil_dir):
    folder, marker = evil_dir
    with pytest.raises(UnsafeModelFolder, match="!apply:os.system"):
        Transcriber.from_folder(folder, device="cpu")
    wav = os.path.join(CORPUS, "audio", "test", sorted(os.listdir(
        os.path.join(CORPUS, "audio", "test")))[0])
    proc = subprocess.run([sys.executable, os.path.join(REPO, "transcribe.py"), folder, wav,
                           "--device", "cpu"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "ERROR: Refusing to load" in proc.stderr and "payload" in proc.stderr
    assert not marker.exists()


def test_weights_only_loads_refuse_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "model.ckpt"
    torch.save({"x": Payload()}, path, _use_new_zipfile_serialization=True)
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with weights_only_loads(), pytest.raises(Exception, match="[Ww]eights only"):
            torch.load(path)  # as SpeechBrain's loaders call it
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]


def test_batch_with_a_corrupt_file_transcribes_the_others(ctc_dir, tmp_path):
    test_audio = os.path.join(CORPUS, "audio", "test")
    good = [os.path.join(test_audio, n) for n in sorted(os.listdir(test_audio))[:2]]
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(os.urandom(4000))
    files = [good[0], str(corrupt), good[1]]
    cmd = [sys.executable, os.path.join(REPO, "transcribe.py"), ctc_dir, *files, "--device",
           "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == good
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and str(corrupt) in errors[0]

    fast = subprocess.run(cmd + ["--fail-fast"], capture_output=True, text=True, cwd=REPO)
    assert fast.returncode == 1 and fast.stdout == "" and str(corrupt) in fast.stderr

    asr = Transcriber.from_folder(ctc_dir, device="cpu")
    seen = []
    texts = asr.transcribe_files(files, on_error=lambda path, e: seen.append(path))
    assert seen == [str(corrupt)] and texts[1] is None
    assert texts[0] == asr.transcribe_files([good[0]])[0]
    assert texts[2] == asr.transcribe_files([good[1]])[0]



@pytest.mark.parametrize("name,damage", [
    ("hyperparams.yaml", b"sample_rate: [16000\nmodel: {"), ("hyperparams.yaml", b""),
    ("model.ckpt", 3000), ("model.ckpt", b"not a zip: a pickle? " * 50), ("normalizer.ckpt", 100),
    ("tokenizer.ckpt", 100)])
def test_damaged_folder_files_are_named(name, damage, ctc_dir, tmp_path, capsys):
    """A truncated or unparsable file: an error naming it and saying to re-export or download
    the folder again (never torch's advice to load it with weights_only=False)."""
    folder = tmp_path / "damaged"
    shutil.copytree(ctc_dir, folder)
    path = folder / name
    path.write_bytes(damage if isinstance(damage, bytes) else path.read_bytes()[:damage])
    with pytest.raises(TranscriberError, match="is damaged") as e:
        Transcriber.from_folder(str(folder), device="cpu")
    message = str(e.value)
    assert str(path) in message and "re-export the model" in message
    assert "download the folder again" in message and "weights_only" not in message
    wav = os.path.join(CORPUS, "audio", "test", sorted(os.listdir(
        os.path.join(CORPUS, "audio", "test")))[0])
    assert transcribe.run([str(folder), wav, "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"ERROR: {user_message(e.value)}\n"


def test_old_folder_warns_once_per_run(ctc_dir, tmp_path, caplog, capsys):
    folder = tmp_path / "old"
    shutil.copytree(ctc_dir, folder)
    path = folder / "hyperparams.yaml"
    path.write_text("".join(line for line in open(path, encoding="utf-8").readlines()
                            if not line.startswith("model_kind:")))
    wav = os.path.join(CORPUS, "audio", "test", sorted(os.listdir(
        os.path.join(CORPUS, "audio", "test")))[0])
    with caplog.at_level("WARNING"):
        assert transcribe.run([str(folder), wav, "--device", "cpu"]) == 0
    warnings = [r for r in caplog.records if "predates the recorded model_kind" in r.message]
    assert len(warnings) == 1 and capsys.readouterr().out.startswith(wav)
