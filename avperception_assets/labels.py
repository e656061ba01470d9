"""BDD100K label files: the three public layouts read into records, objects normalised to det_20.

Layouts are detected from a file's content and name: per-image JSON (2018, `{name, frames}`),
one list per split (2018) and det_20 (2020, `det_<split>.json`). A bad object is rejected on its
own (with its reason) and the frame keeps its other boxes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import bdd100k
from .quarantine import Rejection

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SPLITS = ("train", "val")

LAYOUT_PER_IMAGE = "bdd_per_image_2018"
LAYOUT_SPLIT_LIST = "bdd_split_list_2018"
LAYOUT_DET_20 = "bdd_det_20"


class LabelFileError(ValueError):
    """A label file that cannot be read as any BDD100K layout."""


@dataclass
class LabelRecord:
    image_id: str  # file stem of the image it labels
    label_file: str  # path inside the batch
    layout: str
    split: str | None
    attributes: dict
    timestamp: int | None
    objects: list[dict]


def _split_from_path(rel: str) -> str | None:
    """Split named by a label file's path: `100k/<split>/…`, `*_labels_images_<split>.json`, `det_<split>.json`."""
    parts = Path(rel).parts
    for part in reversed(parts[:-1]):
        if part in SPLITS:
            return part
    match = re.search(r"(?:^|_)(train|val)\.json$", parts[-1])
    return match.group(1) if match else None


def split_name(name: str) -> tuple[str, str]:
    """(stem, suffix) of a file name by `pathlib`'s rules, without building a Path."""
    dot = name.rfind(".")
    return (name[:dot], name[dot:]) if 0 < dot < len(name) - 1 else (name, "")


def _image_id(name: str) -> str:
    """An image file name stands for its stem; any other name is an id already."""
    stem, suffix = split_name(Path(name).name if "/" in name else name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else name


def _record(entry: dict, rel: str, layout: str, split: str | None) -> LabelRecord:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise LabelFileError("an entry has no 'name'")
    if layout == LAYOUT_PER_IMAGE:
        frames = entry.get("frames") or [{}]
        objects, timestamp = frames[0].get("objects") or [], frames[0].get("timestamp")
    else:
        objects, timestamp = entry.get("labels") or [], entry.get("timestamp")
    if not isinstance(objects, list):
        raise LabelFileError(f"objects of {entry['name']!r} are not a list")
    return LabelRecord(
        image_id=_image_id(entry["name"]),
        label_file=rel, layout=layout, split=split,
        attributes=entry.get("attributes") or {},
        timestamp=int(timestamp) if isinstance(timestamp, (int, float)) else None,
        objects=objects,
    )


def parse_label_file(path: Path | str, rel: str) -> list[LabelRecord]:
    """Read one label file, detecting its BDD100K layout from its content and name."""
    try:
        payload = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelFileError(f"not valid JSON: {exc}") from exc
    split = _split_from_path(rel)
    if isinstance(payload, dict) and "frames" in payload:
        return [_record(payload, rel, LAYOUT_PER_IMAGE, split)]
    if isinstance(payload, list):
        layout = LAYOUT_DET_20 if Path(rel).name.startswith("det_") else LAYOUT_SPLIT_LIST
        return [_record(entry, rel, layout, split) for entry in payload]
    raise LabelFileError("neither a per-image label (object with 'frames') nor a list of labelled images")


def normalize_objects(record: LabelRecord, width: int, height: int) -> tuple[dict, list[Rejection], int]:
    """Detection boxes of a frame in det_20 names, the rejected objects, and how many boxes
    were clipped to the frame."""
    categories, bboxes, occluded, truncated = [], [], [], []
    rejections, clipped_count = [], 0

    def reject(index: int, reason: str, detail: str) -> None:
        where = f"{record.label_file}#{record.image_id}/{index}"  # position: ids may repeat
        rejections.append(Rejection(where, reason, detail))

    for index, obj in enumerate(record.objects):
        if not isinstance(obj, dict):
            reject(index, "malformed_object", f"object is {type(obj).__name__}")
            continue
        raw = str(obj.get("category", ""))
        box = obj.get("box2d")
        if box is None and raw.lower().startswith(bdd100k.NON_DETECTION_PREFIXES):
            continue  # lanes and drivable areas carry polygons, not boxes
        category = bdd100k.normalize_category(raw)
        if category is None:
            reject(index, "unknown_category", f"category {raw!r} is not a BDD100K detection class")
            continue
        try:
            x1, y1, x2, y2 = float(box["x1"]), float(box["y1"]), float(box["x2"]), float(box["y2"])
        except (TypeError, KeyError, ValueError):
            reject(index, "malformed_box", f"box2d {box!r} lacks numeric x1, y1, x2, y2")
            continue
        if not (x1 < x2 and y1 < y2):
            reject(index, "degenerate_box", f"box {[x1, y1, x2, y2]} has no area")
            continue
        clipped = [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
        if not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
            reject(index, "box_out_of_frame", f"box {[x1, y1, x2, y2]} lies outside the {width}x{height} frame")
            continue
        attributes = obj.get("attributes") or {}
        was_clipped = clipped != [x1, y1, x2, y2]  # boxes crossing the edge keep their visible part
        clipped_count += was_clipped
        categories.append(category)
        bboxes.append(clipped)
        occluded.append(bool(attributes.get("occluded", False)))
        truncated.append(bool(attributes.get("truncated", False)) or was_clipped)
    columns = {"ann_categories": categories, "ann_bboxes": bboxes, "ann_occluded": occluded, "ann_truncated": truncated}
    return columns, rejections, clipped_count
