"""The closed loop on the smallest configuration that proves it (two failure modes, tiny frames,
one training step): footage lands → ingest → incremental backfill → view refresh → retrain of
exactly the modes that grew → re-evaluation, driven by the sensors."""

import json

import dagster as dg

from avperception_assets import settings, synthetic
from avperception_assets.defs import (curation_assets, evaluation_assets, ingest_assets, sensors, slice_assets,
                                      training_assets)
from avperception_assets.defs.resources import LanceDBResource
from avperception_assets.failure_modes import FAILURE_MODES

MODES = FAILURE_MODES[:2]  # rider, nighttime_person: each view refresh is a Geneva job
DEFS = dg.Definitions.merge(
    ingest_assets.defs, curation_assets.defs, slice_assets.build_slice_defs(MODES),
    training_assets.build_training_defs(MODES), evaluation_assets.build_evaluation_defs(MODES),
    sensors.build_sensor_defs(MODES), dg.Definitions(resources={"lancedb": LanceDBResource()}),
)
FRAME_SIZE = dict(width=320, height=180)
TINY_TRAINING = {"config": {"epochs": 1, "max_steps_per_epoch": 1, "batch_size": 2, "min_size": 96,
                            "max_size": 160, "num_workers": 0}}
TRAINING_ASSETS = ["base_detector", *(f"{m.name}_checkpoint" for m in MODES)]


def _execute(instance, request: dg.RunRequest, selection: dg.AssetSelection | None = None):
    """Run what a sensor asked for, in process, with the tiny training recipe."""
    selection = selection if selection is not None else dg.AssetSelection.assets(*request.asset_selection)
    keys = selection.resolve(DEFS.resolve_asset_graph())
    ops = dict(request.run_config.get("ops", {}))
    ops.update({name: TINY_TRAINING for name in TRAINING_ASSETS if dg.AssetKey(name) in keys})
    result = dg.materialize([*DEFS.assets, *DEFS.asset_checks], selection=selection, instance=instance,
                            resources={"lancedb": LanceDBResource()}, run_config={"ops": ops}, tags=request.tags)
    assert result.success
    return result


def _tick(sensor, instance) -> list[dg.RunRequest]:
    with dg.build_sensor_context(instance=instance, resources={"lancedb": LanceDBResource()}) as context:
        result = sensor(context)
        return result if isinstance(result, list) else []


def _metadata(instance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_new_footage_retrains_exactly_the_modes_that_grew(data_dir, local_ray, monkeypatch):
    footage_sensor = next(s for s in DEFS.sensors if s.name == "new_footage_sensor")
    growth_sensor = next(s for s in DEFS.sensors if s.name == "slice_growth_sensor")
    with dg.instance_for_test() as instance:
        # Batch 1 lands: one ingestion run, then the first training of every mode.
        synthetic.write_batch(settings.landing_dir(), "batch-1", 80, seed=11, **FRAME_SIZE)
        [request] = _tick(footage_sensor, instance)
        _execute(instance, request, sensors.FOOTAGE_SELECTION)
        assert _tick(footage_sensor, instance) == []  # ingested: never requested again
        [first_training] = _tick(growth_sensor, instance)
        assert "base_detector" in [k.to_user_string() for k in first_training.asset_selection]
        _execute(instance, first_training)
        before = {m.name: _metadata(instance, f"bdd100k_{m.name}_train") for m in MODES}
        reports_before = {m.name: _metadata(instance, f"{m.name}_eval_report") for m in MODES}
        assert _tick(growth_sensor, instance) == []  # nothing grew since

        # Batch 2 lands: only its rows are backfilled and every view refreshes.
        synthetic.write_batch(settings.landing_dir(), "batch-2", 40, seed=12, **FRAME_SIZE)
        [request] = _tick(footage_sensor, instance)
        assert request.run_key == "batch-2"
        _execute(instance, request, sensors.FOOTAGE_SELECTION)
        for column in ("has_person", "has_rider", "person_bbox_area_pct", "dhash", "is_duplicate"):
            assert _metadata(instance, column)["rows_processed"] == 40, column
        after = {m.name: _metadata(instance, f"bdd100k_{m.name}_train") for m in MODES}
        growth = {m: after[m]["dagster/row_count"] - before[m]["dagster/row_count"] for m in after}
        assert all(after[m]["view_version"] > before[m]["view_version"] for m in after if growth[m])

        # Retrain only where the train view grew by at least the threshold.
        assert len(set(growth.values())) > 1, f"need modes that grew differently to tell them apart: {growth}"
        threshold = max(growth.values())
        monkeypatch.setenv("AVP_RETRAIN_MIN_NEW_ROWS", str(threshold))
        monkeypatch.setenv("AVP_RETRAIN_MIN_GROWTH", "0")
        requests = _tick(growth_sensor, instance)
        retrained = {m for m in growth if growth[m] >= threshold}
        assert {r.tags["avp/failure_modes"] for r in requests} == retrained
        for request in requests:
            _execute(instance, request)
        assert _tick(growth_sensor, instance) == []  # the same growth never retrains twice

        for mode in growth:
            checkpoint = _metadata(instance, f"{mode}_checkpoint")
            report = _metadata(instance, f"{mode}_eval_report")
            if mode in retrained:  # pinned to the new version, report rewritten for it
                assert checkpoint["train_view_version"] == after[mode]["view_version"]
                assert report["train_view_version"] == after[mode]["view_version"]
                data = json.loads(open(report["report_json"]).read())
                assert data["val_view"]["version"] == report["val_view_version"]
            else:
                assert checkpoint["train_view_version"] == before[mode]["view_version"]
                assert report["report_json"] == reports_before[mode]["report_json"]
