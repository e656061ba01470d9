"""The base detector's track coverage on the frames table (`discovery.track_coverage`): which boxes
a detector finds, each track's coverage over its clip, the columns written in place for the new
clips only, and a failure mode defined by `track_coverage_below` selecting its frames in real views.

The detections are constructed from the ground truth by a stated rule (a tiny or untrained
detector would find nothing meaningful); the model path is `model_detections`, the same `Detect`."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from avperception_assets import synthetic
from avperception_assets.curation import columns as curation
from avperception_assets.discovery import track_coverage as coverage
from avperception_assets.failure_modes.registry import FailureMode
from avperception_assets.formats.taxonomy import COCO_IDS
from avperception_assets.ingest import frames as ingest
from avperception_assets.slices import views as slices
from avperception_assets.storage import tables as storage
from avperception_assets.tracking.coverage import TrackCoverage

KEY = "constructed@320x180:score>=0.5"
LOST_TRACK = "1"  # found only in every third frame of its clip (coverage 1/3 over 6 frames)


def _prediction(boxes, labels, scores) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores, dtype=torch.float32)}


def test_the_columns_name_the_classes_mot_tracks_and_frame_errors_threshold():
    from avperception_assets.evaluation.frame_errors import CONFIDENT
    from avperception_assets.tracking.metrics import CLASSES

    assert coverage.TRACK_CLASSES == CLASSES and coverage.SCORE_THRESHOLD == CONFIDENT


def test_a_box_is_found_by_a_confident_detection_of_its_class_at_iou_half():
    boxes = [[0, 0, 100, 100], [200, 0, 300, 100], [400, 0, 500, 100], [0, 200, 100, 300], [200, 200, 300, 300]]
    categories = ["pedestrian", "car", "pedestrian", "rider", "car"]
    crowd = [False, False, False, False, True]
    prediction = _prediction([[0, 0, 100, 80],  # IoU 0.8 with the first pedestrian
                              [200, 0, 300, 40],  # IoU 0.4 with the car: too little
                              [400, 0, 500, 100],  # exact, but scoring under the threshold
                              [0, 200, 100, 300],  # a person (COCO 1) finds the rider
                              [200, 200, 300, 300]],  # on the crowd box: ignored, never found
                             [1, 3, 1, 1, 3], [0.9, 0.9, 0.4, 0.6, 0.9])
    assert coverage.found_boxes(prediction, categories, boxes, crowd, 0.5) == [True, False, False, True, False]
    assert coverage.found_boxes(prediction, categories, boxes, crowd, 0.3) == [True, False, True, True, False]
    assert coverage.found_boxes(_prediction([], [], []), categories, boxes, crowd, 0.5) == [False] * 5


def test_each_box_gets_its_tracks_coverage_over_the_clip():
    frames = [coverage.ClipFrame(["pedestrian", "car", "car"], ["p", "c", None], [False, False, True],
                                 [True, True, False]),
              coverage.ClipFrame(["pedestrian", "car"], ["p", "c"], [False, False], [False, True]),
              coverage.ClipFrame(["pedestrian"], ["p"], [False], None),  # did not decode: no track's frame
              coverage.ClipFrame(["pedestrian", "pedestrian"], ["p", "q"], [False, False], [False, True])]
    per_box, tracks = coverage.clip_coverage(frames)
    assert per_box == [[1 / 3, 1.0, None], [1 / 3, 1.0], [None], [1 / 3, 1.0]]
    assert tracks == {"p": ("pedestrian", TrackCoverage(3, 1, 2)), "c": ("car", TrackCoverage(2, 2, 0)),
                      "q": ("pedestrian", TrackCoverage(1, 1, 0))}
    lowest = coverage.min_by_class(["pedestrian", "pedestrian", "car"], [1.0, 0.25, None])
    assert lowest["pedestrian"] == 0.25 and lowest["car"] is None and set(lowest) == set(coverage.TRACK_CLASSES)


class ConstructedDetector:
    """Detections from the rows' own boxes: every tracked box found with score 0.9, except the
    boxes of track LOST_TRACK outside every third frame, which get a detection scoring 0.3
    (under the threshold). Records the frames it was shown."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, rows: pa.Table) -> list:
        predictions = []
        for row in rows.to_pylist():
            self.seen.append(row["image_id"])
            scores = [0.3 if track == LOST_TRACK and row["clip_frame_index"] % 3 else 0.9
                      for track in row["ann_track_ids"]]
            predictions.append(_prediction(row["ann_bboxes"], [COCO_IDS[c] for c in row["ann_categories"]], scores))
        return predictions


def _expected(rows: list[dict]) -> dict[str, list[float]]:
    """The rule's coverage, per frame and box: a LOST_TRACK box's share of frames at indices
    divisible by 3 among its clip's frames holding it; every other box 1."""
    frames_of: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        for track in row["ann_track_ids"]:
            frames_of.setdefault((row["clip_id"], track), []).append(row["clip_frame_index"])
    share = {key: sum(i % 3 == 0 for i in indices) / len(indices) if key[1] == LOST_TRACK else 1.0
             for key, indices in frames_of.items()}
    return {row["image_id"]: [share[(row["clip_id"], t)] for t in row["ann_track_ids"]] for row in rows}


def _land(root: Path, batch_id: str, clips: int, seed: int):
    synthetic.write_clip_batch(root / "landing", batch_id, clips, 6, seed=seed, width=320, height=180,
                               val_fraction=0.5)
    conn = storage.connect(str(root / "lancedb"))
    ingest.ingest_batches(conn, root / "landing")
    return conn, conn.open_table(storage.FRAMES_TABLE)


def _rows(table, where: str | None = None) -> list[dict]:
    return table.to_lance().to_table(columns=["image_id", "clip_id", "clip_frame_index", "batch_id", "ann_categories",
                                              "ann_track_ids", *coverage.COLUMNS, "_row_last_updated_at_version"],
                                     filter=where).to_pylist()


def test_a_batch_computes_its_clips_and_the_next_batch_only_its_own(tmp_path):
    conn, table = _land(tmp_path, "c1", 3, seed=3)
    first = ConstructedDetector()
    stats = coverage.cover_clips(table, coverage.new_clips(table), first, KEY, score_threshold=0.5, batch_size=4)
    rows = _rows(table)
    assert stats.clips == 3 and stats.frames == len(rows) == 18 and sorted(first.seen) == sorted(r["image_id"] for r in rows)
    expected = _expected(rows)
    for row in rows:
        assert row["ann_track_coverage"] == pytest.approx(expected[row["image_id"]]), row["image_id"]
        assert row["track_coverage_model"] == KEY
        lowest = {c: min((v for k, v in zip(row["ann_categories"], expected[row["image_id"]]) if k == c), default=None)
                  for c in coverage.TRACK_CLASSES}
        assert row["min_track_coverage"] == pytest.approx(lowest)
    lost = [(c, s) for (clip, track), (c, s) in stats.tracks.items() if track == LOST_TRACK]
    assert len(lost) == 3 and all(s == pytest.approx(1 / 3) for _, s in lost)
    assert stats.below(["pedestrian", "car", "rider"], 0.5) == sum(c in ("pedestrian", "car", "rider") for c, _ in lost)

    _, table = _land(tmp_path, "c2", 2, seed=4)
    assert coverage.new_clips(table) == sorted({r["clip_id"] for r in _rows(table, "batch_id = 'c2'")})
    second = ConstructedDetector()
    before = table.version
    stats = coverage.cover_clips(table, coverage.new_clips(table), second, KEY, score_threshold=0.5, batch_size=4)
    new_rows, old_rows = _rows(table, "batch_id = 'c2'"), _rows(table, "batch_id = 'c1'")
    assert stats.clips == 2 and sorted(second.seen) == sorted(r["image_id"] for r in new_rows)
    # Written in place in one commit, touching the new clips' rows only
    assert stats.table_version == table.version == before + 1
    assert {r["_row_last_updated_at_version"] for r in new_rows} == {table.version}
    assert old_rows == rows
    assert coverage.new_clips(table) == [] and coverage.stale_rows(table, KEY) == 0
    assert coverage.stale_rows(table, "another base") == 30


def test_frames_without_a_position_in_a_clip_get_no_coverage(tmp_path):
    _, table = _land(tmp_path, "c1", 1, seed=3)
    synthetic.write_batch(tmp_path / "landing", "d1", 3, seed=1, width=320, height=180)
    conn = storage.connect(str(tmp_path / "lancedb"))
    ingest.ingest_batches(conn, tmp_path / "landing")
    table = conn.open_table(storage.FRAMES_TABLE)
    detector = ConstructedDetector()
    coverage.cover_clips(table, coverage.new_clips(table), detector, KEY, score_threshold=0.5)
    detection_frames = _rows(table, "batch_id = 'd1'")
    assert len(detection_frames) == 3 and len(detector.seen) == 6
    assert all(r["ann_track_coverage"] is None and r["track_coverage_model"] is None for r in detection_frames)


LOST_PEDESTRIAN = FailureMode("lost_pedestrian", "", ("pedestrian",), track_coverage_below=0.5)


def test_a_track_coverage_mode_selects_the_frames_of_lost_tracks_in_real_views(tmp_path, local_ray):
    conn, table = _land(tmp_path, "c1", 4, seed=3)
    curation.backfill_columns(table, ["dhash", "is_duplicate"], curation.CurationConfig(concurrency=1))
    coverage.cover_clips(table, coverage.new_clips(table), ConstructedDetector(), KEY, score_threshold=0.5)
    stats = slices.refresh_views(conn, slices.all_views([LOST_PEDESTRIAN]))
    rows = table.to_lance().to_table(columns=["image_id", "clip_id", "clip_frame_index", "split", "is_duplicate",
                                              "ann_categories", "ann_track_ids"]).to_pylist()
    expected = _expected(rows)
    lost = {r["image_id"] for r in rows
            if any(c == "pedestrian" and v < 0.5 for c, v in zip(r["ann_categories"], expected[r["image_id"]]))}
    assert lost, "the synthetic clips hold a lost pedestrian track"
    for split in slices.SPLITS:
        wanted = {r["image_id"] for r in rows if r["image_id"] in lost and r["split"] == split
                  and (split == "val" or r["is_duplicate"] is False)}
        view = conn.open_table(slices.view_name(LOST_PEDESTRIAN, split))
        assert set(view.to_arrow()["image_id"].to_pylist()) == wanted, split
        assert slices.check_view(conn, LOST_PEDESTRIAN, split).passed
    assert sum(s.row_count for s in stats.values()) == len([r for r in rows if r["image_id"] in lost
                                                            and (r["split"] == "val" or r["is_duplicate"] is False)])


@pytest.mark.dagster_run
def test_a_footage_run_before_any_base_detector_records_no_coverage_and_goes_on(tmp_path):
    import dagster as dg

    from avperception_assets.defs.resources import WorkspaceResource
    from avperception_assets.defs.track_coverage_assets import build_track_coverage_defs

    _, table = _land(tmp_path, "c1", 1, seed=3)
    [asset] = build_track_coverage_defs([LOST_PEDESTRIAN]).assets
    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], instance=instance,
                                resources={"workspace": WorkspaceResource(data_location=str(tmp_path))})
    [event] = result.asset_materializations_for_node("track_coverage")
    assert event.metadata["clips_computed"].value == 0 and "no base_detector" in event.metadata["note"].value
    table.checkout_latest()
    assert coverage.new_clips(table) == sorted({r["clip_id"] for r in _rows(table)})  # all still to compute


@pytest.mark.dagster_run
@pytest.mark.training
def test_a_footage_run_after_base_detector_computes_coverage_with_that_base(tmp_path):
    """The model path: the base detector of the latest base_detector materialization runs on the
    clips' frames, and every clip frame records its coverage and which base computed it."""
    import dagster as dg

    from avperception_assets.defs import training_assets
    from avperception_assets.defs.resources import WorkspaceResource
    from avperception_assets.defs.track_coverage_assets import build_track_coverage_defs

    from .conftest import TINY_TRAINING

    _, table = _land(tmp_path, "c1", 2, seed=3)
    [asset] = build_track_coverage_defs([LOST_PEDESTRIAN]).assets
    resources = {"workspace": WorkspaceResource(data_location=str(tmp_path))}
    with dg.instance_for_test() as instance:
        dg.materialize([training_assets.base_detector], instance=instance, resources=resources,
                       run_config={"ops": {"base_detector": {"config": TINY_TRAINING}}})
        result = dg.materialize([asset], instance=instance, resources=resources)
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("track_coverage")[0].metadata.items()}
    assert (metadata["clips_computed"], metadata["frames_computed"], metadata["rows_from_another_base"]) == (2, 12, 0)
    table.checkout_latest()
    rows = _rows(table)
    key = {r["track_coverage_model"] for r in rows}
    assert key == {coverage.model_key(metadata["base_digest"], 96, 160, coverage.SCORE_THRESHOLD)}
    for row in rows:
        values = row["ann_track_coverage"]
        assert len(values) == len(row["ann_categories"])
        assert all(v is None or 0.0 <= v <= 1.0 for v in values)
    assert coverage.new_clips(table) == []
