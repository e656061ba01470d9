"""COCO JSON: a data set (`images`, `annotations` with `bbox` = x, y, width, height, `categories`
whose ids need not be contiguous) read into `LabelRecord`s."""

from __future__ import annotations

from pycocotools import mask as mask_utils

from avperception_assets.formats.records import (
    BadObject, IgnoredObject, LabelFileError, LabelRecord, split_from_path, stem,
)
from avperception_assets.storage.quarantine import Rejection

LAYOUT = "coco"
KEYS = {"images", "annotations", "categories"}  # the keys that make a JSON object a COCO data set


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
    if annotation.get("iscrowd"):
        return IgnoredObject("crowd region")  # one region over many instances: not an instance box
    category_id = annotation.get("category_id")
    name = categories.get(category_id) if isinstance(category_id, (int, str)) else None
    if name is None:
        return BadObject("unknown_category", f"category id {category_id!r} is not among the file's categories")
    try:
        box = _box(annotation)
    except ValueError as exc:
        return BadObject("malformed_box", f"annotation {annotation.get('id')!r}: {exc}")
    return {"category": name, "box2d": box, "attributes": {}}


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
