"""Optional compiled CPU kernels for the selective scan (numba): the whole scan in two kernels.

With numba installed (wheels for Linux and macOS), the scan's forward is ONE compiled pass per
channel over time, channels in parallel on PyTorch's thread count, on the (batch, L, c) layout of
Mamba's activations (no transposes, no buffer of decays):

    h[b, c, :] = exp(dt[b, t, c] A[c, :]) * h[b, c, :] + dt[b, t, c] u[b, t, c] B[b, t, g(c), :]
    y[b, t, c] = (C[b, t, g(c), :] . h[b, c, :] + D[c] u[b, t, c]) * gate[b, t, c]

With gradients it also keeps the state entering every `every` frames; the backward kernel
recomputes each block's states from it and runs the adjoint recursion back through the block,
accumulating every gradient in the same pass. Step sizes (softplus) and the gate stay in torch.
Without numba, or with MAMBA_SCAN_NUMBA=0 in the environment, the pure-PyTorch scan runs;
MAMBA_SCAN_NUMBA=1 uses the kernels for every scan; unset, see usable_for.
"""

import functools
import importlib.util
import os

import numpy as np
import torch

MIN_WORK = 1 << 24  # batch * d_inner * L * d_state of the first scan that loads the kernels
_KERNELS = {}


@functools.lru_cache(maxsize=None)
def _numba_installed():
    return importlib.util.find_spec("numba") is not None


def available():
    """True when the compiled kernels can be used (numba installed, MAMBA_SCAN_NUMBA not 0)."""
    return os.environ.get("MAMBA_SCAN_NUMBA") != "0" and _numba_installed()


def usable_for(u, d_state, training=False):
    """Whether the scan of u (batch, d_inner, L) with d_state states runs compiled: CPU float32
    or float64 tensors and available(). Importing numba and loading the kernels costs about a
    second per process (compiling them, the first time, a few seconds): more than they save on
    a few seconds of audio, nothing against a training run. So unless MAMBA_SCAN_NUMBA=1, the
    kernels are first loaded by a scan with gradients (training) or by one of at least MIN_WORK
    state updates, and then used for every scan."""
    if u.device.type != "cpu" or u.dtype not in (torch.float32, torch.float64) or not available():
        return False
    if os.environ.get("MAMBA_SCAN_NUMBA") == "1" or _KERNELS or training:
        return True
    return u.numel() * d_state >= MIN_WORK


def _kernel(name):
    global prange, _decays
    if name not in _KERNELS:
        try:
            import numba
        except ImportError:
            numba = None
        else:
            prange = numba.prange  # read by numba when it compiles the kernels below
            _decays = numba.njit(inline="always", boundscheck=False, error_model="numpy",
                                 fastmath={"reassoc", "contract"})(_decays_impl)
        for key, fn in (("forward", _fused_forward), ("backward", _fused_backward)):
            # reassoc: the d_state sums may be vectorised (summation order differs from bmm's);
            # parallel: the channel loops (prange) are shared among numba's threads
            _KERNELS[key] = None if numba is None else numba.njit(
                cache=True, boundscheck=False, error_model="numpy", parallel=True,
                fastmath={"reassoc", "contract"})(fn)
    return _KERNELS[name]


# The kernels' channel loop; _kernel makes it numba.prange before compiling them (importing numba
# here would cost every process ~0.2-0.4 s at start-up, see usable_for).
prange = range


CHANNEL_BLOCK = 32  # channels per parallel job of the forward kernel
TIME_TILE = 64  # frames per channel before the job moves to its next channel
# 2^f for f in [-1/2, 1/2]: degree-6 coefficients fitted for this project (least squares weighted
# towards the largest relative error): max relative error 2e-9 in exact arithmetic, ~1e-7 (one
# float32 ulp) evaluated in float32
EXP2_POLY = (1.0, 6.93147206e-01, 2.40226469e-01, 5.55032786e-02, 9.61848864e-03,
             1.34002623e-03, 1.53466339e-04)
P0, P1, P2, P3, P4, P5, P6 = EXP2_POLY


def _decays_impl(step, A2, c, decay, bits, exact):
    """decay[k] * scale[k] = 2^(step A2[c, k]) (scale: the float32 view of bits). numba has no
    vectorised exp (llvmlite has no vector math library): float32 evaluates EXP2_POLY on the
    fraction and writes the integer part into the exponent bits, one vectorised loop over the
    states; exact=True (float64) calls np.exp2 and sets scale to 1."""
    if exact:
        for k in range(decay.shape[0]):
            decay[k] = np.exp2(step * A2[c, k])
            bits[k] = np.int32(127) << np.int32(23)
        return
    for k in range(decay.shape[0]):  # float32 constants: float64 ones would promote
        v = min(max(step * A2[c, k], np.float32(-126.0)), np.float32(126.0))
        r = np.floor(v + np.float32(0.5))
        f = v - r
        p = np.float32(P6) * f + np.float32(P5)
        p = p * f + np.float32(P4)
        p = p * f + np.float32(P3)
        p = p * f + np.float32(P2)
        p = p * f + np.float32(P1)
        decay[k] = p * f + np.float32(P0)
        bits[k] = (np.int32(r) + np.int32(127)) << np.int32(23)


def _fused_forward(dt, u, gate, B, C, A2, D, h, y, ckpt, every, group_size, has_gate, exact):
    """The forward of a scan, one pass over time per channel, channels in parallel:

        h = 2^(dt A2) * h + dt u B;   y = (C . h + D u) * gate (if has_gate)

    dt (step sizes after bias and softplus), u, gate, y: (batch, L, c), the layout of Mamba's
    activations (no transposes); B, C (batch, L, G, n); A2 = A log2(e) (c, n); D (c,) (zeros
    without D); h (batch, c, n): entry state, updated in place to the last state. every > 0:
    the state entering frame j * every is stored in ckpt[:, j] (batch, ceil(L / every), c, n)
    for the backward. Each job takes CHANNEL_BLOCK channels of one sequence through time in
    tiles of TIME_TILE frames: walking one channel through all of a long sequence touches a
    new page per frame in each (batch, L, c) array. The decays are computed per step
    (_decays), not read from a buffer written by torch: several MB per call, which made a
    kernel reading them memory-bound."""
    batch, length, channels = dt.shape
    d_state = A2.shape[1]
    n_blocks = -(-channels // CHANNEL_BLOCK)
    for job in prange(batch * n_blocks):
        b = job // n_blocks
        first = (job % n_blocks) * CHANNEL_BLOCK
        last = min(channels, first + CHANNEL_BLOCK)
        states = np.empty((last - first, d_state), h.dtype)
        state = np.empty(d_state, h.dtype)  # a fresh array: known not to overlap the others
        decay = np.empty(d_state, h.dtype)
        bits = np.empty(d_state, np.int32)
        scale = bits.view(np.float32)
        for c in range(first, last):
            for k in range(d_state):
                states[c - first, k] = h[b, c, k]
        for t0 in range(0, length, TIME_TILE):
            for c in range(first, last):
                g = c // group_size
                d_c = D[c]
                state[:] = states[c - first]
                for t in range(t0, min(length, t0 + TIME_TILE)):
                    if every > 0 and t % every == 0:
                        for k in range(d_state):
                            ckpt[b, t // every, c, k] = state[k]
                    step = dt[b, t, c]
                    x = step * u[b, t, c]
                    _decays(step, A2, c, decay, bits, exact)
                    acc = x - x
                    for k in range(d_state):
                        s = decay[k] * scale[k] * state[k] + x * B[b, t, g, k]
                        state[k] = s
                        acc += C[b, t, g, k] * s
                    out = acc + d_c * u[b, t, c]
                    y[b, t, c] = out * gate[b, t, c] if has_gate else out
                states[c - first] = state
        for c in range(first, last):
            for k in range(d_state):
                h[b, c, k] = states[c - first, k]


def _fused_backward(dt, u, dy, B, C, A2, A, D, ckpt, every, group_size, parts, exact,
                    ypre, ddt, du, dA, dD, dB, dC, dh0):
    """Backward of _fused_forward. dy (batch, L, c): gradient of y before the gate (dL/dy
    times the gate). Blocks of `every` frames from the last; in each, per channel, the states
    are recomputed from the block's checkpoint, then the adjoint g_t = dL/dh_t = C_t dy_t +
    exp(dt_{t+1} A) g_{t+1} runs back through it. Writes (all preallocated):
    ypre (batch, L, c) = C . h + D u (for the gate's gradient); ddt = dL/d(dt) and du
    (batch, L, c); dA (batch, c, n) and dD (batch, c): per sequence, summed by the caller;
    dB, dC (parts, batch, L, G, n): each part of a group's channels sums its channels'
    dt u g_t and dy_t h_t (in a small per-block tile), the caller sums the parts (a fixed
    split: results do not depend on the thread count); dh0 (batch, c, n) = dL/dh of the
    entry state. Jobs (sequence, group, part) run in parallel; every write is the job's own."""
    batch, length, channels = dt.shape
    d_state = A2.shape[1]
    groups = channels // group_size
    per_part = group_size // parts
    n_blocks = ckpt.shape[1]
    for job in prange(batch * groups * parts):
        b = job // (groups * parts)
        g = (job // parts) % groups
        part = job % parts
        first = g * group_size + part * per_part
        H = np.empty((every + 1, d_state), dt.dtype)
        decays = np.empty((every, d_state), dt.dtype)
        bits = np.empty((every, d_state), np.int32)
        scales = bits.view(np.float32)
        adj = np.empty(d_state, dt.dtype)
        cj = np.empty(d_state, dt.dtype)
        ga = np.empty(d_state, dt.dtype)
        tile_b = np.empty((every, d_state), dt.dtype)
        tile_c = np.empty((every, d_state), dt.dtype)
        carry = np.zeros((per_part, d_state), dt.dtype)
        grad_a = np.zeros((per_part, d_state), dt.dtype)
        grad_d = np.zeros(per_part, dt.dtype)
        for blk in range(n_blocks - 1, -1, -1):
            t0 = blk * every
            steps = min(length - t0, every)
            tile_b[:] = 0.0
            tile_c[:] = 0.0
            for j in range(per_part):
                c = first + j
                d_c = D[c]
                for k in range(d_state):
                    H[0, k] = ckpt[b, blk, c, k]
                a_c = A[c]
                cj[:] = carry[j]  # fresh arrays (known not to overlap the others) in the loops
                ga[:] = grad_a[j]
                for i in range(steps):
                    t = t0 + i
                    step = dt[b, t, c]
                    x = step * u[b, t, c]
                    dec, prev, cur, b_t, c_t = decays[i], H[i], H[i + 1], B[b, t, g], C[b, t, g]
                    _decays(step, A2, c, dec, bits[i], exact)
                    scale = scales[i]
                    acc = x - x
                    for k in range(d_state):
                        dec[k] *= scale[k]
                        s = dec[k] * prev[k] + x * b_t[k]
                        cur[k] = s
                        acc += c_t[k] * s
                    ypre[b, t, c] = acc + d_c * u[b, t, c]
                for i in range(steps - 1, -1, -1):
                    t = t0 + i
                    step = dt[b, t, c]
                    u_t = u[b, t, c]
                    x = step * u_t
                    gy = dy[b, t, c]
                    dec, prev, cur, b_t, c_t = decays[i], H[i], H[i + 1], B[b, t, g], C[b, t, g]
                    acc_u = x - x
                    acc_a = x - x
                    for k in range(d_state):
                        a = c_t[k] * gy + cj[k]
                        adj[k] = a
                        acc_u += b_t[k] * a
                        q = a * prev[k] * dec[k]  # dL/d(dt A) at (t, k)
                        acc_a += q * a_c[k]
                        ga[k] += q * step
                        cj[k] = dec[k] * a
                    tb, tc = tile_b[i], tile_c[i]
                    for k in range(d_state):
                        tb[k] += adj[k] * x
                        tc[k] += gy * cur[k]
                    ddt[b, t, c] = acc_u * u_t + acc_a
                    du[b, t, c] = acc_u * step + gy * d_c
                    grad_d[j] += gy * u_t
                carry[j] = cj
                grad_a[j] = ga
            for i in range(steps):
                for k in range(d_state):
                    dB[part, b, t0 + i, g, k] = tile_b[i, k]
                    dC[part, b, t0 + i, g, k] = tile_c[i, k]
        for j in range(per_part):
            for k in range(d_state):
                dh0[b, first + j, k] = carry[j, k]
                dA[b, first + j, k] = grad_a[j, k]
            dD[b, first + j] = grad_d[j]


_decays = _decays_impl  # compiled by _kernel, like prange


def _run(name, *args):
    """Runs a compiled kernel on as many threads as PyTorch uses (torch.set_num_threads);
    tensors go in as numpy views (CPU, contiguous)."""
    kernel = _kernel(name)
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    kernel(*(a.numpy() if isinstance(a, torch.Tensor) else a for a in args))


def fused_forward(dt, u, gate, B, C, A2, D, h, group_size, every=0):
    """See _fused_forward: dt, u, gate (or None) (batch, L, c); B, C (batch, L, G, n); A2 (c, n);
    D (c,) or None; h (batch, c, n) advanced in place; all contiguous, one dtype. every > 0:
    also returns the checkpoints (batch, ceil(L / every), c, n). Returns y (batch, L, c)[, ckpt]."""
    batch, length, channels = u.shape
    y = torch.empty_like(u)
    ckpt = u.new_empty(batch, -(-length // every) if every else 0, channels, h.shape[2])
    D = u.new_zeros(channels) if D is None else D
    _run("forward", dt, u, y if gate is None else gate, B, C, A2, D, h, y, ckpt, every,
         group_size, gate is not None, u.dtype != torch.float32)
    return (y, ckpt) if every else y


def backward_parts(group_size):
    """The fixed number of parts each group's channels are split into by the backward."""
    return next(p for p in (4, 2, 1) if group_size % p == 0)


def fused_backward(dt, u, dy, B, C, A2, A, D, ckpt, every, group_size):
    """See _fused_backward. Returns ypre, ddt, du (batch, L, c); dA (c, n); dD (c,);
    dB, dC (batch, L, G, n); dh0 (batch, c, n)."""
    batch, length, channels = u.shape
    parts = backward_parts(group_size)
    ypre, ddt, du = (torch.empty_like(u) for _ in range(3))
    dA = u.new_empty(batch, *A.shape)
    dD = u.new_empty(batch, channels)
    dB, dC = (u.new_empty(parts, *B.shape) for _ in range(2))
    dh0 = u.new_empty(batch, channels, A.shape[1])
    D = u.new_zeros(channels) if D is None else D
    _run("backward", dt, u, dy, B, C, A2, A, D, ckpt, every, group_size, parts,
         u.dtype != torch.float32, ypre, ddt, du, dA, dD, dB, dC, dh0)
    return ypre, ddt, du, dA.sum(0), dD.sum(0), dB.sum(0), dC.sum(0), dh0
