"""The curation multi_asset materialized for real: Geneva backfills on the session's local Ray."""

from __future__ import annotations

import dagster as dg
import pytest

from avperception_assets import curation, ingest, storage, synthetic
from avperception_assets.defs import curation_assets
from avperception_assets.defs.resources import LanceDBResource

from .conftest import copy_curated_db

NEW_ROWS = 3
CONFIG = {"ops": {"curation_columns": {"config": {"person_area_source": "annotations", "concurrency": 1}}}}


def _materialize(resource, instance, selection=None):
    return dg.materialize(
        [curation_assets.curation_columns, *curation_assets.CURATION_CHECKS],
        selection=selection, resources={"lancedb": resource}, instance=instance, run_config=CONFIG)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, curated_db):
    """New footage lands on the curated table; a run of two columns, then a run of all of them."""
    conn, landing = copy_curated_db(curated_db, tmp_path_factory.mktemp("curation_assets"))
    resource = LanceDBResource(uri=str(landing.parent / "lancedb"))
    synthetic.write_batch(landing, "b2", NEW_ROWS, seed=12, width=640, height=360)
    ingest.ingest_batches(conn, landing)
    table = conn.open_table(storage.FRAMES_TABLE)
    with dg.instance_for_test() as instance:
        subset = _materialize(resource, instance, selection=["dhash", "is_duplicate"])
        nulls_after_subset = table.count_rows("has_person IS NULL")
        full = _materialize(resource, instance)
        yield dict(full=full, subset=subset, nulls_after_subset=nulls_after_subset, table=table)


def _materializations(result) -> dict[str, dict]:
    return {m.asset_key.path[-1]: m.metadata for m in result.asset_materializations_for_node("curation_columns")}


def test_subset_backfills_only_the_new_rows_of_selected_columns(runs):
    assert runs["subset"].success
    metadata = _materializations(runs["subset"])
    assert set(metadata) == {"dhash", "is_duplicate"}
    assert all(m["rows_processed"].value == NEW_ROWS and m["coverage"].value == 1.0 for m in metadata.values())
    assert runs["nulls_after_subset"] == NEW_ROWS  # not selected: untouched
    checks = {(e.asset_key.path[-1], e.check_name) for e in runs["subset"].get_asset_check_evaluations()}
    assert checks == {("dhash", "full_coverage"), ("is_duplicate", "full_coverage"),
                      ("is_duplicate", "one_survivor_per_group")}


def test_a_run_of_every_column_fills_what_is_pending_with_metadata(runs):
    assert runs["full"].success
    metadata = _materializations(runs["full"])
    assert set(metadata) == set(curation.COLUMNS)
    rows = runs["table"].count_rows()
    for name, meta in metadata.items():
        pending = 0 if name in ("dhash", "is_duplicate") else NEW_ROWS  # the subset run filled those
        assert meta["rows_processed"].value == pending and meta["rows_total"].value == rows, name
        assert meta["coverage"].value == 1.0 and meta["error_rows"].value == 0
        assert meta["elapsed_s"].value > 0
    assert metadata["person_bbox_area_pct"]["source"].value == "annotations"


def test_every_check_runs_and_passes(runs):
    evaluations = runs["full"].get_asset_check_evaluations()
    assert len(evaluations) == len(curation_assets.CURATION_CHECKS) == 11
    failed = [(e.asset_key, e.check_name, e.metadata) for e in evaluations if not e.passed]
    assert not failed


def test_missing_table_is_a_clear_failure(tmp_path):
    resource = LanceDBResource(uri=str(tmp_path / "empty"))
    with dg.instance_for_test() as instance:
        result = dg.materialize([curation_assets.curation_columns], resources={"lancedb": resource},
                                instance=instance, run_config=CONFIG, raise_on_error=False)
    assert not result.success
    assert "materialize raw_frames first" in str(result.all_events)
