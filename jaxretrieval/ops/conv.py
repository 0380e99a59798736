"""The convolution of the seed CNN: oneDNN inside the compiled program on CPU, XLA elsewhere.

XLA runs a CPU convolution on one thread; oneDNN's kernels use every core.
`conv_general_dilated` has `jax.lax.conv_general_dilated`'s signature (Flax's `nn.Conv`
takes it as `conv_general_dilated=`) and sends the convolutions oneDNN handles (float32,
NHWC/HWIO, stride 1, no dilation, one group) to three XLA FFI custom calls, forward and
both gradients (`onednn_conv.cc`), tied together with a custom VJP; `conv_relu_pool` is a
fourth, the seed CNN's whole block when evaluated. Where the channels come in multiples
of 16 they use oneDNN's Winograd convolution. Anything else, any other platform, or a
machine without oneDNN uses XLA's own convolution, the same math (tests/test_conv.py
checks values and gradients against it).

The library is compiled on first use with the system C++ compiler against oneDNN 2.x
(Debian/Ubuntu: `apt install g++ libdnnl-dev`) and cached under
`~/.cache/jaxretrieval/ops/`. `JAXRETRIEVAL_CPU_CONV=xla` turns it off; `=onednn` makes a
failed build an error instead of a fallback.
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxretrieval.errors import JaxRetrievalError

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
MODE_VARIABLE = "JAXRETRIEVAL_CPU_CONV"
MODES = ("auto", "onednn", "xla")
WINOGRAD_VARIABLE = "JAXRETRIEVAL_CPU_WINOGRAD"
TARGETS = {"forward": "JrConvForward", "backward_data": "JrConvBackwardData",
           "backward_weights": "JrConvBackwardWeights", "relu_pool": "JrConvReluPool"}
NHWC = ("NHWC", "HWIO", "NHWC")


def _mode() -> str:
    mode = os.environ.get(MODE_VARIABLE, "auto").lower()
    if mode not in MODES:
        raise JaxRetrievalError(f"{MODE_VARIABLE}={mode!r}; use one of {', '.join(MODES)}")
    return mode


def _winograd() -> bool:
    """Whether the custom calls may use oneDNN's Winograd convolution where it applies (on
    by default; `JAXRETRIEVAL_CPU_WINOGRAD=0` keeps the direct one, which rounds
    differently: both are tested against XLA's convolution)."""
    value = os.environ.get(WINOGRAD_VARIABLE, "1")
    if value not in ("0", "1"):
        raise JaxRetrievalError(f"{WINOGRAD_VARIABLE}={value!r}; use 1 (on) or 0 (off)")
    return value == "1"


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(base, "jaxretrieval", "ops")


def _build(library: str) -> None:
    """Compiles onednn_conv.cc into `library` (atomically: a half-written file never loads)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise OSError("no C++ compiler (install g++)")
    os.makedirs(os.path.dirname(library), exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(library), suffix=".so.tmp")
    os.close(fd)
    command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
               f"-I{jax.ffi.include_dir()}", SOURCE, "-ldnnl", "-o", partial]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        os.unlink(partial)
        raise OSError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    os.replace(partial, library)


@functools.cache
def onednn_available() -> bool:
    """Builds (once per source and JAX version), loads and registers the custom calls."""
    mode = _mode()
    if mode == "xla":
        return False
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + jax.__version__.encode()).hexdigest()[:16]
    library = os.path.join(_cache_dir(), f"onednn_conv-{digest}.so")
    try:
        if not os.path.isfile(library):
            _build(library)
        handle = ctypes.cdll.LoadLibrary(library)
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(f"jaxretrieval_conv_{name}",
                                        jax.ffi.pycapsule(getattr(handle, symbol)),
                                        platform="cpu")
    except (OSError, AttributeError) as err:
        if mode == "onednn":
            raise JaxRetrievalError(
                f"{MODE_VARIABLE}=onednn, but the oneDNN convolution could not be built or "
                f"loaded ({err}); install g++ and libdnnl-dev (oneDNN 2.x), or unset "
                f"{MODE_VARIABLE} to fall back to XLA's convolution") from err
        logger.info("oneDNN convolution unavailable (%s); using XLA's", err)
        return False
    return True


def _explicit_padding(padding, kernel_hw):
    if isinstance(padding, str):
        if padding == "VALID":
            return ((0, 0), (0, 0))
        if padding == "SAME":  # stride 1: the output keeps the input's size
            return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_hw)
        return None
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _threads_per_device() -> int:
    """The cores each local CPU device's convolutions may use: all of them for one device,
    one each when there is a device per core (the command line's default)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // len(jax.local_devices(backend="cpu")))


def _varying(x) -> frozenset:
    """The shard_map axes `x` varies over (none outside shard_map, or under pmap)."""
    return jax.typeof(x).manual_axis_type.varying


def _custom_call(name, result_shape, *operands, padding):
    (top, bottom), (left, right) = padding
    # Inside shard_map, give every operand, and so the result, the axes any varies over.
    axes = frozenset().union(*map(_varying, operands))
    operands = [jax.lax.pcast(x, tuple(sorted(axes - _varying(x))), to="varying")
                for x in operands]
    if axes:
        operand = jax.typeof(operands[0])
        result = jax.ShapeDtypeStruct(result_shape, jnp.float32, sharding=operand.sharding,
                                      manual_axis_type=operand.manual_axis_type)
    else:
        result = jax.ShapeDtypeStruct(result_shape, jnp.float32)
    return jax.ffi.ffi_call(f"jaxretrieval_conv_{name}", result)(
        *operands, pad_top=np.int64(top), pad_bottom=np.int64(bottom), pad_left=np.int64(left),
        pad_right=np.int64(right), threads=np.int64(_threads_per_device()),
        winograd=_winograd())


def _cotangent_like(cotangent, primal):
    """A cotangent varying over axes its primal does not is summed over them (as JAX's
    own transpose of a broadcast to varying does)."""
    extra = tuple(sorted(_varying(cotangent) - _varying(primal)))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def onednn_conv(x, kernel, padding):
    """float32 x [N,H,W,C] * kernel [KH,KW,C,O], stride 1, explicit ((top, bottom),
    (left, right)) padding -> [N,OH,OW,O], by oneDNN."""
    return _forward(x, kernel, padding)


def _forward(x, kernel, padding):
    (top, bottom), (left, right) = padding
    out_h = x.shape[1] + top + bottom - kernel.shape[0] + 1
    out_w = x.shape[2] + left + right - kernel.shape[1] + 1
    return _custom_call("forward", (x.shape[0], out_h, out_w, kernel.shape[3]), x, kernel,
                        padding=padding)


def _onednn_conv_fwd(x, kernel, padding):
    return _forward(x, kernel, padding), (x, kernel)


def _onednn_conv_bwd(padding, residuals, grad):
    x, kernel = residuals
    grad = grad.astype(jnp.float32)
    dx = _custom_call("backward_data", x.shape, grad, kernel, padding=padding)
    dkernel = _custom_call("backward_weights", kernel.shape, x, grad, padding=padding)
    return _cotangent_like(dx, x), _cotangent_like(dkernel, kernel)


onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def _onednn_applies(lhs, rhs, explicit_padding) -> bool:
    """float32 operands on CPU, with oneDNN built and not switched off."""
    return (explicit_padding is not None and lhs.dtype == rhs.dtype == jnp.float32
            and jax.default_backend() == "cpu" and onednn_available())


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """`jax.lax.conv_general_dilated`, through oneDNN on CPU where it applies."""
    explicit = _explicit_padding(padding, rhs.shape[:2]) if rhs.ndim == 4 else None
    unit = lambda values: values is None or all(v == 1 for v in values)
    if (dimension_numbers in (NHWC, jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1),
                                                                 (0, 3, 1, 2)))
            and all(s == 1 for s in window_strides) and unit(lhs_dilation)
            and unit(rhs_dilation) and feature_group_count == batch_group_count == 1
            and preferred_element_type in (None, jnp.float32)
            and _onednn_applies(lhs, rhs, explicit)):
        return onednn_conv(lhs, rhs, explicit)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)


def conv_relu_pool(x, kernel, bias, padding, pool):
    """`pool(relu(conv(x, kernel) + bias))`, NHWC/HWIO, stride 1, for `pool` a 2x2 max-pool
    with stride 2 that drops an odd last row or column (the seed CNN's block).

    Evaluated, it is one oneDNN call on CPU that never materialises the pre-pool
    activations (`JrConvReluPool`); differentiated, or anywhere oneDNN does not apply, it
    is the same composition of `conv_general_dilated`, XLA's ReLU and `pool`, whose
    gradient it takes.
    """
    explicit = _explicit_padding(padding, kernel.shape[:2])
    if not (_onednn_applies(x, kernel, explicit) and bias.dtype == jnp.float32):
        return _conv_relu_pool_unfused(x, kernel, bias, padding, pool)
    return _conv_relu_pool_fused(x, kernel, bias, explicit, pool)


def _conv_relu_pool_unfused(x, kernel, bias, padding, pool):
    y = conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=NHWC)
    return pool(jax.nn.relu(y + bias))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_relu_pool_fused(x, kernel, bias, padding, pool):
    (top, bottom), (left, right) = padding
    out_h = (x.shape[1] + top + bottom - kernel.shape[0] + 1) // 2
    out_w = (x.shape[2] + left + right - kernel.shape[1] + 1) // 2
    return _custom_call("relu_pool", (x.shape[0], out_h, out_w, kernel.shape[3]), x, kernel,
                        bias, padding=padding)


def _conv_relu_pool_fused_fwd(x, kernel, bias, padding, pool):
    # The output and the backward function of the unfused composition.
    return jax.vjp(lambda *operands: _conv_relu_pool_unfused(*operands, padding, pool),
                   x, kernel, bias)


_conv_relu_pool_fused.defvjp(_conv_relu_pool_fused_fwd,
                             lambda padding, pool, backward, grad: backward(grad))
