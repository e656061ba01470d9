"""BDD100K MOT 2020 (`box_track_20`) label files: ground truth and tracker output alike.

A file is a list of frames (`name`, `videoName`, `frameIndex`, `labels`), or a Scalabel dataset
object with such a list under `frames`; a folder holds one such file per video (`*.json`, not
recursive). Each label has `id`, `category`, `box2d` {x1, y1, x2, y2} and optionally `attributes`
({occluded, truncated, crowd}) and `score` (tracker output). Track ids are strings unique only
within a video, so a track is keyed by (video, id): `Video` keeps each video's frames apart.
Anything malformed raises `MotFileError` naming the file and the frame. The fields of frames and
labels are read by `formats.mot`, as ingest reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

from avperception_assets.formats.mot import MotFileError, frame_fields, frame_list, track_id


@dataclass(frozen=True)
class Box:
    track_id: str
    category: str
    x1: float
    y1: float
    x2: float
    y2: float
    crowd: bool = False
    score: float | None = None


@dataclass(frozen=True)
class Frame:
    name: str
    index: int
    boxes: tuple[Box, ...]
    source: str  # the file it came from, for error messages


# A video's frames by frame index.
Video = dict[int, Frame]


def _number(value, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise MotFileError(f"{where}: {what} is not a number: {value!r}")
    return float(value)


def _box(label, where: str) -> Box:
    tid, category = track_id(label, where), label.get("category")
    if not isinstance(category, str):
        raise MotFileError(f"{where}: label {tid!r} has no 'category'")
    where = f"{where}, label {tid!r}"
    box2d = label.get("box2d")
    if not isinstance(box2d, dict):
        raise MotFileError(f"{where}: no 'box2d'")
    x1, y1, x2, y2 = (_number(box2d.get(k), k, where) for k in ("x1", "y1", "x2", "y2"))
    if x2 < x1 or y2 < y1:
        raise MotFileError(f"{where}: box2d has x2 < x1 or y2 < y1")
    attributes = label.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise MotFileError(f"{where}: 'attributes' is not an object")
    score = label.get("score")
    return Box(tid, category, x1, y1, x2, y2, crowd=bool(attributes.get("crowd", False)),
               score=None if score is None else _number(score, "score", where))


def _frame(entry, source: str) -> tuple[str, Frame]:
    name, video, index, labels = frame_fields(entry, source)
    where = f"{source}: frame {name!r}"
    boxes = tuple(_box(label, where) for label in labels)
    ids = [box.track_id for box in boxes]
    if len(set(ids)) != len(ids):
        raise MotFileError(f"{where}: a track id appears twice in the frame")
    return video, Frame(name, index, boxes, source)


def _frames_of(path: Path) -> list:
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MotFileError(f"{path}: not readable as JSON: {error}") from error
    frames = frame_list(payload)
    if frames is None:
        raise MotFileError(f"{path}: neither a list of frames nor an object with 'frames'")
    return frames


def read_videos(path: str | Path) -> dict[str, Video]:
    """The videos of a MOT label file or folder of files, by video name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise MotFileError(f"{path}: no .json files in the folder")
    elif path.is_file():
        files = [path]
    else:
        raise MotFileError(f"{path}: no such file or folder")
    videos: dict[str, Video] = {}
    for file in files:
        for entry in _frames_of(file):
            video, frame = _frame(entry, str(file))
            frames = videos.setdefault(video, {})
            if frame.index in frames:
                raise MotFileError(f"{file}: frame {frame.name!r}: frameIndex {frame.index} of video "
                                   f"{video!r} also in frame {frames[frame.index].name!r}")
            frames[frame.index] = frame
    return videos
