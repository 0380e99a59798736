"""Explaining a match: which spatial positions of two images carry their cosine similarity.

For a pair (a, b) with unit embeddings e_a, e_b and similarity s = <e_a, e_b>, each image
gets a heatmap over the positions i of a feature map F of its model: the output of one
stage of the backbone (`models.stages`), by default the deepest with at least
`DEFAULT_MIN_SIDE` positions a side (`default_stage`), or the final one, before pooling:

    heat_a[i] = sum_c F_a[i, c] * d<E_a, e_b> / dF_a[i, c]

where E_a is a's embedding with every normalisation's norm held constant (the values are
e_a's). The norm is held because a cosine does not change when a feature map is scaled:
differentiated through its norm, a homogeneous head's heat would add up to zero, whatever the
images. The gradient is taken with respect to a weight on each position of the feature map
(the model's `explain` hooks), which is that sum over the channels in one backward pass.

- `exact`, at the final stage, for a head that is linear in the pooled features (average or
  flattened pooling, no hidden layer; evaluation-mode affine layers would keep it so): E_a =
  (W mean_i F_a[i] + b) / |u_a|, so heat_a[i] = <W F_a[i] / N, e_b> / |u_a|, and adding the
  bias's share, <b / N, e_b> / |u_a|, to every position makes the heat add up to s exactly:
  the decomposition of Stylianou et al., "Visualizing Deep Similarity Networks" (WACV 2019).
  With `flip_test` the mirror image's heat is mirrored back and added; it still adds up. The
  bias's share is found as s minus the first-order terms, which for a linear head is the
  bias term exactly (Euler's theorem).
- `grad_x_activation`, at an earlier stage, or at the final one for GeM, max pooling or a
  hidden layer: the same gradient x activation (Grad-CAM applied to the similarity, per
  position, without Grad-CAM's channel averaging or clipping). It need not add up to s:
  what lies between the stage and the embedding is not linear.

Heat is signed: a negative position pulls the two embeddings apart. `Explainer` computes it
for batches of pairs in one compiled function per model and stage, spread over the local
devices.
Face models explain their aligned chips: the images are the model's inputs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from jaxretrieval import parallel
from jaxretrieval.data.augment import preprocess
from jaxretrieval.embed import Embedder, embedding_function
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.models import (EXPLAIN_COLLECTION, POSITION_WEIGHTS, build_model,
                                 stage_features)

EXACT = "exact"
GRAD_X_ACTIVATION = "grad_x_activation"
# The pooling kinds after which a linear head keeps the similarity linear in the features.
LINEAR_POOLINGS = ("avg", "flatten")
# The name of the last stage whatever the model: the feature map the head pools.
FINAL = "final"
# The default stage is the deepest with at least this many positions a side.
DEFAULT_MIN_SIDE = 16
# Pairs per compiled call, at most.
MAX_PAIRS = 32

# Overlay colours: red above the image's mean heat, blue below it.
POSITIVE_RGB = np.array([230.0, 30.0, 20.0])
NEGATIVE_RGB = np.array([20.0, 90.0, 235.0])
# The opacity of the colour at the pair's strongest heat.
MAX_OPACITY = 0.7


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Why two images are as similar as they are.

    `heatmaps`: float32 [H', W'] per image at the feature map's resolution (with `exact`,
    each adds up to `similarity`). `overlays`: uint8 RGB [size, size, 3] per image, the heat
    upsampled onto the image as the model sees it (a face model's aligned chip): red above
    the image's mean heat, blue below it, on one colour scale for the pair (`overlays`).
    `method`: `exact` or `grad_x_activation`; `stage`: the backbone stage whose feature map
    the heat is over (`Explainer`). `same` and `threshold` as in `Retriever.match`.
    """

    similarity: float
    heatmaps: tuple
    overlays: tuple
    method: str
    same: bool | None = None
    threshold: float | None = None
    stage: str | None = None


def explanation_method(config) -> str:
    """`exact` when the model's similarity decomposes exactly over positions, else
    `grad_x_activation`."""
    linear = config.model.pooling in LINEAR_POOLINGS and not config.model.hidden_dim
    return EXACT if linear else GRAD_X_ACTIVATION


def explain_function(config, feature_shape, stage=None):
    """`(variables, uint8 images_a [n, ...], uint8 images_b [n, ...], ones [k * n, H', W'])
    -> (similarities [n], heat_a [n, H', W'], heat_b [n, H', W'])` for one batch of pairs on
    one device, where k is `weight_copies(config)`.

    `stage`: the backbone stage whose feature map the heat is over (`stage_shapes`), or None
    for the final one. `feature_shape` is that map's (H', W'). The ones are the
    position weights the gradient is taken at; they are an argument, split over the devices
    with the pairs, because inside `shard_map` a gradient with respect to an array every
    device holds alike is summed over the devices. Pure: `Explainer` maps it over its
    devices.
    """
    embed = embedding_function(config, fixed_norm=True)
    exact = stage is None and explanation_method(config) == EXACT

    def explain_fn(variables, images_a, images_b, weights):
        n = images_a.shape[0]
        images = jnp.concatenate([images_a, images_b], axis=0)

        def paired(weights):
            where = ({POSITION_WEIGHTS: weights} if stage is None
                     else {"backbone": {stage: weights}})
            weighted = {**variables, EXPLAIN_COLLECTION: where}
            e = embed(weighted, images)
            e_a, e_b = e[:n], e[n:]
            # Each image's heat comes from its own embedding against the other's, fixed.
            target = jnp.sum(e_a * jax.lax.stop_gradient(e_b)) + jnp.sum(
                jax.lax.stop_gradient(e_a) * e_b)
            return target, jnp.sum(e_a * e_b, axis=-1)

        grads, similarities = jax.grad(paired, has_aux=True)(weights)
        heat = grads[:2 * n]
        if config.model.flip_test:  # the mirrors' heat, mirrored back onto the images
            heat = heat + grads[2 * n:, :, ::-1]
        if exact:
            positions = feature_shape[0] * feature_shape[1]
            both = jnp.concatenate([similarities, similarities])
            heat = heat + ((both - jnp.sum(heat, axis=(1, 2))) / positions)[:, None, None]
        return similarities, heat[:n], heat[n:]

    return explain_fn


def weight_copies(config) -> int:
    """Position weights per pair: one per image the model sees (with `flip_test`, the images
    and their mirrors)."""
    return 4 if config.model.flip_test else 2


def stage_shapes(config, variables) -> dict:
    """{stage name: (H', W')}: the backbone's stages in order (`models.stages`), the last
    being the feature map the head pools, from shapes alone."""
    model = build_model(config)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.channels),
                                  jnp.uint8)
    features = jax.eval_shape(lambda v, x: stage_features(model, v, preprocess(x)),
                              variables, images)
    return {name: tuple(f.shape[1:3]) for name, f in features.items()}


def default_stage(stages: dict) -> str:
    """The stage explained when none is named, of `stage_shapes`' stages: the deepest whose
    map is at least `DEFAULT_MIN_SIDE` positions a side (the first when none is).

    Deeper maps are coarser: a heat cell of dlib's 2x2 map covers a quarter of the chip,
    and each of its 64x64 pixels is seen by all four cells, so its hottest pixels are not
    what the similarity rests on (measured in docs/explain.md). A map of 16 or more
    positions a side still comes after the layers that detect parts, and its heat picks
    out regions whose blurring costs the similarity several times what the same shape
    blurred elsewhere costs.
    """
    fine = [name for name, shape in stages.items() if min(shape) >= DEFAULT_MIN_SIDE]
    return fine[-1] if fine else next(iter(stages))


class UnknownStageError(JaxRetrievalError):
    """A stage name the model does not have."""


class NotExplainableError(JaxRetrievalError):
    """A model whose similarity has no useful gradient to explain it with."""


def check_explainable(embedder: Embedder) -> None:
    """Raises NotExplainableError for a model explanations cannot be computed for."""
    compression = getattr(embedder, "compression", None)
    if compression is not None and compression.get("method") == "int8":
        # Explanations are gradients, and the int8 model's rounding has none.
        raise NotExplainableError(
            "explanations are not available for an int8 model (its rounding has no "
            "gradient): explain with its source workdir, which compression.json names "
            f"({compression.get('source_workdir')})")


def check_stage(stages: dict, stage) -> str:
    """The stage to explain at, by name: one of `stages`, `final` (the last one, the map the
    head pools), or None for `default_stage`."""
    if stage is None:
        return default_stage(stages)
    if stage == FINAL:
        return list(stages)[-1]
    if stage not in stages:
        raise UnknownStageError(f"stage={stage!r}; this model's stages are "
                                f"{', '.join(stages)} (or {FINAL}, the last)")
    return stage


class Explainer:
    """Explains pairs of images with a model: compiled once, batched, on every local device.

        explainer = Explainer.from_embedder(retriever.embedder)
        similarities, heat_a, heat_b = explainer.explain_uint8(images_a, images_b)
    """

    def __init__(self, config, variables, devices=None, stage=None):
        self.config = config
        self.stages = stage_shapes(config, variables)
        self.stage = check_stage(self.stages, stage)
        final = self.stage == list(self.stages)[-1]
        self.method = explanation_method(config) if final else GRAD_X_ACTIVATION
        self.devices = devices or parallel.local_devices()
        mesh = parallel.device_mesh(self.devices)
        self._variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
        self._batch_sharding = parallel.batch_sharding(self.devices)
        self.feature_shape = self.stages[self.stage]
        batch_spec = PartitionSpec(parallel.DEVICE_AXIS)
        self._fn = jax.jit(jax.shard_map(
            explain_function(config, self.feature_shape, None if final else self.stage),
            mesh=mesh,
            in_specs=(PartitionSpec(), batch_spec, batch_spec, batch_spec),
            out_specs=batch_spec))

    @classmethod
    def from_embedder(cls, embedder: Embedder, stage=None) -> "Explainer":
        """An Explainer of the Embedder's model, with its variables and devices."""
        check_explainable(embedder)
        return cls(embedder.config, embedder.variables, devices=embedder.devices, stage=stage)

    def explain_uint8(self, images_a: np.ndarray, images_b: np.ndarray):
        """(similarities float32 [n], heat_a [n, H', W'], heat_b [n, H', W']) for pairs of
        uint8 model inputs [n, size, size, channels] (see `Retriever.decode_image`)."""
        expected = (self.config.image_size, self.config.image_size, self.config.channels)
        for images in (images_a, images_b):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
                raise JaxRetrievalError(
                    f"{images.dtype} images of shape {images.shape[1:]} given; this model "
                    f"takes uint8 {expected}: use Retriever.explain, which converts any image")
        if len(images_a) != len(images_b):
            raise JaxRetrievalError(
                f"{len(images_a)} images_a and {len(images_b)} images_b; give one b per a")
        n = len(images_a)
        similarities = np.empty(n, np.float32)
        heat = [np.empty((n,) + self.feature_shape, np.float32) for _ in range(2)]
        for start in range(0, n, MAX_PAIRS):
            stop = min(n, start + MAX_PAIRS)
            size = self._padded(stop - start)
            batches = []
            for images in (images_a, images_b):
                padded = np.zeros((size,) + expected, np.uint8)
                padded[:stop - start] = images[start:stop]
                batches.append(jax.device_put(padded, self._batch_sharding))
            # Each device's slice holds its own pairs' weights, in the order the model's
            # batch has on that device.
            ones = np.ones((weight_copies(self.config) * size,) + self.feature_shape,
                           np.float32)
            batches.append(jax.device_put(ones, self._batch_sharding))
            sims, heat_a, heat_b = self._fn(self._variables, *batches)
            similarities[start:stop] = np.asarray(sims)[:stop - start]
            heat[0][start:stop] = np.asarray(heat_a)[:stop - start]
            heat[1][start:stop] = np.asarray(heat_b)[:stop - start]
        return similarities, heat[0], heat[1]

    def _padded(self, count: int) -> int:
        # Powers of two times the device count: a few programs, whatever the batch sizes.
        size = len(self.devices)
        while size < count:
            size *= 2
        return size


def upsample(heatmap: np.ndarray, size: int) -> np.ndarray:
    """A heatmap [H', W'] resized (bilinear, cell centres on the pixels they cover) to
    float32 [size, size]."""
    image = Image.fromarray(np.asarray(heatmap, np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), np.float32)


def overlays(images, heatmaps) -> tuple:
    """Each uint8 image [S, S, C] with its heatmap upsampled onto it (uint8 RGB [S, S, 3]):
    a grey copy of the image, red where a position carries more than the image's mean heat
    and blue where it carries less, more opaque the further from the mean, on one scale for
    all the images given. Relative to the mean, because what a reader looks for is where the
    similarity concentrates: when every position adds about its share (dlib's four cells
    often do), absolute heat would paint the whole image one colour."""
    grown = [upsample(heat, image.shape[0]) - float(np.mean(heat))
             for image, heat in zip(images, heatmaps)]
    scale = max(float(np.max(np.abs(heat))) for heat in grown) or 1.0
    out = []
    for image, heat in zip(images, grown):
        grey = np.asarray(image, np.float32)
        grey = grey.mean(axis=-1, keepdims=True) if grey.ndim == 3 else grey[..., None]
        strength = (np.clip(np.abs(heat) / scale, 0.0, 1.0) * MAX_OPACITY)[..., None]
        colour = np.where(heat[..., None] >= 0, POSITIVE_RGB, NEGATIVE_RGB)
        blended = grey * (1.0 - strength) + colour * strength
        out.append(np.clip(np.round(blended), 0, 255).astype(np.uint8))
    return tuple(out)


def explanation(images, similarity: float, heat_a, heat_b, method: str, *,
                same=None, threshold=None, stage=None) -> Explanation:
    """An Explanation of one pair: its two model inputs, similarity and heatmaps."""
    heatmaps = (np.asarray(heat_a, np.float32), np.asarray(heat_b, np.float32))
    return Explanation(similarity=float(similarity), heatmaps=heatmaps,
                       overlays=overlays(images, heatmaps), method=method, same=same,
                       threshold=threshold, stage=stage)


def render(result: Explanation, *, side: int = 256, labels=("A", "B")) -> Image.Image:
    """Both overlays side by side, each scaled to `side` pixels, under the labels, the
    similarity with the match decision, and the method with the stage: what
    `jaxretrieval explain` writes."""
    lines = [f"{labels[0]}  |  {labels[1]}", *summary_lines(result)]
    margin, line_height = 8, 20
    text_height = line_height * len(lines) + 4
    canvas = Image.new("RGB", (3 * margin + 2 * side, 2 * margin + side + text_height),
                       "white")
    resample = (Image.Resampling.NEAREST if result.overlays[0].shape[0] * 2 <= side
                else Image.Resampling.BILINEAR)
    for index, overlay in enumerate(result.overlays):
        tile = Image.fromarray(overlay).resize((side, side), resample)
        canvas.paste(tile, (margin + index * (side + margin), margin + text_height))
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=15)
    for number, line in enumerate(lines):
        draw.text((margin, margin + number * line_height), line, fill="black", font=font)
    return canvas


def summary_lines(result: Explanation) -> tuple:
    """(the similarity and the match decision against its threshold, the method with the
    stage and its map's size)."""
    if result.same is None:
        decision = "no calibrated threshold"
    else:
        decision = (f"{'same' if result.same else 'different'} "
                    f"(threshold {result.threshold:.3f})")
    where = "x".join(map(str, result.heatmaps[0].shape))
    if result.stage is not None:
        where = f"{result.stage}, {where}"
    return f"similarity {result.similarity:.3f}: {decision}", f"{result.method} ({where})"


def summary(result: Explanation) -> str:
    """`summary_lines` as one line."""
    return "; ".join(summary_lines(result))
