"""Ingestion of landing batches into the `bdd100k` table, with bad input quarantined."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from avperception_assets.formats import taxonomy as bdd100k
from avperception_assets.ingest import clips, image_checks, frames as ingest
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from avperception_assets.ingest.landing import READY_MARKER, ready_batches

from .conftest import build_frames_table


def _frames(conn, columns=("image_id", "batch_id", "split", "ann_categories", "ann_bboxes", "label_format")):
    return conn.open_table(storage.FRAMES_TABLE).to_lance().to_table(columns=list(columns)).to_pylist()


def _quarantine(conn):
    return conn.open_table(storage.QUARANTINE_TABLE).to_lance().to_table().to_pylist()


def _label_entries(batch_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """image id → (split, raw category names with boxes), read straight from the label files."""
    entries = {}
    for path in batch_dir.joinpath("labels").rglob("*.json"):
        payload = json.loads(path.read_text())
        for entry in payload if isinstance(payload, list) else [payload]:
            objects = entry["frames"][0]["objects"] if "frames" in entry else entry["labels"]
            split = "val" if "val" in path.as_posix().split("/")[-2:] or path.name.endswith("val.json") else "train"
            entries[Path(entry["name"]).stem] = (split, [o["category"] for o in objects if "box2d" in o])
    return entries


@pytest.mark.parametrize("layout", synthetic.LAYOUTS)
def test_each_bdd_layout_lands_with_official_names(tmp_path, layout):
    landing = tmp_path / "landing"
    batch_dir = synthetic.write_batch(landing, "b1", 24, seed=3, layout=layout)
    conn = storage.connect(str(tmp_path / "db"))
    [summary] = ingest.ingest_batches(conn, landing)

    expected = _label_entries(batch_dir)
    rows = {r["image_id"]: r for r in _frames(conn)}
    assert summary.ingested == 24 and set(rows) == set(expected)
    raw_names = {name for _, names in expected.values() for name in names}
    if layout != "det_20":  # 2018 files use person/bike/motor, stored under det_20 names
        assert raw_names & {"person", "bike", "motor"}
    for image_id, (split, names) in expected.items():
        row = rows[image_id]
        assert row["split"] == split
        assert row["ann_categories"] == [bdd100k.normalize_category(n) for n in names]
        assert row["label_format"] == {"det_20": "bdd_det_20", "split_list_2018": "bdd_split_list_2018",
                                       "per_image_2018": "bdd_per_image_2018"}[layout]
    stored = {c for r in rows.values() for c in r["ann_categories"]}
    assert not stored & {"person", "bike", "motor"}


def test_reingest_adds_nothing(tmp_path):
    landing = tmp_path / "landing"
    synthetic.write_batch(landing, "b1", 12, seed=1)
    conn = storage.connect(str(tmp_path / "db"))
    ingest.ingest_batches(conn, landing)
    version = conn.open_table(storage.FRAMES_TABLE).version

    [again] = ingest.ingest_batches(conn, landing, ["b1"])
    assert (again.ingested, again.already_present) == (0, 12)
    assert conn.open_table(storage.FRAMES_TABLE).count_rows() == 12
    assert conn.open_table(storage.FRAMES_TABLE).version == version
    assert ingest.pending_batches(conn, landing) == []


def test_lookups_of_a_batch_find_its_rows_without_reading_the_table(tmp_path):
    """What ingestion asks the table (which of its image ids exist, the next ingest_seq) is
    answered by filters on the asked-for values, deletions included."""
    conn, _ = build_frames_table(tmp_path, [("b1", 4, 1), ("b2", 3, 2)])
    table = conn.open_table(storage.FRAMES_TABLE)
    ids = table.to_lance().to_table(columns=["image_id"], filter="batch_id = 'b1'")["image_id"].to_pylist()
    assert ingest.known_frames(table, [*ids, "never-seen"], chunk=3) == dict.fromkeys(ids, "b1")
    assert ingest.next_ingest_seq(table) == 7
    table.delete("ingest_seq IN (2, 3)")  # fewer rows than sequence numbers now
    assert ingest.next_ingest_seq(table) == 7


def _encode(image_format: str, color=(90, 90, 90), mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (1280, 720), color).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _jpeg(color=(90, 90, 90)) -> bytes:
    return _encode("JPEG", color)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1:]


def _label(name: str, objects: list[dict]) -> dict:
    return {"name": name, "attributes": {"weather": "clear", "scene": "highway", "timeofday": "daytime"},
            "timestamp": 1, "labels": objects}


def _box(category, x1, y1, x2, y2):
    return {"id": 1, "category": category, "attributes": {}, "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}}


@pytest.fixture
def bad_batch(tmp_path):
    """Batch 'good' lands first; batch 'bad' holds every kind of bad input next to 8 good frames."""
    landing = tmp_path / "landing"
    good_dir = synthetic.write_batch(landing, "good", 4, seed=1)
    bad_dir = synthetic.write_batch(landing, "bad", 8, seed=2)
    images = bad_dir / "images" / "100k" / "train"
    images.mkdir(parents=True, exist_ok=True)
    extra = [
        _label("truncated.jpg", [_box("car", 10, 10, 100, 100)]),
        _label("text.jpg", [_box("car", 10, 10, 100, 100)]),
        _label("half_copied.jpg", [_box("car", 10, 10, 100, 100)]),
        _label("bit_error.png", [_box("car", 10, 10, 100, 100)]),
        _label("lossless.png", [_box("car", 10, 10, 100, 100)]),
        _label("missing.jpg", [_box("car", 10, 10, 100, 100)]),
        _label("boxes.jpg", [_box("car", 10, 10, 100, 100), _box("car", 50, 50, 50, 90),
                             _box("person", 2000, 10, 2100, 100), _box("spaceship", 10, 10, 40, 40),
                             _box("bike", 1250, 600, 1300, 719)]),
    ]
    (images / "truncated.jpg").write_bytes(_jpeg()[:4000])
    (images / "text.jpg").write_text("this is not a picture")
    jpeg = _jpeg((30, 60, 90))  # a copy preallocated at full size and cut off: a zero-filled tail
    (images / "half_copied.jpg").write_bytes(jpeg[:len(jpeg) // 2] + bytes(len(jpeg) - len(jpeg) // 2))
    png = _encode("PNG", (10, 200, 10))
    (images / "bit_error.png").write_bytes(_flip(png, len(png) // 2))
    (images / "lossless.png").write_bytes(png)
    (images / "boxes.jpg").write_bytes(_jpeg((20, 120, 20)))
    (images / "unlabelled.jpg").write_bytes(_jpeg((200, 20, 20)))
    duplicate = next(good_dir.joinpath("images").rglob("*.jpg"))
    shutil.copy(duplicate, images / duplicate.name)
    (bad_dir / "labels" / "det_extra_train.json").write_text(json.dumps(extra + [_label(duplicate.name, [])]))
    (bad_dir / "labels" / "det_broken_train.json").write_text('[{"name": "x.jpg", "labels": [')
    (bad_dir / "notes.txt").write_text("shipping manifest")
    conn = storage.connect(str(tmp_path / "db"))
    ingest.ingest_batches(conn, landing, ["good"])
    return conn, landing, duplicate.stem


def test_bad_input_is_quarantined_and_good_frames_land(bad_batch):
    conn, landing, duplicate_id = bad_batch
    [summary] = ingest.ingest_batches(conn, landing, ["bad"])

    short = lambda file: Path(file.split("#")[0]).name + file[len(file.split("#")[0]):]  # drop folders
    records = {(short(r["file"]), r["reason"]) for r in _quarantine(conn) if r["batch_id"] == "bad"}
    assert records == {
        ("truncated.jpg", "corrupt_image"),
        ("text.jpg", "not_an_image"),
        ("half_copied.jpg", "corrupt_image"),
        ("bit_error.png", "corrupt_image"),
        ("det_extra_train.json#missing", "label_without_image"),
        ("unlabelled.jpg", "image_without_labels"),
        (f"{duplicate_id}.jpg", "duplicate_frame"),
        ("det_broken_train.json", "unparseable_labels"),
        ("notes.txt", "unsupported_file"),
        ("det_extra_train.json#boxes/1", "degenerate_box"),
        ("det_extra_train.json#boxes/2", "box_out_of_frame"),
        ("det_extra_train.json#boxes/3", "unknown_category"),
    }
    assert all(r["detail"] for r in _quarantine(conn))
    columns = ("image_id", "batch_id", "ann_categories", "ann_bboxes", "image_format", "width", "height")
    rows = {r["image_id"]: r for r in _frames(conn, columns) if r["batch_id"] == "bad"}
    assert len(rows) == 8 + 2  # the 8 good synthetic frames, the PNG and the frame whose bad boxes were dropped
    assert rows["lossless"]["image_format"] == "png" and (rows["lossless"]["width"], rows["lossless"]["height"]) == (1280, 720)
    assert rows["boxes"]["ann_categories"] == ["car", "bicycle"]
    assert rows["boxes"]["ann_bboxes"][1] == [1250.0, 600.0, 1280.0, 719.0]  # clipped to the frame
    assert summary.ingested == 10 and sum(summary.quarantined.values()) == 12

    [again] = ingest.ingest_batches(conn, landing, ["bad"])
    assert (again.ingested, again.already_present) == (0, 10)
    assert len([r for r in _quarantine(conn) if r["batch_id"] == "bad"]) == 12


def _without_eoi(data: bytes) -> bytes:
    return data[:-2]


def _sof_offset(data: bytes) -> int:
    return data.index(b"\xff\xc0")


@pytest.mark.parametrize("make, says", [
    (lambda: _jpeg()[:3000], "EOI"),
    (lambda: _without_eoi(_jpeg()), "EOI"),
    (lambda: _jpeg()[:200] + _jpeg()[-2:], "overruns"),
    (lambda: (lambda d: d[:_sof_offset(d) + 5] + b"\x00\x00\x00\x00" + d[_sof_offset(d) + 9:])(_jpeg()), "frame header"),
    (lambda: b"\xff\xd8\xff\xd9", "no image data"),
    (lambda: _encode("PNG")[:-20], "truncated"),
    (lambda: _encode("PNG")[:-12], "before its IEND"),
    (lambda: _flip(_encode("PNG"), 20), "CRC"),
])
def test_structural_damage_is_named(make, says):
    with pytest.raises(image_checks.CorruptImageError, match=says):
        image_checks.inspect_image(make())


@pytest.mark.parametrize("data, expected", [
    (_encode("JPEG", progressive=True), ("jpeg", 1280, 720)),
    (_encode("JPEG", 128, mode="L"), ("jpeg", 1280, 720)),
    (_jpeg() + bytes(64), ("jpeg", 1280, 720)),  # zero padding after EOI is harmless
    (_jpeg() + b"camera trailer", ("jpeg", 1280, 720)),  # so is a maker's trailer
    (_encode("PNG", 128, mode="L"), ("png", 1280, 720)),
])
def test_valid_images_pass_the_structural_check(data, expected):
    assert image_checks.inspect_image(data) == expected


def test_non_images_are_named():
    with pytest.raises(image_checks.NotAnImageError, match="neither JPEG nor PNG"):
        image_checks.inspect_image(b"GIF89a....")


def test_batch_without_ready_marker_is_never_read(tmp_path):
    landing = tmp_path / "landing"
    batch_dir = synthetic.write_batch(landing, "copying", 3)
    (batch_dir / READY_MARKER).unlink()
    conn = storage.connect(str(tmp_path / "db"))
    assert ready_batches(landing) == []
    assert ingest.ingest_batches(conn, landing) == []
    with pytest.raises(FileNotFoundError, match="_READY"):
        ingest.ingest_batches(conn, landing, ["copying"])


@pytest.mark.parametrize("batch_id", ["../etc", "/abs/path", "a/b", "..", ".hidden", "", "x" * 200])
def test_batch_ids_cannot_escape_the_landing_zone(tmp_path, batch_id):
    conn = storage.connect(str(tmp_path / "db"))
    with pytest.raises(ValueError, match="invalid batch id"):
        ingest.ingest_batches(conn, tmp_path, [batch_id])


def test_split_is_deterministic_when_labels_do_not_name_one():
    ids = [f"frame-{i}" for i in range(2000)]
    first = [clips.assign_split(i) for i in ids]
    assert first == [clips.assign_split(i) for i in ids]
    assert 0.15 < first.count("val") / len(ids) < 0.25


def test_synthetic_batches_are_deterministic_and_ids_unique(tmp_path):
    one = synthetic.write_batch(tmp_path / "a", "b1", 6, seed=7)
    two = synthetic.write_batch(tmp_path / "b", "b1", 6, seed=7)
    other = synthetic.write_batch(tmp_path / "c", "b2", 6, seed=7)
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert files(one) == files(two)
    names = lambda d: {p.name for p in d.rglob("*.jpg")}
    assert not names(one) & names(other)
    with pytest.raises(FileExistsError):
        synthetic.write_batch(tmp_path / "a", "b1", 1)
