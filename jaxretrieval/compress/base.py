"""What every compression method is made of: its options, what it is given (`Source`), what
it returns (`Compressed`), and how its model is stored and restored (`Method.pack`,
`Method.unpack`).

A method is a `Method` subclass instance in `jaxretrieval.compress.methods.METHODS`. It never
reads or writes a workdir itself: `jaxretrieval.compress.run.compress_workdir` hands it the
source model and a fine-tuning function, and writes what it returns.
"""

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jaxretrieval.errors import JaxRetrievalError


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a method: its default, its meaning, and the values it takes.

    A number lies in [low, high] (either end open when `open_low` / `open_high`); a text
    option is one of `choices`. `integer` options refuse fractions.
    """

    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    integer: bool = False
    choices: tuple = ()

    @property
    def kind(self) -> type:
        """The Python type a command-line value is parsed as."""
        if self.choices:
            return str
        return int if self.integer else float

    def valid_values(self) -> str:
        """The values this option takes, in words."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        kind = "an integer" if self.integer else "a number"
        if self.low is None and self.high is None:
            return kind
        if self.high is None:
            return f"{kind} {'>' if self.open_low else '>='} {_number(self.low)}"
        left = "(" if self.open_low else "["
        right = ")" if self.open_high else "]"
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        return f"{kind} in {left}{low}, {high}{right}"

    def checked(self, method: str, name: str, value):
        """`value` as this option's type; JaxRetrievalError naming the option and its range
        when it is not one of the values this option takes."""
        given = value

        def refuse():
            return JaxRetrievalError(
                f"compress --method {method}: {name}={given!r} is not valid; use "
                f"{self.valid_values()} (default {self.default!r})")

        if self.choices:
            if value not in self.choices:
                raise refuse()
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise refuse()
        # Before any conversion: int() of inf or nan raises its own error, not this one.
        if not np.isfinite(value):
            raise refuse()
        if self.integer:
            if float(value) != int(value):
                raise refuse()
            value = int(value)
        else:
            value = float(value)
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            raise refuse()
        if self.high is not None and (value > self.high
                                      or (self.open_high and value == self.high)):
            raise refuse()
        return value


def _number(x) -> str:
    return f"{x:g}"


# The options every method that fine-tunes shares: same names, same meaning.
def fine_tune_options(steps: int, learning_rate: float) -> dict:
    return {
        "steps": Option(steps, "fine-tuning steps on the source run's training split "
                        "(0: none)", low=0, integer=True),
        "learning_rate": Option(learning_rate, "peak learning rate of the fine-tuning",
                                low=0.0, open_low=True, high=1.0),
    }


# fine_tune(config, variables, *, steps, learning_rate, wrap_optimizer=None) -> variables:
# trains the model of `config` from `variables` ({"params", "batch_stats"}, host arrays)
# with the source run's loss (its learned parameters included) and batches, and returns
# the model's variables. `wrap_optimizer(optimizer) -> optimizer` lets a method chain its
# own optax transformation before or after the run's AdamW (gradient masks, shared
# gradients).
FineTune = Callable[..., dict]


@dataclasses.dataclass
class Source:
    """The trained model a method compresses, and what it may use to do so."""

    config: Any  # the source run's config (ml_collections.ConfigDict)
    variables: dict  # {"params", "batch_stats"}: host numpy arrays, float32
    checkpoint_step: int
    fine_tune: FineTune
    # n -> uint8 [n, size, size, channels]: images of the training split (calibration).
    train_images: Callable[[int], np.ndarray]


@dataclasses.dataclass
class Compressed:
    """A method's result: the model's config (changed only where the method changes the
    network's shape) and the variables it embeds with; `facts`, JSON values recorded in
    DIR2/compression.json (the sparsity reached, the widths kept, ...)."""

    config: Any
    variables: dict
    facts: dict = dataclasses.field(default_factory=dict)


class Method:
    """A compression method. Subclasses set `name`, `summary` and `options` and implement
    `compress`; a method whose stored model is not the plain float variables also
    implements `pack` and `unpack`, and one that embeds with another module than the plain
    RetrievalModel implements `wrap_model`."""

    name: str = ""
    summary: str = ""
    options: dict = {}  # option name -> Option

    def checked_options(self, given: dict | None) -> dict:
        """Every option of this method: `given`'s values, checked, and the defaults for the
        rest. An unknown name or a bad value raises one JaxRetrievalError that says what to
        use."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise JaxRetrievalError(
                f"compress --method {self.name} takes no option {unknown[0]!r}; its options "
                f"are {known}")
        return {name: option.checked(self.name, name, given.get(name, option.default))
                for name, option in self.options.items()}

    def check_source(self, config) -> None:
        """Raises JaxRetrievalError when this method cannot compress a model of `config`."""

    def compress(self, source: Source, options: dict) -> Compressed:
        raise NotImplementedError

    def pack(self, variables: dict, options: dict) -> dict:
        """The model's variables as stored in the compressed workdir's checkpoint (numpy
        arrays; its bytes are the model's size). Default: as they are."""
        return variables

    def unpack(self, stored: dict, options: dict) -> dict:
        """The inverse of `pack`: the variables the model embeds with."""
        return stored

    def wrap_model(self, model, options: dict):
        """The Flax module that embeds with the unpacked variables. Default: `model`."""
        return model


def tree_bytes(tree) -> int:
    """The bytes of every array in `tree`: a model's size as stored."""
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))


def path_name(key_path) -> str:
    """A tree path as "params/backbone/Conv_0/kernel"."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def weight_paths(params) -> list:
    """The names (`path_name`) of the model's convolution and dense kernels: the leaves of
    `params` called "kernel" with two or more dimensions, in tree order."""
    return [path_name(path) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if str(getattr(path[-1], "key", "")) == "kernel" and np.ndim(leaf) >= 2]


def map_named(fn, tree):
    """`jax.tree.map` whose function gets each leaf's `path_name` first."""
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(path_name(path), x), tree)


def map_kernels(fn, tree: dict, is_leaf=lambda node: not isinstance(node, dict)):
    """`tree` (nested dicts) with `fn(node)` in place of every "kernel" entry."""
    out = {}
    for key, node in tree.items():
        if key == "kernel" and (is_leaf(node)):
            out[key] = fn(node)
        elif isinstance(node, dict):
            out[key] = map_kernels(fn, node, is_leaf)
        else:
            out[key] = node
    return out
