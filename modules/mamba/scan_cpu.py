"""Optional compiled CPU kernel for the forward recurrence of the selective scan (numba).

With numba installed (wheels for Linux and macOS), the fast scan's forward runs each time block
as: decays exp(dt A) from one vectorised torch exp2, then ONE compiled loop, parallel over
channels on PyTorch's thread count, that updates each channel's state and reads it out frame by
frame,

    h[b, d, :] = dA[t, b, d, :] * h[b, d, :] + dtu[t, b, d] * B[t, b, g(d), :]
    y[t, b, d] = C[t, b, g(d), :] . h[b, d, :]

with the state in cache, instead of materialising dt*u*B and the states for the whole block and
stepping through them with one torch call per frame. The backward does the same per block: one
loop recomputes the block's states, one loop runs the adjoint recursion backwards in time and
accumulates each channel's gradients in the same pass; dB and dC, sums over channels, are then
batched products.
Without numba, or with MAMBA_SCAN_NUMBA=0 in the environment, the pure-PyTorch scan runs;
MAMBA_SCAN_NUMBA=1 uses the kernels for every scan; unset, see usable_for.
"""

import functools
import importlib.util
import os

import torch

MIN_WORK = 1 << 24  # batch * d_inner * L * d_state of the first scan that loads the kernels
_KERNELS = {}


@functools.lru_cache(maxsize=None)
def _numba_installed():
    return importlib.util.find_spec("numba") is not None


def available():
    """True when the compiled kernels can be used (numba installed, MAMBA_SCAN_NUMBA not 0)."""
    return os.environ.get("MAMBA_SCAN_NUMBA") != "0" and _numba_installed()


def usable_for(u, d_state):
    """Whether the scan of u (batch, d_inner, L) with d_state states runs compiled: CPU float32
    or float64 tensors and available(). Unless MAMBA_SCAN_NUMBA=1, the kernels are first loaded
    by a scan of at least MIN_WORK state updates (then used for every scan): importing numba and
    loading the kernels costs about a second per process (compiling them, the first time, a few
    seconds), more than they save on a few seconds of audio."""
    if u.device.type != "cpu" or u.dtype not in (torch.float32, torch.float64) or not available():
        return False
    if os.environ.get("MAMBA_SCAN_NUMBA") == "1" or _KERNELS:
        return True
    return u.numel() * d_state >= MIN_WORK


def _kernel(name="scan"):
    global prange
    if name not in _KERNELS:
        try:
            import numba
        except ImportError:
            numba = None
        else:
            prange = numba.prange  # read by numba when it compiles the kernels below
        for key, fn in (("scan", _scan_block), ("states", _states_block),
                        ("adjoint", _adjoint_block)):
            # reassoc: the d_state sums may be vectorised (summation order differs from bmm's);
            # parallel: the channel loops (prange) are shared among numba's threads
            _KERNELS[key] = None if numba is None else numba.njit(
                cache=True, boundscheck=False, error_model="numpy", parallel=True,
                fastmath={"reassoc", "contract"})(fn)
    return _KERNELS[name]


# The kernels' channel loop; _kernel makes it numba.prange before compiling them (importing numba
# here would cost every process ~0.2-0.4 s at start-up, see usable_for).
prange = range


def _scan_block(dA, dtu, B, C, h, y, group_size):
    """dA (T, b, d, n) decays; dtu (T, b, d) = dt * u; B, C (T, b, G, n); h (b, d, n) state,
    updated in place; y (T, b, d) <- C . h (before D u and the gate). Channel c reads group
    c // group_size of B and C. Channels in parallel, each a recurrence over time with its
    state in registers; numba vectorises the n loop."""
    steps, batch, d_inner, d_state = dA.shape
    for bc in prange(batch * d_inner):
        b, c = bc // d_inner, bc % d_inner
        g = c // group_size
        for t in range(steps):
            x = dtu[t, b, c]
            acc = x - x  # zero of the state's dtype
            for k in range(d_state):
                state = dA[t, b, c, k] * h[b, c, k] + x * B[t, b, g, k]
                h[b, c, k] = state
                acc += C[t, b, g, k] * state
            y[t, b, c] = acc


def _states_block(dA, dtu, B, C, h0, H, y, group_size):
    """As _scan_block from the entry state h0 (b, d, n), which is left unchanged, also storing
    every state: H (T, b, d, n)."""
    steps, batch, d_inner, d_state = dA.shape
    for bc in prange(batch * d_inner):
        b, c = bc // d_inner, bc % d_inner
        g = c // group_size
        for t in range(steps):
            prev = h0[b, c] if t == 0 else H[t - 1, b, c]
            x = dtu[t, b, c]
            acc = x - x
            for k in range(d_state):
                state = dA[t, b, c, k] * prev[k] + x * B[t, b, g, k]
                H[t, b, c, k] = state
                acc += C[t, b, g, k] * state
            y[t, b, c] = acc


def _adjoint_block(dA, dtu, B, C, h0, H, dy, carry, A, dt, adj_out, ddtu, ddtA, dA_acc,
                   group_size):
    """Backward through one block, last frame first, channels in parallel. dy (T, b, d):
    gradient of C . h (after the gate's derivative); carry (b, d, n): exp(dt A) * dL/dh of the
    frame after the block, updated in place to that of the block's first frame. A (d, n);
    dt (T, b, d). Writes the adjoint g_t = dL/dh_t to adj_out (T, b, d, n) (dB is its
    contraction with dt u over each group's channels: adjoint_block), ddtu (T, b, d) =
    dL/d(dt u), ddtA (T, b, d) = sum_n dL/d(dt A) * A, and adds sum over frames and batch of
    dL/d(dt A) * dt to dA_acc (d, n). g = C dy + carry; q = g * h_{t-1} * dA_t = dL/d(dt_t A);
    carry <- dA_t * g. Every write is to the thread's own channel (dA_acc: batch innermost)."""
    steps, batch, d_inner, d_state = dA.shape
    for c in prange(d_inner):
        g = c // group_size
        for b in range(batch):
            for t in range(steps - 1, -1, -1):
                prev = h0[b, c] if t == 0 else H[t - 1, b, c]
                grad_y = dy[t, b, c]
                x = dtu[t, b, c]
                step = dt[t, b, c]
                acc_u = x - x
                acc_a = x - x
                for k in range(d_state):
                    adj = C[t, b, g, k] * grad_y + carry[b, c, k]
                    adj_out[t, b, c, k] = adj
                    acc_u += B[t, b, g, k] * adj
                    q = adj * prev[k] * dA[t, b, c, k]
                    acc_a += q * A[c, k]
                    dA_acc[c, k] += q * step
                    carry[b, c, k] = dA[t, b, c, k] * adj
                ddtu[t, b, c] = acc_u
                ddtA[t, b, c] = acc_a


def _run(name, *args):
    """Runs a compiled kernel on as many threads as PyTorch uses (torch.set_num_threads);
    tensors go in as numpy views (CPU, contiguous)."""
    kernel = _kernel(name)
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    kernel(*(a.numpy() if isinstance(a, torch.Tensor) else a for a in args))


def scan_block(dA, dtu, B, C, h, y, group_size):
    """The forward of one block (see _scan_block for the shapes); returns y."""
    _run("scan", dA, dtu, B, C, h, y, group_size)
    return y


def states_block(dA, dtu, B, C, h0, H, y, group_size):
    """States of one block from its entry state (see _states_block); returns y."""
    _run("states", dA, dtu, B, C, h0, H, y, group_size)
    return y


def adjoint_block(dA, dtu, B, C, h0, H, dy, carry, A, dt, dB, dC, ddtu, ddtA, dA_acc,
                  group_size, adj):
    """The backward of one block (see _adjoint_block; adj: a (T, b, d, n) work buffer). Writes
    dB, dC (T, b, G, n): sums over each group's channels of dt u * g_t and dy * h_t, as
    batched products."""
    _run("adjoint", dA, dtu, B, C, h0, H, dy, carry, A, dt, adj, ddtu, ddtA, dA_acc, group_size)
    T, batch, d_inner, d_state = dA.shape
    G = B.shape[2]
    rows = T * batch * G
    for grads, x, M in ((dB, dtu, adj), (dC, dy, H)):
        torch.bmm(x.reshape(rows, 1, group_size), M.view(rows, group_size, d_state),
                  out=grads.view(rows, 1, d_state))
