"""Track coverage by the base detector: in how many of its track's frames the pinned
`base_detector` finds each annotated box of a footage clip, stored on the frames table so that
a failure mode can select the objects the base detector keeps losing (`track_coverage_below`).

A box is found in a frame when a detection of its COCO class scoring at least `score_threshold`
matches it at IoU 0.5 (`frame_errors.coco_match`, COCO's greedy matching; crowd boxes and the
ignored-as classes are ignore regions, never found nor missed). A track is (clip, id); its
coverage is `tracking.coverage.track_coverage` over the clip's frames in `clip_frame_index` order.
Three columns of `bdd100k` hold the result:

- `ann_track_coverage` (list<float32>, aligned with the frame's boxes): the coverage of each box's
  track; a NULL element for a box without one (an ignore region); NULL for a frame that is not a
  position in a clip (a detection image, YOLO/VOC/COCO frames) or did not decode.
- `min_track_coverage` (struct, one float32 field per tracked class): the lowest coverage of the
  frame's tracks of each class, NULL where the frame has none. What filters read:
  `min_track_coverage.pedestrian < 0.5`.
- `track_coverage_model`: which base computed the row (`model_key`: the weights' digest, the input
  size and the score threshold); NULL until computed.

When they are computed: per footage batch, for the clips that have a frame not computed yet
(`new_clips`), over all of those clips' frames already in the table, so the detector runs on
the new clips and never on the rest of the table. A base detector retrained later leaves the
existing rows as the older base computed them (their `track_coverage_model` says so); the
whole-table recompute (`all_clips` into `cover_clips`) is a separate job.

Values are written in place (`storage.update_in_place`), not by Geneva UDFs: a frame's value
depends on every frame of its clip and on one detector pass over them.

Nothing here knows about Dagster.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from avperception_assets.formats.taxonomy import COCO_IDS, TRACK_CLASSES
from avperception_assets.storage import tables as storage

ANN_TRACK_COVERAGE = "ann_track_coverage"
MIN_TRACK_COVERAGE = "min_track_coverage"
MODEL_COLUMN = "track_coverage_model"
MIN_COVERAGE_TYPE = pa.struct([(name, pa.float32()) for name in TRACK_CLASSES])
FIELDS = (pa.field(ANN_TRACK_COVERAGE, pa.list_(pa.float32())), pa.field(MIN_TRACK_COVERAGE, MIN_COVERAGE_TYPE),
          pa.field(MODEL_COLUMN, pa.string()))
COLUMNS = tuple(f.name for f in FIELDS)
# A box counts as found from this score on: `frame_errors.CONFIDENT` (under it a true positive is
# weak), named here so that definitions load without torch (which frame_errors imports).
SCORE_THRESHOLD = 0.5

# A clip frame counts when it has a position in its clip; 100k detection images carry their
# video's clip id but no position and no tracks.
CLIP_FRAMES = "clip_id IS NOT NULL AND clip_frame_index IS NOT NULL"
READ_COLUMNS = ["image_id", "clip_id", "clip_frame_index", "ann_categories", "ann_bboxes", "ann_track_ids",
                "ann_crowd"]

# Detections of a batch of frame rows (READ_COLUMNS and `image_bytes`): torchvision's
# prediction dicts (boxes x1 y1 x2 y2, scores, COCO labels), one per row; None for a row whose
# image does not decode.
Detect = Callable[[pa.Table], list]


def model_key(weights_digest: str, min_size: int, max_size: int, score_threshold: float) -> str:
    """What defines a row's values: the base's weights, its input size and the score a detection needs."""
    return f"{weights_digest}@{min_size}x{max_size}:score>={score_threshold:g}"


def ensure_columns(table):
    """The frames table with the coverage columns (added NULL, a schema change only, on first use)."""
    missing = [f for f in FIELDS if f.name not in table.schema.names]
    if missing:
        table.to_lance().add_columns(pa.schema(missing))
        table.checkout_latest()
    return table


# --- per frame and per clip: plain logic -------------------------------------------------------


def found_boxes(prediction: Mapping, categories: Sequence[str], boxes, crowd: Sequence[bool],
                score_threshold: float) -> list[bool]:
    """Whether each annotated box is found: matched at IoU 0.5 by a detection of its COCO class
    scoring at least `score_threshold` (crowd boxes: never)."""
    from avperception_assets.evaluation.frame_errors import coco_match
    from avperception_assets.formats.coco import xywh

    scores = np.asarray(prediction["scores"], dtype=np.float64).reshape(-1)
    keep = scores >= score_threshold
    pred_boxes = np.asarray(prediction["boxes"], dtype=np.float64).reshape(-1, 4)[keep]
    pred_labels, scores = np.asarray(prediction["labels"]).reshape(-1)[keep], scores[keep]
    labels = np.array([COCO_IDS[c] for c in categories], dtype=np.int64)
    gt_boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    crowd = np.asarray(crowd, dtype=bool).reshape(-1)
    found = np.zeros(len(labels), dtype=bool)
    for coco_id in set(labels.tolist()):
        gt_index, pred_index = np.flatnonzero(labels == coco_id), np.flatnonzero(pred_labels == coco_id)
        matches = coco_match(scores[pred_index], np.array(xywh(pred_boxes[pred_index])).reshape(-1, 4),
                             np.array(xywh(gt_boxes[gt_index])).reshape(-1, 4), crowd[gt_index])
        found[gt_index] = (matches.gt_match[0] >= 0) & ~crowd[gt_index]  # row 0: IoU 0.5
    return found.tolist()


@dataclass(frozen=True)
class ClipFrame:
    """One frame of a clip, as coverage reads it: its boxes' classes, track ids (None: no track)
    and crowd flags, and which boxes were found (None: the frame did not decode)."""

    categories: Sequence[str]
    track_ids: Sequence[str | None]
    crowd: Sequence[bool]
    found: Sequence[bool] | None


def _tracked(frame: ClipFrame) -> list[int]:
    """Positions of the boxes that belong to a track to find (not ignore regions)."""
    return [i for i, (track, crowd) in enumerate(zip(frame.track_ids, frame.crowd)) if track is not None and not crowd]


def clip_coverage(frames: Sequence[ClipFrame]):
    """Per frame of one clip (in clip order), the coverage of each box's track (None for a box
    without one, and for every box of a frame that did not decode, which counts for no track),
    and the tracks {id: (class, TrackCoverage)}."""
    from avperception_assets.tracking.coverage import track_coverage

    decoded = [f for f in frames if f.found is not None]
    tracks = track_coverage([([f.track_ids[i] for i in _tracked(f)], [bool(f.found[i]) for i in _tracked(f)])
                             for f in decoded])
    classes = {f.track_ids[i]: f.categories[i] for f in decoded for i in _tracked(f)}
    per_box = []
    for frame in frames:
        values: list[float | None] = [None] * len(frame.track_ids)
        if frame.found is not None:
            for i in _tracked(frame):
                values[i] = tracks[frame.track_ids[i]].coverage
        per_box.append(values)
    return per_box, {track: (classes[track], coverage) for track, coverage in tracks.items()}


def min_by_class(categories: Sequence[str], coverage: Sequence[float | None]) -> dict[str, float | None]:
    """The lowest coverage among a frame's tracked boxes of each tracked class (None: none)."""
    lowest: dict[str, float | None] = dict.fromkeys(TRACK_CLASSES)
    for category, value in zip(categories, coverage):
        if value is not None and category in lowest:
            lowest[category] = value if lowest[category] is None else min(lowest[category], value)
    return lowest


# --- on the frames table -------------------------------------------------------------------------


@dataclass
class CoverageStats:
    """What one computation wrote: the clips, their frames, and every track with its class and
    coverage (keyed by (clip, id))."""

    model: str
    clips: int = 0
    frames: int = 0
    frames_undecodable: int = 0
    tracks: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)
    table_version: int | None = None

    def below(self, classes: Sequence[str], threshold: float) -> int:
        """How many tracks of `classes` the base found in under `threshold` of their frames."""
        return sum(c in classes and coverage < threshold for c, coverage in self.tracks.values())


def new_clips(table) -> list[str]:
    """Clips with a frame whose coverage is not computed yet: a batch's new footage (and a clip a
    later batch extended). Reads the filter's columns, never the frames' pixels."""
    rows = ensure_columns(table).to_lance().to_table(columns=["clip_id"], filter=f"{CLIP_FRAMES} AND {MODEL_COLUMN} IS NULL")
    return sorted(set(rows["clip_id"].to_pylist()))


def all_clips(table) -> list[str]:
    """Every clip of the table: what the whole-table recompute covers after the base changed."""
    return sorted(set(table.to_lance().to_table(columns=["clip_id"], filter=CLIP_FRAMES)["clip_id"].to_pylist()))


def stale_rows(table, key: str) -> int:
    """Clip frames computed by another base than `key` (the whole-table job brings them up to date)."""
    return table.count_rows(f"{CLIP_FRAMES} AND {MODEL_COLUMN} IS NOT NULL AND {MODEL_COLUMN} != '{key}'")


def _clip_rows(dataset, clip_id: str, detect: Detect, batch_size: int) -> tuple[pa.Table, list]:
    """One clip's frames in clip order, and the detections of each (None: did not decode)."""
    ids = storage.rows_with(dataset, "clip_id", [clip_id], ["image_id", "clip_frame_index"], where=CLIP_FRAMES)
    ids = ids.sort_by("clip_frame_index")["image_id"].to_pylist()
    rows, detections = [], []
    for start in range(0, len(ids), batch_size):  # pixels of one batch at a time
        chunk = storage.rows_with(dataset, "image_id", ids[start:start + batch_size], READ_COLUMNS + ["image_bytes"])
        chunk = chunk.sort_by("clip_frame_index")
        detections.extend(detect(chunk))
        rows.append(chunk.drop_columns(["image_bytes"]))
    return pa.concat_tables(rows) if rows else dataset.schema.empty_table().select(READ_COLUMNS), detections


def _clip_frame(row: dict, detection, score_threshold: float) -> ClipFrame:
    """A table row as coverage reads it (a frame without track ids or crowd flags: none)."""
    categories = list(row["ann_categories"] or [])
    track_ids = list(row["ann_track_ids"] or [None] * len(categories))
    crowd = list(row["ann_crowd"] or [False] * len(categories))
    found = None if detection is None else found_boxes(detection, categories, row["ann_bboxes"] or [], crowd,
                                                        score_threshold)
    return ClipFrame(categories, track_ids, crowd, found)


def cover_clips(table, clip_ids: Sequence[str], detect: Detect, key: str, *, score_threshold: float,
                batch_size: int = 8, log: Callable[[str], None] | None = None) -> CoverageStats:
    """Compute the coverage columns of every frame of `clip_ids` (whole clips, whatever batch
    brought each frame) with the detections `detect` gives, and write them in place in one
    commit, recording `key` as the model of each row."""
    table = ensure_columns(table)
    dataset, stats, written = table.to_lance(), CoverageStats(key), []
    for clip_id in clip_ids:
        rows, detections = _clip_rows(dataset, clip_id, detect, batch_size)
        frames = [_clip_frame(row, detection, score_threshold) for row, detection in zip(rows.to_pylist(), detections)]
        per_box, tracks = clip_coverage(frames)
        for image_id, frame, values in zip(rows["image_id"].to_pylist(), frames, per_box):
            decoded = frame.found is not None
            written.append({"image_id": image_id, ANN_TRACK_COVERAGE: values if decoded else None,
                            MIN_TRACK_COVERAGE: min_by_class(frame.categories, values) if decoded else None,
                            MODEL_COLUMN: key})
        stats.clips += 1
        stats.frames += len(frames)
        stats.frames_undecodable += sum(f.found is None for f in frames)
        stats.tracks.update({(clip_id, track): (category, coverage.coverage)
                             for track, (category, coverage) in tracks.items()})
        if log:
            log(f"clip {clip_id}: {len(frames)} frames, {len(tracks)} tracks")
    schema = pa.schema([pa.field("image_id", pa.string(), nullable=False), *FIELDS])
    stats.table_version = storage.update_in_place(table, "image_id", pa.Table.from_pylist(written, schema=schema)) \
        if written else table.version
    return stats


def model_detections(model, batch_size: int = 8) -> Detect:
    """`Detect` with a torchvision detector (`detections.predict`), frames decoded as training
    decodes them; a frame that does not decode gets None."""
    from avperception_assets.model.detections import predict
    from avperception_assets.storage.decoding import decode

    def detect(rows: pa.Table) -> list:
        images: list = []
        for blob in rows["image_bytes"]:
            try:
                images.append(decode(blob))
            except (RuntimeError, ValueError):  # torchvision's complaints about bytes that do not decode
                images.append(None)
        decoded = [image for image in images if image is not None]
        found = iter([p for s in range(0, len(decoded), batch_size) for p in predict(model, decoded[s:s + batch_size])])
        return [None if image is None else next(found) for image in images]

    return detect
