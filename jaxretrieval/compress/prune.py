"""Unstructured magnitude pruning with a gradual schedule (Zhu and Gupta, "To prune, or not
to prune", 2017), through an optax mask.

While fine-tuning, the sparsity of the model's convolution and dense kernels rises from 0 to
its target along s(t) = s_f (1 - (1 - t)^3) over the first PRUNE_SHARE of the steps; at
each of UPDATES_PER_RAMP mask updates the smallest weights by magnitude (over all kernels
at once, `scope=global`, or in each kernel, `scope=layer`) are masked out, and the rest of
the steps recover with the mask fixed. The mask lives in the optimiser's state
(`gradual_pruning`, the last transformation of the chain): every update of a masked weight
is the one that sets it to zero, so the sparsity holds at every step.

Stored, each pruned kernel is a bitmask (one bit per weight) and its kept values. Embedding
still runs dense kernels with zeros in them: XLA's convolutions do the same work whatever
the zeros, so this makes the model smaller, not faster (BENCHMARKS.md measures it).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxretrieval.compress.base import (Compressed, Method, Option, Source, fine_tune_options,
                                        map_kernels, map_named, path_name, weight_paths)

# The share of the fine-tuning steps over which the sparsity ramps up; the rest recover.
PRUNE_SHARE = 0.75
# Mask updates along the ramp (each at most once a step).
UPDATES_PER_RAMP = 10
SCOPES = ("global", "layer")


def sparsity_at(step, final: float, ramp_steps: int):
    """The cubic schedule: the sparsity after `step` of `ramp_steps` steps (jnp or numpy)."""
    t = jnp.clip(step / max(ramp_steps, 1), 0.0, 1.0)
    return final * (1.0 - (1.0 - t) ** 3)


def magnitude_masks(weights: dict, sparsity, scope: str) -> dict:
    """name -> bool mask (True: kept) with the `sparsity` share of smallest-magnitude weights
    masked out, over all `weights` at once (`global`) or in each (`layer`)."""
    def threshold(magnitudes):
        # The k-th smallest magnitude; weights at or below it are masked out (k = 0: none).
        k = jnp.floor(sparsity * magnitudes.size).astype(jnp.int32)
        ordered = jnp.sort(magnitudes)
        return jnp.where(k > 0, ordered[jnp.maximum(k - 1, 0)], -1.0)

    if scope == "global":
        cut = threshold(jnp.concatenate([jnp.abs(w).ravel() for w in weights.values()]))
        return {name: jnp.abs(w) > cut for name, w in weights.items()}
    return {name: jnp.abs(w) > threshold(jnp.abs(w).ravel()) for name, w in weights.items()}


class PruningState(NamedTuple):
    count: jax.Array
    masks: dict  # name (base.path_name of the params tree) -> bool mask


def mask_schedule(steps: int) -> tuple:
    """(ramp, every): the mask rises over the first `ramp` of `steps` steps, updated at
    every multiple of `every` and at `ramp` itself."""
    ramp = max(1, int(steps * PRUNE_SHARE))
    return ramp, max(1, ramp // UPDATES_PER_RAMP)


def gradual_pruning(targets, sparsity: float, scope: str, steps: int
                    ) -> optax.GradientTransformation:
    """The last transformation of an optimiser chain: the updates of the kernels named in
    `targets` become those that leave the pruned weights at zero, with the mask raised
    along the cubic schedule to `sparsity` over PRUNE_SHARE of `steps`."""
    targets = tuple(targets)
    ramp, every = mask_schedule(steps)

    def picked(tree):
        found = {}
        map_named(lambda name, x: found.__setitem__(name, x) if name in targets else None,
                  tree)
        return found

    def init(params):
        return PruningState(count=jnp.zeros([], jnp.int32),
                            masks={name: jnp.ones(jnp.shape(w), bool)
                                   for name, w in picked(params).items()})

    def update(updates, state, params):
        proposed = picked(jax.tree.map(lambda p, u: p + u, params, updates))
        count = state.count + 1
        due = (count % every == 0) | (count == ramp)
        masks = jax.lax.cond(
            due & (count <= ramp),
            lambda: magnitude_masks(proposed, sparsity_at(count, sparsity, ramp), scope),
            lambda: state.masks)

        def masked(path, p, u):
            name = path_name(path)
            if name not in masks:
                return u
            return jnp.where(masks[name], proposed[name], 0.0).astype(p.dtype) - p

        updates = jax.tree_util.tree_map_with_path(masked, params, updates)
        return updates, PruningState(count=count, masks=masks)

    return optax.GradientTransformation(init, update)


def kernel_sparsity(params) -> float:
    """The share of zeros among the model's convolution and dense kernel weights."""
    names = set(weight_paths(params))
    zeros, total = 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path_name(path) in names:
            zeros += int(np.sum(np.asarray(leaf) == 0))
            total += np.size(leaf)
    return zeros / max(total, 1)


def pack_kernel(kernel: np.ndarray):
    """A sparse kernel as {"bits", "values", "shape"}, or the kernel itself when that is
    no smaller."""
    kernel = np.asarray(kernel)
    kept = kernel != 0
    packed = {"bits": np.packbits(kept.ravel()), "values": kernel[kept].astype(kernel.dtype),
              "shape": np.asarray(kernel.shape, np.int32)}
    if sum(a.nbytes for a in packed.values()) >= kernel.nbytes:
        return kernel
    return packed


def unpack_kernel(packed: dict) -> np.ndarray:
    shape = tuple(int(s) for s in np.asarray(packed["shape"]))
    size = int(np.prod(shape))
    kept = np.unpackbits(np.asarray(packed["bits"]), count=size).astype(bool)
    kernel = np.zeros(size, np.asarray(packed["values"]).dtype)
    kernel[kept] = np.asarray(packed["values"])
    return kernel.reshape(shape)


def is_packed_kernel(node) -> bool:
    return isinstance(node, dict) and set(node) == {"bits", "values", "shape"}


class Prune(Method):
    name = "prune"
    summary = ("unstructured gradual magnitude pruning (optax mask); stored as bitmask + "
               "kept values; not faster with dense XLA kernels")
    options = {
        "sparsity": Option(0.8, "share of kernel weights set to zero", low=0.0, high=1.0,
                           open_high=True),
        "scope": Option("global", "rank weights over all kernels (global) or within each "
                        "(layer)", choices=SCOPES),
        **fine_tune_options(steps=200, learning_rate=1e-3),
    }

    def compress(self, source: Source, options: dict) -> Compressed:
        variables = source.variables
        sparsity, scope, steps = options["sparsity"], options["scope"], options["steps"]
        if steps == 0:  # one shot: the mask of the trained weights, no recovery
            names = weight_paths(variables["params"])
            weights = {}
            map_named(lambda name, x: weights.__setitem__(name, x) if name in names else None,
                      variables["params"])
            masks = jax.device_get(magnitude_masks(weights, sparsity, scope))
            params = map_named(lambda name, x: np.where(masks[name], x, 0).astype(x.dtype)
                               if name in masks else x, variables["params"])
            variables = dict(variables, params=params)
        else:
            # The fine-tuning optimiser's params are {"model": ..., "loss": ...}.
            targets = ["model/" + name for name in weight_paths(variables["params"])]
            variables = source.fine_tune(
                source.config, variables, steps=steps, learning_rate=options["learning_rate"],
                wrap_optimizer=lambda optimizer: optax.chain(
                    optimizer, gradual_pruning(targets, sparsity, scope, steps)))
        return Compressed(config=source.config, variables=variables,
                          facts={"kernel_sparsity": kernel_sparsity(variables["params"])})

    def pack(self, variables: dict, options: dict) -> dict:
        return dict(variables, params=map_kernels(pack_kernel, variables["params"]))

    def unpack(self, stored: dict, options: dict) -> dict:
        params = map_kernels(unpack_kernel, stored["params"], is_leaf=is_packed_kernel)
        return dict(stored, params=params)


PRUNE = Prune()
