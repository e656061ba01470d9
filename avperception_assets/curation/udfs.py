"""Curation row functions: what each curation column computes for a frame.

These are the functions Geneva's Ray workers unpickle and run (by reference, so a worker
imports this module): a per-row function for the annotation columns, and batched callables for
the detector column, a frame's dhash and embedding, its duplicate flag and uniqueness, and
exemplar distances. The checks reuse the per-value functions to recompute expected values.
Nothing here writes a table; uniqueness reads the embeddings of earlier frames.

No `from __future__ import annotations`: Geneva tells a record-batch UDF by comparing its
parameter's annotation with `pa.RecordBatch` itself, unevaluated. Annotations naming `Columns`
are strings, so definitions load without importing Geneva.
"""

import hashlib
import io
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from avperception_assets.formats.taxonomy import CLASSES, PERSON_CLASSES
from avperception_assets.storage.decoding import decode
from avperception_assets.storage.tables import CLIP_ID
from avperception_assets.discovery.embeddings import EmbeddingModel
from avperception_assets.discovery.embeddings import load as load_embedder
from avperception_assets.discovery.vector_index import nearest_each, vectors_matrix

if TYPE_CHECKING:  # Geneva resolves `Columns` in return annotations itself: no import when definitions load
    from geneva import Columns

COCO_PERSON_LABEL = 1  # torchvision COCO heads (and this project's detector) use COCO ids


CROWD_BOXES_RULE = "skipped"  # recorded on the annotation columns: crowd boxes are ignore regions


def _not_crowd(values, ann_crowd) -> list:
    """Per-box `values` of a frame's boxes, crowd boxes (ignore regions, not objects) left out;
    `values` NULL: no box, `ann_crowd` NULL: no crowd box."""
    if values is None:
        return []
    crowd = [False] * len(values) if ann_crowd is None else ann_crowd
    return [value for value, is_crowd in zip(values, crowd) if not is_crowd]


def _categories(ann_categories, ann_crowd=None) -> list[str]:
    return [str(c) for c in _not_crowd(ann_categories, ann_crowd)]


def count_persons(ann_categories, ann_crowd=None) -> int:
    return sum(c in PERSON_CLASSES for c in _categories(ann_categories, ann_crowd))


def person_area_pct_from_boxes(boxes, width: float, height: float) -> float:
    """Largest box area as a percentage of the frame area (0 when there is no box)."""
    if width is None or height is None or width <= 0 or height <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return 0.0
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    return float(min(100.0, 100.0 * areas.max() / (width * height)))


def annotated_person_area_pct(ann_categories, ann_bboxes, width, height, ann_crowd=None) -> float:
    """Largest annotated person box (crowd boxes left out) as a percentage of the frame area."""
    boxes = zip(_categories(ann_categories, ann_crowd), _not_crowd(ann_bboxes, ann_crowd))
    persons = [np.asarray(b, dtype=np.float64) for c, b in boxes if c in PERSON_CLASSES]
    return person_area_pct_from_boxes(persons, width, height)


def dhash_bytes(image_bytes: bytes, hash_size: int = 8) -> int:
    """64-bit difference hash: sign of horizontal gradients of a 9x8 grey thumbnail."""
    from PIL import Image

    if not image_bytes:
        raise ValueError("empty image bytes")
    with Image.open(io.BytesIO(image_bytes)) as image:
        image.draft("L", (hash_size * 16, hash_size * 16))  # JPEG: decode at reduced scale
        grey = image.convert("L").resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: np.ndarray, b) -> np.ndarray:
    """Bitwise Hamming distance between uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


# Hash pairs compared at once by `near_hashes`: its XOR matrix is 8 bytes a pair, so 32 MB at
# most, whatever the reference set's size (256 rows against 100,000 references were 205 MB).
_PAIRS_AT_ONCE = 4_000_000


def near_hashes(hashes: np.ndarray, ref_hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """(i, j, bits) of every pair with `hashes[i]` within `threshold` bits of `ref_hashes[j]`."""
    hashes, ref_hashes = np.asarray(hashes, dtype=np.uint64), np.asarray(ref_hashes, dtype=np.uint64)
    chunk, parts = max(1, _PAIRS_AT_ONCE // max(1, len(ref_hashes))), []
    for start in range(0, len(hashes), chunk):
        distances = hamming(hashes[start:start + chunk, None], ref_hashes[None, :])
        rows, cols = np.nonzero(distances <= threshold)
        parts.append((rows + start, cols, distances[rows, cols]))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return tuple(np.concatenate(column) for column in zip(*parts))


def clip_keys(clip_ids: pa.Array | pa.ChunkedArray | None, seqs: np.ndarray) -> np.ndarray:
    """An int64 key of each frame's clip: a hash of its `clip_id` (non-negative), or for a frame
    without a clip (NULL, or a table from before clips: `clip_ids` None) its own `-1 - ingest_seq`,
    so it is a clip of its own. 8 bytes a frame, where the ids would be tens."""
    keys = -1 - np.asarray(seqs, dtype=np.int64)
    if clip_ids is None:
        return keys
    if isinstance(clip_ids, pa.ChunkedArray):
        clip_ids = clip_ids.combine_chunks()
    encoded = pc.dictionary_encode(clip_ids)  # each distinct id hashed once
    hashes = np.array([_clip_hash(c) for c in encoded.dictionary.to_pylist()] or [0], dtype=np.int64)
    has_clip = encoded.indices.is_valid().to_numpy(zero_copy_only=False)
    keys[has_clip] = hashes[encoded.indices.fill_null(0).to_numpy()][has_clip]
    return keys


def _clip_hash(clip_id: str) -> int:
    digest = int.from_bytes(hashlib.blake2b(clip_id.encode(), digest_size=8).digest(), "little")
    return digest >> 1  # 63 bits: never one of the negative keys of frames without a clip


def duplicate_flags(hashes: np.ndarray, seqs: np.ndarray, clips: np.ndarray, ref_hashes: np.ndarray,
                    ref_seqs: np.ndarray, ref_clips: np.ndarray, threshold: int) -> np.ndarray:
    """True where a reference frame of another clip (`clip_keys`), ingested earlier, is within
    `threshold` bits. Frames of one clip never flag each other: consecutive frames are alike by nature."""
    seqs, clips = np.asarray(seqs, dtype=np.int64), np.asarray(clips, dtype=np.int64)
    ref_seqs, ref_clips = np.asarray(ref_seqs, dtype=np.int64), np.asarray(ref_clips, dtype=np.int64)
    rows, cols, _ = near_hashes(hashes, ref_hashes, threshold)  # few pairs: the other tests only on them
    earlier_elsewhere = (ref_seqs[cols] < seqs[rows]) & (ref_clips[cols] != clips[rows])
    flags = np.zeros(len(seqs), dtype=bool)
    flags[rows[earlier_elsewhere]] = True
    return flags


def has_person(ann_categories, ann_crowd=None) -> bool:
    return count_persons(ann_categories, ann_crowd) > 0


def has_rider(ann_categories, ann_crowd=None) -> bool:
    return "rider" in _categories(ann_categories, ann_crowd)


# Plural names of the det_20 classes, for scene descriptions.
PLURALS = {"pedestrian": "pedestrians", "rider": "riders", "car": "cars", "truck": "trucks", "bus": "buses",
           "train": "trains", "motorcycle": "motorcycles", "bicycle": "bicycles", "traffic light": "traffic lights",
           "traffic sign": "traffic signs"}
UNDEFINED = "undefined"


def scene_description(timeofday, weather, scene, ann_categories, ann_crowd=None) -> str:
    """'night, rainy, city street; 2 pedestrians, 1 rider, 3 cars': the scene attributes, then
    the count of each class in det_20 order, crowd boxes left out (what full-text search indexes)."""
    attributes = [a for a in (timeofday, weather, scene) if a and a != UNDEFINED]
    categories = _categories(ann_categories, ann_crowd)
    counts = [f"{n} {c if n == 1 else PLURALS[c]}" for c in CLASSES if (n := categories.count(c))]
    return f"{', '.join(attributes) or 'unknown scene'}; {', '.join(counts) or 'no objects'}"


class AnnotationColumns(NamedTuple):
    has_person: bool
    has_rider: bool
    num_persons: int
    scene_description: str


ANNOTATION_COLUMNS_TYPE = pa.struct([("has_person", pa.bool_()), ("has_rider", pa.bool_()),
                                     ("num_persons", pa.int32()), ("scene_description", pa.string())])


def annotation_columns(ann_categories: np.ndarray, ann_crowd: np.ndarray, timeofday: str, weather: str,
                       scene: str) -> "Columns[AnnotationColumns]":
    """`has_person`, `has_rider`, `num_persons` and `scene_description`: one UDF, so one Geneva
    job fills all four. Crowd boxes (`ann_crowd`) are ignore regions: no object of any of them."""
    return AnnotationColumns(has_person(ann_categories, ann_crowd), has_rider(ann_categories, ann_crowd),
                             count_persons(ann_categories, ann_crowd),
                             scene_description(timeofday, weather, scene, ann_categories, ann_crowd))


def person_bbox_area_pct_annotations(ann_categories: np.ndarray, ann_bboxes: np.ndarray, ann_crowd: np.ndarray,
                                     width: int, height: int) -> float:
    return annotated_person_area_pct(ann_categories, ann_bboxes, width, height, ann_crowd)


def dhash(image_bytes: bytes) -> int:
    # The pipeline's first full decode of a frame (ingestion checks structure only): a frame
    # the training decoder rejects gets no dhash, so it stays out of every slice and is
    # quarantined by `curation.quarantine_undecodable`.
    decode(image_bytes)
    return dhash_bytes(image_bytes)


# One model per worker process: Geneva may unpickle the UDF per task, the cache survives.
_MODEL_CACHE: dict[tuple[str, str], Any] = {}


class PersonAreaDetector:
    """Batched detector UDF: decode the batch once, one forward pass, largest person box."""

    def __init__(self, weights: str, profile: str, score_threshold: float, batch_size: int):
        self.weights = weights
        self.profile = profile
        self.score_threshold = score_threshold
        self.batch_size = batch_size

    def _model(self):
        import torch

        from avperception_assets.model import detector

        key = (self.weights, self.profile)
        if key not in _MODEL_CACHE:
            model = detector.build_detector(detector.get_profile(self.profile), self.weights).eval()
            if torch.cuda.is_available():
                model = model.cuda().half()
            _MODEL_CACHE[key] = model
        return _MODEL_CACHE[key]

    def __call__(self, image_bytes: pa.Array) -> pa.Array:
        import torch

        model = self._model()
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        values = []
        for start in range(0, len(image_bytes), self.batch_size):
            chunk = image_bytes.slice(start, self.batch_size).to_pylist()
            if any(not b for b in chunk):
                raise ValueError("frame has no image bytes")
            images = _decode_batch(chunk, device)
            batch = [img.to(dtype) / 255.0 for img in images]
            with torch.inference_mode():
                outputs = model(batch)
            for img, out in zip(images, outputs):
                keep = (out["labels"] == COCO_PERSON_LABEL) & (out["scores"] >= self.score_threshold)
                boxes = out["boxes"][keep].float().cpu().numpy()
                values.append(person_area_pct_from_boxes(boxes, img.shape[2], img.shape[1]))
        return pa.array(values, type=pa.float32())


def _decode_batch(blobs: list[bytes], device) -> list:
    """Decode a batch of frames once, as RGB uint8 tensors on `device` (JPEGs on the GPU there)."""
    import torch
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    if all(b[:2] == b"\xff\xd8" for b in blobs):
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    return [decode_image(d, mode=ImageReadMode.RGB).to(device) for d in data]


def vectors_array(vectors: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    """(n, dim) float32 → the fixed-size list column LanceDB searches."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(vectors, dtype=np.float32).ravel()), dim)




class PixelValues(NamedTuple):
    dhash: int
    embedding: list[float]


class PixelColumns:
    """Record-batch UDF: `dhash` and `embedding` of each frame, so one Geneva job (and one read
    of the bytes) fills both. A frame that does not decode fails its batch; Geneva bisects the
    batch down to it and writes NULL to both columns (the frame stays out of every slice)."""

    def __init__(self, model: EmbeddingModel, batch_size: int):
        self.model = model
        self.batch_size = batch_size

    def __call__(self, batch: pa.RecordBatch) -> "Columns[PixelValues]":
        frames = batch["image_bytes"].to_pylist()
        hashes = pa.array([dhash(frame) for frame in frames], type=pa.uint64())
        embedder = load_embedder(self.model)
        chunks = [embedder.embed_images(frames[s:s + self.batch_size]) for s in range(0, len(frames), self.batch_size)]
        vectors = vectors_array(np.concatenate(chunks) if chunks else np.zeros((0, self.model.dim)), self.model.dim)
        return pa.StructArray.from_arrays([hashes, vectors], names=list(PixelValues._fields))


UNIQUENESS_CAP = 1.0  # cosine distance at which a frame counts as wholly unlike anything earlier


class NoveltyValues(NamedTuple):
    is_duplicate: bool
    uniqueness: float


class NoveltyColumns:
    """Record-batch UDF: `is_duplicate` and `uniqueness` of each frame against the frames ingested
    before it, one Geneva job for both. Earlier frames only, so a value never changes when
    footage lands.

    - is_duplicate: an earlier frame of another clip is within `threshold` bits of its dhash
      (`duplicate_flags`). The reference hashes, seqs and clip keys (every frame with a dhash, old
      and new) travel with the UDF: 24 bytes a frame.
    - uniqueness: cosine distance from its embedding to the nearest earlier frame's, capped at
      `UNIQUENESS_CAP` (the first frame ever scores the cap). The frames before the batch's
      first are searched in one indexed (or, on a small table, exact) query for the whole batch;
      those from its first to its last (the batch's own, and any other its rows span) are
      compared directly. The cost follows the new rows.
    """

    def __init__(self, ref_hashes: np.ndarray, ref_seqs: np.ndarray, ref_clips: np.ndarray, threshold: int, uri: str,
                 table_name: str, storage_options: dict[str, str] | None = None):
        self.ref_hashes = np.asarray(ref_hashes, dtype=np.uint64)
        self.ref_seqs = np.asarray(ref_seqs, dtype=np.int64)
        self.ref_clips = np.asarray(ref_clips, dtype=np.int64)
        self.threshold = threshold
        self.uri = uri  # the database's, not the table's
        self.table_name = table_name
        # An object store's options travel with the UDF: a Ray worker started before the AWS
        # variables were set (a shared or session Ray) has none of them.
        self.storage_options = dict(storage_options or {})

    def __call__(self, batch: pa.RecordBatch) -> "Columns[NoveltyValues]":
        import lancedb

        if batch["dhash"].null_count or batch["embedding"].null_count:
            raise ValueError("frame has no dhash or embedding (its image could not be decoded)")
        seqs = batch["ingest_seq"].to_numpy()
        clips = clip_keys(batch[CLIP_ID] if CLIP_ID in batch.schema.names else None, seqs)
        flags = duplicate_flags(batch["dhash"].to_numpy(), seqs, clips, self.ref_hashes, self.ref_seqs, self.ref_clips,
                                self.threshold)
        table = lancedb.connect(self.uri, storage_options=self.storage_options or None).open_table(self.table_name)
        values = uniqueness(table, vectors_matrix(batch["embedding"]), seqs)
        return pa.StructArray.from_arrays([pa.array(flags, type=pa.bool_()), pa.array(values, type=pa.float32())],
                                          names=list(NoveltyValues._fields))


def uniqueness(table, vectors: np.ndarray, seqs: np.ndarray) -> np.ndarray:
    """Cosine distance from each unit vector to the nearest `table` frame ingested before its
    `seqs` entry, capped at `UNIQUENESS_CAP`. One query for the frames before the first of
    `seqs` (one per row costs about 24x more); frames from the first to the last by a matrix."""
    if not len(seqs):
        return np.zeros(0)
    first, last = int(seqs.min()), int(seqs.max())
    best = np.full(len(seqs), UNIQUENESS_CAP, dtype=np.float64)
    earlier = nearest_each(table, vectors, k=1, where=f"ingest_seq < {first}", columns=["ingest_seq"])
    np.minimum.at(best, earlier["query_index"].to_numpy(), earlier["_distance"].to_numpy())
    span = table.to_lance().to_table(
        columns=["embedding", "ingest_seq"],
        filter=f"ingest_seq >= {first} AND ingest_seq < {last} AND embedding IS NOT NULL")
    if span.num_rows:
        distances = 1.0 - vectors @ vectors_matrix(span["embedding"]).T
        distances[span["ingest_seq"].to_numpy()[None, :] >= seqs[:, None]] = np.inf  # itself and later frames
        best = np.minimum(best, distances.min(axis=1))
    return np.clip(best, 0.0, UNIQUENESS_CAP)


class ExemplarDistance:
    """Batched UDF: cosine distance from each frame's embedding to the nearest exemplar of a
    failure mode defined by example (the exemplars' unit vectors travel with the UDF)."""

    def __init__(self, exemplars: np.ndarray):
        self.exemplars = np.asarray(exemplars, dtype=np.float32)

    def __call__(self, embedding: pa.Array) -> pa.Array:
        if embedding.null_count:
            raise ValueError("frame has no embedding (its image could not be embedded)")
        return pa.array(1.0 - (vectors_matrix(embedding) @ self.exemplars.T).max(axis=1), type=pa.float32())
