"""demo.py: the `make demo` entry point trains, tests, exports and transcribes end to end
(--quick: tiny model and subset, ~20-40 s on 2 cores), and its helpers parse/report correctly."""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys

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
    cmd = demo.train_command(args, str(tmp_path))
    assert cmd.count("--number_of_epochs") == 1
    assert cmd[cmd.index("--number_of_epochs") + 1] == "3"
    full = demo.train_command(demo.parse_args(["--epochs", "3"]), str(tmp_path))
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
