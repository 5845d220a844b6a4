"""Fused depthwise causal (or anti-causal) conv1d + SiLU in Triton, forward and backward.

Per channel e with K taps w[e, 0, k] (nn.Conv1d(E, E, K, groups=E)'s layout) and bias b[e]:

    causal:       pre[t] = b + sum_k w[k] * x[t - (K-1) + k]      x[t < 0] = 0
    anti-causal:  pre[t] = b + sum_k w[k] * x[t + (K-1) - k]      x[t >= L] = 0
    u[t] = SiLU(pre[t]) = pre[t] * sigmoid(pre[t])

The anti-causal form is flip -> causal conv -> flip; here only the tap addresses change, so
the backward direction of a bidirectional Mamba costs the same and makes no flipped copies.

Design, and why:

* Nothing is copied. x, u, du and dx are (B, E, L) tensors read and written through their
  strides: in the model x is the channel-minor half of ``in_proj(h).transpose(1, 2)`` (strides
  (L*2E, 1, 2E)) and dx goes straight into a slice of the (B, L, 2E) gradient of that GEMM.
* Program = (BLOCK_E channels, a run of tokens, one image); the tile is (BLOCK_L, BLOCK_E).
  Triton specialises an integer argument equal to 1, so the compiler knows which axis has
  unit stride and lays the tile out with that axis across the lanes: loads along channels
  for the channel-minor layout, along time for a contiguous one. The K-1 halo tokens are
  re-read from the neighbouring tile (they come from L1/L2, not DRAM).
* All arithmetic is fp32; loads convert on the way in, stores round to the output's dtype.
* The backward keeps nothing from the forward but its inputs: it recomputes the
  pre-activation in registers. dx[s] = sum_j w[j] * dpre[s - off_j] needs dpre at K shifted
  times, and each of those needs x at K shifted times; the 2K-1 distinct shifted x tiles are
  loaded once per tile and shared by the K recomputations (K sigmoids per element: the price
  of a register-only backward, since Triton has no register shift across a tile's rows).
* dW and db are reduced in the kernel: each program walks TILES time tiles of one image,
  sums its partials in fp32 registers over all of them, then does one fp32 ``atomic_add``
  per (channel, tap). Why atomics and not a second reduction kernel: the partials are
  already summed over BLOCK_L x TILES tokens, so each address sees only B x cdiv(L,
  BLOCK_L x TILES) adds (a few hundred at the model's sizes), while a two-stage reduction
  would need an fp32 scratch of that many (E, K+1) rows, its writes and reads, and a second
  launch. The cost: the summation order, hence the last bits of dW/db, is not reproducible
  run to run.
* Block sizes are autotuned per (E, L, layout) on the GPU; under TRITON_INTERPRET=1 (CPU
  tests) a single small config is used, with TILES=2 so the in-program tile loop is tested.
* Offsets inside one image are int32 (the launcher checks they fit); the image offset is
  int64.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_K = 8  # the backward unrolls 2K-1 tiles in registers; more taps would spill


def _fwd_configs() -> list:
    """(BLOCK_E, BLOCK_L, num_warps) candidates: 4 to 16 elements per thread, wide in E for
    the channel-minor layout, long in L for the contiguous one."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_E": 16, "BLOCK_L": 8}, num_warps=1)]
    shapes = [(32, 32, 2), (64, 16, 4), (64, 32, 4), (128, 16, 4), (128, 32, 8), (256, 16, 8),
              (32, 64, 4), (16, 128, 4)]
    return [triton.Config({"BLOCK_E": be, "BLOCK_L": bl}, num_warps=w) for be, bl, w in shapes]


def _bwd_configs() -> list:
    """(BLOCK_E, BLOCK_L, TILES, num_warps) candidates: fewer elements per thread than the
    forward (2K-1 x tiles live at once), and TILES trading atomics for parallelism."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_E": 16, "BLOCK_L": 8, "TILES": 2}, num_warps=1)]
    shapes = [(32, 16, 4, 2), (64, 16, 4, 4), (64, 16, 16, 4), (128, 16, 4, 8),
              (64, 32, 4, 8), (128, 8, 8, 4), (32, 32, 4, 4), (16, 64, 4, 4)]
    return [triton.Config({"BLOCK_E": be, "BLOCK_L": bl, "TILES": n}, num_warps=w)
            for be, bl, n, w in shapes]


@triton.autotune(configs=_fwd_configs(), key=["E", "L", "s_x_e", "s_o_e"])
@triton.jit
def _conv_silu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    E, L,
    s_x_b, s_x_e, s_x_l, s_w_e, s_w_k, s_o_b, s_o_e, s_o_l,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # Tap k reads x[t + SIGN * (k - (K-1))]: SIGN = -1 mirrors the taps for the reverse.
    SIGN: tl.constexpr = 1 - 2 * REVERSE
    b = tl.program_id(2).to(tl.int64)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    e_mask = e < E
    x_base = x_ptr + b * s_x_b + e[None, :] * s_x_e

    acc = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        w_k = tl.load(w_ptr + e * s_w_e + k * s_w_k, mask=e_mask, other=0.0).to(tl.float32)
        src = t + SIGN * (k - (K - 1))
        m = ((src >= 0) & (src < L))[:, None] & e_mask[None, :]
        acc += w_k[None, :] * tl.load(x_base + src[:, None] * s_x_l, mask=m,
                                      other=0.0).to(tl.float32)
    u = acc * tl.sigmoid(acc)
    out = out_ptr + b * s_o_b + e[None, :] * s_o_e + t[:, None] * s_o_l
    tl.store(out, u.to(out_ptr.dtype.element_ty), mask=(t < L)[:, None] & e_mask[None, :])


@triton.autotune(configs=_bwd_configs(), key=["E", "L", "s_x_e", "s_dx_e"],
                 reset_to_zero=["dw_ptr", "db_ptr"])
@triton.jit
def _conv_silu_bwd_kernel(
    x_ptr, w_ptr, b_ptr, du_ptr, dx_ptr, dw_ptr, db_ptr,
    E, L,
    s_x_b, s_x_e, s_x_l, s_w_e, s_w_k, s_du_b, s_du_e, s_du_l, s_dx_b, s_dx_e, s_dx_l,
    K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr,
    ACCUMULATE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr, TILES: tl.constexpr,
):
    SIGN: tl.constexpr = 1 - 2 * REVERSE
    b = tl.program_id(2).to(tl.int64)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < E
    kk = tl.arange(0, KP)
    x_base = x_ptr + b * s_x_b + e[None, :] * s_x_e
    du_base = du_ptr + b * s_du_b + e[None, :] * s_du_e
    dx_base = dx_ptr + b * s_dx_b + e[None, :] * s_dx_e

    w = ()
    for k in tl.static_range(K):
        w = w + (tl.load(w_ptr + e * s_w_e + k * s_w_k, mask=e_mask,
                         other=0.0).to(tl.float32)[None, :],)
    bias = tl.zeros((1, BLOCK_E), dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + e, mask=e_mask, other=0.0).to(tl.float32)[None, :]

    # dW as a (BLOCK_E, KP) tile, not K vectors: a tile is a plain loop-carried value.
    dw_acc = tl.zeros((BLOCK_E, KP), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    start = tl.program_id(1) * (BLOCK_L * TILES)
    for i in range(0, tl.minimum(TILES, tl.cdiv(L - start, BLOCK_L))):
        s = start + i * BLOCK_L + tl.arange(0, BLOCK_L)
        # xt[m] = x[s + SIGN * (m - (K-1))], m in [0, 2K-2]: every shift the K
        # recomputations below need, each loaded once (zero outside [0, L)).
        xt = ()
        for m in tl.static_range(2 * K - 1):
            src = s + SIGN * (m - (K - 1))
            msk = ((src >= 0) & (src < L))[:, None] & e_mask[None, :]
            xt = xt + (tl.load(x_base + src[:, None] * s_x_l, mask=msk,
                               other=0.0).to(tl.float32),)
        dx = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32)
        # Tap j of output time tj = s - SIGN * (j - (K-1)) read x[s]; j = K-1 is tj = s.
        for j in tl.static_range(K):
            tj = s - SIGN * (j - (K - 1))
            pre = bias
            for k in tl.static_range(K):
                pre = pre + w[k] * xt[k - j + K - 1]
            # du is zero outside [0, L) and outside the channel block, which zeroes dpre
            # there: no padding term leaks into dx, dW or db.
            msk = ((tj >= 0) & (tj < L))[:, None] & e_mask[None, :]
            du = tl.load(du_base + tj[:, None] * s_du_l, mask=msk, other=0.0).to(tl.float32)
            sig = tl.sigmoid(pre)
            dpre = du * sig * (1.0 + pre * (1.0 - sig))
            dx += w[j] * dpre
            if j == K - 1:
                db_acc += tl.sum(dpre, axis=0)
                for k in tl.static_range(K):
                    part = tl.sum(dpre * xt[k], axis=0)
                    dw_acc += tl.where(kk[None, :] == k, part[:, None], 0.0)
        dx_mask = (s < L)[:, None] & e_mask[None, :]
        if ACCUMULATE:  # the other direction's dx is there already
            dx += tl.load(dx_base + s[:, None] * s_dx_l, mask=dx_mask).to(tl.float32)
        tl.store(dx_base + s[:, None] * s_dx_l, dx.to(dx_ptr.dtype.element_ty), mask=dx_mask)

    tl.atomic_add(dw_ptr + e[:, None] * K + kk[None, :], dw_acc,
                  mask=e_mask[:, None] & (kk < K)[None, :], sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(db_ptr + e, db_acc, mask=e_mask, sem="relaxed")


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> int:
    """Validate shapes; returns K."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, E, L), got shape {tuple(x.shape)}")
    E = x.shape[1]
    if weight.dim() != 3 or weight.shape[:2] != (E, 1):
        raise ValueError(f"weight must be ({E}, 1, K), got {tuple(weight.shape)}")
    K = weight.shape[2]
    if not 1 <= K <= MAX_K:
        raise ValueError(f"kernel size {K} outside [1, {MAX_K}]")
    if bias is not None and bias.shape != (E,):
        raise ValueError(f"bias must be ({E},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return K


def _check_io(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.shape != x.shape or t.device != x.device:
        raise ValueError(f"{name} must be {tuple(x.shape)} on {x.device}, "
                         f"got {tuple(t.shape)} on {t.device}")
    # Offsets within one image are int32 in the kernels.
    extent = sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]))
    if extent >= 2 ** 31:
        raise ValueError(f"{name} spans {extent} elements per image, over int32 offsets")


def is_channel_minor(x: torch.Tensor) -> bool:
    """Whether (B, E, L) ``x`` is stored with its channels innermost, as (B, L, E)."""
    return x.stride(1) < x.stride(2)


def empty_like_layout(x: torch.Tensor, channel_minor: bool,
                      dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A dense (B, E, L) tensor, stored as (B, L, E) when ``channel_minor``."""
    B, E, L = x.shape
    dtype = x.dtype if dtype is None else dtype
    if channel_minor:
        return torch.empty((B, L, E), dtype=dtype, device=x.device).transpose(1, 2)
    return torch.empty((B, E, L), dtype=dtype, device=x.device)


def conv_silu_forward_into(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           reverse: bool, out: torch.Tensor) -> torch.Tensor:
    """SiLU(depthwise conv(x)) written into ``out`` (B, E, L) through its strides, in out's
    dtype, so a caller can place u wherever its consumer reads it. Returns ``out``."""
    K = _check(x, weight, bias)
    _check_io("x", x, x)
    _check_io("out", out, x)
    B, E, L = x.shape
    if B == 0 or E == 0 or L == 0:
        return out
    grid = lambda meta: (triton.cdiv(E, meta["BLOCK_E"]),  # noqa: E731
                         triton.cdiv(L, meta["BLOCK_L"]), B)
    # The flags skip the bias load; weight stands in for an absent bias pointer.
    _conv_silu_fwd_kernel[grid](
        x, weight, weight if bias is None else bias, out, E, L,
        *x.stride(), weight.stride(0), weight.stride(2), *out.stride(),
        K=K, HAS_BIAS=bias is not None, REVERSE=bool(reverse),
    )
    return out


def conv_silu_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      reverse: bool = False, channel_minor: Optional[bool] = None
                      ) -> torch.Tensor:
    """u = SiLU(causal, or with ``reverse`` anti-causal, depthwise conv(x)): (B, E, L) in x's
    dtype. ``channel_minor`` picks u's storage: True stores (B, L, E) and returns its
    transposed view, False a contiguous (B, E, L); None follows x's layout."""
    _check(x, weight, bias)
    if channel_minor is None:
        channel_minor = is_channel_minor(x)
    return conv_silu_forward_into(x, weight, bias, reverse,
                                  empty_like_layout(x, channel_minor))


def conv_silu_backward(du: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor], reverse: bool = False,
                       dx: Optional[torch.Tensor] = None, accumulate: bool = False,
                       dweight: Optional[torch.Tensor] = None,
                       dbias: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of ``conv_silu_forward`` from du (any strides): (dx, dweight (E, 1, K),
    dbias (E,) or None when bias is None). The pre-activation is recomputed from x. dx goes
    into ``dx`` through its strides when given (e.g. a slice of a larger gradient buffer),
    added to what it holds with ``accumulate``, else into a new tensor in x's layout and
    dtype; dW and db come back in weight's and bias's dtypes, summed in fp32. ``dweight``
    (E, 1, K) and ``dbias`` (E,): contiguous fp32 tensors the kernel adds them to instead (the
    caller zeroes them), returned as given."""
    K = _check(x, weight, bias)
    _check_io("x", x, x)
    _check_io("du", du, x)
    if dx is None:
        if accumulate:
            raise ValueError("accumulate needs a dx to add into")
        dx = empty_like_layout(x, is_channel_minor(x))
    _check_io("dx", dx, x)
    B, E, L = x.shape
    # fp32 accumulators for the kernel's atomics; db always gets a real buffer so the
    # autotuner's reset_to_zero never touches a stand-in pointer.
    dw = _accumulator("dweight", dweight, (E, 1, K), x.device)
    db = _accumulator("dbias", dbias, (E,), x.device)
    if B > 0 and E > 0 and L > 0:
        grid = lambda meta: (triton.cdiv(E, meta["BLOCK_E"]),  # noqa: E731
                             triton.cdiv(L, meta["BLOCK_L"] * meta["TILES"]), B)
        _conv_silu_bwd_kernel[grid](
            x, weight, weight if bias is None else bias, du, dx, dw, db, E, L,
            *x.stride(), weight.stride(0), weight.stride(2), *du.stride(), *dx.stride(),
            K=K, KP=triton.next_power_of_2(K), HAS_BIAS=bias is not None,
            REVERSE=bool(reverse), ACCUMULATE=bool(accumulate),
        )
    if dweight is None:
        dweight = dw.to(weight.dtype)
    if bias is None:
        dbias = None
    elif dbias is None:
        dbias = db.to(bias.dtype)
    return dx, dweight, dbias


def _accumulator(name: str, given: Optional[torch.Tensor], shape: Tuple[int, ...],
                 device: torch.device) -> torch.Tensor:
    """A given fp32 accumulator once checked, else a new zeroed one."""
    if given is None:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    if (tuple(given.shape) != shape or given.dtype != torch.float32
            or given.device != device or not given.is_contiguous()):
        raise ValueError(f"{name}: expected a contiguous float32 {shape} on {device}, got "
                         f"{given.dtype} {tuple(given.shape)} on {given.device}")
    return given
