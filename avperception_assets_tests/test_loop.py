"""The closed loop on a tiny configuration: footage lands → ingest → incremental backfill →
view refresh → retrain of exactly the modes that grew → re-evaluation, driven by the sensors."""

import json

import dagster as dg

from avperception_assets import settings, synthetic
from avperception_assets.defs import sensors as sensor_defs
from avperception_assets.defs.resources import LanceDBResource
from avperception_assets.definitions import defs
from avperception_assets.failure_modes import FAILURE_MODES

TINY_TRAINING = {"config": {"epochs": 1, "max_steps_per_epoch": 1, "batch_size": 2, "min_size": 128,
                            "max_size": 224, "num_workers": 0}}
TRAINING_ASSETS = ["base_detector", *(f"{m.name}_checkpoint" for m in FAILURE_MODES)]


def _execute(instance, request: dg.RunRequest, selection: dg.AssetSelection | None = None):
    """Run what a sensor asked for, in process, with the tiny training recipe."""
    selection = selection if selection is not None else dg.AssetSelection.assets(*request.asset_selection)
    keys = selection.resolve(defs.get_repository_def().asset_graph)
    ops = dict(request.run_config.get("ops", {}))
    ops.update({name: TINY_TRAINING for name in TRAINING_ASSETS if dg.AssetKey(name) in keys})
    result = dg.materialize([*defs.assets, *defs.asset_checks], selection=selection, instance=instance,
                            resources={"lancedb": LanceDBResource()}, run_config={"ops": ops}, tags=request.tags)
    assert result.success
    return result


def _tick(sensor, instance, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor,
                                 resources={"lancedb": LanceDBResource()}) as context:
        result = sensor(context)
        return (result if isinstance(result, list) else []), context.cursor


def _metadata(instance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_new_footage_retrains_exactly_the_modes_that_grew(data_dir, monkeypatch):
    growth_sensor = next(s for s in defs.sensors if s.name == "slice_growth_sensor")
    with dg.instance_for_test() as instance:
        # Batch 1 lands: one ingestion run, then the first training of every mode.
        synthetic.write_batch(settings.landing_dir(), "batch-1", 80, seed=11)
        [request], cursor = _tick(sensor_defs.new_footage_sensor, instance)
        _execute(instance, request, sensor_defs.FOOTAGE_SELECTION)
        [first_training], _ = _tick(growth_sensor, instance)
        assert "base_detector" in [k.to_user_string() for k in first_training.asset_selection]
        _execute(instance, first_training)
        before = {m.name: _metadata(instance, f"bdd100k_{m.name}_train") for m in FAILURE_MODES}
        reports_before = {m.name: _metadata(instance, f"{m.name}_eval_report") for m in FAILURE_MODES}
        assert _tick(growth_sensor, instance)[0] == []  # nothing grew since

        # Batch 2 lands: only its rows are backfilled and every view refreshes.
        synthetic.write_batch(settings.landing_dir(), "batch-2", 40, seed=12)
        [request], cursor = _tick(sensor_defs.new_footage_sensor, instance, cursor)
        assert request.run_key == "batch-2"
        _execute(instance, request, sensor_defs.FOOTAGE_SELECTION)
        for column in ("has_person", "has_rider", "person_bbox_area_pct", "dhash", "is_duplicate"):
            assert _metadata(instance, column)["rows_processed"] == 40, column
        after = {m.name: _metadata(instance, f"bdd100k_{m.name}_train") for m in FAILURE_MODES}
        growth = {m: after[m]["dagster/row_count"] - before[m]["dagster/row_count"] for m in after}
        assert all(after[m]["view_version"] > before[m]["view_version"] for m in after if growth[m])

        # Retrain only where the train view grew by at least the threshold.
        assert len(set(growth.values())) > 1, f"need modes that grew differently to tell them apart: {growth}"
        threshold = max(growth.values())
        monkeypatch.setenv("AVP_RETRAIN_MIN_NEW_ROWS", str(threshold))
        monkeypatch.setenv("AVP_RETRAIN_MIN_GROWTH", "0")
        requests, _ = _tick(growth_sensor, instance)
        retrained = {m for m in growth if growth[m] >= threshold}
        assert {r.tags["avp/failure_modes"] for r in requests} == retrained
        for request in requests:
            _execute(instance, request)
        assert _tick(growth_sensor, instance)[0] == []  # the same growth never retrains twice

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
