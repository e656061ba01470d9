"""raw_frames materialized for real, its checks, and the new-footage sensor's ticks."""

import logging
import os
import time

import dagster as dg
import pyarrow as pa
import pytest

from avperception_assets.ingest import checks as ingest_checks
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from avperception_assets.ingest.landing import READY_MARKER
from avperception_assets.defs import audit_jobs, ingest_assets, sensors
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.failure_modes.registry import default_failure_modes

from .conftest import damaged_inside


RAW_FRAMES_DEFS = [ingest_assets.raw_frames, ingest_assets.no_duplicate_image_ids,
                   ingest_assets.boxes_inside_frames, ingest_assets.clips_in_one_split, ingest_assets.frames_decode]
NEW_FOOTAGE_SENSOR = next(s for s in sensors.build_sensor_defs(default_failure_modes()).sensors if s.name == "new_footage_sensor")


def _materialize(data_dir, run_config=None):
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            RAW_FRAMES_DEFS,
            resources={"workspace": WorkspaceResource(data_location=str(data_dir))},
            instance=instance,
            run_config=run_config,
        )
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        return result, checks


@pytest.mark.dagster_run
def test_raw_frames_materializes_pending_batches_with_metadata(data_dir):
    synthetic.write_batch(data_dir / "landing", "b1", 10, seed=1)
    synthetic.write_batch(data_dir / "landing", "b2", 6, seed=2)
    result, checks = _materialize(data_dir)
    assert result.success
    [materialization] = result.asset_materializations_for_node("raw_frames")
    metadata = materialization.metadata
    assert metadata["ingested"].value == 16 and metadata["rows_total"].value == 16
    assert metadata["quarantined"].value == 0
    assert set(checks) == {"no_duplicate_image_ids", "boxes_inside_frames", "clips_in_one_split", "frames_decode"}
    assert all(c.passed for c in checks.values())

    again, _ = _materialize(data_dir)  # nothing pending: safe to re-run
    [materialization] = again.asset_materializations_for_node("raw_frames")
    assert materialization.metadata["ingested"].value == 0
    assert materialization.metadata["rows_total"].value == 16


@pytest.mark.dagster_run
def test_raw_frames_reports_quarantine_counts_by_reason_and_refused_batches(data_dir):
    batch = synthetic.write_batch(data_dir / "landing", "b1", 5, seed=1)
    next(batch.rglob("*.jpg")).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    mixed = synthetic.write_batch(data_dir / "landing", "b2", 2, seed=2)
    (mixed / "data.yaml").write_text("names: [car]\n")  # BDD labels and a YOLO class file: ambiguous
    with dg.instance_for_test() as instance:
        result = dg.materialize(RAW_FRAMES_DEFS, instance=instance,
                                resources={"workspace": WorkspaceResource(data_location=str(data_dir))},
                                run_config={"ops": {"raw_frames": {"config": {"batch_ids": ["b1", "b2"]}}}})
        errors = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.ERROR]
    [materialization] = result.asset_materializations_for_node("raw_frames")
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    assert metadata["ingested"] == 4
    assert metadata["quarantined_corrupt_image"] == 1 and metadata["quarantined_ambiguous_layout"] == 1
    assert metadata["refused"] == 1 and list(metadata["refused_batches"]) == ["b2"]
    assert "ambiguous_layout" in metadata["refused_batches"]["b2"]
    assert any("b2" in message and "refused" in message for message in errors)


@pytest.mark.dagster_run
def test_duplicate_check_fails_on_a_table_with_a_repeated_id(data_dir):
    synthetic.write_batch(data_dir / "landing", "b1", 3, seed=1)
    _materialize(data_dir)
    table = storage.connect(str(data_dir / "lancedb")).open_table(storage.FRAMES_TABLE)
    table.add(table.to_lance().to_table().slice(0, 1))  # a write that bypassed ingestion
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            RAW_FRAMES_DEFS, instance=instance, raise_on_error=False,
            resources={"workspace": WorkspaceResource(data_location=str(data_dir))},
            selection=dg.AssetSelection.checks_for_assets(ingest_assets.raw_frames),
        )
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["no_duplicate_image_ids"].passed
    assert checks["boxes_inside_frames"].passed


@pytest.mark.dagster_run
def test_a_clip_planted_in_two_splits_fails_the_blocking_check_and_stops_what_follows(data_dir):
    """A run whose rows would put one clip in two splits stops at raw_frames: its blocking check
    fails, and the asset downstream of raw_frames is not materialized."""
    synthetic.write_clip_batch(data_dir / "landing", "clips", 2, 3, seed=1, width=320, height=180)
    result, checks = _materialize(data_dir)
    assert checks["clips_in_one_split"].passed
    table = storage.connect(str(data_dir / "lancedb")).open_table(storage.FRAMES_TABLE)
    row = table.to_lance().to_table(filter="clip_frame_index = 0").slice(0, 1)
    clip, split = row["clip_id"][0].as_py(), row["split"][0].as_py()
    for name, value in (("image_id", "planted"), ("split", "val" if split == "train" else "train")):
        row = row.set_column(row.schema.get_field_index(name), name, pa.array([value]))
    table.add(row)  # a write that bypassed ingestion

    @dg.asset(deps=[ingest_assets.raw_frames])
    def downstream() -> None:
        pass

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*RAW_FRAMES_DEFS, downstream], instance=instance, raise_on_error=False,
            resources={"workspace": WorkspaceResource(data_location=str(data_dir))},
            selection=dg.AssetSelection.checks_for_assets(ingest_assets.raw_frames) | dg.AssetSelection.assets(downstream),
        )
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["clips_in_one_split"].passed
    assert checks["clips_in_one_split"].metadata["examples"].value == [clip]
    assert not result.asset_materializations_for_node("downstream")


def _tick(data_dir, instance) -> list[dg.RunRequest]:
    with dg.build_sensor_context(
        instance=instance, resources={"workspace": WorkspaceResource(data_location=str(data_dir))},
    ) as context:
        result = NEW_FOOTAGE_SENSOR(context)
        return result if isinstance(result, list) else []


def test_sensor_requests_one_run_per_ready_batch_keyed_by_batch_id(data_dir):
    """Dagster launches one run per run key: a batch requested again on a later tick while its
    run is queued is skipped by the daemon, so the key must be the batch id."""
    landing = data_dir / "landing"
    with dg.instance_for_test() as instance:
        assert _tick(data_dir, instance) == []  # empty landing zone

        synthetic.write_batch(landing, "b1", 2, seed=1)
        copying = synthetic.write_batch(landing, "b2", 2, seed=2)
        (copying / READY_MARKER).unlink()  # still copying: must not be read
        [request] = _tick(data_dir, instance)
        assert request.run_key == "b1" and request.tags["avp/batch_id"] == "b1"
        assert request.run_config["ops"]["raw_frames"]["config"]["batch_ids"] == ["b1"]

        (copying / READY_MARKER).write_text("")
        late = synthetic.write_batch(landing, "a0-late", 2, seed=3)
        old = time.time() - 30 * 24 * 3600  # landed late but carries an old mtime (cp -p)
        for path in [late, *late.rglob("*")]:
            os.utime(path, (old, old))
        assert [r.run_key for r in _tick(data_dir, instance)] == ["a0-late", "b1", "b2"]


@pytest.mark.dagster_run
def test_sensor_skips_batches_already_ingested(data_dir):
    synthetic.write_batch(data_dir / "landing", "b1", 2, seed=1)
    _materialize(data_dir)
    with dg.instance_for_test() as instance:
        assert _tick(data_dir, instance) == []


@pytest.mark.dagster_run
def test_checks_look_at_the_run_rows_and_the_audit_job_at_every_row(data_dir, monkeypatch):
    """A frame damaged inside its image data (it passes ingestion) is reported by the checks of
    the run that added it, not by a later run's, whose checks decode only that run's frames;
    the whole-table audit finds it at any time."""
    batch = synthetic.write_batch(data_dir / "landing", "b1", 4, seed=1)
    bad = next(batch.rglob("*.jpg"))
    bad.write_bytes(damaged_inside(bad.read_bytes()))
    decoded = []
    real = ingest_checks._decodes
    monkeypatch.setattr(ingest_checks, "_decodes", lambda data: decoded.append(1) or real(data))
    resources = {"workspace": WorkspaceResource(data_location=str(data_dir))}
    with dg.instance_for_test() as instance:
        first = dg.materialize(RAW_FRAMES_DEFS, resources=resources, instance=instance)
        checks = {c.check_name: c for c in first.get_asset_check_evaluations()}
        assert not checks["frames_decode"].passed and checks["frames_decode"].metadata["rows_checked"].value == 4
        assert checks["frames_decode"].metadata["examples"].value == [bad.stem]
        assert len(decoded) == 4

        synthetic.write_batch(data_dir / "landing", "b2", 3, seed=2)
        decoded.clear()
        second = dg.materialize(RAW_FRAMES_DEFS, resources=resources, instance=instance)
        checks = {c.check_name: c for c in second.get_asset_check_evaluations()}
        assert all(c.passed for c in checks.values())
        assert {c.metadata["rows_checked"].value for c in checks.values()} == {3}
        assert len(decoded) == 3  # the run's frames only, not the table's 7

        audit = audit_jobs.build_frames_audit(default_failure_modes()).execute_in_process(resources=resources,
                                                                                         instance=instance)
        audits = audit.output_for_node("audit_frames_table")["audits"]
        assert audits["frames_decode"] == {"passed": False, "count": 1, "examples": [bad.stem]}
        assert audits["no_duplicate_image_ids"]["passed"] and audits["boxes_inside_frames"]["passed"]


@pytest.mark.dagster_run
def test_a_hand_materialized_raw_frames_requests_what_follows_it(data_dir):
    """Declarative automation (`footage_automation_sensor` under the daemon): after raw_frames is
    materialized by hand, everything the footage sensor's run would have updated is requested,
    in one tick (the loop test shows that a footage run leaves nothing to request)."""
    from avperception_assets.definitions import defs
    from avperception_assets.defs.sensors import FOOTAGE_SELECTION

    synthetic.write_batch(data_dir / "landing", "b1", 3, seed=1)
    with dg.instance_for_test() as instance:
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0  # nothing to follow yet
        dg.materialize(RAW_FRAMES_DEFS, instance=instance,
                       resources={"workspace": WorkspaceResource(data_location=str(data_dir))})
        after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        requested = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()
                     if after.get_requested_partitions(key)}
        follows = {key.to_user_string() for key in FOOTAGE_SELECTION.resolve(defs.resolve_asset_graph())}
        assert requested == follows - {"raw_frames"} and "table_maintenance" in requested
