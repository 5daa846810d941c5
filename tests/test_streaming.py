"""Streaming (modules.streaming, inference.streaming, transcribe.py --stream) on tiny random
causal models built from hparams/CTC/demo_streaming.yaml: streamed log-probabilities equal the
whole-utterance ones, whatever the piece sizes."""

import importlib.util
import io
import math
import os
import random
import subprocess
import sys

import pytest
import soundfile
import torch
from speechbrain.lobes.features import Fbank

import transcribe
from inference.streaming import StreamingTranscriber, stream_files
from inference.transcriber import Transcriber, TranscriberError
from recipes.audio import AudioError, load_audio
from modules.streaming import CausalFbank, StreamingEncoder, StreamingError
from recipes.hparams import load_recipe
from recipes.untrained import export_untrained, speech_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAMING = os.path.join(REPO, "hparams", "CTC", "demo_streaming.yaml")
TINY = {"d_model": 32, "nhead": 2, "num_encoder_layers": 2, "d_ffn": 64, "d_state": 4}
SR = 16000


def _recipe_model(path, folder, overrides=None):
    """(hparams, StreamingEncoder args) of a recipe with random weights, normaliser fitted."""
    hp, _, _ = load_recipe(path, {"output_folder": str(folder), **TINY, **(overrides or {})},
                           "cpu")
    with torch.no_grad():
        wav = torch.from_numpy(speech_like(8.0))[None]
        hp["normalize"](hp["compute_features"](wav), torch.ones(1), epoch=0)
    parts = (hp["compute_features"], hp["normalize"], hp["CNN"], hp["Transformer"], hp["ctc_lin"])
    for module in parts:
        module.eval()
    return hp, parts


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return StreamingEncoder(*_recipe_model(STREAMING, tmp_path_factory.mktemp("s"))[1])


@pytest.fixture(scope="module")
def utterance():
    """0.5 s of digital silence then 2 s of speech."""
    return torch.cat([torch.zeros(SR // 2), torch.from_numpy(speech_like(2.0))])


def _stream(encoder, wav, sizes):
    """Log-probabilities of wav pushed in pieces of the given sizes (cycled), then finish."""
    state, outs, start, k = encoder.new_state(), [], 0, 0
    while start < len(wav):
        outs.append(encoder.push(state, wav[start: start + sizes[k % len(sizes)]]))
        start += sizes[k % len(sizes)]
        k += 1
    outs.append(encoder.finish(state))
    return torch.cat(outs, dim=1), state


# 160 samples: one feature frame; 100, 333, 1000: not multiples of the hop nor of the 640-sample
# (4 x 10 ms) encoder frame; 32000: 2 s
@pytest.mark.parametrize("piece", [160, 100, 333, 640, 1000, 1600, 32000])
def test_stream_equals_whole_utterance(encoder, utterance, piece):
    whole = encoder.offline_log_probs(utterance)
    streamed, _ = _stream(encoder, utterance, [piece])
    assert streamed.shape == whole.shape and whole.shape[1] > 50
    assert torch.allclose(streamed, whole, atol=1e-4, rtol=0)


def test_pure_mamba_encoder_streams(tmp_path, utterance):
    """encoder_module mamba: Mamba + FFN layers, no conv module (LayerCache.conv is None)."""
    encoder = StreamingEncoder(*_recipe_model(STREAMING, tmp_path, {"encoder_module": "mamba"})[1])
    assert all(layer.conv is None for layer in encoder.new_state().layers)
    streamed, _ = _stream(encoder, utterance, [333])
    assert torch.allclose(streamed, encoder.offline_log_probs(utterance), atol=1e-4, rtol=0)


def test_state_carried_over_many_uneven_pieces(encoder, utterance):
    sizes = [random.Random(1).randint(0, 700) for _ in range(50)]  # includes empty pieces
    whole = encoder.offline_log_probs(utterance)
    streamed, state = _stream(encoder, utterance, sizes)
    assert torch.allclose(streamed, whole, atol=1e-4, rtol=0)
    # the carried state has a fixed size: a few STFT hops of samples, < one CNN window of frames
    assert state.samples.numel() < 4 * encoder.hop + max(sizes)
    assert state.features.shape[0] < encoder.cnn_window + encoder.cnn_stride
    with pytest.raises(StreamingError, match="finished"):
        encoder.push(state, utterance[:160])


def test_silence_then_speech_needs_a_causal_log_floor(encoder, utterance):
    """Fbank's per-utterance floor (max - 80 dB) would give the silence of a stream other values
    than the same silence in the whole file; CausalFbank's frames depend on their window only."""
    fbank = encoder.compute_features
    assert isinstance(fbank, CausalFbank)
    silence = fbank(utterance[None, : SR // 4])[0, :10]
    assert torch.equal(silence, fbank(utterance[None])[0, :10])
    offline = Fbank(sample_rate=SR, n_fft=512, win_length=25, n_mels=80)
    assert not torch.allclose(offline(utterance[None, : SR // 4])[0, :10],
                              offline(utterance[None])[0, :10])


def test_bidirectional_and_lookahead_models_refuse_to_stream(tmp_path):
    demo = os.path.join(REPO, "hparams", "CTC", "demo.yaml")
    _, parts = _recipe_model(demo, tmp_path / "bi")
    with pytest.raises(StreamingError, match="bidirectional"):
        StreamingEncoder(*parts)
    # unidirectional Mamba but the offline CNN ("same" padding: looks ahead)
    _, parts = _recipe_model(STREAMING, tmp_path / "cnn", {"cnn_padding": "same"})
    with pytest.raises(StreamingError, match="CNN front end"):
        StreamingEncoder(*parts)
    # per-utterance feature statistics: not known until the utterance ends
    _, parts = _recipe_model(STREAMING, tmp_path / "norm", {"norm_type": "sentence"})
    with pytest.raises(StreamingError, match="streaming needs norm_type global"):
        StreamingEncoder(*parts)


@pytest.fixture(scope="module")
def streaming_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_streaming")
    return export_untrained(STREAMING, "CTC", str(folder), overrides=TINY, n_sentences=2000)


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory):
    """A bundled test utterance (else 3 s of speech-like noise)."""
    bundled = os.path.join(REPO, "data", "mini_corpus", "audio", "test", "te_00001.ogg")
    if os.path.isfile(bundled):
        return bundled
    path = str(tmp_path_factory.mktemp("wav") / "speech.wav")
    soundfile.write(path, speech_like(3.0), SR, subtype="FLOAT")
    return path


def _pieces(path, piece_samples):
    return math.ceil(soundfile.info(path).frames / piece_samples)


def test_transcriber_partial_text_and_reset(streaming_dir, speech_file):
    asr = StreamingTranscriber.from_folder(streaming_dir, device="cpu")
    wav = load_audio(speech_file, SR)
    offline = Transcriber.from_folder(streaming_dir, device="cpu").transcribe_files([speech_file])
    assert offline[0]  # a random model emits characters
    partials = [text for _, text, _, _ in asr.transcribe_pieces(wav, 480)]
    assert partials[-1] == offline[0]
    assert all(partials[-1].startswith(p.rsplit(" ", 1)[0]) for p in partials)  # text only grows
    # after finish() (or reset()) a new stream starts from a clean state
    asr.push(torch.from_numpy(speech_like(1.0, seed=3)))
    asr.reset()
    assert asr.text == ""
    again = [text for _, text, _, _ in asr.transcribe_pieces(wav, 2000)]
    assert again[-1] == offline[0]


def test_cli_stream_matches_offline(streaming_dir, speech_file, capsys):
    offline = Transcriber.from_folder(streaming_dir, device="cpu").transcribe_files([speech_file])
    assert transcribe.run([streaming_dir, speech_file, "--stream", "--piece-ms", "100",
                           "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    partial = [line.split("] ", 1)[1] for line in lines if line.startswith("[")]
    assert lines[-1] == f"{speech_file}\t{offline[0]}"
    # the partial lines grow towards it (the last frames come out when the stream ends)
    assert partial and all(offline[0].startswith(p) for p in partial)
    assert "real-time factor" in err and f"{_pieces(speech_file, 1600)} pieces of 100 ms" in err


def test_cli_refuses_bidirectional_and_missing_sounddevice(tmp_path, speech_file, capsys):
    bi = export_untrained(os.path.join(REPO, "hparams", "CTC", "tiny.yaml"), "CTC",
                          str(tmp_path / "bi"), n_sentences=500)
    assert transcribe.run([bi, speech_file, "--stream", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "cannot stream" in err and "bidirectional" in err and "conmamba_streaming" in err
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError):
        assert transcribe.run([bi, "--mic", "--device", "cpu"]) == 1
        assert "pip install sounddevice" in capsys.readouterr().err


def test_stream_files_text_only(streaming_dir, speech_file):
    asr = StreamingTranscriber.from_folder(streaming_dir, device="cpu")
    out, err = io.StringIO(), io.StringIO()
    stream_files(asr, [speech_file], 0.04, text_only=True, out=out, err=err)
    assert out.getvalue().count("\n") == 1
    assert f"{_pieces(speech_file, 640)} pieces of 40 ms" in err.getvalue()


def test_s2s_and_bad_piece_size_errors(streaming_dir):
    asr = StreamingTranscriber.from_folder(streaming_dir, device="cpu")
    with pytest.raises(TranscriberError, match="at least one sample"):
        list(asr.transcribe_pieces(torch.zeros(100), 0))


def test_streaming_benchmark_worker_short_memory_run(streaming_dir):
    """benchmarks.bench_streaming's worker on a memory run shorter than a minute reads memory
    once, at its end (it used to look for a 1-minute reading and fail)."""
    from benchmarks import bench_streaming

    threads = torch.get_num_threads()
    try:
        result = bench_streaming.worker(streaming_dir, 1.5, 5.0, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert list(result["memory"]) == ["5.0"]
    assert result["memory"]["5.0"]["state_bytes"] > 0
    table = bench_streaming.memory_table({"tiny": result}, ["tiny"], 5.0)
    state_kib = result["memory"]["5.0"]["state_bytes"] / 1024
    assert table[0].startswith("| model | RSS after 0.0833 min | RSS after 0.0833 min |")
    assert table[2].startswith("| tiny |") and f"| {state_kib:.0f} KiB |" in table[2]
    assert set(result["pieces"]) == set(bench_streaming.PIECES_MS)
    assert all(row["p50_ms"] <= row["p95_ms"] for row in result["pieces"].values())


@pytest.mark.parametrize("samples", [1, 100, 500, 959])
def test_short_stream_is_padded_like_the_whole_file(streaming_dir, samples):
    """Audio shorter than the CNN's window: the whole file is zero-padded to min_samples, and
    so is a stream that ends that short; the texts agree (they did for longer audio)."""
    asr = StreamingTranscriber.from_folder(streaming_dir, device="cpu")
    whole = Transcriber.from_folder(streaming_dir, device="cpu")
    assert asr.min_samples == whole.min_samples == 960
    wav = torch.from_numpy(speech_like(1.0))[SR // 4: SR // 4 + samples]
    streamed = [text for _, text, _, _ in asr.transcribe_pieces(wav, 160)]
    assert streamed[-1] == whole.transcribe_waveform(wav, SR)
    padded = torch.nn.functional.pad(wav, (0, 960 - samples))
    assert streamed[-1] == [text for _, text, _, _ in asr.transcribe_pieces(padded, 160)][-1]


def test_integer_and_stereo_pieces(streaming_dir):
    asr = StreamingTranscriber.from_folder(streaming_dir, device="cpu")
    x = torch.round(torch.from_numpy(speech_like(2.0)) * 32767) / 32768  # on the 16-bit grid
    pcm16 = (x * 32768).numpy().astype("int16")

    def stream(pieces):
        for piece in pieces:
            asr.push(piece)
        return asr.finish()

    expected = stream([x[:SR], x[SR:]])
    assert expected
    assert stream([pcm16[:SR], pcm16[SR:]]) == expected
    stereo = torch.stack([x, x], 1)  # (samples, channels), as soundfile and sounddevice give
    assert stream([stereo[:SR].numpy(), stereo[SR:].numpy()]) == expected
    assert stream([stereo[:SR].t(), stereo[SR:].t()]) == expected  # (channels, samples)
    assert stream([stereo[:SR], stereo[SR:SR], stereo[SR:]]) == expected  # with an empty piece
    state = asr.encoder.new_state()
    with pytest.raises(StreamingError, match="got torch.int16 samples: scale integer PCM"):
        asr.encoder.push(state, torch.from_numpy(pcm16))
    with pytest.raises(StreamingError, match=r"Push mono audio \(samples,\), got shape \(16000, 2"):
        asr.encoder.push(state, stereo[:SR])


def test_cli_stream_goes_on_after_a_file_that_does_not_decode(streaming_dir, speech_file,
                                                              tmp_path, capsys):
    from test_transcribe import _undecodable_flac

    bad = _undecodable_flac(tmp_path / "bad.flac")
    missing = str(tmp_path / "gone.wav")
    offline = Transcriber.from_folder(streaming_dir, device="cpu").transcribe_files([speech_file])
    files = [bad, speech_file, missing, speech_file]
    assert transcribe.run([streaming_dir, *files, "--stream", "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    finals = [line for line in out.splitlines() if not line.startswith("[")]
    assert finals == [f"{speech_file}\t{offline[0]}"] * 2
    errors = [line for line in err.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 2 and missing in errors[0] and bad in errors[1]
    assert transcribe.run([streaming_dir, *files, "--stream", "--text-only"]) == 1
    assert capsys.readouterr().out.split("\n") == ["", offline[0], "", offline[0], ""]
    assert transcribe.run([streaming_dir, bad, speech_file, "--stream", "--fail-fast"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"ERROR: Cannot read audio {bad}")
    with pytest.raises(TranscriberError, match="piece length must be > 0 and finite"):
        stream_files(None, [speech_file], math.inf)


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
@pytest.mark.parametrize("numba_env, loads", [(None, True), ("0", False)])
def test_streaming_transcriber_loads_the_compiled_kernels_up_front(streaming_dir, numba_env,
                                                                   loads):
    """A stream's pieces never load the CPU kernels lazily (they continue a state): the
    transcriber loads them before the first piece, unless MAMBA_SCAN_NUMBA=0. A fresh process:
    this one may have loaded them already."""
    env = {k: v for k, v in os.environ.items() if k != "MAMBA_SCAN_NUMBA"}
    if numba_env is not None:
        env["MAMBA_SCAN_NUMBA"] = numba_env
    code = ("import sys; from inference.streaming import StreamingTranscriber; "
            "from modules.mamba import scan_cpu; "
            "StreamingTranscriber.from_folder(sys.argv[1], device='cpu'); "
            "print('kernels', sorted(scan_cpu._KERNELS))")
    result = subprocess.run([sys.executable, "-c", code, streaming_dir], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert ("'forward'" in last) == loads, last


def test_a_non_finite_piece_is_refused_and_the_stream_goes_on(streaming_dir, speech_file):
    asr = StreamingTranscriber.from_folder(streaming_dir, device="cpu")
    wav = load_audio(speech_file, SR)
    pieces = list(wav.split(1600))
    for piece in pieces:
        asr.push(piece)
    expected = asr.finish()
    for k, piece in enumerate(pieces):
        if k == 3:
            bad = piece.clone()
            bad[5] = float("nan")
            with pytest.raises(AudioError, match="NaN or infinite sample.*at sample 5"):
                asr.push(bad)
        asr.push(piece)
    assert asr.finish() == expected


def test_stream_progress_lines_stay_short(speech_file):
    """Each progress line shows the end of the text so far: the output of a long stream grows
    linearly, not with the square of its length (a whole-text line per change before)."""
    from inference.streaming import PARTIAL_CHARS

    class Growing:
        sample_rate = SR

        def transcribe_pieces(self, wav, piece):
            text = ""
            for k in range(200):
                text += f" WORD{k}"
                yield k * 0.1, text.strip(), 0.001, False
            yield 20.0, text.strip(), 0.001, True

    out, err = io.StringIO(), io.StringIO()
    stream_files(Growing(), [speech_file], 0.1, out=out, err=err)
    lines = out.getvalue().splitlines()
    assert len(lines) == 201 and lines[-1].endswith("WORD198 WORD199")
    progress = [line.split("] ", 1)[1] for line in lines[:-1]]
    assert max(map(len, progress)) == PARTIAL_CHARS and progress[-1].startswith("...")
    assert progress[-1].endswith("WORD199") and progress[0] == "WORD0"
