"""Time the selective scan alone on a GPU: each backend, each direction, forward and backward.

    python tools/scan_bench.py --json scan_bench.json          # all shapes, every backend found

Shapes are those of a training step: ``base`` (Mamba®-Base at 224 px: batch 128, E 1536,
N 16, L 208), ``base448`` (L 796) and ``tiny`` (E 384, L 208). Inputs are bf16 and laid out as
the mixer passes them (u and delta time-minor, z and the output gradient channel-minor views,
B and C row slices of the x_proj output). Rows:

- ``triton``: our Triton scan, with the autotuner's choice per kernel;
- ``gluon``: our Gluon scan (``selective_scan/gluon_kernels.py``), likewise, on sm_90+ GPUs whose
  Triton has Gluon;
- ``cuda``: mamba-ssm's kernel through our backend (``selective_scan.selective_scan_cuda``:
  its contiguous copies, the flips of the reverse direction and the forward it reruns in the
  backward included), when mamba-ssm is installed;
- ``cuda-kernel``: mamba-ssm's ``selective_scan_fn`` itself on contiguous inputs (forward
  direction only: it has no reverse mode);
- ``probe``: a speed-of-light calibration at the same shape: per state element one exponential,
  three multiply-adds and the output sum, no gradient (a minimal sequential forward scan with
  coalesced loads), timed forward only.

Times are medians of ``triton.testing.do_bench``; backward = (forward + backward) - forward.
``ns/elem`` divides by the state elements batch x E x N x L.
"""
import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmark  # noqa: E402
import selective_scan as ss  # noqa: E402

SHAPES = {  # name: (batch, E, N, L, dt_rank)
    "base": (128, 1536, 16, 208, 48),
    "base448": (128, 1536, 16, 796, 48),
    "tiny": (128, 384, 16, 208, 12),
}


def model_layout_inputs(batch: int, E: int, N: int, L: int, rank: int,
                        dtype=torch.bfloat16, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Leaf tensors with the strides the mixer's tensors have (see the module docstring)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, device="cuda") * scale + shift

    def strided_leaf(values: torch.Tensor, size, stride) -> torch.Tensor:
        leaf = torch.empty_strided(size, stride, dtype=dtype, device="cuda")
        leaf.copy_(values)
        return leaf.requires_grad_(True)

    channel_minor = (L * 2 * E, 1, 2 * E)                 # a channel slice of (B, L, 2E)
    proj_rows = ((rank + 2 * N) * L, L, 1)                 # rows of the (B, R + 2N, L) output
    return dict(
        u=randn(batch, E, L).to(dtype).requires_grad_(True),
        delta=randn(batch, E, L, scale=0.5, shift=-1.0).to(dtype).requires_grad_(True),
        A=(-torch.exp(randn(E, N, scale=0.5) + 1.0)).requires_grad_(True),
        B=strided_leaf(randn(batch, N, L), (batch, N, L), proj_rows),
        C=strided_leaf(randn(batch, N, L), (batch, N, L), proj_rows),
        D=randn(E).requires_grad_(True),
        z=strided_leaf(randn(batch, E, L), (batch, E, L), channel_minor),
        delta_bias=randn(E, scale=0.5).requires_grad_(True),
        dout=strided_leaf(randn(batch, E, L), (batch, E, L), channel_minor).detach(),
    )


ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def bench(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def time_scan(scan: Callable, inputs: Dict[str, torch.Tensor], **kw) -> Dict[str, float]:
    args = [inputs[k] for k in ARGS]
    leaves = [a for a in args if a.requires_grad]
    dout = inputs["dout"]

    def forward():
        with torch.no_grad():
            scan(*args, delta_softplus=True, **kw)

    def forward_backward():
        torch.autograd.grad(scan(*args, delta_softplus=True, **kw), leaves, dout)

    fwd = bench(forward)
    both = bench(forward_backward)
    return {"fwd_ms": fwd, "bwd_ms": both - fwd, "fwd_bwd_ms": both}


@triton.jit
def _probe_kernel(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, out_ptr, E, L,
                  N: tl.constexpr, BLOCK_E: tl.constexpr):
    """h = exp(dt A) h + (dt u) B; y = sum_n C h, one token after another; (B, L, E) layout so
    that the loads of a token are coalesced."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, N)
    mask = e < E
    a = tl.load(a_ptr + e[:, None] * N + n[None, :], mask=mask[:, None], other=0.0)
    a = a * 1.4426950408889634  # exp(x) = exp2(x log2 e)
    h = tl.zeros((BLOCK_E, N), dtype=tl.float32)
    row = tl.program_id(1) * L * E
    bc = tl.program_id(1) * L * N
    for t in range(L):
        u = tl.load(u_ptr + row + t * E + e, mask=mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + row + t * E + e, mask=mask, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + bc + t * N + n).to(tl.float32)
        ct = tl.load(c_ptr + bc + t * N + n).to(tl.float32)
        h = tl.exp2(dt[:, None] * a) * h + (dt * u)[:, None] * bt[None, :]
        y = tl.sum(h * ct[None, :], axis=1)
        tl.store(out_ptr + row + t * E + e, y.to(out_ptr.dtype.element_ty), mask=mask)


def time_probe(batch: int, E: int, N: int, L: int) -> Dict[str, object]:
    g = torch.Generator(device="cuda").manual_seed(1)
    u = torch.randn(batch, L, E, generator=g, device="cuda").bfloat16()
    dt = (torch.rand(batch, L, E, generator=g, device="cuda") * 0.1).bfloat16()
    a = -torch.rand(E, N, generator=g, device="cuda") - 0.5
    b = torch.randn(batch, L, N, generator=g, device="cuda").bfloat16()
    c = torch.randn(batch, L, N, generator=g, device="cuda").bfloat16()
    out = torch.empty_like(u)
    best = None
    for block_e, warps in ((32, 1), (64, 2), (128, 4), (256, 8)):
        grid = (triton.cdiv(E, block_e), batch)
        ms = bench(lambda: _probe_kernel[grid](u, dt, a, b, c, out, E, L, N=N, BLOCK_E=block_e,
                                               num_warps=warps))
        if best is None or ms < best["fwd_ms"]:
            best = {"fwd_ms": ms, "config": f"BLOCK_E={block_e}, num_warps={warps}"}
    # The probe must compute the scan it claims to (on a slice, against a plain loop).
    h = torch.zeros(E, N, device="cuda")
    for t in range(4):
        h = torch.exp(dt[0, t].float()[:, None] * a) * h + \
            (dt[0, t].float() * u[0, t].float())[:, None] * b[0, t].float()[None, :]
        want = (h * c[0, t].float()[None, :]).sum(1)
        torch.testing.assert_close(out[0, t].float(), want, rtol=2e-2, atol=2e-2)
    return best


def gluon_scan() -> Optional[Callable]:
    """The Gluon scan under autograd, where it runs: an sm_90+ GPU and a Triton with Gluon."""
    if torch.cuda.get_device_capability()[0] < 9:
        return None
    try:
        from selective_scan import gluon_kernels
    except (ImportError, AttributeError):  # no triton.experimental.gluon, or an older one
        return None
    return ss.kernel_scan(gluon_kernels.scan_forward, gluon_kernels.scan_backward)


def cuda_kernel_scan() -> Optional[Callable]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:
        return None

    def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return scan


def contiguous_inputs(inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().requires_grad_(v.requires_grad)
            for k, v in inputs.items()}


def run(shapes: Sequence[str], backends: Sequence[str]) -> List[Dict[str, object]]:
    rows = []
    for shape in shapes:
        batch, E, N, L, rank = SHAPES[shape]
        elements = batch * E * N * L
        inputs = model_layout_inputs(batch, E, N, L, rank)
        plan = []
        if "triton" in backends and ss.triton_available():
            plan += [("triton", ss.get_scan("triton"), inputs, r) for r in (False, True)]
        gluon = gluon_scan() if "gluon" in backends else None
        if gluon is not None:
            plan += [("gluon", gluon, inputs, r) for r in (False, True)]
        if "cuda" in backends and ss.cuda_kernels_available():
            plan += [("cuda", ss.get_scan("cuda"), inputs, r) for r in (False, True)]
            plan.append(("cuda-kernel", cuda_kernel_scan(), contiguous_inputs(inputs), None))
        for name, scan, args, reverse in plan:
            kw = {} if reverse is None else {"reverse": reverse}
            try:
                row = time_scan(scan, args, **kw)
            except Exception as err:  # one failing backend must not hide the others' figures
                row = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
            rows.append({"shape": shape, "backend": name, "reverse": bool(reverse), **row})
            print(format_row(rows[-1], elements), flush=True)
        if "probe" in backends:
            rows.append({"shape": shape, "backend": "probe", "reverse": False,
                         **time_probe(batch, E, N, L)})
            print(format_row(rows[-1], elements), flush=True)
        for row in rows:
            if row["shape"] == shape:
                row["elements"] = elements
        del inputs
        torch.cuda.empty_cache()
    return rows


def format_row(row: Dict[str, object], elements: int) -> str:
    if "error" in row:
        return (f"{row['shape']:8s} {row['backend']:12s} rev={int(row['reverse'])} "
                f"ERROR {row['error']}")
    parts = [f"{row['shape']:8s} {row['backend']:12s} rev={int(row['reverse'])}"]
    for key in ("fwd_ms", "bwd_ms"):
        if key in row:
            ms = row[key]
            parts.append(f"{key[:3]} {ms:7.3f} ms ({1e6 * ms / elements:.4f} ns/elem)")
    if "config" in row:
        parts.append(row["config"])
    return "  ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--backend", nargs="+", choices=("triton", "gluon", "cuda", "probe"),
                        default=["triton", "gluon", "cuda", "probe"])
    parser.add_argument("--json", help="write the rows and the autotuner's choices here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("scan_bench: needs a CUDA device", file=sys.stderr)
        return 2
    rows = run(args.shape, args.backend)
    choices = benchmark.triton_autotune_choices()
    for key, config in choices.items():
        print(f"autotuner: {key}: {config}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows,
                       "triton_autotune": choices}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
