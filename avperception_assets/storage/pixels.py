"""Image bytes of frames, read from the frames table by stable row id: how every reader of
pixels (the loader, evaluation and its panels) gets them.

Slice views hold no image bytes: each would copy most of the frames table's disk again. A
view's `__source_row_id` is the frames table's stable row id, which survives compaction, and
the bytes are taken at the frames-table version the view reflects. Maintenance pins that
version for every view, checkpoint and report, so a pinned view version gives the same pixels
for as long as it is kept. A table that holds its own bytes (the frames table) is read as it is.

Nothing here knows about Dagster.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import lancedb
import pyarrow as pa
import pyarrow.compute as pc

from avperception_assets.storage.tables import FRAMES_TABLE, SOURCE_ROW_ID, reflected_version

IMAGE_BYTES = "image_bytes"


@functools.lru_cache(maxsize=4)
def _frames_table(uri: str, version: int | None):
    # One handle per process and version: DataLoader workers reopen it once, not per batch.
    table = lancedb.connect(uri).open_table(FRAMES_TABLE)
    if version is not None:
        table.checkout(version)
    return table


@dataclass(frozen=True)
class PixelReader:
    """Where the image bytes of one table's rows come from; small and picklable, so it travels
    to DataLoader workers."""

    uri: str
    holds_bytes: bool  # the table stores its own image bytes
    source_version: int | None = None  # frames-table version a view reflects (None: the latest)

    @classmethod
    def of(cls, uri: str, table) -> PixelReader:
        names = table.schema.names
        if IMAGE_BYTES in names:
            return cls(uri, holds_bytes=True)
        if SOURCE_ROW_ID not in names:
            raise ValueError(f"table {table.name!r} holds neither {IMAGE_BYTES!r} nor {SOURCE_ROW_ID!r}: "
                             "no way to its pixels")
        return cls(uri, holds_bytes=False, source_version=reflected_version(table))

    def columns(self, wanted: list[str], column: str = IMAGE_BYTES) -> list[str]:
        """The stored columns to read for `wanted`: the source row id instead of the bytes (or
        the frames-table `column`) of a view."""
        if self.holds_bytes or column not in wanted:
            return list(wanted)
        return [SOURCE_ROW_ID if c == column else c for c in wanted]

    def attach(self, batch: pa.RecordBatch, column: str = IMAGE_BYTES) -> pa.RecordBatch:
        """`batch` (read with `columns`) with its rows' image bytes (or another frames-table
        `column`: the embedding), in the batch's row order."""
        if self.holds_bytes:
            return batch
        row_ids = batch.column(SOURCE_ROW_ID).cast(pa.uint64())
        taken = (_frames_table(self.uri, self.source_version).take_row_ids(row_ids.to_pylist())
                 .select([column]).with_row_id().to_arrow())  # in row-id order, not the batch's
        positions = pc.index_in(row_ids, value_set=taken["_rowid"])
        if positions.null_count:
            missing = pc.filter(row_ids, pc.is_null(positions)).to_pylist()
            raise LookupError(
                f"{len(missing)} rows are missing from {FRAMES_TABLE!r} at version {self.source_version} "
                f"(row ids {missing[:5]}); was that version cleaned up, or were the rows deleted?")
        return batch.append_column(column, taken[column].take(positions).combine_chunks())
