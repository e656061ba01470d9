"""Near-duplicates on footage: `is_duplicate` across clips only, the leak check across splits, and
the annotation columns' crowd regions, on synthetic clips curated by real Geneva backfills.

One module fixture does the expensive part once: a batch of clips lands and is curated; then a
batch planting a leak (a train clip's frames, the same bytes and a 1-pixel change, as a val clip)
lands and is curated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from avperception_assets import synthetic
from avperception_assets.curation import checks as curation_checks, columns as curation, leaks, udfs
from avperception_assets.discovery.vector_index import vectors_matrix
from avperception_assets.formats.taxonomy import PERSON_CLASSES
from avperception_assets.ingest import frames as ingest
from avperception_assets.storage import tables as storage

from .conftest import one_pixel_changed, write_leak_batch

SIZE = {"width": 320, "height": 180}
CONFIG = curation.CurationConfig(person_area_source=curation.SOURCE_ANNOTATIONS, concurrency=1)
THRESHOLD = CONFIG.dup_threshold


def _rows(table, where: str | None = None) -> list[dict]:
    columns = ["image_id", "ingest_seq", "split", "clip_id", "clip_frame_index", "dhash", "embedding", "is_duplicate",
               "ann_categories", "ann_bboxes", "ann_crowd", "width", "height", *udfs.AnnotationColumns._fields,
               "person_bbox_area_pct"]
    return sorted(table.to_lance().to_table(columns=columns, filter=where).to_pylist(), key=lambda r: r["ingest_seq"])


@pytest.fixture(scope="module")
def footage(tmp_path_factory, local_ray):
    root = tmp_path_factory.mktemp("leaks")
    landing = root / "landing"
    synthetic.write_clip_batch(landing, "b1", 6, 5, seed=31, val_fraction=0.5, **SIZE)  # crowds in two clips
    conn = storage.connect(str(root / "db"))
    ingest.ingest_batches(conn, landing)
    table = conn.open_table(storage.FRAMES_TABLE)
    curation.backfill_columns(table, config=CONFIG)
    clean = curation_checks.check_split_leaks(table)

    # The leak: the first two frames of a train clip land again as a val clip, the first as the
    # same bytes, the second with one pixel changed.
    source = [r for r in _rows(table) if r["split"] == "train" and r["clip_frame_index"] in (0, 1)]
    source = sorted((r for r in source if r["clip_id"] == source[0]["clip_id"]), key=lambda r: r["clip_frame_index"])
    images = [_image_bytes(landing / "b1", source[0]), one_pixel_changed(_image_bytes(landing / "b1", source[1]))]
    first_new = max(r["ingest_seq"] for r in _rows(table)) + 1
    planted = write_leak_batch(landing, "b2", "leak-val", "val", images)
    ingest.ingest_batches(conn, landing, ["b2"])
    table.checkout_latest()
    curation.backfill_columns(table, config=CONFIG)
    return dict(table=table, clean=clean, source=[r["image_id"] for r in source], source_clip=source[0]["clip_id"],
                planted=planted,
                new_rows=storage.rows_since(first_new), b1=f"ingest_seq < {first_new}")


def _image_bytes(batch: Path, row: dict) -> bytes:
    [path] = batch.rglob(f"{row['image_id']}.jpg")
    return path.read_bytes()


def test_frames_of_one_clip_never_flag_each_other(footage):
    rows = _rows(footage["table"], footage["b1"])
    by_clip: dict[str, list[dict]] = {}
    for row in rows:
        by_clip.setdefault(row["clip_id"], []).append(row)
    consecutive = [int(udfs.hamming(a["dhash"], b["dhash"])) for clip in by_clip.values()
                   for a, b in zip(clip, clip[1:])]
    assert min(consecutive) <= THRESHOLD  # alike by nature: the old rule would have flagged them
    assert not any(r["is_duplicate"] for r in rows)
    assert curation_checks.check_duplicate_groups(footage["table"]).passed


def test_a_copy_in_another_clip_is_a_duplicate(footage):
    flags = {r["image_id"]: r["is_duplicate"] for r in _rows(footage["table"])}
    assert [flags[i] for i in footage["planted"]] == [True, True]
    assert [flags[i] for i in footage["source"]] == [False, False]  # the earlier frames survive


def test_clean_clips_pass_the_leak_check(footage):
    clean = footage["clean"]
    assert clean.passed, clean.metadata
    assert clean.metadata["rows_checked"] == 30 and clean.metadata["leak_pairs"] == 0
    assert clean.metadata["worst_pairs"] == []


def test_a_planted_leak_fails_the_check_with_the_pair_listed(footage):
    outcome = curation_checks.check_split_leaks(footage["table"], footage["new_rows"])
    meta = outcome.metadata
    assert not outcome.passed
    assert meta["rows_checked"] == 2  # the run's rows only are searched from
    assert meta["pairs_by_dhash"] >= 2 and meta["pairs_by_embedding"] >= 2
    listed = {tuple(f["image_id"] for f in pair["frames"]): pair for pair in meta["worst_pairs"]}
    for source, planted in zip(footage["source"], footage["planted"]):
        pair = listed.get((source, planted)) or listed[(planted, source)]
        assert {f["split"] for f in pair["frames"]} == {"train", "val"}
        assert {f["clip_id"] for f in pair["frames"]} == {"leak-val", footage["source_clip"]}
        assert pair["dhash_bits"] <= THRESHOLD and pair["cosine_distance"] <= leaks.LEAK_COSINE_DISTANCE
    assert listed[(footage["source"][0], footage["planted"][0])]["dhash_bits"] == 0  # the same bytes
    distances = [p["cosine_distance"] for p in meta["worst_pairs"]]
    assert distances == sorted(distances)


def test_every_pair_across_splits_is_counted_once(footage):
    """The whole table (both frames of a leak pair selected) against a brute-force count."""
    rows = _rows(footage["table"])
    hashes = np.array([r["dhash"] for r in rows], dtype=np.uint64)
    vectors = vectors_matrix(pa.array([r["embedding"] for r in rows], pa.list_(pa.float32(), len(rows[0]["embedding"]))))
    splits = np.array([r["split"] for r in rows])
    across = np.triu(splits[:, None] != splits[None, :], k=1)
    by_dhash = across & (udfs.hamming(hashes[:, None], hashes[None, :]) <= THRESHOLD)
    by_embedding = across & (1.0 - vectors @ vectors.T <= leaks.LEAK_COSINE_DISTANCE)
    found = leaks.find_leaks(footage["table"], None, THRESHOLD)
    assert (len(found.by_dhash), len(found.by_embedding), found.pairs) == (
        by_dhash.sum(), by_embedding.sum(), (by_dhash | by_embedding).sum())
    assert by_dhash.sum() >= 2


def test_no_selected_row_no_search(footage):
    outcome = curation_checks.check_split_leaks(footage["table"], "false")
    assert outcome.passed and outcome.metadata["rows_checked"] == 0


def test_duplicate_flags_compare_frames_of_other_clips_only():
    # Five frames with one hash: two of clip a, one of clip b, two without a clip.
    seqs = np.arange(5)
    clips = udfs.clip_keys(pa.array(["a", "a", "b", None, None]), seqs)
    assert clips[0] == clips[1] != clips[2] and len(set(clips[2:].tolist())) == 3
    hashes = np.full(5, 0b1011, dtype=np.uint64)
    flags = udfs.duplicate_flags(hashes, seqs, clips, hashes, seqs, clips, threshold=0)
    assert flags.tolist() == [False, False, True, True, True]
    far = hashes ^ np.uint64(0b111)  # three bits away
    assert not udfs.duplicate_flags(far, seqs + 10, clips + 1, hashes, seqs, clips, threshold=2).any()
    assert udfs.duplicate_flags(far, seqs + 10, clips + 1, hashes, seqs, clips, threshold=3).all()


def test_near_hashes_finds_every_pair_within_the_threshold_in_bounded_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, (40, 3)).astype(np.uint64)  # 1-3 bits from a reference
    hashes = np.concatenate([refs[:40] ^ np.bitwise_xor.reduce(flips, axis=1), rng.integers(0, 2**63, 60, dtype=np.uint64)])
    brute = udfs.hamming(hashes[:, None], refs[None, :])
    expected = set(zip(*np.nonzero(brute <= 3)))
    monkeypatch.setattr(udfs, "_PAIRS_AT_ONCE", 7 * len(refs))  # 15 chunks of 7 rows
    rows, cols, bits = udfs.near_hashes(hashes, refs, 3)
    assert set(zip(rows.tolist(), cols.tolist())) == {(int(i), int(j)) for i, j in expected} and len(rows) == len(expected)
    assert (bits == brute[rows, cols]).all() and len(expected) >= 40


def test_crowd_boxes_are_no_objects_in_the_annotation_columns(footage):
    rows = _rows(footage["table"])
    crowded = [r for r in rows if any(r["ann_crowd"] or [])]
    assert any(c in PERSON_CLASSES for r in crowded for c, is_crowd in zip(r["ann_categories"], r["ann_crowd"])
               if is_crowd)  # the synthetic crowd regions are pedestrians
    for row in rows:
        objects = [(c, b) for c, b, is_crowd in zip(row["ann_categories"], row["ann_bboxes"], row["ann_crowd"])
                   if not is_crowd]
        persons = [b for c, b in objects if c in PERSON_CLASSES]
        assert row["num_persons"] == len(persons) and row["has_person"] == bool(persons), row["image_id"]
        assert row["has_rider"] == any(c == "rider" for c, _ in objects)
        largest = max(((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in persons), default=0.0)
        assert row["person_bbox_area_pct"] == pytest.approx(100 * largest / (row["width"] * row["height"]), rel=1e-5)
    for name in udfs.AnnotationColumns._fields:
        assert curation_checks.check_annotation_consistency(footage["table"], name).passed


def test_crowd_boxes_are_left_out_of_scene_descriptions():
    categories, crowd = np.array(["pedestrian", "pedestrian", "car"]), np.array([False, True, False])
    assert udfs.scene_description("night", None, None, categories, crowd) == "night; 1 pedestrian, 1 car"
    assert udfs.scene_description("night", None, None, categories, None) == "night; 2 pedestrians, 1 car"
    assert udfs.count_persons(categories, crowd) == 1 and not udfs.has_person(categories[1:2], crowd[1:2])
