"""A tracker that links a detector's per-frame boxes into tracks: IoU with an optimal assignment,
frame to frame (SORT's association, without its motion model).

Frames of one clip are fed in clip order, each with its frame index. In each frame:

1. detections scoring below `min_score` are dropped: they neither start nor continue a track;
2. per class, the live tracks of that class and the frame's detections of that class are paired by
   an optimal assignment (`metrics.assign`, SciPy's `linear_sum_assignment`: the most pairs, then
   the least total 1 - IoU) between each track's last box and each detection, pairs with an IoU
   under `min_iou` barred;
3. a paired detection continues its track; the others start new tracks, numbered from 1 in the
   clip, higher scores first. A detection of another class never continues a track;
4. a track that no detection continued in more than `max_missed` frames in a row (counted by frame
   index, so frames left out of the sequence count as missed) ends and is never resumed.

The same detections in the same order always give the same tracks. `track_clip` writes them as
BDD100K MOT predictions (`id`, `category`, `box2d`, `score`), which `tracking.metrics` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from avperception_assets.tracking.metrics import assign


@dataclass(frozen=True)
class Detection:
    category: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    score: float


@dataclass(frozen=True)
class TrackerSettings:
    min_iou: float = 0.3  # least IoU between a track's last box and a detection that continues it
    min_score: float = 0.5  # detections below it are not tracked
    max_missed: int = 2  # frames in a row a track may go without a detection and still continue


@dataclass
class _Track:
    track_id: str
    category: str
    box: tuple[float, float, float, float]
    last_index: int  # the frame index it was last continued in


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every (x1, y1, x2, y2) row of `a` with every row of `b`."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=-1)
    area_a, area_b = (np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=-1) for x in (a, b))
    union = area_a[:, None] + area_b[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


class Tracker:
    """Links one clip's detections into tracks, frame by frame (`update`)."""

    def __init__(self, settings: TrackerSettings = TrackerSettings()):
        self.settings = settings
        self._live: list[_Track] = []
        self._count = 0
        self._last_index: int | None = None

    def update(self, frame_index: int, detections: Sequence[Detection]) -> list[tuple[str, Detection]]:
        """The tracked detections of the frame at `frame_index`, each with its track id, higher
        scores first."""
        if self._last_index is not None and frame_index <= self._last_index:
            raise ValueError(f"frame index {frame_index} after {self._last_index}: frames must come in clip order")
        self._last_index = frame_index
        self._live = [t for t in self._live if frame_index - t.last_index - 1 <= self.settings.max_missed]
        kept = sorted((d for d in detections if d.score >= self.settings.min_score), key=lambda d: -d.score)
        owner: dict[int, _Track] = {}  # detection position in `kept` -> the track it continues
        for category in sorted({d.category for d in kept}):
            positions = [k for k, d in enumerate(kept) if d.category == category]
            tracks = [t for t in self._live if t.category == category]
            if not tracks:
                continue
            overlap = iou(np.array([t.box for t in tracks], dtype=float),
                          np.array([kept[k].box for k in positions], dtype=float))
            distance = np.where(overlap >= self.settings.min_iou, 1 - overlap, np.nan)
            for i, j in assign(distance):
                owner[positions[j]] = tracks[i]
        tracked = []
        for k, detection in enumerate(kept):
            track = owner.get(k)
            if track is None:
                self._count += 1
                track = _Track(str(self._count), detection.category, detection.box, frame_index)
                self._live.append(track)
            track.box, track.last_index = detection.box, frame_index
            tracked.append((track.track_id, detection))
        return tracked


def box2d(box) -> dict:
    """An (x1, y1, x2, y2) box as BDD100K's `box2d`."""
    return dict(zip(("x1", "y1", "x2", "y2"), (float(v) for v in box)))


def track_clip(video: str, frames: Sequence[tuple[str, int, Sequence[Detection]]],
               settings: TrackerSettings = TrackerSettings()) -> list[dict]:
    """One clip's frames, each (name, frame index, its detections) in clip order, tracked and
    written as BDD100K MOT prediction frames."""
    tracker = Tracker(settings)
    return [{"name": name, "videoName": video, "frameIndex": index,
             "labels": [{"id": track_id, "category": d.category, "score": d.score,
                         "box2d": box2d(d.box)}
                        for track_id, d in tracker.update(index, detections)]}
            for name, index, detections in frames]
