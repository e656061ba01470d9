"""The code location as users see it: names, groups, and a registry entry growing the graph."""

import dagster as dg

from avperception_assets.defs import (curation_assets, evaluation_assets, ingest_assets, sensors, slice_assets,
                                      training_assets)
from avperception_assets.defs.resources import LanceDBResource
from avperception_assets.definitions import defs
from avperception_assets.failure_modes import FAILURE_MODES, FailureMode


def _groups(definitions: dg.Definitions) -> dict[str, str]:
    graph = definitions.get_repository_def().asset_graph
    return {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}


def test_definitions_load_with_the_names_users_see():
    dg.Definitions.validate_loadable(defs)
    groups = _groups(defs)
    expected = {"raw_frames": "ingest", "base_detector": "training", "failure_mode_summary": "evaluation"}
    for column in ("has_person", "has_rider", "num_persons", "person_bbox_area_pct", "dhash", "is_duplicate"):
        expected[column] = "curation"
    for mode in ("rider", "nighttime_person", "distant_person"):
        expected |= {f"bdd100k_{mode}_train": "slices", f"bdd100k_{mode}_val": "slices",
                     f"{mode}_checkpoint": "training", f"{mode}_eval_report": "evaluation"}
    assert groups == expected
    assert {s.name for s in defs.sensors} == {"new_footage_sensor", "slice_growth_sensor"}


def test_a_registry_entry_adds_its_views_checkpoint_and_report():
    crowd = FailureMode("crowded_night", "timeofday = 'night' AND num_persons >= 3", ("pedestrian",))
    modes = [*FAILURE_MODES, crowd]
    grown = dg.Definitions.merge(
        ingest_assets.defs, curation_assets.defs, slice_assets.build_slice_defs(modes),
        training_assets.build_training_defs(modes), evaluation_assets.build_evaluation_defs(modes),
        sensors.build_sensor_defs(modes), dg.Definitions(resources={"lancedb": LanceDBResource()}),
    )
    dg.Definitions.validate_loadable(grown)
    added = set(_groups(grown)) - set(_groups(defs))
    assert added == {"bdd100k_crowded_night_train", "bdd100k_crowded_night_val",
                     "crowded_night_checkpoint", "crowded_night_eval_report"}
    graph = grown.get_repository_def().asset_graph
    summary_parents = graph.get(dg.AssetKey("failure_mode_summary")).parent_keys
    assert dg.AssetKey("crowded_night_eval_report") in summary_parents
    checkpoint_parents = {k.to_user_string() for k in graph.get(dg.AssetKey("crowded_night_checkpoint")).parent_keys}
    assert checkpoint_parents == {"bdd100k_crowded_night_train", "bdd100k_crowded_night_val", "base_detector"}
