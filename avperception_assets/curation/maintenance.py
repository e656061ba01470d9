"""Table maintenance: compaction of the small fragments every batch leaves in the frames table,
cleanup of old versions of it, of the views and of the `<mode>_eval_frames` and
`<mode>_difficulty` tables reports and mining write, and the indexes kept current: scalar
indexes that view filters read, the full-text index of scene descriptions, and the vector
index of embeddings once the table is large enough to need one (`vector_index`).

Each pass costs what the new rows cost, not the table: compaction merges only fragments smaller
than `FRAGMENT_ROWS` (so the batches' tail, never the big fragments), bitmap and label-list
indexes take the new rows incrementally, and a btree index is rebuilt only once its unindexed
rows reach `BTREE_STALE_FRACTION` of its indexed ones (amortized, a rebuild costs a fraction of
a batch; until then a lookup also scans the unindexed fragments' column).

Cleanup never removes a version something is pinned to: a checkpoint or a report (their
metadata names the view and frames-table versions they were trained or evaluated on, which
`reproduce` time-travels to, the difficulty scores a mined fine-tune drew by, and the
eval-frames version a report wrote) or a view's next incremental refresh (the frames-table
version it reflects). Pins are LanceDB version tags (`avp-pin-<version>`); Lance's cleanup
keeps tagged versions. Stable row ids survive compaction, so views, `reproduce` and the
readers of pixels (`pixels`) still find their rows.

Library workarounds, all here (lancedb 0.39.0, whose Rust core is lance 12, with pylance 14.0.2):
- lancedb's `optimize` compacts with lance's default target of 1M rows a fragment, so with
  100 KB frames every batch's fragment is merged into the big ones and the whole table is
  rewritten (4.78x the time at 20,000 frames against 2,000, `benchmarks/scale.py`); it takes
  no compaction options. Compaction runs in pylance with a target instead (with stable row ids
  it rewrites no index: lancedb's indexes stay in use).
- pylance 14's `optimize_indices` rewrites a btree index in a version lancedb ignores ("Index
  ... has version 1, which is not supported"), so btree indexes are rebuilt through lancedb;
  bitmap and label-list ones update in pylance and stay readable.
- lancedb's cleanup raises "tagged version(s) have been marked for cleanup" once a pinned
  version is old enough, so cleanup runs in pylance too.
- Geneva 0.17's Table (how the pipeline opens `bdd100k`) takes no `create_index(config=FTS())`
  ("unexpected keyword argument 'config'"): the full-text index is made with its
  `create_fts_index` (Lance's own index, not tantivy), which leaves stemming off unless asked.
  pylance's `optimize_indices` keeps that index readable by lancedb, as it does bitmaps.

Nothing here knows about Dagster.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Mapping

from avperception_assets.storage import locations, tables as storage
from avperception_assets.storage.tables import DIFFICULTY_SUFFIX, EVAL_FRAMES_SUFFIX, FRAMES_TABLE, reflected_version, table_exists
from avperception_assets.discovery.vector_index import INDEX_MIN_ROWS, VECTOR_COLUMN, ensure_vector_index

PIN_TAG_PREFIX = "avp-pin-"
# Rows a compacted fragment holds: about 400 MB of 1280x720 JPEGs, 25 fragments at BDD100K's
# 100k frames; a batch's compaction rewrites at most this many rows beside its own.
FRAGMENT_ROWS = 4096
BTREE_STALE_FRACTION = 0.1
# Index type per column that view filters and searches read (only columns that exist are
# indexed); FTS is Lance's own full-text (inverted) index, what `search describe` queries.
COLUMN_INDEXES = {
    "split": "BITMAP", "timeofday": "BITMAP", "weather": "BITMAP", "scene": "BITMAP", "batch_id": "BITMAP",
    "has_person": "BITMAP", "has_rider": "BITMAP", "is_duplicate": "BITMAP",
    "num_persons": "BTREE", "person_bbox_area_pct": "BTREE", "ingest_seq": "BTREE", "image_id": "BTREE",
    "clip_id": "BTREE",  # ingest and the split check look up the new rows' clips
    "ann_categories": "LABEL_LIST", "scene_description": "FTS",
}


@dataclass
class MaintenanceStats:
    """What one maintenance pass did to one table."""

    table: str
    version_before: int
    version_after: int
    fragments_before: int
    fragments_after: int
    fragments_merged: int
    versions_before: int
    versions_after: int
    pinned_versions: list[int]
    indexes: list[str] = field(default_factory=list)
    indexes_created: list[str] = field(default_factory=list)
    indexes_updated: list[str] = field(default_factory=list)
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


def _per_mode_table_names(conn) -> list[str]:
    """The `<mode>_eval_frames` tables reports write and the `<mode>_difficulty` tables mining writes."""
    return sorted(name for name in storage.table_names(conn) if name.endswith((EVAL_FRAMES_SUFFIX, DIFFICULTY_SUFFIX)))


def pinned_versions(conn, checkpoints_dir: str | Path, reports_dir: str | Path, views: Iterable[str],
                    storage_options: Mapping[str, str] | None = None) -> dict[str, set[int]]:
    """Table name → versions that must survive cleanup: those checkpoints and reports record
    (folders or object-store prefixes), and the frames-table version each of `views` reflects."""
    pins: dict[str, set[int]] = defaultdict(set)
    for text in locations.files_named(checkpoints_dir, "metadata.json", storage_options):
        metadata = json.loads(text)
        _record_pins(pins, metadata, [("train_view", "train_view_version"), ("val_view", "val_view_version"),
                                      ("source_table", "source_table_version")])
        _record_pins(pins, metadata.get("mining") or {}, [("table", "version")])
    for text in locations.files_named(reports_dir, "report.json", storage_options):
        report = json.loads(text)
        _record_pins(pins, report.get("val_view", {}), [("name", "version"), ("source_table", "source_table_version")])
        _record_pins(pins, report.get("eval_frames", {}), [("table", "version")])
        _record_pins(pins, report.get("frames_table", {}), [("name", "version")])  # base_detector_report's
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


def _create_index(table, column: str, index_type: str) -> None:
    if index_type == "FTS":  # stemmed, so 'rider' also finds '2 riders'; no positions: no phrase queries
        table.create_fts_index(column, stem=True, with_position=False, replace=False)
    else:
        table.create_scalar_index(column, index_type=index_type, replace=False)


def ensure_column_indexes(table, wanted: dict[str, str]) -> tuple[list[str], list[str]]:
    """Create the missing indexes on the columns of `wanted` that exist; (indexed, created)."""
    indexed = {column for index in table.list_indices() for column in index.columns}
    created = []
    for column, index_type in wanted.items():
        if column in table.schema.names and column not in indexed:
            _create_index(table, column, index_type)
            created.append(column)
    return sorted(indexed | set(created)), created


def compact(table, fragment_rows: int = FRAGMENT_ROWS) -> int:
    """Merge the fragments smaller than `fragment_rows` (the tail recent batches left); returns
    how many fragments were removed (0: nothing to merge, no commit)."""
    removed = table.to_lance().optimize.compact_files(target_rows_per_fragment=fragment_rows).fragments_removed
    table.checkout_latest()
    return removed


def update_indexes(table, stale_fraction: float = BTREE_STALE_FRACTION) -> list[str]:
    """Bring the indexes up to date with new rows (see the module notes); returns the updated
    columns. No index with unindexed rows: no commit."""
    incremental, rebuilt = [], []
    for index in table.list_indices():
        if index.columns == [VECTOR_COLUMN]:  # kept by `vector_index`
            continue
        stats = table.index_stats(index.name)
        if not stats.num_unindexed_rows:
            continue
        if stats.index_type != "BTREE":
            incremental.append(index)
        elif stats.num_unindexed_rows >= stale_fraction * stats.num_indexed_rows:
            table.create_scalar_index(index.columns[0], index_type="BTREE", replace=True)
            rebuilt.append(index)
    if incremental:
        table.to_lance().optimize.optimize_indices(index_names=[index.name for index in incremental])
        table.checkout_latest()
    return sorted(column for index in incremental + rebuilt for column in index.columns)


def maintain(table, name: str, pinned: Iterable[int], *, older_than: timedelta,
             indexes: dict[str, str] | None = None, compact_fragments: bool = True,
             fragment_rows: int = FRAGMENT_ROWS, vector_index_min_rows: int | None = None) -> MaintenanceStats:
    """Pin, index, compact and clean up one table (its latest version is always kept). With
    nothing to compact or index there is no commit, so views stay current. With
    `vector_index_min_rows`, the embedding column gets its vector index from that many rows."""
    started = time.perf_counter()
    table.checkout_latest()
    version_before, fragments_before = table.version, len(table.to_lance().get_fragments())
    versions_before = len(table.list_versions())
    kept = pin(table, pinned)
    indexed, created = ensure_column_indexes(table, indexes or {})
    fragments_merged = compact(table, fragment_rows) if compact_fragments else 0
    updated = update_indexes(table)
    vector = ensure_vector_index(table, min_rows=vector_index_min_rows) if vector_index_min_rows else None
    if vector == "created":
        created.append(VECTOR_COLUMN)
        indexed = sorted({*indexed, VECTOR_COLUMN})
    elif vector:
        updated.append(VECTOR_COLUMN)
    table.to_lance().cleanup_old_versions(older_than=older_than, error_if_tagged_old_versions=False)
    table.checkout_latest()
    return MaintenanceStats(
        table=name, version_before=version_before, version_after=table.version, fragments_before=fragments_before,
        fragments_after=len(table.to_lance().get_fragments()), fragments_merged=fragments_merged,
        versions_before=versions_before, versions_after=len(table.list_versions()), pinned_versions=kept,
        indexes=indexed, indexes_created=created, indexes_updated=updated, elapsed_s=time.perf_counter() - started)


def maintain_all(conn, checkpoints_dir: str | Path, reports_dir: str | Path, *,
                 older_than: timedelta = timedelta(hours=1),
                 storage_options: Mapping[str, str] | None = None) -> dict[str, MaintenanceStats]:
    """Maintain the frames table (compacted, with its scalar indexes), every slice view and
    every `<mode>_eval_frames` and `<mode>_difficulty` table (cleaned up only: a compaction
    commit would give their rows a new version number, and checkpoints, reports and the view
    assets name data by version)."""
    if not table_exists(conn, FRAMES_TABLE):
        return {}
    views = _view_names(conn)
    pins = pinned_versions(conn, checkpoints_dir, reports_dir, views, storage_options)
    stats = {FRAMES_TABLE: maintain(conn.open_table(FRAMES_TABLE), FRAMES_TABLE, pins.get(FRAMES_TABLE, ()),
                                    older_than=older_than, indexes=COLUMN_INDEXES,
                                    vector_index_min_rows=INDEX_MIN_ROWS)}
    for name in views + _per_mode_table_names(conn):
        stats[name] = maintain(conn.open_table(name), name, pins.get(name, ()), older_than=older_than,
                               compact_fragments=False)
    return stats
