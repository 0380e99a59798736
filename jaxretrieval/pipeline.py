"""After training: embed every item, export, evaluate the split, report it (metrics.json,
metrics.jsonl, TensorBoard, loss.png, results.png), build and save the index; and the
evaluation during training (`TrainingEvaluator`).

`evaluate_and_index(workdir)` is what `python -m train` runs after the loop and what
`--eval_only` runs alone; `embed_corpus(workdir)` embeds any dataset with the run's model;
`rebuild_index(workdir)` rebuilds the index from the export without the model.
"""

import json
import logging
import os

import jax
import numpy as np

from jaxretrieval import parallel, plots, runtime
from jaxretrieval.compress.stored import manifest_entry, read_compression
from jaxretrieval.data.sources import load_dataset
from jaxretrieval.data.splits import split_dataset
from jaxretrieval.embed import Embedder
from jaxretrieval.export import (DEFAULT_CHUNK_SIZE, load_embedding_export,
                                 update_export_metadata, write_embedding_export)
from jaxretrieval.index import Index
from jaxretrieval.metrics import (calibrate_match_thresholds, pair_similarities, pixel_embeddings,
                                  retrieval_metrics_and_neighbours)
from jaxretrieval.fileio import write_json_atomically
from jaxretrieval.reporting import RETRIEVAL_METRICS, MetricWriter
from jaxretrieval.workdir import Workdir

logger = logging.getLogger(__name__)

PIXEL_PREFIX = "pixels/"
# DIR/results.png: this many of the split's queries, each with this many nearest hits.
RESULT_QUERIES, RESULT_HITS = 8, 8


def evaluate_and_index(workdir: str, *, on_progress=None) -> dict:
    """Embeds the whole dataset with the latest checkpoint, writes `DIR/embeddings/`,
    `DIR/metrics.json`, the reports (`report_evaluation`) and `DIR/index/`; returns the
    metrics.

    In a multi-process run every process calls this: all of them embed, process 0 alone
    evaluates and writes the index, and the others return what it wrote.
    """
    wd = Workdir(workdir)
    runtime.setup(wd.read_config().embed_batch_size)
    embedder = Embedder.from_workdir(workdir)
    config = embedder.config
    # Several processes: each decodes only the images it embeds (process 0 the split's too).
    dataset = load_dataset(config, decode_now=jax.process_count() == 1)
    write_embedding_export(wd.embeddings, embedder, dataset, on_progress=on_progress,
                           metadata={"dataset": config.dataset, "data_dir": config.data_dir})
    if parallel.is_primary_process():
        export = load_embedding_export(wd.embeddings)
        embeddings = export.embeddings
        split = split_dataset(config, dataset)
        metrics, neighbours = evaluate_split_and_neighbours(
            embeddings, dataset.labels, split, num_neighbours=RESULT_HITS)
        metrics.update({PIXEL_PREFIX + name: value
                        for name, value in evaluate_pixels(dataset, split).items()})
        thresholds = calibrate_match_thresholds(
            *split_pair_similarities(embeddings, dataset.labels, split),
            target_precision=config.match_target_precision)
        metrics.update(checkpoint_step=embedder.checkpoint_step, split=config.split,
                       dataset=config.dataset, match_thresholds=thresholds)
        if dataset.faces_not_found is not None:  # aligned faces: images without one
            metrics["faces_not_found"] = dataset.faces_not_found
        update_export_metadata(wd.embeddings, match_thresholds=thresholds)
        export.metadata["match_thresholds"] = thresholds  # as just written to export.json
        write_json_atomically(wd.metrics_path, metrics)
        # The index first: it must match the export and thresholds just written, and a
        # report that cannot be drawn is no reason to leave it behind them.
        rebuild_index(workdir, export=export)
        try:
            report_evaluation(workdir, config, metrics, dataset, split, neighbours)
        except Exception:  # plots and event files are for people, not for the run's result
            logger.exception("could not write this evaluation's reports to %s", workdir)
    parallel.barrier("evaluated")
    with open(wd.metrics_path) as f:
        return json.load(f)


def embed_corpus(workdir: str, *, dataset: str | None = None, data_dir: str | None = None,
                 output: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 on_progress=None, video_rate: float | None = None,
                 video_scene_threshold: float | None = None) -> dict:
    """Embeds a dataset of any size (default: the run's own) with the workdir's latest
    checkpoint into an export (default `DIR/embeddings/`, which `rebuild_index` reads), on
    every device of every process; an interrupted run resumes where it stopped.

    The match thresholds evaluation calibrated for this checkpoint are a property of the
    model, so they are carried into the export. `video_rate` and `video_scene_threshold`
    set how a `video:PATH` dataset's frames are sampled (default: the config's). Returns the
    export's metadata.
    """
    wd = Workdir(workdir)
    runtime.setup(wd.read_config().embed_batch_size)
    embedder = Embedder.from_workdir(workdir)
    config = embedder.config.copy_and_resolve_references()
    if dataset is not None:
        config.dataset = dataset
    if data_dir is not None:
        config.data_dir = data_dir
    if video_rate is not None:
        config.video_rate = float(video_rate)
    if video_scene_threshold is not None:
        config.video_scene_threshold = float(video_scene_threshold)
    config.cache_max_bytes = 0  # a corpus is read once: never hold it in memory
    corpus = load_dataset(config)
    thresholds = None
    if os.path.isfile(wd.metrics_path):
        with open(wd.metrics_path) as f:
            evaluated = json.load(f)
        if evaluated.get("checkpoint_step") == embedder.checkpoint_step:
            thresholds = evaluated.get("match_thresholds")
    return write_embedding_export(
        output or wd.embeddings, embedder, corpus, chunk_size=chunk_size,
        on_progress=on_progress,
        metadata={"dataset": config.dataset, "data_dir": config.data_dir,
                  "match_thresholds": thresholds})


def evaluate_split(embeddings: np.ndarray, labels: np.ndarray, split, *, rows=None) -> dict:
    """Recall@1/5/10, MAP@R and R-precision of the split's queries against its gallery.

    `embeddings[i]` is the embedding of the dataset's row `rows[i]` (`rows`, sorted, holds
    at least `evaluation_rows(split)`); by default of row i.
    """
    return evaluate_split_and_neighbours(embeddings, labels, split, rows=rows,
                                         num_neighbours=0)[0]


def evaluate_split_and_neighbours(embeddings, labels, split, *, rows=None,
                                  num_neighbours: int = RESULT_HITS):
    """`evaluate_split`, and the nearest gallery items of every query from the same ranking
    (a metrics.Neighbours, its rows positions in `split.gallery_rows`)."""
    if rows is None:
        queries, gallery = split.query_rows, split.gallery_rows
    else:
        queries = np.searchsorted(rows, split.query_rows)
        gallery = np.searchsorted(rows, split.gallery_rows)
    return retrieval_metrics_and_neighbours(
        embeddings[queries], labels[split.query_rows], embeddings[gallery],
        labels[split.gallery_rows], query_gallery_rows=split.query_gallery_rows,
        num_neighbours=num_neighbours)


def evaluation_rows(split) -> np.ndarray:
    """The dataset rows an evaluation of `split` embeds: its queries and gallery, sorted."""
    return np.union1d(split.query_rows, split.gallery_rows)


class TrainingEvaluator:
    """Evaluates the split during training (`eval_every_steps`) as the final evaluation
    does, from the model's variables in the train state: only the split's images are
    embedded, by one Embedder whose compiled programs every evaluation reuses.

    In a run of several processes, process 0 evaluates on its own devices while the others
    wait for it; they get None.
    """

    def __init__(self, config, dataset, split):
        self._config, self._dataset, self._split = config, dataset, split
        self._rows = evaluation_rows(split)
        self._embedder = None

    def __call__(self, variables, *, step: int) -> dict | None:
        metrics = None
        if parallel.is_primary_process():
            if self._embedder is None:
                self._embedder = Embedder(self._config, variables, checkpoint_step=step)
            else:
                self._embedder.set_variables(variables, checkpoint_step=step)
            embeddings = self._embedder.embed_uint8(self._dataset.images(self._rows))
            metrics = evaluate_split(embeddings, self._dataset.labels, self._split,
                                     rows=self._rows)
            logger.info("step %d: recall@1 %.4f, MAP@R %.4f", step, metrics["recall@1"],
                        metrics["map@r"])
        parallel.barrier(f"evaluated step {step}")
        return metrics


def split_pair_similarities(embeddings, labels, split):
    """(similarities, same) of the split's query-gallery pairs, for match calibration."""
    return pair_similarities(embeddings[split.query_rows], labels[split.query_rows],
                             embeddings[split.gallery_rows], labels[split.gallery_rows],
                             query_gallery_rows=split.query_gallery_rows)


def evaluate_pixels(dataset, split) -> dict:
    """The raw-pixel baseline on the same split: cosine of mean-centred pixels."""
    rows = evaluation_rows(split)  # only these are read
    return evaluate_split(pixel_embeddings(dataset.images(rows)), dataset.labels, split,
                          rows=rows)


def report_evaluation(workdir: str, config, metrics: dict, dataset, split, neighbours, *,
                      num_queries: int = RESULT_QUERIES) -> None:
    """After the final evaluation: its record in metrics.jsonl (replacing one of the same
    checkpoint step) and TensorBoard, `DIR/loss.png` from metrics.jsonl, and
    `DIR/results.png`, `num_queries` of the split's queries with their nearest hits."""
    wd = Workdir(workdir)
    with MetricWriter(workdir, tensorboard=config.tensorboard) as writer:
        writer.write_evaluation(metrics["checkpoint_step"], metrics, replace=True)
    if not plots.plot_training(wd.read_train_log(), wd.loss_plot_path):
        logger.info("no training records in metrics.jsonl: no loss.png")
    write_result_grid(wd.results_plot_path, dataset, split, neighbours, num_queries=num_queries)


def write_result_grid(path: str, dataset, split, neighbours, *,
                      num_queries: int = RESULT_QUERIES) -> list:
    """Draws `num_queries` of the split's queries, spread evenly over them, each beside its
    nearest hits of the evaluation's ranking (`neighbours`, not searched again), into the
    PNG at `path`; returns the rows drawn (plots.ResultRow)."""
    picked = np.unique(np.linspace(0, len(split.query_rows) - 1,
                                   num=min(num_queries, len(split.query_rows))).round()
                       .astype(np.int64))
    query_rows = split.query_rows[picked]
    hit_rows = split.gallery_rows[neighbours.rows[picked]]  # dataset rows, [queries, hits]
    hit_images = dataset.images(hit_rows.ravel()).reshape(hit_rows.shape + (
        dataset.image_size, dataset.image_size, dataset.channels))
    rows = [plots.ResultRow(
        query_image=query_image, query_key=dataset.keys[query],
        hits=[plots.Hit(image=image, key=dataset.keys[hit], score=float(score),
                        same_class=bool(dataset.labels[hit] == dataset.labels[query]))
              for image, hit, score in zip(images, hits, scores)])
        for query, query_image, images, hits, scores in zip(
            query_rows, dataset.images(query_rows), hit_images, hit_rows,
            neighbours.scores[picked])]
    plots.plot_results(rows, path)
    return rows


def rebuild_index(workdir: str, num_shards: int | None = None, export=None,
                  embedding_dtype: str | None = None):
    """Builds `DIR/index/` from the embedding export alone (no model needed) and returns it:
    an Index, or with `num_shards` > 1 a ShardedIndex; it replaces the index there,
    whichever layout.
    `num_shards=None` keeps the shard count of the index there (1 when there is none), so
    re-evaluating a run does not undo its sharding. `export`: that export, when the caller
    has already read it (evaluation), so it is not read twice. `embedding_dtype`: float32,
    float16 or int8, the precision the index stores and scores its rows in
    (jaxretrieval.index.precision); None keeps that of the index there (float32 when there
    is none), so re-evaluating or resharding a run does not undo its compact rows."""
    from jaxretrieval.index import (ShardedIndex, checked_num_shards, embedding_dtype_on_disk,
                                    num_shards_on_disk, save_index)

    wd = Workdir(workdir)
    num_shards = checked_num_shards(num_shards_on_disk(wd.index) if num_shards is None
                                    else num_shards)
    if embedding_dtype is None:
        embedding_dtype = embedding_dtype_on_disk(wd.index)
    if export is None:
        export = load_embedding_export(wd.embeddings)
    meta = export.metadata
    extra = {"dataset": meta.get("dataset"), "data_dir": meta.get("data_dir", ""),
             "source_roots": meta.get("source_roots"), "video": meta.get("video"),
             "match_thresholds": meta.get("match_thresholds")}
    compression = read_compression(workdir)
    if compression is not None:  # what the model embedding this index was made of
        extra["compression"] = manifest_entry(compression)
    arguments = dict(sources=export.sources, checkpoint_step=meta["checkpoint_step"],
                     model_config_hash=meta["model_config_hash"], extra_manifest=extra,
                     embedding_dtype=embedding_dtype)
    if num_shards > 1:
        index = ShardedIndex.build(export.embeddings, export.keys, num_shards=num_shards,
                                   **arguments)
    else:
        index = Index.build(export.embeddings, export.keys, **arguments)
    save_index(index, wd.index)
    logger.info("index of %d items in %d shard(s) saved to %s", index.count, num_shards,
                wd.index)
    return index


def metrics_table(metrics: dict) -> str:
    """The model's metrics beside the raw-pixel baseline's, one row per metric."""
    names = [n for n in RETRIEVAL_METRICS if n in metrics]
    lines = [f"{'metric':<12} {'model':>8} {'pixels':>8}"]
    for name in names:
        pixel = metrics.get(PIXEL_PREFIX + name, float("nan"))
        lines.append(f"{name:<12} {metrics[name]:>8.4f} {pixel:>8.4f}")
    return "\n".join(lines)

