"""End-to-end runs of train_CTC.py / train_S2S.py (subprocesses, tiny configs, CPU).

Data: a few rows of the bundled corpus (data/mini_corpus), else of ../shared/data/real_speech.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import soundfile
import torch

from recipes import RecipeError
from recipes.manifest import read_rows, write_manifest
from recipes.tokenizer import load_pretrained, s2s_tokenizer, train_tokenizer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "mini_corpus"
SHARED = REPO.parent / "shared" / "data" / "real_speech"


_read, _write = read_rows, write_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(data_folder, train rows, valid rows, test rows): 8 / 4 / 4 short utterances."""
    if (BUNDLED / "train.csv").is_file():
        short = lambda split: sorted(_read(BUNDLED / f"{split}.csv"),  # noqa: E731
                                     key=lambda r: float(r["duration"]))
        return str(BUNDLED), short("train")[:8], short("valid")[:4], short("test")[:4]
    if (SHARED / "real_speech.csv").is_file():
        rows = _read(SHARED / "real_speech.csv")
        return str(SHARED), rows[:8], rows[6:], rows[:4]
    pytest.skip("no corpus: data/mini_corpus (bundled) or ../shared/data/real_speech")


def run(script, yaml, out, data, *extra, launcher=(), env=None, check=True):
    data_folder, train, valid, test = data
    cmd = [*launcher, str(REPO / script), str(REPO / yaml), "--device", "cpu",
           "--data_folder", data_folder, "--train_csv", train, "--valid_csv", valid,
           "--test_csv", f"[{test}]", "--output_folder", str(out), "--num_workers", "0",
           "--noprogressbar", *extra]
    if not launcher:
        cmd.insert(0, sys.executable)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def csvs(corpus, tmp_path_factory):
    folder, train, valid, test = corpus
    tmp = tmp_path_factory.mktemp("csv")
    return folder, _write(tmp / "train.csv", train), _write(tmp / "valid.csv", valid), \
        _write(tmp / "test.csv", test)


@pytest.fixture(scope="module")
def ctc_run(corpus, csvs, tmp_path_factory):
    """CTC tiny: crash on an unreadable file in the last batch (after 2 intra-epoch
    checkpoints), fix the file, rerun: resumes mid-epoch, tests, exports."""
    folder, train, valid, test = corpus
    tmp = tmp_path_factory.mktemp("ctc")
    bad = tmp / "late.wav"
    bad.write_bytes(b"RIFF....WAVE but not audio")
    longest = max(float(r["duration"]) for r in train) + 1  # sorted last
    rows = train + [{"ID": "late", "duration": f"{longest}", "wav": str(bad), "spk_id": "x",
                     "wrd": train[0]["wrd"]}]
    data = (folder, _write(tmp / "train.csv", rows), csvs[2], csvs[3])
    out = tmp / "out"
    # (steps alone: they replace the recipe's ckpt_interval_minutes)
    opts = ["--sorting", "ascending", "--batch_size", "4", "--ckpt_interval_steps", "1",
            "--check_data", "False"]  # the bad file is found while training
    crash = run("train_CTC.py", "hparams/CTC/tiny.yaml", out, data, *opts, check=False)
    intra = [p for p in (out / "save").glob("CKPT*")
             if "brain_intra_epoch_ckpt" in (p / "CKPT.yaml").read_text()]
    first = os.path.join(folder, rows[0]["wav"])  # (an absolute wav path stays as it is)
    audio, sr = soundfile.read(first)
    soundfile.write(str(bad), audio, sr)  # "fix" the file
    resumed = run("train_CTC.py", "hparams/CTC/tiny.yaml", out, data, *opts)
    more = run("train_CTC.py", "hparams/CTC/tiny.yaml", out, data, *opts,
               "--number_of_epochs", "2")
    swept = run("train_CTC.py", "hparams/CTC/tiny.yaml", out, data, *opts,
                "--number_of_epochs", "2", "--d_state", "8", "--lr_model", "0.01", check=False)
    return dict(out=out, crash=crash, intra=intra, resumed=resumed, more=more, swept=swept,
                wav=first)


def test_bad_audio_stops_with_its_name(ctc_run):
    crash = ctc_run["crash"]
    assert crash.returncode == 1
    assert "ERROR: Cannot read audio" in crash.stderr and "late.wav (ID late)" in crash.stderr
    assert "Traceback" not in crash.stderr.split("ERROR:")[-1]


def test_intra_epoch_checkpoint_and_resume(ctc_run):
    assert len(ctc_run["intra"]) == 1  # saved before the crash (the newest one is kept)
    log = ctc_run["resumed"].stderr + ctc_run["resumed"].stdout
    assert f"Loading a checkpoint from {ctc_run['intra'][0]}" in log
    epoch1 = [line for line in (ctc_run["out"] / "train_log.txt").read_text().splitlines()
              if line.startswith("epoch: 1,")]
    assert len(epoch1) == 1 and "steps: 3" in epoch1[0]  # 2 steps before the crash + 1 after


def test_rerun_with_more_epochs_continues(ctc_run):
    log = ctc_run["more"].stdout + ctc_run["more"].stderr
    assert "Going into epoch 2" in log and "Going into epoch 1" not in log
    lines = (ctc_run["out"] / "train_log.txt").read_text().splitlines()
    assert [line.split(",")[0] for line in lines if line.startswith("epoch")] == \
        ["epoch: 1", "epoch: 2"]


def test_other_settings_in_a_folder_with_checkpoints_are_refused(ctc_run):
    """A sweep's next value run into the same folder would resume (or only re-test) the
    recorded run: refused before anything is written; more epochs (above) are fine."""
    swept, out = ctc_run["swept"], ctc_run["out"]
    assert swept.returncode == 1
    err = swept.stderr.split("ERROR: ")[-1]
    assert err.startswith(f"{out} holds checkpoints of a run made with other settings")
    assert "d_state: 4 there, 8 now" in err and "lr_model:" in err and "--output_folder" in err
    assert "number_of_epochs" not in err
    assert "d_state: 4" in (out / "hyperparams.yaml").read_text()  # not overwritten


def test_both_checkpoint_intervals_on_the_command_line_are_refused(tmp_path):
    import speechbrain as sb

    from recipes.run import _one_checkpoint_interval

    _, opts, _ = sb.parse_arguments(["x.yaml", "--ckpt_interval_minutes", "5",
                                     "--ckpt_interval_steps", "3"])
    with pytest.raises(RecipeError, match="give one of them"):
        _one_checkpoint_interval({"ckpt_interval_minutes": 30}, opts)
    _, opts, _ = sb.parse_arguments(["x.yaml", "--ckpt_interval_steps", "3"])
    hparams = {"ckpt_interval_minutes": 30}
    _one_checkpoint_interval(hparams, opts)
    assert hparams["ckpt_interval_minutes"] == 0


def test_outputs_and_settings(ctc_run):
    out = ctc_run["out"]
    assert "%WER" in (out / "wer_test.txt").read_text()
    assert "%WER" in (out / "cer_test.txt").read_text()  # CER: ErrorRateStats over characters
    tested = [line for line in (out / "train_log.txt").read_text().splitlines()
              if line.startswith("Epoch loaded")]
    assert tested and all("test set: test - test loss" in line for line in tested)
    # the first run tested after 1 epoch: 1 checkpoint to average where tiny.yaml asks for 2
    resumed = ctc_run["resumed"].stdout + ctc_run["resumed"].stderr
    assert "avg_checkpoints is 2 but" in resumed and "averaging 1" in resumed
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    stdout = ctc_run["resumed"].stdout
    assert "device cpu" in stdout and "precision: fp32 (cpu preset)" in stdout
    assert "batch_size: 4 (command line)" in stdout and "dynamic_batching: False" in stdout
    from modules.mamba import scan_cpu
    label = "compiled CPU scan (numba kernels)" if scan_cpu.available() else "pure-PyTorch scan"
    assert f"Mamba selective scan: {label}" in stdout


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
def test_testing_only_runs_the_scan_that_training_runs(ctc_run, corpus, csvs, tmp_path):
    """A run that evaluates before (or without) a training step scans on the compiled CPU
    kernels as training does, so its figures equal those of an uninterrupted run."""
    out = tmp_path / "out"
    shutil.copytree(ctc_run["out"], out)
    (out / "log.txt").unlink()
    run("train_CTC.py", "hparams/CTC/tiny.yaml", out, csvs, "--batch_size", "4",
        "--ckpt_interval_steps", "1", "--check_data", "False", "--test_only",
        env={"MAMBA_SCAN_NUMBA": ""})
    log = (out / "log.txt").read_text()
    used = re.findall(r"Mamba selective scan: using the (.*?) \(backend", log)
    assert used == ["compiled CPU scan (numba kernels)"]


def test_exported_ctc_model_transcribes(ctc_run, tmp_path):
    from speechbrain.inference.ASR import EncoderASR

    folder = ctc_run["out"] / "inference"
    asr = EncoderASR.from_hparams(source=str(folder), savedir=str(tmp_path / "cache"))
    text = asr.transcribe_file(ctc_run["wav"])
    assert isinstance(text, str)
    assert set(text) <= set(" ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
    exported = torch.load(folder / "model.ckpt", weights_only=True)
    loaded = asr.hparams.model.state_dict()
    assert all(torch.equal(exported[k], loaded[k]) for k in exported)


@pytest.fixture(scope="module")
def s2s_run(csvs, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2s") / "out"
    return out, run("train_S2S.py", "hparams/S2S/tiny.yaml", out, csvs, "--batch_size", "4",
                    "--output_neurons", "30")  # 8 short sentences support few unigram pieces


def test_s2s_trains_tests_and_exports(s2s_run, csvs, tmp_path):
    from speechbrain.inference.ASR import EncoderDecoderASR

    out, proc = s2s_run
    assert "%WER" in (out / "wer_no_lm_test.txt").read_text()
    assert "%WER" in (out / "cer_no_lm_test.txt").read_text()  # named like the WER file
    assert list((out / "save").glob("CKPT*"))
    assert "valid ACC" in (out / "train_log.txt").read_text()
    asr = EncoderDecoderASR.from_hparams(source=str(out / "inference"),
                                         savedir=str(tmp_path / "cache"))
    wav = _read(csvs[1])[0]["wav"]
    wav = wav if os.path.isabs(wav) else os.path.join(csvs[0], wav)
    assert isinstance(asr.transcribe_file(wav), str)
    assert type(asr.mods.decoder).__name__ == "S2SMambaBeamSearcher"


def test_ddp_two_cpu_processes(csvs, tmp_path):
    out = tmp_path / "out"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    run("train_CTC.py", "hparams/CTC/tiny.yaml", out, csvs, "--batch_size", "4",
        "--inter_ctc_weight", "0.3",  # its layer hook reaches through the DDP wrapper
        # 3 epochs, 1 checkpoint kept: checkpoints are deleted (both processes must agree which)
        "--number_of_epochs", "3", "--avg_checkpoints", "1",
        # --standalone: torchrun's rendezvous takes a port of its own (no race with other runs)
        launcher=[torchrun, "--standalone", "--nproc-per-node", "2"])
    epoch1 = (out / "train_log.txt").read_text().splitlines()[0]
    assert "steps: 1" in epoch1  # 8 utterances / 2 processes / batch 4 (one process: 2 steps)
    assert len((out / "train_log.txt").read_text().splitlines()) == 4  # 3 epochs + the test
    assert len(list((out / "save").glob("CKPT+*"))) == 1
    assert (out / "wer_test.txt").is_file() and (out / "inference" / "model.ckpt").is_file()


def test_nccl_on_cpu_is_one_clear_error(csvs, tmp_path):
    proc = run("train_CTC.py", "hparams/CTC/tiny.yaml", tmp_path / "out", csvs,
               "--distributed_backend", "nccl", check=False)
    assert proc.returncode == 1
    assert "ERROR: --distributed_backend nccl needs CUDA devices" in proc.stderr


def test_unreachable_hub_gives_one_clear_error(csvs, tmp_path):
    proc = run("train_S2S.py", "hparams/S2S/tiny.yaml", tmp_path / "out", csvs, "--no_lm", "False",
               "--pretrained_lm_tokenizer_path",
               "speechbrain/asr-transformer-transformerlm-librispeech",
               env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert proc.returncode == 1
    error = proc.stderr.split("ERROR: ")[-1]
    assert error.startswith("Could not load") and "--no_lm True" in error
    assert "local" in error and "Traceback" not in error


def test_tokenizer_from_local_folder(s2s_run, tmp_path):
    """no_lm with a local folder holding tokenizer.ckpt: loaded, not trained; a folder without
    lm.ckpt gives the clear error when an LM is requested."""
    out, _ = s2s_run
    folder = tmp_path / "pretrained"
    folder.mkdir()
    shutil.copy(out / "inference" / "tokenizer.ckpt", folder / "tokenizer.ckpt")
    hp = {"no_lm": True, "pretrained_lm_tokenizer_path": str(folder),
          "save_folder": str(tmp_path / "save"), "output_neurons": 30}
    tokenizer, path = s2s_tokenizer(hp)
    reference = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.ckpt"))
    assert tokenizer.encode_as_ids("HELLO") == reference.encode_as_ids("HELLO")
    assert not list((tmp_path / "save").glob("*_unigram.model"))
    with pytest.raises(RecipeError, match="pretrained lacks lm.ckpt"):
        load_pretrained(hp, lm_model=torch.nn.Linear(1, 1))


def test_tokenizer_too_large_for_the_text_is_a_clear_error(csvs, tmp_path):
    hp = {"save_folder": str(tmp_path), "output_neurons": 5000, "train_csv": csvs[1],
          "token_type": "unigram", "character_coverage": 1.0, "bos_index": 1, "eos_index": 2}
    with pytest.raises(RecipeError, match="unigram tokenizer of 5000 tokens.*--output_neurons"):
        train_tokenizer(hp)


def test_export_refuses_an_unfitted_normalizer(tmp_path):
    from recipes.export import export_inference_folder
    from recipes.hparams import load_recipe

    hparams, _, _ = load_recipe(REPO / "hparams/CTC/tiny.yaml",
                                {"output_folder": str(tmp_path / "out")})
    with pytest.raises(RecipeError, match="normalizer has seen no training batch"):
        export_inference_folder(hparams, "CTC", tmp_path / "missing_tokenizer.model")
    assert not (tmp_path / "out" / "inference").exists()


@pytest.mark.parametrize("kind", ["CTC", "S2S"])
def test_exported_yaml_keeps_the_whole_mamba_config(kind, tmp_path):
    from hyperpyyaml import load_hyperpyyaml

    from recipes.export import inference_yaml
    from recipes.hparams import load_recipe

    config = {"d_state": 6, "expand": 2, "d_conv": 3, "bidirectional": True,
              "bimamba_merge": "sum", "dt_max": 0.05}
    hparams, _, _ = load_recipe(REPO / f"hparams/{kind}/tiny.yaml",
                                {"output_folder": str(tmp_path / "out"), "mamba_config": config})
    exported = load_hyperpyyaml(inference_yaml(hparams, kind))
    assert exported["Transformer"].mamba_config == config
    assert exported["Transformer"].encoder.layers[0].mamba.merge == "sum"
    assert {k: v.shape for k, v in exported["model"].state_dict().items()} == \
        {k: v.shape for k, v in hparams["model"].state_dict().items()}


def test_linear_schedule_fitted_to_the_data():
    """The demo's linear schedule ends at the run's last optimizer step, whatever the corpus."""
    from speechbrain.nnet.schedulers import LinearWarmupScheduler, NoamScheduler

    from recipes.run import fit_schedule_to_data

    sched = LinearWarmupScheduler(1.0, 10, None)
    hp = {"noam_annealing": sched, "number_of_epochs": 3, "batch_size": 8,
          "grad_accumulation_factor": 2}
    # sb.Brain steps at every 2nd batch: 41 batches -> 20 steps (the last batch is dropped)
    assert fit_schedule_to_data(hp, range(100), list(range(41))) == 3 * 20  # sampler: 41 batches
    assert fit_schedule_to_data(hp, range(100), None) == 3 * 6  # 13 batches of 8
    assert fit_schedule_to_data(hp, range(100), list(range(41)), world_size=2) == 3 * 10
    assert sched.calculate_lr(sched.num_training_steps) == 0.0
    assert sched.calculate_lr(sched.num_training_steps - 1) > 0.0
    with pytest.raises(RecipeError, match="n_warmup_steps"):
        fit_schedule_to_data({**hp, "number_of_epochs": 1, "batch_size": 100}, range(100), None)
    noam = NoamScheduler(1.0, 10)
    assert fit_schedule_to_data({**hp, "noam_annealing": noam}, range(100), None) is None


def test_continuing_a_linear_schedule_with_more_epochs_stretches_it(csvs, tmp_path):
    """demo.yaml's linear decay ends at the run's last step: a run continued with more epochs
    decays over the new length (a checkpoint's load restored the old one: lr 0 from then on)."""
    out = tmp_path / "out"
    tiny = ["--d_model", "32", "--nhead", "2", "--num_encoder_layers", "2", "--d_ffn", "64",
            "--d_state", "4", "--n_warmup_steps", "1", "--beam_size", "2", "--cache_audio",
            "False"]
    run("train_CTC.py", "hparams/CTC/demo.yaml", out, csvs, *tiny, "--number_of_epochs", "2")
    run("train_CTC.py", "hparams/CTC/demo.yaml", out, csvs, *tiny, "--number_of_epochs", "4")
    lines = [line for line in (out / "train_log.txt").read_text().splitlines()
             if line.startswith("epoch")]
    lrs = [float(re.search(r"lr: ([0-9.e+-]+)", line).group(1)) for line in lines]
    assert len(lrs) == 4 and lrs[1] == 0.0  # the 2-epoch run ended its decay
    assert lrs[2] > 0.0 and lrs[3] == 0.0  # the continued run decays over 4 epochs
