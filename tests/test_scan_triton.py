"""The Triton scan: tests/interpreted_scan_triton.py in a process of its own with
TRITON_INTERPRET=1 (Triton decides between compiling and interpreting when it is imported, so the
interpreter cannot be switched on inside this process without affecting every other test), and
both kernels compiled for a GPU without one.
"""

import inspect
import os
import re
import subprocess
import sys

import pytest


def test_triton_scan_under_the_interpreter(repo_root):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
         str(repo_root / "tests" / "interpreted_scan_triton.py")],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed(, \d+ warnings?)? in .*", summary), report


def _signature(kernel, io_dtype, constexprs):
    """Triton argument types: activations and their gradients in io_dtype, lengths int32, the
    rest float32; batch strides int64, other integers int32."""
    io_ptrs = {"u_ptr", "dt_ptr", "z_ptr", "B_ptr", "C_ptr", "out_ptr", "dout_ptr", "du_ptr",
               "ddt_ptr", "dz_ptr"}
    types = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            types[name] = "constexpr"
        elif name == "len_ptr":
            types[name] = "*i32"
        elif name.endswith("_ptr"):
            types[name] = f"*{io_dtype}" if name in io_ptrs else "*fp32"
        else:
            types[name] = "i64" if name.endswith("_sb") else "i32"
    return types


@pytest.mark.parametrize("io_dtype,optional", [("bf16", True), ("fp32", False)])
def test_kernels_compile_for_a_gpu(io_dtype, optional):
    """The interpreter runs Python semantics; the compiler is stricter (e.g. globals must be
    constexpr). Compiling both kernels for sm_90 (Triton's bundled ptxas, no GPU needed) catches
    what the interpreter would let through."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton without its NVIDIA backend")
    import modules.mamba.scan_triton as st

    flags = {name: optional for name in ("HAS_D", "HAS_Z", "HAS_BIAS", "HAS_LEN", "SOFTPLUS")}
    common = dict(BLOCK=st.BLOCK_D, N_PAD=16, CHUNK_T=st.CHUNK, **flags)
    for kernel, constexprs in ((st._fwd_kernel, dict(common, HAS_H0=optional, SAVE_STATES=True)),
                               (st._bwd_kernel, common)):
        source = ASTSource(fn=kernel, signature=_signature(kernel, io_dtype, constexprs),
                           constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel.fn.__name__
