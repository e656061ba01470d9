"""BDD100K label files: the three public layouts read into `LabelRecord`s.

Layouts are detected from a file's content and name: per-image JSON (2018, `{name, frames}`),
one list per split (2018) and det_20 (2020, `det_<split>.json`); the MOT layout, box_track_20,
is `mot`'s. Their category names follow the official mapping (`taxonomy`), which
`records.normalize_objects` applies. Each of these images is the frame at the 10th second of the
video named by its stem: that video is its clip (`clip_id`), at no known position in it.
"""

from __future__ import annotations

from pathlib import Path

from avperception_assets.formats.records import IMAGE_SUFFIXES, LabelFileError, LabelRecord, split_from_path, split_name

LAYOUT_PER_IMAGE = "bdd_per_image_2018"
LAYOUT_SPLIT_LIST = "bdd_split_list_2018"
LAYOUT_DET_20 = "bdd_det_20"


def is_per_image(payload) -> bool:
    """Whether a JSON object is a 2018 per-image label (the only BDD100K layout that is an object)."""
    return isinstance(payload, dict) and "frames" in payload


def image_id(name: str) -> str:
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
    frame_id = image_id(entry["name"])
    return LabelRecord(
        image_id=frame_id,
        label_file=rel, layout=layout, split=split,
        attributes=entry.get("attributes") or {},
        timestamp=int(timestamp) if isinstance(timestamp, (int, float)) else None,
        objects=objects,
        clip_id=frame_id,  # a 100k image is a frame of the video named by its stem
    )


def read_labels(payload, rel: str) -> list[LabelRecord]:
    """The records of one JSON label file, its BDD100K layout detected from its content and name."""
    split = split_from_path(rel)
    if is_per_image(payload):
        return [_record(payload, rel, LAYOUT_PER_IMAGE, split)]
    if isinstance(payload, list):
        layout = LAYOUT_DET_20 if Path(rel).name.startswith("det_") else LAYOUT_SPLIT_LIST
        return [_record(entry, rel, layout, split) for entry in payload]
    raise LabelFileError("neither a per-image label (object with 'frames') nor a list of labelled images")
