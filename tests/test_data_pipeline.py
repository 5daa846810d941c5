"""The training data pipeline: cache_audio (decoded audio kept in memory, recipes.audio_cache) and
speed_perturb_per (per utterance in the data pipeline, or per batch in RecipeBrain.front_end)."""

import csv
import types
from pathlib import Path

import pytest
import speechbrain as sb
import torch
from speechbrain.augment.time_domain import SpeedPerturb

from recipes import RecipeError
from recipes.audio import AudioError, load_audio
from recipes.audio_cache import AudioCache, check_fits
from recipes.brain import RecipeBrain
from recipes.data import dataio_prepare
from recipes.robust import skip_unreadable

CORPUS = Path(__file__).resolve().parents[1] / "data" / "mini_corpus"


def _rows(split, n):
    with open(CORPUS / f"{split}.csv", newline="") as f:
        return list(csv.DictReader(f))[:n]


class Tokenizer:
    def encode_as_ids(self, text):
        return [1 + ord(c) % 20 for c in text]


class CountingLoader:
    def __init__(self, load=load_audio):
        self.load, self.calls = load, []

    def __call__(self, wav, sample_rate, utt_id=None, min_duration=0.0):
        self.calls.append(wav)
        return self.load(wav, sample_rate, utt_id, min_duration)


def test_cached_audio_matches_the_file_and_is_decoded_once():
    rows = [(r["ID"], str(CORPUS / r["wav"])) for r in _rows("train", 4)]
    loader = CountingLoader()
    cache = AudioCache(loader)
    assert cache.preload(rows, 16000, 0.1, threads=2) == 4
    assert cache.preload(rows, 16000, 0.1) == 0  # already there
    for utt_id, wav in rows:
        sig = cache(wav, 16000, utt_id)
        ref = load_audio(wav, 16000, utt_id)
        assert sig.dtype == torch.float32 and sig.shape == ref.shape
        assert (sig - ref).abs().max() <= 0.5 / 32767 + 1e-7  # int16 rounding, no more
        sig.zero_()  # a caller changing its copy leaves the cache alone
        assert cache(wav, 16000, utt_id).abs().max() > 0
    assert sorted(loader.calls) == sorted(wav for _, wav in rows)
    assert cache.nbytes() == 2 * sum(load_audio(w, 16000).numel() for _, w in rows)


def test_loud_audio_is_kept_exactly_and_unreadable_files_stay_skipped(tmp_path):
    loud = torch.tensor([0.5, -1.5, 2.0])
    cache = AudioCache(lambda wav, sr, utt_id=None, min_duration=0.0: loud.clone())
    assert torch.equal(cache("loud.wav", 16000), loud)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    skipping = AudioCache(skip_unreadable(load_audio, AudioError))
    skipping.preload([("u1", str(bad))], 16000, 0.0)
    assert skipping(str(bad), 16000, "u1") is None
    with pytest.raises(AudioError, match="bad.wav"):  # bad_data: error names the file
        AudioCache(load_audio).preload([("u1", str(bad))], 16000, 0.0)


def test_cache_too_large_for_memory_is_refused():
    assert check_fits(3600, 16000, memory_bytes=2**30) == 3600 * 16000 * 2
    with pytest.raises(RecipeError, match="cache_audio: False"):
        check_fits(20 * 3600, 16000, memory_bytes=2**30)  # 2.3 GB of a 1 GB machine


def _hparams(tmp_path, cache):
    fields = ["ID", "duration", "wav", "spk_id", "wrd"]
    csvs = {}
    for split, n in (("train", 6), ("valid", 2), ("test", 2)):
        csvs[split] = tmp_path / f"{split}.csv"
        with open(csvs[split], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(_rows(split, n))
    return {"train_csv": str(csvs["train"]), "valid_csv": str(csvs["valid"]),
            "test_csv": [str(csvs["test"])], "data_folder": str(CORPUS), "sample_rate": 16000,
            "min_duration": 0.1, "dynamic_batching": False, "cache_audio": cache,
            "num_workers": 2, "train_dataloader_opts": {"batch_size": 2, "num_workers": 2},
            "valid_dataloader_opts": {"batch_size": 1}, "test_dataloader_opts": {}}


def test_dataio_prepare_serves_cached_train_and_valid_audio(tmp_path, monkeypatch):
    import recipes.data
    from recipes.data import loader_kwargs

    loader = CountingLoader()
    monkeypatch.setattr(recipes.data, "load_audio", loader)
    hparams = _hparams(tmp_path, cache=True)
    train, valid, tests, _, _ = dataio_prepare(hparams, Tokenizer(), with_bos_eos=False)
    assert len(loader.calls) == 8  # train + valid, decoded up front
    for _ in range(2):  # two epochs: nothing decoded again
        for dataset in (train, valid):
            for item in dataset:
                ref = load_audio(dataset.data[item["id"]]["wav"], 16000)
                assert (item["sig"] - ref).abs().max() <= 0.5 / 32767 + 1e-7
    assert len(loader.calls) == 8
    list(tests["test"])  # test sets: read when used, not kept
    list(tests["test"])
    assert len(loader.calls) == 12
    train_opts, _ = loader_kwargs(hparams, None, None)
    assert train_opts["num_workers"] == 0  # no worker copies of the cache
    uncached = _hparams(tmp_path, cache=False)
    dataio_prepare(uncached, Tokenizer(), with_bos_eos=False)
    assert len(loader.calls) == 12 and loader_kwargs(uncached, None, None)[0]["num_workers"] == 2


def _slow_down():
    return SpeedPerturb(orig_freq=16000, speeds=[90])  # 1 / 0.9 times the samples


def _train_signals(tmp_path, per):
    hparams = _hparams(tmp_path, cache=False)
    hparams.update(speed_perturb=_slow_down(), speed_perturb_per=per, seed=1,
                   epoch_counter=types.SimpleNamespace(current=1))
    train, *_ = dataio_prepare(hparams, Tokenizer(), with_bos_eos=False)
    return [(item["sig"], train.data[item["id"]]["wav"]) for item in train]


def test_per_utterance_perturbs_in_the_pipeline_and_per_batch_does_not(tmp_path):
    for (sig, wav), (slowed, _) in zip(_train_signals(tmp_path, "batch"),
                                       _train_signals(tmp_path, "utterance")):
        assert torch.equal(sig, load_audio(wav, 16000))
        assert abs(len(slowed) - len(sig) / 0.9) < 2
    with pytest.raises(RecipeError, match="speed_perturb_per"):
        _train_signals(tmp_path, "epoch")
    unperturbed = _hparams(tmp_path, cache=False)
    unperturbed.update(speed_perturb=None, speed_perturb_per="epoch")
    with pytest.raises(RecipeError, match="speed_perturb_per"):  # checked with or without it
        dataio_prepare(unperturbed, Tokenizer(), with_bos_eos=False)


def _front_end_input(per, stage):
    """The waveform batch RecipeBrain.front_end gives to compute_features."""
    seen = []
    brain = types.SimpleNamespace(
        hparams=types.SimpleNamespace(
            speed_perturb=_slow_down(), speed_perturb_per=per, fea_augment=None,
            compute_features=lambda wavs: seen.append(wavs) or wavs.unsqueeze(-1),
            epoch_counter=types.SimpleNamespace(current=1)),
        modules=types.SimpleNamespace(normalize=lambda feats, lens, epoch: feats,
                                      CNN=lambda feats: feats))
    brain._augmenting = lambda stage: RecipeBrain._augmenting(brain, stage)
    wavs = torch.sin(torch.arange(2 * 16000, dtype=torch.float32) / 7).reshape(2, 16000)
    RecipeBrain.front_end(brain, wavs, torch.tensor([1.0, 0.5]), stage)
    return wavs, seen[0]


def test_per_batch_perturbs_the_training_batch_only():
    wavs, seen = _front_end_input("batch", sb.Stage.TRAIN)
    assert seen.shape == (2, 17778)  # both utterances at the one drawn speed
    assert torch.allclose(seen[1, :7000], _slow_down()(wavs[1:, :])[0, :7000], atol=1e-5)
    for per, stage in (("batch", sb.Stage.VALID), ("utterance", sb.Stage.TRAIN)):
        wavs, seen = _front_end_input(per, stage)
        assert torch.equal(seen, wavs)
