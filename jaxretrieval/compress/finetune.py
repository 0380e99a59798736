"""Fine-tuning a model under compression: the source run's loss (with its learned
parameters), sampler, augmentation and AdamW, for a few steps, with a method's own optax
transformation chained in (`base.FineTune`)."""

import copy
import logging
import time

import jax
import numpy as np

from jaxretrieval import parallel
from jaxretrieval.data.splits import batch_rows, class_balanced_batch_rows
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.losses import get_loss, with_projection_head
from jaxretrieval.models import build_model
from jaxretrieval.training import TrainState, make_optimizer, make_train_step

logger = logging.getLogger(__name__)

# Warm-up of the fine-tuning's learning rate, as a share of its steps.
WARMUP_SHARE = 0.1


def fine_tuner(dataset, split, loss_params, *, first_step: int, on_progress=None):
    """A `base.FineTune` over `dataset`'s training rows of `split`, starting the loss from
    `loss_params` (the source run's). Batches are those the source run would have drawn
    from `first_step` on, so fine-tuning sees other batches than the last ones it trained
    on. `on_progress` gets {"step", "total_steps", "loss", "images_per_sec"}."""

    def fine_tune(config, variables, *, steps: int, learning_rate: float,
                  wrap_optimizer=None):
        if steps == 0:
            return variables
        config = copy.deepcopy(config)
        config.num_train_steps = steps
        config.learning_rate = learning_rate
        config.warmup_steps = int(steps * WARMUP_SHARE)
        # The source run unfroze its backbone already; `make_optimizer` counts the frozen
        # steps from this run's step 0, so keeping them would freeze it again.
        config.frozen_backbone_steps = 0
        devices = parallel.global_devices()
        loss = get_loss(config.loss)
        if config.projection_head:
            loss = with_projection_head(loss, config.projection_head)
        model = build_model(config, bn_axis_name=parallel.DEVICE_AXIS)
        optimizer, _ = make_optimizer(config)
        if wrap_optimizer is not None:
            optimizer = wrap_optimizer(optimizer)
        params = {"model": variables["params"], "loss": loss_params}
        state = TrainState(step=np.zeros((), np.int32), params=params,
                           batch_stats=variables["batch_stats"],
                           opt_state=jax.device_get(optimizer.init(params)),
                           rng=np.asarray(jax.random.PRNGKey(config.seed + first_step)))
        step_fn = parallel.data_parallel(make_train_step(model, loss, optimizer, config),
                                         config.parallel, devices)
        state = parallel.replicate(state, devices)
        train_labels = dataset.labels[split.train_rows]
        started = time.perf_counter()
        for step in range(steps):
            if config.sampler == "class_balanced":
                rows = class_balanced_batch_rows(
                    split.train_rows, train_labels, first_step + step,
                    config.global_batch_size, config.images_per_class, config.seed)
            else:
                rows = batch_rows(split.train_rows, first_step + step,
                                  config.global_batch_size, config.seed)
            batch = {"images": dataset.images(rows),
                     "labels": dataset.labels[rows].astype(np.int32)}
            state, metrics = step_fn(state, parallel.shard_batch(batch, devices))
            done = step + 1
            if on_progress is not None and (done % config.log_every_steps == 0
                                            or done == steps):
                value = float(parallel.unreplicate(metrics)["loss"])
                on_progress({"step": done, "total_steps": steps, "loss": value,
                             "images_per_sec": done * config.global_batch_size
                             / (time.perf_counter() - started)})
        host = parallel.unreplicate(state)
        variables = {"params": host.params["model"], "batch_stats": host.batch_stats}
        if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables)):
            raise JaxRetrievalError(
                f"fine-tuning diverged (the model is not finite after {steps} steps at "
                f"learning rate {learning_rate}); pass a lower --learning_rate, or --steps 0")
        return variables

    return fine_tune
