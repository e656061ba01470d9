"""Where a detector fails, frame by frame and box by box: COCO matching at IoU 0.5, the counts it
gives per frame and class, the confusion between classes, and the `<mode>_eval_frames` table
that keeps them next to each report so users can query and filter them like the frames.

The matching is COCOeval's (`evaluateImg` at one IoU threshold, area "all", 100 detections):
per frame and class, detections in descending score order each take the unmatched ground-truth
box of highest IoU, if that IoU is at least the threshold. Every detection counts, as in the
metric; `CONFIDENT` separates the errors a user sees on a panel (a false positive scoring
above it, a true positive below it) from the low-score tail.

Nothing here runs a model or knows about Dagster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from avperception_assets.storage.tables import EVAL_FRAMES_SUFFIX

IOU_THRESHOLD = 0.5
MAX_DETECTIONS = 100  # per frame and class, COCO's largest maxDets
CONFIDENT = 0.5  # a false positive at or above this score is confident; a true positive below it weak
BACKGROUND = "background"

GROUND_TRUTH, PREDICTION = "ground_truth", "prediction"
TP, FP, MISS, FOUND = "tp", "fp", "miss", "found"  # a prediction is tp/fp; a ground-truth box found/miss


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


def _match_class(scores: Tensor, boxes: Tensor, gt_boxes: Tensor, threshold: float) -> tuple[list[int], list[float], list[int]]:
    """COCOeval's greedy matching for one frame and class: the kept detection indices in score
    order, for each its matched ground-truth index (-1: none) and that IoU."""
    order = np.argsort(-scores.numpy(), kind="mergesort")[:MAX_DETECTIONS].tolist()  # COCO's stable order
    ious = _iou(boxes[order].reshape(-1, 4), gt_boxes)
    taken = [False] * len(gt_boxes)
    matches, match_ious = [], []
    for d in range(len(order)):
        best, best_iou = -1, min(threshold, 1 - 1e-10)
        for g in range(len(gt_boxes)):
            if taken[g] or ious[d, g] < best_iou:
                continue
            best, best_iou = g, ious[d, g]
        if best >= 0:
            taken[best] = True
        matches.append(best)
        match_ious.append(float(best_iou) if best >= 0 else None)
    return order, match_ious, matches


def _box(source: str, coco_id: int, box: Sequence[float], score: float | None, outcome: str,
         iou: float | None, match: int, names: Sequence[str]) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"source": source, "coco_id": coco_id, "name": names[coco_id], "score": score,
            "x1": x1, "y1": y1, "x2": x2, "y2": y2, "outcome": outcome, "iou": iou, "match": match}


def match_frame(prediction: Mapping[str, Tensor], target: Mapping[str, Tensor], names: Sequence[str], *,
                threshold: float = IOU_THRESHOLD) -> FrameErrors:
    """Every box of one frame with its outcome, and the counts per class. `match` of a box is the
    index, in this frame's `boxes`, of the box it matched (-1: none)."""
    pred_boxes, scores = prediction["boxes"].reshape(-1, 4).float(), prediction["scores"].reshape(-1).float()
    pred_labels, gt_boxes = prediction["labels"].reshape(-1), target["boxes"].reshape(-1, 4).float()
    gt_labels = target["labels"].reshape(-1)
    per_class: dict[int, ClassCounts] = {}
    gt_rows, pred_rows = [], []
    for coco_id in sorted({int(c) for c in gt_labels} | {int(c) for c in pred_labels}):
        gt_index = torch.nonzero(gt_labels == coco_id).flatten().tolist()
        pred_index = torch.nonzero(pred_labels == coco_id).flatten().tolist()
        order, ious, matches = _match_class(scores[pred_index], pred_boxes[pred_index], gt_boxes[gt_index], threshold)
        counts = per_class[coco_id] = ClassCounts(gt=len(gt_index))
        found = {g: (len(pred_rows) + d, ious[d]) for d, g in enumerate(matches) if g >= 0}
        gt_start = len(gt_rows)
        for d, (k, g) in enumerate(zip(order, matches)):
            score = float(scores[pred_index[k]])
            hit = g >= 0
            counts.tp += hit
            counts.fp += not hit
            counts.confident_fp += not hit and score >= CONFIDENT
            counts.weak_tp += hit and score < CONFIDENT
            pred_rows.append((coco_id, pred_boxes[pred_index[k]].tolist(), score, TP if hit else FP, ious[d],
                              gt_start + g if hit else -1))
        for g, i in enumerate(gt_index):
            row, iou = found.get(g, (-1, None))
            counts.misses += row < 0
            gt_rows.append((coco_id, gt_boxes[i].tolist(), None, FOUND if row >= 0 else MISS, iou, row))
    # Ground truth first, then predictions: a prediction's `match` points into the first part,
    # a ground-truth box's into the second.
    boxes = [_box(GROUND_TRUTH, c, b, s, o, iou, m + len(gt_rows) if m >= 0 else -1, names)
             for c, b, s, o, iou, m in gt_rows]
    boxes += [_box(PREDICTION, c, b, s, o, iou, m, names) for c, b, s, o, iou, m in pred_rows]
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
    pa.field("iou", pa.float32()), pa.field("match", pa.int32())])
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
