"""YOLO (Ultralytics) labels: one `.txt` per image, a line `class cx cy w h` normalised to [0, 1],
class names in `data.yaml` (`names`: a list or index → name) or `classes.txt` (one a line).

`read_labels` reads one label file into a `LabelRecord` whose boxes are fractions of the frame
(`relative_boxes`); `YoloWriter` writes frames as a data set (`labels/<split>/<stem>.txt` and
`data.yaml`), which `read_labels` reads back.

YOLO has no notion of a crowd box (an ignore region): the writer leaves crowd boxes out, so a
tool training on the export sees their pixels as background. Export COCO (`iscrowd` 1) to keep them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from avperception_assets.formats.records import BadObject, LabelFileError, LabelRecord, split_from_path, stem

LAYOUT = "yolo"
CLASS_FILES = ("data.yaml", "data.yml", "classes.txt")


def read_names(rel: str, path: str) -> dict[int, str]:
    """The names of `classes.txt` (one a line) or of `data.yaml`'s `names` (a list or index → name);
    ValueError when the file names no class."""
    text = Path(path).read_text()
    if rel.lower().endswith(".txt"):
        names = dict(enumerate(line.strip() for line in text.splitlines() if line.strip()))
    else:
        names = _yaml_names(text)
    if not names:
        raise ValueError("the file names no class")
    return names


def _yaml_names(text: str) -> dict[int, str]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from exc
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list):
        return {index: str(name) for index, name in enumerate(names)}
    try:
        return {int(index): str(name) for index, name in names.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError("'names' must be a list of class names or a mapping of class index to name") from exc


def background(image_id: str, rel: str) -> LabelRecord:
    """The record of an image without a label file: no objects, as Ultralytics reads it."""
    return LabelRecord(image_id, rel, LAYOUT, split_from_path(rel), {}, None, [])


def read_labels(rel: str, path: str, names: dict[int, str], source: str, classes: dict) -> LabelRecord:
    """The label file at `rel` with class indices into `names` (read from the class file `source`)."""
    try:
        lines = Path(path).read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"not a text file: {exc}") from exc
    objects = [_object(number, line, names, source) for number, line in enumerate(lines, 1) if line.strip()]
    return LabelRecord(stem(rel), rel, LAYOUT, split_from_path(rel), {}, None, objects, classes, relative_boxes=True)


def _object(number: int, line: str, names: dict[int, str], source: str):
    try:
        index, cx, cy, w, h = _values(line)
    except ValueError:
        return BadObject("malformed_object", f"line {number}: {line.strip()!r} is not 'class cx cy w h'")
    if index not in names:
        return BadObject("unknown_category", f"line {number}: class index {index} is not among the "
                                             f"{len(names)} names of {source}")
    if not all(0.0 <= value <= 1.0 for value in (cx, cy, w, h)):
        return BadObject("box_not_normalized", f"line {number}: cx, cy, w, h {[cx, cy, w, h]} must lie in [0, 1]")
    box = {"x1": cx - w / 2, "y1": cy - h / 2, "x2": cx + w / 2, "y2": cy + h / 2}  # fractions of the frame
    return {"category": names[index], "box2d": box, "attributes": {}}


def _values(line: str) -> tuple[int, float, float, float, float]:
    tokens = line.split()
    if len(tokens) != 5:
        raise ValueError(line)
    index = float(tokens[0])  # some writers put "0.0"
    if not index.is_integer():
        raise ValueError(line)
    cx, cy, w, h = map(float, tokens[1:])
    return int(index), cx, cy, w, h


class YoloWriter:
    """Frames (frames-table columns: `split`, `width`, `height`, `ann_categories`, `ann_bboxes` in
    pixels, `ann_crowd` where present) as YOLO labels under `root`: one label file per image as it
    comes, crowd boxes left out, `data.yaml` at the end, naming the splits' image folders
    (`images/<split>`, written by the caller) and `info`."""

    def __init__(self, root: Path, info: dict, names: Sequence[str]):
        self.root, self.info, self.names = root, info, list(names)
        self.splits: set[str] = set()

    def add(self, frame: dict, file_name: str) -> None:
        self.splits.add(frame["split"])
        width, height = frame["width"], frame["height"]
        crowd = frame.get("ann_crowd") or [False] * len(frame["ann_categories"])
        lines = [
            f"{self.names.index(category)} {(x1 + x2) / 2 / width:.7f} {(y1 + y2) / 2 / height:.7f} "
            f"{(x2 - x1) / width:.7f} {(y2 - y1) / height:.7f}"
            for category, (x1, y1, x2, y2), is_crowd in zip(frame["ann_categories"], frame["ann_bboxes"], crowd)
            if not is_crowd
        ]
        target = self.root / "labels" / frame["split"] / f"{Path(file_name).stem}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(line + "\n" for line in lines))

    def close(self) -> None:
        # JSON is YAML: data.yaml needs no YAML writer, and Ultralytics ignores the keys it does not know.
        data = {"path": ".", **{split: f"images/{split}" for split in sorted(self.splits)},
                "nc": len(self.names), "names": self.names, "export": self.info}
        (self.root / "data.yaml").write_text(json.dumps(data, indent=2) + "\n")
