"""Checks on the curation columns: coverage, agreement with the annotations, value ranges, unit
embeddings, and one survivor per near-duplicate group. Shared by the Dagster asset checks and
the tests.

Each check looks at the rows `where` selects (a run's checks: the rows the run filled, see
`storage.rows_since`); `where=None` checks the whole table (the audit job)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from avperception_assets.curation.columns import error_rows
from avperception_assets.discovery.vector_index import vectors_matrix
from avperception_assets.storage.tables import column_params
from avperception_assets.storage.tables import and_where
from avperception_assets.curation.udfs import count_persons, duplicate_flags, has_person, has_rider, scene_description


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
    "has_person": (("ann_categories",), has_person),
    "has_rider": (("ann_categories",), has_rider),
    "num_persons": (("ann_categories",), count_persons),
    "scene_description": (("timeofday", "weather", "scene", "ann_categories"), scene_description),
}


def check_annotation_consistency(table, column: str, where: str | None = None) -> CheckOutcome:
    """The annotation columns (has_person, has_rider, num_persons, scene_description) agree with
    the annotations and scene attributes on every filled row."""
    inputs, expected_of = EXPECTED[column]
    data = table.to_lance().to_table(columns=["image_id", *inputs, column], filter=where).to_pylist()
    mismatches = [row["image_id"] for row in data
                  if row[column] is not None and row[column] != expected_of(*(row[c] for c in inputs))]
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


def _hash_rows(table, where: str | None, ids: bool = True) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, or [] without `ids`, dhashes, ingest seqs, flags) of the rows `where` selects."""
    data = table.to_lance().to_table(columns=["dhash", "ingest_seq", "is_duplicate", *(["image_id"] if ids else [])],
                                     filter=and_where("dhash IS NOT NULL AND is_duplicate IS NOT NULL", where))
    return (data["image_id"].to_pylist() if ids else [], data["dhash"].to_numpy(zero_copy_only=False).astype(np.uint64),
            data["ingest_seq"].to_numpy(zero_copy_only=False).astype(np.int64),
            data["is_duplicate"].to_numpy(zero_copy_only=False).astype(bool))


def check_duplicate_groups(table, where: str | None = None) -> CheckOutcome:
    """Each duplicate group keeps exactly its earliest frame unflagged.

    Holds iff (a) no two unflagged frames are within the threshold and (b) every flagged frame
    has an earlier-ingested frame within it; then every group's earliest frame is the survivor.
    The selected rows (a suffix of the ingestion order, or every row) are compared with every
    earlier frame: 16 bytes a frame, never the pixels.
    """
    params = column_params(table, "is_duplicate")
    if params is None:
        return CheckOutcome(False, {"reason": "column 'is_duplicate' does not exist yet"})
    threshold = int(params["hamming_threshold"])
    ids, hashes, seqs, flagged = _hash_rows(table, where)
    # The reference set is every frame: its fixed-width columns only, no image ids.
    _, ref_hashes, ref_seqs, ref_flagged = _hash_rows(table, None, ids=False) if where else (ids, hashes, seqs, flagged)
    expected = duplicate_flags(hashes, seqs, ref_hashes, ref_seqs, threshold)
    wrong = np.flatnonzero(expected != flagged)
    # Unflagged frames within the threshold of an earlier unflagged frame; a later one is in the
    # selection too, and is compared there.
    clashes = int(duplicate_flags(hashes[~flagged], seqs[~flagged], ref_hashes[~ref_flagged], ref_seqs[~ref_flagged],
                                  threshold).sum())
    meta = {"hamming_threshold": threshold, "rows_checked": len(flagged), "flagged": int(flagged.sum()),
            "survivor_clashes": clashes, "wrong_flags": len(wrong), "sample": [ids[i] for i in wrong[:10]]}
    return CheckOutcome(clashes == 0 and len(wrong) == 0, meta)
