"""Landing batches → the `bdd100k` Lance table; every rejected input goes to `quarantine`.

A landing batch (see `landing`) holds images (JPEG/PNG) and labels in one layout: any of the
three BDD100K detection ones and its MOT one (box_track_20), YOLO, Pascal VOC or COCO (see
`formats.layouts`). Frames of footage clips take their clip's split (see `clips`). Ingestion
never stops on bad input: each bad file, frame or object becomes a quarantine record with its
reason, and every good frame of the batch lands in one commit. A batch whose layout is ambiguous
(or whose class names cannot be read) is refused whole: one record, no frame. Re-ingesting a
batch adds nothing.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from avperception_assets.storage import tables as storage
from avperception_assets.ingest.image_checks import CorruptImageError, NotAnImageError, inspect_image
from avperception_assets.formats.layouts import read_batch
from avperception_assets.formats.records import IMAGE_SUFFIXES, LabelRecord, normalize_objects, split_name
from avperception_assets.ingest import clips
from avperception_assets.ingest.landing import READY_MARKER, local_batch, ready_batches, validate_batch_id
from avperception_assets.storage.quarantine import Rejection, record_quarantine

CHUNK_FRAMES = 64  # frames per Arrow record batch: bounds memory whatever the batch size


@dataclass
class BatchSummary:
    batch_id: str
    ingested: int = 0
    already_present: int = 0
    quarantined: Counter = field(default_factory=Counter)
    boxes: int = 0
    boxes_clipped: int = 0
    objects_ignored: Counter = field(default_factory=Counter)  # by why: "class dog"
    clips: set[str] = field(default_factory=set)  # footage clips (MOT videos) the ingested frames are of
    seconds: float = 0.0
    first_ingest_seq: int = 0  # the batch's frames take ingest_seq from here on
    refused: str | None = None  # why the whole batch was refused (nothing ingested)

    def as_metadata(self) -> dict:
        return {
            "ingested": self.ingested,
            "already_present": self.already_present,
            "quarantined": dict(sorted(self.quarantined.items())),
            "boxes": self.boxes,
            "boxes_clipped_to_frame": self.boxes_clipped,
            "objects_ignored": dict(sorted(self.objects_ignored.items())),
            "clips": len(self.clips),
            "refused": self.refused,
            "seconds": round(self.seconds, 2),
        }


def _walk(root: str, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path inside root, path) of every file below root, as `Path.rglob('*')` + `is_file()` finds
    them (symlinked folders are not entered, unreadable ones skipped) at a fraction of the cost."""
    try:
        entries = list(os.scandir(root))
    except PermissionError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path, f"{prefix}{entry.name}/")
        elif entry.is_file():
            yield prefix + entry.name, entry.path


def _path_order(item: tuple[str, str]) -> list[str]:
    """Sort key giving `Path` order (component by component), which plain strings do not."""
    return item[0].split("/")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: parsed labels are tens of thousands of containers
    that free by reference counting, yet they trigger full collections costing ~0.1 s each in a
    process holding a large heap (Dagster, Geneva)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _ahead(items: Iterator, depth: int) -> Iterator:
    """Run `items` on one background thread, up to `depth` items ahead of the consumer."""
    end = object()
    with ThreadPoolExecutor(max_workers=1) as pool:  # one worker: the generator is never run concurrently
        pending = deque(pool.submit(next, items, end) for _ in range(depth))
        while (item := pending.popleft().result()) is not end:
            pending.append(pool.submit(next, items, end))
            yield item


def _binary_array(blobs: list[bytes]) -> pa.Array:
    """Image bytes as an Arrow array copied once into an exactly sized, Arrow-aligned buffer
    (`pa.array` grows its buffer by doubling, which copies the chunk's bytes again)."""
    offsets = array("q", itertools.accumulate(map(len, blobs), initial=0))
    data = pa.allocate_buffer(offsets[-1])
    view = memoryview(data).cast("B")
    for start, end, blob in zip(offsets, offsets[1:], blobs):
        view[start:end] = blob
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(blobs), [None, pa.py_buffer(offsets), data])


@dataclass
class _Candidate:
    rel: str
    path: str
    label: LabelRecord
    split: str | None = None  # decided with its clip's (`clips.settle`)


def _load_candidate(candidate: _Candidate) -> tuple[bytes | None, tuple | None, Rejection | None]:
    """The image's bytes and (format, width, height), or why it is rejected."""
    with open(candidate.path, "rb", buffering=0) as file:  # unbuffered: one read of the whole file
        data = file.read()
    try:
        return data, inspect_image(data), None
    except NotAnImageError as exc:
        return None, None, Rejection(candidate.rel, "not_an_image", str(exc))
    except CorruptImageError as exc:
        return None, None, Rejection(candidate.rel, "corrupt_image", str(exc))


class BatchIngestor:
    """Ingests one READY batch into the frames table (one commit) and the quarantine table."""

    def __init__(self, conn, landing_dir: Path, batch_id: str, *, val_fraction: float = 0.2,
                 log: Callable[[str], None] | None = None):
        self.conn = conn
        self.batch_id = validate_batch_id(batch_id)
        self.batch_dir = Path(landing_dir) / batch_id
        self.val_fraction = val_fraction
        self.log = log or (lambda message: None)
        self.summary = BatchSummary(batch_id)
        self.rejections: list[Rejection] = []

    def _reject(self, rejection: Rejection) -> None:
        self.rejections.append(rejection)
        self.summary.quarantined[rejection.reason] += 1

    def _files(self) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
        """The batch's image files (stem, path inside the batch, path) and its other files, in path order."""
        images, others = [], []
        for rel, path in sorted(_walk(str(self.batch_dir)), key=_path_order):
            stem, suffix = split_name(rel.rpartition("/")[2])
            if suffix.lower() in IMAGE_SUFFIXES:
                images.append((stem, rel, path))
            elif rel != READY_MARKER:
                others.append((rel, path))
        return images, others

    def _unique_images(self, image_files: list[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
        """Image id → (path inside the batch, path): the first file of each stem; later ones are rejected."""
        images: dict[str, tuple[str, str]] = {}
        for stem, rel, path in image_files:
            if stem in images:
                self._reject(Rejection(rel, "duplicate_frame", f"same image id as {images[stem][0]} in this batch"))
            else:
                images[stem] = (rel, path)
        return images

    def _unique_labels(self, records: list[LabelRecord]) -> dict[str, LabelRecord]:
        """Image id → its label record: the first record wins; later ones are rejected."""
        labels: dict[str, LabelRecord] = {}
        for record in records:
            if record.image_id in labels:
                self._reject(Rejection(f"{record.label_file}#{record.image_id}", "duplicate_label",
                                       f"{record.image_id} is already labelled in {labels[record.image_id].label_file}"))
            else:
                labels[record.image_id] = record
        return labels

    def _scan(self, table) -> list[_Candidate]:
        """Pair image files with labels; everything that cannot pair is rejected here, and so is
        an image id the table already holds from another batch."""
        image_files, other_files = self._files()
        batch = read_batch(other_files)
        if batch.refusal is not None:
            self._reject(batch.refusal)
            self.summary.refused = f"{batch.refusal.reason}: {batch.refusal.detail}"
            return []
        images = self._unique_images(image_files)
        for rejection in batch.rejections:
            self._reject(rejection)
        labels = self._unique_labels(batch.records)
        for image_id in sorted(labels.keys() - images.keys()):
            label = labels[image_id]
            self._reject(Rejection(f"{label.label_file}#{image_id}", "label_without_image", f"no image file for {image_id}"))
        candidates, existing = [], known_frames(table, images)
        for image_id, (rel, path) in images.items():
            label = labels.get(image_id) or batch.unlabelled(image_id, rel)
            if image_id in existing:
                if existing[image_id] == self.batch_id:
                    self.summary.already_present += 1
                else:
                    self._reject(Rejection(rel, "duplicate_frame", f"{image_id} was already ingested from batch {existing[image_id]}"))
            elif label is None:
                self._reject(Rejection(rel, "image_without_labels", f"no label record names {image_id}"))
            else:
                candidates.append(_Candidate(rel, path, label))
        return self._settle(table, candidates, {image_id: n for n, image_id in enumerate(labels)})

    def _settle(self, table, candidates: list[_Candidate], order: dict[str, int]) -> list[_Candidate]:
        """The candidates in their clips' splits, less those the clip rules reject."""
        known = clips.known_clips(table, {c.label.clip_id for c in candidates if c.label.clip_id is not None})
        settled = clips.settle(candidates, known, self.val_fraction, order)
        for rejection in settled.rejections:
            self._reject(rejection)
        return settled.frames

    def _frame(self, candidate: _Candidate, data: bytes, info: tuple, seq: int, now: datetime) -> dict:
        """One frames-table row; the label's bad objects are rejected on the way."""
        image_format, width, height = info
        label = candidate.label
        boxes = normalize_objects(label, width, height)
        self.summary.boxes += len(boxes.columns["ann_categories"])
        self.summary.boxes_clipped += boxes.clipped
        self.summary.objects_ignored.update(boxes.ignored)
        for item in boxes.rejections:
            self._reject(item)
        if label.clip_frame_index is not None:
            self.summary.clips.add(label.clip_id)
        return {
            "image_id": label.image_id, "batch_id": self.batch_id, "source_file": candidate.rel,
            "label_format": label.layout, "split": candidate.split, "image_bytes": data,
            "image_format": image_format, "width": width, "height": height,
            "weather": label.attributes.get("weather"), "scene": label.attributes.get("scene"),
            "timeofday": label.attributes.get("timeofday"), "timestamp": label.timestamp,
            **boxes.columns, "ingest_seq": seq, "ingested_at": now,
            "clip_id": label.clip_id, "clip_frame_index": label.clip_frame_index,
        }

    def _rows(self, candidates: list[_Candidate], first_seq: int) -> Iterator[pa.RecordBatch]:
        seq = first_seq
        now = datetime.now(timezone.utc)
        for start in range(0, len(candidates), CHUNK_FRAMES):
            columns = {name: [] for name in storage.FRAMES_SCHEMA.names}
            for candidate in candidates[start:start + CHUNK_FRAMES]:
                data, info, rejection = _load_candidate(candidate)
                if rejection:
                    self._reject(rejection)
                    continue
                row = self._frame(candidate, data, info, seq, now)
                for name, column in columns.items():
                    column.append(row[name])
                seq += 1
            rows = len(columns["image_id"])
            self.summary.ingested += rows
            self.log(f"{self.batch_id}: {self.summary.ingested}/{len(candidates)} frames read")
            if rows:
                columns["image_bytes"] = _binary_array(columns["image_bytes"])
                yield pa.RecordBatch.from_pydict(columns, schema=storage.FRAMES_SCHEMA)

    def run(self) -> BatchSummary:
        with _gc_paused():
            return self._run()

    def _run(self) -> BatchSummary:
        started = time.perf_counter()
        if not (self.batch_dir / READY_MARKER).is_file():
            raise FileNotFoundError(f"batch {self.batch_id} has no {READY_MARKER} marker: it may still be copying")
        table = storage.open_frames(self.conn)
        next_seq = next_ingest_seq(table)
        self.summary.first_ingest_seq = next_seq
        candidates = self._scan(table)
        if candidates:
            # Chunks are read, checked and built ahead on a thread of ours, so Python prepares chunk
            # n+1 while Lance (which pulls the reader and waits on it otherwise) writes chunk n;
            # memory stays a few chunks.
            batches = _ahead(self._rows(candidates, next_seq), depth=2)
            reader = pa.RecordBatchReader.from_batches(storage.FRAMES_SCHEMA, batches)
            table.add(reader)  # one commit for the whole batch: a crash leaves nothing half-written
            if self.summary.ingested:
                self.summary.first_ingest_seq = claim_ingest_order(table, self.batch_id, next_seq, self.summary.ingested)
        record_quarantine(self.conn, self.batch_id, self.rejections)
        self.summary.seconds = time.perf_counter() - started
        return self.summary


def claim_ingest_order(table, batch_id: str, first: int, count: int) -> int:
    """Where the batch's `count` frames, appended with ingest_seq from `first` on, stand in the
    ingestion order once settled with concurrent ingestions; returns their first ingest_seq.

    Two ingestions that read the table before either committed number their frames alike, and
    Lance's commit rebases the later append onto the earlier one (both land). Of batches whose
    numbers overlap, the one appended later (its fragments have the higher ids) takes fresh ones
    past the largest in the table, rewriting that column of its rows alone, until none overlap."""
    while True:
        table.checkout_latest()
        rows = table.to_lance().to_table(columns=["image_id", "batch_id", "ingest_seq"], with_row_address=True,
                                         filter=f"ingest_seq >= {first} AND ingest_seq < {first + count}")
        fragments = pc.shift_right(rows["_rowaddr"], 32)
        mine = pc.equal(rows["batch_id"], batch_id)
        earlier = pc.less(fragments, pc.min(pc.filter(fragments, mine)))
        if not pc.any(pc.and_(pc.invert(mine), earlier)).as_py():
            return first
        first = next_ingest_seq(table)
        own = rows.filter(mine).sort_by("ingest_seq")
        renumbered = pa.table({"image_id": own["image_id"], "ingest_seq": pa.array(range(first, first + own.num_rows), pa.int64())})
        storage.update_in_place(table, "image_id", renumbered)


def known_frames(table, image_ids: Iterable[str], chunk: int = 1000) -> dict[str, str]:
    """image_id → batch_id of those `image_ids` already in the table, looked up 1,000 at a time
    through the btree index on image_id (maintenance keeps it current): the cost follows the batch."""
    rows = storage.rows_with(table.to_lance(), "image_id", image_ids, ["image_id", "batch_id"], chunk)
    return dict(zip(rows["image_id"].to_pylist(), rows["batch_id"].to_pylist()))


def next_ingest_seq(table) -> int:
    """The ingest_seq the next ingested frame takes: one past the largest. Sequences are dense
    unless rows were deleted, so the search starts at the row count and reads only the rows at
    or above it (the btree index on ingest_seq finds them), not the whole column."""
    dataset = table.to_lance()
    start = dataset.count_rows()
    above = dataset.to_table(columns=["ingest_seq"], filter=f"ingest_seq >= {start}")["ingest_seq"]
    return max(start, pc.max(above).as_py() + 1) if len(above) else start


def ingested_batch_ids(conn) -> set[str]:
    """Batches already processed: they left a frame or a quarantine record.

    This reads the whole `batch_id` column, a sensor tick's one read of the table: 17 ms at
    100,000 frames (benchmarks/table_lookups.py). One indexed lookup per landed batch instead
    took 236 ms on a table of the same shape with 200 batches landed (measured once, against 10 ms
    for the whole column), so the whole-column read stays."""
    done = set()
    for name in (storage.FRAMES_TABLE, storage.QUARANTINE_TABLE):
        if storage.table_exists(conn, name):
            column = conn.open_table(name).to_lance().to_table(columns=["batch_id"])["batch_id"]
            done.update(pc.unique(column).to_pylist())
    return done


def pending_batches(conn, landing: str | Path, storage_options: Mapping[str, str] | None = None) -> list[str]:
    """READY batches with no frame in the table yet (a folder or an object-store prefix: `landing`)."""
    return ready_batches(landing, storage_options, skip=ingested_batch_ids(conn))


def ingest_batches(conn, landing: str | Path, batch_ids: Iterable[str] | None = None, *,
                   val_fraction: float = 0.2, log: Callable[[str], None] | None = None,
                   storage_options: Mapping[str, str] | None = None) -> list[BatchSummary]:
    """Ingest the named batches (default: every READY batch not ingested yet), in order, from a
    landing folder or an object-store prefix (each batch is read from a local copy then)."""
    if batch_ids is None:
        batch_ids = pending_batches(conn, landing, storage_options)
    summaries = []
    for batch_id in batch_ids:
        with local_batch(landing, validate_batch_id(batch_id), storage_options) as landing_dir:
            summary = BatchIngestor(conn, landing_dir, batch_id, val_fraction=val_fraction, log=log).run()
        (log or (lambda message: None))(f"{batch_id}: {summary.as_metadata()}")
        summaries.append(summary)
    return summaries
