"""The process set-up the library applies itself, so that a program calling it from Python
gets what the command line gets: the CPU device layout, the compilation cache, quiet logs.

`setup(batch_size)` is called by the entry points that train or embed (and by the command
line before anything touches JAX). Each part leaves alone what the user chose first.

- One XLA CPU device per core. XLA runs a CPU convolution on one thread, so pmap over one
  device per core is what puts every core to work. The count must be chosen before JAX
  starts its backends (the first array or device query); after that JAX keeps the count it
  started with. A count set by the user (`--xla_force_host_platform_device_count` in
  XLA_FLAGS, JAX_NUM_CPU_DEVICES or `jax_num_cpu_devices`) wins. Accelerators are
  unaffected: this only shapes the host platform.
- JAX's persistent compilation cache in `~/.cache/jaxretrieval/xla`, so a resumed run,
  `--eval_only` or a restarted service loads its compiled programs instead of compiling
  them again. JAX_COMPILATION_CACHE_DIR moves it; an empty value turns it off.
- TF_CPP_MIN_LOG_LEVEL=2: TensorFlow (imported by TFDS and ScaNN) otherwise prints start-up
  chatter that hides the run's own output.
- The seed CNN's CPU convolution, oneDNN or XLA, decided when a run that trains or embeds
  sets up, so that it logs the one line that says which, before its first step
  (`jaxretrieval.ops.conv.convolution_path`); elsewhere, at the first convolution.
"""

import logging
import os

import jax

from jaxretrieval.fileio import cache_home
from jaxretrieval.ops import conv

logger = logging.getLogger(__name__)

# Each CPU device gets at least this many images of the batch it steps through.
MIN_IMAGES_PER_CPU_DEVICE = 8
CACHE_DIR_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
MIN_COMPILE_TIME_VARIABLE = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
MIN_COMPILE_TIME_SECONDS = 0.5
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def setup(batch_size: int | None = None) -> None:
    """Quiet TensorFlow, the compilation cache and, given the batch each process steps
    through (`batch_size`), one CPU device per core. Safe to call more than once."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    use_compilation_cache()
    if batch_size is not None:
        use_one_cpu_device_per_core(batch_size)
        # A run that trains or embeds: say which convolution it uses (this starts no JAX
        # backend, so the device count above stays the user's to change).
        conv.convolution_path()


def available_cores() -> int:
    """The cores this process may run on (its affinity, which containers and taskset set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_device_count(batch_size: int, cores: int) -> int:
    """One device per core, while each still gets MIN_IMAGES_PER_CPU_DEVICE images of the
    batch; the largest such count that divides the batch evenly."""
    most = max(1, min(cores, batch_size // MIN_IMAGES_PER_CPU_DEVICE))
    return max(d for d in range(1, most + 1) if batch_size % d == 0)


def use_one_cpu_device_per_core(batch_size: int) -> int | None:
    """Asks JAX for `cpu_device_count(batch_size, cores)` CPU devices; returns that count,
    or None when the count is not this function's to choose (set by the user, already
    chosen by an earlier call, or fixed because JAX's backends have started).

    Under `jax.distributed` the batch a process steps through depends on the process
    count, which only the caller knows: call this with that share before joining (as the
    command line does); once joined, it leaves the count alone.
    """
    if (DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", "")
            or jax.config.jax_num_cpu_devices >= 0 or jax.distributed.is_initialized()):
        return None
    count = cpu_device_count(batch_size, available_cores())
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        # JAX refuses a new count once its backends have started; it keeps the one it has.
        logger.info("JAX had already started its backends; keeping its CPU device count "
                    "(call jaxretrieval.runtime.setup(batch_size) before using JAX to get "
                    "one device per core)")
        return None
    return count


def use_compilation_cache() -> None:
    """Points JAX's persistent compilation cache at ~/.cache/jaxretrieval/xla (or
    $XDG_CACHE_HOME/jaxretrieval/xla) unless JAX_COMPILATION_CACHE_DIR, or JAX's config
    itself, already says where (or, empty, that there is none). Programs that take half a
    second or more to compile are kept (JAX's own threshold is a second) unless
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise."""
    if jax.config.jax_compilation_cache_dir is None and CACHE_DIR_VARIABLE not in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_home(), "xla"))
    if MIN_COMPILE_TIME_VARIABLE not in os.environ:
        os.environ[MIN_COMPILE_TIME_VARIABLE] = str(MIN_COMPILE_TIME_SECONDS)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          MIN_COMPILE_TIME_SECONDS)
