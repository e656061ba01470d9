"""The label layout of a batch, and YOLO, Pascal VOC and COCO label files read into `LabelRecord`s.

A batch's layout family is decided once, from the files that define one: BDD100K JSON label
files, a YOLO class file (`data.yaml`, `data.yml` or `classes.txt`, anywhere in the batch),
Pascal VOC XML (root element `<annotation>`) or a COCO JSON (an object with `images`,
`annotations` and `categories`). A file that defines no layout is a stray (`unsupported_file`:
a `notes.txt` beside BDD labels, an XML that is no annotation), except a JSON that fails to
parse, which is `unparseable_labels` in any batch, as before.

A batch is refused whole (one quarantine record, nothing ingested) when its files define two
families, or when its class names cannot be read (a broken `data.yaml`, YOLO class files that
disagree, a bad `_classes.json`): a frame cannot be ingested again once it is in the table, so
none lands with its boxes guessed.

Records of these formats carry no scene attributes and no timestamp (NULL in the table) and keep
their format's class names: `labels.normalize_objects` maps them through the batch's class table
(`class_names`) and checks their boxes, as it does for BDD input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import yaml
from pycocotools import mask as mask_utils

from avperception_assets.formats.class_names import CLASS_MAP_FILE, ClassMapError, class_table
from avperception_assets.formats.bdd import BadObject, IgnoredObject, LabelFileError, LabelRecord, bdd_records, read_json, split_from_path, split_name
from avperception_assets.storage.quarantine import Rejection

# Layout families, as messages name them, and the `label_format` of their frames.
BDD, YOLO, VOC, COCO = "BDD100K JSON", "YOLO", "Pascal VOC", "COCO JSON"
LAYOUT_YOLO, LAYOUT_VOC, LAYOUT_COCO = "yolo", "pascal_voc", "coco"
YOLO_CLASS_FILES = ("data.yaml", "data.yml", "classes.txt")
BATCH_ROOT = "."  # the `file` of a quarantine record about the whole batch

# What a file is once read; the first four define a family.
_BDD_JSON, _COCO_JSON, _VOC_XML, _YOLO_CLASSES = "bdd_json", "coco_json", "voc_xml", "yolo_classes"
_TEXT, _CLASS_MAP, _BAD_JSON, _BAD_XML, _OTHER = "text", "class_map", "bad_json", "bad_xml", "other"
_DEFINES = {_BDD_JSON: BDD, _YOLO_CLASSES: YOLO, _VOC_XML: VOC, _COCO_JSON: COCO}
_COCO_KEYS = {"images", "annotations", "categories"}
_VOC_SPLIT_LISTS = {"train.txt": "train", "val.txt": "val"}  # in ImageSets/Main
_VOC_CORNERS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class _File:
    rel: str  # path inside the batch
    path: str
    kind: str
    content: object = None  # BDD records, a COCO payload or a VOC root element
    problem: str = ""  # why it is no label file of the batch, should it be a stray


@dataclass
class BatchLabels:
    """The label records of a batch and the files rejected on the way, or the batch's refusal."""

    family: str
    records: list[LabelRecord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    refusal: Rejection | None = None  # the whole batch is refused: nothing of it is ingested

    def unlabelled(self, image_id: str, rel: str) -> LabelRecord | None:
        """The record of an image no label file names: a background image (no objects) in a YOLO
        batch, as Ultralytics reads it; None elsewhere (the image is `image_without_labels`)."""
        if self.family != YOLO:
            return None
        return LabelRecord(image_id, rel, LAYOUT_YOLO, split_from_path(rel), {}, None, [])


class _Refused(Exception):
    def __init__(self, rejection: Rejection):
        super().__init__(rejection.detail)
        self.rejection = rejection


def _refusal(rel: str, reason: str, detail: str) -> Rejection:
    return Rejection(rel, reason, f"{detail}; the batch was refused: nothing of it was ingested")


def read_batch(files: list[tuple[str, str]]) -> BatchLabels:
    """The labels in a batch's files other than images ((path inside the batch, path), in path
    order), read in the one layout family they define."""
    classified = [_classify(rel, path) for rel, path in files]
    examples: dict[str, str] = {}  # family → its first defining file
    for file in classified:
        if file.kind in _DEFINES:
            examples.setdefault(_DEFINES[file.kind], file.rel)
    if len(examples) > 1:
        layouts = " and ".join(f"{family} (e.g. {rel})" for family, rel in examples.items())
        return BatchLabels(next(iter(examples)), refusal=_refusal(
            BATCH_ROOT, "ambiguous_layout", f"files of more than one label layout: {layouts}. Land each layout "
            "as a batch of its own"))
    family = next(iter(examples), BDD)
    try:
        return _READERS[family](classified)
    except _Refused as refused:
        return BatchLabels(family, refusal=refused.rejection)


def _classify(rel: str, path: str) -> _File:
    name = rel.rpartition("/")[2]
    suffix = split_name(name)[1].lower()
    if name == CLASS_MAP_FILE:
        where = "YOLO, Pascal VOC and COCO batches" if rel == name else "the batch root only"
        return _File(rel, path, _CLASS_MAP, problem=f"a class mapping is read in {where}")
    if name.lower() in YOLO_CLASS_FILES:
        return _File(rel, path, _YOLO_CLASSES)
    if suffix == ".json":
        return _json_file(rel, path)
    if suffix == ".xml":
        return _xml_file(rel, path)
    if suffix == ".txt":
        return _File(rel, path, _TEXT, problem="a text file is a label file only in a YOLO batch")
    return _File(rel, path, _OTHER, problem=f"'{suffix or name}' is neither an image nor a label file")


def _json_file(rel: str, path: str) -> _File:
    try:
        payload = read_json(path)
        if isinstance(payload, dict) and "frames" not in payload:
            missing = sorted(_COCO_KEYS - payload.keys())
            if missing:
                raise LabelFileError(f"an object that is neither a BDD100K per-image label (no 'frames') nor a "
                                     f"COCO JSON (no {', '.join(repr(key) for key in missing)})")
            return _File(rel, path, _COCO_JSON, payload)
        return _File(rel, path, _BDD_JSON, bdd_records(payload, rel))
    except LabelFileError as exc:
        return _File(rel, path, _BAD_JSON, problem=str(exc))


def _xml_file(rel: str, path: str) -> _File:
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        return _File(rel, path, _BAD_XML, problem=f"not well-formed XML: {exc}")
    if root.tag != "annotation":
        return _File(rel, path, _OTHER, problem=f"an XML whose root <{root.tag}> is no Pascal VOC <annotation>")
    return _File(rel, path, _VOC_XML, root)


def _stray(file: _File, family: str) -> Rejection:
    if file.kind == _BAD_JSON:  # a JSON file is meant as labels, whatever the batch's layout
        return Rejection(file.rel, "unparseable_labels", file.problem)
    return Rejection(file.rel, "unsupported_file", f"{file.problem}; this batch is read as {family}")


_TAKEN = ((), ())  # a file a reader uses without records of its own (class names, split lists)
_Read = Callable[[_File], tuple | None]  # a file's (records, rejections), None for a stray


def _collect(family: str, files: list[_File], read: _Read) -> BatchLabels:
    """Every file as `read` takes it; the ones it does not take are strays."""
    batch = BatchLabels(family)
    for file in files:
        try:
            taken = read(file)
        except LabelFileError as exc:
            batch.rejections.append(Rejection(file.rel, "unparseable_labels", str(exc)))
            continue
        if taken is None:
            batch.rejections.append(_stray(file, family))
        else:
            batch.records.extend(taken[0])
            batch.rejections.extend(taken[1])
    return batch


def _is_class_map(file: _File) -> bool:
    return file.kind == _CLASS_MAP and file.rel == CLASS_MAP_FILE


def _class_table(files: list[_File]) -> dict[str, str | None]:
    """The batch's class table: the built-in one and its `_classes.json`; a bad one refuses the batch."""
    file = next((f for f in files if _is_class_map(f)), None)
    try:
        return class_table(None if file is None else Path(file.path).read_bytes())
    except ClassMapError as exc:
        raise _Refused(_refusal(file.rel, "bad_class_mapping", str(exc))) from exc


def _stem(rel: str) -> str:
    return split_name(rel.rpartition("/")[2])[0]


def _read_bdd(files: list[_File]) -> BatchLabels:
    return _collect(BDD, files, lambda f: (f.content, []) if f.kind == _BDD_JSON else None)


# --- YOLO -----------------------------------------------------------------------------------

def _read_yolo(files: list[_File]) -> BatchLabels:
    classes = _class_table(files)
    names, source = _yolo_names(files)

    def read(file: _File):
        if file.kind == _TEXT:
            return [_yolo_record(file, names, source, classes)], []
        return _TAKEN if file.kind == _YOLO_CLASSES or _is_class_map(file) else None
    return _collect(YOLO, files, read)


def _yolo_names(files: list[_File]) -> tuple[dict[int, str], str]:
    """Class index → name, and the class file it comes from: every class file must agree."""
    found = []
    for file in files:
        if file.kind == _YOLO_CLASSES:
            try:
                found.append((file.rel, _names_in(file)))
            except ValueError as exc:
                raise _Refused(_refusal(file.rel, "unparseable_labels", f"no class names: {exc}")) from exc
    (source, names), *others = found
    for rel, other in others:
        if other != names:
            raise _Refused(_refusal(rel, "conflicting_class_names", f"its class names differ from those of {source}"))
    return names, source


def _names_in(file: _File) -> dict[int, str]:
    """The names of `classes.txt` (one a line) or of `data.yaml`'s `names` (a list or index → name)."""
    text = Path(file.path).read_text()
    if file.rel.lower().endswith(".txt"):
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


def _yolo_record(file: _File, names: dict[int, str], source: str, classes: dict) -> LabelRecord:
    try:
        lines = Path(file.path).read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"not a text file: {exc}") from exc
    objects = [_yolo_object(number, line, names, source) for number, line in enumerate(lines, 1) if line.strip()]
    return LabelRecord(_stem(file.rel), file.rel, LAYOUT_YOLO, split_from_path(file.rel), {}, None, objects,
                       classes, relative_boxes=True)


def _yolo_object(number: int, line: str, names: dict[int, str], source: str):
    try:
        index, cx, cy, w, h = _yolo_values(line)
    except ValueError:
        return BadObject("malformed_object", f"line {number}: {line.strip()!r} is not 'class cx cy w h'")
    if index not in names:
        return BadObject("unknown_category", f"line {number}: class index {index} is not among the "
                                             f"{len(names)} names of {source}")
    if not all(0.0 <= value <= 1.0 for value in (cx, cy, w, h)):
        return BadObject("box_not_normalized", f"line {number}: cx, cy, w, h {[cx, cy, w, h]} must lie in [0, 1]")
    box = {"x1": cx - w / 2, "y1": cy - h / 2, "x2": cx + w / 2, "y2": cy + h / 2}  # fractions of the frame
    return {"category": names[index], "box2d": box, "attributes": {}}


def _yolo_values(line: str) -> tuple[int, float, float, float, float]:
    tokens = line.split()
    if len(tokens) != 5:
        raise ValueError(line)
    index = float(tokens[0])  # some writers put "0.0"
    if not index.is_integer():
        raise ValueError(line)
    cx, cy, w, h = map(float, tokens[1:])
    return int(index), cx, cy, w, h


# --- Pascal VOC -----------------------------------------------------------------------------

def _read_voc(files: list[_File]) -> BatchLabels:
    classes, splits = _class_table(files), _voc_splits(files)

    def read(file: _File):
        if file.kind == _VOC_XML:
            return [_voc_record(file, splits, classes)], []
        if file.kind == _BAD_XML:
            return [], [Rejection(file.rel, "unparseable_labels", file.problem)]
        return _TAKEN if _is_class_map(file) or _is_image_set(file) else None
    return _collect(VOC, files, read)


def _is_image_set(file: _File) -> bool:
    """A list of image ids under `ImageSets/`: part of the layout (only Main/{train,val}.txt tell
    anything the table stores, the split)."""
    return file.kind == _TEXT and "ImageSets" in file.rel.split("/")[:-1]


def _voc_splits(files: list[_File]) -> dict[str, str]:
    """Image id → split from `ImageSets/Main/train.txt` and `val.txt`."""
    splits = {}
    for file in files:
        parts = file.rel.split("/")
        if _is_image_set(file) and parts[-2] == "Main" and parts[-1] in _VOC_SPLIT_LISTS:
            for line in Path(file.path).read_text(errors="replace").splitlines():
                if line.strip():
                    splits[line.split()[0]] = _VOC_SPLIT_LISTS[parts[-1]]
    return splits


def _voc_record(file: _File, splits: dict[str, str], classes: dict) -> LabelRecord:
    # Paired by the XML's own stem, as the VOC devkit and torchvision pair them: `<filename>` is
    # often stale (renamed files, a labelling tool's absolute path).
    image_id = _stem(file.rel)
    objects = [_voc_object(element) for element in file.content.findall("object")]
    return LabelRecord(image_id, file.rel, LAYOUT_VOC, splits.get(image_id) or split_from_path(file.rel), {}, None,
                       objects, classes)


def _voc_object(element: ElementTree.Element):
    name = (element.findtext("name") or "").strip()
    box = element.find("bndbox")
    if box is None:
        return BadObject("malformed_box", f"object {name!r} has no <bndbox>")
    try:
        xmin, ymin, xmax, ymax = (float(box.findtext(corner)) for corner in _VOC_CORNERS)
    except (TypeError, ValueError):
        return BadObject("malformed_box", f"the <bndbox> of {name!r} lacks numeric xmin, ymin, xmax, ymax")
    # 1-based pixel indices, both ends inclusive → 0-based continuous corners.
    return {"category": name, "box2d": {"x1": xmin - 1, "y1": ymin - 1, "x2": xmax, "y2": ymax},
            "attributes": {"occluded": _flag(element, "occluded"), "truncated": _flag(element, "truncated")}}


def _flag(element: ElementTree.Element, tag: str) -> bool:
    return (element.findtext(tag) or "").strip().lower() in ("1", "true")


# --- COCO -----------------------------------------------------------------------------------

def _read_coco(files: list[_File]) -> BatchLabels:
    classes = _class_table(files)

    def read(file: _File):
        if file.kind == _COCO_JSON:
            return _coco_records(file, classes)
        return _TAKEN if _is_class_map(file) else None
    return _collect(COCO, files, read)


def _coco_records(file: _File, classes: dict) -> tuple[list[LabelRecord], list[Rejection]]:
    """One record per image, annotated or not; annotations naming no listed image are rejected."""
    payload, split = file.content, split_from_path(file.rel)
    try:
        categories = {category["id"]: str(category["name"]) for category in payload["categories"]}
        images = {image["id"]: LabelRecord(_stem(str(image["file_name"])), file.rel, LAYOUT_COCO, split, {}, None,
                                           [], classes) for image in payload["images"]}
    except (TypeError, KeyError) as exc:
        raise LabelFileError(f"COCO images need an id and a file_name, categories an id and a name: {exc!r}") from exc
    if not isinstance(payload["annotations"], list):
        raise LabelFileError("COCO 'annotations' is not a list")
    rejections = []
    for index, annotation in enumerate(payload["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        record = images.get(image_id) if isinstance(image_id, (int, str)) else None
        if record is None:
            rejections.append(Rejection(f"{file.rel}#annotations/{index}", "unknown_image_id",
                                        f"the annotation names image id {image_id!r}, which 'images' does not list"))
        else:
            record.objects.append(_coco_object(annotation, categories))
    return list(images.values()), rejections


def _coco_object(annotation: dict, categories: dict):
    if annotation.get("iscrowd"):
        return IgnoredObject("crowd region")  # one region over many instances: not an instance box
    category_id = annotation.get("category_id")
    name = categories.get(category_id) if isinstance(category_id, (int, str)) else None
    if name is None:
        return BadObject("unknown_category", f"category id {category_id!r} is not among the file's categories")
    try:
        box = _coco_box(annotation)
    except ValueError as exc:
        return BadObject("malformed_box", f"annotation {annotation.get('id')!r}: {exc}")
    return {"category": name, "box2d": box, "attributes": {}}


def _coco_box(annotation: dict) -> dict:
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


_READERS = {BDD: _read_bdd, YOLO: _read_yolo, VOC: _read_voc, COCO: _read_coco}
