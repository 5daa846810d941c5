"""Manifests (recipes.manifest) -> checked SpeechBrain datasets.

Relative wav paths are relative to the data root (the YAML's data_folder); absolute ones and
SpeechBrain's ``$data_root/...`` form work too. Bad rows (missing file, empty transcript, audio
shorter than min_duration, unparsable duration) raise one error naming the file and row, or are
skipped with a log line when ``bad_data: skip``.
"""

import logging
import os
import time

import torch

import speechbrain as sb
from speechbrain.dataio.dataset import DynamicItemDataset

from recipes import RecipeError
from recipes.audio import AudioError, load_audio  # noqa: F401 (AudioError: re-exported)
from recipes.audio_cache import AudioCache, check_fits
from recipes.manifest import REQUIRED_COLUMNS, ManifestError, read_rows
from recipes.resume import keyed_random
from recipes.robust import collate_skipping, skip_unreadable

logger = logging.getLogger(__name__)


def resolve_wav(wav, data_root):
    """Absolute path of a manifest's wav entry."""
    if wav.startswith("$data_root"):
        wav = wav.replace("$data_root", str(data_root), 1)
    return wav if os.path.isabs(wav) else os.path.join(str(data_root), wav)


def read_manifest(csv_path, data_root, min_duration=0.0, bad_data="error"):
    """Reads and checks a manifest (cheap checks: no audio is decoded).

    Returns {ID: {"duration": float, "wav": absolute path, "spk_id": str, "wrd": str}}.
    Raises ManifestError on the first bad row (bad_data "error"), or logs and drops bad rows
    (bad_data "skip"). Missing columns, a missing file or no usable row always raise.
    """
    if bad_data not in ("error", "skip"):
        raise ManifestError(f"bad_data must be 'error' or 'skip', got {bad_data!r}")
    rows = read_rows(csv_path, REQUIRED_COLUMNS, hint=(
        " (set train_csv/valid_csv/test_csv, or skip_prep: False to prepare LibriSpeech)"))
    data, skipped = {}, 0
    for line, row in enumerate(rows, start=2):  # line 1: the header
        problem = _row_problem(row, data, data_root, min_duration)
        if problem:
            where = f"{csv_path}, line {line} (ID {row.get('ID') or '?'})"
            if bad_data == "error":
                raise ManifestError(f"{where}: {problem}. Fix or remove the row, or set "
                                    "bad_data: skip to drop such rows.")
            logger.warning(f"Skipping {where}: {problem}")
            skipped += 1
            continue
        data[row["ID"]] = {
            "duration": float(row["duration"]),
            "wav": resolve_wav(row["wav"], data_root),
            "spk_id": row.get("spk_id") or "",
            "wrd": " ".join(row["wrd"].split()),
        }
    if not data:
        raise ManifestError(f"{csv_path}: no usable row ({skipped} skipped)")
    if skipped:
        logger.warning(f"{csv_path}: skipped {skipped} bad row(s), kept {len(data)}")
    return data


def _row_problem(row, seen, data_root, min_duration):
    if not row.get("ID"):
        return "empty ID"
    if row["ID"] in seen:
        return "duplicate ID"
    if not (row.get("wrd") or "").strip():
        return "empty transcript (wrd)"
    try:
        duration = float(row.get("duration") or "")
    except ValueError:
        return f"duration {row.get('duration')!r} is not a number of seconds"
    if duration < min_duration:
        return (f"audio of {duration:.3f} s is shorter than min_duration {min_duration} s "
                "(too few frames after the front end's 4x subsampling)")
    path = resolve_wav(row.get("wav") or "", data_root)
    if not row.get("wav") or not os.path.isfile(path):
        return f"audio file {path} not found"
    return None


def _dataset(csv_path, hparams, sort):
    data = read_manifest(csv_path, hparams["data_folder"], hparams.get("min_duration", 0.0),
                         hparams.get("bad_data", "error"))
    dataset = DynamicItemDataset(data)
    if sort in ("ascending", "descending"):
        dataset = dataset.filtered_sorted(sort_key="duration", reverse=sort == "descending")
    return dataset


def dataio_prepare(hparams, tokenizer, with_bos_eos):
    """Builds the datasets and (with dynamic batching) the batch samplers.

    Arguments
    ---------
    hparams : flat recipe dict (train_csv, valid_csv, test_csv, data_folder, sorting, ...).
    tokenizer : sentencepiece.SentencePieceProcessor.
    with_bos_eos : bool, add tokens_bos / tokens_eos (attention decoder) besides tokens.

    Returns
    -------
    train, valid : DynamicItemDataset
    tests : {name: DynamicItemDataset}, name = test CSV file stem
    train_sampler, valid_sampler : DynamicBatchSampler or None
    """
    sorting = hparams.get("sorting", "random")
    if sorting not in ("random", "ascending", "descending"):
        raise ValueError(f"sorting must be random, ascending or descending, got {sorting!r}")
    train = _dataset(hparams["train_csv"], hparams, sorting)
    if sorting != "random":
        hparams["train_dataloader_opts"]["shuffle"] = False  # keep the sorted order
    valid = _dataset(hparams["valid_csv"], hparams, "ascending")
    test_csvs = hparams["test_csv"]
    test_csvs = [test_csvs] if isinstance(test_csvs, str) else list(test_csvs)
    tests = {os.path.splitext(os.path.basename(c))[0]: _dataset(c, hparams, "ascending")
             for c in test_csvs}
    datasets = [train, valid, *tests.values()]
    sample_rate, min_duration = hparams["sample_rate"], hparams.get("min_duration", 0.0)
    load = load_audio
    if hparams.get("bad_data") == "skip":  # unreadable files are logged and left out of batches
        load = skip_unreadable(load_audio, AudioError)
        for opts in ("train_dataloader_opts", "valid_dataloader_opts", "test_dataloader_opts"):
            hparams[opts]["collate_fn"] = collate_skipping
    test_load = load  # test sets are read once: not cached
    if hparams.get("cache_audio"):
        load = cached_audio(load, [train, valid], sample_rate, min_duration)

    def audio_item(loader):
        @sb.utils.data_pipeline.takes("id", "wav")
        @sb.utils.data_pipeline.provides("sig")
        def audio_pipeline(utt_id, wav):
            return loader(wav, sample_rate, utt_id, min_duration)
        return audio_pipeline

    per_utterance = (speed_perturb_per(hparams) == "utterance"
                     and hparams.get("speed_perturb") is not None)

    @sb.utils.data_pipeline.takes("id", "wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline_train(utt_id, wav):
        sig = load(wav, sample_rate, utt_id, min_duration)
        if per_utterance and sig is not None:  # in loader workers
            with keyed_random(hparams["seed"], hparams["epoch_counter"].current, utt_id):
                sig = hparams["speed_perturb"](sig.unsqueeze(0)).squeeze(0)
        return sig

    sb.dataio.dataset.add_dynamic_item([valid], audio_item(load))
    sb.dataio.dataset.add_dynamic_item(list(tests.values()), audio_item(test_load))
    sb.dataio.dataset.add_dynamic_item([train], audio_pipeline_train)

    bos, eos = hparams.get("bos_index"), hparams.get("eos_index")
    keys = ["id", "sig", "wrd", "tokens"] + (["tokens_bos", "tokens_eos"] if with_bos_eos else [])

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens_list", "tokens", "tokens_bos", "tokens_eos")
    def text_pipeline(wrd):
        tokens_list = tokenizer.encode_as_ids(wrd)
        yield tokens_list
        yield torch.LongTensor(tokens_list)
        yield torch.LongTensor([bos] + tokens_list)
        yield torch.LongTensor(tokens_list + [eos])

    sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
    sb.dataio.dataset.set_output_keys(datasets, keys)

    train_sampler = valid_sampler = None
    if hparams["dynamic_batching"]:
        from speechbrain.dataio.sampler import DynamicBatchSampler

        def length(x):
            return x["duration"]

        train_sampler = DynamicBatchSampler(train, length_func=length,
                                            **hparams["dynamic_batch_sampler_train"])
        valid_sampler = DynamicBatchSampler(valid, length_func=length,
                                            **hparams["dynamic_batch_sampler_valid"])
    return train, valid, tests, train_sampler, valid_sampler


def speed_perturb_per(hparams):
    """'utterance' (the data pipeline perturbs) or 'batch' (RecipeBrain.front_end does)."""
    per = hparams.get("speed_perturb_per", "utterance")
    if per not in ("utterance", "batch"):
        raise RecipeError(f"speed_perturb_per must be 'utterance' or 'batch', got {per!r}")
    return per


def cached_audio(load, datasets, sample_rate, min_duration):
    """An AudioCache of ``load`` holding the decoded audio of ``datasets`` (train, valid);
    RecipeError when it would not fit in memory."""
    rows = [(i, ds.data[i]["wav"]) for ds in datasets for i in ds.data_ids]
    seconds = sum(ds.data[i]["duration"] for ds in datasets for i in ds.data_ids)
    check_fits(seconds, sample_rate)
    cache = AudioCache(load)
    start = time.perf_counter()
    cache.preload(rows, sample_rate, min_duration)
    logger.info("cache_audio: decoded %d files (%.1f h) into %.0f MB in %.1f s", len(rows),
                seconds / 3600, cache.nbytes() / 2**20, time.perf_counter() - start)
    return cache


def loader_kwargs(hparams, train_sampler, valid_sampler):
    """Dataloader options for fit(): batch samplers replace batch_size/shuffle when given."""
    train_opts = dict(hparams["train_dataloader_opts"])
    valid_opts = dict(hparams["valid_dataloader_opts"])
    if train_sampler is not None:
        train_opts = {"batch_sampler": train_sampler, "num_workers": hparams["num_workers"],
                      **_collate(train_opts)}
    if valid_sampler is not None:
        valid_opts = {"batch_sampler": valid_sampler, **_collate(valid_opts)}
    if hparams.get("cache_audio"):  # nothing left to decode: no worker processes (no copies)
        train_opts["num_workers"] = 0
    return train_opts, valid_opts


def _collate(opts):
    return {"collate_fn": opts["collate_fn"]} if "collate_fn" in opts else {}
