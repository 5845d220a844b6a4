"""Helpers the test modules share: a tiny image folder, the scan kernels' checks against the
oracle, the kernel-stats figures, stand-ins for the CUDA extensions, and the mixer written
from the spec."""
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import selective_scan as ss
from selective_scan import loop, selective_scan_reference

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def triton_interpreted() -> bool:
    """Whether Triton runs its kernels in the interpreter here (the CPU tests)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        import triton.language as tl
    except ImportError:
        return False
    return isinstance(tl.standard.zeros, InterpretedFunction)


def triton_version():
    import triton
    return ".".join(triton.__version__.split(".")[:2])


# --------------------------------------------------------------------------- data

def make_image_folder(root, classes=2, train_per_class=4, val_per_class=2, size=40, seed=0):
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            base = np.zeros(3)
            base[c % 3] = 200
            for i in range(per_class):
                pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(root)


# --------------------------------------------------------------------------- training states

def assert_same(a, b, where="state"):
    """The same nested data, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_state(a, b):
    """Two final checkpoints hold the same training state (their args may differ)."""
    for part in ("model", "model_ema", "optimizer", "lr_scheduler", "scaler", "epoch",
                 "epoch_complete", "step", "max_accuracy", "best_source", "nonfinite_skipped"):
        assert_same(a[part], b[part], part)


# --------------------------------------------------------------------------- scans vs the oracle

def make_scan_inputs(batch, E, N, L, dtype=torch.float32, has_D=True, has_z=True, has_bias=True,
                strided=False, seed=0, device=DEVICE):
    """Leaf tensors (the ones gradients are taken of) and the scan arguments made from them.

    With ``strided`` the arguments are non-contiguous views: u and z are channel slices of
    one channel-minor (batch, 2E, L) view of a (batch, L, 2E) tensor, as the model's z is;
    delta is channel-minor too; B and C are row slices of one projection output, as in the
    model; A is a transposed view.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    # A like S4D-real init (-1..-N) with jitter; delta around softplus^-1 of small steps.
    A = -(torch.arange(1, N + 1).float().repeat(E, 1) * torch.rand(E, N, generator=g) + 0.1)
    A = A.to(device)
    leaves, args = {}, {}
    if strided:
        xz_t = rand(batch, L, 2 * E).to(dtype)
        delta_t = rand(batch, L, E, scale=0.5, shift=-1.0).to(dtype)
        proj = rand(batch, 3 + 2 * N, L).to(dtype)
        A_t = A.t().contiguous()
        leaves.update(xz_t=xz_t, delta_t=delta_t, proj=proj, A_t=A_t)
    else:
        leaves.update(u=rand(batch, E, L).to(dtype), delta=rand(batch, E, L, scale=0.5,
                      shift=-1.0).to(dtype), A=A, B=rand(batch, N, L).to(dtype),
                      C=rand(batch, N, L).to(dtype))
        if has_z:
            leaves["z"] = rand(batch, E, L).to(dtype)
    if has_D:
        leaves["D"] = rand(E)
    if has_bias:
        leaves["delta_bias"] = rand(E, scale=0.5)
    for t in leaves.values():
        t.requires_grad_(True)
    if strided:
        args.update(rebuild(leaves, {"z": has_z or None}, E, N))
        assert not args["u"].is_contiguous() and not args["B"].is_contiguous()
    else:
        args.update({k: leaves.get(k) for k in ("u", "delta", "A", "B", "C", "z")})
    args["D"] = leaves.get("D")
    args["delta_bias"] = leaves.get("delta_bias")
    return leaves, args


def upcast(leaves):
    """fp32 copies of the leaves (same values), as fresh leaves for the oracle."""
    return {k: v.detach().float().requires_grad_(True) for k, v in leaves.items()}


def rebuild(leaves, like_args, E, N):
    """The argument views of ``like_args`` rebuilt on other leaves (e.g. upcast ones)."""
    if "xz_t" not in leaves:
        return {k: (leaves.get(k) if like_args.get(k) is not None else None)
                for k in NAMES}
    xz, proj = leaves["xz_t"].transpose(1, 2), leaves["proj"]
    return dict(u=xz[:, :E], delta=leaves["delta_t"].transpose(1, 2), A=leaves["A_t"].t(),
                B=proj[:, 3:3 + N], C=proj[:, 3 + N:],
                z=xz[:, E:] if like_args["z"] is not None else None,
                D=leaves.get("D"), delta_bias=leaves.get("delta_bias"))


def rel_err(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def run_and_grad(scan, leaves, args, dout, **kw):
    out = scan(*(args[k] for k in NAMES), **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return out, dict(zip(leaves.keys(), grads))


def check_against(scan_a, scan_b, batch, E, N, L, dtype=torch.float32, tol=1e-4,
                  oracle_fp32=True, seed=0, device=DEVICE, **opts):
    """Compare scan_a (on inputs of ``dtype``) with scan_b (on the same values, in fp32 if
    ``oracle_fp32``): the output, then the gradient of every leaf, each by max-abs error
    relative to the largest value."""
    kw = {k: opts.pop(k) for k in ("reverse", "delta_softplus") if k in opts}
    leaves, args = make_scan_inputs(batch, E, N, L, dtype=dtype, seed=seed, device=device, **opts)
    ref_leaves = upcast(leaves) if oracle_fp32 else {
        k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    ref_args = rebuild(ref_leaves, args, E, N)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(batch, E, L, generator=g).to(device=device, dtype=dtype)
    if opts.get("strided"):  # channel-minor, as the model's gradient arrives
        dout = dout.transpose(1, 2).contiguous().transpose(1, 2)

    out, grads = run_and_grad(scan_a, leaves, args, dout, **kw)
    ref_out, ref_grads = run_and_grad(scan_b, ref_leaves, ref_args,
                                      dout.to(ref_args["u"].dtype), **kw)
    assert out.dtype == dtype and out.shape == (batch, E, L)
    assert torch.isfinite(out).all()
    errors = {"out": rel_err(out, ref_out)}
    for k in leaves:
        assert grads[k].dtype == leaves[k].dtype, k
        errors[k] = rel_err(grads[k], ref_grads[k])
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors over {tol}: {bad}"


def check_decays_that_underflow(scan, batch, E, N, L, reverse, device=DEVICE):
    """delta |A| up to ~2000: exp(delta A) is 0 in fp32 for most states, 1e-6 to 1 for the
    smallest |A|; the adjoint reuses these decays, which must not turn into 0 * inf. The
    output and every gradient, finite and within 1e-4 of the oracle."""
    leaves, args = make_scan_inputs(batch, E, N, L, device=device)
    with torch.no_grad():
        args["delta_bias"].add_(100.0)
    run = lambda fn: fn(*(args[k] for k in NAMES), reverse=reverse)  # noqa: E731
    out, ref = run(scan), run(selective_scan_reference)
    assert rel_err(out, ref) < 1e-4
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    ref_grads = torch.autograd.grad(ref, list(leaves.values()), dout)
    for k, a, b in zip(leaves, grads, ref_grads):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-4, k


def check_no_softplus(scan, batch, E, N, L, reverse, device=DEVICE):
    """delta used as given. Without softplus it must stay positive for a stable scan: the
    bias shifts it up. The output and every gradient within 1e-4 of the oracle."""
    leaves, args = make_scan_inputs(batch, E, N, L, device=device)
    with torch.no_grad():
        args["delta_bias"].copy_(args["delta_bias"].abs() + 2.0)
    run = lambda fn: fn(*(args[k] for k in NAMES), delta_softplus=False,  # noqa: E731
                        reverse=reverse)
    out, ref = run(scan), run(selective_scan_reference)
    assert rel_err(out, ref) < 1e-4
    grads = torch.autograd.grad(out.sum(), list(leaves.values()))
    ref_grads = torch.autograd.grad(ref.sum(), list(leaves.values()))
    for k, a, b in zip(leaves, grads, ref_grads):
        assert rel_err(a, b) < 1e-4, k


def _two_directions(batch, E, N, L, device):
    """Inputs of a bidirectional mixer's two scans (their own values, one z: the z half of
    in_proj's output, which both directions gate with), as leaves and as detached arguments."""
    fwd_leaves, fwd = make_scan_inputs(batch, E, N, L, seed=0, device=device)
    rev_leaves, rev = make_scan_inputs(batch, E, N, L, seed=1, device=device)
    del rev_leaves["z"]
    rev["z"] = fwd["z"]
    detached = [{k: None if v is None else v.detach() for k, v in args.items()}
                for args in (fwd, rev)]
    return (fwd_leaves, fwd), (rev_leaves, rev), detached


def check_direction_average(forward, batch, E, N, L, buffer_dtype, tol, device=DEVICE):
    """``forward`` (a kernel family's ``scan_forward``) averages a bidirectional mixer's two
    scans into one (B, L, E) buffer, as out_proj reads it: the forward direction writes
    0.5 y into its channel-minor (B, E, L) view, the reverse direction adds its 0.5 y. NaN
    beforehand, so a place left unwritten, or added to before it is written, shows."""
    (_, fwd), (_, rev), (fwd_in, rev_in) = _two_directions(batch, E, N, L, device)
    buffer = torch.full((batch, L, E), float("nan"), dtype=buffer_dtype, device=device)
    out = buffer.transpose(1, 2)
    with torch.no_grad():
        got = forward(*(fwd_in[k] for k in NAMES), True, False, out=out, out_scale=0.5)
        assert got is out
        forward(*(rev_in[k] for k in NAMES), True, True, out=out, out_scale=0.5,
                accumulate=True)
        want = 0.5 * (selective_scan_reference(*(fwd[k] for k in NAMES)) +
                      selective_scan_reference(*(rev[k] for k in NAMES), reverse=True))
    assert buffer.dtype == buffer_dtype and rel_err(buffer.transpose(1, 2), want) < tol


def check_direction_average_backward(backward, batch, E, N, L, rank=3, device=DEVICE):
    """``backward`` (a kernel family's ``scan_backward``) writes the gradients of a
    bidirectional mixer's two scans where the mixer's backward reads them: dout is the
    averaged (B, L, E) buffer's gradient, the 0.5 passed as ``dout_scale``; du and ddelta
    go to channel-minor views; dz of both directions to the z half of one (B, L, 2E)
    buffer (the forward direction writes it, the reverse adds), whose x half stays NaN;
    dB and dC are added to their column slices of each direction's fp32 (B, L, R + 2N)
    buffer, filled beforehand with known values (and its R columns left alone); the reverse
    direction's dA, dD and d delta_bias go into zeroed fp32 tensors given for them. Every
    gradient against autograd through the oracle."""
    (fwd_leaves, fwd), (rev_leaves, rev), inputs = _two_directions(batch, E, N, L, device)
    g = torch.Generator().manual_seed(2)
    dout = torch.randn(batch, L, E, generator=g).to(device).transpose(1, 2)
    average = 0.5 * (selective_scan_reference(*(fwd[k] for k in NAMES)) +
                     selective_scan_reference(*(rev[k] for k in NAMES), reverse=True))
    leaves = {**{("fwd", k): v for k, v in fwd_leaves.items()},
              **{("rev", k): v for k, v in rev_leaves.items()}}
    want = dict(zip(leaves, torch.autograd.grad(average, list(leaves.values()), dout)))

    nan = float("nan")
    dxz = torch.full((batch, L, 2 * E), nan, device=device)
    dz = dxz[:, :, E:].transpose(1, 2)
    for i, name in enumerate(("fwd", "rev")):
        filled = torch.randn(batch, L, rank + 2 * N, generator=g).to(device)
        dx_dbl = filled.clone()
        du = torch.full((batch, L, E), nan, device=device).transpose(1, 2)
        ddelta = torch.full((batch, L, E), nan, device=device).transpose(1, 2)
        dB = dx_dbl[:, :, rank:rank + N].transpose(1, 2)
        dC = dx_dbl[:, :, rank + N:].transpose(1, 2)
        given = {} if name == "fwd" else dict(
            dA=torch.zeros(E, N, device=device), dD=torch.zeros(E, device=device),
            ddelta_bias=torch.zeros(E, device=device))
        with torch.no_grad():
            grads = backward(*(inputs[i][k] for k in NAMES), dout, True, name == "rev",
                             dout_scale=0.5, du=du, ddelta=ddelta, dz=dz,
                             dz_accumulate=name == "rev", dB=dB, dC=dC, **given)
        assert [grads[j] is t for j, t in ((0, du), (1, ddelta), (3, dB), (4, dC), (6, dz))
                ] == [True] * 5, name
        assert [grads[j] is given[k] for j, k in ((2, "dA"), (5, "dD"), (7, "ddelta_bias"))
                if given] == [True] * len(given), name
        got = dict(u=du, delta=ddelta, A=grads[2], D=grads[5], delta_bias=grads[7],
                   B=dB - filled[:, :, rank:rank + N].transpose(1, 2),
                   C=dC - filled[:, :, rank + N:].transpose(1, 2))
        for k, v in got.items():
            assert rel_err(v, want[name, k]) < 1e-4, (name, k)
        assert torch.equal(dx_dbl[:, :, :rank], filled[:, :, :rank]), name
    assert rel_err(dz, want["fwd", "z"]) < 1e-4
    assert dxz[:, :, :E].isnan().all()


# --------------------------------------------------------------------------- kernel statistics

def run_kernel_stats(*args):
    """tools/kernel_stats.py with ``args``; skips where Triton ships no ptxas."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton build ships no ptxas")
    return subprocess.run([sys.executable, str(TOOLS / "kernel_stats.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


# tools/kernel_stats.py compiles every autotuning config of both kernels for an H100
# (sm_90a) without a GPU, with the specialisations a model's call gets, and reports ptxas's
# register and spill figures and the SASS instruction counts. The interpreter checks the
# kernels' numbers, not that they compile, nor what they cost.
def family_reports(family):
    """kernel_stats.py's reports of every candidate of one kernel family, both directions
    (skipped on a GPU, where the kernels themselves are compiled and run)."""
    if HAS_CUDA:
        pytest.skip("on a GPU the kernels themselves are compiled and run")
    done = run_kernel_stats("--family", family, "--reverse", "both", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def best_pair(reports, family=None):
    sys.path.insert(0, str(TOOLS))
    from kernel_stats import best_pair as pair
    return pair(reports, family)


def assert_no_regression(pair, reached, reached_mufu):
    """The best pair costs no more than the figures a family has reached (per Triton
    version; skipped for a version with none recorded)."""
    assert pair["mufu_per_element"] <= reached_mufu, pair
    version = triton_version()
    if version not in reached:
        pytest.skip(f"no figure recorded for Triton {version}")
    assert pair["per_element"] <= reached[version], pair


# The scan kernels' static targets, per Triton version: instructions and MUFU per state element.
TARGETS = {"3.8": 30.0, "3.6": 34.0}
TARGET_MUFU = 2.5


def assert_static_targets(pair):
    version = triton_version()
    assert pair["mufu_per_element"] <= TARGET_MUFU, pair
    assert pair["per_element"] <= TARGETS.get(version, 30.0), pair


# --------------------------------------------------------------------------- stand-ins and specs

def fake_cuda_extension(calls):
    """mamba-ssm's ``selective_scan_cuda`` (fwd/bwd, their argument order and layouts) with the
    oracle inside, checking what the kernels demand: contiguous sequence tensors, B and C with
    a group axis, fp32 A/D/delta_bias, and, in the backward, the forward's pre-gate output."""
    def check(u, delta, A, B, C, D, z, bias):
        assert all(t.is_contiguous() for t in (u, delta, B, C) + ((z,) if z is not None else ()))
        assert B.dim() == C.dim() == 4 and B.shape[1] == C.shape[1] == 1
        assert all(t.dtype == torch.float32 for t in (A, D, bias) if t is not None)

    def fwd(u, delta, A, B, C, D, z, bias, softplus):
        check(u, delta, A, B, C, D, z, bias)
        calls.append("fwd")
        pre = ss.selective_scan_reference(u, delta, A, B[:, 0], C[:, 0], D, None, bias, softplus)
        states = torch.zeros(u.shape[0], u.shape[1], 1, 2 * A.shape[1])
        return [pre, states] + ([pre * torch.nn.functional.silu(z.float()).to(pre.dtype)]
                                if z is not None else [])

    def bwd(u, delta, A, B, C, D, z, bias, dout, states, out, dz, softplus, recompute):
        check(u, delta, A, B, C, D, z, bias)
        assert dout.is_contiguous() and states is not None and dz is None and not recompute
        calls.append("bwd")
        args = (u, delta, A, B[:, 0], C[:, 0], D, z, bias)
        if z is not None:  # the pre-gate output the real kernel reads must be the forward's
            want = ss.selective_scan_reference(*args[:6], None, bias, softplus)
            torch.testing.assert_close(out, want)
        # The PyTorch loop's backward, in fp64: no autograd, which does not run inside the
        # mixer's custom op, where this stand-in is also called.
        wide = [None if t is None else t.double() for t in args]
        grads = loop.scan_backward(*wide, dout.double(), softplus, False)
        du, ddelta, dA, dB, dC, dD, dz_, dbias = (
            None if g is None else g.to(t.dtype) for g, t in zip(grads, args))
        return [du, ddelta, dA, dB.unsqueeze(1).float(), dC.unsqueeze(1).float(),
                dD if D is not None else torch.empty(0),
                dbias if bias is not None else torch.empty(0)] + ([dz_] if z is not None else [])

    return types.SimpleNamespace(fwd=fwd, bwd=bwd)


def fake_causal_conv1d(x, weight, bias=None, activation=None):
    """causal-conv1d's public function (weight (E, K)), contiguous input only."""
    assert x.is_contiguous() and weight.dim() == 2 and activation == "silu"
    k = weight.shape[-1]
    out = torch.nn.functional.conv1d(torch.nn.functional.pad(x, (k - 1, 0)), weight.unsqueeze(1),
                                     bias, groups=x.shape[1])
    return torch.nn.functional.silu(out)


def reference_mixer(mixer, hidden):
    """The mixer written from the spec: two oracle scans, the backward one on flipped copies."""
    e = mixer.d_inner
    xz = hidden @ mixer.in_proj.weight.T
    x, z = xz[..., :e].transpose(1, 2), xz[..., e:].transpose(1, 2)

    def direction(x, z, conv, x_proj, dt_proj, a_log, d):
        length = x.shape[-1]
        u = F.silu(F.conv1d(F.pad(x, (3, 0)), conv.weight, conv.bias, groups=e)[..., :length])
        dbl = u.transpose(1, 2) @ x_proj.weight.T
        dt, b, c = dbl.split([mixer.dt_rank, 16, 16], -1)
        delta = (dt @ dt_proj.weight.T).transpose(1, 2)
        return selective_scan_reference(u, delta, -torch.exp(a_log), b.transpose(1, 2),
                                         c.transpose(1, 2), d, z, dt_proj.bias)

    fwd = direction(x, z, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
    bwd = direction(x.flip(-1), z.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b,
                    mixer.A_b_log, mixer.D_b).flip(-1)
    return ((fwd + bwd) / 2).transpose(1, 2) @ mixer.out_proj.weight.T


POSITIVE = ("img_per_s", "step_s", "first_step_s", "peak_mem_mb", "gflops_per_img",
            "tflops_per_s", "params", "tokens")


def check_row(row):
    assert "error" not in row, row["error"]
    for field in POSITIVE:
        assert row[field] > 0, (field, row)
    assert row["flops"]["total"] > row["flops"]["matmul"] > 0
