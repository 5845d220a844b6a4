"""Fused Triton kernels for the Mamba-1 selective scan (forward and backward).

Computes exactly what ``selective_scan.selective_scan_reference`` computes (see the package's
interface for the math and argument layout): u, delta, z of shape (batch, E, L); A (E, N); B, C
(batch, N, L); D, delta_bias (E,). All arithmetic and the scan state are fp32 whatever the
input dtype; outputs and gradients come back in their inputs' dtypes, or go into tensors the
caller passes (see ``scan_forward`` and ``scan_backward``).

Design, and why:

* One program per (block of BLOCK_E channels, batch element); grid (cdiv(E, BLOCK_E), batch).
  Each B/C time slice is loaded once for all of a program's channels, and the programs of
  one batch element run side by side and share B/C in L2.
* Fused: softplus(delta + bias), exp(delta * A), the scan, the C contraction, the D skip and
  the SiLU(z) gate all happen in one pass over the inputs; nothing of size E x N x L ever
  touches memory.
* The sequence is walked in chunks of BLOCK_L tokens, the state carried between chunks in
  registers, so any L works (208 tokens at 224 px are 13 chunks of 16). Inside a chunk the
  state is a (BLOCK_L, N2, BLOCK_E, N1) tile: Triton spreads a tile's lanes over its last
  axes, so N1 = N_LANES states and 32 / N1 channels share a warp while time and the other
  N2 states stay in each thread's registers. The recurrence h_t = a_t h_{t-1} + b_t is then
  a ``tl.associative_scan`` over (a, b) pairs that never leaves a thread (scanning along
  lanes instead cost 4x more instructions), with the carried state folded into the first
  b so the scan need not also track products of a; summing over the states takes log2(N1)
  shuffles, after the in-thread sum over N2.
* No flip copies: "scan order" position s maps to time t = s, or t = L-1-s when
  ``reverse``; only the addresses differ, so reverse costs the same as forward, and strided
  views (x/z slices of one xz tensor, B/C slices of a projection) are read in place.
* Outputs go where the caller's next op reads them, through their strides: a bidirectional
  mixer has the forward direction write 1/2 y into a channel-minor view of the (B, L, E)
  buffer out_proj reads and the reverse direction add its 1/2 y there, and its backward
  take dz, du, ddelta, dB and dC in the layouts of the GEMMs that follow, with no
  transposing copies. Contiguous outputs, the default, compile to the same code as before
  (``DENSE_*``: E and L, in registers already, serve as their strides).
* Nothing but the inputs is kept for the backward (the chunk-boundary states, batch x E x
  (chunks-1) x N fp32, are 1.8x the bytes of a bf16 u for 16-token chunks at L=208, N=16:
  ~7 GB over a Mamba-B training step at batch 128). The backward kernel first computes
  delta (bias, softplus) once per token and channel into an fp32 scratch (2x the bytes of
  u), then walks the chunks forwards, writing each boundary state to a second scratch
  (7.8x u for the shortest candidate chunks, 4 tokens); both live for one backward scan
  only. Then it walks the chunks last-to-first, rebuilds each chunk's states from the
  state before it with one forward scan, and runs the adjoint recurrence g_s = dy_s C_s +
  exp(delta_{s+1} A) g_{s+1} as a forward scan over the chunk flipped in time: a flip of a
  thread-local axis is free register renaming, while ``reverse=True`` compiles to many
  warp shuffles. The adjoint's decays are the recompute's, shifted by one token with a
  scan whose operator keeps the previous element (``_shift``: renaming once compiled), so
  the backward takes two exponentials per state element (boundary pass, recompute), not
  three; the later chunk's exp(delta A) g at its first token is carried in registers.
* Why the backward has its boundary pass: registers cannot hold a chunk long enough for
  boundary states saved by the forward to fit the memory budget (the adjoint needs two values
  per element, decay and state). All states of a channel in one thread, with the batch on
  the lanes, was tried: the per-thread B and C tiles and the two values per element need
  more than 255 registers even at 2-token chunks, and it spills.
* Reductions before atomics: dB/dC are summed over the program's channel block, and dA, dD
  and d(delta_bias) over the program's whole sequence, before one fp32 atomic add each.
* Block sizes: BLOCK_L, BLOCK_E, N_LANES and num_warps are autotuned per (E, N, L) on the
  GPU, each kernel on its own (longer chunks: less per-chunk overhead; shorter: fewer
  registers, more warps per SM). Every candidate compiles for sm_90a without spills, in
  both directions (``tools/kernel_stats.py`` shows the figures; CPU tests check them).
  The forward's candidates include all 16 states of a channel in one thread (no shuffles
  for the sums over states, the per-token work done once per channel). Under
  TRITON_INTERPRET=1 (CPU tests) one small config is used and tensors stay on the CPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))


def _configs(candidates):
    """Autotuning candidates from (N_LANES, num_warps, BLOCK_L[, channels per thread]).

    The state tile is (BLOCK_L, N2, BLOCK_E, N1): N1 = N_LANES states on lanes, the rest of a
    warp's 32 lanes on channels, warps on channels too, and time and the other N2 states in
    each thread's registers, so the scans and the time reductions never leave a thread.
    Longer chunks mean fewer trips through the per-chunk overhead (layout changes, the
    cross-channel sums) but more registers per thread, hence fewer warps per SM to hide
    latency; two channels per thread halve the shuffles of the sums over channels (dB, dC)
    for the same registers as twice the chunk length: the GPU decides by timing them.
    """
    if _INTERPRET:  # benchmarking configs under the interpreter would only cost time
        candidates = [(4, 1, 16)]
    return [triton.Config({"BLOCK_E": (32 // lanes) * warps * (rest[0] if rest else 1),
                           "N_LANES": lanes, "BLOCK_L": block_l}, num_warps=warps)
            for lanes, warps, block_l, *rest in candidates]


_FWD_CONFIGS = _configs([(4, 4, 16), (4, 2, 16), (8, 4, 16), (8, 4, 32), (8, 2, 32),
                         (8, 4, 8), (1, 4, 8)])
# The backward keeps more tiles live (the decays stay in registers for the adjoint): shorter
# chunks. (With 16 state lanes it issued more instructions for more registers than (8, 4, 8);
# 16-token chunks with 8 lanes, and (4, 4, 8), spill.) Its
# scratch holds a state per channel at every chunk boundary of the shortest chunks listed:
# 4 tokens make that 0.64 GB for one Mamba-B scan at batch 128, 2 would double it and the
# traffic of writing and reading it.
_BWD_CONFIGS = _configs([(8, 4, 8), (8, 2, 8), (4, 2, 4, 2), (4, 1, 4, 2)])

# Autotuning (both families): keyed on the outputs' channel and time strides too, and on
# whether an output is added to, so that a time-contiguous output and a channel-minor one (a
# different store pattern), or one written and one read and written, are timed apart.
# Timing runs a candidate on the caller's tensors, again and again: outputs that are added to
# (``accumulate``, dz, and dB and dC, which the caller may have filled) are put back after
# each run, the kernel's own accumulators zeroed.
FWD_KEY = ["E", "N", "L", "s_out_e", "s_out_l", "ACCUMULATE"]
BWD_KEY = ["E", "N", "L", "s_du_e", "s_du_l", "s_ddt_e", "s_ddt_l", "s_dz_e", "s_dz_l",
           "s_dB_n", "s_dB_l", "s_dC_n", "s_dC_l", "DZ_ACCUMULATE"]
FWD_RESTORE = ["out_ptr"]
BWD_RESET = ["dA_ptr", "dD_ptr", "dbias_ptr"]
BWD_RESTORE = ["dz_ptr", "dB_ptr", "dC_ptr"]


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # Composition of h -> a1 h + b1 followed by h -> a2 h + b2.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _first(a, b):
    return a


@triton.jit
def _last(a, b):
    return b


@triton.jit
def _shift_combine(x1, p1, one1, x2, p2, one2):
    # Runs summarised as (last element, the one before it, whether the run is one element
    # long): an associative operator, so an inclusive scan of it is the sequence shifted by one.
    return x2, tl.where(one2 != 0, x1, p2), one1 & one2 & 0


@triton.jit
def _shift(x):
    """x moved one position along axis 0 (position k gets x[k - 1], position 0 gets 0). Time
    sits in each thread's registers, so once the compiler folds the constant flags this is
    register renaming, not arithmetic."""
    _, prev, _ = tl.associative_scan((x, tl.zeros_like(x), tl.full(x.shape, 1, tl.int32)), 0,
                                     _shift_combine)
    return prev


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), the log1p as 2 atanh(s) with
    s = e / (2 + e) <= 1/3: an odd series whose terms past s^11 are below fp32's rounding.
    Fused multiply-adds and one division, where Triton's tl.log is a ~40-instruction library
    call (and Triton 3.6 computes the softplus once per state lane, not once per channel)."""
    e = tl.exp(-tl.abs(x))
    s = e / (2.0 + e)
    s2 = s * s
    series = 1.0 / 11.0
    for k in tl.static_range(9, 0, -2):
        series = series * s2 + 1.0 / k
    return tl.maximum(x, 0.0) + 2.0 * s * series


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_te(ptr, t, e, s_l, s_e, mask):
    """(time, channel) tile of a (.., E, L) tensor at base ``ptr``, as fp32."""
    return tl.load(ptr + t[:, None] * s_l + e[None, :] * s_e, mask=mask, other=0.0
                   ).to(tl.float32)


@triton.jit
def _load_tn(ptr, t, n, s_l, s_n, mask):
    """(time, N2, N1) tile of a (.., N, L) tensor at base ``ptr``, as fp32."""
    return tl.load(ptr + t[:, None, None] * s_l + n[None, :, :] * s_n, mask=mask, other=0.0
                   ).to(tl.float32)


@triton.jit
def _store_or_add(ptrs, x, mask, ACCUMULATE: tl.constexpr):
    """Store a tile (cast to the pointers' dtype), or with ``ACCUMULATE`` add it to what is
    there, in fp32. Each element is read and written by the thread that computed it."""
    if ACCUMULATE:
        x += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, x, mask=mask)


@triton.jit
def _te(x):
    """(time, channel) -> broadcastable against the (time, N2, channel, N1) state tile."""
    return x[:, None, :, None]


@triton.jit
def _tn(x):
    """(time, N2, N1) -> broadcastable against the state tile."""
    return x[:, :, None, :]


@triton.jit
def _sum_n(x):
    """Sum a state tile over the states: (time, N2, channel, N1) -> (time, channel).

    The in-thread axis first: summing over the lanes first would shuffle N2 times as much.
    """
    return tl.sum(tl.sum(x, axis=1), axis=2)


@triton.jit
def _delta(raw, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta after bias and softplus; 0 on masked positions, so exp(delta*A) = 1 there."""
    if HAS_BIAS:
        raw = raw + bias[None, :]
    if SOFTPLUS:
        raw = _softplus(raw)
    return tl.where(mask, raw, 0.0)


@triton.jit
def _softplus_grad(dt):
    """softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x)), from dt = softplus(x) itself; below
    dt = 1/8, where 1 - exp(-dt) would lose digits, its series (truncated past dt^5: < 1e-7)."""
    series = dt * (1.0 - dt * (0.5 - dt * (1.0 / 6.0 - dt * (1.0 / 24.0 - dt * (1.0 / 120.0)))))
    return tl.where(dt < 0.125, series, 1.0 - tl.exp(-dt))


@triton.jit
def _chunk_positions(c, L, e_mask, n_mask, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr):
    """Chunk ``c``'s scan-order positions s, their times t (reversed when ``REVERSE``), and the
    masks of its (time, channel) and (time, N2, N1) tiles."""
    s = c * BLOCK_L + tl.arange(0, BLOCK_L)
    l_mask = s < L
    t = L - 1 - s if REVERSE else s
    return s, t, l_mask[:, None] & e_mask[None, :], l_mask[:, None, None] & n_mask[None, :, :]


@triton.jit
def _chunk_states(u, dt, Bt, A2, h, first):
    """The states of one chunk, (BLOCK_L, N2, BLOCK_E, N1), from its (time, channel) inputs u
    and dt, its (time, N2, N1) B and the state ``h`` before it; also delta * B * u. ``h`` is
    folded into the first input term, so the scan tracks h alone, not also the products of
    the decays."""
    dA = tl.exp2(_te(dt) * A2[None])
    dBu = _te(dt * u) * _tn(Bt)
    _, hs = tl.associative_scan((dA, tl.where(first, dBu + dA * h[None], dBu)), 0,
                                _affine_combine)
    return hs, dBu, dA


@triton.autotune(configs=_FWD_CONFIGS, key=FWD_KEY, restore_value=FWD_RESTORE)
@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    E, N, L, out_scale,
    s_u_b, s_u_e, s_u_l, s_dt_b, s_dt_e, s_dt_l, s_A_e, s_A_n,
    s_B_b, s_B_n, s_B_l, s_C_b, s_C_n, s_C_l, s_z_b, s_z_e, s_z_l,
    s_out_b, s_out_e, s_out_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, DENSE_OUT: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    N_LANES: tl.constexpr,
):
    N1: tl.constexpr = N_LANES if N_LANES < BLOCK_N else BLOCK_N
    N2: tl.constexpr = BLOCK_N // N1
    pid_e = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < E
    n = tl.arange(0, N2)[:, None] * N1 + tl.arange(0, N1)[None, :]   # state index, (N2, N1)
    n_mask = n < N
    en_mask = n_mask[:, None, :] & e_mask[None, :, None]             # (N2, BLOCK_E, N1)
    # Padded states get A = 0 and B = C = 0: they stay 0 and contribute nothing.
    A2 = tl.load(A_ptr + e[None, :, None] * s_A_e + n[:, None, :] * s_A_n, mask=en_mask,
                 other=0.0).to(tl.float32) * _LOG2E
    D = tl.load(D_ptr + e, mask=e_mask, other=0.0).to(tl.float32) if HAS_D else None
    bias = tl.load(bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32) if HAS_BIAS else None

    u_base = u_ptr + b * s_u_b
    dt_base = delta_ptr + b * s_dt_b
    B_base = B_ptr + b * s_B_b
    C_base = C_ptr + b * s_C_b
    z_base = z_ptr + b * s_z_b
    if DENSE_OUT:  # a contiguous (batch, E, L) out: E and L, in registers already, as strides
        out_rows = out_ptr + b * E * L + e[None, :] * L
    else:
        out_rows = out_ptr + b * s_out_b + e[None, :] * s_out_e
    first = (tl.arange(0, BLOCK_L) == 0)[:, None, None, None]

    h = tl.zeros((N2, BLOCK_E, N1), dtype=tl.float32)
    for c in range(0, tl.cdiv(L, BLOCK_L)):
        _, t, mask, nl_mask = _chunk_positions(c, L, e_mask, n_mask, BLOCK_L, REVERSE)
        u = _load_te(u_base, t, e, s_u_l, s_u_e, mask)
        dt = _delta(_load_te(dt_base, t, e, s_dt_l, s_dt_e, mask), bias, mask, HAS_BIAS,
                    SOFTPLUS)
        hs, _, _ = _chunk_states(u, dt, _load_tn(B_base, t, n, s_B_l, s_B_n, nl_mask), A2, h,
                                 first)
        h = tl.reduce(hs, 0, _last)
        y = _sum_n(hs * _tn(_load_tn(C_base, t, n, s_C_l, s_C_n, nl_mask)))
        if HAS_D:
            y += D[None, :] * u
        if HAS_Z:
            zt = _load_te(z_base, t, e, s_z_l, s_z_e, mask)
            y *= zt * _sigmoid(zt)
        if HAS_SCALE:
            y *= out_scale
        # Time sits in each thread's registers and channels on the lanes: time-contiguous
        # outputs get vector stores per thread; channel-minor ones one store per token, the
        # warp's 32 / N_LANES channels contiguous (a sector's worth at 8 bf16 channels), the
        # program's warps filling the adjacent channels.
        _store_or_add(out_rows + t[:, None] * s_out_l, y, mask, ACCUMULATE)


@triton.autotune(configs=_BWD_CONFIGS, key=BWD_KEY, reset_to_zero=BWD_RESET,
                 restore_value=BWD_RESTORE)
@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dt_ptr, ckpt_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    E, N, L, s_ckpt_e, dout_scale,
    s_u_b, s_u_e, s_u_l, s_dt_b, s_dt_e, s_dt_l, s_A_e, s_A_n,
    s_B_b, s_B_n, s_B_l, s_C_b, s_C_n, s_C_l, s_z_b, s_z_e, s_z_l,
    s_do_b, s_do_e, s_do_l, s_du_b, s_du_e, s_du_l, s_ddt_b, s_ddt_e, s_ddt_l,
    s_dz_b, s_dz_e, s_dz_l, s_dB_b, s_dB_n, s_dB_l, s_dC_b, s_dC_n, s_dC_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_SCALE: tl.constexpr, DZ_ACCUMULATE: tl.constexpr, DENSE_GRADS: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    N_LANES: tl.constexpr,
):
    N1: tl.constexpr = N_LANES if N_LANES < BLOCK_N else BLOCK_N
    N2: tl.constexpr = BLOCK_N // N1
    pid_e = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < E
    n = tl.arange(0, N2)[:, None] * N1 + tl.arange(0, N1)[None, :]
    n_mask = n < N
    en_mask = n_mask[:, None, :] & e_mask[None, :, None]
    A = tl.load(A_ptr + e[None, :, None] * s_A_e + n[:, None, :] * s_A_n, mask=en_mask,
                other=0.0).to(tl.float32)
    A2 = A * _LOG2E
    D = tl.load(D_ptr + e, mask=e_mask, other=0.0).to(tl.float32) if HAS_D else None
    bias = tl.load(bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32) if HAS_BIAS else None

    u_base = u_ptr + b * s_u_b
    dt_base = delta_ptr + b * s_dt_b
    B_base = B_ptr + b * s_B_b
    C_base = C_ptr + b * s_C_b
    z_base = z_ptr + b * s_z_b
    do_base = dout_ptr + b * s_do_b
    row_base = b * E * L + e[None, :] * L          # the dt scratch: contiguous (batch, E, L)
    # Each gradient's base pointers, and offsets from them to which a chunk adds its times.
    if DENSE_GRADS:
        # Contiguous (batch, E, L) and (batch, N, L): the scratch's rows, which take E, N and
        # L, in registers already, as strides (the code from before strided outputs).
        bnl_base = b * N * L + n[None, :, :] * L
        du_base, ddt_base, dz_base = du_ptr + row_base, ddelta_ptr + row_base, dz_ptr + row_base
        dB_base, dC_base = dB_ptr + bnl_base, dC_ptr + bnl_base
        du_off, ddt_off, dz_off, dB_off, dC_off = 0, 0, 0, 0, 0
    else:
        # Per-image pointers and 32-bit offsets: with a unit channel (or state) stride, as
        # channel-minor outputs have, an offset is the index itself, no register more.
        du_base, du_off = du_ptr + b * s_du_b, e[None, :] * s_du_e
        ddt_base, ddt_off = ddelta_ptr + b * s_ddt_b, e[None, :] * s_ddt_e
        dz_base, dz_off = dz_ptr + b * s_dz_b, e[None, :] * s_dz_e
        dB_base, dB_off = dB_ptr + b * s_dB_b, n[None, :, :] * s_dB_n
        dC_base, dC_off = dC_ptr + b * s_dC_b, n[None, :, :] * s_dC_n
    ckpt_ptrs = ckpt_ptr + (b * E + e[None, :, None]) * s_ckpt_e + n[:, None, :]
    first = (tl.arange(0, BLOCK_L) == 0)[:, None, None, None]
    n_chunks = tl.cdiv(L, BLOCK_L)

    # Pass 0: delta after bias and softplus, once per (token, channel), into an fp32 scratch
    # that passes 1 and 2 read. Computed inside their loops, where the state tile sets the
    # layout, some Triton releases would redo it on every state lane.
    for c in range(0, n_chunks):
        _, t, mask, _ = _chunk_positions(c, L, e_mask, n_mask, BLOCK_L, REVERSE)
        tl.store(dt_ptr + row_base + t[:, None],
                 _delta(_load_te(dt_base, t, e, s_dt_l, s_dt_e, mask), bias, mask, HAS_BIAS,
                        SOFTPLUS), mask=mask)
    tl.debug_barrier()  # the next passes read what other threads of this program wrote

    # Pass 1: the state at the end of every chunk but the last, into this program's scratch.
    h = tl.zeros((N2, BLOCK_E, N1), dtype=tl.float32)
    for c in range(0, n_chunks - 1):
        _, t, mask, nl_mask = _chunk_positions(c, L, e_mask, n_mask, BLOCK_L, REVERSE)
        hs, _, _ = _chunk_states(_load_te(u_base, t, e, s_u_l, s_u_e, mask),
                                 tl.load(dt_ptr + row_base + t[:, None], mask=mask, other=0.0),
                                 _load_tn(B_base, t, n, s_B_l, s_B_n, nl_mask), A2, h, first)
        h = tl.reduce(hs, 0, _last)
        tl.store(ckpt_ptrs + c * BLOCK_N, h, mask=en_mask)
    tl.debug_barrier()  # pass 2 reads states other threads of this program wrote

    # Pass 2: chunks last to first, each one's states rebuilt from the state before it.
    dA_acc = tl.zeros((N2, BLOCK_E, N1), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    # exp(delta_{s+1} A) g_{s+1} at the first position s + 1 of the chunk processed before.
    carry = tl.zeros((N2, BLOCK_E, N1), dtype=tl.float32)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        _, t, mask, nl_mask = _chunk_positions(c, L, e_mask, n_mask, BLOCK_L, REVERSE)

        if c > 0:
            h0 = tl.load(ckpt_ptrs + (c - 1) * BLOCK_N, mask=en_mask, other=0.0)
        else:
            h0 = tl.zeros((N2, BLOCK_E, N1), dtype=tl.float32)
        u = _load_te(u_base, t, e, s_u_l, s_u_e, mask)
        dt = tl.load(dt_ptr + row_base + t[:, None], mask=mask, other=0.0)
        Bt = _load_tn(B_base, t, n, s_B_l, s_B_n, nl_mask)
        hs, _, dA = _chunk_states(u, dt, Bt, A2, h0, first)
        Ct = _load_tn(C_base, t, n, s_C_l, s_C_n, nl_mask)
        dout = _load_te(do_base, t, e, s_do_l, s_do_e, mask)
        if HAS_SCALE:
            dout *= dout_scale

        dy = dout
        if HAS_Z:
            zt = _load_te(z_base, t, e, s_z_l, s_z_e, mask)
            y = _sum_n(hs * _tn(Ct))
            if HAS_D:
                y += D[None, :] * u
            sig = _sigmoid(zt)
            dz = dout * y * sig * (1.0 + zt * (1.0 - sig))
            _store_or_add(dz_base + (dz_off + t[:, None] * s_dz_l), dz, mask, DZ_ACCUMULATE)
            dy = dout * zt * sig

        dC = tl.sum(hs * _te(dy), axis=2)  # over this program's channels, before the atomics
        # N1 states on the lanes: a channel-minor dB or dC (column slices of one (B, L, R + 2N)
        # buffer) gets a token's N1 states from adjacent lanes, a time-contiguous one N1 rows.
        tl.atomic_add(dC_base + (dC_off + t[:, None, None] * s_dC_l), dC, mask=nl_mask,
                      sem="relaxed")
        # exp(delta_s A) h_{s-1} as a product, the states shifted by one token: h_s - dBu_s
        # would cancel to noise where the decay underflows and h_s is all input term.
        ah = dA * tl.where(first, h0[None], _shift(hs))

        # Adjoint: g_s = dy_s C_s + exp(delta_{s+1} A) g_{s+1}, run from the chunk's end. Time
        # sits in each thread's registers, so flipping it is free, while a reverse=True scan
        # compiles to many warp shuffles. The decays are the recompute's, shifted by one token
        # (no second exponential); the later chunk's term is folded into the first one.
        dyC = tl.flip(_te(dy) * _tn(Ct), 0)
        _, g = tl.associative_scan((_shift(tl.flip(dA, 0)), tl.where(first, dyC + carry[None], dyC)),
                                   0, _affine_combine)
        g = tl.flip(g, 0)
        carry = tl.reduce(dA * g, 0, _first)

        gh = g * ah  # g_s exp(delta_s A) h_{s-1}
        gB = _sum_n(g * _tn(Bt))
        ddt = _sum_n(gh * A[None]) + u * gB
        dA_acc += tl.sum(gh * _te(dt), axis=0)
        du = dt * gB
        if HAS_D:
            du += D[None, :] * dy
            dD_acc += tl.sum(dy * u, axis=0)
        if SOFTPLUS:
            ddt = ddt * _softplus_grad(dt)
        ddt = tl.where(mask, ddt, 0.0)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddt, axis=0)
        # Coalescing as for the forward's output.
        tl.store(du_base + (du_off + t[:, None] * s_du_l), du, mask=mask)
        tl.store(ddt_base + (ddt_off + t[:, None] * s_ddt_l), ddt, mask=mask)
        dB = tl.sum(g * _te(dt * u), axis=2)
        tl.atomic_add(dB_base + (dB_off + t[:, None, None] * s_dB_l), dB, mask=nl_mask,
                      sem="relaxed")

    tl.atomic_add(dA_ptr + e[None, :, None] * N + n[:, None, :], dA_acc, mask=en_mask,
                  sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + e, dD_acc, mask=e_mask, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + e, dbias_acc, mask=e_mask, sem="relaxed")


def _strides3(t):
    return (0, 0, 0) if t is None else tuple(t.stride())


def _output(name: str, given, shape: tuple, dtype: torch.dtype, device: torch.device,
            accumulator: bool = False) -> torch.Tensor:
    """An output buffer: ``given`` once checked (shape, device, a float dtype; ``dtype``
    itself for an ``accumulator``, which the kernel adds into with fp32 atomics), else a new
    contiguous one (zeros for an accumulator)."""
    if given is None:
        return (torch.zeros if accumulator else torch.empty)(shape, dtype=dtype, device=device)
    if tuple(given.shape) != shape or given.device != device:
        raise ValueError(f"{name}: expected shape {shape} on {device}, got "
                         f"{tuple(given.shape)} on {given.device}")
    if not given.is_floating_point() or (accumulator and given.dtype != dtype):
        raise ValueError(f"{name}: expected {dtype if accumulator else 'a float dtype'}, got "
                         f"{given.dtype}")
    return given


def _dense(t: torch.Tensor) -> bool:
    """Whether a (B, X, L) tensor has the strides of a new contiguous one."""
    return tuple(t.stride()) == (t.shape[1] * t.shape[2], t.shape[2], 1)


def boundary_slots(kernel, L: int) -> int:
    """States per channel a backward's scratch holds: the chunk boundaries of the shortest
    chunks ``kernel``'s autotuner may pick (at least one, so the buffer is never empty)."""
    min_block_l = min(config.kwargs["BLOCK_L"] for config in kernel.configs)
    return max(triton.cdiv(L, min_block_l) - 1, 1)


def _boundary_slots(L: int) -> int:
    return boundary_slots(_scan_bwd_kernel, L)


def launch_forward(kernel, channels_per_program, block_n, u, delta, A, B, C, D, z, delta_bias,
                   delta_softplus, reverse, out=None, out_scale=1.0, accumulate=False):
    """Run a forward scan kernel with this module's arguments (``gluon_kernels`` shares
    them): one program per (``channels_per_program(meta)`` channels, image). Returns the
    output (B, E, L): ``out`` (see ``scan_forward``) or a new one in u's dtype; nothing is
    kept."""
    batch, E, L = u.shape
    N = A.shape[1]
    if delta.shape != u.shape or B.shape != (batch, N, L) or C.shape != (batch, N, L):
        raise ValueError(f"shape mismatch: u {tuple(u.shape)}, delta {tuple(delta.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z has shape {tuple(z.shape)}, expected {tuple(u.shape)}")
    # The kernels index D and delta_bias as dense vectors (they are tiny).
    D = None if D is None else D.contiguous()
    delta_bias = None if delta_bias is None else delta_bias.contiguous()
    if accumulate and out is None:
        raise ValueError("accumulate=True needs an out tensor to add to")
    out = _output("out", out, (batch, E, L), u.dtype, u.device)
    # Unused optional pointers get u as a stand-in; the constexpr flags skip their loads.
    grid = lambda meta: (triton.cdiv(E, channels_per_program(meta)), batch)  # noqa: E731
    kernel[grid](
        u, delta, A, B, C, u if D is None else D, u if z is None else z,
        u if delta_bias is None else delta_bias, out,
        E, N, L, float(out_scale),
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides3(z),
        *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), REVERSE=bool(reverse), HAS_SCALE=out_scale != 1.0,
        ACCUMULATE=bool(accumulate), DENSE_OUT=_dense(out), BLOCK_N=block_n,
    )
    return out


def launch_backward(kernel, channels_per_program, block_n, slots, u, delta, A, B, C, D, z,
                    delta_bias, dout, delta_softplus, reverse, dout_scale=1.0, du=None,
                    ddelta=None, dz=None, dz_accumulate=False, dB=None, dC=None, dA=None,
                    dD=None, ddelta_bias=None):
    """Run a backward scan kernel with this module's arguments, ``slots`` boundary states per
    channel in its scratch. Returns (du, ddelta, dA, dB, dC, dD, dz, d delta_bias), None for
    an absent optional input, the given output tensors as given (see ``scan_backward``);
    the scratch buffers live for this call only."""
    batch, E, L = u.shape
    N = A.shape[1]
    D = None if D is None else D.contiguous()
    delta_bias = None if delta_bias is None else delta_bias.contiguous()
    dev, f32 = u.device, torch.float32
    if z is None and dz is not None:
        raise ValueError("dz given for a scan without z")
    if dz_accumulate and dz is None:
        raise ValueError("dz_accumulate=True needs a dz tensor to add to")
    ckpt = torch.empty((batch, E, slots, block_n), dtype=f32, device=dev)
    dt = torch.empty((batch, E, L), dtype=f32, device=dev)
    shape = (batch, E, L)
    # du and ddelta by default in u's and delta's layouts (where those are dense): the
    # projections they go back through read them as their inputs were read, with no copy.
    du_out = torch.empty_like(u) if du is None else _output("du", du, shape, u.dtype, dev)
    ddelta_out = (torch.empty_like(delta) if ddelta is None
                  else _output("ddelta", ddelta, shape, delta.dtype, dev))
    dz_out = None if z is None else _output("dz", dz, shape, z.dtype, dev)
    dB_out = _output("dB", dB, (batch, N, L), f32, dev, accumulator=True)
    dC_out = _output("dC", dC, (batch, N, L), f32, dev, accumulator=True)
    dA_out = _output("dA", dA, (E, N), f32, dev, accumulator=True)
    dD_out = _output("dD", dD, (E,), f32, dev, accumulator=True)
    dbias = _output("ddelta_bias", ddelta_bias, (E,), f32, dev, accumulator=True)
    if not all(t.is_contiguous() for t in (dA_out, dD_out, dbias)):
        raise ValueError("dA, dD and ddelta_bias must be contiguous (the kernel indexes them "
                         "densely)")
    grid = lambda meta: (triton.cdiv(E, channels_per_program(meta)), batch)  # noqa: E731
    kernel[grid](
        u, delta, A, B, C, u if D is None else D, u if z is None else z,
        u if delta_bias is None else delta_bias, dt, ckpt, dout,
        du_out, ddelta_out, dA_out, dB_out, dC_out, dD_out, du_out if dz_out is None else dz_out,
        dbias,
        E, N, L, ckpt.stride(1), float(dout_scale),
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides3(z),
        *dout.stride(), *du_out.stride(), *ddelta_out.stride(), *_strides3(dz_out),
        *dB_out.stride(), *dC_out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), REVERSE=bool(reverse), HAS_SCALE=dout_scale != 1.0,
        DZ_ACCUMULATE=bool(dz_accumulate), BLOCK_N=block_n,
        DENSE_GRADS=all(_dense(t) for t in (du_out, ddelta_out, dz_out, dB_out, dC_out)
                        if t is not None),
    )
    return (du_out, ddelta_out, dA_out if dA is not None else dA_out.to(A.dtype),
            dB_out if dB is not None else dB_out.to(B.dtype),
            dC_out if dC is not None else dC_out.to(C.dtype),
            None if D is None else dD_out if dD is not None else dD_out.to(D.dtype), dz_out,
            None if delta_bias is None else
            dbias if ddelta_bias is not None else dbias.to(delta_bias.dtype))


def _channels_per_program(meta) -> int:
    return meta["BLOCK_E"]


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out=None,
                 out_scale: float = 1.0, accumulate: bool = False):
    """The scan's output (B, E, L); nothing is kept.

    ``out``: a (B, E, L) tensor of any float dtype and strides to write it into, through its
    strides (e.g. a channel-minor view of a (B, L, E) buffer that the next GEMM reads with
    no copy): ``out = out_scale * y``, or ``out += out_scale * y`` with ``accumulate`` (in
    fp32), so that the two directions of a bidirectional mixer can average into one buffer.
    None: a new contiguous tensor in u's dtype."""
    return launch_forward(_scan_fwd_kernel, _channels_per_program,
                          triton.next_power_of_2(A.shape[1]), u, delta, A, B, C, D, z,
                          delta_bias, delta_softplus, reverse, out, out_scale, accumulate)


def scan_backward(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, reverse,
                  dout_scale: float = 1.0, du=None, ddelta=None, dz=None,
                  dz_accumulate: bool = False, dB=None, dC=None, dA=None, dD=None,
                  ddelta_bias=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, d delta_bias) from the inputs and dout;
    None for an absent optional input. The kernel first recomputes delta and the state at
    each chunk boundary into scratch buffers that live for this call only.

    The gradient taken is that of ``dout_scale`` x the output (the 1/2 of a direction
    average). ``du``, ``ddelta``, ``dz``: (B, E, L) tensors of any float dtype and strides
    to write those gradients into (``dz +=`` with ``dz_accumulate``); None: new ones in u's,
    delta's, z's dtype, du and ddelta in the layout of u and delta where those are dense
    (``torch.empty_like``), dz contiguous. ``dB``, ``dC``: fp32 (B, N, L) tensors of any strides
    that the kernel adds its gradients to (the caller zeroes or fills them), returned as
    given; None: new ones, returned in B's and C's dtype. ``dA`` (E, N), ``dD`` and
    ``ddelta_bias`` (E,): contiguous fp32 tensors the kernel adds to likewise, which the
    caller zeroes (the autotuner zeroes them between its trials), so that a caller can zero
    all of its buffers at once."""
    return launch_backward(_scan_bwd_kernel, _channels_per_program,
                           triton.next_power_of_2(A.shape[1]), _boundary_slots(u.shape[2]),
                           u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, reverse,
                           dout_scale, du, ddelta, dz, dz_accumulate, dB, dC, dA, dD,
                           ddelta_bias)
