"""What every format's reader returns: a `LabelRecord` per labelled image, and its objects
normalised to det_20 detection boxes (the frames table's `ann_*` columns).

A reader keeps its format's class names and box convention in the record; `normalize_objects`
maps the names (BDD100K's official mapping, or the batch's class table for the other formats)
and checks the boxes. A bad object is rejected on its own (with its reason) and the frame keeps
its other boxes. An object whose attributes set `crowd` is an ignore region: it keeps its box
with `ann_crowd` true, and is never a training target nor an object a detector must find.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from avperception_assets.formats import taxonomy as bdd100k
from avperception_assets.formats.class_names import class_key
from avperception_assets.storage.quarantine import Rejection

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SPLITS = ("train", "val")


class LabelFileError(ValueError):
    """A label file that cannot be read in its layout."""


@dataclass(frozen=True)
class BadObject:
    """An object its reader could not take: quarantined at its position in the frame."""

    reason: str
    detail: str


@dataclass
class LabelRecord:
    image_id: str  # file stem of the image it labels
    label_file: str  # path inside the batch
    layout: str
    split: str | None
    attributes: dict
    timestamp: int | None
    objects: list  # BDD-shaped dicts ({category, box2d, attributes}) or BadObject
    # Class name → det_20 class or None (ignored), for formats other than BDD's, whose names
    # follow the official mapping instead.
    classes: Mapping[str, str | None] | None = None
    relative_boxes: bool = False  # box2d in fractions of the frame's width and height (YOLO)
    clip_id: str | None = None  # the footage clip (video) the frame is of; None: a frame of its own
    clip_frame_index: int | None = None  # its position in the clip, where known (MOT frames)
    tracked: bool = False  # its objects carry track ids (`id`, a string), kept as `ann_track_ids`


@dataclass
class FrameBoxes:
    """A frame's detection boxes as frames-table columns, and what was left out of them."""

    columns: dict
    rejections: list[Rejection]
    clipped: int  # boxes clipped to the frame
    ignored: Counter  # objects ignored by design, by why


_SPLIT_FOLDER = re.compile(r"^(?:(train|val)(?:\d{4})?|valid)$")  # train, val2017, valid (Roboflow's val)


def split_from_path(rel: str) -> str | None:
    """Split named by a label file's path: a folder (`100k/<split>/…`, `labels/train2017/…`), or a
    JSON's name (`*_labels_images_<split>.json`, `det_<split>.json`, `instances_val2017.json`)."""
    parts = rel.split("/")
    for part in reversed(parts[:-1]):
        if match := _SPLIT_FOLDER.match(part):
            return match.group(1) or "val"
    match = re.search(r"(?:^|_)(train|val)(?:\d{4})?\.json$", parts[-1])
    return match.group(1) if match else None


def split_name(name: str) -> tuple[str, str]:
    """(stem, suffix) of a file name by `pathlib`'s rules, without building a Path."""
    dot = name.rfind(".")
    return (name[:dot], name[dot:]) if 0 < dot < len(name) - 1 else (name, "")


def stem(rel: str) -> str:
    """The stem of the file at `rel` (a path inside the batch): the image id a label file names."""
    return split_name(rel.rpartition("/")[2])[0]


def read_json(path: Path | str):
    try:
        return json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelFileError(f"not valid JSON: {exc}") from exc


def _category(record: LabelRecord, raw: str) -> tuple[str | None, bool]:
    """(det_20 class or None, whether the name is known): a known name without a class is ignored."""
    if record.classes is None:
        category = bdd100k.normalize_category(raw)
        return category, category is not None
    key = class_key(raw)
    return record.classes.get(key), key in record.classes


def _unknown_detail(record: LabelRecord, raw: str) -> str:
    if record.classes is None:
        return f"category {raw!r} is not a BDD100K detection class"
    return f"class {raw!r} is in neither the built-in class table nor the batch's _classes.json"


def normalize_objects(record: LabelRecord, width: int, height: int) -> FrameBoxes:
    """Detection boxes of a frame in det_20 names, the rejected objects, how many boxes were
    clipped to the frame and which objects were ignored."""
    categories, bboxes, occluded, truncated, crowd, track_ids = [], [], [], [], [], []
    rejections, clipped_count, ignored = [], 0, Counter()
    scale_x, scale_y = (float(width), float(height)) if record.relative_boxes else (1.0, 1.0)

    def reject(index: int, reason: str, detail: str) -> None:
        where = f"{record.label_file}#{record.image_id}/{index}"  # position: ids may repeat
        rejections.append(Rejection(where, reason, detail))

    for index, obj in enumerate(record.objects):
        if isinstance(obj, BadObject):
            reject(index, obj.reason, obj.detail)
            continue
        if not isinstance(obj, dict):
            reject(index, "malformed_object", f"object is {type(obj).__name__}")
            continue
        raw = str(obj.get("category", ""))
        box = obj.get("box2d")
        if box is None and raw.lower().startswith(bdd100k.NON_DETECTION_PREFIXES):
            continue  # lanes and drivable areas carry polygons, not boxes
        category, known = _category(record, raw)
        if known and category is None:
            ignored[f"class {class_key(raw)}"] += 1
            continue
        if category is None:
            reject(index, "unknown_category", _unknown_detail(record, raw))
            continue
        try:
            x1, y1 = float(box["x1"]) * scale_x, float(box["y1"]) * scale_y
            x2, y2 = float(box["x2"]) * scale_x, float(box["y2"]) * scale_y
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
        crowd.append(bool(attributes.get("crowd", False)))
        if record.tracked:
            track_ids.append(str(obj["id"]))
    columns = {"ann_categories": categories, "ann_bboxes": bboxes, "ann_occluded": occluded, "ann_truncated": truncated,
               "ann_crowd": crowd, "ann_track_ids": track_ids if record.tracked else None}
    return FrameBoxes(columns, rejections, clipped_count, ignored)
