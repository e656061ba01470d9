"""The closed loop on the smallest configuration that proves it (one failure mode, tiny frames,
one training step): footage lands → ingest → incremental backfill → view refresh → retrain once
the mode's train view grew past the policy → re-evaluation, driven by the sensors."""

import json

import dagster as dg
import pytest

from avperception_assets.curation import columns as curation, maintenance
from avperception_assets import synthetic
from avperception_assets.slices import views as slices
from avperception_assets.storage import tables as storage
from avperception_assets.model import training
from avperception_assets.defs import (curation_assets, evaluation_assets, ingest_assets, maintenance_assets, sensors,
                                      slice_assets, training_assets)
from avperception_assets.defs.names import latest_metadata
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.failure_modes.registry import default_failure_modes
from avperception_assets.workspace import Workspace

from .conftest import copy_curated_db, source_ids, view_ids

pytestmark = [pytest.mark.ray, pytest.mark.dagster_run, pytest.mark.training]

MODES = default_failure_modes()[:1]  # rider: each view refresh is a Geneva job; the choice among modes is test_sensors'.
DEFS = dg.Definitions.merge(
    ingest_assets.defs, curation_assets.build_curation_defs(MODES), slice_assets.build_slice_defs(MODES),
    training_assets.build_training_defs(MODES), evaluation_assets.build_evaluation_defs(MODES),
    evaluation_assets.build_base_report_defs(MODES),
    sensors.build_sensor_defs(MODES), maintenance_assets.build_maintenance_defs(MODES),
    dg.Definitions(resources={"workspace": WorkspaceResource()}),
)
FRAME_SIZE = dict(width=320, height=180)
# The first rider train view holds 6 frames, one in hash bucket 1 and none other below 22; batch 2
# adds 2, in buckets 31 and 91. A 6 % share holds out that one frame, in both trainings.
TINY_TRAINING = {"config": {"epochs": 1, "max_steps_per_epoch": 1, "batch_size": 2, "min_size": 96,
                            "max_size": 160, "num_workers": 0, "selection_pct": 6}}
TRAINING_ASSETS = ["base_detector", *(f"{m.name}_checkpoint" for m in MODES)]
VIEWS = [slices.view_name(m, split) for m in MODES for split in slices.SPLITS]


def _execute(instance, request: dg.RunRequest, selection: dg.AssetSelection | None = None):
    """Run what a sensor asked for, in process, with the tiny training recipe."""
    selection = selection if selection is not None else dg.AssetSelection.assets(*request.asset_selection)
    keys = selection.resolve(DEFS.resolve_asset_graph())
    ops = dict((request.run_config or {}).get("ops", {}))
    if any(key.to_user_string() in curation.COLUMNS for key in keys):  # one applier per job on 2 cores
        # The curated table's source, also where COCO weights sit in the torch hub cache.
        ops["curation_columns"] = {"config": {"concurrency": 1, "person_area_source": curation.SOURCE_ANNOTATIONS}}
    ops.update({name: TINY_TRAINING for name in TRAINING_ASSETS if dg.AssetKey(name) in keys})
    if dg.AssetKey("table_maintenance") in keys:  # clean up every unpinned version
        ops["table_maintenance"] = {"config": {"keep_minutes": 0}}
    result = dg.materialize([*DEFS.assets, *DEFS.asset_checks], selection=selection, instance=instance,
                            resources={"workspace": WorkspaceResource()}, run_config={"ops": ops}, tags=request.tags)
    assert result.success
    return result


def _tick(sensor, instance) -> list[dg.RunRequest]:
    with dg.build_sensor_context(instance=instance, resources={"workspace": WorkspaceResource()}) as context:
        result = sensor(context)
        return result if isinstance(result, list) else []


def _metadata(instance, key: str) -> dict:
    return latest_metadata(instance, dg.AssetKey(key))


@pytest.fixture(scope="module")
def loop(tmp_path_factory, local_ray, curated_db):
    """The session's curated table (batch b1, ingested and curated once: conftest) gets its views
    and first training; then batch 2 lands and the sensors drive every run. The state is read by
    the tests below (the loop's own decisions, and the views and columns it left)."""
    state = {}
    with pytest.MonkeyPatch.context() as patch, dg.instance_for_test() as instance:
        root = tmp_path_factory.mktemp("loop")
        patch.setenv("AVP_DATA_DIR", str(root))  # the resource's default, as in a deployment
        workspace = Workspace(data_location=str(root))
        copy_curated_db(curated_db, root)
        footage_sensor = next(s for s in DEFS.sensors if s.name == "new_footage_sensor")
        growth_sensor = next(s for s in DEFS.sensors if s.name == "slice_growth_sensor")
        # Batch 1: the views are created, then the first training of the mode.
        state["footage_1"] = _execute(instance, dg.RunRequest(asset_selection=[dg.AssetKey(v) for v in VIEWS]))
        state["views_1"] = {view: _metadata(instance, view) for view in VIEWS}
        state["requests_after_ingest"] = _tick(footage_sensor, instance)
        state["first_training"] = _tick(growth_sensor, instance)
        _execute(instance, state["first_training"][0])
        state["before"] = {m.name: _metadata(instance, f"bdd100k_{m.name}_train") for m in MODES}
        state["first_checkpoints"] = {m.name: _metadata(instance, f"{m.name}_checkpoint") for m in MODES}
        state["first_orders"] = {m: training.reproduce_order(c["checkpoint_dir"])
                                 for m, c in state["first_checkpoints"].items()}
        state["requests_without_growth"] = _tick(growth_sensor, instance)

        # Batch 2 lands: only its rows are backfilled and every view refreshes.
        automation = dg.evaluate_automation_conditions(defs=DEFS, instance=instance)
        synthetic.write_batch(workspace.landing_dir, "batch-2", 40, seed=12, **FRAME_SIZE)
        [request] = _tick(footage_sensor, instance)
        state["footage_2_key"] = request.run_key
        state["footage_2"] = _execute(instance, request, sensors.FOOTAGE_SELECTION)
        state["automation_after_footage_run"] = dg.evaluate_automation_conditions(
            defs=DEFS, instance=instance, cursor=automation.cursor).total_requested
        state["columns_2"] = {c: _metadata(instance, c) for c in curation.COLUMNS}
        state["maintenance_2"] = _metadata(instance, "table_maintenance")
        # After compaction and cleanup, each first checkpoint still reproduces its order.
        state["orders_after_cleanup"] = {m: training.reproduce_order(c["checkpoint_dir"])
                                         for m, c in state["first_checkpoints"].items()}
        state["views_2"] = {view: _metadata(instance, view) for view in VIEWS}
        after = {m.name: state["views_2"][f"bdd100k_{m.name}_train"] for m in MODES}
        growth = {m: after[m]["dagster/row_count"] - state["before"][m]["dagster/row_count"] for m in after}
        state.update(after=after, growth=growth)

        # Retrain only when the train view grew by at least the threshold: not one row short of it.
        [grown] = growth.values()
        assert grown > 0, f"batch 2 must grow the train view: {growth}"
        patch.setenv("AVP_RETRAIN_MIN_GROWTH", "0")
        patch.setenv("AVP_RETRAIN_MIN_NEW_ROWS", str(grown + 1))
        state["requests_below_threshold"] = _tick(growth_sensor, instance)
        patch.setenv("AVP_RETRAIN_MIN_NEW_ROWS", str(grown))
        state["retrain_requests"] = _tick(growth_sensor, instance)
        for retrain in state["retrain_requests"]:
            _execute(instance, retrain)
        state["requests_after_retrain"] = _tick(growth_sensor, instance)
        state["checkpoints"] = {m.name: _metadata(instance, f"{m.name}_checkpoint") for m in MODES}
        state["reports"] = {m.name: _metadata(instance, f"{m.name}_eval_report") for m in MODES}
        # Re-running a view with nothing new is safe: no job, nothing appended.
        state["rerun"] = _execute(instance, dg.RunRequest(asset_selection=[dg.AssetKey(VIEWS[1])]))
        state["conn"] = storage.connect(workspace.lancedb_uri)
        state["frames_version_2"] = state["conn"].open_table(storage.FRAMES_TABLE).version
        # Maintenance again, alone: the indexes exist and take any new rows, none is rebuilt.
        _execute(instance, dg.RunRequest(asset_selection=[dg.AssetKey("table_maintenance")]))
        state["maintenance_3"] = _metadata(instance, "table_maintenance")
        state["report_files"] = {m.name: [json.loads(p.read_text()) for p in workspace.reports_dir_for(m.name).rglob(
            "report.json")] for m in MODES}
        yield state


def test_new_footage_retrains_the_mode_once_it_grew_past_the_policy(loop):
    assert loop["requests_after_ingest"] == []  # an ingested batch is never requested again
    assert "base_detector" in [k.to_user_string() for k in loop["first_training"][0].asset_selection]
    assert loop["requests_without_growth"] == []  # nothing grew since the first training
    assert loop["footage_2_key"] == "batch-2"
    assert loop["automation_after_footage_run"] == 0  # declarative automation never runs a stage twice
    [mode] = loop["growth"]
    before, after = loop["before"][mode], loop["after"][mode]
    assert after["view_version"] > before["view_version"]
    assert loop["requests_below_threshold"] == []
    assert [r.tags["avp/failure_modes"] for r in loop["retrain_requests"]] == [mode]
    assert loop["requests_after_retrain"] == []  # the same growth never retrains twice
    checkpoint, report = loop["checkpoints"][mode], loop["reports"][mode]
    # Pinned to the new version, report rewritten for it.
    assert checkpoint["train_view_version"] == report["train_view_version"] == after["view_version"]
    # Its best epoch chosen on a frame of the Geneva view held out from training, as it was counted.
    assert (checkpoint["train_rows"], checkpoint["selection_rows"]) == (7, 1)
    assert checkpoint["dagster/row_count"] == after["dagster/row_count"]
    data = json.loads(open(report["report_json"]).read())
    assert data["val_view"]["version"] == report["val_view_version"]


def test_the_second_batch_fills_only_its_rows_of_every_column(loop):
    rows = loop["conn"].open_table(storage.FRAMES_TABLE).count_rows()
    for column, meta in loop["columns_2"].items():
        assert meta["rows_processed"] == 40 and meta["rows_total"] == rows, column
        assert meta["coverage"] == 1.0 and meta["error_rows"] == 0 and meta["elapsed_s"] > 0, column
    assert loop["columns_2"]["person_bbox_area_pct"]["source"] == curation.SOURCE_ANNOTATIONS


def test_views_hold_the_source_filtered_the_same_way_at_every_version(loop):
    conn = loop["conn"]
    for mode in MODES:
        for split in slices.SPLITS:
            name, sql = slices.view_name(mode, split), slices.view_filter(mode, split)
            meta = loop["views_2"][name]
            assert view_ids(slices.open_view(conn, name)) == source_ids(conn, sql)
            # The refresh appended exactly batch 2's qualifying rows.
            assert meta["rows_added"] == len(source_ids(conn, f"({sql}) AND batch_id = 'batch-2'")), name
            assert meta["filter"] == sql and meta["dagster/row_count"] == meta["row_count"]
            assert meta["source_version"] == loop["frames_version_2"]
            assert slices.check_view(conn, mode, split).passed
        # Time travel: the version the first checkpoint recorded still reads the rows it trained on.
        name = slices.view_name(mode, "train")
        assert view_ids(slices.open_view(conn, name, loop["before"][mode.name]["view_version"])) == source_ids(
            conn, slices.view_filter(mode, "train"), loop["first_checkpoints"][mode.name]["source_table_version"])
    assert sum(loop["views_2"][v]["rows_added"] for v in VIEWS) > 0
    for name, meta in loop["views_1"].items():  # the first run created every view from batch 1
        assert meta["created"] and meta["rows_added"] == meta["row_count"] > 0, name


def test_every_check_of_the_footage_runs_passes(loop):
    for run, assets in (("footage_1", set(VIEWS)), ("footage_2", {"raw_frames", *curation.COLUMNS, *VIEWS})):
        evaluations = loop[run].get_asset_check_evaluations()
        assert {e.asset_key.to_user_string() for e in evaluations} == assets, run
        assert [(e.asset_key, e.check_name) for e in evaluations if not e.passed] == []
    evaluations = loop["footage_2"].get_asset_check_evaluations()
    on_columns = [e for e in evaluations if e.asset_key.to_user_string() in curation.COLUMNS]
    assert len(on_columns) == len(curation_assets.build_curation_checks(MODES))


def test_rerunning_a_current_view_is_safe(loop):
    [materialization] = loop["rerun"].asset_materializations_for_node("slice_views")
    assert materialization.metadata["refreshed"].value is False
    assert materialization.metadata["rows_added"].value == 0


def test_maintenance_after_each_footage_run_keeps_what_is_pinned(loop):
    """Compaction and cleanup (every unpinned version) ran with batch 1 and batch 2: the
    versions the first checkpoints recorded survive and reproduce the same order, the next
    refresh still appended only new rows (above), and the scalar indexes exist."""
    meta = loop["maintenance_2"]
    assert set(maintenance.COLUMN_INDEXES) <= set(meta["frames_indexes"])
    stats = meta["stats"]
    frames = stats[storage.FRAMES_TABLE]
    assert frames["versions_after"] < frames["versions_before"]
    assert {c["source_table_version"] for c in loop["first_checkpoints"].values()} <= set(frames["pinned_versions"])
    assert loop["maintenance_3"]["stats"][storage.FRAMES_TABLE]["indexes_created"] == []
    for mode, checkpoint in loop["first_checkpoints"].items():
        assert checkpoint["train_view_version"] in stats[checkpoint["train_view"]]["pinned_versions"]
        assert loop["orders_after_cleanup"][mode] == loop["first_orders"][mode] != []


def test_each_reports_frame_errors_survive_maintenance_at_its_version(loop):
    """Every report (before and after the retrain) wrote its frames to `<mode>_eval_frames`; the
    version it records is pinned by maintenance and still holds that report's frames."""
    stats = loop["maintenance_3"]["stats"]
    for mode in MODES:
        written = loop["report_files"][mode.name]
        assert written, mode.name
        table = loop["conn"].open_table(f"{mode.name}_eval_frames")
        for report in written:
            frames = report["eval_frames"]
            assert frames["table"] == table.name
            assert frames["version"] in stats[table.name]["pinned_versions"]
            table.checkout(frames["version"])
            assert table.count_rows() == frames["rows"] == 2 * report["num_images"]
            assert table.schema.metadata[b"val_view_version"] == str(report["val_view"]["version"]).encode()
