"""Landing zone → the `bdd100k` Lance table, with every rejected input kept in `quarantine`.

A landing batch is a folder `landing/<batch_id>/` of images (JPEG/PNG) and BDD100K labels in
any of the three public layouts, completed by a `_READY` marker written last. Ingestion never
stops on bad input: each bad file, frame or object becomes a quarantine record with its reason,
and every good frame of the batch lands. Re-ingesting a batch adds nothing.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import os
import re
import time
import zlib
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from . import bdd100k, storage
from .synthetic import READY_MARKER

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SPLITS = ("train", "val")
BATCH_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CHUNK_FRAMES = 64  # frames per Arrow record batch: bounds memory whatever the batch size

LAYOUT_PER_IMAGE = "bdd_per_image_2018"
LAYOUT_SPLIT_LIST = "bdd_split_list_2018"
LAYOUT_DET_20 = "bdd_det_20"


class LabelFileError(ValueError):
    """A label file that cannot be read as any BDD100K layout."""


@dataclass
class LabelRecord:
    image_id: str  # file stem of the image it labels
    label_file: str  # path inside the batch
    layout: str
    split: str | None
    attributes: dict
    timestamp: int | None
    objects: list[dict]


@dataclass
class Rejection:
    file: str
    reason: str
    detail: str


@dataclass
class BatchSummary:
    batch_id: str
    ingested: int = 0
    already_present: int = 0
    quarantined: Counter = field(default_factory=Counter)
    boxes: int = 0
    boxes_clipped: int = 0
    seconds: float = 0.0

    def as_metadata(self) -> dict:
        return {
            "ingested": self.ingested,
            "already_present": self.already_present,
            "quarantined": dict(sorted(self.quarantined.items())),
            "boxes": self.boxes,
            "boxes_clipped_to_frame": self.boxes_clipped,
            "seconds": round(self.seconds, 2),
        }


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


# --- label files -------------------------------------------------------------------------


def _split_from_path(rel: str) -> str | None:
    """Split named by a label file's path: `100k/<split>/…`, `*_labels_images_<split>.json`, `det_<split>.json`."""
    parts = Path(rel).parts
    for part in reversed(parts[:-1]):
        if part in SPLITS:
            return part
    match = re.search(r"(?:^|_)(train|val)\.json$", parts[-1])
    return match.group(1) if match else None


def _split_name(name: str) -> tuple[str, str]:
    """(stem, suffix) of a file name by `pathlib`'s rules, without building a Path."""
    dot = name.rfind(".")
    return (name[:dot], name[dot:]) if 0 < dot < len(name) - 1 else (name, "")


def _image_id(name: str) -> str:
    """An image file name stands for its stem; any other name is an id already."""
    stem, suffix = _split_name(Path(name).name if "/" in name else name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else name


def _record(entry: dict, rel: str, layout: str, split: str | None) -> LabelRecord:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise LabelFileError("an entry has no 'name'")
    if layout == LAYOUT_PER_IMAGE:
        frames = entry.get("frames") or [{}]
        objects, timestamp = frames[0].get("objects") or [], frames[0].get("timestamp")
    else:
        objects, timestamp = entry.get("labels") or [], entry.get("timestamp")
    if not isinstance(objects, list):
        raise LabelFileError(f"objects of {entry['name']!r} are not a list")
    return LabelRecord(
        image_id=_image_id(entry["name"]),
        label_file=rel, layout=layout, split=split,
        attributes=entry.get("attributes") or {},
        timestamp=int(timestamp) if isinstance(timestamp, (int, float)) else None,
        objects=objects,
    )


def parse_label_file(path: Path | str, rel: str) -> list[LabelRecord]:
    """Read one label file, detecting its BDD100K layout from its content and name."""
    try:
        payload = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelFileError(f"not valid JSON: {exc}") from exc
    split = _split_from_path(rel)
    if isinstance(payload, dict) and "frames" in payload:
        return [_record(payload, rel, LAYOUT_PER_IMAGE, split)]
    if isinstance(payload, list):
        layout = LAYOUT_DET_20 if Path(rel).name.startswith("det_") else LAYOUT_SPLIT_LIST
        return [_record(entry, rel, layout, split) for entry in payload]
    raise LabelFileError("neither a per-image label (object with 'frames') nor a list of labelled images")


# --- frames ------------------------------------------------------------------------------


def assign_split(image_id: str, val_fraction: float = 0.2) -> str:
    """Deterministic split for frames whose labels do not name one: a hash of the image id."""
    bucket = int.from_bytes(hashlib.sha1(image_id.encode()).digest()[:4], "big") / 2**32
    return "val" if bucket < val_fraction else "train"


class NotAnImageError(ValueError):
    """Bytes that are neither JPEG nor PNG."""


class CorruptImageError(ValueError):
    """A JPEG or PNG whose structure is broken: truncated, half-copied or damaged."""


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (they carry the size); C4, C8 and CC are not SOFs.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the marker segments up to the scan, then find the EOI marker that closes the image
    data: a copy cut short has none (byte stuffing keeps FF D9 out of the data itself)."""
    size, i = None, 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise CorruptImageError(f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > len(data):
            raise CorruptImageError(f"JPEG segment 0x{marker:02X} at byte {i} overruns the file")
        if marker in _JPEG_SOF:
            components = data[i + 9] if length >= 8 else 0
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            if length != 8 + 3 * components or components not in (1, 3, 4) or not (width and height):
                raise CorruptImageError(f"JPEG frame header is invalid ({width}x{height}, {components} components)")
            size = (width, height)
        elif marker == 0xDA:  # start of scan: entropy-coded data follows up to EOI
            if size is None:
                raise CorruptImageError("JPEG scan starts before any frame header")
            scan = i + 2 + length
            # Nearly every file ends with EOI (maybe zero-padded): look there first; only a file
            # with a trailer after its EOI needs the search through the image data.
            tail = data.rstrip(b"\x00")
            end = len(tail) - 2 if tail.endswith(b"\xff\xd9") else data.find(b"\xff\xd9", scan)
            if end < 0:
                raise CorruptImageError("JPEG has no EOI marker after its image data (truncated or half-copied)")
            if end <= scan:
                raise CorruptImageError("JPEG has no image data after its scan header")
            return size
        elif marker == 0xD9:
            break
        i += 2 + length
    raise CorruptImageError("JPEG has no image data (no start-of-scan marker)")


def _png_size(data: bytes) -> tuple[int, int]:
    """Walk the chunks checking every CRC; IHDR first, IDAT present, IEND last."""
    view = memoryview(data)  # slices without copying the pixel data
    i, size, has_data = len(_PNG_SIGNATURE), None, False
    while i + 12 <= len(data):
        length = int.from_bytes(data[i:i + 4], "big")
        kind, end = data[i + 4:i + 8], i + 12 + length
        if end > len(data):
            raise CorruptImageError(f"PNG chunk {kind!r} at byte {i} overruns the file (truncated)")
        if zlib.crc32(view[i + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise CorruptImageError(f"PNG chunk {kind!r} at byte {i} fails its CRC")
        if size is None:
            if kind != b"IHDR" or length != 13:
                raise CorruptImageError("PNG does not start with an IHDR chunk")
            size = (int.from_bytes(data[i + 8:i + 12], "big"), int.from_bytes(data[i + 12:i + 16], "big"))
            if not all(size):
                raise CorruptImageError(f"PNG header gives an empty {size[0]}x{size[1]} image")
        has_data |= kind == b"IDAT"
        if kind == b"IEND":
            if not has_data:
                raise CorruptImageError("PNG has no IDAT chunk")
            return size
        i = end
    raise CorruptImageError("PNG ends before its IEND chunk (truncated or half-copied)")


def inspect_image(data: bytes) -> tuple[str, int, int]:
    """Format and size of an image, verifying its container structure without decoding pixels.

    Catches what a file transfer breaks (truncation, zero-filled tails, damaged headers,
    PNG bit errors via chunk CRCs) at a few microseconds a frame. Pixel-level damage inside a
    JPEG's entropy-coded data is left to the curation stage, which decodes every frame anyway
    (`curation.dhash`) and quarantines the ones that fail.
    """
    if data.startswith(b"\xff\xd8\xff"):
        return ("jpeg", *_jpeg_size(data))
    if data.startswith(_PNG_SIGNATURE):
        return ("png", *_png_size(data))
    raise NotAnImageError(f"neither JPEG nor PNG (starts with {data[:8]!r})")


def normalize_objects(record: LabelRecord, width: int, height: int, summary: BatchSummary) -> tuple[dict, list[Rejection]]:
    """Detection boxes of a frame in det_20 names; bad objects are rejected one by one."""
    categories, bboxes, occluded, truncated = [], [], [], []
    rejections = []

    def reject(index: int, reason: str, detail: str) -> None:
        where = f"{record.label_file}#{record.image_id}/{index}"  # position: ids may repeat
        rejections.append(Rejection(where, reason, detail))

    for index, obj in enumerate(record.objects):
        if not isinstance(obj, dict):
            reject(index, "malformed_object", f"object is {type(obj).__name__}")
            continue
        raw = str(obj.get("category", ""))
        box = obj.get("box2d")
        if box is None and raw.lower().startswith(bdd100k.NON_DETECTION_PREFIXES):
            continue  # lanes and drivable areas carry polygons, not boxes
        category = bdd100k.normalize_category(raw)
        if category is None:
            reject(index, "unknown_category", f"category {raw!r} is not a BDD100K detection class")
            continue
        try:
            x1, y1, x2, y2 = float(box["x1"]), float(box["y1"]), float(box["x2"]), float(box["y2"])
        except (TypeError, KeyError, ValueError):
            reject(index, "malformed_box", f"box2d {box!r} lacks numeric x1, y1, x2, y2")
            continue
        if not (x1 < x2 and y1 < y2):
            reject(index, "degenerate_box", f"box {[x1, y1, x2, y2]} has no area")
            continue
        clipped = [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
        if not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
            reject(index, "box_out_of_frame", f"box {[x1, y1, x2, y2]} lies outside the {width}x{height} frame")
            continue
        attributes = obj.get("attributes") or {}
        was_clipped = clipped != [x1, y1, x2, y2]  # boxes crossing the edge keep their visible part
        summary.boxes += 1
        summary.boxes_clipped += was_clipped
        categories.append(category)
        bboxes.append(clipped)
        occluded.append(bool(attributes.get("occluded", False)))
        truncated.append(bool(attributes.get("truncated", False)) or was_clipped)
    columns = {"ann_categories": categories, "ann_bboxes": bboxes, "ann_occluded": occluded, "ann_truncated": truncated}
    return columns, rejections


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

    def _scan(self, existing: dict[str, str]) -> list[_Candidate]:
        """Pair image files with labels; everything that cannot pair is rejected here."""
        images: dict[str, tuple[str, str]] = {}
        labels: dict[str, LabelRecord] = {}
        for rel, path in sorted(_walk(str(self.batch_dir)), key=_path_order):
            name = rel.rpartition("/")[2]
            stem, suffix = _split_name(name)
            suffix = suffix.lower()
            if rel == READY_MARKER:
                continue
            if suffix in IMAGE_SUFFIXES:
                if stem in images:
                    self._reject(Rejection(rel, "duplicate_frame", f"same image id as {images[stem][0]} in this batch"))
                else:
                    images[stem] = (rel, path)
            elif suffix == ".json":
                try:
                    records = parse_label_file(path, rel)
                except LabelFileError as exc:
                    self._reject(Rejection(rel, "unparseable_labels", str(exc)))
                    continue
                for record in records:
                    if record.image_id in labels:
                        self._reject(Rejection(f"{rel}#{record.image_id}", "duplicate_label",
                                               f"{record.image_id} is already labelled in {labels[record.image_id].label_file}"))
                    else:
                        labels[record.image_id] = record
            else:
                self._reject(Rejection(rel, "unsupported_file", f"'{suffix or name}' is neither an image nor a JSON label file"))
        for image_id in sorted(labels.keys() - images.keys()):
            label = labels[image_id]
            self._reject(Rejection(f"{label.label_file}#{image_id}", "label_without_image", f"no image file for {image_id}"))
        candidates = []
        for image_id, (rel, path) in images.items():
            if image_id in existing:
                if existing[image_id] == self.batch_id:
                    self.summary.already_present += 1
                else:
                    self._reject(Rejection(rel, "duplicate_frame", f"{image_id} was already ingested from batch {existing[image_id]}"))
            elif image_id not in labels:
                self._reject(Rejection(rel, "image_without_labels", f"no label record names {image_id}"))
            else:
                candidates.append(_Candidate(rel, path, labels[image_id]))
        return candidates

    def _frame(self, candidate: _Candidate, data: bytes, info: tuple, seq: int, now: datetime) -> dict:
        """One frames-table row; the label's bad objects are rejected on the way."""
        image_format, width, height = info
        label = candidate.label
        boxes, rejected = normalize_objects(label, width, height, self.summary)
        for item in rejected:
            self._reject(item)
        split = label.split if label.split in SPLITS else assign_split(label.image_id, self.val_fraction)
        return {
            "image_id": label.image_id, "batch_id": self.batch_id, "source_file": candidate.rel,
            "label_format": label.layout, "split": split, "image_bytes": data,
            "image_format": image_format, "width": width, "height": height,
            "weather": label.attributes.get("weather"), "scene": label.attributes.get("scene"),
            "timeofday": label.attributes.get("timeofday"), "timestamp": label.timestamp,
            **boxes, "ingest_seq": seq, "ingested_at": now,
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
        table = storage.open_or_create(self.conn, storage.FRAMES_TABLE, storage.FRAMES_SCHEMA)
        existing, next_seq = frame_index(table)
        candidates = self._scan(existing)
        if candidates:
            # Chunks are read, checked and built ahead on a thread of ours, so Python prepares chunk
            # n+1 while Lance (which pulls the reader and waits on it otherwise) writes chunk n;
            # memory stays a few chunks.
            batches = _ahead(self._rows(candidates, next_seq), depth=2)
            reader = pa.RecordBatchReader.from_batches(storage.FRAMES_SCHEMA, batches)
            table.add(reader)  # one commit for the whole batch: a crash leaves nothing half-written
        record_quarantine(self.conn, self.batch_id, self.rejections)
        self.summary.seconds = time.perf_counter() - started
        return self.summary


def frame_index(table) -> tuple[dict[str, str], int]:
    """image_id → batch_id of every ingested frame, and the next ingest_seq."""
    columns = table.to_lance().to_table(columns=["image_id", "batch_id", "ingest_seq"])
    if columns.num_rows == 0:
        return {}, 0
    existing = dict(zip(columns["image_id"].to_pylist(), columns["batch_id"].to_pylist()))
    return existing, pc.max(columns["ingest_seq"]).as_py() + 1


def record_quarantine(conn, batch_id: str, rejections: Iterable[Rejection]) -> None:
    """Append rejections not yet recorded: re-running a batch never duplicates a record."""
    rows = [{"batch_id": batch_id, "file": r.file, "reason": r.reason, "detail": r.detail,
             "quarantined_at": datetime.now(timezone.utc)} for r in rejections]
    table = storage.open_or_create(conn, storage.QUARANTINE_TABLE, storage.QUARANTINE_SCHEMA)
    if rows:
        new = pa.Table.from_pylist(rows, schema=storage.QUARANTINE_SCHEMA)
        table.merge_insert(["batch_id", "file", "reason"]).when_not_matched_insert_all().execute(new)


def ingested_batch_ids(conn) -> set[str]:
    """Batches already processed: they left a frame or a quarantine record."""
    done = set()
    for name in (storage.FRAMES_TABLE, storage.QUARANTINE_TABLE):
        if storage.table_exists(conn, name):
            column = conn.open_table(name).to_lance().to_table(columns=["batch_id"])["batch_id"]
            done.update(pc.unique(column).to_pylist())
    return done


def pending_batches(conn, landing_dir: Path) -> list[str]:
    """READY batches with no frame in the table yet."""
    done = ingested_batch_ids(conn)
    return [b for b in ready_batches(landing_dir) if b not in done]


def ingest_batches(conn, landing_dir: Path, batch_ids: Iterable[str] | None = None, *,
                   val_fraction: float = 0.2, log: Callable[[str], None] | None = None) -> list[BatchSummary]:
    """Ingest the named batches (default: every READY batch not ingested yet), in order."""
    landing_dir = Path(landing_dir)
    if batch_ids is None:
        batch_ids = pending_batches(conn, landing_dir)
    summaries = []
    for batch_id in batch_ids:
        summary = BatchIngestor(conn, landing_dir, batch_id, val_fraction=val_fraction, log=log).run()
        (log or (lambda message: None))(f"{batch_id}: {summary.as_metadata()}")
        summaries.append(summary)
    return summaries


# --- audits behind the raw_frames asset checks ---------------------------------------------


def duplicate_image_ids(table) -> list[str]:
    ids = table.to_lance().to_table(columns=["image_id"])["image_id"]
    counts = pc.value_counts(ids)
    return [c["values"].as_py() for c in counts if c["counts"].as_py() > 1]


def frames_with_boxes_outside(table) -> list[str]:
    """Frames with a box that is empty or leaves the frame (ingestion clips or rejects those)."""
    bad = []
    for batch in table.to_lance().to_batches(columns=["image_id", "width", "height", "ann_bboxes"]):
        for row in batch.to_pylist():
            w, h = row["width"], row["height"]
            if any(not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h) for x1, y1, x2, y2 in row["ann_bboxes"] or []):
                bad.append(row["image_id"])
    return bad


def _decodes(data: bytes) -> bool:
    from .loader import decode

    try:
        decode(data)
        return True
    except RuntimeError:  # torchvision's decoders raise RuntimeError on damaged data
        return False


def undecodable_frames(table) -> list[str]:
    """Frames whose bytes do not decode with the training decoder (ingestion checks structure only)."""
    from .loader import on_frame_threads

    bad = []
    for batch in table.to_lance().to_batches(columns=["image_id", "image_bytes"], batch_size=64):
        ids, blobs = batch["image_id"].to_pylist(), batch["image_bytes"].to_pylist()
        bad.extend(i for i, ok in zip(ids, on_frame_threads(_decodes, blobs)) if not ok)
    return bad
