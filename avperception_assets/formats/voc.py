"""Pascal VOC labels: one XML per image (`annotation/object/name`, `bndbox/xmin,ymin,xmax,ymax`
in 1-based pixels, `occluded`, `truncated`, `difficult`), splits listed in
`ImageSets/Main/{train,val}.txt`.

A `difficult` object is read as an ignore region (`ann_crowd` true), VOC's nearest notion of a
crowd box: VOC's own evaluation neither requires nor penalises a detection of one, and
mmdetection's VOC reader puts such boxes among its ignored ones. It is kept, never a training
target, and never counted as a miss.

There is no VOC writer: exports write COCO or YOLO.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

from avperception_assets.formats.records import BadObject, LabelFileError, LabelRecord, split_from_path, stem

LAYOUT = "pascal_voc"
_SPLIT_LISTS = {"train.txt": "train", "val.txt": "val"}  # in ImageSets/Main
_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def parse(path: str) -> ElementTree.Element:
    """The root element of an XML file; LabelFileError when it is not well-formed."""
    try:
        return ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise LabelFileError(f"not well-formed XML: {exc}") from exc


def is_annotation(root: ElementTree.Element) -> bool:
    return root.tag == "annotation"


def is_image_set(rel: str) -> bool:
    """Whether a text file is a list of image ids under `ImageSets/`: part of the layout (only
    Main/{train,val}.txt tell anything the table stores, the split)."""
    return "ImageSets" in rel.split("/")[:-1]


def read_splits(image_sets: list[tuple[str, str]]) -> dict[str, str]:
    """Image id → split from `ImageSets/Main/train.txt` and `val.txt` among `image_sets` ((path
    inside the batch, path) of each image-set file)."""
    splits = {}
    for rel, path in image_sets:
        parts = rel.split("/")
        if parts[-2] == "Main" and parts[-1] in _SPLIT_LISTS:
            for line in Path(path).read_text(errors="replace").splitlines():
                if line.strip():
                    splits[line.split()[0]] = _SPLIT_LISTS[parts[-1]]
    return splits


def read_annotation(rel: str, root: ElementTree.Element, splits: dict[str, str], classes: dict) -> LabelRecord:
    """The record of one annotation XML (`root`, read from `rel`), its split from `splits` or its path."""
    # Paired by the XML's own stem, as the VOC devkit and torchvision pair them: `<filename>` is
    # often stale (renamed files, a labelling tool's absolute path).
    image_id = stem(rel)
    objects = [_object(element) for element in root.findall("object")]
    return LabelRecord(image_id, rel, LAYOUT, splits.get(image_id) or split_from_path(rel), {}, None, objects, classes)


def _object(element: ElementTree.Element):
    name = (element.findtext("name") or "").strip()
    box = element.find("bndbox")
    if box is None:
        return BadObject("malformed_box", f"object {name!r} has no <bndbox>")
    try:
        xmin, ymin, xmax, ymax = (float(box.findtext(corner)) for corner in _CORNERS)
    except (TypeError, ValueError):
        return BadObject("malformed_box", f"the <bndbox> of {name!r} lacks numeric xmin, ymin, xmax, ymax")
    # 1-based pixel indices, both ends inclusive → 0-based continuous corners.
    return {"category": name, "box2d": {"x1": xmin - 1, "y1": ymin - 1, "x2": xmax, "y2": ymax},
            "attributes": {"occluded": _flag(element, "occluded"), "truncated": _flag(element, "truncated"),
                           "crowd": _flag(element, "difficult")}}


def _flag(element: ElementTree.Element, tag: str) -> bool:
    return (element.findtext(tag) or "").strip().lower() in ("1", "true")
