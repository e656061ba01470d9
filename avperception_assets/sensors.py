"""What the sensors decide, as plain functions: which batches to ingest, which modes to retrain."""

from __future__ import annotations

import json
from pathlib import Path

from . import ingest


def read_cursor(cursor: str | None) -> set[str]:
    return set(json.loads(cursor)) if cursor else set()


def write_cursor(requested: set[str]) -> str:
    return json.dumps(sorted(requested))


def batches_to_request(landing_dir: Path, processed: set[str], requested: set[str]) -> list[str]:
    """READY batches neither ingested nor already requested.

    Decided by batch id, not by modification time, so a batch that lands late with an old
    mtime (copied with `cp -p`, `rsync -a`) is still picked up.
    """
    return [b for b in ingest.ready_batches(landing_dir) if b not in processed and b not in requested]
