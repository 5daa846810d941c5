"""TransformerASR with ConMamba / Mamba modules: shapes, padding invariance, official layout and
math, parameter counts, gradient checkpointing, mamba_config validation."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
from speechbrain.nnet.linear import Linear

from modules.mamba.config import MAMBA_DEFAULTS
from modules.mamba_decoder import pack_memory_target
from modules.TransformerASR import TransformerASR, count_parameters

OFFICIAL = Path(__file__).parent / "data" / "official_state_dict"
ENCODERS = ["transformer", "conformer", "branchformer", "conmamba", "mamba"]
DECODERS = ["transformer", "mamba"]


def tiny(encoder="conmamba", decoder="mamba", layers=2, normalize_before=True, causal=False, **kw):
    kw.setdefault("mamba_config", {"d_state": 8, "expand": 2, "d_conv": 4, "bidirectional": True})
    return TransformerASR(
        tgt_vocab=30,
        input_size=20,
        d_model=32,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=layers,
        d_ffn=64,
        dropout=0.1,
        activation=torch.nn.GELU,
        encoder_module=encoder,
        decoder_module=decoder,
        attention_type="RelPosMHAXL",
        normalize_before=normalize_before,
        causal=causal,
        csgu_linear_units=64,
        **kw,
    )


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("batch", [1, 3])
def test_shapes(encoder, decoder, batch):
    net = tiny(encoder, decoder).eval()
    src, tgt = torch.randn(batch, 23, 20), torch.randint(1, 30, (batch, 7))
    enc, dec = net(src, tgt, wav_len=torch.ones(batch))
    assert enc.shape == (batch, 23, 32) and dec.shape == (batch, 7, 32)
    assert net.encode(src).shape == (batch, 23, 32)
    pred, _ = net.decode(tgt, enc, torch.full((batch,), 23))
    assert pred.shape == (batch, 7, 32)
    assert torch.isfinite(dec).all() and torch.isfinite(pred).all()


@pytest.mark.parametrize("encoder", ["conmamba", "mamba"])
def test_ctc_only_model_has_no_decoder(encoder):
    net = tiny(encoder, layers=0).eval()
    assert not hasattr(net, "decoder") and not hasattr(net, "custom_tgt_module")
    enc, _ = net(torch.randn(2, 17, 20), None)
    assert enc.shape == (2, 17, 32)


def _lengths_batch(lengths, dim=20):
    """Padded batch (B, max, dim) with garbage in the padding, and relative lengths."""
    L = max(lengths)
    src = torch.randn(len(lengths), L, dim)
    return src, torch.tensor(lengths, dtype=torch.float) / L


@pytest.mark.parametrize("encoder", ["conmamba", "mamba"])
@pytest.mark.parametrize("causal", [False, True])
def test_encoder_padding_invariance(encoder, causal):
    net = tiny(encoder, layers=0, causal=causal).eval()
    lengths = [29, 17, 8]
    src, wav_len = _lengths_batch(lengths)
    batched = net.encode(src, wav_len)
    for i, n in enumerate(lengths):
        alone = net.encode(src[i : i + 1, :n])
        torch.testing.assert_close(batched[i, :n], alone[0], atol=1e-5, rtol=0)


def test_conv_module_ignores_padded_frames():
    """The depthwise conv must not read padded frames (the official module reads them)."""
    layer = tiny("conmamba", layers=0).encoder.layers[0].convolution_module.eval()
    x = torch.randn(1, 12, 32)
    pad = torch.arange(12)[None] >= 9
    y1 = layer(x, pad)
    x2 = x.clone()
    x2[:, 9:] = 100.0
    torch.testing.assert_close(layer(x2, pad)[:, :9], y1[:, :9], atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x[:, :9])[0], y1[0, :9], atol=1e-6, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_conv_module_equals_speechbrains_without_padding(causal):
    """The pointwise conv computed as a linear layer: SpeechBrain's module's output and
    gradients, from the same parameters."""
    from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule

    ours = tiny("conmamba", layers=0, causal=causal).encoder.layers[0].convolution_module
    theirs = ConvolutionModule(32, 31, True, torch.nn.GELU, 0.1, causal=causal)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 40, 32, requires_grad=True)
    y_ours, y_theirs = ours.eval()(x), theirs.eval()(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y_ours)
    grads = [torch.autograd.grad(y, [x, *m.parameters()], g)
             for y, m in ((y_ours, ours), (y_theirs, theirs))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # inference: the depthwise conv as shifted multiply-adds
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("left, right", [(15, 15), (30, 0), (0, 0), (2, 5)])
def test_depthwise_conv_as_shifted_sums_equals_the_convolution(left, right):
    from modules.Conmamba import depthwise_conv1d

    conv = torch.nn.Conv1d(8, 8, 31, groups=8)
    x = torch.randn(3, 8, 40, dtype=torch.float64)
    conv = conv.double()
    expected = conv(torch.nn.functional.pad(x, (left, right)))
    torch.testing.assert_close(depthwise_conv1d(x, conv.weight, conv.bias, left, right), expected)
    torch.testing.assert_close(depthwise_conv1d(x, conv.weight, None, left, right),
                               expected - conv.bias[:, None])


@pytest.mark.parametrize("normalize_before", [True, False])
def test_decoder_padding_invariance(normalize_before):
    net = tiny("conmamba", "mamba", normalize_before=True).eval()
    if not normalize_before:
        for layer in net.decoder.layers:
            layer.normalize_before = False
    lengths, tgt_lens = [26, 11, 19], [5, 9, 2]
    src, wav_len = _lengths_batch(lengths)
    tgt = torch.zeros(3, max(tgt_lens), dtype=torch.long)  # pad_idx 0
    for i, t in enumerate(tgt_lens):
        tgt[i, :t] = torch.randint(1, 30, (t,))
    _, dec = net(src, tgt, wav_len=wav_len)
    for i, (n, t) in enumerate(zip(lengths, tgt_lens)):
        _, alone = net(src[i : i + 1, :n], tgt[i : i + 1, :t])
        torch.testing.assert_close(dec[i, :t], alone[0], atol=1e-5, rtol=0)


def test_pack_memory_target():
    memory = torch.arange(2 * 4).float().reshape(2, 4, 1)
    tgt = -torch.arange(1, 2 * 3 + 1).float().reshape(2, 3, 1)
    packed, idx = pack_memory_target(memory, tgt, torch.tensor([4, 2]))
    assert packed[0, :7, 0].tolist() == [0, 1, 2, 3, -1, -2, -3]
    assert packed[1, :5, 0].tolist() == [4, 5, -4, -5, -6]
    assert idx.tolist() == [[4, 5, 6], [2, 3, 4]]


class NoSync(torch.Tensor):
    """A tensor whose values must not be read on the host (each read is a sync on CUDA)."""

    READS = {torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__index__,
             torch.Tensor.__float__, torch.Tensor.item, torch.Tensor.tolist, torch.equal}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.READS:
            raise AssertionError(f"host sync: {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("lengths", [[4, 2], [4, 4]])
def test_pack_memory_target_reads_no_values_on_the_host(lengths):
    memory, tgt = torch.randn(2, 4, 3), torch.randn(2, 3, 3)
    packed, idx = pack_memory_target(memory, tgt, torch.tensor(lengths).as_subclass(NoSync))
    packed, idx = packed.as_subclass(torch.Tensor), idx.as_subclass(torch.Tensor)
    for b, n in enumerate(lengths):
        assert torch.equal(packed[b, :n], memory[b, :n])
        assert torch.equal(packed[b].index_select(0, idx[b]), tgt[b])


# ---- official order of operations, restated from xi-j/Mamba-ASR modules/Conmamba.py -------------


def _ln(x, sd, key, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _lin(x, sd, key):
    return F.linear(x, sd[key + ".weight"], sd[key + ".bias"])


def _official_ffn(x, sd, key):  # Sequential(LayerNorm, PositionalwiseFeedForward, Dropout)
    h = F.gelu(_lin(_ln(x, sd, key + ".0"), sd, key + ".1.ffn.0"))
    return _lin(h, sd, key + ".1.ffn.3")


def _official_conv(x, sd, key, kernel):
    h = _ln(x, sd, key + ".layer_norm").transpose(1, 2)
    h = F.glu(F.conv1d(h, sd[key + ".bottleneck.0.weight"], sd[key + ".bottleneck.0.bias"]), dim=1)
    h = F.conv1d(
        h,
        sd[key + ".conv.weight"],
        sd[key + ".conv.bias"],
        padding=(kernel - 1) // 2,
        groups=h.shape[1],
    ).transpose(1, 2)
    h = F.gelu(_ln(h, sd, key + ".after_conv.0"))
    return _lin(h, sd, key + ".after_conv.2")


def _official_forward(net, src, tgt, normalize_before):
    """Unpadded official forward: ConMamba encoder + Mamba decoder (RelPosMHAXL, eval mode)."""
    sd = net.state_dict()
    x = _lin(
        src, sd, "custom_src_module.layers.0.w"
    )  # RelPosMHAXL: no absolute PE on the encoder input
    for i, layer in enumerate(net.encoder.layers):
        k = f"encoder.layers.{i}"
        x = x + 0.5 * _official_ffn(x, sd, k + ".ffn_module1")
        x = layer.mamba(_ln(x, sd, k + ".norm1.norm")) + x
        x = x + _official_conv(x, sd, k + ".convolution_module", 31)
        x = _ln(x + 0.5 * _official_ffn(x, sd, k + ".ffn_module2"), sd, k + ".norm2.norm")
    memory = _ln(x, sd, "encoder.norm.norm", 1e-6)

    d_model = memory.shape[-1]
    y = F.embedding(tgt, sd["custom_tgt_module.layers.0.emb.Embedding.weight"]) * math.sqrt(d_model)
    y = y + sd["positional_encoding_decoder.pe"][:, : tgt.shape[1]]
    T = tgt.shape[1]
    for i, layer in enumerate(net.decoder.layers):
        k = f"decoder.layers.{i}"
        norm = lambda h, n: _ln(h, sd, f"{k}.norm{n}.norm", 1e-6)  # noqa: E731
        ffn = lambda h: _lin(
            F.gelu(_lin(h, sd, k + ".pos_ffn.ffn.0")), sd, k + ".pos_ffn.ffn.3"
        )  # noqa: E731
        cross = lambda h: layer.cross_mamba(torch.cat([memory, h], 1))[:, -T:]  # noqa: E731
        if normalize_before:
            y = y + layer.self_mamba(norm(y, 1))
            y = y + cross(norm(y, 2))
            y = y + ffn(norm(y, 3))
        else:
            y = norm(y + layer.self_mamba(y), 1)
            y = norm(y + cross(y), 2)
            y = norm(y + ffn(y), 3)
    return memory, _ln(y, sd, "decoder.norm.norm", 1e-6)


@pytest.mark.parametrize("normalize_before", [True, False])
def test_matches_official_order_of_operations(normalize_before):
    net = TransformerASR(
        tgt_vocab=30,
        input_size=20,
        d_model=32,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        d_ffn=64,
        activation=torch.nn.GELU,
        encoder_module="conmamba",
        decoder_module="mamba",
        attention_type="RelPosMHAXL",
        normalize_before=True,
        causal=False,
    ).eval()
    for layer in net.decoder.layers:
        layer.normalize_before = normalize_before
    src, tgt = torch.randn(2, 37, 20), torch.randint(1, 30, (2, 6))
    with torch.no_grad():
        enc, dec = net(src, tgt)
        ref_enc, ref_dec = _official_forward(net, src, tgt, normalize_before)
    torch.testing.assert_close(enc, ref_enc, atol=1e-5, rtol=0)
    torch.testing.assert_close(dec, ref_dec, atol=1e-5, rtol=0)


# ---- official dimensions: key layout and parameter counts ---------------------------------------

SMALL = dict(
    d_model=144, nhead=4, num_encoder_layers=12, num_decoder_layers=4, d_ffn=1024, tgt_vocab=5000
)
LARGE = dict(
    d_model=512, nhead=8, num_encoder_layers=12, num_decoder_layers=6, d_ffn=2048, tgt_vocab=5000
)
CTC_LARGE = dict(
    d_model=256, nhead=4, num_encoder_layers=18, num_decoder_layers=0, d_ffn=1024, tgt_vocab=31
)


def official_model(dims, encoder, decoder="transformer"):
    """ModuleList([CNN, Transformer, seq_lin, ctc_lin]) (CTC: no seq_lin) as in the official
    YAMLs."""
    cnn = ConvolutionFrontEnd(
        input_shape=(8, 10, 80),
        num_blocks=2,
        num_layers_per_block=1,
        out_channels=(64, 32),
        kernel_sizes=(3, 3),
        strides=(2, 2),
        residuals=(False, False),
    )
    mamba_config = {"d_state": 16, "expand": 2, "d_conv": 4, "bidirectional": True}
    transformer = TransformerASR(
        input_size=640,
        dropout=0.1,
        activation=torch.nn.GELU,
        encoder_module=encoder,
        decoder_module=decoder,
        attention_type="RelPosMHAXL",
        normalize_before=True,
        causal=False,
        max_length=2500,
        kernel_size=31,
        positional_encoding="fixed_abs_sine",
        mamba_config=mamba_config if "mamba" in encoder + decoder else None,
        **dims,
    )
    heads = [Linear(input_size=dims["d_model"], n_neurons=dims["tgt_vocab"])]
    if dims["num_decoder_layers"]:
        heads.insert(0, Linear(input_size=dims["d_model"], n_neurons=dims["tgt_vocab"]))
    return torch.nn.ModuleList([cnn, transformer, *heads])


@pytest.mark.parametrize(
    "name, dims, encoder, decoder",
    [
        ("S2S_conmamba_small", SMALL, "conmamba", "transformer"),
        ("S2S_conmambamamba_small", SMALL, "conmamba", "mamba"),
        ("CTC_conmamba_large", CTC_LARGE, "conmamba", "transformer"),
    ],
)
def test_official_state_dict_layout(name, dims, encoder, decoder):
    expected = []
    for line in (OFFICIAL / f"{name}.txt").read_text().splitlines():
        key, shape = line.split("\t")
        expected.append((key, [int(s) for s in shape.strip("[]").split(",")]))
    ours = [
        (k, list(v.shape)) for k, v in official_model(dims, encoder, decoder).state_dict().items()
    ]
    assert ours == expected  # same names, shapes and order


@pytest.mark.parametrize(
    "dims, encoder, decoder, count",
    [
        (SMALL, "conformer", "transformer", 13_327_296),
        (SMALL, "conmamba", "transformer", 14_075_520),
        (SMALL, "conmamba", "mamba", 14_570_880),
        (LARGE, "conformer", "transformer", 109_136_048),
        (LARGE, "conmamba", "transformer", 115_187_888),
        (LARGE, "conmamba", "mamba", 122_917_040),
        (CTC_LARGE, "conformer", "transformer", 28_786_111),
        (CTC_LARGE, "conmamba", "transformer", 31_555_519),
    ],
)
def test_official_parameter_counts(dims, encoder, decoder, count):
    assert count_parameters(official_model(dims, encoder, decoder)) == count


# ---- initialisation, configuration --------------------------------------------------------------


def test_mamba_init_survives_xavier():
    net = tiny("conmamba", "mamba")
    expected = torch.log(torch.arange(1, 9, dtype=torch.float)).expand(64, -1)
    for block in (net.encoder.layers[0].mamba, net.decoder.layers[1].cross_mamba):
        torch.testing.assert_close(block.A_log, expected)
        assert torch.all(block.D == 1)
    bimamba = net.encoder.layers[1].mamba
    torch.testing.assert_close(bimamba.A_b_log, expected)
    dt = F.softplus(bimamba.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


def test_mamba_config_is_validated_and_not_mutated():
    cfg = {"d_state": 8, "expand": 2, "d_conv": 4, "bidirectional": False}
    frozen = copy.deepcopy(cfg)
    net = tiny("conmamba", "mamba", mamba_config=cfg)
    tiny("mamba", "mamba", mamba_config=cfg)
    assert cfg == frozen
    assert type(net.encoder.layers[0].mamba).__name__ == "Mamba"  # unidirectional when asked
    with pytest.raises(ValueError, match="'d_sate'"):
        tiny(mamba_config={"d_sate": 8})
    with pytest.raises(TypeError, match="mapping"):
        tiny(mamba_config=[16, 2])
    assert tiny(mamba_config=None).mamba_config == MAMBA_DEFAULTS
    summed = tiny("conmamba", "mamba", mamba_config={"d_state": 8, "bimamba_merge": "sum"})
    assert summed.encoder.layers[0].mamba.merge == "sum"  # bidirectional encoder blocks
    assert type(summed.decoder.layers[0].self_mamba).__name__ == "Mamba"  # causal: unaffected


def test_bad_module_names_are_rejected():
    with pytest.raises(ValueError, match="encoder_module 'conmaba'"):
        tiny("conmaba")
    with pytest.raises(ValueError, match="decoder_module 'rnn'"):
        tiny("conmamba", "rnn")
    with pytest.raises(ValueError, match="normalize_before"):
        tiny("conmamba", normalize_before=False)


# ---- gradient checkpointing ---------------------------------------------------------------------


def _loss_and_grads(encoder, checkpointing):
    torch.manual_seed(0)
    net = tiny(encoder, "mamba", encoder_gradient_checkpointing=checkpointing).train()
    src, tgt = torch.randn(2, 19, 20), torch.randint(1, 30, (2, 5))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc, dec = net(src, tgt, wav_len=torch.tensor([1.0, 0.7]))
        loss = enc.pow(2).mean() + dec.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters()}, sum(saved)


@pytest.mark.parametrize("encoder", ["conmamba", "conformer"])
def test_encoder_gradient_checkpointing(encoder):
    loss, grads, saved = _loss_and_grads(encoder, False)
    loss_ckpt, grads_ckpt, saved_ckpt = _loss_and_grads(encoder, True)
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert saved_ckpt < 0.7 * saved  # activations kept for backward (proxy for peak memory)


@pytest.mark.parametrize("encoder", ["conmamba", "mamba"])
def test_hidden_states_and_layerdrop(encoder):
    net = tiny(encoder, "mamba", output_hidden_states=True).eval()
    src, tgt = torch.randn(2, 13, 20), torch.randint(1, 30, (2, 4))
    enc, hidden, dec = net(src, tgt)
    assert len(hidden) == 3 and all(h.shape == (2, 13, 32) for h in hidden)
    torch.testing.assert_close(enc, net.encoder.norm(hidden[-1]))
    dropping = tiny(encoder, layers=0, layerdrop_prob=1.0).train()  # every layer dropped
    x = torch.randn(2, 13, 32)
    torch.testing.assert_close(dropping.encoder(x)[0], dropping.encoder.norm(x))


def test_unspecified_causal_with_a_bidirectional_mamba_config_is_refused():
    """SpeechBrain turns causal=None into True, which would silently drop the bidirectional
    Mamba blocks the config asks for."""
    with pytest.raises(ValueError, match="causal is not given.*pass causal=False"):
        tiny(causal=None)
    net = tiny(causal=None, mamba_config={"d_state": 8, "bidirectional": False})
    assert type(net.encoder.layers[0].mamba).__name__ == "Mamba"
