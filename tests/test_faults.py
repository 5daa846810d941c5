"""Runs that survive faults: kill -9 (recipes.faults: SIGKILL at a chosen point, also inside a
checkpoint write) then the same command again ends with exactly the uninterrupted run's weights
and train_log.txt; NaN losses are skipped; unreadable files are skipped (bad_data: skip); the
data check reports every bad row at once.

Tiny CTC config, 12 short utterances, batches of 4 (3 steps per epoch), 2 epochs, a checkpoint
after every step.
"""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch
import yaml

from recipes.check_data import check_manifests

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "mini_corpus"
FIELDS = ["ID", "duration", "wav", "spk_id", "wrd"]


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _shortest(split, n):
    with open(CORPUS / f"{split}.csv", newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: float(r["duration"]))[:n]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    if not (CORPUS / "train.csv").is_file():
        pytest.skip("the bundled corpus data/mini_corpus is missing")
    tmp = tmp_path_factory.mktemp("csv")
    return (_write(tmp / "train.csv", _shortest("train", 12)),
            _write(tmp / "valid.csv", _shortest("valid", 2)),
            _write(tmp / "test.csv", _shortest("test", 1)))


def train(out, manifests, *extra, fault=None, workers=0, epochs=2, launcher=(sys.executable,),
          batch_size=4):
    train_csv, valid_csv, test_csv = manifests
    cmd = [*launcher, str(REPO / "train_CTC.py"), str(REPO / "hparams/CTC/tiny.yaml"),
           "--device", "cpu", "--data_folder", str(CORPUS), "--train_csv", train_csv,
           "--valid_csv", valid_csv, "--test_csv", f"[{test_csv}]", "--output_folder", str(out),
           "--num_workers", str(workers), "--noprogressbar", "--batch_size", str(batch_size),
           "--number_of_epochs", str(epochs), "--ckpt_interval_steps", "1",
           "--ckpt_interval_minutes", "0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MAMBA_ASR_FAULT", None)
    if fault:
        env["MAMBA_ASR_FAULT"] = fault
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def last_weights(out):
    """model.ckpt of the newest checkpoint (the weights after the last training step)."""
    ckpts = [p for p in (out / "save").glob("CKPT+*")]
    newest = max(ckpts, key=lambda p: yaml.safe_load((p / "CKPT.yaml").read_text())["unixtime"])
    return torch.load(newest / "model.ckpt", weights_only=True)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(manifests, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    _ok(train(out, manifests))
    return out


# fault -> where the process dies (3 training steps and 2 validation batches per epoch;
# checkpoints: 3 intra-epoch, then the end-of-epoch one, per epoch)
KILLS = {
    "mid_epoch": "train_batch:5",          # epoch 2, after its first step's checkpoint
    "validation": "valid_batch:2",         # epoch 1's validation, after its first batch
    "between_epochs": "checkpoint_saved:4",  # right after epoch 1's end-of-epoch checkpoint
    "inside_checkpoint_write": "checkpoint_write:6",  # writing epoch 2's 2nd checkpoint
}


@pytest.mark.parametrize("where", list(KILLS))
def test_killed_run_resumes_bit_exactly(where, uninterrupted, manifests, tmp_path):
    out = tmp_path / "out"
    killed = train(out, manifests, fault=KILLS[where])
    assert killed.returncode == -9, killed.stderr[-3000:]
    if where == "inside_checkpoint_write":
        partial = list((out / "save").glob(".partial-CKPT+*"))
        assert len(partial) == 1 and not (partial[0] / "random_state.ckpt").exists()
    resumed = _ok(train(out, manifests))
    if where == "inside_checkpoint_write":
        log = resumed.stdout + resumed.stderr
        assert "Removing" in log and "incomplete checkpoint" in log
        assert not list((out / "save").glob(".partial-*"))
    assert max_diff(last_weights(uninterrupted), last_weights(out)) == 0
    assert (out / "train_log.txt").read_text() == (uninterrupted / "train_log.txt").read_text()


def test_workers_resume_bit_exactly_and_match_the_main_process(uninterrupted, manifests, tmp_path):
    """Speed perturbation is keyed by (seed, epoch, utterance): the number of workers does not
    change what is trained on, and killing a run with workers changes nothing either."""
    out = tmp_path / "out"
    assert train(out, manifests, fault="train_batch:5", workers=2).returncode == -9
    _ok(train(out, manifests, workers=2))
    assert max_diff(last_weights(uninterrupted), last_weights(out)) == 0
    assert (out / "train_log.txt").read_text() == (uninterrupted / "train_log.txt").read_text()


def test_ddp_run_resumes_bit_exactly(manifests, tmp_path):
    """Two processes (torchrun, gloo): each draws its own dropout, so a checkpoint holds every
    process's generators (the main process writes it), and both resume from their own."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    ddp = (torchrun, "--standalone", "--nproc-per-node", "2")
    full, out = tmp_path / "full", tmp_path / "out"
    _ok(train(full, manifests, launcher=ddp))
    assert train(out, manifests, fault="train_batch:3", launcher=ddp).returncode != 0
    _ok(train(out, manifests, launcher=ddp))
    assert max_diff(last_weights(full), last_weights(out)) == 0
    assert (out / "train_log.txt").read_text() == (full / "train_log.txt").read_text()


def test_ctrl_c_says_how_to_continue(manifests, tmp_path):
    import signal
    import time

    train_csv, valid_csv, test_csv = manifests
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "train_CTC.py"), str(REPO / "hparams/CTC/tiny.yaml"),
           "--device", "cpu", "--data_folder", str(CORPUS), "--train_csv", train_csv,
           "--valid_csv", valid_csv, "--test_csv", f"[{test_csv}]", "--output_folder", str(out),
           "--num_workers", "0", "--noprogressbar", "--batch_size", "4",
           "--number_of_epochs", "200", "--ckpt_interval_steps", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not list((out / "save").glob("CKPT+*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "ERROR: interrupted; rerun the same command to continue from the last checkpoint in "
        f"{out / 'save'}")


def test_batch_speed_perturbation_resumes_bit_exactly(manifests, tmp_path):
    """speed_perturb_per: batch draws each batch's speed from the main process's generator,
    which checkpoints hold: a run killed mid-epoch and resumed ends as the uninterrupted one."""
    batch = ("--speed_perturb_per", "batch")
    full, out = tmp_path / "full", tmp_path / "out"
    _ok(train(full, manifests, *batch))
    assert train(out, manifests, *batch, fault="train_batch:5").returncode == -9
    _ok(train(out, manifests, *batch))
    assert max_diff(last_weights(full), last_weights(out)) == 0
    assert (out / "train_log.txt").read_text() == (full / "train_log.txt").read_text()


def test_nan_losses_are_skipped_then_stop_the_run(manifests, tmp_path):
    one = _ok(train(tmp_path / "one", manifests, epochs=1, fault="nan_loss:2"))
    warning = [line for line in (one.stdout + one.stderr).splitlines()
               if "non-finite loss" in line]
    ids = [r["ID"] for r in _shortest("train", 12)]
    assert len(warning) == 1 and sum(i in warning[0] for i in ids) == 4  # the batch's 4 IDs
    assert "nan" in warning[0]
    # 3 batches, the NaN one without an optimizer step; the loss average stays finite
    log = (tmp_path / "one" / "train_log.txt").read_text()
    assert "steps: 2 " in log and "train loss: nan" not in log

    many = train(tmp_path / "many", manifests, "--nonfinite_patience", "1", epochs=1,
                 fault="nan_loss:1-2")
    assert many.returncode == 1
    error = many.stderr.split("ERROR: ")[-1]
    assert "NaN/inf for 2 batches in a row" in error and "nonfinite_patience 1" in error
    assert "Traceback" not in error and list((tmp_path / "many" / "save").glob("CKPT+*"))


def test_a_skipped_stepping_batch_drops_its_accumulation_window(manifests, tmp_path):
    """With gradient accumulation, a non-finite loss on the batch that would step drops the
    window's gradients: NaN at batch 2 trains exactly as NaN at batches 1 and 2 (batch 1's
    gradients leaked into the next step before)."""
    acc = ("--grad_accumulation_factor", "2")  # batches of 2: 6, steps at 2, 4, 6
    _ok(train(tmp_path / "two", manifests, *acc, epochs=1, fault="nan_loss:2", batch_size=2))
    _ok(train(tmp_path / "both", manifests, *acc, epochs=1, fault="nan_loss:1-2", batch_size=2))
    assert max_diff(last_weights(tmp_path / "two"), last_weights(tmp_path / "both")) == 0


def test_bad_data_skip_trains_without_the_unreadable_file(manifests, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....WAVE but not audio")
    rows = _shortest("train", 12)
    rows[5] = {**rows[5], "ID": "broken", "wav": str(bad)}
    data = (_write(tmp_path / "train.csv", rows), *manifests[1:])
    proc = _ok(train(tmp_path / "out", data, "--bad_data", "skip", epochs=1))
    log = proc.stdout + proc.stderr
    assert "unreadable" in log and "broken.wav" in log  # the data check reports it first
    assert "Skipping (bad_data: skip)" in log and "(ID broken)" in log
    assert "steps: 3" in (tmp_path / "out" / "train_log.txt").read_text()


@pytest.fixture
def bad_manifest(tmp_path):
    """One row of each kind of problem, and two good rows."""
    good = _shortest("train", 2)
    wav = lambda r: str(CORPUS / r["wav"])  # noqa: E731
    empty, short, rate, noise = (tmp_path / n for n in ("empty.wav", "short.wav", "8k.wav",
                                                       "noise.wav"))
    soundfile.write(str(empty), torch.zeros(0).numpy(), 16000)
    soundfile.write(str(short), torch.zeros(800).numpy(), 16000)  # 0.05 s
    soundfile.write(str(rate), torch.zeros(8000).numpy(), 8000)
    noise.write_bytes(os.urandom(3000))
    row = lambda i, path, text="HELLO", dur="1.0": {  # noqa: E731
        "ID": i, "duration": dur, "wav": path, "spk_id": "s", "wrd": text}
    rows = [row("ok1", wav(good[0])), row("missing", str(tmp_path / "gone.flac")),
            row("unreadable", str(noise)), row("empty", str(empty)), row("short", str(short)),
            row("rate", str(rate)), row("ok1", wav(good[1])), row("notext", wav(good[1]), ""),
            row("nodur", wav(good[1]), dur="soon"), row("ok2", wav(good[1]))]
    return _write(tmp_path / "bad.csv", rows)


EXPECTED = [(3, "missing"), (4, "unreadable"), (5, "empty"), (6, "too_short"),
            (7, "sample_rate"), (8, "duplicate_id"), (9, "empty_text"), (10, "bad_duration")]


def test_data_check_reports_every_kind_in_one_pass(bad_manifest):
    problems, rows = check_manifests([bad_manifest], sample_rate=16000, min_duration=0.1)
    assert rows == 10
    assert [(p.line, p.kind) for p in problems] == EXPECTED
    from tools.check_data import main

    assert main([bad_manifest]) == 1


def test_manifest_problems_stop_training_even_with_bad_data_skip(tmp_path):
    """A manifest that is missing, lacks a column or has no rows cannot be skipped row by row:
    the check stops training whatever bad_data says, and names the keys to set."""
    from recipes import RecipeError
    from recipes.check_data import check_before_training

    empty = tmp_path / "empty.csv"
    empty.write_text("ID,duration,wav,spk_id,wrd\n")
    no_wrd = tmp_path / "no_wrd.csv"
    no_wrd.write_text("ID,duration,wav\nu1,1.0,a.wav\n")
    problems, rows = check_manifests([str(empty), str(no_wrd), str(tmp_path / "gone.csv")])
    assert rows == 0
    assert [(p.line, p.kind) for p in problems] == [(1, "no_rows"), (1, "bad_header"),
                                                    (0, "no_manifest")]
    hparams = {"check_data": True, "bad_data": "skip", "train_csv": str(empty),
               "valid_csv": str(no_wrd), "test_csv": [str(tmp_path / "gone.csv")],
               "data_folder": str(tmp_path), "sample_rate": 16000}
    for check in (True, False):  # the manifests are checked even without the data check
        with pytest.raises(RecipeError, match=r"(?s)Problems with the manifests:.*no_rows.*"
                                              r"bad_header.*no_manifest.*--valid_csv"):
            check_before_training({**hparams, "check_data": check})


def test_errors_keep_their_lines_and_lose_worker_tracebacks():
    from recipes import RecipeError, user_message
    from recipes.audio import AudioError

    assert user_message(RecipeError("two   spaces\nsecond  line\n")) == \
        "two spaces\nsecond line"
    worker = AudioError("Caught AudioError in DataLoader worker process 1.\nOriginal Traceback "
                        "(most recent call last):\n  File \"x.py\", line 3, in f\n    raise e\n"
                        "recipes.audio.AudioError: Cannot read audio a.wav (ID u1). Cannot "
                        "decode it\n")
    assert user_message(worker) == "Cannot read audio a.wav (ID u1). Cannot decode it"


def test_training_checks_the_data_first(bad_manifest, manifests, tmp_path):
    proc = train(tmp_path / "out", (bad_manifest, *manifests[1:]), "--check_data")
    assert proc.returncode == 1
    error = proc.stderr.split("ERROR: ")[-1]
    assert "Checked 13 rows" in error
    assert all(f"line {line} " in error and kind in error for line, kind in EXPECTED)
    assert not list((tmp_path / "out" / "save").glob("CKPT*"))  # before any training


def test_checkpoint_half_deleted_is_never_loaded(tmp_path):
    """A kill inside SpeechBrain's rmtree of an old checkpoint leaves CKPT.yaml and some files:
    the checkpointer skips (and removes) it and loads the previous complete one."""
    from recipes.checkpoints import AtomicCheckpointer

    model = torch.nn.Linear(2, 2)
    ckpt = AtomicCheckpointer(tmp_path, {"model": model, "other": torch.nn.Linear(1, 1)})
    first = ckpt.save_checkpoint(meta={"n": 1})
    second = ckpt.save_checkpoint(meta={"n": 2})
    (second.path / "other.ckpt").unlink()  # rmtree killed after its first file
    (tmp_path / "CKPT+no_meta").mkdir()  # ... or after CKPT.yaml
    (tmp_path / ".partial-CKPT+x").mkdir()  # a write killed before the rename
    assert [c.path for c in ckpt.list_checkpoints()] == [first.path]
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.path.name]
    assert ckpt.recover_if_possible().meta["n"] == 1


def test_damaged_checkpoint_is_a_clear_error_naming_it(tmp_path):
    """Bytes changed inside a checkpoint file (same size: the listing cannot tell): loading it,
    to resume or to test, is an error naming the folder and what to do (the CRC-32 recorded at
    saving differs; without that record, as in older checkpoints, torch.load's error is
    reworded: no advice to load with weights_only=False)."""
    import re

    from recipes import RecipeError
    from recipes.brain import load_model_params
    from recipes.checkpoints import CRC, AtomicCheckpointer

    ckpt = AtomicCheckpointer(tmp_path, {"model": torch.nn.Linear(64, 64)})
    saved = ckpt.save_checkpoint(meta={"n": 1})
    path = saved.path / "model.ckpt"
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = bytes(64)  # weights zeroed: torch.load works
    path.write_bytes(bytes(data))
    folder = re.escape(str(saved.path))
    with pytest.raises(RecipeError, match=f"Cannot load the checkpoint in {folder} .*CRC-32.*"
                                          f"rm -r {folder}"):
        ckpt.recover_if_possible()
    with pytest.raises(RecipeError, match=f"Cannot load the checkpoint in {folder} .*CRC-32"):
        load_model_params(str(path))
    meta = saved.path / "CKPT.yaml"
    record = yaml.safe_load(meta.read_text())
    del record[CRC]
    meta.write_text(yaml.safe_dump(record))
    path.write_bytes(b"\0" * 64 + bytes(data[64:]))  # the zip header lost
    with pytest.raises(RecipeError, match=f"Cannot load the checkpoint in {folder} "):
        ckpt.recover_if_possible()


def test_unreadable_training_file_stops_after_a_checkpoint(manifests, tmp_path):
    """bad_data: error, no periodic checkpoints: the run stops at the batch with the broken
    file, naming it, with a checkpoint of the steps before; fixed, the rerun continues there."""
    bad = tmp_path / "late.wav"
    bad.write_bytes(b"RIFF....WAVE but not audio")
    rows = _shortest("train", 12)
    rows.append({**rows[0], "ID": "late", "duration": "99", "wav": str(bad)})  # sorted last
    data = (_write(tmp_path / "train.csv", rows), *manifests[1:])
    opts = ["--sorting", "ascending", "--check_data", "False", "--ckpt_interval_steps", "0"]
    crash = train(tmp_path / "out", data, *opts, epochs=1)
    assert crash.returncode == 1 and "late.wav (ID late)" in crash.stderr.split("ERROR: ")[-1]
    saved = [yaml.safe_load((p / "CKPT.yaml").read_text())
             for p in (tmp_path / "out" / "save").glob("CKPT+*")]
    assert len(saved) == 1 and saved[0]["end-of-epoch"] is False
    shutil.copy(CORPUS / rows[0]["wav"], bad.with_suffix(".ogg"))
    rows[-1]["wav"] = str(bad.with_suffix(".ogg"))
    _write(tmp_path / "train.csv", rows)
    resumed = _ok(train(tmp_path / "out", data, *opts, epochs=1))
    assert "Loading a checkpoint" in resumed.stdout + resumed.stderr
    assert "steps: 4" in (tmp_path / "out" / "train_log.txt").read_text()


def test_unreadable_training_file_under_ddp_stops_instead_of_hanging(manifests, tmp_path):
    """Two processes: the one that meets the broken file must not enter a checkpoint save (a
    collective the other never joins: it hung forever); the run stops, naming the file."""
    bad = tmp_path / "late.wav"
    bad.write_bytes(b"RIFF....WAVE but not audio")
    rows = _shortest("train", 12)
    rows.append({**rows[0], "ID": "late", "duration": "99", "wav": str(bad)})  # sorted last
    data = (_write(tmp_path / "train.csv", rows), *manifests[1:])
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    crash = train(tmp_path / "out", data, "--sorting", "ascending", "--check_data", "False",
                  epochs=1, launcher=(torchrun, "--standalone", "--nproc-per-node", "2"))
    assert crash.returncode != 0  # (train's timeout: 600 s)
    assert "late.wav (ID late)" in crash.stderr
