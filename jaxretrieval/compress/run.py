"""`compress_workdir`: a trained workdir -> a new workdir holding its compressed model,
embedded, evaluated and indexed like any other (what `jaxretrieval compress` runs).

The new workdir is written in a temporary folder of its own beside it (`.NAME.tmp-*/`) and
renamed into place only once evaluated and indexed, so a failure leaves no half-written
workdir behind, and two compressions to one output do not remove each other's files.
"""

import logging
import os
import shutil

import jax
import numpy as np

from jaxretrieval import runtime
from jaxretrieval.checkpoint import CheckpointStore, open_for_reading
from jaxretrieval.compress.finetune import fine_tuner
from jaxretrieval.compress.methods import get_method
from jaxretrieval.compress.base import Source, tree_bytes
from jaxretrieval.compress.stored import FORMAT_VERSION, compression_path, read_compression
from jaxretrieval.config import config_to_json, validate_config
from jaxretrieval.data.sources import load_dataset
from jaxretrieval.data.splits import split_dataset
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.fileio import (give_ordinary_mode, new_sibling_directory,
                               write_file_atomically, write_json_atomically)
from jaxretrieval.pipeline import evaluate_and_index
from jaxretrieval.workdir import Workdir

logger = logging.getLogger(__name__)


def compress_workdir(source_dir: str, output_dir: str, method: str, options: dict | None = None,
                     *, on_progress=None, on_export_progress=None) -> dict:
    """Compresses the latest checkpoint of the workdir `source_dir` with `method` (a key of
    `jaxretrieval.compress.METHODS`) and its `options` (the rest at their defaults) into
    the new workdir `output_dir`, then embeds the dataset, evaluates the source run's split
    (`output_dir/metrics.json`, the same keys) and builds the index, whose manifest records
    `compression: {method, options, model_bytes, source_model_bytes}`.

    Refuses an `output_dir` that exists and is not empty. `on_progress` gets the
    fine-tuning's progress events, `on_export_progress` the embedding export's. Returns
    the new workdir's compression record (`compression.json`) with its `metrics`.
    """
    chosen = get_method(method)
    options = chosen.checked_options(options)
    source, output = os.path.abspath(source_dir), os.path.abspath(output_dir)
    _check_output(source, output)
    if read_compression(source) is not None:
        raise JaxRetrievalError(
            f"{source_dir!r} holds a compressed model already; compress its source workdir "
            "(compression.json names it) instead")
    config = Workdir(source).read_config()
    validate_config(config)
    chosen.check_source(config)
    runtime.setup(config.global_batch_size)

    step, full_state = _restore_source(source)
    variables = {"params": full_state["params"]["model"],
                 "batch_stats": full_state["batch_stats"]}
    dataset = load_dataset(config)
    split = split_dataset(config, dataset)

    def train_images(n: int) -> np.ndarray:
        rows = np.random.default_rng(config.seed).permutation(split.train_rows)[:n]
        return dataset.images(np.sort(rows))

    compressed = chosen.compress(Source(
        config=config, variables=variables, checkpoint_step=step,
        fine_tune=fine_tuner(dataset, split, full_state["params"]["loss"], first_step=step,
                             on_progress=on_progress),
        train_images=train_images), options)
    stored = chosen.pack(jax.device_get(compressed.variables), options)
    record = {"format": FORMAT_VERSION, "method": method, "options": options,
              "model_bytes": tree_bytes(stored), "source_model_bytes": tree_bytes(variables),
              "source_workdir": source, "source_checkpoint_step": step,
              "facts": compressed.facts}

    # A folder of its own, so that another compression to the same output at the same time
    # neither removes this one's files nor has its own removed.
    try:
        partial = new_sibling_directory(output)
    except OSError as err:
        raise JaxRetrievalError(f"cannot write the workdir beside {output!r} ({err.strerror}); "
                                "choose an output path in a folder you can write to") from None
    try:
        give_ordinary_mode(partial)  # a workdir like any other, not private to this user
        _write_workdir(partial, compressed.config, stored, step, record)
        metrics = evaluate_and_index(partial, on_progress=on_export_progress)
        _check_output(source, output)  # nothing was written there in the meantime
        if os.path.isdir(output):
            os.rmdir(output)  # empty: checked just now
        os.rename(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("%s: %s model of %d bytes (source %d), MAP@R %.4f", output, method,
                record["model_bytes"], record["source_model_bytes"], metrics["map@r"])
    return dict(record, metrics=metrics)


def _check_output(source: str, output: str) -> None:
    if output == source:
        raise JaxRetrievalError("--output must be a new workdir, not the source workdir")
    if os.path.isfile(output) or (os.path.isdir(output) and os.listdir(output)):
        raise JaxRetrievalError(
            f"--output {output!r} exists and is not empty; pass a new directory (nothing "
            "there is changed)")


def _restore_source(source: str):
    store = open_for_reading(source)
    try:
        step = store.latest_step()
        if step is None:
            raise JaxRetrievalError(
                f"no checkpoint in {source!r}: train it first with `python -m train "
                f"--workdir {source}`")
        return int(step), store.restore(step)
    finally:
        store.close()


def _write_workdir(directory: str, config, stored: dict, step: int, record: dict) -> None:
    """config.json, compression.json and the stored model as the checkpoint of `step`."""
    wd = Workdir(directory)
    write_file_atomically(wd.config_path, config_to_json(config))
    write_json_atomically(compression_path(directory), record)
    state = {"params": {"model": stored["params"]}, "batch_stats": stored["batch_stats"]}
    with CheckpointStore(wd.checkpoints, asynchronous=False) as store:
        store.save(step, state)
        store.wait()

