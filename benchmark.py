"""Images/s, peak memory and FLOPs of Mamba® against DeiT of the same size.

Every configuration (model x input size x batch x dtype x scan backend x mode) is measured on
its own:

* ``infer``: ``model.eval()`` under ``torch.no_grad()``.
* ``train``: one full optimisation step: forward, cross-entropy, backward, AdamW step and
  ``zero_grad`` (plus a GradScaler under fp16), the model in train mode.

``bf16`` / ``fp16`` mean autocast over fp32 weights, as in training. A configuration runs
``--warmup`` untimed steps, then ``--iters`` timed ones with ``torch.cuda.synchronize()``
around each; figures are medians. The first step (Triton autotuning and compilation, cuDNN
heuristics, allocator growth) is reported on its own as ``first_step_s``.

Peak memory:

* CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps (the counter restarts after
  the warm-up, whose first step may hold Triton's autotuning buffers), so it includes
  weights, gradients, optimizer state and activations.
  Configurations run one after another in this process (caches emptied in between).
* CPU: every configuration runs in a fresh subprocess so that RSS peaks do not mix. The child
  reports its own ``ru_maxrss`` as ``peak_mem_mb`` (the whole process: interpreter, libraries,
  model and workload) and its RSS just before the first step as ``rss_base_mb`` (after
  imports, model build and input creation); the workload's own share is the difference
  (``workload_mb``). ``--in-process`` skips the subprocesses for quick looks and tests; peak
  RSS is then the running maximum of the whole run.

Models: Mamba® (``mambar_*``), the Vim baselines (``vim_*``) and any timm ViT (``deit_*``,
``vit_*``); ``--reference deit`` adds the DeiT of each Mamba model's size (ViT-L for Large).
Scan backends (``--backend``) are those of the ``selective_scan`` package plus ``mambapy``,
the pure-PyTorch CPU baseline: the same Mamba® network with its scan computed by mambapy's
parallel scan (``selective_scan_mambapy`` below; ``pip install mambapy``, a benchmark-only
dependency).
DeiT models run timm's attention with fused ``scaled_dot_product_attention``.

Also reported: analytic forward FLOPs per image that count the scan (``mamba_flops``,
``vit_flops``: the formulas are in their docstrings) and the achieved TFLOP/s; with
``--scan-share`` the share of the training step spent in the scan (``measure_scan_share``);
ratios against DeiT, between scan backends and across input sizes; the project's speed and
memory targets where the run covers them. The table goes to stdout, progress to stderr,
everything to ``--json``.

Examples::

    python benchmark.py --model mambar_base_patch16_224 --backend triton --mode train
    python benchmark.py --model mambar_base_patch16_224 --backend triton --mode train \\
        --sweep --sweep-batch 384=64,512=32,768=16,1024=8
    python benchmark.py --compare-mambapy --json bench_cpu.json     # CPU, against mambapy
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import operator
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

# As in main.py: sleeping, not spinning, idle OpenMP threads (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import models_vim  # noqa: F401  (registers the vim_* baselines)
import vision_mamba  # routed_scan patches it
from models_mambar import MambaR
from selective_scan import requested_backend, resolve_backend
from selective_scan.mixer_op import RECOMPUTE_RANGE, SCAN_BACKWARD_RANGE, SCAN_RANGE
from vision_mamba import VisionMambaBackbone

REPO = os.path.dirname(os.path.abspath(__file__))
RESULT_TAG = "BENCHMARK_RESULT "
SWEEP_SIZES = (224, 384, 512, 768, 1024)
DEIT_BY_SIZE = {"tiny": "deit_tiny_patch16_224", "small": "deit_small_patch16_224",
                "base": "deit_base_patch16_224", "large": "vit_large_patch16_224"}
AUTOCAST_DTYPES: Dict[str, Optional[torch.dtype]] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCAN_BACKENDS = ("auto", "torch", "triton", "cuda", "reference", "mambapy")
ATTENTION_BACKEND = "sdpa"  # the "backend" label of DeiT rows


def is_mamba(name: str) -> bool:
    """Mamba® (mambar_*) and the Vim baselines (vim_*): the scan-backend models."""
    return name.startswith(("mambar_", "vim_"))


def deit_partner(name: str) -> Optional[str]:
    """The DeiT (ViT-L for Large) of a Mamba model's size, e.g. mambar_base_* -> deit_base."""
    match = re.match(r"(?:mambar|vim)_(tiny|small|base|large)_", name)
    return DEIT_BY_SIZE[match.group(1)] if match else None


# --------------------------------------------------------------------------- FLOPs

# FLOPs per element of the non-matmul work. A multiply-add is 2 FLOPs; exp, log1p, erf and
# rsqrt count as one FLOP each, like an add.
SCAN_FLOPS_PER_STATE = 8      # dt*A, exp, dt*B*u (2), h = dA*h + dBu (2), C contraction (2)
SCAN_FLOPS_PER_CHANNEL = 10   # dt + bias, softplus (2: exp, log1p), D skip (2), y*silu(z) (5)
SILU_FLOPS = 4                # exp, add, reciprocal, multiply
GELU_FLOPS = 5                # scale, erf, add, two multiplies
RMSNORM_FLOPS = 4             # square, mean, normalise, weight
LAYERNORM_FLOPS = 7           # mean, subtract, square, variance, normalise, weight, bias
SOFTMAX_FLOPS = 5             # max, subtract, exp, sum, divide


def scan_flops(tokens: int, channels: int, states: int) -> int:
    """FLOPs of one selective scan direction over ``tokens`` tokens (see the constants)."""
    return tokens * channels * (SCAN_FLOPS_PER_STATE * states + SCAN_FLOPS_PER_CHANNEL)


def _flop_summary(matmul: Dict[str, int], other: Dict[str, int]) -> Dict[str, int]:
    return {**matmul, **other, "matmul": sum(matmul.values()),
            "total": sum(matmul.values()) + sum(other.values())}


def mamba_flops(model: VisionMambaBackbone) -> Dict[str, int]:
    """Forward FLOPs per image of a Mamba® (or Vim) model, by part, read off the built model.

    With P patches, n registers (Vim: one class token), T = P + n tokens, width D, inner
    width E = 2D, N states, dt rank R, conv kernel K, patch p, C input channels and ``depth``
    blocks, per image:

    * matmul parts (2 FLOPs per multiply-add, weights only):
      patch_embed 2·P·C·p²·D; per block in_proj 2·T·D·2E and out_proj 2·T·E·D, and per
      direction (x2) conv1d 2·T·E·K (depthwise), x_proj 2·T·E·(R+2N), dt_proj 2·T·R·E;
      neck_head: Mamba®'s per-register neck 2·n·D·D/r (r = neck reduction, when r > 1) and
      the head 2·(n·D/r)·classes (Vim: 2·D·classes).
    * scan, per block and direction: T·E·(8·N + 10) (``scan_flops``): per state dt·A, exp,
      dt·B·u (2), the recurrence h = dA·h + dBu (2) and the C contraction (2); per channel the
      dt bias, softplus (2), the D skip (2) and the y·SiLU(z) gate (5).
    * elementwise: patch-embed bias P·D and position embeddings T·D, RMSNorm 4·T·D per block
      and for norm_f, the residual adds (T·D per block), conv bias + SiLU 5·T·E per direction,
      the average of both directions 2·T·E, norm_neck and the head bias.

    Training costs about 3x the forward (the backward does twice its work). The matmul parts
    are what ``torch.utils.flop_counter`` counts on the ``reference`` backend, except that the
    implementation's conv1d also produces K-1 padding outputs per direction, which are not
    counted here (``tests/test_benchmark.py`` checks both).
    """
    mixer = model.layers[0].mixer
    d, depth = model.embed_dim, len(model.layers)
    e, n, r, k = mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.conv1d.kernel_size[0]
    proj = model.patch_embed.proj
    p = model.patch_embed.num_patches
    regs = model.num_registers if isinstance(model, MambaR) else 1
    t = p + regs
    reduction = getattr(model, "neck_reduction", 1)
    head_in = model.head.in_features if isinstance(model.head, nn.Linear) else 0
    classes = model.num_classes
    neck = 2 * regs * d * (d // reduction) if reduction > 1 else 0
    matmul = {
        "patch_embed": 2 * p * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * d,
        "in_proj": depth * 2 * t * d * 2 * e,
        "conv1d": depth * 2 * (2 * t * e * k),
        "x_proj": depth * 2 * (2 * t * e * (r + 2 * n)),
        "dt_proj": depth * 2 * (2 * t * r * e),
        "out_proj": depth * 2 * t * e * d,
        "neck_head": neck + (2 * head_in * classes if classes else 0),
    }
    elementwise = (p * d + t * d                                # patch bias, position embeddings
                   + depth * (RMSNORM_FLOPS + 1) * t * d        # norm, residual add
                   + depth * 2 * (1 + SILU_FLOPS) * t * e       # conv bias + SiLU, 2 directions
                   + depth * 2 * t * e                          # average the two directions
                   + RMSNORM_FLOPS * t * d                      # norm_f
                   + (RMSNORM_FLOPS * head_in if reduction > 1 else 0)
                   + classes)                                   # head bias
    other = {"scan": depth * 2 * scan_flops(t, e, n), "elementwise": elementwise}
    return _flop_summary(matmul, other)


def vit_flops(model: nn.Module) -> Dict[str, int]:
    """Forward FLOPs per image of a timm VisionTransformer (DeiT), by part.

    With P patches, T = P + prefix tokens, width D, MLP width H, h heads, ``depth`` blocks:

    * matmul parts: patch_embed 2·P·C·p²·D; per block qkv 2·T·D·3D, attention (Q·Kᵀ and
      attn·V) 4·T²·D, proj 2·T·D², mlp 4·T·D·H; head 2·D·classes.
    * softmax: 5·h·T² per block.
    * elementwise: patch bias and position embedding, two LayerNorms (7·T·D each), biases of
      qkv / proj / fc1 / fc2, the query scaling, GELU (5·T·H), two residual adds per block, the
      final LayerNorm and the head bias.

    The matmul parts are what ``torch.utils.flop_counter`` counts with timm's unfused attention
    (fused SDPA kernels on CPU are invisible to it).
    """
    blk = model.blocks[0]
    d, depth = model.embed_dim, len(model.blocks)
    heads, hidden = blk.attn.num_heads, blk.mlp.fc1.out_features
    proj = model.patch_embed.proj
    p = model.patch_embed.num_patches
    t = p + model.num_prefix_tokens
    classes = model.num_classes
    matmul = {
        "patch_embed": 2 * p * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * d,
        "qkv": depth * 2 * t * d * 3 * d,
        "attention": depth * 4 * t * t * d,
        "proj": depth * 2 * t * d * d,
        "mlp": depth * 4 * t * d * hidden,
        "head": 2 * d * classes,
    }
    per_block = (2 * LAYERNORM_FLOPS * t * d + 3 * t * d + t * d   # norms, qkv bias, q scale
                 + t * d + t * hidden + t * d                      # proj, fc1, fc2 biases
                 + GELU_FLOPS * t * hidden + 2 * t * d)            # GELU, residual adds
    elementwise = p * d + t * d + depth * per_block + LAYERNORM_FLOPS * t * d + classes
    other = {"softmax": depth * SOFTMAX_FLOPS * heads * t * t, "elementwise": elementwise}
    return _flop_summary(matmul, other)


def model_flops(model: nn.Module) -> Dict[str, int]:
    return mamba_flops(model) if isinstance(model, VisionMambaBackbone) else vit_flops(model)


# --------------------------------------------------------------------------- mambapy baseline

def _load_pscan() -> Callable:
    try:
        from mambapy.pscan import pscan
    except ImportError as err:
        raise RuntimeError("the 'mambapy' backend needs mambapy, a benchmark-only dependency: "
                           "pip install mambapy") from err
    return pscan


def selective_scan_mambapy(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=True, reverse=False):
    """The CPU baseline: the selective scan as mambapy computes it, with the signature of
    ``selective_scan.selective_scan_reference``.

    mambapy's ``Mamba.selective_scan``: materialise exp(dt·A) and dt·B·u as (B, L, E, N)
    tensors, run ``mambapy.pscan.pscan`` (a Blelloch scan that pads L to the next power of two
    itself and keeps its inputs for the backward), contract with C; then the D skip and the
    SiLU(z) gate. ``reverse`` flips the sequence inputs and the output, as the official
    bidirectional Vim code does.
    """
    pscan = _load_pscan()
    if reverse:
        u, delta, B, C, z = (None if t is None else t.flip(-1) for t in (u, delta, B, C, z))
    x = u.float().transpose(1, 2)                                   # (B, L, E)
    dt = delta.float().transpose(1, 2)
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    if delta_softplus:
        dt = F.softplus(dt)
    delta_a = torch.exp(dt.unsqueeze(-1) * A.float())               # (B, L, E, N)
    bx = dt.unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(delta_a, bx)
    y = (hs @ C.float().transpose(1, 2).unsqueeze(-1)).squeeze(-1)  # (B, L, E)
    if D is not None:
        y = y + D.float() * x
    if z is not None:
        y = y * F.silu(z.float().transpose(1, 2))
    y = y.transpose(1, 2)
    return (y.flip(-1) if reverse else y).to(u.dtype)


@contextlib.contextmanager
def routed_scan(wrap: Callable[[str, Callable], Callable]) -> Iterator[List[int]]:
    """Make the Mamba mixers' reference path run ``wrap(backend, scan)`` instead of the
    backend's scan.

    The reference path (``scan_backend="reference"``: plain autograd around the scan) looks
    ``get_scan`` up on every forward, so patching its module global reroutes every model, already
    built or not. Yields a one-element call counter: a caller that relies on the route checks
    it, so a refactored mixer cannot silently bypass it.
    """
    original = vision_mamba.get_scan
    calls = [0]

    def get_scan(backend: str) -> Callable:
        calls[0] += 1
        return wrap(backend, original(backend))

    vision_mamba.get_scan = get_scan
    try:
        yield calls
    finally:
        vision_mamba.get_scan = original


# --------------------------------------------------------------------------- measuring

@dataclasses.dataclass
class Config:
    """One measurement; also the message a CPU worker subprocess receives."""
    model: str
    img_size: int
    batch: int
    dtype: str
    backend: str          # scan backend of a Mamba model; ATTENTION_BACKEND for DeiT
    device: str
    mode: str             # "infer" or "train"
    warmup: int
    iters: int
    threads: Optional[int] = None
    scan_share: bool = False
    profile_steps: int = 3
    compile: bool = False  # the model through torch.compile (default Inductor backend)


def build_model(name: str, img_size: int, backend: str, device: torch.device) -> nn.Module:
    kwargs: Dict[str, Any] = dict(pretrained=False, num_classes=1000, img_size=img_size)
    if is_mamba(name):
        # mambapy replaces the scan of the reference path at run time (routed_scan): the
        # official mixer's plain-autograd structure around mambapy's scan.
        kwargs["scan_backend"] = "reference" if backend == "mambapy" else backend
    # Built on the target device directly: initialising Base/Large on the CPU takes seconds.
    with torch.device(device):
        model = timm.create_model(name, **kwargs)
    if not is_mamba(name):
        # timm picks SDPA unless TIMM_FUSED_ATTN=0; the reference must be the fast attention.
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
    return model


def _autocast(device: torch.device, dtype: Optional[torch.dtype]
              ) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_infer_step(model: nn.Module, x: torch.Tensor, dtype: Optional[torch.dtype]
                    ) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.no_grad(), _autocast(x.device, dtype):
            model(x)
    return step


def make_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    dtype: Optional[torch.dtype]) -> Callable[[], None]:
    model.train()
    # Fused, as main.py trains: one kernel per parameter group instead of a dozen small ops.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    scaler = torch.amp.GradScaler(x.device.type, enabled=dtype == torch.float16)

    def step() -> None:
        with _autocast(x.device, dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], warmup: int, iters: int, device: torch.device
               ) -> Tuple[float, List[float]]:
    """Seconds of the first step and of each of the ``iters`` steps after ``warmup``.

    On CUDA the peak-memory counter restarts after the warm-up, so the peak is that of the
    timed steps: the first steps of a shape may hold one-off buffers (Triton's autotuner
    allocates 256 MiB through torch's allocator to flush the L2 between its trials).
    """
    times = []
    for i in range(warmup + iters):
        _sync(device)
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[0], times[warmup:]


# The mixer's op runs its scan's forward and backward inside these profiler ranges; on the
# reference path (the reference and mambapy backends) measure_scan_share wraps the scan's
# forward in SCAN_RANGE, and mambapy's backward is its pscan autograd node.
_SCAN_RANGES = (SCAN_RANGE, SCAN_BACKWARD_RANGE)
_PSCAN_BACKWARD = re.compile(r"pscan\w*backward", re.IGNORECASE)


def _is_scan_event(name: str) -> bool:
    return name in _SCAN_RANGES or bool(_PSCAN_BACKWARD.search(name))


def top_kernels(kernels: Sequence[Any], steps: int, n: int = 15) -> List[Tuple[str, float, int]]:
    """The ``n`` kernel names with the most device time: (name, ms per step, launches per
    step), names cut to 90 characters. What a step spends outside the scan is read here."""
    totals: Dict[str, List[float]] = {}
    for kernel in kernels:
        entry = totals.setdefault(kernel.name[:90], [0.0, 0])
        entry[0] += kernel.time_range.elapsed_us()
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:n]
    return [(name, round(us / steps / 1e3, 3), round(count / steps)) for name, (us, count)
            in ranked]


def measure_scan_share(step: Callable[[], None], device: torch.device, steps: int
                       ) -> Dict[str, Any]:
    """Share of a training step spent in the selective scan, from ``torch.profiler``.

    The mixer's op runs the scan's forward and backward inside ``record_function`` ranges
    (``mixer_op.SCAN_RANGE``, ``SCAN_BACKWARD_RANGE``); on the reference path the scan's
    forward is wrapped in the same range here. The outermost such events are summed. The op's
    backward redoes the conv and projections (u, delta) first, in ``RECOMPUTE_RANGE``, reported
    apart as ``recompute_ms``.
    On CUDA the share is their kernels' time over all kernels' time (``share``) and over the
    step's wall time (``share_of_step``); ``share_by_kernel_name`` cross-checks with kernels
    whose name contains "scan" (Triton's and mamba-ssm's; the torch backend's kernels are
    generic, so it reads ~0 there). On CPU it is their CPU time over the wall time. For the
    ``reference`` and ``mambapy`` backends the backward of the scan's elementwise work is plain
    autograd and is not attributed (for mambapy, only its pscan backward node is).
    """
    def ranged(_backend: str, scan: Callable) -> Callable:
        def run(*args, **kwargs):
            with torch.profiler.record_function(SCAN_RANGE):
                return scan(*args, **kwargs)
        return run

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with routed_scan(ranged):
        _sync(device)
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            wall_us = (time.perf_counter() - start) * 1e6
    events = prof.events()
    cpu = torch.autograd.DeviceType.CPU
    outermost, redone = [], []
    for evt in events:
        # record_function also leaves a GPU-side annotation of the same name: skip it here.
        if evt.device_type != cpu:
            continue
        if evt.name == RECOMPUTE_RANGE:
            redone.append(evt)
        elif _is_scan_event(evt.name):
            parent = evt.cpu_parent
            while parent is not None and not _is_scan_event(parent.name):
                parent = parent.cpu_parent
            if parent is None:
                outermost.append(evt)
    if not outermost:
        raise RuntimeError("no scan ran inside the profiler's scan ranges; scan share cannot "
                           "be attributed")
    # An event's time with its children's: its kernels' on CUDA, its CPU time otherwise.
    total_us = operator.attrgetter(
        "device_time_total" if device.type == "cuda" else "cpu_time_total")
    redo_us = sum(total_us(e) for e in redone)
    scan_us = sum(total_us(e) for e in outermost)
    result: Dict[str, Any] = {"steps": steps, "step_ms": wall_us / steps / 1e3,
                              "scan_ms": scan_us / steps / 1e3,
                              "recompute_ms": redo_us / steps / 1e3}
    if device.type == "cuda":
        # Device activity minus user annotations, as torch's own table totals it.
        kernels = [e for e in events
                   if e.device_type != cpu and not getattr(e, "is_user_annotation", False)]
        kernel_us = sum(e.time_range.elapsed_us() for e in kernels)
        named_us = sum(e.time_range.elapsed_us() for e in kernels if "scan" in e.name.lower())
        result.update(basis="cuda kernel time", kernel_ms=kernel_us / steps / 1e3,
                      share=scan_us / kernel_us if kernel_us else None,
                      share_of_step=scan_us / wall_us,
                      share_by_kernel_name=named_us / kernel_us if kernel_us else None,
                      top_kernels=top_kernels(kernels, steps))
    else:
        result.update(basis="cpu wall time", share=scan_us / wall_us)
    return result


def _rss_mb() -> Optional[float]:
    """Current resident set size (Linux), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def _max_rss_mb() -> float:
    """This process's peak RSS in MiB (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# The autotuned scan kernels of each Triton module, and the prefix their choices are named by.
_AUTOTUNED = {"selective_scan.triton_kernels": ("", ("_scan_fwd_kernel", "_scan_bwd_kernel")),
              "selective_scan.gluon_kernels": ("gluon.", ("_scan_fwd", "_scan_bwd"))}


def triton_autotune_choices() -> Dict[str, str]:
    """The config Triton's autotuner chose for each scan kernel (plain Triton, and Gluon's
    prefixed ``gluon.``) and key (E, N, L and the argument dtypes) in this process so far,
    including choices read from its disk cache, which it does not print; empty when no
    Triton scan ran."""
    choices = {}
    for module_name, (prefix, names) in _AUTOTUNED.items():
        module = sys.modules.get(module_name)
        for name in names if module is not None else ():
            for key, config in getattr(getattr(module, name), "cache", {}).items():
                choices[f"{prefix}{name} {key}"] = str(config)
    return choices


def _base_row(cfg: Config) -> Dict[str, Any]:
    return {**dataclasses.asdict(cfg), "family": "mamba" if is_mamba(cfg.model) else "deit"}


def measure(cfg: Config) -> Dict[str, Any]:
    """Run one configuration in this process and return its result row."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.img_size, cfg.backend, device)
    # Compilation happens in the first step, reported apart as first_step_s.
    model = torch.compile(net) if cfg.compile else net
    x = torch.randn(cfg.batch, 3, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, net.num_classes, (cfg.batch,), device=device)
    dtype = AUTOCAST_DTYPES[cfg.dtype]
    if cfg.mode == "train":
        step = make_train_step(model, x, y, dtype)
    else:
        step = make_infer_step(model, x, dtype)
    row = _base_row(cfg)
    if isinstance(net, VisionMambaBackbone):
        row["tokens"] = net.patch_embed.num_patches + (
            net.num_registers if isinstance(net, MambaR) else 1)
        row["backend_resolved"] = ("mambapy" if cfg.backend == "mambapy" else
                                   resolve_backend(requested_backend(cfg.backend), device))
    else:
        row["tokens"] = net.patch_embed.num_patches + net.num_prefix_tokens
        row["backend_resolved"] = ATTENTION_BACKEND
    row["params"] = sum(p.numel() for p in net.parameters())
    row["rss_base_mb"] = _rss_mb()
    with contextlib.ExitStack() as stack:
        if cfg.backend == "mambapy":
            calls = stack.enter_context(routed_scan(lambda _b, _s: selective_scan_mambapy))
        first, times = time_steps(step, cfg.warmup, cfg.iters, device)
        if cfg.backend == "mambapy" and not calls[0]:
            raise RuntimeError("the mambapy scan was never called: vision_mamba no longer "
                               "routes its scans through get_scan")
        if device.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            row["peak_mem_basis"] = "torch.cuda.max_memory_allocated over the timed steps"
        else:
            row["peak_mem_mb"] = _max_rss_mb()
            row["peak_mem_basis"] = "ru_maxrss of the measuring process"
            if row["rss_base_mb"] is not None:
                row["workload_mb"] = row["peak_mem_mb"] - row["rss_base_mb"]
        if cfg.scan_share and cfg.mode == "train" and isinstance(net, VisionMambaBackbone):
            row["scan_profile"] = measure_scan_share(step, device, cfg.profile_steps)
    if row.get("backend_resolved") == "triton":
        row["triton_configs"] = triton_autotune_choices()
    flops = model_flops(net)
    median = statistics.median(times)
    row.update(step_s=median, step_s_all=times, first_step_s=first,
               img_per_s=cfg.batch / median, flops=flops,
               gflops_per_img=flops["total"] / 1e9,
               tflops_per_s=flops["total"] * (3 if cfg.mode == "train" else 1)
               * cfg.batch / median / 1e12)
    return row


def _error_row(cfg: Config, message: str) -> Dict[str, Any]:
    return {**_base_row(cfg), "error": message}


def run_isolated(cfg: Config, timeout: Optional[float]) -> Dict[str, Any]:
    """Measure ``cfg`` in a fresh Python process (CPU: keeps peak RSS per configuration)."""
    env = dict(os.environ)
    if cfg.threads:
        # Also size the OpenMP / MKL pools that exist before set_num_threads runs.
        env.update(OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker",
           json.dumps(dataclasses.asdict(cfg))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=REPO)
    except subprocess.TimeoutExpired:
        return _error_row(cfg, f"timed out after {timeout:g} s")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
    return _error_row(cfg, f"worker exited with {proc.returncode}: {tail}")


def run_in_process(cfg: Config) -> Dict[str, Any]:
    """Measure ``cfg`` here (CUDA); a failure (out of memory, a kernel error) becomes the
    row's ``error`` so the remaining configurations still run."""
    try:
        row = measure(cfg)
    except torch.cuda.OutOfMemoryError:
        row = _error_row(cfg, "out of memory")
    except Exception as err:  # noqa: BLE001  (reported in the table and the JSON)
        message = str(err).strip()
        row = _error_row(cfg, f"{type(err).__name__}: {message.splitlines()[0]}"
                         if message else type(err).__name__)
    # Out of the handlers, the traceback and the tensors its frames held are gone: release
    # their blocks so the next configuration starts from an empty cache.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------- planning

def parse_sweep_batch(spec: Optional[str]) -> Dict[int, int]:
    """``"512=32,1024=8"`` -> {512: 32, 1024: 8}; ``"16"`` -> {0: 16} (every size)."""
    if not spec:
        return {}
    if "=" not in spec:
        return {0: int(spec)}
    pairs = (item.split("=") for item in spec.split(",") if item.strip())
    return {int(size): int(batch) for size, batch in pairs}


def batch_for(size: int, batch: int, sweep_batch: Dict[int, int]) -> int:
    return sweep_batch.get(size, sweep_batch.get(0, batch))


def plan(args: argparse.Namespace) -> List[Config]:
    """Configurations in run order: per input size and dtype, each Mamba model (every
    backend, every mode) followed by its DeiT partner."""
    entries: List[Tuple[str, str]] = []
    for name in args.model:
        if is_mamba(name):
            entries += [(name, backend) for backend in args.backend]
            partner = deit_partner(name)
            if args.reference == "deit" and partner:
                entries.append((partner, ATTENTION_BACKEND))
        else:
            entries.append((name, ATTENTION_BACKEND))
    entries = list(dict.fromkeys(entries))  # a DeiT named explicitly and as a partner: once
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    compiled = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    sweep_batch = parse_sweep_batch(args.sweep_batch)
    return [Config(model=name, img_size=size, batch=batch_for(size, args.batch, sweep_batch),
                   dtype=dtype, backend=backend, device=args.device, mode=mode,
                   warmup=args.warmup, iters=args.iters, threads=args.threads,
                   scan_share=args.scan_share and is_mamba(name),
                   profile_steps=args.profile_steps, compile=compile_model)
            for size in args.input_size for dtype in args.dtype
            for name, backend in entries for compile_model in compiled for mode in modes]


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} logical CPUs)"


def run_metadata(args: argparse.Namespace) -> Dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=REPO, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python"] + sys.argv),
        "device": args.device, "device_name": _device_name(args.device),
        "threads": args.threads or (torch.get_num_threads() if args.device == "cpu" else None),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "timm": timm.__version__, "triton": _version("triton"),
        "mambapy": _version("mambapy"), "git_commit": commit,
    }


# --------------------------------------------------------------------------- reporting

def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _rate(value: float) -> str:
    """img/s with two decimals where a CPU gives a handful per second."""
    return _fmt(value, 2 if value < 100 else 1)


def _mem(row: Dict[str, Any]) -> float:
    """The memory to compare between rows: on CPU what the workload added to the process
    (the interpreter and libraries, ~1 GB, would flatten every ratio), on CUDA the peak."""
    return row.get("workload_mb") or row["peak_mem_mb"]


def _short(name: str) -> str:
    return name.replace("_patch16_224", "")


def _key(row: Dict[str, Any]) -> Tuple:
    """What two rows must share to be compared: size, batch, dtype, mode, device."""
    return row["img_size"], row["batch"], row["dtype"], row["mode"], row["device"]


def _ok(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in rows if "error" not in r]


def _backend_label(r: Dict[str, Any], resolved: bool = True) -> str:
    """The row's scan backend (attention for DeiT), "+compile" when torch.compile ran it."""
    name = r.get("backend_resolved", r["backend"]) if resolved else r["backend"]
    return name + ("+compile" if r.get("compile") else "")


def results_table(rows: Sequence[Dict[str, Any]]) -> str:
    body = []
    for r in rows:
        head = [_short(r["model"]), r["img_size"], r.get("tokens", "-"), r["batch"], r["dtype"],
                _backend_label(r), r["mode"]]
        if "error" in r:
            body.append(head + [f"ERROR: {r['error']}"] + [""] * 7)
            continue
        body.append(head + [_rate(r["img_per_s"]), _fmt(r["step_s"] * 1e3),
                            _fmt(r["first_step_s"], 2), _fmt(r["peak_mem_mb"], 0),
                            _fmt(r.get("workload_mb"), 0), _fmt(r["gflops_per_img"], 2),
                            _fmt(r["tflops_per_s"], 2)])
    return _table(["model", "px", "tokens", "batch", "dtype", "backend", "mode", "img/s",
                   "ms/step", "1st step s", "peak MiB", "above base", "GFLOPs/img",
                   "TFLOP/s"], body)


def deit_comparison(rows: Sequence[Dict[str, Any]]) -> List[List[Any]]:
    """A Mamba model against its DeiT partner measured with the same size, batch, dtype, mode
    and compilation."""
    deit = {(r["model"], r.get("compile")) + _key(r): r for r in _ok(rows)
            if r["family"] == "deit"}
    out = []
    for r in _ok(rows):
        partner = deit.get((deit_partner(r["model"]), r.get("compile")) + _key(r))
        if r["family"] == "mamba" and partner:
            out.append([_short(r["model"]), r["img_size"], r["batch"], r["dtype"], r["mode"],
                        _backend_label(r), _short(partner["model"]),
                        f"{r['img_per_s'] / partner['img_per_s']:.2f}x",
                        f"{_mem(r) / _mem(partner):.2f}x",
                        f"{r['flops']['total'] / partner['flops']['total']:.2f}x",
                        f"{r['flops']['matmul'] / partner['flops']['matmul']:.2f}x"])
    return out


def backend_comparison(rows: Sequence[Dict[str, Any]]) -> Tuple[Optional[str], List[List[Any]]]:
    """Every Mamba model's backend against a baseline backend of the same configuration: mambapy
    when it was measured, otherwise the first backend of the run."""
    mamba = [r for r in _ok(rows) if r["family"] == "mamba"]
    backends = list(dict.fromkeys(_backend_label(r, resolved=False) for r in mamba))
    if len(backends) < 2:
        return None, []
    baseline = "mambapy" if "mambapy" in backends else backends[0]
    base = {(r["model"],) + _key(r): r for r in mamba
            if _backend_label(r, resolved=False) == baseline}
    out = []
    for r in mamba:
        ref = base.get((r["model"],) + _key(r))
        if ref is not None and r is not ref:
            out.append([_short(r["model"]), r["img_size"], r["batch"], r["dtype"], r["mode"],
                        _backend_label(r), _rate(r["img_per_s"]), _rate(ref["img_per_s"]),
                        f"{r['img_per_s'] / ref['img_per_s']:.2f}x", _fmt(r["step_s"], 3),
                        _fmt(ref["step_s"], 3), _fmt(r["peak_mem_mb"], 0),
                        _fmt(ref["peak_mem_mb"], 0), f"{_mem(r) / _mem(ref):.2f}x"])
    return baseline, out


def scaling_table(rows: Sequence[Dict[str, Any]]) -> List[List[Any]]:
    """How each cost grows with the input size, relative to the smallest size measured."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in _ok(rows):
        groups.setdefault((r["model"], r["backend"], r["dtype"], r["mode"]), []).append(r)
    out = []
    for (model, _, dtype, mode), group in groups.items():
        group.sort(key=lambda r: r["img_size"])
        if len({r["img_size"] for r in group}) < 2:
            continue
        first = group[0]
        per_img0 = 1 / first["img_per_s"]
        for r in group:
            out.append([_short(model), r["backend_resolved"], dtype, mode, r["img_size"],
                        r["tokens"], r["batch"], _rate(r["img_per_s"]),
                        f"{(1 / r['img_per_s']) / per_img0:.2f}x",
                        _fmt(r["peak_mem_mb"], 0),
                        f"{r['flops']['total'] / first['flops']['total']:.2f}x"])
    return out


def check_targets(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The project's targets, for those configurations this run measured: on the CPU the
    compiled scan against the mambapy scan, on the GPU Mamba®-B's training step."""
    ok = _ok(rows)
    targets: List[Dict[str, Any]] = []

    def add(topic: str, name: str, value: float, target: str, passed: bool) -> None:
        targets.append({"topic": topic, "name": name, "value": round(value, 3),
                        "target": target, "ok": passed})

    # The compiled CPU scan: Tiny, 224 px, batch 8, fp32 on CPU: torch backend against the
    # mambapy scan; first the floor it must never fall below, then the goal.
    for mode, floor in (("train", 5.0), ("infer", 3.0)):
        pick = {r["backend"]: r for r in ok if r["device"] == "cpu" and r["mode"] == mode
                and r["model"] == "mambar_tiny_patch16_224" and r["img_size"] == 224
                and r["batch"] == 8 and r["dtype"] == "fp32"}
        if "torch" in pick and "mambapy" in pick:
            ours, base = pick["torch"], pick["mambapy"]
            for need in (floor, 10.0):
                add("CPU", f"{mode} speedup over the mambapy scan", ours["img_per_s"] /
                    base["img_per_s"], f">= {need:g}x",
                    ours["img_per_s"] >= need * base["img_per_s"])
            add("CPU", f"{mode} peak RSS, MiB (mambapy: {base['peak_mem_mb']:.0f})",
                ours["peak_mem_mb"], "<= mambapy's", ours["peak_mem_mb"] <= base["peak_mem_mb"])

    # Base, bf16 autocast, training step, CUDA, Triton backend, against DeiT-B.
    def base_rows(family_model: str, backend: str) -> Dict[Tuple[int, int], Dict[str, Any]]:
        return {(r["img_size"], r["batch"]): r for r in ok
                if r["device"] == "cuda" and r["mode"] == "train" and r["dtype"] == "bf16"
                and r["model"] == family_model and r["backend_resolved"] == backend}

    mambar_b = base_rows("mambar_base_patch16_224", "triton")
    deit_b = base_rows("deit_base_patch16_224", ATTENTION_BACKEND)
    main = mambar_b.get((224, 128))
    if main is not None:
        add("GPU", "Mamba-B triton img/s (224 px, batch 128)", main["img_per_s"], ">= 1000",
            main["img_per_s"] >= 1000)
        add("GPU", "Mamba-B peak training memory, GB", main["peak_mem_mb"] * 2**20 / 1e9, "<= 17",
            main["peak_mem_mb"] * 2**20 <= 17e9)
        if (224, 128) in deit_b:
            ratio = main["img_per_s"] / deit_b[(224, 128)]["img_per_s"]
            add("GPU", "Mamba-B / DeiT-B img/s (224 px)", ratio, ">= 0.45", ratio >= 0.45)
    for (size, batch), r in sorted(mambar_b.items()):
        if size >= 512 and (size, batch) in deit_b:
            ratio = r["img_per_s"] / deit_b[(size, batch)]["img_per_s"]
            add("GPU", f"Mamba-B / DeiT-B img/s ({size} px, batch {batch})", ratio, "> 1",
                ratio > 1)
    return targets


def report(meta: Dict[str, Any], rows: Sequence[Dict[str, Any]],
           targets: Sequence[Dict[str, Any]]) -> str:
    parts = [f"device: {meta['device_name']}",
             f"torch {meta['torch']} (CUDA {meta['cuda']}), timm {meta['timm']}, "
             f"triton {meta['triton']}, mambapy {meta['mambapy']}, python {meta['python']}"
             + (f", {meta['threads']} threads" if meta["threads"] else ""),
             f"date: {meta['date']}   commit: {meta['git_commit']}",
             f"command: {meta['command']}",
             "train: forward + cross-entropy + backward + AdamW step + zero_grad; "
             "infer: eval forward under no_grad; figures: medians",
             f"peak memory: {rows[0].get('peak_mem_basis', '-') if rows else '-'}; "
             "GFLOPs/img: forward; TFLOP/s: achieved (a training step counts 3x the forward)",
             "", results_table(rows)]
    deit = deit_comparison(rows)
    if deit:
        parts += ["", "Mamba vs DeiT of the same size (ratios Mamba / DeiT; memory: what "
                  "the workload adds on CPU, the peak on CUDA)", _table(
            ["model", "px", "batch", "dtype", "mode", "backend", "reference", "img/s",
             "memory", "FLOPs", "matmul FLOPs"], deit)]
    baseline, backends = backend_comparison(rows)
    if backends:
        parts += ["", f"Scan backends vs {baseline} (speedup: img/s ratio; mem: ratio of "
                  "what the workload adds on CPU, of the peaks on CUDA)", _table(
            ["model", "px", "batch", "dtype", "mode", "backend", "img/s", f"{baseline} img/s",
             "speedup", "s/step", f"{baseline} s/step", "peak MiB", f"{baseline} peak MiB",
             "mem"], backends)]
    scaling = scaling_table(rows)
    if scaling:
        parts += ["", "Resolution scaling (relative to the smallest size)", _table(
            ["model", "backend", "dtype", "mode", "px", "tokens", "batch", "img/s",
             "time/img", "peak MiB", "FLOPs/img"], scaling)]
    shares = [r for r in _ok(rows) if r.get("scan_profile")]
    if shares:
        parts += ["", "Share of the training step in the selective scan", _table(
            ["model", "px", "batch", "dtype", "backend", "basis", "scan ms/step",
             "u, delta redone ms", "share", "of wall", "by kernel name"],
            [[_short(r["model"]), r["img_size"], r["batch"], r["dtype"], r["backend_resolved"],
              s["basis"], _fmt(s["scan_ms"], 2), _fmt(s.get("recompute_ms"), 2),
              _pct(s["share"]),
              _pct(s.get("share_of_step", s["share"])), _pct(s.get("share_by_kernel_name"))]
             for r in shares for s in [r["scan_profile"]]])]
    if targets:
        parts += ["", "Targets", _table(
            ["topic", "check", "value", "target", "result"],
            [[t["topic"], t["name"], _fmt(t["value"], 2), t["target"],
              "PASS" if t["ok"] else "FAIL"] for t in targets])]
    return "\n".join(parts)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def write_json(path: str, meta: Dict[str, Any], rows: Sequence[Dict[str, Any]],
               targets: Sequence[Dict[str, Any]]) -> None:
    """Rewrite the whole file atomically; called after every configuration so that a run
    cut short (a timeout on a lent GPU) still leaves its finished rows."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": list(rows), "targets": list(targets)}, f, indent=1)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- command line

COMPARE_MAMBAPY = dict(model=["mambar_tiny_patch16_224"], input_size=[224], batch=8,
                       dtype=["fp32"], device="cpu", threads=2, backend=["torch", "mambapy"],
                       reference="none", mode="both")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Images/s, peak memory and FLOPs of Mamba® and DeiT (see the module "
                    "docstring for what is measured and how).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", nargs="+",
                        help="mambar_* / vim_* and timm deit_* / vit_* names "
                             "[mambar_tiny_patch16_224]")
    parser.add_argument("--input-size", nargs="+", type=int,
                        help="image sizes, multiples of 16 [224; --sweep: 224 ... 1024]")
    parser.add_argument("--batch", type=int, help="batch size [128 on CUDA, 8 on CPU]")
    parser.add_argument("--dtype", nargs="+", choices=list(AUTOCAST_DTYPES),
                        help="fp32, or bf16 / fp16 autocast [bf16 on CUDA, fp32 on CPU]")
    parser.add_argument("--backend", nargs="+", choices=SCAN_BACKENDS,
                        help="scan backends of the Mamba models; mambapy: the pure-PyTorch "
                             "CPU baseline [auto]")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="[cuda when available]")
    parser.add_argument("--mode", choices=("infer", "train", "both"), help="[both]")
    parser.add_argument("--reference", choices=("deit", "none"),
                        help="also measure the DeiT of each Mamba model's size [deit]")
    parser.add_argument("--sweep", action="store_true",
                        help=f"input sizes {' '.join(map(str, SWEEP_SIZES))} unless "
                             "--input-size is given; prints how each cost grows")
    parser.add_argument("--sweep-batch",
                        help="batch per size, e.g. 512=32,768=16,1024=8 (others: --batch), "
                             "or one number for every size")
    parser.add_argument("--warmup", type=int, help="untimed steps [3 on CUDA, 1 on CPU]")
    parser.add_argument("--iters", type=int, help="timed steps [10 on CUDA, 3 on CPU]")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off",
                        help="run the models through torch.compile; both: each eagerly and "
                             "compiled, compared in the backend table")
    parser.add_argument("--scan-share", action="store_true",
                        help="profile the training step and report the scan's share")
    parser.add_argument("--profile-steps", type=int, default=3,
                        help="training steps profiled for --scan-share")
    parser.add_argument("--compare-mambapy", action="store_true",
                        help="the CPU baseline: Tiny, 224 px, batch 8, fp32, 2 CPU threads, "
                             "torch vs mambapy backend, infer and train (explicit options win)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure CPU configurations in this process (faster; peak RSS "
                             "is then the running maximum of the run)")
    parser.add_argument("--timeout", type=float,
                        help="seconds allowed per CPU configuration (its subprocess)")
    parser.add_argument("--ledger", action="store_true",
                        help="count one CUDA training step without a GPU (tools/cost_ledger.py):"
                             " launches, HBM bytes, FLOPs and roofline time per op kind "
                             "(the CUDA defaults: batch 128, bf16)")
    parser.add_argument("--json", help="write the results here (rewritten after every row)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.compare_mambapy:
        for name, value in COMPARE_MAMBAPY.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    # The ledger counts a CUDA step, with or without a GPU here.
    cuda = args.ledger or (args.device or ("cuda" if torch.cuda.is_available() else "cpu")
                           ) == "cuda"
    defaults = dict(model=["mambar_tiny_patch16_224"],
                    input_size=list(SWEEP_SIZES) if args.sweep else [224],
                    batch=128 if cuda else 8, dtype=["bf16" if cuda else "fp32"],
                    backend=["auto"], device="cuda" if cuda else "cpu", mode="both",
                    reference="deit", warmup=3 if cuda else 1, iters=10 if cuda else 3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if cuda and not args.ledger and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if "mambapy" in args.backend and importlib.util.find_spec("mambapy") is None:
        parser.error("the mambapy backend needs mambapy, a benchmark-only dependency: "
                     "pip install mambapy")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def _progress(index: int, total: int, row: Dict[str, Any]) -> str:
    label = (f"[{index}/{total}] {_short(row['model'])} {row['img_size']}px b{row['batch']} "
             f"{row['dtype']} {_backend_label(row)} {row['mode']}")
    if "error" in row:
        return f"{label}: ERROR {row['error']}"
    return (f"{label}: {row['img_per_s']:,.2f} img/s, {row['step_s']:.3f} s/step, "
            f"peak {row['peak_mem_mb']:,.0f} MiB")


def run_ledger(args: argparse.Namespace) -> int:
    """``--ledger``: tools/cost_ledger.py for each model, size and dtype asked for, with the
    DeiT of the model's size beside it unless ``--reference none``; nothing runs on a GPU."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import cost_ledger
    code = 0
    for model in args.model:
        partner = deit_partner(model) if args.reference != "none" else None
        for size in args.input_size:
            for dtype in args.dtype:
                argv = ["--model", model, "--batch", str(args.batch), "--input-size",
                        str(size), "--dtype", dtype, "--backend", args.backend[0]]
                argv += ["--reference", partner] if partner else []
                argv += ["--json", args.json] if args.json else []
                code = max(code, cost_ledger.main(argv))
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.ledger:
        return run_ledger(args)
    if args.worker:
        row = measure(Config(**json.loads(args.worker)))
        print(RESULT_TAG + json.dumps(row), flush=True)
        return 0
    configs = plan(args)
    meta = run_metadata(args)
    rows: List[Dict[str, Any]] = []
    for index, cfg in enumerate(configs, 1):
        if cfg.device == "cpu" and not args.in_process:
            row = run_isolated(cfg, args.timeout)
        else:
            row = run_in_process(cfg)
        rows.append(row)
        print(_progress(index, len(configs), row), file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, meta, rows, check_targets(rows))
    targets = check_targets(rows)
    if args.json:
        write_json(args.json, meta, rows, targets)
    print(report(meta, rows, targets))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
