"""Class names of YOLO, Pascal VOC and COCO labels → det_20 classes: the built-in table and a
batch's own `_classes.json`.

The built-in table knows the det_20 names, BDD100K's legacy names, Pascal VOC's 20 classes and
COCO's 80. A name maps to its det_20 class, or to None: a class the platform does not detect,
whose objects are ignored (counted, never quarantined). A batch extends or overrides the table
with `_classes.json` at its root, `{"their name": "det_20 name" or null}`. Names match
case-insensitively; a name in neither table is an `unknown_category`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from avperception_assets.formats.taxonomy import CLASSES, NAME_MAPPING

CLASS_MAP_FILE = "_classes.json"

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# VOC and COCO classes are ignored unless they are a det_20 class under its own name, a BDD name
# (person → pedestrian) or one of the two below.
BUILTIN: Mapping[str, str | None] = {
    **dict.fromkeys(VOC_CLASSES + COCO_CLASSES),
    **{name: name for name in CLASSES},
    **NAME_MAPPING,
    "motorbike": "motorcycle",  # VOC
    "stop sign": "traffic sign",  # COCO's only sign class
}


class ClassMapError(ValueError):
    """A `_classes.json` that cannot be used: the batch is refused."""


def class_key(name: str) -> str:
    """How a class name is looked up: case and surrounding blanks do not matter."""
    return name.strip().lower()


def class_table(class_map: bytes | None = None) -> dict[str, str | None]:
    """The built-in table, extended and overridden by a batch's `_classes.json` content."""
    if class_map is None:
        return dict(BUILTIN)
    try:
        overrides = json.loads(class_map)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClassMapError(f"not valid JSON: {exc}") from exc
    if not isinstance(overrides, dict):
        raise ClassMapError('must be a JSON object {"their name": "det_20 name" or null to ignore}')
    bad = {name: target for name, target in overrides.items()
           if target is not None and (not isinstance(target, str) or class_key(target) not in CLASSES)}
    if bad:
        raise ClassMapError(f"{json.dumps(bad)} map to no det_20 class: use one of {', '.join(CLASSES)}, "
                            "or null to ignore the class")
    return {**BUILTIN, **{class_key(name): None if target is None else class_key(target)
                        for name, target in overrides.items()}}
