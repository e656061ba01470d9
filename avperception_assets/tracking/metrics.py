"""BDD100K's box_track figures (CLEAR-MOT and IDF1), computed with NumPy and SciPy.

The protocol is that of BDD100K's toolkit (`python -m bdd100k.eval.run -t box_track`, bdd100k 1.0.1
on scalabel 0.3.1's `eval/mot.py` and py-motmetrics 1.4.0); `scripts/tracking_reference.py` runs
that toolkit to write the golden files the tests hold this module to. Read from its code:

- Classes: pedestrian, rider, car, truck, bus, train, motorcycle, bicycle, in the super-categories
  human, vehicle and bike. Legacy names map first (bike, caravan, motor, person, van). `other
  person`, `other vehicle` and `trailer` boxes, and `crowd` boxes of the eight classes, are ignore
  regions: never objects, and they apply to the predictions of every class in their frame. In
  predictions such boxes are dropped. Any other category is an error, as in the toolkit.
- Boxes are pixel-inclusive, as the toolkit's `box2d_to_bbox`: width x2 - x1 + 1, height y2 - y1 + 1.
- Each video and class is one CLEAR-MOT sequence, so a track is a (video, class, id): the same id
  string in two videos is two tracks. Scores are not thresholded. Per frame, in this order:
  1. a prediction with no partner in an optimal assignment of its class (distance 1 - IoU, pairs
     with IoU below 0.5 barred) and with more than half its area inside one ignore region is
     dropped (only in frames that have an ignore region);
  2. each object keeps the prediction it was last matched with, at any earlier frame, while their
     IoU is at least 0.5;
  3. the rest are paired by an optimal assignment (most pairs first, then least total distance);
     an object paired with another prediction than its last one is an ID switch (IDSw);
  4. objects left are misses (FN), predictions left false positives (FP).
- MOTA = 1 - (FN + IDSw + FP) / objects; MOTP = 1 - mean distance over matched pairs;
  IDF1 = 2 IDTP / (objects + predictions), IDTP from a global one-to-one assignment of object
  tracks to predicted tracks within each sequence maximizing the frames where the pair's IoU is at
  least 0.5. A track is mostly tracked (MT) when matched in at least 80% of its frames, mostly
  lost (ML) under 20%, else partially tracked (PT); FM counts its returns from matched to missed
  between its first and last match.
- A class, a super-category and the overall figures pool the counts of their sequences (the
  overall ones all eight classes), and compute the ratios from the pooled counts. mMOTA, mMOTP and
  mIDF1 are means over the eight classes. Ratios are in percent, counts integers.
- Where a ratio is undefined (MOTA without objects, MOTP without matches, IDF1 without objects or
  predictions) the toolkit prints -inf or NaN; here it is null, and it counts as 0 in the means,
  as the toolkit counts it.

Where this module is more lenient than the toolkit: a video or frame without predictions is all
misses (the toolkit fills in a missing video the same way, but stops on a missing frame), and
predicted ids may be any string (the toolkit needs digits).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from avperception_assets.formats.taxonomy import IGNORED_AS
from avperception_assets.tracking.labels import Box, Frame, MotFileError, Video, read_videos

SUPER_CLASSES = {
    "human": ("pedestrian", "rider"),
    "vehicle": ("car", "truck", "bus", "train"),
    "bike": ("motorcycle", "bicycle"),
}
CLASSES = tuple(name for members in SUPER_CLASSES.values() for name in members)
NAME_MAPPING = {"bike": "bicycle", "caravan": "car", "motor": "motorcycle", "person": "pedestrian", "van": "car"}
MIN_IOU = 0.5
MAX_IGNORED_SHARE = 0.5  # a prediction more than this share inside an ignore region is dropped
MOSTLY_TRACKED, MOSTLY_LOST = 0.8, 0.2
RATIOS = ("MOTA", "MOTP", "IDF1")


@dataclass
class Tally:
    """The additive counts behind the figures of one sequence, class or pool."""

    objects: int = 0
    predictions: int = 0
    matches: int = 0
    switches: int = 0
    misses: int = 0
    false_positives: int = 0
    distance: float = 0.0  # sum of 1 - IoU over matched pairs (switches included)
    id_true_positives: int = 0
    mostly_tracked: int = 0
    partially_tracked: int = 0
    mostly_lost: int = 0
    fragmentations: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def figures(self) -> dict[str, float | int | None]:
        matched = self.matches + self.switches
        seen = self.objects + self.predictions
        errors = self.misses + self.switches + self.false_positives
        return {
            "MOTA": 100 * (1 - errors / self.objects) if self.objects else None,
            "MOTP": 100 * (1 - self.distance / matched) if matched else None,
            "IDF1": 100 * 2 * self.id_true_positives / seen if seen else None,
            "FP": self.false_positives, "FN": self.misses, "IDSw": self.switches,
            "MT": self.mostly_tracked, "PT": self.partially_tracked, "ML": self.mostly_lost,
            "FM": self.fragmentations,
        }


def _corners(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-left and bottom-right corners of (x1, y1, x2, y2) rows, pixel-inclusive as the toolkit."""
    low = boxes[:, :2]
    return low, low + (boxes[:, 2:] - boxes[:, :2] + 1)


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas of every row of `a` with every row of `b`."""
    (a_low, a_high), (b_low, b_high) = _corners(a), _corners(b)
    sides = np.minimum(a_high[:, None], b_high[None]) - np.maximum(a_low[:, None], b_low[None])
    return np.prod(np.maximum(sides, 0), axis=-1)


def _area(boxes: np.ndarray) -> np.ndarray:
    low, high = _corners(boxes)
    return np.prod(np.maximum(high - low, 0), axis=-1)


def distances(objects: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """1 - IoU for every object and prediction, NaN where the IoU is below `MIN_IOU`."""
    if not len(objects) or not len(predictions):
        return np.full((len(objects), len(predictions)), np.nan)
    inter = _overlap(objects, predictions)
    union = _area(objects)[:, None] + _area(predictions)[None] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = 1 - np.where(inter == 0, 0.0, inter / union)
    return np.where(distance > 1 - MIN_IOU, np.nan, distance)


def assign(distance: np.ndarray) -> list[tuple[int, int]]:
    """An optimal assignment over the finite distances: as many pairs as possible, then least total.

    SciPy's solver takes no barred pairs, so they cost more than any set of allowed ones could
    (py-motmetrics' construction, kept so that ties resolve as in the toolkit)."""
    allowed = np.isfinite(distance)
    if not allowed.any():
        return []
    barred = 2 * min(distance.shape) * (np.abs(distance[allowed]).max() + 1) + 1
    rows, cols = linear_sum_assignment(np.where(allowed, distance, barred))
    return [(int(i), int(j)) for i, j in zip(rows, cols) if allowed[i, j]]


class Sequence:
    """CLEAR-MOT over the frames of one video and class, in frame order."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.last_match: dict[str, str] = {}  # object id -> the prediction id it was last matched with
        self.tracked: dict[str, list[bool]] = {}  # object id -> matched or not, per frame it is in
        self.pair_frames: Counter[tuple[str, str]] = Counter()  # frames where the pair's IoU >= MIN_IOU

    def update(self, objects: list[str], predictions: list[str], distance: np.ndarray) -> None:
        self.tally.objects += len(objects)
        self.tally.predictions += len(predictions)
        for i, j in zip(*np.nonzero(np.isfinite(distance))):
            self.pair_frames[objects[i], predictions[j]] += 1
        matched: dict[int, int] = {}  # object row -> prediction column
        column = {prediction: j for j, prediction in enumerate(predictions)}
        for i, obj in enumerate(objects):
            j = column.get(self.last_match.get(obj))
            if j is not None and j not in matched.values() and np.isfinite(distance[i, j]):
                matched[i] = j
                self._match(obj, predictions[j], distance[i, j], switch=False)
        rest = distance.copy()
        rest[list(matched), :] = np.nan
        rest[:, list(matched.values())] = np.nan
        for i, j in assign(rest):
            obj, prediction = objects[i], predictions[j]
            switch = obj in self.last_match and self.last_match[obj] != prediction
            matched[i] = j
            self._match(obj, prediction, distance[i, j], switch)
        for i, obj in enumerate(objects):
            if i not in matched:
                self.tracked.setdefault(obj, []).append(False)
                self.tally.misses += 1
        self.tally.false_positives += len(predictions) - len(matched)

    def _match(self, obj: str, prediction: str, distance: float, switch: bool) -> None:
        self.last_match[obj] = prediction
        self.tracked.setdefault(obj, []).append(True)
        self.tally.distance += float(distance)
        if switch:
            self.tally.switches += 1
        else:
            self.tally.matches += 1

    def result(self) -> Tally:
        tally = replace(self.tally)
        tally.id_true_positives = self._id_true_positives()
        for states in self.tracked.values():
            share = sum(states) / len(states)
            if share >= MOSTLY_TRACKED:
                tally.mostly_tracked += 1
            elif share >= MOSTLY_LOST:
                tally.partially_tracked += 1
            else:
                tally.mostly_lost += 1
            tally.fragmentations += _fragmentations(states)
        return tally

    def _id_true_positives(self) -> int:
        """Frames covered by the best one-to-one pairing of object tracks with predicted tracks."""
        if not self.pair_frames:
            return 0
        objects = sorted({obj for obj, _ in self.pair_frames})
        predictions = sorted({prediction for _, prediction in self.pair_frames})
        hits = np.zeros((len(objects), len(predictions)))
        row, col = {o: i for i, o in enumerate(objects)}, {p: j for j, p in enumerate(predictions)}
        for (obj, prediction), count in self.pair_frames.items():
            hits[row[obj], col[prediction]] = count
        rows, cols = linear_sum_assignment(hits, maximize=True)
        return int(hits[rows, cols].sum())


def _fragmentations(states: list[bool]) -> int:
    """Times a track goes from matched to missed between its first and its last match."""
    span = states[:len(states) - states[::-1].index(True)] if True in states else []
    return sum(1 for before, now in zip(span, span[1:]) if before and not now)


def _split(frame: Frame | None) -> tuple[dict[str, list[Box]], list[Box]]:
    """A frame's boxes by evaluated class, and its ignore regions."""
    by_class: dict[str, list[Box]] = {name: [] for name in CLASSES}
    ignore: list[Box] = []
    for box in frame.boxes if frame else ():
        category = NAME_MAPPING.get(box.category, box.category)
        if category in IGNORED_AS or (category in by_class and box.crowd):
            ignore.append(box)
        elif category in by_class:
            by_class[category].append(box)
        else:
            raise MotFileError(f"{frame.source}: frame {frame.name!r}, label {box.track_id!r}: category "
                               f"{box.category!r} is neither one of {', '.join(CLASSES)} nor an ignore region")
    return by_class, ignore


def _coords(boxes: list[Box]) -> np.ndarray:
    return np.array([(b.x1, b.y1, b.x2, b.y2) for b in boxes], dtype=np.float64).reshape(-1, 4)


def _outside_ignore(predictions: np.ndarray, distance: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """Which predictions count: those paired in an optimal assignment or not mostly in an ignore region."""
    paired = np.zeros(len(predictions), dtype=bool)
    paired[[j for _, j in assign(distance)]] = True
    inside = _overlap(predictions, ignore) / _area(predictions)[:, None]
    return paired | ~(inside > MAX_IGNORED_SHARE).any(axis=1)


def _video_tallies(gt: Video, pred: Video, video: str) -> dict[str, Tally]:
    for index, frame in pred.items():
        if index not in gt:
            raise MotFileError(f"{frame.source}: frame {frame.name!r}: video {video!r} has no frameIndex "
                               f"{index} in the ground truth")
    sequences = {name: Sequence() for name in CLASSES}
    for index in sorted(gt):
        objects, ignore = _split(gt[index])
        predictions, _ = _split(pred.get(index))
        ignore_coords = _coords(ignore)
        for name, sequence in sequences.items():
            obj_coords, pred_coords = _coords(objects[name]), _coords(predictions[name])
            distance = distances(obj_coords, pred_coords)
            kept = predictions[name]
            if len(ignore) and len(kept):
                counted = _outside_ignore(pred_coords, distance, ignore_coords)
                kept, distance = [box for box, c in zip(kept, counted) if c], distance[:, counted]
            sequence.update([b.track_id for b in objects[name]], [b.track_id for b in kept], distance)
    return {name: sequence.result() for name, sequence in sequences.items()}


def evaluate(gt: dict[str, Video], pred: dict[str, Video]) -> dict:
    """The box_track figures of predicted videos against ground-truth ones, by video name."""
    unknown = sorted(set(pred) - set(gt))
    if unknown:
        raise MotFileError(f"predictions for videos not in the ground truth: {', '.join(unknown)}")
    per_class = {name: Tally() for name in CLASSES}
    for video in sorted(gt):
        for name, tally in _video_tallies(gt[video], pred.get(video, {}), video).items():
            per_class[name] += tally
    groups = {**per_class, **{group: sum((per_class[c] for c in members), Tally())
                              for group, members in SUPER_CLASSES.items()}}
    figures = sum(per_class.values(), Tally()).figures()
    class_figures = {name: per_class[name].figures() for name in CLASSES}
    for ratio in RATIOS:
        figures[f"m{ratio}"] = sum(class_figures[c][ratio] or 0.0 for c in CLASSES) / len(CLASSES)
    figures["classes"] = {name: tally.figures() for name, tally in groups.items()}
    return figures


def evaluate_paths(gt: str | Path, pred: str | Path) -> dict:
    """`evaluate` on MOT label files or folders."""
    return evaluate(read_videos(gt), read_videos(pred))
