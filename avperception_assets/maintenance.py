"""Table maintenance: compaction of the small fragments every batch leaves in the frames table,
cleanup of old versions of it and of the views, and the scalar indexes that view filters read,
kept current.

Cleanup never removes a version something is pinned to: a checkpoint or a report (their
metadata names the view and frames-table versions they were trained or evaluated on, which
`reproduce` time-travels to) or a view's next incremental refresh (the frames-table version it
reflects). Pins are LanceDB version tags (`avp-pin-<version>`); Lance's cleanup keeps tagged
versions. Stable row ids survive compaction, so views and `reproduce` still find their rows.

Nothing here knows about Dagster.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

from . import storage
from .storage import FRAMES_TABLE, reflected_version, table_exists

PIN_TAG_PREFIX = "avp-pin-"
NO_CLEANUP = timedelta(days=36500)  # `Table.optimize` with nothing old enough to clean up
# Index type per column that view filters read (only columns that exist are indexed).
SCALAR_INDEXES = {
    "split": "BITMAP", "timeofday": "BITMAP", "weather": "BITMAP", "scene": "BITMAP", "batch_id": "BITMAP",
    "has_person": "BITMAP", "has_rider": "BITMAP", "is_duplicate": "BITMAP",
    "num_persons": "BTREE", "person_bbox_area_pct": "BTREE", "ingest_seq": "BTREE", "image_id": "BTREE",
    "ann_categories": "LABEL_LIST",
}


@dataclass
class MaintenanceStats:
    """What one maintenance pass did to one table."""

    table: str
    version_before: int
    version_after: int
    fragments_before: int
    fragments_after: int
    versions_before: int
    versions_after: int
    pinned_versions: list[int]
    indexes: list[str] = field(default_factory=list)
    indexes_created: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def as_metadata(self) -> dict[str, Any]:
        meta = asdict(self)
        meta["elapsed_s"] = round(self.elapsed_s, 3)
        return meta


def _record_pins(pins: dict[str, set[int]], data: dict, pairs: Iterable[tuple[str, str]]) -> None:
    for name_key, version_key in pairs:
        name, version = data.get(name_key), data.get(version_key)
        if name and version is not None:
            pins[name].add(int(version))


def _view_names(conn) -> list[str]:
    return sorted(name for name in storage.table_names(conn) if name.startswith(f"{FRAMES_TABLE}_"))


def pinned_versions(conn, checkpoints_dir: Path, reports_dir: Path, views: Iterable[str]) -> dict[str, set[int]]:
    """Table name → versions that must survive cleanup: those checkpoints and reports record,
    and the frames-table version each of `views` reflects."""
    pins: dict[str, set[int]] = defaultdict(set)
    for path in Path(checkpoints_dir).rglob("metadata.json"):
        _record_pins(pins, json.loads(path.read_text()), [
            ("train_view", "train_view_version"), ("val_view", "val_view_version"),
            ("source_table", "source_table_version")])
    for path in Path(reports_dir).rglob("report.json"):
        _record_pins(pins, json.loads(path.read_text()).get("val_view", {}), [
            ("name", "version"), ("source_table", "source_table_version")])
    for name in views:
        reflected = reflected_version(conn.open_table(name))
        if reflected is not None:
            pins[FRAMES_TABLE].add(reflected)
    return dict(pins)


def pin(table, versions: Iterable[int]) -> list[int]:
    """Tag `versions` of `table` (those it still has) so cleanup keeps them; returns them sorted."""
    tags = table.tags.list()
    present = {v["version"] for v in table.list_versions()}
    kept = sorted(set(versions) & present)
    for version in kept:
        if f"{PIN_TAG_PREFIX}{version}" not in tags:
            table.tags.create(f"{PIN_TAG_PREFIX}{version}", version)
    return kept


def ensure_scalar_indexes(table, wanted: dict[str, str]) -> tuple[list[str], list[str]]:
    """Create the missing scalar indexes on the columns of `wanted` that exist; (indexed, created).
    Existing indexes take new rows in `optimize`."""
    indexed = {column for index in table.list_indices() for column in index.columns}
    created = []
    for column, index_type in wanted.items():
        if column in table.schema.names and column not in indexed:
            table.create_scalar_index(column, index_type=index_type, replace=False)
            created.append(column)
    return sorted(indexed | set(created)), created


def _has_work(table, fragments: int) -> bool:
    """Whether compaction or an index update would change anything (several fragments, or rows
    an index does not cover yet)."""
    return fragments > 1 or any(table.index_stats(index.name).num_unindexed_rows for index in table.list_indices())


def maintain(table, name: str, pinned: Iterable[int], *, older_than: timedelta,
             indexes: dict[str, str] | None = None, compact: bool = True) -> MaintenanceStats:
    """Pin, index, compact and clean up one table (its latest version is always kept)."""
    started = time.perf_counter()
    table.checkout_latest()
    version_before, fragments_before = table.version, len(table.to_lance().get_fragments())
    versions_before = len(table.list_versions())
    kept = pin(table, pinned)
    indexed, created = ensure_scalar_indexes(table, indexes or {})
    if compact and _has_work(table, fragments_before):  # else no commit: views stay current
        table.optimize(cleanup_older_than=NO_CLEANUP)  # compaction, index updates; cleanup below
    # lancedb 0.39's cleanup raises "tagged version(s) have been marked for cleanup" once a pinned
    # version is old enough, so pylance cleans up. Only cleanup: pylance 14 rewrites btree
    # indexes in a version lancedb 0.39 (lance 12) ignores ("Index … has version 1, which is
    # not supported"), so compaction and indexes stay with lancedb.
    table.to_lance().cleanup_old_versions(older_than=older_than, error_if_tagged_old_versions=False)
    table.checkout_latest()
    return MaintenanceStats(
        table=name, version_before=version_before, version_after=table.version, fragments_before=fragments_before,
        fragments_after=len(table.to_lance().get_fragments()), versions_before=versions_before,
        versions_after=len(table.list_versions()), pinned_versions=kept, indexes=indexed, indexes_created=created,
        elapsed_s=time.perf_counter() - started)


def maintain_all(conn, checkpoints_dir: Path, reports_dir: Path, *,
                 older_than: timedelta = timedelta(hours=1)) -> dict[str, MaintenanceStats]:
    """Maintain the frames table (compacted, with its scalar indexes) and every slice view
    (cleaned up only: a compaction commit would give a view's rows a new version number, and
    checkpoints, reports and the view assets name a view's data by its version)."""
    if not table_exists(conn, FRAMES_TABLE):
        return {}
    views = _view_names(conn)
    pins = pinned_versions(conn, checkpoints_dir, reports_dir, views)
    stats = {FRAMES_TABLE: maintain(conn.open_table(FRAMES_TABLE), FRAMES_TABLE, pins.get(FRAMES_TABLE, ()),
                                    older_than=older_than, indexes=SCALAR_INDEXES)}
    for name in views:
        stats[name] = maintain(conn.open_table(name), name, pins.get(name, ()), older_than=older_than, compact=False)
    return stats
