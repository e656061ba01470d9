"""Audits of the frames table behind the `raw_frames` asset checks.

Each audit looks at the rows `where` selects: a check launched with a run looks at that run's
rows (`storage.rows_since`), so its cost follows the new footage; `where=None` audits the
whole table (the separate audit job).
"""

from __future__ import annotations

import pyarrow.compute as pc

from avperception_assets.storage import tables as storage
from avperception_assets.storage.decoding import decode, on_frame_threads


def duplicate_image_ids(table, where: str | None = None) -> list[str]:
    """Image ids of the selected rows that occur more than once in the whole table."""
    dataset = table.to_lance()
    ids = dataset.to_table(columns=["image_id"], filter=where)["image_id"]
    if where is not None:  # only the selected ids, counted over the table
        unique = pc.unique(ids).to_pylist()
        ids = dataset.to_table(columns=["image_id"], filter=f"image_id IN ({storage.sql_list(unique)})")["image_id"] \
            if unique else ids
    counts = pc.value_counts(ids)
    return [c["values"].as_py() for c in counts if c["counts"].as_py() > 1]


def frames_with_boxes_outside(table, where: str | None = None) -> list[str]:
    """Frames with a box that is empty or leaves the frame (ingestion clips or rejects those)."""
    bad = []
    for batch in table.to_lance().to_batches(columns=["image_id", "width", "height", "ann_bboxes"], filter=where):
        for row in batch.to_pylist():
            w, h = row["width"], row["height"]
            if any(not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h) for x1, y1, x2, y2 in row["ann_bboxes"] or []):
                bad.append(row["image_id"])
    return bad


def _decodes(data: bytes) -> bool:
    try:
        decode(data)
        return True
    except RuntimeError:  # torchvision's decoders raise RuntimeError on damaged data
        return False


def undecodable_frames(table, where: str | None = None) -> list[str]:
    """Frames whose bytes do not decode with the training decoder (ingestion checks structure only)."""
    bad = []
    for batch in table.to_lance().to_batches(columns=["image_id", "image_bytes"], batch_size=64, filter=where):
        ids, blobs = batch["image_id"].to_pylist(), batch["image_bytes"].to_pylist()
        bad.extend(i for i, ok in zip(ids, on_frame_threads(_decodes, blobs)) if not ok)
    return bad
