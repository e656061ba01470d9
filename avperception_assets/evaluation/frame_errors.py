"""Where a detector fails, frame by frame and box by box: COCO matching at COCO's ten IoU
thresholds, the counts it gives per frame and class at IoU 0.5, the confusion between classes,
and the `<mode>_eval_frames` table that keeps them next to each report so users can query and
filter them like the frames (and `bootstrap` can score resampled frames without a model).

The matching is COCOeval's (`evaluateImg`, area "all", 100 detections): per frame and class,
detections in descending score order each take the unmatched ground-truth box of highest IoU,
if that IoU is at least the threshold; a detection that finds no such box but overlaps a crowd
box enough (intersection over its own area) is ignored, neither true nor false positive, and
crowd boxes are never objects to find (nor, as in COCOeval, boxes of negative width or height).
Every detection counts, as in the metric; `CONFIDENT` separates the errors a user sees on a
panel (a false positive scoring above it, a true positive below it) from the low-score tail.

Nothing here runs a model or knows about Dagster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils
from torch import Tensor

from avperception_assets.formats.coco import xywh
from avperception_assets.model.detections import COCO_IOU_THRESHOLDS as IOU_THRESHOLDS
from avperception_assets.storage.tables import EVAL_FRAMES_SUFFIX

IOU_THRESHOLD = 0.5  # the per-frame errors' threshold: IOU_THRESHOLDS[0]
MAX_DETECTIONS = 100  # per frame and class, COCO's largest maxDets
CONFIDENT = 0.5  # a false positive at or above this score is confident; a true positive below it weak
BACKGROUND = "background"

GROUND_TRUTH, PREDICTION = "ground_truth", "prediction"
# A prediction is tp/fp, or ignored (it matched only a crowd box, or is unmatched with a negative
# area); a ground-truth box found/miss, or ignored (a crowd box, or one of negative area)
TP, FP, MISS, FOUND, IGNORED = "tp", "fp", "miss", "found", "ignored"


@dataclass
class ClassCounts:
    gt: int = 0
    tp: int = 0
    fp: int = 0
    misses: int = 0
    confident_fp: int = 0
    weak_tp: int = 0

    def add(self, other: "ClassCounts") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class FrameErrors:
    """One model on one frame: counts per COCO class id and every box with its outcome."""

    per_class: dict[int, ClassCounts]
    boxes: list[dict] = field(default_factory=list)

    def total(self, class_ids: Iterable[int] | None = None) -> ClassCounts:
        wanted = None if class_ids is None else set(class_ids)
        counts = ClassCounts()
        for coco_id, class_counts in self.per_class.items():
            if wanted is None or coco_id in wanted:
                counts.add(class_counts)
        return counts

    def error_score(self, class_ids: Iterable[int]) -> int:
        """What a user sees wrong on the mode's classes: misses plus confident false positives."""
        counts = self.total(class_ids)
        return counts.misses + counts.confident_fp

    def difficulty(self, class_ids: Iterable[int]) -> int:
        """How hard the frame is for the model: its errors plus weakly found objects."""
        return self.error_score(class_ids) + self.total(class_ids).weak_tp


def _iou(a: Tensor, b: Tensor) -> np.ndarray:
    from torchvision.ops import box_iou

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return box_iou(a.double(), b.double()).numpy()


@dataclass
class ClassMatches:
    """COCOeval.evaluateImg for one frame and class at every threshold of IOU_THRESHOLDS (rows)."""

    order: np.ndarray  # (D,) the kept detections, highest score first (COCO's stable order)
    dt_match: np.ndarray  # (T, D) the ground-truth box each matched, -1: none
    dt_ignored: np.ndarray  # (T, D) neither a true nor a false positive (it matched an ignored box)
    gt_match: np.ndarray  # (T, G) the detection (position in `order`) that found it, -1: none (crowd boxes)
    gt_ignored: np.ndarray  # (G,) not an object to find: a crowd box (or one of negative area)
    ious: np.ndarray  # (D, G) COCO's IoU (intersection over the detection's area for a crowd box)


def _last_best(values: np.ndarray) -> np.ndarray:
    """Per row, the column of the highest value (of equals, the last, as COCOeval's `<` keeps
    it); -1 where every value is negative (nothing eligible)."""
    if values.shape[1] == 0:
        return np.full(len(values), -1)
    last = values.shape[1] - 1 - np.argmax(values[:, ::-1], axis=1)
    return np.where(values.max(axis=1) >= 0, last, -1)


def _outside_area(boxes: np.ndarray) -> np.ndarray:
    """Boxes whose area lies outside COCO's "all" range, [0, 1e5²]: only a box of negative width
    or height; COCOeval ignores such ground truth, and such detections when unmatched."""
    area = boxes[:, 2] * boxes[:, 3]
    return (area < 0) | (area > 1e10)


def coco_match(scores: np.ndarray, boxes: np.ndarray, gt_boxes: np.ndarray, crowd: np.ndarray) -> ClassMatches:
    """COCOeval's greedy matching of one frame and class, at all ten thresholds at once.

    `boxes` and `gt_boxes` are COCO [x, y, width, height] rows (as the report's JSON files hold
    them, so the IoU is pycocotools' own), `crowd` flags crowd ground truth. COCOeval visits
    the ignored ground truth last and stops there once a regular box matched: a detection takes
    the best free regular box, or else the best ignored one (a crowd box stays free).
    """
    order = np.argsort(-scores, kind="mergesort")[:MAX_DETECTIONS]
    thresholds, count = len(IOU_THRESHOLDS), len(gt_boxes)
    dt_match, dt_ignored = np.full((thresholds, len(order)), -1), np.zeros((thresholds, len(order)), bool)
    gt_match, gt_ignored = np.full((thresholds, count), -1), crowd | _outside_area(gt_boxes)
    ious = np.zeros((len(order), count))
    if len(order) and count:
        ious = np.asarray(mask_utils.iou(boxes[order], gt_boxes, crowd.astype(np.uint8)))
    floor = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[:, None]
    rows = np.arange(thresholds)
    for d in range(len(order) if count else 0):
        eligible, free = ious[d] >= floor, gt_match < 0  # (T, G)
        regular = _last_best(np.where(eligible & free & ~gt_ignored, ious[d], -1.0))
        ignored = _last_best(np.where(eligible & (free | crowd) & gt_ignored, ious[d], -1.0))
        match = np.where(regular >= 0, regular, ignored)
        dt_match[:, d] = match
        dt_ignored[:, d] = (regular < 0) & (ignored >= 0)
        taken = (match >= 0) & ~crowd[match]  # (match -1 reads the last flag: masked by match >= 0)
        gt_match[rows[taken], match[taken]] = d
    dt_ignored |= (dt_match < 0) & _outside_area(boxes[order])
    return ClassMatches(order, dt_match, dt_ignored, gt_match, gt_ignored, ious)


def _box(source: str, coco_id: int, box: Sequence[float], score: float | None, outcome: str,
         iou: float | None, match: int, matched: Sequence[bool], ignored: Sequence[bool], names: Sequence[str]) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"source": source, "coco_id": coco_id, "name": names[coco_id], "score": score,
            "x1": x1, "y1": y1, "x2": x2, "y2": y2, "outcome": outcome, "iou": iou, "match": match,
            "matched": [bool(v) for v in matched], "ignored": [bool(v) for v in ignored]}


def _outcome(matched: bool, ignored: bool, hit: str, miss: str) -> str:
    return IGNORED if ignored else hit if matched else miss


def ground_truth_order(labels: Sequence[int]) -> list[int]:
    """The target index of each ground-truth box of `match_frame`'s `boxes`, in their order:
    class by class (ascending COCO id), in target order within a class. It ties a stored box back
    to the frame's own boxes (and their track ids)."""
    return [int(i) for i in np.argsort(np.asarray(labels, dtype=np.int64), kind="stable")]


def match_frame(prediction: Mapping[str, Tensor], target: Mapping[str, Tensor], names: Sequence[str]) -> FrameErrors:
    """Every box of one frame with its outcome at IoU 0.5 and whether it matched (and was
    ignored) at each of IOU_THRESHOLDS, and the counts per class at IoU 0.5. `match` of a box is
    the index, in this frame's `boxes`, of the box it matched at IoU 0.5 (-1: none; a crowd box
    records none, as many detections may match it). A target's optional `iscrowd` flags crowd boxes."""
    pred_boxes = prediction["boxes"].reshape(-1, 4).float().numpy()
    scores, pred_labels = prediction["scores"].reshape(-1).float().numpy(), prediction["labels"].reshape(-1).numpy()
    gt_boxes, gt_labels = target["boxes"].reshape(-1, 4).float().numpy(), target["labels"].reshape(-1).numpy()
    crowd = np.asarray(target.get("iscrowd", np.zeros(len(gt_labels))), dtype=bool).reshape(-1)
    per_class: dict[int, ClassCounts] = {}
    gt_rows, pred_rows = [], []
    for coco_id in sorted({int(c) for c in gt_labels} | {int(c) for c in pred_labels}):
        gt_index, pred_index = np.flatnonzero(gt_labels == coco_id), np.flatnonzero(pred_labels == coco_id)
        found = coco_match(scores[pred_index], np.array(xywh(pred_boxes[pred_index])).reshape(-1, 4),
                           np.array(xywh(gt_boxes[gt_index])).reshape(-1, 4), crowd[gt_index])
        counts = per_class[coco_id] = ClassCounts(gt=int((~found.gt_ignored).sum()))
        gt_start, pred_start = len(gt_rows), len(pred_rows)
        for d, k in enumerate(found.order):
            g, ignored, score = int(found.dt_match[0, d]), bool(found.dt_ignored[0, d]), float(scores[pred_index[k]])
            hit, miss = g >= 0 and not ignored, g < 0 and not ignored
            counts.tp += hit
            counts.fp += miss
            counts.confident_fp += miss and score >= CONFIDENT
            counts.weak_tp += hit and score < CONFIDENT
            pred_rows.append((coco_id, pred_boxes[pred_index[k]].tolist(), score,
                              _outcome(g >= 0, ignored, TP, FP), float(found.ious[d, g]) if g >= 0 else None,
                              gt_start + g if g >= 0 else -1, found.dt_match[:, d] >= 0, found.dt_ignored[:, d]))
        for g, i in enumerate(gt_index):
            d, ignored = int(found.gt_match[0, g]), bool(found.gt_ignored[g])
            counts.misses += d < 0 and not ignored
            gt_rows.append((coco_id, gt_boxes[i].tolist(), None, _outcome(d >= 0, ignored, FOUND, MISS),
                            float(found.ious[d, g]) if d >= 0 else None, pred_start + d if d >= 0 else -1,
                            found.gt_match[:, g] >= 0, [ignored] * len(IOU_THRESHOLDS)))
    # Ground truth first, then predictions: a prediction's `match` points into the first part,
    # a ground-truth box's into the second.
    boxes = [_box(GROUND_TRUTH, c, b, s, o, iou, m + len(gt_rows) if m >= 0 else -1, *flags, names)
             for c, b, s, o, iou, m, *flags in gt_rows]
    boxes += [_box(PREDICTION, c, b, s, o, iou, m, *flags, names) for c, b, s, o, iou, m, *flags in pred_rows]
    return FrameErrors(per_class, boxes)


def confusion(predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]],
              names: Sequence[str], *, threshold: float = IOU_THRESHOLD, min_score: float = CONFIDENT) -> dict:
    """Which class the model said for each ground-truth class, over frames: every pair of a
    ground-truth box and a prediction scoring at least `min_score`, of any class, with IoU at
    least `threshold` is matched greedily by IoU; what stays unmatched pairs with background.
    Returns {"classes": [...], "matrix": rows = ground truth, columns = prediction}."""
    counts: dict[tuple[str, str], int] = {}
    used: set[str] = set()
    for prediction, target in zip(predictions, targets):
        keep = prediction["scores"] >= min_score
        boxes, labels = prediction["boxes"][keep].reshape(-1, 4).float(), prediction["labels"][keep].tolist()
        gt_boxes, gt_labels = target["boxes"].reshape(-1, 4).float(), target["labels"].tolist()
        ious = _iou(gt_boxes, boxes)
        pairs = sorted(((ious[g, p], g, p) for g in range(len(gt_labels)) for p in range(len(labels))
                        if ious[g, p] >= threshold), reverse=True)
        gt_done, pred_done = set(), set()
        for _, g, p in pairs:
            if g not in gt_done and p not in pred_done:
                gt_done.add(g)
                pred_done.add(p)
                _count(counts, used, names[gt_labels[g]], names[labels[p]])
        for g in set(range(len(gt_labels))) - gt_done:
            _count(counts, used, names[gt_labels[g]], BACKGROUND)
        for p in set(range(len(labels))) - pred_done:
            _count(counts, used, BACKGROUND, names[labels[p]])
    classes = sorted(used - {BACKGROUND}) + [BACKGROUND]
    return {"classes": classes, "min_score": min_score, "iou_threshold": threshold,
            "matrix": [[counts.get((gt, pred), 0) for pred in classes] for gt in classes]}


def _count(counts: dict, used: set, gt: str, pred: str) -> None:
    counts[(gt, pred)] = counts.get((gt, pred), 0) + 1
    used.update((gt, pred))


# --- the `<mode>_eval_frames` table ----------------------------------------------------------

def table_name(mode: str) -> str:
    return f"{mode}{EVAL_FRAMES_SUFFIX}"


_COUNTS = [pa.field(name, pa.int32()) for name in ClassCounts.__dataclass_fields__]
BOX = pa.struct([
    pa.field("source", pa.string()), pa.field("coco_id", pa.int32()), pa.field("name", pa.string()),
    pa.field("score", pa.float32()), pa.field("x1", pa.float32()), pa.field("y1", pa.float32()),
    pa.field("x2", pa.float32()), pa.field("y2", pa.float32()), pa.field("outcome", pa.string()),
    pa.field("iou", pa.float32()), pa.field("match", pa.int32()),
    # At each of IOU_THRESHOLDS: matched (a prediction: to any box; a ground-truth box: found),
    # and ignored (neither a true nor a false positive; a ground-truth box not to be found)
    pa.field("matched", pa.list_(pa.bool_(), len(IOU_THRESHOLDS))),
    pa.field("ignored", pa.list_(pa.bool_(), len(IOU_THRESHOLDS)))])
SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("frame_index", pa.int32()),  # the frame's position in the evaluation (its COCO image id)
    pa.field("model", pa.string()),
    *_COUNTS,  # over every class
    *(pa.field(f"mode_{f.name}", pa.int32()) for f in _COUNTS),  # over the mode's classes
    pa.field("error_score", pa.int32()),  # mode misses + mode confident false positives
    pa.field("per_class", pa.list_(pa.struct([pa.field("coco_id", pa.int32()), pa.field("name", pa.string()),
                                                *_COUNTS]))),
    pa.field("boxes", pa.list_(BOX)),
])


def _counts_row(counts: ClassCounts, prefix: str = "") -> dict:
    return {f"{prefix}{name}": getattr(counts, name) for name in ClassCounts.__dataclass_fields__}


def frame_rows(errors: Mapping[str, Sequence[FrameErrors]], image_ids: Sequence[str], class_ids: Iterable[int],
               names: Sequence[str]) -> pa.Table:
    """The table's rows: one per model and frame."""
    class_ids = list(class_ids)
    rows = []
    for model, frames in errors.items():
        for index, (image_id, frame) in enumerate(zip(image_ids, frames)):
            rows.append({
                "image_id": image_id, "frame_index": index, "model": model,
                **_counts_row(frame.total()), **_counts_row(frame.total(class_ids), "mode_"),
                "error_score": frame.error_score(class_ids),
                "per_class": [{"coco_id": c, "name": names[c], **_counts_row(k)} for c, k in frame.per_class.items()],
                "boxes": frame.boxes})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_table(conn, mode: str, rows: pa.Table, metadata: Mapping[str, str]) -> int:
    """Replace `<mode>_eval_frames` with `rows` (the last report's frames; earlier reports'
    stay readable at the versions their report.json records); returns the new version."""
    rows = rows.replace_schema_metadata({k.encode(): str(v).encode() for k, v in metadata.items()})
    table = conn.create_table(table_name(mode), rows, mode="overwrite")
    return table.version


def read_table(conn, mode: str, version: int) -> pa.Table:
    """The rows of `<mode>_eval_frames` at `version` (the frames of the report that wrote it)."""
    table = conn.open_table(table_name(mode))
    table.checkout(version)
    return table.to_arrow()
