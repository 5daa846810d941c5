"""Mamba / BiMamba: official parameter layout and math, padding, recurrent inference, init."""

import math

import pytest
import torch
import torch.nn.functional as F

from modules.mamba import BiMamba, Mamba, MambaCache, reset_mamba_parameters, selective_scan_ref

# official ConMamba bidirectional block, d_model=144 (d_state=16, d_conv=4, expand=2)
OFFICIAL_BIMAMBA_144 = {
    "A_log": (288, 16), "D": (288,), "A_b_log": (288, 16), "D_b": (288,),
    "in_proj.weight": (576, 144), "conv1d.weight": (288, 1, 4), "conv1d.bias": (288,),
    "x_proj.weight": (41, 288), "dt_proj.weight": (288, 9), "dt_proj.bias": (288,),
    "conv1d_b.weight": (288, 1, 4), "conv1d_b.bias": (288,), "x_proj_b.weight": (41, 288),
    "dt_proj_b.weight": (288, 9), "dt_proj_b.bias": (288,), "out_proj.weight": (144, 288),
}
BACKWARD_KEYS = {k for k in OFFICIAL_BIMAMBA_144 if "_b" in k}


def official_direction(xz, conv, x_proj, dt_proj, A_log, D, d_conv):
    """mamba-ssm's inner function (no out_proj), written from its math: xz (B, 2*d_inner, L)."""
    x, z = xz.chunk(2, dim=1)
    length = x.shape[-1]
    x = F.conv1d(x, conv.weight, conv.bias, padding=d_conv - 1, groups=x.shape[1])
    x = F.silu(x[..., :length])
    x_dbl = F.linear(x.transpose(1, 2), x_proj.weight)  # (B, L, r + 2n)
    r, n = dt_proj.weight.shape[1], A_log.shape[1]
    delta = (x_dbl[..., :r] @ dt_proj.weight.t()).transpose(1, 2)
    B, C = x_dbl[..., r:r + n].transpose(1, 2), x_dbl[..., r + n:].transpose(1, 2)
    return selective_scan_ref(x, delta, -torch.exp(A_log), B, C, D, z=z,
                              delta_bias=dt_proj.bias, delta_softplus=True)


def official_bimamba_v2(m, x, divide_out=True):
    """Official "v2" forward on an unpadded batch: x (B, L, d_model)."""
    xz = (x @ m.in_proj.weight.t()).transpose(1, 2)
    y_f = official_direction(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, m.d_conv)
    y_b = official_direction(xz.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b,
                             m.d_conv)
    y = (y_f + y_b.flip(-1)).transpose(1, 2)
    return F.linear(y / 2 if divide_out else y, m.out_proj.weight)


def official_mamba(m, x):
    xz = (x @ m.in_proj.weight.t()).transpose(1, 2)
    y = official_direction(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, m.d_conv)
    return F.linear(y.transpose(1, 2), m.out_proj.weight)


def perturbed(module, scale=0.3):
    """Move every parameter off its init so the tests see non-trivial A, D, conv biases."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p) * p.abs().mean().clamp_min(0.1))
    return module


def padded_batch(lengths, d_model, dtype=torch.float32):
    L = max(lengths)
    x = torch.randn(len(lengths), L, d_model, dtype=dtype)
    pad_mask = torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]
    return x.masked_fill(pad_mask[:, :, None], 7.0), pad_mask  # junk in the padding


def test_state_dict_matches_official_layout():
    bi = BiMamba(144)
    assert {k: tuple(v.shape) for k, v in bi.state_dict().items()} == OFFICIAL_BIMAMBA_144
    assert list(bi.state_dict()) == list(OFFICIAL_BIMAMBA_144)
    uni = Mamba(144)
    assert {k: tuple(v.shape) for k, v in uni.state_dict().items()} == {
        k: v for k, v in OFFICIAL_BIMAMBA_144.items() if k not in BACKWARD_KEYS}
    official = {k: torch.randn(s) for k, s in OFFICIAL_BIMAMBA_144.items()}
    bi.load_state_dict(official, strict=True)
    assert torch.equal(bi.dt_proj_b.bias, official["dt_proj_b.bias"])


@pytest.mark.parametrize("cls", [Mamba, BiMamba])
def test_init_ranges(cls):
    m = cls(32, d_state=8, dt_min=0.002, dt_max=0.05)
    names = ["", "_b"] if cls is BiMamba else [""]
    for sfx in names:
        A_log = getattr(m, "A_log" if not sfx else "A_b_log")
        torch.testing.assert_close(A_log, torch.log(torch.arange(1., 9.)).expand(64, 8))
        assert torch.equal(getattr(m, "D" + sfx), torch.ones(64))
        dt_proj = getattr(m, "dt_proj" + sfx)
        dt = F.softplus(dt_proj.bias)
        assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
        assert dt.std() > 0  # sampled, not constant
        bound = m.dt_rank ** -0.5
        assert dt_proj.weight.abs().max() <= bound and dt_proj.weight.std() > bound / 4
        assert A_log._no_weight_decay
    assert m.in_proj.bias is None and m.out_proj.bias is None
    assert m.dt_rank == 2 and m.d_inner == 64


def test_dt_floor_and_constant_init():
    m = Mamba(16, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-3, dt_init="constant")
    torch.testing.assert_close(F.softplus(m.dt_proj.bias), torch.full((32,), 1e-3))
    assert torch.all(m.dt_proj.weight == m.dt_rank ** -0.5)
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(16, dt_init="xavier")


def test_reset_after_xavier_reinit():
    model = torch.nn.Sequential(BiMamba(16, d_state=4), torch.nn.Linear(16, 16),
                                Mamba(16, d_state=4))
    for p in model.parameters():  # what SpeechBrain's TransformerASR._init_params does
        if p.dim() > 1:
            torch.nn.init.xavier_normal_(p)
    assert not torch.allclose(model[0].A_log, torch.log(torch.arange(1., 5.)).expand(32, 4))
    assert reset_mamba_parameters(model) == 2
    for block in (model[0], model[2]):
        for name in ("A_log", "A_b_log"):
            if hasattr(block, name):
                torch.testing.assert_close(getattr(block, name),
                                           torch.log(torch.arange(1., 5.)).expand(32, 4))
        dt = F.softplus(block.dt_proj.bias)
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
        assert block.conv1d.weight.abs().max() <= 1 / math.sqrt(4)  # PyTorch's conv init bound


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_unpadded_output_equals_official_math(dtype, tol):
    bi = perturbed(BiMamba(16, d_state=8)).to(dtype)
    uni = perturbed(Mamba(16, d_state=8)).to(dtype)
    x = torch.randn(3, 29, 16, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(bi(x), official_bimamba_v2(bi, x), rtol=0, atol=tol)
        torch.testing.assert_close(uni(x), official_mamba(uni, x), rtol=0, atol=tol)


def test_sum_merge_matches_undivided_v2_and_keeps_padding_invariance():
    mean = perturbed(BiMamba(16, d_state=8))
    summed = BiMamba(16, d_state=8, merge="sum")
    summed.load_state_dict(mean.state_dict())
    x = torch.randn(2, 23, 16)
    with torch.no_grad():
        torch.testing.assert_close(summed(x), official_bimamba_v2(mean, x, divide_out=False),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(summed(x), 2 * mean(x), rtol=1e-5, atol=1e-6)
        xp, pad_mask = padded_batch([23, 11], 16)
        alone = summed(xp[1:, :11])
        torch.testing.assert_close(summed(xp, pad_mask)[1:, :11], alone, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="merge must be 'mean' or 'sum'"):
        BiMamba(16, merge="average")


@pytest.mark.parametrize("cls", [Mamba, BiMamba])
def test_padding_does_not_change_valid_frames(cls):
    m = perturbed(cls(16, d_state=8))
    lengths = [23, 17, 1, 9]
    x, pad_mask = padded_batch(lengths, 16)
    with torch.no_grad():
        y = m(x, pad_mask=pad_mask)
        for b, n in enumerate(lengths):
            alone = m(x[b:b + 1, :n])[0]
            assert (y[b, :n] - alone).abs().max() <= 1e-5
            assert torch.all(y[b, n:] == 0)


@pytest.mark.parametrize("cls", [Mamba, BiMamba])
def test_padded_inputs_get_no_gradient_from_valid_outputs(cls):
    m = perturbed(cls(16, d_state=8))
    x, pad_mask = padded_batch([12, 5, 8], 16)
    x.requires_grad_(True)
    y = m(x, pad_mask=pad_mask)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.all(x.grad[pad_mask] == 0)
    assert torch.all(x.grad[~pad_mask].abs().sum(-1) > 0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("cls", [Mamba, BiMamba])
def test_non_finite_padding_stays_out(cls):
    m = perturbed(cls(16, d_state=8))
    x, pad_mask = padded_batch([7, 4], 16)
    x[1, 5] = float("nan")
    x[1, 6] = float("inf")
    x.requires_grad_(True)
    y = m(x, pad_mask=pad_mask)
    assert torch.isfinite(y).all()
    assert (y[1, :4] - m(x[1:, :4].detach())[0]).abs().max() <= 1e-5
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_official_code_differs_with_padding():
    """Sanity check of the test above: flipping the padded batch (the official code) leaks."""
    bi = perturbed(BiMamba(16, d_state=8))
    x, _ = padded_batch([20, 11], 16)
    with torch.no_grad():
        official = official_bimamba_v2(bi, x)[1, :11]
        assert (official - bi(x[1:, :11])[0]).abs().max() > 1e-3


def test_step_by_step_equals_full_sequence():
    m = perturbed(Mamba(16, d_state=8))
    x = torch.randn(3, 21, 16)
    with torch.no_grad():
        full = m(x)
        cache = m.allocate_inference_cache(3)
        steps = torch.cat([m.step(x[:, t:t + 1], cache) for t in range(21)], dim=1)
    assert (steps - full).abs().max() <= 1e-5
    assert cache.conv_state.shape == (3, 32, 4) and cache.ssm_state.shape == (3, 32, 8)
    assert cache.ssm_state.dtype == torch.float32


def test_chunks_with_cache_equal_full_sequence_and_steps_continue():
    m = perturbed(Mamba(16, d_state=8))
    x = torch.randn(2, 30, 16)
    with torch.no_grad():
        full = m(x)
        cache = m.allocate_inference_cache(2)
        pieces = [m(x[:, a:b], cache=cache) for a, b in [(0, 2), (2, 3), (3, 17), (17, 26)]]
        pieces += [m.step(x[:, t:t + 1], cache) for t in range(26, 30)]
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


def test_padded_chunk_stops_state_at_last_valid_frame():
    m = perturbed(Mamba(16, d_state=8))
    lengths = [10, 3, 1]
    x, pad_mask = padded_batch(lengths, 16)
    nxt = torch.randn(3, 6, 16)
    with torch.no_grad():
        cache = m.allocate_inference_cache(3)
        y = m(x, pad_mask=pad_mask, cache=cache)
        y_next = m(nxt, cache=cache)
        for b, n in enumerate(lengths):
            alone = torch.cat([x[b:b + 1, :n], nxt[b:b + 1]], dim=1)
            ref = m(alone)[0]
            assert (y[b, :n] - ref[:n]).abs().max() <= 1e-5
            assert torch.all(y[b, n:] == 0)
            assert (y_next[b] - ref[n:]).abs().max() <= 1e-5


def test_recurrent_modes_work_with_autograd():
    """Gradients flow through step() and cached chunks; the cache itself holds no graph."""
    m = perturbed(Mamba(16, d_state=8))
    x = torch.randn(2, 9, 16, requires_grad=True)
    cache = m.allocate_inference_cache(2)
    ys = [m(x[:, :4], cache=cache)] + [m.step(x[:, t:t + 1], cache) for t in range(4, 9)]
    assert not cache.conv_state.requires_grad and not cache.ssm_state.requires_grad
    torch.cat(ys, dim=1).pow(2).sum().backward()
    assert torch.all(x.grad.abs().sum(-1) > 0) and m.A_log.grad is not None


def test_cache_index_select_and_clone():
    m = perturbed(Mamba(16, d_state=8))
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        cache = m.allocate_inference_cache(3)
        m(x, cache=cache)
        picked = cache.index_select(torch.tensor([2, 2, 0]))
        assert isinstance(picked, MambaCache)
        assert torch.equal(picked.ssm_state[1], cache.ssm_state[2])
        assert torch.equal(picked.conv_state[2], cache.conv_state[0])
        copy = cache.clone()
        m.step(x[:, :1], cache)
        assert not torch.equal(copy.ssm_state, cache.ssm_state)
        token = torch.randn(3, 1, 16)
        assert torch.allclose(m.step(token[[2, 2, 0]], picked), m.step(token, copy)[[2, 2, 0]],
                              atol=1e-6)


def test_float64_module_keeps_float64_state():
    m = Mamba(8, d_state=4).double()
    cache = m.allocate_inference_cache(2)
    assert cache.ssm_state.dtype == torch.float64
    assert m.step(torch.randn(2, 1, 8, dtype=torch.float64), cache).dtype == torch.float64


def test_bad_inputs_give_clear_errors():
    m, bi = Mamba(16, d_state=4), BiMamba(16, d_state=4)
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, L, d_model=16\)"):
        m(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match=r"expects x of shape"):
        bi(torch.randn(5, 16))
    with pytest.raises(ValueError, match=r"pad_mask must be a bool tensor of shape \(batch, L\)"):
        bi(torch.randn(2, 5, 16), pad_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="right padding"):
        bi(torch.randn(2, 5, 16), pad_mask=torch.tensor([[True, False, False, False, False]] * 2))
    with pytest.raises(ValueError, match="allocate_inference_cache"):
        m(torch.randn(2, 5, 16), cache=m.allocate_inference_cache(3))
    with pytest.raises(ValueError, match="one token"):
        m.step(torch.randn(2, 2, 16), m.allocate_inference_cache(2))
    with pytest.raises(NotImplementedError):
        bi.allocate_inference_cache(2)
    with pytest.raises(ValueError, match="v2"):
        BiMamba(16, bimamba_type="v1")


def test_pad_mask_checked_once_per_forward(monkeypatch):
    """The right-padding check (a host sync on CUDA) runs once per encoder forward, not per
    block, in inference mode too; a mask changed in place is checked at the next forward."""
    from modules.Conmamba import ConmambaEncoder

    calls = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: calls.append(1) or real_equal(a, b))
    encoder = ConmambaEncoder(num_layers=3, d_model=16, d_ffn=32, kernel_size=3)
    mask = torch.arange(7)[None, :] >= torch.tensor([7, 4])[:, None]
    encoder(torch.randn(2, 7, 16), src_key_padding_mask=mask)
    assert len(calls) == 1
    mask[1, 0] = True  # now left padding as well
    with pytest.raises(ValueError, match="right padding"):
        encoder(torch.randn(2, 7, 16), src_key_padding_mask=mask)
    with torch.inference_mode():
        calls.clear()
        mask = torch.arange(7)[None, :] >= torch.tensor([7, 4])[:, None]
        encoder(torch.randn(2, 7, 16), src_key_padding_mask=mask)
        assert len(calls) == 1


def two_scan_bimamba(m, x, pad_mask):
    """BiMamba as two separate direction scans (Mamba._ssm per direction), the padded way."""
    from modules.mamba.mamba_blocks import _lengths, _reverse_valid

    forward_dir, backward_dir = m._directions()
    lengths = _lengths(pad_mask, x)
    xz = m.in_proj(x.masked_fill(pad_mask[:, :, None], 0.0))
    y_f = m._ssm(xz, forward_dir, lengths)
    y_b = _reverse_valid(m._ssm(_reverse_valid(xz, lengths), backward_dir, lengths), lengths)
    return m._output(0.5 * y_f + 0.5 * y_b, pad_mask)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("lengths", [[29], [29, 17, 1, 8]])
def test_fused_directions_equal_two_scans(dtype, tol, lengths):
    """BiMamba runs both directions as one grouped scan: outputs, input gradients and every
    parameter gradient equal two separate scans, with and without padding."""
    m = perturbed(BiMamba(16, d_state=8)).to(dtype)
    x, pad_mask = padded_batch(lengths, 16, dtype)
    g_out = torch.randn(*x.shape, dtype=dtype)
    results = []
    for fn in (lambda xi: m(xi, pad_mask=pad_mask), lambda xi: two_scan_bimamba(m, xi, pad_mask)):
        xi = x.clone().requires_grad_(True)
        m.zero_grad(set_to_none=True)
        y = fn(xi)
        (y * g_out).sum().backward()
        results.append([y, xi.grad] + [p.grad for p in m.parameters()])
    names = ["out", "dx"] + [f"d{k}" for k, _ in m.named_parameters()]
    for name, fused, two in zip(names, *results):
        scale = two.abs().max().clamp_min(1e-30)
        assert ((fused - two).abs().max() / scale) < tol, name


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_compiled_inference_equals_official_math(dtype, tol, monkeypatch):
    """With the compiled CPU kernels in use, inference runs the causal conv and its SiLU as one
    compiled pass (scan_cpu.conv_silu), and BiMamba both directions without reversed copies
    (the backward direction's conv anti-causal, its scan backwards in time, within each
    sequence's length): the official math's outputs (F.conv1d, flips), also for fewer frames
    than taps and with padding (lengths 1 and 3 among them); with gradients the PyTorch ops run;
    a forced reference backend keeps the kernels out."""
    from modules.mamba import mamba_blocks, scan_cpu

    monkeypatch.setenv("MAMBA_SCAN_NUMBA", "1")
    if not scan_cpu.available():
        pytest.skip("numba is not installed: no compiled CPU kernel")
    calls = []
    kernel = scan_cpu.conv_silu
    monkeypatch.setattr(scan_cpu, "conv_silu", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    both = BiMamba._both_directions_compiled
    monkeypatch.setattr(BiMamba, "_both_directions_compiled",
                        lambda *a: calls.append("bi") or both(*a))
    bi = perturbed(BiMamba(40, d_state=8)).to(dtype)  # 2 x 80 conv channels
    uni = perturbed(Mamba(40, d_state=8)).to(dtype)
    x = torch.randn(2, 21, 40, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(bi(x), official_bimamba_v2(bi, x), rtol=0, atol=tol)
        torch.testing.assert_close(uni(x), official_mamba(uni, x), rtol=0, atol=tol)
        short = x[:, :2]
        torch.testing.assert_close(uni(short), official_mamba(uni, short), rtol=0, atol=tol)
        torch.testing.assert_close(bi(short), official_bimamba_v2(bi, short), rtol=0, atol=tol)
        lengths = (21, 9, 1, 3)
        padded, pad_mask = padded_batch(lengths, 40, dtype)
        out = bi(padded, pad_mask)
        assert out[pad_mask].abs().max() == 0
        for i, length in enumerate(lengths):
            alone = padded[i:i + 1, :length]
            torch.testing.assert_close(out[i:i + 1, :length], official_bimamba_v2(bi, alone),
                                       rtol=0, atol=tol)
    assert calls == ["bi", 1, 1, 1, "bi", 1, "bi", 1]
    bi(x).sum().backward()
    assert len(calls) == 8 and bi.conv1d.weight.grad is not None
    monkeypatch.setenv("MAMBA_SCAN_BACKEND", "ref")
    with torch.no_grad():
        torch.testing.assert_close(bi(x), official_bimamba_v2(bi, x), rtol=0, atol=tol)
    assert len(calls) == 8
    assert not mamba_blocks.compiled_cpu_inference(x)


def test_compiled_inference_weights_follow_parameter_changes(monkeypatch):
    """BiMamba's compiled inference keeps both directions' weights between calls; changing a
    parameter in place (an optimizer step, load_state_dict) or converting the module rebuilds
    them: outputs always equal the PyTorch path's."""
    from modules.mamba import scan_cpu

    monkeypatch.setenv("MAMBA_SCAN_NUMBA", "1")
    if not scan_cpu.available():
        pytest.skip("numba is not installed: no compiled CPU kernel")
    m = perturbed(BiMamba(16, d_state=4))
    x = torch.randn(2, 9, 16)

    def check():
        with torch.no_grad():
            fast = m(x)
        monkeypatch.setenv("MAMBA_SCAN_BACKEND", "ref")
        with torch.no_grad():
            ref = m(x)
        monkeypatch.delenv("MAMBA_SCAN_BACKEND")
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10 if x.dtype == torch.float64
                                   else 1e-5)

    check()
    with torch.no_grad():
        m.A_b_log.add_(0.5)
    check()
    m(x).square().sum().backward()
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    check()
    m.load_state_dict(perturbed(BiMamba(16, d_state=4)).state_dict())
    check()
    # fused AdamW (the recipes' CPU optimizer) updates in place without bumping versions
    fused = torch.optim.AdamW(m.parameters(), lr=0.05, fused=True)
    for _ in range(2):
        m(x).square().sum().backward()
        fused.step()
        fused.zero_grad()
        check()
    with torch.no_grad():  # .data bypasses autograd's versions: a mode switch rebuilds
        m.dt_proj_b.weight.data.mul_(3.0)
    m.train()
    m.eval()
    check()
    m = m.double()
    x = x.double()
    check()


@pytest.mark.parametrize("numba", ["0", "1"])
def test_lengths_without_pad_mask_mean_that_padding(numba, monkeypatch):
    """lengths (B,) alone give what the equivalent pad_mask gives, on the PyTorch path and the
    compiled inference path alike; bad lengths are refused."""
    monkeypatch.setenv("MAMBA_SCAN_NUMBA", numba)
    padded, pad_mask = padded_batch((11, 5), 16, torch.float32)
    lengths = (~pad_mask).sum(1)
    for m in (perturbed(BiMamba(16, d_state=4)), perturbed(Mamba(16, d_state=4))):
        with torch.no_grad():
            torch.testing.assert_close(m(padded, lengths=lengths), m(padded, pad_mask),
                                       rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="integer tensor of shape"):
            m(padded, lengths=torch.tensor([1.0, 0.6]))
