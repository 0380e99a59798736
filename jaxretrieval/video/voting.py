"""Which videos hold an image or a clip, and where: per-video maxima for an image, temporal
Hough voting over (video, speed, offset) for a clip.

A clip's frames at query times t are searched one by one; a gallery frame of video v at time
T found for the frame at t votes, for every speed s of the stated range, for the offset
o = T - s * t: the time of v at which the clip's start would lie, were the clip v's footage
played s times as fast. Frames of a real copy agree on one (v, s, o); chance hits scatter.

A vote weighs what the hit's similarity exceeds its query frame's background: the
similarity of that frame's last (k-th) hit. A frame that resembles everything gives little,
a frame with a near duplicate gives much, and the clip's unrelated parts (a copy embedded
in a longer video) add almost nothing. A (v, s, o) cell counts each query frame once (its
best vote), over offsets within OFFSET_WINDOW seconds, so that the gallery's sampling step
does not split a copy's votes between neighbouring cells.
"""

import dataclasses

import numpy as np

from jaxretrieval.video.decode import parse_frame_key

# The speeds a clip may be played at relative to its source, as a grid over the stated range
# 0.8x .. 1.25x: the offset a speed error moves is at most half a step times the clip's
# length (0.25 s for a 20 s clip).
DEFAULT_SPEEDS = tuple(round(s, 3) for s in np.arange(0.8, 1.2501, 0.025))
OFFSET_WINDOW = 1.0  # seconds: the offsets one cell gathers (bins of this width, pairs)
DEFAULT_FRAME_HITS = 64  # gallery frames searched per query frame
# At most this many hits a clip's frame votes with, whatever k: voting costs frames x hits x
# speeds, and a copy's frames rank near the top of their frame's hits.
MAX_FRAME_HITS = 256


@dataclasses.dataclass(frozen=True)
class VideoMatch:
    """A video that holds the query.

    `score`: for an image, the best frame's cosine similarity; for a clip, the vote (the sum
    over the clip's frames of their aligned frames' similarity above their background, see
    jaxretrieval.video.voting). `offset`: the video's time in seconds at which the clip
    starts (for an image, its best frame's time; negative when the video's footage begins
    inside the clip). `frames`: the matched frame keys (a clip's in the clip's order, an
    image's best first). `speed`: how much faster the clip plays than the video.
    """

    video: str
    score: float
    offset: float
    frames: list
    speed: float = 1.0

    def as_dict(self) -> dict:
        return {"video": self.video, "score": round(self.score, 6),
                "offset": round(self.offset, 3), "speed": self.speed,
                "frames": [{"id": key, "time": parse_frame_key(key)[1]} for key in self.frames]}


def videos_for_image(keys, scores, k: int) -> list:
    """The best k videos among one image's hits (`keys`, `scores`, best first): each video's
    best frame's score and time, and its frames among the hits, best first."""
    found = {}
    for key, score in zip(keys, scores):
        parsed = parse_frame_key(key)
        if parsed is not None:
            found.setdefault(parsed[0], []).append((float(score), key, parsed[1]))
    matches = [VideoMatch(video, hits[0][0], hits[0][2], [key for _, key, _ in hits])
               for video, hits in found.items()]
    return sorted(matches, key=lambda m: -m.score)[:k]


def vote(times, keys, scores, k: int, *, speeds=DEFAULT_SPEEDS) -> list:
    """The best k videos for a clip: `times[i]` is query frame i's time in the clip, `keys[i]`
    and `scores[i]` its hits, best first. One VideoMatch per video, its best (speed, offset)."""
    speeds = np.asarray(speeds, np.float64)
    cells = {}  # (video, speed index, offset bin) -> {query frame: (weight, key, offset)}
    for query, (seconds, row_keys, row_scores) in enumerate(zip(times, keys, scores)):
        if len(row_scores) == 0:
            continue
        background = float(row_scores[-1])
        for key, score in zip(row_keys, row_scores):
            parsed = parse_frame_key(key)
            weight = float(score) - background
            if parsed is None or weight <= 0:
                continue
            offsets = parsed[1] - speeds * float(seconds)
            for s, (offset, cell) in enumerate(zip(offsets, np.floor(offsets / OFFSET_WINDOW))):
                votes = cells.setdefault((parsed[0], s, int(cell)), {})
                if query not in votes or votes[query][0] < weight:
                    votes[query] = (weight, key, float(offset))
    best = {}
    for (video, s, cell), votes in cells.items():
        # A pair of neighbouring bins: a copy's offsets straddle a bin's edge.
        merged = dict(votes)
        for query, vote_ in cells.get((video, s, cell + 1), {}).items():
            if query not in merged or merged[query][0] < vote_[0]:
                merged[query] = vote_
        total = round(sum(weight for weight, _, _ in merged.values()), 9)
        # Among equal totals (the same frames fit several speeds within a window), the
        # tightest offsets, then the speed nearest 1 (a still clip fits every speed).
        spread = round(float(np.std([offset for _, _, offset in merged.values()])), 3)
        rank = (total, -spread, -abs(float(speeds[s]) - 1.0))
        if video not in best or rank > best[video][0]:
            best[video] = (rank, s, merged)
    matches = []
    for video, ((total, _, _), s, merged) in best.items():
        weights = np.array([w for w, _, _ in merged.values()])
        offset = float(np.dot(weights, [o for _, _, o in merged.values()]) / weights.sum())
        frames = [merged[q][1] for q in sorted(merged)]
        matches.append(VideoMatch(video, total, offset, frames, float(speeds[s])))
    return sorted(matches, key=lambda m: -m.score)[:k]


def search_clip_embeddings(search, times, vectors, k: int, *, speeds=DEFAULT_SPEEDS,
                           frame_hits: int = DEFAULT_FRAME_HITS) -> list:
    """Searches each of a clip's frame embeddings (`vectors`, at `times`) with
    `search(vectors, n) -> (keys, scores)` and ranks the videos: by `vote`, or for a clip of
    one frame (an image) by `videos_for_image`. A clip's frames each get max(frame_hits,
    4 k) hits, at most MAX_FRAME_HITS."""
    if len(vectors) == 0:
        return []
    if len(vectors) == 1:
        keys, scores = search(np.asarray(vectors, np.float32), max(frame_hits, 4 * k))
        return videos_for_image(keys[0], scores[0], k)
    keys, scores = search(np.asarray(vectors, np.float32),
                          min(MAX_FRAME_HITS, max(frame_hits, 4 * k)))
    # The clip starts at its first frame, whatever time its container starts at.
    times = np.asarray(times, np.float64)
    return vote(times - times[0], keys, scores, k, speeds=speeds)
