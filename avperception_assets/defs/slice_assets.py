"""Slice views as Dagster assets: one asset per view (`bdd100k_<mode>_<split>`, group `slices`).

Built from the failure-mode registry: each registry entry yields its train and val assets,
each depending on `raw_frames` and exactly the curation columns its filter reads (train
views also on `is_duplicate`). All views live in one subsettable multi_asset so a run starts
Ray once for all the selected views. `build_slice_defs(modes)` builds the
same definitions from any registry (tests, or a deployment with its own modes).
"""

import dagster as dg

from avperception_assets.slices import views as slices
from avperception_assets.failure_modes.registry import CURATION_COLUMNS, FailureMode, check_registry
from avperception_assets.defs.names import FOLLOWS_FOOTAGE, LANCEDB_WRITES_POOL, RAW_FRAMES, SLICES, TABLE_MAINTENANCE, TRACK_COVERAGE, column_key, view_key
from avperception_assets.defs.resources import WorkspaceResource

CHECK_NAME = "row_count_matches_source"


def view_deps(mode: FailureMode, split: str) -> list[dg.AssetKey]:
    """raw_frames, the curation columns the view's filter reads, track_coverage when it reads the
    base detector's track coverage, and table_maintenance (which runs before the refresh, so the
    view reflects the maintained version)."""
    curation_columns = [c for c in slices.view_columns(mode, split) if c in CURATION_COLUMNS or c == mode.distance_column]
    coverage = [TRACK_COVERAGE] if mode.track_columns else []
    return [RAW_FRAMES, *(column_key(c) for c in curation_columns), *coverage, TABLE_MAINTENANCE]


def _spec(mode: FailureMode, split: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        view_key(mode, split),
        group_name=SLICES,
        deps=view_deps(mode, split),
        description=f"{mode.description or mode.name} ({split} split). Geneva materialized view over "
                    f"`bdd100k` WHERE {slices.view_filter(mode, split)}",
        metadata={"failure_mode": mode.name, "split": split, "filter": slices.view_filter(mode, split),
                  "eval_classes": list(mode.classes)},
        kinds={"lancedb", "geneva"},
        skippable=True,
        automation_condition=FOLLOWS_FOOTAGE,
    )


def _metadata(stats: slices.ViewStats) -> dict:
    meta = {k: v for k, v in stats.as_metadata().items() if v is not None}
    meta["filter"] = dg.MetadataValue.text(stats.filter)
    meta["columns"] = dg.MetadataValue.json(list(stats.columns))
    meta["dagster/row_count"] = stats.row_count
    if stats.recreated:
        meta["note"] = dg.MetadataValue.text(
            f"view recreated because {stats.recreate_reason} (it held the filter {stats.previous_filter!r}); "
            "its version history restarted")
    return meta


def build_slice_defs(modes) -> dg.Definitions:
    """Slice-view assets and checks for the registry `modes`."""
    modes = check_registry(modes)
    views = slices.all_views(modes)
    by_key = {view_key(m, s): (m, s) for m, s in views}

    @dg.multi_asset(specs=[_spec(m, s) for m, s in views], can_subset=True, name="slice_views",
                    pool=LANCEDB_WRITES_POOL)
    def slice_views(context: dg.AssetExecutionContext, workspace: WorkspaceResource):
        """Refresh the selected slice views (only qualifying new rows are appended)."""
        selected = [by_key[key] for key in by_key if key in context.selected_asset_keys]
        workspace.ensure_ray()
        try:
            stats = slices.refresh_views(workspace.connect(), selected)
        except slices.SliceError as exc:
            raise dg.Failure(str(exc)) from exc
        for name, view_stats in stats.items():
            context.log.info(f"{name}: {view_stats.as_metadata()}")
            yield dg.MaterializeResult(asset_key=dg.AssetKey(name), metadata=_metadata(view_stats))

    check_specs = [
        dg.AssetCheckSpec(CHECK_NAME, asset=key, blocking=True,
                          description="Row count equals a direct count on bdd100k with the same filter at "
                                      "the source version the view reflects.")
        for key in by_key
    ]

    @dg.multi_asset_check(specs=check_specs, can_subset=True, name="slice_view_checks")
    def slice_view_checks(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource):
        conn = workspace.connect()
        for check_key in context.selected_asset_check_keys:
            mode, split = by_key[check_key.asset_key]
            outcome = slices.check_view(conn, mode, split)
            yield dg.AssetCheckResult(asset_key=check_key.asset_key, check_name=CHECK_NAME,
                                      passed=outcome.passed, metadata=outcome.metadata)

    return dg.Definitions(assets=[slice_views], asset_checks=[slice_view_checks])
