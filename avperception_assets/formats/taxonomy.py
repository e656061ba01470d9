"""BDD100K taxonomy: detection classes, the official name mapping, and COCO category ids."""

from __future__ import annotations

# The ten det_20 detection classes.
CLASSES = (
    "pedestrian",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
    "traffic light",
    "traffic sign",
)

# Official mapping of 2018 / legacy names (bdd100k toolkit det.toml), including the
# "ignored-as" classes, which are kept under the class they are evaluated as.
NAME_MAPPING = {
    "person": "pedestrian",
    "bike": "bicycle",
    "motor": "motorcycle",
    "caravan": "car",
    "van": "car",
    "other person": "pedestrian",
    "other vehicle": "car",
    "trailer": "truck",
}

# The classes BDD100K's MOT labels track (box_track's eight; `tracking.metrics.CLASSES`, which a
# test holds to this): traffic lights and signs have no tracks.
TRACK_CLASSES = tuple(c for c in CLASSES if c not in ("traffic light", "traffic sign"))

# The "ignored-as" classes: BDD100K's evaluations treat their boxes as ignore regions, like crowd
# boxes (the box_track toolkit, `tracking.metrics`, and MOT ingest, `formats.mot`).
IGNORED_AS = frozenset({"other person", "other vehicle", "trailer"})

# Pedestrians under any BDD name count as persons.
PERSON_CLASSES = frozenset({"pedestrian"})

# COCO category ids, so a COCO-pretrained detection head stays valid. Traffic sign has no
# COCO class; it maps to COCO's "stop sign" (13), the only sign class COCO has.
COCO_IDS = {
    "pedestrian": 1,
    "rider": 1,
    "bicycle": 2,
    "car": 3,
    "motorcycle": 4,
    "bus": 6,
    "train": 7,
    "truck": 8,
    "traffic light": 10,
    "traffic sign": 13,
}
COCO_NAMES = {1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 6: "bus", 7: "train",
              8: "truck", 10: "traffic light", 13: "stop sign"}
NUM_COCO_CLASSES = 91  # torchvision's COCO heads have 91 outputs (ids 0..90)

# Objects without box2d (lane/*, area/*) are not detection labels.
NON_DETECTION_PREFIXES = ("lane", "area", "drivable area")


def normalize_category(name: str) -> str | None:
    """Return the det_20 class for a BDD category name, or None when it is not one."""
    name = name.strip().lower()
    name = NAME_MAPPING.get(name, name)
    return name if name in CLASSES else None
