"""librispeech_prepare.py on a fake LibriSpeech tree, and the manifest / audio checks."""

import csv
import os

import numpy as np
import pytest
import soundfile

from recipes.librispeech import PrepareError, prepare_librispeech
from recipes.data import AudioError, ManifestError, load_audio, read_manifest

SR = 16000


def _flac(path, seconds):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = np.arange(int(seconds * SR)) / SR
    soundfile.write(path, 0.1 * np.sin(2 * np.pi * 440 * t), SR, format="FLAC")


def _fake_librispeech(root):
    """Two splits: <split>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac + .trans.txt."""
    layout = {"train-clean-100": [("19", "198", ["HELLO WORLD", "A  B C"])],
              "dev-clean": [("84", "121", ["GOOD MORNING"])]}
    for split, chapters in layout.items():
        for spk, chap, texts in chapters:
            folder = root / split / spk / chap
            lines = []
            for i, text in enumerate(texts):
                utt = f"{spk}-{chap}-{i:04d}"
                _flac(str(folder / f"{utt}.flac"), 0.5 + 0.25 * i)
                lines.append(f"{utt} {text}")
            (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_prepare_writes_relative_manifests_and_skips_done_work(tmp_path):
    data, out = tmp_path / "LibriSpeech", tmp_path / "out"
    _fake_librispeech(data)
    kwargs = dict(tr_splits=["train-clean-100"], dev_splits=["dev-clean"], te_splits=[],
                  merge_lst=["train-clean-100"], merge_name="train.csv")
    prepare_librispeech(str(data), str(out), **kwargs)
    rows = _rows(out / "train-clean-100.csv")
    assert list(rows[0]) == ["ID", "duration", "wav", "spk_id", "wrd"]
    assert [r["ID"] for r in rows] == ["19-198-0000", "19-198-0001"]
    assert rows[0]["wav"] == os.path.join("train-clean-100", "19", "198", "19-198-0000.flac")
    assert [float(r["duration"]) for r in rows] == [0.5, 0.75]
    assert rows[1]["wrd"] == "A B C" and rows[1]["spk_id"] == "19"
    assert _rows(out / "train.csv") == rows
    assert [r["wrd"] for r in _rows(out / "dev-clean.csv")] == ["GOOD MORNING"]
    # the manifests pass the recipe's checks against the data folder
    assert set(read_manifest(str(out / "train.csv"), str(data))) == {"19-198-0000", "19-198-0001"}

    stamp = os.path.getmtime(out / "train.csv")
    prepare_librispeech(str(data), str(out), **kwargs)  # same options: nothing rewritten
    assert os.path.getmtime(out / "train.csv") == stamp
    prepare_librispeech(str(data), str(out), **{**kwargs, "dev_splits": []})  # new options: redone
    assert os.path.getmtime(out / "train.csv") != stamp


def test_prepare_fails_early_on_missing_folder_or_split(tmp_path):
    with pytest.raises(PrepareError, match="does not exist"):
        prepare_librispeech(str(tmp_path / "nope"), str(tmp_path / "out"), ["train-clean-100"])
    data = tmp_path / "LibriSpeech"
    _fake_librispeech(data)
    with pytest.raises(PrepareError, match="test-other not found.*found: dev-clean, train-clean-1"):
        prepare_librispeech(str(data), str(tmp_path / "out"), ["train-clean-100"],
                            te_splits=["test-other"])
    assert not (tmp_path / "out" / "train-clean-100.csv").exists()  # nothing half done


def test_prepare_command_line_takes_the_recipe_key_names(tmp_path, capsys):
    import librispeech_prepare

    data = tmp_path / "LibriSpeech"
    _fake_librispeech(data)
    out = tmp_path / "out"
    assert librispeech_prepare.run_cli(librispeech_prepare.main, [
        str(data), str(out), "--train_splits", "train-clean-100", "--dev_splits", "dev-clean",
        "--test_splits"]) == 0
    assert (out / "train-clean-100.csv").is_file() and (out / "dev-clean.csv").is_file()
    assert librispeech_prepare.run_cli(librispeech_prepare.main, [
        str(tmp_path / "nope"), str(out)]) == 1  # one ERROR line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("ERROR: LibriSpeech folder") and "Traceback" not in err


def _manifest(path, rows, header="ID,duration,wav,spk_id,wrd"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(path)


@pytest.fixture
def audio_dir(tmp_path):
    _flac(str(tmp_path / "a.flac"), 0.5)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really audio")
    return tmp_path


@pytest.mark.parametrize("row, message", [
    ("u2,0.5,missing.flac,s,HI", "line 3 \\(ID u2\\): audio file .*missing.flac not found"),
    ("u2,0.5,a.flac,s,  ", "line 3 \\(ID u2\\): empty transcript"),
    ("u2,0.02,a.flac,s,HI", "line 3 \\(ID u2\\): audio of 0.020 s is shorter than min_duration"),
    ("u2,abc,a.flac,s,HI", "line 3 \\(ID u2\\): duration 'abc' is not a number"),
    ("u1,0.5,a.flac,s,HI", "line 3 \\(ID u1\\): duplicate ID"),
])
def test_bad_rows_name_file_and_row(audio_dir, row, message):
    csv_path = _manifest(audio_dir / "m.csv", ["u1,0.5,a.flac,s,HELLO", row])
    with pytest.raises(ManifestError, match=message):
        read_manifest(csv_path, str(audio_dir), min_duration=0.1)
    kept = read_manifest(csv_path, str(audio_dir), min_duration=0.1, bad_data="skip")
    assert list(kept) == ["u1"]  # skipped with a log line instead


def test_manifest_columns_paths_and_audio(audio_dir):
    with pytest.raises(ManifestError, match="missing column\\(s\\) wrd"):
        read_manifest(_manifest(audio_dir / "m.csv", ["u1,0.5,a.flac"], "ID,duration,wav"),
                      str(audio_dir))
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(str(audio_dir / "nope.csv"), str(audio_dir))
    rows = read_manifest(_manifest(audio_dir / "m.csv", [
        f"u1,0.5,{audio_dir / 'a.flac'},s,HELLO  THERE", "u2,0.5,$data_root/a.flac,s,HI",
        "u3,0.5,broken.wav,s,HI"]), str(audio_dir))
    assert rows["u1"]["wrd"] == "HELLO THERE"
    assert rows["u2"]["wav"] == str(audio_dir / "a.flac")
    assert load_audio(rows["u1"]["wav"], SR).shape == (SR // 2,)
    assert load_audio(rows["u1"]["wav"], 8000).shape == (SR // 4,)  # resampled
    with pytest.raises(AudioError, match="Cannot read audio .*broken.wav \\(ID u3\\)"):
        load_audio(rows["u3"]["wav"], SR, "u3")
    with pytest.raises(AudioError, match="a.flac \\(ID u1\\) lasts 0.500 s, less than min_dur"):
        load_audio(rows["u1"]["wav"], SR, "u1", min_duration=1.0)  # the CSV said 0.5 s is fine
