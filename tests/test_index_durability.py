"""An acknowledged change survives SIGKILL of the process that made it."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from jaxretrieval.index import Index

DIM = 16
NUM_CHANGES = 50
KILL_AFTER_ACKS = 30
DEADLINE_SECONDS = 60

# Change i touches only its own key, so each acknowledged change can be
# checked alone: even i upserts "new-i", odd i deletes "item-i".
WRITER = """
import sys, time
import numpy as np
from jaxretrieval.index import Index

index = Index.load(sys.argv[1], writable=True)
print("ready", flush=True)
for i in range(int(sys.argv[2])):
    if i % 2 == 0:
        vector = np.random.default_rng(i).normal(size=(1, index.embedding_dim))
        index.upsert([f"new-{i}"], (vector / np.linalg.norm(vector)).astype(np.float32))
    else:
        index.delete([f"item-{i}"])
    print(f"ack {i}", flush=True)
    time.sleep(0.01)  # keep it writing when the kill comes
"""


def unit_vector(seed):
    vector = np.random.default_rng(seed).normal(size=(1, DIM))
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def read_lines(stream, lines):
    for line in stream:
        lines.put(line.strip())
    lines.put(None)  # end of output


def test_acknowledged_changes_survive_sigkill(tmp_path):
    gallery = np.concatenate([unit_vector(1000 + row) for row in range(100)])
    Index.build(gallery, [f"item-{row}" for row in range(100)], checkpoint_step=1,
                model_config_hash="abc").save(tmp_path / "index")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "index"), str(NUM_CHANGES)],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    acknowledged = []
    try:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while len(acknowledged) < KILL_AFTER_ACKS:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "the writer exited early"
            if line.startswith("ack "):
                acknowledged.append(int(line.split()[1]))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        # Acks already in the pipe were printed after their change returned.
        while (line := lines.get(timeout=10)) is not None:
            if line.startswith("ack "):
                acknowledged.append(int(line.split()[1]))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    assert acknowledged == list(range(len(acknowledged)))

    index = Index.load(tmp_path / "index")

    for i in acknowledged:
        if i % 2 == 0:
            keys, scores = index.search(unit_vector(i), 1)
            assert keys == [[f"new-{i}"]] and scores[0][0] > 0.999
        else:
            assert f"item-{i}" not in index
    # Whatever happened after the last ack, the index is whole and writable.
    with Index.load(tmp_path / "index", writable=True) as writable:
        writable.delete(["item-0"])
    assert Index.load(tmp_path / "index").count == index.count - 1
