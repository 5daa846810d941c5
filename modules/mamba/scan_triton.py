"""Selective scan in Triton: mamba-ssm's ``selective_scan_fn`` semantics, no compiler needed.

Triton ships with PyTorch's CUDA wheels, so this backend runs on any CUDA torch without building
anything. It follows the structure of the pure-PyTorch scan in ``scan.py`` (forward keeps only the
state entering each chunk of CHUNK time steps; backward recomputes a chunk's states from it and runs
the adjoint recursion backwards over the chunk), with the time loop inside the kernel:

- one program per (sequence, block of BLOCK_D channels) holds its state h (BLOCK_D, d_state) in
  float32 registers and walks through time; d_state is a ``tl.arange`` dimension; with grouped
  B, C (batch, G, d_state, L), as BiMamba's two directions, a program reads its block's group;
- forward writes out (batch, d_inner, L), the last state and the chunk-entry states
  (batch, n_chunks, d_inner, d_state) float32;
- backward keeps per program one chunk of recomputed states (CHUNK + 1, BLOCK_D, d_state) as
  scratch: nothing of size (batch, d_inner, L, d_state) is ever materialised.

Beyond mamba-ssm's arguments it takes ``initial_state`` (batch, d_inner, d_state) (streaming; it
gets a gradient) and ``lengths`` (batch,): frames at or past a sequence's length leave its state
unchanged, their outputs and input gradients are zero, and the last state is the state at the
length. The math is that of mamba-ssm's selective scan (Tri Dao, Albert Gu; Apache-2.0); the code is
written for this project.

Inputs u, delta, z, B, C may be bf16, fp16 or fp32 (each its own; any strides); A, D, delta_bias are
read as float32 and the state is float32. out has delta's dtype (as mamba-ssm's kernel).
Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors:
that is how the tests check them without a GPU.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .scan import _check_shapes, _empty_like_layout

CHUNK = 64  # time steps between saved states; the backward recomputes one chunk at a time
BLOCK_D = 32  # channels per program (at 64 the kernels need ~1.7x the registers: fewer per SM)
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # softplus(x) = x above this, as torch and the kernel
INTERPRETED = bool(triton.knobs.runtime.interpret)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _softplus(x):
    # log1p(e^x) without log1p (not in every Triton backend): log(w) * e / (w - 1), w = 1 + e, is
    # exact to float32 rounding even when e is tiny (Goldberg 1991, theorem 4).
    e = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.where(x > SOFTPLUS_THRESHOLD, x, log1p)


@triton.jit
def _load_step(t, b_u, b_dt, b_z, b_B, b_C, u_sl, dt_sl, z_sl, B_sl, C_sl, offs_d, mask_d,
               offs_n, mask_n, bias, A, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Inputs at time t as float32: u, pre (delta + bias), dt, z (BLOCK_D,); B, C (N,);
    dA = exp(dt A) (BLOCK_D, N)."""
    u = tl.load(b_u + t * u_sl, mask=mask_d, other=0.0).to(tl.float32)
    pre = tl.load(b_dt + t * dt_sl, mask=mask_d, other=0.0).to(tl.float32) + bias
    dt = _softplus(pre) if SOFTPLUS else pre
    z = tl.load(b_z + t * z_sl, mask=mask_d, other=0.0).to(tl.float32) if HAS_Z else u
    Bt = tl.load(b_B + t * B_sl, mask=mask_n, other=0.0).to(tl.float32)
    Ct = tl.load(b_C + t * C_sl, mask=mask_n, other=0.0).to(tl.float32)
    dA = tl.exp(dt[:, None] * A)
    return u, pre, dt, z, Bt, Ct, dA


@triton.jit
def _program_setup(pid_b, pid_d, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                   len_ptr, d_inner, length, d_state, group_blocks, u_sb, u_sd, dt_sb, dt_sd, z_sb,
                   z_sd, B_sb, B_sg, B_sn, C_sb, C_sg, C_sn, A_sd, A_sn, BLOCK: tl.constexpr,
                   N_PAD: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_LEN: tl.constexpr):
    """What a (sequence pid_b, channel block pid_d) program reads once: channel and state offsets
    and masks, A (BLOCK, N_PAD), D, bias (BLOCK,) as float32, its length, and the base pointers
    of its rows of u, delta, z (channels) and of B, C (states, of the channel group
    pid_d // group_blocks: a group is group_blocks whole channel blocks). ``dn`` indexes a
    contiguous (batch, d_inner, d_state) float32 tensor (states, h0, last, dA) at
    ``state_base``."""
    offs_d = pid_d * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, N_PAD)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * A_sd + offs_n[None, :] * A_sn, mask=mask_dn,
                other=0.0).to(tl.float32)
    D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    dn = offs_d[:, None] * d_state + offs_n[None, :]
    state_base = pid_b * d_inner * d_state
    seqlen = tl.load(len_ptr + pid_b).to(tl.int32) if HAS_LEN else length
    b_u = u_ptr + pid_b * u_sb + offs_d * u_sd
    b_dt = dt_ptr + pid_b * dt_sb + offs_d * dt_sd
    b_z = z_ptr + pid_b * z_sb + offs_d * z_sd
    group = pid_d // group_blocks
    b_B = B_ptr + pid_b * B_sb + group * B_sg + offs_n * B_sn
    b_C = C_ptr + pid_b * C_sb + group * C_sg + offs_n * C_sn
    return (offs_d, mask_d, offs_n, mask_n, mask_dn, dn, state_base, A, D, bias, seqlen, b_u, b_dt,
            b_z, b_B, b_C)


@triton.jit(do_not_specialize=["d_inner", "length", "d_state", "n_chunks", "group_blocks"])
def _fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, len_ptr,
    out_ptr, states_ptr, last_ptr,
    d_inner, length, d_state, n_chunks, group_blocks,
    u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl, z_sb, z_sd, z_sl,
    B_sb, B_sg, B_sn, B_sl, C_sb, C_sg, C_sn, C_sl, o_sb, o_sd, o_sl, A_sd, A_sn,
    BLOCK: tl.constexpr, N_PAD: tl.constexpr, CHUNK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LEN: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    (offs_d, mask_d, offs_n, mask_n, mask_dn, dn, state_base, A, D, bias, seqlen, b_u, b_dt, b_z,
     b_B, b_C) = _program_setup(
        pid_b, pid_d, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, len_ptr,
        d_inner, length, d_state, group_blocks, u_sb, u_sd, dt_sb, dt_sd, z_sb, z_sd, B_sb, B_sg,
        B_sn, C_sb, C_sg, C_sn, A_sd, A_sn, BLOCK, N_PAD, HAS_D, HAS_BIAS, HAS_LEN)
    if HAS_H0:
        h = tl.load(h0_ptr + state_base + dn, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK, N_PAD), dtype=tl.float32)
    b_o = out_ptr + pid_b * o_sb + offs_d * o_sd
    for c in range(0, tl.cdiv(seqlen, CHUNK_T)):
        if SAVE_STATES:
            tl.store(states_ptr + (pid_b * n_chunks + c) * d_inner * d_state + dn, h, mask=mask_dn)
        t0 = c * CHUNK_T
        for t in range(t0, tl.minimum(t0 + CHUNK_T, seqlen)):
            u, pre, dt, z, Bt, Ct, dA = _load_step(
                t, b_u, b_dt, b_z, b_B, b_C, u_sl, dt_sl, z_sl, B_sl, C_sl, offs_d, mask_d,
                offs_n, mask_n, bias, A, HAS_Z, SOFTPLUS)
            h = dA * h + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1) + D * u
            if HAS_Z:
                y = y * z * tl.sigmoid(z)
            tl.store(b_o + t * o_sl, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(last_ptr + state_base + dn, h, mask=mask_dn)


@triton.jit(do_not_specialize=["d_inner", "length", "d_state", "n_chunks", "n_dblocks",
                             "group_blocks"])
def _bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, len_ptr, states_ptr, dout_ptr,
    scratch_ptr, du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    d_inner, length, d_state, n_chunks, n_dblocks, group_blocks,
    u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl, z_sb, z_sd, z_sl,
    B_sb, B_sg, B_sn, B_sl, C_sb, C_sg, C_sn, C_sl, g_sb, g_sd, g_sl, A_sd, A_sn,
    BLOCK: tl.constexpr, N_PAD: tl.constexpr, CHUNK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    """Gradients of one (sequence, channel block), chunks in reverse order.

    du, ddelta, dz, dout share the strides g_s* (allocated alike). Reductions over channels (dB,
    dC: (batch, n_dblocks, d_state, L), per channel block) and over the batch (dA, dD,
    ddelta_bias: per sequence) are written as float32 partial sums, added up by the caller:
    deterministic, no atomics.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    (offs_d, mask_d, offs_n, mask_n, mask_dn, dn, state_base, A, D, bias, seqlen, b_u, b_dt, b_z,
     b_B, b_C) = _program_setup(
        pid_b, pid_d, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, len_ptr,
        d_inner, length, d_state, group_blocks, u_sb, u_sd, dt_sb, dt_sd, z_sb, z_sd, B_sb, B_sg,
        B_sn, C_sb, C_sg, C_sn, A_sd, A_sn, BLOCK, N_PAD, HAS_D, HAS_BIAS, HAS_LEN)
    g_off = pid_b * g_sb + offs_d * g_sd
    # scratch (CHUNK_T + 1, BLOCK, N_PAD) of this program: slot i holds the state before step
    # t0 + i of the current chunk
    tile = tl.arange(0, BLOCK)[:, None] * N_PAD + offs_n[None, :]
    b_s = scratch_ptr + (pid_b * n_dblocks + pid_d) * (CHUNK_T + 1) * BLOCK * N_PAD + tile
    red = (pid_b * n_dblocks + pid_d) * d_state * length + offs_n * length  # dB, dC partials
    carry = tl.zeros((BLOCK, N_PAD), dtype=tl.float32)  # exp(dt_{t+1} A) * dL/dh_{t+1}
    dA_acc = tl.zeros((BLOCK, N_PAD), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    n_valid_chunks = tl.cdiv(seqlen, CHUNK_T)
    for k in range(0, n_valid_chunks):
        c = n_valid_chunks - 1 - k
        t0 = c * CHUNK_T
        t1 = tl.minimum(t0 + CHUNK_T, seqlen)
        h = tl.load(states_ptr + (pid_b * n_chunks + c) * d_inner * d_state + dn, mask=mask_dn,
                    other=0.0)
        tl.store(b_s, h)
        for t in range(t0, t1):  # recompute the chunk's states
            u, pre, dt, z, Bt, Ct, dA = _load_step(
                t, b_u, b_dt, b_z, b_B, b_C, u_sl, dt_sl, z_sl, B_sl, C_sl, offs_d, mask_d,
                offs_n, mask_n, bias, A, HAS_Z, SOFTPLUS)
            h = dA * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(b_s + (t - t0 + 1) * BLOCK * N_PAD, h)
        tl.debug_barrier()  # the scratch is read back below, possibly by other threads
        for i in range(0, t1 - t0):
            t = t1 - 1 - i
            u, pre, dt, z, Bt, Ct, dA = _load_step(
                t, b_u, b_dt, b_z, b_B, b_C, u_sl, dt_sl, z_sl, B_sl, C_sl, offs_d, mask_d,
                offs_n, mask_n, bias, A, HAS_Z, SOFTPLUS)
            h_prev = tl.load(b_s + (t - t0) * BLOCK * N_PAD)
            h = tl.load(b_s + (t - t0 + 1) * BLOCK * N_PAD)
            dy = tl.load(dout_ptr + g_off + t * g_sl, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:
                y = tl.sum(h * Ct[None, :], axis=1) + D * u
                sig = tl.sigmoid(z)
                dz = dy * y * sig * (1.0 + z * (1.0 - sig))
                tl.store(dz_ptr + g_off + t * g_sl, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dy = dy * z * sig
            dD_acc += dy * u
            g = dy[:, None] * Ct[None, :] + carry  # dL/dh_t
            tl.store(dC_ptr + red + t, tl.sum(dy[:, None] * h, axis=0), mask=mask_n)
            tl.store(dB_ptr + red + t, tl.sum(g * (dt * u)[:, None], axis=0), mask=mask_n)
            ddtu = tl.sum(g * Bt[None, :], axis=1)  # dL/d(dt u)
            q = g * h_prev * dA  # dL/d(dt A)
            ddt = tl.sum(q * A, axis=1) + ddtu * u
            dA_acc += q * dt[:, None]
            du = ddtu * dt + dy * D
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(pre)
            dbias_acc += ddt
            tl.store(du_ptr + g_off + t * g_sl, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddt_ptr + g_off + t * g_sl, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_d)
            carry = dA * g
        tl.debug_barrier()  # before the next chunk overwrites the scratch
    tl.store(dh0_ptr + state_base + dn, carry, mask=mask_dn)
    tl.store(dA_ptr + state_base + dn, dA_acc, mask=mask_dn)
    tl.store(dD_ptr + pid_b * d_inner + offs_d, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + pid_b * d_inner + offs_d, dbias_acc, mask=mask_d)


def _on_device(u):
    """Triton launches on the current CUDA device: make it u's (tensors on cuda:1 while the
    current device is 0 would fail, or run on device 0's stream)."""
    return torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext()


def _groups(B):
    return B.shape[1] if B.dim() == 4 else 1


def _strides(x):
    return tuple(x.stride()) if x is not None else (0, 0, 0)


def _block(d_inner, groups):
    """Channels per program: BLOCK_D, or fewer for small groups."""
    return min(BLOCK_D, triton.next_power_of_2(d_inner // groups))


def _launch_geometry(A, groups=1):
    """(channels per program, programs per sequence, padded d_state, programs per group)."""
    d_inner, d_state = A.shape
    block = _block(d_inner, groups)
    n_dblocks = triton.cdiv(d_inner, block)
    return block, n_dblocks, triton.next_power_of_2(d_state), n_dblocks // groups


def groups_fit(d_inner, groups):
    """Whether the kernels take grouped B, C of ``groups`` groups directly: each group must be
    whole channel blocks (else scan.py calls them once per group)."""
    return (d_inner // groups) % _block(d_inner, groups) == 0


def _bc_strides(x):
    """(batch, group, state, time) strides of B or C, (batch, d_state, L) ones as one group."""
    if x.dim() == 3:
        return x.stride(0), 0, x.stride(1), x.stride(2)
    return tuple(x.stride())


class _TritonScanFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, lengths, delta_softplus):
        batch, d_inner, length = u.shape
        d_state = A.shape[1]
        block, n_dblocks, n_pad, group_blocks = _launch_geometry(A, _groups(B))
        n_chunks = max(1, triton.cdiv(length, CHUNK))
        f32 = torch.float32
        A, D, delta_bias = (None if t is None else t.to(f32).contiguous()
                            for t in (A, D, delta_bias))
        h0 = None if h0 is None else h0.to(f32).contiguous()
        save = any(ctx.needs_input_grad)
        out = _empty_like_layout(delta)
        if lengths is not None:
            out.zero_()  # frames past a sequence's length
        states = u.new_empty((batch, n_chunks, d_inner, d_state) if save else (1,), dtype=f32)
        last = u.new_empty(batch, d_inner, d_state, dtype=f32)
        dummy = A  # stands in for absent optional pointers (never read)
        with _on_device(u):
            _fwd_kernel[(batch, n_dblocks)](
                u, delta, A, B, C, D if D is not None else dummy, z if z is not None else u,
                delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else dummy,
                lengths if lengths is not None else dummy, out, states, last,
                d_inner, length, d_state, n_chunks, group_blocks,
                *u.stride(), *delta.stride(), *_strides(z), *_bc_strides(B), *_bc_strides(C),
                *out.stride(), *A.stride(),
                BLOCK=block, N_PAD=n_pad, CHUNK_T=CHUNK, HAS_D=D is not None, HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None, HAS_H0=h0 is not None, HAS_LEN=lengths is not None,
                SOFTPLUS=bool(delta_softplus), SAVE_STATES=save,
            )
        ctx.delta_softplus = bool(delta_softplus)
        ctx.has_h0 = h0 is not None
        ctx.chunk = CHUNK
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, lengths, states)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, delta_bias, lengths, states = ctx.saved_tensors
        batch, d_inner, length = u.shape
        d_state = A.shape[1]
        groups = _groups(B)
        block, n_dblocks, n_pad, group_blocks = _launch_geometry(A, groups)
        chunk = ctx.chunk  # the chunks of the saved states
        f32 = torch.float32
        # du, ddelta, dz and dout share one layout (delta's); frames past a length stay zero
        layout = _empty_like_layout(delta)

        def new(dtype):
            g = torch.empty_like(layout, dtype=dtype)
            return g.zero_() if lengths is not None else g

        if dout.stride() != layout.stride():  # the kernel writes du, ddelta, dz with dout's strides
            dout = new(dout.dtype).copy_(dout)
        du, ddelta = new(u.dtype), new(delta.dtype)
        dz = None if z is None else new(z.dtype)
        alloc = u.new_zeros if lengths is not None else u.new_empty
        dB_part, dC_part = (alloc(batch, n_dblocks, d_state, length, dtype=f32) for _ in range(2))
        dA_part, dh0 = (u.new_empty(batch, d_inner, d_state, dtype=f32) for _ in range(2))
        dD_part, dbias_part = (u.new_empty(batch, d_inner, dtype=f32) for _ in range(2))
        scratch = u.new_empty(batch * n_dblocks * (chunk + 1) * block * n_pad, dtype=f32)
        dummy = A
        with _on_device(u):
            _bwd_kernel[(batch, n_dblocks)](
                u, delta, A, B, C, D if D is not None else dummy, z if z is not None else u,
                delta_bias if delta_bias is not None else dummy,
                lengths if lengths is not None else dummy, states, dout, scratch,
                du, ddelta, dz if dz is not None else du, dB_part, dC_part, dA_part, dD_part,
                dbias_part, dh0,
                d_inner, length, d_state, states.shape[1], n_dblocks, group_blocks,
                *u.stride(), *delta.stride(), *_strides(z), *_bc_strides(B), *_bc_strides(C),
                *dout.stride(), *A.stride(),
                BLOCK=block, N_PAD=n_pad, CHUNK_T=chunk, HAS_D=D is not None, HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None, HAS_LEN=lengths is not None,
                SOFTPLUS=ctx.delta_softplus,
            )
        dB, dC = (part.view(batch, groups, group_blocks, d_state, length).sum(2).view(x.shape)
                  .to(x.dtype) for part, x in ((dB_part, B), (dC_part, C)))
        dD = None if D is None else dD_part.sum(0)
        dbias = None if delta_bias is None else dbias_part.sum(0)
        return (du, ddelta, dA_part.sum(0), dB, dC, dD, dz, dbias,
                dh0 if ctx.has_h0 else None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False, initial_state=None,
                          lengths=None):
    """Triton selective scan: the arguments and results of ``scan.selective_scan_ref``, plus
    ``lengths``.

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L), or
    (batch, G, d_state, L) shared by G equal channel groups when groups_fit(d_inner, G);
    D, delta_bias: (d_inner,); initial_state: (batch, d_inner, d_state) or None (zeros);
    lengths: (batch,) integer tensor or None (all L).
    Returns out (batch, d_inner, L) in delta's dtype [, last_state (batch, d_inner, d_state)
    float32, no gradient]. Gradients flow to every tensor input except lengths, in each input's
    dtype.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths)
    if B.dim() == 4 and not groups_fit(u.shape[1], B.shape[1]):
        raise ValueError(
            f"selective_scan_triton: {B.shape[1]} groups of {u.shape[1] // B.shape[1]} channels "
            f"are not whole blocks of {BLOCK_D} channels; call it once per group")
    device_ok = u.is_cuda or INTERPRETED
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in DTYPES:
            raise ValueError(
                f"selective_scan_triton: {name} must be float32, float16 or bfloat16, got "
                f"{t.dtype}; use backend='torch' for float64")
    if not device_ok:
        raise ValueError(
            f"selective_scan_triton needs CUDA tensors, got tensors on {u.device} (or run with "
            "TRITON_INTERPRET=1 set before import, for tests); use backend='torch'")
    if lengths is not None:
        lengths = lengths.to(device=u.device, dtype=torch.int32).clamp(0, u.shape[2]).contiguous()
    out, last = _TritonScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths,
                                    bool(delta_softplus))
    return (out, last) if return_last_state else out
