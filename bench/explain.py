"""Faithfulness of explanations: blanking the hottest pixels against blanking others.

    python -m bench.explain --workdir runs/faces --workdir runs/faces_scratch \
        [--stage all|default|NAME ...] [--blank grey|mean|blur] [--fraction 0.1 ...] \
        [--smooth N] [--max-pairs N] [--seed 0] [--markdown FILE]

For each workdir (a run on a class-per-folder face set, such as yalefaces with
`configs/faces.py` or `configs/faces_scratch.py`), the pairs are every two images of the
same identity among the run's evaluation identities (the split's queries), as the model sees
them (a face model's aligned chips); a seeded sample of `--max-pairs` when there are more.
Each pair is explained at each `--stage` (`jaxretrieval.explain`); then, in both images at
once, a `--fraction` of each image's pixels is blanked and the pair's similarity measured
again. The drop of the similarity is averaged over the pairs, for these masks:

- `hottest`: the pixels with the most heat (the heatmap upsampled as the overlays are);
- `random`: as many pixels, scattered at random;
- `shifted`: the hottest pixels' mask moved by a random offset (wrapping round the edges):
  the same region shape, placed at random;
- `noise`: the hottest pixels of a random heatmap (normal noise) of the stage's resolution,
  upsampled alike: regions of the same kind, placed at random;
- `coldest`: the pixels with the least heat.

Scattered pixels touch every receptive field a little, a region touches few of them much,
so the two region controls are the fair comparison for where the heat puts the region; the
scattered one is what the test as first posed compares against. `--blank`: what a blanked
pixel becomes: `grey` (128 in every channel, about zero after either input normalisation),
`mean` (the image's mean colour) or `blur` (the image blurred by a Gaussian of
`BLUR_SIGMA` of the image's side: the pixel loses its detail, not its colour).
"""

import argparse
import datetime
import os
import platform

import numpy as np
from PIL import Image, ImageFilter

from bench.report import emit

GREY = 128
# The blur's standard deviation, as a share of the image's side.
BLUR_SIGMA = 0.05
MASKS = ("hottest", "random", "shifted", "noise", "coldest")


def same_identity_pairs(labels, rows, max_pairs, rng):
    """Every (i, j), i < j, of `rows` with equal labels; a seeded sample of `max_pairs`
    of them when there are more."""
    pairs = [(a, b) for k, a in enumerate(rows) for b in rows[k + 1:] if labels[a] == labels[b]]
    pairs = np.asarray(pairs, np.int64)
    if max_pairs and len(pairs) > max_pairs:
        pairs = pairs[np.sort(rng.choice(len(pairs), max_pairs, replace=False))]
    return pairs


def fillers(images, blank):
    """uint8 images of the same shape holding what each blanked pixel becomes."""
    if blank == "grey":
        return np.full_like(images, GREY)
    if blank == "mean":
        means = images.reshape(len(images), -1, images.shape[-1]).mean(axis=1)
        return np.broadcast_to(np.round(means)[:, None, None, :].astype(np.uint8),
                               images.shape).copy()
    radius = BLUR_SIGMA * images.shape[1]
    out = np.empty_like(images)
    for index, image in enumerate(images):
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        blurred = np.asarray(picture.filter(ImageFilter.GaussianBlur(radius)))
        out[index] = blurred.reshape(image.shape)
    return out


def blanked(images, filler, masks):
    return np.where(masks[..., None], filler, images)


def top_masks(heatmaps, size, count):
    """bool [n, size, size]: per image the `count` pixels with the most upsampled heat."""
    from jaxretrieval.explain import upsample

    masks = np.zeros((len(heatmaps), size * size), bool)
    for mask, heat in zip(masks, heatmaps):
        mask[np.argsort(-upsample(heat, size).ravel(), kind="stable")[:count]] = True
    return masks.reshape(len(heatmaps), size, size)


def random_masks(n, size, count, rng):
    masks = np.zeros((n, size * size), bool)
    for mask in masks:
        mask[rng.choice(size * size, count, replace=False)] = True
    return masks.reshape(n, size, size)


def shifted_masks(masks, rng):
    """Each mask rolled by a random offset of at least a quarter of the side in one axis:
    the same shape, somewhere else."""
    size = masks.shape[1]
    out = np.empty_like(masks)
    for index, mask in enumerate(masks):
        while True:
            dy, dx = rng.integers(0, size, 2)
            if min(dy, size - dy) >= size // 4 or min(dx, size - dx) >= size // 4:
                break
        out[index] = np.roll(mask, (dy, dx), axis=(0, 1))
    return out


def pair_similarities(embedder, images_a, images_b):
    return np.sum(embedder.embed_uint8(images_a) * embedder.embed_uint8(images_b), axis=-1)


def smoothed_heat(explainer, images_a, images_b, samples, rng, sigma=12.0):
    """The heat averaged over the pair and `samples - 1` copies with normal noise of `sigma`
    grey levels added (SmoothGrad's averaging, on gradient x activation)."""
    similarities, heat_a, heat_b = explainer.explain_uint8(images_a, images_b)
    for _ in range(samples - 1):
        noisy = [np.clip(np.round(x + rng.normal(0, sigma, x.shape)), 0, 255).astype(np.uint8)
                 for x in (images_a, images_b)]
        _, more_a, more_b = explainer.explain_uint8(*noisy)
        heat_a, heat_b = heat_a + more_a, heat_b + more_b
    return similarities, heat_a / samples, heat_b / samples


def measure(workdir, stages, fractions, blank, smooth, max_pairs, seed):
    """Rows of the table for one workdir, one per stage and fraction."""
    from jaxretrieval.data.sources import load_dataset
    from jaxretrieval.data.splits import split_dataset
    from jaxretrieval.embed import Embedder
    from jaxretrieval.explain import FINAL, Explainer, default_stage, stage_shapes

    embedder = Embedder.from_workdir(workdir)
    config = embedder.config
    dataset = load_dataset(config)
    rows = np.asarray(split_dataset(config, dataset).query_rows)
    rng = np.random.default_rng(seed)
    pairs = same_identity_pairs(dataset.labels, list(rows), max_pairs, rng)
    images_a, images_b = dataset.images(pairs[:, 0]), dataset.images(pairs[:, 1])
    filler_a, filler_b = fillers(images_a, blank), fillers(images_b, blank)
    shapes = stage_shapes(config, embedder.variables)
    names, default = list(shapes), default_stage(shapes)
    aliases = {"default": default, FINAL: names[-1]}
    chosen = names if "all" in stages else [aliases.get(s, s) for s in stages]
    size, n = config.image_size, len(pairs)
    out = []
    for stage in chosen:
        explainer = Explainer.from_embedder(embedder, stage=stage)
        stage_rng = np.random.default_rng([seed, names.index(stage)])
        similarities, heat_a, heat_b = smoothed_heat(explainer, images_a, images_b, smooth,
                                                     stage_rng)
        for fraction in fractions:
            count = int(round(fraction * size * size))
            masks = {}
            for side, heat in (("a", heat_a), ("b", heat_b)):
                hottest = top_masks(heat, size, count)
                masks[side] = {
                    "hottest": hottest, "random": random_masks(n, size, count, stage_rng),
                    "shifted": shifted_masks(hottest, stage_rng),
                    "noise": top_masks(stage_rng.normal(size=heat.shape), size, count),
                    "coldest": top_masks(-heat, size, count)}
            drops = {}
            for name in MASKS:
                after = pair_similarities(
                    embedder, blanked(images_a, filler_a, masks["a"][name]),
                    blanked(images_b, filler_b, masks["b"][name]))
                drops[name] = similarities - after
            out.append({
                "workdir": workdir, "model": f"{config.model.name} ({config.model.pooling})",
                "stage": stage + (" (default)" if stage == default else ""),
                "method": explainer.method, "map": "x".join(map(str, explainer.feature_shape)),
                "pairs": n, "similarity": float(similarities.mean()), "fraction": fraction,
                **{name: float(drops[name].mean()) for name in MASKS},
                **{f"wins_{name}": float(np.mean(drops["hottest"] > drops[name]))
                   for name in ("random", "shifted", "noise")}})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", action="append", required=True,
                        help="a trained workdir (repeat for more models)")
    parser.add_argument("--stage", action="append", default=None,
                        help="a stage to explain at, `default` (the model's default), "
                             "`final` or `all` (repeat for more; default: default)")
    parser.add_argument("--fraction", type=float, action="append", default=None,
                        help="share of each image's pixels blanked (repeat for a deletion "
                             "curve; default 0.1)")
    parser.add_argument("--blank", choices=("grey", "mean", "blur"), default="grey",
                        help="what a blanked pixel becomes (default %(default)s)")
    parser.add_argument("--smooth", type=int, default=1,
                        help="average the heat over this many noisy copies (SmoothGrad; "
                             "default %(default)s: none)")
    parser.add_argument("--max-pairs", type=int, default=0,
                        help="at most this many pairs per model (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args()
    from jaxretrieval import runtime

    runtime.setup()
    fractions = args.fraction or [0.1]
    lines = [f"Explanation faithfulness ({platform.machine()}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load "
             f"{os.getloadavg()[0]:.1f}): blanked to {args.blank}, heat averaged over "
             f"{args.smooth} cop{'y' if args.smooth == 1 else 'ies'}; mean drop of the "
             "pair's similarity per mask.",
             "",
             "| workdir | model | stage | method | map | pairs | similarity | blanked | "
             "hottest | random pixels | shifted hottest | noise heatmap's hottest | coldest "
             "| pairs: hottest > random / shifted / noise |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for workdir in args.workdir:
        for r in measure(workdir, args.stage or ["default"], fractions, args.blank,
                         args.smooth, args.max_pairs, args.seed):
            lines.append(
                f"| {r['workdir']} | {r['model']} | {r['stage']} | {r['method']} | "
                f"{r['map']} | {r['pairs']} | {r['similarity']:.3f} | {r['fraction']:.0%} | "
                + " | ".join(f"{r[name]:.4f}" for name in MASKS)
                + f" | {r['wins_random']:.0%} / {r['wins_shifted']:.0%} / "
                f"{r['wins_noise']:.0%} |")
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
