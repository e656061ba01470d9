"""What ingestion and the footage sensor read from the frames table, at two table sizes.

Each table holds only the looked-up columns (image_id, batch_id, ingest_seq; no images), in
batches of 500 rows, compacted and indexed as `table_maintenance` leaves it, plus one small
unindexed batch as the last ingestion leaves it. Three lookups, medians of 7:
- the image ids of a 500-frame batch already in the table (`ingest.known_frames`), against
  reading the whole image_id/batch_id/ingest_seq columns (what ingestion read before);
- the next ingest_seq (`ingest.next_ingest_seq`);
- which landed batches are ingested (`ingest.ingested_batch_ids`, the sensor's tick).
Targets: the first two cost at most 1.2x at the larger size (they follow the batch, not the
table); the tick is reported with its growth.

    .venv/bin/python benchmarks/table_lookups.py [--sizes 20000 100000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from avperception_assets.ingest import frames as ingest
from avperception_assets.storage import tables as storage
from avperception_assets.curation.maintenance import COLUMN_INDEXES
from targets import target  # noqa: E402

BATCH = 500


def build(conn, rows: int):
    seqs = np.arange(rows + 10, dtype=np.int64)
    data = pa.table({"image_id": [f"img-{i:08d}" for i in seqs], "batch_id": [f"batch-{i // BATCH:05d}" for i in seqs],
                     "ingest_seq": seqs})
    table = conn.create_table("bdd100k", data.slice(0, BATCH), storage_options=storage.STABLE_ROW_IDS)
    for start in range(BATCH, rows, BATCH):
        table.add(data.slice(start, BATCH))
    table.optimize()
    for column in ("image_id", "batch_id", "ingest_seq"):
        table.create_scalar_index(column, index_type=COLUMN_INDEXES[column])
    table.add(data.slice(rows, 10))  # the newest batch, not indexed yet
    return table


def median_ms(call, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def measure(rows: int) -> dict[str, float]:
    conn = storage.connect(tempfile.mkdtemp(prefix="avp-lookups-"))
    table = build(conn, rows)
    image_ids = [f"img-{i:08d}" for i in range(rows - BATCH, rows)]
    return {
        "known_frames": median_ms(lambda: ingest.known_frames(table, image_ids)),
        "whole_columns": median_ms(lambda: table.to_lance().to_table(columns=["image_id", "batch_id", "ingest_seq"])),
        "next_ingest_seq": median_ms(lambda: ingest.next_ingest_seq(table)),
        "sensor_tick": median_ms(lambda: ingest.ingested_batch_ids(conn)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[20000, 100000])
    args = parser.parse_args(argv)
    small, large = (measure(rows) for rows in args.sizes)
    for name in small:
        print(f"{name}: {small[name]:.1f} ms at {args.sizes[0]} rows, {large[name]:.1f} ms at {args.sizes[1]} rows "
              f"({large[name] / small[name]:.2f}x)")
    for name in ("known_frames", "next_ingest_seq"):
        target(f"{name}_growth", large[name] / small[name], "<=", 1.2)


if __name__ == "__main__":
    main()
