"""Gluon kernels for the Mamba-1 selective scan (forward and backward), for sm_90+ GPUs.

Same functions, arguments and results as ``triton_kernels``' ``scan_forward`` and
``scan_backward`` (see ``selective_scan.selective_scan_reference`` for the math and layout),
written in Triton's Gluon dialect (``triton.experimental.gluon``), which, unlike plain
Triton, lets a kernel choose each tensor's register layout and address shared memory.

Design, and why:

* One channel per thread, all of its states in that thread's registers: a (channels, states)
  tile whose layout gives each thread one row. Sums over the states are then chains of fused
  multiply-adds in one thread, with no shuffles, and everything that depends on a (token,
  channel) only (softplus, the SiLU gate, u * delta, the skip term) is computed once, not
  once per state lane as in the plain-Triton kernels.
* B and C of a chunk are staged in shared memory, converted to fp32 once, by the whole
  program; each thread then reads a token's states as a broadcast (every thread of a warp
  reads the same address, so there is no bank conflict) instead of holding a replicated
  copy in registers.
* A chunk of a channel's tokens is loaded as one row of a (channels, tokens) tile (u, delta,
  z, dout are contiguous along time in the model) and its tokens taken out one by one with a
  select on a constant column index, which the compiler turns into register renaming; the
  outputs are put back into a tile the same way and stored once per chunk.
* Reverse scans load the same ascending tiles, ending at the sequence's end, and walk their
  columns from the last: reverse costs what forward costs, and strided views are read in
  place.
* The backward gets the inputs only (``selective_scan.scan_kernels``' contract: the mixer's
  custom op keeps nothing else). Pass 1 walks the chunks forward, writing delta after bias
  and softplus (fp32, once per token and channel) and the state at each chunk's end to
  scratch buffers that live for the call. Pass 2 walks the chunks last to first: it rebuilds
  a chunk's states once from the state before it, into shared memory (one row per thread)
  with their decays exp(delta A), and runs the adjoint back over them with the decays
  reused: two exponentials per state element in the backward (the plain-Triton backward
  also takes two, with its recompute in registers), and no flips, shifts or shuffles.
* dB = sum_e g delta u and dC = sum_e h dy are sums over channels. The adjoint leaves each
  g in the slot of the decay it has used up, the states stay in theirs, and delta u and dy
  go to shared memory as (tokens, channels) tiles; after one barrier the program sums the
  products with (token, state) pairs on the lanes and channels in each thread (fused
  multiply-adds), then adds them to HBM with one fp32 atomic per (batch, state, token) per
  program. The products are not formed in the adjoint: two multiplies and a store per state
  element fewer there, and ~60 fewer live registers in the two-warp backward.
* Why pass 1 stays: the contract gives the backward no states saved by the forward, and
  saving them densely enough to drop it does not fit the memory budget of a training step.
* Triton's interpreter (TRITON_INTERPRET=1) never wraps a Gluon function. The tests run these
  kernels' bodies under it through tests/gluon_interpreter.py, which gives layouts, shared
  memory and barriers their logical meaning: that checks their numbers on the CPU, not the
  barriers. On an sm_90+ GPU tests/test_selective_scan_gluon.py runs them compiled; what
  the compiler makes of them for sm_90a is counted by tools/kernel_stats.py.
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .triton_kernels import (BWD_KEY, BWD_RESET, BWD_RESTORE, FWD_KEY, FWD_RESTORE,
                             boundary_slots, launch_backward, launch_forward)

# Triton 3.6 (the GPU image) calls the CTA-wide barrier thread_barrier; 3.8 renamed it.
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
_LOG2E: gl.constexpr = gl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))
_LN2: gl.constexpr = gl.constexpr(0.6931471805599453)


@gluon.jit
def _column(tile, cols, j: gl.constexpr):
    """Column ``j`` of a tile whose rows live in single threads. Summed as integers, the
    other columns selected to 0 by a condition that is constant per register: x + 0 folds
    away, so this compiles to no instruction (in floating point, x + 0.0 is kept, since it
    turns -0.0 into +0.0)."""
    bits = gl.where(cols[None, :] == j, tile.to(gl.int32, bitcast=True), 0)
    return gl.sum(bits, axis=1).to(gl.float32, bitcast=True)


@gluon.jit
def _te(tile, cols, j: gl.constexpr, state: gl.constexpr):
    """Column ``j`` of a (channels, tokens) tile, as a per-channel vector of the state tile's
    layout (the same threads: the conversion moves nothing)."""
    return gl.convert_layout(_column(tile, cols, j), gl.SliceLayout(1, state))


@gluon.jit
def _sum_states(x, y, ns, BLOCK_N: gl.constexpr):
    """sum_n x[:, n] y[:, n] for (channels, states) tiles whose rows live in single threads, as
    one chain of fused multiply-adds: gl.sum adds in a tree, a multiply and an add more per
    pair of states."""
    acc = _column(x, ns, 0) * _column(y, ns, 0)
    for k in gl.static_range(1, BLOCK_N):
        acc = gl.fma(_column(x, ns, k), _column(y, ns, k), acc)
    return acc


@gluon.jit
def _put_column(tile, cols, j: gl.constexpr, x):
    return gl.where(cols[None, :] == j, x[:, None], tile)


@gluon.constexpr_function
def _col(j, T, REVERSE):
    """The tile column of a chunk's j-th token in scan order (see ``_chunk_times``)."""
    return T - 1 - j if REVERSE else j


@gluon.constexpr_function
def _min(a, b):
    return min(a, b)


@gluon.jit
def _rcp(x):
    """1 / x as one MUFU.RCP (rcp.approx, within 1 ulp) for x in [1, inf]: ``/`` compiles to
    div.full, the same instruction with a range test and two conditional scalings around it,
    which these denominators never need."""
    return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                     dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), the log1p as 2 atanh(s) with
    s = e / (2 + e) <= 1/3: an odd series whose terms past s^11 are below fp32's rounding
    (the same formula as triton_kernels._softplus)."""
    e = gl.exp2(-gl.abs(x) * _LOG2E)
    s = e * _rcp(2.0 + e)
    s2 = s * s
    series = s2 * (1.0 / 11.0) + 1.0 / 9.0
    series = series * s2 + 1.0 / 7.0
    series = series * s2 + 1.0 / 5.0
    series = series * s2 + 1.0 / 3.0
    series = series * s2 + 1.0
    return gl.maximum(x, 0.0) + 2.0 * s * series


@gluon.jit
def _sigmoid(x):
    return _rcp(1.0 + gl.exp2(-x * _LOG2E))


@gluon.jit
def _softplus_grad(dt):
    """softplus'(x) = 1 - exp(-softplus(x)) from dt = softplus(x); below dt = 1/8, where that
    loses digits, its series (truncated past dt^5: < 1e-7)."""
    series = dt * (1.0 - dt * (0.5 - dt * (1.0 / 6.0 - dt * (1.0 / 24.0 - dt * (1.0 / 120.0)))))
    return gl.where(dt < 0.125, series, 1.0 - gl.exp2(-dt * _LOG2E))


@gluon.jit
def _chunk_times(c, L, cols, T: gl.constexpr, REVERSE: gl.constexpr):
    """The first time of chunk ``c``'s tile, the times of its columns (ascending) and which
    lie inside the sequence. Forward: scan positions c*T.., column j = position c*T + j.
    Reverse: the tile ends at time L - 1 - c*T, and scan position c*T + j is column T - 1 - j."""
    if REVERSE:
        t0 = L - (c + 1) * T
    else:
        t0 = c * T
    t = t0 + cols
    return t0, t, (t >= 0) & (t < L)


@gluon.jit
def _load_tile(base, e, s_e, t, s_l, mask):
    """(channels, tokens) tile of a (.., E, L) tensor as fp32, 0 outside ``mask``."""
    return gl.load(base + e[:, None] * s_e + t[None, :] * s_l, mask=mask, other=0.0
                   ).to(gl.float32)


@gluon.jit
def _store_or_add(ptrs, x, mask, ACCUMULATE: gl.constexpr):
    """Store a (channels, tokens) tile (cast to the pointers' dtype), or with ``ACCUMULATE``
    add it to what is there, in fp32. A thread holds a channel's tokens: time-contiguous
    outputs get vector stores per thread, channel-minor ones a store per token whose 32 lanes
    write 32 adjacent channels (coalesced). Each element is read and written by the thread
    that computed it: no race."""
    if ACCUMULATE:
        x += gl.load(ptrs, mask=mask, other=0.0).to(gl.float32)
    gl.store(ptrs, x, mask=mask)


@gluon.jit
def _stage_bc(smem, base, s_n, s_l, t0, L, N, T: gl.constexpr, NS: gl.constexpr,
              layout: gl.constexpr):
    """A (tokens, states) chunk of B or C at times t0.. into shared memory, fp32, 0 outside
    the sequence and past N (so padded states and tokens add nothing)."""
    tt = t0 + gl.arange(0, T, layout=gl.SliceLayout(1, layout))
    nn = gl.arange(0, NS, layout=gl.SliceLayout(0, layout))
    mask = ((tt >= 0) & (tt < L))[:, None] & (nn < N)[None, :]
    smem.store(gl.load(base + tt[:, None] * s_l + nn[None, :] * s_n, mask=mask, other=0.0
                       ).to(gl.float32))


@gluon.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    E, N, L, out_scale,
    s_u_b, s_u_e, s_u_l, s_dt_b, s_dt_e, s_dt_l, s_A_e, s_A_n,
    s_B_b, s_B_n, s_B_l, s_C_b, s_C_n, s_C_l, s_z_b, s_z_e, s_z_l,
    s_out_b, s_out_e, s_out_l,
    HAS_D: gl.constexpr, HAS_Z: gl.constexpr, HAS_BIAS: gl.constexpr,
    SOFTPLUS: gl.constexpr, REVERSE: gl.constexpr,
    HAS_SCALE: gl.constexpr, ACCUMULATE: gl.constexpr, DENSE_OUT: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_L: gl.constexpr,
):
    NW: gl.constexpr = gl.num_warps()
    BLOCK_E: gl.constexpr = 32 * NW
    T: gl.constexpr = BLOCK_L
    # A (channels, states) tile: one channel per thread, its states in its registers.
    state: gl.constexpr = gl.BlockedLayout([1, BLOCK_N], [32, 1], [NW, 1], [1, 0])
    # A (channels, tokens) tile: one channel's chunk per thread, contiguous in memory.
    row: gl.constexpr = gl.BlockedLayout([1, T], [32, 1], [NW, 1], [1, 0])
    # B/C chunks on their way to shared memory: spread over the program, time fastest.
    staging: gl.constexpr = gl.BlockedLayout([1, 1], [32 // BLOCK_N, BLOCK_N], [NW, 1], [0, 1])
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])

    pid_e = gl.program_id(0)
    b = gl.program_id(1).to(gl.int64)
    e = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(1, row))
    e_mask = e < E
    e_s = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(1, state))
    n_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, state))
    # Padded states and channels get A = 0 (and B = C = 0): they stay 0.
    A2 = gl.load(A_ptr + e_s[:, None] * s_A_e + n_s[None, :] * s_A_n,
                 mask=(e_s < E)[:, None] & (n_s < N)[None, :], other=0.0).to(gl.float32) * _LOG2E
    if HAS_D:
        D = gl.load(D_ptr + e, mask=e_mask, other=0.0).to(gl.float32)
    if HAS_BIAS:
        bias = gl.load(bias_ptr + e, mask=e_mask, other=0.0).to(gl.float32)
    cols = gl.arange(0, T, layout=gl.SliceLayout(0, row))

    u_base = u_ptr + b * s_u_b
    dt_base = delta_ptr + b * s_dt_b
    z_base = z_ptr + b * s_z_b
    B_base = B_ptr + b * s_B_b
    C_base = C_ptr + b * s_C_b
    if DENSE_OUT:  # a contiguous (batch, E, L) out: E and L, in registers already, as strides
        out_rows = out_ptr + b * E * L + e[:, None] * L
    else:
        out_rows = out_ptr + b * s_out_b + e[:, None] * s_out_e
    B_smem = gl.allocate_shared_memory(gl.float32, [2, T, BLOCK_N], plain)
    C_smem = gl.allocate_shared_memory(gl.float32, [2, T, BLOCK_N], plain)

    h = gl.zeros([BLOCK_E, BLOCK_N], gl.float32, layout=state)
    for c in range(0, gl.cdiv(L, T)):
        t0, t, t_mask = _chunk_times(c, L, cols, T, REVERSE)
        mask = e_mask[:, None] & t_mask[None, :]
        # Two buffers: the chunk after this one can be staged while slower threads still
        # read this one, so one barrier per chunk suffices.
        buf = c % 2
        _stage_bc(B_smem.index(buf), B_base, s_B_n, s_B_l, t0, L, N, T, BLOCK_N,
                  staging)
        _stage_bc(C_smem.index(buf), C_base, s_C_n, s_C_l, t0, L, N, T, BLOCK_N,
                  staging)
        u = _load_tile(u_base, e, s_u_e, t, s_u_l, mask)
        dt = _load_tile(dt_base, e, s_dt_e, t, s_dt_l, mask)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = gl.where(mask, dt, 0.0)  # exp(0 * A) = 1 and no input: the state passes through
        dtu = dt * u
        y = gl.zeros([BLOCK_E, T], gl.float32, layout=row)
        _barrier()
        for j in gl.static_range(T):
            # (1, states) rows of B and C, the same in every thread: broadcast reads.
            h = gl.exp2(_te(dt, cols, _col(j, T, REVERSE), state)[:, None] * A2) * h + \
                _te(dtu, cols, _col(j, T, REVERSE), state)[:, None] * \
                B_smem.index(buf).slice(_col(j, T, REVERSE), 1).load(state)
            y = _put_column(y, cols, _col(j, T, REVERSE), gl.convert_layout(
                _sum_states(h, C_smem.index(buf).slice(_col(j, T, REVERSE), 1).load(state),
                            n_s, BLOCK_N), gl.SliceLayout(1, row)))
        if HAS_D:
            y += D[:, None] * u
        if HAS_Z:
            zt = _load_tile(z_base, e, s_z_e, t, s_z_l, mask)
            y *= zt * _sigmoid(zt)
        if HAS_SCALE:
            y *= out_scale
        _store_or_add(out_rows + t[None, :] * s_out_l, y, mask, ACCUMULATE)


@gluon.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dt_ptr, ckpt_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    E, N, L, s_ckpt_e, dout_scale,
    s_u_b, s_u_e, s_u_l, s_dt_b, s_dt_e, s_dt_l, s_A_e, s_A_n,
    s_B_b, s_B_n, s_B_l, s_C_b, s_C_n, s_C_l, s_z_b, s_z_e, s_z_l,
    s_do_b, s_do_e, s_do_l, s_du_b, s_du_e, s_du_l, s_ddt_b, s_ddt_e, s_ddt_l,
    s_dz_b, s_dz_e, s_dz_l, s_dB_b, s_dB_n, s_dB_l, s_dC_b, s_dC_n, s_dC_l,
    HAS_D: gl.constexpr, HAS_Z: gl.constexpr, HAS_BIAS: gl.constexpr,
    SOFTPLUS: gl.constexpr, REVERSE: gl.constexpr,
    HAS_SCALE: gl.constexpr, DZ_ACCUMULATE: gl.constexpr, DENSE_GRADS: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_L: gl.constexpr,
):
    NW: gl.constexpr = gl.num_warps()
    BLOCK_E: gl.constexpr = 32 * NW
    T: gl.constexpr = BLOCK_L
    state: gl.constexpr = gl.BlockedLayout([1, BLOCK_N], [32, 1], [NW, 1], [1, 0])
    row: gl.constexpr = gl.BlockedLayout([1, T], [32, 1], [NW, 1], [1, 0])
    staging: gl.constexpr = gl.BlockedLayout([1, 1], [32 // BLOCK_N, BLOCK_N], [NW, 1], [0, 1])
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    # The sums over channels of a chunk's dB and dC terms, (tokens, 32 channels, states) at
    # a time: lanes and warps on (token, state) pairs first and the rest on channels, so most
    # of the sum is a chain of adds in one thread and the rest a short cross-lane one.
    LT: gl.constexpr = _min(T, 32 // BLOCK_N)
    LE: gl.constexpr = 32 // (LT * BLOCK_N)
    WT: gl.constexpr = _min(NW, T // LT)
    reduce3: gl.constexpr = gl.BlockedLayout(
        [T // (LT * WT), 32 // (LE * (NW // WT)), 1], [LT, LE, BLOCK_N], [WT, NW // WT, 1],
        [1, 2, 0])
    plain3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])

    pid_e = gl.program_id(0)
    b = gl.program_id(1).to(gl.int64)
    e = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(1, row))
    e_mask = e < E
    e_s = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(1, state))
    n_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, state))
    en_mask = (e_s < E)[:, None] & (n_s < N)[None, :]
    # A in log2 units only (the decays are exp2): sum_n gh A is taken as ln 2 sum_n gh A2,
    # one multiply per token instead of 16 more live registers per thread.
    A2 = gl.load(A_ptr + e_s[:, None] * s_A_e + n_s[None, :] * s_A_n, mask=en_mask,
                 other=0.0).to(gl.float32) * _LOG2E
    if HAS_D:
        D = gl.load(D_ptr + e, mask=e_mask, other=0.0).to(gl.float32)
    if HAS_BIAS:
        bias = gl.load(bias_ptr + e, mask=e_mask, other=0.0).to(gl.float32)
    cols = gl.arange(0, T, layout=gl.SliceLayout(0, row))

    u_base = u_ptr + b * s_u_b
    dt_base = delta_ptr + b * s_dt_b
    z_base = z_ptr + b * s_z_b
    do_base = dout_ptr + b * s_do_b
    B_base = B_ptr + b * s_B_b
    C_base = C_ptr + b * s_C_b
    row_off = b * E * L + e[:, None] * L   # the dt scratch: contiguous (batch, E, L)
    # du, ddelta, dz: base pointers, and offsets from them to which a chunk adds its times.
    if DENSE_GRADS:
        # Contiguous (batch, E, L): the scratch's rows, which take E and L, in registers
        # already, as strides (the code from before strided outputs).
        du_base, ddt_base, dz_base = du_ptr + row_off, ddelta_ptr + row_off, dz_ptr + row_off
        du_off, ddt_off, dz_off = 0, 0, 0
    else:
        # Per-image pointers and 32-bit offsets: with a unit channel stride, as channel-minor
        # outputs have, an offset is the channel index itself, no register more.
        du_base, du_off = du_ptr + b * s_du_b, e[:, None] * s_du_e
        ddt_base, ddt_off = ddelta_ptr + b * s_ddt_b, e[:, None] * s_ddt_e
        dz_base, dz_off = dz_ptr + b * s_dz_b, e[:, None] * s_dz_e
    ckpt_ptrs = ckpt_ptr + (b * E + e_s[:, None]) * s_ckpt_e + n_s[None, :]
    n_chunks = gl.cdiv(L, T)

    # Pass 1: delta after bias and softplus, once per (token, channel), into an fp32 scratch,
    # and the state at the end of every chunk but the last, into another. Each thread reads
    # back only what it wrote itself: no barrier for those.
    B_smem = gl.allocate_shared_memory(gl.float32, [2, T, BLOCK_N], plain)
    C_smem = gl.allocate_shared_memory(gl.float32, [2, T, BLOCK_N], plain)
    h = gl.zeros([BLOCK_E, BLOCK_N], gl.float32, layout=state)
    for c in range(0, n_chunks):
        t0, t, t_mask = _chunk_times(c, L, cols, T, REVERSE)
        mask = e_mask[:, None] & t_mask[None, :]
        dt = _load_tile(dt_base, e, s_dt_e, t, s_dt_l, mask)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = gl.where(mask, dt, 0.0)
        gl.store(dt_ptr + row_off + t[None, :], dt, mask=mask)
        if c < n_chunks - 1:
            buf = c % 2
            _stage_bc(B_smem.index(buf), B_base, s_B_n, s_B_l, t0, L, N, T, BLOCK_N, staging)
            dtu = dt * _load_tile(u_base, e, s_u_e, t, s_u_l, mask)
            _barrier()
            for j in gl.static_range(T):
                h = gl.exp2(_te(dt, cols, _col(j, T, REVERSE), state)[:, None] * A2) * h + \
                    _te(dtu, cols, _col(j, T, REVERSE), state)[:, None] * \
                    B_smem.index(buf).slice(_col(j, T, REVERSE), 1).load(state)
            gl.store(ckpt_ptrs + c * BLOCK_N, h, mask=en_mask)
    _barrier()  # pass 2 stages its chunks in the buffers pass 1 read

    # Pass 2: chunks last to first. Each chunk's states are rebuilt once from the state before
    # it, into shared memory (one row per thread) with their decays exp(delta A); the adjoint
    # g_s = dy_s C_s + exp(delta_{s+1} A) g_{s+1} then runs back over them with the decays
    # reused: two exponentials per state element in the whole backward.
    decay_smem = gl.allocate_shared_memory(gl.float32, [T, BLOCK_E, BLOCK_N], plain)
    h_smem = gl.allocate_shared_memory(gl.float32, [T, BLOCK_E, BLOCK_N], plain)
    dtu_smem = gl.allocate_shared_memory(gl.float32, [T, BLOCK_E], plain)
    dy_smem = gl.allocate_shared_memory(gl.float32, [T, BLOCK_E], plain)
    dA_acc = gl.zeros([BLOCK_E, BLOCK_N], gl.float32, layout=state)
    dD_acc = gl.zeros([BLOCK_E], gl.float32, layout=gl.SliceLayout(1, row))
    dbias_acc = gl.zeros([BLOCK_E], gl.float32, layout=gl.SliceLayout(1, row))
    # exp(delta_{s+1} A) g_{s+1} at the first position s + 1 of the chunk processed before.
    carry = gl.zeros([BLOCK_E, BLOCK_N], gl.float32, layout=state)
    tr = gl.arange(0, T, layout=gl.SliceLayout(1, gl.SliceLayout(1, reduce3)))
    nr = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, gl.SliceLayout(1, reduce3)))
    if DENSE_GRADS:  # contiguous fp32 (batch, N, L)
        bnl_off = b * N * L + nr[None, :] * L
        dB_base, dC_base, dB_off, dC_off = dB_ptr + bnl_off, dC_ptr + bnl_off, 0, 0
    else:
        dB_base, dB_off = dB_ptr + b * s_dB_b, nr[None, :] * s_dB_n
        dC_base, dC_off = dC_ptr + b * s_dC_b, nr[None, :] * s_dC_n
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t0, t, t_mask = _chunk_times(c, L, cols, T, REVERSE)
        mask = e_mask[:, None] & t_mask[None, :]
        buf = i % 2
        _stage_bc(B_smem.index(buf), B_base, s_B_n, s_B_l, t0, L, N, T, BLOCK_N, staging)
        _stage_bc(C_smem.index(buf), C_base, s_C_n, s_C_l, t0, L, N, T, BLOCK_N, staging)
        u = _load_tile(u_base, e, s_u_e, t, s_u_l, mask)
        dt = gl.load(dt_ptr + row_off + t[None, :], mask=mask, other=0.0)
        dtu = dt * u
        dout = _load_tile(do_base, e, s_do_e, t, s_do_l, mask)
        if HAS_SCALE:
            dout *= dout_scale
        h = gl.load(ckpt_ptrs + (c - 1) * BLOCK_N, mask=en_mask & (c > 0), other=0.0)
        # B/C staged, and the previous chunk's sums done with the state and decay slots.
        _barrier()

        y = gl.zeros([BLOCK_E, T], gl.float32, layout=row)
        for j in gl.static_range(T):
            decay = gl.exp2(_te(dt, cols, _col(j, T, REVERSE), state)[:, None] * A2)
            h = decay * h + _te(dtu, cols, _col(j, T, REVERSE), state)[:, None] * \
                B_smem.index(buf).slice(_col(j, T, REVERSE), 1).load(state)
            decay_smem.index(_col(j, T, REVERSE)).store(decay)
            h_smem.index(_col(j, T, REVERSE)).store(h)
            y = _put_column(y, cols, _col(j, T, REVERSE), gl.convert_layout(
                _sum_states(h, C_smem.index(buf).slice(_col(j, T, REVERSE), 1).load(state),
                            n_s, BLOCK_N),
                gl.SliceLayout(1, row)))

        dy = dout
        if HAS_D:
            y += D[:, None] * u
        if HAS_Z:
            zt = _load_tile(z_base, e, s_z_e, t, s_z_l, mask)
            sig = _sigmoid(zt)
            _store_or_add(dz_base + (dz_off + t[None, :] * s_dz_l),
                          dout * y * sig * (1.0 + zt * (1.0 - sig)), mask, DZ_ACCUMULATE)
            dy = dout * zt * sig

        # dt u and dy of the chunk, tokens by channels, for the sums over channels below.
        dtu_smem.permute([1, 0]).store(dtu)
        dy_smem.permute([1, 0]).store(dy)
        gB = gl.zeros([BLOCK_E, T], gl.float32, layout=row)
        h_prev = h
        ghA = gl.zeros([BLOCK_E, T], gl.float32, layout=row)
        for jj in gl.static_range(T):
            if jj == T - 1:  # reloaded (a cache hit) rather than kept live through the chunk
                h_prev = gl.load(ckpt_ptrs + (c - 1) * BLOCK_N, mask=en_mask & (c > 0),
                                 other=0.0)
            else:
                h_prev = h_smem.index(_col(T - 2 - jj, T, REVERSE)).load(state)
            g = carry + _te(dy, cols, _col(T - 1 - jj, T, REVERSE), state)[:, None] * \
                C_smem.index(buf).slice(_col(T - 1 - jj, T, REVERSE), 1).load(state)
            carry = decay_smem.index(_col(T - 1 - jj, T, REVERSE)).load(state) * g
            gh = carry * h_prev   # g_s exp(delta_s A) h_{s-1}
            dA_acc += gh * _te(dt, cols, _col(T - 1 - jj, T, REVERSE), state)[:, None]
            gB = _put_column(gB, cols, _col(T - 1 - jj, T, REVERSE), gl.convert_layout(
                _sum_states(g, B_smem.index(buf).slice(_col(T - 1 - jj, T, REVERSE), 1)
                            .load(state), n_s, BLOCK_N),
                gl.SliceLayout(1, row)))
            ghA = _put_column(ghA, cols, _col(T - 1 - jj, T, REVERSE), gl.convert_layout(
                _sum_states(gh, A2, n_s, BLOCK_N), gl.SliceLayout(1, row)))
            # The token's decay is used up: its slot takes g, for dB = sum_e g dt u below
            # (dC = sum_e h dy takes the states where they are).
            decay_smem.index(_col(T - 1 - jj, T, REVERSE)).store(g)

        u = _load_tile(u_base, e, s_u_e, t, s_u_l, mask)  # reloaded: fewer live registers
        ddt = ghA * _LN2 + u * gB
        du = dt * gB
        if HAS_D:
            du += D[:, None] * dy
            dD_acc += gl.sum(dy * u, axis=1)
        if SOFTPLUS:
            ddt = ddt * _softplus_grad(dt)
        ddt = gl.where(mask, ddt, 0.0)
        if HAS_BIAS:
            dbias_acc += gl.sum(ddt, axis=1)
        gl.store(du_base + (du_off + t[None, :] * s_du_l), du, mask=mask)
        gl.store(ddt_base + (ddt_off + t[None, :] * s_ddt_l), ddt, mask=mask)

        _barrier()  # every thread's g, h, dt u and dy of the chunk are in shared memory
        # dB and dC: sums over this program's channels, a warp's worth of channels at a time,
        # each a chain of fused multiply-adds in one thread.
        tt = t0 + tr
        bc_mask = ((tt >= 0) & (tt < L))[:, None] & (nr < N)[None, :]
        dB = gl.zeros([T, BLOCK_N], gl.float32, layout=gl.SliceLayout(1, reduce3))
        dC = gl.zeros([T, BLOCK_N], gl.float32, layout=gl.SliceLayout(1, reduce3))
        g3 = decay_smem._reinterpret(gl.float32, [T, BLOCK_E, BLOCK_N], plain3)
        h3 = h_smem._reinterpret(gl.float32, [T, BLOCK_E, BLOCK_N], plain3)
        for w in gl.static_range(NW):
            dtu_w = dtu_smem.slice(w * 32, 32, dim=1).load(gl.SliceLayout(2, reduce3))
            dy_w = dy_smem.slice(w * 32, 32, dim=1).load(gl.SliceLayout(2, reduce3))
            dB += gl.sum(g3.slice(w * 32, 32, dim=1).load(reduce3) * dtu_w[:, :, None], axis=1)
            dC += gl.sum(h3.slice(w * 32, 32, dim=1).load(reduce3) * dy_w[:, :, None], axis=1)
        # (token, state) pairs on the lanes, states fastest: a channel-minor dB or dC (column
        # slices of one (B, L, R + 2N) buffer) gets a token's states from adjacent lanes.
        gl.atomic_add(dB_base + (dB_off + tt[:, None] * s_dB_l), dB, mask=bc_mask,
                      sem="relaxed")
        gl.atomic_add(dC_base + (dC_off + tt[:, None] * s_dC_l), dC, mask=bc_mask,
                      sem="relaxed")

    gl.atomic_add(dA_ptr + e_s[:, None] * N + n_s[None, :], dA_acc, mask=en_mask,
                  sem="relaxed")
    if HAS_D:
        gl.atomic_add(dD_ptr + e, dD_acc, mask=e_mask, sem="relaxed")
    if HAS_BIAS:
        gl.atomic_add(dbias_ptr + e, dbias_acc, mask=e_mask, sem="relaxed")


def _configs(candidates):
    """Autotuning candidates from (BLOCK_L, num_warps): one channel per thread, so a
    program's BLOCK_E is 32 x num_warps. Longer chunks: fewer trips through the per-chunk
    work (staging, barriers, the channel sums); shorter: fewer registers and, in the backward,
    less shared memory (two fp32 values per state element of a chunk), so more programs per
    SM. The GPU decides by timing them."""
    return [triton.Config({"BLOCK_L": block_l}, num_warps=warps) for block_l, warps in candidates]


# Every candidate compiles for sm_90a without spills in both directions (tools/kernel_stats.py;
# tests/test_selective_scan_gluon.py checks it, at ~9 s of CPU per candidate and direction,
# whence no more candidates than these). Left out: the forward's 32-token chunks (8.6
# instructions per element, but 254 registers in reverse); the backward's 16-token chunks
# (28.8, but 255 registers and 132 KB of shared memory with 2 warps: one program per SM), and
# its 4-token chunks with 4 warps (more instructions than with 2 for the same shared memory
# per warp).
_FWD_CONFIGS = _configs([(16, 4), (8, 4), (16, 2)])
_BWD_CONFIGS = _configs([(8, 4), (8, 2), (4, 2)])
_scan_fwd = triton.autotune(configs=_FWD_CONFIGS, key=FWD_KEY, restore_value=FWD_RESTORE
                            )(_scan_fwd_kernel)
_scan_bwd = triton.autotune(configs=_BWD_CONFIGS, key=BWD_KEY, reset_to_zero=BWD_RESET,
                            restore_value=BWD_RESTORE)(_scan_bwd_kernel)


def _block_n(N: int) -> int:
    block_n = triton.next_power_of_2(N)
    if block_n > 32:  # the layouts put at most a warp's 32 lanes on the states
        raise ValueError(f"the Gluon scan handles up to 32 states, got {N}")
    return block_n


def _boundary_slots(L: int) -> int:
    return boundary_slots(_scan_bwd, L)


def _channels_per_program(meta) -> int:
    return 32 * meta["num_warps"]          # one channel per thread


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out=None,
                 out_scale: float = 1.0, accumulate: bool = False):
    """The scan's output (B, E, L); nothing is kept. ``out``, ``out_scale``, ``accumulate``:
    as ``triton_kernels.scan_forward``'s (an output buffer of any strides and float dtype,
    written or added to, scaled)."""
    return launch_forward(_scan_fwd, _channels_per_program, _block_n(A.shape[1]), u, delta, A,
                          B, C, D, z, delta_bias, delta_softplus, reverse, out, out_scale,
                          accumulate)


def scan_backward(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, reverse,
                  dout_scale: float = 1.0, du=None, ddelta=None, dz=None,
                  dz_accumulate: bool = False, dB=None, dC=None, dA=None, dD=None,
                  ddelta_bias=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, d delta_bias) from the inputs and dout;
    None for an absent optional input. The kernel first stores the state at each chunk
    boundary into a scratch buffer that lives for this call only. The optional arguments are
    ``triton_kernels.scan_backward``'s (dout's scale, output buffers of any strides)."""
    return launch_backward(_scan_bwd, _channels_per_program, _block_n(A.shape[1]),
                           _boundary_slots(u.shape[2]), u, delta, A, B, C, D, z, delta_bias,
                           dout, delta_softplus, reverse, dout_scale, du, ddelta, dz,
                           dz_accumulate, dB, dC, dA, dD, ddelta_bias)
