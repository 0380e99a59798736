"""`python -m serve` stopped as a terminal (Ctrl-C) or a process manager stops it: it shuts
down cleanly and says so."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import REPO
from test_service_process import free_port, request


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_server_says_it_stopped_serving(trained_workdir, sig):
    workdir = trained_workdir[0]
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "serve", "--workdir", workdir, "--port", str(port),
             "--no-access-log"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if request(port, "GET", "/healthz", timeout=2)[0] == 200:
                        break
                except OSError:
                    time.sleep(0.3)
            assert process.poll() is None, "the server stopped before it answered /healthz"
            process.send_signal(sig)
            returncode = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        out.seek(0)
        text = out.read().decode()
    where = f"{os.path.abspath(workdir)} on http://127.0.0.1:{port}"
    assert f"serving {where}" in text, text[-3000:]
    assert returncode == 0, text[-3000:]
    lines = text.splitlines()
    assert f"stopped serving {where}" in lines, text[-3000:]
    # Said once, and after the start line.
    assert lines.index(f"stopped serving {where}") > next(
        i for i, line in enumerate(lines) if line.startswith(f"serving {where}"))
