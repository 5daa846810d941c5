"""Intermediate CTC (recipes.inter_ctc, train_CTC.ASR): the loss mixes the CTC loss of a middle
encoder layer's output into the last layer's, in training only."""

import types

import pytest
import speechbrain as sb
import torch

from recipes import RecipeError
from recipes.hparams import load_recipe
from recipes.inter_ctc import inter_ctc_layer, layer_output
from train_CTC import ASR


def _brain(repo_root, tmp_path, encoder="conmamba", **overrides):
    hp, _, _ = load_recipe(str(repo_root / "hparams/CTC/tiny.yaml"),
                           {"output_folder": str(tmp_path), "encoder_module": encoder,
                            "num_encoder_layers": 3, "fea_augment": None, **overrides},
                           device="cpu")
    brain = ASR(modules=hp["modules"], opt_class=hp["opt_class"], hparams=hp,
                run_opts={"device": "cpu"}, tokenizer=None)
    brain.hparams.epoch_counter.current = 1
    return brain, hp


class Batch(types.SimpleNamespace):
    def to(self, device):
        return self


def _batch():
    wavs = torch.sin(torch.arange(2 * 16000, dtype=torch.float32) / 5).reshape(2, 16000)
    return Batch(sig=(wavs, torch.tensor([1.0, 0.75])),
                 tokens=(torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]]), torch.tensor([1.0, 0.5])))


def test_settings_are_checked():
    layers = {"num_encoder_layers": 4}
    assert inter_ctc_layer({**layers, "inter_ctc_weight": 0.0}) == (0.0, None)
    assert inter_ctc_layer({**layers, "inter_ctc_weight": 0.3}) == (0.3, 2)
    assert inter_ctc_layer({**layers, "inter_ctc_weight": 0.3, "inter_ctc_layer": 3}) == (0.3, 3)
    with pytest.raises(RecipeError, match="inter_ctc_weight is 1.0"):
        inter_ctc_layer({**layers, "inter_ctc_weight": 1.0})
    with pytest.raises(RecipeError, match="inter_ctc_layer is 4 with num_encoder_layers 4"):
        inter_ctc_layer({**layers, "inter_ctc_weight": 0.3, "inter_ctc_layer": 4})


@pytest.mark.parametrize("encoder", ["conmamba", "conformer"])
def test_layer_output_is_that_layers_hidden_state(encoder, repo_root, tmp_path):
    brain, hp = _brain(repo_root, tmp_path, encoder)
    transformer = hp["Transformer"].eval()
    src = brain.front_end(*_batch().sig, sb.Stage.TRAIN)  # (fits the normalizer)
    with layer_output(transformer, 2) as kept:
        out, _ = transformer(src, tgt=None, wav_len=torch.tensor([1.0, 0.6]))
    transformer.encoder.output_hidden_states = True
    _, _, hidden = transformer(src, tgt=None, wav_len=torch.tensor([1.0, 0.6]))
    # hidden[0] is the encoder's input
    assert torch.equal(kept["out"], transformer.encoder.norm(hidden[2]))
    assert not transformer.encoder.layers[1]._forward_hooks  # removed afterwards
    wrapped = types.SimpleNamespace(module=transformer)  # as DistributedDataParallel holds it
    with layer_output(wrapped, 2) as kept_wrapped:
        transformer(src, tgt=None, wav_len=torch.tensor([1.0, 0.6]))
    assert torch.equal(kept_wrapped["out"], kept["out"])
    with layer_output(transformer, None) as kept:
        transformer(src, tgt=None, wav_len=torch.tensor([1.0, 0.6]))
    assert kept == {}


def test_loss_mixes_the_intermediate_layer_in_training_only(repo_root, tmp_path):
    brain, hp = _brain(repo_root, tmp_path, inter_ctc_weight=0.4, inter_ctc_layer=1)
    plain, _ = _brain(repo_root, tmp_path / "plain")
    batch = _batch()
    plain.modules.load_state_dict(brain.modules.state_dict())
    for b in (brain, plain):  # the same normalizer statistics (not in the state dict)
        b.modules.normalize(hp["compute_features"](batch.sig[0]), batch.sig[1], epoch=1)
    brain.modules.eval()  # no dropout, normalizer fixed: the forward passes are comparable
    plain.modules.eval()
    p_ctc, p_inter, lens, _ = brain.compute_forward(batch, sb.Stage.TRAIN)
    assert p_inter is not None and p_inter.shape == p_ctc.shape
    assert not torch.allclose(p_inter, p_ctc)
    ctc = hp["ctc_cost"]
    tokens, token_lens = batch.tokens
    expected = 0.6 * ctc(p_ctc, tokens, lens, token_lens) + 0.4 * ctc(p_inter, tokens, lens,
                                                                       token_lens)
    loss = brain.compute_objectives((p_ctc, p_inter, lens, None), batch, sb.Stage.TRAIN)
    assert torch.allclose(loss, expected.sum())
    # the intermediate output is the first layer's, through the final norm and ctc_lin
    encoder = brain.modules.Transformer.encoder
    encoder.output_hidden_states = True
    _, _, hidden = brain.modules.Transformer(brain.front_end(*batch.sig, sb.Stage.TRAIN),
                                             tgt=None, wav_len=batch.sig[1])
    encoder.output_hidden_states = False
    manual = hp["log_softmax"](brain.modules.ctc_lin(encoder.norm(hidden[1])))
    assert torch.allclose(manual, p_inter, atol=1e-6)
    # without the option: the plain CTC loss of the same weights
    p_plain, none, _, _ = plain.compute_forward(batch, sb.Stage.TRAIN)
    assert none is None and torch.allclose(p_plain, p_ctc, atol=1e-6)
    plain_loss = plain.compute_objectives((p_plain, None, lens, None), batch, sb.Stage.TRAIN)
    assert torch.allclose(plain_loss, ctc(p_ctc, tokens, lens, token_lens).sum(), atol=1e-5)
    loss.backward()  # the lower layers get the intermediate loss's gradient as well
    assert all(p.grad is not None for p in encoder.layers[0].parameters() if p.requires_grad)


@pytest.mark.parametrize("encoder", ["conmamba", "conformer"])
def test_with_encoder_gradient_checkpointing_same_loss_and_gradients(encoder, repo_root,
                                                                      tmp_path):
    """Intermediate CTC and encoder_gradient_checkpointing together: the same loss and gradients
    as without checkpointing (the hook inside a checkpointed layer used to make the recomputation
    save fewer tensors than the forward: CheckpointError)."""
    results = []
    for checkpointing in (False, True):
        brain, hp = _brain(repo_root, tmp_path / str(checkpointing), encoder,
                           inter_ctc_weight=0.3, encoder_gradient_checkpointing=checkpointing,
                           transformer_dropout=0.0)
        if results:
            brain.modules.load_state_dict(results[0][0])
        batch = _batch()
        brain.modules.normalize(hp["compute_features"](batch.sig[0]), batch.sig[1], epoch=1)
        brain.modules.eval()  # normalizer fixed
        brain.modules.Transformer.train()  # checkpointing acts in training only (no dropout)
        brain.modules.Transformer.encoder.layerdrop_prob = 0.0
        loss = brain.compute_objectives(brain.compute_forward(batch, sb.Stage.TRAIN), batch,
                                        sb.Stage.TRAIN)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in brain.modules.named_parameters()
                 if p.grad is not None}
        results.append((brain.modules.state_dict(), loss.detach(), grads))
    (_, loss_a, grads_a), (_, loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name
