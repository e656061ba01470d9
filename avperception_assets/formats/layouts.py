"""Which label layout a batch uses, and its files read by that format's module (`bdd`, `yolo`,
`voc`, `coco`) into `LabelRecord`s.

A batch's layout family is decided once, from the files that define one: BDD100K JSON label
files (the detection layouts and the MOT one, box_track_20, which may share a batch as they share
BDD100K's download), a YOLO class file (`data.yaml`, `data.yml` or `classes.txt`, anywhere in the batch),
Pascal VOC XML (root element `<annotation>`) or a COCO JSON (an object with `images`,
`annotations` and `categories`). A file that defines no layout is a stray (`unsupported_file`:
a `notes.txt` beside BDD labels, an XML that is no annotation), except a JSON that fails to
parse, which is `unparseable_labels` in any batch, as before.

A batch is refused whole (one quarantine record, nothing ingested) when its files define two
families, or when its class names cannot be read (a broken `data.yaml`, YOLO class files that
disagree, a bad `_classes.json`): a frame cannot be ingested again once it is in the table, so
none lands with its boxes guessed.

Records of the formats other than BDD's carry no scene attributes and no timestamp (NULL in the
table) and keep their format's class names: `records.normalize_objects` maps them through the
batch's class table (`class_names`) and checks their boxes, as it does for BDD input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from avperception_assets.formats import bdd, coco, mot, voc, yolo
from avperception_assets.formats.class_names import CLASS_MAP_FILE, ClassMapError, class_table
from avperception_assets.formats.records import LabelFileError, LabelRecord, read_json, split_name
from avperception_assets.storage.quarantine import Rejection

# Layout families, as messages name them.
BDD, YOLO, VOC, COCO = "BDD100K JSON", "YOLO", "Pascal VOC", "COCO JSON"
BATCH_ROOT = "."  # the `file` of a quarantine record about the whole batch

# What a file is once read; the first four define a family.
_BDD_JSON, _COCO_JSON, _VOC_XML, _YOLO_CLASSES = "bdd_json", "coco_json", "voc_xml", "yolo_classes"
_TEXT, _CLASS_MAP, _BAD_JSON, _BAD_XML, _OTHER = "text", "class_map", "bad_json", "bad_xml", "other"
_DEFINES = {_BDD_JSON: BDD, _YOLO_CLASSES: YOLO, _VOC_XML: VOC, _COCO_JSON: COCO}


@dataclass
class _File:
    rel: str  # path inside the batch
    path: str
    kind: str
    content: object = None  # BDD (records, rejections), a COCO payload or a VOC root element
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
        return yolo.background(image_id, rel) if self.family == YOLO else None


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
    if name.lower() in yolo.CLASS_FILES:
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
        if isinstance(payload, dict) and not bdd.is_per_image(payload):
            missing = sorted(coco.KEYS - payload.keys())
            if missing:
                raise LabelFileError(f"an object that is neither a BDD100K per-image label (no 'frames') nor a "
                                     f"COCO JSON (no {', '.join(repr(key) for key in missing)})")
            return _File(rel, path, _COCO_JSON, payload)
        if mot.is_box_track(payload):
            return _File(rel, path, _BDD_JSON, mot.read_labels(payload, rel))
        return _File(rel, path, _BDD_JSON, (bdd.read_labels(payload, rel), []))
    except LabelFileError as exc:
        return _File(rel, path, _BAD_JSON, problem=str(exc))


def _xml_file(rel: str, path: str) -> _File:
    try:
        root = voc.parse(path)
    except LabelFileError as exc:
        return _File(rel, path, _BAD_XML, problem=str(exc))
    if not voc.is_annotation(root):
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


def _read_bdd(files: list[_File]) -> BatchLabels:
    return _collect(BDD, files, lambda f: f.content if f.kind == _BDD_JSON else None)


def _read_yolo(files: list[_File]) -> BatchLabels:
    classes = _class_table(files)
    names, source = _yolo_names(files)

    def read(file: _File):
        if file.kind == _TEXT:
            return [yolo.read_labels(file.rel, file.path, names, source, classes)], []
        return _TAKEN if file.kind == _YOLO_CLASSES or _is_class_map(file) else None
    return _collect(YOLO, files, read)


def _yolo_names(files: list[_File]) -> tuple[dict[int, str], str]:
    """Class index → name, and the class file it comes from: every class file must agree."""
    found = []
    for file in files:
        if file.kind == _YOLO_CLASSES:
            try:
                found.append((file.rel, yolo.read_names(file.rel, file.path)))
            except ValueError as exc:
                raise _Refused(_refusal(file.rel, "unparseable_labels", f"no class names: {exc}")) from exc
    (source, names), *others = found
    for rel, other in others:
        if other != names:
            raise _Refused(_refusal(rel, "conflicting_class_names", f"its class names differ from those of {source}"))
    return names, source


def _read_voc(files: list[_File]) -> BatchLabels:
    classes = _class_table(files)
    splits = voc.read_splits([(f.rel, f.path) for f in files if _is_image_set(f)])

    def read(file: _File):
        if file.kind == _VOC_XML:
            return [voc.read_annotation(file.rel, file.content, splits, classes)], []
        if file.kind == _BAD_XML:
            return [], [Rejection(file.rel, "unparseable_labels", file.problem)]
        return _TAKEN if _is_class_map(file) or _is_image_set(file) else None
    return _collect(VOC, files, read)


def _is_image_set(file: _File) -> bool:
    return file.kind == _TEXT and voc.is_image_set(file.rel)


def _read_coco(files: list[_File]) -> BatchLabels:
    classes = _class_table(files)

    def read(file: _File):
        if file.kind == _COCO_JSON:
            return coco.read_dataset(file.content, file.rel, classes)
        return _TAKEN if _is_class_map(file) else None
    return _collect(COCO, files, read)


_READERS = {BDD: _read_bdd, YOLO: _read_yolo, VOC: _read_voc, COCO: _read_coco}
