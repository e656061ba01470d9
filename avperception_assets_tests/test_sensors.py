"""slice_growth_sensor on a real instance with three failure modes: it asks to retrain exactly the
modes whose train view grew past the policy. (The end-to-end loop drives it after real footage.)"""

import dagster as dg
import pytest

from avperception_assets.defs import sensors
from avperception_assets.defs.names import BASE_DETECTOR, checkpoint_key, view_key
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.failure_modes.registry import default_failure_modes

GROWTH_SENSOR = next(s for s in sensors.build_sensor_defs(default_failure_modes()).sensors if s.name == "slice_growth_sensor")
# mode -> (train view version, rows): every checkpoint saw version 3 with 100 rows.
VIEWS = {"rider": (5, 150), "nighttime_person": (5, 105), "distant_person": (3, 100)}


def _report(instance, key: dg.AssetKey, **metadata) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, metadata=metadata))


def _tick(instance, tmp_path):
    policy = WorkspaceResource(data_location=str(tmp_path), retrain_min_new_rows=20, retrain_min_growth=0)
    with dg.build_sensor_context(instance=instance, resources={"workspace": policy}) as context:
        return GROWTH_SENSOR(context)


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        for mode, (version, rows) in VIEWS.items():
            _report(instance, view_key(mode, "train"), view_version=version, **{"dagster/row_count": rows})
        yield instance


def _trained(instance, mode: str, version: int, rows: int) -> None:
    _report(instance, checkpoint_key(mode), train_view_version=version, **{"dagster/row_count": rows})


def test_only_the_modes_grown_past_the_policy_retrain_once(instance, tmp_path):
    _report(instance, BASE_DETECTOR)
    for mode in VIEWS:
        _trained(instance, mode, 3, 100)
    [request] = _tick(instance, tmp_path)  # rider grew by 50, nighttime_person by 5, distant_person not at all
    assert request.run_key == "rider@5" and request.tags["avp/failure_modes"] == "rider"
    assert request.tags["dagster/max_runtime"] == str(2 * 3600)  # the cpu profile's limit (no CUDA here)
    assert [k.to_user_string() for k in request.asset_selection] == [
        "rider_checkpoint", "rider_eval_report", "base_detector_report", "failure_mode_summary"]
    _trained(instance, "rider", 5, 150)
    assert isinstance(_tick(instance, tmp_path), dg.SkipReason)  # the same growth never retrains twice


def test_without_a_base_detector_one_run_trains_it_and_every_mode(instance, tmp_path):
    requests = _tick(instance, tmp_path)
    assert [r.tags["avp/failure_modes"] for r in requests] == ["distant_person,nighttime_person,rider"]
    assert requests[0].asset_selection[0] == BASE_DETECTOR
