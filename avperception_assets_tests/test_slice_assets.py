"""Slice views as Dagster assets: a real materialization with its checks."""

from __future__ import annotations

import dagster as dg
import pytest

from avperception_assets import slices
from avperception_assets.defs import slice_assets
from avperception_assets.defs.resources import LanceDBResource
from avperception_assets.failure_modes import FAILURE_MODES
from avperception_assets_tests.conftest import copy_curated_db

RIDER = FAILURE_MODES[0]


@pytest.fixture(scope="module")
def frames(tmp_path_factory, curated_db):
    root = tmp_path_factory.mktemp("slice-assets")
    copy_curated_db(curated_db, root)
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
