"""cost_ledger: one Mamba® block's bookings against a count made by hand from its shapes, the
booking rules one by one, the Python backward against autograd's, and the CLI end to end."""
import json
import sys
from typing import Callable, List, Tuple

import pytest
import torch
import torch.nn as nn
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import TOOLS

sys.path.insert(0, str(TOOLS))
import cost_ledger  # noqa: E402
from selective_scan import triton_kernels as selective_scan_triton
from vision_mamba import Block

Row = Tuple[str, str, int, int, int, int, int]   # op, kind, launches, read, written, FLOPs, scratch


def _rows(ledger: cost_ledger.Ledger, phase: str) -> List[Row]:
    return [(r.op, r.kind, r.launches, r.read, r.written, r.flops, r.scratch)
            for r in ledger.records if r.phase == phase]


def _booked(step: Callable[[], None], phase: str = "") -> cost_ledger.Ledger:
    """What ``step`` books, run on fake CUDA tensors, in the given phase of a step."""
    ledger = cost_ledger.Ledger()
    ledger.phase = phase
    with FakeTensorMode(), cost_ledger.recording(ledger):
        step()
    return ledger


# --------------------------------------------------------------------------- one block by hand

# Block(16) in fp32 at batch 2 and 8 tokens: d_model D = 16, d_inner E = 32, d_state N = 16,
# dt_rank R = ceil(16 / 16) = 1, conv kernel K = 4, x_proj out P = R + 2N = 33. Bytes, 4 each:
B, L, D, E, N, R, K, P = 2, 8, 16, 32, 16, 1, 4, 33
BLD = B * L * D * 4            # 1024: hidden, residual, normed, out, their grads
RSTD = B * L * 4               # 64: RMSNorm's 1 / rms per token
WN = D * 4                     # 64: norm weight
W_IN = 2 * E * D * 4           # 4096: in_proj weight (2E, D)
XZ = B * L * 2 * E * 4         # 4096: in_proj output, x and z together; dxz
BEL = B * E * L * 4            # 2048: x, z, u, delta, the op's out, du, ddelta, dz, ...
WC = E * K * 4                 # 512: conv weight (E, 1, K)
VEC = E * 4                    # 128: conv bias, D, dt_proj bias
A = E * N * 4                  # 2048: A_log, A, dA
W_X = P * E * 4                # 4224: x_proj weight (P, E)
XDBL = B * P * L * 4           # 2112: x_proj output (B, L, P) = dt, B, C; its grad dx_dbl
BN = B * N * L * 4             # 1024: the scan's B and C (views of x_proj's output), dB, dC
DT = B * R * L * 4             # 64: dt, a (B*L, R) slice of x_proj's output; d dt
W_DT = E * R * 4               # 128: dt_proj weight (E, R)
W_OUT = D * E * 4              # 2048: out_proj weight (D, E)
# The scan backward's boundary states, (B, E, slots, 16) fp32: slots = ceil(L / shortest chunk)
# - 1, at least 1; 8 tokens give 1 with the GPU's 4-token chunks and the interpreter's 16.
CKPT = B * E * 1 * 16 * 4      # 4096
# The norm backward's d_weight partials, one fp32 row per program: min(row blocks, 4 x SMs)
# programs, and at D = 16 a block has 16 rows: the B*L = 16 rows are one program's.
PARTIAL = 1 * D * 4            # 64
# FLOPs, 2 per multiply-add:
F_IN = 2 * B * L * D * 2 * E          # 32768
F_XPROJ = 2 * B * P * E * L           # 33792
F_DTPROJ = 2 * B * E * R * L          # 1024
F_OUT = 2 * B * L * E * D             # 16384

T, CP, EW, G, CV, NM, FL, RD, S = ("transposing copy", "copy/cast", "elementwise/glue", "gemm",
                                   "conv", "norm", "fill", "reduction", "scan")


# Both directions' convs: the Triton conv reads x in place (a channel-minor view of xz) and
# writes u channel-minor, the reverse direction by its taps' addresses (no flipped weight).
CONVS = [("triton conv1d+SiLU forward", CV, 1, BEL + WC + VEC, BEL, 0, 0)] * 2
# Both directions' delta by one batched GEMM: their dt, (B*L, R) slices of x_proj's outputs,
# times the stacked dt_proj weights (2, E, R).
DELTA = [("bmm", G, 1, 2 * DT + 2 * W_DT, 2 * BEL, 2 * F_DTPROJ, 0)]


def _scan_forward(reverse: bool) -> Row:
    # Reads u, delta, A, B, C, D, z, the dt_proj bias and writes ½ y into the op's (B, L, E)
    # output; the reverse direction adds its ½ y there: it reads the output too.
    return ("triton scan forward", S, 1, 3 * BEL + A + 2 * BN + 2 * VEC + (BEL if reverse else 0),
            BEL, 0, 0)


FORWARD = [
    # fused_norm: residual + hidden and the norm in one kernel; writes normed, the fp32
    # new residual and rstd
    ("triton add+RMSNorm forward", NM, 1, 2 * BLD + WN, 2 * BLD + RSTD, 0, 0),
    # MixerWeights, in fp32 (nothing to cast): both dt_proj weights copied into one stacked
    # tensor, A = -exp(A_log) for both directions, one multi-tensor kernel each
    ("_foreach_copy_", CP, 1, 2 * W_DT, 2 * W_DT, 0, 0),
    ("_foreach_exp", EW, 1, 2 * A, 2 * A, 0, 0), ("_foreach_neg_", EW, 1, 2 * A, 2 * A, 0, 0),
    ("mm", G, 1, BLD + W_IN, XZ, F_IN, 0),                        # in_proj
    # mambar::bimamba: the convs, x_proj per direction (one GEMM over the B*L tokens of u,
    # into its half of the (2, B, L, P) output the op keeps), delta, the scans
    *CONVS, *[("mm", G, 1, BEL + W_X, XDBL, F_XPROJ, 0)] * 2, *DELTA,
    _scan_forward(False), _scan_forward(True),
    ("mm", G, 1, BEL + W_OUT, BLD, F_OUT, 0),                     # out_proj, on the op's output
    ("sum", RD, 1, BLD, 4, 0, 0),                                 # the loss
]


def _scan_backward(reverse: bool) -> Row:
    # Reads u, delta, A, B, C, D, z, bias, dout (the op's dout, transposed view), then u and
    # B again (boundary pass); writes du, ddelta, dA, dB, dC, dD, dz, dbias; scratch:
    # softplus(delta) fp32 (written once, read twice) and the boundary states (written and
    # read once). The reverse direction adds its dz into dxz's z half: it reads it first.
    accumulated = BEL if reverse else 0
    return ("triton scan backward", S, 1, 3 * BEL + A + 2 * BN + 2 * VEC + BEL + BEL + BN
            + accumulated + 2 * BEL + CKPT, 3 * BEL + A + 2 * BN + 2 * VEC + BEL + CKPT, 0,
            3 * BEL + 2 * CKPT)


def _x_proj_and_conv_backward(reverse: bool) -> List[Row]:
    # Per direction: dW_x = dx_dbl^T u over the tokens; du += dx_dbl W_x in place (reads
    # du); the conv backward reads x, du, w, bias, writes dx into dxz's x half (the reverse
    # direction adds: reads it), dW and db (atomics into the zeroed buffers).
    accumulated = BEL if reverse else 0
    return [("mm", G, 1, XDBL + BEL, W_X, F_XPROJ, 0),
            ("addmm_", G, 1, BEL + XDBL + W_X, BEL, F_XPROJ, 0),
            ("triton conv1d+SiLU backward", CV, 1, 2 * BEL + WC + VEC + accumulated,
             BEL + WC + VEC, 0, 0)]


BACKWARD = [
    ("ones_like", FL, 1, 0, 4, 0, 0),
    # out_proj: the loss's grad is a scalar broadcast to (B*L, D), which cuBLAS cannot take:
    # copied (4 bytes read) before each of the two GEMMs.
    ("mm: operand.contiguous()", CP, 1, 4, BLD, 0, 0), ("mm", G, 1, BLD + BEL, W_OUT, F_OUT, 0),
    ("mm: operand.contiguous()", CP, 1, 4, BLD, 0, 0), ("mm", G, 1, BLD + W_OUT, BEL, F_OUT, 0),
    # mambar::bimamba_backward. One kernel zeroes what kernels add into: d(dt, B, C) of both
    # directions (fp32 here, so dB and dC go straight into it) and per direction dA, dD,
    # d dt_proj bias, the conv's dW and db. dxz is allocated, not zeroed.
    ("_foreach_zero_", FL, 1, 0, 2 * XDBL + 2 * (A + 2 * VEC + WC + VEC), 0, 0),
    *CONVS, *DELTA,                                   # recomputed; x_proj's output was kept
    _scan_backward(False), _scan_backward(True),
    # Back through delta for both directions at once: dW_dt = ddelta^T dt, and d dt =
    # ddelta W_dt written into dx_dbl's first R columns.
    ("bmm", G, 1, 2 * BEL + 2 * DT, 2 * W_DT, 2 * F_DTPROJ, 0),
    ("bmm", G, 1, 2 * BEL + 2 * W_DT, 2 * DT, 2 * F_DTPROJ, 0),
    *_x_proj_and_conv_backward(False), *_x_proj_and_conv_backward(True),
    ("mm", G, 1, XZ + BLD, W_IN, F_IN, 0), ("mm", G, 1, XZ + W_IN, BLD, F_IN, 0),  # in_proj
    # MixerWeights' backward: the stacked dt_proj gradient copied out to the two
    # parameters' gradients; dA_log = dA * A for both directions
    ("_foreach_copy_", CP, 1, 2 * W_DT, 2 * W_DT, 0, 0),
    ("_foreach_mul", EW, 1, 4 * A, 2 * A, 0, 0),
    # reads d_normed, the saved new residual, rstd, weight: the block's residual output is
    # unused here, so its gradient is None (materialize_grads off), not zeros to read; writes
    # d_hidden and d_residual (two tensors: neither leaf copies) and the d_weight partials,
    # which a sum finishes.
    ("triton add+RMSNorm backward", NM, 1, 2 * BLD + RSTD + WN, 2 * BLD + PARTIAL, 0, 0),
    ("sum", RD, 1, PARTIAL, WN, 0, 0),
]


@pytest.fixture
def block_ledger() -> cost_ledger.Ledger:
    with torch.device("meta"):
        block = Block(D, scan_backend="triton")
    ledger = cost_ledger.Ledger()
    with FakeTensorMode():
        cost_ledger.to_fake_cuda(block)
        hidden = torch.empty(B, L, D, device="cuda", requires_grad=True)
        residual = torch.empty(B, L, D, device="cuda", requires_grad=True)
        with cost_ledger.recording(ledger):
            ledger.phase = "forward"
            loss = block(hidden, residual)[0].sum()
            ledger.phase = "backward"
            cost_ledger.run_backward(loss)
    return ledger


def test_block_forward_matches_hand_count(block_ledger):
    assert _rows(block_ledger, "forward") == FORWARD


def test_block_backward_matches_hand_count(block_ledger):
    assert _rows(block_ledger, "backward") == BACKWARD


def test_block_totals_keep_the_scan_apart(block_ledger):
    summary = block_ledger.summary()
    every = FORWARD + BACKWARD
    scan = [r for r in every if r[1] == S]
    assert summary["scan"]["launches"] == 4
    assert summary["scan"]["read_bytes"] == sum(r[3] for r in scan)
    assert summary["outside_scan"]["launches"] == sum(r[2] for r in every) - 4
    assert summary["outside_scan"]["written_bytes"] == sum(r[4] for r in every if r[1] != S)
    # in_proj and out_proj: forward + 2 grads; per direction x_proj 3 (forward, 2 grads: its
    # output is kept) and dt_proj 4 (forward, recompute, 2 grads). The Triton conv, like the
    # scan, books bytes, no FLOPs.
    assert summary["total"]["flops"] == 3 * F_IN + 3 * F_OUT + 6 * F_XPROJ + 8 * F_DTPROJ
    assert T not in summary["by_kind"]


# --------------------------------------------------------------------------- rules one by one


def test_views_cost_nothing_and_transposing_copies_are_their_own_kind():
    def step():
        x = torch.empty(64, 32, device="cuda")
        x.t(), x.view(32, 64), x[:, :16], x.unsqueeze(0).expand(3, 64, 32)
        x.t().contiguous()                          # reads x across its rows
        x.clone()
        x[:, :16].contiguous()                      # strided rows, inner-dense: reads its own
        torch.empty(64, 32, device="cuda").copy_(torch.empty(32, device="cuda").expand(64, 32))
        x.t().to(torch.bfloat16)                    # keeps x's layout: not transposing
    rows = _rows(_booked(step), "")
    assert rows == [("clone", "transposing copy", 1, 8192, 8192, 0, 0),
                    ("clone", "copy/cast", 1, 8192, 8192, 0, 0),
                    ("clone", "copy/cast", 1, 4096, 4096, 0, 0),
                    ("copy_", "copy/cast", 1, 128, 8192, 0, 0),
                    ("_to_copy", "copy/cast", 1, 8192, 4096, 0, 0)]


def test_booked_triton_scan_kernels_move_their_tensors_bytes():
    b, e, n, length, slots = 2, 32, 16, 8, 1
    bel, bnl, en = b * e * length, b * n * length, e * n

    def step():
        half = dict(device="cuda", dtype=torch.bfloat16)
        u, delta, z, dout = (torch.empty(b, e, length, **half) for _ in range(4))
        bm, cm = torch.empty(b, n, length, **half), torch.empty(b, n, length, **half)
        a, d, bias = (torch.empty(e, n, device="cuda"), torch.empty(e, device="cuda"),
                      torch.empty(e, device="cuda"))
        selective_scan_triton.scan_forward(u, delta, a, bm, cm, d, z, bias, True, False)
        selective_scan_triton.scan_backward(u, delta, a, bm, cm, d, z, bias, dout, True, False)
    scans = [r for r in _booked(step).records if r.kind == "scan"]
    inputs = 3 * bel * 2 + 2 * bnl * 2 + en * 4 + 2 * e * 4      # u, delta, z; B, C; A; D, bias
    dt, ckpt = bel * 4, b * e * slots * 16 * 4
    assert [(r.op, r.launches, r.read, r.written, r.scratch) for r in scans] == [
        ("triton scan forward", 1, inputs, bel * 2, 0),
        ("triton scan backward", 1, inputs + bel * 2 + bel * 2 + bnl * 2 + 2 * dt + ckpt,
         3 * bel * 2 + en * 4 + 2 * bnl * 4 + 2 * e * 4 + dt + ckpt, 3 * dt + 2 * ckpt)]


@triton.jit
def _ledger_test_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)


def test_a_new_triton_kernel_is_booked_by_one_registered_rule(monkeypatch):
    monkeypatch.setattr(cost_ledger, "_TRITON_RULES", dict(cost_ledger._TRITON_RULES))

    @cost_ledger.triton_rule("_ledger_test_kernel")
    def rule(a):
        cost_ledger.book_kernel("copy kernel", reads=[a["x_ptr"]], writes=[a["y_ptr"]],
                                kind="elementwise/glue")

    def step():
        x, y = torch.empty(100, device="cuda"), torch.empty(100, device="cuda")
        _ledger_test_kernel[(1,)](x, y, 100, BLOCK=128)
    assert _rows(_booked(step), "") == [("copy kernel", "elementwise/glue", 1, 400, 400, 0, 0)]
    assert cost_ledger.book_kernel("outside a run") is False


def test_a_triton_kernel_without_a_rule_is_an_error_not_a_launch():
    def step():
        x = torch.empty(100, device="cuda")
        _ledger_test_kernel[(1,)](x, x, 100, BLOCK=128)
    with pytest.raises(RuntimeError, match="_ledger_test_kernel has no ledger booking"):
        _booked(step)


@pytest.mark.parametrize("numels, max_tensors, launches", [
    ([10, 10, 10], 110, 1),
    ([1] * 111, 110, 2),                       # the 110th tensor fills a launch
    ([320 * 65536], 36, 1),                    # 320 chunks fill one launch's blocks exactly
    ([320 * 65536 + 1], 36, 2),                # one chunk left over
    ([65536] * 36, 36, 1), ([65536] * 37, 36, 2),
    ([0, 5], 110, 1),                          # empty tensors are skipped
])
def test_multi_tensor_apply_launches(numels, max_tensors, launches):
    assert cost_ledger.mta_launches(numels, max_tensors) == launches


def test_fused_adamw_reads_four_tensors_and_writes_three_per_parameter():
    def step():
        params = [nn.Parameter(torch.empty(1000, device="cuda")),
                  nn.Parameter(torch.empty(70000, device="cuda"))]
        optimizer = torch.optim.AdamW(params, fused=True)
        for p in params:
            p.grad = torch.empty_like(p)
        optimizer.step()          # creates the state: zeros for the moments and steps
        optimizer.step()
    rows = _rows(_booked(step, "optimizer"), "optimizer")[-2:]
    # +1 on every step count (1 launch, 2 fp32 scalars), then one launch for 3 chunks of 2
    # tensors: param, grad, exp_avg, exp_avg_sq read (and the steps), three written back.
    assert rows == [("_foreach_add_", "optimizer", 1, 8, 8, 0, 0),
                    ("_fused_adamw_", "optimizer", 1, 16 * 71000 + 8, 12 * 71000, 0, 0)]


def test_foreach_ops_take_one_launch_only_on_cudas_fast_route():
    """multi_tensor_apply where every tensor is dense, the lists alike in sizes and strides
    and of one dtype (``_foreach_copy_``: one per list, so it casts in one launch); a kernel
    per tensor otherwise. Outside the optimizer each is booked as the work it does."""
    def step():
        a, b = torch.empty(8, 4, device="cuda"), torch.empty(3, device="cuda")
        half = [torch.empty(8, 4, device="cuda", dtype=torch.bfloat16),
                torch.empty(3, device="cuda", dtype=torch.bfloat16)]
        torch._foreach_copy_(half, [a, b])                          # casts: fast
        torch._foreach_zero_([a, b])                                # fast, reads nothing
        torch._foreach_mul([a, b], half)                            # two dtypes: slow
        torch._foreach_zero_([a.t(), torch.empty(8, 2, device="cuda")[:, 0]])  # strided: slow
    rows = _rows(_booked(step, "forward"), "forward")
    assert rows == [("_foreach_copy_", "copy/cast", 1, 35 * 4, 35 * 2, 0, 0),
                    ("_foreach_zero_", "fill", 1, 0, 35 * 4, 0, 0),
                    ("_foreach_mul", "elementwise/glue", 2, 35 * 6, 35 * 4, 0, 0),
                    ("_foreach_zero_", "fill", 2, 0, 32 * 4 + 8 * 4, 0, 0)]


def test_flash_attention_is_what_an_h100_runs():
    def step():
        q, k, v = (torch.empty(2, 3, 10, 64, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        cost_ledger.run_backward(out.sum())
    attention = [r for r in _booked(step).records if r.kind == "attention"]
    fwd = 4 * 2 * 3 * 10 * 10 * 64                 # QK^T and PV
    assert [(r.op, r.launches, r.flops) for r in attention] == [
        ("_scaled_dot_product_flash_attention", 1, fwd),
        ("_scaled_dot_product_flash_attention_backward", 3, fwd * 5 // 2)]


def test_roofline_is_bytes_or_flops_whichever_takes_longer():
    ledger = cost_ledger.Ledger()
    # 6.7 MB moved: 2 us on an H100 (3.35 TB/s), 1.4 us on an H200 (4.8 TB/s).
    ledger.add(cost_ledger.Record("copy", "copy/cast", 1, 3_350_000, 3_350_000))
    # 989.4 GFLOP at 989.4 TFLOP/s: 1 ms on both, far longer than its 3.35 MB.
    ledger.add(cost_ledger.Record("gemm", "gemm", 1, 3_350_000, 0, flops=989_400_000_000,
                                  peak="tensor"))
    totals = ledger.summary()["total"]
    assert totals["H100_ms"] == pytest.approx(0.002 + 1.0)
    assert totals["H200_ms"] == pytest.approx(6.7e6 / 4.8e12 * 1e3 + 1.0)


# --------------------------------------------------------------------------- the backward


class _Scale(torch.autograd.Function):
    """A custom Function with a non-tensor input between tensor ones."""

    @staticmethod
    def forward(ctx, x, factor, y):
        ctx.factor = factor
        return x * factor + y

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None, grad


def test_python_backward_gives_autograd_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4).double()
    bias = nn.Parameter(torch.randn(4, dtype=torch.float64))
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def loss():
        h = lin(x)
        h = _Scale.apply(h, 3.0, h.float().double()) + bias      # bias broadcast: sum_to
        return (h * h).sum() + h.sum()                           # h used twice: summed grads
    loss().backward()
    expected = [t.grad.clone() for t in (x, bias, *lin.parameters())]
    for t in (x, bias, *lin.parameters()):
        t.grad = None
    cost_ledger.run_backward(loss())
    for got, want in zip((x.grad, bias.grad, *[p.grad for p in lin.parameters()]), expected):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_books_a_mambar_and_a_deit_step(tmp_path, capsys):
    out = tmp_path / "ledger.json"
    assert cost_ledger.main(["--model", "mambar_tiny_patch16_224", "--batch", "2",
                             "--reference", "deit_tiny_patch16_224", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "outside the scan" in table and "deit_tiny_patch16_224" in table
    runs = json.loads(out.read_text())["runs"]
    mambar, deit = runs["mambar_tiny_patch16_224"], runs["deit_tiny_patch16_224"]
    # 24 blocks, 2 directions, a forward and a backward scan each.
    assert mambar["scan"]["launches"] == 96
    # The mixer op reads xz's halves and writes its output and dxz's halves in place.
    assert "transposing copy" not in mambar["by_kind"]
    # Per block and direction the Triton conv runs forward twice (the op's forward, the
    # backward's recompute) and backward once; PyTorch's depthwise conv not at all.
    ops = mambar["by_op"]
    assert ops["triton conv1d+SiLU forward"]["launches"] == 24 * 2 * 2
    assert ops["triton conv1d+SiLU backward"]["launches"] == 24 * 2
    assert "conv_depthwise2d_forward" not in ops
    # add + RMSNorm, fused each way: before each block's mixer and as norm_f.
    assert ops["triton add+RMSNorm forward"]["launches"] == 24 + 1
    assert ops["triton add+RMSNorm backward"]["launches"] == 24 + 1
    assert deit["scan"]["launches"] == 0 and "transposing copy" not in deit["by_kind"]
    # 12 layers: flash forward 1, backward 3.
    assert deit["by_kind"]["attention"]["launches"] == 12 * 4
