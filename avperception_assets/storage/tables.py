"""The one LanceDB/Geneva backbone: connection, table names, the frames schema, and lineage
(which frames-table version a view's rows come from)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

FRAMES_TABLE = "bdd100k"
EVAL_FRAMES_SUFFIX = "_eval_frames"  # `<mode>_eval_frames`: every val frame's matches, per report
DIFFICULTY_SUFFIX = "_difficulty"  # `<mode>_difficulty`: each train frame's difficulty, per starting model
QUARANTINE_TABLE = "quarantine"
SOURCE_ROW_ID = "__source_row_id"  # Geneva's column: the source row a view row was copied from

# Geneva view refresh after an append needs stable row ids on the source table.
STABLE_ROW_IDS = {"new_table_enable_stable_row_ids": "true"}

BOX = pa.list_(pa.float32())  # [x1, y1, x2, y2] in pixels
CLIP_ID = "clip_id"

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
        # Added with footage clips (tables created before gain them, NULL: `open_frames`).
        pa.field(CLIP_ID, pa.string()),  # the video a frame is of; NULL: a frame of its own (YOLO, VOC, COCO)
        pa.field("clip_frame_index", pa.int64()),  # its frameIndex in the clip; NULL where unknown (100k images)
        pa.field("ann_track_ids", pa.list_(pa.string())),  # per box; a track is (clip_id, id); NULL: no tracks
        pa.field("ann_crowd", pa.list_(pa.bool_())),  # per box: an ignore region, never an object to find
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


def open_frames(conn):
    """The frames table, created on first use. A table created before a column of `FRAMES_SCHEMA`
    existed gains it, NULL in its rows: a schema change only, no data rewritten."""
    table = open_or_create(conn, FRAMES_TABLE, FRAMES_SCHEMA)
    missing = [field for field in FRAMES_SCHEMA if field.name not in table.schema.names]
    if not missing:
        return table
    table.to_lance().add_columns(pa.schema(missing))
    return conn.open_table(FRAMES_TABLE)


def rows_with(dataset, column: str, values, columns: list[str], chunk: int = 1000, *, where: str | None = None,
              with_row_address: bool = False) -> pa.Table:
    """The `columns` of the rows whose `column` is one of `values` (and that `where` keeps), looked
    up `chunk` values at a time (through the column's scalar index where maintenance built one):
    the cost follows the values."""
    values = sorted(set(values))
    parts = [dataset.to_table(columns=columns, with_row_address=with_row_address,
                              filter=and_where(f"{column} IN ({sql_list(values[start:start + chunk])})", where))
             for start in range(0, len(values), chunk)]
    if parts:
        return pa.concat_tables(parts)
    empty = dataset.schema.empty_table().select(columns)
    return empty.append_column("_rowaddr", pa.array([], pa.uint64())) if with_row_address else empty


def update_in_place(table, key: str, rows: pa.Table) -> int:
    """Write the other columns of `rows` into the rows of `table` whose `key` matches, in place:
    each fragment holding such rows gains new data files for those columns alone, as a Geneva
    backfill writes them, so rows keep their fragment, stable row id and every other column (no
    pixels rewritten), and a view refresh sees their new values. One commit; returns the version."""
    import lance

    dataset = table.to_lance()
    found = rows_with(dataset, key, rows[key].to_pylist(), [key], with_row_address=True)
    fragment_ids = sorted({address >> 32 for address in found["_rowaddr"].to_pylist()})  # upper 32 bits
    updated, fields, offsets = [], set(), {}
    for fragment_id in fragment_ids:
        metadata, modified, matched = dataset.get_fragment(fragment_id).update_columns(
            rows, left_on=key, with_offsets=True)
        updated.append(metadata)
        fields.update(modified)
        offsets[fragment_id] = matched
    if updated:
        operation = lance.LanceOperation.Update(updated_fragments=updated, fields_modified=sorted(fields),
                                                update_mode="rewrite_columns", updated_fragment_offsets=offsets)
        lance.LanceDataset.commit(dataset, operation, read_version=dataset.version)  # its storage options too
    table.checkout_latest()
    return table.version


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


def storage_options_of(table) -> dict[str, str]:
    """The object-store options `table` was opened with (geneva 0.17 keeps its connection's in
    the private `_storage_options`; a plain LanceDB table has none here)."""
    return dict(getattr(table, "_storage_options", None) or {})


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


def reflected_version(view) -> int | None:
    """Source table version a Geneva view's last successful refresh reflects (None: never): what
    Geneva records on the view's `__source_row_id` field."""
    from geneva.table import MATVIEW_LAST_REFRESHED_VERSION

    if SOURCE_ROW_ID not in view.schema.names:
        return None
    recorded = (view.schema.field(SOURCE_ROW_ID).metadata or {}).get(MATVIEW_LAST_REFRESHED_VERSION.encode())
    return None if recorded is None else int(recorded)


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
