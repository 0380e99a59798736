"""The convolution of the seed CNN: oneDNN inside the compiled program on CPU, XLA elsewhere.

XLA runs a CPU convolution on one thread; oneDNN's kernels use every core.
`conv_general_dilated` has `jax.lax.conv_general_dilated`'s signature (Flax's `nn.Conv`
takes it as `conv_general_dilated=`) and sends the convolutions oneDNN handles (float32,
NHWC/HWIO, stride 1, no dilation, one group) to three XLA FFI custom calls, forward and
both gradients (`onednn_conv.cc`), tied together with a custom VJP; `conv_relu_pool` is a
fourth, the seed CNN's whole block when evaluated. Where the channels come in multiples
of 16 they use oneDNN's Winograd convolution (on CPUs that oneDNN has Winograd kernels
for). Anything else, any other platform, or a machine without oneDNN uses XLA's own
convolution, the same math (tests/test_conv.py checks values and gradients against it).

The library is compiled on first use with the system C++ compiler (`CXX`, else g++)
against oneDNN 3.x from PyPI (`onednn` and `onednn-devel`, which `pip install` brings on
Linux x86-64) and cached under `~/.cache/jaxretrieval/ops/`, with the compiler's output
in a log file beside it. A failed build is recorded there too, so the next run falls back
to XLA at once instead of compiling again; a new source, oneDNN or compiler tries again.
`convolution_path()` decides once per process and logs one line, `convolutions: oneDNN
<version> (<where from>)` or `convolutions: XLA (<why>)`.
`JAXRETRIEVAL_CPU_CONV=xla` turns oneDNN off; `=onednn` makes its absence an error
instead of a fallback. `with xla_convolutions():` turns it off for what is traced inside the
block alone (a program exported to run where this package is not installed).
"""

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.fileio import cache_home, write_file_atomically

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
MODE_VARIABLE = "JAXRETRIEVAL_CPU_CONV"
MODES = ("auto", "onednn", "xla")
WINOGRAD_VARIABLE = "JAXRETRIEVAL_CPU_WINOGRAD"
COMPILER_VARIABLE = "CXX"
TARGETS = {"forward": "JrConvForward", "backward_data": "JrConvBackwardData",
           "backward_weights": "JrConvBackwardWeights", "relu_pool": "JrConvReluPool"}
NHWC = ("NHWC", "HWIO", "NHWC")
# The PyPI distributions of oneDNN 3.x, (library, headers), in order of preference:
# Intel's current build (a SYCL one: its CPU engine runs on Intel's OpenCL CPU runtime,
# which pip brings with it), then the older CPU-only OpenMP build.
PIP_ONEDNN = (("onednn", "onednn-devel"), ("onednn-cpu-gomp", "onednn-devel-cpu-gomp"))
OPENCL_RUNTIME = "intel-opencl-rt"
OPENCL_ICD_VARIABLE = "OCL_ICD_FILENAMES"


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


INTERRUPTED_BUILD = "the compiler was stopped"


def cache_dir() -> str:
    """Where the built library, its build log and any failed-build record live."""
    return os.path.join(cache_home(), "ops")


@dataclasses.dataclass(frozen=True)
class OnednnInstall:
    """oneDNN as pip installed it: the distribution, its headers and its library."""
    distribution: str
    version: str
    include_dir: str
    library_dir: str
    opencl_runtime: str | None  # Intel's OpenCL CPU runtime, for a SYCL build's CPU engine

    def __str__(self) -> str:
        return f"pip {self.distribution} {self.version}, {self.library_dir}"


def _installed_file(distribution, suffix: str) -> str | None:
    for file in distribution.files or ():
        if str(file).replace(os.sep, "/").endswith(suffix):
            return os.path.normpath(str(distribution.locate_file(file)))
    return None


def _distribution(name: str):
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_onednn() -> OnednnInstall | str:
    """The pip-installed oneDNN 3.x to build against, or why there is none."""
    missing = "oneDNN is not installed: pip install onednn onednn-devel"
    for library_name, headers_name in PIP_ONEDNN:
        library, headers = _distribution(library_name), _distribution(headers_name)
        if library is None:
            continue
        if headers is None:
            missing = f"oneDNN's headers are not installed: pip install {headers_name}"
            continue
        shared = _installed_file(library, "/libdnnl.so")
        header = _installed_file(headers, "/oneapi/dnnl/dnnl.hpp")
        if shared is None or header is None:
            missing = f"{library_name} or {headers_name} lacks libdnnl.so or dnnl.hpp"
            continue
        with open(os.path.join(os.path.dirname(header), "dnnl_config.h")) as f:
            sycl = "DNNL_CPU_RUNTIME DNNL_RUNTIME_SYCL" in f.read()
        opencl = _distribution(OPENCL_RUNTIME) if sycl else None
        return OnednnInstall(
            library_name, library.version, os.path.dirname(os.path.dirname(
                os.path.dirname(header))), os.path.dirname(shared),
            opencl and _installed_file(opencl, "/libintelocl.so"))
    return missing


def _compiler() -> str | None:
    chosen = os.environ.get(COMPILER_VARIABLE)
    if chosen:
        return shutil.which(chosen)
    return shutil.which("g++") or shutil.which("c++")


def _first_error(output: str, returncode: int) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line
    return lines[0] if lines else f"the compiler exited with status {returncode}"


def _build(compiler: str, onednn: OnednnInstall, library: str, log: str) -> str | None:
    """Compiles onednn_conv.cc into `library` (atomically: a half-written file never
    loads), the compiler's output into `log`; returns the first error line on failure."""
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(library), suffix=".so.tmp")
    os.close(fd)
    # An RPATH, not a RUNPATH (--disable-new-dtags): it also finds the libraries that
    # libdnnl.so itself needs in the wheel's folder, with no LD_LIBRARY_PATH.
    command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
               f"-I{jax.ffi.include_dir()}", f"-I{onednn.include_dir}", SOURCE,
               f"-L{onednn.library_dir}", "-ldnnl",
               f"-Wl,--disable-new-dtags,-rpath,{onednn.library_dir}", "-o", partial]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        output, returncode = result.stdout + result.stderr, result.returncode
    except OSError as err:
        output, returncode = f"error: could not run {compiler}: {err}", -1
    write_file_atomically(log, " ".join(command) + "\n" + output)
    if returncode:
        os.unlink(partial)
        if returncode < 0 and not output.startswith("error: could not run"):
            # Killed (out of memory, a timeout): the next run builds again, not recorded.
            return f"{INTERRUPTED_BUILD} by signal {-returncode}"
        return _first_error(output, returncode)
    os.replace(partial, library)
    return None


def _recorded_failure(record: str) -> str | None:
    """The line a failed build recorded; None if there is none (or it cannot be read:
    then building again is the way to find out)."""
    try:
        with open(record) as f:
            return str(json.load(f)["detail"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclasses.dataclass(frozen=True)
class ConvolutionPath:
    """Which convolution the seed CNN runs on CPU, and why or from where."""
    onednn: bool
    detail: str

    def __str__(self) -> str:
        return f"convolutions: {self.detail}"


def _register(library: str) -> str:
    """Loads the built library, checks that oneDNN can make a CPU engine, registers the
    custom calls; returns the loaded oneDNN's version."""
    handle = ctypes.cdll.LoadLibrary(library)
    handle.JrOnednnVersion.restype = ctypes.c_char_p
    handle.JrOnednnEngineError.restype = ctypes.c_char_p
    problem = handle.JrOnednnEngineError().decode()
    if problem:
        raise OSError(f"oneDNN could not make a CPU engine: {problem}")
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(f"jaxretrieval_conv_{name}",
                                    jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
    return handle.JrOnednnVersion().decode()


def _decide() -> ConvolutionPath:
    """oneDNN if it builds (or was built) and loads here, else XLA with the reason."""
    if _mode() == "xla":
        return ConvolutionPath(False, f"XLA ({MODE_VARIABLE}=xla)")
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        return ConvolutionPath(False, "XLA (not a Linux x86-64 CPU)")
    onednn = find_onednn()
    if isinstance(onednn, str):
        return ConvolutionPath(False, f"XLA ({onednn})")
    compiler = _compiler()
    if compiler is None:
        chosen = os.environ.get(COMPILER_VARIABLE)
        return ConvolutionPath(False, f"XLA ({COMPILER_VARIABLE}={chosen} not found)"
                               if chosen else "XLA (g++ not found)")
    with open(SOURCE, "rb") as f:
        source = f.read()
    stat = os.stat(compiler)
    key = [source.hex(), jax.__version__, str(onednn), onednn.include_dir,
           os.path.realpath(compiler), str(stat.st_size), str(stat.st_mtime_ns)]
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
    stem = os.path.join(cache_dir(), f"onednn_conv-{digest}")
    library, log, failed = stem + ".so", stem + ".log", stem + ".failed.json"
    recorded = _recorded_failure(failed)
    if recorded is not None:
        return ConvolutionPath(False, recorded)
    if not os.path.isfile(library):
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            error = _build(compiler, onednn, library, log)
            if error is not None:
                detail = f"XLA (the oneDNN build failed: {error}; details in {log})"
                if not error.startswith(INTERRUPTED_BUILD):
                    write_file_atomically(failed, json.dumps({"detail": detail}))
                return ConvolutionPath(False, detail)
        except OSError as err:  # an unwritable cache: nothing to record either
            return ConvolutionPath(False, f"XLA (could not build in {cache_dir()}: {err})")
    if onednn.opencl_runtime and OPENCL_ICD_VARIABLE not in os.environ:
        # The wheel's OpenCL registry file names a path that does not exist: name the
        # runtime directly (read when oneDNN first makes its engine, just below).
        os.environ[OPENCL_ICD_VARIABLE] = onednn.opencl_runtime
    try:
        version = _register(library)
    except (OSError, AttributeError) as err:
        return ConvolutionPath(False, f"XLA (the oneDNN library did not load: {err})")
    return ConvolutionPath(True, f"oneDNN {version} ({onednn})")


@functools.cache
def convolution_path() -> ConvolutionPath:
    """Decides, once per process, whether the seed CNN's CPU convolutions run in oneDNN
    (building and registering the custom calls) or in XLA, and logs the one line that
    says which. Under `JAXRETRIEVAL_CPU_CONV=onednn`, XLA is an error instead."""
    path = _decide()
    if not path.onednn and _mode() == "onednn":
        raise JaxRetrievalError(
            f"{MODE_VARIABLE}=onednn, but the convolutions would run in {path.detail}; "
            f"on Linux x86-64 with g++, `pip install onednn onednn-devel` brings oneDNN "
            f"(a recorded failed build is retried once the compiler or oneDNN changes, or "
            f"after removing {cache_dir()}), or unset {MODE_VARIABLE} to use XLA's "
            f"convolution")
    logger.info("%s", path)
    return path


def onednn_available() -> bool:
    """Whether the seed CNN's CPU convolutions run in oneDNN (see `convolution_path`)."""
    return convolution_path().onednn


# True inside `xla_convolutions()`. A JAX user context: part of jit's cache key, so a
# function traced outside the block is traced again inside it, and the other way round.
_XLA_ONLY = jax.make_user_context(default_value=False)


@contextlib.contextmanager
def xla_convolutions():
    """Within the block (in this thread), convolutions are traced as XLA's own
    (`jax.lax`), never as this package's custom calls, whatever `JAXRETRIEVAL_CPU_CONV`
    says and without building oneDNN: for programs serialized to run elsewhere
    (`jaxretrieval.model_export`)."""
    with _XLA_ONLY(True):
        yield


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
    """float32 operands on CPU, with oneDNN built and not switched off (by the mode, or
    for the block, by `xla_convolutions`)."""
    return (not _XLA_ONLY.value and explicit_padding is not None
            and lhs.dtype == rhs.dtype == jnp.float32 and jax.default_backend() == "cpu"
            and onednn_available())


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
