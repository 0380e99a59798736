"""The Embedder: checkpoint -> jit-compiled, batched embedding on any device count."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxretrieval import parallel
from jaxretrieval.checkpoint import open_for_reading
from jaxretrieval.compress.stored import read_compression, unpack_variables, wrap_model
from jaxretrieval.config import model_config_hash
from jaxretrieval.data.augment import preprocess
from jaxretrieval.data.images import InputSpec, load_images
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models import build_model
from jaxretrieval.models.heads import l2_normalize
from jaxretrieval.workdir import Workdir


class Embedder:
    """Maps uint8 images to L2-normalised float32 embeddings with a trained model.

    With `config.model.flip_test`, an image's embedding is the L2-normalised mean of its
    own and its mirror image's; with `config.model.align_faces`, `embed` aligns each image
    to its face chip first, as the dataset's images were.

    Batches are spread over all local devices; batch shapes come from a few fixed buckets
    (powers of two up to `config.embed_batch_size`), so a stream of odd-sized requests
    compiles a handful of programs, not one per size.
    """

    def __init__(self, config, variables, *, checkpoint_step: int, devices=None,
                 compression: dict | None = None):
        """`compression`: the record of a compressed workdir (`DIR/compression.json`),
        whose method may embed with another module than the plain model."""
        self.config = config
        self.compression = compression
        self.checkpoint_step = checkpoint_step
        self.model_config_hash = model_config_hash(config)
        self.embedding_dim = config.embedding_dim
        self.devices = devices or parallel.local_devices()
        mesh = parallel.device_mesh(self.devices)
        self._batch_sharding = parallel.batch_sharding(self.devices)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._variables = jax.device_put(variables, self._replicated)
        # Each device embeds its own slice of the batch (shard_map, not XLA's partitioner:
        # the CPU convolution is a custom call XLA would otherwise run whole on every device).
        batch_spec = PartitionSpec(parallel.DEVICE_AXIS)
        self._embed_fn = jax.jit(jax.shard_map(
            embedding_function(config, compression=compression), mesh=mesh, in_specs=(PartitionSpec(), batch_spec),
            out_specs=batch_spec))
        self._buckets = _bucket_sizes(config.embed_batch_size, len(self.devices))

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, devices=None) -> "Embedder":
        """Loads `DIR/config.json` and the checkpoint at `step` (default: the latest), as
        its compression method stored it when the workdir is a compressed one."""
        config, variables, step = restore_model(workdir, step)
        return cls(config, variables, checkpoint_step=step, devices=devices,
                   compression=read_compression(workdir))

    @property
    def variables(self):
        """The model's variables, on the devices (replicated)."""
        return self._variables

    def set_variables(self, variables, *, checkpoint_step: int) -> None:
        """Embeds with other values of the same model from now on (a later step of the run
        being trained), with the programs already compiled."""
        self._variables = jax.device_put(variables, self._replicated)
        self.checkpoint_step = checkpoint_step

    def embed_uint8(self, images: np.ndarray) -> np.ndarray:
        """uint8 [n, size, size, channels] -> float32 [n, embedding_dim]."""
        expected = (self.config.image_size, self.config.image_size, self.config.channels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise JaxRetrievalError(
                f"{images.dtype} images of shape {images.shape[1:]} given; this model takes "
                f"uint8 {expected}: pass "
                "them through Embedder.embed, which resizes and converts any image")
        out = np.empty((len(images), self.embedding_dim), np.float32)
        largest = self._buckets[-1]
        for start in range(0, len(images), largest):
            chunk = images[start:start + largest]
            size = next(b for b in self._buckets if b >= len(chunk))
            padded = np.zeros((size,) + chunk.shape[1:], np.uint8)
            padded[:len(chunk)] = chunk
            batch = jax.device_put(padded, self._batch_sharding)
            out[start:start + len(chunk)] = np.asarray(self._embed_fn(self._variables, batch))[
                :len(chunk)]
        return out

    def warm_up(self, max_batch: int | None = None) -> None:
        """Compiles the programs for every batch bucket up to `max_batch`, so that the first
        queries of a service do not wait for XLA."""
        shape = (self.config.image_size, self.config.image_size, self.config.channels)
        for size in self._buckets:
            if max_batch is None or size <= max(max_batch, self._buckets[0]):
                self.embed_uint8(np.zeros((size,) + shape, np.uint8))

    def embed(self, images) -> np.ndarray:
        """Any batch of HxWxC uint8 arrays or image file paths -> float32 [n, d], unit norm."""
        return self.embed_uint8(load_images(images, InputSpec.of(self.config)))


def embedding_function(config, *, fixed_norm: bool = False, compression: dict | None = None):
    """The model's whole computation from pixels to embeddings, for one batch on one device:
    `(variables, uint8 [n, size, size, channels]) -> float32 [n, embedding_dim]`, unit norm.

    Pure and shape-polymorphic in n: the Embedder maps it over its devices, and
    `model_export` traces it into a program that runs without this package. `fixed_norm`:
    the same values, with every normalisation's norm a constant to differentiation
    (`heads.l2_normalize`); with `flip_test` the model's batch is the images, then their
    mirrors. `compression`: a compressed workdir's record, whose method decides the module.
    """
    model = wrap_model(compression, build_model(config))
    if fixed_norm:
        model = model.clone(fixed_norm=True)
    flip_test = bool(config.model.flip_test)

    def embed_fn(variables, images):
        x = preprocess(images)
        if not flip_test:
            return model.apply(variables, x)
        # The image and its mirror in one batch: one apply, one program.
        both = model.apply(variables, jnp.concatenate([x, x[:, :, ::-1]], axis=0))
        n = x.shape[0]  # not len(x): a symbolic batch size has no len in an export
        return l2_normalize(both[:n] + both[n:], fixed_norm=fixed_norm)

    return embed_fn


def restore_model(workdir: str, step: int | None = None):
    """(config, variables, step): `DIR/config.json` and the model's variables (host arrays)
    from the checkpoint at `step` (default: the latest); a compressed workdir's are
    unpacked from their stored form (`jaxretrieval.compress`). Raises JaxRetrievalError
    for a directory that is not a workdir or holds no checkpoint."""
    config = Workdir(workdir).read_config()
    store = open_for_reading(workdir)
    try:
        step = store.latest_step() if step is None else step
        state = store.restore(step)
    finally:
        store.close()
    variables = {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}
    compression = read_compression(workdir)
    if compression is not None:
        variables = unpack_variables(compression, variables)
    return config, variables, int(step)


def _bucket_sizes(max_batch: int, num_devices: int) -> list:
    top = -(-max_batch // num_devices) * num_devices
    sizes, size = [], num_devices
    while size < top:
        sizes.append(size)
        size *= 2
    return sizes + [top]
