"""The command line: `jaxretrieval train|index|search ...` (and `python -m train`).

The one place that parses argv and renders progress; everything it runs lives in the library.
"""

import argparse
import json
import logging
import os
import sys

DEFAULT_WORKDIR = os.path.join("runs", "default")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": run_train, "index": run_index, "search": run_search,
                "serve": run_serve}
    if not argv or argv[0] not in commands:
        print(f"usage: jaxretrieval {{{','.join(commands)}}} [--help]", file=sys.stderr)
        return 2
    _quiet_dependencies()
    # Our own progress at INFO; dependencies (TFDS, absl, Orbax) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("jaxretrieval").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's advice to install OpenCV
    from jaxretrieval.errors import JaxRetrievalError
    try:
        return commands[argv[0]](argv[1:])
    except JaxRetrievalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _quiet_dependencies():
    # TensorFlow (imported by TFDS and ScaNN) prints start-up chatter that hides our output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # JAX's persistent compilation cache: a resumed run, --eval_only or a restarted service
    # loads its compiled programs instead of compiling them again. JAX_COMPILATION_CACHE_DIR
    # chooses another folder; an empty value turns the cache off.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxretrieval", "xla"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


MIN_IMAGES_PER_CPU_DEVICE = 8


def _use_one_cpu_device_per_core(global_batch_size: int) -> None:
    """Exposes one XLA CPU device per core (up to what the batch feeds), before JAX starts.

    XLA runs a CPU convolution on one thread; pmap over one device per core is what puts
    every core to work (DESIGN.md). Accelerators are unaffected: this only shapes the host
    platform. A count the user set in XLA_FLAGS wins.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags or "jax" in sys.modules:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    most = max(1, min(cores or 1, global_batch_size // MIN_IMAGES_PER_CPU_DEVICE))
    count = max(d for d in range(1, most + 1) if global_batch_size % d == 0)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def _split_config_overrides(argv):
    """Separates `--config.KEY=VALUE` / `--config.KEY VALUE` from the other arguments."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    from jaxretrieval.errors import JaxRetrievalError
                    raise JaxRetrievalError(f"{arg} needs a value: {arg}=VALUE")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def resolve_config(config_path, workdir, overrides):
    """The run's config: --config, else the workdir's config.json, else the built-in default;
    then the --config.KEY=VALUE overrides, validated."""
    from jaxretrieval import config as config_lib
    from jaxretrieval.workdir import Workdir

    wd = Workdir(workdir)
    if config_path:
        config = config_lib.load_config_file(config_path)
    elif os.path.isfile(wd.config_path):
        config = wd.read_config()
    else:
        config = config_lib.base_config()
    for key, value in overrides:
        config_lib.apply_override(config, key, value)
    config_lib.validate_config(config)
    return config


def run_train(argv) -> int:
    overrides, rest = _split_config_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train, evaluate retrieval, and build the index in a workdir "
                    "(resumes from the workdir's latest checkpoint). Override any config "
                    "value with --config.KEY=VALUE.")
    parser.add_argument("--config", help="a config file in configs/ (default: the workdir's "
                        "config.json, else the built-in offline default)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--eval_only", action="store_true",
                        help="evaluate and index the workdir's latest checkpoint, no training")
    args = parser.parse_args(rest)
    if args.eval_only:
        if args.config or overrides:
            from jaxretrieval.errors import JaxRetrievalError
            raise JaxRetrievalError(
                "--eval_only evaluates the workdir's own run (its config.json); drop --config "
                "and --config.KEY flags, or train a new workdir with them")
        from jaxretrieval.evaluation import evaluate_and_index
        metrics = evaluate_and_index(args.workdir)
    else:
        config = resolve_config(args.config, args.workdir, overrides)
        _use_one_cpu_device_per_core(config.global_batch_size)
        from jaxretrieval.evaluation import evaluate_and_index
        from jaxretrieval.training import train
        with _ProgressBar() as bar:
            train(config, args.workdir, on_progress=bar.update)
        metrics = evaluate_and_index(args.workdir)
    print(f"\nretrieval on {metrics['dataset']} ({metrics['split']}, "
          f"{metrics['num_queries']} queries), checkpoint step {metrics['checkpoint_step']}:")
    from jaxretrieval.evaluation import metrics_table
    print(metrics_table(metrics))
    print(f"\nworkdir: {os.path.abspath(args.workdir)}")
    return 0


def run_index(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxretrieval index",
        description="Rebuild DIR/index/ from DIR/embeddings/ (no model needed).")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    from jaxretrieval.evaluation import rebuild_index
    index = rebuild_index(args.workdir)
    print(json.dumps(index.manifest, indent=2, sort_keys=True))
    return 0


def run_search(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxretrieval search",
        description="Search the workdir's index with image files; prints JSON lines.")
    parser.add_argument("images", nargs="+", help="query image files")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=None)
    args = parser.parse_args(argv)
    from jaxretrieval.retriever import Retriever
    retriever = Retriever.load(args.workdir)
    keys, scores = retriever.search(args.images, k=args.k, threshold=args.threshold)
    for path, row_keys, row_scores in zip(args.images, keys, scores):
        print(json.dumps({"query": path, "results": [
            {"id": key, "score": round(score, 6)} for key, score in zip(row_keys, row_scores)]}))
    return 0


def run_serve(argv) -> int:
    from jaxretrieval.service.app import ServiceSettings

    defaults = ServiceSettings()
    parser = argparse.ArgumentParser(
        prog="python -m serve",
        description="Serve search, match and live item updates over HTTP for a trained "
                    "workdir (API docs at /docs, a web page at /).")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("JAXRETRIEVAL_API_KEY"),
                        help="required in header X-API-Key to add or delete items "
                             "(default: $JAXRETRIEVAL_API_KEY; none: updates are open)")
    parser.add_argument("--max-k", type=int, default=defaults.max_k)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="images per compiled embedding call")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="how long a query waits for others to share its batch")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="queries waiting to be embedded before the service answers 503")
    args = parser.parse_args(argv)

    import uvicorn

    from jaxretrieval.retriever import Retriever
    from jaxretrieval.service.app import create_app

    retriever = Retriever.load(args.workdir, writable=True)
    settings = ServiceSettings(
        api_key=args.api_key or None, max_k=args.max_k, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        data_dir=retriever.embedder.config.data_dir)
    retriever.warm_up(settings.max_batch)
    app = create_app(retriever, settings)
    print(f"serving {os.path.abspath(args.workdir)} on http://{args.host}:{args.port} "
          f"({retriever.index.count} items)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


class _ProgressBar:
    """Renders the trainer's progress events as a tqdm bar with loss, images/s and ETA."""

    def __init__(self):
        self._bar = None

    def update(self, event: dict) -> None:
        from tqdm import tqdm
        if self._bar is None:
            self._bar = tqdm(total=event["total_steps"], initial=event["step"], unit="step",
                             dynamic_ncols=True)
        self._bar.n = event["step"]
        rate = event["images_per_sec"]
        self._bar.set_postfix(loss=f"{event['loss']:.4f}",
                              img_s=f"{rate:.0f}" if rate == rate else "-")  # NaN: compiling
        self._bar.refresh()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()


if __name__ == "__main__":
    sys.exit(main())
