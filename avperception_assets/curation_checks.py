"""Checks on the curation columns: coverage, agreement with the annotations, value range, and
one survivor per near-duplicate group. Shared by the Dagster asset checks and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .curation import column_params, error_rows
from .curation_udfs import count_persons, duplicate_flags, has_person, has_rider


@dataclass
class CheckOutcome:
    passed: bool
    metadata: dict[str, Any]
    warn_only: bool = False  # failing only because of rows with a recorded UDF error


def check_coverage(table, column: str) -> CheckOutcome:
    """Every row holds a value; NULL rows with a recorded UDF error are reported, not hidden."""
    if column_params(table, column) is None:
        return CheckOutcome(False, {"reason": f"column {column!r} does not exist yet"})
    total, nulls = table.count_rows(), table.count_rows(f"{column} IS NULL")
    errored, sample = error_rows(table, column)
    meta = {"rows_total": total, "rows_null": nulls, "null_rows_with_recorded_error": errored,
            "coverage": round((total - nulls) / total, 6) if total else 1.0}
    if sample:
        meta["errors"] = sample
    return CheckOutcome(nulls == 0, meta, warn_only=0 < nulls == errored)


def _read(table, columns: list[str]) -> pa.Table:
    return table.to_lance().to_table(columns=columns)


def check_annotation_consistency(table, column: str) -> CheckOutcome:
    """has_person / has_rider / num_persons agree with the annotations on every filled row."""
    expected_of = {"has_person": has_person, "has_rider": has_rider, "num_persons": count_persons}[column]
    data = _read(table, ["image_id", "ann_categories", column])
    mismatches = [image_id for image_id, cats, value in
                  zip(data["image_id"].to_pylist(), data["ann_categories"].to_pylist(), data[column].to_pylist())
                  if value is not None and value != expected_of(cats)]
    return CheckOutcome(not mismatches, {"mismatched_rows": len(mismatches), "sample": mismatches[:10]})


def check_area_range(table) -> CheckOutcome:
    """0 <= person_bbox_area_pct <= 100, and one recorded source."""
    column = "person_bbox_area_pct"
    bad = table.count_rows(f"{column} < 0 OR {column} > 100 OR isnan({column})")
    params = column_params(table, column) or {}
    return CheckOutcome(bad == 0, {"rows_out_of_range": bad, "source": params.get("source", "unknown")})


def check_duplicate_groups(table) -> CheckOutcome:
    """Each duplicate group keeps exactly its earliest frame unflagged.

    Holds iff (a) no two unflagged frames are within the threshold and (b) every flagged frame
    has an earlier-ingested frame within it; then every group's earliest frame is the survivor.
    """
    params = column_params(table, "is_duplicate")
    if params is None:
        return CheckOutcome(False, {"reason": "column 'is_duplicate' does not exist yet"})
    threshold = int(params["hamming_threshold"])
    data = table.to_lance().to_table(columns=["image_id", "dhash", "ingest_seq", "is_duplicate"],
                                     filter="dhash IS NOT NULL AND is_duplicate IS NOT NULL")
    hashes = data["dhash"].to_numpy(zero_copy_only=False).astype(np.uint64)
    seqs = data["ingest_seq"].to_numpy(zero_copy_only=False).astype(np.int64)
    flagged = data["is_duplicate"].to_numpy(zero_copy_only=False).astype(bool)
    expected = duplicate_flags(hashes, seqs, hashes, seqs, threshold)
    wrong = np.flatnonzero(expected != flagged)
    keep_h, keep_s = hashes[~flagged], seqs[~flagged]
    # Unflagged frames within the threshold of another unflagged frame (either order).
    clashes = int((duplicate_flags(keep_h, keep_s, keep_h, keep_s, threshold)).sum())
    ids = data["image_id"].to_pylist()
    meta = {"hamming_threshold": threshold, "frames": len(flagged), "flagged": int(flagged.sum()),
            "survivor_clashes": clashes, "wrong_flags": len(wrong), "sample": [ids[i] for i in wrong[:10]]}
    return CheckOutcome(clashes == 0 and len(wrong) == 0, meta)

