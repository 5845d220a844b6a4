"""The selective scan as a PyTorch loop over time: the ``torch`` backend where the compiled CPU
scan (``cpu_numba.py``) does not load, and on devices without kernels of their own.

Each step works on one (B, E, N) slab small enough to stay in cache: exp(delta_t*A), the input
term, the state update and the C contraction are done there rather than as whole-sequence
tensors, which would cost a trip through main memory per op. The backward runs the adjoint
recurrence the other way in time from the states h_t, likewise one slab per step, so it
allocates nothing else of the size of the states. Math in fp32 (fp64 for fp64 inputs, for
gradcheck).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``F.softplus`` (x itself above 20, as there and in mamba-ssm's kernel), computed as
    max(x, 0) + log1p(exp(-|x|)) with log1p(y) = log(1 + y) * y / ((1 + y) - 1) (exact to
    rounding; y where 1 + y rounds to 1). Three times faster on the CPU: ``F.softplus``'s
    scalar log1p was a tenth of a small model's training step."""
    y = torch.exp(-x.abs())
    one_p = y + 1
    log1p = torch.log(one_p).mul_(y).div_(one_p - 1)
    out = torch.where(one_p == 1, y, log1p).add_(x.clamp(min=0))
    return torch.where(x > 20, x, out)


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """Time-major fp32 (fp64 for fp64 input) views: u, raw and activated delta, A, B, C."""
    work = work_dtype(u)
    u_t = u.to(work).permute(2, 0, 1)                                 # (L, B, E)
    dt_raw = delta.to(work).permute(2, 0, 1)
    if delta_bias is not None:
        dt_raw = dt_raw + delta_bias.to(work)
    dt = (_softplus(dt_raw) if delta_softplus else dt_raw).contiguous()
    b_t = B.to(work).permute(2, 0, 1).unsqueeze(2).contiguous()      # (L, B, 1, N)
    c_t = C.to(work).permute(2, 0, 1).unsqueeze(2).contiguous()
    return u_t, dt_raw, dt, A.to(work), b_t, c_t


def _loop_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                  keep_states: bool):
    """(out, states h_t (L, B, E, N) or None, pre-gate y (L, B, E) or None)."""
    u_t, _, dt, a, b_t, c_t = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    dtu = (dt * u_t).unsqueeze(-1)                                # (L, B, E, 1)
    dt_col = dt.unsqueeze(-1)
    length = u_t.shape[0]
    # Without a backward to feed, two state slabs suffice: no page-faulting a fresh
    # (L, B, E, N) buffer on every call.
    states = u_t.new_empty(length if keep_states else 2, *u_t.shape[1:], a.shape[1])
    y = torch.empty_like(dtu)
    decay, inp = torch.empty_like(states[0]), torch.empty_like(states[0])
    order = range(length - 1, -1, -1) if reverse else range(length)
    prev = None
    for i, t in enumerate(order):
        state = states[t] if keep_states else states[i % 2]
        if prev is None:
            torch.mul(dtu[t], b_t[t], out=state)
        else:
            torch.mul(dt_col[t], a, out=decay).exp_()
            torch.mul(dtu[t], b_t[t], out=inp)
            torch.addcmul(inp, decay, prev, out=state)
        torch.bmm(state, c_t[t].transpose(1, 2), out=y[t])
        prev = state
    y = y.squeeze(-1)                                             # (L, B, E)
    if D is not None:
        y = y + D.to(y.dtype) * u_t
    out = y if z is None else y * F.silu(z.to(y.dtype).permute(2, 0, 1))
    out = out.permute(1, 2, 0).to(u.dtype)
    return out, states if keep_states else None, y if z is not None else None


def _loop_backward(u, delta, A, B, C, D, z, delta_bias, states, y, dout, delta_softplus,
                   reverse):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, d delta_bias) from ``_loop_forward``'s
    states and pre-gate output; None for an absent optional input."""
    u_t, dt_raw, dt, a, b_t, c_t = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    g_out = dout.to(u_t.dtype).permute(2, 0, 1)                   # (L, B, E)
    dz = None
    if z is not None:
        z_t = z.to(u_t.dtype).permute(2, 0, 1)
        sig = torch.sigmoid(z_t)
        dz = g_out * y * sig * (1 + z_t * (1 - sig))
        dy = g_out * z_t * sig
    else:
        dy = g_out
    dy_col = dy.unsqueeze(-1).contiguous()                        # (L, B, E, 1)
    dtu = (dt * u_t).unsqueeze(-1)
    dt_col = dt.unsqueeze(-1)
    length, batch, dim = u_t.shape
    state_dim = a.shape[1]
    g_b = torch.empty_like(dtu)                                   # sum_n g_t B_t
    dB = u_t.new_empty(length, batch, state_dim, 1)
    dC = torch.empty_like(dB)
    ddt = torch.zeros_like(dtu)                                   # via exp(delta A)
    grad_a = torch.zeros_like(states[0])                          # summed over B later
    slab = lambda: torch.empty_like(states[0])  # noqa: E731
    grad, grad_later, decay, decay_later, scratch = slab(), slab(), slab(), slab(), slab()
    forward_order = list(range(length - 1, -1, -1) if reverse else range(length))
    # g_t = dL/dh_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1}, walked against time.
    for i in range(length - 1, -1, -1):
        t = forward_order[i]
        torch.mul(dy_col[t], c_t[t], out=grad)
        if i < length - 1:
            grad.addcmul_(decay_later, grad_later)
        torch.bmm(grad, b_t[t].transpose(1, 2), out=g_b[t])
        torch.bmm(grad.transpose(1, 2), dtu[t], out=dB[t])
        torch.bmm(states[t].transpose(1, 2), dy_col[t], out=dC[t])
        if i > 0:
            # dL/d(delta_t A) = g_t * exp(delta_t A) * h_{t-1}
            torch.mul(dt_col[t], a, out=decay).exp_()
            torch.mul(grad, decay, out=scratch).mul_(states[forward_order[i - 1]])
            grad_a.addcmul_(scratch, dt_col[t])
            torch.sum(scratch.mul_(a), -1, keepdim=True, out=ddt[t])
            decay, decay_later = decay_later, decay
        grad, grad_later = grad_later, grad
    g_b, ddt = g_b.squeeze(-1), ddt.squeeze(-1)
    ddt += g_b * u_t
    du = g_b * dt
    dD = None
    if D is not None:
        du = du + dy * D.to(du.dtype)
        dD = (dy * u_t).sum((0, 1))
    if delta_softplus:
        ddt = ddt * torch.sigmoid(dt_raw)
    dbias = None if delta_bias is None else ddt.sum((0, 1)).to(delta_bias.dtype)

    def seq(t, like):  # (L, B, X) -> (B, X, L) in the input's dtype
        return t.permute(1, 2, 0).to(like.dtype)

    return (seq(du, u), seq(ddt, delta), grad_a.sum(0).to(A.dtype),
            seq(dB.squeeze(-1), B), seq(dC.squeeze(-1), C),
            None if dD is None else dD.to(D.dtype), None if dz is None else seq(dz, z),
            dbias)


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    return _loop_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, False)[0]


def scan_backward(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, reverse):
    """The loop's backward from the inputs alone: its forward again, keeping the states."""
    _, states, y = _loop_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                                 True)
    return _loop_backward(u, delta, A, B, C, D, z, delta_bias, states, y, dout,
                          delta_softplus, reverse)


class LoopScan(torch.autograd.Function):
    """The loop under autograd, keeping its states for the backward (no second forward):
    where this loop runs, memory is not what limits a step, its time is."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
        out, states, y = _loop_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                       reverse, any(ctx.needs_input_grad))
        ctx.flags = (delta_softplus, reverse)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, y)
        return out

    @staticmethod
    def backward(ctx, dout):
        return _loop_backward(*ctx.saved_tensors, dout, *ctx.flags) + (None, None)
