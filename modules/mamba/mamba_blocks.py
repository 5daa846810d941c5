"""Mamba (one direction) and BiMamba (bidirectional "v2") mixers, with padding and recurrent caches.

Parameter names, shapes and initialisation follow mamba-ssm's ``Mamba`` and the official ConMamba
bidirectional block, so their checkpoints load with ``strict=True``. Differences from the official
code, by design: padded frames never influence valid ones (the backward direction starts at each
sequence's true end) and outputs at padded frames are zero.
"""

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import scan_cpu
from .scan import LOG2E, compiled_cpu_inference, selective_scan, state_dtype


class MambaCache:
    """Recurrent state of one ``Mamba`` block.

    conv_state: (batch, d_inner, d_conv), the last d_conv inputs of the depthwise conv, newest last.
    ssm_state: (batch, d_inner, d_state), float32 (float64 for float64 modules).
    """

    def __init__(self, conv_state, ssm_state):
        self.conv_state = conv_state
        self.ssm_state = ssm_state

    def index_select(self, index):
        """New cache with the batch entries ``index`` (beam search reordering)."""
        return MambaCache(self.conv_state.index_select(0, index),
                          self.ssm_state.index_select(0, index))

    def clone(self):
        return MambaCache(self.conv_state.clone(), self.ssm_state.clone())

    def __repr__(self):
        return (f"MambaCache(conv_state={tuple(self.conv_state.shape)}, "
                f"ssm_state={tuple(self.ssm_state.shape)}, dtype={self.ssm_state.dtype})")


def _padding(x, pad_mask, lengths):
    """(pad_mask, lengths) of x (B, L, ...) from either one (lengths (B,) given with a pad_mask
    are the caller's valid_lengths of it); (None, None) without padding."""
    if pad_mask is not None:
        return pad_mask, (_lengths(pad_mask, x) if lengths is None else lengths)
    if lengths is None:
        return None, None
    if lengths.shape != x.shape[:1] or lengths.is_floating_point():
        raise ValueError(f"lengths must be an integer tensor of shape (batch,) = "
                         f"({x.shape[0]},) (valid frames per sequence), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    lengths = lengths.to(device=x.device, dtype=torch.long)
    return torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None], lengths


_optimizer_steps = 0  # optimizer steps taken in this process (any optimizer)


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


# Fused optimizers update parameters without bumping their version counters, so derived weights
# (BiMamba._both_directions_weights) are also keyed on the steps taken.
register_optimizer_step_post_hook(_count_optimizer_step)


def _lengths(pad_mask, x):
    """pad_mask (B, L) bool, True at right padding -> lengths (B,) long.

    The right-padding check compares tensors, a host sync on CUDA: layer stacks call it once per
    forward through ``valid_lengths`` and hand the lengths to every block."""
    if pad_mask.shape != x.shape[:2] or pad_mask.dtype != torch.bool:
        raise ValueError(
            f"pad_mask must be a bool tensor of shape (batch, L) = {tuple(x.shape[:2])} "
            f"(True at padded frames), got {pad_mask.dtype} {tuple(pad_mask.shape)}"
        )
    lengths = (~pad_mask).sum(1)
    steps = torch.arange(x.shape[1], device=x.device)
    if not torch.equal(pad_mask, steps[None, :] >= lengths[:, None]):
        raise ValueError("pad_mask must mark right padding only (True after each sequence's end)")
    return lengths


def valid_lengths(x, pad_mask=None):
    """Valid frames per sequence, (B,) long, of x (B, L, ...): L for every sequence without a
    pad_mask, else counted from the (checked) right-padding mask. Layer stacks call it once per
    forward and pass ``lengths`` to each Mamba / BiMamba."""
    if pad_mask is None:
        return torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    return _lengths(pad_mask, x)


def scan_work_per_frame(module):
    """State updates per frame and sequence of all (Bi)Mamba blocks in module: d_inner * d_state
    per direction."""
    return sum(len(m._directions()) * m.d_inner * m.d_state
               for m in module.modules() if isinstance(m, Mamba))


def _needs_grad(tensors):
    """Whether autograd records ops on any of tensors (an iterable, read only when grad mode is
    on: a module's parameters cost nothing at inference)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _compiled_conv(x, weight, bias):
    """Whether the causal conv + SiLU of x runs as one compiled CPU pass: no gradients needed
    and the scans run compiled (compiled_cpu_inference: the scan decides when to load them)."""
    return not _needs_grad((x, weight, bias)) and compiled_cpu_inference(x)


def _reverse_valid(x, lengths):
    """Reverse each sequence of x (B, L, C) within its valid length; padded frames stay in place."""
    steps = torch.arange(x.shape[1], device=x.device)[None, :]
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return x.gather(1, index[:, :, None].expand_as(x))


class Mamba(nn.Module):
    """Mamba mixer (one direction), mamba-ssm's arguments and parameter names.

    forward(x (B, L, d_model), pad_mask (B, L) bool or None, cache MambaCache or None)
        -> (B, L, d_model)
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True,
                 bias=False, layer_idx=None, device=None, dtype=None):
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_min, self.dt_max, self.dt_init = dt_min, dt_max, dt_init
        self.dt_scale, self.dt_init_floor = dt_scale, dt_init_floor
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d, self.x_proj, self.dt_proj = self._direction_layers(conv_bias, factory)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, **factory))
        self.D = nn.Parameter(torch.empty(self.d_inner, **factory))
        self._add_backward_branch(conv_bias, factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        for p in self._no_weight_decay_params():
            p._no_weight_decay = True
        self.reset_parameters()

    def _direction_layers(self, conv_bias, factory):
        conv = nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner,
                         padding=self.d_conv - 1, bias=conv_bias, **factory)
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        return conv, x_proj, dt_proj

    def _add_backward_branch(self, conv_bias, factory):
        """Hook for BiMamba (registered here so state_dict order matches the official one)."""

    def _no_weight_decay_params(self):
        return [self.A_log, self.D]

    def _directions(self):
        """(conv1d, x_proj, dt_proj, A_log, D) per direction."""
        return [(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)]

    @torch.no_grad()
    def reset_parameters(self):
        """(Re)apply mamba-ssm's initialisation to every parameter of the block."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        for conv, x_proj, dt_proj, A_log, D in self._directions():
            conv.reset_parameters()
            x_proj.reset_parameters()
            std = self.dt_rank ** -0.5 * self.dt_scale
            if self.dt_init == "constant":
                nn.init.constant_(dt_proj.weight, std)
            else:
                nn.init.uniform_(dt_proj.weight, -std, std)
            # dt ~ log-uniform in [dt_min, dt_max]; the bias is softplus^-1(dt).
            log_min, log_max = math.log(self.dt_min), math.log(self.dt_max)
            dt = torch.exp(torch.rand(self.d_inner) * (log_max - log_min) + log_min)
            dt = dt.clamp(min=self.dt_init_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            dt_proj.bias._no_reinit = True
            # S4D-real: A[d, n] = -(n + 1)
            A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32))
                        .expand(self.d_inner, -1))
            D.fill_(1.0)

    # ---- shared pieces -------------------------------------------------------------------------

    def _causal_conv(self, x, weight, bias, cache=None, lengths=None):
        """Depthwise causal conv + SiLU in (B, L, c) layout (the scan reads this layout fastest),
        as shifted multiply-adds: weight (c, d_conv), bias (c,) or None; c is d_inner, or
        2 * d_inner for both BiMamba directions side by side. With a cache the left context comes
        from cache.conv_state, which is then set to the inputs ending at each sequence's last
        valid frame.
        """
        k = self.d_conv
        length = x.shape[1]
        if cache is None and _compiled_conv(x, weight, bias):
            return scan_cpu.conv_silu(x, weight, bias)
        if cache is None:
            history = F.pad(x, (0, 0, k - 1, 0))  # (B, k-1+L, d)
        else:
            past = torch.cat([cache.conv_state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B,k+L,d)
            ends = (torch.full((x.shape[0],), length, device=x.device) if lengths is None
                    else lengths)
            keep = ends[:, None] + torch.arange(k, device=x.device)[None, :]
            index = keep[:, :, None].expand(-1, -1, self.d_inner)
            # the cache carries state, not gradients
            cache.conv_state.copy_(past.detach().gather(1, index).transpose(1, 2))
            history = past[:, 1:]
        # out_t = sum_j weight[:, j] * x_{t-k+1+j}
        y = history[:, :length] * weight[:, 0]
        for j in range(1, k):
            y = y.addcmul_(history[:, j:j + length], weight[:, j])
        if bias is not None:
            y = y.add_(bias)
        # in x's dtype: under autocast the float32 weight would otherwise make the scan's u float32
        # while delta, B, C, z are bf16/fp16 (mamba-ssm's kernel wants one dtype for all)
        return F.silu(y, inplace=True).to(x.dtype)

    def _ssm(self, xz, direction, lengths=None, cache=None):
        """One direction of the mixer before out_proj.

        xz: (B, L, 2*d_inner) output of in_proj (time in this direction's order).
        lengths: (B,) valid lengths (right padding) or None. cache: MambaCache updated in place.
        Returns y (B, L, d_inner) = (scan(conv(x)) + D x) * silu(z).
        """
        conv, x_proj, dt_proj, A_log, D = direction
        x, z = xz.chunk(2, dim=-1)  # (B, L, d_inner) each
        x = self._causal_conv(x, conv.weight[:, 0, :], conv.bias, cache, lengths)
        dt, B, C = x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt @ dt_proj.weight.t()  # (B, L, d_inner); the bias is added in the scan
        ct = state_dtype(x.dtype)
        A = -torch.exp(A_log.to(ct))
        # The scan takes (B, d, L) tensors: transposed views, no copies.
        u, delta, z, B, C = (t.transpose(1, 2) for t in (x, delta, z, B, C))
        # Without a cache, lengths are not needed: the scan is causal and padding comes last.
        # With one, the scan continues from the cached state, frozen past each sequence's length.
        streaming = cache is not None
        y = selective_scan(u, delta, A, B, C, D.to(ct), z=z, delta_bias=dt_proj.bias.to(ct),
                           delta_softplus=True, return_last_state=streaming,
                           initial_state=cache.ssm_state if streaming else None,
                           lengths=lengths if streaming else None)
        if streaming:
            y, last = y
            cache.ssm_state.copy_(last)  # last is non-differentiable
        return y.transpose(1, 2)

    def _check_input(self, x):
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"{type(self).__name__} expects x of shape (batch, L, d_model={self.d_model}), "
                f"got {tuple(x.shape)}"
            )

    # ---- public API ----------------------------------------------------------------------------

    def forward(self, x, pad_mask=None, cache=None, lengths=None):
        """x: (B, L, d_model); pad_mask: (B, L) bool, True at (right) padding; cache: MambaCache;
        lengths: (B,) long, valid_lengths(x, pad_mask) when the caller has it (else derived here).

        With a cache the sequence continues from the cached state, and the cache is updated in
        place to the state after each sequence's last valid frame. Returns (B, L, d_model), zero at
        padded frames.
        """
        self._check_input(x)
        pad_mask, lengths = _padding(x, pad_mask, lengths)
        if pad_mask is not None:  # causal: padding cannot reach valid frames; this also keeps
            x = x.masked_fill(pad_mask[:, :, None], 0.0)  # non-finite junk out of the gradients
        if cache is not None:
            self._check_cache(cache, x.shape[0])
        y = self._ssm(self.in_proj(x), self._directions()[0], lengths, cache)
        return self._output(y, pad_mask)

    def _output(self, y, pad_mask):
        out = self.out_proj(y)
        if pad_mask is not None:
            out = out.masked_fill(pad_mask[:, :, None], 0.0)
        return out

    def allocate_inference_cache(self, batch_size, dtype=None, device=None):
        """Zero state: conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, d_state)."""
        weight = self.in_proj.weight
        device = weight.device if device is None else device
        ssm_dtype = state_dtype(weight.dtype)
        conv_dtype = ssm_dtype if dtype is None else dtype
        return MambaCache(
            torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype),
            torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype),
        )

    def _check_cache(self, cache, batch):
        want_conv = (batch, self.d_inner, self.d_conv)
        want_ssm = (batch, self.d_inner, self.d_state)
        if tuple(cache.conv_state.shape) != want_conv or tuple(cache.ssm_state.shape) != want_ssm:
            raise ValueError(
                f"cache holds conv_state {tuple(cache.conv_state.shape)} and ssm_state "
                f"{tuple(cache.ssm_state.shape)}, expected {want_conv} and {want_ssm}: "
                f"use allocate_inference_cache(batch_size={batch})"
            )

    def step(self, x, cache):
        """One token: x (B, 1, d_model) -> (B, 1, d_model); updates cache in place."""
        self._check_input(x)
        if x.shape[1] != 1:
            raise ValueError(
                f"step() takes one token, x of shape (B, 1, d_model); got {tuple(x.shape)}")
        self._check_cache(cache, x.shape[0])
        x_in, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)  # (B, d_inner)
        conv_state = cache.conv_state
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x_in.detach()  # the cache carries state, not gradients
        # clones: the cache changes in place at the next step, autograd must not see that
        xc = (conv_state[:, :, :-1].clone() * self.conv1d.weight[:, 0, :-1]).sum(-1)
        xc = xc + x_in * self.conv1d.weight[:, 0, -1]
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        xc = F.silu(xc).to(x_in.dtype)
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        st = cache.ssm_state.dtype
        dt = F.softplus(self.dt_proj(dt).to(st))  # (B, d_inner)
        A = -torch.exp(self.A_log.to(st))
        h = (cache.ssm_state.clone() * torch.exp(dt[:, :, None] * A)
             + (dt * xc.to(st))[:, :, None] * B.to(st)[:, None, :])
        cache.ssm_state.copy_(h.detach())
        y = (h * C.to(st)[:, None, :]).sum(-1) + self.D.to(st) * xc.to(st)
        y = y * F.silu(z.to(st))
        return self.out_proj(y.to(x.dtype))[:, None, :]


class BiMamba(Mamba):
    """Bidirectional Mamba "v2" (ConMamba): shared in_proj/out_proj, a second conv1d_b, x_proj_b,
    dt_proj_b, A_b_log, D_b for the backward direction;
    out = out_proj(0.5 * y_fwd + 0.5 * reverse(y_bwd)), where the backward direction runs over each
    sequence reversed within its valid length. ``merge="sum"`` drops the 0.5 (Vision Mamba's v2
    block with its default ``if_devide_out=False``), for checkpoints trained that way.

    forward(x (B, L, d_model), pad_mask (B, L) bool or None) -> (B, L, d_model)
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True,
                 bias=False, layer_idx=None, device=None, dtype=None, bimamba_type="v2",
                 merge="mean"):
        if bimamba_type != "v2":
            raise ValueError(f"BiMamba implements bimamba_type='v2' only, got {bimamba_type!r}")
        if merge not in ("mean", "sum"):
            raise ValueError(f"BiMamba merge must be 'mean' or 'sum', got {merge!r}")
        self.bimamba_type, self.merge = bimamba_type, merge
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init,
                         dt_scale, dt_init_floor, conv_bias, bias, layer_idx, device, dtype)

    def _add_backward_branch(self, conv_bias, factory):
        self.A_b_log = nn.Parameter(torch.empty(self.d_inner, self.d_state, **factory))
        self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._direction_layers(conv_bias, factory)
        self.D_b = nn.Parameter(torch.empty(self.d_inner, **factory))

    def _no_weight_decay_params(self):
        return [self.A_log, self.D, self.A_b_log, self.D_b]

    def _directions(self):
        return super()._directions() + [
            (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)]

    def forward(self, x, pad_mask=None, cache=None, lengths=None):
        """As Mamba.forward, without cache (no recurrent mode)."""
        if cache is not None:
            raise NotImplementedError(
                "BiMamba looks at the whole sequence; it has no recurrent mode")
        self._check_input(x)
        pad_mask, lengths = _padding(x, pad_mask, lengths)
        if pad_mask is None:
            reverse = (lambda t: t.flip(1))  # noqa: E731
        else:
            reverse = (lambda t: _reverse_valid(t, lengths))  # noqa: E731
            # keeps non-finite junk in the padding out of the gradients
            x = x.masked_fill(pad_mask[:, :, None], 0.0)
        xz = self.in_proj(x)
        recorded = _needs_grad(itertools.chain((xz,), self.parameters()))
        if not recorded and compiled_cpu_inference(xz):
            y_f, y_b = self._both_directions_compiled(xz, lengths)
        else:
            y_f, y_b = self._both_directions(xz, reverse)
        if self.merge == "mean":
            y = y_f.add(y_b).mul_(0.5)
        else:
            y = y_f + y_b
        return self._output(y, pad_mask)

    def _both_directions(self, xz, reverse):
        """Both directions' mixer outputs before out_proj, computed as ONE scan.

        xz: (B, L, 2 * d_inner) output of in_proj; reverse(t) reverses (B, L, c) tensors in time
        within each sequence's valid length. Returns y_f, y_b (B, L, d_inner). The directions sit
        side by side as 2 * d_inner channels (conv, scan, gate), B and C as two groups, so the
        scan's per-call, per-block and per-step overheads are paid once (at batch 1 they are a
        large part of a scan). Each direction's conv sees its own sequence (padding is on the
        right in both orders), so this equals two scans.
        """
        d, n = self.d_inner, self.d_state
        forward_dir, backward_dir = self._directions()
        xz_b = reverse(xz)
        x = torch.cat([xz[..., :d], xz_b[..., :d]], dim=-1)  # (B, L, 2d)
        z = torch.cat([xz[..., d:], xz_b[..., d:]], dim=-1)
        convs = [direction[0] for direction in (forward_dir, backward_dir)]
        bias = None if convs[0].bias is None else torch.cat([c.bias for c in convs])
        x = self._causal_conv(x, torch.cat([c.weight[:, 0, :] for c in convs]), bias)
        ct = state_dtype(x.dtype)
        deltas, Bs, Cs = [], [], []
        for (_, x_proj, dt_proj, _, _), x_dir in zip((forward_dir, backward_dir), x.split(d, -1)):
            dt, B, C = x_proj(x_dir).split([self.dt_rank, n, n], dim=-1)
            deltas.append(dt @ dt_proj.weight.t())  # (B, L, d); the bias is added in the scan
            Bs.append(B)
            Cs.append(C)
        delta = torch.cat(deltas, dim=-1)
        A = -torch.exp(torch.cat([forward_dir[3], backward_dir[3]]).to(ct))  # (2d, n)
        D = torch.cat([forward_dir[4], backward_dir[4]]).to(ct)
        delta_bias = torch.cat([forward_dir[2].bias, backward_dir[2].bias]).to(ct)
        # The scan takes (B, c, L) tensors (transposed views, no copies) and B, C as (B, 2, n, L).
        B, C = (torch.stack(t, dim=2).permute(0, 2, 3, 1) for t in (Bs, Cs))
        u, delta, z = (t.transpose(1, 2) for t in (x, delta, z))
        y = selective_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)
        y = y.transpose(1, 2)
        return y[..., :d], reverse(y[..., d:])

    def _both_directions_compiled(self, xz, lengths):
        """_both_directions at inference with the compiled CPU kernels, without reversed copies:
        the conv kernel runs the backward direction's conv anti-causally and the scan kernel runs
        its channels backwards in time, each within the valid lengths (B,) (None: all frames);
        one matmul per projection (block-diagonal weights of both directions); z read from xz.
        Returns y_f, y_b (B, L, d_inner), zero at padded frames."""
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        w = self._both_directions_weights(xz.dtype)
        xz = xz.contiguous()
        u = scan_cpu.conv_silu(xz, w["conv"], w["conv_bias"], lengths, split=d)  # (B, L, 2d)
        x_dbl = F.linear(u, w["x_proj"])  # (B, L, 2 (r + 2n)): both dt, both B, both C
        dt, B, C = x_dbl.split([2 * r, 2 * n, 2 * n], dim=-1)
        delta = F.linear(dt, w["dt_proj"])  # (B, L, 2d)
        state = u.new_zeros(u.shape[0], 2 * d, n)
        B, C = (t.unflatten(-1, (2, n)) for t in (B, C))  # (B, L, 2, n) views
        y = scan_cpu.fused_forward(delta, w["dt_bias"], u, xz, B, C,
                                   w["A2"], w["D"], state, d, True, lengths=lengths,
                                   reverse_from=1, z_offset=d, out=delta)
        return y[..., :d], y[..., d:]

    def _both_directions_weights(self, dtype):
        """Both directions' parameters as _both_directions_compiled takes them, in dtype:
        conv (2d, d_conv), conv_bias (2d,) or None, block-diagonal x_proj (2 (r + 2n), 2d) and
        dt_proj (2d, 2r), dt_bias, D (2d,), A2 = A log2(e) (2d, n). Kept until a parameter
        changes (in place through autograd: its version; replaced; an optimizer step; a switch
        between train and eval mode), so inference does not rebuild them. Writes through
        ``.data`` bypass all of these: switch the mode (``eval()``) after them."""
        key = (dtype, _optimizer_steps,
               tuple((p.data_ptr(), p._version) for p in self.parameters()))
        cached = getattr(self, "_weights_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        (conv_f, x_f, dt_f, A_f, D_f), (conv_b, x_b, dt_b, A_b, D_b) = self._directions()
        r, n = self.dt_rank, self.d_state
        both = (lambda f, b: torch.cat([f, b]).to(dtype))  # noqa: E731
        with torch.no_grad():
            weights = {
                "conv": both(conv_f.weight[:, 0, :], conv_b.weight[:, 0, :]),
                "conv_bias": None if conv_f.bias is None else both(conv_f.bias, conv_b.bias),
                # rows: dt of both directions, then B of both, then C of both
                "x_proj": torch.cat([torch.block_diag(*(w.split([r, n, n])[i] for w in
                                                        (x_f.weight, x_b.weight)))
                                     for i in range(3)]).to(dtype),
                "dt_proj": torch.block_diag(dt_f.weight, dt_b.weight).to(dtype),
                "dt_bias": both(dt_f.bias, dt_b.bias),
                "D": both(D_f, D_b),
                "A2": both(A_f, A_b).exp().mul_(-LOG2E).contiguous(),
            }
        self._weights_cache = (key, weights)
        return weights

    def train(self, mode=True):
        self._weights_cache = None  # see _both_directions_weights
        return super().train(mode)

    def allocate_inference_cache(self, *args, **kwargs):
        raise NotImplementedError("BiMamba looks at the whole sequence; it has no recurrent mode")

    def step(self, x, cache):
        raise NotImplementedError("BiMamba looks at the whole sequence; it has no recurrent mode")


def reset_mamba_parameters(module):
    """Re-apply Mamba initialisation to every Mamba/BiMamba inside ``module`` (e.g. after a
    model-wide xavier re-init). Returns the number of blocks reset."""
    blocks = [m for m in module.modules() if isinstance(m, Mamba)]
    for block in blocks:
        block.reset_parameters()
    return len(blocks)
