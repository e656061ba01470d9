"""Slice exports: a pinned view version as COCO JSON and as a YOLO folder, read back by
pycocotools, by hand and by ingestion itself; crowd boxes as COCO's `iscrowd`, out of YOLO."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest
from PIL import Image
from pycocotools.coco import COCO

from avperception_assets.slices import exports
from avperception_assets.ingest import frames as ingest
from avperception_assets.storage import pixels, tables as storage
from avperception_assets import exports as exports_command, synthetic
from avperception_assets.formats.taxonomy import CLASSES
from avperception_assets.defs.export_jobs import slice_export
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.ingest.landing import READY_MARKER

VIEW = "bdd100k_rider_val"


@dataclass
class SliceDB:
    uri: str
    view_version: int
    frames: dict[str, dict]  # the view's frames by image id, image bytes included


def _frames_by_id(table, ids) -> dict[str, dict]:
    rows = table.to_lance().to_table(filter=f"image_id IN ({storage.sql_list(ids)})").to_pylist()
    return {row["image_id"]: row for row in rows}


@pytest.fixture(scope="module")
def slice_db(tmp_path_factory) -> SliceDB:
    """A frames table and a val view stand-in holding no image bytes, as Geneva views do (rows
    point at the frames table by stable row id); a later append moves the view to a new version."""
    root = tmp_path_factory.mktemp("slice-export")
    synthetic.write_batch(root / "landing", "b1", 10, seed=4, width=320, height=180, val_fraction=0.5)
    conn = storage.connect(str(root / "lancedb"))
    ingest.ingest_batches(conn, root / "landing")
    frames = conn.open_table(storage.FRAMES_TABLE)
    rows = frames.to_lance().to_table(with_row_id=True, filter="split = 'val'").drop_columns(["image_bytes"])
    rows = rows.rename_columns([pixels.SOURCE_ROW_ID if n == "_rowid" else n for n in rows.column_names])
    view = conn.create_table(VIEW, rows.slice(0, len(rows) - 1), storage_options=storage.STABLE_ROW_IDS)
    version = view.version
    view.add(rows.slice(len(rows) - 1))  # the next version holds one frame more
    ids = rows["image_id"].to_pylist()[:-1]
    return SliceDB(str(root / "lancedb"), version, _frames_by_id(frames, ids))


def _boxes(frame: dict) -> list[tuple[str, list[float]]]:
    return sorted(zip(frame["ann_categories"], frame["ann_bboxes"]))


def _assert_same_boxes(got: list[tuple[str, list[float]]], want: list[tuple[str, list[float]]], tolerance: float):
    assert [c for c, _ in got] == [c for c, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert max(abs(x - y) for x, y in zip(a, b)) <= tolerance, (a, b)


def test_coco_export_of_a_pinned_version(slice_db, tmp_path):
    export = exports.export_view(slice_db.uri, VIEW, exports.COCO, tmp_path, version=slice_db.view_version)
    assert export.path == tmp_path / f"{VIEW}@v{slice_db.view_version}_coco"
    assert export.frames == len(slice_db.frames) and export.splits == ("val",)
    assert not [p for p in tmp_path.iterdir() if p != export.path]  # no staging folder left behind
    coco = COCO(str(export.path / "annotations" / "instances_val.json"))
    assert coco.dataset["info"]["view"] == VIEW and coco.dataset["info"]["view_version"] == slice_db.view_version
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert export.boxes == len(coco.getAnnIds()) > 0
    for image in coco.loadImgs(coco.getImgIds()):
        frame = slice_db.frames[image["frame_id"]]
        assert (export.path / "images" / "val" / image["file_name"]).read_bytes() == frame["image_bytes"]
        boxes = [(coco.cats[a["category_id"]]["name"], [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                                       a["bbox"][1] + a["bbox"][3]])
                 for a in coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))]
        _assert_same_boxes(sorted(boxes), _boxes(frame), 1e-3)


def test_yolo_export_and_a_second_export_replaces_the_first(slice_db, tmp_path):
    first = exports.export_view(slice_db.uri, VIEW, exports.YOLO, tmp_path, version=slice_db.view_version)
    (first.path / "stale.txt").write_text("from an earlier export")
    export = exports.export_view(slice_db.uri, VIEW, exports.YOLO, tmp_path, version=slice_db.view_version)
    assert export.path == first.path and not (export.path / "stale.txt").exists()
    data = json.loads((export.path / "data.yaml").read_text())
    assert data["names"] == list(CLASSES) and data["val"] == "images/val"
    assert data["export"]["view_version"] == slice_db.view_version
    assert sorted(p.stem for p in (export.path / "labels" / "val").iterdir()) == sorted(slice_db.frames)
    for image_id, frame in slice_db.frames.items():
        assert (export.path / "images" / "val" / f"{image_id}.jpg").read_bytes() == frame["image_bytes"]
        w, h = frame["width"], frame["height"]
        boxes = []
        for line in (export.path / "labels" / "val" / f"{image_id}.txt").read_text().splitlines():
            index, cx, cy, bw, bh = line.split()
            cx, cy, bw, bh = float(cx) * w, float(cy) * h, float(bw) * w, float(bh) * h
            boxes.append((CLASSES[int(index)], [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]))
        _assert_same_boxes(sorted(boxes), _boxes(frame), 1e-3)


@pytest.mark.parametrize("fmt", exports.FORMATS)
def test_an_export_lands_again_as_the_same_frames(slice_db, tmp_path, fmt):
    """An export copied into a fresh landing zone ingests as the same frames, classes and boxes."""
    export = exports.export_view(slice_db.uri, VIEW, fmt, tmp_path / "exports", version=slice_db.view_version)
    landing = tmp_path / "landing"
    shutil.copytree(export.path, landing / "reimport")
    (landing / "reimport" / READY_MARKER).write_text("")
    conn = storage.connect(str(tmp_path / "lancedb"))
    [summary] = ingest.ingest_batches(conn, landing)
    assert summary.ingested == len(slice_db.frames) and not summary.quarantined
    table = conn.open_table(storage.FRAMES_TABLE)
    landed = _frames_by_id(table, list(slice_db.frames))
    assert landed.keys() == slice_db.frames.keys()
    for image_id, frame in slice_db.frames.items():
        again = landed[image_id]
        assert again["image_bytes"] == frame["image_bytes"] and again["split"] == "val"
        _assert_same_boxes(_boxes(again), _boxes(frame), 1.0)
    assert set(pc.unique(table.to_lance().to_table(columns=["label_format"])["label_format"]).to_pylist()) == {fmt}


@pytest.mark.dagster_run
def test_slice_export_job_and_clear_errors(slice_db, data_dir, capsys, monkeypatch):
    resources = {"workspace": WorkspaceResource(data_location=str(data_dir), lancedb_uri=slice_db.uri)}
    config = {"ops": {"export_slice": {"config": {"view": VIEW, "format": "yolo"}}}}
    result = slice_export.execute_in_process(run_config=config, resources=resources)
    output = result.output_for_node("export_slice")
    latest = slice_db.view_version + 1  # no version given: the latest
    assert output["view_version"] == latest and output["frames"] == len(slice_db.frames) + 1
    assert Path(output["path"]) == data_dir / "exports" / f"{VIEW}@v{latest}_yolo"
    [event] = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    assert event.step_output_data.metadata["view_version"].value == latest

    bad = {"ops": {"export_slice": {"config": {"view": "bdd100k_no_such_val"}}}}
    failed = slice_export.execute_in_process(run_config=bad, resources=resources, raise_on_error=False)
    assert not failed.success and "'bdd100k_no_such_val' does not exist" in str(
        failed.failure_data_for_node("export_slice").error)
    with pytest.raises(dg.DagsterInvalidConfigError):
        slice_export.execute_in_process(run_config={"ops": {"export_slice": {"config": {"view": VIEW, "format": "voc"}}}},
                                        resources=resources)

    monkeypatch.setenv("AVP_LANCEDB_URI", slice_db.uri)
    assert exports_command.main([VIEW, "--format", "coco", "--version", str(slice_db.view_version)]) == 0
    printed = capsys.readouterr().out
    assert f"{VIEW}@v{slice_db.view_version}_coco" in printed
    assert (data_dir / "exports" / f"{VIEW}@v{slice_db.view_version}_coco" / "annotations").is_dir()
    assert exports_command.main([VIEW, "--version", "999"]) == 2
    assert "error:" in capsys.readouterr().err


def _landed_crowd(landing: Path, conn) -> dict[str, dict]:
    """Ingest `landing`; the frames' categories, boxes and crowd flags by image id."""
    ingest.ingest_batches(conn, landing)
    rows = conn.open_table(storage.FRAMES_TABLE).to_lance().to_table(
        columns=["image_id", "ann_categories", "ann_bboxes", "ann_crowd"]).to_pylist()
    return {r["image_id"]: {k: v for k, v in r.items() if k != "image_id"} for r in rows}


def test_crowd_boxes_round_trip_through_coco_and_stay_out_of_yolo(tmp_path):
    """COCO with an `iscrowd` annotation → ingest (a crowd box) → COCO export (`iscrowd` 1, read
    back the same) and YOLO export (left out)."""
    buffer = io.BytesIO()
    Image.new("RGB", (320, 180), (90, 120, 60)).save(buffer, format="JPEG")
    batch = tmp_path / "landing" / "coco"
    (batch / "images" / "val").mkdir(parents=True)
    (batch / "images" / "val" / "street.jpg").write_bytes(buffer.getvalue())
    (batch / "annotations").mkdir()
    # The crowd's mask (uncompressed RLE, column by column): rows 30-79 of columns 100-179.
    crowd_rle = [100 * 180 + 30, 50, *[130, 50] * 79, 100 + 140 * 180]
    (batch / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "street.jpg", "width": 320, "height": 180}],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 60], "iscrowd": 0},
                        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [100, 30, 80, 50], "iscrowd": 1,
                         "segmentation": {"size": [180, 320], "counts": crowd_rle}},
                        {"id": 3, "image_id": 7, "category_id": 3, "bbox": [200, 90, 60, 40], "iscrowd": 0}]}))
    (batch / READY_MARKER).write_text("")
    uri = str(tmp_path / "lancedb")
    landed = _landed_crowd(tmp_path / "landing", storage.connect(uri))
    assert landed["street"]["ann_crowd"] == [False, True, False]

    export = exports.export_view(uri, storage.FRAMES_TABLE, exports.COCO, tmp_path / "exports")
    assert (export.boxes, export.crowd_boxes) == (3, 1)
    [crowd] = [a for a in COCO(str(export.path / "annotations" / "instances_val.json")).dataset["annotations"]
               if a["iscrowd"]]
    assert (CLASSES[crowd["category_id"] - 1], crowd["bbox"]) == ("pedestrian", [100.0, 30.0, 80.0, 50.0])
    shutil.copytree(export.path, tmp_path / "again" / "reimport")
    (tmp_path / "again" / "reimport" / READY_MARKER).write_text("")
    assert _landed_crowd(tmp_path / "again", storage.connect(str(tmp_path / "lancedb2"))) == landed

    yolo = exports.export_view(uri, storage.FRAMES_TABLE, exports.YOLO, tmp_path / "exports")
    lines = (yolo.path / "labels" / "val" / "street.txt").read_text().splitlines()
    assert [CLASSES[int(line.split()[0])] for line in lines] == ["pedestrian", "car"]  # no crowd box
