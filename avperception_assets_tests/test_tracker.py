"""The IoU tracker (tracking.tracker) on constructed sequences: crossing objects, the optimal
assignment, missed frames, class changes, the score floor, and its output read by tracking.metrics."""

from __future__ import annotations

import json

import pytest

from avperception_assets.tracking.metrics import evaluate_paths
from avperception_assets.tracking.tracker import Detection, Tracker, TrackerSettings, track_clip


def _ped(x1, y1, x2, y2, score=0.9, category="pedestrian") -> Detection:
    return Detection(category, (float(x1), float(y1), float(x2), float(y2)), score)


def _crossing(t: int) -> tuple[tuple, tuple]:
    """Two pedestrians walking towards each other, 10 px a frame, one 20 px lower: they cross at t = 5."""
    return (10 * t, 0, 10 * t + 40, 80), (100 - 10 * t, 20, 140 - 10 * t, 100)


def _ids(tracked) -> list[str]:
    return [track_id for track_id, _ in tracked]


def test_two_crossing_objects_keep_their_ids(tmp_path):
    frames = [(f"f{t}", t, [_ped(*b, score=0.8 + 0.01 * (t % 2 == k)) for k, b in enumerate(_crossing(t))])
              for t in range(11)]
    predicted = track_clip("v", frames)
    by_box = [{label["id"]: (label["box2d"]["x1"], label["box2d"]["y1"]) for label in f["labels"]} for f in predicted]
    # Track "1" is the first pedestrian (higher score at t = 0) at every frame, "2" the second.
    assert all(ids == {"1": (10.0 * t, 0.0), "2": (100.0 - 10 * t, 20.0)} for t, ids in enumerate(by_box))

    gt = [{"name": f"f{t}", "videoName": "v", "frameIndex": t,
           "labels": [{"id": name, "category": "pedestrian", "box2d": dict(zip(("x1", "y1", "x2", "y2"), box))}
                      for name, box in zip("ab", _crossing(t))]} for t in range(11)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(predicted))
    figures = evaluate_paths(tmp_path / "gt.json", tmp_path / "pred.json")
    assert (figures["IDSw"], figures["FN"], figures["FP"], figures["MOTA"], figures["IDF1"]) == (0, 0, 0, 100.0, 100.0)


def test_the_assignment_pairs_as_many_tracks_as_it_can():
    # A greedy match would give the second detection's best partner (track 1, IoU 0.9) away and end
    # track 2, which overlaps only that detection; the optimal assignment continues both.
    tracker = Tracker(TrackerSettings(min_iou=0.5))
    assert _ids(tracker.update(0, [_ped(0, 0, 100, 100, 0.9), _ped(20, 0, 120, 100, 0.8)])) == ["1", "2"]
    # IoU with track 1's box: 0.9 (x from 5) and 0.67 (x from -20); with track 2's: 0.74 and 0.43 (barred)
    tracked = tracker.update(1, [_ped(5, 0, 105, 100, 0.9), _ped(-20, 0, 80, 100, 0.8)])
    assert [(i, d.box[0]) for i, d in tracked] == [("2", 5.0), ("1", -20.0)]


@pytest.mark.parametrize("max_missed, same", [(0, False), (1, True)])
def test_a_track_survives_up_to_max_missed_frames(max_missed, same):
    tracker = Tracker(TrackerSettings(max_missed=max_missed))
    first = _ids(tracker.update(0, [_ped(0, 0, 40, 80)]))
    assert tracker.update(1, []) == []  # the detector missed it
    again = _ids(tracker.update(2, [_ped(2, 0, 42, 80)]))
    assert (first == again == ["1"]) if same else (first, again) == (["1"], ["2"])


def test_frames_left_out_of_the_sequence_count_as_missed():
    tracker = Tracker(TrackerSettings(max_missed=2))
    assert _ids(tracker.update(3, [_ped(0, 0, 40, 80)])) == ["1"]
    assert _ids(tracker.update(6, [_ped(0, 0, 40, 80)])) == ["1"]  # frames 4 and 5 missed: 2
    assert _ids(tracker.update(10, [_ped(0, 0, 40, 80)])) == ["2"]  # 3 missed: a new track
    with pytest.raises(ValueError, match="clip order"):
        tracker.update(10, [])


def test_a_class_change_starts_a_track_and_the_first_one_lives_on():
    tracker = Tracker()
    assert _ids(tracker.update(0, [_ped(0, 0, 80, 60, category="car")])) == ["1"]
    assert _ids(tracker.update(1, [_ped(0, 0, 80, 60, category="truck")])) == ["2"]
    assert _ids(tracker.update(2, [_ped(0, 0, 80, 60, category="car")])) == ["1"]


def test_detections_under_the_score_floor_are_not_tracked():
    tracker = Tracker(TrackerSettings(min_score=0.5, max_missed=0))
    assert _ids(tracker.update(0, [_ped(0, 0, 40, 80, 0.6), _ped(200, 0, 240, 80, 0.4)])) == ["1"]
    assert tracker.update(1, [_ped(0, 0, 40, 80, 0.3)]) == []  # too weak to continue track 1 ...
    assert _ids(tracker.update(2, [_ped(0, 0, 40, 80, 0.7)])) == ["2"]  # ... which ended


def test_the_same_detections_give_the_same_tracks():
    frames = [(f"f{t}", t, [_ped(*b, score=0.7) for b in _crossing(t)]) for t in range(11)]
    assert track_clip("v", frames) == track_clip("v", frames)
    assert track_clip("v", frames)[0]["labels"][0] == {"id": "1", "category": "pedestrian", "score": 0.7,
                                                       "box2d": {"x1": 0.0, "y1": 0.0, "x2": 40.0, "y2": 80.0}}
