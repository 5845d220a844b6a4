"""Compile the Triton scan kernels for an H100 on a machine without a GPU, and print what
the compiler made of each autotuning candidate: registers, spills, shared memory, the warps
an SM can hold, and SASS instruction counts per state element.

    python tools/kernel_stats.py                 # every candidate, both kernels, both families
    python tools/kernel_stats.py --kernel bwd --config 4,2,8,2 --json
    python tools/kernel_stats.py --family gluon  # gluon_kernels.py's kernels only
    python tools/kernel_stats.py --call bidirectional --reverse both

Two families of kernels: ``triton`` (selective_scan/triton_kernels.py, plain Triton) and
``gluon`` (selective_scan/gluon_kernels.py, Triton's Gluon dialect; left out, with a note, where
this Triton has no Gluon). A Gluon candidate is shown as a config of the plain-Triton form:
one channel per thread with all its states, i.e. 1 state lane.

Uses the ptxas and cuobjdump that ship inside the Triton wheel (sm_90a). Each kernel is
specialised as Triton specialises it at run time for the call Mamba®-Base makes at 224 px
(E 1536, N 16, L 208, batch 128, bf16, strides as the model's views have them): integer
arguments equal to 1 become constants, those divisible by 16 are marked so, and pointers
are 16-byte aligned. ``--call bidirectional`` compiles them for the call of a bidirectional
mixer op instead: outputs written where the next GEMMs read them (channel-minor views of
(B, L, E) buffers, dz in a (B, L, 2E) one, dB and dC column slices of an fp32 (B, L, R + 2N)
one), the direction average's 1/2 as a scale, the reverse direction adding to what the
forward one wrote. "per element" is the kernel's static instruction count (alignment NOPs
left out) divided by the state elements one thread handles per chunk (BLOCK_L x states per
thread x channels per thread): the per-chunk loop bodies dominate the kernel, so it
approximates the instructions issued per state element and token. The last line sums the
best forward and best backward candidate (fewest per element) of each family and across
both (any forward pairs with any backward: each backward needs only the scan's inputs), the
figure the scan's static targets are set for, with their MUFU (exponential, reciprocal)
instructions per element. A kernel that is issue-bound runs in roughly (per element) x batch
x E x N x L / (32 x warp issue rate).
"warps/SM" is how many of the kernel's warps one SM holds at once (its programs limited by
registers, shared memory and 32 programs per SM; sm_90: 64K registers allocated per warp in
blocks of 256, 228 KB of shared memory with 1 KB reserved per program, 64 warps): the
latency the scheduler can hide, which the instruction count does not show.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter compiles nothing
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from selective_scan import triton_kernels as sst  # noqa: E402

try:  # Triton releases without Gluon (before 3.4) compile the plain-Triton kernels only
    from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
    from selective_scan import gluon_kernels as ssg  # noqa: E402
except ImportError:
    ssg = None

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
E, N, L, R = 1536, 16, 208, 48  # Mamba-B: channels, states, tokens at 224 px, dt rank
# sm_90 per SM: registers, shared memory, shared memory the runtime reserves per program,
# the most shared memory one program may use, programs and warps.
SM_REGISTERS, SM_SHARED, SHARED_RESERVED, SHARED_PER_PROGRAM = 65536, 233472, 1024, 232448
SM_PROGRAMS, SM_WARPS = 32, 64


def warps_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Warps of one kernel an sm_90 SM holds at once (0: the program does not fit)."""
    per_warp = -(-registers * 32 // 256) * 256
    if shared > SHARED_PER_PROGRAM or per_warp * num_warps > SM_REGISTERS:
        return 0
    programs = min(SM_REGISTERS // (per_warp * num_warps),
                   SM_SHARED // (shared + SHARED_RESERVED), SM_PROGRAMS,
                   SM_WARPS // num_warps)
    return programs * num_warps


def _model_call(call: str = "model") -> dict:
    """The integer arguments of both kernels in the model's call, by name (strides in
    elements): u, delta and the gradients are (B, E, L) contiguous; B and C are row slices
    of the (B, R + 2N, L) projection; z and dout are channel-minor views of (B, L, 2E) and
    (B, L, E) tensors; A is (E, N). In the ``bidirectional`` call the outputs are where the
    mixer's GEMMs read them: out, du and ddelta channel-minor views of (B, L, E) buffers,
    dz of a (B, L, 2E) one, dB and dC of an fp32 (B, L, R + 2N) one."""
    contiguous = dict(b=E * L, e=L, l=1)
    outputs = {"model": dict(out=contiguous, du=contiguous, ddt=contiguous, dz=contiguous,
                             dB=dict(b=N * L, n=L, l=1), dC=dict(b=N * L, n=L, l=1)),
               "bidirectional": dict(out=dict(b=L * E, e=1, l=E), du=dict(b=L * E, e=1, l=E),
                                     ddt=dict(b=L * E, e=1, l=E),
                                     dz=dict(b=L * 2 * E, e=1, l=2 * E),
                                     dB=dict(b=L * (R + 2 * N), n=1, l=R + 2 * N),
                                     dC=dict(b=L * (R + 2 * N), n=1, l=R + 2 * N))}[call]
    return dict(E=E, N=N, L=L,
                s_u_b=E * L, s_u_e=L, s_u_l=1, s_dt_b=E * L, s_dt_e=L, s_dt_l=1,
                s_A_e=N, s_A_n=1, s_B_b=(R + 2 * N) * L, s_B_n=L, s_B_l=1,
                s_C_b=(R + 2 * N) * L, s_C_n=L, s_C_l=1, s_z_b=L * 2 * E, s_z_e=1, s_z_l=2 * E,
                s_do_b=L * E, s_do_e=1, s_do_l=E,
                **{f"s_{name}_{axis}": stride for name, strides in outputs.items()
                   for axis, stride in strides.items()})


CALLS = ("model", "bidirectional")
FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True,
             BLOCK_N=triton.next_power_of_2(N))


def _call_flags(call: str, reverse: bool) -> dict:
    """The call's constexpr flags: the model's outputs are new contiguous tensors; the
    bidirectional op's are not, it scales by 1/2 and its reverse direction adds to what the
    forward one wrote."""
    adds = call == "bidirectional" and reverse
    dense = call == "model"
    return dict(FLAGS, REVERSE=reverse, HAS_SCALE=not dense, ACCUMULATE=adds,
                DZ_ACCUMULATE=adds, DENSE_OUT=dense, DENSE_GRADS=dense)


SCALES = {"out_scale", "dout_scale"}
BF16 = {"u_ptr", "delta_ptr", "z_ptr", "out_ptr", "B_ptr", "C_ptr", "dout_ptr", "du_ptr",
        "ddelta_ptr", "dz_ptr"}
KERNELS = {"triton": {"fwd": sst._scan_fwd_kernel, "bwd": sst._scan_bwd_kernel}}
if ssg is not None:
    KERNELS["gluon"] = {"fwd": ssg._scan_fwd, "bwd": ssg._scan_bwd}
SHOWN_OPS = ("MUFU", "SHFL", "BAR", "LDS", "STS")


class StatsError(Exception):
    """A tool is missing or printed something this script cannot read."""


def _run(cmd: list) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise StatsError(f"{os.path.basename(cmd[0])} failed: {done.stderr.strip()[-2000:]}")
    return done


def _number(pattern: str, text: str, what: str) -> int:
    found = re.search(pattern, text)
    if found is None:
        raise StatsError(f"no {what} in ptxas's report ({pattern!r} not found)")
    return int(found.group(1))


def compile_stats(tuner, config: triton.Config, reverse: bool, family: str = "triton",
                  call: str = "model") -> dict:
    """Registers, spills and SASS opcode counts of one kernel for one config."""
    jit = tuner.fn
    gluon = family == "gluon"
    module = ssg if gluon else sst
    consts = dict(_call_flags(call, reverse), **config.kwargs)
    ints = dict(_model_call(call), s_ckpt_e=module._boundary_slots(L) * FLAGS["BLOCK_N"])
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(jit.arg_names):
        if name in consts or ints.get(name) == 1:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts.get(name, 1)
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in BF16 else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in SCALES:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = (GluonASTSource if gluon else ASTSource)(jit, signature, constexprs, attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": config.num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        log = _run([os.path.join(TOOLS, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx,
                    "-o", cubin]).stderr
        sass = _run([os.path.join(TOOLS, "cuobjdump"), "-sass", cubin]).stdout
    ops = collections.Counter(
        m.group(1).split(".")[0] for m in
        re.finditer(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M))
    ops.pop("NOP", None)
    instructions = sum(ops.values())
    if instructions == 0:
        raise StatsError("no instructions found in cuobjdump's listing")
    warps = config.num_warps
    # Gluon: one channel per thread, all of its states in that thread.
    kw = dict(N_LANES=1, BLOCK_E=32 * warps, **config.kwargs) if gluon else config.kwargs
    lanes = min(kw["N_LANES"], FLAGS["BLOCK_N"])
    channels_per_thread = kw["BLOCK_E"] / (32 // lanes * warps)
    elements = kw["BLOCK_L"] * (FLAGS["BLOCK_N"] / lanes) * channels_per_thread
    registers = _number(r"Used (\d+) registers", log, "register count")
    shared = kernel.metadata.shared
    return dict(kernel=jit.__name__, family=family, call=call, N_LANES=kw["N_LANES"],
                num_warps=warps, BLOCK_L=kw["BLOCK_L"], channels_per_thread=channels_per_thread,
                BLOCK_E=kw["BLOCK_E"], reverse=reverse, elements=elements,
                registers=registers, shared=shared,
                warps_per_sm=warps_per_sm(registers, shared, warps),
                spill_stores=_number(r"(\d+) bytes spill stores", log, "spill stores"),
                spill_loads=_number(r"(\d+) bytes spill loads", log, "spill loads"),
                instructions=instructions, per_element=round(instructions / elements, 1),
                mufu_per_element=round(ops["MUFU"] / elements, 2),
                ops={op: ops[op] for op in SHOWN_OPS})


def best_pair(reports: list, family: str = None) -> dict:
    """The static figures from forward-direction reports: the forward and backward
    candidates with the fewest instructions per state element, and their sums; among one
    family's kernels, or among all reports when ``family`` is None (reports of old JSON runs
    carry no family: plain Triton)."""
    best = {}
    for name in ("_scan_fwd_kernel", "_scan_bwd_kernel"):
        mine = [r for r in reports if r["kernel"] == name and not r["reverse"]
                and family in (None, r.get("family", "triton"))]
        if not mine:
            raise StatsError(f"no forward-direction report of {family or 'any'} {name}")
        best[name] = min(mine, key=lambda r: r["per_element"])
    fwd, bwd = best["_scan_fwd_kernel"], best["_scan_bwd_kernel"]
    return dict(fwd=fwd, bwd=bwd,
                per_element=round(fwd["per_element"] + bwd["per_element"], 1),
                mufu_per_element=round(fwd["mufu_per_element"] + bwd["mufu_per_element"], 2))


def _job(job: tuple) -> tuple:
    """compile_stats for (family, kernel name, config, reverse, call) in a worker process:
    the report, or the error that stopped it."""
    family, name, config, reverse, call = job
    try:
        return compile_stats(KERNELS[family][name], config, reverse, family, call), None
    except StatsError as err:
        return None, str(err)


def parse_config(text: str) -> triton.Config:
    """'lanes,warps,block_l[,channels per thread]' -> a config like the autotuner's."""
    try:
        lanes, warps, block_l, *rest = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 3 or 4 integers") from None
    per_thread = rest[0] if rest else 1
    powers = {1, 2, 4, 8, 16, 32}
    if len(rest) > 1 or not {lanes, warps, block_l, per_thread} <= powers:
        raise argparse.ArgumentTypeError(
            f"{text!r}: lanes, warps, BLOCK_L and channels per thread must be powers of two "
            f"up to 32")
    return sst._configs([(lanes, warps, block_l, per_thread)])[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("fwd", "bwd", "both"), default="both")
    parser.add_argument("--family", choices=("triton", "gluon", "both"), default="both",
                        help="plain-Triton kernels, Gluon kernels, or both (default)")
    parser.add_argument("--config", action="append", type=parse_config, metavar="L,W,BL[,EPT]",
                        help="compile this config instead of the autotuning candidates: "
                             "state lanes, warps, BLOCK_L, channels per thread (repeatable)")
    parser.add_argument("--reverse", choices=("no", "yes", "both"), default="no",
                        help="scan direction(s) to compile (default: forward only)")
    parser.add_argument("--call", choices=CALLS, default="model",
                        help="the model's call (default), or a bidirectional mixer op's: "
                             "outputs channel-minor, scaled, added to in reverse")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiles at once (default: one per core)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    missing = [tool for tool in ("ptxas", "cuobjdump")
               if not os.path.exists(os.path.join(TOOLS, tool))]
    if missing:
        print(f"error: this Triton build ships no {' or '.join(missing)} ({TOOLS})",
              file=sys.stderr)
        return 2
    names = ("fwd", "bwd") if args.kernel == "both" else (args.kernel,)
    families = ("triton", "gluon") if args.family == "both" else (args.family,)
    if args.config:  # in the plain-Triton form: lanes, warps, BLOCK_L, channels per thread
        if args.family == "gluon":
            print("error: --config applies to the plain-Triton kernels only", file=sys.stderr)
            return 2
        families = ("triton",)
    if "gluon" in families and "gluon" not in KERNELS:
        if args.family == "gluon":
            print(f"error: Triton {triton.__version__} has no Gluon", file=sys.stderr)
            return 2
        print(f"note: Triton {triton.__version__} has no Gluon; plain-Triton kernels only",
              file=sys.stderr)
        families = ("triton",)
    directions = {"no": (False,), "yes": (True,), "both": (False, True)}[args.reverse]
    if not args.json:
        print(f"Triton {triton.__version__}, sm_90a, Mamba-B at 224 px, {args.call} call; "
              f"config = state lanes, warps, BLOCK_L, channels per thread (as --config takes)")
        print(f"{'kernel':<7}{'config':<12}{'rev':<5}{'regs':>5}{'spill':>10}{'smem KB':>8}"
              f"{'warps/SM':>9}{'instr':>7}"
              f"{'/elem':>7}{'MUFU/e':>7}  " + " ".join(f"{op:>5}" for op in SHOWN_OPS))
    jobs = [(family, name, config, reverse, args.call) for family in families for name in names
            for config in args.config or KERNELS[family][name].configs
            for reverse in directions]
    reports = []
    # One compile per core (ptxas and Triton's passes are single-threaded), printed in order.
    with concurrent.futures.ProcessPoolExecutor(min(len(jobs), args.jobs),
                                                mp_context=mp.get_context("fork")) as pool:
        for (family, name, config, reverse, _), (s, error) in zip(jobs, pool.map(_job, jobs)):
            if error:
                print(f"error: {family} {name} {config}: {error}", file=sys.stderr)
                return 1
            reports.append(s)
            if args.json:
                print(json.dumps(s), flush=True)
                continue
            label = name if family == "triton" else f"g.{name}"
            cfg = (f"{s['N_LANES']},{s['num_warps']},{s['BLOCK_L']},"
                   f"{s['channels_per_thread']:g}")
            print(f"{label:<7}{cfg:<12}{'yes' if reverse else 'no':<5}"
                  f"{s['registers']:>5}{s['spill_stores']:>5}/{s['spill_loads']:<4}"
                  f"{s['shared'] / 1024:>8.1f}{s['warps_per_sm']:>9}"
                  f"{s['instructions']:>7}{s['per_element']:>7}"
                  f"{s['mufu_per_element']:>7}  "
                  + " ".join(f"{s['ops'][op]:>5}" for op in SHOWN_OPS), flush=True)
    if not args.json and len(names) == 2 and False in directions:
        for family in families + (("any",) if len(families) > 1 else ()):
            pair = best_pair(reports, None if family == "any" else family)
            print(f"best forward + best backward ({family}): {pair['fwd']['per_element']} + "
                  f"{pair['bwd']['per_element']} = {pair['per_element']} instructions, "
                  f"{pair['mufu_per_element']} MUFU per state element")
    return 0


if __name__ == "__main__":
    sys.exit(main())
