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
import urllib.parse
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


@pytest.fixture
def page_workdir(workdir, data_dir, tmp_path):
    """The session's tiny model; for the screenshot in the docs (JAXRETRIEVAL_SCREENSHOT=PATH),
    the default recipe, whose neighbours and scores mean something to a reader."""
    if not os.environ.get("JAXRETRIEVAL_SCREENSHOT"):
        return workdir
    from jaxretrieval.config import load_config_file
    from jaxretrieval.training import train_and_evaluate

    config = load_config_file(os.path.join(REPO, "configs", "default.py"))
    config.data_dir = str(data_dir)
    path = str(tmp_path / "default")
    train_and_evaluate(config, path)
    return path


def upload_item(port, item_id, path, metadata=None):
    """Adds an item by image upload: the service keeps its vector but no thumbnail."""
    import httpx

    fields = {"id": item_id} if metadata is None else {"id": item_id,
                                                        "metadata": json.dumps(metadata)}
    with open(path, "rb") as f:
        response = httpx.post(f"http://127.0.0.1:{port}/items", data=fields,
                              files={"image": ("item.png", f.read(), "image/png")}, timeout=60)
    assert response.status_code == 200, response.text


def search_scores(port, path, k):
    import httpx

    with open(path, "rb") as f:
        response = httpx.post(f"http://127.0.0.1:{port}/search?k={k}",
                              files={"image": ("q.png", f.read(), "image/png")}, timeout=60)
    return {hit["id"]: hit["score"] for hit in response.json()["results"]}


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER))
                    and not os.environ.get("JAXRETRIEVAL_REQUIRE_BROWSER"),
                    reason="Debian's chromium and chromium-driver are not installed "
                           "(apt-get install chromium chromium-driver)")
def test_the_web_page_searches_and_matches_in_chromium(page_workdir, tmp_path):
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images[5] * 255 / 16).astype(np.uint8)
    query = str(tmp_path / "five.png")
    Image.fromarray(pixels).save(query)  # as stored, so it finds itself first

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,1000",
                 "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    max_k = 250  # not the default: the page must take it from the server
    server = Server(page_workdir, "--max-k", str(max_k))
    # An item added by upload: the same image as the query, so it matches, with no thumbnail.
    uploaded = "uploads/again/five.png"
    upload_item(server.port, uploaded, query, metadata={"label": "five", "by": "upload"})
    threshold = request(server.port, "GET", "/healthz")[1]["match_threshold"]
    scores = search_scores(server.port, query, 10)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    try:
        # The page's own size, whatever the browser's frame takes: the screenshot's size.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1200, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        base = f"http://127.0.0.1:{server.port}"
        driver.get(base + "/")
        wait = WebDriverWait(driver, 120)  # generous: a loaded CI machine
        wait.until(lambda d: "items" in d.find_element(By.ID, "health").text)
        assert driver.find_element(By.ID, "k").get_attribute("max") == str(max_k)
        icon = driver.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href")
        with urllib.request.urlopen(icon, timeout=10) as response:
            assert response.status == 200 and response.read().startswith(b"<svg")

        driver.find_element(By.ID, "search-file").send_keys(query)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == 10)
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .hit")
        ids = [card.find_element(By.CSS_SELECTOR, ".id").text for card in cards]
        assert set(ids[:2]) == {"train/5", uploaded} and set(ids) == set(scores)
        assert [card.find_element(By.CSS_SELECTOR, ".rank").text for card in cards] == [
            f"#{rank}" for rank in range(1, 11)]
        # The id breaks after its slashes, not inside a word.
        assert cards[ids.index(uploaded)].find_element(
            By.CSS_SELECTOR, ".id").get_attribute("innerHTML") == "uploads/<wbr>again/<wbr>five.png"
        # The mark and legend follow the server's threshold, hit by hit.
        assert threshold is not None and scores["train/5"] >= threshold
        for item_id, card in zip(ids, cards):
            passes = scores[item_id] >= threshold
            assert ("match" in card.get_attribute("class").split()) == passes, item_id
            assert len(card.find_elements(By.CSS_SELECTOR, ".mark")) == passes, item_id
        assert f"{threshold:.3f}" in driver.find_element(By.ID, "legend").text
        # Thumbnails load; the uploaded item, which has none, shows the placeholder box.
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .placeholder"))
        try:
            wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('#results img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"))
        except TimeoutException:
            server.log.seek(0)
            raise AssertionError(("thumbnails still loading", driver.execute_script(
                "return [...document.querySelectorAll('#results img')]"
                ".map(i => [i.src, i.complete, i.naturalWidth])"),
                server.log.read().decode()[-2000:])) from None
        placeholder_of = lambda card: card.find_elements(By.CSS_SELECTOR, ".placeholder")
        assert [bool(placeholder_of(card)) for card in cards] == [i == uploaded for i in ids]
        # Only the uploaded item has metadata, shown under it.
        metas = [[m.text for m in card.find_elements(By.CSS_SELECTOR, ".meta")] for card in cards]
        assert metas == [['{"label":"five","by":"upload"}'] if i == uploaded else []
                         for i in ids]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results img")) == 9

        driver.find_element(By.ID, "a-file").send_keys(query)
        driver.find_element(By.ID, "b-file").send_keys(query)
        wait.until(lambda d: "similarity" in d.find_element(By.ID, "verdict").text)
        assert "same" in driver.find_element(By.ID, "verdict").text
        shot = os.environ.get("JAXRETRIEVAL_SCREENSHOT", str(tmp_path / "page.png"))
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.save_screenshot(shot) and os.path.getsize(shot) > 10_000

        # A click shows the hit larger, with its id and score; Esc and a click close it.
        viewer_open = "return document.getElementById('viewer').open"
        first = ids.index("train/5")
        cards[first].click()
        wait.until(lambda d: d.execute_script(viewer_open))
        viewer = driver.find_element(By.ID, "viewer")
        caption = viewer.find_element(By.ID, "viewer-caption").text
        assert "train/5" in caption and f"{scores['train/5']:.3f}" in caption
        assert f"#{first + 1}" in caption
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#viewer img');"
            "return !i || (i.complete && i.naturalWidth > 0)"))
        assert driver.execute_script(
            "return document.querySelector('#viewer img').clientWidth") > 128
        driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        wait.until(lambda d: not d.execute_script(viewer_open))
        cards[ids.index(uploaded)].click()
        wait.until(lambda d: d.execute_script(viewer_open))
        assert viewer.find_elements(By.CSS_SELECTOR, ".placeholder")
        viewer.click()
        wait.until(lambda d: not d.execute_script(viewer_open))
        # The page asked once for the missing thumbnail: the larger view did not ask again.
        missing = (f"/items/{urllib.parse.quote(uploaded, safe='').replace('.', '%2E')}"
                   "/thumbnail - Failed to load resource")
        assert sum(missing in entry["message"] for entry in driver.get_log("browser")) == 1
        # A k beyond the server's maximum is refused on the page; a new k searches again.
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys(str(max_k + 1), Keys.TAB)
        wait.until(lambda d: f"1 to {max_k}" in d.find_element(By.ID, "search-status").text)
        assert not driver.find_elements(By.CSS_SELECTOR, "#results .hit")
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys("3", Keys.TAB)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == 3)

        # The API docs render from the service's own files.
        driver.get(base + "/docs")
        wait.until(lambda d: any("/search" in e.text for e in
                                 d.find_elements(By.CSS_SELECTOR, ".opblock")))
        driver.get(base + "/redoc")
        wait.until(lambda d: "The k nearest gallery items" in d.find_element(
            By.TAG_NAME, "body").text)
        # Nothing failed to load but the thumbnail the uploaded item does not have, and
        # nothing was asked of another host: ReDoc's logo is refused before it is asked for.
        failures = [entry["message"] for entry in driver.get_log("browser")
                    if entry["level"] == "SEVERE"]
        refused = [m for m in failures if "Content Security Policy" in m and "blocked" in m]
        assert all(missing in m for m in set(failures) - set(refused)), failures
    finally:
        driver.quit()
        server.stop()
