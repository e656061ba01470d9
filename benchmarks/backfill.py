"""Incremental curation backfill: does the cost grow with the new rows or with the table?

Builds two frames tables (200 and 2,000 synthetic frames), fills every curation column, then
appends 200 frames to each and times the backfill of all columns (one Ray for everything).
Target: time(2,000 + 200) / time(200 + 200) <= 1.2. With --repeats N the append+backfill
step alternates between the tables N times and the ratio uses each table's median run (a
shared machine's load swings by tens of seconds). Also prints rows/s per column (elapsed
includes each Geneva job's fixed cost; columns of one wave run concurrently, so their elapsed
times overlap).

    .venv/bin/python benchmarks/backfill.py [--small 200] [--large 2000] [--new 200] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # Geneva's progress bars; set before geneva imports tqdm
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avperception_assets import patches  # noqa: E402

patches.apply_at_startup()  # an entry point that runs Geneva jobs: before lancedb and geneva are imported

from avperception_assets.cluster.ray import ray_context  # noqa: E402
from avperception_assets.curation import columns as curation
from avperception_assets.ingest import frames as ingest
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from avperception_assets.workspace import Workspace
from targets import target  # noqa: E402

SIZE = dict(width=640, height=360)
RATIO_GOAL = 1.2


def land_and_ingest(conn, landing: Path, batch_id: str, frames: int, seed: int) -> float:
    started = time.perf_counter()
    synthetic.write_batch(landing, batch_id, frames, seed=seed, **SIZE)
    ingest.ingest_batches(conn, landing, [batch_id])
    return time.perf_counter() - started


def backfill(table, config) -> tuple[float, dict[str, curation.ColumnStats]]:
    started = time.perf_counter()
    stats = curation.backfill_columns(table, config=config)
    return time.perf_counter() - started, stats


def report_fill(label: str, seconds: float, stats: dict[str, curation.ColumnStats]) -> None:
    print(f"{label}: all columns in {seconds:.1f} s")
    for name, column in stats.items():
        print(f"  {name:22s} {column.rows_processed:5d} rows  {column.elapsed_s:6.1f} s  {column.rows_per_s:7.1f} rows/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--new", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=None)
    args = parser.parse_args(argv)
    config = curation.CurationConfig(person_area_source="auto", concurrency=args.concurrency)
    source = curation.resolve_person_area_source(config)
    print(f"person_bbox_area_pct source: {source.label}; frames {SIZE['width']}x{SIZE['height']}; "
          f"{os.cpu_count()} CPUs")

    root = Path(tempfile.mkdtemp(prefix="avp-bench-backfill-"))
    tables = {}
    for name, frames, seed in (("small", args.small, 1), ("large", args.large, 2)):
        conn = storage.connect(str(root / name / "lancedb"))
        seconds = land_and_ingest(conn, root / name / "landing", "base", frames, seed)
        print(f"{name}: ingested {frames} frames in {seconds:.1f} s")
        tables[name] = (conn, conn.open_table(storage.FRAMES_TABLE))

    incremental: dict[str, list[float]] = {"small": [], "large": []}
    workspace = Workspace.from_env()
    with ray_context(workspace.ray_address, dashboard=workspace.ray_dashboard):
        for name, (_, table) in tables.items():
            seconds, stats = backfill(table, config)
            report_fill(f"{name}: initial fill of {table.count_rows()} rows", seconds, stats)
        for repeat in range(args.repeats):
            for name, (conn, table) in tables.items():
                land_and_ingest(conn, root / name / "landing", f"new{repeat}", args.new, seed=100 + repeat)
                table.checkout_latest()
                seconds, stats = backfill(table, config)
                processed = {s.rows_processed for s in stats.values()}
                report_fill(f"{name}: +{args.new} rows (table {table.count_rows()})", seconds, stats)
                assert processed == {args.new}, f"expected only the {args.new} new rows, processed {processed}"
                incremental[name].append(seconds)

    small, large = statistics.median(incremental["small"]), statistics.median(incremental["large"])
    ratio = large / small
    print(f"incremental backfill (median of {args.repeats}): {small:.1f} s after +{args.new} on {args.small}, "
          f"{large:.1f} s after +{args.new} on {args.large}; ratio {ratio:.2f}")
    target("incremental_backfill_ratio", ratio, "<=", RATIO_GOAL)


if __name__ == "__main__":
    main()
