"""How sure a report is: 95% percentile-bootstrap intervals over frames, computed from the matches
`<mode>_eval_frames` stores (no model runs again), for each model's mode-classes AP@0.5,
AP@[.5:.95] and recall at IoU 0.5, and for paired differences of two models on the same resamples.

A resample draws the frames with replacement; it is a vector of per-frame counts (multinomial
weights), so each class's detections are ranked once, COCO's way, and a resample's true- and
false-positive cumulative sums and its number of objects are weighted sums: no frame is copied.
The figures are COCOeval's: per class and IoU threshold, precision at the 101 recall points
(interpolated from the right, maxDets 100) averaged into AP; recall is the last recall point;
a class without ground truth in a resample is left out of the mean over classes. A frame drawn
k times counts as k frames, as its k copies would in COCOeval.

Two models on the same frames are compared on the same resamples (paired, `intervals`), and
so are two groups of models, by their means (several training seeds, `group_intervals`); two
sets of frames that share none (a model outside and inside a slice) are resampled each on its
own (`independent_intervals`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from avperception_assets.evaluation.frame_errors import IOU_THRESHOLDS, PREDICTION
from avperception_assets.model.detections import COCO_RECALL_POINTS as RECALL_POINTS

RESAMPLES = 1000
SEED = 0
CONFIDENCE = 0.95
# The figures, keyed as `compute_metrics` keys them over the mode's classes
METRICS = {"map_50": "AP@0.5", "map": "AP@[.5:.95]", "recall_50": "recall@IoU 0.5"}
VERDICT_METRIC = "map_50"
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"
POINTS = 100.0  # a difference of APs in points: AP x 100
_CHUNK = 100  # resamples scored at once: bounds memory at (chunk x detections of a class) floats


@dataclass
class ClassDetections:
    """One class's detections over every frame, in COCOeval's ranking: score descending, then
    frame, then the frame's own score order."""

    frames: np.ndarray  # (D,) the frame of each detection
    tp: np.ndarray  # (T, D) a true positive at each IoU threshold
    fp: np.ndarray  # (T, D) a false positive at each (a detection matching a crowd box is neither)


@dataclass
class Matches:
    """One model's matches on the mode's classes over the evaluation's frames."""

    class_ids: list[int]
    gt: np.ndarray  # (F, K) objects per frame and class, crowd regions excluded
    detections: list[ClassDetections]  # per class, in the order of class_ids

    @property
    def frames(self) -> int:
        return len(self.gt)

    @property
    def objects(self) -> int:
        return int(self.gt.sum())


# --- reading stored matches --------------------------------------------------------------

def _gt_counts(rows: pa.Table, class_ids: list[int]) -> np.ndarray:
    per_class = rows["per_class"].combine_chunks()
    frames = pc.list_parent_indices(per_class).to_numpy()
    entries = pc.list_flatten(per_class)
    ids, counts = _field(entries, "coco_id"), _field(entries, "gt")
    gt = np.zeros((rows.num_rows, len(class_ids)), dtype=np.int64)
    for k, coco_id in enumerate(class_ids):
        wanted = ids == coco_id
        np.add.at(gt[:, k], frames[wanted], counts[wanted])
    return gt


def _field(structs: pa.StructArray, name: str) -> np.ndarray:
    return pc.struct_field(structs, name).to_numpy(zero_copy_only=False)


def _flags(boxes: pa.StructArray, name: str) -> np.ndarray:
    """A fixed-size list of bools per box, as a (boxes, thresholds) array."""
    flags = pc.list_flatten(pc.struct_field(boxes, name))
    return flags.to_numpy(zero_copy_only=False).reshape(-1, len(IOU_THRESHOLDS))


def _detections(rows: pa.Table, class_ids: list[int]) -> list[ClassDetections]:
    listed = rows["boxes"].combine_chunks()
    frames, boxes = pc.list_parent_indices(listed).to_numpy(), pc.list_flatten(listed)
    ids, scores = _field(boxes, "coco_id"), _field(boxes, "score")
    is_prediction = pc.equal(pc.struct_field(boxes, "source"), PREDICTION).to_numpy(zero_copy_only=False)
    matched, ignored = _flags(boxes, "matched"), _flags(boxes, "ignored")
    detections = []
    for coco_id in class_ids:
        kept = np.flatnonzero(is_prediction & (ids == coco_id))  # in frame order, each frame's in score order
        ranked = kept[np.lexsort((kept, -scores[kept]))]  # COCOeval's stable sort over frames in order
        hit, skip = matched[ranked].T, ignored[ranked].T
        detections.append(ClassDetections(frames[ranked], hit & ~skip, ~hit & ~skip))
    return detections


def rows_of_frames(rows: pa.Table, image_ids: Iterable[str]) -> pa.Table:
    """The stored rows of the frames `image_ids` (every model's), numbered from 0 in their
    stored order: the rows an evaluation of those frames alone would have stored."""
    kept = rows.filter(pc.is_in(rows["image_id"], value_set=pa.array(list(image_ids), pa.string())))
    kept = kept.sort_by([("model", "ascending"), ("frame_index", "ascending")])
    models = kept["model"].to_numpy(zero_copy_only=False)
    starts = np.searchsorted(models, models, side="left")  # the first row of each row's model
    renumbered = pa.array(np.arange(kept.num_rows) - starts, pa.int32())
    return kept.set_column(kept.schema.get_field_index("frame_index"), "frame_index", renumbered)


def matches_from_rows(rows: pa.Table, class_ids: Iterable[int]) -> dict[str, Matches]:
    """Each model's matches from `<mode>_eval_frames` rows (one per model and frame)."""
    class_ids = list(class_ids)
    result, frame_counts = {}, set()
    for model in sorted(set(rows["model"].to_pylist())):
        own = rows.filter(pc.equal(rows["model"], model)).sort_by("frame_index")
        if own["frame_index"].to_pylist() != list(range(own.num_rows)):
            raise ValueError(f"model {model!r}: the stored frames are not each frame once")
        result[model] = Matches(class_ids, _gt_counts(own, class_ids), _detections(own, class_ids))
        frame_counts.add(own.num_rows)
    if len(frame_counts) > 1:
        raise ValueError(f"the models were not scored on the same frames ({sorted(frame_counts)} frames)")
    return result


# --- scoring weighted frames -------------------------------------------------------------

def resample_weights(frames: int, resamples: int = RESAMPLES, seed: int | np.random.SeedSequence = SEED) -> np.ndarray:
    """(resamples, frames) counts: how often each resample draws each frame."""
    if frames < 1:
        raise ValueError("a bootstrap needs at least one frame")
    return np.random.default_rng(seed).multinomial(frames, np.full(frames, 1 / frames), size=resamples)


def _first_at_least(recall: np.ndarray) -> np.ndarray:
    """Per row of non-decreasing recalls, the first position reaching each recall point."""
    return np.stack([np.searchsorted(row, RECALL_POINTS, side="left") for row in recall])


def _class_figures(detections: ClassDetections, gt: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP and recall of one class at each IoU threshold for each weighting of the frames: two
    (resamples, T) arrays, NaN where a resample holds no object of the class.

    Only the true positives' points of the precision-recall curve are computed: recall rises
    only there, and a false positive's precision is below the true positive's before it, so
    COCOeval's interpolated precision at every recall point is read from them alone.
    """
    objects = (weights @ gt).astype(float)
    shape = (len(weights), len(IOU_THRESHOLDS))
    ap, recall = np.zeros(shape), np.zeros(shape)
    drawn = weights[:, detections.frames].astype(float)  # (resamples, D)
    every_drawn = None  # the cumulative count of detections, when none is ignored
    with np.errstate(divide="ignore", invalid="ignore"):
        for t in range(len(IOU_THRESHOLDS)):
            hits = np.flatnonzero(detections.tp[t])
            if not len(hits):
                continue  # no true positive: AP and recall 0
            counted = detections.tp[t] | detections.fp[t]  # not ignored
            if counted.all():
                every_drawn = np.cumsum(drawn, axis=1) if every_drawn is None else every_drawn
                seen = every_drawn[:, hits]
            else:
                seen = np.cumsum(drawn * counted, axis=1)[:, hits]
            tp = np.cumsum(drawn[:, hits], axis=1)
            rc = tp / objects[:, None]
            precision = tp / (seen + np.spacing(1))  # seen = tp + fp, as COCOeval adds them
            precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # from the right
            at = _first_at_least(rc)
            reached = np.take_along_axis(precision, np.minimum(at, len(hits) - 1), axis=1)
            ap[:, t] = np.where(at < len(hits), reached, 0.0).mean(axis=1)
            recall[:, t] = rc[:, -1]
    missing = objects == 0
    ap[missing], recall[missing] = np.nan, np.nan
    return ap, recall


def _nanmean(values: np.ndarray, axis) -> np.ndarray:
    defined = ~np.isnan(values)
    total = np.where(defined, values, 0.0).sum(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return total / defined.sum(axis=axis)


def score(matches: Matches, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric of METRICS for each weighting (row of `weights`) of the frames; NaN where no
    class has an object."""
    figures = {key: [] for key in METRICS}
    for start in range(0, len(weights), _CHUNK):
        chunk = weights[start:start + _CHUNK]
        per_class = [_class_figures(d, matches.gt[:, k], chunk) for k, d in enumerate(matches.detections)]
        ap = np.stack([a for a, _ in per_class], axis=2)  # (resamples, T, K)
        recall = np.stack([r for _, r in per_class], axis=2)
        figures["map_50"].append(_nanmean(ap[:, 0], axis=1))
        figures["map"].append(_nanmean(ap.reshape(len(chunk), -1), axis=1))
        figures["recall_50"].append(_nanmean(recall[:, 0], axis=1))
    return {key: np.concatenate(values) for key, values in figures.items()}


# --- intervals ---------------------------------------------------------------------------

def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _interval(point: float, samples: np.ndarray, *, confidence: float, resamples: int, seed: int,
              frames: int | dict[str, int], objects: int | dict[str, int]) -> dict:
    defined = samples[np.isfinite(samples)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(defined, [tail, 100 - tail]) if len(defined) else (np.nan, np.nan)
    return {"point": _finite(point), "low": _finite(low), "high": _finite(high), "confidence": confidence,
            "resamples": resamples, "seed": seed, "frames": frames, "objects": objects}


def intervals(matches: Mapping[str, Matches], pairs: Mapping[str, tuple[str, str]], *,
              resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE) -> dict:
    """{name: {metric: interval}} for each model of `matches` and each pair `name: (a, b)`, the
    difference b − a in points on the same resamples. An interval holds the full-sample figure
    (`point`), the percentile bounds (`low`, `high`, None when no resample has an object),
    `confidence`, `resamples`, `seed`, `frames` and the models' `objects` of the mode's classes."""
    return group_intervals({model: [m] for model, m in matches.items()}, pairs, resamples=resamples, seed=seed,
                           confidence=confidence)


def group_intervals(groups: Mapping[str, Sequence[Matches]], pairs: Mapping[str, tuple[str, str]], *,
                    resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE) -> dict:
    """As `intervals`, for groups of models on the same frames (one model per training seed): a
    group's figure, on the full sample as on each resample, is the mean of its models' figures,
    so a pair's difference b − a is that of the two groups' means over seeds, paired on the same
    frame resamples. The interval is over frames, for these seeds: their own spread is not in it."""
    models = [m for group in groups.values() for m in group]
    shapes = {(m.frames, m.objects) for m in models}
    if len(shapes) != 1:
        raise ValueError(f"the models' matches cover different frames or objects: {sorted(shapes)}")
    [(frames, objects)] = shapes
    weights = resample_weights(frames, resamples, seed)
    everywhere = np.ones((1, frames), dtype=np.int64)

    def mean_score(group: Sequence[Matches], weighting: np.ndarray) -> dict[str, np.ndarray]:
        scores = [score(m, weighting) for m in group]
        return {key: np.mean([s[key] for s in scores], axis=0) for key in METRICS}

    points = {name: mean_score(group, everywhere) for name, group in groups.items()}
    samples = {name: mean_score(group, weights) for name, group in groups.items()}
    common = {"confidence": confidence, "resamples": resamples, "seed": seed, "frames": frames, "objects": objects}
    result = {name: {key: _interval(points[name][key][0], samples[name][key], **common) for key in METRICS}
              for name in groups}
    for name, (a, b) in pairs.items():
        result[name] = {key: _interval(POINTS * (points[b][key][0] - points[a][key][0]),
                                       POINTS * (samples[b][key] - samples[a][key]), **common) for key in METRICS}
    return result


def independent_intervals(sets: Mapping[str, Matches], differences: Mapping[str, tuple[str, str]], *,
                          resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE) -> dict:
    """{name: {metric: interval}} for each of `sets`, frame sets that share no frame (a model
    outside a slice and inside it), and for each difference `name: (a, b)`, b − a in points.
    Each set is resampled on its own, from its own stream of `seed` (the n-th set of `sets`
    draws the n-th, whatever sets follow it), so a difference pairs independent resamples: with
    no frame in both sets there is nothing to pair. A set's interval is as `intervals` gives it; a difference's `frames` and
    `objects` are each set's, by name."""
    common = {"confidence": confidence, "resamples": resamples, "seed": seed}
    points, samples, result = {}, {}, {}
    for (name, matches), stream in zip(sets.items(), np.random.SeedSequence(seed).spawn(len(sets))):
        points[name] = score(matches, np.ones((1, matches.frames), dtype=np.int64))
        samples[name] = score(matches, resample_weights(matches.frames, resamples, stream))
        result[name] = {key: _interval(points[name][key][0], samples[name][key], frames=matches.frames,
                                       objects=matches.objects, **common) for key in METRICS}
    for name, (a, b) in differences.items():
        counts = {"frames": {a: sets[a].frames, b: sets[b].frames}, "objects": {a: sets[a].objects, b: sets[b].objects}}
        result[name] = {key: _interval(POINTS * (points[b][key][0] - points[a][key][0]),
                                       POINTS * (samples[b][key] - samples[a][key]), **counts, **common)
                        for key in METRICS}
    return result


def interval_text(entry: Mapping, points: bool = False) -> str:
    """An interval as `point [low, high]`: a fraction to 3 places, or a difference in points
    (signed, 1 place); n/a when nothing was measured."""
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.1f}" if points else f"{value:.3f}"

    if entry["point"] is None:
        return "n/a"
    return f"{fmt(entry['point'])} [{fmt(entry['low'])}, {fmt(entry['high'])}]"


def verdict(difference: Mapping) -> str:
    """From a paired interval of b − a: better when it lies above 0, worse below, else neither."""
    low, high = difference["low"], difference["high"]
    if low is not None and low > 0:
        return BETTER
    if high is not None and high < 0:
        return WORSE
    return NO_DIFFERENCE
