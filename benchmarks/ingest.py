"""Ingestion throughput against a bare pyarrow → Lance write of the same bytes, and peak RSS.

Targets: ingestion >= 0.8x the bare write's frames/s; peak RSS flat from 200 to 2,000 frames
(ratio <= 1.25). Each peak-RSS figure comes from a fresh process. Medians of 3 runs.

    .venv/bin/python benchmarks/ingest.py [--frames 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from avperception_assets.ingest import frames as ingest
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from targets import target


def ingest_seconds(landing: Path, batch_id: str, db: Path) -> float:
    conn = storage.connect(str(db))
    started = time.perf_counter()
    ingest.ingest_batches(conn, landing, [batch_id])
    return time.perf_counter() - started


def bare_write_seconds(landing: Path, batch_id: str, db: Path) -> float:
    """The floor: stream the same image files into a Lance table, no labels, no checks.

    The bytes column is the frames table's own (same Lance encoding), so the two write alike.
    """
    schema = pa.schema([pa.field("image_id", pa.string()), storage.FRAMES_SCHEMA.field("image_bytes")])
    files = sorted((landing / batch_id).rglob("*.jpg"))

    def batches():
        for start in range(0, len(files), ingest.CHUNK_FRAMES):
            chunk = files[start:start + ingest.CHUNK_FRAMES]
            yield pa.record_batch([pa.array([f.stem for f in chunk]),
                                   pa.array([f.read_bytes() for f in chunk], pa.large_binary())], schema=schema)

    conn = storage.connect(str(db))
    started = time.perf_counter()
    table = conn.create_table("bare", schema=schema, storage_options=storage.STABLE_ROW_IDS)
    table.add(pa.RecordBatchReader.from_batches(schema, batches()))
    return time.perf_counter() - started


def peak_rss_mb(landing: Path, batch_id: str, db: Path) -> float:
    """Peak RSS of a fresh process that ingests one batch."""
    code = (
        "import resource, sys; from pathlib import Path; from avperception_assets.ingest import frames as ingest; from avperception_assets.storage import tables as storage;"
        f"ingest.ingest_batches(storage.connect({str(db)!r}), Path({str(landing)!r}), [{batch_id!r}]);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="avp-bench-ingest-"))
    landing = root / "landing"
    started = time.perf_counter()
    synthetic.write_batch(landing, "large", args.frames, seed=1)
    synthetic.write_batch(landing, "small", args.small, seed=2)
    print(f"generated {args.frames} + {args.small} synthetic frames in {time.perf_counter() - started:.0f} s")
    megabytes = sum(f.stat().st_size for f in (landing / "large").rglob("*.jpg")) / 2**20

    ingest_runs, bare_runs = [], []
    for i in range(args.repeats):
        ingest_runs.append(ingest_seconds(landing, "large", root / f"ingest-{i}"))
        bare_runs.append(bare_write_seconds(landing, "large", root / f"bare-{i}"))
    ingest_fps = args.frames / statistics.median(ingest_runs)
    bare_fps = args.frames / statistics.median(bare_runs)
    ratio = ingest_fps / bare_fps

    rss_small = peak_rss_mb(landing, "small", root / "rss-small")
    rss_large = peak_rss_mb(landing, "large", root / "rss-large")
    rss_ratio = rss_large / rss_small

    print(json.dumps({
        "frames": args.frames, "jpeg_megabytes": round(megabytes, 1),
        "ingest_seconds": [round(s, 2) for s in ingest_runs], "bare_write_seconds": [round(s, 2) for s in bare_runs],
        "ingest_frames_per_s": round(ingest_fps, 1), "bare_write_frames_per_s": round(bare_fps, 1),
        "ratio_ingest_to_bare": round(ratio, 3),
        f"peak_rss_mb_{args.small}": round(rss_small, 1), f"peak_rss_mb_{args.frames}": round(rss_large, 1),
        "rss_ratio": round(rss_ratio, 3),
    }, indent=2))
    target("ingest_vs_bare_write", ratio, ">=", 0.8, unit="x")
    target(f"peak_rss_flat_{args.small}_vs_{args.frames}", rss_ratio, "<=", 1.25, unit="x")


if __name__ == "__main__":
    main()
