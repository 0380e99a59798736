"""Training: the train state, the per-device step, `build_training(config, devices)`, the
loop `train(config, workdir)`, and `train_and_evaluate(config, workdir)`, which is what
`python -m train` runs.

The loop reads top to bottom in sections: devices, workdir, data, model and update step,
checkpoint, loop. Progress goes to `logging`, to `DIR/metrics.jsonl` and TensorBoard
(`reporting.MetricWriter`), and to an optional `on_progress(dict)` callback that entry
points render (a progress bar). With `eval_every_steps`, the loop also evaluates retrieval
as it goes (`pipeline.TrainingEvaluator`).
"""

import copy
import dataclasses
import logging
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxretrieval import parallel, runtime
from jaxretrieval.checkpoint import CheckpointStore, latest_checkpoint_step
from jaxretrieval.compress.stored import COMPRESSION_FILE
from jaxretrieval.config import (MODEL_KEYS, RUN_KEYS, config_to_json, model_config_hash,
                                 validate_config)
from jaxretrieval.data.augment import augment_batch, preprocess
from jaxretrieval.data.sources import load_dataset
from jaxretrieval.data.splits import batch_rows, class_balanced_batch_rows, split_dataset
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.losses import gather_batch, get_loss, with_projection_head
from jaxretrieval.models import build_model
from jaxretrieval.models.pretrained import configured_for_init, initial_variables
from jaxretrieval.fileio import write_file_atomically
from jaxretrieval.pipeline import TrainingEvaluator, evaluate_and_index
from jaxretrieval.reporting import MetricWriter
from jaxretrieval.workdir import Workdir

logger = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # base key; each step and device folds in its own numbers


def make_optimizer(config):
    """AdamW with linear warm-up and cosine decay; returns (optimizer, schedule).

    The backbone's step is the schedule's times `backbone_lr_multiplier`, and zero for the
    first `frozen_backbone_steps` steps; everything else (the head, the loss's parameters)
    takes the schedule itself. Its state has the same structure as `optax.adamw`'s whatever
    the fine-tuning keys say, so a run resumes with them changed.
    """
    steps = max(config.num_train_steps, 1)  # a run of no steps still builds its state
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate,
        # optax counts the warm-up inside decay_steps; keep at least one decaying step.
        warmup_steps=min(config.warmup_steps, steps - 1),
        decay_steps=steps, end_value=config.learning_rate * 0.01)
    if config.decay_norm_and_bias:
        decay_mask = lambda params: jax.tree.map(lambda p: True, params)
    else:
        # Decay weights only: not biases, BatchNorm scales or GeM's exponent (all 0- or 1-D).
        decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    multiplier, frozen = config.backbone_lr_multiplier, config.frozen_backbone_steps
    backbone_factor = lambda count: jnp.where(count < frozen, 0.0, multiplier)
    optimizer = optax.chain(  # optax.adamw, with its last part scaling the backbone apart
        optax.scale_by_adam(),
        optax.add_decayed_weights(config.weight_decay, decay_mask),
        scale_by_learning_rate_per_part(schedule, backbone_factor))
    return optimizer, schedule


# Where the backbone's parameters sit in the train state's params.
BACKBONE_PATH = ("model", "backbone")


def is_backbone(key_path) -> bool:
    names = tuple(str(getattr(k, "key", k)) for k in key_path[:len(BACKBONE_PATH)])
    return names == BACKBONE_PATH


def scale_by_learning_rate_per_part(schedule, backbone_factor) -> optax.GradientTransformation:
    """`optax.scale_by_learning_rate(schedule)`, with the same state, whose step for the
    backbone's parameters (BACKBONE_PATH) is also multiplied by `backbone_factor(count)`.

    One transformation rather than optax.multi_transform over two AdamWs: the same result
    (Adam's moments do not depend on the step size), with the optimiser state of a plain
    run, so checkpoints do not depend on the fine-tuning keys.
    """
    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        step_size = -schedule(state.count)
        backbone_step_size = step_size * backbone_factor(state.count)
        updates = jax.tree_util.tree_map_with_path(
            lambda path, g: jnp.array(backbone_step_size if is_backbone(path) else step_size,
                                      dtype=g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def create_train_state(config, model, loss, num_classes, optimizer, *,
                       load_init: bool = True) -> TrainState:
    """A fresh state on the host (numpy leaves), from `config.seed`, with the model's values
    from `config.init_from`'s file when it names one and `load_init` is true.

    `params` holds the model's ("model") and the loss's learned parameters ("loss").
    """
    init_rng, loss_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
    variables = jax.jit(lambda rng: model.init(rng, dummy, train=False))(init_rng)
    if config.init_from and load_init:
        variables = initial_variables(config, variables)
    params = {"model": variables["params"],
              "loss": loss.init(loss_rng, num_classes, config.embedding_dim, config)}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       batch_stats=variables.get("batch_stats", {}),
                       opt_state=optimizer.init(params), rng=train_rng)
    return jax.tree.map(np.asarray, state)


def make_train_step(model, loss, optimizer, config) -> Callable:
    """The per-device step: free of any parallel wrapper, collectives over DEVICE_AXIS."""
    augment_config = config.augment

    def train_step(state: TrainState, batch):
        images = preprocess(batch["images"])
        if augment_config.enabled:
            # One key per example of the global batch, so the run does not depend on how
            # many devices share the batch.
            per_device = images.shape[0]
            keys = jax.random.split(jax.random.fold_in(state.rng, state.step),
                                    config.global_batch_size)
            keys = jax.lax.dynamic_slice_in_dim(
                keys, jax.lax.axis_index(parallel.DEVICE_AXIS) * per_device, per_device)
            images = augment_batch(keys, images, augment_config)

        def loss_fn(params):
            embeddings, updates = model.apply(
                {"params": params["model"], "batch_stats": state.batch_stats}, images,
                train=True, mutable=["batch_stats"])
            # Every device scores the whole global batch, so pair and triplet losses find
            # their positives and negatives on all devices (the pmean below then yields the
            # gradient of that one global loss).
            embeddings, labels = gather_batch(embeddings, batch["labels"], parallel.DEVICE_AXIS)
            value = loss.apply(params["loss"], embeddings, labels, config)
            return value, updates.get("batch_stats", {})

        (value, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = jax.lax.pmean(grads, parallel.DEVICE_AXIS)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": jax.lax.pmean(value, parallel.DEVICE_AXIS)}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step


@dataclasses.dataclass(frozen=True)
class Training:
    """What a training run is made of, from `build_training`."""
    model: Any  # the flax module, its BatchNorm statistics averaged over the devices
    loss: Any  # a losses.Loss, with the projection head when the config asks for one
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule  # the learning rate at each step
    initial_state: TrainState  # fresh, on the host (numpy leaves)
    step: Callable  # (replicated state, sharded batch) -> (state, metrics), over the devices


def build_training(config, devices, num_classes: int, *, load_init: bool = True) -> Training:
    """The model, loss, optimiser, initial state and data-parallel step of `config` over
    `devices`, for a dataset of `num_classes` training classes.

    With `config.init_from` (and `load_init`), the initial state holds the file's values;
    the config must already hold the keys the file decides
    (`jaxretrieval.models.pretrained.configured_for_init`, which `train` applies). A run
    that resumes from a checkpoint passes load_init=False: the file is not read.
    """
    loss = get_loss(config.loss)
    if config.projection_head:
        loss = with_projection_head(loss, config.projection_head)
    model = build_model(config, bn_axis_name=parallel.DEVICE_AXIS)
    optimizer, schedule = make_optimizer(config)
    initial_state = create_train_state(config, model, loss, num_classes, optimizer,
                                       load_init=load_init)
    step = parallel.data_parallel(make_train_step(model, loss, optimizer, config),
                                  config.parallel, devices)
    return Training(model=model, loss=loss, optimizer=optimizer, schedule=schedule,
                    initial_state=initial_state, step=step)


def train_and_evaluate(config, workdir: str, *, on_progress: Callable | None = None,
                       on_export_progress: Callable | None = None) -> dict:
    """Trains (resuming from the workdir's latest checkpoint), then embeds every item,
    evaluates, exports, reports (metrics.jsonl, TensorBoard, loss.png, results.png) and
    indexes (`pipeline.evaluate_and_index`).

    `on_progress` receives the training's progress events, `on_export_progress` the
    embedding export's. Returns the metrics written to `DIR/metrics.json`.
    """
    train(config, workdir, on_progress=on_progress)
    return evaluate_and_index(workdir, on_progress=on_export_progress)


def train(config, workdir: str, *, on_progress: Callable | None = None) -> None:
    """Trains `config` in `workdir`, resuming from its latest checkpoint.

    With `config.init_from`, the keys the file decides are set first (and logged), so the
    workdir's config.json records the model the file holds; a run with no checkpoint yet
    starts from the file's values. With num_train_steps=0 the initial state is saved as the
    checkpoint of step 0, for evaluation and indexing as it is.

    With `config.eval_every_steps`, the split is evaluated at every multiple of it before
    the last step (the last step's is the final evaluation's, `evaluate_and_index`).
    """
    validate_config(config)  # as given: a recipe that needs a pretrained file says so
    wd = Workdir(workdir)
    latest = latest_checkpoint_step(wd.checkpoints)
    config = init_keys(config, wd, resuming=latest is not None)
    validate_config(config)
    runtime.setup(config.global_batch_size)

    # ---------------------------------------------------------------- devices
    # Every device of every process; this process feeds and reads only its own.
    devices = parallel.global_devices()
    # This process's rows of every global batch; refuses a batch the devices cannot split.
    share = parallel.process_share(config.global_batch_size)
    primary = parallel.is_primary_process()
    logger.info("training on %d %s device(s) in %d process(es)", len(devices),
                devices[0].platform, jax.process_count())

    # ---------------------------------------------------------------- workdir
    # With several processes the workdir is one shared folder (NFS, Filestore, ...): every
    # process checks the config, process 0 alone writes it and the train log. Nothing is
    # written before the data loads and the model builds, so a run that fails early leaves
    # the workdir as it was, and the corrected command is not refused.
    check_workdir_config(wd, config, has_checkpoint=latest is not None)

    # ---------------------------------------------------------------- data
    # Several processes: each decodes only the images of its own shares of the batches.
    dataset = load_dataset(config, decode_now=jax.process_count() == 1)
    split = split_dataset(config, dataset)
    logger.info("%s: %d images, %d classes; %d for training (%d classes)", dataset.name,
                 len(dataset), dataset.num_classes, len(split.train_rows), split.num_train_classes)

    def host_batch(step):
        """This process's part of the global batch of `step`: the global rows are a function
        of (seed, step) alone, so each process reads and decodes only its own."""
        if config.sampler == "class_balanced":
            rows = class_balanced_batch_rows(
                split.train_rows, dataset.labels[split.train_rows], step,
                config.global_batch_size, config.images_per_class, config.seed)
        else:
            rows = batch_rows(split.train_rows, step, config.global_batch_size, config.seed)
        rows = rows[share]
        return {"images": dataset.images(rows), "labels": dataset.labels[rows].astype(np.int32)}

    # ---------------------------------------------------------------- model and update step
    # A run that resumes continues from its own checkpoint: the init_from file is not read.
    training = build_training(config, devices, split.num_train_classes,
                              load_init=latest is None)
    host_state = training.initial_state
    if primary:
        write_file_atomically(wd.config_path, config_to_json(config))
    store = CheckpointStore(wd.checkpoints, every_steps=config.checkpoint_every_steps,
                            keep=config.checkpoints_to_keep)

    # ---------------------------------------------------------------- checkpoint
    start_step = latest or 0
    if latest is not None:
        host_state = store.restore(latest, target=host_state)
        logger.info("resumed from the checkpoint at step %d", latest)
    total_steps = config.num_train_steps
    if primary:
        wd.truncate_train_log(after_step=start_step)

    state = parallel.replicate(host_state, devices)
    writer = MetricWriter(workdir, tensorboard=config.tensorboard, enabled=primary,
                          resume_step=start_step)
    evaluator = TrainingEvaluator(config, dataset, split) if config.eval_every_steps else None

    # ---------------------------------------------------------------- loop
    pending = []  # (step, metrics on device) not yet checked on the host
    last_saved = start_step
    interval_start, interval_steps = None, 0
    try:
        if total_steps == 0 and latest is None:
            # No training: the initial (pretrained) state is what gets evaluated and indexed.
            store.save(0, host_state)
            logger.info("num_train_steps=0: saved the initial state as the checkpoint of step 0")
        for step in range(start_step, total_steps):
            step_start = time.perf_counter()
            state, metrics = training.step(state, parallel.shard_batch(host_batch(step), devices))
            done = step + 1
            pending.append((done, metrics))
            if interval_start is None:  # the first step compiles: images/s count from after it
                jax.block_until_ready(metrics)
                logger.info("first step (with compilation) took %.1f s",
                            time.perf_counter() - step_start)
                interval_start, interval_steps = time.perf_counter(), 0
            else:
                interval_steps += 1

            is_last = done == total_steps
            if done % config.log_every_steps == 0 or is_last:
                host_metrics = _fetch_step_metrics(pending, wd, last_saved)
                pending = []
                elapsed = time.perf_counter() - interval_start
                images_per_sec = (interval_steps * config.global_batch_size / elapsed
                                  if interval_steps else float("nan"))
                record = writer.write_training(
                    done, loss=host_metrics["loss"], images_per_sec=images_per_sec,
                    learning_rate=float(training.schedule(done - 1)))
                if on_progress is not None and primary:
                    on_progress(dict(record, total_steps=total_steps))
                interval_start, interval_steps = time.perf_counter(), 0

            if evaluator is not None and done % config.eval_every_steps == 0 and not is_last:
                _fetch_step_metrics(pending, wd, last_saved)  # a diverged run says so first
                pending = []
                host_state = parallel.unreplicate(state)
                writer.write_evaluation(done, evaluator(model_variables(host_state), step=done))
                interval_start, interval_steps = time.perf_counter(), 0  # images/s: training

            if store.should_save(done) or is_last:
                _fetch_step_metrics(pending, wd, last_saved)
                pending = []
                host_state = parallel.unreplicate(state)
                if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(host_state)
                           if np.issubdtype(x.dtype, np.floating)):
                    raise _diverged(done, wd, last_saved, what="the model or optimiser state")
                store.save(done, host_state)
                last_saved = done
    finally:
        store.wait()  # a checkpoint that was started is always finished
        store.close()
        writer.close()


def model_variables(state: TrainState) -> dict:
    """The model's variables of a train state, as `model.apply` and the Embedder take them."""
    return {"params": state.params["model"], "batch_stats": state.batch_stats}


def _fetch_step_metrics(pending, wd, last_saved) -> dict:
    """Fetches pending step metrics; raises naming the first step whose loss is not finite."""
    if not pending:
        return {}
    fetched = parallel.unreplicate([metrics for _, metrics in pending])  # one transfer
    for (step, _), metrics in zip(pending, fetched):
        if not np.isfinite(metrics["loss"]):
            raise _diverged(step, wd, last_saved)
    return {name: float(value) for name, value in fetched[-1].items()}


def _diverged(step, wd, last_saved, what="the loss"):
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {wd.checkpoints}"
            if last_saved else "no checkpoint had been written")
    return JaxRetrievalError(
        f"training diverged: {what} is not finite at step {step}; {kept}. Lower "
        "learning_rate or raise warmup_steps, then run again in a new workdir or this one "
        "(it resumes from that checkpoint)")


def init_keys(config, wd, *, resuming: bool):
    """`config` with the keys `config.init_from`'s file decides. A run that resumes takes
    them from its own config.json instead (its checkpoint holds the weights), so the file
    need not be there any more, nor at the same path."""
    if not config.init_from:
        return config
    if not (resuming and os.path.isfile(wd.config_path)):
        return configured_for_init(config)
    saved = wd.read_config()
    config = copy.deepcopy(config)
    for key in MODEL_KEYS:
        config[key] = saved[key]
    logger.info("resuming from the workdir's checkpoint: init_from is not read again")
    return config


def check_workdir_config(wd, config, *, has_checkpoint: bool) -> None:
    """Refuses to train `config` in a workdir whose checkpoints belong to another run (its
    config.json differs in RUN_KEYS). A workdir with no checkpoint takes any config: its
    config.json, if any, is from a run that stopped before its first checkpoint."""
    if os.path.isfile(os.path.join(wd.path, COMPRESSION_FILE)):
        raise JaxRetrievalError(
            f"workdir {wd.path!r} holds a compressed model (compression.json), which is not "
            "trained further; train its source workdir, then compress it again")
    if not has_checkpoint or not os.path.isfile(wd.config_path):
        return
    saved = wd.read_config()
    differing = [key for key in RUN_KEYS
                 if model_config_hash(saved, (key,)) != model_config_hash(config, (key,))]
    if differing:
        raise JaxRetrievalError(
            f"workdir {wd.path!r} holds a run of another configuration ({', '.join(differing)} "
            "differ from its config.json); use a new --workdir, or the same settings to resume")
