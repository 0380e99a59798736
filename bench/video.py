"""Near-duplicate video search on generated videos, beside per-frame pHash with the same voting.

    python -m bench.video --out /tmp/video_bench [--videos 200] [--steps 800] [--repeats 3] \
        [--clip-seconds 8]

One command does it all, each stage skipped when its output is already there:

1. Source videos (`--videos`, 20 s, 96x96, 10 fps, H.264): 3 to 4 shots each, cut
   abruptly; in each shot a textured background pans while 2 or 3 sprites (scikit-learn
   digits and Yale faces) move and zoom. Videos made the same way from a seed the sources do
   not use give the distractors and the hosts of embedded copies.
2. Queries, 8 s clips of random source videos at random start times, decoded from the
   source files and transformed: `reencode` (a tenth of the bitrate), `resize` (to 64x64),
   `crop` (10-20% off each side's total, at a random place), `mirror`, `speed` (1.25x), and
   `embedded` (inside a 24 s video of unrelated footage, at a random time); and `distractor`
   clips, 8 s of unrelated footage.
3. A model trained by the package on the source videos' frames, two a second, one class per
   video (the command is printed and in docs/video.md); then `jaxretrieval embed
   --dataset video:OUT/gallery` (one frame a second) and the index.
4. Every query searched with `Retriever.search_video`, and with pHash (imagehash, 64 bits,
   similarity 1 - 2 Hamming/64) of the same frames through the same voting.

Detection: a query is detected when its best video's score reaches the threshold; the
threshold is calibrated on the even-numbered queries (the lowest score with precision
>= 0.99 there) and the metrics are measured on the odd-numbered ones. Speed: seconds of
video decoded, sampled and embedded (or hashed) per wall second, the medians of `--repeats`
alternating rounds of each.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SIDE, FPS, SECONDS, CLIP_SECONDS, HOST_SECONDS = 96, 10, 20.0, 8.0, 24.0  # CLIP: the default
TRANSFORMS = ("reencode", "resize", "crop", "mirror", "speed", "embedded")
SPEED = 1.25
TARGET_PRECISION = 0.99


# ---------------------------------------------------------------------- footage

def sprite_pool(faces_folder):
    """Grey sprites: digits (8x8, to 32 px) and Yale faces (the centre, to 40 px)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images
    sprites = [np.asarray(Image.fromarray((d * 255 / 16).astype(np.uint8)).resize(
        (32, 32), Image.Resampling.BILINEAR)) for d in digits[::3]]
    for root, _, names in sorted(os.walk(faces_folder)):
        for name in sorted(names):
            if name.startswith(".") or name.endswith(".md"):
                continue
            with Image.open(os.path.join(root, name)) as image:
                face = image.convert("L").crop((70, 30, 250, 230)).resize(
                    (40, 44), Image.Resampling.BILINEAR)
            sprites.append(np.asarray(face))
    return sprites


def random_footage(rng, sprites, seconds):
    """A description of a video: its shots, each a panning background and moving sprites."""
    margin = min(2.0, seconds / 4)  # no cut in the first or last 2 s (short footage: less)
    cuts = np.sort(rng.uniform(margin, seconds - margin, size=rng.integers(2, 4)))
    bounds = [0.0, *cuts, seconds]
    shots = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        coarse = rng.uniform(0, 255, size=(6, 6))
        shots.append({
            "start": start, "stop": stop, "background": coarse,
            "pan": rng.uniform(-3, 3, size=2), "pan_start": rng.uniform(0, 60, size=2),
            "sprites": [{"image": int(rng.integers(len(sprites))),
                         "position": rng.uniform(0, 70, size=2),
                         "velocity": rng.uniform(-4, 4, size=2),
                         "zoom": (rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3)),
                         "invert": bool(rng.integers(2))}
                        for _ in range(rng.integers(2, 4))]})
    return shots


def render(shots, sprites, seconds, backgrounds):
    """uint8 [frames, SIDE, SIDE, 3]."""
    from PIL import Image

    frames = []
    for i in range(int(round(seconds * FPS))):
        t = i / FPS
        shot = next(s for s in shots if s["start"] <= t < s["stop"] or s is shots[-1])
        local = t - shot["start"]
        key = id(shot)
        if key not in backgrounds:
            backgrounds[key] = np.asarray(Image.fromarray(shot["background"].astype(np.uint8))
                                          .resize((SIDE * 2, SIDE * 2),
                                                  Image.Resampling.BICUBIC), np.float32)
        x, y = np.clip(shot["pan_start"] + shot["pan"] * local, 0, SIDE - 1).astype(int)
        frame = backgrounds[key][y:y + SIDE, x:x + SIDE].copy() * 0.6
        span = shot["stop"] - shot["start"]
        for sprite in shot["sprites"]:
            image = sprites[sprite["image"]]
            zoom = np.interp(local, [0, span], sprite["zoom"])
            h, w = max(4, int(image.shape[0] * zoom)), max(4, int(image.shape[1] * zoom))
            scaled = np.asarray(Image.fromarray(image).resize((w, h)), np.float32)
            if sprite["invert"]:
                scaled = 255 - scaled
            px, py = (sprite["position"] + sprite["velocity"] * local).astype(int) % (SIDE - 8)
            region = frame[py:py + h, px:px + w]
            region[...] = np.maximum(region, scaled[:region.shape[0], :region.shape[1]])
        frames.append(np.repeat(frame.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2))
    return np.stack(frames)


def write_video(path, frames, *, fps=FPS, crf=23, bitrate=None):
    import av

    tmp = path + ".tmp.mp4"
    with av.open(tmp, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
        stream.pix_fmt = "yuv420p"
        stream.options = ({"crf": str(crf)} if bitrate is None else {})
        if bitrate is not None:
            stream.bit_rate = bitrate
        for frame in frames:
            image = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(frame[:stream.height, :stream.width]), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def read_video(path):
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def resized(frames, side):
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((side, side))) for f in frames])


def make_query(kind, source_frames, start, rng, host, clip_seconds):
    """(frames, offset) of a transformed clip of `source_frames` starting at `start` s."""
    first = int(round(start * FPS))
    length = int(clip_seconds * FPS)
    clip = source_frames[first:first + length]
    if kind == "speed":
        picks = first + np.round(np.arange(length) * SPEED).astype(int)
        clip = source_frames[picks[picks < len(source_frames)]]
    elif kind == "resize":
        clip = resized(clip, 64)
    elif kind == "crop":
        cut = int(SIDE * rng.uniform(0.10, 0.20))
        x, y = rng.integers(0, cut + 1, size=2)
        clip = clip[:, y:y + SIDE - cut, x:x + SIDE - cut]
    elif kind == "mirror":
        clip = clip[:, :, ::-1]
    elif kind == "embedded":
        at = int(rng.integers(0, len(host) - length))
        return np.concatenate([host[:at], clip, host[at + length:]]), start - at / FPS
    return clip, start


def query_names(clip_seconds):
    """(listing, folder, result) file names of one clip length's queries."""
    tail = "" if clip_seconds == CLIP_SECONDS else f"_{clip_seconds:g}s"
    return f"queries{tail}.json", f"queries{tail}", f"result{tail}.json"


def generate(out, count, clip_seconds=CLIP_SECONDS, seed=0):
    """The source videos, and the queries and distractors of `clip_seconds` under `out`
    (listed in `query_names`' listing); other clip lengths share the source videos."""
    listing_name, folder_name, _ = query_names(clip_seconds)
    listing = os.path.join(out, listing_name)
    if os.path.isfile(listing):
        return
    sprites = sprite_pool(os.environ.get("YALEFACES", "/work/shared/data/yalefaces"))
    gallery = os.path.join(out, "gallery")
    os.makedirs(gallery, exist_ok=True)
    rng = np.random.default_rng(seed)
    for v in range(count):
        path = os.path.join(gallery, f"v{v:03d}.mp4")
        shots = random_footage(rng, sprites, SECONDS)
        if not os.path.isfile(path):
            write_video(path, render(shots, sprites, SECONDS, {}))
    other = np.random.default_rng(seed + 1)  # footage the gallery does not hold
    queries, folder = [], os.path.join(out, folder_name)
    os.makedirs(folder, exist_ok=True)
    per_kind = max(4, count // 7)
    for kind in TRANSFORMS:
        for n in range(per_kind):
            video = int(rng.integers(count))
            source = read_video(os.path.join(gallery, f"v{video:03d}.mp4"))
            longest = SECONDS - clip_seconds * (SPEED if kind == "speed" else 1.0)
            start = round(float(rng.uniform(0, longest)), 1)
            host = None
            if kind == "embedded":
                host = render(random_footage(other, sprites, HOST_SECONDS), sprites,
                              HOST_SECONDS, {})
            frames, offset = make_query(kind, source, start, rng, host, clip_seconds)
            path = os.path.join(folder, f"{kind}_{n:03d}.mp4")
            write_video(path, frames, **({"bitrate": 12_000} if kind == "reencode" else {}))
            queries.append({"path": path, "kind": kind, "video": f"v{video:03d}.mp4",
                            "offset": offset})
    for n in range(per_kind):
        path = os.path.join(folder, f"distractor_{n:03d}.mp4")
        write_video(path, render(random_footage(other, sprites, clip_seconds), sprites,
                                 clip_seconds, {}))
        queries.append({"path": path, "kind": "distractor", "video": None, "offset": None})
    with open(listing, "w") as f:
        json.dump(queries, f, indent=1)


# ---------------------------------------------------------------------- the two systems

def train_command(out, steps):
    return [sys.executable, "-m", "jaxretrieval.cli", "train", "--workdir",
            os.path.join(out, "model"), f"--config.dataset=video:{os.path.join(out, 'gallery')}",
            "--config.video_rate=2", "--config.image_size=48", "--config.channels=1",
            "--config.augment.flip=true", "--config.model.flip_test=true",
            "--config.augment.crop_scale=(0.5,1.0)", "--config.augment.max_rotation_degrees=5",
            f"--config.num_train_steps={steps}", "--config.global_batch_size=64"]


def train_and_index(out, steps):
    workdir = os.path.join(out, "model")
    done = os.path.join(out, "embedded.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    if not os.path.isfile(os.path.join(workdir, "metrics.json")):
        command = train_command(out, steps)
        print("training:", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    from jaxretrieval.pipeline import embed_corpus, rebuild_index

    started = time.perf_counter()
    meta = embed_corpus(workdir, dataset=f"video:{os.path.join(out, 'gallery')}",
                        video_rate=1.0)
    seconds = time.perf_counter() - started
    rebuild_index(workdir)
    record = {"frames": meta["count"], "embed_seconds": seconds,
              "skipped": len(meta.get("skipped_videos") or [])}
    with open(done, "w") as f:
        json.dump(record, f)
    return record


def phash_gallery(gallery, names):
    """(keys, hashes [n, 64], seconds): pHash of every video's frames at 1/s."""
    import imagehash
    from PIL import Image

    from jaxretrieval.video.decode import Sampling, frame_key, sample_frames

    started = time.perf_counter()
    keys, hashes = [], []
    for name in names:
        for seconds, image in sample_frames(os.path.join(gallery, name), Sampling()):
            keys.append(frame_key(name, seconds))
            hashes.append(phash(imagehash, Image.fromarray(image)))
    return keys, np.stack(hashes), time.perf_counter() - started


def phash(imagehash, image):
    """A frame's 64-bit pHash as a unit vector of +-1/8: the dot product of two is
    1 - 2 * Hamming / 64."""
    bits = imagehash.phash(image.convert("L")).hash.ravel()
    return np.where(bits, 0.125, -0.125).astype(np.float32)


def phash_search(keys, hashes):
    def search(queries, n):
        similarity = queries @ hashes.T
        top = np.argsort(-similarity, axis=1, kind="stable")[:, :n]
        return ([[keys[i] for i in row] for row in top],
                np.take_along_axis(similarity, top, axis=1))
    return search


# ---------------------------------------------------------------------- scoring

def calibrated_threshold(rows):
    """The lowest score at which detections on `rows` reach TARGET_PRECISION."""
    scored = sorted(((r["score"], r["correct"]) for r in rows if r["score"] is not None),
                    reverse=True)
    best, right = None, 0
    for n, (score, correct) in enumerate(scored, 1):
        right += correct
        if right / n >= TARGET_PRECISION:
            best = score
    return best if best is not None else (scored[0][0] + 1e-6 if scored else 0.0)


def summarise(rows, threshold):
    table = {}
    for kind in (*TRANSFORMS, "distractor", "all"):
        mine = [r for r in rows if kind == "all" or r["kind"] == kind]
        positives = [r for r in mine if r["kind"] != "distractor"]
        detected = [r for r in mine if r["score"] is not None and r["score"] >= threshold]
        right = [r for r in detected if r["correct"]]
        errors = [r["offset_error"] for r in positives if r["correct"]]
        table[kind] = {
            "queries": len(mine),
            "precision": len(right) / len(detected) if detected else None,
            "recall": len(right) / len(positives) if positives else None,
            "recall@1": (sum(r["correct"] for r in positives) / len(positives)
                         if positives else None),
            "median_offset_error_s": float(np.median(errors)) if errors else None,
            "false_detections": len(detected) - len(right)}
    return table


def evaluate(queries, answer):
    rows = []
    for q in queries:
        matches = answer(q["path"])
        best = matches[0] if matches else None
        correct = bool(best is not None and best.video == q["video"])
        rows.append({"kind": q["kind"], "score": best.score if best else None,
                     "correct": correct,
                     "offset_error": abs(best.offset - q["offset"]) if correct else None})
    threshold = calibrated_threshold(rows[0::2])
    test = rows[1::2]
    right = [r["score"] for r in test if r["correct"]]
    unrelated = [r["score"] for r in test if not r["correct"] and r["score"] is not None]
    return {"threshold": threshold, "table": summarise(test, threshold),
            # How far apart the two populations lie on the measured half.
            "lowest_right_score": min(right) if right else None,
            "highest_wrong_score": max(unrelated) if unrelated else None, "rows": rows}


def measure_speed(out, names, repeats):
    """Median wall seconds to embed the gallery (`embed_corpus` into a scratch export: decode,
    sample, embed, write) and to pHash it, the two alternating `repeats` times."""
    import shutil
    import statistics

    from jaxretrieval.pipeline import embed_corpus

    gallery, scratch = os.path.join(out, "gallery"), os.path.join(out, "speed_export")
    model, phash_ = [], []
    for _ in range(repeats):
        shutil.rmtree(scratch, ignore_errors=True)
        started = time.perf_counter()
        embed_corpus(os.path.join(out, "model"), dataset=f"video:{gallery}", output=scratch,
                     video_rate=1.0)
        model.append(time.perf_counter() - started)
        phash_.append(phash_gallery(gallery, names)[2])
    shutil.rmtree(scratch, ignore_errors=True)
    return statistics.median(model), statistics.median(phash_)


def run(out, count, steps, repeats=3, clip_seconds=CLIP_SECONDS):
    from PIL import Image

    generate(out, count, clip_seconds)
    embedded = train_and_index(out, steps)
    with open(os.path.join(out, query_names(clip_seconds)[0])) as f:
        queries = json.load(f)
    from jaxretrieval.retriever import Retriever
    from jaxretrieval.video.decode import Sampling, sample_frames
    from jaxretrieval.video.voting import search_clip_embeddings

    retriever = Retriever.load(os.path.join(out, "model"))
    model = evaluate(queries, lambda path: retriever.search_video(path, 5))
    gallery = os.path.join(out, "gallery")
    names = sorted(os.listdir(gallery))
    keys, hashes, _ = phash_gallery(gallery, names)
    search = phash_search(keys, hashes)
    import imagehash

    def by_phash(path):
        frames = sample_frames(path, Sampling())
        return search_clip_embeddings(
            search, [t for t, _ in frames],
            np.stack([phash(imagehash, Image.fromarray(f)) for _, f in frames]), 5)

    baseline = evaluate(queries, by_phash)
    video_seconds = count * SECONDS
    embed_seconds, hash_seconds = (measure_speed(out, names, repeats) if repeats
                                   else (None, None))
    return {"videos": count, "video_seconds": video_seconds, "queries": len(queries),
            "gallery_frames": embedded["frames"], "clip_seconds": clip_seconds,
            "model": dict(model, video_seconds_per_second=video_seconds / embed_seconds
                          if embed_seconds else None),
            "phash": dict(baseline, video_seconds_per_second=video_seconds / hash_seconds
                          if hash_seconds else None),
            "train_command": " ".join(train_command(out, steps)[1:]),
            "speed_repeats": repeats,
            "load_average": os.getloadavg()}


def markdown(result):
    def cell(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"{result['videos']} source videos ({result['video_seconds']:.0f} s, "
             f"{result['gallery_frames']} frames at 1/s), {result['queries']} queries "
             f"({result['clip_seconds']:g} s clips); "
             f"load average {result['load_average'][0]:.1f} on {os.cpu_count()} cores.", "",
             "| transformation | system | precision | recall | Recall@1 | median offset "
             "error (s) | false detections |", "|---|---|---|---|---|---|---|"]
    for kind in (*TRANSFORMS, "distractor", "all"):
        for name in ("model", "phash"):
            row = result[name]["table"][kind]
            lines.append(f"| {kind} | {name} | {cell(row['precision'])} | "
                         f"{cell(row['recall'])} | {cell(row['recall@1'])} | "
                         f"{cell(row['median_offset_error_s'], 2)} | "
                         f"{row['false_detections']} |")
    lines += ["", f"thresholds: model {result['model']['threshold']:.3f}, "
              f"pHash {result['phash']['threshold']:.3f}; seconds of video per wall second "
              f"(medians of {result['speed_repeats']}, alternating): "
              f"model {cell(result['model']['video_seconds_per_second'], 1)} (decode, "
              f"sample, embed), pHash {cell(result['phash']['video_seconds_per_second'], 1)} "
              "(decode, sample, hash)", "",
              "on the measured half, the lowest score of a right best video and the highest "
              "of a wrong one (a distractor's, or another video's): model "
              f"{cell(result['model']['lowest_right_score'])} / "
              f"{cell(result['model']['highest_wrong_score'])}, pHash "
              f"{cell(result['phash']['lowest_right_score'])} / "
              f"{cell(result['phash']['highest_wrong_score'])}"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/video_bench")
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of the speed measurement (medians; 0: not measured)")
    parser.add_argument("--clip-seconds", type=float, default=CLIP_SECONDS,
                        help="the queries' length; other lengths reuse the source videos "
                             "and the model")
    args = parser.parse_args(argv)
    result = run(os.path.abspath(args.out), args.videos, args.steps, args.repeats,
                 args.clip_seconds)
    with open(os.path.join(args.out, query_names(args.clip_seconds)[2]), "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


if __name__ == "__main__":
    main()
