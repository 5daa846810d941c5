"""train_LM.py (a Transformer LM on text) and S2S shallow fusion with the LM it writes, loaded
from a local folder: no hub, no network."""

import os
import subprocess
import sys

import pytest
import torch

from recipes import RecipeError
from recipes.untrained import export_untrained, speech_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOL = os.path.join(REPO, "data", "mini_corpus", "sentences.txt")
TEST_CSV = os.path.join(REPO, "data", "mini_corpus", "test.csv")
LM_SIZES = {"lm_d_model": 32, "lm_nhead": 2, "lm_num_layers": 1, "lm_d_ffn": 64}


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny LM trained for 3 epochs on 600 sentences of the pool plus the test sentences, which
    --exclude then leaves out although its CSV has them in lower case; --text without brackets
    (one path); the two best checkpoints averaged."""
    out = tmp_path_factory.mktemp("lm")
    text = out / "text.txt"
    with open(TEST_CSV) as f:
        lines = [line.rstrip("\n") for line in f]
    test = [line.split(",")[-1] for line in lines[1:]]
    lower = out / "test_lower.csv"
    lower.write_text("\n".join([lines[0]] + [",".join(line.split(",")[:-1] + [t.lower()])
                                             for line, t in zip(lines[1:], test)]) + "\n")
    with open(POOL) as f:
        pool = [line.strip() for line in f if line.strip() and line.strip() not in test][:600]
    text.write_text("\n".join(pool + test) + "\n")
    cmd = [sys.executable, "train_LM.py", "hparams/LM/transformer.yaml", "--device", "cpu",
           "--output_folder", str(out), "--text", str(text), "--exclude", f"[{lower}]",
           "--number_of_epochs", "3", "--batch_size", "16", "--n_warmup_steps", "20",
           "--avg_checkpoints", "2", "--noprogressbar"]
    for key, value in LM_SIZES.items():
        cmd += [f"--{key}", str(value)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, set(test), proc.stdout


def test_train_lm_writes_the_s2s_layout_and_learns(lm_folder):
    out, test, stdout = lm_folder
    assert (out / "lm.ckpt").is_file() and (out / "tokenizer.ckpt").is_file()
    assert "--lm_d_model 32 --lm_nhead 2 --lm_num_layers 1 --lm_d_ffn 64" in stdout
    from recipes.manifest import read_rows

    trained_on = {r["wrd"] for r in read_rows(str(out / "lm_text.csv"))}
    assert len(trained_on) == 600 and not trained_on & test  # the test sentences were excluded
    losses = [float(line.split("valid loss: ")[1].split(",")[0])
              for line in (out / "train_log.txt").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]


def _s2s_with_lm(lm_folder, folder, sizes=LM_SIZES):
    out, _, _ = lm_folder
    overrides = {"no_lm": False, "pretrained_lm_tokenizer_path": str(out), "output_neurons": 40,
                 **sizes}
    return export_untrained(os.path.join(REPO, "hparams/S2S/tiny.yaml"), "S2S", str(folder),
                            overrides=overrides)


def test_s2s_fusion_with_the_local_lm_changes_hypotheses(lm_folder, tmp_path):
    from inference import Transcriber

    folder = _s2s_with_lm(lm_folder, tmp_path / "s2s")
    assert os.path.isfile(os.path.join(folder, "lm.ckpt"))
    with_lm = Transcriber.from_folder(folder, device="cpu", beam_size=3)
    hp = with_lm.asr.hparams
    assert (hp.lm_weight, hp.ctc_weight_decode) == (0.6, 0.4)  # the paper's weights run
    without = Transcriber.from_folder(folder, device="cpu", beam_size=3, use_lm=False)
    waves = [torch.from_numpy(speech_like(2.0, seed=k)) for k in range(3)]
    fused = with_lm.transcribe_waveforms(waves)
    plain = without.transcribe_waveforms(waves)
    assert fused != plain
    # the LM (trained on English text) prefers its own output: it scores higher under the LM
    lm, tokenizer = hp.lm_model, with_lm.asr.tokenizer

    def lm_logprob(text):
        ids = tokenizer.encode_as_ids(text)
        tokens = torch.tensor([[hp.bos_index] + ids])
        with torch.no_grad():
            logp = lm(tokens).log_softmax(-1)[0]
        targets = ids + [hp.eos_index]
        return float(sum(logp[i, t] for i, t in enumerate(targets))) / len(targets)

    assert sum(map(lm_logprob, fused)) > sum(map(lm_logprob, plain))


def test_lm_of_other_sizes_is_a_clear_error(lm_folder, tmp_path):
    # the sizes train_LM.py recorded in the folder, lm_nhead included (no shape shows it)
    with pytest.raises(RecipeError, match=r"trained with lm_nhead 2 .*this run has lm_nhead 4: "
                                          r"pass --lm_nhead 2$"):
        _s2s_with_lm(lm_folder, tmp_path / "s2s", sizes={**LM_SIZES, "lm_nhead": 4})
    with pytest.raises(RecipeError, match=r"pass --lm_d_model 32 --lm_nhead 2 --lm_num_layers 1 "
                                          r"--lm_d_ffn 64"):
        _s2s_with_lm(lm_folder, tmp_path / "s2s", sizes={})
    # a folder without that record (an LM from elsewhere): the sizes read from lm.ckpt's shapes
    import shutil

    out, test, stdout = lm_folder
    bare = tmp_path / "bare_lm"
    bare.mkdir()
    for name in ("lm.ckpt", "tokenizer.ckpt"):
        shutil.copy(out / name, bare / name)
    with pytest.raises(RecipeError, match=r"--lm_d_model 32 --lm_num_layers 1 --lm_d_ffn 64"):
        _s2s_with_lm((bare, test, stdout), tmp_path / "s2s_bare", sizes={})


def test_missing_lm_folder_is_not_called_a_hub_problem(lm_folder, tmp_path):
    out, test, stdout = lm_folder
    with pytest.raises(RecipeError, match=r"lm_typo is not a folder .*--no_lm True"):
        _s2s_with_lm((tmp_path / "lm_typo", test, stdout), tmp_path / "s2s")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokenizer.ckpt").write_bytes((out / "tokenizer.ckpt").read_bytes())
    with pytest.raises(RecipeError, match=r"half lacks lm.ckpt"):
        _s2s_with_lm((tmp_path / "half", test, stdout), tmp_path / "s2s_half")


@pytest.mark.parametrize("args, message", [
    (["--lm_dmodel", "64"], "Unknown hyperparameter 'lm_dmodel'.*Did you mean: lm_d_model"),
    (["--lm_nhead", "3"], "lm_d_model 128 is not divisible by lm_nhead 3"),
    (["--valid_fraction", "1.0"], "valid_fraction is 1.0 of"),
    (["--text", "[data/mini_corpus/audio]"], "is a directory"),
])
def test_train_lm_errors_name_the_fix(args, message, tmp_path):
    import train_LM

    with pytest.raises(RecipeError, match=message):
        train_LM.main(["hparams/LM/transformer.yaml", "--device", "cpu", "--output_folder",
                       str(tmp_path), "--noprogressbar", *args])


def test_reexport_without_lm_and_partial_ctc_scoring(lm_folder, tmp_path):
    """An S2S folder re-exported without its LM loses lm.ckpt (a stale one, as older versions
    left, is ignored: the hyperparams define no LM scorer); --ctc-partial needs ctc_weight < 1."""
    import shutil

    from inference.transcriber import Transcriber, TranscriberError

    folder = _s2s_with_lm(lm_folder, tmp_path / "s2s")
    lm = os.path.join(folder, "lm.ckpt")
    assert os.path.isfile(lm)
    with pytest.raises(TranscriberError, match="ctc_partial .* needs ctc_weight < 1"):
        Transcriber.from_folder(folder, device="cpu", ctc_weight=1.0, ctc_partial=True)
    kept = str(tmp_path / "lm_kept.ckpt")
    shutil.copy(lm, kept)
    out, _, _ = lm_folder
    again = export_untrained(os.path.join(REPO, "hparams/S2S/tiny.yaml"), "S2S",
                             str(tmp_path / "s2s"), overrides={
                                 "no_lm": True, "pretrained_lm_tokenizer_path": str(out),
                                 "output_neurons": 40, **LM_SIZES})
    assert again == folder and not os.path.exists(lm)
    shutil.copy(kept, lm)  # stale, as an older export left it
    asr = Transcriber.from_folder(folder, device="cpu")
    assert isinstance(asr.transcribe_waveform(speech_like(1.0), 16000), str)
