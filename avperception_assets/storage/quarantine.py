"""The `quarantine` table: every rejected input with its batch, file, reason and detail.

Bad input never stops a batch and is never silently dropped; it is recorded here. Writes are
idempotent: re-running a batch never duplicates a record.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from avperception_assets.storage import tables as storage


@dataclass
class Rejection:
    file: str
    reason: str
    detail: str


def record_quarantine(conn, batch_id: str, rejections: Iterable[Rejection]) -> None:
    """Append rejections not yet recorded (keyed by batch, file and reason)."""
    rows = [{"batch_id": batch_id, "file": r.file, "reason": r.reason, "detail": r.detail,
             "quarantined_at": datetime.now(timezone.utc)} for r in rejections]
    table = storage.open_or_create(conn, storage.QUARANTINE_TABLE, storage.QUARANTINE_SCHEMA)
    if rows:
        new = pa.Table.from_pylist(rows, schema=storage.QUARANTINE_SCHEMA)
        table.merge_insert(["batch_id", "file", "reason"]).when_not_matched_insert_all().execute(new)
