"""Several processes on JAX's multi-process runtime, over 127.0.0.1 on this machine.

Each test launches `python -m train` / `jaxretrieval embed` processes itself, gives them a
deadline, and kills whatever is left when it ends, so it always finishes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, tiny_config
from jaxretrieval.checkpoint import open_for_reading
from jaxretrieval.config import config_to_json
from jaxretrieval.export import load_embedding_export
from jaxretrieval.workdir import Workdir

DEADLINE_SECONDS = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, devices_per_process, log_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR="",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def run_processes(command, num_processes, devices_per_process, log_dir, *, extra=()):
    """Runs `command` as `num_processes` processes of one run; returns their logs."""
    port = free_port()
    procs, logs = [], []
    for i in range(num_processes):
        args = list(command) + list(extra)
        if num_processes > 1:
            args += ["--coordinator_address", f"127.0.0.1:{port}",
                     "--num_processes", str(num_processes), "--process_id", str(i)]
        logs.append(os.path.join(log_dir, f"{command[0]}-{num_processes}x{i}.log"))
        procs.append(start(args, devices_per_process, logs[-1]))
    try:
        for proc in procs:
            proc.wait(timeout=DEADLINE_SECONDS)
    finally:
        reap(procs)
    texts = [open(path).read() for path in logs]
    for proc, text in zip(procs, texts):
        assert proc.returncode == 0, text[-4000:]
    return texts


def reap(procs):
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def prepared_workdir(path, data_dir, **overrides):
    os.makedirs(path)
    with open(Workdir(path).config_path, "w") as f:
        f.write(config_to_json(tiny_config(data_dir, **overrides)))
    return str(path)


def final_state(workdir):
    store = open_for_reading(workdir)
    try:
        return store.latest_step(), store.restore()
    finally:
        store.close()


def assert_trees_close(a, b, atol):
    import jax
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_two_processes_of_two_devices_train_like_one_process_of_four(tmp_path, data_dir):
    single = prepared_workdir(tmp_path / "one", data_dir)
    # Evaluating while training and TensorBoard do not change what is trained.
    double = prepared_workdir(tmp_path / "two", data_dir, eval_every_steps=4, tensorboard=True)
    run_processes(["train", "--workdir", single], 1, 4, tmp_path)
    logs = run_processes(["train", "--workdir", double], 2, 2, tmp_path)

    step_one, state_one = final_state(single)
    step_two, state_two = final_state(double)
    assert step_one == step_two == 8
    assert_trees_close(state_one["params"], state_two["params"], atol=1e-5)
    assert_trees_close(state_one["batch_stats"], state_two["batch_stats"], atol=1e-5)
    # The shard_map wrapper over global arrays spanning both processes trains the same.
    mapped = prepared_workdir(tmp_path / "two_shard_map", data_dir, parallel="shard_map")
    run_processes(["train", "--workdir", mapped], 2, 2, tmp_path)
    assert_trees_close(state_one["params"], final_state(mapped)[1]["params"], atol=1e-5)

    # Process 0 alone wrote the train log (one line per logged step and evaluation: at step
    # 4 while training, at 8 the final one), TensorBoard's events, and printed results.
    with open(Workdir(double).train_log_path) as f:
        assert [(r["kind"], r["step"]) for r in map(json.loads, f)] == [
            ("train", 2), ("train", 4), ("eval", 4), ("train", 6), ("train", 8), ("eval", 8)]
    event_files = os.listdir(Workdir(double).tensorboard)
    assert len(event_files) == 2  # the training's and the final evaluation's
    assert len({name.split(".")[-2] for name in event_files}) == 1  # of one process id
    assert "retrieval on digits" in logs[0] and "retrieval on digits" not in logs[1]
    # Both processes embedded; the export and the metrics match the single-process run.
    one = load_embedding_export(Workdir(single).embeddings)
    two = load_embedding_export(Workdir(double).embeddings)
    assert two.keys == one.keys
    np.testing.assert_allclose(two.embeddings, one.embeddings, atol=1e-4)
    metrics_one = json.load(open(Workdir(single).metrics_path))
    metrics_two = json.load(open(Workdir(double).metrics_path))
    assert metrics_two["recall@1"] == pytest.approx(metrics_one["recall@1"], abs=0.01)
    assert os.path.isdir(Workdir(double).index)


def test_corpus_embedding_is_chunked_over_processes_and_resumes(tmp_path, trained_workdir):
    workdir, _ = trained_workdir
    out = str(tmp_path / "corpus")
    command = ["jaxretrieval.cli", "embed", "--workdir", workdir, "--output", out,
               "--chunk_size", "500"]
    run_processes(command, 2, 2, tmp_path)
    export = load_embedding_export(out)
    meta = export.metadata
    assert (meta["count"], meta["chunk_size"], meta["num_chunks"]) == (1797, 500, 4)
    reference = load_embedding_export(Workdir(workdir).embeddings)
    np.testing.assert_allclose(export.embeddings, reference.embeddings, atol=1e-5)
    assert export.keys == reference.keys and export.sources == reference.sources

    # An interrupted export: chunk 2 lost, the export not swapped in yet. Started again, it
    # embeds chunk 2 alone and keeps the others (their files are not rewritten).
    from jaxretrieval.export import partial_directory
    partial = partial_directory(out)
    os.rename(out, partial)
    with open(os.path.join(partial, "export.json")) as f:
        unfinished = dict(json.load(f), complete=False)
    with open(os.path.join(partial, "export.json"), "w") as f:
        json.dump(unfinished, f)
    import shutil
    shutil.rmtree(os.path.join(partial, "chunks", "000002"))
    kept = {c: os.stat(os.path.join(partial, "chunks", c)).st_mtime_ns
            for c in ("000000", "000001", "000003")}
    logs = run_processes(command, 2, 2, tmp_path)
    assert "(3 already done)" in logs[0], logs[0][-2000:]
    assert not os.path.exists(partial)
    assert {c: os.stat(os.path.join(out, "chunks", c)).st_mtime_ns for c in kept} == kept
    np.testing.assert_allclose(load_embedding_export(out).embeddings, reference.embeddings,
                               atol=1e-5)


def test_when_a_process_dies_the_others_stop_with_an_error(tmp_path, data_dir):
    workdir = prepared_workdir(tmp_path / "wd", data_dir, num_train_steps=100_000,
                               log_every_steps=1, checkpoint_every_steps=100_000)
    port = free_port()
    procs = [start(["train", "--workdir", workdir, "--coordinator_address",
                    f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i),
                    "--heartbeat_timeout", "5"], 2, tmp_path / f"p{i}.log")
             for i in range(2)]
    try:
        log_path = Workdir(workdir).train_log_path
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not (os.path.isfile(log_path) and os.path.getsize(log_path)):
            assert time.monotonic() < deadline and procs[0].poll() is None, \
                open(tmp_path / "p0.log").read()[-3000:]
            time.sleep(0.5)
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=120)  # heartbeats time out after 5 s
        stopped_after = time.monotonic() - killed
    finally:
        reap(procs)
    log = open(tmp_path / "p0.log").read()
    assert procs[0].returncode != 0
    # Whichever comes first: the failed collective (our message), or JAX's heartbeat check
    # aborting the process.
    assert ("error: process 0 of 2 lost contact with another process" in log
            or "This most likely indicates that another task died" in log), log[-3000:]
    assert stopped_after < 60  # well inside the wait above: the heartbeat is 5 s


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2), "needs all of"),
    (dict(auto=True, process_id=0), "drop --coordinator_address"),
    (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0), "use HOST:PORT"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
     "from 0 to N-1"),
    (dict(auto=True, heartbeat_timeout_seconds=0), "whole number >= 1"),
])
def test_bad_multi_process_settings_are_refused_before_joining(kwargs, message):
    from jaxretrieval.errors import JaxRetrievalError
    from jaxretrieval.parallel import initialize_distributed
    with pytest.raises(JaxRetrievalError, match=message):
        initialize_distributed(**kwargs)


def test_no_multi_process_settings_is_a_plain_run():
    import jax
    from jaxretrieval.parallel import initialize_distributed
    assert initialize_distributed() is False and jax.process_count() == 1
