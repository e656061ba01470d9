"""`raw_frames`: landing batches into the `bdd100k` Lance table, with its checks."""

import time

import dagster as dg
from pydantic import Field

from avperception_assets.ingest import frames as ingest, checks as ingest_checks
from avperception_assets.storage import tables as storage
from avperception_assets.defs.names import INGEST, LANCEDB_WRITES_POOL, RAW_FRAMES, latest_metadata
from avperception_assets.defs.resources import WorkspaceResource


class RawFramesConfig(dg.Config):
    batch_ids: list[str] = Field(
        default_factory=list,
        description="Landing batches to ingest; empty means every READY batch not ingested yet.",
    )
    val_fraction: float = Field(0.2, description="Share of new clips (and of frames without a clip) put in val "
                                "when no folder names their split; a clip already in the table keeps its split.")


def _batch_table(summaries: list[ingest.BatchSummary]) -> str:
    lines = ["| batch | ingested | already present | quarantined | boxes | clipped | seconds |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for s in summaries:
        quarantined = ", ".join(f"{reason}: {n}" for reason, n in sorted(s.quarantined.items())) or "none"
        lines.append(f"| {s.batch_id} | {s.ingested} | {s.already_present} | {quarantined} | {s.boxes} "
                     f"| {s.boxes_clipped} | {s.seconds:.1f} |")
    return "\n".join(lines)


@dg.asset(
    group_name=INGEST,
    kinds={"lancedb"},
    pool=LANCEDB_WRITES_POOL,
    description="Dashcam frames (JPEG bytes + labels: BDD100K detection or MOT clips, YOLO, Pascal VOC or COCO) "
    "in the Lance table `bdd100k`, each clip in one split; rejected inputs go to `quarantine` with their reason.",
)
def raw_frames(context: dg.AssetExecutionContext, config: RawFramesConfig, workspace: WorkspaceResource) -> dg.MaterializeResult:
    started = time.perf_counter()
    conn = workspace.connect()
    summaries = ingest.ingest_batches(conn, workspace.layout.landing, config.batch_ids or None,
                                      val_fraction=config.val_fraction, log=context.log.info,
                                      storage_options=workspace.storage_options)
    table = storage.open_or_create(conn, storage.FRAMES_TABLE, storage.FRAMES_SCHEMA)
    quarantined: dict[str, int] = {}
    for s in summaries:
        for reason, n in s.quarantined.items():
            quarantined[reason] = quarantined.get(reason, 0) + n
    refused = {s.batch_id: s.refused for s in summaries if s.refused}
    for batch_id, why in refused.items():  # processed (the sensor moves on), so it must not pass unseen
        context.log.error(f"batch {batch_id} was refused, nothing of it was ingested: {why}")
    ingested = sum(s.ingested for s in summaries)
    seconds = time.perf_counter() - started
    # The run's rows are those from here on: its checks look at them only.
    first_seq = min(s.first_ingest_seq for s in summaries) if summaries else ingest.next_ingest_seq(table)
    return dg.MaterializeResult(
        metadata={
            "first_ingest_seq": first_seq,
            "batches": dg.MetadataValue.md(_batch_table(summaries)) if summaries else "no pending batch",
            "ingested": ingested,
            "already_present": sum(s.already_present for s in summaries),
            "quarantined": sum(quarantined.values()),
            **{f"quarantined_{reason}": n for reason, n in sorted(quarantined.items())},
            "refused": len(refused),
            **({"refused_batches": dg.MetadataValue.json(refused)} if refused else {}),
            "objects_ignored": sum(sum(s.objects_ignored.values()) for s in summaries),
            "clips": len(set().union(*(s.clips for s in summaries))),  # footage clips the new frames are of
            "rows_total": table.count_rows(),
            "table_version": table.version,
            "table_uri": dg.MetadataValue.path(str(table.uri)),
            "frames_per_second": round(ingested / seconds, 1) if ingested else 0.0,
        },
        data_version=dg.DataVersion(str(table.version)),
    )


def _frames_table(workspace: WorkspaceResource):
    return storage.open_or_create(workspace.connect(), storage.FRAMES_TABLE, storage.FRAMES_SCHEMA)


def latest_rows(instance: dg.DagsterInstance) -> tuple[str | None, str]:
    """(filter, description) of the rows of raw_frames' latest materialization: what its checks
    look at, in a run or launched alone. Whole-table audits are the `frames_audit` job."""
    first_seq = (latest_metadata(instance, RAW_FRAMES) or {}).get("first_ingest_seq")
    if first_seq is None:
        return None, "every row (no materialization records its rows)"
    return storage.rows_since(first_seq), f"rows of the latest materialization (ingest_seq >= {first_seq})"


def _audit_result(bad: list[str], what: str, rows_checked: int, scope: str,
                 severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=not bad, severity=severity,
        metadata={f"{what}_count": len(bad), "examples": dg.MetadataValue.json(bad[:20]),
                  "rows_checked": rows_checked, "scope": scope},
    )


def _scoped_audit(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource, audit, what: str,
                  severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    table = _frames_table(workspace)
    where, scope = latest_rows(context.instance)
    return _audit_result(audit(table, where), what, table.count_rows(where), scope, severity)


@dg.asset_check(asset=raw_frames, blocking=True, description="No image_id of the new rows appears twice.")
def no_duplicate_image_ids(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
    return _scoped_audit(context, workspace, ingest_checks.duplicate_image_ids, "duplicate_ids")


@dg.asset_check(asset=raw_frames, blocking=True, description="Every box of the new rows lies inside its frame "
                "and has an area.")
def boxes_inside_frames(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
    return _scoped_audit(context, workspace, ingest_checks.frames_with_boxes_outside, "frames_with_bad_boxes")


@dg.asset_check(asset=raw_frames, blocking=True, description="Every clip of the new rows is in one split, with "
                "its frames already in the table: a clip split between train and val would put near-copies of "
                "its frames on both sides. Only the new rows' clips are read.")
def clips_in_one_split(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
    return _scoped_audit(context, workspace, ingest_checks.clips_in_two_splits, "clips_in_two_splits")


@dg.asset_check(asset=raw_frames, description="Every new frame decodes with the training decoder. Ingestion "
                "checks container structure only; a frame damaged inside its image data is kept out of "
                "every slice and quarantined by the curation stage, so a failure here warns.")
def frames_decode(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
    return _scoped_audit(context, workspace, ingest_checks.undecodable_frames, "undecodable_frames",
                         dg.AssetCheckSeverity.WARN)


defs = dg.Definitions(assets=[raw_frames], asset_checks=[no_duplicate_image_ids, boxes_inside_frames, clips_in_one_split,
                                                          frames_decode])
