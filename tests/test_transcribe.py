"""inference.transcriber (Python API) and transcribe.py (CLI) on tiny exported models.

The models are the tiny CTC / S2S recipes with random weights, exported once per module by
recipes.untrained.export_untrained (seconds; training them would not make the assertions
stronger: a briefly trained tiny model mostly emits blanks). Random models react to tiny input
changes, so transcripts are compared only where the inputs are meant to be identical; resampling
is checked on the waveform.
"""

import csv
import functools
import math
import os
import subprocess
import sys

import pytest
import soundfile
import torch
import torchaudio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "data", "mini_corpus")
import transcribe
from inference.transcriber import (ATTENTION_CHUNK_SECONDS, ENCODER_FRAMES_PER_SECOND,
                                   MAMBA_CHUNK_SECONDS, Transcriber, TranscriberError,
                                   chunk_bounds, default_chunk_seconds, merge_words)
from recipes.audio import AudioError, check_audio, load_audio, to_float
from recipes.manifest import read_rows
from recipes.untrained import export_untrained

SR = 16000


def _corpus_files(count=3):
    """The first `count` existing audio files of the bundled corpus (test set, then real
    recordings), else of ../shared/data/real_speech (development machines)."""
    files = []
    for csv_path, root in [(os.path.join(CORPUS, "test.csv"), CORPUS),
                           (os.path.join(CORPUS, "real.csv"), CORPUS),
                           (os.path.join(REPO, "..", "shared", "data", "real_speech",
                                         "real_speech.csv"),
                            os.path.join(REPO, "..", "shared", "data", "real_speech"))]:
        if os.path.isfile(csv_path):
            with open(csv_path, newline="") as f:
                files += [p for p in (os.path.join(root, row["wav"]) for row in csv.DictReader(f))
                          if os.path.isfile(p)]
    return files[:count]


@pytest.fixture(scope="module")
def audio_files():
    files = _corpus_files()
    if len(files) < 3:
        pytest.skip("no audio: the bundled corpus data/mini_corpus is missing")
    return files


@pytest.fixture(scope="module")
def ctc_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_ctc")
    return export_untrained(os.path.join(REPO, "hparams/CTC/tiny.yaml"), "CTC", str(folder),
                            n_sentences=2000)


@pytest.fixture(scope="module")
def s2s_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_s2s")
    return export_untrained(os.path.join(REPO, "hparams/S2S/tiny.yaml"), "S2S", str(folder),
                            n_sentences=2000)


@pytest.fixture(scope="module")
def ctc(ctc_dir):
    return Transcriber.from_folder(ctc_dir, device="cpu")


def _write(path, wav, sample_rate):
    """wav: (samples,) or (samples, channels) tensor; float WAV keeps the values exactly."""
    soundfile.write(str(path), wav.numpy(), sample_rate, subtype="FLOAT")
    return str(path)


# --- pure functions ---------------------------------------------------------------------------

def test_chunk_bounds():
    assert chunk_bounds(40, 40, 10) == [(0, 40)]
    assert chunk_bounds(100, 40, 10) == [(0, 40), (30, 70), (60, 100)]
    for n in (41, 99, 1001, 9600):
        bounds = chunk_bounds(n, 160, 32)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(end - start <= 160 for start, end in bounds)
        assert all(a[1] - b[0] == 32 for a, b in zip(bounds, bounds[1:]))
        assert len(chunk_bounds(n, 160, 32)) == -(-(n - 32) // (160 - 32))  # fewest chunks


def test_merge_words():
    split = str.split
    # common run "D E" in the overlap: joined at its middle, nothing doubled
    assert merge_words(split("A B C D E"), split("D E F G"), 2, 2) == split("A B C D E F G")
    # the chunks disagree on one overlap word: the common "D" anchors the join
    assert merge_words(split("A B C X D"), split("Y D E F"), 2, 2) == split("A B C X D E F")
    # no common word: each side drops the words of its half of the overlap
    assert merge_words(split("A B C D"), split("E F G"), 2, 2) == split("A B C F G")
    assert merge_words([], split("E F"), 0, 1) == split("E F")
    # a common word outside the overlap's place (THE ... THE) is no anchor: it dropped 4 words
    left, right = split("X Y ROUND UP TO THE NEREST HA UR FA"), split("IRIST HAL FEIR THE BIG DAY")
    assert merge_words(left, right, 5, 5) == left[:-2] + right[2:]
    # no overlap: joined as they are (a common word used to cut both sides)
    assert merge_words(split("RIGHT TO THE"), split("SKY TO THE"), 0, 0) == split(
        "RIGHT TO THE SKY TO THE")


# --- Python API -------------------------------------------------------------------------------

def test_transcribes_files_greedy(ctc, audio_files):
    texts = ctc.transcribe_files(audio_files)
    assert len(texts) == 3 and all(isinstance(t, str) and t.strip() for t in texts)
    assert all(t == t.upper() for t in texts)
    # greedy CTC: argmax decoding, no beam search
    assert isinstance(ctc.asr.decoding_function, functools.partial)
    # batched decoding gives each file's own transcript
    assert texts == [ctc.transcribe_files([f])[0] for f in audio_files]
    wav, sr = soundfile.read(audio_files[0], dtype="float32")
    assert sr == SR and ctc.transcribe_waveform(torch.from_numpy(wav), sr) == texts[0]


def test_stereo_is_averaged_and_any_rate_resampled(ctc, audio_files, tmp_path):
    # on the 16-bit grid, so that x + d, x - d and their mean are exact in float32
    x = torch.round(ctc.load_audio(audio_files[0]) * 32768) / 32768
    expected = ctc.transcribe_waveform(x, SR)
    # 16 kHz stereo whose channel mean is exactly x: same transcript
    d = torch.round(torch.randn_like(x) * 64) / 1024
    stereo = _write(tmp_path / "stereo16.wav", torch.stack([x + d, x - d], 1), SR)
    assert torch.equal(ctc.load_audio(stereo), x)
    assert ctc.transcribe_files([stereo]) == [expected]
    # 44.1 kHz stereo: resampled back to the model's 16 kHz (band-limited x: the round trip is
    # near-exact; a random model's transcript still flips on such differences, so compare signals)
    x_lp = torchaudio.functional.resample(torchaudio.functional.resample(x, SR, 12000), 12000, SR)
    y = torchaudio.functional.resample(x_lp, SR, 44100)
    path44 = _write(tmp_path / "stereo44.wav", torch.stack([y + 0.1, y - 0.1], 1), 44100)
    back = ctc.load_audio(path44)
    n = len(x_lp)
    assert n <= len(back) <= n + 1  # the two rate changes round the length up
    snr = 10 * torch.log10(x_lp.pow(2).sum() / (back[:n] - x_lp).pow(2).sum())
    assert snr > 40, f"44.1 kHz -> 16 kHz round trip SNR {snr:.1f} dB"
    assert ctc.transcribe_files([path44]) == [ctc.transcribe_waveform(back, SR)]
    wav44, _ = soundfile.read(path44, dtype="float32")
    assert ctc.transcribe_waveform(torch.from_numpy(wav44), 44100) == \
        ctc.transcribe_waveform(torch.from_numpy(wav44).t(), 44100)  # (channels, samples) too


def test_long_audio_is_chunked_with_bounded_batches(ctc, ctc_dir, audio_files, tmp_path):
    asr = Transcriber.from_folder(ctc_dir, device="cpu", chunk_seconds=3.0,
                                  overlap_seconds=0.5, batch_size=2)
    pieces = [asr.load_audio(f) for f in audio_files]
    long_wav = torch.cat(pieces * 3)  # ~20 s
    long_path = _write(tmp_path / "long.wav", long_wav, SR)
    seen = []
    decode = asr._decode
    asr._decode = lambda batch: seen.append([len(p) for p in batch]) or decode(batch)
    text = asr.transcribe_files([long_path])[0]
    bounds = asr.last_chunks[0]
    assert len(bounds) == -(-(len(long_wav) - 8000) // (48000 - 8000)) > 4
    assert bounds[0][0] == 0 and bounds[-1][1] == len(long_wav)
    assert all(a[1] - b[0] == 8000 for a, b in zip(bounds, bounds[1:]))
    # what the model sees is bounded: chunks of <= 3 s, <= 2 per batch
    assert sum(len(b) for b in seen) == len(bounds)
    assert max(max(b) for b in seen) <= 3 * SR and max(len(b) for b in seen) <= 2
    assert text.strip()
    # audio just under the limit is decoded in one piece
    short = long_wav[: 3 * SR - 1]
    seen.clear()
    assert asr.transcribe_waveform(short, SR) == ctc.transcribe_waveform(short, SR)
    assert asr.last_chunks == [[(0, 3 * SR - 1)]] and seen == [[3 * SR - 1]]


def test_chunk_length_by_encoder_type(ctc, ctc_dir, s2s_dir):
    assert MAMBA_CHUNK_SECONDS >= 120 and ATTENTION_CHUNK_SECONDS == 30
    assert default_chunk_seconds("conmamba", "CTC") == MAMBA_CHUNK_SECONDS
    assert default_chunk_seconds("mamba", "CTC") == MAMBA_CHUNK_SECONDS
    for encoder in ("conformer", "transformer", "branchformer", None):
        assert default_chunk_seconds(encoder, "CTC") == ATTENTION_CHUNK_SECONDS
    assert default_chunk_seconds("conmamba", "S2S") == ATTENTION_CHUNK_SECONDS
    # read from the exported folders: the tiny recipes have ConMamba encoders
    assert ctc.chunk_seconds == MAMBA_CHUNK_SECONDS
    assert Transcriber.from_folder(s2s_dir, device="cpu").chunk_seconds == ATTENTION_CHUNK_SECONDS
    assert Transcriber.from_folder(ctc_dir, device="cpu", chunk_seconds=20).chunk_seconds == 20
    proc = subprocess.run([sys.executable, os.path.join(REPO, "transcribe.py"), "-h"],
                          capture_output=True, text=True, cwd=REPO)
    assert "--chunk-seconds" in proc.stdout and proc.returncode == 0


def test_files_worth_the_compiled_scan_load_it_before_the_first(ctc, audio_files,
                                                               unloaded_kernels, monkeypatch):
    """Files whose Mamba scans add up to LOAD_AFTER load the compiled kernels before the first
    file, so that no scan runs the pure-PyTorch path (each file in its own batch here, none
    worth it alone); one file alone leaves them unloaded."""
    from modules.mamba import scan_cpu
    from recipes.audio import check_audio

    monkeypatch.setattr(ctc, "batch_size", 1)
    encoder = next(m for m in ctc.asr.mods.modules() if getattr(m, "scan_work_per_frame", 0))
    seconds = sum(check_audio(f) for f in audio_files)
    work = seconds * ENCODER_FRAMES_PER_SECOND * encoder.scan_work_per_frame
    runs = unloaded_kernels(load_after=int(0.9 * work))
    ctc.transcribe_files(audio_files[:1])
    assert not scan_cpu.loaded() and not runs and scan_cpu._torch_work > 0
    scan_cpu._torch_work = 0
    ctc.transcribe_files(audio_files)
    assert scan_cpu.loaded() and len(runs) == 2 * len(audio_files)  # 2 layers per file
    assert scan_cpu._torch_work == 0  # no scan ran before the kernels loaded


def test_batches_stop_at_batch_seconds(ctc):
    """Long chunks are not batched into one huge input: a batch holds at most batch_size
    segments and BATCH_SECONDS of audio (but always one segment)."""
    asr = Transcriber(ctc.asr, "CTC", batch_size=4)
    asr.BATCH_SECONDS = 9.0
    seen = []
    asr._decode = lambda batch: seen.append([len(p) for p in batch]) or [""] * len(batch)
    asr.transcribe_waveforms([torch.zeros(4 * SR), torch.zeros(4 * SR), torch.zeros(10 * SR)])
    assert seen == [[10 * SR], [4 * SR, 4 * SR]]


def _local_context_model(folder, dest):
    """A copy of an exported tiny ConMamba CTC model whose output at a frame depends on nearby
    audio only, with clear argmax margins: Mamba states forget within a frame (dt = softplus(5),
    A = -e^2), the CTC layer is scaled up and restricted to blank, space and 8 letters (space
    favoured so that the transcript has many distinct words to align chunks on)."""
    import shutil

    shutil.copytree(folder, dest)
    path = os.path.join(dest, "model.ckpt")
    state = torch.load(path)
    for key, value in state.items():
        if key.endswith((".A_log", ".A_b_log")):
            value.fill_(2.0)
        elif key.endswith(("dt_proj.bias", "dt_proj_b.bias")):
            value.fill_(5.0)
        elif key.endswith(("dt_proj.weight", "dt_proj_b.weight")):
            value.zero_()
    keep = torch.zeros(state["2.w.bias"].shape[0], dtype=torch.bool)
    keep[[0, 3, 4, 5, 6, 7, 8, 9, 10, 11]] = True  # blank, "▁", E T O A I N S R
    state["2.w.weight"].mul_(50).masked_fill_(~keep[:, None], 0.0)
    state["2.w.bias"].zero_().masked_fill_(~keep, -1e4)[3] = 30.0
    torch.save(state, path)
    return str(dest)


def test_long_mamba_audio_in_one_piece_equals_chunked_path(ctc_dir, tmp_path):
    """By default a Mamba CTC model decodes a minute of audio in one piece; on a clean case
    (a model with local context; audio whose loudest frame is in every chunk, since the
    features' top_db floor is relative to it) the chunked path gives the same text."""
    model = _local_context_model(ctc_dir, tmp_path / "local")
    rows = [r for r in read_rows(os.path.join(CORPUS, "test.csv"))
            if r["spk_id"].startswith("flite:")][:8]  # gives many distinct words (the chunk
    # merge aligns texts on words: long runs of one word, as espeak's voices give this model,
    # make the join ambiguous)
    period = torch.cat([load_audio(os.path.join(CORPUS, r["wav"]), SR) for r in rows])[: 12 * SR]
    wav = period.repeat(5)  # 60 s; every 20 s chunk holds a whole period, so its loudest frame
    whole = Transcriber.from_folder(model, device="cpu")
    text = whole.transcribe_waveform(wav, SR)
    assert whole.last_chunks == [[(0, len(wav))]]
    chunked = Transcriber.from_folder(model, device="cpu", chunk_seconds=20, overlap_seconds=4)
    assert chunked.transcribe_waveform(wav, SR) == text
    assert len(chunked.last_chunks[0]) == 4
    assert len(set(text.split())) > 10 and len(text.split()) > 40


def test_ctc_beam_search(ctc_dir, audio_files):
    from speechbrain.decoders.ctc import CTCBeamSearcher

    asr = Transcriber.from_folder(ctc_dir, device="cpu", beam_size=4)
    assert isinstance(asr.asr.decoding_function, CTCBeamSearcher)
    assert asr.asr.decoding_function.beam_size == 4
    texts = asr.transcribe_files(audio_files[:2])
    assert len(texts) == 2 and all(t.strip() for t in texts)


def test_s2s_model(s2s_dir, audio_files):
    asr = Transcriber.from_folder(s2s_dir, device="cpu", beam_size=2)
    assert asr.kind == "S2S" and asr.asr.mods.decoder.beam_size == 2
    assert asr.asr.mods.decoder.ctc_weight == pytest.approx(0.4)  # the exported weight
    # (batched S2S transcripts may differ from single ones: max_decode_ratio applies to the
    # longest utterance, and a random decoder runs to that cap)
    texts = asr.transcribe_files(audio_files[:2])
    assert len(texts) == 2 and all(isinstance(t, str) and t.strip() for t in texts)
    no_ctc = Transcriber.from_folder(s2s_dir, device="cpu", beam_size=2, ctc_weight=0.0)
    assert no_ctc.asr.mods.decoder.scorer is None
    assert no_ctc.transcribe_files(audio_files[:1])[0].strip()
    partial = Transcriber.from_folder(s2s_dir, device="cpu", beam_size=2, ctc_partial=True)
    scorer = partial.asr.mods.decoder.scorer
    assert list(scorer.partial_scorers) == ["ctc"] and not scorer.full_scorers
    assert partial.transcribe_files(audio_files[:1])[0].strip()
    with pytest.raises(TranscriberError, match="lm.ckpt"):
        Transcriber.from_folder(s2s_dir, device="cpu", use_lm=True)


def test_option_errors(ctc_dir):
    with pytest.raises(TranscriberError, match="CTC model"):
        Transcriber.from_folder(ctc_dir, device="cpu", ctc_weight=0.5)
    with pytest.raises(TranscriberError, match="CTC model"):
        Transcriber.from_folder(ctc_dir, device="cpu", ctc_partial=True)
    with pytest.raises(TranscriberError, match="overlap_seconds"):
        Transcriber.from_folder(ctc_dir, device="cpu", chunk_seconds=2, overlap_seconds=2)


# --- CLI --------------------------------------------------------------------------------------

def test_cli_prints_one_line_per_file(ctc, ctc_dir, audio_files, tmp_path):
    stereo = _write(tmp_path / "s.wav", torch.stack([ctc.load_audio(audio_files[1])] * 2, 1), SR)
    files = [audio_files[0], stereo]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "transcribe.py"), ctc_dir, *files,
                           "--device", "cpu", "--batch-size", "2"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == files
    assert [line.split("\t")[1] for line in lines] == ctc.transcribe_files(files)


def test_cli_text_only_s2s(s2s_dir, audio_files, capsys):
    assert transcribe.run([s2s_dir, audio_files[0], "--text-only", "--beam-size", "2",
                           "--no-lm", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "\t" not in out[0] and out[0].strip()


def test_cli_empty_file_exits_with_one_line(ctc_dir, tmp_path):
    empty = _write(tmp_path / "empty.wav", torch.zeros(0), SR)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "transcribe.py"), ctc_dir, empty],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:") and empty in err[0] and "empty" in err[0]


@pytest.mark.parametrize("case", ["no_folder", "no_hparams", "unreadable", "missing_audio"])
def test_cli_errors(case, ctc_dir, audio_files, tmp_path, capsys):
    model, audio = ctc_dir, audio_files[0]
    if case == "no_folder":
        model = str(tmp_path / "nowhere")
        expected = [model, "does not exist"]
    elif case == "no_hparams":
        model = str(tmp_path)
        expected = [os.path.join(model, "hyperparams.yaml"), "missing"]
    elif case == "unreadable":
        audio = str(tmp_path / "noise.wav")
        with open(audio, "wb") as f:
            f.write(os.urandom(2000))
        expected = [audio, "Cannot decode", "convert"]
    else:
        audio = str(tmp_path / "gone.flac")
        expected = [audio, "does not exist"]
    assert transcribe.run([model, audio]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1 and err[0].startswith("ERROR:")
    assert all(word in err[0] for word in expected), err[0]


# --- short audio, integer PCM, option and input errors -----------------------------------------

@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_demo")
    return export_untrained(os.path.join(REPO, "hparams/CTC/demo.yaml"), "CTC", str(folder),
                            overrides={"d_model": 32, "nhead": 2, "num_encoder_layers": 2,
                                       "d_ffn": 64, "d_state": 4}, n_sentences=2000)


@pytest.mark.parametrize("model", ["ctc", "demo", "s2s"])
def test_short_audio_is_zero_padded_to_the_models_minimum(model, request, ctc, audio_files):
    """Audio shorter than the CNN's window (S2S: than one decoding step) is decoded as if
    zero-padded to min_samples, alone, in a batch, and as the chunks of --chunk-seconds 0.01."""
    asr = ctc if model == "ctc" else Transcriber.from_folder(
        request.getfixturevalue(f"{model}_dir"), device="cpu", beam_size=2)
    assert asr.min_samples == 960  # 7 feature frames of 10 ms: the CNN's window
    x = ctc.load_audio(audio_files[0])[SR // 2:]
    for n in (1, 100, 319, 330, 700, asr.min_samples - 1):
        padded = torch.nn.functional.pad(x[:n], (0, asr.min_samples - n))
        assert asr.transcribe_waveform(x[:n].numpy(), SR) == \
            asr.transcribe_waveform(padded, SR), n
    if model != "s2s":  # (batched S2S hypotheses depend on the batch's longest)
        assert asr.transcribe_waveforms([x[:100], x[: 2 * SR], x[:500]]) == \
            [asr.transcribe_waveform(w, SR) for w in (x[:100], x[: 2 * SR], x[:500])]
    with pytest.raises(AudioError, match="0 samples"):
        asr.transcribe_waveform(torch.zeros(0), SR)
    with pytest.raises(AudioError, match=r"Waveform 1 has shape \(0,\)"):
        asr.transcribe_waveforms([x[:100], torch.zeros(0)])


def test_cli_short_files_and_tiny_chunks(ctc, ctc_dir, audio_files, tmp_path, capsys):
    x = ctc.load_audio(audio_files[0])[SR // 2:]
    files = [_write(tmp_path / "short.wav", x[:100], SR),
             _write(tmp_path / "mid.wav", x[: SR // 5], SR)]
    # chunks of the model's shortest input (60 ms: 960 samples)
    assert transcribe.run([ctc_dir, *files, "--chunk-seconds", "0.06", "--overlap-seconds", "0",
                           "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == files
    assert lines[0].split("\t")[1] == ctc.transcribe_waveform(x[:100], SR)
    tiny = Transcriber.from_folder(ctc_dir, device="cpu", chunk_seconds=0.06, overlap_seconds=0)
    assert lines[1].split("\t")[1] == tiny.transcribe_waveform(x[:SR // 5], SR)
    assert len(tiny.last_chunks[0]) == 4
    # not finite; below the shortest input (padded garbage); an overlap above half the chunk
    # (3 s and 2.9999 s: ~450k chunks for 60 s)
    for chunk, overlap in (("inf", "0"), ("nan", "0"), ("0.05", "0"), ("2", "nan"), ("2", "inf"),
                           ("3", "2.9999"), ("2", "4")):
        assert transcribe.run([ctc_dir, files[0], "--chunk-seconds", chunk, "--overlap-seconds",
                               overlap, "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("ERROR: Need chunk_seconds of at least 0.06 s") and \
            err.count("\n") == 1


def test_integer_pcm_is_scaled_to_float(ctc, audio_files):
    x = torch.round(ctc.load_audio(audio_files[0]) * 32767) / 32768  # on the 16-bit grid
    pcm16 = (x * 32768).numpy().astype("int16")
    assert ctc.transcribe_waveform(pcm16, SR) == ctc.transcribe_waveform(x, SR)
    assert ctc.transcribe_waveforms([torch.from_numpy(pcm16)]) == ctc.transcribe_waveforms([x])
    assert torch.equal(to_float(pcm16.astype("int32") * 65536), x)
    assert to_float(torch.tensor([0, 128, 255], dtype=torch.uint8)).tolist() == \
        [-1.0, 0.0, 127 / 128]
    assert to_float(torch.tensor([-128, 64], dtype=torch.int8)).tolist() == [-1.0, 0.5]
    with pytest.raises(AudioError, match="int64 have no known full scale"):
        ctc.transcribe_waveform(torch.from_numpy(pcm16).long(), SR)


def test_directory_and_single_path_errors(ctc, audio_files, tmp_path):
    with pytest.raises(AudioError, match="is a directory"):
        check_audio(str(tmp_path))
    with pytest.raises(TypeError, match=r"list of paths.*pass \["):
        ctc.transcribe_files(audio_files[0])


def test_cli_options_before_between_and_after_files():
    args = transcribe.parse_args(["M", "--no-lm", "a.wav", "--beam-size", "3", "b.wav", "c.wav",
                                  "--text-only"])
    assert args.audio == ["a.wav", "b.wav", "c.wav"] and args.no_lm and args.beam_size == 3
    assert args.text_only and args.model_dir == "M"


@pytest.mark.parametrize("argv,message", [
    (["--stream", "--piece-ms", "nan"], "--piece-ms must be a positive number"),
    (["--stream", "--piece-ms", "inf"], "--piece-ms must be a positive number"),
    (["--stream", "--beam-size", "4", "--no-lm"], "--beam-size, --no-lm: not for --stream"),
    (["--stream", "--chunk-seconds", "10"], "--chunk-seconds: not for --stream"),
    (["--mic", "--overlap-seconds", "1"], "--overlap-seconds: not for --stream / --mic"),
    (["--mic-seconds", "3"], "--mic-seconds must be a positive number of seconds, with --mic"),
])
def test_cli_refuses_options_it_would_ignore(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        transcribe.parse_args(["M", "a.wav", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_lm_options_without_an_lm_are_refused(ctc_dir, s2s_dir):
    with pytest.raises(TranscriberError, match="has no CTC LM for lm_weight / word_score"):
        Transcriber.from_folder(ctc_dir, device="cpu", lm_weight=1.0)
    with pytest.raises(TranscriberError, match="has no CTC LM"):
        Transcriber.from_folder(ctc_dir, device="cpu", word_score=0.5)
    with pytest.raises(TranscriberError, match="holds an S2S model: lm_weight"):
        Transcriber.from_folder(s2s_dir, device="cpu", lm_weight=1.0)
    for value in (math.nan, math.inf):
        with pytest.raises(TranscriberError, match="lm_weight must be a finite number"):
            Transcriber.from_folder(ctc_dir, device="cpu", lm_weight=value)


def _undecodable_flac(path):
    """A FLAC whose header reads but whose audio does not decode (skips the test where
    libsndfile decodes it anyway)."""
    soundfile.write(str(path), torch.randn(2 * SR).mul(0.1).numpy(), SR)
    data = bytearray(path.read_bytes())
    data[200:] = bytes((b * 7 + 13) % 256 for b in data[200:])
    path.write_bytes(bytes(data))
    check_audio(str(path))
    try:
        soundfile.read(str(path))
    except Exception:
        return str(path)
    pytest.skip("this libsndfile decodes the damaged FLAC")


def test_cli_text_only_prints_an_empty_line_for_a_failed_file(ctc, ctc_dir, audio_files,
                                                             tmp_path, capsys):
    bad = _undecodable_flac(tmp_path / "bad.flac")
    missing = str(tmp_path / "gone.wav")
    files = [audio_files[0], bad, missing, audio_files[1]]
    assert transcribe.run([ctc_dir, *files, "--text-only", "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    expected = ctc.transcribe_files([audio_files[0], audio_files[1]])
    assert out.split("\n") == [expected[0], "", "", expected[1], ""]
    errors = err.strip().splitlines()
    assert len(errors) == 2 and bad in errors[1] and missing in errors[0]
    assert transcribe.run([ctc_dir, missing, missing, "--text-only"]) == 1
    assert capsys.readouterr().out == "\n\n"


def test_non_finite_audio_and_bad_sample_rates_are_refused(ctc, ctc_dir, audio_files, tmp_path,
                                                           capsys):
    """One NaN or infinite sample would silently empty a whole transcript: refused, naming the
    file (the other files are transcribed) or the sample."""
    wav = ctc.load_audio(audio_files[0])
    bad = wav.clone()
    bad[1234] = float("nan")
    with pytest.raises(AudioError, match="1 NaN or infinite sample.*at sample 1234"):
        ctc.transcribe_waveform(bad, SR)
    for rate in (0, 22050.5, -8000, "16000"):
        with pytest.raises(AudioError, match="sample_rate must be a positive whole number"):
            ctc.transcribe_waveform(wav, rate)
    path = str(tmp_path / "inf.wav")
    bad[1234] = float("inf")
    soundfile.write(path, bad.numpy(), SR, subtype="FLOAT")
    assert transcribe.run([ctc_dir, path, audio_files[1]]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"ERROR: Audio file {path} has 1 NaN or infinite sample(s), the first at sample 1234")
    assert captured.out.splitlines()[0].startswith(audio_files[1] + "\t")


def test_forced_scan_backend_that_cannot_run_is_one_error_line(ctc_dir, audio_files, capsys,
                                                               monkeypatch):
    monkeypatch.setenv("MAMBA_SCAN_BACKEND", "cuda")
    assert transcribe.run([ctc_dir, audio_files[0]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "ERROR: selective_scan backend 'cuda' (from MAMBA_SCAN_BACKEND) needs CUDA tensors")
    assert "MAMBA_SCAN_BACKEND=auto or torch" in err[0]


def test_files_are_decoded_to_mono_block_by_block(ctc, audio_files, tmp_path, monkeypatch):
    """load_audio averages channels a block at a time (only the mono samples are held whole):
    the same samples as averaging the whole decoded file; a NaN is placed in the file."""
    from recipes import audio

    x = ctc.load_audio(audio_files[0])
    stereo = torch.stack([x, 0.5 * x.flip(0)], 1)
    path = _write(tmp_path / "st.wav", stereo, 44100)
    monkeypatch.setattr(audio, "MONO_BLOCK", 1000)
    whole, sr = audio.read_audio(path)
    assert torch.equal(audio.read_mono(path)[0], whole.mean(dim=1)) and sr == 44100
    assert torch.equal(load_audio(path, SR), audio.to_mono(whole.mean(dim=1), 44100, SR))
    stereo[2500, 1] = float("nan")
    path = _write(tmp_path / "nan.wav", stereo, 44100)
    with pytest.raises(AudioError,
                       match=r"1 NaN or infinite sample\(s\), the first at sample 2500"):
        load_audio(path, SR)
    # a waveform's position whichever way its channels lie (channels: the smaller dimension)
    for wave in (stereo, stereo.t()):
        with pytest.raises(AudioError, match=r"Audio has 1 NaN .*, the first at sample 2500;"):
            ctc.transcribe_waveform(wave, 44100)
