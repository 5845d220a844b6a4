"""The mixer's path of one scan direction as a ``torch.library`` custom op, for every backend.

One direction of the bidirectional mixer (``vision_mamba.BiMambaMixer``, whose reference path
spells out the same math) computes, from x and z (the two halves of in_proj's output):

    u      = SiLU(causal depthwise conv(x))          (anti-causal for the backward direction)
    dt, B, C = split(x_proj.weight @ u)
    delta  = dt_proj.weight @ dt                      (the bias and softplus are the scan's)
    out    = selective_scan(u, delta, A = -exp(A_log), B, C, D, z, dt_proj.bias)

``mambar::ssm_direction`` does all of it in one op. Why one op, conv and scan together:

* ``torch.compile`` traces a custom op as a single node with a fake (shape-only)
  implementation and a registered autograd formula, so the compiled model has no graph
  breaks, whatever the scan backend runs inside (Numba, Triton or mamba-ssm's kernels).
* An op decides what its backward keeps. This one keeps only its inputs (x and z are views
  of in_proj's output, the rest are weights), and ``mambar::ssm_direction_backward`` redoes
  the conv and the two projections (cheap) before the scan's backward, rather than holding u
  and delta, each the size of x, from the forward to the backward (Mamba®-B at batch 128:
  7 GB). Split into a conv op and a scan op, the projection between them would keep u.

The scan backends provide a (forward, backward) kernel pair that needs only the inputs
(``selective_scan.scan_kernels``). The op's backward goes back through the projections and
the conv by hand: autograd does not record inside a custom op.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import compiled_cpu_scan_available, scan_kernels
from .cuda_kernels import causal_conv1d_silu, load_causal_conv1d

# Profiler ranges, so that benchmark.py can tell the scan's time from the rest of the op's.
SCAN_RANGE = "mambar.selective_scan"
SCAN_BACKWARD_RANGE = "mambar.selective_scan_backward"
RECOMPUTE_RANGE = "mambar.recompute"


def without_autocast(device: torch.device):
    """Autocast off, on devices that have it (the meta device, where timm builds models to
    inspect them, has none and refuses the context)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def conv_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool) -> Tensor:
    """SiLU(causal depthwise conv(x)) in x's dtype, (B, E, L) -> (B, E, L); with ``reverse``
    the anti-causal twin, which equals flip -> causal conv -> flip without the copies."""
    return F.silu(_conv(x, weight, bias, reverse)[0])


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool
          ) -> Tuple[Tensor, Tensor, Tensor]:
    """The conv before SiLU (B, E, L), the padded conv it was cut from, and the kernel used."""
    k = weight.shape[-1]
    weight = weight.to(x.dtype).flip(-1) if reverse else weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    padded = F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])
    return padded[..., k - 1:] if reverse else padded[..., :x.shape[-1]], padded, weight


def conv_silu_backward(du: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                       reverse: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients of x, the conv weight (E, 1, K) and bias from that of ``conv_silu``'s output;
    the conv is run again for its pre-activation."""
    pre, padded, kernel = _conv(x, weight, bias, reverse)
    k, channels, length = kernel.shape[-1], x.shape[1], x.shape[-1]
    dpadded = torch.zeros_like(padded)
    (dpadded[..., k - 1:] if reverse else dpadded[..., :length]).copy_(
        torch.ops.aten.silu_backward(du, pre))
    dx, dkernel, dbias = torch.ops.aten.convolution_backward(
        dpadded, x, kernel, [channels], [1], [k - 1], [1], False, [0], channels,
        [True, True, bias is not None])
    return dx, dkernel.flip(-1) if reverse else dkernel, dbias


def conv_kernels(backend: str, x: Tensor) -> Tuple[Callable, Callable]:
    """The (forward, backward) pair of SiLU(conv) for a concrete backend and input:
    ``forward(x, weight, bias, reverse) -> u`` and ``backward(du, x, weight, bias, reverse)
    -> (dx, dweight, dbias)``. causal-conv1d's kernel runs the ``cuda`` forward; on the CPU the
    compiled scan's module has the conv too (fp32/fp64), since oneDNN's depthwise conv backward
    costs 10x its forward at the model's sizes; PyTorch's conv everywhere else."""
    if backend == "cuda" and load_causal_conv1d() is not None:
        # Its backward entry points changed between releases: PyTorch's conv goes back (the
        # same values to rounding).
        return causal_conv1d_silu, conv_silu_backward
    if (backend == "torch" and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and compiled_cpu_scan_available()):
        module = importlib.import_module(".cpu_numba", __package__)
        return module.conv_silu_forward, module.conv_silu_backward
    return conv_silu, conv_silu_backward


def _channel_minor(x: Tensor) -> bool:
    """Whether (B, C, L) ``x`` is stored with its channels innermost, as (B, L, C)."""
    return x.stride(1) < x.stride(2)


def channel_matmul(weight: Tensor, x: Tensor) -> Tensor:
    """(O, I) @ (B, I, L) -> (B, O, L) in x's layout, the weight cast to x's dtype as autocast
    would: channels-first in and out, as the GPU kernels read them, by one bmm; channel-minor
    in and out, as the compiled CPU kernels write and read them, by one GEMM over all B x L
    tokens."""
    weight = weight.to(x.dtype)
    if _channel_minor(x):
        return F.linear(x.transpose(1, 2), weight).transpose(1, 2)
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def _weight_grad(dout: Tensor, x: Tensor) -> Tensor:
    """The gradient of an (O, I) weight from (B, O, L) output and (B, I, L) input gradients,
    summed over batch and tokens. Both channel-minor: one GEMM over all tokens. Otherwise, in
    fp32/fp64, per-image products summed over the batch (an einsum first copies both operands
    into (channel, batch x token) layouts: 3% of a CPU step at the demo's sizes); in half
    precision one GEMM, so that the sum is rounded once."""
    if _channel_minor(dout) and _channel_minor(x):
        return dout.transpose(1, 2).flatten(0, 1).t() @ x.transpose(1, 2).flatten(0, 1)
    if x.dtype in (torch.float32, torch.float64):
        return torch.bmm(dout, x.transpose(1, 2)).sum(0)
    return torch.einsum("bol,bil->oi", dout, x)


def _cat_channels(parts: Tuple[Tensor, ...], like: Tensor) -> Tensor:
    """(B, C_i, L) parts joined along the channels, in ``like``'s layout."""
    if _channel_minor(like):
        return torch.cat([p.transpose(1, 2) for p in parts], dim=2).transpose(1, 2)
    return torch.cat(parts, dim=1)


def _projections(u: Tensor, x_proj_weight: Tensor, dt_proj_weight: Tensor
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """dt (B, R, L), B and C (B, N, L) from x_proj, and delta (B, E, L) from dt_proj."""
    rank = dt_proj_weight.shape[1]
    state = (x_proj_weight.shape[0] - rank) // 2
    dt, b_ssm, c_ssm = channel_matmul(x_proj_weight, u).split([rank, state, state], dim=1)
    return dt, b_ssm, c_ssm, channel_matmul(dt_proj_weight, dt)


def channel_minor_output(backend: str, x: Tensor) -> bool:
    """Whether ``ssm_direction`` should answer channel-minor: where the compiled CPU scan
    runs, which writes it so (and out_proj reads it so, without a copy); contiguous
    elsewhere, as the GPU kernels write it."""
    return backend == "torch" and x.device.type == "cpu" and compiled_cpu_scan_available()


@torch.library.custom_op("mambar::ssm_direction", mutates_args=())
def ssm_direction(x: Tensor, z: Tensor, conv_weight: Tensor, conv_bias: Tensor,
                  x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_proj_bias: Tensor,
                  A_log: Tensor, D: Tensor, reverse: bool, backend: str,
                  channel_minor: bool) -> Tensor:
    """One direction of the mixer, (B, E, L) in x's dtype: channel-minor with
    ``channel_minor`` (``channel_minor_output`` says where that saves copies), contiguous
    otherwise. ``backend`` is a concrete scan backend (``selective_scan.resolve_backend``).
    The layout is an argument, not decided inside, so that it is part of every traced graph
    (and of the keys of Inductor's cache)."""
    forward, _ = scan_kernels(backend, x.device)
    conv_forward, _ = conv_kernels(backend, x)
    with without_autocast(x.device):
        u = conv_forward(x, conv_weight, conv_bias, reverse)
        _, b_ssm, c_ssm, delta = _projections(u, x_proj_weight, dt_proj_weight)
        with torch.profiler.record_function(SCAN_RANGE):
            out = forward(u, delta, -torch.exp(A_log.float()), b_ssm, c_ssm, D.float(), z,
                          dt_proj_bias.float(), True, reverse)
    if channel_minor:
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    return out.contiguous()


@ssm_direction.register_fake
def _(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
      reverse, backend, channel_minor):
    if channel_minor:
        return x.new_empty(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2)
    return x.new_empty(x.shape)


@torch.library.custom_op("mambar::ssm_direction_backward", mutates_args=())
def ssm_direction_backward(dout: Tensor, x: Tensor, z: Tensor, conv_weight: Tensor,
                           conv_bias: Tensor, x_proj_weight: Tensor, dt_proj_weight: Tensor,
                           dt_proj_bias: Tensor, A_log: Tensor, D: Tensor, reverse: bool,
                           backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                  Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``ssm_direction`` for its tensor inputs, in their order and dtypes."""
    _, backward = scan_kernels(backend, x.device)
    conv_forward, conv_backward = conv_kernels(backend, x)
    with without_autocast(x.device):
        with torch.profiler.record_function(RECOMPUTE_RANGE):
            u = conv_forward(x, conv_weight, conv_bias, reverse)
            dt, b_ssm, c_ssm, delta = _projections(u, x_proj_weight, dt_proj_weight)
        a = -torch.exp(A_log.float())
        with torch.profiler.record_function(SCAN_BACKWARD_RANGE):
            du, ddelta, da, db, dc, dd, dz, dbias = backward(
                u, delta, a, b_ssm, c_ssm, D.float(), z, dt_proj_bias.float(), dout, True,
                reverse)
        # Back through delta = W_dt dt and (dt, B, C) = W_x u, weights summed over the batch.
        ddelta = ddelta.to(u.dtype)
        ddt_proj = _weight_grad(ddelta, dt)
        dx_dbl = _cat_channels((channel_matmul(dt_proj_weight.t(), ddelta), db.to(u.dtype),
                                dc.to(u.dtype)), like=ddelta)
        dx_proj = _weight_grad(dx_dbl, u)
        du = du.to(u.dtype) + channel_matmul(x_proj_weight.t(), dx_dbl)
        dx, dconv_weight, dconv_bias = conv_backward(du, x, conv_weight, conv_bias, reverse)
    grads = (dx, dz, dconv_weight, dconv_bias, dx_proj, ddt_proj, dbias, da * a, dd)
    like = (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, like))


@ssm_direction_backward.register_fake
def _(dout, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log,
      D, reverse, backend):
    return tuple(t.new_empty(t.shape) for t in (x, z, conv_weight, conv_bias, x_proj_weight,
                                                dt_proj_weight, dt_proj_bias, A_log, D))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.flags = inputs[9:11]            # reverse, backend


def _backward(ctx, dout):
    grads = torch.ops.mambar.ssm_direction_backward(dout, *ctx.saved_tensors, *ctx.flags)
    return (*grads, None, None, None)


ssm_direction.register_autograd(_backward, setup_context=_setup_context)
