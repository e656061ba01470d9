"""What a batch's in-process stages read does not grow with the table: ingestion (its lookups),
the four `raw_frames` checks scoped to the batch, and maintenance. Bytes read are counted by
the kernel (`rchar` of /proc/self/io: every read the process makes, Lance's I/O threads
included) in a fresh process without Ray, for the same new batch landing on an empty table and
on one holding 300 earlier frames. (Curation backfills and view refreshes run in Geneva's Ray
actors; they take only the rows whose column is NULL, or the source's new rows, and their
tests count those rows: test_curation_assets.py, test_loop.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest

pytestmark = pytest.mark.fresh_interpreter

OLD_FRAMES, NEW_FRAMES = 300, 10
SIZE = {"width": 640, "height": 360}


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _stage_reads(root: Path, old_frames: int) -> dict[str, int]:
    """Bytes each stage reads while a batch of NEW_FRAMES lands on a table of `old_frames`."""
    from avperception_assets.ingest import frames as ingest, checks as ingest_checks
    from avperception_assets.curation import maintenance
    from avperception_assets.storage import tables as storage
    from avperception_assets import synthetic

    landing, conn = root / "landing", storage.connect(str(root / "lancedb"))

    def maintain(table):
        return maintenance.maintain(table, storage.FRAMES_TABLE, [], older_than=timedelta(hours=1),
                                    indexes=maintenance.COLUMN_INDEXES, fragment_rows=OLD_FRAMES)

    if old_frames:
        synthetic.write_batch(landing, "old", old_frames, seed=1, **SIZE)
        ingest.ingest_batches(conn, landing)
        maintain(conn.open_table(storage.FRAMES_TABLE))
    synthetic.write_batch(landing, "new", NEW_FRAMES, seed=2, **SIZE)
    reads, started = {}, _rchar()
    [summary] = ingest.ingest_batches(conn, landing)
    reads["ingestion"] = _rchar() - started
    table, where = conn.open_table(storage.FRAMES_TABLE), storage.rows_since(summary.first_ingest_seq)
    for name, check in (("duplicate_ids", ingest_checks.duplicate_image_ids),
                        ("boxes_inside", ingest_checks.frames_with_boxes_outside),
                        ("clips_split", ingest_checks.clips_in_two_splits),
                        ("frames_decode", ingest_checks.undecodable_frames)):
        started = _rchar()
        assert check(table, where) == []
        reads[name] = _rchar() - started
    started = _rchar()
    maintain(table)
    reads["maintenance"] = _rchar() - started
    reads["old_frame_bytes"] = table.to_lance().to_table(
        columns=["image_bytes"], filter="batch_id = 'old'")["image_bytes"].nbytes if old_frames else 0
    return reads


def main() -> None:
    """Run in a fresh process: a warm-up pass (imports, decoder), then the two measured ones."""
    results = {}
    for label, old_frames in (("warm-up", 0), ("empty", 0), ("old", OLD_FRAMES)):
        with tempfile.TemporaryDirectory() as tmp:
            results[label] = _stage_reads(Path(tmp), old_frames)
    print(json.dumps(results))


def test_a_batch_reads_the_same_bytes_whatever_the_table_holds():
    done = subprocess.run([sys.executable, "-c", f"from {__name__} import main; main()"], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    empty, old = results["empty"], results["old"]
    per_old_frame = old["old_frame_bytes"] / OLD_FRAMES
    assert per_old_frame > 10_000  # real JPEGs: reading the earlier frames would show
    for stage in ("ingestion", "duplicate_ids", "boxes_inside", "clips_split", "frames_decode", "maintenance"):
        extra_frames = (old[stage] - empty[stage]) / per_old_frame
        assert extra_frames < 10, f"{stage} read {old[stage] - empty[stage]} bytes more with {OLD_FRAMES} earlier frames"
    assert empty["frames_decode"] > NEW_FRAMES * per_old_frame / 2  # it did read the new frames' bytes
