"""Compile the Triton scan kernels for an H100 on a machine without a GPU, and print what
the compiler made of each autotuning candidate: registers, spills, and SASS instruction
counts per state element.

    python scripts/kernel_stats.py                 # every candidate, both kernels
    python scripts/kernel_stats.py --kernel bwd --config 4,2,8,2 --json

Uses the ptxas and cuobjdump that ship inside the Triton wheel (sm_90a), with the
specialisations a 224 px Mamba® call gets: unit strides along time, 16-divisible sizes and
strides, bf16 activations, every optional input present. "per element" is the kernel's
static instruction count divided by the state elements one thread handles per chunk
(BLOCK_L x states per thread x channels per thread): the two loops dominate the kernel, so
it approximates the instructions issued per state element and token. A kernel that is
issue-bound runs in roughly (per element) x batch x E x N x L / (32 x warp issue rate).
"""
from __future__ import annotations

import argparse
import collections
import json
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

import selective_scan_triton as sst  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
UNIT_STRIDES = {"s_u_l", "s_dt_l", "s_B_l", "s_C_l", "s_z_l", "s_do_l", "s_A_n"}
BF16 = {"u_ptr", "delta_ptr", "z_ptr", "out_ptr", "B_ptr", "C_ptr", "dout_ptr", "du_ptr",
        "ddelta_ptr", "dz_ptr"}
FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, BLOCK_N=16)
KERNELS = {"fwd": sst._scan_fwd_kernel, "bwd": sst._scan_bwd_kernel}
SHOWN_OPS = ("MUFU", "SHFL", "BAR", "LDS", "STS")


def compile_stats(tuner, config: triton.Config, reverse: bool) -> dict:
    """Registers, spills and SASS opcode counts of one kernel for one config."""
    jit = tuner.fn
    consts = dict(FLAGS, REVERSE=reverse, **config.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(jit.arg_names):
        if name in consts or name in UNIT_STRIDES:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts.get(name, 1)
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in BF16 else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name == "E" or name.startswith("s_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": config.num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([os.path.join(TOOLS, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx,
                              "-o", cubin], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    ops = collections.Counter(
        m.group(1).split(".")[0] for m in
        re.finditer(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M))
    kw, warps = config.kwargs, config.num_warps
    channels_per_thread = kw["BLOCK_E"] / (32 // kw["N_LANES"] * warps)
    elements = kw["BLOCK_L"] * (16 / kw["N_LANES"]) * channels_per_thread
    instructions = sum(ops.values())
    return dict(kernel=jit.__name__, BLOCK_E=kw["BLOCK_E"], N_LANES=kw["N_LANES"],
                BLOCK_L=kw["BLOCK_L"], num_warps=warps, reverse=reverse,
                registers=int(re.search(r"Used (\d+) registers", log).group(1)),
                spill_stores=int(re.search(r"(\d+) bytes spill stores", log).group(1)),
                spill_loads=int(re.search(r"(\d+) bytes spill loads", log).group(1)),
                instructions=instructions, per_element=round(instructions / elements, 1),
                ops={op: ops[op] for op in SHOWN_OPS})


def parse_config(text: str) -> triton.Config:
    """'lanes,warps,block_l[,channels per thread]' -> a config like the autotuner's."""
    lanes, warps, block_l, *rest = (int(v) for v in text.split(","))
    per_thread = rest[0] if rest else 1
    return triton.Config({"BLOCK_E": (32 // lanes) * warps * per_thread, "N_LANES": lanes,
                          "BLOCK_L": block_l}, num_warps=warps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("fwd", "bwd", "both"), default="both")
    parser.add_argument("--config", action="append", type=parse_config, metavar="L,W,BL[,EPT]",
                        help="compile this config instead of the autotuning candidates: "
                             "state lanes, warps, BLOCK_L, channels per thread (repeatable)")
    parser.add_argument("--reverse", choices=("no", "yes", "both"), default="no",
                        help="scan direction(s) to compile (default: forward only)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(TOOLS, "ptxas")):
        print(f"error: this Triton build ships no ptxas ({TOOLS})", file=sys.stderr)
        return 2
    names = ("fwd", "bwd") if args.kernel == "both" else (args.kernel,)
    directions = {"no": (False,), "yes": (True,), "both": (False, True)}[args.reverse]
    if not args.json:
        print(f"Triton {triton.__version__}, sm_90a; config = BLOCK_E, N_LANES, BLOCK_L, warps")
        print(f"{'kernel':<7}{'config':<16}{'rev':<5}{'regs':>5}{'spill':>10}{'instr':>7}"
              f"{'/elem':>7}  " + " ".join(f"{op:>5}" for op in SHOWN_OPS))
    for name in names:
        tuner = KERNELS[name]
        for config in args.config or tuner.configs:
            for reverse in directions:
                s = compile_stats(tuner, config, reverse)
                if args.json:
                    print(json.dumps(s), flush=True)
                    continue
                cfg = f"{s['BLOCK_E']},{s['N_LANES']},{s['BLOCK_L']},{s['num_warps']}"
                print(f"{name:<7}{cfg:<16}{'yes' if reverse else 'no':<5}{s['registers']:>5}"
                      f"{s['spill_stores']:>5}/{s['spill_loads']:<4}{s['instructions']:>7}"
                      f"{s['per_element']:>7}  "
                      + " ".join(f"{s['ops'][op]:>5}" for op in SHOWN_OPS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
