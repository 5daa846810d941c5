"""Backend resolution of the selective scan, and the mamba-ssm kernel path's dtype contract.

mamba-ssm's CUDA kernel cannot run here, so a stand-in ``mamba_ssm`` / ``selective_scan_cuda`` is
put into sys.modules. Its ``selective_scan_fn`` does what mamba-ssm's wrapper does (.contiguous()
on tensors whose last stride is not 1) and then applies the kernel's own checks (the TORCH_CHECKs
of selective_scan_fwd / selective_scan_bwd in mamba-ssm's csrc/selective_scan/selective_scan.cpp,
the same from 1.2.2 to main) before computing with the reference scan.
"""

import importlib.abc
import importlib.machinery
import logging
import sys
import types

import pytest
import torch

import modules.mamba.scan as ss
from modules.Conmamba import ConmambaEncoderLayer
from modules.mamba_decoder import MambaDecoderLayer
from modules.mamba import selective_scan, selective_scan_ref
from test_selective_scan import ARG_NAMES, make_inputs, rel_err

KERNEL_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(ok, what):
    if not ok:
        raise RuntimeError(f"selective_scan_cuda stand-in: expected {what}")


def kernel_checks(u, delta, A, B, C, D, z, delta_bias, dout=None):
    """The kernel's dtype, shape and stride checks for input-dependent B and C, 3-D or grouped
    (batch, n_groups, dstate, L) with n_groups dividing dim (mamba-ssm's wrapper hands the
    kernel 3-D ones as one group)."""
    itype = u.dtype
    batch, dim, length = u.shape
    dstate = A.shape[1]
    groups = B.shape[1] if B.dim() == 4 else None
    _check(groups is None or dim % groups == 0, "dim divisible by B's n_groups")
    _check(itype in KERNEL_INPUT_DTYPES, "u float32, float16 or bfloat16")
    _check(A.dtype == torch.float32, "A float32")
    named = {"delta": delta, "B": B, "C": C, "z": z, "dout": dout}
    for name, t in named.items():
        if t is not None:
            _check(t.dtype == itype, f"{name} of u's dtype {itype}, got {t.dtype}")
    for name, t in {"u": u, **named}.items():
        if t is not None:
            _check(t.stride(-1) == 1 or t.size(-1) == 1, f"{name}.stride(-1) == 1")
    _check(dstate <= 256, "d_state <= 256")
    shapes = {"u": (u, (batch, dim, length)), "delta": (delta, (batch, dim, length)),
              "A": (A, (dim, dstate)),
              "B": (B, (batch, dstate, length) if groups is None else (batch, groups, dstate, length)),
              "C": (C, (batch, dstate, length) if groups is None else (batch, groups, dstate, length)),
              "z": (z, (batch, dim, length)),
              "dout": (dout, (batch, dim, length))}
    for name, (t, shape) in shapes.items():
        if t is not None:
            _check(tuple(t.shape) == shape, f"{name} of shape {shape}")
    for name, t in {"D": D, "delta_bias": delta_bias}.items():
        if t is not None:
            _check(t.dtype == torch.float32 and (t.stride(-1) == 1 or t.size(-1) == 1)
                   and tuple(t.shape) == (dim,), f"{name} float32 of shape ({dim},)")


def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


class _StandInScan(torch.autograd.Function):
    calls = []  # ("fwd" | "bwd", u's dtype) per call, reset by the fixture

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        u, delta, B, C, z = (_last_dim_contiguous(t) for t in (u, delta, B, C, z))
        D = None if D is None else D.contiguous()
        kernel_checks(u, delta, A, B, C, D, z, delta_bias)
        _StandInScan.calls.append(("fwd", u.dtype))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        with torch.autocast("cpu", enabled=False):
            out, last = selective_scan_ref(*(None if t is None else t.float()
                                             for t in (u, delta, A, B, C, D, z, delta_bias)),
                                           delta_softplus=delta_softplus, return_last_state=True)
        ctx.mark_non_differentiable(last)
        return out.to(delta.dtype), last  # the kernel's out is like delta; its state float32

    @staticmethod
    def backward(ctx, dout, _dlast):
        dout = _last_dim_contiguous(dout)
        saved = ctx.saved_tensors
        kernel_checks(*saved, dout=dout)
        _StandInScan.calls.append(("bwd", saved[0].dtype))
        leaves = [None if t is None else t.detach().float().requires_grad_(True) for t in saved]
        with torch.enable_grad():
            out = selective_scan_ref(*leaves, delta_softplus=ctx.delta_softplus)
            used = [t for t in leaves if t is not None]
            grads = iter(torch.autograd.grad(out, used, dout.float()))
        result = [None if t is None else next(grads).to(s.dtype)
                  for t, s in zip(leaves, saved)]
        return (*result, None, None)


def _stand_in_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                delta_softplus=False, return_last_state=False):
    out, last = _StandInScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                   return_last_state)
    return (out, last) if return_last_state else out


def _install_mamba_ssm(monkeypatch, kernel=True):
    """Stand-in packages in sys.modules; kernel=False: mamba_ssm without selective_scan_cuda."""
    iface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    iface.selective_scan_fn = _stand_in_selective_scan_fn
    ops = types.ModuleType("mamba_ssm.ops")
    ops.selective_scan_interface = iface
    pkg = types.ModuleType("mamba_ssm")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "mamba_ssm", pkg)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops", ops)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", iface)
    # None in sys.modules makes the import raise ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "selective_scan_cuda",
                        types.ModuleType("selective_scan_cuda") if kernel else None)


@pytest.fixture(autouse=True)
def fresh_resolution(monkeypatch):
    """Each test resolves from scratch: no cached import results, no logged backends."""
    monkeypatch.delenv("MAMBA_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(ss, "_LOGGED", set())
    monkeypatch.setattr(_StandInScan, "calls", [])
    ss._mamba_ssm_kernel.cache_clear()
    yield
    ss._mamba_ssm_kernel.cache_clear()


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """The stand-in kernel, and the resolver told that CPU tensors are CUDA ones."""
    _install_mamba_ssm(monkeypatch)
    real = ss._resolve
    monkeypatch.setattr(ss, "_resolve", lambda backend, device_type, dtype, streaming=False:
                        real(backend, "cuda", dtype, streaming))
    return _StandInScan.calls


# ---- the kernel path: one dtype for u, delta, B, C, z -------------------------------------------


def _lengths_mask(lengths, length):
    return torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]


def _run_autocast(module, inputs, dtype, backend, monkeypatch):
    """Forward under CPU autocast, backward outside: output and parameter gradients."""
    monkeypatch.setenv("MAMBA_SCAN_BACKEND", backend)
    module.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        out = module(*inputs[0], **inputs[1])
        out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).mean().backward()
    return out, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("part", ["conmamba_encoder_layer", "mamba_decoder_layer"])
def test_kernel_gets_one_dtype_under_autocast(part, dtype, kernel_on_cpu, monkeypatch):
    """A whole ConMamba layer (both directions, padded batch) and a Mamba decoder layer (self and
    cross Mamba, padded memory), forward and backward under autocast: every kernel call passes the
    kernel's checks with the autocast dtype (the fast path), and the results are the torch
    backend's within that precision."""
    torch.manual_seed(0)
    if part == "conmamba_encoder_layer":
        module = ConmambaEncoderLayer(d_model=16, d_ffn=32, kernel_size=3)
        inputs = ((torch.randn(2, 9, 16),), {"src_key_padding_mask": _lengths_mask([9, 6], 9)})
    else:
        module = MambaDecoderLayer(d_model=16, d_ffn=32, normalize_before=True)
        inputs = ((torch.randn(2, 5, 16), torch.randn(2, 7, 16)),
                  {"memory_key_padding_mask": _lengths_mask([7, 4], 7)})
    out, grads = _run_autocast(module, inputs, dtype, "auto", monkeypatch)
    calls = 1 if part == "conmamba_encoder_layer" else 2  # BiMamba: both directions, one scan
    assert kernel_on_cpu == [("fwd", dtype)] * calls + [("bwd", dtype)] * calls
    assert all(torch.isfinite(g).all() for g in grads.values())
    out_t, grads_t = _run_autocast(module, inputs, dtype, "torch", monkeypatch)
    assert rel_err(out.float(), out_t.float()) < 3e-2
    for name, g in grads_t.items():
        assert rel_err(grads[name], g) < 0.1, name


def test_kernel_call_unifies_mixed_dtypes(kernel_on_cpu):
    """u float32 with bf16 delta, B, C, z (what a float32 conv under autocast gives) reaches the
    kernel in one dtype."""
    inputs = make_inputs(2, 4, 3, 6, dtype=torch.float32)
    mixed = {k: (v.bfloat16() if k in ("delta", "B", "C", "z") else v) for k, v in inputs.items()}
    args = {k: v.clone().requires_grad_(True) for k, v in mixed.items()}
    out = selective_scan(*(args[k] for k in ARG_NAMES), delta_softplus=True)
    out.float().sum().backward()
    assert kernel_on_cpu == [("fwd", torch.float32), ("bwd", torch.float32)]
    assert all(args[k].grad.dtype == mixed[k].dtype for k in ARG_NAMES)


def test_stand_in_rejects_mixed_dtypes():
    """The stand-in applies the kernel's check that the fix above relies on."""
    inputs = make_inputs(2, 4, 3, 6, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="delta of u's dtype"):
        _stand_in_selective_scan_fn(inputs["u"], inputs["delta"].bfloat16(), inputs["A"],
                                    inputs["B"], inputs["C"])


# ---- resolution --------------------------------------------------------------------------------


def test_auto_prefers_the_kernel_then_triton_then_torch(monkeypatch):
    _install_mamba_ssm(monkeypatch)
    assert ss.describe_backend("cuda") == (
        "Mamba selective scan: mamba-ssm CUDA kernel (backend 'cuda': mamba-ssm's "
        "selective_scan_cuda imports)")
    assert ss._resolve(None, "cuda", torch.float32, streaming=True)[0] == "triton"
    assert ss._resolve(None, "cuda", torch.float64)[0] == "torch"
    monkeypatch.setenv("MAMBA_SCAN_NUMBA", "0")
    assert ss.describe_backend("cpu") == (
        "Mamba selective scan: pure-PyTorch scan (backend 'torch': tensors on cpu)")


def test_kernel_missing_falls_back_to_triton(monkeypatch):
    """mamba_ssm imports, its compiled selective_scan_cuda does not (newer releases build it
    only on request): auto uses Triton and says why; forcing 'cuda' is a clear error."""
    _install_mamba_ssm(monkeypatch, kernel=False)
    line = ss.describe_backend("cuda:0")
    assert line.startswith(
        "Mamba selective scan: Triton scan (backend 'triton': mamba-ssm's kernel unavailable: ")
    assert "selective_scan_cuda is not installed" in line and "MAMBA_KEEP_CUDA_BUILD" in line
    with pytest.raises(ValueError, match="'cuda' .from the backend argument. cannot run: "
                                         "mamba-ssm's compiled kernel selective_scan_cuda"):
        ss.describe_backend("cuda", backend="cuda")
    monkeypatch.setenv("MAMBA_SCAN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="from MAMBA_SCAN_BACKEND. cannot run.*unset it"):
        ss.describe_backend("cuda")


class _BrokenPackageFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``mamba_ssm`` and fails to execute it with a RuntimeError (as a broken transformers
    or Triton kernel import inside mamba-ssm would)."""

    def find_spec(self, name, path=None, target=None):
        if name == "mamba_ssm":
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise RuntimeError("transformers is incompatible")


def test_import_raising_any_exception_means_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenPackageFinder()] + sys.meta_path)
    fn, why = ss._mamba_ssm_kernel()
    assert fn is None and why == "importing it raised RuntimeError: transformers is incompatible"
    assert ss.describe_backend("cuda") == (
        "Mamba selective scan: Triton scan (backend 'triton': mamba-ssm's kernel unavailable: "
        "importing it raised RuntimeError: transformers is incompatible)")


def test_without_triton_cuda_runs_the_torch_scan(monkeypatch):
    _install_mamba_ssm(monkeypatch, kernel=False)
    monkeypatch.setattr(ss, "_triton_scan", lambda: (None, "triton is not installed"))
    line = ss.describe_backend("cuda")
    assert line.startswith("Mamba selective scan: pure-PyTorch scan (backend 'torch': "
                           "mamba-ssm's kernel unavailable: ")
    assert line.endswith("; Triton unavailable: triton is not installed)")
    with pytest.raises(ValueError, match="'triton' .from the backend argument. cannot run: "
                                         "triton is not installed"):
        ss.describe_backend("cuda", backend="triton")


def test_forced_backends_that_cannot_run_here(monkeypatch):
    inputs = make_inputs(1, 2, 2, 3, dtype=torch.float32)
    args = [inputs[k] for k in ARG_NAMES]
    with pytest.raises(ValueError, match="'triton' .from the backend argument. needs CUDA tensors"):
        selective_scan(*args, backend="triton")
    monkeypatch.setenv("MAMBA_SCAN_BACKEND", "TRITON")  # known, case-insensitive, cannot run on CPU
    with pytest.raises(ValueError, match="from MAMBA_SCAN_BACKEND. needs CUDA tensors"):
        selective_scan(*args)
    _install_mamba_ssm(monkeypatch)
    with pytest.raises(ValueError, match="takes no initial_state or lengths"):
        ss._resolve("cuda", "cuda", torch.float32, streaming=True)
    with pytest.raises(ValueError, match="takes no float64"):
        ss._resolve("triton", "cuda", torch.float64)


def test_first_call_logs_the_backend_used(caplog, monkeypatch):
    monkeypatch.setenv("MAMBA_SCAN_NUMBA", "0")  # the pure-PyTorch scan, whatever is loaded
    inputs = make_inputs(1, 2, 2, 3, dtype=torch.float32)
    args = [inputs[k] for k in ARG_NAMES]
    with caplog.at_level(logging.INFO, logger="modules.mamba.scan"):
        selective_scan(*args)
        selective_scan(*args)
        selective_scan(*args, backend="ref")
        selective_scan(*args, backend="ref")
    assert [r.getMessage() for r in caplog.records if r.name == "modules.mamba.scan"] == [
        "Mamba selective scan: using the pure-PyTorch scan (backend 'torch') on cpu: "
        "tensors on cpu",
        "Mamba selective scan: using the reference loop (backend 'ref') on cpu: forced by the "
        "backend argument",
    ]


def test_first_call_logs_the_compiled_kernels_when_they_ran(caplog, unloaded_kernels):
    """On CPU the torch backend runs either implementation: the log names the one that ran (a
    short inference scan: pure PyTorch; a scan with gradients loads and runs the kernels)."""
    runs = unloaded_kernels(1 << 40)
    inputs = make_inputs(1, 2, 2, 3, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="modules.mamba.scan"):
        selective_scan(*[inputs[k] for k in ARG_NAMES])
        trained = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        selective_scan(*[trained[k] for k in ARG_NAMES])
    assert runs == [1]
    assert [r.getMessage() for r in caplog.records if r.name == "modules.mamba.scan"] == [
        "Mamba selective scan: using the pure-PyTorch scan (backend 'torch') on cpu: "
        "tensors on cpu",
        "Mamba selective scan: using the compiled CPU scan (numba kernels) (backend 'torch') on "
        "cpu: tensors on cpu",
    ]


@pytest.mark.parametrize("value, forced", [("1", True), ("TRUE", True), ("on", True),
                                           ("0", False), ("false", False), ("No", False),
                                           ("off", False), ("", None), ("auto", None)])
def test_numba_switch_reads_the_usual_spellings(value, forced, monkeypatch):
    from modules.mamba import scan_cpu

    monkeypatch.setenv("MAMBA_SCAN_NUMBA", value)
    assert scan_cpu._forced() is forced
    if forced is False:
        assert not scan_cpu.available() and not scan_cpu.loaded()


def test_integer_inputs_and_ref_last_state(monkeypatch):
    """Integer tensors are refused (they gave an all-zero integer output); the reference
    backend's last state carries no gradient, as every other backend's."""
    from modules.mamba import selective_scan

    u = torch.randn(1, 4, 6, requires_grad=True)
    delta, A = torch.rand(1, 4, 6), -torch.rand(4, 3)
    B, C = torch.randn(1, 3, 6), torch.randn(1, 3, 6)
    with pytest.raises(ValueError, match="u must be a floating-point tensor, got torch.int64"):
        selective_scan(torch.ones(1, 4, 6, dtype=torch.long), delta, A, B, C)
    for backend in ("ref", "torch"):
        out, last = selective_scan(u, delta, A, B, C, return_last_state=True, backend=backend)
        assert out.requires_grad and not last.requires_grad, backend


def test_numbas_compiler_logs_stay_out_of_debug_logs(monkeypatch):
    """A training run logs at DEBUG to its log file: numba's compiler would add ~500k lines."""
    import modules.mamba.scan_cpu  # noqa: F401  (sets the level on import)

    monkeypatch.setattr(logging.getLogger(), "level", logging.DEBUG)
    assert logging.getLogger("").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("numba.core.ssa").isEnabledFor(logging.DEBUG)
