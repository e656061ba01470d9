"""Slice views as Dagster assets: the registry shapes the graph; a real materialization."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import pytest

from avperception_assets import curation, slices, storage
from avperception_assets.defs import slice_assets
from avperception_assets.defs.resources import LanceDBResource
from avperception_assets.failure_modes import FAILURE_MODES, FailureMode
from avperception_assets_tests.conftest import build_frames_table

RIDER = FAILURE_MODES[0]
CROWD = FailureMode("crowded_night", "num_persons >= 3 AND timeofday = 'night'", ("pedestrian",))


def graph_of(defs: dg.Definitions):
    """The asset graph as the code location sees it (with the resource it binds)."""
    return dg.Definitions.merge(defs, dg.Definitions(resources={"lancedb": LanceDBResource()})).resolve_asset_graph()


def keys_of(defs: dg.Definitions) -> set[str]:
    graph = graph_of(defs)
    return {key.to_user_string() for key in graph.get_all_asset_keys() if graph.get(key).is_materializable}


def test_default_definitions_have_one_asset_per_view():
    graph = graph_of(slice_assets.defs)
    expected = {slices.view_name(m, s) for m, s in slices.all_views()}
    assert keys_of(slice_assets.defs) == expected
    for name in expected:
        node = graph.get(dg.AssetKey(name))
        assert node.group_name == "slices"
    deps = {name: {k.to_user_string() for k in graph.get(dg.AssetKey(name)).parent_keys} for name in expected}
    assert deps["bdd100k_rider_train"] == {"raw_frames", "has_rider", "is_duplicate"}
    assert deps["bdd100k_rider_val"] == {"raw_frames", "has_rider", "dhash"}
    assert deps["bdd100k_nighttime_person_val"] == {"raw_frames", "has_person", "dhash"}
    assert deps["bdd100k_distant_person_train"] == {"raw_frames", "has_person", "person_bbox_area_pct",
                                                    "is_duplicate"}
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert checks == {(name, slice_assets.CHECK_NAME) for name in expected}


def test_adding_a_registry_entry_adds_its_two_views():
    before = keys_of(slice_assets.build_slice_defs(FAILURE_MODES))
    defs = slice_assets.build_slice_defs([*FAILURE_MODES, CROWD])
    assert keys_of(defs) - before == {"bdd100k_crowded_night_train", "bdd100k_crowded_night_val"}
    parents = graph_of(defs).get(dg.AssetKey("bdd100k_crowded_night_val")).parent_keys
    assert {k.to_user_string() for k in parents} == {"raw_frames", "num_persons", "dhash"}


def test_definitions_load_fails_on_a_bad_filter_naming_the_mode():
    env = {**os.environ, "AVP_DISTANT_PERSON_MAX_AREA_PCT": "far away"}
    result = subprocess.run([sys.executable, "-c", "import avperception_assets.defs.slice_assets"],
                            env=env, capture_output=True, text=True, cwd=os.getcwd(), timeout=120)
    assert result.returncode != 0 and "AVP_DISTANT_PERSON_MAX_AREA_PCT" in result.stderr
    with pytest.raises(ValueError, match="'rider_typo'.*No field named has_ridr"):
        slice_assets.build_slice_defs([FailureMode("rider_typo", "has_ridr = true", ("rider",))])


@pytest.fixture(scope="module")
def frames(tmp_path_factory, local_ray):
    root = tmp_path_factory.mktemp("slice-assets")
    conn, _ = build_frames_table(root, [("b1", 20, 3)])
    curation.backfill_columns(conn.open_table(storage.FRAMES_TABLE), ["has_rider", "dhash", "is_duplicate"],
                              curation.CurationConfig(person_area_source=curation.SOURCE_ANNOTATIONS))
    return str(root / "lancedb")


def test_materialize_slice_assets_with_checks(frames):
    defs = slice_assets.build_slice_defs([RIDER])
    resources = {"lancedb": LanceDBResource(uri=frames)}
    with dg.instance_for_test() as instance:
        result = dg.materialize([*defs.assets, *defs.asset_checks], resources=resources, instance=instance)
        assert result.success
        for split in slices.SPLITS:
            name = slices.view_name(RIDER, split)
            meta = instance.get_latest_materialization_event(dg.AssetKey(name)).asset_materialization.metadata
            assert meta["filter"].value == slices.view_filter(RIDER, split)
            assert meta["row_count"].value == meta["rows_added"].value == meta["dagster/row_count"].value
            assert meta["created"].value is True and meta["source_version"].value >= 1
        checks = result.get_asset_check_evaluations()
        assert len(checks) == 2 and all(c.passed for c in checks)
        # Re-running is safe: nothing new, the views are left as they are.
        again = dg.materialize([*defs.assets], resources=resources, instance=instance,
                               selection=[slices.view_name(RIDER, "val")])
        assert again.success
        meta = again.asset_materializations_for_node("slice_views")[0].metadata
        assert meta["refreshed"].value is False and meta["rows_added"].value == 0
