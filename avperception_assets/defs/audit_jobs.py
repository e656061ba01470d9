"""`frames_audit`: the raw_frames and curation checks over the whole frames table, as a job of
its own. A run's checks look at the rows that run added, so a bad row of an old batch is
reported once; this job finds every one. Its weekly schedule is off until a user turns it on."""

import dagster as dg

from avperception_assets.curation import columns as curation, checks as curation_checks
from avperception_assets.ingest import checks as ingest_checks
from avperception_assets.storage import tables as storage
from avperception_assets.defs.resources import WorkspaceResource

# Ingestion checks structure only; curation quarantines what does not decode, so that one warns.
WARN_ONLY = {"frames_decode"}


def _ingest_audits(table) -> dict[str, tuple[bool, dict]]:
    audits = {"no_duplicate_image_ids": ingest_checks.duplicate_image_ids,
              "boxes_inside_frames": ingest_checks.frames_with_boxes_outside,
              "clips_in_one_split": ingest_checks.clips_in_two_splits,
              "frames_decode": ingest_checks.undecodable_frames}
    results = {}
    for name, audit in audits.items():
        bad = audit(table)
        results[name] = (not bad, {"count": len(bad), "examples": bad[:20]})
    return results


def _curation_audits(table, columns: tuple[str, ...]) -> dict[str, tuple[bool, dict]]:
    present = [c for c in columns if c in table.schema.names]
    outcomes = {f"{c}.full_coverage": curation_checks.check_coverage(table, c) for c in present}
    outcomes.update({f"{c}.consistent_with_annotations": curation_checks.check_annotation_consistency(table, c)
                     for c in present if c in curation.UDF_GROUPS["annotation_columns"]})
    if "person_bbox_area_pct" in present:
        outcomes["person_bbox_area_pct.value_range"] = curation_checks.check_area_range(table)
    if "embedding" in present:
        outcomes["embedding.unit_vectors"] = curation_checks.check_unit_vectors(table)
    if "uniqueness" in present:
        outcomes["uniqueness.value_range"] = curation_checks.check_uniqueness_range(table)
    if "is_duplicate" in present:
        outcomes["is_duplicate.one_survivor_per_group"] = curation_checks.check_duplicate_groups(table)
        if "embedding" in present:
            outcomes["is_duplicate.no_split_leaks"] = curation_checks.check_split_leaks(table)
    return {name: (o.passed or o.warn_only, o.metadata) for name, o in outcomes.items()}


def audit_frames_table(context: dg.OpExecutionContext, workspace: WorkspaceResource, columns: tuple[str, ...]) -> dict:
    """Every raw_frames check, and every check of the curation `columns`, over the whole table."""
    conn = workspace.connect()
    if not storage.table_exists(conn, storage.FRAMES_TABLE):
        raise dg.Failure(f"table {storage.FRAMES_TABLE!r} does not exist yet: materialize raw_frames first")
    table = conn.open_table(storage.FRAMES_TABLE)
    results = {**_ingest_audits(table), **_curation_audits(table, columns)}
    for name, (passed, metadata) in results.items():
        context.log.info(f"{name}: {'passed' if passed else 'FAILED'} {metadata}")
    failed = sorted(name for name, (passed, _) in results.items() if not passed and name not in WARN_ONLY)
    summary = {"rows": table.count_rows(), "table_version": table.version, "failed": failed,
               "audits": {name: {"passed": passed, **metadata} for name, (passed, metadata) in results.items()}}
    context.add_output_metadata({"rows": summary["rows"], "table_version": summary["table_version"],
                                 "audits": dg.MetadataValue.json(summary["audits"])})
    if failed:
        raise dg.Failure(f"whole-table audit failed: {', '.join(failed)}",
                         metadata={"audits": dg.MetadataValue.json(summary["audits"])})
    return summary


def build_frames_audit(modes) -> dg.JobDefinition:
    """The `frames_audit` job over the curation columns of the registry `modes`."""
    columns = curation.curation_columns(modes)

    @dg.op(name="audit_frames_table",
           description="Every raw_frames and curation check over every row of the frames table.")
    def audit_op(context: dg.OpExecutionContext, workspace: WorkspaceResource) -> dict:
        return audit_frames_table(context, workspace, columns)

    @dg.job(description="Whole-table audit of the frames table (a run's own checks look at its rows only).")
    def frames_audit():
        audit_op()

    return frames_audit


def build_audit_defs(modes) -> dg.Definitions:
    """`frames_audit` for the registry `modes`, and its weekly schedule."""
    job = build_frames_audit(modes)
    schedule = dg.ScheduleDefinition(job=job, cron_schedule="0 3 * * 0", default_status=dg.DefaultScheduleStatus.STOPPED)
    return dg.Definitions(jobs=[job], schedules=[schedule])
