"""The curation multi_asset materialized for real: Geneva backfills on the session's local Ray."""

from __future__ import annotations

import dagster as dg
import pytest

from avperception_assets import curation, ingest, storage, synthetic
from avperception_assets.defs import curation_assets
from avperception_assets.defs.resources import LanceDBResource

CONFIG = {"ops": {"curation_columns": {"config": {"person_area_source": "annotations", "concurrency": 1}}}}


def _materialize(resource, instance, selection=None):
    return dg.materialize(
        [curation_assets.curation_columns, *curation_assets.CURATION_CHECKS],
        selection=selection, resources={"lancedb": resource}, instance=instance, run_config=CONFIG)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, local_ray):
    root = tmp_path_factory.mktemp("curation_assets")
    landing = root / "landing"
    resource = LanceDBResource(uri=str(root / "lancedb"))
    synthetic.write_batch(landing, "b1", 8, seed=11, width=640, height=360)
    ingest.ingest_batches(resource.connect(), landing)
    with dg.instance_for_test() as instance:
        full = _materialize(resource, instance)
        synthetic.write_batch(landing, "b2", 3, seed=12, width=640, height=360)
        ingest.ingest_batches(resource.connect(), landing)
        subset = _materialize(resource, instance, selection=["dhash", "is_duplicate"])
        yield dict(full=full, subset=subset, table=resource.connect().open_table(storage.FRAMES_TABLE))


def _materializations(result) -> dict[str, dict]:
    return {m.asset_key.path[-1]: m.metadata for m in result.asset_materializations_for_node("curation_columns")}


def test_full_run_materializes_every_column_with_metadata(runs):
    assert runs["full"].success
    metadata = _materializations(runs["full"])
    assert set(metadata) == set(curation.COLUMNS)
    for name, meta in metadata.items():
        assert meta["rows_processed"].value == 8 and meta["rows_total"].value == 8, name
        assert meta["coverage"].value == 1.0 and meta["error_rows"].value == 0
        assert meta["elapsed_s"].value > 0
    assert metadata["person_bbox_area_pct"]["source"].value == "annotations"


def test_every_check_runs_and_passes(runs):
    evaluations = runs["full"].get_asset_check_evaluations()
    assert len(evaluations) == len(curation_assets.CURATION_CHECKS) == 11
    failed = [(e.asset_key, e.check_name, e.metadata) for e in evaluations if not e.passed]
    assert not failed


def test_subset_backfills_only_the_new_rows_of_selected_columns(runs):
    assert runs["subset"].success
    metadata = _materializations(runs["subset"])
    assert set(metadata) == {"dhash", "is_duplicate"}
    assert all(m["rows_processed"].value == 3 and m["coverage"].value == 1.0 for m in metadata.values())
    table = runs["table"]
    assert table.count_rows("has_person IS NULL") == 3  # not selected: untouched
    checks = {(e.asset_key.path[-1], e.check_name) for e in runs["subset"].get_asset_check_evaluations()}
    assert checks == {("dhash", "full_coverage"), ("is_duplicate", "full_coverage"),
                      ("is_duplicate", "one_survivor_per_group")}


def test_definitions_shape():
    asset = curation_assets.curation_columns
    assert {k.path[-1] for k in asset.keys} == set(curation.COLUMNS)
    assert all(asset.specs_by_key[k].group_name == "curation" for k in asset.keys)
    deps = {k.path[-1]: {d.asset_key.path[-1] for d in asset.specs_by_key[k].deps} for k in asset.keys}
    assert deps["is_duplicate"] == {"raw_frames", "dhash"}
    assert all(deps[name] == {"raw_frames"} for name in curation.COLUMNS if name != "is_duplicate")
    assert asset.can_subset
    blocking = [spec for check in curation_assets.CURATION_CHECKS for spec in check.check_specs if spec.blocking]
    assert len(blocking) == 11


def test_missing_table_is_a_clear_failure(tmp_path):
    resource = LanceDBResource(uri=str(tmp_path / "empty"))
    with dg.instance_for_test() as instance:
        result = dg.materialize([curation_assets.curation_columns], resources={"lancedb": resource},
                                instance=instance, run_config=CONFIG, raise_on_error=False)
    assert not result.success
    assert "materialize raw_frames first" in str(result.all_events)
