"""Load on the HTTP service: latency percentiles and throughput for image and embedding
queries, with and without micro-batching; or how fast /healthz answers while large images
are being uploaded.

    python -m bench.serve_load --workdir runs/default [--clients 8] [--requests 2000]
        [--seconds 30]
    python -m bench.serve_load --workdir runs/default --healthz-under-uploads
        [--uploaders 4] [--side 6000] [--seconds 10] [--repeats 3]
    python -m bench.serve_load --workdir runs/default --ray [--replicas 1,2]

For each setting the first form starts `python -m serve` on a free local port
(micro-batching on: `--max-batch 32`; off: `--max-batch 1`), sends `--requests` queries per
kind from `--clients` threads (each on its own keep-alive connection, stopping after
`--seconds` at most), and prints a markdown table; `--markdown FILE` also appends it to
FILE.

With `--ray`, the server is `python -m serve --ray` (a local Ray instance, docs/ray.md),
once per replica count in `--replicas`, with micro-batching on.

The second starts one server and, `--repeats` times, probes /healthz from one keep-alive
connection for `--seconds` with the server idle, then for `--seconds` while `--uploaders`
threads post a `--side` x `--side` grey-gradient PNG (made once; it compresses to tens of
kB, so decoding, not the network, is the load) to /search in a loop. It prints the medians
over the repeats of the probes' p50 and p99 in both phases, side by side.
"""

import argparse
import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np

from bench.report import emit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir, port, max_batch, extra_args=()):
    process = subprocess.Popen(
        [sys.executable, "-m", "serve", "--workdir", workdir, "--port", str(port),
         "--max-batch", str(max_batch), "--no-access-log", *extra_args], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not start within 180 s")


def query_bodies(workdir):
    """(image multipart body and its content type, embedding JSON body) for a real item."""
    from jaxretrieval.data.sources import read_source
    from jaxretrieval.export import load_embedding_export
    from jaxretrieval.workdir import Workdir

    export = load_embedding_export(Workdir(workdir).embeddings)
    png = io.BytesIO()
    read_source(export.sources[1], export.metadata.get("data_dir")).save(png, format="PNG")
    boundary = uuid.uuid4().hex
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                 f"filename=\"q.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + \
        png.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    embedding = json.dumps({"embedding": export.embeddings[1].tolist()}).encode()
    return ((multipart, f"multipart/form-data; boundary={boundary}"),
            (embedding, "application/json"))


def load(port, body, content_type, clients, requests, seconds):
    """Latencies (s) of `requests` POST /search from `clients` threads, errors, wall time."""
    latencies, errors = [], [0]
    lock = threading.Lock()
    remaining = [requests]
    deadline = time.monotonic() + seconds

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < deadline:
            with lock:
                if remaining[0] == 0:
                    break
                remaining[0] -= 1
            start = time.perf_counter()
            try:
                connection.request("POST", "/search?k=10", body=body,
                                   headers={"content-type": content_type})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            elapsed = time.perf_counter() - start
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.asarray(latencies), errors[0], time.perf_counter() - start


def gradient_png_upload(side):
    """A multipart body holding a side x side grey-gradient PNG, and its content type."""
    from PIL import Image

    row = (np.arange(side) * 256 // side).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(np.broadcast_to(row, (side, side))).save(png, format="PNG")
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + \
        png.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}", len(png.getvalue())


def probe_healthz(port, seconds):
    """Latencies (s) of /healthz, one request after another on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        latencies.append(time.perf_counter() - start)
        if response.status != 200:
            raise SystemExit(f"/healthz answered {response.status}")
        time.sleep(0.005)  # a probe, not a load
    return np.asarray(latencies)


def upload_loop(port, body, content_type, stop, counts):
    """Posts the upload to /search until `stop` is set; counts answers by status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while not stop.is_set():
        try:
            connection.request("POST", "/search?k=10", body=body,
                               headers={"content-type": content_type})
            response = connection.getresponse()
            response.read()
            status = response.status
        except OSError:
            status = "connection error"
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        counts[status] = counts.get(status, 0) + 1


def healthz_under_uploads(args):
    body, content_type, png_bytes = gradient_png_upload(args.side)
    port = free_port()
    server = start_server(args.workdir, port, 32)
    rows = {"idle": [], "uploads": []}
    counts = {}
    try:
        probe_healthz(port, 1)  # warm-up
        for _ in range(args.repeats):
            rows["idle"].append(np.percentile(probe_healthz(port, args.seconds), [50, 99]))
            stop = threading.Event()
            uploaders = [threading.Thread(target=upload_loop,
                                          args=(port, body, content_type, stop, counts))
                         for _ in range(args.uploaders)]
            for thread in uploaders:
                thread.start()
            time.sleep(0.5)  # every uploader has a request in flight
            rows["uploads"].append(np.percentile(probe_healthz(port, args.seconds), [50, 99]))
            stop.set()
            for thread in uploaders:
                thread.join()
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = [f"/healthz while uploading, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{platform.machine()} {os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.1f}, workdir `{args.workdir}`:", "",
             f"`python -m bench.serve_load --workdir {args.workdir} --healthz-under-uploads "
             f"--uploaders {args.uploaders} --side {args.side} --seconds {args.seconds:g} "
             f"--repeats {args.repeats}`", "",
             f"({args.side}x{args.side} PNG of {png_bytes} bytes; medians of {args.repeats} "
             f"repeats; uploads answered: {counts})", "",
             "| server | /healthz p50 ms | /healthz p99 ms |", "|---|---|---|"]
    for phase, label in (("idle", "idle"),
                         ("uploads", f"{args.uploaders} clients uploading")):
        p50, p99 = np.median(np.asarray(rows[phase]), axis=0) * 1000
        lines.append(f"| {label} | {p50:.1f} | {p99:.1f} |")
    emit(lines, args.markdown)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/default")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--markdown")
    parser.add_argument("--healthz-under-uploads", action="store_true",
                        help="measure /healthz latency idle and while large PNGs upload")
    parser.add_argument("--uploaders", type=int, default=4)
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray", action="store_true",
                        help="load `serve --ray` with each replica count of --replicas")
    parser.add_argument("--replicas", default="1,2")
    args = parser.parse_args()
    if args.healthz_under_uploads:
        return healthz_under_uploads(args)
    image_query, embedding_query = query_bodies(args.workdir)
    if args.ray:
        return ray_load(args, image_query, embedding_query)

    lines = [f"Service load, {time.strftime('%Y-%m-%d')}, {platform.machine()} "
             f"{os.cpu_count()} cores, {args.clients} concurrent clients, workdir "
             f"`{args.workdir}`:", "",
             f"`python -m bench.serve_load --workdir {args.workdir} --clients {args.clients} "
             f"--requests {args.requests} --seconds {args.seconds:g}`", "",
             "| query | micro-batching | requests | errors | p50 ms | p95 ms | p99 ms | req/s |",
             "|---|---|---|---|---|---|---|---|"]
    for max_batch in (32, 1):
        port = free_port()
        server = start_server(args.workdir, port, max_batch)
        try:
            query_rows(lines, port, args, "on (32)" if max_batch > 1 else "off",
                       image_query, embedding_query)
        finally:
            server.terminate()
            server.wait(timeout=30)
    emit(lines, args.markdown)


def query_rows(lines, port, args, setting: str, image_query, embedding_query) -> None:
    """Appends (and prints) one table row per query kind: its load on the server at `port`
    after a warm-up, under the table's `setting` column."""
    for kind, (body, content_type) in (("embedding", embedding_query), ("image", image_query)):
        load(port, body, content_type, args.clients, 50, 10)  # warm-up
        latencies, errors, wall = load(port, body, content_type, args.clients,
                                       args.requests, args.seconds)
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) * 1000
        lines.append(f"| {kind} | {setting} | {len(latencies) + errors} | {errors} | "
                     f"{p50:.1f} | {p95:.1f} | {p99:.1f} | {len(latencies) / wall:.0f} |")
        print(lines[-1], flush=True)


def ray_load(args, image_query, embedding_query):
    """The query table for `serve --ray`, one server per replica count."""
    counts = [int(count) for count in args.replicas.split(",")]
    lines = [f"Service load on Ray Serve (a local instance), {time.strftime('%Y-%m-%d')}, "
             f"{platform.machine()} {os.cpu_count()} cores, {args.clients} concurrent "
             f"clients, workdir `{args.workdir}`:", "",
             f"`python -m bench.serve_load --workdir {args.workdir} --ray --replicas "
             f"{args.replicas} --clients {args.clients} --requests {args.requests} "
             f"--seconds {args.seconds:g}`", "",
             "| query | replicas per shard | requests | errors | p50 ms | p95 ms | p99 ms "
             "| req/s |", "|---|---|---|---|---|---|---|---|"]
    for count in counts:
        port = free_port()
        server = start_server(args.workdir, port, 32, ["--ray", "--replicas", str(count)])
        try:
            query_rows(lines, port, args, str(count), image_query, embedding_query)
        finally:
            server.terminate()
            server.wait(timeout=60)
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
