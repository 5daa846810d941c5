"""The fast selective scan (pure PyTorch, and the compiled CPU kernels) against the sequential
reference, and backend selection."""

import os

import pytest
import torch

import modules.mamba.scan as ss
from modules.mamba import selective_scan, selective_scan_ref, selective_scan_torch

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, d_inner, d_state, length, dtype=torch.float64, seed=0):
    """Random inputs in the ranges a trained Mamba block sees."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    A = -torch.arange(1, d_state + 1, dtype=torch.float64).expand(d_inner, -1)
    A = A * torch.exp(0.3 * randn(d_inner, d_state))
    inputs = {
        "u": randn(batch, d_inner, length),
        "delta": 0.5 * randn(batch, d_inner, length),
        "A": A,
        "B": randn(batch, d_state, length),
        "C": randn(batch, d_state, length),
        "D": 1 + 0.1 * randn(d_inner),
        "z": randn(batch, d_inner, length),
        # inverse softplus of dt in [0.001, 0.1]
        "delta_bias": -2.3 - 4.5 * torch.rand(d_inner, generator=g, dtype=torch.float64),
    }
    return {k: v.to(dtype) for k, v in inputs.items()}


def run_scan(fn, inputs, grad_out, use, softplus, **kwargs):
    """Output, last state and the gradient of every used input."""
    args = {k: (v.detach().clone().requires_grad_(True) if k in use else None)
            for k, v in inputs.items()}
    out, last = fn(*(args[k] for k in ARG_NAMES), delta_softplus=softplus,
                   return_last_state=True, **kwargs)
    (out * grad_out).sum().backward()
    return {"out": out, "last": last,
            **{f"d{k}": args[k].grad for k in ARG_NAMES if k in use}}


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run_padded(fn, inputs, grad_out, lengths, h0, **kwargs):
    """Like run_scan for a padded batch: every input used, softplus, initial state h0 (whose
    gradient is returned as dh0), per-sequence lengths."""
    args = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    h = h0.detach().clone().requires_grad_(True)
    out, last = fn(*(args[k] for k in ARG_NAMES), delta_softplus=True, return_last_state=True,
                   initial_state=h, lengths=lengths, **kwargs)
    (out * grad_out).sum().backward()
    return {"out": out, "last": last, "dh0": h.grad,
            **{f"d{k}": args[k].grad for k in ARG_NAMES}}


def padded_reference(inputs, grad_out, lengths, h0):
    """What run_padded must give: each sequence scanned alone up to its length by
    selective_scan_ref; outputs and per-frame gradients zero past the length."""
    batch, _, length = inputs["u"].shape
    per_frame = ("u", "delta", "B", "C", "z")
    want = {"out": torch.zeros_like(inputs["u"]), "last": torch.zeros_like(h0),
            "dh0": torch.zeros_like(h0),
            **{f"d{k}": torch.zeros_like(v) for k, v in inputs.items()}}
    for i, n in enumerate(lengths.tolist()):
        one = {k: (v[i:i + 1, :, :n] if k in per_frame else v) for k, v in inputs.items()}
        res = run_padded(lambda *a, lengths, **k: selective_scan_ref(*a, **k), one,
                         grad_out[i:i + 1, :, :n], None, h0[i:i + 1])
        for name, value in res.items():
            if value is None:  # an input the sequence never used (length 0)
                continue
            key = name[1:]
            if name in ("out", "last", "dh0") or key in per_frame:
                want[name][i, ..., :value.shape[-1]] = value[0]
            else:
                want[name] += value
    return want


OPTION_SETS = [  # (optional inputs used, softplus)
    (("D", "z", "delta_bias"), True),
    ((), False),
    (("D",), True),
    (("z",), False),
    (("delta_bias",), True),
]
SHAPES = [(2, 4, 3, 1), (2, 8, 4, 37), (3, 16, 8, 70)]


@pytest.fixture
def small_blocks(monkeypatch):
    # A few time steps per block, so the block boundaries, a partial last block and the
    # recomputation from saved block-entry states are all exercised.
    monkeypatch.setattr(ss, "BLOCK_FLOATS", 300)
    monkeypatch.setattr(ss, "CHUNK_FLOATS", 150)  # chunks of a few blocks, a partial last one


@pytest.fixture(params=["torch", "compiled"])
def scan_path(request, monkeypatch):
    """The fast scan either in pure PyTorch or as the compiled CPU kernels (numba; skipped where
    numba is not installed)."""
    from modules.mamba import scan_cpu

    monkeypatch.setenv("MAMBA_SCAN_NUMBA", "0" if request.param == "torch" else "1")
    if request.param == "compiled" and not scan_cpu.available():
        pytest.skip("numba is not installed: no compiled CPU kernel")
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("optional,softplus", OPTION_SETS)
def test_fast_scan_matches_reference(shape, optional, softplus, small_blocks, scan_path):
    use = ("u", "delta", "A", "B", "C") + optional
    inputs64 = make_inputs(*shape)
    if not softplus:  # delta is then used as the step size itself: keep it positive and small
        inputs64["delta"] = torch.nn.functional.softplus(inputs64["delta"] - 3)
    grad_out = torch.randn(shape[0], shape[1], shape[3], dtype=torch.float64)
    truth = run_scan(selective_scan_ref, inputs64, grad_out, use, softplus)
    assert ss._block_steps(shape[0], shape[2], shape[1], shape[3]) < max(2, shape[3])

    fast64 = run_scan(selective_scan_torch, inputs64, grad_out, use, softplus)
    inputs32 = {k: v.float() for k, v in inputs64.items()}
    fast32 = run_scan(selective_scan_torch, inputs32, grad_out.float(), use, softplus)
    ref32 = run_scan(selective_scan_ref, inputs32, grad_out.float(), use, softplus)
    assert set(fast64) == set(truth) == {"out", "last"} | {f"d{k}" for k in use}
    for name, ref in truth.items():
        assert fast64[name].dtype == torch.float64
        assert rel_err(fast64[name], ref) < 1e-12, name
        assert fast32[name].dtype == torch.float32
        assert rel_err(fast32[name], ref) < 1e-5, name
        assert rel_err(fast32[name], ref32[name]) < 1e-5, name


def test_default_block_size_and_long_sequence(scan_path):
    use = ARG_NAMES
    assert ss._block_steps(4, 16, 128, 300) == 128  # 3 blocks, the last one partial
    inputs = make_inputs(4, 128, 16, 300)
    grad_out = torch.randn(4, 128, 300, dtype=torch.float64)
    truth = run_scan(selective_scan_ref, inputs, grad_out, use, True)
    fast32 = run_scan(selective_scan_torch, {k: v.float() for k, v in inputs.items()},
                      grad_out.float(), use, True)
    for name, ref in truth.items():
        assert rel_err(fast32[name], ref) < 1e-5, name


@pytest.mark.parametrize("batch,d_inner,d_state,length", [
    (8, 288, 16, 250), (32, 2048, 16, 1000), (64, 4096, 64, 3000), (1, 1024, 16, 3000)])
def test_saved_block_states_stay_small(batch, d_inner, d_state, length):
    """The backward keeps one state per block: at most ~2x the size of u, never B*D*L*N."""
    steps = ss._block_steps(batch, d_state, d_inner, length)
    saved = -(-length // steps) * batch * d_state * d_inner
    assert saved <= 2 * batch * d_inner * length + batch * d_state * d_inner
    bnd = batch * d_state * d_inner
    assert steps * bnd <= max(ss.BLOCK_FLOATS, bnd * d_state)


def test_reused_work_buffers_do_not_leak_between_calls(small_blocks, monkeypatch):
    """Consecutive scans of different sizes share the per-thread scratch buffer of the
    pure-PyTorch scan: each result matches the reference, and no returned tensor is a view of
    the scratch."""
    monkeypatch.setenv("MAMBA_SCAN_NUMBA", "0")
    small, large = make_inputs(2, 8, 4, 37, torch.float32), make_inputs(3, 16, 8, 70, torch.float32)
    out_small = run_scan(selective_scan_torch, small, torch.ones(2, 8, 37), ARG_NAMES, True)
    kept = {k: v.clone() for k, v in out_small.items()}
    out_large = run_scan(selective_scan_torch, large, torch.ones(3, 16, 70), ARG_NAMES, True)
    again = run_scan(selective_scan_torch, small, torch.ones(2, 8, 37), ARG_NAMES, True)
    for name, value in kept.items():
        assert torch.equal(out_small[name], value), name  # untouched by the later scans
        assert torch.equal(again[name], value), name
    truth = run_scan(selective_scan_ref, large, torch.ones(3, 16, 70), ARG_NAMES, True)
    for name, ref in truth.items():
        assert rel_err(out_large[name], ref) < 1e-5, name
    pool = ss._SCRATCH.pool[(torch.float32, torch.device("cpu"), False)]
    assert all(t.untyped_storage().data_ptr() != pool.untyped_storage().data_ptr()
               for res in (out_small, out_large, again) for t in res.values())


def test_scan_after_an_inference_mode_scan(small_blocks, scan_path):
    """Work buffers made under torch.inference_mode (transcription) are not reused by a scan
    outside it (training), where writing into an inference tensor is an error."""
    inputs = make_inputs(2, 8, 4, 37, torch.float32)
    args = [inputs[k] for k in ARG_NAMES]
    with torch.inference_mode():
        inside = selective_scan_torch(*args, delta_softplus=True)
    outside = selective_scan_torch(*args, delta_softplus=True)
    assert torch.equal(inside, outside)


def test_empty_sequence(scan_path):
    inputs = make_inputs(2, 3, 4, 0, dtype=torch.float32)
    out, last = selective_scan_torch(*(inputs[k] for k in ARG_NAMES), return_last_state=True)
    assert out.shape == (2, 3, 0) and torch.equal(last, torch.zeros(2, 3, 4))


def test_initial_state_continues_sequence(small_blocks, scan_path):
    inputs = make_inputs(2, 6, 4, 40)
    full, last = selective_scan_torch(*(inputs[k] for k in ARG_NAMES), delta_softplus=True,
                                      return_last_state=True)
    head = {k: (v[..., :15] if v.dim() == 3 else v) for k, v in inputs.items()}
    tail = {k: (v[..., 15:] if v.dim() == 3 else v) for k, v in inputs.items()}
    out1, h = selective_scan_torch(*(head[k] for k in ARG_NAMES), delta_softplus=True,
                                   return_last_state=True)
    out2, last2 = selective_scan_torch(*(tail[k] for k in ARG_NAMES), delta_softplus=True,
                                       return_last_state=True, initial_state=h)
    torch.testing.assert_close(torch.cat([out1, out2], -1), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(last2, last, rtol=0, atol=1e-12)


def test_initial_state_gradient_matches_reference(small_blocks, scan_path):
    inputs = make_inputs(2, 5, 3, 23)
    grads = []
    for fn in (selective_scan_ref, selective_scan_torch):
        h0 = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        h0.requires_grad_(True)
        out = fn(*(inputs[k] for k in ARG_NAMES), delta_softplus=True, initial_state=h0)
        out.pow(2).sum().backward()
        grads.append(h0.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_gradcheck_tiny(small_blocks, scan_path):
    inputs = make_inputs(2, 3, 2, 7)
    args = tuple(inputs[k].clone().requires_grad_(True) for k in ARG_NAMES)
    h0 = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)

    def fn(*a):
        return selective_scan_torch(*a[:8], delta_softplus=True, initial_state=a[8])

    assert torch.autograd.gradcheck(fn, args + (h0,), eps=1e-6, atol=1e-7)


def test_last_state_has_no_gradient_and_matches_reference(scan_path):
    inputs = make_inputs(2, 4, 3, 9, dtype=torch.float32)
    u = inputs["u"].requires_grad_(True)
    _, last = selective_scan_torch(u, inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                                   return_last_state=True)
    _, last_ref = selective_scan_ref(u, inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                                     return_last_state=True)
    assert last.shape == (2, 4, 3) and not last.requires_grad
    torch.testing.assert_close(last, last_ref.detach(), rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_keeps_float32_state(scan_path):
    inputs = make_inputs(2, 8, 4, 30, dtype=torch.float32)
    low = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v)
           for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, last = selective_scan(*(low[k] for k in ARG_NAMES), delta_softplus=True,
                                   return_last_state=True, backend="torch")
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    ref = selective_scan_ref(*({k: v.float() for k, v in low.items()}[k] for k in ARG_NAMES),
                             delta_softplus=True)
    assert rel_err(out.float(), ref) < 1e-2  # bf16 rounding of the output only


@pytest.mark.parametrize("backend", ["torch", "ref"])
def test_backend_argument_and_env_var(backend, monkeypatch):
    calls = []
    for name in ("selective_scan_torch", "selective_scan_ref"):
        real = getattr(ss, name)
        spy = (lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
        monkeypatch.setattr(ss, name, spy)
    inputs = make_inputs(1, 3, 2, 5, dtype=torch.float32)
    args = [inputs[k] for k in ARG_NAMES]
    want = f"selective_scan_{backend}"

    selective_scan(*args, backend=backend)
    monkeypatch.setenv("MAMBA_SCAN_BACKEND", backend)
    selective_scan(*args)
    other = "ref" if backend == "torch" else "torch"
    selective_scan(*args, backend=other)  # the argument wins over the environment
    assert calls == [want, want, f"selective_scan_{other}"]


def test_backend_resolution_and_errors(monkeypatch):
    monkeypatch.delenv("MAMBA_SCAN_BACKEND", raising=False)
    u = torch.zeros(1, 2, 3)
    assert ss.resolve_backend(None, u) == "torch"
    assert ss.resolve_backend("AUTO", u) == "torch"
    with pytest.raises(ValueError, match="needs CUDA tensors.*backend='torch'"):
        ss.resolve_backend("cuda", u)
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*backend argument"):
        ss.resolve_backend("tpu", u)
    monkeypatch.setenv("MAMBA_SCAN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'.*MAMBA_SCAN_BACKEND"):
        ss.resolve_backend(None, u)
    monkeypatch.setenv("MAMBA_SCAN_BACKEND", "cuda")
    inputs = make_inputs(1, 2, 2, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        selective_scan(*(inputs[k] for k in ARG_NAMES))


@pytest.mark.parametrize("name,bad_shape,pattern", [
    ("delta", (2, 4, 9), r"delta must have shape \(2, 4, 10\)"),
    ("B", (2, 4, 10), r"B must have shape \(2, 3, 10\)"),
    ("C", (2, 3, 9), r"C must have shape \(2, 3, 10\)"),
    ("D", (3,), r"D must have shape \(4,\)"),
    ("z", (1, 4, 10), r"z must have shape \(2, 4, 10\)"),
    ("delta_bias", (4, 1), r"delta_bias must have shape \(4,\)"),
    ("A", (3, 3), r"A must be \(d_inner=4, d_state\)"),
    ("u", (2, 4), r"u must be \(batch, d_inner, L\)"),
])
@pytest.mark.parametrize("fn", [selective_scan, selective_scan_ref, selective_scan_torch])
def test_wrong_shapes_give_clear_errors(fn, name, bad_shape, pattern):
    inputs = make_inputs(2, 4, 3, 10, dtype=torch.float32)
    inputs[name] = torch.zeros(bad_shape)
    with pytest.raises(ValueError, match=pattern):
        fn(*(inputs[k] for k in ARG_NAMES))


def test_transposed_view_layout_matches_reference(small_blocks, scan_path):
    """Mamba passes (B, L, D) tensors as (B, D, L) views; the fast scan takes them without
    copies and must give the reference's outputs and gradients in that layout too."""
    inputs = make_inputs(2, 8, 4, 23)
    views = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 3 else v)
             for k, v in inputs.items()}
    assert not views["u"].is_contiguous()
    grad_out = torch.randn(2, 8, 23, dtype=torch.float64)
    use = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    ref = run_scan(selective_scan_ref, inputs, grad_out, use, True)
    fast = run_scan(selective_scan_torch, views, grad_out, use, True)
    for key, value in ref.items():
        assert rel_err(fast[key], value) < 1e-10, key


@pytest.mark.parametrize("backend", ["torch", "ref"])
def test_lengths_freeze_the_state_past_each_sequence(backend, small_blocks, scan_path):
    """A padded batch (a full, a partial and an empty sequence) through selective_scan gives each
    sequence's own scan: outputs and input gradients zero past its length, last state at it."""
    inputs = make_inputs(3, 5, 3, 10)
    lengths = torch.tensor([10, 6, 0])
    h0 = torch.randn(3, 5, 3, dtype=torch.float64)
    grad_out = torch.randn(3, 5, 10, dtype=torch.float64)
    want = padded_reference(inputs, grad_out, lengths, h0)
    got = run_padded(selective_scan, inputs, grad_out, lengths, h0, backend=backend)
    assert torch.equal(got["last"][2], h0[2])  # an empty sequence keeps its initial state
    assert got["out"][1, :, 6:].abs().max() == 0 and got["du"][1, :, 6:].abs().max() == 0
    for name, value in want.items():
        assert rel_err(got[name], value) < 1e-10, name


def test_lengths_of_the_wrong_shape_give_a_clear_error():
    inputs = make_inputs(2, 4, 3, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        selective_scan(*(inputs[k] for k in ARG_NAMES), lengths=torch.tensor([3]))


def grouped_inputs(batch, d_inner, d_state, length, groups, dtype=torch.float64, seed=0):
    """make_inputs with B and C of shape (batch, groups, d_state, length)."""
    inputs = make_inputs(batch, d_inner, d_state, length, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name in ("B", "C"):
        inputs[name] = torch.randn(batch, groups, d_state, length, generator=g,
                                   dtype=torch.float64).to(dtype)
    return inputs


def test_grouped_reference_is_one_scan_per_channel_group():
    """Group g of B and C drives channels g * d_inner / G ... (mamba-ssm's convention): the
    grouped reference equals separate scans of each channel block."""
    inputs = grouped_inputs(2, 12, 4, 9, groups=3)
    out, last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    for g, cs in enumerate((slice(0, 4), slice(4, 8), slice(8, 12))):
        part = {k: (v[:, cs] if k in ("u", "delta", "z") else v[cs] if k in ("A", "D", "delta_bias")
                    else v[:, g]) for k, v in inputs.items()}
        out_g, last_g = selective_scan_ref(**part, delta_softplus=True, return_last_state=True)
        torch.testing.assert_close(out[:, cs], out_g, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(last[:, cs], last_g, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape,groups", [
    ((2, 8, 4, 1), 2), ((2, 8, 4, 37), 2), ((3, 12, 8, 70), 3), ((1, 8, 4, 23), 1),
    # compiled kernels: groups of a full and a partial channel block (CHANNEL_BLOCK = 64) and
    # frames past the checkpoint interval; two full blocks; 3 channels per group; an odd
    # channel count; one frame, n = 16
    ((2, 200, 4, 150), 2), ((1, 128, 4, 40), 1), ((1, 6, 8, 70), 2), ((2, 5, 4, 37), 1),
    ((3, 8, 16, 1), 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_fast_scan_matches_reference(shape, groups, dtype, small_blocks, scan_path):
    """B, C (batch, G, d_state, L): outputs, all gradients, last state and the initial state's
    gradient equal the reference's, across block boundaries and a partial last block (the
    pure-PyTorch scan's time blocks; the compiled kernels' channel blocks and checkpoints)."""
    inputs = grouped_inputs(*shape, groups=groups, dtype=dtype)
    h0 = torch.randn(shape[0], shape[1], shape[2], dtype=dtype)
    grad_out = torch.randn(shape[0], shape[1], shape[3], dtype=dtype)
    results = []
    for fn in (selective_scan_ref, selective_scan_torch):
        h0_leaf = h0.clone().requires_grad_(True)
        run = run_scan(fn, inputs, grad_out, ARG_NAMES, True, initial_state=h0_leaf)
        run["dh0"] = h0_leaf.grad
        results.append(run)
    ref, fast = results
    assert set(fast) == set(ref) and fast["dB"].shape == inputs["B"].shape
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name in ref:
        assert fast[name].dtype == dtype
        assert rel_err(fast[name], ref[name]) < tol, name


def test_compiled_kernels_do_not_depend_on_the_thread_count(monkeypatch):
    """The compiled kernels share channels among threads: outputs and every gradient are the
    same, bit for bit, on 1 and 2 threads (no two threads write the same value)."""
    from modules.mamba import scan_cpu

    monkeypatch.setenv("MAMBA_SCAN_NUMBA", "1")
    if not scan_cpu.available():
        pytest.skip("numba is not installed: no compiled CPU kernel")
    inputs = grouped_inputs(3, 160, 8, 90, groups=2, dtype=torch.float32)
    grad_out = torch.randn(3, 160, 90)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(run_scan(selective_scan_torch, inputs, grad_out, ARG_NAMES, True))
    finally:
        torch.set_num_threads(threads)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_kernel_lengths_and_reversed_groups(dtype):
    """The forward kernel's inference options (BiMamba's backward direction without reversed
    copies): with lengths, frames at or past a sequence's length give 0 and leave its state
    unchanged; groups from reverse_from on equal the reference scan of each sequence reversed
    within its length (outputs and last state); z read at an offset of a wider tensor. Groups
    of a full and a partial channel block, lengths 1 and L among them; checkpoints (training)
    cannot be combined with either."""
    from modules.mamba import scan_cpu

    if not scan_cpu.available():
        pytest.skip("numba is not installed: no compiled CPU kernel")
    batch, d_inner, d_state, length, groups = 3, 180, 4, 41, 2
    inputs = grouped_inputs(batch, d_inner, d_state, length, groups, dtype=dtype)
    lengths = torch.tensor([41, 17, 1])
    width = d_inner // groups
    wide_z = torch.randn(batch, length, 7 + width, dtype=dtype)  # z = wide_z[..., 7:], shared
    to_kernel = (lambda t: t.transpose(1, 2).contiguous())  # noqa: E731  (batch, L, c)
    h = torch.zeros(batch, d_inner, d_state, dtype=dtype)
    y = scan_cpu.fused_forward(
        to_kernel(inputs["delta"]), inputs["delta_bias"], to_kernel(inputs["u"]), wide_z,
        inputs["B"].permute(0, 3, 1, 2).contiguous(), inputs["C"].permute(0, 3, 1, 2).contiguous(),
        (inputs["A"] * scan_cpu.LOG2E).contiguous(), inputs["D"], h, width, True,
        lengths=lengths, reverse_from=1, z_offset=7).transpose(1, 2)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for i, n in enumerate(lengths.tolist()):
        for g, flip in ((0, False), (1, True)):
            cs = slice(g * width, (g + 1) * width)
            time = (lambda t: t[..., :n].flip(-1) if flip else t[..., :n])  # noqa: E731
            part = {"u": time(inputs["u"][i:i + 1, cs]),
                    "delta": time(inputs["delta"][i:i + 1, cs]),
                    "B": time(inputs["B"][i:i + 1, g]), "C": time(inputs["C"][i:i + 1, g]),
                    "z": time(wide_z[i:i + 1, :, 7:].transpose(1, 2)), "A": inputs["A"][cs],
                    "D": inputs["D"][cs], "delta_bias": inputs["delta_bias"][cs]}
            out, last = selective_scan_ref(**part, delta_softplus=True, return_last_state=True)
            got = y[i:i + 1, cs, :n]
            assert rel_err(got.flip(-1) if flip else got, out) < tol, (i, g)
            assert rel_err(h[i:i + 1, cs], last.to(dtype)) < tol, (i, g)
            if n < length:
                assert y[i, cs, n:].abs().max() == 0
    with pytest.raises(ValueError, match="checkpoints"):
        scan_cpu.fused_forward(to_kernel(inputs["delta"]), None, to_kernel(inputs["u"]), None,
                               inputs["B"].permute(0, 3, 1, 2).contiguous(),
                               inputs["C"].permute(0, 3, 1, 2).contiguous(),
                               inputs["A"].contiguous(), None, h, width, True, every=8,
                               lengths=lengths)


def test_grouped_b_must_divide_channels():
    inputs = grouped_inputs(1, 8, 4, 5, groups=3)
    with pytest.raises(ValueError, match="divides d_inner"):
        selective_scan_torch(**inputs)


def test_compiled_kernels_are_used_when_available(scan_path, monkeypatch):
    """With numba a scan runs the compiled forward kernel once, and its backward the backward
    kernel once; without, neither. The forward gives the same values with and without
    gradients."""
    from modules.mamba import scan_cpu

    calls = []
    for name in ("fused_forward", "fused_backward"):
        kernel = getattr(scan_cpu, name)
        monkeypatch.setattr(scan_cpu, name,
                            lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    inputs = make_inputs(2, 8, 4, 37, torch.float32)
    with torch.no_grad():
        plain = selective_scan_torch(**inputs, delta_softplus=True)
    u = inputs.pop("u").requires_grad_(True)
    out = selective_scan_torch(u, **inputs, delta_softplus=True)
    out.sum().backward()
    compiled = scan_path == "compiled"
    assert calls == (["fused_forward", "fused_forward", "fused_backward"] if compiled else [])
    assert torch.equal(out.detach(), plain)


def test_compiled_float32_decays_are_exp2_to_an_ulp():
    """The float32 kernels compute 2^x with a polynomial and the exponent bits (numba has no
    vectorised exp): within 2.5e-7 relative of exp2 over the decays' range, ~0 below 2^-126."""
    import numpy as np

    from modules.mamba import scan_cpu

    if not scan_cpu.available():
        pytest.skip("numba is not installed: no compiled CPU kernel")
    scan_cpu._kernel("forward")  # compiles _exp2
    x = np.concatenate([np.linspace(-126, 3, 100001), -np.logspace(-8, 0, 1001), [0.0]])
    got = np.array([scan_cpu._exp2(v, False) for v in x.astype(np.float32)])
    want = np.exp2(x.astype(np.float32).astype(np.float64))
    assert np.abs(got / want - 1).max() < 2.5e-7
    assert scan_cpu._exp2(np.float32(-200.0), False) < 1.5e-38  # below 2^-126: (near) zero
    assert scan_cpu._exp2(np.float64(-3.3), True) == np.exp2(-3.3)  # float64: exact


def test_compiled_float32_softplus_and_sigmoid_match_torch():
    """The kernels' vectorisable softplus (log1p by its atanh series) and sigmoid, float32:
    relative to torch's (float64) within 3e-7 plus the effect of rounding v log2(e) to float32
    (|v| 1.2e-7: the exponentials go through 2^x), softplus(v) = v above the threshold 20 as in
    torch, and exact calls in float64."""
    import numpy as np

    from modules.mamba import scan_cpu

    if not scan_cpu.available():
        pytest.skip("numba is not installed: no compiled CPU kernel")
    scan_cpu._kernel("forward")  # compiles the helpers
    v = np.concatenate([np.linspace(-60, 30, 30001), [-1e-6, 0.0, 1e-6, 20.0, 20.5]])
    v = v.astype(np.float32)
    want = torch.from_numpy(v.astype(np.float64))
    for fn, ref in ((scan_cpu._softplus, torch.nn.functional.softplus),
                    (scan_cpu._sigmoid, torch.sigmoid)):
        got = torch.tensor([fn(x, False) for x in v], dtype=torch.float64)
        assert ((got - ref(want)).abs() / ref(want) <= 3e-7 + 1.5e-7 * want.abs()).all(), fn
    assert scan_cpu._softplus(np.float32(20.5), False) == np.float32(20.5)
    assert abs(scan_cpu._softplus(-3.3, True) / np.log1p(np.exp(-3.3)) - 1) < 1e-15


def test_a_scan_with_gradients_loads_the_compiled_kernels(unloaded_kernels):
    """MAMBA_SCAN_NUMBA unset, kernels not loaded, a short scan: without gradients it runs the
    pure-PyTorch scan; with gradients (training) the compiled kernels."""
    calls = unloaded_kernels(load_after=10 ** 9)
    inputs = make_inputs(2, 8, 4, 37, torch.float32)
    selective_scan_torch(**inputs, delta_softplus=True)
    assert calls == []
    inputs["delta"].requires_grad_(True)
    selective_scan_torch(**inputs, delta_softplus=True).sum().backward()
    assert calls == [1] and inputs["delta"].grad is not None


def test_scan_after_inference_mode_scan():
    """The scratch buffers a scan keeps from inside torch.inference_mode() (the transcriber) are
    not reused outside it, where inference tensors cannot be written."""
    inputs = make_inputs(2, 8, 4, 9, torch.float32)
    with torch.inference_mode():
        inside = selective_scan_torch(**inputs, delta_softplus=True)
    outside = selective_scan_torch(**inputs, delta_softplus=True)
    with torch.inference_mode():
        again = selective_scan_torch(**inputs, delta_softplus=True)
    assert torch.equal(inside, outside) and torch.equal(outside, again)


def test_importing_the_mamba_modules_does_not_import_numba():
    """numba's import is part of loading the kernels (see usable_for),
    never of importing the modules: a short transcription does not pay it."""
    import subprocess
    import sys

    code = "import sys, modules.mamba, modules.Conmamba; print('numba' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_loading_the_compiled_kernels_keeps_the_thread_count():
    """Starting numba's thread pool (its own OpenMP runtime) resets PyTorch's thread count to
    every core: the first compiled scan of a process restores the count the user set."""
    import subprocess
    import sys

    from modules.mamba import scan_cpu

    if not scan_cpu.available():
        pytest.skip("numba is not installed: no compiled CPU kernel")
    code = ("import torch; torch.set_num_threads(1)\n"
            "from modules.mamba.scan import selective_scan_torch\n"
            "u, delta, z = torch.randn(3, 1, 8, 20).unbind(0); B, C = torch.randn(2, 1, 4, 20)\n"
            "selective_scan_torch(u, delta, -torch.ones(8, 4), B, C, z=z)\n"
            "from modules.mamba import scan_cpu; print(bool(scan_cpu._KERNELS), "
            "torch.get_num_threads())")
    env = dict(os.environ, MAMBA_SCAN_NUMBA="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env=env)
    assert result.stdout.split() == ["True", "1"]


def test_compiled_kernels_load_once_pure_pytorch_scans_add_up(monkeypatch):
    """MAMBA_SCAN_NUMBA unset: scans without gradients run in pure PyTorch until their state
    updates add up to LOAD_AFTER (loading the kernels costs more than a short file's scans);
    the scan that reaches it loads them, and every later scan uses them. Scans continuing a
    state (streaming) do not count."""
    from modules.mamba import scan_cpu

    monkeypatch.delenv("MAMBA_SCAN_NUMBA", raising=False)
    if not scan_cpu.available():
        pytest.skip("numba is not installed: no compiled CPU kernel")
    u = torch.zeros(2, 8, 37)  # 2 * 8 * 37 * 4 = 2368 state updates with d_state 4
    monkeypatch.setattr(scan_cpu, "LOAD_AFTER", 3 * 2368)
    monkeypatch.setattr(scan_cpu, "_torch_work", 0)
    monkeypatch.setattr(scan_cpu, "_KERNELS", {})
    assert [scan_cpu.usable_for(u, 4) for _ in range(2)] == [False, False]
    assert scan_cpu.usable_for(u, 4, training=True)  # training: always worth loading
    assert not scan_cpu.usable_for(u, 4, continuing=True)  # a stream's piece does not count
    assert scan_cpu.usable_for(u, 4)  # the third brings the total to LOAD_AFTER
    monkeypatch.setattr(scan_cpu, "_torch_work", 0)
    monkeypatch.setattr(scan_cpu, "_KERNELS", {"forward": None})  # loaded by an earlier scan
    assert scan_cpu.usable_for(u, 4)
    monkeypatch.setattr(scan_cpu, "_KERNELS", {})
    assert scan_cpu.usable_for(torch.zeros(1, 8, 3 * 2368 // 32 + 1), 4)  # one large scan
    monkeypatch.setenv("MAMBA_SCAN_NUMBA", "0")
    assert not scan_cpu.usable_for(u, 4)


def test_kernels_prefer_512_bit_vectors_only_where_asked_for():
    """Before numba is imported, an AVX-512 host gets NUMBA_CPU_FEATURES = its features without
    LLVM's 256-bit preference; a value the user set, MAMBA_SCAN_AVX512=0, or a host without
    AVX-512 leave it alone."""
    import subprocess
    import sys

    from modules.mamba import scan_cpu

    if not scan_cpu.available():
        pytest.skip("numba is not installed: no compiled CPU kernel")
    import llvmlite.binding as llvm

    host = llvm.get_host_cpu_features().flatten()
    code = ("import os; from modules.mamba import scan_cpu; scan_cpu._prefer_512_bit_vectors(); "
            "print(repr(os.environ.get('NUMBA_CPU_FEATURES')))")
    base = {k: v for k, v in os.environ.items()
            if k not in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME", "MAMBA_SCAN_AVX512")}

    def features(**env):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env=dict(base, **env)).stdout.strip()

    expected = host + ",-prefer-256-bit" if "+avx512f" in host.split(",") else None
    assert features() == repr(expected)
    assert features(MAMBA_SCAN_AVX512="0") == "None"
    assert features(NUMBA_CPU_FEATURES="+avx2") == repr("+avx2")


def test_an_encoder_on_a_long_input_loads_the_kernels_before_its_first_scan(monkeypatch,
                                                                              unloaded_kernels):
    """A Mamba encoder stack whose scans on one input add up to LOAD_AFTER state updates loads
    the compiled kernels before its first layer (every scan of that input runs compiled), not
    after LOAD_AFTER updates of pure-PyTorch scans; a shorter input, or a forced reference
    backend, leaves them unloaded."""
    from modules.Conmamba import ConmambaEncoder
    from modules.mamba import scan_cpu

    encoder = ConmambaEncoder(num_layers=2, d_model=16, d_ffn=32, kernel_size=3).eval()
    per_frame = encoder.scan_work_per_frame
    assert per_frame == 2 * 2 * 32 * 16  # 2 layers x 2 directions x d_inner 32 x d_state 16
    kernel_runs = unloaded_kernels(load_after=40 * per_frame)
    with torch.no_grad():
        encoder(torch.randn(1, 39, 16))
        assert not scan_cpu.loaded() and scan_cpu._torch_work == 39 * per_frame
        monkeypatch.setenv("MAMBA_SCAN_BACKEND", "ref")
        encoder(torch.randn(1, 40, 16))
        assert not scan_cpu.loaded() and not kernel_runs
        monkeypatch.delenv("MAMBA_SCAN_BACKEND")
        monkeypatch.setattr(scan_cpu, "_torch_work", 0)
        encoder(torch.randn(1, 40, 16))
    assert scan_cpu.loaded() and len(kernel_runs) == 2  # both layers' scans compiled
