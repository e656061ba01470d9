"""The base detector's track coverage as a Dagster asset: `track_coverage` (group `curation`),
between `base_detector` and the views of the failure modes defined by track behaviour, and the
whole-table job `track_coverage_refresh`. Built only when some mode's slice reads the coverage
columns (`FailureMode.track_columns`): otherwise no run pays for the detector pass.

Which model: the base detector of `base_detector`'s latest materialization, at its own input size
(`deployed_base_model`). When: in every footage run, on the clips that have frames not computed
yet (the new clips, with their earlier frames), so its cost follows the new footage; rows keep
the base that computed them (`track_coverage_model`). After base_detector is retrained, the
`track_coverage_refresh` job recomputes every clip with the new base and recreates the views of
those modes (a slice defined by another model is a new slice, as when a filter changes; Geneva
0.17 also fails to refresh a view whose rows leave it through changed values).
"""

import dagster as dg
from pydantic import Field

from avperception_assets.discovery import track_coverage as coverage
from avperception_assets.failure_modes.registry import check_registry
from avperception_assets.slices import views as slices
from avperception_assets.storage import tables as storage
from avperception_assets.defs.names import (BASE_DETECTOR, CURATION, FOLLOWS_FOOTAGE, LANCEDB_WRITES_POOL, RAW_FRAMES,
                                            TRACK_COVERAGE, latest_metadata, view_key)
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.defs.training_assets import deployed_base_model

REFRESH_JOB = "track_coverage_refresh"


class TrackCoverageConfig(dg.Config):
    """Run config of `track_coverage`."""

    recompute_all: bool = Field(False, description="Recompute every clip of the table (the track_coverage_refresh "
                                "job, after base_detector changed) instead of the clips with new frames.")
    score_threshold: float = Field(coverage.SCORE_THRESHOLD, ge=0.0, le=1.0, description="Score a detection needs to find a box.")
    batch_size: int = Field(8, ge=1, description="Frames per detector pass.")


def _metadata(stats: coverage.CoverageStats, modes, info: dict, stale: int, dropped: list[str]) -> dict:
    return {
        "clips_computed": stats.clips, "frames_computed": stats.frames, "frames_undecodable": stats.frames_undecodable,
        "tracks": len(stats.tracks),
        "tracks_below_threshold": dg.MetadataValue.json(
            {m.name: stats.below(m.classes, m.track_coverage_below) for m in modes if m.track_coverage_below}),
        "base_model": stats.model, "base_weights": info["weights"], "base_digest": info["digest"],
        "rows_from_another_base": stale, "views_recreated": dg.MetadataValue.json(dropped),
        "table_version": stats.table_version,
    }


def build_track_coverage_defs(modes) -> dg.Definitions:
    """`track_coverage` and `track_coverage_refresh` for the modes of the registry `modes` whose
    slices read the coverage columns (nothing when none does)."""
    modes = tuple(m for m in check_registry(modes) if m.track_columns)
    if not modes:
        return dg.Definitions()
    views = slices.all_views(modes)

    @dg.asset(key=TRACK_COVERAGE, group_name=CURATION, deps=[RAW_FRAMES, BASE_DETECTOR], pool=LANCEDB_WRITES_POOL,
              automation_condition=FOLLOWS_FOOTAGE, kinds={"lancedb", "pytorch"},
              description="Per box, the share of its track's frames in which base_detector finds it "
                          f"(`{coverage.ANN_TRACK_COVERAGE}`), per frame the lowest per tracked class "
                          f"(`{coverage.MIN_TRACK_COVERAGE}`), and the base that computed them "
                          f"(`{coverage.MODEL_COLUMN}`): computed on the clips with new frames; the "
                          f"`{REFRESH_JOB}` job recomputes every clip after base_detector changed.")
    def track_coverage(context: dg.AssetExecutionContext, config: TrackCoverageConfig, workspace: WorkspaceResource):
        conn = workspace.connect()
        table = coverage.ensure_columns(conn.open_table(storage.FRAMES_TABLE))
        if latest_metadata(context.instance, BASE_DETECTOR) is None:
            context.log.info("base_detector has not been materialized: no coverage yet (it follows base_detector)")
            return dg.MaterializeResult(metadata={"clips_computed": 0, "note": "no base_detector yet"})
        model, info = deployed_base_model(context, workspace)
        key = coverage.model_key(info["digest"], *info["input_size"], config.score_threshold)
        clips = coverage.all_clips(table) if config.recompute_all else coverage.new_clips(table)
        context.log.info(f"{len(clips)} clips to compute with {key}")
        stats = coverage.cover_clips(table, clips, coverage.model_detections(model, config.batch_size), key,
                                     score_threshold=config.score_threshold, batch_size=config.batch_size,
                                     log=context.log.info)
        dropped = slices.drop_views(conn, views) if config.recompute_all else []
        stale = coverage.stale_rows(table, key)
        if stale:
            context.log.warning(f"{stale} clip frames hold coverage from another base detector; run the "
                                f"{REFRESH_JOB} job to recompute them with {key}")
        return dg.MaterializeResult(metadata=_metadata(stats, modes, info, stale, dropped))

    refresh = dg.define_asset_job(
        REFRESH_JOB, selection=dg.AssetSelection.assets(TRACK_COVERAGE, *(view_key(m, s) for m, s in views)),
        config={"ops": {TRACK_COVERAGE.to_python_identifier(): {"config": {"recompute_all": True}}}},
        description="Whole table: recompute every clip's track coverage with the current base_detector (after it "
                    "was retrained) and recreate the views of the modes defined by it.")
    return dg.Definitions(assets=[track_coverage], jobs=[refresh])
