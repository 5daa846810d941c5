"""The Triton selective scan against the sequential reference, under Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when it is imported, so these tests run in a process of their own:
tests/test_scan_triton.py starts it (``TRITON_INTERPRET=1 python -m pytest
tests/interpreted_scan_triton.py``). Blocks of 4 channels and chunks of 4 time steps make every
boundary case (partial channel block, partial chunk, L = 1) appear at small, fast shapes.
"""

import logging

import pytest
import torch

import modules.mamba.scan as ss
import modules.mamba.scan_triton as st
from modules.mamba import Mamba, MambaCache, selective_scan, selective_scan_ref
from test_selective_scan import (ARG_NAMES, grouped_inputs, make_inputs, padded_reference,
                                 rel_err, run_padded, run_scan)

pytestmark = pytest.mark.skipif(not st.INTERPRETED,
                                reason="needs TRITON_INTERPRET=1 before import (see docstring)")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(st, "CHUNK", 4)
    monkeypatch.setattr(st, "BLOCK_D", 4)


# (batch, d_inner, d_state, L): L = 1; L, d_inner not multiples of the blocks; d_state not a power
# of two (masked lanes); a single channel block
SHAPES = [(2, 4, 3, 1), (2, 6, 3, 11), (3, 5, 4, 9), (1, 3, 2, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("optional,softplus", [(("D", "z", "delta_bias"), True), ((), False)])
def test_matches_reference(shape, optional, softplus):
    use = ("u", "delta", "A", "B", "C") + optional
    inputs = make_inputs(*shape)
    if not softplus:  # delta is then the step size itself: keep it positive and small
        inputs["delta"] = torch.nn.functional.softplus(inputs["delta"] - 3)
    grad_out = torch.randn(shape[0], shape[1], shape[3], dtype=torch.float64)
    truth = run_scan(selective_scan_ref, inputs, grad_out, use, softplus)
    got = run_scan(st.selective_scan_triton, {k: v.float() for k, v in inputs.items()},
                   grad_out.float(), use, softplus)
    assert set(got) == set(truth) == {"out", "last"} | {f"d{k}" for k in use}
    for name, ref in truth.items():
        assert got[name].dtype == torch.float32, name
        assert rel_err(got[name], ref) < 1e-5, name


def test_initial_state_and_lengths():
    """A padded batch (full, partial across a chunk boundary, empty) from initial states: each
    sequence as if alone, state frozen past its length, gradients to the initial state too."""
    inputs = make_inputs(3, 6, 3, 10)
    lengths = torch.tensor([10, 6, 0])
    h0 = torch.randn(3, 6, 3, dtype=torch.float64)
    grad_out = torch.randn(3, 6, 10, dtype=torch.float64)
    want = padded_reference(inputs, grad_out, lengths, h0)
    got = run_padded(st.selective_scan_triton, {k: v.float() for k, v in inputs.items()},
                     grad_out.float(), lengths, h0.float())
    assert torch.equal(got["last"][2], h0[2].float())
    assert got["out"][1, :, 6:].abs().max() == 0 and got["ddelta"][1, :, 6:].abs().max() == 0
    for name, value in want.items():
        assert rel_err(got[name], value) < 1e-5, name


def test_initial_state_continues_sequence():
    inputs = {k: v.float() for k, v in make_inputs(2, 5, 3, 13).items()}
    args = [inputs[k] for k in ARG_NAMES]
    full, last = st.selective_scan_triton(*args, True, True)
    cut = 6
    head = [a[..., :cut] if a.dim() == 3 else a for a in args]
    tail = [a[..., cut:] if a.dim() == 3 else a for a in args]
    out1, h = st.selective_scan_triton(*head, True, True)
    out2, last2 = st.selective_scan_triton(*tail, True, True, initial_state=h)
    torch.testing.assert_close(torch.cat([out1, out2], -1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last2, last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_float32_state(low):
    """bf16/fp16 activations (u float32, as a float32 conv under autocast would give): outputs and
    gradients in each input's dtype, last state float32, close to the float32 reference."""
    inputs = make_inputs(2, 6, 3, 9, dtype=torch.float32)
    mixed = {k: (v.to(low) if k in ("delta", "B", "C", "z") else v) for k, v in inputs.items()}
    grad_out = torch.randn(2, 6, 9)
    got = run_scan(st.selective_scan_triton, mixed, grad_out.to(low), ARG_NAMES, True)
    ref = run_scan(selective_scan_ref, {k: v.float() for k, v in mixed.items()}, grad_out.to(low),
                   ARG_NAMES, True)
    assert got["out"].dtype == low and got["last"].dtype == torch.float32
    for name in ARG_NAMES:
        assert got[f"d{name}"].dtype == mixed[name].dtype, name
    for name, value in ref.items():
        assert rel_err(got[name], value) < 2e-2, name  # rounding of bf16/fp16 outputs only


def test_transposed_views_and_expanded_grad():
    """Mamba passes (B, L, d) memory as (B, d, L) views; sum() backpropagates a stride-0 grad."""
    inputs = {k: v.float() for k, v in make_inputs(2, 6, 3, 7).items()}
    views = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 3 else v)
             for k, v in inputs.items()}
    ones = torch.ones(2, 6, 7).expand(2, 6, 7)
    got = run_scan(st.selective_scan_triton, views, ones, ARG_NAMES, True)
    ref = run_scan(selective_scan_ref, inputs, ones, ARG_NAMES, True)
    for name, value in ref.items():
        assert rel_err(got[name], value) < 1e-5, name


def test_backend_triton_through_selective_scan(monkeypatch, caplog):
    monkeypatch.setattr(ss, "_LOGGED", set())
    monkeypatch.delenv("MAMBA_SCAN_BACKEND", raising=False)
    inputs = {k: v.float() for k, v in make_inputs(2, 4, 3, 5).items()}
    with caplog.at_level(logging.INFO, logger="modules.mamba.scan"):
        for _ in range(2):
            out = selective_scan(*(inputs[k] for k in ARG_NAMES), delta_softplus=True,
                                 backend="triton")
    lines = [r.getMessage() for r in caplog.records if r.name == "modules.mamba.scan"]
    assert lines == ["Mamba selective scan: using the Triton scan (backend 'triton') on cpu: "
                     "forced by the backend argument"]
    ref = selective_scan_ref(*(inputs[k] for k in ARG_NAMES), delta_softplus=True)
    assert rel_err(out, ref) < 1e-5


def _on_both_backends(block, x, pad_mask, monkeypatch, stream):
    """{backend: (out, streamed out or None, cache or None, parameter grads)} of a padded batch
    through block, forward and backward, on the torch and Triton backends."""
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MAMBA_SCAN_BACKEND", backend)
        block.zero_grad()
        out = block(x, pad_mask=pad_mask)
        out.pow(2).sum().backward()
        cache = block.allocate_inference_cache(x.shape[0]) if stream else None
        streamed = block(x, pad_mask=pad_mask, cache=cache) if stream else None
        results[backend] = (out, streamed, cache, {n: p.grad.clone()
                                                   for n, p in block.named_parameters()})
    return results


def _assert_same(results):
    (out_t, str_t, cache_t, g_t), (out_x, str_x, cache_x, g_x) = results["torch"], results["triton"]
    torch.testing.assert_close(out_x, out_t, rtol=1e-4, atol=1e-5)
    if cache_t is not None:
        assert isinstance(cache_x, MambaCache)
        torch.testing.assert_close(str_x, str_t, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache_x.ssm_state, cache_t.ssm_state, rtol=1e-4, atol=1e-5)
    for name in g_t:
        torch.testing.assert_close(g_x[name], g_t[name], rtol=1e-4, atol=1e-5, msg=name)


PADDED = (torch.arange(9)[None, :] >= torch.tensor([9, 5])[:, None])


def test_mamba_block_on_triton_matches_torch(monkeypatch):
    """A padded batch through a Mamba block, with and without a streaming cache, forward and
    backward: the Triton backend gives the torch backend's results."""
    torch.manual_seed(0)
    block, x = Mamba(d_model=6, d_state=3), torch.randn(2, 9, 6)
    _assert_same(_on_both_backends(block, x, PADDED, monkeypatch, stream=True))


@pytest.mark.parametrize("groups,d_inner", [(2, 8), (3, 24)])
def test_grouped_b_c_in_one_launch_match_reference(groups, d_inner):
    """B, C (batch, G, d_state, L) read by channel group inside the kernels (groups of whole
    channel blocks): outputs, last state and every gradient, the initial state's too, equal
    the grouped reference's."""
    inputs = grouped_inputs(2, d_inner, 3, 10, groups=groups)
    h0 = torch.randn(2, d_inner, 3, dtype=torch.float64)
    grad_out = torch.randn(2, d_inner, 10, dtype=torch.float64)
    results = []
    for fn, dtype in ((selective_scan_ref, torch.float64), (st.selective_scan_triton, torch.float32)):
        h0_leaf = h0.to(dtype).detach().clone().requires_grad_(True)
        run = run_scan(fn, {k: v.to(dtype) for k, v in inputs.items()}, grad_out.to(dtype),
                       ARG_NAMES, True, initial_state=h0_leaf)
        run["dh0"] = h0_leaf.grad
        results.append(run)
    ref, got = results
    assert got["dB"].shape == inputs["B"].shape
    for name in ref:
        assert rel_err(got[name], ref[name]) < 1e-5, name


def test_grouped_launch_with_lengths_equals_one_launch_per_group():
    """A padded batch (full, cut across a chunk boundary, empty) with grouped B, C: the single
    grouped launch gives what the kernels give one group at a time."""
    inputs = {k: v.float() for k, v in grouped_inputs(3, 16, 3, 10, groups=2).items()}
    lengths = torch.tensor([10, 6, 0])
    h0 = torch.randn(3, 16, 3)
    grad_out = torch.randn(3, 16, 10)

    def per_group(*args, delta_softplus, return_last_state, initial_state, lengths):
        return ss._by_group(st.selective_scan_triton, *args, delta_softplus, return_last_state,
                            initial_state, lengths)

    one = run_padded(st.selective_scan_triton, inputs, grad_out, lengths, h0)
    split = run_padded(per_group, inputs, grad_out, lengths, h0)
    for name in split:
        assert rel_err(one[name], split[name]) < 1e-6, name


def test_groups_that_split_a_channel_block_run_one_group_at_a_time():
    """Groups of 6 channels with blocks of 4: the kernel refuses them, and selective_scan
    (backend triton) calls it once per group, with the reference's results."""
    inputs = {k: v.float() for k, v in grouped_inputs(2, 12, 3, 7, groups=2).items()}
    args = [inputs[k] for k in ARG_NAMES]
    with pytest.raises(ValueError, match="not whole blocks"):
        st.selective_scan_triton(*args, delta_softplus=True)
    out = selective_scan(*args, delta_softplus=True, backend="triton")
    ref = selective_scan_ref(*args, delta_softplus=True)
    assert rel_err(out, ref) < 1e-5


def test_bimamba_grouped_scan_on_triton_matches_torch(monkeypatch):
    """BiMamba scans both directions at once with grouped B, C (batch, 2, d_state, L), in one
    Triton launch (12 channels per group, blocks of 4): outputs and every gradient equal the
    torch backend's, on a padded batch."""
    from modules.mamba import BiMamba

    torch.manual_seed(0)
    block, x = BiMamba(d_model=6, d_state=3), torch.randn(2, 9, 6)
    _assert_same(_on_both_backends(block, x, PADDED, monkeypatch, stream=False))
