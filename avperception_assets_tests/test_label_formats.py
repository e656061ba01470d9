"""YOLO, Pascal VOC and COCO batches ingested next to the BDD100K layouts: each format's edge
cases, class mapping, batches refused whole, and frames without scene attributes kept out of
slices that need them. Tiny batches (100x50 frames) into a real LanceDB table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from avperception_assets.formats import class_names
from avperception_assets.ingest import frames as ingest
from avperception_assets.storage import tables as storage
from avperception_assets.failure_modes.registry import get_mode
from avperception_assets.ingest.landing import READY_MARKER

WIDTH, HEIGHT = 100, 50
SCENE = ("weather", "scene", "timeofday", "timestamp")


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), (90, 90, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = _jpeg()


def _land(landing: Path, batch_id: str, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = landing / batch_id / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    (landing / batch_id / READY_MARKER).write_text("")


def _ingest(tmp_path: Path, files: dict, batch_id: str = "b1"):
    _land(tmp_path / "landing", batch_id, files)
    conn = storage.connect(str(tmp_path / "db"))
    [summary] = ingest.ingest_batches(conn, tmp_path / "landing", [batch_id])
    return conn, summary


def _frames(conn) -> dict[str, dict]:
    rows = conn.open_table(storage.FRAMES_TABLE).to_lance().to_table(columns=[
        "image_id", "split", "label_format", "ann_categories", "ann_bboxes", "ann_occluded", "ann_truncated", "ann_crowd",
        *SCENE])
    return {row["image_id"]: row for row in rows.to_pylist()}


def _quarantine(conn, batch_id: str = "b1") -> dict[tuple[str, str], str]:
    rows = conn.open_table(storage.QUARANTINE_TABLE).to_lance().to_table().to_pylist()
    return {(r["file"], r["reason"]): r["detail"] for r in rows if r["batch_id"] == batch_id}


def _boxes(row: dict) -> list[list[float]]:
    return [[round(v, 3) for v in box] for box in row["ann_bboxes"]]


# --- YOLO -----------------------------------------------------------------------------------

YOLO_NAMES = ["person", "car", "dog", "spaceship"]
YOLO_CLASS_FILES = {
    # The exporter's data.yaml: JSON (which is YAML), names as a list.
    "data_yaml_list": {"data.yaml": json.dumps({"path": ".", "train": "images/train", "val": "images/val",
                                                "names": YOLO_NAMES})},
    "data_yaml_dict": {"data.yaml": "path: .\nnames:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(YOLO_NAMES))},
    "classes_txt": {"classes.txt": "\n".join(YOLO_NAMES) + "\n"},
}


@pytest.mark.parametrize("class_file", YOLO_CLASS_FILES)
def test_yolo_batch_lands_in_pixels_with_its_bad_lines_quarantined(tmp_path, class_file):
    lines = [
        "0 0.5 0.5 0.2 0.4",  # 0: person → pedestrian
        "1 0.95 0.5 0.2 0.2",  # 1: a car across the right edge: clipped, truncated
        "7 0.5 0.5 0.1 0.1",  # 2: class index out of range
        "1 0.5 0.5 0.1",  # 3: malformed
        "1 1.5 0.5 0.1 0.1",  # 4: outside [0, 1]
        "1 0.5 0.5 0 0.1",  # 5: no width
        "2 0.5 0.5 0.1 0.1",  # 6: dog, ignored by the built-in table
        "3 0.5 0.5 0.1 0.1",  # 7: a name in no table
    ]
    conn, summary = _ingest(tmp_path, {
        **YOLO_CLASS_FILES[class_file],
        "images/train/a.jpg": JPEG, "labels/train/a.txt": "\n".join(lines) + "\n",
        "images/val/b.jpg": JPEG, "labels/val/b.txt": "",  # an empty label file: no objects
        "images/train/c.jpg": JPEG,  # no label file: a background image
        "notes.xml": "<notes>not an annotation</notes>",
    })

    rows = _frames(conn)
    assert set(rows) == {"a", "b", "c"} and {r["label_format"] for r in rows.values()} == {"yolo"}
    assert rows["a"]["ann_categories"] == ["pedestrian", "car"]
    assert _boxes(rows["a"]) == [[40, 15, 60, 35], [85, 20, 100, 30]]
    assert rows["a"]["ann_truncated"] == [False, True]
    assert (rows["b"]["ann_categories"], rows["c"]["ann_categories"]) == ([], [])
    assert [rows[i]["split"] for i in "abc"] == ["train", "val", "train"]
    assert _quarantine(conn).keys() == {
        ("labels/train/a.txt#a/2", "unknown_category"),
        ("labels/train/a.txt#a/3", "malformed_object"),
        ("labels/train/a.txt#a/4", "box_not_normalized"),
        ("labels/train/a.txt#a/5", "degenerate_box"),
        ("labels/train/a.txt#a/7", "unknown_category"),
        ("notes.xml", "unsupported_file"),
    }
    assert "class index 7" in _quarantine(conn)[("labels/train/a.txt#a/2", "unknown_category")]
    assert summary.objects_ignored == {"class dog": 1}


# --- Pascal VOC -----------------------------------------------------------------------------

def _voc(filename: str, *objects: str) -> str:
    return (f"<annotation><folder>VOC2012</folder><filename>{filename}</filename><size><width>{WIDTH}</width>"
            f"<height>{HEIGHT}</height><depth>3</depth></size>{''.join(objects)}</annotation>")


def _voc_object(name: str, box=(1, 1, 50, 40), **flags) -> str:
    corners = "" if box is None else "<bndbox>" + "".join(
        f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox>"
    return f"<object><name>{name}</name>{''.join(f'<{k}>{v}</{k}>' for k, v in flags.items())}{corners}</object>"


def test_voc_batch_lands_with_one_or_many_objects_and_zero_based_boxes(tmp_path):
    conn, summary = _ingest(tmp_path, {
        # One object (an XML-to-dict parser gives a mapping, not a list); <filename> names another file.
        "VOC2012/Annotations/one.xml": _voc("C:\\labelling\\IMG_0001.JPG",
                                            _voc_object("person", (1, 1, 50, 40), truncated=1, occluded=1, difficult=1)),
        "VOC2012/Annotations/many.xml": _voc("many.jpg",
                                             _voc_object("motorbike", (11, 6, 30, 25)),
                                             _voc_object("car", (41, 11, 100, 50), truncated=0, difficult=0),
                                             _voc_object("dog"),
                                             _voc_object("spaceship"),
                                             _voc_object("car", None),  # 4: no bndbox
                                             _voc_object("car", ("left", 1, 2, 3)),  # 5
                                             _voc_object("car", (30, 10, 20, 20))),  # 6: xmax < xmin
        "VOC2012/Annotations/broken.xml": "<annotation><object><name>car",
        "VOC2012/JPEGImages/one.jpg": JPEG, "VOC2012/JPEGImages/many.jpg": JPEG,
        "VOC2012/JPEGImages/broken.jpg": JPEG,
        "VOC2012/ImageSets/Main/train.txt": "one\n", "VOC2012/ImageSets/Main/val.txt": "many\n",
        "VOC2012/ImageSets/Main/car_train.txt": "one -1\nmany  1\n",  # a per-class list: part of the layout
        "notes.txt": "shipping manifest",
        "meta.xml": "<config><camera>front</camera></config>",
    })

    rows = _frames(conn)
    assert set(rows) == {"one", "many"} and {r["label_format"] for r in rows.values()} == {"pascal_voc"}
    one, many = rows["one"], rows["many"]
    assert (one["ann_categories"], _boxes(one)) == (["pedestrian"], [[0, 0, 50, 40]])  # difficult objects stay
    assert (one["ann_crowd"], many["ann_crowd"]) == ([True], [False, False])  # as ignore regions
    assert (one["ann_occluded"], one["ann_truncated"]) == ([True], [True])
    assert many["ann_categories"] == ["motorcycle", "car"]
    assert _boxes(many) == [[10, 5, 30, 25], [40, 10, 100, 50]]
    assert (many["ann_occluded"], many["ann_truncated"]) == ([False, False], [False, False])
    assert (one["split"], many["split"]) == ("train", "val")  # from ImageSets/Main
    assert _quarantine(conn).keys() == {
        ("VOC2012/Annotations/broken.xml", "unparseable_labels"),
        ("VOC2012/JPEGImages/broken.jpg", "image_without_labels"),
        ("VOC2012/Annotations/many.xml#many/3", "unknown_category"),
        ("VOC2012/Annotations/many.xml#many/4", "malformed_box"),
        ("VOC2012/Annotations/many.xml#many/5", "malformed_box"),
        ("VOC2012/Annotations/many.xml#many/6", "degenerate_box"),
        ("notes.txt", "unsupported_file"),
        ("meta.xml", "unsupported_file"),
    }
    assert summary.objects_ignored == {"class dog": 1}


# --- COCO -----------------------------------------------------------------------------------

def _coco(images: list[tuple[int, str]], categories: dict[int, str], annotations: list[dict]) -> str:
    return json.dumps({
        "info": {"description": "test"},
        "images": [{"id": i, "file_name": name, "width": WIDTH, "height": HEIGHT} for i, name in images],
        "categories": [{"id": i, "name": name, "supercategory": "x"} for i, name in categories.items()],
        "annotations": [{"id": n + 1, "iscrowd": 0, **a} for n, a in enumerate(annotations)],
    })


def _compressed_rle(rows: slice, columns: slice) -> dict:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8, order="F")
    mask[rows, columns] = 1
    rle = mask_utils.encode(mask)
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_coco_batch_lands_with_crowd_boxes_and_boxes_from_segmentations(tmp_path):
    categories = {1: "person", 3: "car", 18: "dog", 77: "spaceship"}  # ids need not be contiguous
    val = _coco([(10, "a.jpg"), (20, "b.jpg"), (30, "val2017/c.jpg")], categories, [
        {"image_id": 10, "category_id": 1, "bbox": [10, 5, 20, 30]},  # a/0
        {"image_id": 10, "category_id": 3, "bbox": [0, 0, 100, 50], "iscrowd": 1,  # a/1: a crowd region
         "segmentation": {"size": [HEIGHT, WIDTH], "counts": [0, WIDTH * HEIGHT]}},
        {"image_id": 10, "category_id": 99, "bbox": [1, 1, 5, 5]},  # a/2: no such category
        {"image_id": 10, "category_id": 3, "bbox": [1, 1, 0, 5]},  # a/3: no width
        {"image_id": 10, "category_id": 18, "bbox": [1, 1, 5, 5]},  # a/4: dog, ignored
        {"image_id": 10, "category_id": 77, "bbox": [1, 1, 5, 5]},  # a/5: a name in no table
        {"image_id": 10, "category_id": 3, "bbox": [1, 1, 5, -2]},  # a/6: negative height
        {"image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5]},  # annotations/7: no such image
        {"image_id": 30, "category_id": 3, "segmentation": [[10, 10, 40, 12, 25, 30]]},  # polygon only
        {"image_id": 30, "category_id": 1, "segmentation": {"size": [HEIGHT, WIDTH], "counts": [3000, 500, 1500]},
         "bbox": []},  # uncompressed RLE: columns 60-69
        {"image_id": 30, "category_id": 3, "segmentation": _compressed_rle(slice(5, 15), slice(20, 30))},
    ])
    train = _coco([(1, "d.jpg")], {1: "car"}, [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]}])
    conn, summary = _ingest(tmp_path, {
        "annotations/instances_val2017.json": val, "annotations/instances_train.json": train,
        "images/val2017/a.jpg": JPEG, "images/val2017/b.jpg": JPEG, "images/val2017/c.jpg": JPEG,
        "images/train/d.jpg": JPEG,
        "notes.txt": "shipping manifest",
    })

    rows = _frames(conn)
    assert set(rows) == {"a", "b", "c", "d"} and {r["label_format"] for r in rows.values()} == {"coco"}
    assert (rows["a"]["ann_categories"], _boxes(rows["a"])) == (["pedestrian", "car"], [[10, 5, 30, 35], [0, 0, 100, 50]])
    assert rows["a"]["ann_crowd"] == [False, True]  # the crowd region: an ignore region
    assert rows["b"]["ann_categories"] == []  # an image without annotations is a frame without boxes
    assert rows["c"]["ann_categories"] == ["car", "pedestrian", "car"]
    assert _boxes(rows["c"]) == [[10, 10, 40, 30], [60, 0, 70, 50], [20, 5, 30, 15]]
    assert {i: rows[i]["split"] for i in "abcd"} == {"a": "val", "b": "val", "c": "val", "d": "train"}
    val_file = "annotations/instances_val2017.json"
    assert _quarantine(conn).keys() == {
        (f"{val_file}#a/2", "unknown_category"),
        (f"{val_file}#a/3", "degenerate_box"),
        (f"{val_file}#a/5", "unknown_category"),
        (f"{val_file}#a/6", "degenerate_box"),
        (f"{val_file}#annotations/7", "unknown_image_id"),
        ("notes.txt", "unsupported_file"),
    }
    assert summary.objects_ignored == {"class dog": 1}
    assert summary.boxes == 6


# --- class mapping, refusals, strays ----------------------------------------------------------

def test_classes_json_extends_and_overrides_the_built_in_table(tmp_path):
    conn, summary = _ingest(tmp_path, {
        "_classes.json": json.dumps({"Spaceship": "Car", "person": None}),
        "Annotations/x.xml": _voc("x.jpg", _voc_object("spaceship"), _voc_object("person"), _voc_object("motorbike")),
        "JPEGImages/x.jpg": JPEG,
    })
    assert _frames(conn)["x"]["ann_categories"] == ["car", "motorcycle"]
    assert summary.objects_ignored == {"class person": 1}
    assert _quarantine(conn) == {}


def test_built_in_table_maps_every_voc_and_coco_class():
    table = class_names.class_table()
    assert set(class_names.VOC_CLASSES) | set(class_names.COCO_CLASSES) <= table.keys()
    detected = {name: table[name] for name in (*class_names.VOC_CLASSES, *class_names.COCO_CLASSES) if table[name]}
    assert detected == {"person": "pedestrian", "bicycle": "bicycle", "car": "car", "motorbike": "motorcycle",
                        "motorcycle": "motorcycle", "bus": "bus", "train": "train", "truck": "truck",
                        "traffic light": "traffic light", "stop sign": "traffic sign"}


def _bdd(*entries: dict) -> str:
    return json.dumps(list(entries))


def _bdd_entry(name: str, timeofday: str = "daytime", categories=("car",)) -> dict:
    return {"name": name, "attributes": {"weather": "clear", "scene": "city street", "timeofday": timeofday},
            "timestamp": 10000, "labels": [{"id": n, "category": c, "attributes": {},
                                            "box2d": {"x1": 10, "y1": 5, "x2": 30, "y2": 40}}
                                           for n, c in enumerate(categories)]}


REFUSED = {
    "bdd_and_yolo": ({"labels/det_train.json": _bdd(_bdd_entry("x.jpg")), "images/x.jpg": JPEG,
                      "data.yaml": "names: [car]\n", "labels/y.txt": "0 0.5 0.5 0.1 0.1\n", "images/y.jpg": JPEG},
                     ".", "ambiguous_layout", ["BDD100K JSON (e.g. labels/det_train.json)", "YOLO (e.g. data.yaml)"]),
    "coco_and_voc": ({"annotations/instances_val.json": _coco([(1, "x.jpg")], {1: "car"}, []), "images/x.jpg": JPEG,
                      "Annotations/y.xml": _voc("y.jpg", _voc_object("car")), "images/y.jpg": JPEG},
                     ".", "ambiguous_layout", ["COCO JSON (e.g. annotations/instances_val.json)",
                                               "Pascal VOC (e.g. Annotations/y.xml)"]),
    "classes_json_malformed": ({"_classes.json": '{"spaceship": ', "Annotations/x.xml": _voc("x.jpg", _voc_object("car")),
                                "x.jpg": JPEG}, "_classes.json", "bad_class_mapping", ["not valid JSON"]),
    "classes_json_not_det_20": ({"_classes.json": '{"spaceship": "rocket"}', "x.jpg": JPEG,
                                 "Annotations/x.xml": _voc("x.jpg", _voc_object("car"))},
                                "_classes.json", "bad_class_mapping", ["rocket", "traffic sign"]),
    "data_yaml_malformed": ({"data.yaml": "names: [car, bus", "x.txt": "0 0.5 0.5 0.1 0.1\n", "x.jpg": JPEG},
                            "data.yaml", "unparseable_labels", ["not valid YAML"]),
    "yolo_class_files_disagree": ({"data.yaml": "names: [car]\n", "classes.txt": "bus\n",
                                   "x.txt": "0 0.5 0.5 0.1 0.1\n", "x.jpg": JPEG},
                                  "data.yaml", "conflicting_class_names", ["classes.txt"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_batch_with_two_layouts_or_unreadable_class_names_is_refused_whole(tmp_path, case):
    files, file, reason, says = REFUSED[case]
    conn, summary = _ingest(tmp_path, files)
    [(where, why)] = _quarantine(conn).keys()
    detail = _quarantine(conn)[(where, why)]
    assert (where, why) == (file, reason) and all(s in detail for s in says) and "refused" in detail
    assert summary.refused and summary.ingested == 0 and _frames(conn) == {}
    assert ingest.pending_batches(conn, tmp_path / "landing") == []  # processed: the sensor moves on


def test_stray_text_xml_and_class_map_in_a_bdd_batch_stay_unsupported(tmp_path):
    conn, _ = _ingest(tmp_path, {
        "labels/det_train.json": _bdd(_bdd_entry("x.jpg")), "images/x.jpg": JPEG,
        "notes.txt": "shipping manifest", "meta.xml": "<config/>", "broken.xml": "<annotation>",
        "_classes.json": '{"spaceship": "car"}',
    })
    assert _frames(conn)["x"]["label_format"] == "bdd_det_20"
    assert _quarantine(conn).keys() == {(f, "unsupported_file") for f in ("notes.txt", "meta.xml", "broken.xml",
                                                                          "_classes.json")}


def test_frames_without_scene_attributes_stay_out_of_slices_that_need_them(tmp_path):
    """COCO frames have no time of day: NULL, so `nighttime_person`'s filter never takes them,
    while a BDD night frame with the same pedestrian is taken."""
    _land(tmp_path / "landing", "bdd", {"det_train.json": _bdd(_bdd_entry("night.jpg", "night", ["pedestrian"])),
                                        "night.jpg": JPEG})
    _land(tmp_path / "landing", "coco", {"instances_train.json": _coco([(1, "plain.jpg")], {1: "person"}, [
        {"image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 35]}]), "plain.jpg": JPEG})
    conn = storage.connect(str(tmp_path / "db"))
    ingest.ingest_batches(conn, tmp_path / "landing")

    rows = _frames(conn)
    assert [rows["plain"][c] for c in SCENE] == [None] * 4
    assert rows["plain"]["ann_categories"] == rows["night"]["ann_categories"] == ["pedestrian"]
    table = conn.open_table(storage.FRAMES_TABLE)
    table.add_columns({"has_person": "array_has(ann_categories, 'pedestrian')"})  # the curation column, in SQL
    taken = table.search().where(get_mode("nighttime_person").where).select(["image_id"]).to_list()
    assert [row["image_id"] for row in taken] == ["night"]
