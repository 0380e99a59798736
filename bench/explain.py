"""Faithfulness of explanations: blanking the hottest pixels against blanking random ones.

    python -m bench.explain --workdir runs/faces --workdir runs/faces_scratch \
        [--fraction 0.1] [--max-pairs N] [--seed 0] [--markdown FILE]

For each workdir (a run on a class-per-folder face set, such as yalefaces with
`configs/faces.py` or `configs/faces_scratch.py`), the pairs are every two images of the
same identity among the run's evaluation identities (the split's queries), as the model sees
them (a face model's aligned chips). Each pair is explained (`jaxretrieval.explain`); then,
in both images at once, the `--fraction` of pixels with the most heat (the heatmap upsampled
as the overlays are) is set to mid-grey (128, about zero after either input normalisation),
and the pair's similarity is measured again; the same is done with as many pixels chosen
at random (seeded). A faithful explanation's pixels lower the similarity more. Scattered
random pixels and the smooth regions an upsampled heatmap picks differ in shape as well as
in place, so a third mask separates the two: the hottest pixels of a random heatmap of the
same resolution (normal noise), upsampled alike: the same kind of region, placed at random.
A fourth blanks the pixels with the least heat: an informative ranking puts the hottest
pixels' drop above the coldest's.

The table gives, per model: the method, the feature map's size, the pairs, the mean
similarity, the mean drop for each mask, and the share of pairs whose drop is larger for the
explanation's hottest pixels than for random pixels, and than for the random heatmap's.
"""

import argparse
import datetime
import platform

import numpy as np

from bench.report import emit

GREY = 128


def same_identity_pairs(labels, rows, max_pairs, rng):
    """Every (i, j), i < j, of `rows` with equal labels; a seeded sample of `max_pairs`
    of them when there are more."""
    pairs = [(a, b) for k, a in enumerate(rows) for b in rows[k + 1:] if labels[a] == labels[b]]
    pairs = np.asarray(pairs, np.int64)
    if max_pairs and len(pairs) > max_pairs:
        pairs = pairs[np.sort(rng.choice(len(pairs), max_pairs, replace=False))]
    return pairs


def blanked(images, masks):
    out = images.copy()
    out[masks] = GREY
    return out


def hottest_masks(heatmaps, size, fraction):
    """bool [n, size, size]: per image the `fraction` of pixels with the most upsampled heat."""
    from jaxretrieval.explain import upsample

    count = int(round(fraction * size * size))
    masks = np.zeros((len(heatmaps), size, size), bool)
    for mask, heat in zip(masks, heatmaps):
        grown = upsample(heat, size).ravel()
        mask.ravel()[np.argsort(-grown, kind="stable")[:count]] = True
    return masks


def random_masks(n, size, fraction, rng):
    count = int(round(fraction * size * size))
    masks = np.zeros((n, size * size), bool)
    for mask in masks:
        mask[rng.choice(size * size, count, replace=False)] = True
    return masks.reshape(n, size, size)


def pair_similarities(embedder, images_a, images_b):
    return np.sum(embedder.embed_uint8(images_a) * embedder.embed_uint8(images_b), axis=-1)


def measure(workdir, fraction, max_pairs, seed):
    from jaxretrieval.data.sources import load_dataset
    from jaxretrieval.data.splits import split_dataset
    from jaxretrieval.embed import Embedder
    from jaxretrieval.explain import Explainer

    embedder = Embedder.from_workdir(workdir)
    config = embedder.config
    dataset = load_dataset(config)
    rows = np.asarray(split_dataset(config, dataset).query_rows)
    rng = np.random.default_rng(seed)
    pairs = same_identity_pairs(dataset.labels, list(rows), max_pairs, rng)
    images_a, images_b = dataset.images(pairs[:, 0]), dataset.images(pairs[:, 1])
    explainer = Explainer.from_embedder(embedder)
    similarities, heat_a, heat_b = explainer.explain_uint8(images_a, images_b)
    size = config.image_size
    drops = {}
    for name, (mask_a, mask_b) in {
            "hottest": (hottest_masks(heat_a, size, fraction),
                        hottest_masks(heat_b, size, fraction)),
            "random": (random_masks(len(pairs), size, fraction, rng),
                       random_masks(len(pairs), size, fraction, rng)),
            "coldest": (hottest_masks(-heat_a, size, fraction),
                        hottest_masks(-heat_b, size, fraction)),
            "random_heat": (hottest_masks(rng.normal(size=heat_a.shape), size, fraction),
                            hottest_masks(rng.normal(size=heat_b.shape), size, fraction))
            }.items():
        after = pair_similarities(embedder, blanked(images_a, mask_a),
                                  blanked(images_b, mask_b))
        drops[name] = similarities - after
    return {"model": f"{config.model.name} ({config.model.pooling} pooling)",
            "method": explainer.method, "pairs": len(pairs),
            "feature_map": "x".join(map(str, explainer.feature_shape)),
            "similarity": float(similarities.mean()),
            "hottest": float(drops["hottest"].mean()), "random": float(drops["random"].mean()),
            "random_heat": float(drops["random_heat"].mean()),
            "coldest": float(drops["coldest"].mean()),
            "wins": float(np.mean(drops["hottest"] > drops["random"])),
            "wins_heat": float(np.mean(drops["hottest"] > drops["random_heat"]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", action="append", required=True,
                        help="a trained workdir (repeat for more models)")
    parser.add_argument("--fraction", type=float, default=0.1,
                        help="share of each image's pixels blanked (default %(default)s)")
    parser.add_argument("--max-pairs", type=int, default=0,
                        help="at most this many pairs per model (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args()
    from jaxretrieval import runtime

    runtime.setup()
    lines = [f"Explanation faithfulness ({platform.machine()}, "
             f"{datetime.date.today().isoformat()}): blanking {args.fraction:.0%} of each "
             "image's pixels, the hottest or random ones; mean drop of the pair's similarity.",
             "",
             "| workdir | model | method | feature map | pairs | mean similarity | "
             "drop, hottest pixels | drop, random pixels | drop, random heatmap's hottest | "
             "drop, coldest pixels | pairs: hottest > random / > random heatmap |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for workdir in args.workdir:
        r = measure(workdir, args.fraction, args.max_pairs, args.seed)
        lines.append(f"| {workdir} | {r['model']} | {r['method']} | {r['feature_map']} | "
                     f"{r['pairs']} | {r['similarity']:.3f} | {r['hottest']:.4f} | "
                     f"{r['random']:.4f} | {r['random_heat']:.4f} | {r['coldest']:.4f} | "
                     f"{r['wins']:.0%} / "
                     f"{r['wins_heat']:.0%} |")
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
