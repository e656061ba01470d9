"""COCO JSON: a data set (`images`, `annotations` with `bbox` = x, y, width, height, `categories`
whose ids need not be contiguous) read into `LabelRecord`s; data sets and detection results
written from corner boxes. An `iscrowd` 1 annotation is a crowd box both ways: read with its
box (from its segmentation where it has no bbox) as `ann_crowd` true, written from it as `iscrowd` 1.

`Dataset` is the one writer of COCO data sets (a slice export's `instances_<split>.json` through
`CocoWriter`, an evaluation report's ground truth) and `detections` the one writer of COCO
results (a report's predictions, for `COCO.loadRes`): both turn [x1, y1, x2, y2] into COCO's
[x, y, width, height] with `xywh`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from avperception_assets.formats.records import (
    BadObject, LabelFileError, LabelRecord, split_from_path, stem,
)
from avperception_assets.storage.quarantine import Rejection

LAYOUT = "coco"
KEYS = {"images", "annotations", "categories"}  # the keys that make a JSON object a COCO data set


# --- reading --------------------------------------------------------------------------------

def read_dataset(payload: dict, rel: str, classes: dict) -> tuple[list[LabelRecord], list[Rejection]]:
    """One record per image of the data set read from `rel`, annotated or not; annotations naming
    no listed image are rejected."""
    split = split_from_path(rel)
    try:
        categories = {category["id"]: str(category["name"]) for category in payload["categories"]}
        images = {image["id"]: LabelRecord(stem(str(image["file_name"])), rel, LAYOUT, split, {}, None, [], classes)
                  for image in payload["images"]}
    except (TypeError, KeyError) as exc:
        raise LabelFileError(f"COCO images need an id and a file_name, categories an id and a name: {exc!r}") from exc
    if not isinstance(payload["annotations"], list):
        raise LabelFileError("COCO 'annotations' is not a list")
    rejections = []
    for index, annotation in enumerate(payload["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        record = images.get(image_id) if isinstance(image_id, (int, str)) else None
        if record is None:
            rejections.append(Rejection(f"{rel}#annotations/{index}", "unknown_image_id",
                                        f"the annotation names image id {image_id!r}, which 'images' does not list"))
        else:
            record.objects.append(_object(annotation, categories))
    return list(images.values()), rejections


def _object(annotation: dict, categories: dict):
    category_id = annotation.get("category_id")
    name = categories.get(category_id) if isinstance(category_id, (int, str)) else None
    if name is None:
        return BadObject("unknown_category", f"category id {category_id!r} is not among the file's categories")
    try:
        box = _box(annotation)
    except ValueError as exc:
        return BadObject("malformed_box", f"annotation {annotation.get('id')!r}: {exc}")
    # `iscrowd` 1: one region over many instances, kept as a crowd box (an ignore region).
    return {"category": name, "box2d": box, "attributes": {"crowd": bool(annotation.get("iscrowd"))}}


def _box(annotation: dict) -> dict:
    """The annotation's box, from its segmentation when it has no bbox; ValueError when neither serves."""
    bbox = annotation.get("bbox")
    if bbox:
        try:
            x, y, w, h = (float(value) for value in bbox)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bbox {bbox!r} is not [x, y, width, height]") from exc
        return {"x1": x, "y1": y, "x2": x + w, "y2": y + h}
    segmentation = annotation.get("segmentation")
    if not segmentation:
        raise ValueError("neither a bbox nor a segmentation")
    try:
        return _segmentation_box(segmentation)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"segmentation {str(segmentation)[:80]} is neither polygons nor RLE ({exc})") from exc


def _segmentation_box(segmentation) -> dict:
    if isinstance(segmentation, list):
        # Polygons [[x1, y1, x2, y2, …], …]: their extent, as COCO's own boxes are (rasterising
        # would round to whole pixels).
        xs = [float(v) for polygon in segmentation for v in polygon[0::2]]
        ys = [float(v) for polygon in segmentation for v in polygon[1::2]]
        return {"x1": min(xs), "y1": min(ys), "x2": max(xs), "y2": max(ys)}
    height, width = segmentation["size"]  # RLE: counts uncompressed (a list) or compressed (a string)
    rle = mask_utils.frPyObjects(segmentation, height, width) if isinstance(segmentation["counts"], list) \
        else segmentation
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return {"x1": x, "y1": y, "x2": x + w, "y2": y + h}


# --- writing --------------------------------------------------------------------------------

def xywh(boxes) -> list[list[float]]:
    """Corner boxes (rows of x1, y1, x2, y2: lists or an array) as COCO bboxes [x, y, width, height].

    Width and height are differences in the boxes' own precision: float32 boxes give float32
    widths, as torchvision's `box_convert` makes them; Python floats give float64 ones.
    """
    corners = np.array(boxes).reshape(-1, 4)  # a copy, changed in place below
    corners[:, 2:] -= corners[:, :2]
    return corners.tolist()


class Dataset:
    """One COCO data set, image by image: image ids count from `first_image_id`, annotation ids
    come from `annotation_ids` (several data sets of one export share them), from 1 by default."""

    def __init__(self, info: dict, categories: Mapping[int, str], first_image_id: int = 1,
                 annotation_ids: Iterator[int] | None = None):
        self.info, self.categories, self.first_image_id = info, categories, first_image_id
        self.annotation_ids = itertools.count(1) if annotation_ids is None else annotation_ids
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add_image(self, file_name: str, width: int, height: int, category_ids: Sequence[int], boxes,
                  crowd: Sequence[bool] | None = None, **extra) -> int:
        """Add an image (its `extra` keys kept in its entry) and its corner boxes, crowd regions
        where `crowd` flags them; returns its id."""
        image_id = self.first_image_id + len(self.images)
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, **extra})
        crowd = [False] * len(category_ids) if crowd is None else crowd
        for category_id, bbox, is_crowd in zip(category_ids, xywh(boxes), crowd):
            self.annotations.append({"id": next(self.annotation_ids), "image_id": image_id,
                                     "category_id": int(category_id), "bbox": bbox, "area": bbox[2] * bbox[3],
                                     "iscrowd": int(is_crowd)})
        return image_id

    def as_json(self) -> dict:
        categories = [{"id": category_id, "name": name} for category_id, name in self.categories.items()]
        return {"info": self.info, "categories": categories, "images": self.images, "annotations": self.annotations}

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.as_json()))


def detections(image_id: int, category_ids: Sequence[int], boxes, scores: Sequence[float]) -> list[dict]:
    """One image's detections (corner boxes) in COCO results format."""
    return [{"image_id": image_id, "category_id": int(category_id), "bbox": bbox, "score": score}
            for category_id, bbox, score in zip(category_ids, xywh(boxes), scores)]


class CocoWriter:
    """Frames (frames-table columns: `image_id`, `split`, `width`, `height`, `ann_categories`,
    `ann_bboxes` in pixels, `ann_crowd` where present) as a COCO data set under `root`: one `annotations/instances_<split>.json`
    per split, written at the end, category ids from 1 in the order of `names`, each image's
    `frame_id` its frame's image id. The images themselves (`images/<split>/`) are the caller's."""

    def __init__(self, root: Path, info: dict, names: Sequence[str]):
        self.root, self.info, self.names = root, info, list(names)
        self.categories = {index + 1: name for index, name in enumerate(self.names)}
        self.splits: dict[str, Dataset] = {}
        self.annotation_ids = itertools.count(1)  # unique over the whole export

    def add(self, frame: dict, file_name: str) -> None:
        split = self.splits.get(frame["split"])
        if split is None:
            split = Dataset(self.info, self.categories, annotation_ids=self.annotation_ids)
            self.splits[frame["split"]] = split
        category_ids = [self.names.index(category) + 1 for category in frame["ann_categories"]]
        split.add_image(file_name, frame["width"], frame["height"], category_ids, frame["ann_bboxes"],
                        frame.get("ann_crowd"), frame_id=frame["image_id"])

    def close(self) -> None:
        (self.root / "annotations").mkdir(exist_ok=True)
        for split, dataset in self.splits.items():
            dataset.write(self.root / "annotations" / f"instances_{split}.json")
