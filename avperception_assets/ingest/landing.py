"""The landing-zone contract: one folder per batch under `landing/`, complete once `_READY` exists.

A batch id names a folder directly under the landing zone. Producers copy the files first and
write the empty `_READY` marker last; a folder without it may still be copying and is never read.
"""

from __future__ import annotations

import re
from pathlib import Path

READY_MARKER = "_READY"
BATCH_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_batch_id(batch_id: str) -> str:
    """Batch ids name a folder directly under the landing zone: no paths, no traversal."""
    if not isinstance(batch_id, str) or ".." in batch_id or not BATCH_ID_PATTERN.match(batch_id):
        raise ValueError(
            f"invalid batch id {batch_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..', no absolute paths)"
        )
    return batch_id


def ready_batches(landing_dir: Path) -> list[str]:
    """Batch ids whose `_READY` marker is present; folders still copying are not listed."""
    landing_dir = Path(landing_dir)
    if not landing_dir.is_dir():
        return []
    return sorted(
        p.name for p in landing_dir.iterdir()
        if p.is_dir() and BATCH_ID_PATTERN.match(p.name) and ".." not in p.name
        and (p / READY_MARKER).is_file()
    )
