"""Glue to the authors' CUDA kernels, for the ``cuda`` backend: mamba-ssm's selective scan
(its ``selective_scan_cuda`` extension) and causal-conv1d's conv, both imported lazily and
optional (``requirements-cuda.txt``).

Both kernels run forwards in time on contiguous (B, E, L) tensors, so the reverse direction
gets flipped contiguous copies here; the other backends scan in reverse by their indexing.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

import torch


@functools.lru_cache(maxsize=None)
def load_scan_extension():
    """mamba-ssm's compiled extension ``selective_scan_cuda``, or None when it is missing.

    The extension alone is imported, not the ``mamba_ssm`` package, whose ``__init__`` also
    imports its language models and, through them, transformers.
    """
    try:
        return importlib.import_module("selective_scan_cuda")
    except Exception:  # ImportError, or an OSError/undefined symbol from a mismatched build
        return None


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


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    """mamba-ssm's forward kernel; its chunk states and pre-gate output are dropped.

    mamba-ssm's own autograd function keeps the contiguous (here also flipped) copies it scans
    and its pre-gate output: Mamba®-B trained in more than twice the memory through it than
    with the Triton scan (BENCHMARKS.md). Here the copies exist only while a kernel runs, and the backward
    reruns this kernel for what its own kernel reads: one scan forward more per step, for the
    memory of the other backends.
    """
    args = _cuda_scan_args(u, delta, A, B, C, D, z, delta_bias, reverse)
    out, _, *gated = load_scan_extension().fwd(*args, bool(delta_softplus))
    y = gated[0] if z is not None else out
    return y.flip(-1) if reverse else y


def scan_backward(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, reverse):
    kernel = load_scan_extension()
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


