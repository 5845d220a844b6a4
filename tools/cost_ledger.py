"""Cost ledger: one training step, kernel by kernel, as the CUDA path runs it, without a GPU.

One step (forward under autocast, cross-entropy, backward, AdamW, ``zero_grad``: what
``benchmark.make_train_step`` times; AdamW fused as ``main.py`` and ``make_train_step`` build
it, or with ``--adamw foreach`` PyTorch's default) runs on fake CUDA
tensors (``FakeTensorMode``: shapes, dtypes and strides, no data). A ``TorchDispatchMode`` books
every aten op that reaches the dispatcher, after autocast and autograd, as kernel launches,
HBM bytes read and written, and FLOPs; the roofline time of each booking on an H100 SXM and an
H200 is max(bytes / HBM bandwidth, FLOPs / peak). The table groups the bookings by op kind, the
selective scan apart.

What the dispatcher does not show is booked by rule (``_RULES``), after PyTorch's CUDA sources:

* views and metadata ops cost nothing; a view's bytes are its own elements, a broadcast
  (stride-0) dimension is read once, host scalars are kernel arguments;
* a copy whose destination's unit-stride dimension is strided in the source is a
  *transposing* copy (its own kind): each element read pulls a sector of its own;
* ``aten::_convolution`` makes a 1-d conv's input contiguous (a hidden copy); a depthwise
  conv that cuDNN does not take (anything but fp16) runs PyTorch's ``CudaDepthwise2d``
  kernels; the conv backward is a dgrad kernel, a wgrad kernel and a bias-grad sum;
  cuDNN adds a conv's bias in a kernel of its own;
* cuBLAS copies an operand that is neither row- nor column-major first;
* ``_foreach_*`` ops and fused AdamW launch ``multi_tensor_apply`` kernels in chunks of
  65,536 elements, at most 320 blocks and 110/64/48/36/30 tensors (by list depth) a launch;
  fused AdamW reads parameter, gradient and both moments and writes all but the gradient;
* the fused RMSNorm and LayerNorm backwards are a grad-input kernel and a two-stage
  grad-weight reduction, reading dy and x twice; ``nll_loss_backward`` zero-fills first;
* the flash-attention backward is three kernels and an fp32 dq accumulator.

Custom ops written in Python (``mambar::bimamba`` and its backward) run their own
bodies on the fake tensors, so their convs, projections, casts and copies are booked like any
others. Triton launches never happen: ``KernelInterface.__getitem__`` is intercepted for the
duration of a run and each launch goes to the rule registered for its kernel
(``triton_rule``), which books it with the tensors it is given (inputs, outputs, scratch)
through ``book_kernel``. A launch without a rule is an error, not a silent zero.

Three things insist on a real GPU, and the ledger works around each (only for the run):

* the autograd engine asks the CUDA driver for the streams of a graph with CUDA nodes, which
  fails without a GPU even on fake tensors (it expects the forward to have made a CUDA
  context): ``run_backward`` executes
  the graph node by node from Python as ``Engine::execute`` would (gradient sums, dtype and
  shape checks, ``AccumulateGrad``'s steal-or-copy);
* ``torch.autocast("cuda")`` and ``GradScaler`` turn themselves off: ``cuda_autocast`` sets
  the autocast state directly, and the scaler is built as if CUDA were there;
* SDPA's backend choice and the scan's Triton-or-Gluon choice read the device's properties:
  SDPA goes to the kernel an H100 runs (flash for fp16/bf16, memory-efficient otherwise),
  the scan to the plain Triton kernels (the Gluon ones are opt-in).

Run ``python tools/cost_ledger.py --model mambar_base_patch16_224 --batch 128 --dtype bf16
--reference deit_base_patch16_224``, or ``python benchmark.py --ledger --model ...``. Without
a GPU, set no ``TRITON_INTERPRET``: under the interpreter the scan modules keep one small
autotuning config, which changes the backward's scratch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.flop_counter import conv_flop_count, flop_registry  # noqa: E402

aten = torch.ops.aten
Tensor = torch.Tensor


# --------------------------------------------------------------------------- devices


@dataclasses.dataclass(frozen=True)
class Device:
    """HBM bandwidth and dense peaks (bytes/s, FLOP/s) from NVIDIA's datasheets."""
    name: str
    hbm: float
    tensor: float     # bf16 / fp16 tensor cores
    tf32: float       # fp32 GEMMs and convs where TF32 is allowed
    fp32: float       # CUDA cores


DEVICES = (Device("H100", 3.35e12, 989.4e12, 494.7e12, 66.9e12),
           Device("H200", 4.8e12, 989.4e12, 494.7e12, 66.9e12))

SCAN = "scan"
TRANSPOSING = "transposing copy"
KINDS = ("gemm", "conv", "attention", "norm", "elementwise/glue", "copy/cast", TRANSPOSING,
         "fill", "reduction", "softmax/loss", "optimizer", "custom", SCAN)


# --------------------------------------------------------------------------- the ledger


@dataclasses.dataclass
class Record:
    """One booking: an aten op, or a kernel it runs that the dispatcher does not show."""
    op: str
    kind: str
    launches: int
    read: int               # bytes, scratch included
    written: int
    flops: int = 0
    peak: str = "fp32"      # the peak the FLOPs run at: "tensor", "tf32" or "fp32"
    scratch: int = 0        # bytes of read + written that are a kernel's own scratch
    phase: str = ""

    def seconds(self, device: Device) -> float:
        flops_per_s = {"tensor": device.tensor, "tf32": device.tf32,
                       "fp32": device.fp32}[self.peak]
        return max((self.read + self.written) / device.hbm, self.flops / flops_per_s)


class Ledger:
    """The bookings of one run, in the order the kernels would launch."""

    def __init__(self) -> None:
        self.records: List[Record] = []
        self.phase = ""

    def add(self, record: Record) -> None:
        record.phase = self.phase
        self.records.append(record)

    def summary(self) -> Dict[str, Any]:
        """Totals per op kind, per op, for the scan and outside it (bytes, FLOPs, ms)."""
        def total(records: Iterable[Record]) -> Dict[str, float]:
            records = list(records)
            out: Dict[str, float] = {
                "launches": sum(r.launches for r in records),
                "read_bytes": sum(r.read for r in records),
                "written_bytes": sum(r.written for r in records),
                "scratch_bytes": sum(r.scratch for r in records),
                "flops": sum(r.flops for r in records)}
            for device in DEVICES:
                out[f"{device.name}_ms"] = 1e3 * sum(r.seconds(device) for r in records)
            return out

        def grouped(key: Callable[[Record], str]) -> Dict[str, Dict[str, float]]:
            groups: Dict[str, List[Record]] = {}
            for r in self.records:
                groups.setdefault(key(r), []).append(r)
            return {name: total(rs) for name, rs in groups.items()}

        return {"by_kind": grouped(lambda r: r.kind), "by_op": grouped(lambda r: r.op),
                "by_phase": grouped(lambda r: r.phase),
                "scan": total(r for r in self.records if r.kind == SCAN),
                "outside_scan": total(r for r in self.records if r.kind != SCAN),
                "total": total(self.records)}


_ACTIVE: List[Ledger] = []


def _footprint(t: Any) -> int:
    """Bytes a kernel touches in ``t``: its own elements, a stride-0 dimension once; nothing
    for host tensors (a scalar passed to a CUDA kernel is a kernel argument)."""
    if not isinstance(t, Tensor) or t.device.type == "cpu":
        return 0
    return t.element_size() * math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0)


def _bytes(items: Iterable[Any]) -> int:
    return sum(item if isinstance(item, int) else _footprint(item) for item in items)


def book_kernel(name: str, reads: Sequence[Any] = (), writes: Sequence[Any] = (),
                flops: int = 0, kind: str = "custom", launches: int = 1, peak: str = "fp32",
                scratch_reads: Sequence[Any] = (), scratch_writes: Sequence[Any] = ()) -> bool:
    """Book a kernel that no aten op shows in the ledger recording now. ``reads`` and
    ``writes`` are tensors (their footprint) or byte counts, a tensor listed twice is read
    twice; scratch counts in the roofline and is also shown apart. Returns whether a ledger
    is recording: a launch site can skip its launch then (its tensors are fake)."""
    if not _ACTIVE:
        return False
    scratch_read, scratch_written = _bytes(scratch_reads), _bytes(scratch_writes)
    _ACTIVE[-1].add(Record(name, kind, launches, _bytes(reads) + scratch_read,
                           _bytes(writes) + scratch_written, flops, peak,
                           scratch_read + scratch_written))
    return True


# --------------------------------------------------------------------------- Triton kernels

TritonRule = Callable[[Dict[str, Any]], None]
_TRITON_RULES: Dict[str, TritonRule] = {}


def triton_rule(*kernel_names: str) -> Callable[[TritonRule], TritonRule]:
    """Register the booking of Triton kernels (by their Python function's name): the rule
    gets the launch's arguments by parameter name and calls ``book_kernel``."""
    def register(rule: TritonRule) -> TritonRule:
        for name in kernel_names:
            _TRITON_RULES[name] = rule
        return rule
    return register


def _scan_inputs(a: Dict[str, Any]) -> List[Any]:
    """What a scan kernel reads once: u, delta, A, B, C and the optional D, z, bias (absent
    ones are passed as u and skipped by their constexpr flags)."""
    optional = [a["D_ptr"] if a["HAS_D"] else None, a["z_ptr"] if a["HAS_Z"] else None,
                a["bias_ptr"] if a["HAS_BIAS"] else None]
    return [a["u_ptr"], a["delta_ptr"], a["A_ptr"], a["B_ptr"], a["C_ptr"], *optional]


@triton_rule("_scan_fwd_kernel")
def _scan_forward(a: Dict[str, Any]) -> None:
    # Accumulating (a mixer's second direction), each tile of out is loaded before the store.
    book_kernel("triton scan forward", kind=SCAN,
                reads=[*_scan_inputs(a), a["out_ptr"] if a["ACCUMULATE"] else None],
                writes=[a["out_ptr"]])


@triton_rule("_scan_bwd_kernel")
def _scan_backward(a: Dict[str, Any]) -> None:
    # Pass 0 turns delta into softplus(delta + bias) in the fp32 scratch dt; pass 1 reads u,
    # dt and B again to write each chunk's boundary state into ckpt; pass 2 reads everything
    # (dt a second time, ckpt once) and writes the gradients. dB, dC and the per-channel ones
    # are atomic adds into buffers the launcher or caller zeroed: they meet in L2, HBM sees
    # one write. dz accumulated (a mixer's second direction) is loaded before its store.
    dz = a["dz_ptr"] if a["HAS_Z"] else None
    grads = [a["du_ptr"], a["ddelta_ptr"], a["dA_ptr"], a["dB_ptr"], a["dC_ptr"],
             a["dD_ptr"] if a["HAS_D"] else None, dz,
             a["dbias_ptr"] if a["HAS_BIAS"] else None]
    dt, ckpt = a["dt_ptr"], a["ckpt_ptr"]
    book_kernel("triton scan backward", kind=SCAN,
                reads=[*_scan_inputs(a), a["dout_ptr"], a["u_ptr"], a["B_ptr"],
                       dz if a["DZ_ACCUMULATE"] else None], writes=grads,
                scratch_reads=[dt, dt, ckpt], scratch_writes=[dt, ckpt])


@triton_rule("_conv_silu_fwd_kernel")
def _triton_conv_forward(a: Dict[str, Any]) -> None:
    # The K-1 halo tokens a tile re-reads come from L1/L2: x is read from HBM once.
    book_kernel("triton conv1d+SiLU forward", kind="conv",
                reads=[a["x_ptr"], a["w_ptr"], a["b_ptr"] if a["HAS_BIAS"] else None],
                writes=[a["out_ptr"]])


@triton_rule("_conv_silu_bwd_kernel")
def _triton_conv_backward(a: Dict[str, Any]) -> None:
    # x, du and (accumulating) dx once each; dW and db are atomic adds that meet in L2.
    book_kernel("triton conv1d+SiLU backward", kind="conv",
                reads=[a["x_ptr"], a["du_ptr"], a["w_ptr"],
                       a["b_ptr"] if a["HAS_BIAS"] else None,
                       a["dx_ptr"] if a["ACCUMULATE"] else None],
                writes=[a["dx_ptr"], a["dw_ptr"], a["db_ptr"] if a["HAS_BIAS"] else None])


@triton_rule("_add_rms_norm_fwd_kernel")
def _triton_norm_forward(a: Dict[str, Any]) -> None:
    book_kernel("triton add+RMSNorm forward", kind="norm",
                reads=[a["hidden_ptr"], a["residual_ptr"] if a["HAS_RESIDUAL"] else None,
                       a["weight_ptr"]],
                writes=[a["normed_ptr"], a["new_residual_ptr"], a["rstd_ptr"]])


@triton_rule("_add_rms_norm_bwd_kernel")
def _triton_norm_backward(a: Dict[str, Any]) -> None:
    book_kernel("triton add+RMSNorm backward", kind="norm",
                reads=[a["d_normed_ptr"], a["d_new_ptr"] if a["HAS_D_NEW"] else None,
                       a["new_residual_ptr"], a["rstd_ptr"], a["weight_ptr"]],
                writes=[a["d_hidden_ptr"],
                        a["d_residual_ptr"] if a["STORE_D_RESIDUAL"] else None,
                        a["d_weight_partial_ptr"]])


def _base_kernel(kernel: Any) -> Any:
    """The JIT (or interpreted) function under autotuners and heuristics."""
    while not hasattr(kernel, "arg_names"):
        kernel = kernel.fn
    return kernel


def _intercepted_launch(kernel: Any, grid: Any) -> Callable[..., None]:
    """``kernel[grid]`` while a ledger records: books the launch and runs nothing."""
    base = _base_kernel(kernel)
    name = base.fn.__name__

    def launch(*args: Any, **kwargs: Any) -> None:
        rule = _TRITON_RULES.get(name)
        if rule is None:
            raise RuntimeError(f"Triton kernel {name} has no ledger booking: register one with "
                               f"cost_ledger.triton_rule({name!r})")
        rule({**dict(zip(base.arg_names, args)), **kwargs})
    return launch


# --------------------------------------------------------------------------- aten op rules

# Tensor arguments whose contents these ops do not read (only their shape, dtype, device).
_NOT_READ = {aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like,
             aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty,
             aten.new_empty_strided, aten.rand_like, aten.randn_like}
# In-place ops that overwrite their destination without reading it.
_WRITE_ONLY = {aten.copy_, aten.fill_, aten.zero_, aten.uniform_, aten.normal_,
               aten.random_, aten.bernoulli_, aten.exponential_, aten._foreach_copy_,
               aten._foreach_zero_}
# No kernel: allocation, aliasing, metadata.
_FREE = {aten.detach, aten.alias, aten._unsafe_view, aten.empty, aten.empty_strided,
         aten.empty_like, aten.new_empty, aten.new_empty_strided, aten.lift_fresh,
         aten.set_, aten.resize_, aten.sym_size, aten.sym_stride, aten.sym_numel,
         aten.sym_storage_offset, aten.is_same_size, aten._reshape_alias}
_KIND = {
    "gemm": (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.addbmm, aten.mv,
             aten.addmv, aten.dot, aten._scaled_mm),
    "conv": (aten.convolution, aten.convolution_backward),
    "attention": (aten._scaled_dot_product_flash_attention,
                  aten._scaled_dot_product_flash_attention_backward,
                  aten._scaled_dot_product_efficient_attention,
                  aten._scaled_dot_product_efficient_attention_backward),
    "norm": (aten._fused_rms_norm, aten._fused_rms_norm_backward, aten.native_layer_norm,
             aten.native_layer_norm_backward, aten.native_group_norm,
             aten.native_group_norm_backward, aten.native_batch_norm),
    "copy/cast": (aten.copy_, aten.clone, aten._to_copy),
    "fill": (aten.zero_, aten.fill_, aten.zeros, aten.zeros_like, aten.ones, aten.ones_like,
             aten.full, aten.full_like, aten.scalar_tensor, aten.new_zeros, aten.new_ones,
             aten.new_full),
    "reduction": (aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.var,
                  aten.std, aten.var_mean, aten.norm, aten.linalg_vector_norm, aten.argmax,
                  aten.argmin, aten.prod, aten.logsumexp, aten.cumsum),
    "softmax/loss": (aten._log_softmax, aten._log_softmax_backward_data, aten._softmax,
                     aten._softmax_backward_data, aten._safe_softmax, aten.nll_loss_forward,
                     aten.nll_loss_backward),
    "optimizer": (aten._fused_adamw_, aten._fused_adam_),
}
_KIND_OF = {packet: kind for kind, packets in _KIND.items() for packet in packets}


def _tensors(value: Any) -> List[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for t in value if isinstance(t, Tensor)]
    return []


def _arguments(func: Any, args: Sequence[Any], kwargs: Dict[str, Any]
               ) -> Iterator[Tuple[Any, Any]]:
    """(schema argument, value) pairs of a call."""
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            yield arg, args[i]
        elif arg.name in kwargs:
            yield arg, kwargs[arg.name]


def _unique(tensors: Iterable[Tensor]) -> List[Tensor]:
    """A tensor passed twice (x * x, addcmul(a, g, g)) is read once."""
    seen: Dict[int, Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


def _traffic(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Any
             ) -> Tuple[List[Tensor], List[Tensor]]:
    """The tensors an op reads and writes: inputs read (an in-place destination too, unless
    the op only overwrites it), mutated arguments and outputs written."""
    packet = func._overloadpacket
    reads: List[Tensor] = []
    writes: List[Tensor] = []
    for arg, value in _arguments(func, args, kwargs):
        tensors = _tensors(value)
        written = arg.alias_info is not None and arg.alias_info.is_write
        if written:
            writes += tensors
        if packet in _NOT_READ or (written and (packet in _WRITE_ONLY or arg.kwarg_only)):
            continue
        reads += tensors
    mutated = {id(t) for t in writes}
    outs = out if isinstance(out, (list, tuple)) else [out]
    writes += [t for o in outs for t in _tensors(o) if id(t) not in mutated]
    return _unique(reads), _unique(writes)


def is_transposing(src: Tensor, dst_shape: Sequence[int], dst_stride: Sequence[int]) -> bool:
    """Whether copying ``src`` into a destination of this layout walks ``src`` across its
    rows: the destination's unit-stride dimension (of size > 1) has a stride other than 0
    or 1 in the source (a broadcast source's dimensions align from the right)."""
    unit = [d for d, (n, s) in enumerate(zip(dst_shape, dst_stride)) if n > 1 and s == 1]
    if not unit:
        return False
    k = unit[-1] - (len(dst_shape) - src.dim())
    return k >= 0 and src.stride(k) not in (0, 1)


def _contiguous_stride(shape: Sequence[int]) -> Tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _peak(t: Tensor, kind: str) -> str:
    """The peak an op's FLOPs run at: tensor cores in half precision; fp32 on TF32 tensor
    cores only where PyTorch allows it (cuDNN convs by default, cuBLAS not)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return "tensor"
    allowed = (torch.backends.cudnn.allow_tf32 if kind == "conv"
               else torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if t.dtype == torch.float32 and allowed else "fp32"


# In-place ops whose FLOPs are their out-of-place twin's (the FLOP counter lists only those).
_FLOPS_AS = {aten.addmm_: aten.addmm}


def _flops(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> int:
    packet = func._overloadpacket
    formula = flop_registry.get(_FLOPS_AS.get(packet, packet))
    return int(formula(*args, **kwargs, out_val=out)) if formula else 0


def _record(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Any,
            launches: int = 1) -> Record:
    """The default booking: one kernel reading its inputs and writing its outputs."""
    reads, writes = _traffic(func, args, kwargs, out)
    packet = func._overloadpacket
    kind = _KIND_OF.get(packet, "elementwise/glue")
    if kind == "copy/cast":
        src = args[1] if packet is aten.copy_ else args[0]
        dst = args[0] if packet is aten.copy_ else out
        kind = TRANSPOSING if is_transposing(src, dst.shape, dst.stride()) else kind
    flops = _flops(func, args, kwargs, out)
    first = next((t for t in reads if t.is_floating_point()), None)
    return Record(str(packet).replace("aten.", ""), kind, launches, _bytes(reads),
                  _bytes(writes), flops, _peak(first, kind) if flops and first is not None
                  else "fp32")


def _copy(name: str, src: Tensor) -> Record:
    """A hidden ``src.contiguous()``."""
    kind = (TRANSPOSING if is_transposing(src, src.shape, _contiguous_stride(src.shape))
            else "copy/cast")
    return Record(name, kind, 1, _footprint(src), src.numel() * src.element_size())


def _conv_input(name: str, t: Tensor) -> List[Record]:
    """``aten::_convolution`` and ``convolution_backward`` make a 1-d conv's input
    contiguous ("avoid accidentally going through NHWC for permuted 3d input")."""
    return [_copy(name, t)] if t.dim() == 3 and not t.is_contiguous() else []


def _depthwise_kernels(x: Tensor, w: Tensor, groups: int, transposed: bool) -> bool:
    """Whether a conv runs PyTorch's CudaDepthwise2d kernels: depthwise, and not fp16,
    which ``use_cudnn_depthwise`` gives to cuDNN."""
    return (not transposed and groups > 1 and groups == x.shape[1] and w.shape[1] == 1
            and x.dtype != torch.float16)


def _conv(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Tensor
          ) -> List[Record]:
    x, w, bias, _, _, _, transposed, _, groups = args
    records = _conv_input("convolution: input.contiguous()", x)
    flops = conv_flop_count(x.shape, w.shape, out.shape, transposed)
    depthwise = _depthwise_kernels(x, w, groups, transposed)
    name = "conv_depthwise2d_forward" if depthwise else "cudnn_convolution"
    records.append(Record(name, "conv", 1, _bytes([x, w, bias if depthwise else None]),
                          _footprint(out), flops, "fp32" if depthwise else _peak(x, "conv")))
    if bias is not None and not depthwise:
        # cuDNN's path adds the bias afterwards: output.add_(bias).
        records.append(Record("convolution: bias add_", "elementwise/glue", 1,
                              _bytes([out, bias]), _footprint(out)))
    return records


def _conv_backward(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Any
                   ) -> List[Record]:
    dy, x, w, _, _, _, _, transposed, _, groups, mask = args
    dx, dw, db = out
    records = _conv_input("convolution_backward: input.contiguous()", x)
    flops = conv_flop_count(x.shape, w.shape, dy.shape, transposed)
    depthwise = _depthwise_kernels(x, w, groups, transposed)
    peak = "fp32" if depthwise else _peak(x, "conv")
    prefix = "conv_depthwise2d" if depthwise else "cudnn_convolution"
    if mask[0]:
        records.append(Record(f"{prefix}_backward_input", "conv", 1, _bytes([dy, w]),
                              _footprint(dx), flops, peak))
    if mask[1]:
        records.append(Record(f"{prefix}_backward_weight", "conv", 1, _bytes([dy, x]),
                              _footprint(dw), flops, peak))
    if mask[2]:
        # No backend computes the bias grad: grad_output.sum over all but the channels.
        records.append(Record("convolution_backward: bias-grad sum", "reduction", 1,
                              _footprint(dy), _footprint(db)))
    return records


def _cublas_ready(t: Tensor) -> bool:
    """Whether cuBLAS takes a matrix (the last two dims) as it is: row- or column-major
    with a leading dimension at least its width (``prepare_matrix_for_cublas``)."""
    rows, cols = t.shape[-2:]
    s_row, s_col = t.stride()[-2:]
    return ((s_col == 1 or cols == 1) and s_row >= max(1, cols)) or \
           ((s_row == 1 or rows == 1) and s_col >= max(1, rows))


def _gemm(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Tensor
          ) -> List[Record]:
    packet = func._overloadpacket
    mats = args[1:3] if packet in (aten.addmm, aten.addmm_, aten.baddbmm) else args[:2]
    records = [_copy(f"{packet.__name__}: operand.contiguous()", m)
               for m in mats if not _cublas_ready(m)]
    record = _record(func, args, kwargs, out)
    # The GEMM reads the copies, all of their elements.
    record.read += sum(m.numel() * m.element_size() - _footprint(m)
                       for m in mats if not _cublas_ready(m))
    if isinstance(out, Tensor) and not _cublas_ready(out):
        # A result cuBLAS cannot write through (an out= view) is computed in a contiguous
        # clone of it, copied back after.
        records.append(_copy(f"{packet.__name__}: result clone", out))
        records.append(_copy(f"{packet.__name__}: result copy_", out))
    # addmm_ adds into self, which cuBLAS reads as C itself (beta): no copy first.
    if packet is aten.addmm:
        bias, beta = args[0], kwargs.get("beta", 1)
        if not (bias.dim() == 1 and bias.is_contiguous() and beta == 1):
            # Outside cuBLASLt's bias epilogue the bias is first copied into the result.
            records.append(Record("addmm: bias copy_", "copy/cast", 1, _footprint(bias),
                                  _footprint(out)))
    return records + [record]


# multi_tensor_apply (ATen/native/cuda/MultiTensorApply.cuh): tensors per launch by list
# depth, blocks per launch, elements per block.
_MTA_TENSORS = (110, 64, 48, 36, 30)
_MTA_TENSORS_SCALARLIST = (96, 64, 48, 36, 30)
_MTA_BLOCKS = 320
_MTA_CHUNK = 65536


def mta_launches(numels: Sequence[int], max_tensors: int) -> int:
    """Kernels ``multi_tensor_apply`` launches for tensors of these sizes: one whenever the
    blocks or the tensors of a launch are full, and one for the rest."""
    launches = tensors = blocks = 0
    for numel in numels:
        if numel == 0:
            continue
        tensors += 1
        chunks = -(-numel // _MTA_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            if (tensors == max_tensors and chunk == chunks - 1) or blocks == _MTA_BLOCKS:
                launches += 1
                blocks = 0
                tensors = 0 if chunk == chunks - 1 else 1
    return launches + (blocks > 0)


def _foreach_fast_route(func: Any, lists: Sequence[Sequence[Tensor]]) -> bool:
    """Whether CUDA runs a foreach op by ``multi_tensor_apply`` (ATen's ``can_use_fast_route``,
    ForeachUtils.h): every tensor dense, the lists alike in sizes and strides, and one dtype
    for all (``_foreach_copy_``: one per list, so that it can cast). Else it loops over the
    tensors, a kernel each."""
    dense = torch._prims_common.is_non_overlapping_and_dense_or_false
    if not all(dense(t) for ts in lists for t in ts):
        return False
    if any(a.shape != b.shape or a.stride() != b.stride()
           for ts in lists[1:] for a, b in zip(lists[0], ts)):
        return False
    if func._overloadpacket is aten._foreach_copy_:
        return all(len({t.dtype for t in ts}) == 1 for ts in lists)
    return len({t.dtype for ts in lists for t in ts}) == 1


def _foreach(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Any
             ) -> List[Record]:
    lists = [v for a, v in _arguments(func, args, kwargs)
             if isinstance(v, (list, tuple)) and v and isinstance(v[0], Tensor)]
    depth = len(lists) + (1 if out else 0)       # an out-of-place op also writes a list
    scalar_list = any(isinstance(v, (list, tuple)) and v and not isinstance(v[0], Tensor)
                      for _, v in _arguments(func, args, kwargs))
    table = _MTA_TENSORS_SCALARLIST if scalar_list else _MTA_TENSORS
    record = _record(func, args, kwargs, out)
    name = func._overloadpacket.__name__
    record.kind = ("optimizer" if _ACTIVE[-1].phase == "optimizer" else
                   "copy/cast" if name.startswith("_foreach_copy") else
                   "fill" if name.startswith("_foreach_zero") else "elementwise/glue")
    record.launches = (mta_launches([t.numel() for t in lists[0]], table[depth - 1])
                       if _foreach_fast_route(func, lists) else len(lists[0]))
    return [record]


def _fused_adam(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Any
                ) -> List[Record]:
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = args[:6]
    amsgrad = kwargs["amsgrad"]
    state = [*exp_avgs, *exp_avg_sqs, *(max_exp_avg_sqs if amsgrad else [])]
    depth = 5 if amsgrad else 4
    return [Record(func._overloadpacket.__name__, "optimizer",
                   mta_launches([p.numel() for p in params], _MTA_TENSORS[depth - 1]),
                   _bytes([*params, *grads, *state, *steps]), _bytes([*params, *state]))]


def _norm_backward(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Any
                   ) -> List[Record]:
    # A grad-input kernel and a two-stage grad-weight reduction, each reading dy and x.
    record = _record(func, args, kwargs, out, launches=3)
    record.read += _bytes(args[:2])
    return [record]


def _nll_loss_backward(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Tensor
                       ) -> List[Record]:
    # grad_input.zero_(), then a kernel that writes one element per row.
    return [Record("nll_loss_backward: zero_", "fill", 1, 0, _footprint(out)),
            _record(func, args, kwargs, out)]


def _flash_backward(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Any
                    ) -> List[Record]:
    # dot(dO, O) preprocessing, the main kernel, and dq's conversion from its fp32
    # accumulator (batch, tokens, heads, head dim), written and read once.
    record = _record(func, args, kwargs, out, launches=3)
    dq_accum = 4 * out[0].numel()
    record.read += dq_accum
    record.written += dq_accum
    record.scratch = 2 * dq_accum
    return [record]


def _cat(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Tensor
         ) -> List[Record]:
    # One batched kernel for up to 128 contiguous inputs of one dtype, else a copy each.
    parts = [t for t in args[0] if t.numel()]
    batched = all(t.is_contiguous() and t.dtype == out.dtype for t in parts)
    return [_record(func, args, kwargs, out,
                    launches=-(-len(parts) // 128) if batched else len(parts))]


Rule = Callable[[Any, Sequence[Any], Dict[str, Any], Any], List[Record]]
_RULES: Dict[Any, Rule] = {
    aten.convolution: _conv, aten.convolution_backward: _conv_backward,
    aten.mm: _gemm, aten.addmm: _gemm, aten.addmm_: _gemm, aten.bmm: _gemm, aten.baddbmm: _gemm,
    aten._fused_adamw_: _fused_adam, aten._fused_adam_: _fused_adam,
    aten._fused_rms_norm_backward: _norm_backward,
    aten.native_layer_norm_backward: _norm_backward,
    aten.nll_loss_backward: _nll_loss_backward,
    aten._scaled_dot_product_flash_attention_backward: _flash_backward,
    aten.cat: _cat,
}


def _free(func: Any, args: Sequence[Any], kwargs: Dict[str, Any], out: Any) -> bool:
    """No kernel: views, allocations, metadata, profiler ranges, and host-side work (the
    step counts of a non-capturable foreach AdamW live on the CPU)."""
    if func.is_view or func._overloadpacket in _FREE or func.namespace in ("prim", "profiler"):
        return True
    tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, Tensor)]
    return all(t.device.type == "cpu" for t in tensors)


def _decomposes_on_cuda(func: Any) -> bool:
    """Whether CUDA runs an op as its composite decomposition (no CUDA kernel of its own)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return (func.namespace == "aten" and has(func.name(), "CompositeImplicitAutograd")
            and not has(func.name(), "CUDA"))


class _BookingMode(TorchDispatchMode):
    """Books every aten op into the active ledger; runs Python custom ops' bodies so that
    what they run is booked too."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Tuple[Any, ...] = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        opdef = (torch._library.custom_ops._maybe_get_opdef(func)
                 if func.namespace not in ("aten", "prim", "prims", "profiler") else None)
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **kwargs)
        if _decomposes_on_cuda(func):
            # Reached below autograd (inside a custom op); on CUDA it decomposes there, by
            # ATen's C++ kernel: Python's decompositions can differ (``decompose`` prefers
            # them), as matmul's: a bmm where ATen folds a strided (B, L, R) view into an mm.
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeImplicitAutograd, *args,
                                   **kwargs)
        out = func(*args, **kwargs)
        if _free(func, args, kwargs, out):
            return out
        if func.namespace != "aten":
            raise RuntimeError(f"{func} runs no Python body the ledger could book: add a rule")
        packet = func._overloadpacket
        rule = _RULES.get(packet)
        if rule is None and packet.__name__.startswith(("_foreach_", "_amp_foreach_")):
            rule = _foreach
        records = rule(func, args, kwargs, out) if rule else [_record(func, args, kwargs, out)]
        for record in records:
            _ACTIVE[-1].add(record)
        return out


# --------------------------------------------------------------------------- CUDA stand-ins


@contextlib.contextmanager
def cuda_autocast(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """``torch.autocast("cuda", dtype)``, which disables itself where no GPU is visible: the
    same state set directly (the cast cache cleared on leaving the outermost region)."""
    if dtype is None:
        yield
        return
    prev = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            torch.is_autocast_cache_enabled())
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    torch.set_autocast_cache_enabled(True)
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])
        torch.set_autocast_cache_enabled(prev[2])


class _CudaAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as an H100 runs it: the flash kernel for fp16/bf16
    without a mask (head dim <= 256), the memory-efficient one otherwise. Without a GPU,
    PyTorch's choice cannot read the device and falls back to the math path."""

    def __torch_function__(self, func: Any, types: Any, args: Tuple[Any, ...] = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return _attention(*args, **kwargs)


def _attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
               dropout_p: float = 0.0, is_causal: bool = False,
               scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    if torch.is_autocast_enabled("cuda"):   # SDPA is on autocast's lower-precision list
        low = torch.get_autocast_dtype("cuda")
        q, k, v = (t.to(low) if t.dtype == torch.float32 else t for t in (q, k, v))
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal,
                                                        scale=scale)[0]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, grad, dropout_p,
                                                        is_causal, scale=scale)[0]


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


_SET_MATERIALIZE_GRADS = torch.autograd.function.FunctionCtx.set_materialize_grads


def _remember_materialize_grads(ctx: Any, value: bool) -> None:
    """``ctx.set_materialize_grads``, the value also kept where ``run_backward`` reads it:
    the flag it sets on the node cannot be read back."""
    ctx._ledger_materialize_grads = value
    _SET_MATERIALIZE_GRADS(ctx, value)


@contextlib.contextmanager
def recording(ledger: Ledger) -> Iterator[None]:
    """Book what runs inside into ``ledger``: aten ops, Python custom ops' bodies, Triton
    launches (which do not run); SDPA and the scan's kernel module chosen as on an H100."""
    import triton.runtime.jit
    stack = contextlib.ExitStack()
    stack.enter_context(_patched(triton.runtime.jit.KernelInterface, "__getitem__",
                                 _intercepted_launch))
    stack.enter_context(_patched(torch.autograd.function.FunctionCtx, "set_materialize_grads",
                                 _remember_materialize_grads))
    selective_scan = sys.modules.get("selective_scan")
    if selective_scan is not None and not torch.cuda.is_available():
        # Its choice reads the device's compute capability; the plain Triton kernels are
        # what a GPU runs unless MAMBAR_TRITON_GLUON=1.
        stack.enter_context(_patched(selective_scan, "_triton_kernels_module",
                                     lambda device: ".triton_kernels"))
    if not torch.cuda.is_available():
        import fused_norm
        # Its backward's grid reads the device's SM count: an H100 SXM's and an H200's.
        stack.enter_context(_patched(fused_norm, "_sm_count", lambda device_index: 132))
    _ACTIVE.append(ledger)
    try:
        with stack, _CudaAttention(), _BookingMode():
            yield
    finally:
        _ACTIVE.remove(ledger)


# --------------------------------------------------------------------------- the backward


def _python_node_outputs(node: Any, grads: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """A custom ``autograd.Function``'s backward, its gradients matched to its tensor
    inputs (``next_functions``): gradients of non-tensor inputs must be None, and which
    inputs were not tensors must follow from ``needs_input_grad`` and the counts."""
    metadata = node._input_metadata
    # The engine fills missing gradients with zeros unless ctx.set_materialize_grads(False).
    if getattr(node, "_ledger_materialize_grads", True):
        grads = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
                 for g, m in zip(grads, metadata)]
    outs = node.apply(*grads)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    n_tensors = len(node.next_functions)
    if len(outs) == n_tensors:
        return outs
    unsure = [i for i, (g, need) in enumerate(zip(outs, node.needs_input_grad))
              if g is None and not need]
    if len(unsure) != len(outs) - n_tensors:
        raise RuntimeError(f"{node.name()}: cannot tell which of its inputs were tensors")
    return [g for i, g in enumerate(outs) if i not in unsure]


def _dense(t: Tensor) -> bool:
    """Whether ``t`` fills its memory without gaps or overlaps, in any dimension order."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _accumulate(variable: Tensor, grad: Tensor, shared: bool) -> None:
    """``AccumulateGrad``: the gradient is stolen when nothing else holds it (``shared``:
    another node's input does) and its layout matches the parameter's, copied into the
    parameter's layout otherwise, added in place to an existing one."""
    if variable.grad is not None:
        variable.grad.add_(grad)
        return
    matches = all((s != 0 if n == 1 else s == vs) for n, s, vs in
                  zip(grad.shape, grad.stride(), variable.stride()))
    if shared or not matches:
        dense = _dense(variable)
        grad = (grad.new_empty_strided(variable.shape, variable.stride()).copy_(grad) if dense
                else grad.clone(memory_format=torch.contiguous_format))
    variable.grad = grad.detach()


@torch.no_grad()
def run_backward(loss: Tensor) -> None:
    """``loss.backward()`` run node by node from Python. The C++ engine stashes the current
    CUDA streams of any graph with CUDA nodes and the driver call fails without a GPU, fake
    tensors or not. Same work as ``Engine::execute`` without ``create_graph``: grad mode
    off (some formulas pick their kernels by it), nodes in its order (latest created first),
    gradients for one input summed, cast or summed to the shape the next node expects,
    parameters' gradients set by ``AccumulateGrad``'s rules. Hooks do not run."""
    order = itertools.count()
    root = loss.grad_fn
    deps: Dict[Any, int] = {}
    seen, stack = {root}, [root]
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is not None:
                deps[child] = deps.get(child, 0) + 1
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    seed = torch.ones_like(loss)
    buffers: Dict[Any, List[Optional[Tensor]]] = {root: [seed]}
    held = {id(seed): 1}               # how many input buffers hold each gradient tensor
    ready = [(-root._sequence_nr(), next(order), root)]
    while ready:
        node = heapq.heappop(ready)[2]
        grads = buffers.pop(node)
        for grad in grads:
            if grad is not None:
                held[id(grad)] -= 1
        if type(node).__name__ == "AccumulateGrad":
            _accumulate(node.variable, grads[0], held.get(id(grads[0]), 0) > 0)
            continue
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            outs = _python_node_outputs(node, grads)
        else:
            outs = node(*grads)
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        for (child, slot), grad in zip(node.next_functions, outs):
            if child is None:
                continue
            if grad is not None:
                want = child._input_metadata[slot]
                if tuple(grad.shape) != tuple(want.shape):
                    grad = grad.sum_to_size(want.shape)
                if grad.dtype != want.dtype:
                    grad = grad.to(want.dtype)
                buffer = buffers.setdefault(child, [None] * len(child._input_metadata))
                if buffer[slot] is not None:
                    held[id(buffer[slot])] -= 1
                    grad = buffer[slot] + grad
                buffer[slot] = grad
                held[id(grad)] = held.get(id(grad), 0) + 1
            deps[child] -= 1
            if deps[child] == 0:
                buffers.setdefault(child, [None] * len(child._input_metadata))
                heapq.heappush(ready, (-child._sequence_nr(), next(order), child))


# --------------------------------------------------------------------------- one step

DTYPES: Dict[str, Optional[torch.dtype]] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(name: str, img_size: int, backend: str) -> nn.Module:
    """``benchmark.build_model``'s model on the meta device (timm's init runs host-side
    code that fake tensors refuse); DeiT with fused attention."""
    import timm
    import models_mambar  # noqa: F401  (registers the mambar_* models)
    import models_vim  # noqa: F401  (registers the vim_* baselines)
    kwargs: Dict[str, Any] = dict(pretrained=False, num_classes=1000, img_size=img_size)
    if name.startswith(("mambar_", "vim_")):
        kwargs["scan_backend"] = backend
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model


def to_fake_cuda(module: nn.Module) -> nn.Module:
    """``module`` with fake CUDA parameters and buffers of the same shapes and strides.
    Call inside a ``FakeTensorMode``."""
    return module._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                       device="cuda"))


def _grad_scaler(dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """``GradScaler("cuda")``, enabled under fp16 as in training although no GPU is
    visible (it turns itself off then)."""
    common = torch.cuda.amp.common
    with _patched(common, "amp_definitely_not_available", lambda: False):
        return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def train_step(model: nn.Module, x: Tensor, y: Tensor, dtype: Optional[torch.dtype],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               ledger: Ledger) -> None:
    """``benchmark.make_train_step``'s step, each phase booked under its name."""
    ledger.phase = "forward"
    with cuda_autocast(dtype):
        loss = F.cross_entropy(model(x), y)
    ledger.phase = "backward"
    run_backward(scaler.scale(loss))
    ledger.phase = "optimizer"
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def measure(model_name: str, batch: int, img_size: int = 224, dtype: str = "bf16",
            backend: str = "triton", adamw: str = "fused") -> Ledger:
    """The ledger of one training step of ``model_name`` on fake CUDA tensors. AdamW is
    ``fused`` as ``main.py`` builds it, or ``foreach`` (PyTorch's default on CUDA, which
    ``benchmark.make_train_step`` gets); its state comes from a first, unbooked step."""
    amp_dtype = DTYPES[dtype]
    ledger = Ledger()
    model = build_model(model_name, img_size, backend).train()
    with FakeTensorMode():
        to_fake_cuda(model)
        x = torch.empty(batch, 3, img_size, img_size, device="cuda")
        y = torch.zeros(batch, dtype=torch.long, device="cuda")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                      **{adamw: True})
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scaler = _grad_scaler(amp_dtype)
        with recording(ledger):
            train_step(model, x, y, amp_dtype, optimizer, scaler, ledger)
    return ledger


# --------------------------------------------------------------------------- report

# Targets for Mamba®-B, batch 128, 224 px, bf16: (name, where in the summary, limit).
TARGETS = (("launches", "total", 1000),
           ("transposing-copy launches", TRANSPOSING, 0),
           ("HBM GB outside the scan", "outside_scan", 130),
           ("H200 roofline ms outside the scan", "outside_scan", 35))


def _row(totals: Optional[Dict[str, float]]) -> List[str]:
    if totals is None:
        return [""] * 6
    return [f"{totals['launches']:,.0f}", f"{totals['read_bytes'] / 1e9:.1f}",
            f"{totals['written_bytes'] / 1e9:.1f}", f"{totals['flops'] / 1e9:,.0f}",
            f"{totals['H100_ms']:.1f}", f"{totals['H200_ms']:.1f}"]


def format_table(runs: Sequence[Tuple[str, Dict[str, Any]]]) -> str:
    """Per op kind (scan apart), then outside the scan, the scan and the total; one block
    of columns per run."""
    heads = ["launches", "GB read", "GB written", "GFLOP", "H100 ms", "H200 ms"]
    found = {k for _, s in runs for k in s["by_kind"]} - {SCAN}
    kinds = [k for k in KINDS if k in found] + sorted(found - set(KINDS))
    rows = [[kind] + sum((_row(s["by_kind"].get(kind)) for _, s in runs), [])
            for kind in kinds]
    rows.append(["outside the scan"] + sum((_row(s["outside_scan"]) for _, s in runs), []))
    rows.append(["scan"] + sum((_row(s["scan"] if s["scan"]["launches"] else None)
                                for _, s in runs), []))
    rows.append(["total"] + sum((_row(s["total"]) for _, s in runs), []))
    header = ["op kind"] + heads * len(runs)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    blocks = [sum(widths[1 + 6 * i:7 + 6 * i]) + 2 * 5 for i in range(len(runs))]
    title = "  ".join([" " * widths[0]] + [name.center(w) for (name, _), w in zip(runs, blocks)])
    lines = [title.rstrip(), "  ".join([header[0].ljust(widths[0])] +
                                      [h.rjust(w) for h, w in zip(header[1:], widths[1:])])]
    for row in rows:
        lines.append("  ".join([row[0].ljust(widths[0])] +
                               [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
    return "\n".join(lines)


def check_targets(summary: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The Mamba®-B targets, each with its value from ``summary``."""
    out = []
    for name, where, limit in TARGETS:
        totals = summary.get(where) or summary["by_kind"].get(where)
        if totals is None:
            value = 0.0
        elif "GB" in name:
            value = (totals["read_bytes"] + totals["written_bytes"]) / 1e9
        elif "ms" in name:
            value = totals["H200_ms"]
        else:
            value = totals["launches"]
        out.append({"target": name, "value": value, "limit": limit, "met": value <= limit})
    return out


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mambar_base_patch16_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16",
                        help="autocast dtype over fp32 weights, or fp32")
    parser.add_argument("--backend", default="triton", help="scan backend of Mamba models")
    parser.add_argument("--adamw", choices=("fused", "foreach"), default="fused",
                        help="fused as main.py and benchmark.make_train_step build it, or "
                             "foreach (PyTorch's default)")
    parser.add_argument("--reference", help="a second model (e.g. deit_base_patch16_224) "
                                            "booked the same way and printed beside")
    parser.add_argument("--ops", type=int, default=0, metavar="N",
                        help="also list the N ops with the most H200 roofline time")
    parser.add_argument("--json", help="write the summaries here")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    runs = []
    for name in [args.model] + ([args.reference] if args.reference else []):
        start = time.perf_counter()
        ledger = measure(name, args.batch, args.input_size, args.dtype, args.backend,
                         args.adamw)
        summary = ledger.summary()
        summary["seconds"] = time.perf_counter() - start
        runs.append((name, summary))
        print(f"{name}: {len(ledger.records):,} bookings in {summary['seconds']:.1f} s",
              file=sys.stderr)
    triton_kernels = sys.modules.get("selective_scan.triton_kernels")
    if triton_kernels is not None and triton_kernels._INTERPRET:
        print("warning: TRITON_INTERPRET=1: the scan backward's scratch follows the "
              "interpreter's single config, not the GPU's", file=sys.stderr)
    print(f"One training step, batch {args.batch}, {args.input_size} px, {args.dtype}, "
          f"{args.adamw} AdamW. Roofline per kernel: max(bytes / HBM, FLOPs / peak); HBM "
          f"3.35 TB/s (H100 SXM), 4.8 TB/s (H200); peaks 989.4 TFLOP/s bf16/fp16 dense, "
          f"494.7 TF32, 66.9 fp32 (both)\n")
    print(format_table(runs))
    for name, summary in runs:
        if args.ops:
            ops = sorted(summary["by_op"].items(), key=lambda kv: -kv[1]["H200_ms"])
            print(f"\n{name}: top {args.ops} ops by H200 roofline ms")
            for op, totals in ops[:args.ops]:
                print(f"  {op:<46}" + "".join(c.rjust(w) for c, w in
                                              zip(_row(totals), (10, 9, 12, 8, 9, 9))))
    model, summary = runs[0]
    targets = check_targets(summary) if model.startswith("mambar_base") else []
    for t in targets:
        print(f"target {t['target']}: {t['value']:,.1f} (<= {t['limit']:,}) "
              f"{'met' if t['met'] else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "runs": dict(runs), "targets": targets}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
