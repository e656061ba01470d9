"""`table_maintenance`: compaction, cleanup of unpinned old versions and scalar indexes for the
frames table and every slice view (see `maintenance`). It runs between the curation columns
and the slice views of every footage run: the views then reflect the maintained version, so a
view counts as current until new data lands, and their filters read fresh indexes. Its daily
schedule is off until a user turns it on."""

from datetime import timedelta

import dagster as dg
from pydantic import Field

from avperception_assets.curation import columns as curation, maintenance
from avperception_assets.defs.names import FOLLOWS_FOOTAGE, LANCEDB_WRITES_POOL, MAINTENANCE, RAW_FRAMES, TABLE_MAINTENANCE, column_key
from avperception_assets.defs.resources import WorkspaceResource


class MaintenanceConfig(dg.Config):
    keep_minutes: float = Field(
        60.0, description="Versions younger than this survive cleanup (runs reading them may be in flight); "
                          "pinned versions and each table's latest always do.")


def _table_rows(stats: dict[str, maintenance.MaintenanceStats]) -> str:
    lines = ["| table | fragments | versions | pinned | indexes created | indexes updated | seconds |",
             "|---|---|---|---|---|---|---:|"]
    for s in stats.values():
        lines.append(f"| {s.table} | {s.fragments_before} → {s.fragments_after} | {s.versions_before} → "
                     f"{s.versions_after} | {s.pinned_versions} | {', '.join(s.indexes_created) or '-'} "
                     f"| {', '.join(s.indexes_updated) or '-'} | {s.elapsed_s:.1f} |")
    return "\n".join(lines)


def table_maintenance(config: MaintenanceConfig, workspace: WorkspaceResource) -> dg.MaterializeResult:
    layout = workspace.layout
    stats = maintenance.maintain_all(workspace.connect(), layout.location("checkpoints"), layout.location("reports"),
                                     older_than=timedelta(minutes=config.keep_minutes),
                                     storage_options=workspace.storage_options)
    if not stats:
        raise dg.Failure("table 'bdd100k' does not exist yet: materialize raw_frames first")
    return dg.MaterializeResult(metadata={
        "tables": dg.MetadataValue.md(_table_rows(stats)),
        "stats": dg.MetadataValue.json({name: s.as_metadata() for name, s in stats.items()}),
        "frames_indexes": stats[maintenance.FRAMES_TABLE].indexes,
    })


table_maintenance_schedule = dg.ScheduleDefinition(
    name="table_maintenance_schedule", cron_schedule="0 4 * * *", target=dg.AssetSelection.assets(TABLE_MAINTENANCE),
    default_status=dg.DefaultScheduleStatus.STOPPED)


def build_maintenance_defs(modes) -> dg.Definitions:
    """table_maintenance after every curation column of the registry `modes`, and its schedule."""
    asset = dg.asset(
        key=TABLE_MAINTENANCE, group_name=MAINTENANCE, kinds={"lancedb"}, pool=LANCEDB_WRITES_POOL,
        deps=[RAW_FRAMES, *(column_key(c) for c in curation.curation_columns(modes))], automation_condition=FOLLOWS_FOOTAGE,
        description="Compacts the small fragments of bdd100k, removes old versions of it and of the slice views that nothing is "
                    "pinned to (checkpoints, reports, the views' next refresh) and keeps the scalar indexes "
                    "of the columns view filters read current.")(table_maintenance)
    return dg.Definitions(assets=[asset], schedules=[table_maintenance_schedule])
