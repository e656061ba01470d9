"""Curation columns as Dagster assets: one asset per column, one Geneva backfill job per column
or UDF group (`curation.UDF_GROUPS`).

All columns live in one `multi_asset` (subsettable) so a run starts Ray once and backfills the
selected columns together (independent jobs concurrently, the novelty group after the pixel
group).
"""

from pathlib import Path

import dagster as dg

from avperception_assets.curation import columns as curation, checks as curation_checks, leaks
from avperception_assets.storage import tables as storage
from avperception_assets.workspace import BASE_CHECKPOINTS, Workspace, variable_for
from avperception_assets.defs.names import BASE_DETECTOR, CURATION, FOLLOWS_FOOTAGE, LANCEDB_WRITES_POOL, RAW_FRAMES, column_key, latest_metadata
from avperception_assets.defs.resources import WorkspaceResource

DESCRIPTIONS = {
    "has_person": "Frame has at least one annotated pedestrian (any BDD name for a person).",
    "has_rider": "Frame has at least one annotated rider.",
    "num_persons": "Number of annotated pedestrians in the frame.",
    "person_bbox_area_pct": "Largest person box as a percentage of the frame area, from the configured "
                            "detector or the annotations (metadata `source` says which).",
    "dhash": "64-bit difference hash of the decoded image (perceptual near-duplicate key).",
    "is_duplicate": "Frame is within `dup_threshold` bits of an earlier-ingested frame of another clip (a frame "
                    "without a clip is a clip of its own); each duplicate group keeps its earliest frame unflagged. "
                    "Frames of one clip never flag each other: consecutive frames are alike by nature.",
    "scene_description": "The scene attributes and the count of each class ('night, rainy, city street; "
                         "2 pedestrians, 1 rider'), full-text indexed by table_maintenance.",
    "embedding": "Unit vector of the frame from its pixels alone (metadata `model` says which model and weights; "
                 f"{variable_for('embedding_model')}), searched by `python -m avperception_assets.search`.",
    "uniqueness": "Cosine distance to the nearest earlier-ingested frame's embedding (capped at 1): high for "
                  "frames unlike anything seen before; old rows never change.",
}


def _description(name: str, modes) -> str:
    mode = next((m for m in modes if m.distance_column == name), None)
    if mode is None:
        return DESCRIPTIONS[name]
    example = f"text query {mode.text_query!r}" if mode.text_query else f"exemplars {list(mode.exemplars)}"
    return (f"Cosine distance from the frame's embedding to failure mode {mode.name!r}'s {example}; its slice keeps "
            f"frames within {mode.max_distance}.")


class CurationRunConfig(dg.Config):
    """Run configuration of the curation columns (see `curation.CurationConfig`)."""

    person_area_source: str = curation.SOURCE_AUTO
    detector_profile: str | None = None
    score_threshold: float = 0.5
    dup_threshold: int = 6
    recompute: list[str] = []
    concurrency: int | None = None

    def to_curation(self, embedding_model: str, modes) -> curation.CurationConfig:
        return curation.CurationConfig(
            person_area_source=self.person_area_source, detector_profile=self.detector_profile,
            score_threshold=self.score_threshold, dup_threshold=self.dup_threshold, embedding_model=embedding_model,
            recompute=tuple(self.recompute), concurrency=self.concurrency, modes=tuple(modes))


def _base_detector_weights(workspace: Workspace) -> Path | None:
    """The weights file in base_detector's checkpoints (its working copy on an object store) that
    the configured embedding model is the backbone of; None when it embeds with something else."""
    kind, _, path = workspace.embedding_model.partition(":")
    weights = Path(path.partition(":")[0]).expanduser().resolve()
    base = workspace.checkpoints_dir_for(BASE_CHECKPOINTS)
    return base / weights.relative_to(base.resolve()) if kind == "detector" and weights.is_relative_to(base.resolve()) else None


def _embeds_with_base_detector(workspace: Workspace) -> bool:
    """The column then depends on base_detector."""
    return _base_detector_weights(workspace) is not None


def _spec(name: str, config: curation.CurationConfig, workspace: Workspace) -> dg.AssetSpec:
    deps = [RAW_FRAMES, *(column_key(d) for d in config.deps.get(name, ()))]
    if name == "embedding" and _embeds_with_base_detector(workspace):
        deps.append(BASE_DETECTOR)
    return dg.AssetSpec(column_key(name), group_name=CURATION, deps=deps, description=_description(name, config.modes),
                        kinds={"lancedb", "geneva"}, skippable=True, automation_condition=FOLLOWS_FOOTAGE)


def open_frames(workspace: WorkspaceResource, conn=None):
    """The frames table, with every column of the frames schema: a table from before a column
    existed gains it (the annotation UDFs read `ann_crowd`; Geneva refuses a missing input column)."""
    conn = conn or workspace.connect()
    if not storage.table_exists(conn, storage.FRAMES_TABLE):
        raise dg.Failure(f"table {storage.FRAMES_TABLE!r} does not exist yet: materialize raw_frames first")
    return storage.open_frames(conn)


def _metadata(stats: curation.ColumnStats) -> dict:
    meta = stats.as_metadata()
    meta["params"] = dg.MetadataValue.json(meta["params"])
    if "errors" in meta:
        meta["errors"] = dg.MetadataValue.json(meta["errors"])
    for key in ("source", "model"):  # which detector or embedding model produced the values
        if key in stats.params:
            meta[key] = stats.params[key]
    meta["coverage"] = dg.MetadataValue.float(meta["coverage"])
    return meta


def _backfill(context: dg.AssetExecutionContext, run_config: CurationRunConfig, workspace: WorkspaceResource, modes):
    """Backfill the selected curation columns where they are NULL (new rows only)."""
    selected = [key.path[-1] for key in context.selected_asset_keys]
    conn = workspace.connect()
    table = open_frames(workspace, conn)
    if (weights := _base_detector_weights(workspace.layout)) is not None:
        workspace.pull(weights)  # the embedding model reads the checkpoint's working copy
    workspace.ensure_ray()
    stats = curation.backfill_columns(table, selected, run_config.to_curation(workspace.embedding_model, modes),
                                      log=context.log.info)
    for name, column_stats in stats.items():
        if name not in selected:  # filled by a selected sibling's job; materialized when selected
            context.log.info(f"{name} was filled by the job of its UDF group; it is not selected in this run")
            continue
        metadata = _metadata(column_stats)
        if name == "dhash":  # the first full decode: frames that fail it are quarantined here
            run_rows = storage.rows_since(column_stats.first_ingest_seq)
            metadata["frames_quarantined_undecodable"] = (
                curation.quarantine_undecodable(conn, table, run_rows) if run_rows else 0)
        yield dg.MaterializeResult(asset_key=column_key(name), metadata=metadata)


def build_curation_columns(modes, workspace: Workspace | None = None) -> dg.AssetsDefinition:
    """The curation columns of a registry: curation.COLUMNS and each by-example mode's distance.
    The embedding column depends on base_detector when the workspace (default: the environment's)
    embeds with it."""
    modes, workspace = tuple(modes), Workspace.from_env() if workspace is None else workspace
    config = curation.CurationConfig(modes=modes)
    specs = [_spec(name, config, workspace) for name in config.columns]

    @dg.multi_asset(specs=specs, can_subset=True, name="curation_columns", pool=LANCEDB_WRITES_POOL)
    def curation_columns(context: dg.AssetExecutionContext, config: CurationRunConfig, workspace: WorkspaceResource):
        """Backfill the selected curation columns where they are NULL (new rows only)."""
        yield from _backfill(context, config, workspace, modes)

    return curation_columns


def latest_rows(instance: dg.DagsterInstance, column: str) -> tuple[str | None, str]:
    """(filter, description) of the rows the column's latest materialization filled: what its
    checks look at, in a run or launched alone. Whole-table audits are the `frames_audit` job."""
    meta = latest_metadata(instance, column_key(column)) or {}
    if "first_ingest_seq" in meta:
        seq = meta["first_ingest_seq"]
        return storage.rows_since(seq), f"rows of the latest materialization (ingest_seq >= {seq})"
    if "rows_processed" in meta:
        return "false", "no row: the latest materialization filled no new row"
    return None, "every row (no materialization records its rows)"


def _result(outcome: curation_checks.CheckOutcome, scope: str) -> dg.AssetCheckResult:
    # A NULL explained by a recorded row error warns; anything else fails hard (and blocks).
    severity = dg.AssetCheckSeverity.WARN if outcome.warn_only else dg.AssetCheckSeverity.ERROR
    metadata = {k: dg.MetadataValue.json(v) if isinstance(v, (list, dict)) else v
                for k, v in outcome.metadata.items()}
    return dg.AssetCheckResult(passed=outcome.passed, severity=severity, metadata={**metadata, "scope": scope})


def _scoped(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource, column: str, check) -> dg.AssetCheckResult:
    where, scope = latest_rows(context.instance, column)
    return _result(check(open_frames(workspace), where), scope)


def _coverage_check(column: str):
    @dg.asset_check(asset=column_key(column), name="full_coverage", blocking=True,
                    description="Every row the run filled has a value; NULLs with a recorded UDF error only warn.")
    def _check(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
        return _scoped(context, workspace, column, lambda table, where: curation_checks.check_coverage(table, column, where))

    return _check


def _consistency_check(column: str):
    @dg.asset_check(asset=column_key(column), name="consistent_with_annotations", blocking=True,
                    description="Values the run filled agree with the frame's annotations and scene attributes.")
    def _check(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
        return _scoped(context, workspace, column,
                       lambda table, where: curation_checks.check_annotation_consistency(table, column, where))

    return _check


@dg.asset_check(asset=column_key("person_bbox_area_pct"), name="value_range", blocking=True,
                description="0 <= person_bbox_area_pct <= 100 on the rows the run filled.")
def person_area_range(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
    return _scoped(context, workspace, "person_bbox_area_pct", curation_checks.check_area_range)


@dg.asset_check(asset=column_key("is_duplicate"), name="one_survivor_per_group", blocking=True,
                description="Each near-duplicate group keeps exactly its earliest frame unflagged (the run's "
                "rows against every earlier frame).")
def duplicate_groups(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
    return _scoped(context, workspace, "is_duplicate", curation_checks.check_duplicate_groups)


@dg.asset_check(asset=column_key("is_duplicate"), name="no_split_leaks",
                description="No near-duplicate pair of frames across splits (train and val), by dhash within "
                "`dup_threshold` bits or by embedding within a cosine distance of "
                f"{leaks.LEAK_COSINE_DISTANCE}; only pairs with a frame of the run are searched. Splits are by "
                "clip, so any pair found is a leak: it fails the check (not blocking) and the worst pairs are listed.")
def split_leaks(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
    return _scoped(context, workspace, "is_duplicate", curation_checks.check_split_leaks)


@dg.asset_check(asset=column_key("embedding"), name="unit_vectors", blocking=True,
                description="Every embedding the run filled has the model's dimension and unit norm.")
def embedding_vectors(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
    return _scoped(context, workspace, "embedding", curation_checks.check_unit_vectors)


@dg.asset_check(asset=column_key("uniqueness"), name="value_range", blocking=True,
                description="0 <= uniqueness <= its cap on the rows the run filled.")
def uniqueness_range(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
    return _scoped(context, workspace, "uniqueness", curation_checks.check_uniqueness_range)


def build_curation_checks(modes) -> list:
    return [
        *(_coverage_check(name) for name in curation.curation_columns(modes)),
        *(_consistency_check(name) for name in curation.UDF_GROUPS["annotation_columns"]),
        person_area_range,
        duplicate_groups,
        split_leaks,
        embedding_vectors,
        uniqueness_range,
    ]


def build_curation_defs(modes, workspace: Workspace | None = None) -> dg.Definitions:
    """The curation assets and checks of a registry."""
    return dg.Definitions(assets=[build_curation_columns(modes, workspace)], asset_checks=build_curation_checks(modes))
