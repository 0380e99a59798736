"""The model as a program that runs without this package: StableHLO or a TF SavedModel.

`export_model(workdir, format, output)` traces the workdir's model, from uint8 pixels to
L2-normalised embeddings, with its weights inside, into one of two forms:

- `stablehlo`: `jax.export`'s serialized module, for any JAX (`jax.export.deserialize`);
- `savedmodel`: a TensorFlow SavedModel (through `jax2tf`) with a `serving_default`
  signature, for TF Serving or `tf.saved_model.load`.

The program computes what `Retriever.embed_uint8` computes (the same function,
`embed.embedding_function`: pixel scaling, the model's input normalisation, mirror
test-time augmentation where the run has it), for any batch size. It starts from the
model's input, uint8 [n, size, size, channels]: resizing, cropping and face alignment
happen on the host before it (`data.images.to_model_input`), and the caller does them. A
face run's program takes aligned face chips; the alignment is dlib's, which no compiled
program can hold, so `model.json` says so and the caller aligns (docs/model_export.md).

Convolutions are traced as XLA's own (`ops.conv.xla_convolutions`), never as this
package's oneDNN custom calls, so the program runs wherever XLA does.

Layout of `output`, a directory, filled beside its final path and renamed into place
whole, so that `output` is a finished export or absent:

    model.json          what the program takes and returns, and which model it is
    model.stablehlo     (stablehlo) the bytes of `jax.export.Exported.serialize()`
    saved_model.pb, variables/, ...   (savedmodel) the SavedModel; weights are variables
"""

import logging
import os
import shutil

import jax
import jax.numpy as jnp

from jaxretrieval.config import model_config_hash
from jaxretrieval.compress.stored import read_compression
from jaxretrieval.embed import embedding_function, restore_model
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.fileio import (atomic_file, give_ordinary_mode, new_sibling_directory,
                               write_json_atomically)
from jaxretrieval.ops.conv import xla_convolutions

logger = logging.getLogger(__name__)

FORMATS = ("stablehlo", "savedmodel")
# Lowered for both, so one file runs on a CPU or an NVIDIA GPU; lowering for CUDA needs no
# GPU here. `jax.export` also knows rocm and tpu.
DEFAULT_PLATFORMS = ("cpu", "cuda")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
METADATA_FILE = "model.json"
STABLEHLO_FILE = "model.stablehlo"
SIGNATURE_NAME = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
# The name of the batch dimension in the exported programs' shapes.
BATCH_DIM = "batch"


def export_model(workdir: str, format: str, output: str, *,
                 platforms=DEFAULT_PLATFORMS) -> dict:
    """Exports the model of `workdir` (its latest checkpoint, the one `Retriever.load`
    loads) in `format` (one of FORMATS), lowered for `platforms` (a sequence, or a
    comma-separated string), to the new directory `output`; returns what `model.json`
    holds.

    Raises JaxRetrievalError, writing nothing at `output`, for an unknown format or
    platform, an `output` that exists or cannot be written, and a workdir without config
    or checkpoint.
    """
    if format not in FORMATS:
        raise JaxRetrievalError(f"unknown export format {format!r}; use one of "
                                f"{', '.join(FORMATS)}")
    platforms = _check_platforms(platforms)
    output = os.path.abspath(output)
    _check_output(output)
    config, variables, step = restore_model(workdir)
    if config.model.align_faces:
        logger.warning("this model embeds aligned face chips: the exported program takes "
                       "%dx%d chips aligned as dlib does (docs/model_export.md), not photos",
                       config.image_size, config.image_size)
    metadata = model_metadata(config, format=format, platforms=platforms,
                              checkpoint_step=step, workdir=os.path.abspath(workdir))
    writer = {"stablehlo": _write_stablehlo, "savedmodel": _write_saved_model}[format]
    try:
        partial = new_sibling_directory(output)
    except OSError as err:
        raise JaxRetrievalError(f"cannot write the export beside {output!r} ({err.strerror}); "
                                "choose an output path in a folder you can write to") from None
    try:
        with xla_convolutions():
            # A compressed workdir's model as it embeds (the int8 one quantised).
            writer(partial, embedding_function(config, compression=read_compression(workdir)),
                   variables,
                   _input_shape(config), platforms)
        write_json_atomically(os.path.join(partial, METADATA_FILE), metadata)
        _seal(partial)
        _check_output(output)  # nothing appeared there while the model was traced
        os.rename(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("exported %s (step %d) as %s to %s", config.model.name, step, format, output)
    return metadata


def model_metadata(config, *, format: str, platforms, checkpoint_step: int,
                   workdir: str) -> dict:
    """What `model.json` holds: the program's input and output, and the model's identity."""
    size, channels = config.image_size, config.channels
    return {
        "format": format,
        "file": STABLEHLO_FILE if format == "stablehlo" else None,
        "signature": {"name": SIGNATURE_NAME, "input": INPUT_NAME, "output": OUTPUT_NAME}
        if format == "savedmodel" else None,
        "platforms": list(platforms),
        "input": {
            "dtype": "uint8", "layout": "NHWC", "shape": [None, size, size, channels],
            "height": size, "width": size, "channels": channels,
            # How the caller makes an image into this input (data.images.InputSpec).
            "resize": "bilinear, whole image" if config.model.crop_fraction >= 1 else
                      f"bilinear, shorter side to {size / config.model.crop_fraction:g}, "
                      "centre square",
            "aligned_face_chips": bool(config.model.align_faces),
        },
        "output": {"dtype": "float32", "shape": [None, config.embedding_dim],
                   "l2_normalized": True},
        "embedding_dim": config.embedding_dim,
        # Inside the program: pixels / 255, then this normalisation (models.INPUT_NORMS).
        "normalization": config.model.input_norm,
        "flip_test": bool(config.model.flip_test),
        "model": config.model.name,
        "dtype": config.dtype,
        "model_config_hash": model_config_hash(config),
        "checkpoint_step": checkpoint_step,
        "workdir": workdir,
        "jax_version": jax.__version__,
    }


def _check_platforms(platforms) -> tuple:
    platforms = tuple(p.strip() for p in (
        platforms.split(",") if isinstance(platforms, str) else platforms))
    unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
    if not platforms or unknown or len(set(platforms)) != len(platforms):
        problem = (f"unknown: {', '.join(map(repr, unknown))}" if unknown
                   else "each may be named once" if platforms else "none given")
        raise JaxRetrievalError(
            f"platforms {','.join(platforms) or '(none)'} ({problem}); name each once, from "
            f"{', '.join(KNOWN_PLATFORMS)} (default {','.join(DEFAULT_PLATFORMS)})")
    return platforms


def _check_output(output: str) -> None:
    if os.path.lexists(output):
        raise JaxRetrievalError(f"{output!r} exists; an export never replaces anything: "
                                "remove it or choose another output path")
    parent = os.path.dirname(output)
    while not os.path.lexists(parent):  # created on write: the nearest existing ancestor
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise JaxRetrievalError(f"cannot create {output!r}: {parent!r} is not a folder you "
                                "can write to; choose another output path")


def _seal(directory: str) -> None:
    """Every file on disk before the folder is renamed into place, and the modes a plain
    mkdir and open would give: the temporary folder and files are private to this user,
    but an export is made to be read by others (a serving container's user)."""
    for root, _, files in os.walk(directory):
        give_ordinary_mode(root)
        for name in files:
            path = os.path.join(root, name)
            give_ordinary_mode(path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _input_shape(config) -> tuple:
    return (config.image_size, config.image_size, config.channels)


def _write_stablehlo(directory, embed_fn, variables, input_shape, platforms) -> None:
    """`jax.export` with the weights as constants: one self-contained module."""
    from jax import export

    batch, = export.symbolic_shape(BATCH_DIM)
    exported = export.export(jax.jit(lambda images: embed_fn(variables, images)),
                             platforms=platforms)(
        jax.ShapeDtypeStruct((batch, *input_shape), jnp.uint8))
    with atomic_file(os.path.join(directory, STABLEHLO_FILE), "wb") as f:
        f.write(exported.serialize())


def _write_saved_model(directory, embed_fn, variables, input_shape, platforms) -> None:
    """jax2tf, the weights as TF variables (a graph holds constants up to 2 GB only), and
    one serving signature: uint8 images [batch, H, W, C] -> {"embeddings": float32}."""
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as err:
        raise JaxRetrievalError(f"the savedmodel format needs TensorFlow ({err}); "
                                "pip install tensorflow-cpu") from None

    converted = jax2tf.convert(
        embed_fn, polymorphic_shapes=[None, f"({BATCH_DIM}, ...)"], with_gradient=False,
        native_serialization_platforms=platforms)
    module = tf.Module()
    module.model_variables = jax.tree.map(lambda a: tf.Variable(a, trainable=False), variables)

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec((None, *input_shape), tf.uint8, name=INPUT_NAME)])
    def serve(images):
        return {OUTPUT_NAME: converted(module.model_variables, images)}

    module.serve = serve
    tf.saved_model.save(module, directory, signatures={SIGNATURE_NAME: serve})
