"""One convolution, oneDNN custom call against XLA's own: forward, and both gradients.

    python -m bench.conv [--shape 32,111,111,32,64] [--repeats 5]

The seed CNN's second convolution by default (3x3, VALID), on however many CPU devices
XLA_FLAGS gives (the custom call uses that device's share of the cores). Prints the median
milliseconds of each; the last line is a JSON object.
"""

import argparse
import json
import os
import statistics
import time

# The oneDNN column must be oneDNN: a failed build is an error here, not a silent fallback.
os.environ.setdefault("JAXRETRIEVAL_CPU_CONV", "onednn")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxretrieval.ops.conv import conv_general_dilated  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")


def median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="32,111,111,32,64", help="N,H,W,C,O")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, h, w, c, o = map(int, args.shape.split(","))
    x = jax.random.normal(jax.random.PRNGKey(0), (n, h, w, c))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, o)) * 0.1
    result = {"shape": args.shape, "devices": jax.local_device_count()}
    for name, conv in (("onednn", conv_general_dilated), ("xla", jax.lax.conv_general_dilated)):
        apply = lambda x, k: conv(x, k, (1, 1), "VALID", dimension_numbers=NHWC)
        forward = jax.jit(apply)
        gradients = jax.jit(jax.grad(lambda x, k: jnp.sum(apply(x, k)), argnums=(0, 1)))
        result[f"{name}_forward_ms"] = median_ms(forward, (x, kernel), args.repeats)
        result[f"{name}_gradients_ms"] = median_ms(gradients, (x, kernel), args.repeats)
        print(f"{name}: forward {result[f'{name}_forward_ms']:.0f} ms, both gradients "
              f"{result[f'{name}_gradients_ms']:.0f} ms", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
