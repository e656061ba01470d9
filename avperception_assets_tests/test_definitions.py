"""The graph as users see it, in one place: names, groups, dependencies, checks, pools, sensors,
and a registry entry growing the graph. Other tests materialize; this one reads the shape."""

import os
import subprocess
import sys

import dagster as dg
import pytest

from avperception_assets.defs.modes import location_modes
from avperception_assets.definitions import build_definitions, defs
from avperception_assets.failure_modes.registry import FailureMode, default_failure_modes
from avperception_assets.workspace import BASE_CHECKPOINTS, Workspace

MODES = ("rider", "nighttime_person", "distant_person")
COLUMNS = ("has_person", "has_rider", "num_persons", "scene_description", "person_bbox_area_pct", "dhash",
           "is_duplicate", "embedding", "uniqueness")
# The columns each default mode's filter reads.
MODE_COLUMNS = {"rider": {"has_rider"}, "nighttime_person": {"has_person"},
                "distant_person": {"has_person", "person_bbox_area_pct"}}
CROWD = FailureMode("crowded_night", "timeofday = 'night' AND num_persons >= 3", ("pedestrian",))
LOST_PEDESTRIAN = FailureMode("lost_pedestrian", "", ("pedestrian",), track_coverage_below=0.5)
LOOKALIKES = FailureMode("night_lookalikes", "timeofday = 'night'", ("pedestrian",), exemplars=("frame-1",),
                         max_distance=0.3)


def _graph(definitions: dg.Definitions):
    return definitions.resolve_asset_graph()


def _groups(definitions: dg.Definitions) -> dict[str, str]:
    graph = _graph(definitions)
    return {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}


def _parents(definitions: dg.Definitions) -> dict[str, set[str]]:
    graph = _graph(definitions)
    return {key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
            for key in graph.get_all_asset_keys()}


def _view_filter(definitions: dg.Definitions, view: str) -> str:
    return _graph(definitions).get(dg.AssetKey(view)).metadata["filter"]


def test_definitions_load_with_the_names_users_see():
    dg.Definitions.validate_loadable(defs)
    expected = {"raw_frames": "ingest", "base_detector": "training", "failure_mode_summary": "evaluation",
                "base_detector_report": "evaluation", "table_maintenance": "maintenance"}
    expected |= {column: "curation" for column in COLUMNS}
    for mode in MODES:
        expected |= {f"bdd100k_{mode}_train": "slices", f"bdd100k_{mode}_val": "slices",
                     f"{mode}_checkpoint": "training", f"{mode}_eval_report": "evaluation",
                     f"{mode}_onnx_model": "deployment"}
    assert _groups(defs) == expected
    assert {s.name for s in defs.sensors} == {"new_footage_sensor", "slice_growth_sensor", "footage_automation_sensor",
                                              "dead_run_sensor"}


def test_every_asset_depends_on_exactly_what_it_reads():
    expected = {"raw_frames": set(), "base_detector": {"raw_frames"},
                "failure_mode_summary": {f"{mode}_eval_report" for mode in MODES} | {"base_detector_report"},
                # the base outside every slice and inside each: the val views' frames
                "base_detector_report": {"base_detector", *(f"bdd100k_{mode}_val" for mode in MODES)}}
    expected |= {column: {"raw_frames"} for column in COLUMNS}
    expected["is_duplicate"] = {"raw_frames", "dhash"}
    expected["uniqueness"] = {"raw_frames", "embedding"}
    for mode in MODES:
        train, val = f"bdd100k_{mode}_train", f"bdd100k_{mode}_val"
        # train views drop duplicates, val views keep frames that decoded; both after maintenance
        expected[train] = {"raw_frames", "is_duplicate", "table_maintenance", *MODE_COLUMNS[mode]}
        expected[val] = {"raw_frames", "dhash", "table_maintenance", *MODE_COLUMNS[mode]}
        expected[f"{mode}_checkpoint"] = {train, "base_detector"}  # its best epoch: frames of its train view
        expected[f"{mode}_eval_report"] = {f"{mode}_checkpoint", val, "base_detector"}
        expected[f"{mode}_onnx_model"] = {f"{mode}_checkpoint"}
    expected["table_maintenance"] = {"raw_frames", *COLUMNS}
    assert _parents(defs) == expected


def test_checks_guard_every_stage_and_block_what_follows():
    graph = _graph(defs)
    checks = {(key.asset_key.to_user_string(), key.name) for key in graph.asset_check_keys}
    expected = {("raw_frames", name) for name in ("no_duplicate_image_ids", "boxes_inside_frames", "clips_in_one_split",
                                                  "frames_decode")}
    expected |= {(column, "full_coverage") for column in COLUMNS}
    expected |= {(column, "consistent_with_annotations")
                 for column in ("has_person", "has_rider", "num_persons", "scene_description")}
    expected |= {("person_bbox_area_pct", "value_range"), ("is_duplicate", "one_survivor_per_group"),
                 ("is_duplicate", "no_split_leaks"), ("embedding", "unit_vectors"), ("uniqueness", "value_range")}
    expected |= {(f"bdd100k_{mode}_{split}", "row_count_matches_source") for mode in MODES for split in ("train", "val")}
    assert checks == expected
    specs = [spec for checks_def in defs.asset_checks for spec in checks_def.check_specs]
    warn_only = {(s.asset_key.to_user_string(), s.name) for s in specs if not s.blocking}
    # Curation quarantines what does not decode; a leak fails its check and the report says so.
    assert warn_only == {("raw_frames", "frames_decode"), ("is_duplicate", "no_split_leaks")}


def test_audit_and_maintenance_have_schedules_that_users_turn_on():
    assert sorted(job.name for job in defs.jobs) == ["frame_search", "frames_audit", "slice_export"]
    schedules = {s.name: s for s in defs.schedules}
    assert set(schedules) == {"frames_audit_schedule", "table_maintenance_schedule"}
    assert schedules["frames_audit_schedule"].job_name == "frames_audit"
    assert all(s.default_status == dg.DefaultScheduleStatus.STOPPED for s in schedules.values())


def test_writers_share_one_pool_and_training_another():
    pools = {asset.node_def.name: asset.op.pool for asset in defs.assets}
    assert {name for name, pool in pools.items() if pool == "lancedb_writes"} == {
        "raw_frames", "curation_columns", "slice_views", "table_maintenance"}
    assert {name for name, pool in pools.items() if pool == "training"} == {
        "base_detector", *(f"{mode}_checkpoint" for mode in MODES)}
    subsettable = {asset.node_def.name for asset in defs.assets if asset.can_subset}
    assert subsettable == {"curation_columns", "slice_views"}  # one Ray start per run, whatever is selected


def test_a_registry_entry_adds_its_views_checkpoint_and_report():
    grown = build_definitions([*default_failure_modes(), CROWD])
    dg.Definitions.validate_loadable(grown)
    parents = _parents(grown)
    added = set(parents) - set(_parents(defs))
    assert added == {"bdd100k_crowded_night_train", "bdd100k_crowded_night_val",
                     "crowded_night_checkpoint", "crowded_night_eval_report", "crowded_night_onnx_model"}
    assert parents["bdd100k_crowded_night_val"] == {"raw_frames", "num_persons", "dhash", "table_maintenance"}
    assert parents["crowded_night_checkpoint"] == {"bdd100k_crowded_night_train", "base_detector"}
    assert "crowded_night_eval_report" in parents["failure_mode_summary"]
    assert "bdd100k_crowded_night_val" in parents["base_detector_report"]  # its slice leaves the base's "outside"


def test_a_mode_defined_by_example_adds_its_distance_column():
    grown = build_definitions([*default_failure_modes(), LOOKALIKES])
    dg.Definitions.validate_loadable(grown)
    parents, groups = _parents(grown), _groups(grown)
    assert set(parents) - set(_parents(defs)) == {
        "night_lookalikes_distance", "bdd100k_night_lookalikes_train", "bdd100k_night_lookalikes_val",
        "night_lookalikes_checkpoint", "night_lookalikes_eval_report", "night_lookalikes_onnx_model"}
    assert groups["night_lookalikes_distance"] == "curation"
    assert parents["night_lookalikes_distance"] == {"raw_frames", "embedding"}
    assert parents["bdd100k_night_lookalikes_val"] == {"raw_frames", "night_lookalikes_distance", "dhash",
                                                       "table_maintenance"}
    assert "night_lookalikes_distance" in parents["table_maintenance"]  # maintained before its views refresh


def test_a_mode_defined_by_track_coverage_adds_the_coverage_asset_and_its_job():
    assert "track_coverage" not in _parents(defs)  # no mode reads it: no run pays for the detector pass
    grown = build_definitions([*default_failure_modes(), LOST_PEDESTRIAN])
    dg.Definitions.validate_loadable(grown)
    parents, groups = _parents(grown), _groups(grown)
    assert set(parents) - set(_parents(defs)) == {
        "track_coverage", "bdd100k_lost_pedestrian_train", "bdd100k_lost_pedestrian_val",
        "lost_pedestrian_checkpoint", "lost_pedestrian_eval_report", "lost_pedestrian_onnx_model"}
    assert parents["track_coverage"] == {"raw_frames", "base_detector"} and groups["track_coverage"] == "curation"
    assert parents["bdd100k_lost_pedestrian_val"] == {"raw_frames", "track_coverage", "dhash", "table_maintenance"}
    assert "track_coverage" not in parents["bdd100k_rider_val"]
    job = grown.resolve_job_def("track_coverage_refresh")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {
        "track_coverage", "bdd100k_lost_pedestrian_train", "bdd100k_lost_pedestrian_val"}
    [pool] = {a.op.pool for a in grown.assets if a.node_def.name == "track_coverage"}
    assert pool == "lancedb_writes"


def _write_user_modes(data_dir, text: str) -> None:
    config = data_dir / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "failure_modes.toml").write_text(text)


NIGHT_RIDER = """
[modes.night_rider]
description = "Riders at night."
filter = "timeofday = 'night' AND has_rider = true"
classes = ["rider", "bicycle", "motorcycle"]
"""


def test_a_mode_in_the_users_file_adds_its_assets_without_python(tmp_path, monkeypatch):
    monkeypatch.setenv("AVP_DATA_DIR", str(tmp_path))
    _write_user_modes(tmp_path, NIGHT_RIDER)
    grown = build_definitions(location_modes())
    dg.Definitions.validate_loadable(grown)
    parents = _parents(grown)
    assert set(parents) - set(_parents(defs)) == {
        "bdd100k_night_rider_train", "bdd100k_night_rider_val", "night_rider_checkpoint", "night_rider_eval_report",
        "night_rider_onnx_model"}
    assert parents["bdd100k_night_rider_val"] == {"raw_frames", "has_rider", "dhash", "table_maintenance"}
    assert parents["night_rider_eval_report"] == {"night_rider_checkpoint", "bdd100k_night_rider_val", "base_detector"}
    assert "night_rider_eval_report" in parents["failure_mode_summary"]
    assert _view_filter(grown, "bdd100k_night_rider_train") == (
        "(timeofday = 'night' AND has_rider = true) AND split = 'train' AND is_duplicate = false")


def test_a_mode_in_the_users_file_replaces_the_default_of_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("AVP_DATA_DIR", str(tmp_path))
    _write_user_modes(tmp_path, """
[modes.distant_person]
filter = "has_person = true AND person_bbox_area_pct < 2.0"
classes = ["pedestrian"]
""")
    replaced = build_definitions(location_modes())
    assert _view_filter(defs, "bdd100k_distant_person_val") == (
        "(has_person = true AND person_bbox_area_pct < 0.5) AND split = 'val' AND dhash IS NOT NULL")
    assert _view_filter(replaced, "bdd100k_distant_person_val") == (
        "(has_person = true AND person_bbox_area_pct < 2.0) AND split = 'val' AND dhash IS NOT NULL")
    assert _parents(replaced) == _parents(defs)  # same assets, same dependencies


@pytest.mark.fresh_interpreter
def test_a_broken_users_file_fails_when_the_definitions_load_naming_file_and_line(tmp_path):
    _write_user_modes(tmp_path, NIGHT_RIDER.replace('"timeofday = \'night\' AND has_rider = true"', "has_rider"))
    env = {**os.environ, "AVP_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", "import avperception_assets.definitions"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"{tmp_path / 'config' / 'failure_modes.toml'}: TOML syntax error" in result.stderr
    assert "(at line 4, column 10)" in result.stderr  # the unquoted filter


def test_a_bad_filter_fails_when_the_definitions_load_naming_the_mode():
    with pytest.raises(ValueError, match="'rider_typo', field 'filter'.*No field named has_ridr"):
        build_definitions([FailureMode("rider_typo", "has_ridr = true", ("rider",))])


def test_embeddings_from_the_base_detector_depend_on_it(tmp_path):
    base = Workspace(data_location=str(tmp_path)).checkpoints_dir_for(BASE_CHECKPOINTS)
    on_base = Workspace(data_location=str(tmp_path), embedding_model=f"detector:{base}/3/best.pt")
    assert "base_detector" in _parents(build_definitions(default_failure_modes(), on_base))["embedding"]
    elsewhere = Workspace(data_location=str(tmp_path), embedding_model="detector:/elsewhere/best.pt")  # not an asset here
    assert _parents(build_definitions(default_failure_modes(), elsewhere))["embedding"] == {"raw_frames"}


def test_sensors_start_in_the_workspace_default_status(tmp_path):
    loop = {"new_footage_sensor", "slice_growth_sensor", "footage_automation_sensor"}

    def statuses(workspace):
        sensors = build_definitions(default_failure_modes(), workspace).sensors
        return {s.default_status for s in sensors if s.name in loop}, {s.name for s in sensors}

    assert statuses(Workspace(data_location=str(tmp_path)))[0] == {dg.DefaultSensorStatus.RUNNING}
    stopped, names = statuses(Workspace(data_location=str(tmp_path), sensors_default_status="stopped"))
    assert stopped == {dg.DefaultSensorStatus.STOPPED} and loop <= names


@pytest.mark.fresh_interpreter
def test_the_code_location_refuses_a_bad_setting_naming_its_variable():
    env = {**os.environ, "AVP_RETRAIN_MIN_GROWTH": "a quarter"}
    result = subprocess.run([sys.executable, "-c", "import avperception_assets.definitions"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "AVP_RETRAIN_MIN_GROWTH='a quarter'" in result.stderr
