"""Videos: frame sampling, the video:PATH source, voting, and search by clip from Python, the
command line and the service."""

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("av")

from jaxretrieval.video.decode import (Sampling, VideoDecodeError, frame_key,  # noqa: E402
                                       parse_frame_key, sample_frames)
from jaxretrieval.video.voting import vote  # noqa: E402

FPS = 5


def write_video(path, frames, fps=FPS):
    """H.264 at near-lossless quality: every frame's pixels survive to within a few levels."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def grey_frames(levels, side=32):
    return np.repeat(np.asarray(levels, np.uint8)[:, None, None, None], side, 1).repeat(
        side, 2).repeat(3, 3)


def test_frames_are_sampled_at_their_exact_times(tmp_path):
    # Frame i of a 10 fps video is grey level 5 i: each sample shows which frame it is.
    path = write_video(tmp_path / "ramp.mp4", grey_frames(np.arange(50) * 5), fps=10)
    every_second = sample_frames(path)
    assert [t for t, _ in every_second] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [round(f.mean() / 5) for _, f in every_second] == [0, 10, 20, 30, 40]
    # 4 a second: the frame on screen at 0.25 s is frame 2 (0.2 s), at 0.5 s frame 5.
    quarter = sample_frames(path, Sampling(rate=4))
    assert [t for t, _ in quarter][:5] == [0.0, 0.2, 0.5, 0.7, 1.0]
    assert [round(f.mean() / 5) for _, f in quarter][:5] == [0, 2, 5, 7, 10]
    assert frame_key("a/b.mp4", 0.7) == "a/b.mp4@0.7"
    assert parse_frame_key("a/b@c.mp4@12.0") == ("a/b@c.mp4", 12.0)
    assert parse_frame_key("photo.png") is None


def test_scene_changes_are_sampled(tmp_path):
    # Dark for 2.4 s, then bright: a cut at 2.4 s (frame 12 at 5 fps).
    path = write_video(tmp_path / "cut.mp4", grey_frames([30] * 12 + [220] * 13))
    assert [t for t, _ in sample_frames(path, Sampling(rate=0, scene_threshold=0.2))] == [
        0.0, 2.4]
    both = sample_frames(path, Sampling(rate=1, scene_threshold=0.2))
    assert [t for t, _ in both] == [0.0, 1.0, 2.0, 2.4, 3.0, 4.0]
    assert [f.mean() > 128 for _, f in both] == [False, False, False, True, True, True]


def test_voting_finds_a_planted_clip_its_offset_and_speed():
    rng = np.random.default_rng(0)
    times = np.arange(10.0)  # a 10 s clip, one frame a second
    keys, scores = [], []
    for t in times:
        # The copy: video v07 from 31 s on, played 1.25x as fast (the gallery's frames are
        # one a second, so the nearest one is found), among 30 chance hits.
        true = 31 + 1.25 * t
        hits = [(frame_key("v07.mp4", float(round(true))), 0.9)]
        hits += [(frame_key(f"v{rng.integers(20):02d}.mp4", float(rng.integers(60))),
                  float(rng.uniform(0.3, 0.7))) for _ in range(30)]
        hits.sort(key=lambda h: -h[1])
        keys.append([k for k, _ in hits])
        scores.append([s for _, s in hits])
    matches = vote(times, keys, scores, k=3)
    assert matches[0].video == "v07.mp4"
    assert abs(matches[0].offset - 31) <= 0.5
    assert abs(matches[0].speed - 1.25) <= 0.05
    assert len(matches[0].frames) == 10 and matches[0].score > 2 * matches[1].score


def digit_video(images, first, seconds):
    """One digit image a second (held for FPS frames), from `first` on, at 32x32."""
    from PIL import Image

    frames = []
    for s in range(seconds):
        image = Image.fromarray(images[(first + 37 * s) % len(images)]).resize((32, 32))
        frames += [np.repeat(np.asarray(image)[..., None], 3, axis=2)] * FPS
    return np.stack(frames)


@pytest.fixture(scope="module")
def video_workdir(trained_workdir, tmp_path_factory):
    """The shared digits model over an index of 4 videos' frames, a clip of one of them, and
    a corrupt video beside the good ones."""
    from sklearn.datasets import load_digits

    from jaxretrieval.pipeline import embed_corpus, rebuild_index

    root = tmp_path_factory.mktemp("video")
    images = (load_digits().images * 255 / 16).astype(np.uint8)
    videos = root / "videos"
    (videos / "more").mkdir(parents=True)
    gallery = {}
    for v, name in enumerate(["a.mp4", "b.mp4", "more/c.mp4", "more/d.mp4"]):
        gallery[name] = digit_video(images, 100 * v, 8)
        write_video(videos / name, gallery[name])
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    clip = write_video(root / "clip.mp4", gallery["more/c.mp4"][3 * FPS:7 * FPS])
    workdir = root / "wd"
    shutil.copytree(trained_workdir[0], workdir,
                    ignore=shutil.ignore_patterns("embeddings", "index"))
    # Chunks of 12 frames: ranges of a video's frames, some spanning two videos.
    meta = embed_corpus(str(workdir), dataset=f"video:{videos}", chunk_size=12)
    rebuild_index(str(workdir))
    return str(workdir), meta, clip, str(videos)


def test_a_video_collection_is_embedded_and_a_corrupt_video_is_skipped(video_workdir):
    workdir, meta, _, videos = video_workdir
    assert (meta["count"], meta["num_chunks"]) == (4 * 8, 3)
    assert [s["path"] for s in meta["skipped_videos"]] == [os.path.join(videos, "broken.mp4")]
    assert meta["video"] == {"rate": 1.0, "scene_threshold": 0.0}
    with open(os.path.join(workdir, "embeddings", "keys.json")) as f:
        keys = json.load(f)
    assert keys[:2] == ["a.mp4@0.0", "a.mp4@1.0"] and "more/c.mp4@7.0" in keys
    assert not any(key.startswith("broken") for key in keys)


def test_search_video_finds_the_clip_and_where_it_starts(video_workdir):
    from jaxretrieval.retriever import Retriever

    workdir, _, clip, videos = video_workdir
    retriever = Retriever.load(workdir)
    try:
        matches = retriever.search_video(clip, k=2)
        assert matches[0].video == "more/c.mp4"
        assert matches[0].offset == pytest.approx(3.0, abs=0.5)
        assert matches[0].frames[:2] == ["more/c.mp4@3.0", "more/c.mp4@4.0"]
        # An image: each video's best frame, with its time.
        image = sample_frames(os.path.join(videos, "b.mp4"))[5][1]
        by_image = retriever.search_video(image, k=2)
        assert (by_image[0].video, by_image[0].offset) == ("b.mp4", 5.0)
        # A frame's thumbnail is read from its video, and only from inside the roots: the
        # video's own real path is checked, not the frame reference's.
        assert retriever.thumbnail("more/c.mp4@4.0").size[0] >= 32
        from jaxretrieval.data.sources import resolve_within_roots
        outside = os.path.join(os.path.dirname(videos), "clip.mp4")
        os.symlink(outside, os.path.join(videos, "link.mp4"))
        try:
            assert resolve_within_roots(os.path.join(videos, "link.mp4@1.0"), [videos]) is None
            inside = resolve_within_roots(os.path.join(videos, "a.mp4@1.0"), [videos])
            assert inside.reference == os.path.join(os.path.realpath(videos), "a.mp4@1.0")
            assert inside.frame == (os.path.join(os.path.realpath(videos), "a.mp4"), 1.0)
        finally:
            os.remove(os.path.join(videos, "link.mp4"))
    finally:
        retriever.close()


def test_the_command_line_searches_by_clip(video_workdir, capsys):
    from jaxretrieval.cli import main

    workdir, _, clip, _ = video_workdir
    assert main(["search", "--workdir", workdir, "--video", clip, "--k", "1"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["results"][0]["video"] == "more/c.mp4"
    assert line["results"][0]["frames"][0] == {"id": "more/c.mp4@3.0", "time": 3.0}


def test_the_service_searches_by_clip_and_refuses_bad_uploads(video_workdir, tmp_path):
    from fastapi.testclient import TestClient

    from jaxretrieval.retriever import Retriever
    from jaxretrieval.service.app import ServiceSettings, create_app

    workdir, _, clip, _ = video_workdir
    with open(clip, "rb") as f:
        data = f.read()
    # 8 s of still grey: smaller than the clip, longer than the 5 s allowed.
    with open(write_video(tmp_path / "long.mp4", grey_frames([90] * 8 * FPS, side=16)),
              "rb") as f:
        long_video = f.read()
    assert len(long_video) < len(data)
    retriever = Retriever.load(workdir)
    settings = ServiceSettings(max_video_bytes=len(data) + 10, max_video_seconds=5.0,
                               allowed_hosts=("testserver",))  # TestClient's Host
    try:
        with TestClient(create_app(retriever, settings)) as client:
            found = client.post("/search/video?k=2", files={"video": ("c.mp4", data)})
            assert found.status_code == 200, found.text
            assert found.json()["results"][0]["video"] == "more/c.mp4"
            refusals = [
                (client.post("/search/video", files={"video": ("c.mp4", data + bytes(20))}),
                 413, "too_large"),
                (client.post("/search/video", files={"video": ("long.mp4", long_video)}),
                 413, "too_long"),
                (client.post("/search/video", files={"video": ("x.mp4", b"not a video")}),
                 400, "bad_video"),
                (client.post("/search/video", files={"image": ("c.mp4", data)}),
                 400, "missing_field"),
                (client.post("/search/video", json={"video": "c.mp4"}), 415,
                 "unsupported_media_type"),
            ]
            for response, status, code in refusals:
                assert (response.status_code, response.json()["error"]["code"]) == (
                    status, code), response.text
    finally:
        retriever.close()


def test_an_undecodable_or_oversized_video_is_one_clear_error(tmp_path):
    from jaxretrieval.video.decode import Limits, VideoLimitError

    path = tmp_path / "junk.mp4"
    path.write_bytes(b"junk" * 100)
    with pytest.raises(VideoDecodeError, match="junk.mp4"):
        sample_frames(str(path))
    video = write_video(tmp_path / "v.mp4", grey_frames([10] * 10))
    with pytest.raises(VideoLimitError, match="at most 100 pixels") as refused:
        sample_frames(video, limits=Limits(max_pixels=100))
    assert refused.value.code == "too_large"
    with pytest.raises(VideoLimitError, match="more than 1 frames"):
        sample_frames(video, Sampling(rate=5), limits=Limits(max_frames=1))


def test_the_page_shows_a_clips_videos_as_frames_with_times_in_chromium(video_workdir,
                                                                       tmp_path):
    from service_helpers import ServerThread
    from test_service_process import CHROMEDRIVER, CHROMIUM

    from jaxretrieval.retriever import Retriever
    from jaxretrieval.service.app import ServiceSettings

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)) and not os.environ.get(
            "JAXRETRIEVAL_REQUIRE_BROWSER"):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    workdir, _, clip, _ = video_workdir
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # uvicorn in a thread of this process: no second start of JAX and the model.
    retriever = Retriever.load(workdir)
    server = ServerThread(retriever, ServiceSettings())
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "items" in d.find_element(By.ID, "health").text)
        driver.find_element(By.ID, "video-file").send_keys(clip)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#video-results .video"))
        first = driver.find_elements(By.CSS_SELECTOR, "#video-results .video")[0]
        assert "more/c.mp4" in first.text and "starts at 3.0 s" in first.text
        captions = [c.text for c in first.find_elements(By.TAG_NAME, "figcaption")]
        assert captions[:2] == ["3.0 s", "4.0 s"]
        # The frames' thumbnails are decoded from the video.
        wait.until(lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('#video-results .video img')];"
            "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"))
    finally:
        driver.quit()
        server.stop()
        retriever.close()


def write_stream(path, frames, fps=FPS, start=0, format=None, options=None):
    """H.264 frames with presentation times from `start` frames on, in `format` (None: from
    the extension) muxed with `options`."""
    import fractions

    import av

    with av.open(str(path), "w", format=format, container_options=options or {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, fps)
        stream.options = {"preset": "ultrafast"}
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = start + i, fractions.Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def test_a_playlist_naming_a_local_file_is_refused(video_workdir, monkeypatch):
    from fastapi.testclient import TestClient

    from jaxretrieval.retriever import Retriever
    from jaxretrieval.service.app import ServiceSettings, create_app

    workdir, _, clip, _ = video_workdir
    # An ffconcat playlist naming the clip beside it (relative to the working folder): FFmpeg
    # would open that local file and decode it as the upload.
    monkeypatch.chdir(os.path.dirname(clip))
    playlist = f"ffconcat version 1.0\nfile {os.path.basename(clip)}\n".encode()
    with pytest.raises(VideoDecodeError, match="supported format"):
        sample_frames(playlist)
    with open(clip, "rb") as f:
        data = f.read()
    assert [t for t, _ in sample_frames(data)] == [0.0, 1.0, 2.0, 3.0]
    retriever = Retriever.load(workdir)
    try:
        with TestClient(create_app(retriever, ServiceSettings(
                allowed_hosts=("testserver",)))) as client:
            refused = client.post("/search/video", files={"video": ("p.mp4", playlist)})
            assert (refused.status_code, refused.json()["error"]["code"]) == (
                400, "bad_video"), refused.text
            found = client.post("/search/video?k=1", files={"video": ("c.mp4", data)})
            assert found.json()["results"][0]["video"] == "more/c.mp4", found.text
    finally:
        retriever.close()


def test_a_frame_size_change_midway_is_held_to_the_pixel_limit(tmp_path):
    from jaxretrieval.video.decode import Limits, VideoLimitError

    # Enough small frames that the stream opens declaring 64x64 (FFmpeg probes its start).
    small = write_stream(tmp_path / "small.h264", grey_frames(np.arange(30) * 5, side=64),
                         format="h264")
    large = write_stream(tmp_path / "large.h264", grey_frames([90] * 2, side=1024),
                         format="h264")
    with open(small, "rb") as f, open(large, "rb") as g:
        joined = f.read() + g.read()
    limits = Limits(max_pixels=64 * 64 * 4)
    assert len(sample_frames(open(small, "rb").read(), limits=limits)) == 2  # 1.2 s at 25 fps
    with pytest.raises(VideoLimitError, match="1024x1024") as refused:
        sample_frames(joined, limits=limits)
    assert refused.value.code == "too_large"


def test_a_clips_frames_vote_with_a_bounded_number_of_hits():
    from jaxretrieval.video.voting import MAX_FRAME_HITS, search_clip_embeddings

    asked = []

    def search(vectors, n):
        asked.append(n)
        keys = [[frame_key("a.mp4", float(t + j)) for j in range(3)] for t in range(3)]
        return keys, [[0.9, 0.5, 0.1]] * 3

    # A clip whose container starts at 100 s: its offsets count from its first frame.
    matches = search_clip_embeddings(search, [100.0, 101.0, 102.0], np.zeros((3, 4)), k=1000)
    assert asked == [MAX_FRAME_HITS] and MAX_FRAME_HITS <= 256
    assert (matches[0].video, matches[0].offset) == ("a.mp4", 0.0)


def test_decoding_is_bounded_and_times_count_from_the_first_frame(tmp_path):
    from jaxretrieval.video.decode import Limits, VideoLimitError, read_frame_at

    # 2 s starting at 100 s: its length is 2 s, and its frames keep their own times.
    late = write_stream(tmp_path / "late.ts", grey_frames(np.arange(10) * 10), start=500)
    assert [t for t, _ in sample_frames(late, limits=Limits(max_seconds=5))] == [100.0, 101.0]
    # 30 frames in 0.12 s: within 0.2 s, but more frames than 0.2 s may decode.
    with pytest.raises(VideoLimitError, match="more than 24 frames") as refused:
        sample_frames(write_stream(tmp_path / "fast.mp4", grey_frames([50] * 30), fps=250),
                      limits=Limits(max_seconds=0.2))
    assert refused.value.code == "too_long"
    # Every frame before 0 s (-4 s .. -2.2 s): times count from the first frame, and a
    # key's frame is read back at the same time.
    early = write_stream(tmp_path / "early.ts", grey_frames(np.arange(10) * 10), start=-20,
                         options={"avoid_negative_ts": "disabled"})
    sampled = sample_frames(early)
    assert [(t, round(f.mean() / 10)) for t, f in sampled] == [(0.0, 0), (1.0, 5)]
    assert round(np.asarray(read_frame_at(early, 1.0)).mean() / 10) == 5
