"""Slice-view refresh: does its cost grow with the new rows or with the table?

Builds two frames tables (200 and 2,000 synthetic frames), fills the curation columns the
slices read and creates every registry view; then, `--repeats` times, appends 200 frames to
each table, backfills them and times the refresh of all views (one Ray for everything; the
views refresh concurrently, as in the Dagster asset). Target: refresh time on 2,000 + 200
over refresh time on 200 + 200 <= 1.2 (means over the repeats).

    .venv/bin/python benchmarks/refresh.py [--small 200] [--large 2000] [--new 200] [--repeats 1]
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
from avperception_assets.failure_modes.registry import default_failure_modes
from avperception_assets.ingest import frames as ingest
from avperception_assets.slices import views as slices
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from targets import target  # noqa: E402

SIZE = dict(width=640, height=360)
RATIO_GOAL = 1.2
SLICE_COLUMNS = ["has_person", "has_rider", "person_bbox_area_pct", "dhash", "is_duplicate"]
CURATION = curation.CurationConfig(person_area_source=curation.SOURCE_ANNOTATIONS)
VIEWS = slices.all_views(default_failure_modes())  # the shipped modes' views


def land(conn, landing: Path, batch_id: str, frames: int, seed: int) -> None:
    synthetic.write_batch(landing, batch_id, frames, seed=seed, **SIZE)
    ingest.ingest_batches(conn, landing, [batch_id])
    curation.backfill_columns(conn.open_table(storage.FRAMES_TABLE), SLICE_COLUMNS, CURATION)


def timed_refresh(conn) -> tuple[float, dict[str, slices.ViewStats]]:
    started = time.perf_counter()
    stats = slices.refresh_views(conn, VIEWS)
    return time.perf_counter() - started, stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--new", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"{len(VIEWS)} views; frames {SIZE['width']}x{SIZE['height']}; {os.cpu_count()} CPUs")

    root = Path(tempfile.mkdtemp(prefix="avp-bench-refresh-"))
    conns = {name: storage.connect(str(root / name / "lancedb")) for name in ("small", "large")}
    sizes = {"small": args.small, "large": args.large}
    times: dict[str, list[float]] = {"small": [], "large": []}
    with ray_context():
        for name, conn in conns.items():
            land(conn, root / name / "landing", "base", sizes[name], seed=1)
            seconds, stats = timed_refresh(conn)
            print(f"{name}: created {len(stats)} views over {sizes[name]} frames in {seconds:.1f} s "
                  f"({sum(s.row_count for s in stats.values())} view rows)")
        for repeat in range(args.repeats):
            for name, conn in conns.items():
                land(conn, root / name / "landing", f"new{repeat}", args.new, seed=100 + repeat)
                seconds, stats = timed_refresh(conn)
                added = sum(s.rows_added for s in stats.values())
                expected = sum(
                    conn.open_table(storage.FRAMES_TABLE).count_rows(f"({slices.view_filter(m, s)}) "
                                                                     f"AND batch_id = 'new{repeat}'")
                    for m, s in VIEWS)
                assert added == expected, f"{name}: refresh added {added} rows, expected {expected}"
                total = conn.open_table(storage.FRAMES_TABLE).count_rows()
                print(f"{name}: +{args.new} frames (table {total}): refresh {seconds:.1f} s, {added} view rows added")
                times[name].append(seconds)

    small, large = statistics.median(times["small"]), statistics.median(times["large"])
    ratio = large / small
    print(f"refresh after +{args.new}: {small:.1f} s on {args.small} (runs {[round(t, 1) for t in times['small']]}), "
          f"{large:.1f} s on {args.large} (runs {[round(t, 1) for t in times['large']]}); ratio {ratio:.2f}")
    target("incremental_refresh_ratio", ratio, "<=", RATIO_GOAL)


if __name__ == "__main__":
    main()
