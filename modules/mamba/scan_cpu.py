"""Optional compiled CPU kernels for the selective scan (numba): the whole scan in two kernels.

With numba installed (wheels for Linux and macOS), the scan's forward is ONE compiled pass over
time per block of CHANNEL_BLOCK channels, the blocks in parallel on PyTorch's thread count, on the
(batch, L, c) layout of Mamba's activations (no transposes, no buffer of decays); the channels of
a block, adjacent in memory, are the vector lanes of the innermost loops:

    dt[b, t, c] = softplus(delta[b, t, c] + bias[c])
    h[b, c, :] = exp(dt[b, t, c] A[c, :]) * h[b, c, :] + dt[b, t, c] u[b, t, c] B[b, t, g(c), :]
    y[b, t, c] = (C[b, t, g(c), :] . h[b, c, :] + D[c] u[b, t, c]) * silu(z[b, t, c])

With gradients it also keeps the state entering every `every` frames; the backward kernel
recomputes each block's states from it and runs the adjoint recursion back through the block,
accumulating every gradient in the same pass. numba has no vectorised exp or log (llvmlite ships
no vector math library): 2^x, softplus and sigmoid are polynomials and a bitcast here. A third
kernel, conv_silu, runs Mamba's causal conv and SiLU at inference. Without numba, or with
MAMBA_SCAN_NUMBA=0 in the environment, the pure-PyTorch scan runs; MAMBA_SCAN_NUMBA=1 uses the
kernels for every scan; unset, see usable_for.
"""

import functools
import importlib.util
import logging
import math
import os
import sys

import numpy as np
import torch

# numba's compiler logs ~500k DEBUG lines per compile: a training run's log file (DEBUG level)
# grew by 100 MB the first time the kernels compiled on a machine
logging.getLogger("numba").setLevel(logging.WARNING)
LOAD_AFTER = 1 << 29  # state updates of pure-PyTorch scans in a process after which kernels load
_KERNELS = {}
_torch_work = 0  # state updates (batch * d_inner * L * d_state) the pure-PyTorch scans have done


@functools.lru_cache(maxsize=None)
def _numba_installed():
    return importlib.util.find_spec("numba") is not None


def _forced():
    """MAMBA_SCAN_NUMBA as True (1 / true / yes / on), False (0 / false / no / off) or None."""
    value = os.environ.get("MAMBA_SCAN_NUMBA", "").strip().lower()
    return {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False}.get(value)


def available():
    """True when the compiled kernels can be used (numba installed, MAMBA_SCAN_NUMBA not 0)."""
    return _forced() is not False and _numba_installed()


def usable_for(u, d_state, training=False, continuing=False):
    """Whether the scan of u (batch, d_inner, L) with d_state states runs compiled: CPU float32
    or float64 tensors and available(). Importing numba and loading the kernels costs about half
    a second per process and ~130 MB (compiling them, the first time on a machine, ~15 s): more
    than they save on one short file (a 10 s utterance scans in less), little against a long
    file or a stream of files. So unless MAMBA_SCAN_NUMBA=1, the kernels are first loaded by a
    scan with gradients (training), or by the scan that brings this process's pure-PyTorch scans
    to LOAD_AFTER state updates in all (about as long as loading takes: pay the rent until it
    reaches the price), and then used for every scan; a caller that knows its scans' total
    work up front may load them earlier (anticipate). Scans that continue a state (continuing:
    the pieces of a live stream) do not count: loading would stall the stream."""
    global _torch_work
    if u.device.type != "cpu" or u.dtype not in (torch.float32, torch.float64) or not available():
        return False
    if loaded() or training:
        return True
    if not continuing:
        _torch_work += u.numel() * d_state
    return _torch_work >= LOAD_AFTER


def anticipate(state_updates):
    """Called before a run of scans (a whole encoder on a long input) with their state updates
    in all: when that alone reaches LOAD_AFTER, the kernels load now instead of after LOAD_AFTER
    updates of slower pure-PyTorch scans."""
    if state_updates >= LOAD_AFTER and available() and not loaded():
        _kernel("forward")


def _kernel(name):
    global prange, _as_float32, _exp2, _softplus, _sigmoid, _channel_block, _forward_steps
    global _backward_block
    if name not in _KERNELS:
        _prefer_512_bit_vectors()
        try:
            import numba
        except ImportError:
            numba = None
        else:
            prange = numba.prange  # read by numba when it compiles the kernels below
            _as_float32 = _bitcast_intrinsic(numba)
            helper = numba.njit(inline="always", boundscheck=False, error_model="numpy",
                                fastmath=FASTMATH)
            _exp2 = helper(_exp2_impl)
            _softplus = helper(_softplus_impl)
            _sigmoid = helper(_sigmoid_impl)
            _channel_block = helper(_channel_block_impl)
            _forward_steps = helper(_forward_steps_impl)
            _backward_block = helper(_backward_block_impl)
        for key, fn in (("forward", _fused_forward), ("backward", _fused_backward),
                        ("conv_silu", _conv_silu)):
            # parallel: the channel blocks (prange) are shared among numba's threads
            _KERNELS[key] = None if numba is None else numba.njit(
                cache=True, boundscheck=False, error_model="numpy", parallel=True,
                fastmath=FASTMATH)(fn)
    return _KERNELS[name]


def _prefer_512_bit_vectors():
    """On CPUs with AVX-512, lets LLVM use 512-bit vectors (its x86 tuning prefers 256 bits,
    for older chips that slow their clock on them): the forward kernel's lanes double, ~15 %
    faster here. numba reads NUMBA_CPU_FEATURES once, when it is imported: only if it is not
    imported yet and the variable is not set (this then applies to all numba code in the
    process; MAMBA_SCAN_AVX512=0 keeps LLVM's default)."""
    if ("numba" in sys.modules or os.environ.get("NUMBA_CPU_FEATURES")
            or os.environ.get("NUMBA_CPU_NAME") or os.environ.get("MAMBA_SCAN_AVX512") == "0"):
        return
    try:
        import llvmlite.binding as llvm
        features = llvm.get_host_cpu_features().flatten()
    except (ImportError, RuntimeError):
        return
    if "+avx512f" in features.split(","):
        os.environ["NUMBA_CPU_FEATURES"] = features + ",-prefer-256-bit"


def _bitcast_intrinsic(numba):
    """An int32 -> float32 bitcast for numba (its scalar code has none; one LLVM instruction)."""
    from llvmlite import ir

    @numba.extending.intrinsic
    def as_float32(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return numba.types.float32(numba.types.int32), codegen
    return as_float32


# The kernels' channel loop; _kernel makes it numba.prange before compiling them (importing numba
# here would cost every process ~0.15 s at start-up, see usable_for).
prange = range

# reassoc: the sums over channels (dB, dC) may be vectorised, their order differs from bmm's
FASTMATH = {"reassoc", "contract"}
CHANNEL_BLOCK = 64  # channels per parallel job: the vector lanes of the kernels' inner loops
CONV_TILE = 16  # frames per parallel job of _conv_silu
# 2^f for f in [-1/2, 1/2]: degree-6 coefficients fitted for this project (least squares weighted
# towards the largest relative error): max relative error 2e-9 in exact arithmetic, ~1e-7 (one
# float32 ulp) evaluated in float32
EXP2_POLY = (1.0, 6.93147206e-01, 2.40226469e-01, 5.55032786e-02, 9.61848864e-03,
             1.34002623e-03, 1.53466339e-04)
P0, P1, P2, P3, P4, P5, P6 = EXP2_POLY
LOG2E = math.log2(math.e)
SOFTPLUS_THRESHOLD = 20.0  # softplus(v) = v above it, as in torch and mamba-ssm's kernel


def _exp2_impl(v, exact):
    """2^v. numba has no vectorised exp (llvmlite ships no vector math library): in float32,
    EXP2_POLY on the fraction times the integer part written into a float's exponent bits, which
    vectorises; exact=True (float64) calls np.exp2."""
    if exact:
        return np.exp2(v)
    v = min(max(v, np.float32(-126.0)), np.float32(126.0))  # float32 constants: float64 ones
    r = np.floor(v + np.float32(0.5))                        # would promote
    f = v - r
    p = np.float32(P6) * f + np.float32(P5)
    p = p * f + np.float32(P4)
    p = p * f + np.float32(P3)
    p = p * f + np.float32(P2)
    p = p * f + np.float32(P1)
    p = p * f + np.float32(P0)
    return p * _as_float32((np.int32(r) + np.int32(127)) << np.int32(23))


def _softplus_impl(v, exact):
    """log(1 + e^v), v above SOFTPLUS_THRESHOLD. float32: max(v, 0) + log1p(e^-|v|), the log1p
    as 2 atanh(s), s = e / (2 + e) <= 1/3, by its series to s^13 (truncation < 1e-8): vectorises,
    unlike a call to log1p; exact=True (float64) calls np.log1p."""
    if exact:
        return v if v > SOFTPLUS_THRESHOLD else np.log1p(np.exp(v))
    e = _exp2(-abs(v) * np.float32(LOG2E), False)
    s = e / (np.float32(2.0) + e)
    s2 = s * s
    p = np.float32(1 / 13) * s2 + np.float32(1 / 11)
    p = p * s2 + np.float32(1 / 9)
    p = p * s2 + np.float32(1 / 7)
    p = p * s2 + np.float32(1 / 5)
    p = p * s2 + np.float32(1 / 3)
    p = p * s2 + np.float32(1.0)
    r = max(v, np.float32(0.0)) + np.float32(2.0) * s * p
    return v if v > np.float32(SOFTPLUS_THRESHOLD) else r


def _sigmoid_impl(v, exact):
    """1 / (1 + e^-v) (exact=True: with np.exp)."""
    if exact:  # float32 constants: exact, and float64 ones would promote float32 code
        return np.float32(1.0) / (np.float32(1.0) + np.exp(-v))
    return np.float32(1.0) / (np.float32(1.0) + _exp2(v * np.float32(-LOG2E), False))


def _forward_steps_impl(delta, bias, u, z, B, C, D, y, ckpt, every, b, g, c0, zc0, width, a2,
                        hs, step, x, acc, frames, reverse, has_gate, softplus, exact):
    """_fused_forward for the channels c0 ... c0 + width - 1 (group g; the gate reads z's
    channels from zc0) of sequence b, its first `frames` frames, in reverse time order if
    `reverse`; later frames get y = 0. hs (n, width) the state, a2 (n, width) A2 transposed;
    step, x, acc: scratch (width,). The inner loops run over the channels (contiguous in
    (batch, L, c)): the vector lanes. Inputs are copied to the scratch arrays once per frame:
    read in the loop over states, they would be reloaded for every state (the compiler cannot
    tell that hs does not overlap them)."""
    d_state = a2.shape[0]
    bias_j, D_j = bias[c0:c0 + width], D[c0:c0 + width]
    for i in range(frames):
        t = frames - 1 - i if reverse else i
        # views of this frame's channels: an offset index (c0 + j) in the loops would not
        # vectorise (numba's negative-index check on it hides the access pattern)
        delta_j, u_j = delta[b, t, c0:c0 + width], u[b, t, c0:c0 + width]
        y_j = y[b, t, c0:c0 + width]
        if every > 0 and t % every == 0:
            ckpt_t = ckpt[b, t // every]
            for k in range(d_state):
                ckpt_k = ckpt_t[k, c0:c0 + width]
                for j in range(width):
                    ckpt_k[j] = hs[k, j]
        for j in range(width):  # separate loops, not branches in one: they vectorise
            step[j] = delta_j[j] + bias_j[j]
        if softplus:
            for j in range(width):
                step[j] = _softplus(step[j], exact)
        for j in range(width):
            x[j] = step[j] * u_j[j]
            acc[j] = D_j[j] * u_j[j]
        for k in range(d_state):
            b_k = B[b, t, g, k]
            c_k = C[b, t, g, k]
            for j in range(width):
                s = _exp2(step[j] * a2[k, j], exact) * hs[k, j] + x[j] * b_k
                hs[k, j] = s
                acc[j] += c_k * s
        if has_gate:
            z_j = z[b, t, zc0:zc0 + width]
            for j in range(width):
                y_j[j] = acc[j] * z_j[j] * _sigmoid(z_j[j], exact)
        else:
            for j in range(width):
                y_j[j] = acc[j]
    for t in range(frames, u.shape[1]):
        y[b, t, c0:c0 + width] = 0


def _channel_block_impl(job, groups, per_group, group_size):
    """Job -> (sequence, group, part, first channel, width): channel blocks never cross groups."""
    b = job // (groups * per_group)
    g = (job // per_group) % groups
    part = job % per_group
    c0 = g * group_size + part * CHANNEL_BLOCK
    return b, g, part, c0, min(CHANNEL_BLOCK, (g + 1) * group_size - c0)


def _fused_forward(delta, bias, u, z, B, C, A2, D, h, y, ckpt, every, group_size, has_gate,
                   softplus, exact, lengths, reverse_from, z_offset):
    """The forward of a scan, one pass over time, blocks of channels in parallel:

        dt = softplus(delta + bias) (or delta + bias);   h = 2^(dt A2) * h + dt u B
        y = (C . h + D u) * silu(z) (without z: C . h + D u)

    delta, u, y: (batch, L, c), the layout of Mamba's activations (no transposes); z (batch, L,
    z_offset + w), w dividing c: channel c is gated by z[..., z_offset + c mod w] (BiMamba's
    directions share one z: in_proj's output, z_offset = d_inner); bias (c,) (zeros without);
    B, C (batch, L, G, n); A2 = A log2(e) (c, n); D (c,) (zeros without D); h (batch, c, n):
    entry state, updated in place to the last state. lengths (batch,): frames at or past a
    sequence's length leave its state unchanged and give y = 0; groups from reverse_from on run
    through each sequence's frames in reverse time order (BiMamba's backward direction, without
    reversed copies). every > 0: the state entering frame j * every is stored in ckpt[:, j]
    (batch, ceil(L / every), n, c) for the backward. Each job takes CHANNEL_BLOCK channels of one
    sequence (of one group) through time; its state (n, CHANNEL_BLOCK) stays in cache and the
    decays are computed per step (_exp2), not read from a buffer."""
    batch, length, channels = u.shape
    d_state = A2.shape[1]
    groups = channels // group_size
    per_group = -(-group_size // CHANNEL_BLOCK)
    z_fold = z.shape[2] - z_offset
    for job in prange(batch * groups * per_group):
        b, g, _, c0, width = _channel_block(job, groups, per_group, group_size)
        zc0 = z_offset + c0 % z_fold
        frames = min(length, lengths[b])
        reverse = g >= reverse_from
        a2 = np.empty((d_state, CHANNEL_BLOCK), h.dtype)
        hs = np.empty((d_state, CHANNEL_BLOCK), h.dtype)
        step = np.empty(CHANNEL_BLOCK, h.dtype)
        x = np.empty(CHANNEL_BLOCK, h.dtype)
        acc = np.empty(CHANNEL_BLOCK, h.dtype)
        for k in range(d_state):
            for j in range(width):
                a2[k, j] = A2[c0 + j, k]
                hs[k, j] = h[b, c0 + j, k]
        if width == CHANNEL_BLOCK:  # a constant trip count for the compiler
            _forward_steps(delta, bias, u, z, B, C, D, y, ckpt, every, b, g, c0, zc0,
                           CHANNEL_BLOCK, a2, hs, step, x, acc, frames, reverse, has_gate,
                           softplus, exact)
        else:
            _forward_steps(delta, bias, u, z, B, C, D, y, ckpt, every, b, g, c0, zc0, width, a2,
                           hs, step, x, acc, frames, reverse, has_gate, softplus, exact)
        for k in range(d_state):
            for j in range(width):
                h[b, c0 + j, k] = hs[k, j]


def _backward_block_impl(inputs, outputs, work, b, g, part, c0, width, t0, steps, has_gate,
                         softplus, exact):
    """_fused_backward for frames t0 ... t0 + steps - 1 of channels c0 ... c0 + width - 1
    (tuples: numba inlines no call of over ~30 arguments). In work: H[0] (n, width) holds the
    state entering t0; adj (n, width) the adjoint entering from t0 + steps; grad_a (n, width),
    grad_d (width,) accumulate; frames (3, every, width): per frame of the block the step size,
    dL/dy before the gate and d(step)/d(delta); scratch (3, width) (see _forward_steps); zero:
    0 in the dtype of the sums."""
    delta, bias, u, dout, z, B, C, D = inputs
    dz, ddelta, du, dB, dC = outputs
    a2, ak, H, dec, adj, grad_a, grad_d, frames, scratch, zero = work
    d_state = a2.shape[0]
    step, dy, dstep = frames[0], frames[1], frames[2]
    x, acc_u, acc_a = scratch[0], scratch[1], scratch[2]
    cs = slice(c0, c0 + width)  # views of the block's channels, as in _forward_steps
    bias_j, D_j = bias[cs], D[cs]
    for i in range(steps):  # recompute the states (H[i + 1] after frame t0 + i) and decays
        t = t0 + i
        u_j = u[b, t, cs]
        delta_j = delta[b, t, cs]
        for j in range(width):  # separate loops, not branches in one: they vectorise
            step[i, j] = delta_j[j] + bias_j[j]
        if softplus:
            for j in range(width):
                dstep[i, j] = _sigmoid(step[i, j], exact)
                step[i, j] = _softplus(step[i, j], exact)
        else:
            for j in range(width):
                dstep[i, j] = 1.0
        for j in range(width):
            x[j] = step[i, j] * u_j[j]
            acc_u[j] = D_j[j] * u_j[j]
        for k in range(d_state):
            b_k = B[b, t, g, k]
            c_k = C[b, t, g, k]
            for j in range(width):
                d = _exp2(step[i, j] * a2[k, j], exact)
                dec[i, k, j] = d
                s = d * H[i, k, j] + x[j] * b_k
                H[i + 1, k, j] = s
                acc_u[j] += c_k * s
        dout_j = dout[b, t, cs]
        if has_gate:  # acc_u: the output before the gate
            z_j, dz_j = z[b, t, cs], dz[b, t, cs]
            for j in range(width):
                zz = z_j[j]
                sg = _sigmoid(zz, exact)
                go = dout_j[j]
                dy[i, j] = go * zz * sg
                dz_j[j] = go * acc_u[j] * sg * (np.float32(1.0) + zz * (np.float32(1.0) - sg))
        else:
            for j in range(width):
                dy[i, j] = dout_j[j]
    for i in range(steps - 1, -1, -1):  # adjoint: adj_t = C_t dy_t + exp(dt_{t+1} A) adj_{t+1}
        t = t0 + i
        u_j = u[b, t, cs]
        for j in range(width):
            x[j] = step[i, j] * u_j[j]
            acc_u[j] = 0.0
            acc_a[j] = 0.0
        for k in range(d_state):
            b_k = B[b, t, g, k]
            c_k = C[b, t, g, k]
            sum_b = zero
            sum_c = zero
            for j in range(width):
                a = c_k * dy[i, j] + adj[k, j]
                acc_u[j] += b_k * a
                q = a * H[i, k, j] * dec[i, k, j]  # dL/d(dt A) at (t, k)
                acc_a[j] += q * ak[k, j]
                grad_a[k, j] += q * step[i, j]
                adj[k, j] = dec[i, k, j] * a
                sum_b += a * x[j]
                sum_c += dy[i, j] * H[i + 1, k, j]
            dB[part, b, t, g, k] = sum_b
            dC[part, b, t, g, k] = sum_c
        ddelta_j, du_j = ddelta[b, t, cs], du[b, t, cs]
        for j in range(width):
            ddelta_j[j] = (acc_u[j] * u_j[j] + acc_a[j]) * dstep[i, j]
            du_j[j] = acc_u[j] * step[i, j] + dy[i, j] * D_j[j]
            grad_d[j] += dy[i, j] * u_j[j]


def _fused_backward(delta, bias, u, dout, z, B, C, A2, A, D, ckpt, every, group_size, has_gate,
                    softplus, exact, dz, ddelta, du, dA, dD, dB, dC, dh0):
    """Backward of _fused_forward. dout (batch, L, c): dL/dy. Per channel block, blocks of
    `every` frames from the last: the states are recomputed from the block's checkpoint, then
    the adjoint runs back through it. Writes (all preallocated): dz (with z), ddelta, du
    (batch, L, c); dA (batch, c, n) and dD (batch, c): per sequence, summed by the caller;
    dB, dC (parts, batch, L, G, n): part p sums the p-th channel block of each group, the
    caller sums the parts (a fixed split: results do not depend on the thread count); dh0
    (batch, c, n) = dL/dh of the entry state. Jobs as in _fused_forward; every write is the
    job's own."""
    batch, length, channels = u.shape
    d_state = A2.shape[1]
    groups = channels // group_size
    per_group = -(-group_size // CHANNEL_BLOCK)
    inputs = (delta, bias, u, dout, z, B, C, D)
    outputs = (dz, ddelta, du, dB, dC)
    for job in prange(batch * groups * per_group):
        b, g, part, c0, width = _channel_block(job, groups, per_group, group_size)
        a2 = np.empty((d_state, CHANNEL_BLOCK), u.dtype)
        ak = np.empty((d_state, CHANNEL_BLOCK), u.dtype)
        H = np.empty((every + 1, d_state, CHANNEL_BLOCK), u.dtype)
        dec = np.empty((every, d_state, CHANNEL_BLOCK), u.dtype)
        adj = np.zeros((d_state, CHANNEL_BLOCK), u.dtype)
        grad_a = np.zeros((d_state, CHANNEL_BLOCK), u.dtype)
        grad_d = np.zeros(CHANNEL_BLOCK, u.dtype)
        frames = np.empty((3, every, CHANNEL_BLOCK), u.dtype)
        scratch = np.empty((3, CHANNEL_BLOCK), u.dtype)
        work = (a2, ak, H, dec, adj, grad_a, grad_d, frames, scratch, np.zeros(1, u.dtype)[0])
        for k in range(d_state):
            for j in range(width):
                a2[k, j] = A2[c0 + j, k]
                ak[k, j] = A[c0 + j, k]
        for blk in range(ckpt.shape[1] - 1, -1, -1):
            t0 = blk * every
            for k in range(d_state):
                for j in range(width):
                    H[0, k, j] = ckpt[b, blk, k, c0 + j]
            steps = min(length - t0, every)
            if width == CHANNEL_BLOCK:  # a constant trip count for the compiler
                _backward_block(inputs, outputs, work, b, g, part, c0, CHANNEL_BLOCK, t0, steps,
                                has_gate, softplus, exact)
            else:
                _backward_block(inputs, outputs, work, b, g, part, c0, width, t0, steps,
                                has_gate, softplus, exact)
        for k in range(d_state):
            for j in range(width):
                dh0[b, c0 + j, k] = adj[k, j]
                dA[b, c0 + j, k] = grad_a[k, j]
        for j in range(width):
            dD[b, c0 + j] = grad_d[j]


def _conv_silu(x, taps, bias, y, exact, lengths, split):
    """y = silu(bias + sum_i taps[i] x[t - k + 1 + i]) (zeros before the start): Mamba's causal
    depthwise conv and its SiLU in one pass, for channels c < split; channels c >= split are
    BiMamba's backward direction, the same conv run over each sequence reversed within its
    length, written in forward time:
    y[t, c] = silu(bias + sum_i taps[i] x[t + k - 1 - i, c - split]) (x = 0 from lengths[b] on).
    x (batch, L, >= split), y (batch, L, c); taps (k, c) (the conv weights transposed); bias (c,)
    (zeros without bias). Jobs of CONV_TILE frames of one sequence, the inner loops over all
    channels: a few operations per element, so loops as long as possible (channel blocks would
    leave the loops' set-up costs dominating)."""
    batch, length, channels = y.shape
    k = taps.shape[0]
    n_tiles = -(-length // CONV_TILE)
    for job in prange(batch * n_tiles):
        b = job // n_tiles
        t0 = (job % n_tiles) * CONV_TILE
        frames = min(length, lengths[b])
        acc = np.empty(channels, y.dtype)
        anti = acc[split:]  # views: an offset index in the loop would not vectorise
        for t in range(t0, min(length, t0 + CONV_TILE)):
            for c in range(channels):
                acc[c] = bias[c]
            for i in range(max(0, k - 1 - t), k):
                for c in range(split):
                    acc[c] += taps[i, c] * x[b, t - k + 1 + i, c]
            for i in range(max(0, t + k - frames), k):
                anti_taps = taps[i, split:]
                for c in range(channels - split):
                    anti[c] += anti_taps[c] * x[b, t + k - 1 - i, c]
            for c in range(channels):
                y[b, t, c] = acc[c] * _sigmoid(acc[c], exact)


# compiled by _kernel, like prange
_as_float32 = None
_exp2, _softplus, _sigmoid = _exp2_impl, _softplus_impl, _sigmoid_impl
_channel_block = _channel_block_impl
_forward_steps, _backward_block = _forward_steps_impl, _backward_block_impl


def _run(name, *args):
    """Runs a compiled kernel on as many threads as PyTorch uses (torch.set_num_threads);
    tensors go in as numpy views (CPU, contiguous)."""
    kernel = _kernel(name)
    import numba

    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    kernel(*(a.numpy() if isinstance(a, torch.Tensor) else a for a in args))
    if torch.get_num_threads() != threads:  # starting numba's OpenMP threads resets PyTorch's
        torch.set_num_threads(threads)


def fused_forward(delta, bias, u, z, B, C, A2, D, h, group_size, softplus, every=0,
                  lengths=None, reverse_from=None, z_offset=0, out=None):
    """See _fused_forward: delta, u (batch, L, c); z (or None) (batch, L, c) or wider with
    z_offset; bias (c,) or None; B, C (batch, L, G, n) (contiguous, or views with any strides:
    their reads are scalar); A2 (c, n); D (c,) or None; h (batch, c, n) advanced in place; the
    others contiguous; one dtype. lengths (batch,) or None (all L); groups from
    reverse_from (default: none) run in reverse time. every > 0 (not with lengths or reversed
    groups): also returns the checkpoints (batch, ceil(L / every), n, c). out: y is written
    there, which may be delta or u (a job reads a frame's inputs before it writes its outputs).
    Returns y (batch, L, c)[, ckpt]."""
    batch, length, channels = u.shape
    groups = channels // group_size
    if every and (lengths is not None or reverse_from is not None):
        raise ValueError("checkpoints for the backward need full-length, forward-time groups")
    y = torch.empty_like(u) if out is None else out
    ckpt = u.new_empty(batch, -(-length // every) if every else 0, h.shape[2], channels)
    _run("forward", delta, _zeros_if_none(bias, u), u, u if z is None else z, B, C, A2,
         _zeros_if_none(D, u), h, y, ckpt, every, group_size, z is not None, softplus,
         u.dtype != torch.float32, _lengths_or_full(lengths, batch, length),
         groups if reverse_from is None else reverse_from, z_offset)
    return (y, ckpt) if every else y


def _lengths_or_full(lengths, batch, length):
    if lengths is None:
        return torch.full((batch,), length, dtype=torch.long)
    return lengths.to(device="cpu", dtype=torch.long).contiguous()


def _zeros_if_none(vector, like):
    return like.new_zeros(like.shape[2]) if vector is None else vector


def backward_parts(group_size):
    """The fixed number of parts (channel blocks) each group's channels are split into."""
    return -(-group_size // CHANNEL_BLOCK)


def fused_backward(delta, bias, u, dout, z, B, C, A2, A, D, ckpt, every, group_size, softplus):
    """See _fused_backward. Returns dz (None without z), ddelta, du (batch, L, c); dA (c, n);
    dD (c,); dB, dC (batch, L, G, n); dh0 (batch, c, n)."""
    batch, length, channels = u.shape
    parts = backward_parts(group_size)
    dz = None if z is None else torch.empty_like(u)
    ddelta, du = torch.empty_like(u), torch.empty_like(u)
    dA = u.new_empty(batch, *A.shape)
    dD = u.new_empty(batch, channels)
    dB, dC = (u.new_empty(parts, *B.shape) for _ in range(2))
    dh0 = u.new_empty(batch, channels, A.shape[1])
    _run("backward", delta, _zeros_if_none(bias, u), u, dout, u if z is None else z, B, C, A2, A,
         _zeros_if_none(D, u), ckpt, every, group_size, z is not None, softplus,
         u.dtype != torch.float32, ddelta if dz is None else dz, ddelta, du, dA, dD, dB, dC, dh0)
    return dz, ddelta, du, dA.sum(0), dD.sum(0), dB.sum(0), dC.sum(0), dh0


def loaded():
    """True when the kernels are loaded in this process (or MAMBA_SCAN_NUMBA=1): the scans will
    run compiled, and so may the steps around them (conv_silu)."""
    return available() and (bool(_KERNELS) or _forced() is True)


def conv_silu(x, weight, bias, lengths=None, split=None):
    """See _conv_silu: x (batch, L, >= split) CPU float32 / float64; weight (c, k); bias (c,)
    or None; channels from split on (default: none) are anti-causal (BiMamba's backward
    direction, reading x[..., c - split]) up to lengths (batch,) (default: all L). No gradients.
    Returns y (batch, L, c)."""
    x = x.contiguous()
    channels = weight.shape[0]
    y = x.new_empty(x.shape[0], x.shape[1], channels)
    _run("conv_silu", x, weight.to(x.dtype).t().contiguous(),
         _zeros_if_none(bias, y).to(x.dtype).contiguous(), y, x.dtype != torch.float32,
         _lengths_or_full(lengths, x.shape[0], x.shape[1]), channels if split is None else split)
    return y
