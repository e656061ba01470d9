"""BDD100K MOT 2020 (`box_track_20`) label files: the fields both readers take from them (ingest,
through `read_labels`, and the tracking evaluator, `tracking.labels`), read in one place.

A file is a list of frames (`name`, `videoName`, `frameIndex`, `labels`), or a Scalabel dataset
object with such a list under `frames`. Each label has `id` (a string unique only within its video),
`category`, `box2d` and `attributes` (`occluded`, `truncated`, `crowd`).

At ingest a video is a clip (`clip_id` = `videoName`, `clip_frame_index` = `frameIndex`) and each
frame a `LabelRecord` whose objects keep their track ids. Crowd boxes, and the boxes of the
ignored-as classes (`other person`, `other vehicle`, `trailer`), are ignore regions: kept with
`crowd` set, never objects. A frame entry that cannot be read is rejected alone
(`malformed_frame`); a label without a usable id, or with an id its frame already gave another
label, is a bad object (`malformed_object`, `repeated_track_id`); the rest of the file is kept.
"""

from __future__ import annotations

from avperception_assets.formats import bdd
from avperception_assets.formats.records import BadObject, LabelFileError, LabelRecord, split_from_path
from avperception_assets.formats.taxonomy import IGNORED_AS
from avperception_assets.storage.quarantine import Rejection

LAYOUT_BOX_TRACK_20 = "bdd_box_track_20"


class MotFileError(LabelFileError):
    """A MOT label file, frame or label that cannot be read as box_track_20."""


def frame_list(payload) -> list | None:
    """The frames of a parsed box_track_20 file (a list, or a dataset object's `frames`); None
    when the payload is neither."""
    if isinstance(payload, dict) and "name" not in payload:  # a 2018 per-image label has `name` and `frames`
        payload = payload.get("frames")
    return payload if isinstance(payload, list) else None


def is_box_track(payload) -> bool:
    """Whether a parsed JSON file holds box_track_20 frames: entries naming their video and index
    (the detection layouts' entries have neither)."""
    frames = frame_list(payload)
    return bool(frames) and any(isinstance(f, dict) and "videoName" in f and "frameIndex" in f for f in frames)


def frame_fields(entry, source: str) -> tuple[str, str, int, list]:
    """(name, videoName, frameIndex, labels) of one frame entry."""
    if not isinstance(entry, dict):
        raise MotFileError(f"{source}: a frame is not an object")
    name, video, index = entry.get("name"), entry.get("videoName"), entry.get("frameIndex")
    where = f"{source}: frame {name!r}"
    if not isinstance(name, str):
        raise MotFileError(f"{source}: a frame has no 'name'")
    if not isinstance(video, str) or not video:
        raise MotFileError(f"{where}: no 'videoName'")
    if isinstance(index, bool) or not isinstance(index, int):
        raise MotFileError(f"{where}: 'frameIndex' is not an integer")
    labels = entry.get("labels") or []
    if not isinstance(labels, list):
        raise MotFileError(f"{where}: 'labels' is not a list")
    return name, video, index, labels


def track_id(label, where: str) -> str:
    """A label's track id as a string: integer ids (a tracker's) name the same track as their digits."""
    if not isinstance(label, dict):
        raise MotFileError(f"{where}: a label is not an object")
    value = label.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise MotFileError(f"{where}: a label has no string 'id'")
    return value


def is_ignore_region(category: str, attributes: dict) -> bool:
    """A crowd box, or a box of an ignored-as class: a region that is no object to find."""
    return bool(attributes.get("crowd", False)) or category.strip().lower() in IGNORED_AS


def _object(label, where: str, seen: set[str]):
    """A label as the BDD-shaped object `records.normalize_objects` reads, its id a string and
    `crowd` set on ignore regions; a `BadObject` when its id is unusable or repeated."""
    try:
        tid = track_id(label, where)
    except MotFileError as exc:
        return BadObject("malformed_object", str(exc))
    if tid in seen:
        return BadObject("repeated_track_id", f"{where}: track id {tid!r} is already on another label of the frame")
    seen.add(tid)
    attributes = label.get("attributes") or {}
    if not isinstance(attributes, dict):
        return BadObject("malformed_object", f"{where}, label {tid!r}: 'attributes' is not an object")
    crowd = is_ignore_region(str(label.get("category", "")), attributes)
    return {**label, "id": tid, "attributes": {**attributes, "crowd": crowd}}


def read_labels(payload, rel: str) -> tuple[list[LabelRecord], list[Rejection]]:
    """The frame records of one box_track_20 file and its frame entries that cannot be read; the
    split is the one its folder names (`labels/box_track_20/<split>/<video>.json`), if any."""
    frames = frame_list(payload)
    if frames is None:
        raise MotFileError(f"{rel}: neither a list of frames nor an object with 'frames'")
    split, records, rejections = split_from_path(rel), [], []
    for position, entry in enumerate(frames):
        try:
            name, video, index, labels = frame_fields(entry, rel)
        except MotFileError as exc:
            rejections.append(Rejection(f"{rel}#{position}", "malformed_frame", str(exc)))
            continue
        attributes = entry.get("attributes")
        seen: set[str] = set()
        records.append(LabelRecord(
            image_id=bdd.image_id(name), label_file=rel, layout=LAYOUT_BOX_TRACK_20, split=split,
            attributes=attributes if isinstance(attributes, dict) else {},
            timestamp=None, objects=[_object(label, f"frame {name!r}", seen) for label in labels],
            clip_id=video, clip_frame_index=index, tracked=True,
        ))
    return records, rejections
