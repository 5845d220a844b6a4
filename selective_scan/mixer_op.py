"""The mixer's two scan directions as one ``torch.library`` custom op, for every backend.

Each direction of the bidirectional mixer (``vision_mamba.BiMambaMixer``, whose reference path
spells out the same math) computes, from x and z (the two halves of in_proj's output xz):

    u      = SiLU(causal depthwise conv(x))          (anti-causal for the backward direction)
    dt, B, C = split(x_proj.weight @ u)
    delta  = dt_proj.weight @ dt                      (the bias and softplus are the scan's)
    y      = selective_scan(u, delta, A = -exp(A_log), B, C, D, z, dt_proj.bias)

and the mixer averages the two directions' y. ``mambar::bimamba`` does all of it in one op,
from xz (B, L, 2E) to the average (B, L, E). Why one op:

* ``torch.compile`` traces a custom op as a single node with a fake (shape-only)
  implementation and a registered autograd formula, so the compiled model has no graph
  breaks, whatever the scan backend runs inside (Numba, Triton or mamba-ssm's kernels).
* An op decides what its backward keeps. This one keeps only its inputs (xz and weights);
  ``mambar::bimamba_backward`` redoes the conv and the two projections (cheap) before each
  scan's backward, rather than holding u and delta, each the size of x, from the forward to
  the backward (Mamba®-B at batch 128: gigabytes).
* Both directions in one op write into one buffer each way, with no copy between: the first
  direction's scan writes ½ y into the (B, L, E) output that out_proj reads as it is, the
  second adds its ½ y there; in the backward the ½ is a scale on the scans' dout, and the two
  directions' dx and dz land in one (B, L, 2E) gradient, the layout of in_proj's output.

The scan backends provide a (forward, backward) kernel pair that needs only the inputs and
takes those output arguments (``selective_scan.scan_kernels``); so do the conv backends
(``conv_kernels``). The op's backward goes back through the projections and the conv by hand:
autograd does not record inside a custom op.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import compiled_cpu_scan_available, put, scan_kernels
from .cuda_kernels import causal_conv1d_silu, load_causal_conv1d

# Profiler ranges, so that benchmark.py can tell the scan's time from the rest of the op's.
SCAN_RANGE = "mambar.selective_scan"
SCAN_BACKWARD_RANGE = "mambar.selective_scan_backward"
RECOMPUTE_RANGE = "mambar.recompute"

# One direction's parameters, in the order the op takes them (then the other direction's).
DIRECTION_PARAMS = ("conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight",
                    "dt_proj_bias", "A_log", "D")


class Direction(NamedTuple):
    conv_weight: Tensor
    conv_bias: Tensor
    x_proj_weight: Tensor
    dt_proj_weight: Tensor
    dt_proj_bias: Tensor
    A_log: Tensor
    D: Tensor


def without_autocast(device: torch.device):
    """Autocast off, on devices that have it (the meta device, where timm builds models to
    inspect them, has none and refuses the context)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- the conv

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


def _into_dx(backward: Callable) -> Callable:
    """A conv backward that returns its own dx, under the ``dx=``/``accumulate`` arguments of
    the Triton conv's: dx is copied or added where asked."""
    def run(du, x, weight, bias, reverse, dx=None, accumulate=False):
        grad_x, grad_weight, grad_bias = backward(du, x, weight, bias, reverse)
        return put(grad_x, dx, accumulate=accumulate), grad_weight, grad_bias
    return run


def conv_kernels(backend: str, x: Tensor) -> Tuple[Callable, Callable]:
    """The (forward, backward) pair of SiLU(conv) for a concrete backend and input:
    ``forward(x, weight, bias, reverse) -> u`` and ``backward(du, x, weight, bias, reverse,
    dx=None, accumulate=False) -> (dx, dweight, dbias)``, dx written into (or added to) the
    given tensor. The ``triton`` backend runs the fused Triton conv (``triton_conv.py``: x read
    in place, u channel-minor, dW and db reduced in the kernel); causal-conv1d's kernel runs
    the ``cuda`` forward; on the CPU the compiled scan's module has the conv too (fp32/fp64),
    since oneDNN's depthwise conv backward costs 10x its forward at the model's sizes;
    PyTorch's conv everywhere else."""
    if backend == "triton":
        module = importlib.import_module(".triton_conv", __package__)
        return module.conv_silu_forward, module.conv_silu_backward
    if backend == "cuda" and load_causal_conv1d() is not None:
        # Its backward entry points changed between releases: PyTorch's conv goes back (the
        # same values to rounding).
        return causal_conv1d_silu, _into_dx(conv_silu_backward)
    if (backend == "torch" and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and compiled_cpu_scan_available()):
        module = importlib.import_module(".cpu_numba", __package__)
        return module.conv_silu_forward, _into_dx(module.conv_silu_backward)
    return conv_silu, _into_dx(conv_silu_backward)


# --------------------------------------------------------------------------- projections

def _channel_minor(x: Tensor) -> bool:
    """Whether (B, C, L) ``x`` is stored with its channels innermost, as (B, L, C)."""
    return x.stride(1) < x.stride(2)


def channel_matmul(weight: Tensor, x: Tensor) -> Tensor:
    """(O, I) @ (B, I, L) -> (B, O, L) in x's layout, the weight cast to x's dtype as autocast
    would: channels-first in and out by one bmm; channel-minor in and out, as the compiled
    CPU kernels and the Triton conv write them, by one GEMM over all B x L tokens."""
    weight = weight.to(x.dtype)
    if _channel_minor(x):
        return F.linear(x.transpose(1, 2), weight).transpose(1, 2)
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def _tokens(x: Tensor) -> Tensor:
    """A channel-minor (B, C, L) tensor as the (B x L, C) matrix it is stored as: a view
    where its images follow each other (``_stored_as_tokens``), a copy otherwise."""
    return x.transpose(1, 2).flatten(0, 1)


def _stored_as_tokens(x: Tensor) -> bool:
    """Whether (B, C, L) x is a (B x L, C) matrix with unit channel stride in memory."""
    return x.stride(1) == 1 and x.stride(0) == x.shape[2] * x.stride(2)


def _add_channel_matmul(acc: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """acc + weight @ x for (B, O, L) acc and (B, I, L) x; both stored as token matrices, one
    GEMM that adds into acc in place (its epilogue), else a product and an add."""
    if _stored_as_tokens(acc) and _stored_as_tokens(x):
        _tokens(acc).addmm_(_tokens(x), weight.to(x.dtype).t())
        return acc
    return acc + channel_matmul(weight, x)


def _weight_grad(dout: Tensor, x: Tensor) -> Tensor:
    """The gradient of an (O, I) weight from (B, O, L) output and (B, I, L) input gradients,
    summed over batch and tokens. Both channel-minor: one GEMM over all tokens, on views.
    Otherwise, in fp32/fp64, per-image products summed over the batch (an einsum first copies
    both operands into (channel, batch x token) layouts); in half precision one GEMM, so that
    the sum is rounded once."""
    if _channel_minor(dout) and _channel_minor(x):
        return _tokens(dout).t() @ _tokens(x)
    if x.dtype in (torch.float32, torch.float64):
        return torch.bmm(dout, x.transpose(1, 2)).sum(0)
    return torch.einsum("bol,bil->oi", dout, x)


def _zeros_like_layout(like: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    """Zeros (B, channels, L) laid out as (B, C, L) ``like`` is: channel-minor or not."""
    batch, _, length = like.shape
    if _channel_minor(like):
        return like.new_zeros(batch, length, channels, dtype=dtype).transpose(1, 2)
    return like.new_zeros(batch, channels, length, dtype=dtype)


def _projections(u: Tensor, x_proj_weight: Tensor, dt_proj_weight: Tensor
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """dt (B, R, L), B and C (B, N, L) from x_proj, and delta (B, E, L) from dt_proj."""
    rank = dt_proj_weight.shape[1]
    state = (x_proj_weight.shape[0] - rank) // 2
    dt, b_ssm, c_ssm = channel_matmul(x_proj_weight, u).split([rank, state, state], dim=1)
    return dt, b_ssm, c_ssm, channel_matmul(dt_proj_weight, dt)


# --------------------------------------------------------------------------- one direction

def _halves(xz: Tensor) -> Tuple[Tensor, Tensor]:
    """x and z, the channel halves of (B, L, 2E) xz, as channel-minor (B, E, L) views."""
    x, z = xz.transpose(1, 2).chunk(2, dim=1)
    return x, z


def _direction_forward(backend: str, x: Tensor, z: Tensor, p: Direction, reverse: bool,
                       out: Tensor) -> None:
    """Adds ½ y of one direction into ``out`` (the first direction writes it)."""
    forward, _ = scan_kernels(backend, x.device)
    conv_forward, _ = conv_kernels(backend, x)
    u = conv_forward(x, p.conv_weight, p.conv_bias, reverse)
    _, b_ssm, c_ssm, delta = _projections(u, p.x_proj_weight, p.dt_proj_weight)
    with torch.profiler.record_function(SCAN_RANGE):
        forward(u, delta, -torch.exp(p.A_log.float()), b_ssm, c_ssm, p.D.float(), z,
                p.dt_proj_bias.float(), True, reverse, out=out, out_scale=0.5,
                accumulate=reverse)


def _direction_backward(backend: str, dy: Tensor, x: Tensor, z: Tensor, p: Direction,
                        reverse: bool, dx: Tensor, dz: Tensor) -> List[Tensor]:
    """One direction's share of the gradients: dx and dz added into the given views (the
    first direction writes them), the direction's parameter gradients returned."""
    _, backward = scan_kernels(backend, x.device)
    conv_forward, conv_backward = conv_kernels(backend, x)
    with torch.profiler.record_function(RECOMPUTE_RANGE):
        u = conv_forward(x, p.conv_weight, p.conv_bias, reverse)
        # The projections' weights in u's dtype once: the recompute and the gradients use them.
        x_proj_weight, dt_proj_weight = p.x_proj_weight.to(u.dtype), p.dt_proj_weight.to(u.dtype)
        dt, b_ssm, c_ssm, delta = _projections(u, x_proj_weight, dt_proj_weight)
    a = -torch.exp(p.A_log.float())
    rank, state = dt.shape[1], b_ssm.shape[1]
    # d(dt, B, C) in one (B, R + 2N, L) buffer laid out like u: the scan adds dB and dC into
    # its last 2N channels (at least fp32, its sums' precision), dt_proj's backward fills the
    # first R.
    dx_dbl = _zeros_like_layout(u, rank + 2 * state, torch.promote_types(u.dtype, torch.float32))
    ddt, db, dc = dx_dbl.split([rank, state, state], dim=1)
    with torch.profiler.record_function(SCAN_BACKWARD_RANGE):
        du, ddelta, da, _, _, dd, _, dbias = backward(
            u, delta, a, b_ssm, c_ssm, p.D.float(), z, p.dt_proj_bias.float(), dy, True,
            reverse, dout_scale=0.5, dz=dz, dz_accumulate=reverse, dB=db, dC=dc)
    # Back through delta = W_dt dt and (dt, B, C) = W_x u, weights summed over the batch.
    ddelta = ddelta.to(u.dtype)
    ddt_proj = _weight_grad(ddelta, dt)
    ddt.copy_(channel_matmul(dt_proj_weight.t(), ddelta))
    dx_dbl = dx_dbl.to(u.dtype)
    dx_proj = _weight_grad(dx_dbl, u)
    du = _add_channel_matmul(du.to(u.dtype), x_proj_weight.t(), dx_dbl)
    _, dconv_weight, dconv_bias = conv_backward(du, x, p.conv_weight, p.conv_bias, reverse,
                                                dx=dx, accumulate=reverse)
    grads = (dconv_weight, dconv_bias, dx_proj, ddt_proj, dbias, da * a, dd)
    return [g.to(t.dtype).contiguous() for g, t in zip(grads, p)]


# --------------------------------------------------------------------------- the op

def _directions(params: Sequence[Tensor]) -> Tuple[Direction, Direction]:
    n = len(DIRECTION_PARAMS)
    return Direction(*params[:n]), Direction(*params[n:])


@torch.library.custom_op("mambar::bimamba", mutates_args=())
def bimamba(xz: Tensor, conv_weight: Tensor, conv_bias: Tensor, x_proj_weight: Tensor,
            dt_proj_weight: Tensor, dt_proj_bias: Tensor, A_log: Tensor, D: Tensor,
            conv_weight_b: Tensor, conv_bias_b: Tensor, x_proj_weight_b: Tensor,
            dt_proj_weight_b: Tensor, dt_proj_bias_b: Tensor, A_b_log: Tensor, D_b: Tensor,
            backend: str) -> Tensor:
    """Both directions of the mixer on in_proj's output xz (B, L, 2E): the mean of their
    scans, (B, L, E) in xz's dtype, the layout out_proj reads. The second direction's
    parameters end in ``_b``; ``backend`` is a concrete scan backend
    (``selective_scan.resolve_backend``)."""
    forward_params, backward_params = _directions((
        conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
        conv_weight_b, conv_bias_b, x_proj_weight_b, dt_proj_weight_b, dt_proj_bias_b,
        A_b_log, D_b))
    x, z = _halves(xz)
    out = xz.new_empty(xz.shape[0], xz.shape[1], x.shape[1])
    with without_autocast(xz.device):
        for reverse, params in ((False, forward_params), (True, backward_params)):
            _direction_forward(backend, x, z, params, reverse, out.transpose(1, 2))
    return out


@bimamba.register_fake
def _(xz, *params_and_backend):
    return xz.new_empty(xz.shape[0], xz.shape[1], xz.shape[2] // 2)


@torch.library.custom_op("mambar::bimamba_backward", mutates_args=())
def bimamba_backward(dout: Tensor, xz: Tensor, conv_weight: Tensor, conv_bias: Tensor,
                     x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_proj_bias: Tensor,
                     A_log: Tensor, D: Tensor, conv_weight_b: Tensor, conv_bias_b: Tensor,
                     x_proj_weight_b: Tensor, dt_proj_weight_b: Tensor,
                     dt_proj_bias_b: Tensor, A_b_log: Tensor, D_b: Tensor,
                     backend: str) -> List[Tensor]:
    """Gradients of ``bimamba`` for its tensor inputs, in their order and dtypes: dxz in
    xz's layout (B, L, 2E), both directions' dx and dz added in place."""
    forward_params, backward_params = _directions((
        conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
        conv_weight_b, conv_bias_b, x_proj_weight_b, dt_proj_weight_b, dt_proj_bias_b,
        A_b_log, D_b))
    x, z = _halves(xz)
    dxz = torch.empty_like(xz)
    dx, dz = _halves(dxz)
    dy = dout.transpose(1, 2)
    grads = [dxz]
    with without_autocast(xz.device):
        for reverse, params in ((False, forward_params), (True, backward_params)):
            grads += _direction_backward(backend, dy, x, z, params, reverse, dx, dz)
    return grads


@bimamba_backward.register_fake
def _(dout, xz, *params_and_backend):
    return [torch.empty_like(xz)] + [t.new_empty(t.shape) for t in params_and_backend[:-1]]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1])
    ctx.backend = inputs[-1]


def _backward(ctx, dout):
    grads = torch.ops.mambar.bimamba_backward(dout, *ctx.saved_tensors, ctx.backend)
    return (*grads, None)


bimamba.register_autograd(_backward, setup_context=_setup_context)
