"""Geneva 0.17's patches (`patches.geneva`): each one's symptom on the installed Geneva, which a
test here shows, so that once an upgrade fixes it the test fails and says the patch can go;
and what each patch mends."""

import inspect
import logging
import threading

import geneva
import lance
import pyarrow as pa
import pytest

from avperception_assets.curation import udfs as curation_udfs
from avperception_assets.patches import geneva as geneva_patches
from avperception_assets.storage import tables as storage

FILTER = "split = 'train' AND x >= 10"


def frames(start: int, n: int) -> pa.Table:
    ids = range(start, start + n)
    return pa.table({"frame_id": [f"f{i}" for i in ids], "split": ["train" if i % 2 else "val" for i in ids],
                     "x": pa.array([float(i) for i in ids], pa.float32())})


def expected(n: int) -> dict[str, float]:
    return {f"f{i}": float(i) for i in range(n) if i % 2 and i >= 10}


def view_rows(view) -> dict[str, float]:
    view.checkout_latest()
    rows = view.to_arrow()
    return dict(zip(rows["frame_id"].to_pylist(), rows["x"].to_pylist()))


def data_files(view) -> dict[int, tuple[str, ...]]:
    view.checkout_latest()
    return {f.fragment_id: tuple(d.path for d in f.data_files()) for f in view.to_lance().get_fragments()}


def refresh(view, source) -> None:
    geneva_patches.release_job_tracker(view.refresh(src_version=source.version, concurrency=1).job_id)


# --- geneva.view_checkpoints ------------------------------------------------------------


def test_geneva_still_maps_stable_row_ids_to_no_source_fragment():
    """The symptom's cause: for a view over a source with stable row ids, Geneva's own mapping
    names no source fragment, so every view fragment's checkpoint misses on each refresh."""
    from geneva.runners.ray import pipeline

    extract = inspect.unwrap(pipeline._extract_fragment_ids_from_row_ids)  # Geneva's, patched or not
    assert extract([(3 << 32) | 5], 1) == {3}  # row-address views it maps
    assert extract([0, 1, (3 << 32) | 5], geneva_patches.STABLE_ROW_ID_VIEW) == set(), (
        "Geneva maps stable row ids to source fragments now: if a refresh no longer re-copies every view "
        "fragment, delete geneva.view_checkpoints")


def test_source_fragments_of_follows_rows_through_compaction(tmp_path):
    dataset = lance.write_dataset(frames(0, 6), tmp_path / "t.lance", max_rows_per_file=2, enable_stable_row_ids=True)
    lookup = geneva_patches.source_fragments_of(dataset)
    assert lookup([0, 1]) == {0} and lookup([1, 4]) == {0, 2} and lookup([]) == set()
    dataset.delete("frame_id = 'f5'")
    dataset.optimize.compact_files(target_rows_per_fragment=100)
    lookup = geneva_patches.source_fragments_of(lance.dataset(tmp_path / "t.lance"))
    (fragment,) = lookup([0, 4])
    assert fragment > 2 and lookup([5, 99]) == set()  # deleted and unknown ids hold no fragment


def test_a_refresh_copies_only_new_rows_and_rows_a_compaction_moved(tmp_path, local_ray):
    conn = storage.connect(str(tmp_path))
    source = conn.create_table("frames", frames(0, 200), storage_options=storage.STABLE_ROW_IDS)
    view = conn.create_materialized_view(
        "train_view", source.search().select({"frame_id": "frame_id", "x": "coalesce(x)"}).where(FILTER))
    refresh(view, source)
    source.add(frames(200, 50))
    first = data_files(view)
    refresh(view, source)
    second = data_files(view)
    assert {f: second[f] for f in first} == first  # unmended, Geneva 0.17 rewrote fragment 0 here
    assert len(second) == len(first) + 1 and view_rows(view) == expected(250)

    # Compaction, as maintenance runs it before the views refresh: the small fragments (the last
    # batch and a new one) merge, so new rows land in a fragment the view draws from, while the
    # big first fragment stays as it was. The new rows are found; only the moved ones are copied.
    source.add(frames(250, 50))
    lance.dataset(source.to_lance().uri).optimize.compact_files(target_rows_per_fragment=150)
    source.checkout_latest()
    assert [f.count_rows() for f in source.to_lance().get_fragments()] == [200, 100]
    refresh(view, source)
    third = data_files(view)
    assert third[0] == first[0] and all(third[f] != second[f] for f in second if f not in first)
    assert view_rows(view) == expected(300)


# --- geneva.job_tracker -----------------------------------------------------------------


def test_a_finished_job_keeps_its_tracker_until_released(tmp_path, local_ray):
    import ray
    from geneva.runners.ray.naming import job_tracker_name

    conn = storage.connect(str(tmp_path))
    source = conn.create_table("frames", frames(0, 20), storage_options=storage.STABLE_ROW_IDS)
    view = conn.create_materialized_view("train_view", source.search().where(FILTER))
    name = job_tracker_name(view.refresh(src_version=source.version, concurrency=1).job_id)
    assert ray.get_actor(name), "Geneva ends a job's tracker itself now: delete geneva.job_tracker"
    geneva_patches.release_job_tracker(name.removeprefix("jobtracker-"))
    with pytest.raises(ValueError):
        ray.get_actor(name)


# --- geneva.error_table -----------------------------------------------------------------


def _open_error_tables_together(uri: str, drivers: int = 2) -> list[str]:
    """Open Geneva's error table from `drivers` connections at once, as concurrent backfill
    drivers do; the errors raised."""
    from geneva.debug.error_store import ErrorStore

    connections, ready, errors = [geneva.connect(uri) for _ in range(drivers)], threading.Barrier(drivers), []

    def open_error_table(connection):
        ready.wait()
        try:
            ErrorStore(connection)
        except Exception as error:  # noqa: BLE001 - whatever Geneva raises is the finding
            errors.append(repr(error))

    threads = [threading.Thread(target=open_error_table, args=(c,)) for c in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_creators_of_the_error_table_collide_on_a_fresh_database(tmp_path):
    """A collision is likely, not certain, on any one database (about one in five here): up to
    100 fresh databases are tried."""
    for n in range(100):
        if errors := _open_error_tables_together(str(tmp_path / f"db{n}")):
            assert "geneva_errors" in errors[0]
            return
    pytest.fail("100 pairs of drivers never collided creating the error table: if Geneva creates it safely "
                "now, delete geneva.error_table")


def test_once_created_the_error_table_opens_together_without_error(tmp_path):
    for n in range(20):
        table = geneva.connect(str(tmp_path / f"db{n}")).create_table("frames", frames(0, 2))
        geneva_patches.create_error_table(table)
        assert _open_error_tables_together(str(tmp_path / f"db{n}")) == []


# --- geneva.ray_cluster -----------------------------------------------------------------


def test_geneva_public_local_ray_context_takes_no_worker_setup():
    from geneva.db import Connection

    assert not inspect.signature(Connection.local_ray_context).parameters, (
        "Geneva's local_ray_context takes arguments now: if a runtime_env is one, use it instead of "
        "runners.ray._mgr (geneva.ray_cluster)")


def test_a_cluster_address_without_an_empty_manifest_needs_geneva_s_uploader(tmp_path, monkeypatch):
    """Geneva packages the local code before it connects: no Ray is reached here."""
    from geneva.runners.ray._mgr import ray_cluster

    monkeypatch.chdir(tmp_path)  # the workspace it would zip
    with pytest.raises(ValueError, match="Geneva was not initialized"):
        with ray_cluster(addr="ray://127.0.0.1:9", use_portforwarding=False):
            pass


# --- geneva.where_advisory --------------------------------------------------------------


def test_a_backfill_with_an_explicit_filter_logs_advice_the_patch_drops(tmp_path, caplog, monkeypatch):
    """Planning a backfill takes the same path as running one and needs no Ray."""
    frames = pa.table({"ann_categories": [["person"], ["car"]], "ann_crowd": [[False], [False]]})
    table = geneva.connect(str(tmp_path)).create_table("frames", frames, storage_options=storage.STABLE_ROW_IDS)
    table.add_columns({"has_person": geneva.udf(curation_udfs.has_person, data_type=pa.bool_())})
    logger = logging.getLogger("geneva.table")
    monkeypatch.setattr(logger, "filters", [])  # unpatched, whatever ran before in this process

    def advised() -> bool:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="geneva.table"):
            table.plan_backfill("has_person", where="has_person IS NULL")
        return any("explicit where filter" in r.getMessage() for r in caplog.records)

    assert advised(), "Geneva no longer advises on an explicit filter: delete geneva.where_advisory"
    geneva_patches.drop_explicit_where_advisory()
    assert not advised()
