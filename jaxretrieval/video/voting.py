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


def _group_starts(order, columns):
    """Where, along `order`, the value of any of `columns` changes: each group's first row."""
    starts = np.zeros(len(order), bool)
    starts[:1] = True
    for column in columns:
        values = column[order]
        starts[1:] |= values[1:] != values[:-1]
    return starts


def vote(times, keys, scores, k: int, *, speeds=DEFAULT_SPEEDS) -> list:
    """The best k videos for a clip: `times[i]` is query frame i's time in the clip, `keys[i]`
    and `scores[i]` its hits, best first. One VideoMatch per video, its best (speed, offset).

    Vectorised: every (hit, speed) pair is one row; sorts group them into cells."""
    speeds = np.asarray(speeds, np.float64)
    videos, video_ids, hit_keys, rows = [], {}, [], []
    for query, (seconds, row_keys, row_scores) in enumerate(zip(times, keys, scores)):
        if len(row_scores) == 0:
            continue
        background = float(row_scores[-1])
        for key, score in zip(row_keys, row_scores):
            parsed = parse_frame_key(key)
            weight = float(score) - background
            if parsed is None or weight <= 0:
                continue
            if parsed[0] not in video_ids:
                video_ids[parsed[0]] = len(videos)
                videos.append(parsed[0])
            rows.append((query, video_ids[parsed[0]], parsed[1], weight, len(hit_keys),
                         float(seconds)))
            hit_keys.append(key)
    if not rows:
        return []
    query, video, frame_time, weight, key, seconds = (np.array(c) for c in zip(*rows))
    n, m = len(rows), len(speeds)
    offset = (frame_time[:, None] - speeds[None, :] * seconds[:, None]).ravel()
    speed = np.tile(np.arange(m), n)
    query, video, weight, key = (np.repeat(a, m) for a in (query, video, weight, key))
    cell = np.floor(offset / OFFSET_WINDOW).astype(np.int64)
    place = np.arange(n * m)  # the order the loops over hits and speeds meet a row
    # A cell counts each query frame once: its best vote, the first among equal weights.
    order = np.lexsort((place, -weight, query, cell, speed, video))
    cell_starts = np.flatnonzero(_group_starts(order, (video, speed, cell)))
    cell_place = np.minimum.reduceat(place[order], cell_starts)  # where a cell first appears
    votes = order[_group_starts(order, (video, speed, cell, query))]
    vote_cell = np.cumsum(_group_starts(votes, (video, speed, cell))) - 1
    first = order[cell_starts]  # one row of each cell, cells in (video, speed, cell) order
    span = int(cell.max() - cell.min()) + 2

    def code(v, s, c):  # increasing along the cells' order
        return (v * m + s) * span + (c - cell.min() + 1)

    codes = code(video[first], speed[first], cell[first])
    wanted = code(video[votes], speed[votes], cell[votes] - 1)
    below = np.minimum(np.searchsorted(codes, wanted), len(codes) - 1)
    has_below = codes[below] == wanted
    # A pair of neighbouring bins: a copy's offsets straddle a bin's edge. A vote counts for
    # its cell and the cell below; for one query frame the better vote, the own on a tie.
    target = np.concatenate([vote_cell, below[has_below]])
    source = np.concatenate([votes, votes[has_below]])
    priority = np.concatenate([np.zeros(len(votes)), np.ones(int(has_below.sum()))])
    pick = np.lexsort((priority, -weight[source], query[source], target))
    kept = pick[_group_starts(pick, (target, query[source]))]
    merged_cell, merged = target[kept], source[kept]  # by cell, then query frame
    bounds = np.flatnonzero(_group_starts(np.arange(len(kept)), (merged_cell,)))
    totals = np.round(np.add.reduceat(weight[merged], bounds), 9)
    ends = np.r_[bounds[1:], len(merged)]
    cell_video, cell_speed = video[first], speed[first]
    top = np.full(len(videos), -np.inf)
    np.maximum.at(top, cell_video, totals)
    video_place = np.full(len(videos), n * m)
    np.minimum.at(video_place, cell_video, cell_place)
    best = {}
    for c in sorted(np.flatnonzero(totals == top[cell_video]), key=lambda c: cell_place[c]):
        # Among equal totals (the same frames fit several speeds within a window), the
        # tightest offsets, then the speed nearest 1 (a still clip fits every speed).
        members = merged[bounds[c]:ends[c]]
        s = int(cell_speed[c])
        spread = round(float(np.std(offset[members])), 3)
        rank = (float(totals[c]), -spread, -abs(float(speeds[s]) - 1.0))
        v = int(cell_video[c])
        if v not in best or rank > best[v][0]:
            best[v] = (rank, s, members)
    matches = []
    for v in sorted(best, key=lambda v: video_place[v]):
        (total, _, _), s, members = best[v]
        w = weight[members]
        matches.append(VideoMatch(videos[v], total, float(np.dot(w, offset[members]) / w.sum()),
                                  [hit_keys[i] for i in key[members]], float(speeds[s])))
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
