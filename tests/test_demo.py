"""demo.py: the `make demo` entry point trains, tests, exports and transcribes end to end
(--quick: tiny model and subset, ~20-40 s on 2 cores), and its helpers parse/report correctly."""

import csv
import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import demo

REPO = demo.REPO


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "demo.py", "--quick", "--threads", "1", "--output-folder", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("ConMamba CTC demo: summary"):]
    for name, n in (("test", demo.QUICK_UTTERANCES["test"]), ("real", demo.QUICK_UTTERANCES["real"])):
        assert f"{name} ({n} utt., " in table
    with_lm = importlib.util.find_spec("flashlight") is not None  # requirements-lm.txt
    assert table.count("WER ") == table.count("CER ") == (4 if with_lm else 2)
    assert ("test + token LM" in table) == with_lm
    first_test = next(csv.DictReader(open(REPO + "/data/mini_corpus/test.csv")))
    assert re.search(rf"\nreference +\| {first_test['wrd']}\n", table)
    assert "transcript" in table

    for name in ("wer_test", "cer_test", "wer_real", "cer_real"):
        rate, errors, total = demo.read_error_rate(str(out / f"{name}.txt"))
        assert total > 0 and 0 <= errors and rate == pytest.approx(100 * errors / total, abs=0.01)
    for name in ("hyperparams.yaml", "model.ckpt", "normalizer.ckpt", "tokenizer.ckpt"):
        assert (out / "inference" / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["train_utterances"] == demo.QUICK_UTTERANCES["train"]
    assert summary["parameters"] > 0 and summary["train_seconds"] > 0
    assert summary["reference"] == first_test["wrd"]
    assert summary["test"]["CER"] == demo.read_error_rate(str(out / "cer_test.txt"))[0]
    assert f"WER {summary['real']['WER']:.2f} %" in table
    if with_lm:  # the exported folder now decodes with the token LM, weight chosen on valid
        from inference.word_lm import lm_settings

        assert (out / "inference" / "token_lm.arpa").is_file()
        grid = {(r["lm_weight"], r["word_score"]): r for r in summary["valid_lm"]}
        assert sorted(grid) == sorted((w, s) for w in demo.LM_WEIGHTS for s in demo.WORD_SCORES)
        chosen = grid[summary["lm_weight"], summary["word_score"]]
        assert chosen["CER"] == min(r["CER"] for r in grid.values())
        settings = lm_settings(str(out / "inference"))
        assert (settings["lm_weight"], settings["word_score"]) == (summary["lm_weight"],
                                                                  summary["word_score"])
        # the grid decoded kept log-probabilities: a fresh Transcriber gives the same figures
        asr = demo.load_transcriber(str(out / "inference"), "cpu")
        valid = demo.read_rows("valid", demo.CORPUS)[: demo.QUICK_UTTERANCES["valid"]]
        assert demo.error_rates(asr, valid, demo.CORPUS) == (chosen["WER"], chosen["CER"])
        # kept batches map back to the files, whatever order the Transcriber decodes them in
        rows = demo.read_rows("test", demo.CORPUS)[:10]
        kept = asr.word_lm = demo._KeepLogProbs()
        keys = asr.transcribe_files([os.path.join(demo.CORPUS, r["wav"]) for r in rows])
        assert len(kept.batches) > 1
        frames = kept.transcripts(keys, lambda lp, rel: [
            str(n) for n in (rel * lp.shape[1]).round().int().tolist()])
        expected = [float(r["duration"]) * 25 for r in rows]  # 25 encoder frames per second
        assert all(abs(int(f) - e) <= 1 for f, e in zip(frames, expected)), (frames, expected)
        for name in ("test", "real"):
            assert 0 <= summary[name]["word_lm"]["CER"] <= 100
            assert f"CER {summary[name]['word_lm']['CER']:.2f} %" in table


def test_read_error_rate(tmp_path):
    path = tmp_path / "wer_x.txt"
    path.write_text("%WER 12.50 [ 5 / 40, 1 ins, 2 del, 2 sub ]\n%SER 50.00 [ 1 / 2 ]\n")
    assert demo.read_error_rate(str(path)) == (12.5, 5, 40)
    path.write_text("no stats\n")
    with pytest.raises(demo.DemoError, match="does not start with"):
        demo.read_error_rate(str(path))
    with pytest.raises(demo.DemoError, match="was not written"):
        demo.read_error_rate(str(tmp_path / "missing.txt"))


def test_write_subset_absolute_paths(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "test"):
        (corpus / f"{split}.csv").write_text(
            "ID,duration,wav,spk_id,wrd\n"
            + "".join(f"{split}{i},1.0,audio/{split}{i}.ogg,s,WORD {i}\n" for i in range(5)))
    paths = demo.write_subset(str(tmp_path / "sub"), {"train": 3, "test": 2}, str(corpus))
    rows = list(csv.DictReader(open(paths["train"])))
    assert [r["ID"] for r in rows] == ["train0", "train1", "train2"]
    assert rows[0]["wav"] == str(corpus / "audio" / "train0.ogg")
    assert len(list(csv.DictReader(open(paths["test"])))) == 2


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(demo.DemoError, match=r"train\.csv is missing: make it with"):
        demo.main(["--corpus", str(tmp_path), "--output-folder", str(tmp_path / "out")])


def test_quick_run_takes_epochs_once(tmp_path):
    """--quick with --epochs: one --number_of_epochs (twice, train_CTC.py refuses the command)."""
    args = demo.parse_args(["--quick", "--epochs", "3", "--output-folder", str(tmp_path)])
    cmd = demo.train_command(args, str(tmp_path), [])
    assert cmd.count("--number_of_epochs") == 1
    assert cmd[cmd.index("--number_of_epochs") + 1] == "3"
    full = demo.train_command(demo.parse_args(["--epochs", "3"]), str(tmp_path), [])
    assert full[full.index("--number_of_epochs") + 1] == "3"


def test_oov_rate_counts_tokens_missing_from_train():
    train = [{"wrd": "A B C"}, {"wrd": "C D"}]
    assert demo.oov_rate([{"wrd": "A E"}, {"wrd": "D D F G"}], train) == pytest.approx(50.0)


def test_error_rates_are_the_recipes():
    """The LM rows use train_CTC.py's definitions (SpeechBrain's ErrorRateStats on word lists;
    for CER split into characters, the spaces between words counting as characters)."""
    rows = [{"wrd": "THE CAT"}, {"wrd": "A DOG"}]
    wer, cer = demo.recipe_error_rates(["a", "b"], ["THECAT", "A DIG"], rows)
    assert wer == pytest.approx(75.0)  # THECAT: 1 substitution + 1 deletion; DIG: 1 substitution
    assert cer == pytest.approx(100 * 2 / 12)  # a missing space and a wrong letter in 12


def small_corpus(folder, counts):
    """A corpus of the first counts[split] rows of the bundled CSVs (absolute wav paths)."""
    folder.mkdir()
    for split, n in counts.items():
        rows = demo.read_rows(split, demo.CORPUS)[:n]
        for row in rows:
            row["wav"] = os.path.join(demo.CORPUS, row["wav"])
        demo.manifest.write_manifest(str(folder / f"{split}.csv"), rows)
    return folder


def listing(folder):
    """{relative path: file content} of everything under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def demo_folder(folder, marker=True):
    """A folder as an earlier demo run left it (without demo_output.txt: an older demo.py's)."""
    (folder / "save" / "CKPT+x").mkdir(parents=True)
    (folder / "save" / "CKPT+x" / "model.ckpt").write_text("weights")
    for name in ("summary.json", "hyperparams.yaml", "train_log.txt", "log.txt", "wer_test.txt"):
        (folder / name).write_text(name)
    if marker:
        (folder / demo.MARKER).write_text("demo")
    return folder


class FailedTraining(list):
    """Stands in for train_CTC.py: records the output folder's entries when training would start
    (in the list) and exits with status 1 (no training runs), after writing log.txt there when
    write_log is set."""

    write_log = False

    def __call__(self, cmd, env):
        out = cmd[cmd.index("--output_folder") + 1]
        self.append(sorted(os.listdir(out)))
        if self.write_log:
            with open(os.path.join(out, "log.txt"), "w") as f:
                f.write("details")
        return 1


@pytest.fixture
def failed_training(monkeypatch):
    stub = FailedTraining()
    monkeypatch.setattr(demo, "run_training", stub)
    return stub


@pytest.mark.parametrize("marker", [True, False])
def test_folder_with_foreign_files_is_refused_untouched(tmp_path, failed_training, marker):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "save").mkdir()
    (out / "save" / "thesis.ckpt").write_text("a week of training")
    if marker:  # a demo folder the user put a file of their own in
        demo_folder(out)
    before = listing(out)
    expected = "holds notes.txt, which a demo run does not write" if marker else \
        "is not the folder of a demo run"
    with pytest.raises(demo.DemoError, match=expected) as error:
        demo.main(["--output-folder", str(out)])
    assert "another --output-folder" in str(error.value) and "--resume" in str(error.value)
    assert listing(out) == before and failed_training == []


@pytest.mark.parametrize("marker", [True, False])
def test_earlier_demo_folder_is_replaced(tmp_path, failed_training, marker):
    """A folder of an earlier demo run (with the marker, or an older demo.py's finished run) is
    emptied before training; train_CTC.py's failure names its log only once it exists."""
    out = demo_folder(tmp_path / "out", marker)
    with pytest.raises(demo.DemoError, match=r"train_CTC\.py failed \(its error is above\)$"):
        demo.main(["--output-folder", str(out)])
    assert failed_training == [[demo.MARKER]]
    failed_training.write_log = True
    with pytest.raises(demo.DemoError, match=f"details in {re.escape(str(out / 'log.txt'))}"):
        demo.main(["--output-folder", str(out)])
    (out / "save").mkdir()
    with pytest.raises(demo.DemoError, match="train_CTC.py failed") as error:  # --resume keeps
        demo.main(["--output-folder", str(out), "--resume"])  # it all
    assert str(error.value).endswith("With demo.py: run without --resume to start over in that "
                                     "folder, or pass --output-folder DIR")
    assert failed_training[1:] == [[demo.MARKER], [demo.MARKER, "log.txt", "save"]]


@pytest.mark.parametrize("bad", [
    ["--threads", "0"], ["--threads", "-1"], ["--device", "tpu"], ["--file", "missing.wav"],
    ["--file", "not_audio.wav"], ["--corpus", "empty"],
    pytest.param(["--device", "cuda"], marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="a GPU is available"))])
def test_bad_option_leaves_output_folder_untouched(tmp_path, failed_training, capsys, bad):
    out = demo_folder(tmp_path / "out")
    (tmp_path / "not_audio.wav").write_text("not audio")
    (tmp_path / "empty").mkdir()
    before = listing(out)
    bad = [str(tmp_path / b) if b in ("missing.wav", "not_audio.wav", "empty") else b
           for b in bad]
    with pytest.raises((demo.RecipeError, SystemExit)) as error:
        demo.main(["--output-folder", str(out), *bad])
    message = str(error.value) if error.type is not SystemExit else capsys.readouterr().err
    assert bad[0] in message
    assert listing(out) == before and failed_training == []


def test_output_folder_must_be_a_writable_folder(tmp_path, failed_training):
    file = tmp_path / "results.txt"
    file.write_text("keep")
    with pytest.raises(demo.DemoError, match="results.txt is a file, not a folder: pass"):
        demo.main(["--output-folder", str(file)])
    with pytest.raises(demo.DemoError, match="results.txt is a file, not a folder: pass"):
        demo.main(["--output-folder", str(file / "sub" / "out")])
    assert file.read_text() == "keep"
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(demo.DemoError, match="no permission to write in"):
            demo.main(["--output-folder", str(locked / "out")])
    assert failed_training == []


def test_warmup_fits_short_runs(tmp_path):
    """train_CTC.py requires a warm-up below the run's optimizer steps: short runs (a small
    --corpus, --epochs 1) get at most a quarter of their fewest possible steps."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.csv").write_text("ID,duration,wav,spk_id,wrd\n" + "".join(
        f"u{i},2.5,u{i}.wav,s,A B\n" for i in range(40)))  # 100 s: >= 5 batches of <= 20 s
    rows = demo.read_rows("train", str(corpus))

    def warmup(*argv):
        cmd = demo.train_command(demo.parse_args([*argv, "--corpus", str(corpus)]),
                                 str(tmp_path / "out"), rows)
        return int(cmd[cmd.index("--n_warmup_steps") + 1]) if "--n_warmup_steps" in cmd else None

    assert warmup("--epochs", "1") == 1
    assert warmup("--epochs", "8") == 10
    assert warmup() == 7 * 5 // 4
    assert warmup("--epochs", "200") is None  # the recipe's 150 fits
    full = demo.read_rows("train", demo.CORPUS)
    assert "--n_warmup_steps" not in demo.train_command(demo.parse_args([]), str(tmp_path), full)
    # --resume keeps the warm-up the run was started with, so that more epochs continue it
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run_settings.json").write_text('{"n_warmup_steps": 1}')
    assert warmup("--epochs", "8", "--resume") == 1


def test_quick_demo_on_a_small_corpus_reports_its_counts(tmp_path):
    """--quick on a corpus smaller than QUICK_UTTERANCES: the summary counts the rows used."""
    counts = {"train": 10, "valid": 2, "test": 3, "real": 1}
    corpus = small_corpus(tmp_path / "corpus", counts)
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "demo.py", "--quick", "--threads", "1", "--corpus", str(corpus),
         "--output-folder", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_utterances"] == 10
    assert (summary["test"]["utterances"], summary["real"]["utterances"]) == (3, 1)
    train = demo.read_rows("train", str(corpus))
    assert summary["train_hours"] == pytest.approx(
        sum(float(r["duration"]) for r in train) / 3600)
    assert "test (3 utt., " in proc.stdout and "real (1 utt., " in proc.stdout
    # what a run leaves is recognised as a demo folder: the next run replaces it
    demo.prepare_output_folder(str(out), resume=False)
    assert os.listdir(out) == [demo.MARKER]


def test_ctrl_c_prints_one_line_and_stops_training(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "demo.py", "--quick", "--output-folder", str(out)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:  # train_CTC.py is starting
            if line.startswith("Training:"):
                break
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: demo.py and train_CTC.py
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr
    assert stderr.strip().splitlines()[-1] == (
        "ERROR: interrupted; to continue from the last checkpoint, run the same command with "
        f"--resume: python demo.py --quick --output-folder {out} --resume")
    if os.path.isdir("/proc"):  # train_CTC.py was stopped with demo.py
        for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                assert str(out) not in open(cmdline).read()
            except OSError:
                pass
