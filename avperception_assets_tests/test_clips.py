"""Footage clips: BDD100K MOT (box_track_20) batches ingested with their clips and tracks, each clip
in one split, the clip rules' quarantine, the split check, tables from before clips, the loader's
crowd regions, and the synthetic clip generator."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from avperception_assets import synthetic
from avperception_assets.evaluation import comparison
from avperception_assets.evaluation.frame_errors import match_frame
from avperception_assets.formats.taxonomy import COCO_IDS, COCO_NAMES
from avperception_assets.ingest import checks as ingest_checks, clips, frames as ingest
from avperception_assets.ingest.landing import READY_MARKER
from avperception_assets.model import loader, selection
from avperception_assets.model.detections import compute_metrics
from avperception_assets.storage import tables as storage

SIZE = {"width": 320, "height": 180}
NEW_COLUMNS = ("clip_id", "clip_frame_index", "ann_track_ids", "ann_crowd")
OLD_SCHEMA = pa.schema([f for f in storage.FRAMES_SCHEMA if f.name not in NEW_COLUMNS])


def _frames(conn, where: str | None = None) -> list[dict]:
    columns = ["image_id", "batch_id", "split", "label_format", *NEW_COLUMNS, "ann_categories"]
    return conn.open_table(storage.FRAMES_TABLE).to_lance().to_table(columns=columns, filter=where).to_pylist()


def _quarantine(conn, batch_id: str) -> set[tuple[str, str]]:
    rows = conn.open_table(storage.QUARANTINE_TABLE).to_lance().to_table(filter=f"batch_id = '{batch_id}'")
    return {(r["file"].split("#")[0].rpartition("/")[2] + r["file"][len(r["file"].split("#")[0]):], r["reason"])
            for r in rows.to_pylist()}  # folders dropped


def _split_of_clips(rows: list[dict]) -> dict[str, set[str]]:
    splits = defaultdict(set)
    for row in rows:
        splits[row["clip_id"]].add(row["split"])
    return dict(splits)


def _label_files(batch_dir: Path) -> dict[str, tuple[str | None, list[dict]]]:
    """video → (split folder or None, its frames), read straight from the label files."""
    found = {}
    for path in batch_dir.joinpath("labels", "box_track_20").rglob("*.json"):
        folder = path.parent.name
        found[path.stem] = (folder if folder in ("train", "val") else None, json.loads(path.read_text()))
    return found


@pytest.mark.parametrize("split_folders", [True, False])
def test_a_mot_batch_lands_with_clips_tracks_and_each_clip_in_one_split(tmp_path, split_folders):
    landing = tmp_path / "landing"
    batch = synthetic.write_clip_batch(landing, "clips", 8, 4, seed=3, split_folders=split_folders,
                                       val_fraction=0.5, **SIZE)
    conn = storage.connect(str(tmp_path / "db"))
    [summary] = ingest.ingest_batches(conn, landing, val_fraction=0.5)

    rows = {r["image_id"]: r for r in _frames(conn)}
    videos = _label_files(batch)
    assert summary.ingested == 32 == len(rows) and not summary.quarantined and summary.as_metadata()["clips"] == 8
    for video, (folder, frames) in videos.items():
        expected_split = folder if split_folders else clips.assign_split(video, 0.5)
        for frame in frames:
            row = rows[Path(frame["name"]).stem]
            assert (row["clip_id"], row["clip_frame_index"], row["split"]) == (video, frame["frameIndex"], expected_split)
            assert row["label_format"] == "bdd_box_track_20"
            assert row["ann_track_ids"] == [label["id"] for label in frame["labels"]]
            assert row["ann_crowd"] == [label["attributes"]["crowd"] or label["category"] == "other vehicle"
                                        for label in frame["labels"]]
    splits = _split_of_clips(list(rows.values()))
    assert all(len(s) == 1 for s in splits.values())
    assert {s for (s,) in splits.values()} == {"train", "val"}  # 8 clips at half to val: both sides
    assert any(any(r["ann_crowd"]) for r in rows.values())  # the generator's ignore regions landed as such
    assert ingest_checks.clips_in_two_splits(conn.open_table(storage.FRAMES_TABLE)) == []


def test_a_clip_keeps_its_split_when_more_of_its_frames_land(tmp_path):
    """Without folders a clip's split is a hash of its id; frames of it that land later take the
    split its rows have, whatever the share to val is then."""
    landing = tmp_path / "landing"
    first = synthetic.write_clip_batch(landing, "first", 6, 3, seed=1, split_folders=False, **SIZE)
    conn = storage.connect(str(tmp_path / "db"))
    ingest.ingest_batches(conn, landing, ["first"], val_fraction=0.5)
    before = _split_of_clips(_frames(conn))

    later = landing / "later"
    for video, (_, frames) in _label_files(first).items():
        _write_clip(later, video, None, [(f"{video}-late{k}", 10 + k, [_label("1", "car")]) for k in range(2)])
    (later / READY_MARKER).write_text("")
    [summary] = ingest.ingest_batches(conn, landing, ["later"], val_fraction=0.0)  # a new clip would go to train
    assert summary.ingested == 12
    assert _split_of_clips(_frames(conn)) == before and "val" in {s for (s,) in before.values()}


def _jpeg(color=(90, 90, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE["width"], SIZE["height"]), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _label(track: str, category: str, box=(10, 10, 60, 90), **attributes) -> dict:
    x1, y1, x2, y2 = box
    return {"id": track, "category": category, "attributes": {"occluded": False, "truncated": False, **attributes},
            "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}}


def _write_clip(batch_dir: Path, video: str, split: str | None, frames, *, missing=(), entries=()) -> None:
    """A clip's label file and images: frames are (name stem, frameIndex, labels); names in
    `missing` get no image, `entries` are added to the label file as they are."""
    folder = [split] if split else []
    labels = [{"name": f"{stem}.jpg", "videoName": video, "frameIndex": index, "labels": objects}
              for stem, index, objects in frames]
    label_path = batch_dir.joinpath("labels", "box_track_20", *folder, f"{video}.json")
    label_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.write_text(json.dumps(labels + list(entries)))
    for stem, _, _ in frames:
        if stem not in missing:
            image = batch_dir.joinpath("images", "track", *folder, video, f"{stem}.jpg")
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(_jpeg())


def test_each_clip_rule_quarantines_with_its_reason_and_the_good_frames_land(tmp_path):
    landing = tmp_path / "landing"
    first = landing / "first"
    _write_clip(first, "vid-a", "train", [(f"a-{i}", i, [_label("1", "car")]) for i in range(3)])
    (first / READY_MARKER).write_text("")
    conn = storage.connect(str(tmp_path / "db"))
    ingest.ingest_batches(conn, landing, ["first"])

    bad = landing / "bad"
    _write_clip(bad, "vid-b", "train", [
        ("b-0", 0, [_label("1", "car"), _label("2", "pedestrian", (100, 20, 120, 80))]),
        ("b-1", 1, [_label("1", "pedestrian"), _label("2", "pedestrian", (100, 20, 120, 80))]),  # track 1 was a car
        ("b-1-again", 1, [_label("1", "car")]),  # frame index 1 twice
        ("b-2", 2, [_label("1", "car"), _label("1", "car", (200, 20, 260, 80))]),  # id 1 twice in the frame
        ("b-3", 3, [_label("1", "car")]),  # no image
        ("b-4", 4, [_label("1", "car")]),
    ], missing={"b-3"}, entries=[{"name": "b-5.jpg", "videoName": "vid-b", "labels": []}])  # no frameIndex
    in_val = bad / "images" / "track" / "val" / "vid-b" / "b-4.jpg"  # its folder says val, its clip's train
    in_val.parent.mkdir(parents=True)
    (bad / "images" / "track" / "train" / "vid-b" / "b-4.jpg").rename(in_val)
    _write_clip(bad, "vid-a", "val", [("a-9", 9, [_label("1", "car")])])  # vid-a is in train in the table
    _write_clip(bad, "vid-a", "train", [("a-1-dup", 1, [_label("1", "car")]),  # the table has vid-a's frame 1
                                        ("a-3", 3, [_label("1", "car")]),
                                        ("a-4", 4, [_label("1", "truck")])])  # a car in the table
    _write_clip(bad, "vid-c", "train", [("c-0", 0, [_label("1", "car")]),
                                        ("c-1", 1, [_label("1", "car")])])
    (bad / READY_MARKER).write_text("")
    [summary] = ingest.ingest_batches(conn, landing, ["bad"])

    assert _quarantine(conn, "bad") == {
        ("vid-b.json#b-1/0", "track_category_changed"),
        ("vid-b.json#b-1-again", "repeated_frame_index"),
        ("vid-b.json#b-2/1", "repeated_track_id"),
        ("vid-b.json#b-3", "label_without_image"),
        ("vid-b.json#6", "malformed_frame"),
        ("vid-b.json#b-4", "clip_split_conflict"),
        ("vid-a.json#a-9", "clip_split_conflict"),
        ("vid-a.json#a-1-dup", "repeated_frame_index"),
        ("vid-a.json#a-4/0", "track_category_changed"),
    }
    rows = {r["image_id"]: r for r in _frames(conn, "batch_id = 'bad'")}
    assert set(rows) == {"b-0", "b-1", "b-2", "c-0", "c-1", "a-3", "a-4"} and summary.ingested == 7
    assert rows["b-1"]["ann_track_ids"] == ["2"] and rows["b-2"]["ann_track_ids"] == ["1"]
    assert rows["a-4"]["ann_track_ids"] == [] and rows["a-3"]["ann_categories"] == ["car"]
    assert {r["split"] for r in rows.values()} == {"train"}
    assert ingest_checks.clips_in_two_splits(conn.open_table(storage.FRAMES_TABLE)) == []


def test_a_detection_image_is_a_frame_of_the_clip_its_stem_names(tmp_path):
    """BDD100K's 100k images are frames of the videos their stems name, in those videos' splits;
    YOLO frames have no clip."""
    landing = tmp_path / "landing"
    batch = landing / "mixed"
    _write_clip(batch, "vid-x", "val", [("vid-x-0000001", 0, [_label("1", "car")])])
    _write_clip(batch, "vid-y", "val", [("vid-y-0000001", 0, [_label("1", "car")])])
    detections = {"train": ["vid-y", "solo"], "val": ["vid-x"]}  # vid-y's image in the wrong split
    for split, stems in detections.items():
        for stem in stems:
            image = batch / "images" / "100k" / split / f"{stem}.jpg"
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(_jpeg())
        entries = [{"name": f"{stem}.jpg", "attributes": {}, "labels": [_label("1", "car")]} for stem in stems]
        (batch / "labels" / f"det_{split}.json").write_text(json.dumps(entries))
    (batch / READY_MARKER).write_text("")
    yolo = landing / "yolo"
    (yolo / "images" / "train").mkdir(parents=True)
    (yolo / "images" / "train" / "y1.jpg").write_bytes(_jpeg())
    (yolo / "labels" / "train").mkdir(parents=True)
    (yolo / "labels" / "train" / "y1.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (yolo / "data.yaml").write_text("names: [car]\n")
    (yolo / READY_MARKER).write_text("")
    conn = storage.connect(str(tmp_path / "db"))
    ingest.ingest_batches(conn, landing)

    rows = {r["image_id"]: r for r in _frames(conn)}
    assert {k: (r["clip_id"], r["clip_frame_index"], r["split"]) for k, r in rows.items()} == {
        "vid-x-0000001": ("vid-x", 0, "val"), "vid-y-0000001": ("vid-y", 0, "val"),
        "vid-x": ("vid-x", None, "val"), "solo": ("solo", None, "train"), "y1": (None, None, "train")}
    assert rows["vid-x"]["ann_track_ids"] is None and rows["vid-x"]["ann_crowd"] == [False]
    assert _quarantine(conn, "mixed") == {("det_train.json#vid-y", "clip_split_conflict")}


def _crowd_table(tmp_path):
    """One MOT frame holding a pedestrian, a crowd region and an `other vehicle`."""
    batch = tmp_path / "landing" / "crowd"
    _write_clip(batch, "vid-c", "val", [("vid-c-0000001", 0, [
        _label("1", "pedestrian", (20, 20, 60, 120)),
        _label("2", "pedestrian", (150, 40, 250, 120), crowd=True),
        _label("3", "other vehicle", (260, 60, 310, 110)),
    ])])
    (batch / READY_MARKER).write_text("")
    conn = storage.connect(str(tmp_path / "db"))
    ingest.ingest_batches(conn, tmp_path / "landing")
    return str(tmp_path / "db"), conn.open_table(storage.FRAMES_TABLE)


def test_ignore_regions_are_kept_never_trained_on_and_reach_the_metric_as_iscrowd(tmp_path):
    uri, table = _crowd_table(tmp_path)
    [row] = table.to_lance().to_table(columns=["ann_categories", "ann_crowd", "ann_track_ids"]).to_pylist()
    assert row == {"ann_categories": ["pedestrian", "pedestrian", "car"], "ann_crowd": [False, True, True],
                   "ann_track_ids": ["1", "2", "3"]}

    [(_, [target], _)] = list(comparison.view_batches(uri, storage.FRAMES_TABLE, table.version))
    assert target["iscrowd"].tolist() == [0, 1, 1]
    person, car = COCO_IDS["pedestrian"], COCO_IDS["car"]
    prediction = {"boxes": torch.tensor([[20.0, 20, 60, 120], [160, 45, 200, 115], [262, 62, 308, 108]]),
                  "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([person, person, car])}
    errors = match_frame(prediction, target, [COCO_NAMES.get(i, "") for i in range(91)])
    assert (errors.per_class[person].gt, errors.per_class[person].fp, errors.per_class[person].misses) == (1, 0, 0)
    assert (errors.per_class[car].gt, errors.per_class[car].fp) == (0, 0)
    metrics = compute_metrics([prediction], [target], {person: ["pedestrian"]})
    assert metrics["mode"]["map_50"] == 1.0  # the detections inside the ignore regions cost nothing

    collate = loader.DecodeCollate(loader.train_transform(180, 320))
    batch = table.to_lance().to_batches(columns=loader.read_columns(table))
    [trained] = collate(next(iter(batch))).targets
    assert trained["labels"].tolist() == [person] and "iscrowd" not in trained



def test_the_split_check_finds_a_planted_clip_in_two_splits_reading_only_the_new_rows_clips(tmp_path):
    landing = tmp_path / "landing"
    synthetic.write_clip_batch(landing, "b1", 3, 3, seed=1, **SIZE)
    conn = storage.connect(str(tmp_path / "db"))
    ingest.ingest_batches(conn, landing)
    table = conn.open_table(storage.FRAMES_TABLE)
    assert ingest_checks.clips_in_two_splits(table) == []

    row = table.to_lance().to_table(filter="clip_frame_index = 0").slice(0, 1)  # a write that bypassed ingestion
    clip, split = row["clip_id"][0].as_py(), row["split"][0].as_py()
    planted = row.set_column(row.schema.get_field_index("image_id"), "image_id", pa.array(["planted"]))
    planted = planted.set_column(planted.schema.get_field_index("split"), "split",
                                 pa.array(["val" if split == "train" else "train"]))
    planted = planted.set_column(planted.schema.get_field_index("ingest_seq"), "ingest_seq", pa.array([1000], pa.int64()))
    table.add(planted)
    assert ingest_checks.clips_in_two_splits(table, storage.rows_since(1000)) == [clip]
    assert ingest_checks.clips_in_two_splits(table) == [clip]
    assert ingest_checks.clips_in_two_splits(table, storage.rows_since(1001)) == []  # no new row, no clip to read


def _old_schema_table(tmp_path) -> tuple[str, object]:
    """A frames table as tables were created before clips: the old schema, frames of a det batch."""
    landing = tmp_path / "landing"
    synthetic.write_batch(landing, "old", 6, seed=1, **SIZE)
    scratch = storage.connect(str(tmp_path / "scratch"))
    ingest.ingest_batches(scratch, landing)
    rows = scratch.open_table(storage.FRAMES_TABLE).to_lance().to_table(columns=OLD_SCHEMA.names)
    uri = str(tmp_path / "db")
    table = storage.open_or_create(storage.connect(uri), storage.FRAMES_TABLE, OLD_SCHEMA)
    table.add(rows.cast(OLD_SCHEMA))
    return uri, table


def test_a_table_from_before_clips_is_read_and_gains_the_clip_columns_at_the_next_ingest(tmp_path):
    uri, table = _old_schema_table(tmp_path)
    assert not set(NEW_COLUMNS) & set(table.schema.names)
    old_version = table.version
    share = selection.Share(50, held_out=True)
    old_ids = table.to_lance().to_table(columns=["image_id"])["image_id"].to_pylist()
    view = loader.ViewRef(uri, storage.FRAMES_TABLE, old_version, share=share)
    assert loader.image_ids(view) == [i for i, kept in zip(old_ids, share.keeps(old_ids, None)) if kept]
    assert sum(len(t) for _, t, _ in comparison.view_batches(uri, storage.FRAMES_TABLE, old_version)) == 6
    assert ingest_checks.clips_in_two_splits(table) == []

    synthetic.write_clip_batch(tmp_path / "landing", "clips", 4, 3, seed=2, **SIZE)
    conn = storage.connect(uri)
    [summary] = ingest.ingest_batches(conn, tmp_path / "landing", ["clips"])
    assert summary.ingested == 12
    rows = _frames(conn)
    old = [r for r in rows if r["batch_id"] == "old"]
    assert len(old) == 6 and all(r[c] is None for r in old for c in NEW_COLUMNS)
    assert all(r["clip_id"] and r["ann_crowd"] is not None for r in rows if r["batch_id"] == "clips")
    pinned = loader.ViewRef(uri, storage.FRAMES_TABLE, old_version, share=share)  # earlier versions read as before
    assert loader.image_ids(pinned) == loader.image_ids(view)


def test_the_loader_splits_selection_frames_by_clip(tmp_path):
    """Held-out frames are chosen by clip where the table has clips: a clip is on one side whole."""
    landing = tmp_path / "landing"
    synthetic.write_clip_batch(landing, "clips", 10, 3, seed=4, **SIZE)
    uri = str(tmp_path / "db")
    conn = storage.connect(uri)
    ingest.ingest_batches(conn, landing)
    version = conn.open_table(storage.FRAMES_TABLE).version
    rows = {r["image_id"]: r["clip_id"] for r in _frames(conn)}
    held = set(loader.image_ids(loader.ViewRef(uri, storage.FRAMES_TABLE, version, share=selection.Share(50, True))))
    kept = set(loader.image_ids(loader.ViewRef(uri, storage.FRAMES_TABLE, version, share=selection.Share(50, False))))
    assert held and kept and held | kept == set(rows) and not held & kept
    assert held == {i for i, clip in rows.items() if selection.bucket(i, clip) < 50}
    assert not {rows[i] for i in held} & {rows[i] for i in kept}


def test_the_clip_generator_is_deterministic_and_its_tracks_persist_and_move(tmp_path):
    one = synthetic.write_clip_batch(tmp_path / "a", "c1", 3, 8, seed=7, **SIZE)
    two = synthetic.write_clip_batch(tmp_path / "b", "c1", 3, 8, seed=7, **SIZE)
    other = synthetic.write_clip_batch(tmp_path / "c", "c2", 3, 8, seed=7, **SIZE)
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert files(one) == files(two)
    assert not set(_label_files(one)) & set(_label_files(other))  # video names differ by batch
    for video, (split, frames) in _label_files(one).items():
        assert split in ("train", "val") and [f["frameIndex"] for f in frames] == list(range(8))
        assert [f["name"] for f in frames] == [f"{video}-{k:07d}.jpg" for k in range(1, 9)]
        tracks = defaultdict(list)  # id → (category, box) in each frame it is in view
        for frame in frames:
            for label in frame["labels"]:
                tracks[label["id"]].append((label["category"], tuple(label["box2d"].values())))
        assert any(len(seen) == 8 for seen in tracks.values())  # an object in every frame, one id
        for seen in tracks.values():
            assert len({category for category, _ in seen}) == 1
        assert any(len({box for _, box in seen}) > 1 for seen in tracks.values())  # they move
    with pytest.raises(FileExistsError):
        synthetic.write_clip_batch(tmp_path / "a", "c1", 1, 1)
