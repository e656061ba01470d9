"""Curated slices: one Geneva materialized view per failure mode and split.

`bdd100k_<mode>_train` holds the mode's frames of the train split that are not flagged as
duplicates; `bdd100k_<mode>_val` every frame of the val split the mode's filter keeps. Both
take only frames that decoded in curation (`dhash` set). A
refresh appends only the qualifying rows that are new in the source (Geneva tracks source
row ids and the source version each refresh reflects), so the cost of a refresh follows the
new footage, not the table. Rows whose curation values are still NULL do not qualify; refresh
after the curation backfill (the Dagster graph orders it so).

Over a source with stable row ids Geneva 0.17 would re-copy every fragment of a view on each
refresh (it cannot tell which source fragments a view fragment came from);
`patches.geneva` mends that inside Ray's workers, so a refresh copies the new rows and
only those view fragments whose source rows a compaction or backfill rewrote. What still grows
with the table is Geneva's search for new and deleted source rows: it reads the filter's
scalar columns (not pixels) of every source fragment.

A view holds every column of its rows but the image bytes, which readers take from the frames
table by stable row id (`pixels`), and the embedding, so views together stay a small fraction
of the table's disk.

The filter a view holds is Geneva's own record of its query (view schema metadata). A view
whose registry filter changed, or one that still holds image bytes, is dropped and recreated
(a refresh would keep the old query);
its Lance history restarts, so checkpoints must record the filter with the view version
(ViewStats.filter), which `open_view` callers can compare with `view_filter_of`.

Nothing here knows about Dagster.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from avperception_assets.cluster.ray import require_ray
from avperception_assets.patches.geneva import release_job_tracker
from avperception_assets.failure_modes.registry import FailureMode
from avperception_assets.storage.pixels import IMAGE_BYTES
from avperception_assets.storage.tables import FRAMES_SCHEMA, FRAMES_TABLE, reflected_version, table_exists
from avperception_assets.discovery.vector_index import VECTOR_COLUMN

SPLITS = ("train", "val")
SPLIT_COLUMNS = {"train": ("split", "is_duplicate"), "val": ("split", "dhash")}


class SliceError(RuntimeError):
    """A slice that cannot be built from the table as it is (the message says why)."""


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise SliceError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def view_name(mode: FailureMode | str, split: str) -> str:
    """Table (and asset) name of a slice view: `bdd100k_<mode>_<split>`."""
    name = mode.name if isinstance(mode, FailureMode) else mode
    return f"{FRAMES_TABLE}_{name}_{_check_split(split)}"


def view_filter(mode: FailureMode, split: str) -> str:
    """The full SQL filter of a view. Only frames that decoded in curation qualify: `dhash`
    (and so `is_duplicate`) stays NULL for a frame that does not decode or is not curated
    yet, and `is_duplicate = false` is NULL, so excluded, for such frames."""
    if _check_split(split) == "train":
        return f"({mode.where}) AND split = 'train' AND is_duplicate = false"
    return f"({mode.where}) AND split = 'val' AND dhash IS NOT NULL"


def view_columns(mode: FailureMode, split: str) -> tuple[str, ...]:
    """Source columns the view's filter reads (the view's data dependencies)."""
    extra = [c for c in SPLIT_COLUMNS[_check_split(split)] if c not in mode.columns]
    return tuple(mode.columns) + tuple(extra)


def all_views(modes) -> list[tuple[FailureMode, str]]:
    """(mode, split) of every view of the registry `modes`, in registry order."""
    return [(mode, split) for mode in modes for split in SPLITS]


# --- what a view records ----------------------------------------------------------------


def view_filter_of(view) -> str | None:
    """The filter a view was created with, from Geneva's record of its query."""
    from geneva.query import MATVIEW_META_QUERY, GenevaQuery

    raw = (view.schema.metadata or {}).get(MATVIEW_META_QUERY.encode())
    return None if raw is None else GenevaQuery.model_validate_json(raw).base.filter


def open_view(conn, name: str, version: int | None = None):
    """Open a slice view, time-travelled to `version` when given (reproduces a checkpoint's data)."""
    if not table_exists(conn, name):
        raise SliceError(f"slice view {name!r} does not exist; materialize it first")
    view = conn.open_table(name)
    if version is not None:
        versions = [v["version"] for v in view.list_versions()]
        if version not in versions:
            raise SliceError(f"slice view {name!r} has no version {version}; it has {versions}")
        view.checkout(version)
    return view


def _fragment_rows(view) -> dict[int, int]:
    """Live rows per fragment id: what a refresh appended and removed, from metadata alone
    (a refresh appends new fragments and deletes the rows of deleted source rows in place)."""
    return {fragment.fragment_id: fragment.count_rows() for fragment in view.to_lance().get_fragments()}


def drop_views(conn, targets: Iterable[tuple[FailureMode, str]]) -> list[str]:
    """Drop the views `targets` [(mode, split)] that exist, so that their next refresh creates them
    anew (a new version history): for views whose rows were chosen by values since recomputed.
    Returns the names dropped."""
    dropped = [view_name(mode, split) for mode, split in targets if table_exists(conn, view_name(mode, split))]
    for name in dropped:
        conn.drop_table(name)
    return dropped


# --- refresh --------------------------------------------------------------------------


@dataclass
class ViewStats:
    """What one materialization of a view did, and what the view now holds."""

    view: str
    mode: str
    split: str
    filter: str
    columns: tuple[str, ...]
    row_count: int
    view_version: int
    source_version: int  # source table version the view reflects
    rows_added: int  # rows this refresh appended
    rows_removed: int  # rows whose source rows were deleted
    created: bool  # the view did not exist (or was recreated) in this run
    recreated: bool  # the old view was dropped (`recreate_reason` says why)
    recreate_reason: str | None
    previous_filter: str | None
    refreshed: bool  # False: the view already reflected the current source version
    source_rows_not_curated: int  # rows of the split whose filter columns are still NULL
    elapsed_s: float

    def as_metadata(self) -> dict[str, Any]:
        meta = asdict(self)
        meta["columns"] = list(self.columns)
        meta["elapsed_s"] = round(self.elapsed_s, 3)
        for key in ("recreate_reason", "previous_filter"):
            if meta[key] is None:
                del meta[key]
        return meta


def _open_source(conn):
    if not table_exists(conn, FRAMES_TABLE):
        raise SliceError(f"table {FRAMES_TABLE!r} does not exist; ingest footage first")
    source = conn.open_table(FRAMES_TABLE)
    if source.count_rows() == 0:
        raise SliceError(f"table {FRAMES_TABLE!r} has no rows yet; ingest footage first")
    return source


def _check_source_columns(source, mode: FailureMode, split: str) -> None:
    missing = [c for c in view_columns(mode, split) if c not in source.schema.names]
    if missing:
        raise SliceError(
            f"view {view_name(mode, split)!r} (failure mode {mode.name!r}) reads columns missing from "
            f"{FRAMES_TABLE!r}: {missing}; materialize those curation columns first")


def _view_select(schema) -> dict[str, str]:
    """Every source column but the image bytes and the embedding, as the view's columns: readers
    take pixels (and searches vectors) from the frames table by the view's `__source_row_id`
    (`pixels`). Geneva 0.17 copies a bare column's nullability into the view, then cannot
    append its placeholder rows to a non-nullable column; `coalesce(col)` is the same values
    in a nullable column."""
    return {f.name: f.name if f.nullable else f"coalesce({f.name})" for f in schema
            if f.name not in (IMAGE_BYTES, VECTOR_COLUMN)}


def create_view(conn, source, name: str, where: str):
    """An empty Geneva materialized view `name` of `source`'s rows matching `where`, without
    their image bytes; its first refresh fills it."""
    return conn.create_materialized_view(name, source.search().select(_view_select(source.schema)).where(where))


def _recreate_reason(view, wanted: str, source) -> str | None:
    """Why an existing view must be dropped and created again (None: it is kept)."""
    if view_filter_of(view) != wanted:
        return "its filter is not the registry's"
    if IMAGE_BYTES in view.schema.names:
        return "it holds image bytes (created before views read pixels from the frames table)"
    # A view selects the source's columns as they were when it was created: one from before the
    # clip columns would choose held-out frames without clips and score crowd regions as objects.
    missing = [f.name for f in FRAMES_SCHEMA if f.name in source.schema.names
               and f.name not in view.schema.names and f.name != IMAGE_BYTES]
    if missing:
        return f"it lacks frames-table columns added since it was created: {', '.join(missing)}"
    return None


def _not_curated(source, mode: FailureMode, split: str) -> int:
    nullable = [c for c in view_columns(mode, split) if c != "split"]
    return source.count_rows(f"split = '{split}' AND ({' OR '.join(f'{c} IS NULL' for c in nullable)})")


def _prepare(conn, source, mode: FailureMode, split: str):
    """The view, created if absent and recreated if its filter is not the registry's:
    (view, fragment rows before, recreate reason, previous filter)."""
    name, wanted = view_name(mode, split), view_filter(mode, split)
    if table_exists(conn, name):
        view = conn.open_table(name)
        reason = _recreate_reason(view, wanted, source)
        if reason is None:
            return view, _fragment_rows(view), None, None
        previous = view_filter_of(view)
        conn.drop_table(name)
        return create_view(conn, source, name, wanted), {}, reason, previous
    return create_view(conn, source, name, wanted), None, None, None


def _refresh_one(conn, source, mode: FailureMode, split: str, concurrency: int, lock: threading.Lock) -> ViewStats:
    """Create the view if absent, recreate it if its filter is not the registry's, and
    refresh it unless it already reflects the source's current version. Only the refresh job
    runs outside `lock`, beside other views' jobs."""
    started = time.perf_counter()
    with lock:
        view, before, reason, previous = _prepare(conn, source, mode, split)
    created = before is None or reason is not None
    refreshed = created or reflected_version(view) != source.version
    if refreshed:
        result = view.refresh(src_version=source.version, concurrency=concurrency)
        release_job_tracker(result.job_id)
    with lock:
        view.checkout_latest()
        before, after = before or {}, _fragment_rows(view)
        added = sum(rows for fragment, rows in after.items() if fragment not in before)
        return ViewStats(
            view=view_name(mode, split), mode=mode.name, split=split, filter=view_filter_of(view),
            columns=view_columns(mode, split), row_count=view.count_rows(), view_version=view.version,
            source_version=reflected_version(view), rows_added=added,
            rows_removed=sum(before.values()) + added - sum(after.values()), created=created,
            recreated=reason is not None, recreate_reason=reason, previous_filter=previous, refreshed=refreshed,
            source_rows_not_curated=_not_curated(source, mode, split), elapsed_s=time.perf_counter() - started)


# A refresh job pins a driver, a job tracker and writers (0.1 CPU each) for its whole run while
# its copy actors wait for a whole CPU: jobs side by side must leave one CPU free, or on a
# small Ray they starve each other for good.
JOB_PINNED_CPUS = 0.5


def side_by_side(jobs: int) -> int:
    """How many refresh jobs run at once on the connected Ray (on 2 CPUs: 2; six refreshes took
    32.9 s that way here, against 41.7 s one after another)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, min(jobs, int((cpus - 1.0) / JOB_PINNED_CPUS)))


def refresh_views(conn, targets: Iterable[tuple[FailureMode, str]], *, concurrency: int = 1) -> dict[str, ViewStats]:
    """Bring the views `targets` [(mode, split)] (every view of a registry: `all_views(modes)`)
    up to date with the frames table; returns their stats by view name.

    Needs a running Ray (Geneva's refresh jobs run on it). Refreshes run side by side as far as
    Ray's CPUs allow (`side_by_side`); `concurrency` is the number of copy actors per job.
    """
    require_ray("view refreshes")
    targets = list(targets)
    source = _open_source(conn)
    for mode, split in targets:  # every view's columns exist before any job starts
        _check_source_columns(source, mode, split)
    lock = threading.Lock()  # view creation and metadata reads go one at a time
    with ThreadPoolExecutor(side_by_side(len(targets)), thread_name_prefix="view-refresh") as pool:
        stats = list(pool.map(lambda t: _refresh_one(conn, source, *t, concurrency, lock), targets))
    return {s.view: s for s in stats}


# --- check --------------------------------------------------------------------------------


@dataclass
class ViewCheck:
    passed: bool
    metadata: dict[str, Any]


def check_view(conn, mode: FailureMode, split: str) -> ViewCheck:
    """The view's row count equals a direct count on the source table, with the view's
    filter, at the source version the view reflects."""
    name = view_name(mode, split)
    if not table_exists(conn, name):
        return ViewCheck(False, {"reason": f"view {name!r} does not exist"})
    view = conn.open_table(name)
    version, held = reflected_version(view), view_filter_of(view)
    if version is None:
        return ViewCheck(False, {"reason": f"view {name!r} has never been refreshed"})
    source = conn.open_table(FRAMES_TABLE)
    source.checkout(version)
    expected, actual = source.count_rows(held), view.count_rows()
    return ViewCheck(expected == actual, {
        "view_rows": actual, "source_rows_matching": expected, "source_version": version,
        "view_version": view.version, "filter": held,
        "filter_matches_registry": held == view_filter(mode, split)})
