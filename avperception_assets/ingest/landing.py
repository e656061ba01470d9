"""The landing-zone contract: one folder per batch under `landing/`, complete once `_READY` exists.

A batch id names a folder directly under the landing zone (a local folder, or a prefix in an
object store: `s3://bucket/prefix/landing/<batch>/`). Producers copy the files first and
write the empty `_READY` marker last; a folder without it may still be copying and is never read.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

from avperception_assets.storage import locations

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


def ready_batches(landing: str | Path, storage_options: Mapping[str, str] | None = None,
                  skip: Collection[str] = ()) -> list[str]:
    """Batch ids whose `_READY` marker is present, less those in `skip` (processed already);
    folders still copying are not listed. One listing of the landing zone's folders, then one
    marker read per batch not skipped: on an object store a tick costs no read of old batches."""
    return [b for b in locations.folders(landing, storage_options)
            if b not in skip and BATCH_ID_PATTERN.match(b) and ".." not in b
            and locations.is_file(locations.join(landing, b, READY_MARKER), storage_options)]


@contextlib.contextmanager
def local_batch(landing: str | Path, batch_id: str, storage_options: Mapping[str, str] | None = None) -> Iterator[Path]:
    """The landing folder that holds the batch `batch_id` on this machine: the landing zone
    itself when it is a folder; for an object store, a temporary copy of that READY batch alone,
    removed afterwards (the format readers read local files)."""
    if not locations.is_uri(landing):
        yield Path(landing)
        return
    if not locations.is_file(locations.join(landing, batch_id, READY_MARKER), storage_options):
        raise FileNotFoundError(f"batch {batch_id} has no {READY_MARKER} marker: it may still be copying")
    with tempfile.TemporaryDirectory(prefix="avp-landing-") as staging:
        locations.copy_folder(locations.join(landing, batch_id), Path(staging) / batch_id, storage_options)
        yield Path(staging)
