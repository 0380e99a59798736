"""Training and embedding throughput of one model in one framework, in this process.

    python -m bench.throughput --framework jax|keras|torch --model seed_cnn|default \
        --mode train|embed [--batch 32] [--steps 10] [--warmup 3]

The same network in each framework: `seed_cnn` is the seed's model (224x224x3, 3x3 VALID
convs 32-64-128 with ReLU and 2x2 max-pools, flatten, Dense 128 as the embedding);
`default` is the offline default (32x32x1, SAME convs with BatchNorm, GeM pooling, Dense
64). Training adds a linear softmax classifier over 10 classes and takes AdamW steps; the
batch is made once and stays on the device, so this measures the compiled step, not input.
Warm-up steps (and compilation) are excluded. The last line printed is a JSON object with
`images_per_sec`. jax runs the project's own step and embedder over every local device
(set XLA_FLAGS=--xla_force_host_platform_device_count=N for N CPU devices).

Peers' dependencies: `pip install -r requirements-bench.txt`.
"""

import argparse
import json
import os
import time

import numpy as np

NUM_CLASSES = 10
MODELS = {
    # name: (image size, channels, widths, padding, batch norm, pooling, embedding dim)
    "seed_cnn": (224, 3, (32, 64, 128), "VALID", False, "flatten", 128),
    "default": (32, 1, (32, 64, 128), "SAME", True, "gem", 64),
}
LEARNING_RATE, WEIGHT_DECAY = 1e-3, 1e-4


def timed(step, warmup, steps):
    """Seconds per call of `step` (which must block until its work is done)."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def jax_step(model_name, mode, batch):
    import jax

    from jaxretrieval import parallel
    from jaxretrieval.config import base_config
    from jaxretrieval.embed import Embedder
    from jaxretrieval.training import build_training

    size, channels, widths, padding, batch_norm, pooling, dim = MODELS[model_name]
    config = base_config()
    config.image_size, config.channels, config.embedding_dim = size, channels, dim
    config.model.widths, config.model.padding = widths, padding
    config.model.batch_norm, config.model.pooling = batch_norm, pooling
    config.loss, config.augment.enabled = "softmax", False
    config.global_batch_size = config.embed_batch_size = batch
    config.learning_rate, config.weight_decay, config.warmup_steps = LEARNING_RATE, WEIGHT_DECAY, 0
    devices = parallel.local_devices()
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, channels), np.uint8)
    training = build_training(config, devices, NUM_CLASSES)
    host_state = training.initial_state
    if mode == "embed":
        variables = {"params": host_state.params["model"], "batch_stats": host_state.batch_stats}
        embedder = Embedder(config, variables, checkpoint_step=0, devices=devices)
        return lambda: embedder.embed_uint8(images), len(devices)
    labels = np.arange(batch, dtype=np.int32) % NUM_CLASSES
    state = [parallel.replicate(host_state, devices)]
    batch_on_device = parallel.shard_batch({"images": images, "labels": labels}, devices)

    def run():
        state[0], metrics = training.step(state[0], batch_on_device)
        jax.block_until_ready(metrics)

    return run, len(devices)


def keras_step(model_name, mode, batch):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    size, channels, widths, padding, batch_norm, pooling, dim = MODELS[model_name]
    inputs = keras.Input((size, size, channels))
    x = keras.layers.Rescaling(4.0 / 255.0, offset=-2.0)(inputs)  # the project's centring
    for width in widths:
        x = keras.layers.Conv2D(width, 3, padding=padding.lower(), use_bias=not batch_norm)(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D(2)(x)
    if pooling == "flatten":
        x = keras.layers.Flatten()(x)
    else:  # GeM with a learned exponent
        x = _KerasGeM()(x)
    embedding = keras.layers.UnitNormalization()(keras.layers.Dense(dim)(x))
    if mode == "embed":
        model = keras.Model(inputs, embedding)
        images = tf.constant(np.random.default_rng(0).integers(0, 256, (batch, size, size,
                                                                        channels)), tf.float32)
        embed = tf.function(lambda x: model(x, training=False), jit_compile=False)
        return lambda: embed(images).numpy(), 1
    logits = keras.layers.Dense(NUM_CLASSES)(embedding)
    model = keras.Model(inputs, logits)
    model.compile(optimizer=keras.optimizers.AdamW(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, channels)).astype(
        np.float32)
    labels = np.arange(batch) % NUM_CLASSES
    return lambda: model.train_on_batch(images, labels), 1


def _KerasGeM():
    import keras

    class GeM(keras.layers.Layer):
        def build(self, shape):
            self.p = self.add_weight(shape=(), initializer=keras.initializers.Constant(3.0))

        def call(self, x):
            p = keras.ops.maximum(self.p, 1.0)
            pooled = keras.ops.mean(keras.ops.maximum(x, 1e-6) ** p, axis=(1, 2))
            return pooled ** (1.0 / p)

    return GeM()


def torch_step(model_name, mode, batch):
    import torch
    from torch import nn

    size, channels, widths, padding, batch_norm, pooling, dim = MODELS[model_name]

    class GeM(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.tensor(3.0))

        def forward(self, x):
            p = self.p.clamp(min=1.0)
            return x.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)

    layers, previous = [], channels
    for width in widths:
        layers.append(nn.Conv2d(previous, width, 3, padding=padding.lower(),
                                bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width, momentum=0.1))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        previous = width
    layers.append(nn.Flatten() if pooling == "flatten" else GeM())
    backbone = nn.Sequential(*layers)
    with torch.no_grad():
        features = backbone(torch.zeros(1, channels, size, size)).shape[1]
    projection = nn.Linear(features, dim)
    classifier = nn.Linear(dim, NUM_CLASSES)

    def embed(x):
        x = x * (4.0 / 255.0) - 2.0
        return nn.functional.normalize(projection(backbone(x)), dim=1)

    images = torch.randint(0, 256, (batch, channels, size, size)).float()
    if mode == "embed":
        backbone.eval()

        def run():
            with torch.no_grad():
                embed(images)

        return run, 1
    params = [*backbone.parameters(), *projection.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    labels = torch.arange(batch) % NUM_CLASSES

    def run():
        optimizer.zero_grad()
        nn.functional.cross_entropy(classifier(embed(images)), labels).backward()
        optimizer.step()

    return run, 1


def main():
    # The same process setup as the command line's entry points (jaxretrieval.host_memory).
    from jaxretrieval.host_memory import reexec_with_huge_pages
    reexec_with_huge_pages()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=("jax", "keras", "torch"), required=True)
    parser.add_argument("--model", choices=sorted(MODELS), default="seed_cnn")
    parser.add_argument("--mode", choices=("train", "embed"), default="train")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    build = {"jax": jax_step, "keras": keras_step, "torch": torch_step}[args.framework]
    step, devices = build(args.model, args.mode, args.batch)
    seconds = timed(step, args.warmup, args.steps)
    print(json.dumps({"framework": args.framework, "model": args.model, "mode": args.mode,
                      "batch": args.batch, "devices": devices, "seconds_per_step": seconds,
                      "images_per_sec": args.batch / seconds}))


if __name__ == "__main__":
    main()
