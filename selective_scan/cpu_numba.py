"""Compiled CPU selective scan (Numba): one fused pass per time step, all cores busy.

The PyTorch loop (``loop.py``) issues a dozen small ATen ops per time step; at
the model's sizes each costs more in dispatch and memory round trips than in arithmetic. Here
each (image, block of ``BLOCK`` channels) job keeps its (states x channels) slab in L1 and does
the decay, the input term, the state update and the C contraction of a step in one loop nest
that LLVM vectorises over the channels; what needs no state (softplus, the SiLU gate, the skip
term) runs before or after the time loop, over the job's whole (L, channels) tile, so that it
vectorises too. Jobs are independent, so they are split between threads; the kernels release
the GIL, and plain Python threads run them (no second OpenMP runtime next to PyTorch's).

The backward keeps nothing from the forward but its inputs: each job re-runs its forward into
a scratch of (L, N, BLOCK) states and decays (1.7 MB at L = 208, streamed through L2), then
walks the adjoint recurrence back through it. Sums over batch and time (dA, dD, d bias) go
into per-task buffers that are added up afterwards, so tasks never write the same memory; so
do the sums over channels (dB, dC), unless every task has whole images.

exp and log1p are polynomials (fp32: exp within 1 ulp, softplus within 4) written in plain
arithmetic and one integer-to-float bitcast, so that they vectorise; libm's are scalar calls.
Compiled code is cached in ``__pycache__`` (``cache=True``): a machine compiles once.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import threading
from typing import List, Optional, Tuple

import numba
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload


# Channels per job: the vector lanes of the inner loops (4 AVX-512 or 8 AVX2 vectors). Wider
# than one vector so that the backward's two sums over channels per (step, state) are spread
# over more work: a Tiny-sized backward ran faster with 64 channels per job than with 16.
BLOCK = 64
# Compiler flags: reassociation lets LLVM vectorise the sums over channels; contraction gives
# FMAs. No 'nnan'/'ninf': inf and nan must propagate as in the other backends.
_FAST = {"reassoc", "contract"}
_JIT = dict(nogil=True, cache=True, fastmath=_FAST, error_model="numpy", boundscheck=False)

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_TWENTY = np.float32(20.0)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)         # ln 2 split so that k * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    """Reinterpret an int32's bits as a float32 (builds 2^k for exp)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


def _exp(x):
    """exp(x) in x's precision, vectorisable in fp32 (see module docstring)."""
    raise NotImplementedError("only callable from compiled code")


@overload(_exp, jit_options=_JIT)
def _exp_overload(x):
    if x == types.float64:
        return lambda x: math.exp(x)
    if x != types.float32:
        return None

    def exp32(x):
        # Everything stays fp32 (a float64 or int64 step would halve the vector width):
        # np.floor, not math.floor (an int), and 2^k's bit pattern (k + 127) * 2^23 is built
        # in fp32, where it is exact, then converted once. Clamping x to [-88, 89] sends +-inf
        # through the same path (min and max keep nan, which the product carries out) and
        # keeps k in [-127, 128], where 2^k is exactly 0 or inf at the ends: no compares.
        xc = min(max(x, np.float32(-88.0)), np.float32(89.0))
        k = np.floor(xc * _LOG2E + np.float32(0.5))
        r = xc - k * _LN2_HI - k * _LN2_LO                     # |r| <= ln2 / 2
        p = np.float32(1.3843559e-3)                           # 1 + r q(r), q minimax
        p = p * r + np.float32(8.3742356e-3)
        p = p * r + np.float32(4.1668009e-2)
        p = p * r + np.float32(1.6666430e-1)
        p = p * r + np.float32(4.9999994e-1)
        p = p * r + _ONE
        p = p * r + _ONE
        return p * _int32_bits_as_float32(np.int32((k + np.float32(127.0)) * np.float32(8388608.0)))
    return exp32


def _log1p(y):
    """log(1 + y) for y in [0, 1], in y's precision, vectorisable in fp32."""
    raise NotImplementedError("only callable from compiled code")


@overload(_log1p, jit_options=_JIT)
def _log1p_overload(y):
    if y == types.float64:
        return lambda y: math.log1p(y)
    if y != types.float32:
        return None

    def log1p32(y):
        # log(1 + y) = 2 atanh(s), s = y / (2 + y) <= 1/3: the odd series to s^13 leaves
        # under 2e-8 relative (the next term is s^15 / 15).
        s = y / (np.float32(2.0) + y)
        s2 = s * s
        p = np.float32(1.0 / 13.0)
        p = p * s2 + np.float32(1.0 / 11.0)
        p = p * s2 + np.float32(1.0 / 9.0)
        p = p * s2 + np.float32(1.0 / 7.0)
        p = p * s2 + np.float32(1.0 / 5.0)
        p = p * s2 + np.float32(1.0 / 3.0)
        return (s + s) * (p * s2) + (s + s)
    return log1p32


@numba.njit(**_JIT)
def _softplus_sigmoid(x):
    """softplus(x) (x itself above 20, as F.softplus) and its derivative sigmoid(x)."""
    y = _exp(-abs(x))
    sp = max(x, _ZERO) + _log1p(y)
    sig = (_ONE if x >= _ZERO else y) / (_ONE + y)
    return (x if x > _TWENTY else sp), sig


# Indices are unsigned throughout the kernels: a signed index gets Python's negative-index
# wraparound, a select per lane that turns every vector load into a gather. (uint64 with an
# int literal would become float64 in Numba; hence the typed constants.)
_U = np.uint64
_U1 = np.uint64(1)
_U2 = np.uint64(2)


@numba.njit(**_JIT)
def _tokens(operand):
    """L of a (B, E, L) operand, an (array, channel_minor) pair (see ``_operand``)."""
    array, channel_minor = operand
    return _U(array.shape[1]) if channel_minor else _U(array.shape[2])


@numba.njit(**_JIT)
def _load_tile(src, b, e0, tile):
    """tile[t, e] = channel e0 + e, token t of image b of the operand ``src``; zeros for the
    channels past E. Copying a job's (L x channels) tile here, in L1, replaces a transposed
    copy of the whole tensor (slow in ATen at the model's sizes)."""
    array, channel_minor = src
    length, width = _U(tile.shape[0]), _U(tile.shape[1])
    if channel_minor:               # (B, L, E): rows of the tile are runs of the array
        have = min(width, _U(array.shape[2]) - e0)
        for t in range(length):
            for e in range(have):
                tile[t, e] = array[b, t, e0 + e]
    else:
        have = min(width, _U(array.shape[1]) - e0)
        for e in range(have):
            for t in range(length):
                tile[t, e] = array[b, e0 + e, t]
    for t in range(length):
        for e in range(have, width):
            tile[t, e] = 0


@numba.njit(**_JIT)
def _store_tile(tile, dst, b, e0):
    """Channel e0 + e, token t of image b of the operand ``dst`` = tile[t, e], for the
    channels it has."""
    array, channel_minor = dst
    length, width = _U(tile.shape[0]), _U(tile.shape[1])
    if channel_minor:
        have = min(width, _U(array.shape[2]) - e0)
        for t in range(length):
            for e in range(have):
                array[b, t, e0 + e] = tile[t, e]
    else:
        have = min(width, _U(array.shape[1]) - e0)
        for e in range(have):
            for t in range(length):
                array[b, e0 + e, t] = tile[t, e]


@numba.njit(**_JIT)
def _dt_tile(xs, bias, e0, softplus, dts, dts_dx):
    """dts = softplus(xs + bias) (xs + bias without ``softplus``) over a job's (L, channels)
    tile, and the derivative into dts_dx when it has rows. One loop nest per case: with the
    flag tested inside the per-step channel loop, LLVM left the backward's copy of it
    scalar."""
    length, width = _U(xs.shape[0]), _U(xs.shape[1])
    slope = dts_dx.shape[0] > 0
    if softplus and slope:
        for t in range(length):
            for e in range(width):
                dts[t, e], dts_dx[t, e] = _softplus_sigmoid(xs[t, e] + bias[e0 + e])
    elif softplus:
        for t in range(length):
            for e in range(width):
                dts[t, e] = _softplus_sigmoid(xs[t, e] + bias[e0 + e])[0]
    else:
        for t in range(length):
            for e in range(width):
                dts[t, e] = xs[t, e] + bias[e0 + e]
        if slope:
            dts_dx[:] = 1


@numba.njit(**_JIT)
def _forward_jobs(first, last, block, u, delta, bias, z, a_t, b_t, c_t, d, softplus, reverse,
                  out):
    """Jobs [first, last) of the forward: job j is batch j // blocks, channels
    block * (j % blocks) + [0, block). (B, E, L) operands (``_operand``): u, delta (before
    bias and softplus), z, out. Padded with zeros to whole blocks: (E + pad,) bias, d;
    (N, E + pad) a_t. (B, L, N): b_t, c_t. z's array may be empty (no gate); d is zeros
    without a skip term. Plain indexing only: a slice in a loop costs an atomic reference
    count."""
    length, states = _tokens(u), _U(a_t.shape[0])
    width = _U(block)       # an argument, not a constant: LLVM would unroll, not vectorise
    blocks = _U(a_t.shape[1]) // width
    gate = z[0].shape[0] > 0
    dtype = b_t.dtype
    h = np.zeros((states, width), dtype)
    # The job's tiles, indexed by time t, time-major so that the channels are the vector
    # lanes; the time loop touches only its step's rows.
    us = np.empty((length, width), dtype)
    xs = np.empty((length, width), dtype)
    zs = np.empty((length, width), dtype)
    dts = np.empty((length, width), dtype)
    dtus = np.empty((length, width), dtype)
    ys = np.empty((length, width), dtype)
    no_slope = np.empty((0, 0), dtype)
    for job in range(_U(first), _U(last)):
        b, e0 = job // blocks, (job % blocks) * width
        _load_tile(u, b, e0, us)
        _load_tile(delta, b, e0, xs)
        _dt_tile(xs, bias, e0, softplus, dts, no_slope)
        for t in range(length):
            for e in range(width):
                dtus[t, e] = dts[t, e] * us[t, e]
                ys[t, e] = d[e0 + e] * us[t, e]         # the skip term; the states add on
        h[:] = 0
        for s in range(length):
            t = length - _U1 - s if reverse else s
            for n in range(states):
                bn, cn = b_t[b, t, n], c_t[b, t, n]
                for e in range(width):
                    hv = _exp(dts[t, e] * a_t[n, e0 + e]) * h[n, e] + dtus[t, e] * bn
                    h[n, e] = hv
                    ys[t, e] += hv * cn
        if gate:
            _load_tile(z, b, e0, zs)
            for t in range(length):
                for e in range(width):
                    zv = zs[t, e]
                    ys[t, e] = ys[t, e] * zv / (_ONE + _exp(-zv))
        _store_tile(ys, out, b, e0)


@numba.njit(**_JIT)
def _backward_jobs(first, last, block, u, delta, bias, z, a_t, b_t, c_t, d, softplus, reverse,
                   dout, du, ddelta, dz, da, db, dc, dd, dbias):
    """Jobs [first, last) of the backward (arguments and job numbering as the forward; dout,
    du, ddelta and dz are operands too). Writes du, ddelta and dz for its own channels; adds
    into this task's da (N, E + pad), db, dc (B, L, N), dd and dbias (E + pad,)."""
    length, states = _tokens(u), _U(a_t.shape[0])
    width = _U(block)
    blocks = _U(a_t.shape[1]) // width
    gate = z[0].shape[0] > 0
    dtype = b_t.dtype
    # Step s: its decays in row s, the state before it in row s of hs (row 0 stays zero).
    hs = np.zeros((length + _U1, states, width), dtype)
    decays = np.empty((length, states, width), dtype)
    carry = np.empty((states, width), dtype)         # exp(dt_{s+1} A) g_{s+1}
    # The job's tiles, indexed by time t, time-major: the inputs; dt, softplus' (dts_dx),
    # dt u, the gate's sigmoid, y, dL/dy; the sums over states of g B and g exp(dt A) h A;
    # the outputs.
    us = np.empty((length, width), dtype)
    xs = np.empty((length, width), dtype)
    zs = np.empty((length, width), dtype)
    gos = np.empty((length, width), dtype)
    dts = np.empty((length, width), dtype)
    dts_dx = np.empty((length, width), dtype)
    dtus = np.empty((length, width), dtype)
    sigs = np.empty((length, width), dtype)
    ys = np.empty((length, width), dtype)
    dys = np.empty((length, width), dtype)
    g_bs = np.empty((length, width), dtype)
    g_dts = np.empty((length, width), dtype)
    dus = np.empty((length, width), dtype)
    dxs = np.empty((length, width), dtype)
    dzs = np.empty((length, width), dtype)
    for job in range(_U(first), _U(last)):
        b, e0 = job // blocks, (job % blocks) * width
        _load_tile(u, b, e0, us)
        _load_tile(delta, b, e0, xs)
        _load_tile(dout, b, e0, gos)
        _dt_tile(xs, bias, e0, softplus, dts, dts_dx)
        # One pass over the tile before the re-run: dt u, y's skip term, the zeroed sums and
        # dL/dy, which needs z only, so that dC comes with the re-run.
        if gate:
            _load_tile(z, b, e0, zs)
            for t in range(length):
                for e in range(width):
                    dtus[t, e] = dts[t, e] * us[t, e]
                    ys[t, e] = d[e0 + e] * us[t, e]
                    g_bs[t, e] = 0
                    g_dts[t, e] = 0
                    sig = _ONE / (_ONE + _exp(-zs[t, e]))
                    sigs[t, e] = sig
                    dys[t, e] = gos[t, e] * zs[t, e] * sig
        else:
            for t in range(length):
                for e in range(width):
                    dtus[t, e] = dts[t, e] * us[t, e]
                    g_bs[t, e] = 0
                    g_dts[t, e] = 0
                    dys[t, e] = gos[t, e]
        # Re-run the forward, keeping every state and decay.
        for s in range(length):
            t = length - _U1 - s if reverse else s
            for n in range(states):
                bn, cn = b_t[b, t, n], c_t[b, t, n]
                sum_c = _ZERO
                for e in range(width):
                    dec = _exp(dts[t, e] * a_t[n, e0 + e])
                    hv = dec * hs[s, n, e] + dtus[t, e] * bn
                    decays[s, n, e] = dec
                    hs[s + _U1, n, e] = hv
                    ys[t, e] += hv * cn
                    sum_c += dys[t, e] * hv
                dc[b, t, n] += sum_c
        if gate:
            for t in range(length):
                for e in range(width):
                    zv, sig = zs[t, e], sigs[t, e]
                    dzs[t, e] = gos[t, e] * ys[t, e] * sig * (_ONE + zv * (_ONE - sig))
        # Adjoint, walked against the scan: g_s = dy_s C_s + exp(dt_{s+1} A) g_{s+1}; and
        # p = g_s exp(dt_s A) h_{s-1} = dL/d(dt_s A).
        carry[:] = 0
        for r in range(length):
            s = length - _U1 - r
            t = length - _U1 - s if reverse else s
            for n in range(states):
                bn, cn = b_t[b, t, n], c_t[b, t, n]
                sum_b = _ZERO
                for e in range(width):
                    gv = dys[t, e] * cn + carry[n, e]
                    k = decays[s, n, e] * gv
                    carry[n, e] = k
                    p = k * hs[s, n, e]
                    g_bs[t, e] += gv * bn
                    g_dts[t, e] += p * a_t[n, e0 + e]
                    da[n, e0 + e] += p * dts[t, e]
                    sum_b += gv * dtus[t, e]
                db[b, t, n] += sum_b
        for t in range(length):
            for e in range(width):
                gx = (us[t, e] * g_bs[t, e] + g_dts[t, e]) * dts_dx[t, e]
                dxs[t, e] = gx
                dbias[e0 + e] += gx
                dus[t, e] = dts[t, e] * g_bs[t, e] + d[e0 + e] * dys[t, e]
                dd[e0 + e] += dys[t, e] * us[t, e]
        _store_tile(dus, du, b, e0)
        _store_tile(dxs, ddelta, b, e0)
        if gate:
            _store_tile(dzs, dz, b, e0)


@numba.njit(**_JIT)
def _conv_pre(xs, w_t, bias, e0, reverse, pre):
    """pre[t, e] = bias + sum_k w[k] x[t - (K-1) + k] for the job's tile ``xs`` (time-major),
    zeros outside the sequence; with ``reverse`` the anti-causal twin, x[t + (K-1) - k]."""
    length, width, taps = _U(xs.shape[0]), _U(xs.shape[1]), _U(w_t.shape[0])
    for t in range(length):
        for e in range(width):
            pre[t, e] = bias[e0 + e]
    for k in range(taps):
        shift = taps - _U1 - k
        for t in range(length - shift if length > shift else _U(0)):
            src, dst = (t + shift, t) if reverse else (t, t + shift)
            for e in range(width):
                pre[dst, e] += w_t[k, e0 + e] * xs[src, e]


@numba.njit(**_JIT)
def _conv_silu_jobs(first, last, block, x, w_t, bias, reverse, out):
    """Jobs [first, last) of u = SiLU(depthwise conv(x)), numbered as the scan's: (B, E, L)
    operands ``x`` and ``out``, (K, E + pad) ``w_t``, (E + pad,) ``bias``."""
    length = _tokens(x)
    width = _U(block)
    blocks = _U(w_t.shape[1]) // width
    xs = np.empty((length, width), w_t.dtype)
    pre = np.empty((length, width), w_t.dtype)
    for job in range(_U(first), _U(last)):
        b, e0 = job // blocks, (job % blocks) * width
        _load_tile(x, b, e0, xs)
        _conv_pre(xs, w_t, bias, e0, reverse, pre)
        for t in range(length):
            for e in range(width):
                p = pre[t, e]
                pre[t, e] = p / (_ONE + _exp(-p))
        _store_tile(pre, out, b, e0)


@numba.njit(**_JIT)
def _conv_silu_backward_jobs(first, last, block, x, w_t, bias, reverse, du, dx, dw, dbias):
    """Jobs [first, last) of the backward of ``_conv_silu_jobs`` (which it re-runs up to the
    pre-activation): writes dx for its channels, adds into this task's dw (K, E + pad) and
    dbias (E + pad,). ``x``, ``du`` and ``dx`` are (B, E, L) operands."""
    length, taps = _tokens(x), _U(w_t.shape[0])
    width = _U(block)
    blocks = _U(w_t.shape[1]) // width
    xs = np.empty((length, width), w_t.dtype)
    pre = np.empty((length, width), w_t.dtype)
    dpre = np.empty((length, width), w_t.dtype)
    dxs = np.empty((length, width), w_t.dtype)
    for job in range(_U(first), _U(last)):
        b, e0 = job // blocks, (job % blocks) * width
        _load_tile(x, b, e0, xs)
        _load_tile(du, b, e0, dpre)
        _conv_pre(xs, w_t, bias, e0, reverse, pre)
        for t in range(length):
            for e in range(width):
                p = pre[t, e]
                sig = _ONE / (_ONE + _exp(-p))
                g = dpre[t, e] * sig * (_ONE + p * (_ONE - sig))     # SiLU'(p) = s (1 + p (1 - s))
                dpre[t, e] = g
                dbias[e0 + e] += g
                dxs[t, e] = 0
        for k in range(taps):
            shift = taps - _U1 - k
            for t in range(length - shift if length > shift else _U(0)):
                src, dst = (t + shift, t) if reverse else (t, t + shift)
                for e in range(width):
                    dw[k, e0 + e] += dpre[dst, e] * xs[src, e]
                    dxs[src, e] += w_t[k, e0 + e] * dpre[dst, e]
        _store_tile(dxs, dx, b, e0)


_POOL: Optional[concurrent.futures.ThreadPoolExecutor] = None
_POOL_WORKERS = 0
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """One pool per process, rebuilt when torch's thread count changes."""
    global _POOL, _POOL_WORKERS
    with _POOL_LOCK:
        if _POOL is None or _POOL_WORKERS != workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = concurrent.futures.ThreadPoolExecutor(workers, "mambar-scan")
            _POOL_WORKERS = workers
        return _POOL


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there, so build a new one."""
    global _POOL, _POOL_WORKERS, _POOL_LOCK
    _POOL, _POOL_WORKERS, _POOL_LOCK = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _split(jobs: int, threads: int, unit: int = 1) -> List[Tuple[int, int]]:
    """Contiguous job ranges, a few per thread so that a thread slowed by another process
    on its core does not hold up the rest; whole units of ``unit`` jobs each (an image's
    channel blocks) where there are at least as many units as ranges."""
    tasks = min(jobs, threads * 4 if threads > 1 else 1)
    units = jobs // unit
    if units >= tasks and units * unit == jobs:
        bounds = [unit * (units * i // tasks) for i in range(tasks + 1)]
    else:
        bounds = [jobs * i // tasks for i in range(tasks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _run(kernel, ranges: List[Tuple[int, int]], per_task) -> None:
    """``kernel(first, last, *per_task(i))`` for every range, on torch's thread count: the
    calling thread and the pool's take the ranges in turn. The caller starts at once rather
    than waiting for woken workers (a wake-up costs as much as a small call's work)."""
    threads = min(torch.get_num_threads(), len(ranges))
    if threads <= 1:
        for i, (first, last) in enumerate(ranges):
            kernel(first, last, *per_task(i))
        return
    queue = iter(range(len(ranges)))
    lock = threading.Lock()

    def take_ranges() -> None:
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                return
            kernel(*ranges[i], *per_task(i))

    helpers = [_pool(threads - 1).submit(take_ranges) for _ in range(threads - 1)]
    take_ranges()
    for helper in helpers:
        helper.result()


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _padded(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Contiguous, with ``pad`` zeros appended to the last dimension."""
    return F.pad(t, (0, pad)).contiguous() if pad else t.contiguous()


def _per_channel(vector: Optional[torch.Tensor], dim: int, pad: int, work: torch.dtype
                 ) -> torch.Tensor:
    """A per-channel vector (a bias, D) as the kernels take it: (dim + pad,) in ``work``,
    zeros if absent."""
    return (_padded(vector.to(work), pad) if vector is not None
            else torch.zeros(dim + pad, dtype=work))


def _array(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of ``t``, strides and all (the kernels read any layout)."""
    return t.detach().numpy()


def _operand(t: torch.Tensor) -> Tuple[np.ndarray, bool]:
    """A (B, E, L) tensor as the kernels take it, (array, channel_minor): stored with the
    channels innermost, as its (B, L, E) view, whose rows the tile copies move as vectors
    (several times faster than a (B, E, L) one, transposed element by element); otherwise
    as (B, E, L). Either may have any strides."""
    if t.stride(1) < t.stride(2):
        return _array(t.transpose(1, 2)), True
    return _array(t), False


def _empty_channel_minor(batch: int, dim: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (B, E, L) tensor stored as (B, L, E): how the kernels write the
    results that go on to the projections (``mixer_op.channel_matmul``) and back."""
    return torch.empty(batch, length, dim, dtype=dtype).transpose(1, 2)


class _Inputs:
    """The kernels' view of one call, fp32 (fp64 for fp64 input). The (B, E, L) tensors keep
    their layout (each job copies its own tile); the small ones are channel-minor and padded
    with zeros to a multiple of BLOCK channels (a padded channel has u = 0 and so adds
    nothing, and its outputs are not stored)."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias):
        self.work = work = _work_dtype(u)
        self.batch, self.dim, self.length = u.shape
        self.pad = -self.dim % BLOCK
        self.u, self.delta = u.to(work), delta.to(work)
        self.bias = _per_channel(delta_bias, self.dim, self.pad, work)
        self.a_t = _padded(A.to(work).t(), self.pad)                          # (N, E + pad)
        self.b_t = B.to(work).transpose(1, 2).contiguous()                    # (B, L, N)
        self.c_t = C.to(work).transpose(1, 2).contiguous()
        self.d = _per_channel(D, self.dim, self.pad, work)
        self.z = _operand(z.to(work) if z is not None else torch.empty(0, 0, 0, dtype=work))

    def arrays(self) -> tuple:
        """The kernels' arguments from ``block`` to ``d``."""
        return (BLOCK, _operand(self.u), _operand(self.delta), _array(self.bias), self.z) + tuple(
            _array(t) for t in (self.a_t, self.b_t, self.c_t, self.d))

    def jobs(self) -> int:
        return self.batch * (self.dim + self.pad) // BLOCK

    def output(self) -> torch.Tensor:
        """A contiguous (B, E, L) result in the working dtype."""
        return torch.empty(self.batch, self.dim, self.length, dtype=self.work)

    def channel_minor_output(self) -> torch.Tensor:
        """A channel-minor (B, E, L) result in the working dtype."""
        return _empty_channel_minor(self.batch, self.dim, self.length, self.work)


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    """The scan's output (B, E, L), channel-minor (as out_proj reads it), in u's dtype;
    nothing is kept."""
    x = _Inputs(u, delta, A, B, C, D, z, delta_bias)
    out = x.channel_minor_output()
    arrays = x.arrays() + (bool(delta_softplus), bool(reverse), _operand(out))
    _run(_forward_jobs, _split(x.jobs(), torch.get_num_threads()), lambda i: arrays)
    return out.to(u.dtype)


def scan_backward(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, reverse):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, d delta_bias) from the inputs and dout;
    None for an absent optional input. du and ddelta are channel-minor, for the projections
    they go back through; dz is contiguous. Each job re-runs its forward first."""
    x = _Inputs(u, delta, A, B, C, D, z, delta_bias)
    du, ddelta = x.channel_minor_output(), x.channel_minor_output()
    dz = x.output() if z is not None else torch.empty(0, 0, 0, dtype=x.work)
    blocks = (x.dim + x.pad) // BLOCK
    ranges = _split(x.jobs(), torch.get_num_threads(), unit=blocks)
    # Sums per task, added up below, since tasks share channels; and images, unless every
    # task has whole ones: then dB and dC (per image) go straight into one buffer.
    tasks = len(ranges)
    image_rows = 1 if all(first % blocks == 0 for first, _ in ranges) else tasks
    sums = [x.u.new_zeros(rows, *t.shape) for rows, t in (
        (tasks, x.a_t), (image_rows, x.b_t), (image_rows, x.c_t), (tasks, x.bias),
        (tasks, x.bias))]
    arrays = x.arrays() + (bool(delta_softplus), bool(reverse)) + tuple(
        _operand(t) for t in (dout.to(x.work), du, ddelta, dz))
    per_task = [t.numpy() for t in sums]     # indexed in NumPy: cheaper than a slice's .numpy()
    _run(_backward_jobs, ranges, lambda i: arrays + tuple(a[min(i, len(a) - 1)]
                                                          for a in per_task))
    da, db, dc, dd, dbias = (t.sum(0) for t in sums)
    return (du.to(u.dtype), ddelta.to(delta.dtype),
            da[:, :x.dim].t().to(A.dtype), db.transpose(1, 2).to(B.dtype),
            dc.transpose(1, 2).to(C.dtype), None if D is None else dd[:x.dim].to(D.dtype),
            None if z is None else dz.to(z.dtype),
            None if delta_bias is None else dbias[:x.dim].to(delta_bias.dtype))


def _conv_inputs(x, weight, bias):
    """x in the working dtype (layout kept), the (K, E + pad) taps and (E + pad,) bias."""
    work = _work_dtype(x)
    pad = -x.shape[1] % BLOCK
    w_t = _padded(weight.to(work)[:, 0].t(), pad)
    return x.to(work), w_t, _per_channel(bias, x.shape[1], pad, work)


def conv_silu_forward(x, weight, bias, reverse):
    """SiLU(causal depthwise conv(x)), (B, E, L) -> channel-minor (B, E, L) in x's dtype (u,
    as the projections and the scan read it best), for a (E, 1, K) weight (anti-causal with
    ``reverse``); as ``mixer_op.conv_silu``, in one pass instead of oneDNN's conv, a slice
    and a SiLU."""
    xw, w_t, b = _conv_inputs(x, weight, bias)
    out = _empty_channel_minor(*xw.shape, dtype=xw.dtype)
    arrays = (BLOCK, _operand(xw), _array(w_t), _array(b), bool(reverse), _operand(out))
    jobs = x.shape[0] * w_t.shape[1] // BLOCK
    _run(_conv_silu_jobs, _split(jobs, torch.get_num_threads()), lambda i: arrays)
    return out.to(x.dtype)


def conv_silu_backward(du, x, weight, bias, reverse):
    """Gradients (dx, dweight (E, 1, K), dbias) of ``conv_silu_forward`` from that of u;
    the pre-activation is recomputed from x. oneDNN's depthwise conv backward takes 10x its
    forward at the model's sizes; this takes about as long as the forward."""
    xw, w_t, b = _conv_inputs(x, weight, bias)
    dx = torch.empty(xw.shape, dtype=xw.dtype)
    jobs = x.shape[0] * w_t.shape[1] // BLOCK
    ranges = _split(jobs, torch.get_num_threads())
    dws, dbs = xw.new_zeros(len(ranges), *w_t.shape), xw.new_zeros(len(ranges), *b.shape)
    arrays = (BLOCK, _operand(xw), _array(w_t), _array(b), bool(reverse),
              _operand(du.to(xw.dtype)), _operand(dx))
    dws_np, dbs_np = dws.numpy(), dbs.numpy()
    _run(_conv_silu_backward_jobs, ranges, lambda i: arrays + (dws_np[i], dbs_np[i]))
    dim = x.shape[1]
    dweight = dws.sum(0)[:, :dim].t().unsqueeze(1).to(weight.dtype)
    return (dx.to(x.dtype), dweight,
            None if bias is None else dbs.sum(0)[:dim].to(bias.dtype))
