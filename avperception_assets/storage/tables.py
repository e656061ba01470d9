"""The one LanceDB/Geneva backbone: connection, table names, the frames schema, and lineage
(which frames-table version a view's rows come from)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pyarrow as pa

FRAMES_TABLE = "bdd100k"
EVAL_FRAMES_SUFFIX = "_eval_frames"  # `<mode>_eval_frames`: every val frame's matches, per report
DIFFICULTY_SUFFIX = "_difficulty"  # `<mode>_difficulty`: each train frame's difficulty, per starting model
QUARANTINE_TABLE = "quarantine"

# Geneva view refresh after an append needs stable row ids on the source table.
STABLE_ROW_IDS = {"new_table_enable_stable_row_ids": "true"}

BOX = pa.list_(pa.float32())  # [x1, y1, x2, y2] in pixels

FRAMES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("source_file", pa.string()),  # path inside the batch folder
        pa.field("label_format", pa.string()),  # bdd_per_image_2018 | bdd_split_list_2018 | bdd_det_20 | yolo | pascal_voc | coco
        pa.field("split", pa.string(), nullable=False),  # train | val
        # JPEG/PNG bytes are compressed already: Lance compressing them again would mostly add
        # decompression to every read.
        pa.field("image_bytes", pa.large_binary(), metadata={"lance-encoding:compression": "none"}),
        pa.field("image_format", pa.string()),  # jpeg | png
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("weather", pa.string()),
        pa.field("scene", pa.string()),
        pa.field("timeofday", pa.string()),
        pa.field("timestamp", pa.int64()),
        pa.field("ann_categories", pa.list_(pa.string())),
        pa.field("ann_bboxes", pa.list_(BOX)),
        pa.field("ann_occluded", pa.list_(pa.bool_())),
        pa.field("ann_truncated", pa.list_(pa.bool_())),
        pa.field("ingest_seq", pa.int64(), nullable=False),  # global ingestion order
        pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("quarantined_at", pa.timestamp("us", tz="UTC")),
    ]
)


def rows_since(first_ingest_seq: int | None) -> str | None:
    """Filter for the frames ingested from `first_ingest_seq` on (None: every frame): how a run's
    checks select the run's rows."""
    return None if first_ingest_seq is None else f"ingest_seq >= {int(first_ingest_seq)}"


def sql_list(values) -> str:
    """`values` as comma-separated SQL string literals (quotes doubled), for an `IN (...)` filter."""
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def and_where(*filters: str | None) -> str | None:
    """The conjunction of the given filters, None ones left out (None: no filter at all)."""
    present = [f"({f})" for f in filters if f]
    return " AND ".join(present) or None


def connect(uri: str, storage_options: dict[str, str] | None = None):
    """Geneva connection (a LanceDB connection that can also run UDF backfills and views);
    `storage_options` are LanceDB's, for an object store."""
    import geneva

    return geneva.connect(uri, storage_options=storage_options or None)


def table_names(conn) -> set[str]:
    """Every table and view name (list_tables pages its answer)."""
    names, token = set(), None
    while True:
        page = conn.list_tables(page_token=token)
        names.update(page.tables)
        token = page.page_token
        if not token:
            return names


def table_exists(conn, name: str) -> bool:
    return name in table_names(conn)


def open_or_create(conn, name: str, schema: pa.Schema):
    """Open `name`, creating it empty (with stable row ids) on first use."""
    if table_exists(conn, name):
        return conn.open_table(name)
    return conn.create_table(name, schema=schema, storage_options=STABLE_ROW_IDS, exist_ok=True)


# Run in each Ray worker process: import deferrals and Geneva workarounds (`geneva_workarounds`).
_WORKER_SETUP = "avperception_assets.geneva_workarounds.setup_ray_worker"


def ray_context(ray_address: str | None = None, dashboard: bool = False):
    """Context manager for the Ray that Geneva backfills and view refreshes run on.

    No address: a local Ray on this machine, with Ray's dashboard UI only if `dashboard`.
    An address (`ray://host:10001`): the same jobs run on that cluster, which is how a deployment
    outgrows one machine. Its nodes run an image with this project installed, as the code
    location's is: Geneva 0.17 would otherwise zip the local code to an uploader that only its
    namespace connections have ("Geneva was not initialized"), and pip-install geneva into a fresh
    virtualenv on every node (GBs, and without lancedb). An empty manifest skips the first;
    clearing `pip` the second.
    """
    from geneva.manifest.mgr import GenevaManifest
    from geneva.runners.ray._mgr import ray_cluster

    if ray_address:
        return ray_cluster(addr=ray_address, use_portforwarding=False,
                           manifest=GenevaManifest(name="avperception_assets", zips=[]),
                           ray_init_kwargs={"runtime_env": {"pip": None, "worker_process_setup_hook": _WORKER_SETUP}})
    # The dashboard costs each local Ray start about 2.5 s (4.7 s against 7.2 s measured here)
    # and ten more processes; a run's Ray lives only as long as the run. (Ray 2.60 still starts
    # a dashboard head without it, minus the UI's module processes.)
    return ray_cluster(local=True, log_to_driver=False, ray_init_kwargs={
        "include_dashboard": dashboard,
        "runtime_env": {"worker_process_setup_hook": _WORKER_SETUP}})


def require_ray(what: str) -> None:
    """Fail clearly when no Ray runs in this process: plain functions never start one."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"{what} run on Ray, and none is running: open storage.ray_context() around "
                           "the call (in Dagster runs the lancedb resource does)")


def create_error_table(table) -> None:
    """Create Geneva's `geneva_errors` table for the database of `table`, if it is missing.

    Each backfill's driver process creates it on first use, so two backfills started together
    on a fresh database race to create it and one job fails (TableAlreadyExists; seen in CI).
    """
    from geneva.debug.error_store import ErrorStore

    ErrorStore(table._conn)  # Geneva's Table has no public accessor for its connection


def release_job_tracker(job_id: str) -> None:
    """Kill a finished Geneva job's JobTracker actor.

    Geneva 0.17 leaves one alive per backfill or view refresh (0.1 CPU, ~0.5 GB each), so a
    long-lived Ray (a Dagster run, a test session) runs out of CPU for new jobs after ~10.
    """
    import ray
    from geneva.runners.ray.naming import job_tracker_name

    with contextlib.suppress(ValueError):  # already gone
        ray.kill(ray.get_actor(job_tracker_name(job_id)))


def reflected_version(view) -> int | None:
    """Source table version a Geneva view's last successful refresh reflects (None: never)."""
    from geneva.table import _get_last_refreshed_version

    return _get_last_refreshed_version(view)


def source_table_version(uri: str, name: str, version: int) -> tuple[str, int | None]:
    """(source table, version) the rows of `name@version` come from: a view's last refresh,
    or the frames table itself."""
    if name == FRAMES_TABLE:
        return name, version
    view = connect(uri).open_table(name)
    view.checkout(version)
    return FRAMES_TABLE, reflected_version(view)

META_PARAMS = "avp.params"  # JSON of what defines the column's values

def column_params(table, column: str) -> dict[str, Any] | None:
    """The defining parameters recorded on an existing column (None: no such column)."""
    schema = table.schema
    if column not in schema.names:
        return None
    metadata = schema.field(column).metadata or {}
    raw = metadata.get(META_PARAMS.encode())
    return json.loads(raw) if raw else {}
