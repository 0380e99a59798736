"""Training and embedding throughput on one GPU, with model FLOPs utilisation, and a small
bfloat16 checkpoint written there to be restored and embedded on a CPU here.

On the GPU machine, from the repository root:

    python -m bench.gpu --out $OUT                      # seed CNN and ResNet-50, bf16 + f32
    python -m bench.gpu --out $OUT --models resnet50 --init_from resnet50-11ad3fa6.pth

Back on a CPU machine, with the files it returned:

    python -m bench.gpu --check DIR                     # DIR holds gpu_workdir.tar.gz

Throughput is measured with the batch already on the device (no input pipeline), after a
warm-up, as the median of `--repeats` timed windows of `--steps` steps. Model FLOPs are
the forward pass's (XLA's count on the CPU backend), three of them per training image;
utilisation divides the achieved model FLOP/s by the chip's dense peak for the compute
dtype (float32 runs at JAX's default precision, which lets the GPU use TF32, so they are
set against the TF32 peak). The last printed line is a JSON object with every figure.
"""

import argparse
import functools
import json
import os
import statistics
import tarfile
import tempfile
import time
import traceback

import numpy as np

# XLA's FLOP count cannot see inside the oneDNN custom calls that CPU runs would otherwise use.
os.environ.setdefault("JAXRETRIEVAL_CPU_CONV", "xla")

# Dense peaks in TFLOP/s (bfloat16, TF32), from NVIDIA's data sheets; matched on device_kind.
PEAK_TFLOPS = (("H100 PCIe", 756.0, 378.0), ("H100", 989.4, 494.7), ("H200", 989.4, 494.7),
               ("A100", 312.0, 156.0))
CHECK_IMAGES = 16


def model_config(name: str, dtype: str, smoke: bool):
    from jaxretrieval.config import base_config, load_config_file

    if name == "seed_cnn":
        config = load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs",
                                               "seed_cnn.py"))
    elif name == "resnet50":
        config = base_config()
        config.model.name = "resnet50"
        config.model.small_stem = False  # the ImageNet stem for 224x224 inputs
        config.image_size, config.channels, config.embedding_dim = 224, 3, 128
    else:
        raise ValueError(f"unknown model {name!r}: use seed_cnn or resnet50")
    config.dtype = dtype
    config.loss = "normalized_softmax"
    config.augment.enabled = True
    if smoke:  # a CPU run of the script itself, in seconds
        config.image_size = 32
        config.model.widths = (8, 16)
        config.model.num_filters = 8
    return config


def peak_flops(device_kind: str, dtype: str):
    for name, bf16, tf32 in PEAK_TFLOPS:
        if name in device_kind:
            return (bf16 if dtype == "bfloat16" else tf32) * 1e12
    return None


def forward_flops_per_image(config) -> float:
    """FLOPs of one image's forward pass, counted by XLA on the CPU backend. Model FLOPs
    utilisation takes a training step as three forward passes (the usual definition: the
    backward pass costs two). Not counted on the GPU: its compiler hands convolutions to
    cuDNN as custom calls that its cost analysis leaves out."""
    import jax

    from jaxretrieval.data.augment import preprocess
    from jaxretrieval.models import build_model

    cpu = jax.devices("cpu")[0]
    model = build_model(config)
    image = jax.device_put(
        np.zeros((1, config.image_size, config.image_size, config.channels), np.uint8), cpu)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), preprocess(x)))(image)
    forward = jax.jit(lambda v, x: model.apply(v, preprocess(x)))
    return float(forward.lower(variables, image).compile().cost_analysis()["flops"])


def timed(run_steps, steps: int, repeats: int) -> float:
    """Median seconds per step over `repeats` windows of `steps` steps."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_steps(steps)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def measure(name: str, dtype: str, batch: int, steps: int, repeats: int, smoke: bool,
            init_from: str | None = None) -> dict:
    import jax

    from jaxretrieval import parallel
    from jaxretrieval.data.augment import preprocess
    from jaxretrieval.models import build_model
    from jaxretrieval.training import build_training

    config = model_config(name, dtype, smoke)
    config.global_batch_size = batch
    if init_from and name != "seed_cnn":
        # The file decides the network and its input (build_training then loads it).
        from jaxretrieval.models.pretrained import configured_for_init

        config.init_from = init_from
        config = configured_for_init(config)
    num_classes = 100
    rng = np.random.default_rng(0)
    shape = (batch, config.image_size, config.image_size, config.channels)
    host_batch = {"images": rng.integers(0, 256, shape, dtype=np.uint8),
                  "labels": rng.integers(0, num_classes, batch).astype(np.int32)}

    devices = parallel.global_devices()
    training = build_training(config, devices, num_classes)
    state = parallel.replicate(training.initial_state, devices)
    device_batch = parallel.shard_batch(host_batch, devices)
    start = time.perf_counter()
    step = training.step.lower(state, device_batch).compile()  # compiled once, then timed
    compile_seconds = time.perf_counter() - start
    holder = [state]

    def train_steps(n):
        for _ in range(n):
            holder[0], metrics = step(holder[0], device_batch)
        jax.block_until_ready(metrics)

    train_steps(3)  # compile and warm up
    train_seconds = timed(train_steps, steps, repeats)

    variables = {"params": parallel.unreplicate(holder[0].params)["model"],
                 "batch_stats": parallel.unreplicate(holder[0].batch_stats)}
    embed_model = build_model(config)
    images = jax.device_put(host_batch["images"])
    embed = jax.jit(lambda v, x: embed_model.apply(v, preprocess(x))).lower(
        variables, images).compile()

    def embed_steps(n):
        for _ in range(n):
            out = embed(variables, images)
        jax.block_until_ready(out)

    embed_steps(3)
    embed_seconds = timed(embed_steps, steps, repeats)

    peak = peak_flops(jax.devices()[0].device_kind, dtype)
    forward = forward_flops_per_image(config)
    result = {"model": name, "dtype": dtype, "batch": batch, "image_size": config.image_size,
              "init_from": init_from if name != "seed_cnn" else None,
              "train_images_per_sec": batch / train_seconds,
              "embed_images_per_sec": batch / embed_seconds,
              "forward_flops_per_image": forward, "train_compile_seconds": compile_seconds}
    for mode, flops, seconds in (("train", 3 * forward * batch, train_seconds),
                                 ("embed", forward * batch, embed_seconds)):
        result[f"{mode}_tflops_per_sec"] = flops / seconds / 1e12
        result[f"{mode}_mfu"] = flops / seconds / peak if peak else None
    print(json.dumps(result), flush=True)
    return result


def write_checkpoint(out: str, smoke: bool) -> dict:
    """Trains a small bfloat16 model for a few steps on generated images (a folder dataset:
    the GPU image has no TFDS), embeds fixed inputs there, and packs the workdir."""
    from PIL import Image

    from jaxretrieval.config import base_config
    from jaxretrieval.embed import Embedder
    from jaxretrieval.training import train

    root = tempfile.mkdtemp()
    rng = np.random.default_rng(1)
    for label in range(8):  # a class = a base pattern plus noise
        os.makedirs(os.path.join(root, "images", f"class{label}"))
        base = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        for i in range(8):
            noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(os.path.join(root, "images", f"class{label}", f"{i}.png"))
    config = base_config()
    config.dataset = f"folder:{os.path.join(root, 'images')}"
    config.dtype = "bfloat16"
    config.num_train_steps, config.warmup_steps = (4 if smoke else 40), 2
    config.global_batch_size, config.log_every_steps = 32, 2
    config.checkpoint_every_steps = config.num_train_steps
    workdir = os.path.join(root, "workdir")
    train(config, workdir)

    inputs = rng.integers(0, 256, (CHECK_IMAGES, 32, 32, 1), dtype=np.uint8)
    embedder = Embedder.from_workdir(workdir)
    np.save(os.path.join(workdir, "check_inputs.npy"), inputs)
    np.save(os.path.join(workdir, "check_embeddings.npy"), embedder.embed_uint8(inputs))
    with open(os.path.join(workdir, "check_device.txt"), "w") as f:
        f.write(embedder.devices[0].device_kind)
    archive = os.path.join(out, "gpu_workdir.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(workdir, arcname="gpu_workdir")
    return {"checkpoint_archive": os.path.basename(archive),
            "checkpoint_step": embedder.checkpoint_step}


def check_checkpoint(directory: str) -> dict:
    """Restores the GPU's checkpoint here and embeds the same inputs: cosine to the GPU's."""
    from jaxretrieval.embed import Embedder

    target = tempfile.mkdtemp()
    with tarfile.open(os.path.join(directory, "gpu_workdir.tar.gz")) as tar:
        tar.extractall(target, filter="data")
    workdir = os.path.join(target, "gpu_workdir")
    embedder = Embedder.from_workdir(workdir)
    here = embedder.embed_uint8(np.load(os.path.join(workdir, "check_inputs.npy")))
    there = np.load(os.path.join(workdir, "check_embeddings.npy"))
    cosine = np.sum(here * there, axis=1)
    return {"trained_on": open(os.path.join(workdir, "check_device.txt")).read(),
            "embedded_on": embedder.devices[0].device_kind, "dtype": embedder.config.dtype,
            "checkpoint_step": embedder.checkpoint_step,
            "min_cosine": float(cosine.min()), "max_abs_diff": float(np.abs(here - there).max())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for gpu_bench.json and gpu_workdir.tar.gz")
    parser.add_argument("--models", default="seed_cnn,resnet50")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--init_from", metavar="PATH",
                        help="start the ResNet from this torchvision or timm weights file "
                             "(the seed CNN still starts from scratch)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models and inputs: checks the script itself on a CPU")
    parser.add_argument("--check", metavar="DIR",
                        help="restore DIR/gpu_workdir.tar.gz here and compare its embeddings")
    args = parser.parse_args()
    if args.check:
        print(json.dumps(check_checkpoint(args.check)))
        return
    if not args.out:
        parser.error("--out is required (or --check DIR)")
    import jax

    os.makedirs(args.out, exist_ok=True)
    if args.init_from and not os.path.isfile(os.path.expanduser(args.init_from)):
        parser.error(f"--init_from {args.init_from}: no such file")
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": []}
    print(f"{report['device']}, jax {jax.__version__}", flush=True)
    # A lease is short: each part's result or error is written as soon as it is known, so
    # a failure in one leaves the others' figures. The checkpoint goes first: it is quick,
    # and the check on a CPU needs it.
    parts = [("checkpoint", functools.partial(write_checkpoint, args.out, args.smoke))]
    parts += [(f"{name} {dtype}",
               functools.partial(measure, name, dtype, args.batch, args.steps, args.repeats,
                                 args.smoke, args.init_from))
              for name in args.models.split(",") for dtype in args.dtypes.split(",")]
    for label, run in parts:
        try:
            outcome = run()
        except Exception:  # noqa: BLE001 - reported in the JSON, and the run goes on
            traceback.print_exc()
            report.setdefault("errors", {})[label] = traceback.format_exc(limit=-3)
        else:
            if label == "checkpoint":
                report.update(outcome)
            else:
                report["results"].append(outcome)
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))
    if "errors" in report:
        raise SystemExit(f"failed: {', '.join(report['errors'])}")


if __name__ == "__main__":
    main()
