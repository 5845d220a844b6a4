"""Selective scan (Mamba-1 S6) with interchangeable backends: this module is the interface.

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
  * ``torch``: on CPU tensors, the compiled scan of ``cpu_numba.py`` (Numba: one fused pass per
    time step, every core busy) when Numba imports; otherwise, and on other devices, the same
    loop in PyTorch ops vectorised over batch x channels x states (``loop.py``), whose backward
    is its own reverse-time loop.
  * ``triton``: fused forward/backward kernels, CUDA only: ``triton_kernels.py``, or on sm_90+
    GPUs the Gluon ones of ``gluon_kernels.py`` when ``MAMBAR_TRITON_GLUON=1`` asks for them.
  * ``cuda``: mamba-ssm's compiled kernel (``cuda_kernels.py``), CUDA only, imported lazily.

Each backend file provides a (forward, backward) kernel pair, functions of the inputs alone,
and imports nothing from this interface. ``resolve_backend`` is the one place that picks a
backend for a given device. ``get_scan`` gives a backend's scan under autograd (``KernelScan``,
which keeps only the inputs, for all but the loop); ``scan_kernels`` gives the kernel pair,
which the mixer's custom op (``mixer_op.py``) calls.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cuda_kernels, loop

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
    work = loop.work_dtype(u)
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


class KernelScan(torch.autograd.Function):
    """A (forward, backward) pair of scan kernels under autograd, keeping only the inputs: each
    backward kernel recomputes what it needs from them (every backend but the loop, which
    keeps its states)."""

    @staticmethod
    def forward(ctx, kernels, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
        ctx.backward_kernel, ctx.flags = kernels[1], (bool(delta_softplus), bool(reverse))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        return kernels[0](u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)

    @staticmethod
    def backward(ctx, dout):
        return (None, *ctx.backward_kernel(*ctx.saved_tensors, dout, *ctx.flags), None, None)


def kernel_scan(forward: Callable, backward: Callable) -> Callable:
    """A scan function (the arguments of ``selective_scan_reference``) over a kernel pair."""
    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
             reverse=False):
        return KernelScan.apply((forward, backward), u, delta, A, B, C, D, z, delta_bias,
                                delta_softplus, reverse)
    return scan


def put(value: Tensor, out: Optional[Tensor], scale: float = 1.0,
        accumulate: bool = False) -> Tensor:
    """``scale`` x value written into ``out`` (added to it with ``accumulate``), or value
    itself scaled when there is no ``out``: the output arguments of the Triton kernels, for
    kernels that write their own outputs."""
    if out is None:
        return value if scale == 1 else value.mul_(scale)
    if accumulate:
        return out.add_(value, alpha=scale)
    return out.copy_(value) if scale == 1 else torch.mul(value, scale, out=out)


def _writing_into(forward: Callable, backward: Callable) -> Tuple[Callable, Callable]:
    """The kernel pair of a backend whose kernels allocate their outputs (the loop, Numba,
    mamba-ssm), under the output arguments of the Triton kernels (``scan_kernels``)."""
    def forward_into(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out=None,
                     out_scale=1.0, accumulate=False):
        y = forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
        return put(y, out, out_scale, accumulate)

    def backward_into(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, reverse,
                      dout_scale=1.0, du=None, ddelta=None, dz=None, dz_accumulate=False,
                      dB=None, dC=None, dA=None, dD=None, ddelta_bias=None):
        if dout_scale != 1:
            dout = dout * dout_scale
        grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias = backward(
            u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, reverse)
        return (put(grad_u, du), put(grad_delta, ddelta), put(grad_A, dA, accumulate=True),
                put(grad_B, dB, accumulate=True), put(grad_C, dC, accumulate=True),
                None if grad_D is None else put(grad_D, dD, accumulate=True),
                None if grad_z is None else put(grad_z, dz, accumulate=dz_accumulate),
                None if grad_bias is None else put(grad_bias, ddelta_bias, accumulate=True))

    return forward_into, backward_into


def selective_scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=True, reverse=False):
    """The PyTorch loop (``loop.py``) with its hand-written backward."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    return loop.LoopScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


@functools.lru_cache(maxsize=None)
def _load_cpu_scan():
    """The compiled CPU scan's module, or None when Numba is missing or cannot compile here."""
    try:
        return importlib.import_module(".cpu_numba", __name__)
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
    return KernelScan.apply((compiled.scan_forward, compiled.scan_backward), u, delta, A, B, C,
                            D, z, delta_bias, delta_softplus, reverse)


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=True, reverse=False):
    """mamba-ssm's selective scan kernel, keeping only its inputs; CUDA tensors only."""
    return KernelScan.apply((cuda_kernels.scan_forward, cuda_kernels.scan_backward), u, delta,
                            A, B, C, D, z, delta_bias, delta_softplus, reverse)


@functools.lru_cache(maxsize=None)
def _load_triton_kernels():
    """The plain-Triton kernels' module, or None when Triton (or the module) is unavailable."""
    try:
        return importlib.import_module(".triton_kernels", __name__)
    except Exception:
        return None


def cuda_kernels_available() -> bool:
    return cuda_kernels.load_scan_extension() is not None


def triton_available() -> bool:
    return _load_triton_kernels() is not None


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
        module = _load_triton_kernels()
        return kernel_scan(module.scan_forward, module.scan_backward)
    raise ValueError(f"not a concrete scan backend: {backend!r}")


@functools.lru_cache(maxsize=None)
def _triton_kernels_module(device: torch.device) -> str:
    """The module of the ``triton`` backend's kernels for ``device``, said once per device:
    the Gluon kernels (``gluon_kernels.py``: shared memory, one channel per thread) on
    sm_90+ GPUs where this Triton has Gluon and ``MAMBAR_TRITON_GLUON=1`` asks for them, the
    plain-Triton ones elsewhere. The Gluon kernels were written for Hopper's shared memory and
    are compiled for sm_90a only, and their numbers checked under Triton's interpreter on the
    CPU; they stay opt-in until ``tests/test_selective_scan_gluon.py`` has passed on a GPU,
    the one place a race between their threads would show."""
    choice = ".triton_kernels"
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        why = "plain Triton (the Gluon kernels are for sm_90+)"
    elif os.environ.get("MAMBAR_TRITON_GLUON") != "1":
        why = ("plain Triton (the Gluon kernels, not yet checked on a GPU, run with "
               "MAMBAR_TRITON_GLUON=1)")
    else:
        try:
            importlib.import_module(".gluon_kernels", __name__)
            choice, why = ".gluon_kernels", "Gluon kernels (sm_90+)"
        except (ImportError, AttributeError):  # no triton.experimental.gluon, or an older one
            why = "plain Triton (this Triton's Gluon is missing or too old)"
    print(f"[selective_scan] triton backend on {device}: {why}")
    return choice


def scan_kernels(backend: str, device: torch.device) -> Tuple[Callable, Callable]:
    """The (forward, backward) functions of a concrete backend for tensors on ``device``:
    ``forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out=None,
    out_scale=1.0, accumulate=False) -> out`` and ``backward(<the same inputs>, dout,
    delta_softplus, reverse, dout_scale=1.0, du=None, ddelta=None, dz=None,
    dz_accumulate=False, dB=None, dC=None, dA=None, dD=None, ddelta_bias=None) -> (du, ddelta,
    dA, dB, dC, dD, dz, d delta_bias)``, None for an absent input. Outputs go into the tensors
    given (scaled, or added with the accumulate flags; dA, dB, dC, dD and d delta_bias, fp32,
    are always added into); the ones not given are allocated.
    The backward needs only the inputs: custom ops (``mixer_op.py``) call these, and autograd
    does not run inside an op."""
    if backend == "torch":
        module = _load_cpu_scan() if device.type == "cpu" else None
        return _writing_into((module or loop).scan_forward, (module or loop).scan_backward)
    if backend == "triton":
        module = importlib.import_module(_triton_kernels_module(device), __name__)
        return module.scan_forward, module.scan_backward
    if backend == "cuda":
        return _writing_into(cuda_kernels.scan_forward, cuda_kernels.scan_backward)
    raise ValueError(f"no kernels for scan backend {backend!r} (the reference is plain "
                     f"autograd)")


def describe_backends(name: str) -> str:
    """One line for logs: what was asked and what each device will run."""
    gpu = resolve_backend(name, torch.device("cuda")) if name == "auto" else name
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
