"""Weight sharing (Han et al., "Deep Compression", ICLR 2016): each convolution and dense
kernel keeps at most 2^bits distinct values.

Each kernel's weights are clustered by 1-D k-means (centroids initialised linearly over the
weights' range, as the paper found best); every weight becomes its centroid. Fine-tuning
then moves each centroid by the summed gradient of its members (`shared_gradients`, the
first transformation of the optimiser chain): all members get the same gradient, hence the
same Adam moments and the same update, and stay equal.

Stored, a kernel is its codebook (2^bits float32 centroids) and one `bits`-bit index per
weight, packed into bytes. Biases, BatchNorm and GeM stay float32: they are a small share
of the model. Embedding runs the dense kernel the indices name, so the model is smaller on
disk and in transfer, not faster.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxretrieval.compress.base import (Compressed, Method, Option, Source, fine_tune_options,
                                        map_kernels, map_named, path_name, weight_paths)

KMEANS_ITERATIONS = 30


def kmeans_1d(values: np.ndarray, clusters: int, iterations: int = KMEANS_ITERATIONS):
    """(centroids float32 [k], indices int32 [n]) of 1-D k-means over `values`, started
    from `clusters` centroids spread linearly over their range (k <= clusters: never more
    centroids than distinct values)."""
    values = np.asarray(values, np.float64).ravel()
    distinct = np.unique(values)
    if len(distinct) <= clusters:
        return distinct.astype(np.float32), np.searchsorted(distinct, values).astype(np.int32)
    centroids = np.linspace(values.min(), values.max(), clusters)
    for _ in range(iterations):
        # Sorted centroids: each value's nearest is found between the midpoints.
        indices = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
        sums = np.bincount(indices, values, minlength=clusters)
        counts = np.bincount(indices, minlength=clusters)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(moved, centroids):
            break
        centroids = np.sort(moved)
    indices = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
    used = np.unique(indices)  # an empty cluster is dropped
    return (centroids[used].astype(np.float32),
            np.searchsorted(used, indices).astype(np.int32))


class SharingState(NamedTuple):
    indices: dict  # name -> int32 cluster index per weight


def shared_gradients(indices: dict) -> optax.GradientTransformation:
    """The first transformation of an optimiser chain: the gradient of every weight of the
    kernels named in `indices` becomes the sum of its cluster's gradients."""
    def init(params):
        del params
        return SharingState(indices={name: jnp.asarray(i) for name, i in indices.items()})

    def update(updates, state, params=None):
        del params

        def summed(path, g):
            name = path_name(path)
            if name not in state.indices:
                return g
            index = state.indices[name]
            total = jax.ops.segment_sum(g.ravel(), index.ravel(),
                                        num_segments=int(np.max(indices[name])) + 1)
            return total[index].astype(g.dtype)

        return jax.tree_util.tree_map_with_path(summed, updates), state

    return optax.GradientTransformation(init, update)


def clustered(params, bits: int):
    """(params with every kernel replaced by its centroids, name -> indices)."""
    names = set(weight_paths(params))
    indices = {}

    def share(name, kernel):
        if name not in names:
            return kernel
        centroids, index = kmeans_1d(kernel, 2 ** bits)
        indices[name] = index.reshape(np.shape(kernel))
        return centroids[indices[name]].astype(np.asarray(kernel).dtype)

    return map_named(share, params), indices


def distinct_values(params) -> dict:
    """name -> number of distinct values of each convolution and dense kernel."""
    names = set(weight_paths(params))
    counts = {}
    map_named(lambda name, x: counts.__setitem__(name, len(np.unique(np.asarray(x))))
              if name in names else None, params)
    return counts


def pack_kernel(kernel: np.ndarray, bits: int) -> dict:
    """{"codebook", "indices" (bit-packed), "shape"}: at most 2^bits distinct values."""
    kernel = np.asarray(kernel)
    codebook, index = np.unique(kernel, return_inverse=True)
    if len(codebook) > 2 ** bits:
        raise ValueError(f"a kernel of {len(codebook)} distinct values does not fit "
                         f"{bits}-bit indices")
    # Each index as `bits` bits, most significant first, all packed into one byte string.
    index_bits = (index.ravel()[:, None] >> np.arange(bits - 1, -1, -1)) & 1
    return {"codebook": codebook.astype(kernel.dtype),
            "indices": np.packbits(index_bits.astype(np.uint8).ravel()),
            "shape": np.asarray(kernel.shape, np.int32)}


def unpack_kernel(packed: dict, bits: int) -> np.ndarray:
    """The kernel `pack_kernel(kernel, bits)` packed. `bits` is the method's option: the
    packed bytes alone do not tell it, since their padding may outnumber the weights."""
    codebook = np.asarray(packed["codebook"])
    shape = tuple(int(s) for s in np.asarray(packed["shape"]))
    size = int(np.prod(shape))
    index_bits = np.unpackbits(np.asarray(packed["indices"]), count=size * bits)
    index = index_bits.reshape(size, bits).astype(np.int64) @ (1 << np.arange(bits - 1, -1, -1))
    return codebook[index].reshape(shape)


def is_packed_kernel(node) -> bool:
    return isinstance(node, dict) and set(node) == {"codebook", "indices", "shape"}


class Share(Method):
    name = "share"
    summary = ("weight sharing: per-kernel k-means codebook of 2^bits values, fine-tuned; "
               "stored as codebook + bit-packed indices")
    options = {
        "bits": Option(4, "index bits per weight: each kernel keeps 2^bits values", low=2,
                       high=8, integer=True),
        **fine_tune_options(steps=100, learning_rate=3e-4),
    }

    def compress(self, source: Source, options: dict) -> Compressed:
        bits = options["bits"]
        params, indices = clustered(source.variables["params"], bits)
        variables = dict(source.variables, params=params)
        if options["steps"]:
            # The fine-tuning optimiser's params are {"model": ..., "loss": ...}.
            model_indices = {"model/" + name: index for name, index in indices.items()}
            variables = source.fine_tune(
                source.config, variables, steps=options["steps"],
                learning_rate=options["learning_rate"],
                wrap_optimizer=lambda optimizer: optax.chain(
                    shared_gradients(model_indices), optimizer))
        counts = distinct_values(variables["params"])
        return Compressed(config=source.config, variables=variables,
                          facts={"most_distinct_values": max(counts.values(), default=0)})

    def pack(self, variables: dict, options: dict) -> dict:
        bits = options["bits"]
        return dict(variables, params=map_kernels(lambda k: pack_kernel(k, bits),
                                                  variables["params"]))

    def unpack(self, stored: dict, options: dict) -> dict:
        bits = options["bits"]
        return dict(stored, params=map_kernels(lambda k: unpack_kernel(k, bits),
                                               stored["params"], is_leaf=is_packed_kernel))


SHARE = Share()
