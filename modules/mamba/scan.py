"""Selective scan (the S6 recurrence of Mamba) with mamba-ssm's interface, four backends.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h: (batch, d_inner, d_state)
    y_t = C_t . h_t + D * u_t;   out_t = y_t * silu(z_t)

B and C are (batch, d_state, L), or (batch, G, d_state, L) as in mamba-ssm: then channel group g
(channels g * d_inner / G ... (g + 1) * d_inner / G - 1) reads B[:, g] and C[:, g] (BiMamba runs
both directions as one scan of 2 * d_inner channels in 2 groups).

- ``selective_scan_ref``: plain sequential loop, autograd through it (tests, benchmarks).
- ``selective_scan_torch``: fast scan with a hand-written backward: on CPU with numba installed,
  two compiled kernels (``scan_cpu``, forward and backward); else (and on MPS) blocked
  pure-PyTorch code.
- "cuda": mamba-ssm's compiled kernel (``selective_scan_cuda``), when it imports.
- "triton": ``scan_triton.selective_scan_triton``, needs only the Triton that ships with
  PyTorch's CUDA wheels.

``selective_scan(..., backend=None)`` picks automatically ("auto"): on CUDA mamba-ssm's kernel if it
imports, else Triton, else the torch scan; elsewhere the torch scan. The first scan of each backend
in a process logs one line naming it and why. ``backend=`` or the environment variable
``MAMBA_SCAN_BACKEND`` ("auto", "cuda", "triton", "torch", "ref") forces one (the argument wins);
a forced backend that cannot run raises a ValueError saying why. ``describe_backend(device)`` gives
the same decision as a line for start-up logs: this module is the one place that decides.
"""

import contextlib
import functools
import logging
import math
import os
import sys
import threading

import torch

from . import scan_cpu

BACKENDS = ("auto", "cuda", "triton", "torch", "ref")
LABELS = {"cuda": "mamba-ssm CUDA kernel", "triton": "Triton scan", "torch": "pure-PyTorch scan",
          "ref": "reference loop", "compiled": "compiled CPU scan (numba kernels)"}
logger = logging.getLogger(__name__)
LOG2E = scan_cpu.LOG2E
SOFTPLUS_THRESHOLD = scan_cpu.SOFTPLUS_THRESHOLD  # softplus(x) = x above it
BLOCK_FLOATS = 1 << 20  # elements of one (T, batch, d_state, d_inner) work buffer: ~4 MB in float32
CHUNK_FLOATS = 1 << 20  # elements of one time-major (w, batch, d_inner) chunk buffer


def state_dtype(dtype):
    """The dtype of the scan and of Mamba's recurrent states for inputs / weights of ``dtype``:
    float32 (also under bf16/fp16 autocast), except that float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state=None, lengths=None):
    if u.dim() != 3:
        raise ValueError(
            f"selective_scan: u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    for name, tensor in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not tensor.is_floating_point():
            raise ValueError(f"selective_scan: {name} must be a floating-point tensor, got "
                             f"{tensor.dtype}")
    batch, d_inner, length = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(
            f"selective_scan: A must be (d_inner={d_inner}, d_state), got shape {tuple(A.shape)}"
        )
    d_state = A.shape[1]
    groups = B.shape[1] if B.dim() == 4 else None
    if groups is not None and (groups < 1 or d_inner % groups):
        raise ValueError(
            f"selective_scan: B of shape (batch, G, d_state, L) = {tuple(B.shape)} needs a "
            f"group count G that divides d_inner={d_inner}")
    bc_shape = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    expected = {
        "delta": (delta, (batch, d_inner, length)),
        "B": (B, bc_shape),
        "C": (C, bc_shape),
        "D": (D, (d_inner,)),
        "z": (z, (batch, d_inner, length)),
        "delta_bias": (delta_bias, (d_inner,)),
        "initial_state": (initial_state, (batch, d_inner, d_state)),
        "lengths": (lengths, (batch,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"selective_scan: {name} must have shape {shape} (u is (batch, d_inner, L) = "
                f"{tuple(u.shape)}, A is (d_inner, d_state) = {tuple(A.shape)}), "
                f"got {tuple(tensor.shape)}"
            )


def _finish(y, u, D, z, dtype_out):
    """y (batch, d_inner, L) -> out = (y + D u) * silu(z), cast to the input dtype."""
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * torch.nn.functional.silu(z)
    return out.to(dtype_out)


def _step_sizes(delta, delta_bias, delta_softplus):
    """dt = softplus(delta + delta_bias) (or without softplus / bias) in the compute dtype."""
    ct = state_dtype(delta.dtype)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    return torch.nn.functional.softplus(dt) if delta_softplus else dt


def _per_channel(x, d_inner):
    """B or C, (batch, n, L) -> (batch, 1, n, L); grouped (batch, G, n, L) -> each group repeated
    for its d_inner / G channels, (batch, d_inner, n, L)."""
    if x.dim() == 3:
        return x[:, None]
    return x.repeat_interleave(d_inner // x.shape[1], dim=1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """Sequential reference: one step per frame, autograd through the loop.

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L) or
    (batch, G, d_state, L); D, delta_bias: (d_inner,); initial_state: (batch, d_inner, d_state)
    or None (zeros).
    Returns out (batch, d_inner, L) [, last_state (batch, d_inner, d_state)].
    The loop uses ``unbind`` rather than ``x[..., t]``: autograd of per-step slicing costs O(L^2).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    ct = state_dtype(u.dtype)
    dt = _step_sizes(delta, delta_bias, delta_softplus)
    A = A.to(ct)
    uc = u.to(ct)
    h = (u.new_zeros(u.shape[0], A.shape[0], A.shape[1], dtype=ct) if initial_state is None
         else initial_state.to(ct))
    ys = []
    Bc, Cc = (_per_channel(x.to(ct), A.shape[0]) for x in (B, C))  # (batch, 1 or d, n, L)
    steps = zip(dt.unbind(2), uc.unbind(2), Bc.unbind(3), Cc.unbind(3))
    for dt_t, u_t, b_t, c_t in steps:
        h = torch.exp(dt_t[:, :, None] * A) * h + (dt_t * u_t)[:, :, None] * b_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=2) if ys else uc.new_zeros(uc.shape)
    out = _finish(y, uc, None if D is None else D.to(ct), None if z is None else z.to(ct), u.dtype)
    return (out, h) if return_last_state else out


def _block_steps(batch, d_state, d_inner, length):
    """Time steps T per block: a (T, batch, d_state, d_inner) buffer holds ~BLOCK_FLOATS values,
    but T >= d_state / 2 so that the saved block-entry states, ceil(L / T) * batch * d_state *
    d_inner values, never exceed about twice the size of u (batch * d_inner * L)."""
    steps = max(BLOCK_FLOATS // max(1, batch * d_state * d_inner), -(-d_state // 2), 1)
    return min(length, steps)


def _softplus(x, out):
    """log(1 + e^x), and x above the threshold (as torch and the CUDA kernel; taking the max
    instead of a select is exact in float32 and off by < 2e-9 just above 20 in float64).
    exp2 + log1p: ~3x faster than F.softplus on CPU, where it is a large share of the scan."""
    torch.clamp_max(x, SOFTPLUS_THRESHOLD, out=out).mul_(LOG2E).exp2_().log1p_()
    return torch.maximum(out, x, out=out)


def _autocast_off(device_type):
    """The scan runs in float32 even inside an autocast region (bf16/fp16 state would drift)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


def _time_major_groups(x):
    """B or C, (batch, n, L) or (batch, G, n, L) -> new contiguous (L, batch, G, n) (G = 1 for
    3-D input)."""
    if x.dim() == 3:
        x = x[:, None]
    return x.permute(3, 0, 1, 2).contiguous()


def _empty_like_layout(x):
    """A new (batch, c, L) tensor laid out like x: (batch, L, c) memory when x is a transposed
    view of that (as Mamba passes them), so neither side of the scan pays a transpose."""
    batch, c, length = x.shape
    if x.stride(2) != 1 and x.stride(1) == 1:
        return x.new_empty(batch, length, c).transpose(1, 2)
    return x.new_empty(batch, c, length)


_SCRATCH = threading.local()


class _Scratch:
    """Work buffers carved out of one flat tensor.

    On CPU the flat tensor is kept (per thread, dtype and device) and reused by the next scan:
    glibc returns a freed multi-MB buffer to the OS, and touching a fresh one costs page faults
    on every call, as much as the scan itself at small shapes. Other devices' caching allocators
    already reuse memory. A scan started while another holds the buffer gets a fresh one."""

    def __init__(self, like, shapes):
        """shapes: {name: shape or None}; self.views: {name: tensor view or None}."""
        total = sum(math.prod(s) for s in shapes.values() if s is not None)
        # tensors made under inference_mode cannot be written outside it: pooled apart
        self.key = (like.dtype, like.device, torch.is_inference_mode_enabled())
        self.pool = _SCRATCH.__dict__.setdefault("pool", {}) if like.device.type == "cpu" else None
        flat = None if self.pool is None else self.pool.pop(self.key, None)
        if flat is None or flat.numel() < total:
            flat = like.new_empty(total)
        self.flat = flat
        self.views, start = {}, 0
        for name, shape in shapes.items():
            if shape is None:
                self.views[name] = None
                continue
            size = math.prod(shape)
            self.views[name] = flat[start:start + size].view(shape)
            start += size

    def release(self):
        if self.pool is not None:
            kept = self.pool.get(self.key)
            if kept is None or kept.numel() < self.flat.numel():
                self.pool[self.key] = self.flat


class _Converter:
    """Copies time chunks between (batch, c, L) tensors and time-major (w, batch, c) buffers.

    With L innermost this is a transpose: a 2-D transpose, which torch copies in cache tiles
    (a permuted copy reads one cache line per element: ~2-4x slower), through a (batch*c, w)
    staging buffer when the chunk is not the whole sequence."""

    def __init__(self, rows, stage):
        self.rows = rows
        self.stage = stage

    def _staging(self, w):
        return self.stage[: self.rows * w].view(self.rows, w)

    def load(self, x, sl, out):
        """out (w, batch, c) <- x[:, :, sl]."""
        w = sl.stop - sl.start
        if x.stride(2) != 1:  # c (or batch) innermost already: a plain strided copy
            out.copy_(x[:, :, sl].permute(2, 0, 1))
            return out
        if w == x.shape[2] and x.is_contiguous():  # the whole sequence: no staging
            out.view(w, self.rows).copy_(x.view(self.rows, w).t())
            return out
        st = self._staging(w)
        st.view(x.shape[0], x.shape[1], w).copy_(x[:, :, sl])
        out.view(w, self.rows).copy_(st.t())
        return out

    @staticmethod
    def store(x_tm, dst, sl):
        """dst[:, :, sl] <- x_tm (w, batch, c). A permuted copy: in this direction torch's 2-D
        transpose path is ~2x slower."""
        dst[:, :, sl].copy_(x_tm.permute(1, 2, 0))


class _Blocks:
    """Time-major chunk buffers, work buffers and the per-block input loader (a context manager
    that releases its scratch buffers).

    Time is cut into chunks of a few blocks: u, delta, z (and dout) are converted chunk by chunk
    to (w, batch, d_inner); everything of size batch * d_inner * L * d_state is handled one block
    at a time in reused (T, batch, d_state, d_inner) buffers (two, three for the backward)."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, backward=False):
        self.D, self.delta_bias, self.delta_softplus = D, delta_bias, delta_softplus
        self.u_in, self.delta_in, self.z_in = u, delta, z
        batch, d_inner, self.length = u.shape
        d_state = A.shape[1]
        self.steps = T = _block_steps(batch, d_state, d_inner, self.length)
        self.n_blocks = -(-self.length // T)
        # a chunk: whole blocks, ~CHUNK_FLOATS values per (w, batch, d_inner) buffer
        per_chunk = max(1, CHUNK_FLOATS // (T * batch * d_inner))
        self.chunk = W = min(self.length, T * per_chunk)
        self.A2 = (A * LOG2E).t().contiguous()  # (n, d): exp(dt A) = exp2(dt A log2 e)
        self.B, self.C = _time_major_groups(B), _time_major_groups(C)  # (L, b, G, n)
        G = self.B.shape[2]
        self.group_size = d_inner // G
        self.group_slices = [slice(g * self.group_size, (g + 1) * self.group_size)
                             for g in range(G)]
        wide, big, small = (W, batch, d_inner), (T, batch, d_state, d_inner), (T, batch, d_inner)
        only_backward = (lambda shape: shape if backward else None)  # noqa: E731
        self.scratch = _Scratch(u, {
            "stage": (batch * d_inner * W,), "u": wide, "delta": wide,
            "z": wide if z is not None else None, "dout": only_backward(wide),
            "dA": big, "H": big, "G": only_backward(big),  # decays, states, adjoint
            "pre": small, "dt": small, "dtu": small, "y": only_backward(small)})
        for name, view in self.scratch.views.items():
            setattr(self, name, view)
        self.conv = _Converter(batch * d_inner, self.stage)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.scratch.release()

    def chunks(self, reverse=False):
        """(chunk slice of time, [(global block index k, block slice within the chunk)])."""
        out = []
        for c0 in range(0, self.length, self.chunk):
            c1 = min(c0 + self.chunk, self.length)
            blocks = [(c0 // self.steps + i, slice(b0, min(b0 + self.steps, c1 - c0)))
                      for i, b0 in enumerate(range(0, c1 - c0, self.steps))]
            out.append((slice(c0, c1), blocks[::-1] if reverse else blocks))
        return out[::-1] if reverse else out

    def load_chunk(self, cs):
        """Time-major u, delta, z of chunk cs into the chunk buffers."""
        w = cs.stop - cs.start
        self.conv.load(self.u_in, cs, self.u[:w])
        self.conv.load(self.delta_in, cs, self.delta[:w])
        if self.z is not None:
            self.conv.load(self.z_in, cs, self.z[:w])

    def load(self, cs, bs):
        """Block inputs, time-major: pre (delta + bias), dt, u, dt*u (T, b, d);
        B, C (T, b, G, n)."""
        T = bs.stop - bs.start
        pre = self.delta[bs]
        if self.delta_bias is not None:
            pre = torch.add(pre, self.delta_bias, out=self.pre[:T])
        dt = _softplus(pre, self.dt[:T]) if self.delta_softplus else pre
        u_t = self.u[bs]
        dtu = torch.mul(dt, u_t, out=self.dtu[:T])
        ts = slice(cs.start + bs.start, cs.start + bs.stop)
        return pre, dt, u_t, dtu, self.B[ts], self.C[ts]

    def outer(self, x, bc, out):
        """out[t, b, n, c] = x[t, b, c] * bc[t, b, group of c, n]: x (T, b, d), bc (T, b, G, n),
        out (T, b, n, d)."""
        T, b, G, n = bc.shape
        return torch.mul(x.view(T, b, 1, G, self.group_size), bc.transpose(2, 3)[..., None],
                         out=out.view(T, b, n, G, self.group_size))

    def contract_state(self, bc, M, out):
        """out[r, 0, c] = sum_n bc[r, group of c, n] * M[r, n, c]: bc (R, G, n), M (R, n, d),
        out (R, 1, d). With groups, one bmm over all groups and the diagonal blocks kept: bmm on
        a channel slice of M (strided rows) is ~2x slower than on all of it."""
        if len(self.group_slices) == 1:
            return torch.bmm(bc, M, out=out)
        every = torch.bmm(bc, M)  # (R, G, d): each group's coefficients on every channel
        for g, cs in enumerate(self.group_slices):
            out[:, 0, cs] = every[:, g, cs]
        return out

    def contract_channels(self, x, M, out):
        """out[r, g, n] = sum over c in group g of x[r, 0, c] * M[r, n, c]: x (R, 1, d),
        M (R, n, d), out (R, G, n). (1, d) @ (d, n) per row: ~10x faster than (n, d) @ (d, 1)
        with CPU bmm; groups: x spread over G rows, zero outside each group (see
        contract_state)."""
        G = len(self.group_slices)
        if G > 1:
            spread = x.new_zeros(x.shape[0], G, x.shape[2])
            for g, cs in enumerate(self.group_slices):
                spread[:, g, cs] = x[:, 0, cs]
            x = spread
        return torch.bmm(x, M.transpose(1, 2), out=out)

    def adjoint(self, dA, H, entry, dt, dtu, dy, B_t, C_t, carry, A_nd, dA_nd, dB, dC):
        """Pure-PyTorch backward through one block: dA, H (T, b, n, d) from states(); entry
        (b, n, d); carry (b, n, d) = exp(dt A) * dL/dh of the frame after the block, updated
        to that of the block's first frame; adds to dA_nd (n, d); writes dB, dC (T, b, G, n).
        Returns ddtu = dL/d(dt u) and ddt = sum_n dL/d(dt A) * A, both (T, b, d)."""
        T, batch, d_state, d_inner = H.shape
        TB, n_groups = T * batch, len(self.group_slices)
        # adjoint g_t = dL/dh_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}
        G = self.G[:T]
        self.outer(dy, C_t, G)
        G[T - 1].add_(carry)
        for i in range(T - 2, -1, -1):
            G[i].addcmul_(dA[i + 1], G[i + 1])
        torch.mul(dA[0], G[0], out=carry)
        G_rows = G.view(TB, d_state, d_inner)
        self.contract_channels(dy.view(TB, 1, d_inner), H.view(TB, d_state, d_inner),
                               dC.view(TB, n_groups, d_state))
        self.contract_channels(dtu.view(TB, 1, d_inner), G_rows, dB.view(TB, n_groups, d_state))
        ddtu = dy.new_empty(T, batch, d_inner)
        self.contract_state(B_t.view(TB, n_groups, d_state), G_rows, ddtu.view(TB, 1, d_inner))
        # q_t = g_t * h_{t-1} * exp(dt_t A) = dL/d(dt_t A)
        G[1:].mul_(H[:-1])
        G[0].mul_(entry)
        G.mul_(dA)
        ddt = torch.mul(G, A_nd, out=dA).sum(2)  # (T, b, d)
        G.mul_(dt[:, :, None, :])
        dA_nd += G.view(TB, d_state * d_inner).sum(0).view(d_state, d_inner)
        return ddtu, ddt

    def states(self, T, dt, dtu, B_t, entry):
        """dA = exp(dt A) and states H, both (T, b, n, d), from the state entering the block."""
        dA, H = self.dA[:T], self.H[:T]
        torch.mul(dt[:, :, None, :], self.A2, out=dA).exp2_()  # exp2 is faster than exp on CPU
        self.outer(dtu, B_t, H)
        prev = entry
        for dA_t, h_t in zip(dA.unbind(0), H.unbind(0)):
            prev = h_t.addcmul_(dA_t, prev)
        return dA, H

    def readout(self, H, C_t, u_t, out):
        """y = C . h + D u (T, b, d), before the z gate, written to out."""
        T, b, n, d = H.shape
        self.contract_state(C_t.view(T * b, -1, n), H.view(T * b, n, d), out.view(T * b, 1, d))
        if self.D is not None:
            out.addcmul_(u_t, self.D)
        return out


class _SelectiveScanFn(torch.autograd.Function):
    """Blocked time-major scan. Forward keeps only the state entering each time block; backward
    recomputes a block's states from it, then runs the adjoint recursion over the block.
    Work buffers hold ~BLOCK_FLOATS values each, so memory does not grow like
    batch * d_inner * L * d_state (the saved block-entry states are that divided by T)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus):
        with _Blocks(u, delta, A, B, C, D, z, delta_bias, delta_softplus) as blk:
            batch, d_inner, _ = u.shape
            # States entering each block (k, b, n, d); without gradients two rotating slots suffice.
            keep = any(ctx.needs_input_grad)
            entries = u.new_empty(blk.n_blocks if keep else min(2, blk.n_blocks),
                                  batch, A.shape[1], d_inner)
            slot = (lambda k: k) if keep else (lambda k: k % 2)  # noqa: E731
            if h0 is None:
                entries[0].zero_()
            else:
                entries[0].copy_(h0.transpose(1, 2))
            out = _empty_like_layout(u)
            y_c = blk.delta  # a block's delta is no longer needed once its states are computed
            for cs, blocks in blk.chunks():
                blk.load_chunk(cs)
                for k, bs in blocks:
                    pre, dt, u_t, dtu, B_t, C_t = blk.load(cs, bs)
                    T = dt.shape[0]
                    _, H = blk.states(T, dt, dtu, B_t, entries[slot(k)])
                    if k + 1 < blk.n_blocks:
                        entries[slot(k + 1)].copy_(H[T - 1])
                    y = blk.readout(H, C_t, u_t, y_c[bs])
                    if z is not None:
                        y.mul_(torch.nn.functional.silu(blk.z[bs]))
                blk.conv.store(y_c[: cs.stop - cs.start], out, cs)
            last = H[T - 1].transpose(1, 2).clone()
        ctx.delta_softplus = delta_softplus
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, entries)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        with _autocast_off(dout.device.type):
            return _SelectiveScanFn._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, entries = ctx.saved_tensors
        with _Blocks(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
                     backward=True) as blk:
            batch, d_inner, length = u.shape
            d_state = A.shape[1]
            dout_c = blk.dout
            # time-major gradients overwrite a block's chunk inputs after their last use
            du_c, ddelta_c, dz_c = blk.u, blk.delta, blk.z
            du, ddelta = _empty_like_layout(u), _empty_like_layout(delta)
            dz = None if z is None else _empty_like_layout(z)
            n_groups = len(blk.group_slices)
            dB, dC = (u.new_empty(length, batch, n_groups, d_state) for _ in range(2))
            dD = None if D is None else D.new_zeros(d_inner)
            ddelta_bias = None if delta_bias is None else delta_bias.new_zeros(d_inner)
            # dL/dA (n, d), and exp(dt_{t0} A) * dL/dh_{t0} (b, n, d) of the later block, handed
            # to the block before it
            A_k = A.t().contiguous()
            dA_k = torch.zeros_like(A_k)
            carry = u.new_zeros(batch, *A_k.shape)
            for cs, blocks in blk.chunks(reverse=True):
                blk.load_chunk(cs)
                blk.conv.load(dout, cs, dout_c[: cs.stop - cs.start])
                for k, bs in blocks:
                    pre, dt, u_t, dtu, B_t, C_t = blk.load(cs, bs)
                    T = dt.shape[0]
                    ts = slice(cs.start + bs.start, cs.start + bs.stop)
                    entry = entries[k]
                    dy = dout_c[bs]
                    dA, H = blk.states(T, dt, dtu, B_t, entry)
                    y = blk.readout(H, C_t, u_t, blk.y[:T]) if z is not None else None
                    if z is not None:
                        z_t = blk.z[bs]
                        dz_t = torch.ops.aten.silu_backward(y.mul_(dy), z_t)  # y dy silu'(z)
                        dy.mul_(torch.nn.functional.silu(z_t))
                        dz_c[bs].copy_(dz_t)
                    if D is not None:
                        dD += (dy * u_t).sum((0, 1))
                    ddtu, ddt = blk.adjoint(dA, H, entry, dt, dtu, dy, B_t, C_t, carry, A_k,
                                            dA_k, dB[ts], dC[ts])
                    ddt.addcmul_(ddtu, u_t)
                    du_t = ddtu.mul_(dt)
                    if D is not None:
                        du_t.addcmul_(dy, D)
                    if ctx.delta_softplus:
                        ddt.mul_(torch.sigmoid(pre))
                    if delta_bias is not None:
                        ddelta_bias += ddt.sum((0, 1))
                    du_c[bs].copy_(du_t)
                    ddelta_c[bs].copy_(ddt)
                w = cs.stop - cs.start
                for g_c, g in ((du_c, du), (ddelta_c, ddelta), (dz_c, dz)):
                    if g is not None:
                        blk.conv.store(g_c[:w], g, cs)
        dh0 = carry.transpose(1, 2) if ctx.has_h0 else None
        dB, dC = (g.permute(1, 2, 3, 0).contiguous() for g in (dB, dC))  # (b, G, n, L)
        if B.dim() == 3:
            dB, dC = dB[:, 0], dC[:, 0]
        return du, ddelta, dA_k.t(), dB, dC, dD, dz, ddelta_bias, dh0, None


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, initial_state=None):
    """Fast pure-PyTorch scan: same arguments and results as ``selective_scan_ref``.

    Computes in float32 (float64 for float64 u) with autocast disabled; out has u's dtype.
    initial_state (batch, d_inner, d_state) continues a sequence (streaming); gradients flow to it.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    ct = state_dtype(u.dtype)
    if u.shape[2] == 0:
        last = (u.new_zeros(u.shape[0], A.shape[0], A.shape[1], dtype=ct) if initial_state is None
                else initial_state.detach().to(ct).clone())
        return (u.new_zeros(u.shape), last) if return_last_state else u.new_zeros(u.shape)
    cast = (lambda t: None if t is None else t.to(ct))
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    compiled = scan_cpu.usable_for(u, A.shape[1], training, continuing=initial_state is not None)
    fn = _FusedScanFn if compiled else _SelectiveScanFn
    with _autocast_off(u.device.type):
        out, last = fn.apply(
            cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(z), cast(delta_bias),
            cast(initial_state), bool(delta_softplus))
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


def _time_last(x):
    """(batch, c, L) -> contiguous (batch, L, c): free for the transposed views Mamba passes."""
    return x.transpose(1, 2).contiguous()


def _groups_time_last(x):
    """B or C, (batch, n, L) or (batch, G, n, L) -> contiguous (batch, L, G, n) (G = 1 for
    3-D input): free for the permuted views BiMamba passes."""
    return (x[:, None] if x.dim() == 3 else x).permute(0, 3, 1, 2).contiguous()


class _FusedScanFn(torch.autograd.Function):
    """The scan as two compiled CPU kernels (scan_cpu.fused_forward / fused_backward) on
    (batch, L, c) tensors: no time-major copies; step sizes (bias, softplus), decays and the
    z gate computed in the kernels, with their gradients. The forward keeps the state entering
    every `every` frames; the backward recomputes each block's states from it."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus):
        u_l, B_l, C_l = _time_last(u), _groups_time_last(B), _groups_time_last(C)
        delta_l = _time_last(delta)
        z_l = None if z is None else _time_last(z)
        state = (u.new_zeros(u.shape[0], *A.shape) if h0 is None
                 else h0.contiguous().clone())
        keep = any(ctx.needs_input_grad)
        every = 2 * A.shape[1] if keep else 0  # checkpoints: half the size of u
        group_size = A.shape[0] // B_l.shape[2]
        y = scan_cpu.fused_forward(delta_l, delta_bias, u_l, z_l, B_l, C_l,
                                   (A * LOG2E).contiguous(), D, state, group_size,
                                   delta_softplus, every)
        if keep:
            y, ckpt = y
            ctx.save_for_backward(u_l, delta_l, A, B_l, C_l, D, z_l, delta_bias, ckpt)
            ctx.meta = (delta_softplus, every, group_size, B.dim(), h0 is not None)
        ctx.mark_non_differentiable(state)
        return y.transpose(1, 2), state

    @staticmethod
    def backward(ctx, dout, _dlast):
        u_l, delta_l, A, B_l, C_l, D, z_l, delta_bias, ckpt = ctx.saved_tensors
        softplus, every, group_size, b_dims, has_h0 = ctx.meta
        with _autocast_off(dout.device.type):
            dz, ddelta, du, dA, dD, dB, dC, dh0 = scan_cpu.fused_backward(
                delta_l, delta_bias, u_l, _time_last(dout), z_l, B_l, C_l,
                (A * LOG2E).contiguous(), A.contiguous(), D, ckpt, every, group_size, softplus)
            dB, dC = (g.permute(0, 2, 3, 1) for g in (dB, dC))  # (batch, G, n, L) views
            if b_dims == 3:
                dB, dC = dB[:, 0], dC[:, 0]
            return (du.transpose(1, 2), ddelta.transpose(1, 2), dA, dB, dC,
                    None if D is None else dD, None if dz is None else dz.transpose(1, 2),
                    None if delta_bias is None else ddelta.sum((0, 1)),
                    dh0 if has_h0 else None, None)


def _mask_past_lengths(delta, delta_bias, delta_softplus, lengths):
    """The step sizes with frames at or past each sequence's length set to 0 (state unchanged
    there): (dt (batch, d_inner, L) in the compute dtype, valid (batch, 1, L) bool)."""
    dt = _step_sizes(delta, delta_bias, delta_softplus)
    steps = torch.arange(delta.shape[2], device=delta.device)
    valid = (steps[None, :] < lengths.to(delta.device)[:, None])[:, None, :]
    return dt * valid, valid


def _describe_error(err):
    if isinstance(err, ModuleNotFoundError) and err.name == "selective_scan_cuda":
        return ("mamba-ssm's compiled kernel selective_scan_cuda is not installed (newer mamba-ssm "
                "builds it only with MAMBA_KEEP_CUDA_BUILD=TRUE; see requirements-cuda.txt)")
    if isinstance(err, ModuleNotFoundError) and err.name in ("mamba_ssm", "triton"):
        return f"{err.name} is not installed"
    return f"importing it raised {type(err).__name__}: {err}"


@functools.lru_cache(maxsize=None)
def _mamba_ssm_kernel():
    """(mamba-ssm's selective_scan_fn, None) when its compiled kernel imports, else (None, why).

    ``import mamba_ssm`` succeeds without the kernel (it is optional in newer releases: the call
    then raises) and also imports Triton kernels and transformers, which can fail in any way:
    so the kernel module is imported first and every exception means "not usable"."""
    try:
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # noqa: BLE001 (see the docstring)
        return None, _describe_error(err)
    return selective_scan_fn, None


@functools.lru_cache(maxsize=None)
def _triton_scan():
    """(selective_scan_triton, None) when Triton imports, else (None, why)."""
    try:
        from .scan_triton import selective_scan_triton
    except Exception as err:  # noqa: BLE001 (a broken Triton install must not stop the torch scan)
        return None, _describe_error(err)
    return selective_scan_triton, None


def cuda_backends_status():
    """{"cuda": why not or None, "triton": why not or None}: whether mamba-ssm's kernel and the
    Triton scan can run on CUDA tensors in this process (benchmarks/gpu_check.py lists them)."""
    return {"cuda": _mamba_ssm_kernel()[1], "triton": _triton_scan()[1]}


def _triton_runs_on(device_type):
    if device_type == "cuda":
        return True
    fn, _ = _triton_scan()
    return fn is not None and sys.modules[fn.__module__].INTERPRETED


def _auto_backend(device_type, dtype=torch.float32, streaming=False):
    """(backend, why) that "auto" picks for tensors of this device type and dtype; ``streaming``:
    initial_state or lengths are given (mamba-ssm's kernel takes neither)."""
    if device_type != "cuda":
        return "torch", f"tensors on {device_type}"
    if dtype == torch.float64:
        return "torch", "float64 tensors (the CUDA backends compute in float32)"
    kernel, kernel_why = _mamba_ssm_kernel()
    if kernel is not None and not streaming:
        return "cuda", "mamba-ssm's selective_scan_cuda imports"
    why = ("initial_state/lengths given (mamba-ssm's kernel takes neither)" if kernel is not None
           else f"mamba-ssm's kernel unavailable: {kernel_why}")
    triton_fn, triton_why = _triton_scan()
    if triton_fn is not None:
        return "triton", why
    return "torch", f"{why}; Triton unavailable: {triton_why}"


def _check_forced(choice, device_type, dtype, streaming, source):
    """Raises a ValueError saying why the forced backend cannot run here."""
    fix = ("use backend='torch' or 'auto'" if source == "the backend argument"
           else "set MAMBA_SCAN_BACKEND=auto or torch (or unset it)")
    if choice == "cuda":
        if device_type != "cuda":
            raise ValueError(f"selective_scan backend 'cuda' (from {source}) needs CUDA tensors, "
                             f"got tensors on {device_type}; {fix}")
        kernel, why = _mamba_ssm_kernel()
        if kernel is None:
            raise ValueError(f"selective_scan backend 'cuda' (from {source}) cannot run: {why}. "
                             f"Install it (requirements-cuda.txt), or {fix}")
        if streaming:
            raise ValueError(f"selective_scan backend 'cuda' (from {source}): mamba-ssm's kernel "
                             f"takes no initial_state or lengths; {fix}")
    if choice == "triton":
        fn, why = _triton_scan()
        if fn is None:
            raise ValueError(f"selective_scan backend 'triton' (from {source}) cannot run: {why}; "
                             f"{fix}")
        if not _triton_runs_on(device_type):
            raise ValueError(f"selective_scan backend 'triton' (from {source}) needs CUDA tensors, "
                             f"got tensors on {device_type}; {fix}")
    if choice in ("cuda", "triton") and dtype == torch.float64:
        raise ValueError(f"selective_scan backend {choice!r} (from {source}) computes in float32 "
                         f"and takes no float64 tensors; {fix}")


def _requested(backend):
    """(lower-case choice, where it came from)."""
    if backend is not None:
        choice, source = backend, "the backend argument"
    else:
        choice, source = os.environ.get("MAMBA_SCAN_BACKEND") or "auto", "MAMBA_SCAN_BACKEND"
    choice = choice.lower()
    if choice not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {choice!r} (from {source}); "
                         f"choose one of {BACKENDS}")
    return choice, source


def _resolve(backend, device_type, dtype, streaming=False):
    choice, source = _requested(backend)
    if choice == "auto":
        return _auto_backend(device_type, dtype, streaming)
    _check_forced(choice, device_type, dtype, streaming, source)
    return choice, f"forced by {source}"


def resolve_backend(backend, u, streaming=False):
    """The backend that ``selective_scan`` will use for tensor ``u`` ("cuda", "triton", "torch" or
    "ref"); ValueError when a forced backend cannot run on it."""
    return _resolve(backend, u.device.type, u.dtype, streaming)[0]


def describe_backend(device, backend=None, precision="fp32"):
    """One line naming the backend the Mamba layers' scans will use on ``device`` (e.g. "cuda:0")
    for training in ``precision`` (fp32, bf16, fp16), and why; the same decision as
    ``selective_scan`` makes per call. ValueError when a forced backend cannot run there."""
    device_type = torch.device(device).type
    choice, why = _resolve(backend, device_type, torch.float32)
    # the torch backend trains on the compiled kernels wherever they can load (scan_cpu), in
    # float32: under bf16/fp16 autocast the activations it gets are not
    compiled = choice == "torch" and device_type == "cpu" and scan_cpu.available()
    if compiled and precision not in (None, "fp32"):
        compiled, why = False, f"{why}; the compiled kernels take float32, this run is {precision}"
    label = LABELS["compiled" if compiled else choice]
    return f"Mamba selective scan: {label} (backend {choice!r}: {why})"


_LOGGED = set()


def _log_first_use(choice, why, device_type, implementation=None):
    """One log line per process and (implementation, device type), at the first scan that uses
    it; implementation: "compiled" when the torch backend ran the compiled CPU kernels."""
    key = (implementation or choice, device_type)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("Mamba selective scan: using the %s (backend %r) on %s: %s", LABELS[key[0]],
                    choice, device_type, why)


def _ran_compiled(u):
    """After a torch-backend scan of u: whether it ran the compiled CPU kernels (they are used
    for every CPU float32/float64 scan once loaded, and loaded by the first one that uses them)."""
    return (u.device.type == "cpu" and u.dtype in (torch.float32, torch.float64)
            and scan_cpu.loaded())


def _torch_backend_on_cpu(x):
    """(True, why) when scans of activations like x run the torch backend (auto, or forced) on
    CPU float32 / float64: the case the compiled CPU kernels serve; else (False, None)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False, None
    choice, why = _resolve(None, "cpu", x.dtype)
    return choice == "torch", why


def compiled_cpu_inference(x):
    """Whether the scans of activations like x run the compiled CPU kernels now: the torch
    backend on CPU (_torch_backend_on_cpu) and the kernels loaded (scan_cpu.loaded). Mamba
    layers then take the kernels' fused inference paths (conv, both BiMamba directions); logs
    the backend's first use as selective_scan does."""
    if not scan_cpu.loaded():
        return False
    torch_on_cpu, why = _torch_backend_on_cpu(x)
    if torch_on_cpu:
        _log_first_use("torch", why, "cpu", "compiled")
    return torch_on_cpu


def anticipate_cpu_scans(x, state_updates):
    """Before a run of scans on activations like x with state_updates in all (batch * frames *
    channels * d_state, summed over the scans): with the torch backend on CPU, lets the compiled
    kernels load now if that work alone is worth it (scan_cpu.anticipate)."""
    if _torch_backend_on_cpu(x)[0]:
        scan_cpu.anticipate(state_updates)


def load_cpu_kernels(x):
    """Loads the compiled CPU kernels now (when available) if scans of activations like x run
    the torch backend on CPU: for callers whose scans are latency-bound and never count towards
    the lazy loading, such as a live stream (scan_cpu.usable_for's ``continuing``)."""
    anticipate_cpu_scans(x, scan_cpu.LOAD_AFTER)


def _common_dtype(*tensors):
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _mamba_ssm_call(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """mamba-ssm's kernel wants u, delta, B, C, z in one dtype (float32, fp16 or bf16; under
    autocast they can differ), A, D, delta_bias float32."""
    dtype = _common_dtype(u, delta, B, C, z)
    same = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    f32 = (lambda t: None if t is None else t.float())  # noqa: E731
    fn = _mamba_ssm_kernel()[0]
    return fn(same(u), same(delta), A.float(), same(B), same(C), f32(D), same(z), f32(delta_bias),
              delta_softplus, return_last_state)


def _by_group(scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
              initial_state, lengths):
    """Calls a scan that takes ungrouped B, C once per channel group of grouped (batch, G,
    d_state, L) B, C (the channels of group g are the g-th of G equal slices of d_inner)."""
    if B.dim() == 3:
        return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                    initial_state, lengths)
    groups = B.shape[1]
    split = (lambda t: [None] * groups if t is None else t.chunk(groups, dim=1))  # noqa: E731
    by_channel = [split(t) for t in (u, delta, z, initial_state)]
    params = [[None] * groups if t is None else t.chunk(groups, dim=0) for t in (A, D, delta_bias)]
    results = [scan(u_g, dt_g, params[0][g], B[:, g], C[:, g], params[1][g], z_g, params[2][g],
                    delta_softplus, return_last_state, h0_g, lengths)
               for g, (u_g, dt_g, z_g, h0_g) in enumerate(zip(*by_channel))]
    if not return_last_state:
        return torch.cat(results, dim=1)
    return tuple(torch.cat(parts, dim=1) for parts in zip(*results))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend=None, initial_state=None, lengths=None):
    """mamba-ssm's ``selective_scan_fn``: u, delta, z (batch, d_inner, L); A (d_inner, d_state);
    B, C (batch, d_state, L), or (batch, G, d_state, L) shared by G equal groups of channels (as
    mamba-ssm's); D, delta_bias (d_inner,). Also initial_state (batch, d_inner,
    d_state) to continue a sequence, and lengths (batch,): frames at or past a sequence's length
    leave its state unchanged and give zero outputs.

    Returns out (batch, d_inner, L) in u's dtype (delta's for the CUDA kernels), and with
    ``return_last_state`` also the final state (batch, d_inner, d_state) (float32, float64 for
    float64 inputs; no gradient flows through it, as in mamba-ssm, on every backend).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths)
    streaming = initial_state is not None or lengths is not None
    choice, why = _resolve(backend, u.device.type, u.dtype, streaming)
    if choice != "torch":
        _log_first_use(choice, why, u.device.type)
    if choice == "cuda":
        return _mamba_ssm_call(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                               return_last_state)
    if choice == "triton":
        from .scan_triton import groups_fit, selective_scan_triton  # _resolve imported it

        args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                initial_state, lengths)
        if B.dim() == 4 and groups_fit(u.shape[1], B.shape[1]):
            return selective_scan_triton(*args)  # grouped B, C in one launch
        return _by_group(selective_scan_triton, *args)
    scan = selective_scan_ref if choice == "ref" else selective_scan_torch
    if lengths is None:
        result = scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                      initial_state)
    else:
        delta, valid = _mask_past_lengths(delta, delta_bias, delta_softplus, lengths)
        out, last = scan(u, delta, A, B, C, D, z, None, False, True, initial_state)
        out = out * valid
        result = (out, last) if return_last_state else out
    if choice == "torch":  # which implementation ran is known once it has run
        _log_first_use(choice, why, u.device.type, "compiled" if _ran_compiled(u) else None)
    if return_last_state and choice == "ref":
        result = (result[0], result[1].detach())
    return result
