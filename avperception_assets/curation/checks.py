"""Checks on the curation columns: coverage, agreement with the annotations, value ranges, unit
embeddings, one survivor per near-duplicate group, and no near-duplicate pair across splits
(`leaks`). Shared by the Dagster asset checks and the tests.

Each check looks at the rows `where` selects (a run's checks: the rows the run filled, see
`storage.rows_since`); `where=None` checks the whole table (the audit job)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from avperception_assets.curation.columns import error_rows
from avperception_assets.curation.leaks import find_leaks
from avperception_assets.discovery.vector_index import vectors_matrix
from avperception_assets.storage.tables import CLIP_ID, and_where, column_params
from avperception_assets.curation.udfs import clip_keys, count_persons, duplicate_flags, has_person, has_rider, scene_description


@dataclass
class CheckOutcome:
    passed: bool
    metadata: dict[str, Any]
    warn_only: bool = False  # failing only because of rows with a recorded UDF error


def check_coverage(table, column: str, where: str | None = None) -> CheckOutcome:
    """Every row holds a value; NULL rows with a recorded UDF error are reported, not hidden."""
    if column_params(table, column) is None:
        return CheckOutcome(False, {"reason": f"column {column!r} does not exist yet"})
    total, nulls = table.count_rows(where), table.count_rows(and_where(f"{column} IS NULL", where))
    errored, sample = error_rows(table, column, where=where)
    meta = {"rows_checked": total, "rows_null": nulls, "null_rows_with_recorded_error": errored,
            "coverage": round((total - nulls) / total, 6) if total else 1.0}
    if sample:
        meta["errors"] = sample
    return CheckOutcome(nulls == 0, meta, warn_only=0 < nulls == errored)


# What each annotation column is recomputed from: (columns read, function of them).
EXPECTED = {
    "has_person": (("ann_categories", "ann_crowd"), has_person),
    "has_rider": (("ann_categories", "ann_crowd"), has_rider),
    "num_persons": (("ann_categories", "ann_crowd"), count_persons),
    "scene_description": (("timeofday", "weather", "scene", "ann_categories", "ann_crowd"), scene_description),
}


def check_annotation_consistency(table, column: str, where: str | None = None) -> CheckOutcome:
    """The annotation columns (has_person, has_rider, num_persons, scene_description) agree with
    the annotations (crowd boxes skipped) and scene attributes on every filled row."""
    inputs, expected_of = EXPECTED[column]
    present = [c for c in inputs if c in table.schema.names]  # a table from before clips has no ann_crowd
    data = table.to_lance().to_table(columns=["image_id", *present, column], filter=where).to_pylist()
    mismatches = [row["image_id"] for row in data
                  if row[column] is not None and row[column] != expected_of(*(row.get(c) for c in inputs))]
    return CheckOutcome(not mismatches, {"rows_checked": len(data), "mismatched_rows": len(mismatches),
                                         "sample": mismatches[:10]})


def check_unit_vectors(table, where: str | None = None, tolerance: float = 1e-3) -> CheckOutcome:
    """Every filled embedding has the recorded model's dimension and unit norm."""
    params = column_params(table, "embedding")
    if params is None:
        return CheckOutcome(False, {"reason": "column 'embedding' does not exist yet"})
    data = table.to_lance().to_table(columns=["image_id", "embedding"],
                                     filter=and_where("embedding IS NOT NULL", where))
    dims = set(pc.list_value_length(data["embedding"]).to_pylist())
    norms = np.linalg.norm(vectors_matrix(data["embedding"]), axis=1)
    off = np.flatnonzero(np.abs(norms - 1.0) > tolerance)
    ids = data["image_id"].to_pylist()
    meta = {"rows_checked": data.num_rows, "model": params.get("model", "unknown"), "dim": params.get("dim"),
            "dims_found": sorted(dims), "rows_not_unit_norm": len(off), "sample": [ids[i] for i in off[:10]]}
    return CheckOutcome(dims <= {params.get("dim")} and not len(off), meta)


def check_uniqueness_range(table, where: str | None = None) -> CheckOutcome:
    """0 <= uniqueness <= its cap on the filled rows."""
    params = column_params(table, "uniqueness") or {}
    cap = float(params.get("cap", 1.0))
    bad = table.count_rows(and_where(f"uniqueness < 0 OR uniqueness > {cap} OR isnan(uniqueness)", where))
    return CheckOutcome(bad == 0, {"rows_checked": table.count_rows(where), "rows_out_of_range": bad, "cap": cap})


def check_area_range(table, where: str | None = None) -> CheckOutcome:
    """0 <= person_bbox_area_pct <= 100, and one recorded source."""
    column = "person_bbox_area_pct"
    bad = table.count_rows(and_where(f"{column} < 0 OR {column} > 100 OR isnan({column})", where))
    params = column_params(table, column) or {}
    return CheckOutcome(bad == 0, {"rows_checked": table.count_rows(where), "rows_out_of_range": bad,
                                   "source": params.get("source", "unknown")})


def _hash_rows(table, where: str | None, ids: bool = True) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray,
                                                                     np.ndarray]:
    """(image ids, or [] without `ids`, dhashes, ingest seqs, clip keys, flags) of the rows `where` selects."""
    has_clips = CLIP_ID in table.schema.names  # a table from before clips has none
    columns = ["dhash", "ingest_seq", "is_duplicate", *([CLIP_ID] if has_clips else []), *(["image_id"] if ids else [])]
    data = table.to_lance().to_table(columns=columns,
                                     filter=and_where("dhash IS NOT NULL AND is_duplicate IS NOT NULL", where))
    seqs = data["ingest_seq"].to_numpy().astype(np.int64)
    return (data["image_id"].to_pylist() if ids else [], data["dhash"].to_numpy().astype(np.uint64), seqs,
            clip_keys(data[CLIP_ID] if has_clips else None, seqs), data["is_duplicate"].to_numpy().astype(bool))


def check_duplicate_groups(table, where: str | None = None) -> CheckOutcome:
    """A frame is flagged iff an earlier-ingested frame of another clip is within the threshold.

    Checks (a) that no two unflagged frames of different clips are within the threshold and (b)
    the flags themselves: each group of near-duplicates across clips keeps its earliest frame
    unflagged (frames of one clip are alike by nature and never flag each other). The selected
    rows (a suffix of the ingestion order, or every row) are compared with every earlier frame:
    24 bytes a frame, never the pixels.
    """
    params = column_params(table, "is_duplicate")
    if params is None:
        return CheckOutcome(False, {"reason": "column 'is_duplicate' does not exist yet"})
    threshold = int(params["hamming_threshold"])
    ids, hashes, seqs, clips, flagged = _hash_rows(table, where)
    # The reference set is every frame: its fixed-width columns only, no image ids.
    _, ref_hashes, ref_seqs, ref_clips, ref_flagged = (_hash_rows(table, None, ids=False) if where
                                                       else (ids, hashes, seqs, clips, flagged))
    expected = duplicate_flags(hashes, seqs, clips, ref_hashes, ref_seqs, ref_clips, threshold)
    wrong = np.flatnonzero(expected != flagged)
    # Unflagged frames within the threshold of an earlier unflagged frame of another clip; a later
    # one is in the selection too, and is compared there.
    clashes = int(duplicate_flags(hashes[~flagged], seqs[~flagged], clips[~flagged], ref_hashes[~ref_flagged],
                                  ref_seqs[~ref_flagged], ref_clips[~ref_flagged], threshold).sum())
    meta = {"hamming_threshold": threshold, "rows_checked": len(flagged), "flagged": int(flagged.sum()),
            "survivor_clashes": clashes, "wrong_flags": len(wrong), "sample": [ids[i] for i in wrong[:10]]}
    return CheckOutcome(clashes == 0 and len(wrong) == 0, meta)


def check_split_leaks(table, where: str | None = None) -> CheckOutcome:
    """No near-duplicate pair of frames across splits, by dhash (`is_duplicate`'s threshold) or by
    embedding, among the pairs with a frame `where` selects (`leaks.find_leaks`)."""
    params, embedding = column_params(table, "is_duplicate"), column_params(table, "embedding")
    if params is None or embedding is None:
        return CheckOutcome(False, {"reason": "columns 'is_duplicate' and 'embedding' do not both exist yet"})
    leaks = find_leaks(table, where, int(params["hamming_threshold"]))
    return CheckOutcome(leaks.pairs == 0, {**leaks.as_metadata(), "embedding_model": embedding.get("model", "unknown")})
