"""Gluon kernels on the CPU, through Triton's interpreter.

Triton's interpreter (TRITON_INTERPRET=1) runs plain-Triton kernels as NumPy code, one program
after another, each operation on whole blocks; it never wraps a Gluon function. What a Gluon
kernel adds to plain Triton is where data lives: register layouts, layout conversions, shared
memory and the barriers between its writers and readers. None of it changes what a program
computes, only how its threads share the work, so a Gluon kernel's numbers can be checked by
running its body with those operations given their logical meaning:

* a layout argument is dropped, and ``convert_layout`` returns its input;
* shared memory is a NumPy array per allocation; indexing, slicing, permuting and
  reinterpreting it give views (reinterpreting keeps the element order: the kernels here use
  row-major shared layouts only);
* a barrier does nothing: a program runs as one sequence of whole-block operations, so every
  write is seen by every later read;
* inline PTX is looked up by its text in ``_ASM``, which says what it computes (within the
  instruction's stated error).

What this cannot check, and only a GPU can: a missing barrier (a race), and anything that
depends on how a layout splits a tensor between threads (it compiles or not: see
scripts/kernel_stats.py, which compiles every candidate for sm_90a).

``interpreted(module, {"_scan_fwd": config, ...})`` replaces the module's autotuned kernels by
this interpreter for the duration of a ``with`` block, each with one autotuning candidate.
"""
from __future__ import annotations

import contextlib
import functools
import types

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as interp
from triton.runtime.jit import ConstexprFunction
from triton.experimental.gluon._runtime import GluonJITFunction


def _value(x):
    return x.value if isinstance(x, tl.constexpr) else x


def _index(i) -> int:
    return int(_value(i))


class SharedMemory:
    """A shared-memory descriptor: a view of the allocation's NumPy array."""

    def __init__(self, array: np.ndarray, dtype):
        self.array, self.dtype = array, dtype

    def index(self, i):
        return SharedMemory(self.array[_index(i)], self.dtype)

    def slice(self, start, length, dim=0):
        start, length, dim = _index(start), _index(length), _index(dim)
        window = [slice(None)] * self.array.ndim
        window[dim] = slice(start, start + length)
        return SharedMemory(self.array[tuple(window)], self.dtype)

    def permute(self, order):
        return SharedMemory(self.array.transpose([_index(i) for i in order]), self.dtype)

    def _reinterpret(self, dtype, shape, layout):
        assert _value(dtype) == self.dtype, "only same-dtype reinterpretation is modelled"
        shape = [_index(s) for s in shape]
        return SharedMemory(self.array.reshape(shape), self.dtype)

    def load(self, layout=None):
        data = self.array.copy()
        return tl.core.tensor(interp.TensorHandle(data, self.dtype),
                              tl.block_type(self.dtype, list(data.shape)))

    def store(self, value):
        data = value.handle.data
        if data.shape != self.array.shape:
            raise ValueError(f"shared-memory store of shape {data.shape} into "
                             f"{self.array.shape}")
        self.array[...] = data


# Inline PTX the kernels use, by its text: what each instruction computes, in NumPy.
_ASM = {"rcp.approx.ftz.f32 $0, $1;": lambda x: np.float32(1) / x}


class _Language(types.SimpleNamespace):
    """``gl`` inside an interpreted kernel: plain Triton's (interpreter-patched) operations,
    looked up at call time, with Gluon's layout and shared-memory operations given their
    logical meaning."""

    def __init__(self, num_warps: int):
        super().__init__()
        self._num_warps = num_warps

    def __getattr__(self, name):
        value = getattr(tl, name)
        # tl's own jit functions (sum, cdiv, ...): their rewritten bodies, called directly, as
        # for the kernel's helpers (see _DeviceFunction).
        return value.rewrite() if isinstance(value, interp.InterpretedFunction) else value

    def num_warps(self):
        return tl.constexpr(self._num_warps)

    @staticmethod
    def arange(start, end, layout=None):
        return tl.arange(start, end)

    @staticmethod
    def zeros(shape, dtype, layout=None):
        return tl.zeros(shape, dtype)

    @staticmethod
    def convert_layout(value, layout, assert_trivial=False):
        return value

    @staticmethod
    def allocate_shared_memory(element_ty, shape, layout):
        dtype = _value(element_ty)
        return SharedMemory(np.zeros([_index(s) for s in shape],
                                     dtype=interp._get_np_dtype(dtype)), dtype)

    @staticmethod
    def inline_asm_elementwise(asm, constraints, args, dtype, is_pure, pack):
        if asm not in _ASM:
            raise NotImplementedError(f"no NumPy meaning for the inline PTX {asm!r}")
        dtype = _value(dtype)
        with np.errstate(divide="ignore", over="ignore"):
            data = _ASM[asm](*(a.handle.data for a in args)).astype(
                interp._get_np_dtype(dtype))
        return tl.core.tensor(interp.TensorHandle(data, dtype), args[0].type.with_element_ty(
            dtype) if args[0].type.is_block() else dtype)

    @staticmethod
    def barrier():
        pass

    thread_barrier = barrier

    @staticmethod
    def _layout(*args, **kwargs):
        return None

    BlockedLayout = SliceLayout = SwizzledSharedLayout = _layout


def _clone(fn, globals_):
    """``fn`` with ``globals_`` as its module namespace (the interpreter rewrites and runs
    functions in their globals, which must see the interpreted ``gl`` and helpers)."""
    clone = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__,
                               fn.__closure__)
    clone.__kwdefaults__, clone.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    clone.__module__ = fn.__module__
    return clone


class _InterpretedFunction(interp.InterpretedFunction):
    """The interpreter recognises constexpr parameters by their annotation, spelled as plain
    Triton spells it (``tl.constexpr``); Gluon's ``gl.constexpr`` is the same class."""

    def rewrite(self):
        fn = super().rewrite()
        fn.__annotations__ = {name: tl.constexpr if "constexpr" in str(kind) else kind
                              for name, kind in fn.__annotations__.items()}
        return fn


class _DeviceFunction:
    """A Gluon helper called from an interpreted kernel: its rewritten body, called directly
    (the kernel's launch has already patched ``tl`` for the interpreter; the interpreter's own
    device-function call would patch it again on every call, most of the run time)."""

    def __init__(self, fn):
        self.fn = _InterpretedFunction(fn).rewrite()

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _namespace(module, num_warps: int) -> tuple[dict, dict]:
    """A copy of ``module``'s globals in which ``gl``, its barrier and every Gluon function
    are interpreted; and the Gluon functions' clones that live in it, by name."""
    gl = _Language(num_warps)
    barriers = [getattr(module.gl, name) for name in ("barrier", "thread_barrier")
                if hasattr(module.gl, name)]
    namespace = dict(vars(module), tl=tl)  # the interpreter patches the tl it finds there
    clones = {}
    for name, value in vars(module).items():
        if isinstance(value, GluonJITFunction):
            clones[name] = _clone(value.fn, namespace)
            namespace[name] = _DeviceFunction(clones[name])
        elif isinstance(value, ConstexprFunction):
            namespace[name] = functools.partial(_constexpr_call, value.fn)
        elif value is module.gl:
            namespace[name] = gl
        elif any(value is barrier for barrier in barriers):
            namespace[name] = gl.barrier
    return namespace, clones


def _constexpr_call(fn, *args):
    return fn(*map(_value, args))


class InterpretedTuner:
    """Stands in for a ``triton.autotune`` object: ``tuner[grid](*args, **kwargs)`` runs its
    kernel under the interpreter with one candidate."""

    def __init__(self, module, tuner, config):
        self.module, self.name, self.config = module, tuner.fn.fn.__name__, config
        self.configs = [config]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _, clones = _namespace(self.module, self.config.num_warps)
            kernel = _InterpretedFunction(clones[self.name])
            kwargs = {**kwargs, **self.config.kwargs}
            meta = {**dict(zip(kernel.arg_names, args)), **kwargs,
                    "num_warps": self.config.num_warps}
            kernel.run(*args, grid=grid(meta) if callable(grid) else grid, warmup=False,
                       **kwargs)
        return launch


@contextlib.contextmanager
def interpreted(module, configs: dict):
    """Within the block, ``module``'s autotuned kernels named in ``configs`` run under the
    interpreter, each with the given ``triton.Config``."""
    saved = {name: getattr(module, name) for name in configs}
    try:
        for name, config in configs.items():
            setattr(module, name, InterpretedTuner(module, saved[name], config))
        yield
    finally:
        for name, tuner in saved.items():
            setattr(module, name, tuner)
