"""The command line: `jaxretrieval train|embed|index|search|serve|export-model ...` (and
`python -m train`).

The one place that parses argv and renders progress; everything it runs lives in the library.
"""

import argparse
import datetime
import json
import logging
import os
import signal
import sys
import time

from jaxretrieval.errors import JaxRetrievalError, WriterBusyError

DEFAULT_WORKDIR = os.path.join("runs", "default")


# Each command's one-line description, for `jaxretrieval --help` and its own --help.
COMMANDS = {
    "train": "train, evaluate retrieval and build the index in a workdir (resumes)",
    "embed": "embed a dataset or folder of any size with a workdir's model",
    "index": "rebuild a workdir's index from its embeddings (no model needed)",
    "search": "search a workdir's index with image files; prints JSON lines",
    "explain": "show which parts of two images carry their similarity, as a PNG",
    "serve": "serve search, match and item updates over HTTP, with a web page",
    "export-model": "export the model (StableHLO or TF SavedModel) to run without this package",
    "compress": "write a smaller, faster model of a workdir into a new workdir, evaluated",
    "config": "list every config key with its value and meaning",
    "recover-index": "keep an index's updates logged before damage to its log; reports losses",
}


def usage(prog: str = "jaxretrieval") -> str:
    lines = [f"usage: {prog} {{{','.join(COMMANDS)}}} [--help] ...", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", f"`{prog} COMMAND --help` describes a command's options. `jaxretrieval "
              "COMMAND` works from any directory; `python -m train|serve` only from the "
              "repository's root."]
    return "\n".join(lines)


def main(argv=None, prog: str = "jaxretrieval") -> int:
    """Runs one command; `argv=None` means this process's own command line (the console
    script), which may first re-execute itself for huge pages (`host_memory`). `prog` is
    how the user called it, for usage lines (`python -m` for `python -m train`)."""
    if argv is None:
        from jaxretrieval.host_memory import reexec_with_huge_pages
        reexec_with_huge_pages()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": run_train, "embed": run_embed, "index": run_index,
                "search": run_search, "explain": run_explain, "serve": run_serve,
                "export-model": run_export_model, "compress": run_compress,
                "config": run_config, "recover-index": run_recover_index}
    if argv and argv[0] in ("-h", "--help"):
        print(usage(prog))
        return 0
    if not argv or argv[0] not in commands:
        print(usage(prog), file=sys.stderr)
        if argv:
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    # Imported after the re-execution above: JAX is slow to import twice.
    from jaxretrieval import runtime
    runtime.setup()
    # Our own progress at INFO; dependencies (TFDS, absl, Orbax) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("jaxretrieval").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's advice to install OpenCV
    try:
        return commands[argv[0]](argv[1:], prog=f"{prog} {argv[0]}")
    except WriterBusyError as err:
        print(f"error: {err.command_line_message()}", file=sys.stderr)
        return 1
    except JaxRetrievalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        lost = _lost_process_message(err)
        if lost is None:
            raise
        print(f"error: {lost}", file=sys.stderr)
        return 1


def _lost_process_message(err) -> str | None:
    """One clear sentence when a collective of a multi-process run failed because another
    process went away (JAX itself then stops this one once heartbeats time out)."""
    jax = sys.modules.get("jax")
    if (jax is None or not isinstance(err, jax.errors.JaxRuntimeError)
            or jax.process_count() == 1):
        return None
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"process {jax.process_index()} of {jax.process_count()} lost contact with another "
            f"process of the run ({detail}); see the other processes' logs for why it stopped, "
            "then start every process again with the same command: training resumes from the "
            "workdir's last checkpoint")


def split_config_overrides(argv):
    """Separates `--config.KEY=VALUE` / `--config.KEY VALUE` from the other arguments."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise JaxRetrievalError(f"{arg} needs a value: {arg}=VALUE")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def run_train(argv, prog="jaxretrieval train") -> int:
    overrides, rest = split_config_overrides(argv)
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train, evaluate retrieval, and build the index in a workdir "
                    "(resumes from the workdir's latest checkpoint). Override any config "
                    "value with --config.KEY=VALUE (`jaxretrieval config` lists the keys).")
    parser.add_argument("--config", help="a config file in configs/ (default: the workdir's "
                        "config.json, else the built-in offline default)")
    _add_workdir_argument(parser)
    parser.add_argument("--eval_only", action="store_true",
                        help="evaluate and index the workdir's latest checkpoint, no training")
    _add_distributed_arguments(parser)
    args = parser.parse_args(rest)
    if args.eval_only and (args.config or overrides):
        raise JaxRetrievalError(
            "--eval_only evaluates the workdir's own run (its config.json); drop --config "
            "and --config.KEY flags, or train a new workdir with them")
    from jaxretrieval import runtime
    from jaxretrieval.config import resolve_config
    config = resolve_config(args.config, args.workdir, overrides)
    # Chosen here, before joining other processes: each process steps through its share.
    runtime.setup(config.global_batch_size // (args.num_processes or 1))
    primary = _join_distributed(args)
    from jaxretrieval.pipeline import evaluate_and_index, metrics_table
    from jaxretrieval.training import train_and_evaluate
    steps, chunks = ProgressBar("step", enabled=primary), ProgressBar("chunk", enabled=primary)
    with steps, chunks:
        if args.eval_only:
            metrics = evaluate_and_index(args.workdir, on_progress=chunks.update_chunks)
        else:
            metrics = train_and_evaluate(config, args.workdir, on_progress=steps.update_steps,
                                         on_export_progress=chunks.update_chunks)
    if primary:
        print(f"\nretrieval on {metrics['dataset']} ({metrics['split']}, "
              f"{metrics['num_queries']} queries), checkpoint step "
              f"{metrics['checkpoint_step']}:")
        print(metrics_table(metrics))
        print(f"\nworkdir: {os.path.abspath(args.workdir)}")
    return 0


def run_embed(argv, prog="jaxretrieval embed") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Embed a dataset or a folder of any size with the workdir's latest "
                    "checkpoint, on every device of every process, into an Orbax export in "
                    "chunks (an interrupted run resumes: finished chunks are kept). "
                    "`jaxretrieval index --workdir DIR` then builds the index from it.")
    _add_workdir_argument(parser)
    parser.add_argument("--dataset", help="digits, tfds:NAME, folder:PATH (a folder of "
                        "images, or of class sub-folders) or video:PATH (a folder or list "
                        "file of videos, docs/video.md); default: the run's own dataset")
    parser.add_argument("--data_dir", help="TFDS data directory (default: the run's)")
    parser.add_argument("--output", help="export directory (default: DIR/embeddings, the one "
                        "the index is built from)")
    from jaxretrieval.export import DEFAULT_CHUNK_SIZE
    parser.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="items per chunk: the unit that is written, and kept when resumed")
    parser.add_argument("--video_rate", type=float, help="video frames sampled per second")
    parser.add_argument("--video_scenes", type=float, metavar="THRESHOLD",
                        help="also sample video frames at scene changes (0..1, e.g. 0.15)")
    _add_distributed_arguments(parser)
    args = parser.parse_args(argv)
    from jaxretrieval import runtime
    from jaxretrieval.config import resolve_config
    runtime.setup(resolve_config(None, args.workdir).embed_batch_size)
    primary = _join_distributed(args)
    from jaxretrieval.pipeline import embed_corpus
    with ProgressBar("chunk", enabled=primary) as bar:
        meta = embed_corpus(args.workdir, dataset=args.dataset, data_dir=args.data_dir,
                            output=args.output, chunk_size=args.chunk_size,
                            on_progress=bar.update_chunks, video_rate=args.video_rate,
                            video_scene_threshold=args.video_scenes)
    if primary:
        print(json.dumps({key: meta[key] for key in ("dataset", "count", "embedding_dim",
                                                     "num_chunks", "checkpoint_step")},
                         **({"skipped_videos": meta["skipped_videos"]}
                            if meta.get("skipped_videos") else {})))
    return 0


def run_compress(argv, prog="jaxretrieval compress") -> int:
    from jaxretrieval.compress import METHODS, compress_workdir
    parser = argparse.ArgumentParser(
        prog=prog, description="Compress the workdir's model into a new workdir (pruning, "
        "channel pruning, weight sharing, ...), then embed, evaluate the run's split and "
        "index there, as training does (docs/compression.md). Method options not given "
        "take the method's default.")
    _add_workdir_argument(parser)
    parser.add_argument("--method", required=True, choices=list(METHODS))
    parser.add_argument("--output", required=True, help="the new workdir (absent or empty)")
    flags = {}  # option name -> the methods taking it
    for method in METHODS.values():
        for name in method.options:
            flags.setdefault(name, []).append(method.name)
    for method in METHODS.values():
        group = parser.add_argument_group(f"--method {method.name}", method.summary)
        for name, option in method.options.items():
            if flags[name][0] == method.name:  # a shared option is listed once
                defaults = ", ".join(f"{METHODS[m].options[name].default} for {m}"
                                     for m in flags[name])
                group.add_argument(f"--{name}", type=option.kind, default=None,
                                   help=f"{option.help}; {option.valid_values()} (default "
                                        f"{defaults})")
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    for name in given:
        if args.method not in flags[name]:
            raise JaxRetrievalError(f"--{name} is an option of --method "
                                    f"{' or '.join(flags[name])}, not of {args.method}")
    with ProgressBar("step") as steps, ProgressBar("chunk") as chunks:
        record = compress_workdir(args.workdir, args.output, args.method, given,
                                  on_progress=steps.update_steps,
                                  on_export_progress=chunks.update_chunks)
    from jaxretrieval.pipeline import metrics_table
    print(f"\n{args.method} {json.dumps(record['options'])}: {record['model_bytes']} bytes "
          f"(source {record['source_model_bytes']})")
    print(metrics_table(record["metrics"]))
    print(f"\nworkdir: {os.path.abspath(args.output)}")
    return 0


def _add_workdir_argument(parser) -> None:
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help="the run directory: config.json, checkpoints, embeddings, index "
                             "(default %(default)s)")


def run_config(argv, prog="jaxretrieval config") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print every config key as `key = value  # meaning`: the defaults, or "
                    "a config file's or a workdir's values. Set any of them with "
                    "--config.KEY=VALUE on `jaxretrieval train`.")
    parser.add_argument("--config", help="a config file (default: the built-in defaults)")
    parser.add_argument("--workdir", help="list the values a workdir was trained with "
                        "(its config.json)")
    args = parser.parse_args(argv)
    from jaxretrieval.config import base_config, load_config_file
    from jaxretrieval.config_keys import describe_config
    if args.config:
        config = load_config_file(args.config)
    elif args.workdir:
        from jaxretrieval.workdir import Workdir
        config = Workdir(args.workdir).read_config()
    else:
        config = base_config()
    print(describe_config(config), end="")
    return 0


def _add_distributed_arguments(parser) -> None:
    from jaxretrieval.parallel import DEFAULT_HEARTBEAT_TIMEOUT_SECONDS

    group = parser.add_argument_group(
        "several processes (hosts)", "Run the same command on every host, each with its "
        "own --process_id; the workdir must be one folder all of them share.")
    group.add_argument("--coordinator_address", metavar="HOST:PORT",
                       help="the address of process 0 and a free port, on every process")
    group.add_argument("--num_processes", type=int, metavar="N")
    group.add_argument("--process_id", type=int, metavar="I", help="0 .. N-1")
    group.add_argument("--distributed", choices=["auto"],
                       help="auto: read the cluster from the platform (TPU pod slice, SLURM, "
                            "Open MPI; Kubernetes with the kubernetes client)")
    group.add_argument("--heartbeat_timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
                       metavar="SECONDS", help="after this long without word from a process, "
                       "the others stop with an error instead of waiting (default %(default)s)")


def _join_distributed(args) -> bool:
    """Joins the multi-process run the arguments describe, if any; True on process 0."""
    from jaxretrieval import parallel

    parallel.initialize_distributed(
        coordinator_address=args.coordinator_address, num_processes=args.num_processes,
        process_id=args.process_id, auto=args.distributed == "auto",
        heartbeat_timeout_seconds=args.heartbeat_timeout)
    return parallel.is_primary_process()


def run_index(argv, prog="jaxretrieval index") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Rebuild DIR/index/ from DIR/embeddings/ (no model needed).")
    _add_workdir_argument(parser)
    parser.add_argument("--shards", type=int, default=None,
                        help="split the index into this many ScaNN shards by key (1: one "
                             "flat index; default: as many as the index there has, else 1); "
                             "replaces either layout in place")
    parser.add_argument("--embedding_dtype", "--embedding-dtype",
                        choices=("float32", "float16", "int8"), default=None,
                        help="the precision the index stores and scores its rows in: "
                             "float16 halves and int8 quarters their bytes, for a small loss "
                             "of recall (default: as the index there has, else float32; "
                             "docs/compression.md)")
    args = parser.parse_args(argv)
    from jaxretrieval.pipeline import rebuild_index
    index = rebuild_index(args.workdir, num_shards=args.shards,
                          embedding_dtype=args.embedding_dtype)
    print(json.dumps(index.manifest, indent=2, sort_keys=True))
    return 0


def run_recover_index(argv, prog="jaxretrieval recover-index") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Recover DIR/index/ after damage to its write-ahead log: keep every update "
                    "logged before the damage, move the damaged log aside into "
                    "DIR/index/damaged-logs/ (it is never deleted), write a consistent "
                    "snapshot, and print what was lost (JSON). Stop the service first.")
    _add_workdir_argument(parser)
    args = parser.parse_args(argv)
    from jaxretrieval.index import recover
    from jaxretrieval.workdir import Workdir
    report = recover(Workdir(args.workdir).index)
    print(json.dumps(report, indent=2))
    if not report["recovered"]:
        print("no damaged log found: nothing was changed", file=sys.stderr)
    else:
        for log in report["logs"]:
            print(f"{log['log']}: kept {log['kept_records']} records, lost lines "
                  f"{log['lost_lines']} (a copy is in {log['kept_aside']})", file=sys.stderr)
    return 0


def run_search(argv, prog="jaxretrieval search") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Search the workdir's index with image files, or its videos with a "
                    "clip or an image (--video, docs/video.md); prints JSON lines.")
    parser.add_argument("images", nargs="*", help="query image files")
    parser.add_argument("--video", metavar="PATH", help="the videos holding this clip (or "
                        "image) and where: one JSON line of VideoMatch results")
    _add_workdir_argument(parser)
    parser.add_argument("--k", type=int, default=10,
                        help="results per query (default %(default)s)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="drop results whose cosine similarity is below this (default: "
                             "keep all k)")
    parser.add_argument("--filter", default=None, metavar="JSON",
                        help="only items whose metadata passes this filter, e.g. "
                             "'{\"label\": \"cat\", \"year\": {\"in\": [2023, 2024]}}' "
                             "(docs/index.md#metadata-and-filters)")
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.video):
        parser.error("give query image files, or --video PATH")
    if args.video and (args.filter is not None or args.threshold is not None):
        parser.error("--filter and --threshold apply to image searches, not to --video")
    conditions = None
    if args.filter is not None:
        from jaxretrieval.index import checked_filter
        try:
            conditions = json.loads(args.filter)
        except ValueError as error:
            parser.error(f"--filter is not valid JSON ({error}); quote it for the shell, "
                         "e.g. --filter '{\"label\": \"cat\"}'")
        checked_filter(conditions)  # before the model loads
    from jaxretrieval.retriever import Retriever
    retriever = Retriever.load(args.workdir)
    if args.video:
        matches = retriever.search_video(args.video, k=args.k)
        print(json.dumps({"query": args.video, "results": [m.as_dict() for m in matches]}))
        return 0
    keys, scores, metadata = retriever.search(args.images, k=args.k, threshold=args.threshold,
                                              filter=conditions, with_metadata=True)
    for path, row_keys, row_scores, row_metadata in zip(args.images, keys, scores, metadata):
        print(json.dumps({"query": path, "results": [
            {"id": key, "score": round(score, 6),
             **({"metadata": item} if item is not None else {})}
            for key, score, item in zip(row_keys, row_scores, row_metadata)]}))
    return 0


def run_explain(argv, prog="jaxretrieval explain") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Explain the similarity of two images with the workdir's model: writes "
                    "both images side by side with the heat of each position drawn on (red "
                    "where it is above the image's mean, blue below), the similarity and the "
                    "match decision; prints them as JSON. A face model shows the aligned "
                    "chips. Method and maths: docs/explain.md.")
    parser.add_argument("images", nargs=2, metavar="IMAGE", help="the two image files")
    _add_workdir_argument(parser)
    parser.add_argument("--output", required=True, help="the PNG file to write")
    parser.add_argument("--threshold", type=float, default=None,
                        help="decide the match at this similarity (default: the index's "
                             "calibrated threshold)")
    parser.add_argument("--side", type=int, default=256,
                        help="pixels per image in the PNG (default %(default)s)")
    parser.add_argument("--stage", default=None,
                        help="the backbone stage whose feature map the heat is over, e.g. "
                             "stage2, or `final` (the map the head pools: the exact "
                             "decomposition where the head allows it); default: the deepest "
                             "stage of at least 16x16 positions")
    args = parser.parse_args(argv)
    if args.side < 16:
        raise JaxRetrievalError(f"--side={args.side}; use at least 16 pixels")
    from jaxretrieval.explain import render
    from jaxretrieval.fileio import atomic_file, give_ordinary_mode
    from jaxretrieval.retriever import Retriever
    retriever = Retriever.load(args.workdir)
    result = retriever.explain(*args.images, threshold=args.threshold, stage=args.stage)
    picture = render(result, side=args.side,
                     labels=[os.path.basename(path) for path in args.images])
    with atomic_file(args.output, "wb") as f:  # never a half-written PNG
        picture.save(f, format="PNG")
    give_ordinary_mode(args.output)
    print(json.dumps({"images": args.images, "similarity": round(result.similarity, 6),
                      "same": result.same, "threshold": result.threshold,
                      "method": result.method, "stage": result.stage,
                      "heatmap": list(result.heatmaps[0].shape), "output": args.output}))
    return 0


def run_export_model(argv, prog="jaxretrieval export-model") -> int:
    from jaxretrieval.model_export import DEFAULT_PLATFORMS, FORMATS

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export the workdir's latest model, from uint8 images to L2-normalised "
                    "embeddings with its weights inside, as a program that runs without "
                    "this package (docs/model_export.md).")
    _add_workdir_argument(parser)
    parser.add_argument("--format", required=True, metavar="|".join(FORMATS),
                        help="stablehlo: jax.export's serialized module; savedmodel: a "
                             "TensorFlow SavedModel for TF Serving")
    parser.add_argument("--output", required=True,
                        help="the directory to create (it must not exist)")
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help="comma-separated platforms to lower for (default %(default)s)")
    args = parser.parse_args(argv)
    from jaxretrieval.model_export import export_model
    metadata = export_model(args.workdir, args.format, args.output, platforms=args.platforms)
    print(json.dumps(metadata, indent=2))
    return 0


def run_serve(argv, prog="jaxretrieval serve") -> int:
    from jaxretrieval.service.app import ServiceSettings, check_api_key
    from jaxretrieval.service.guards import allowed_host_names

    defaults = ServiceSettings()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve search, match and live item updates over HTTP for a trained "
                    "workdir (API docs at /docs, a web page at /).")
    _add_workdir_argument(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000,
                        help="TCP port to listen on (default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("JAXRETRIEVAL_API_KEY"),
                        help="required in header X-API-Key to add or delete items "
                             "(default: $JAXRETRIEVAL_API_KEY, which keeps the key out of "
                             "`ps`; none: updates are open)")
    parser.add_argument("--allowed-hosts", default="",
                        help="comma-separated names clients may send in the Host header, "
                             "beyond the bound address (bound to 127.0.0.1: localhost, "
                             "127.0.0.1, [::1]); '*' allows any (unsafe: DNS rebinding)")
    parser.add_argument("--max-k", type=int, default=defaults.max_k)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="images per compiled embedding call")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="how long a query waits for others to share its batch")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="queries waiting to be embedded before the service answers 503")
    parser.add_argument("--max-json-bytes", type=int, default=defaults.max_json_bytes,
                        help="largest JSON body accepted (default %(default)s)")
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s,
                        help="seconds a request's line and headers may take to arrive")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                        help="seconds a request's body may take to arrive")
    parser.add_argument("--decode-threads", type=int, default=0,
                        help="threads decoding uploaded images (default: half the cores)")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="do not log a line per request (method, path, status, ms) to "
                             "stderr")
    ray_flags = parser.add_argument_group(
        "Ray Serve", "serve the index shards and the model as Ray Serve deployments, which "
        "may span several machines (docs/ray.md); needs pip install -e \".[ray]\"")
    ray_flags.add_argument("--ray", action="store_true",
                           help="serve through Ray Serve instead of this process alone")
    ray_flags.add_argument("--address", default=None,
                           help="the Ray cluster to join (e.g. HOST:6379, or auto for the "
                                "one this machine joined with `ray start`; default: start a "
                                "local one)")
    ray_flags.add_argument("--replicas", type=int, default=None,
                           help="read replicas per index shard (default 1)")
    ray_flags.add_argument("--embedder-replicas", type=int, default=None,
                           help="replicas of the model (default 1; one GPU each where the "
                                "cluster has GPUs)")
    args = parser.parse_args(argv)
    if not args.ray and (args.address or args.replicas or args.embedder_replicas):
        raise JaxRetrievalError("--address, --replicas and --embedder-replicas go with "
                                "--ray; add it, or leave them out to serve in this process")
    start_ray_backend = _ray_backend_starter() if args.ray else None
    check_api_key(args.api_key or None)
    allowed_hosts = tuple(name.strip() for name in args.allowed_hosts.split(",") if name.strip())
    check_port_free(args.host, args.port)

    import uvicorn

    from jaxretrieval.retriever import Retriever
    from jaxretrieval.service.app import create_app
    from jaxretrieval.service.server import server_config

    if start_ray_backend is None:
        retriever = Retriever.load(args.workdir, writable=True)
    else:
        retriever = start_ray_backend(args.workdir, address=args.address,
                                      replicas=args.replicas or 1,
                                      embedder_replicas=args.embedder_replicas or 1,
                                      max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    # From here on the retriever holds the index's writer lock (and under --ray, a Serve
    # app and its actors): whatever ends the start-up or the serving releases them.
    try:
        settings = ServiceSettings(
            api_key=args.api_key or None, max_k=args.max_k, max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
            data_dir=retriever.embedder.config.data_dir, access_log=args.access_log,
            host=args.host, allowed_hosts=allowed_hosts, max_json_bytes=args.max_json_bytes,
            header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
            decode_threads=args.decode_threads)
        retriever.warm_up(settings.max_batch)
        app = create_app(retriever, settings)
        where = f"{os.path.abspath(args.workdir)} on http://{args.host}:{args.port}"
        print(f"serving {where} ({retriever.count} items"
              f"{', on Ray Serve' if start_ray_backend else ''})", flush=True)
        hosts = allowed_host_names(args.host, allowed_hosts)
        if hosts is None:
            print("answering any Host header (--allowed-hosts '*'): a web page can reach "
                  "this server through DNS rebinding", flush=True)
        elif hosts <= {"localhost", "127.0.0.1", "[::1]"} and args.host not in (
                "127.0.0.1", "localhost", "::1"):
            print(f"answering only Host {', '.join(sorted(hosts))}: pass --allowed-hosts "
                  "with the names or addresses other machines use to reach this one",
                  flush=True)
        # uvicorn shuts down on SIGINT and SIGTERM, then raises the signal again; with
        # Ctrl-C's handler for SIGTERM too, both end as a KeyboardInterrupt here instead of
        # ending the process, so a process manager's stop also closes the retriever and
        # prints the line below.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            uvicorn.Server(server_config(app, host=args.host, port=args.port,
                                         header_timeout_s=settings.header_timeout_s)).run()
        except KeyboardInterrupt:
            pass
    finally:
        retriever.close()
    print(f"stopped serving {where}", flush=True)
    return 0


def _ray_backend_starter():
    """`rayserve.backend.start_ray_backend`, or one clear error when Ray is not installed."""
    try:
        from jaxretrieval.rayserve.backend import start_ray_backend
    except ImportError as err:
        if "ray" not in str(err).lower():
            raise
        raise JaxRetrievalError(
            f"--ray needs Ray Serve, which is not installed ({err}): pip install -e \".[ray]\" "
            "(or pip install -r requirements-ray.txt), or serve without --ray") from None
    return start_ray_backend


def check_port_free(host: str, port: int) -> None:
    """Refuses a port another process listens on, before the slow start-up and before
    uvicorn would fail on it with a raw errno."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise JaxRetrievalError(f"cannot bind --host {host!r} ({err}); pass an address of "
                                "this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn binds: reuse a port whose last connections are still closing.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise JaxRetrievalError(
                    f"port {port} on {host} is in use (another server, perhaps an earlier "
                    "`jaxretrieval serve`); stop it, or pass --port with a free one") from None
            raise JaxRetrievalError(f"cannot listen on {host}:{port} ({err.strerror}); "
                                    "pass another --host or --port") from None


def _rate(images_per_sec) -> str:
    return f"{images_per_sec:.0f}" if images_per_sec == images_per_sec else "-"  # NaN: compiling


class ProgressBar:
    """Renders progress events as a tqdm bar on a terminal, and as one plain line per event
    (`step 40/600 loss 1.2345 images/s 812 ETA 0:01:09`) when the output is a file or a
    pipe, where a `\\r` bar would be one endless line. Process 0 only: `enabled`."""

    def __init__(self, unit: str, *, enabled: bool = True, stream=None):
        self._unit, self._enabled, self._bar = unit, enabled, None
        self._stream = stream if stream is not None else sys.stderr
        self._plain = not (hasattr(self._stream, "isatty") and self._stream.isatty())
        self._first = None  # (time, done) of the first event of the current bar

    def update(self, done: int, total: int, **postfix) -> None:
        if not self._enabled:
            return
        if self._plain:
            self._write_line(done, total, postfix)
            return
        from tqdm import tqdm
        if self._bar is None:
            self._bar = tqdm(total=total, initial=done, unit=self._unit, dynamic_ncols=True,
                             file=self._stream)
        self._bar.n = done
        self._bar.set_postfix(**postfix)
        self._bar.refresh()
        if done >= total:  # the next bar starts on its own line
            self.close()

    def _write_line(self, done, total, postfix) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = (now, done)
        start, start_done = self._first
        # The first event includes compilation: the ETA is paced by the events after it.
        eta = ("-" if done <= start_done else
               str(datetime.timedelta(seconds=round((now - start) / (done - start_done)
                                                    * (total - done)))))
        fields = "".join(f" {'images/s' if key == 'img_s' else key} {value}"
                         for key, value in postfix.items())
        print(f"{self._unit} {done}/{total}{fields} ETA {eta}", file=self._stream, flush=True)
        if done >= total:
            self._first = None

    def update_steps(self, event: dict) -> None:
        """For the training's events."""
        self.update(event["step"], event["total_steps"], loss=f"{event['loss']:.4f}",
                    img_s=_rate(event["images_per_sec"]))

    def update_chunks(self, event: dict) -> None:
        """For the embedding export's events."""
        self.update(event["done"], event["total"], img_s=_rate(event["images_per_sec"]))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    sys.exit(main())
