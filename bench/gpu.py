"""Training and embedding throughput on one GPU, with model FLOPs utilisation, and a small
bfloat16 checkpoint written there to be restored and embedded on a CPU here.

On the GPU machine, from the repository root:

    python -m bench.gpu --out $OUT                      # seed CNN and ResNet-50, bf16 + f32
    python -m bench.gpu --out $OUT --models resnet50 --init_from resnet50-11ad3fa6.pth
    python -m bench.gpu --out $OUT --models resnet50 --dtypes bfloat16 \
        --e2e --profile 5 --sweep --no_checkpoint  # end to end, profile, step candidates

Back on a CPU machine, with the files it returned:

    python -m bench.gpu --check DIR                     # DIR holds gpu_workdir.tar.gz

Throughput is measured with the batch already on the device (no input pipeline) and, with
`--e2e`, fed by the grain input pipeline from a folder of JPEGs (docs/gpu.md), after a
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
            init_from: str | None = None, *, parallel_wrapper: str = "pmap",
            e2e: dict | None = None, profile_steps: int = 0,
            forward_flops: float | None = None) -> dict:
    """Training (and embedding) images/s of one model and dtype with synthetic batches on
    the device; with `e2e` ({"folder", "steps", "workers"}) also training fed by the grain
    pipeline from that folder of JPEGs; with `profile_steps`, a jax.profiler trace of that
    many synthetic steps, summarised (`profile_summary`)."""
    import jax

    from jaxretrieval import parallel
    from jaxretrieval.data.augment import preprocess
    from jaxretrieval.models import build_model
    from jaxretrieval.training import build_training

    config = model_config(name, dtype, smoke)
    config.global_batch_size = batch
    config.parallel = parallel_wrapper
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

    def train_steps(n, next_batch=lambda: device_batch):
        for _ in range(n):
            holder[0], metrics = step(holder[0], next_batch())
        jax.block_until_ready(metrics)

    train_steps(3)  # compile and warm up
    train_seconds = timed(train_steps, steps, repeats)
    result = {"model": name, "dtype": dtype, "batch": batch, "image_size": config.image_size,
              "parallel": parallel_wrapper,
              "init_from": init_from if name != "seed_cnn" else None,
              "train_images_per_sec": batch / train_seconds,
              "train_compile_seconds": compile_seconds}
    if profile_steps:
        result["profile"] = profile_summary(lambda: train_steps(profile_steps), profile_steps,
                                            train_seconds)
    if e2e:
        result.update(measure_end_to_end(config, e2e, step_fn=train_steps, repeats=repeats,
                                         synthetic=batch / train_seconds))

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
    result["embed_images_per_sec"] = batch / embed_seconds

    peak = peak_flops(jax.devices()[0].device_kind, dtype)
    forward = forward_flops or forward_flops_per_image(config)
    result["forward_flops_per_image"] = forward
    rates = [("train", 3, result["train_images_per_sec"]),
             ("embed", 1, result["embed_images_per_sec"])]
    if "e2e_train_images_per_sec" in result:
        rates.append(("e2e_train", 3, result["e2e_train_images_per_sec"]))
    for mode, passes, images_per_sec in rates:
        flops_per_sec = passes * forward * images_per_sec
        result[f"{mode}_tflops_per_sec"] = flops_per_sec / 1e12
        result[f"{mode}_mfu"] = flops_per_sec / peak if peak else None
    print(json.dumps(result), flush=True)
    return result


def measure_end_to_end(config, e2e: dict, *, step_fn, repeats: int, synthetic: float) -> dict:
    """Training images/s fed by the grain pipeline from a folder of JPEGs (decoded, resized
    to the working size, put on the devices), with the same compiled step as the synthetic
    figure: the ratio of the two is what the input pipeline costs."""
    from jaxretrieval import parallel
    from jaxretrieval.data.input_pipeline import TrainingBatches, worker_count
    from jaxretrieval.data.sources import load_dataset
    from jaxretrieval.data.splits import batch_plan, split_dataset

    config = config.copy_and_resolve_references()
    config.dataset = f"folder:{e2e['folder']}"
    config.input_pipeline, config.input_workers = "grain", e2e["workers"]
    config.cache_max_bytes = 0  # every batch is decoded, as for a dataset larger than memory
    dataset = load_dataset(config, decode_now=False)
    split = split_dataset(config, dataset)
    if split.num_train_classes > 100:
        raise ValueError(f"{e2e['folder']} has {split.num_train_classes} classes; the bench's "
                         "step is compiled for at most 100")
    plan = batch_plan(config, split, dataset.labels)
    steps, devices = e2e["steps"], parallel.global_devices()
    # Warm-up: the workers start and fill their buffers before the timed windows.
    warm_up = 2 * worker_count(config) + 3
    batches = TrainingBatches(config, dataset, plan, parallel.process_share(
        config.global_batch_size), 0, warm_up + steps * repeats, devices)
    try:
        step_fn(warm_up, lambda: next(batches))
        seconds = timed(lambda n: step_fn(n, lambda: next(batches)), steps, repeats)
    finally:
        batches.close()
    rate = config.global_batch_size / seconds
    return {"e2e_train_images_per_sec": rate, "e2e_over_synthetic": rate / synthetic,
            "e2e_workers": worker_count(config), "e2e_images": len(dataset)}


# Where an XLA op's time is counted, by words in its name: first match wins.
OP_CATEGORIES = (("collective", ("all-reduce", "all-gather", "reduce-scatter", "nccl",
                                 "collective", "all-to-all")),
                 ("convolution", ("conv", "cudnn")),
                 ("matmul", ("dot", "gemm", "cublas", "matmul")),
                 ("copy/transpose", ("copy", "transpose", "memcpy", "memset")),
                 ("fusion (elementwise, BatchNorm, reductions)", ("fusion", "reduce")))


def op_category(op_name: str) -> str:
    lowered = op_name.lower()
    for category, words in OP_CATEGORIES:
        if any(word in lowered for word in words):
            return category
    return "other"


def profile_summary(run_steps, steps: int, seconds_per_step: float, top: int = 12) -> dict:
    """Traces `run_steps()` (`steps` steps) with jax.profiler and sums the device's XLA op
    times by category and by op: where a step's time goes. `device_busy_share` is the op
    time over the traced wall time; what is left is the device waiting (launches, the
    host). Without a device plane (a CPU run), the busiest host threads instead."""
    import glob

    import jax

    directory = tempfile.mkdtemp(prefix="jaxretrieval_trace_")
    start = time.perf_counter()
    with jax.profiler.trace(directory):
        run_steps()
    wall = time.perf_counter() - start
    paths = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(paths[0])
    by_op, by_category, busy_ns = {}, {}, 0.0
    device_planes = [p for p in data.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
    for plane in device_planes[:1]:  # one device: the others run the same program
        for line in plane.lines:
            if line.name != "XLA Ops":
                continue
            for event in line.events:
                by_op[event.name] = by_op.get(event.name, 0.0) + event.duration_ns
                category = op_category(event.name)
                by_category[category] = by_category.get(category, 0.0) + event.duration_ns
                busy_ns += event.duration_ns
    summary = {"traced_steps": steps, "traced_wall_seconds": wall,
               "untraced_seconds_per_step": seconds_per_step,
               "device_plane": device_planes[0].name if device_planes else None}
    if busy_ns:
        per_step = lambda ns: ns / steps / 1e6  # milliseconds per step
        summary["device_busy_share"] = busy_ns / 1e9 / wall
        summary["ms_per_step_by_category"] = {
            k: per_step(v) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])}
        summary["share_by_category"] = {k: v / busy_ns for k, v in sorted(
            by_category.items(), key=lambda kv: -kv[1])}
        summary["top_ops_ms_per_step"] = {k: per_step(v) for k, v in sorted(
            by_op.items(), key=lambda kv: -kv[1])[:top]}
    else:
        threads = {}
        for plane in data.planes:
            for line in plane.lines:
                threads[f"{plane.name} {line.name}"] = sum(e.duration_ns for e in line.events)
        summary["busiest_host_lines_ms"] = {k: v / 1e6 for k, v in sorted(
            threads.items(), key=lambda kv: -kv[1])[:top]}
    return summary


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


# The training-step candidates `--sweep` measures, each in its own process (XLA reads its
# flags once, at start-up): XLA_FLAGS added, the batch scaled, the parallel wrapper, and
# BatchNorm's statistics reduced in the compute dtype instead of float32.
SWEEP = {
    "baseline": {},
    "batch_x2": {"batch_factor": 2},
    "shard_map": {"parallel": "shard_map"},
    "latency_hiding_scheduler": {"xla_flags": "--xla_gpu_enable_latency_hiding_scheduler=true"},
    "exhaustive_tiling_search": {"xla_flags": "--xla_gpu_exhaustive_tiling_search=true"},
    "autotune_off": {"xla_flags": "--xla_gpu_autotune_level=0"},
    "command_buffers_off": {"xla_flags": "--xla_gpu_enable_command_buffer="},
    "bn_bf16_reductions": {"bn_bf16_reductions": True},
}


def use_reduced_precision_batch_norm() -> None:
    """Makes every flax BatchNorm of this process reduce its batch statistics in its compute
    dtype (bfloat16 runs: bfloat16) rather than float32. A candidate the sweep measures,
    not a setting of the library: it patches flax in this process alone."""
    import flax.linen as nn

    class BatchNorm(nn.BatchNorm):
        force_float32_reductions: bool = False

    nn.BatchNorm = BatchNorm


def sweep(args, names, forward_flops: float | None) -> list:
    """Measures each candidate of SWEEP in `names` for the first of --models and --dtypes,
    each in a fresh process; returns their results (or errors) in order."""
    import subprocess
    import sys

    model, dtype = args.models.split(",")[0], args.dtypes.split(",")[0]
    results = []
    for name in names:
        variant = SWEEP[name]
        command = [sys.executable, "-m", "bench.gpu", "--measure_only", "--models", model,
                   "--dtypes", dtype, "--batch", str(args.batch * variant.get("batch_factor", 1)),
                   "--steps", str(args.steps), "--repeats", str(args.repeats),
                   "--parallel", variant.get("parallel", args.parallel)]
        command += ["--smoke"] if args.smoke else []
        command += ["--bn_bf16_reductions"] if variant.get("bn_bf16_reductions") else []
        command += ["--forward_flops", str(forward_flops)] if forward_flops else []
        flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                       variant.get("xla_flags", "")]))
        start = time.perf_counter()
        done = subprocess.run(command, env=dict(os.environ, XLA_FLAGS=flags),
                              capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        entry = {"variant": name, "xla_flags": variant.get("xla_flags", ""),
                 "seconds": time.perf_counter() - start}
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            measured = json.loads(lines[-1])
            entry.update({key: measured.get(key) for key in (
                "batch", "parallel", "train_images_per_sec", "train_mfu",
                "train_compile_seconds")})
        else:
            entry["error"] = (done.stderr or done.stdout)[-1500:]
        print(json.dumps(entry), flush=True)
        results.append(entry)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for gpu_bench.json and gpu_workdir.tar.gz")
    parser.add_argument("--models", default="seed_cnn,resnet50")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parallel", default="pmap", choices=("pmap", "shard_map"),
                        help="the step's data-parallel wrapper (config.parallel)")
    parser.add_argument("--init_from", metavar="PATH",
                        help="start the ResNet from this torchvision or timm weights file "
                             "(the seed CNN still starts from scratch)")
    parser.add_argument("--e2e", action="store_true",
                        help="also train fed by the grain pipeline from a folder of JPEGs")
    parser.add_argument("--jpeg_folder", metavar="DIR",
                        help="--e2e's folder (class sub-folders of JPEGs); default: written "
                             "by the script, --jpeg_images ImageNet-like photos")
    parser.add_argument("--jpeg_images", type=int, default=4096)
    parser.add_argument("--e2e_steps", type=int, default=40, help="steps per timed window")
    parser.add_argument("--workers", type=int, default=-1,
                        help="grain's decoding processes (config.input_workers)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="trace STEPS synthetic steps with jax.profiler and summarise")
    parser.add_argument("--sweep", nargs="?", const=",".join(SWEEP), metavar="NAMES",
                        help="measure the step candidates (default all: "
                             f"{', '.join(SWEEP)}) for the first model and dtype")
    parser.add_argument("--no_checkpoint", action="store_true",
                        help="skip the small checkpoint written for --check")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models and inputs: checks the script itself on a CPU")
    parser.add_argument("--check", metavar="DIR",
                        help="restore DIR/gpu_workdir.tar.gz here and compare its embeddings")
    parser.add_argument("--measure_only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bn_bf16_reductions", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--forward_flops", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check:
        print(json.dumps(check_checkpoint(args.check)))
        return
    if args.bn_bf16_reductions:
        use_reduced_precision_batch_norm()
    if args.measure_only:  # one sweep candidate, in its own process
        measure(args.models, args.dtypes, args.batch, args.steps, args.repeats, args.smoke,
                parallel_wrapper=args.parallel, forward_flops=args.forward_flops)
        return
    if not args.out:
        parser.error("--out is required (or --check DIR)")
    sweep_names = args.sweep.split(",") if args.sweep else []
    unknown = [name for name in sweep_names if name not in SWEEP]
    if unknown:
        parser.error(f"--sweep {','.join(unknown)}: use some of {', '.join(SWEEP)}")
    import jax

    os.makedirs(args.out, exist_ok=True)
    if args.init_from and not os.path.isfile(os.path.expanduser(args.init_from)):
        parser.error(f"--init_from {args.init_from}: no such file")
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "host_cores": len(os.sched_getaffinity(0)),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": []}
    print(f"{report['device']}, jax {jax.__version__}", flush=True)
    e2e = None
    if args.e2e:
        from bench.input_pipeline import write_jpeg_folder

        folder = args.jpeg_folder or os.path.join(
            tempfile.gettempdir(), f"jaxretrieval_jpegs_{args.jpeg_images}")
        start = time.perf_counter()
        write_jpeg_folder(folder, args.jpeg_images, classes=100,
                          processes=len(os.sched_getaffinity(0)))
        report["jpeg_folder_seconds"] = time.perf_counter() - start
        e2e = {"folder": folder, "steps": args.e2e_steps, "workers": args.workers}
    # A lease is short: each part's result or error is written as soon as it is known, so
    # a failure in one leaves the others' figures. The checkpoint goes first: it is quick,
    # and the check on a CPU needs it.
    parts = [] if args.no_checkpoint else [
        ("checkpoint", functools.partial(write_checkpoint, args.out, args.smoke))]
    parts += [(f"{name} {dtype}",
               functools.partial(measure, name, dtype, args.batch, args.steps, args.repeats,
                                 args.smoke, args.init_from, parallel_wrapper=args.parallel,
                                 e2e=e2e, profile_steps=args.profile))
              for name in args.models.split(",") for dtype in args.dtypes.split(",")]
    if sweep_names:
        def run_sweep():
            counted = [r.get("forward_flops_per_image") for r in report["results"]
                       if r["model"] == args.models.split(",")[0]]
            return sweep(args, sweep_names, counted[0] if counted else None)

        parts.append(("sweep", run_sweep))
    for label, run in parts:
        try:
            outcome = run()
        except Exception:  # noqa: BLE001 - reported in the JSON, and the run goes on
            traceback.print_exc()
            report.setdefault("errors", {})[label] = traceback.format_exc(limit=-3)
        else:
            if label == "checkpoint":
                report.update(outcome)
            elif label == "sweep":
                report["sweep"] = outcome
                failed = [entry["variant"] for entry in outcome if "error" in entry]
                if failed:
                    report.setdefault("errors", {})["sweep"] = f"failed: {', '.join(failed)}"
            else:
                report["results"].append(outcome)
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))
    if "errors" in report:
        raise SystemExit(f"failed: {', '.join(report['errors'])}")


if __name__ == "__main__":
    main()
