"""After training: embed every item, export, evaluate the split, build and save the index.

`evaluate_and_index(workdir)` is what `python -m train` runs after the loop and what
`--eval_only` runs alone; `rebuild_index(workdir)` rebuilds the index from the export
without the model.
"""

import logging

import numpy as np

from jaxretrieval.data.sources import load_dataset
from jaxretrieval.data.splits import split_dataset
from jaxretrieval.embed import (EmbeddingExport, Embedder, load_embedding_export,
                                save_embedding_export)
from jaxretrieval.index import Index
from jaxretrieval.metrics import (calibrate_match_thresholds, pair_similarities, pixel_embeddings,
                                  retrieval_metrics)
from jaxretrieval.workdir import Workdir, write_json_atomically

logger = logging.getLogger(__name__)

PIXEL_PREFIX = "pixels/"


def evaluate_and_index(workdir: str) -> dict:
    """Embeds the whole dataset with the latest checkpoint, writes `DIR/embeddings/`,
    `DIR/metrics.json` and `DIR/index/`; returns the metrics."""
    wd = Workdir(workdir)
    embedder = Embedder.from_workdir(workdir)
    config = embedder.config
    dataset = load_dataset(config)
    logger.info("embedding %d images with the checkpoint of step %d", len(dataset),
                 embedder.checkpoint_step)
    embeddings = embed_dataset(embedder, dataset)

    split = split_dataset(config, dataset)
    metrics = evaluate_split(embeddings, dataset.labels, split)
    metrics.update({PIXEL_PREFIX + name: value
                    for name, value in evaluate_pixels(dataset, split).items()})
    thresholds = calibrate_match_thresholds(
        *split_pair_similarities(embeddings, dataset.labels, split),
        target_precision=config.match_target_precision)
    metrics.update(checkpoint_step=embedder.checkpoint_step, split=config.split,
                   dataset=config.dataset, match_thresholds=thresholds)

    save_embedding_export(wd.embeddings, EmbeddingExport(
        embeddings=embeddings, rows=np.arange(len(dataset), dtype=np.int64),
        labels=dataset.labels.astype(np.int64), keys=list(dataset.keys),
        sources=list(dataset.sources),
        metadata={"checkpoint_step": embedder.checkpoint_step,
                  "model_config_hash": embedder.model_config_hash,
                  "embedding_dim": embedder.embedding_dim, "count": len(dataset),
                  "dataset": config.dataset, "data_dir": config.data_dir,
                  "match_thresholds": thresholds}))
    write_json_atomically(wd.metrics_path, metrics)

    rebuild_index(workdir)
    return metrics


def embed_dataset(embedder: Embedder, dataset, chunk: int = 4096) -> np.ndarray:
    """float32 [len(dataset), d], read and embedded chunk by chunk."""
    out = np.empty((len(dataset), embedder.embedding_dim), np.float32)
    for start in range(0, len(dataset), chunk):
        rows = np.arange(start, min(start + chunk, len(dataset)))
        out[rows] = embedder.embed_uint8(dataset.images(rows))
    return out


def evaluate_split(embeddings: np.ndarray, labels: np.ndarray, split) -> dict:
    """Recall@1/5/10, MAP@R and R-precision of the split's queries against its gallery."""
    return retrieval_metrics(embeddings[split.query_rows], labels[split.query_rows],
                             embeddings[split.gallery_rows], labels[split.gallery_rows],
                             query_gallery_rows=split.query_gallery_rows)


def split_pair_similarities(embeddings, labels, split):
    """(similarities, same) of the split's query-gallery pairs, for match calibration."""
    return pair_similarities(embeddings[split.query_rows], labels[split.query_rows],
                             embeddings[split.gallery_rows], labels[split.gallery_rows],
                             query_gallery_rows=split.query_gallery_rows)


def evaluate_pixels(dataset, split) -> dict:
    """The raw-pixel baseline on the same split: cosine of mean-centred pixels."""
    eval_rows = np.union1d(split.query_rows, split.gallery_rows)  # sorted; only these are read
    pixels = pixel_embeddings(dataset.images(eval_rows))
    queries = np.searchsorted(eval_rows, split.query_rows)
    gallery = np.searchsorted(eval_rows, split.gallery_rows)
    return retrieval_metrics(pixels[queries], dataset.labels[split.query_rows],
                             pixels[gallery], dataset.labels[split.gallery_rows],
                             query_gallery_rows=split.query_gallery_rows)


def rebuild_index(workdir: str) -> Index:
    """Builds `DIR/index/` from the embedding export alone (no model needed)."""
    wd = Workdir(workdir)
    export = load_embedding_export(wd.embeddings)
    meta = export.metadata
    index = Index.build(export.embeddings, export.keys, sources=export.sources,
                        checkpoint_step=meta["checkpoint_step"],
                        model_config_hash=meta["model_config_hash"],
                        extra_manifest={"dataset": meta.get("dataset"),
                                        "data_dir": meta.get("data_dir", ""),
                                        "match_thresholds": meta.get("match_thresholds")})
    index.save(wd.index)
    logger.info("index of %d items saved to %s", index.count, wd.index)
    return index


def metrics_table(metrics: dict) -> str:
    """The model's metrics beside the raw-pixel baseline's, one row per metric."""
    names = [n for n in ("recall@1", "recall@5", "recall@10", "map@r", "r_precision")
             if n in metrics]
    lines = [f"{'metric':<12} {'model':>8} {'pixels':>8}"]
    for name in names:
        pixel = metrics.get(PIXEL_PREFIX + name, float("nan"))
        lines.append(f"{name:<12} {metrics[name]:>8.4f} {pixel:>8.4f}")
    return "\n".join(lines)

