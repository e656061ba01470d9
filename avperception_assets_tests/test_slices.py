"""Failure-mode registry and slice views: real bdd100k table, real Geneva backfills and views."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from avperception_assets.curation import columns as curation
from avperception_assets.evaluation import comparison as evaluation
from avperception_assets.failure_modes import registry as failure_modes
from avperception_assets.ingest import frames as ingest
from avperception_assets.model import loader
from avperception_assets.storage import pixels, tables as storage
from avperception_assets.slices import views as slices
from avperception_assets import synthetic
from avperception_assets.storage.decoding import decode
from avperception_assets.failure_modes.registry import FailureMode, FailureModeError, default_failure_modes
from avperception_assets_tests.conftest import copy_curated_db, source_ids, view_ids

DEFAULT_MODES = default_failure_modes()
RIDER = DEFAULT_MODES[0]


def refresh(conn, mode, split):
    return slices.refresh_views(conn, [(mode, split)])[slices.view_name(mode, split)]


# --- registry (no Ray) ----------------------------------------------------------------------


def test_default_registry():
    assert [m.name for m in DEFAULT_MODES] == ["rider", "nighttime_person", "distant_person"]
    rider, night, distant = DEFAULT_MODES
    assert rider.filter == "has_rider = true" and set(rider.classes) == {"rider", "bicycle", "motorcycle"}
    assert night.columns == ("timeofday", "has_person") and night.curation_columns == ("has_person",)
    assert distant.curation_columns == ("has_person", "person_bbox_area_pct")
    assert distant.filter == "has_person = true AND person_bbox_area_pct < 0.5"


def test_curation_fields_match_curation_columns():
    assert set(failure_modes.CURATION_COLUMNS) == set(curation.COLUMNS)


@pytest.mark.parametrize("sql, says", [
    ("has_persn = true", "No field named has_persn"),
    ("has_person = = true", "sql parser error"),
    ("num_persons + 1", "does not return a boolean"),
    ("person_bbox_area_pct < 'far'", "could not convert"),
    ("has_rider = true; DROP TABLE bdd100k", "one expression only"),
    ("  ", "non-empty"),
])
def test_bad_filter_names_the_mode(sql, says):
    with pytest.raises(FailureModeError, match="'broken_mode'") as info:
        FailureMode("broken_mode", sql, ("pedestrian",))
    assert says in str(info.value)


def test_bad_entries_rejected():
    with pytest.raises(FailureModeError, match="det_20"):
        FailureMode("cats", "has_person = true", ("cat",))
    with pytest.raises(FailureModeError, match="lower-case"):
        FailureMode("Bad Name", "has_person = true", ("pedestrian",))
    with pytest.raises(FailureModeError, match="repeated"):
        failure_modes.check_registry([RIDER, RIDER])
    with pytest.raises(FailureModeError, match="finetune_epochs"):
        FailureMode("longer", "has_person = true", ("pedestrian",), finetune_epochs=0)
    with pytest.raises(FailureModeError, match="'tiled', field 'tiling': must be a Tiling"):
        FailureMode("tiled", "has_person = true", ("pedestrian",), tiling=448)
    for size, overlap in ((0, 0.2), (448, 1.0), (448.0, 0.2)):
        with pytest.raises(ValueError, match="tile_size|overlap"):
            failure_modes.Tiling(size, overlap)


def test_filter_columns_are_what_it_reads():
    assert failure_modes.filter_columns("num_persons >= 2 OR weather = 'rainy'") == ("weather", "num_persons")


def test_view_names_and_filters():
    assert slices.view_name(RIDER, "train") == "bdd100k_rider_train"
    assert slices.view_name("nighttime_person", "val") == "bdd100k_nighttime_person_val"
    assert slices.view_columns(RIDER, "train") == ("has_rider", "split", "is_duplicate")
    assert slices.view_columns(RIDER, "val") == ("has_rider", "split", "dhash")
    with pytest.raises(slices.SliceError, match="unknown split"):
        slices.view_name(RIDER, "test")


def test_filters_drop_undecoded_frames_train_also_duplicates():
    """The filters' NULL semantics, evaluated by Lance: a NULL dhash (the frame did not decode
    in curation, or is not curated yet) keeps a frame out of both splits; duplicates leave
    only the train split."""
    import lance

    rows = pa.table({"split": ["train", "train", "train", "val", "val", "val"],
                     "has_rider": [True, True, True, True, None, True],
                     "dhash": pa.array([1, 2, None, 3, 4, None], pa.uint64()),
                     "is_duplicate": [False, True, None, True, False, None]})
    dataset = lance.write_dataset(rows, "memory://null-semantics")
    kept = {s: dataset.count_rows(filter=slices.view_filter(RIDER, s)) for s in slices.SPLITS}
    assert kept == {"train": 1, "val": 1}


# --- real views -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table(tmp_path_factory, curated_db):
    return copy_curated_db(curated_db, tmp_path_factory.mktemp("slices"))


@pytest.fixture(scope="module")
def first(table):
    """The rider val view created on the curated table. (The end-to-end loop test creates and
    refreshes both splits' views after new footage and checks every row against the source:
    test_loop.py.)"""
    conn, _ = table
    return slices.refresh_views(conn, [(RIDER, "val")])


def test_views_hold_the_source_filtered_the_same_way(table, first):
    conn, _ = table
    source_version = conn.open_table(storage.FRAMES_TABLE).version
    stats = first["bdd100k_rider_val"]
    view = slices.open_view(conn, stats.view)
    expected = source_ids(conn, slices.view_filter(RIDER, "val"))
    assert view_ids(view) == expected and len(expected) > 0  # the footage has riders in val
    assert stats.row_count == stats.rows_added == len(expected)
    assert stats.created and stats.refreshed and not stats.recreated
    assert stats.source_version == source_version and stats.view_version == view.version
    assert stats.filter == slices.view_filter(RIDER, "val") == slices.view_filter_of(view)
    assert slices.check_view(conn, RIDER, "val").passed


def test_views_hold_no_image_bytes_and_readers_get_the_source_pixels(table, first):
    """The loader (in a spawned worker) and evaluation take each row's bytes from the frames
    table by the view's stable row ids; pixels and labels equal the source's."""
    conn, landing = table
    name, uri = first["bdd100k_rider_val"].view, str(landing.parent / "lancedb")
    assert pixels.IMAGE_BYTES not in slices.open_view(conn, name).schema.names
    source = conn.open_table(storage.FRAMES_TABLE).to_arrow()
    expected = {row["image_id"]: row for row in source.to_pylist()}
    view = loader.pin_view(uri, name)
    seen = []
    for batches in (loader.make_loader(view, batch_size=2, seed=3, num_workers=1),
                    evaluation.view_batches(uri, name, view.version, batch_size=2)):
        for batch in batches:
            for image, target, image_id in zip(*batch):
                row = expected[image_id]
                assert torch.equal(image, decode(row["image_bytes"]))
                want = loader.coco_target(row["ann_categories"], row["ann_bboxes"], row["width"], row["height"])
                assert torch.equal(target["labels"], want["labels"]) and torch.equal(target["boxes"], want["boxes"])
                seen.append(image_id)
    assert sorted(seen) == sorted(view_ids(slices.open_view(conn, name)) * 2)


def test_a_view_that_holds_image_bytes_is_recreated_without_them(table, first):
    """A view created before views dropped their bytes (the old select: every column)."""
    conn, _ = table
    legacy = FailureMode("legacy", "has_rider = true", RIDER.classes)
    source, name = conn.open_table(storage.FRAMES_TABLE), slices.view_name(legacy, "val")
    every_column = {f.name: f.name if f.nullable else f"coalesce({f.name})" for f in source.schema}
    conn.create_materialized_view(name, source.search().select(every_column).where(slices.view_filter(legacy, "val")))
    assert pixels.IMAGE_BYTES in conn.open_table(name).schema.names
    stats = refresh(conn, legacy, "val")
    assert stats.recreated and "image bytes" in stats.recreate_reason
    view = slices.open_view(conn, name)
    assert pixels.IMAGE_BYTES not in view.schema.names
    assert view_ids(view) == source_ids(conn, slices.view_filter(legacy, "val"))


def test_a_view_from_before_the_clip_columns_is_recreated_with_them(table, first):
    """A view created before the frames table had clips selects the columns of then: held-out
    frames would be chosen without clips and crowd regions scored as objects."""
    conn, _ = table
    legacy = FailureMode("preclips", "has_rider = true", RIDER.classes)
    source, name = conn.open_table(storage.FRAMES_TABLE), slices.view_name(legacy, "val")
    old_columns = {k: v for k, v in slices._view_select(source.schema).items()
                   if k not in ("clip_id", "clip_frame_index", "ann_track_ids", "ann_crowd")}
    conn.create_materialized_view(name, source.search().select(old_columns).where(slices.view_filter(legacy, "val")))
    stats = refresh(conn, legacy, "val")
    assert stats.recreated and "clip_id, clip_frame_index, ann_track_ids, ann_crowd" in stats.recreate_reason
    view = slices.open_view(conn, name)
    assert {"clip_id", "ann_crowd"} <= set(view.schema.names)
    assert view_ids(view) == source_ids(conn, slices.view_filter(legacy, "val"))
    assert not refresh(conn, legacy, "val").recreated  # current now: kept


def test_rows_not_yet_curated_do_not_qualify_and_a_current_view_runs_no_job(table, first):
    conn, landing = table
    synthetic.write_batch(landing, "b2", 12, seed=2, width=320, height=180)  # val rows among them
    ingest.ingest_batches(conn, landing)
    stale = slices.check_view(conn, RIDER, "val")  # not refreshed since the append: still consistent
    assert stale.passed and stale.metadata["source_version"] < conn.open_table(storage.FRAMES_TABLE).version
    early = refresh(conn, RIDER, "val")  # before the backfill the new rows' curation values are NULL
    assert early.refreshed and early.rows_added == 0 and early.source_rows_not_curated > 0
    again = refresh(conn, RIDER, "val")  # nothing new in the source: already current, no job runs
    assert not again.refreshed and again.rows_added == 0 and again.view_version == early.view_version


def test_changed_filter_recreates_the_view(table, first):
    conn, _ = table
    changed = FailureMode("rider", "has_rider = true AND timeofday = 'daytime'", RIDER.classes)
    stats = refresh(conn, changed, "val")
    assert stats.created and stats.recreated and stats.refreshed and "filter" in stats.recreate_reason
    assert stats.previous_filter == slices.view_filter(RIDER, "val")
    view = slices.open_view(conn, "bdd100k_rider_val")
    assert slices.view_filter_of(view) == slices.view_filter(changed, "val")
    assert view_ids(view) == source_ids(conn, slices.view_filter(changed, "val"))
    assert slices.check_view(conn, changed, "val").passed
    # The registry's rider filter is not what the view holds now.
    assert slices.check_view(conn, RIDER, "val").metadata["filter_matches_registry"] is False


def test_missing_curation_column_and_unknown_version_are_clear(table, first):
    conn, _ = table
    # As before the first backfill of num_persons (its UDF group's columns go together).
    conn.open_table(storage.FRAMES_TABLE).drop_columns(list(curation.UDF_GROUPS["annotation_columns"]))
    needs = FailureMode("crowded", "num_persons >= 3", ("pedestrian",))
    with pytest.raises(slices.SliceError, match="num_persons"):
        refresh(conn, needs, "val")
    with pytest.raises(slices.SliceError, match="no version 999"):
        slices.open_view(conn, "bdd100k_rider_val", 999)
    with pytest.raises(slices.SliceError, match="does not exist"):
        slices.open_view(conn, "bdd100k_nope_val")
