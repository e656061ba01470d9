"""The curation multi_asset materialized for real: Geneva backfills on the session's local Ray."""

from __future__ import annotations

import dagster as dg
import pyarrow as pa
import pytest

from avperception_assets.ingest import frames as ingest
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from avperception_assets.defs import curation_assets
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.failure_modes.registry import default_failure_modes

from .conftest import copy_curated_db, write_leak_batch

pytestmark = pytest.mark.dagster_run

NEW_ROWS = 3
CONFIG = {"ops": {"curation_columns": {"config": {"person_area_source": "annotations", "concurrency": 1}}}}
CURATION_COLUMNS = curation_assets.build_curation_columns(default_failure_modes())
CURATION_CHECKS = curation_assets.build_curation_checks(default_failure_modes())


def _materialize(resource, instance, selection=None):
    return dg.materialize(
        [CURATION_COLUMNS, *CURATION_CHECKS],
        selection=selection, resources={"workspace": resource}, instance=instance, run_config=CONFIG)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, curated_db):
    """New footage lands on the curated table; a run of one of the columns. (A run of every column
    after new footage, with each check, is the end-to-end loop's: test_loop.py.)"""
    conn, landing = copy_curated_db(curated_db, tmp_path_factory.mktemp("curation_assets"))
    resource = WorkspaceResource(data_location=str(landing.parent))
    synthetic.write_batch(landing, "b2", NEW_ROWS, seed=12, width=640, height=360)
    ingest.ingest_batches(conn, landing)
    table = conn.open_table(storage.FRAMES_TABLE)
    with dg.instance_for_test() as instance:
        subset = _materialize(resource, instance, selection=["dhash"])
        nulls = {c: table.count_rows(f"{c} IS NULL") for c in ("has_person", "is_duplicate")}
        # A leak lands: a train frame again, the same bytes, as the frame of a val clip.
        [original] = table.to_lance().to_table(columns=["image_id", "image_bytes"], filter="split = 'train'",
                                                limit=1).to_pylist()
        [copy] = write_leak_batch(landing, "leak", "leak-val", "val", [original["image_bytes"]])
        ingest.ingest_batches(conn, landing, ["leak"])
        leak = _materialize(resource, instance, selection=["dhash", "is_duplicate"])
        yield dict(subset=subset, nulls_after_subset=nulls, leak=leak, leaked=(original["image_id"], copy))


def _materializations(result) -> dict[str, dict]:
    return {m.asset_key.path[-1]: m.metadata for m in result.asset_materializations_for_node("curation_columns")}


def test_subset_backfills_only_the_new_rows_of_selected_columns(runs):
    assert runs["subset"].success
    metadata = _materializations(runs["subset"])
    assert set(metadata) == {"dhash"}
    assert metadata["dhash"]["rows_processed"].value == NEW_ROWS and metadata["dhash"]["coverage"].value == 1.0
    assert runs["nulls_after_subset"] == {"has_person": NEW_ROWS, "is_duplicate": NEW_ROWS}  # not selected: untouched
    checks = {(e.asset_key.path[-1], e.check_name) for e in runs["subset"].get_asset_check_evaluations()}
    assert checks == {("dhash", "full_coverage")}


def test_a_planted_leak_fails_the_leak_check_and_the_run_goes_on(runs):
    assert runs["leak"].success  # the leak check does not block
    checks = {(e.asset_key.path[-1], e.check_name): e for e in runs["leak"].get_asset_check_evaluations()}
    leak = checks[("is_duplicate", "no_split_leaks")]
    assert not leak.passed and leak.severity == dg.AssetCheckSeverity.ERROR
    assert leak.metadata["pairs_by_dhash"].value >= 1 and leak.metadata["pairs_by_embedding"].value >= 1
    worst = leak.metadata["worst_pairs"].value[0]
    assert {f["image_id"] for f in worst["frames"]} == set(runs["leaked"]) and worst["dhash_bits"] == 0
    original = runs["leaked"][0]  # a detection image: the clip of its stem
    assert {(f["split"], f["clip_id"]) for f in worst["frames"]} == {("train", original), ("val", "leak-val")}
    assert leak.metadata["scope"].value.startswith("rows of the latest materialization")
    assert checks[("is_duplicate", "one_survivor_per_group")].passed  # the copy is flagged: another clip's


def test_a_table_from_before_clips_gains_the_columns_the_udfs_read(tmp_path):
    resource = WorkspaceResource(data_location=str(tmp_path))
    old = pa.schema([f for f in storage.FRAMES_SCHEMA if f.name != "ann_crowd"])
    storage.open_or_create(resource.connect(), storage.FRAMES_TABLE, old)
    assert "ann_crowd" in curation_assets.open_frames(resource).schema.names


def test_missing_table_is_a_clear_failure(tmp_path):
    resource = WorkspaceResource(data_location=str(tmp_path / "empty"))
    with dg.instance_for_test() as instance:
        result = dg.materialize([CURATION_COLUMNS], resources={"workspace": resource},
                                instance=instance, run_config=CONFIG, raise_on_error=False)
    assert not result.success
    assert "materialize raw_frames first" in str(result.all_events)
