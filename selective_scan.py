"""Selective scan (Mamba-1 S6) with interchangeable backends.

All backends compute, per channel e and state n (mamba-ssm's argument layout):

    delta = softplus(delta + delta_bias)                      (B, E, L)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     h_0 = 0, h_t in R^{E x N}
    y_t   = sum_n C_t[n] * h_t[:, n] + D * u_t
    out_t = y_t * silu(z_t)

with u, delta, z of shape (B, E, L); A of shape (E, N); B, C of shape (B, N, L); D, delta_bias of
shape (E,). ``reverse=True`` runs the recurrence from the last token to the first, which equals
flipping every sequence input, scanning, and flipping the output back, without the copies.

Backends:
  * ``reference``: a naive per-step loop under autograd; slow and obviously correct (the oracle).
  * ``torch``: the same loop vectorised over batch x channels x states inside a custom autograd
    Function whose backward is its own reverse-time loop (fast on CPU, works on any device).
  * ``triton``: fused forward/backward kernels (``selective_scan_triton.py``), CUDA only.
  * ``cuda``: mamba-ssm's compiled kernel, CUDA only, imported lazily.

``resolve_backend`` is the one place that picks a backend for a given device.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")
ENV_VAR = "MAMBAR_SCAN_BACKEND"


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=True, reverse=False):
    """Sequential oracle: one token at a time, plain autograd, computed in fp32 (or fp64)."""
    dtype_out = u.dtype
    work = _work_dtype(u)
    u, delta, B, C = (t.to(work) for t in (u, delta, B, C))
    A = A.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = [None] * length
    steps = range(length - 1, -1, -1) if reverse else range(length)
    for t in steps:
        dA = torch.exp(delta[:, :, t, None] * A)
        dBu = delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        h = dA * h + dBu
        ys[t] = (h * C[:, None, :, t]).sum(-1)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(work)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype_out)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# Below this many elements per time step, one thread runs a step faster than a team: the
# per-step work is tiny and every step ends in a barrier, which stalls for a whole scheduler
# slice whenever another process holds the second core.
_ELEMENTS_PER_THREAD = 1 << 17


def _time_major_states(dA: torch.Tensor, dBu: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Run h_t = dA_t * h_{t-1} + dBu_t over dim 0 (time); returns every h_t, shape like dA."""
    states = torch.empty_like(dBu)
    length = dA.shape[0]
    order = range(length - 1, -1, -1) if reverse else range(length)
    threads = torch.get_num_threads()
    step_threads = max(1, min(threads, dA[0].numel() // _ELEMENTS_PER_THREAD))
    if dA.device.type == "cpu" and step_threads != threads:
        torch.set_num_threads(step_threads)
    try:
        prev = None
        for t in order:
            if prev is None:
                states[t].copy_(dBu[t])
            else:
                torch.addcmul(dBu[t], dA[t], prev, out=states[t])
            prev = states[t]
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return states


class _SelectiveScanTorch(torch.autograd.Function):
    """Per-step loop over time, vectorised over (batch, channel, state); all math in fp32.

    Tensors inside are time-major, (L, B, E, N), so each step touches one contiguous slab.
    float64 inputs are computed in float64 (for gradcheck); everything else in float32.
    The backward recomputes exp(delta*A) and runs the adjoint recurrence in the opposite
    time direction, one fused multiply-add per step.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
        dtype_out = u.dtype
        f32 = _work_dtype(u)
        u32 = u.to(f32).permute(2, 0, 1)                            # (L, B, E)
        dt_raw = delta.to(f32).permute(2, 0, 1)
        if delta_bias is not None:
            dt_raw = dt_raw + delta_bias.to(f32)
        dt = F.softplus(dt_raw) if delta_softplus else dt_raw
        A32 = A.to(f32)
        Bt = B.to(f32).permute(2, 0, 1).unsqueeze(2)                # (L, B, 1, N)
        Ct = C.to(f32).permute(2, 0, 1).unsqueeze(2)
        dA = torch.exp(dt.unsqueeze(-1) * A32)                      # (L, B, E, N)
        dBu = (dt * u32).unsqueeze(-1) * Bt
        states = _time_major_states(dA, dBu, reverse)
        del dA, dBu
        y = torch.matmul(states, Ct.transpose(-1, -2)).squeeze(-1)  # (L, B, E)
        if D is not None:
            y = y + D.to(f32) * u32
        out = y
        if z is not None:
            out = y * F.silu(z.to(f32).permute(2, 0, 1))
        ctx.delta_softplus = delta_softplus
        ctx.reverse = reverse
        ctx.has = (D is not None, z is not None, delta_bias is not None)
        ctx.dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype,
                      None if D is None else D.dtype, None if z is None else z.dtype,
                      None if delta_bias is None else delta_bias.dtype)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states,
                              y if z is not None else None)
        return out.permute(1, 2, 0).to(dtype_out)

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, states, y = ctx.saved_tensors
        has_D, has_z, has_bias = ctx.has
        f32 = _work_dtype(u)
        u32 = u.to(f32).permute(2, 0, 1)
        dt_raw = delta.to(f32).permute(2, 0, 1)
        if has_bias:
            dt_raw = dt_raw + delta_bias.to(f32)
        dt = F.softplus(dt_raw) if ctx.delta_softplus else dt_raw
        A32 = A.to(f32)
        Bt = B.to(f32).permute(2, 0, 1).unsqueeze(2)
        Ct = C.to(f32).permute(2, 0, 1).unsqueeze(2)
        g_out = dout.to(f32).permute(2, 0, 1)                       # (L, B, E)
        dz = None
        if has_z:
            z32 = z.to(f32).permute(2, 0, 1)
            sig = torch.sigmoid(z32)
            dz = g_out * y * sig * (1 + z32 * (1 - sig))
            dy = g_out * z32 * sig
        else:
            dy = g_out
        dA = torch.exp(dt.unsqueeze(-1) * A32)
        # Adjoint recurrence: g_t = dy_t C_t + dA_{t+1} g_{t+1} (time order flipped if reverse).
        dyC = dy.unsqueeze(-1) * Ct                                  # (L, B, E, N)
        shifted = torch.ones_like(dA)
        if ctx.reverse:
            shifted[1:] = dA[:-1]
        else:
            shifted[:-1] = dA[1:]
        grads = _time_major_states(shifted, dyC, not ctx.reverse)
        del shifted, dyC
        prev_states = torch.zeros_like(states)
        if ctx.reverse:
            prev_states[:-1] = states[1:]
        else:
            prev_states[1:] = states[:-1]
        # dL/d(dA_t) = g_t * h_{t-1}; dA_t = exp(dt * A).
        g_dA = grads * prev_states * dA
        del prev_states, dA
        gB = torch.matmul(grads, Bt.transpose(-1, -2)).squeeze(-1)   # sum_n g * B  (L, B, E)
        ddt = (g_dA * A32).sum(-1) + gB * u32
        dA_param = torch.einsum("lben,lbe->en", g_dA, dt)
        del g_dA
        du = gB * dt
        dB = torch.einsum("lben,lbe->bnl", grads, dt * u32)
        dC = torch.einsum("lben,lbe->bnl", states, dy)
        del grads
        dD = None
        if has_D:
            du = du + dy * D.to(f32)
            dD = (dy * u32).sum((0, 1))
        if ctx.delta_softplus:
            ddt = ddt * torch.sigmoid(dt_raw)
        dbias = ddt.sum((0, 1)) if has_bias else None
        dtypes = ctx.dtypes

        def back(t, i):
            return None if t is None else t.to(dtypes[i])

        return (back(du.permute(1, 2, 0), 0), back(ddt.permute(1, 2, 0), 1), back(dA_param, 2),
                back(dB, 3), back(dC, 4), back(dD, 5),
                None if dz is None else back(dz.permute(1, 2, 0), 6), back(dbias, 7),
                None, None)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=True, reverse=False):
    """Pure-PyTorch selective scan with a hand-written backward (see module docstring)."""
    return _SelectiveScanTorch.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


def _flip_wrap(scan: Callable) -> Callable:
    """Give a forward-only kernel the ``reverse`` argument by flipping the sequence inputs."""
    def run(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
            reverse=False):
        if not reverse:
            return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
        out = scan(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias,
                   delta_softplus)
        return out.flip(-1)
    return run


@functools.lru_cache(maxsize=None)
def _load_cuda_scan() -> Optional[Callable]:
    """mamba-ssm's selective_scan_fn, or None when the package or its extension is missing."""
    try:
        module = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        scan_fn = module.selective_scan_fn
    except Exception:  # ImportError, or an OSError/undefined symbol from a mismatched build
        return None

    def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return scan_fn(u.contiguous(), delta.contiguous(), A.float().contiguous(),
                       B.contiguous(), C.contiguous(),
                       None if D is None else D.float().contiguous(),
                       None if z is None else z.contiguous(),
                       None if delta_bias is None else delta_bias.float().contiguous(),
                       delta_softplus=delta_softplus)
    return _flip_wrap(scan)


@functools.lru_cache(maxsize=None)
def _load_triton_scan() -> Optional[Callable]:
    """The Triton backend, or None when Triton (or the module) is unavailable."""
    try:
        import triton  # noqa: F401
        module = importlib.import_module("selective_scan_triton")
        return module.selective_scan_triton
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def load_causal_conv1d() -> Optional[Callable]:
    """causal-conv1d's ``causal_conv1d_fn(x, weight, bias, activation)``, or None.

    Only the public function is used: its private entry points changed signature between
    releases, while ``causal_conv1d_fn(x, weight, bias=None, activation=None)`` has not.
    """
    try:
        module = importlib.import_module("causal_conv1d")
        return module.causal_conv1d_fn
    except Exception:
        return None


def cuda_kernels_available() -> bool:
    return _load_cuda_scan() is not None


def triton_available() -> bool:
    return _load_triton_scan() is not None


def requested_backend(name: Optional[str] = None) -> str:
    """The backend asked for: the argument, else $MAMBAR_SCAN_BACKEND, else ``auto``."""
    name = (name or os.environ.get(ENV_VAR) or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``.

    ``auto`` prefers mamba-ssm's kernel, then Triton, on CUDA tensors, and ``torch`` elsewhere.
    An explicit GPU backend on CPU tensors, or one whose package is missing, is an error.
    """
    on_cuda = device.type == "cuda"
    if name == "auto":
        if on_cuda and cuda_kernels_available():
            return "cuda"
        if on_cuda and triton_available():
            return "triton"
        return "torch"
    if name in ("cuda", "triton"):
        if not on_cuda:
            raise RuntimeError(f"scan backend {name!r} needs CUDA tensors, got {device.type}")
        if name == "cuda" and not cuda_kernels_available():
            raise RuntimeError("scan backend 'cuda' needs mamba-ssm (pip install -r "
                               "requirements-cuda.txt)")
        if name == "triton" and not triton_available():
            raise RuntimeError("scan backend 'triton' needs the triton package")
    return name


def get_scan(backend: str) -> Callable:
    """The scan function of a concrete backend (as returned by ``resolve_backend``)."""
    if backend == "torch":
        return selective_scan_torch
    if backend == "reference":
        return selective_scan_reference
    if backend == "cuda":
        return _load_cuda_scan()
    if backend == "triton":
        return _load_triton_scan()
    raise ValueError(f"not a concrete scan backend: {backend!r}")


def describe_backends(name: str) -> str:
    """One line for logs: what was asked and what each device will run."""
    gpu = "n/a"
    if name in ("auto", "cuda", "triton"):
        gpu = ("cuda" if cuda_kernels_available() else
               "triton" if triton_available() else "torch") if name == "auto" else name
    else:
        gpu = name
    cpu = "torch" if name in ("auto", "cuda", "triton") else name
    return (f"scan backend '{name}': CUDA tensors -> {gpu}, CPU tensors -> {cpu} "
            f"(mamba-ssm kernels {'found' if cuda_kernels_available() else 'not installed'}, "
            f"triton {'found' if triton_available() else 'not installed'})")
