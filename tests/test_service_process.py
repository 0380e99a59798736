"""The service as users run it: `python -m serve` in its own process, killed and restarted,
and its web page driven in headless Chromium."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import REPO

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, headers=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Server:
    """`python -m serve` on a free port; always killed and reaped by `stop`."""

    def __init__(self, workdir, *extra):
        self.port = free_port()
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        # stderr to a file, not a pipe nobody drains: the access log writes a line a request.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serve", "--workdir", workdir, "--port", str(self.port),
             *extra], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise AssertionError(self.log.read().decode()[-3000:])
            try:
                if request(self.port, "GET", "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError("the server did not answer /healthz within 120 s")

    def stop(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def workdir(trained_workdir, tmp_path):
    path = str(tmp_path / "wd")
    shutil.copytree(trained_workdir[0], path)
    return path


def test_acknowledged_updates_survive_a_kill(workdir):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    key = {"X-API-Key": "k"}
    server = Server(workdir, "--api-key", "k")
    try:
        for i, vector in enumerate(vectors):
            status, body = request(server.port, "POST", "/items", headers=key,
                                   body={"items": [{"id": f"live/{i}",
                                                    "embedding": vector.tolist()}]})
            assert status == 200, body
        status, _ = request(server.port, "DELETE", "/items/train/3", headers=key)
        assert status == 200
    finally:
        server.stop(signal.SIGKILL)  # no shutdown hook runs: only the log can save the updates

    server = Server(workdir)
    try:
        status, health = request(server.port, "GET", "/healthz")
        assert health["items"] == 1797 + 20 - 1
        for i, vector in enumerate(vectors):
            _, body = request(server.port, "POST", "/search?k=1",
                              body={"embedding": vector.tolist()})
            assert body["results"][0]["id"] == f"live/{i}"
        status, body = request(server.port, "DELETE", "/items/train/3")
        assert status == 404 and body["error"]["code"] == "unknown_id"
    finally:
        server.stop()


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER))
                    and not os.environ.get("JAXRETRIEVAL_REQUIRE_BROWSER"),
                    reason="Debian's chromium and chromium-driver are not installed "
                           "(apt-get install chromium chromium-driver)")
def test_the_web_page_searches_and_matches_in_chromium(workdir, tmp_path):
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images[5] * 255 / 16).astype(np.uint8)
    query = str(tmp_path / "five.png")
    Image.fromarray(pixels).save(query)  # as stored, so it finds itself first

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    server = Server(workdir)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "items" in d.find_element(By.ID, "health").text)
        driver.find_element(By.ID, "search-file").send_keys(query)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == 10)
        first = driver.find_element(By.CSS_SELECTOR, "#results .hit div").text
        assert first.startswith("train/5 ")
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"))
        driver.find_element(By.ID, "a-file").send_keys(query)
        driver.find_element(By.ID, "b-file").send_keys(query)
        wait.until(lambda d: "similarity" in d.find_element(By.ID, "verdict").text)
        assert "same" in driver.find_element(By.ID, "verdict").text
        shot = os.environ.get("JAXRETRIEVAL_SCREENSHOT", str(tmp_path / "page.png"))
        assert driver.save_screenshot(shot) and os.path.getsize(shot) > 10_000
    finally:
        driver.quit()
        server.stop()
