"""The bundled mini corpus (data/mini_corpus) and tools/make_corpus.py that makes it."""

import csv
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from speechbrain.dataio.dataio import read_audio

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "mini_corpus"
SCRIPT = REPO / "tools" / "make_corpus.py"
SPLITS = ["train", "valid", "test", "real"]
HEADER = ["ID", "duration", "wav", "spk_id", "wrd"]


def load(split):
    with open(CORPUS / f"{split}.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == HEADER, f"{split}.csv header"
        return list(reader)


def load_script():
    spec = importlib.util.spec_from_file_location("make_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows():
    return {split: load(split) for split in SPLITS}


def test_split_sizes(rows):
    assert len(rows["train"]) >= 2000
    assert 100 <= len(rows["valid"]) <= 200
    assert len(rows["test"]) == 200
    assert len(rows["real"]) == 10


@pytest.mark.parametrize("split", SPLITS)
def test_audio_matches_csv(rows, split):
    for row in rows[split]:
        path = CORPUS / row["wav"]
        assert not Path(row["wav"]).is_absolute() and path.is_file(), row["wav"]
        info = sf.info(path)
        assert (info.samplerate, info.channels) == (16000, 1), row["wav"]
        assert abs(info.frames / info.samplerate - float(row["duration"])) <= 0.05, row["ID"]


@pytest.mark.parametrize("split", SPLITS)
def test_speechbrain_decodes_float_audio_of_csv_duration(rows, split):
    for row in rows[split][:25]:
        audio = read_audio(str(CORPUS / row["wav"]))
        assert audio.dtype == torch.float32 and audio.dim() == 1
        assert abs(audio.shape[0] / 16000 - float(row["duration"])) <= 0.05, row["ID"]
        assert 0.01 < audio.abs().max() <= 1.0, row["ID"]


def test_ids_unique_and_transcripts_clean(rows):
    ids = [r["ID"] for split in SPLITS for r in rows[split]]
    assert len(ids) == len(set(ids))
    for split in SPLITS:
        for r in rows[split]:
            assert re.fullmatch(r"[A-Z']+( [A-Z']+)*", r["wrd"]), (split, r["ID"])


SPK_RE = re.compile(r"espeak:en(-[a-z0-9]+)*\+[mf]\d|flite:(awb|rms|slt|kal16)"
                    r"|festival:(kal_diphone|cmu_us_slt_arctic_hts)")


def test_synthetic_rows_name_engine_and_voice(rows):
    for split in ["train", "valid", "test"]:
        for r in rows[split]:
            assert SPK_RE.fullmatch(r["spk_id"]), r["spk_id"]
            assert len(r["wrd"].split()) <= 12
    engines = {r["spk_id"].split(":")[0] for r in rows["train"]}
    assert engines == {"espeak", "flite", "festival"}
    espeak = {r["spk_id"].split(":")[1].split("+")[0] for r in rows["train"]
              if r["spk_id"].startswith("espeak:")}
    assert len(espeak) == 8
    assert len({r["spk_id"] for r in rows["train"] if not r["spk_id"].startswith("espeak")}) == 6


def test_no_sentence_shared_between_splits(rows):
    sets = {s: {r["wrd"] for r in rows[s]} for s in ["train", "valid", "test"]}
    assert not sets["train"] & sets["valid"]
    assert not sets["train"] & sets["test"]
    assert not sets["valid"] & sets["test"]


@pytest.mark.parametrize("split", ["valid", "test"])
def test_held_out_words_mostly_occur_in_train(rows, split):
    """A realistic share of new words (a few percent of tokens, at most 2 per sentence): a word
    LM built from the training text cannot simply list the test words."""
    vocab = {w for r in rows["train"] for w in r["wrd"].split()}
    per_sentence = [sum(w not in vocab for w in r["wrd"].split()) for r in rows[split]]
    tokens = sum(len(r["wrd"].split()) for r in rows[split])
    assert max(per_sentence) <= 2
    assert 0.015 <= sum(per_sentence) / tokens <= 0.05


def test_sentences_come_from_bundled_list(rows):
    bundled = set((CORPUS / "sentences.txt").read_text(encoding="utf-8").splitlines())
    for split in ["train", "valid", "test"]:
        assert {r["wrd"] for r in rows[split]} <= bundled


def test_total_audio_size_under_20_mb():
    total = sum(p.stat().st_size for p in (CORPUS / "audio").rglob("*") if p.is_file())
    assert total <= 20 * 1000 ** 2


def test_split_sentences_disjoint_and_in_vocabulary():
    import random

    mc = load_script()
    # Every A/B sentence holds both words, so any 6 of these 10 give train the vocabulary {A, B}.
    sentences = ["A B", "B A", "A A B", "A B B", "B B A", "B A A", "A B A", "B A B",
                 "A Z1 B", "B Z2 A"]
    for seed in range(5):
        splits = mc.split_sentences(sentences, 6, 1, 1, 0, random.Random(seed))
        vocab = {w for s in splits["train"] for w in s.split()}
        held = splits["valid"] + splits["test"]
        assert len(set(held + splits["train"])) == 8
        assert all(w in vocab for s in held for w in s.split())
        with pytest.raises(ValueError, match="only 4 sentences in the word range are left "
                                             "after --n-train 6, --n-valid and --n-test need 5"):
            mc.split_sentences(sentences, 6, 3, 2, 0, random.Random(seed))


def test_read_sentences_rejects_lower_case(tmp_path):
    mc = load_script()
    path = tmp_path / "s.txt"
    path.write_text("ONE TWO THREE FOUR\nfive six seven eight\n")
    with pytest.raises(ValueError, match=r"s\.txt:2"):
        mc.read_sentences(path, 1, 12)


def test_missing_espeak_gives_clear_error(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # an empty folder: no espeak-ng, no sox
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0
    assert "espeak-ng" in result.stderr and "apt-get install espeak-ng" in result.stderr
    assert "flite" in result.stderr and "text2wave" in result.stderr
    assert not (tmp_path / "out").exists()


def test_split_sentences_reaches_the_oov_rate():
    import random

    mc = load_script()
    words = random.Random(1)
    clean = [" ".join(f"W{words.randrange(6)}" for _ in range(4)) + f" W{i}" for i in range(6)]
    clean += [" ".join(f"W{words.randrange(6)}" for _ in range(5)) for _ in range(400)]
    new_word = [f"W{i % 6} NEW{i} W{(i + 1) % 6} W{(i + 2) % 6} W{i % 4}" for i in range(100)]
    pool = sorted(set(clean)) + new_word
    splits = mc.split_sentences(pool, 100, 30, 60, 1, random.Random(0), oov_rate=0.05)
    vocab = {w for s in splits["train"] for w in s.split()}
    for split in ("valid", "test"):
        words = [w for s in splits[split] for w in s.split()]
        assert 0.03 <= sum(w not in vocab for w in words) / len(words) <= 0.07, split
        assert not set(splits[split]) & set(splits["train"])
    assert not set(splits["valid"]) & set(splits["test"])


def test_engine_options_are_checked():
    mc = load_script()
    assert mc.parse_engine_weights("espeak:2,flite") == {"espeak": 2.0, "flite": 1.0}
    with pytest.raises(mc.CorpusError, match="unknown engine 'say'"):
        mc.parse_engine_weights("espeak,say")
    with pytest.raises(mc.CorpusError, match=r"text2wave \(engine festival\): apt-get install "
                                             "festival"):
        mc.check_tools({"festival": 1.0}, which=lambda prog: None if prog == "text2wave" else prog)


def test_noise_has_the_requested_snr():
    import numpy as np

    mc = load_script()
    speech = (0.3 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
    noisy = mc.add_noise(speech, 20.0, seed=7)
    snr = 10 * np.log10(np.mean(speech ** 2) / np.mean((noisy - speech) ** 2))
    assert abs(snr - 20.0) < 0.3 and noisy.dtype == np.float32
    assert np.array_equal(noisy, mc.add_noise(speech, 20.0, seed=7))


@pytest.mark.skipif(any(shutil.which(p) is None for p in ("espeak-ng", "flite", "text2wave", "sox")),
                    reason="espeak-ng, flite, festival or sox not installed")
def test_end_to_end_two_sentences_reproducible(tmp_path):
    sentences = tmp_path / "s.txt"
    sentences.write_text("THE CAT SAT ON THE MAT\nTHE DOG SAT ON THE CAT\n")
    outs = []
    for name in ["a", "b"]:
        out = tmp_path / name
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--sentences",
                        str(sentences), "--n-train", "1", "--n-valid", "0", "--n-test", "1",
                        "--max-oov", "9", "--real-csv", str(CORPUS / "real.csv")],
                       check=True, capture_output=True, timeout=120)
        outs.append(out)
    for split, n in [("train", 1), ("valid", 0), ("test", 1), ("real", 10)]:
        text = (outs[0] / f"{split}.csv").read_text()
        assert text == (outs[1] / f"{split}.csv").read_text()
        rows = list(csv.DictReader(text.splitlines()))
        assert len(rows) == n
        for r in rows:
            info = sf.info(outs[0] / r["wav"])
            assert info.samplerate == 16000 and info.channels == 1
            assert 0.5 < float(r["duration"]) < 5
    assert (outs[0] / "audio" / "train" / "tr_00001.ogg").is_file()


def test_opus_tags_padding_stripped_without_changing_the_audio(tmp_path):
    mc = load_script()
    t = torch.arange(32000) / 16000
    audio = (0.3 * torch.sin(2 * torch.pi * 440 * t) * torch.sin(2 * torch.pi * 3 * t)).numpy()
    path = tmp_path / "a.ogg"
    sf.write(path, audio, 16000, format="OGG", subtype="OPUS", compression_level=0.98)
    padded = path.read_bytes()
    stripped = mc.strip_opus_tags_padding(padded)
    assert len(padded) - len(stripped) > 500
    assert mc.strip_opus_tags_padding(stripped) == stripped  # nothing left to strip
    path.write_bytes(stripped)
    decoded, _ = sf.read(path, dtype="float32")
    reference, _ = sf.read(io.BytesIO(padded), dtype="float32")
    assert decoded.shape == reference.shape and (decoded == reference).all()
    # the rewritten page's checksum is Ogg's CRC (libogg drops pages whose checksum is wrong)
    n_segs = stripped[26]
    start = 27 + n_segs + sum(stripped[27:27 + n_segs])
    n_segs = stripped[start + 26]
    end = start + 27 + n_segs + sum(stripped[start + 27:start + 27 + n_segs])
    page = bytearray(stripped[start:end])
    crc, page[22:26] = bytes(page[22:26]), b"\0\0\0\0"
    assert mc._ogg_crc(page).to_bytes(4, "little") == crc
    flac = tmp_path / "a.flac"
    sf.write(flac, audio, 16000)
    assert mc.strip_opus_tags_padding(flac.read_bytes()) == flac.read_bytes()


def test_bundled_opus_files_carry_no_tags_padding(rows):
    mc = load_script()
    for row in rows["train"][:20]:
        data = (CORPUS / row["wav"]).read_bytes()
        assert mc.strip_opus_tags_padding(data) == data, row["wav"]


def test_held_out_shortage_advice_is_what_helps():
    """Too few held-out sentences within the training vocabulary: a small --n-train needs a
    bigger one (more words), a big one leaves too few sentences out: the advice says which."""
    import random

    mc = load_script()
    sentences = mc.read_sentences(CORPUS / "sentences.txt", 4, 12)

    def split(n_train):
        return mc.split_sentences(sentences, n_train, 120, 200, 2, random.Random(1234),
                                  oov_rate=0.03)

    with pytest.raises(ValueError, match="raise --n-train") as small:
        split(100)
    assert "lower --n-train" not in str(small.value)
    assert len(split(300)["test"]) == 200  # what the advice says helps
    with pytest.raises(ValueError, match="lower --n-train") as big:
        split(len(sentences) - 500)
    assert "raise --n-train" not in str(big.value)
    assert len(split(len(sentences) - 1500)["test"]) == 200


def test_help_describes_the_script(capsys):
    with pytest.raises(SystemExit):
        load_script().parse_args(["--help"])
    assert "Synthesize a small English ASR corpus" in capsys.readouterr().out


@pytest.mark.parametrize("bad, option", [
    (["--opus-level", "7"], "--opus-level"), (["--workers", "0"], "--workers"),
    (["--speed", "200", "100"], "--speed 200 100"), (["--pitch", "20", "120"], "--pitch"),
    (["--oov-rate", "3"], "--oov-rate"), (["--noise-prob", "5"], "--noise-prob"),
    (["--reverb-prob", "-0.5"], "--reverb-prob"), (["--max-oov", "0"], "--oov-rate"),
    (["--min-words", "9", "--max-words", "4"], "--min-words"), (["--n-test", "-1"], "--n-test")])
def test_bad_options_fail_before_the_corpus_is_touched(tmp_path, monkeypatch, bad, option):
    """--overwrite replaces a corpus only once every option is known to work."""
    mc = load_script()
    monkeypatch.setattr(mc, "check_tools", lambda engines: None)
    monkeypatch.setattr(mc, "probe_voices", lambda engines, tmp: None)

    def synthesize(*args, **kwargs):
        raise mc.CorpusError("synthesis started")

    monkeypatch.setattr(mc, "synthesize", synthesize)
    out = tmp_path / "corpus"
    (out / "audio" / "train").mkdir(parents=True)
    (out / "audio" / "train" / "tr_00001.ogg").write_bytes(b"audio")
    (out / "train.csv").write_text("ID,duration,wav,spk_id,wrd\n")
    sentences = tmp_path / "s.txt"
    sentences.write_text("THE CAT SAT ON THE MAT\nTHE DOG SAT ON THE CAT\nA CAT SAT ON A DOG\n")
    before = sorted((p.relative_to(out), p.is_file() and p.read_bytes()) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as error:
        mc.main(["--out", str(out), "--overwrite", "--sentences", str(sentences), "--n-train", "1",
                 "--n-valid", "0", "--n-test", "1", "--no-real", *bad])
    assert str(error.value.code).startswith(f"ERROR: {option}")
    assert sorted((p.relative_to(out), p.is_file() and p.read_bytes())
                  for p in out.rglob("*")) == before


def _old_corpus(tmp_path):
    """A corpus folder with one file per split, a real set and a file of the user's."""
    out = tmp_path / "corpus"
    for split in ("train", "valid", "test", "real"):
        (out / "audio" / split).mkdir(parents=True)
        (out / "audio" / split / "old.ogg").write_bytes(b"old " + split.encode())
        (out / f"{split}.csv").write_text(
            f"ID,duration,wav,spk_id,wrd\nold,1.0,audio/{split}/old.ogg,x,A\n")
    (out / "notes.txt").write_text("mine")
    sentences = tmp_path / "s.txt"  # every word in every sentence: any one can be train
    sentences.write_text("THE CAT SAT ON THE MAT\nTHE MAT SAT ON THE CAT\nON THE MAT THE CAT SAT\n")
    return out, sentences


def _snapshot(out):
    return sorted((p.relative_to(out).as_posix(), p.is_file() and p.read_bytes())
                  for p in out.rglob("*"))


def _fake_synthesis(mc, monkeypatch, fail_on=None):
    """synthesize() that writes a small file, or fails like a crashed engine on job ``fail_on``."""
    monkeypatch.setattr(mc, "check_tools", lambda engines: None)
    monkeypatch.setattr(mc, "probe_voices", lambda engines, tmp: None)

    def synthesize(job, out_dir, fmt, opus_level, tmp_dir):
        if job["ID"] == fail_on:
            mc.run(["sh", "-c", "echo 'voice crashed' >&2; exit 3"])
        rel = f"audio/{job['split']}/{job['ID']}.ogg"
        (out_dir / rel).write_bytes(b"new")
        return {"ID": job["ID"], "duration": "1.000", "wav": rel, "spk_id": "espeak:en+m1",
                "wrd": job["wrd"]}

    monkeypatch.setattr(mc, "synthesize", synthesize)


def test_failed_synthesis_leaves_the_old_corpus_unchanged(tmp_path, monkeypatch):
    """A synthesis error after --overwrite: the old corpus stays byte for byte, no half-made
    folder is left, and the message names the failing command and its stderr."""
    mc = load_script()
    _fake_synthesis(mc, monkeypatch, fail_on="te_00001")
    out, sentences = _old_corpus(tmp_path)
    before = _snapshot(out)
    with pytest.raises(SystemExit) as error:
        mc.main(["--out", str(out), "--overwrite", "--sentences", str(sentences), "--n-train", "1",
                 "--n-valid", "0", "--n-test", "1", "--no-real", "--oov-rate", "0"])
    message = str(error.value.code)
    assert message.startswith("ERROR: sh -c") and "failed (3): voice crashed" in message
    assert f"Nothing in {out} was changed" in message
    assert _snapshot(out) == before


def test_overwrite_replaces_the_splits_it_makes_and_nothing_else(tmp_path, monkeypatch):
    mc = load_script()
    _fake_synthesis(mc, monkeypatch)
    out, sentences = _old_corpus(tmp_path)
    mc.main(["--out", str(out), "--overwrite", "--sentences", str(sentences), "--n-train", "1",
             "--n-valid", "0", "--n-test", "1", "--no-real", "--oov-rate", "0"])
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert not any(n.startswith(mc.STAGING) for n in names)
    assert {n for n in names if n.startswith("audio/") and n.count("/") == 2} == {
        "audio/train/tr_00001.ogg", "audio/test/te_00001.ogg", "audio/real/old.ogg"}
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "real.csv").read_text().splitlines()[1].startswith("old,")  # --no-real keeps it
    assert (out / "valid.csv").read_text() == "ID,duration,wav,spk_id,wrd\n"
    train = list(csv.DictReader(open(out / "train.csv")))
    assert [r["wav"] for r in train] == ["audio/train/tr_00001.ogg"]


def test_missing_real_recording_is_named(tmp_path, monkeypatch):
    mc = load_script()
    _fake_synthesis(mc, monkeypatch)
    out, sentences = _old_corpus(tmp_path)
    real = tmp_path / "real.csv"
    real.write_text("ID,duration,wav,spk_id,wrd\nr1,1.0,gone.wav,me,hello\n")
    before = _snapshot(out)
    with pytest.raises(SystemExit) as error:
        mc.main(["--out", str(out), "--overwrite", "--sentences", str(sentences), "--n-train", "1",
                 "--n-valid", "0", "--n-test", "1", "--real-csv", str(real), "--oov-rate", "0"])
    assert "gone.wav (row r1) not found" in str(error.value.code)
    assert _snapshot(out) == before
