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


def clips_in_two_splits(table, where: str | None = None) -> list[str]:
    """Clip ids of the selected rows whose frames, over the whole table, are in more than one split:
    only those clips' rows are read (ingestion settles every frame in its clip's split)."""
    if storage.CLIP_ID not in table.schema.names:  # a table from before clips has none
        return []
    dataset = table.to_lance()
    if where is None:
        rows = dataset.to_table(columns=[storage.CLIP_ID, "split"], filter=f"{storage.CLIP_ID} IS NOT NULL")
    else:
        selected = dataset.to_table(columns=[storage.CLIP_ID], filter=storage.and_where(where, f"{storage.CLIP_ID} IS NOT NULL"))
        rows = storage.rows_with(dataset, storage.CLIP_ID, pc.unique(selected[storage.CLIP_ID]).to_pylist(),
                                 [storage.CLIP_ID, "split"])
    splits = rows.group_by(storage.CLIP_ID).aggregate([("split", "count_distinct")])
    return sorted(splits.filter(pc.greater(splits["split_count_distinct"], 1))[storage.CLIP_ID].to_pylist())
