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
  * ``torch``: on CPU tensors, the compiled scan of ``selective_scan_cpu.py`` (Numba: one fused
    pass per time step, every core busy) when Numba imports; otherwise, and on other devices,
    the same loop in PyTorch ops vectorised over batch x channels x states, whose backward is
    its own reverse-time loop (``selective_scan_loop``).
  * ``triton``: fused forward/backward kernels (``selective_scan_triton.py``), CUDA only.
  * ``cuda``: mamba-ssm's compiled kernel (its ``selective_scan_cuda`` extension), CUDA only,
    imported lazily, behind an autograd function that keeps only its inputs as the others do.

``resolve_backend`` is the one place that picks a backend for a given device. ``get_scan``
gives a backend's scan under autograd; ``scan_kernels`` gives the forward and backward of
``torch``, ``triton`` and ``cuda`` as plain functions of the inputs, which the mixer's custom op
(``mixer_ops.py``) calls.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")
ENV_VAR = "MAMBAR_SCAN_BACKEND"


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> None:
    """ValueError naming the first argument the reference and torch backends cannot scan.

    They implement real A and one variable B and C shared by all channels; mamba-ssm's kernel
    also takes complex A and grouped or fixed B/C, which these loops would silently get wrong
    (complex A) or fail on deep inside (grouped B/C).
    """
    if u.dim() != 3:
        raise ValueError(f"u: expected (batch, channels, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{name}: expected u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D),
                    ("z", z), ("delta_bias", delta_bias)):
        if t is not None and not t.is_floating_point():
            note = " (complex A: only mamba-ssm's kernel takes it)" if t.is_complex() else ""
            raise ValueError(f"{name}: expected a real floating-point tensor, got {t.dtype}"
                             + note)
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A: expected (channels, d_state) = ({dim}, N), got {tuple(A.shape)}")
    want = (batch, A.shape[1], length)
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: expected (batch, d_state, length) = {want} (input-"
                             f"dependent, one group), got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name}: expected (channels,) = ({dim},), got {tuple(t.shape)}")


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=True, reverse=False):
    """Sequential oracle: one token at a time, plain autograd, computed in fp32 (or fp64)."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
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
    work = _work_dtype(u)
    u_t = u.to(work).permute(2, 0, 1)                                 # (L, B, E)
    dt_raw = delta.to(work).permute(2, 0, 1)
    if delta_bias is not None:
        dt_raw = dt_raw + delta_bias.to(work)
    dt = (_softplus(dt_raw) if delta_softplus else dt_raw).contiguous()
    b_t = B.to(work).permute(2, 0, 1).unsqueeze(2).contiguous()      # (L, B, 1, N)
    c_t = C.to(work).permute(2, 0, 1).unsqueeze(2).contiguous()
    return u_t, dt_raw, dt, A.to(work), b_t, c_t


# The PyTorch loop: per-step loop over time, vectorised over (batch, channel, state). Each step
# works on one (B, E, N) slab small enough to stay in cache: exp(delta_t*A), the input term,
# the state update and the C contraction are done there rather than as whole-sequence
# tensors, which would cost a trip through main memory per op. The backward runs the adjoint
# recurrence the other way in time from the states h_t, likewise one slab per step, so it
# allocates nothing else of the size of the states. Math in fp32 (fp64 for fp64 inputs, for
# gradcheck).

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


def loop_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    return _loop_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, False)[0]


def loop_scan_backward(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, reverse):
    """The loop's backward from the inputs alone: its forward again, keeping the states."""
    _, states, y = _loop_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                                 True)
    return _loop_backward(u, delta, A, B, C, D, z, delta_bias, states, y, dout,
                          delta_softplus, reverse)


class _SelectiveScanTorch(torch.autograd.Function):
    """The loop under autograd, keeping its states for the backward (no second forward)."""

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


def selective_scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=True, reverse=False):
    """Pure-PyTorch selective scan with a hand-written backward (see module docstring)."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    return _SelectiveScanTorch.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


@functools.lru_cache(maxsize=None)
def _load_cpu_scan() -> Optional[Callable]:
    """The compiled CPU scan, or None when Numba is missing or cannot compile here."""
    try:
        return importlib.import_module("selective_scan_cpu").selective_scan_cpu
    except Exception as err:  # ImportError, or a Numba/llvmlite that does not load
        logger.warning("compiled CPU scan unavailable (%s); using the PyTorch loop", err)
        return None


@torch.compiler.assume_constant_result
def compiled_cpu_scan_available() -> bool:
    """Whether the compiled CPU scan loads here; a constant to torch.compile, which would
    otherwise break the graph at the import inside (the model asks while tracing)."""
    return _load_cpu_scan() is not None


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=True, reverse=False):
    """The ``torch`` backend: the compiled scan for CPU tensors where Numba is installed,
    the PyTorch loop otherwise."""
    compiled = _load_cpu_scan() if u.device.type == "cpu" else None
    if compiled is None:
        return selective_scan_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    return compiled(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


def _kernel_layout(t: Optional[torch.Tensor], reverse: bool) -> Optional[torch.Tensor]:
    """A sequence tensor as mamba-ssm's and causal-conv1d's kernels read it: contiguous, and
    flipped for the reverse direction (they only run forwards in time)."""
    if t is None:
        return None
    return (t.flip(-1) if reverse else t).contiguous()


def _cuda_scan_args(u, delta, A, B, C, D, z, delta_bias, reverse: bool) -> tuple:
    """The leading arguments of mamba-ssm's ``selective_scan_cuda.fwd`` and ``bwd``: sequence
    tensors in kernel layout, B and C with their group axis (one group), parameters in fp32."""
    def param(t):
        return None if t is None else t.float().contiguous()
    return (_kernel_layout(u, reverse), _kernel_layout(delta, reverse), param(A),
            _kernel_layout(B, reverse).unsqueeze(1), _kernel_layout(C, reverse).unsqueeze(1),
            param(D), _kernel_layout(z, reverse), param(delta_bias))


def _cuda_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    """mamba-ssm's forward kernel; its chunk states and pre-gate output are dropped.

    mamba-ssm's own autograd function keeps the contiguous (here also flipped) copies it scans
    and its pre-gate output: Mamba®-B at batch 128 trained in 28 GB through it against 12 GB
    with the Triton scan. Here the copies exist only while a kernel runs, and the backward
    reruns this kernel for what its own kernel reads: one scan forward more per step, for the
    memory of the other backends.
    """
    args = _cuda_scan_args(u, delta, A, B, C, D, z, delta_bias, reverse)
    out, _, *gated = _load_cuda_kernel().fwd(*args, bool(delta_softplus))
    y = gated[0] if z is not None else out
    return y.flip(-1) if reverse else y


def _cuda_scan_backward(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, reverse):
    kernel = _load_cuda_kernel()
    softplus = bool(delta_softplus)
    args = _cuda_scan_args(u, delta, A, B, C, D, z, delta_bias, reverse)
    out, states, *_ = kernel.fwd(*args, softplus)
    du, ddelta, dA, dB, dC, dD, dbias, *dz = kernel.bwd(
        *args, _kernel_layout(dout, reverse), states, out if z is not None else None,
        None, softplus, False)

    def seq(grad, like):
        grad = grad.flip(-1) if reverse else grad
        return grad.to(like.dtype)
    return (seq(du, u), seq(ddelta, delta), dA.to(A.dtype), seq(dB.squeeze(1), B),
            seq(dC.squeeze(1), C), None if D is None else dD.to(D.dtype),
            None if z is None else seq(dz[0], z),
            None if delta_bias is None else dbias.to(delta_bias.dtype))


class _KernelScan(torch.autograd.Function):
    """A (forward, backward) kernel pair under autograd, keeping only the inputs."""

    @staticmethod
    def forward(ctx, kernels, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
        ctx.kernels, ctx.flags = kernels, (bool(delta_softplus), bool(reverse))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        return kernels[0](u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)

    @staticmethod
    def backward(ctx, dout):
        grads = ctx.kernels[1](*ctx.saved_tensors, dout, *ctx.flags)
        return (None,) + tuple(grads) + (None, None)


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=True, reverse=False):
    """mamba-ssm's selective scan kernel, keeping only its inputs; CUDA tensors only."""
    return _KernelScan.apply((_cuda_scan_forward, _cuda_scan_backward), u, delta, A, B, C, D,
                             z, delta_bias, delta_softplus, reverse)


@functools.lru_cache(maxsize=None)
def _load_cuda_kernel():
    """mamba-ssm's compiled extension ``selective_scan_cuda``, or None when it is missing.

    The extension alone is imported, not the ``mamba_ssm`` package, whose ``__init__`` also
    imports its language models and, through them, transformers.
    """
    try:
        return importlib.import_module("selective_scan_cuda")
    except Exception:  # ImportError, or an OSError/undefined symbol from a mismatched build
        return None


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


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       reverse: bool) -> torch.Tensor:
    """SiLU(depthwise causal conv) of x (B, E, L) with an nn.Conv1d weight (E, 1, K) through
    causal-conv1d's kernel (differentiable through its own autograd function); with
    ``reverse`` the anti-causal conv of the backward direction."""
    u = load_causal_conv1d()(_kernel_layout(x, reverse), weight.squeeze(1), bias,
                             activation="silu")
    return u.flip(-1) if reverse else u


def cuda_kernels_available() -> bool:
    return _load_cuda_kernel() is not None


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

    ``auto`` prefers the Triton scan on CUDA tensors (faster than mamba-ssm's kernel and
    lighter on memory, BENCHMARKS.md), then mamba-ssm's kernel, and ``torch`` elsewhere.
    An explicit GPU backend on CPU tensors, or one whose package is missing, is an error.
    """
    on_cuda = device.type == "cuda"
    if name == "auto":
        if on_cuda and triton_available():
            return "triton"
        if on_cuda and cuda_kernels_available():
            return "cuda"
        return "torch"
    if name in ("cuda", "triton"):
        if not on_cuda:
            raise RuntimeError(f"scan backend {name!r} needs CUDA tensors, got {device.type}")
        if name == "cuda" and not cuda_kernels_available():
            raise RuntimeError("scan backend 'cuda' needs mamba-ssm's selective_scan_cuda "
                               "extension (README, 'GPU extra')")
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
        return selective_scan_cuda
    if backend == "triton":
        return _load_triton_scan()
    raise ValueError(f"not a concrete scan backend: {backend!r}")


@functools.lru_cache(maxsize=None)
def _triton_kernels_module(device: torch.device) -> str:
    """The module of the ``triton`` backend's kernels for ``device``, said once per device:
    the Gluon kernels (``selective_scan_gluon.py``: shared memory, one channel per thread) on
    sm_90+ GPUs where this Triton has Gluon and ``MAMBAR_TRITON_GLUON=1`` asks for them, the
    plain-Triton ones elsewhere. The Gluon kernels were written for Hopper's shared memory and
    are compiled for sm_90a only, and their numbers checked under Triton's interpreter on the
    CPU; they stay opt-in until ``tests/test_selective_scan_gluon.py`` has passed on a GPU,
    the one place a race between their threads would show."""
    choice = "selective_scan_triton"
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        why = "plain Triton (the Gluon kernels are for sm_90+)"
    elif os.environ.get("MAMBAR_TRITON_GLUON") != "1":
        why = ("plain Triton (the Gluon kernels, not yet checked on a GPU, run with "
               "MAMBAR_TRITON_GLUON=1)")
    else:
        try:
            importlib.import_module("selective_scan_gluon")
            choice, why = "selective_scan_gluon", "Gluon kernels (sm_90+)"
        except (ImportError, AttributeError):  # no triton.experimental.gluon, or an older one
            why = "plain Triton (this Triton's Gluon is missing or too old)"
    print(f"[selective_scan] triton backend on {device}: {why}")
    return choice


def scan_kernels(backend: str, device: torch.device) -> Tuple[Callable, Callable]:
    """The (forward, backward) functions of a concrete backend for tensors on ``device``:
    ``forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse) -> out`` and
    ``backward(<the same inputs>, dout, delta_softplus, reverse) -> (du, ddelta, dA, dB, dC,
    dD, dz, d delta_bias)``, None for an absent input. The backward needs only the inputs:
    custom ops (``mixer_ops.py``) call these, and autograd does not run inside an op."""
    if backend == "torch":
        if device.type == "cpu" and _load_cpu_scan() is not None:
            module = importlib.import_module("selective_scan_cpu")
            return module.scan_forward, module.scan_backward
        return loop_scan_forward, loop_scan_backward
    if backend == "triton":
        module = importlib.import_module(_triton_kernels_module(device))
        return module.scan_forward, module.scan_backward
    if backend == "cuda":
        return _cuda_scan_forward, _cuda_scan_backward
    raise ValueError(f"no kernels for scan backend {backend!r} (the reference is plain "
                     f"autograd)")


def describe_backends(name: str) -> str:
    """One line for logs: what was asked and what each device will run."""
    gpu = "n/a"
    if name in ("auto", "cuda", "triton"):
        gpu = resolve_backend(name, torch.device("cuda")) if name == "auto" else name
    else:
        gpu = name
    cpu = "torch" if name in ("auto", "cuda", "triton") else name
    if cpu == "torch":
        cpu += (" (compiled, Numba)" if compiled_cpu_scan_available() else
                " (PyTorch loop: numba not installed)")
    return (f"scan backend '{name}': CUDA tensors -> {gpu}, CPU tensors -> {cpu} "
            f"(mamba-ssm kernels {'found' if cuda_kernels_available() else 'not installed'}, "
            f"triton {'found' if triton_available() else 'not installed'})")


# Loaded now rather than at the first scan: Numba's import looks ``print`` up by name among the
# builtins and fails once something has replaced it, as main.py does to silence other ranks.
_load_cpu_scan()
