"""Detections and their COCO metrics: what training's validation and the reports share."""

from __future__ import annotations

import pytest
import torch

from avperception_assets.formats import taxonomy as bdd100k
from avperception_assets.model import detections

PERSON, CAR = bdd100k.COCO_IDS["pedestrian"], bdd100k.COCO_IDS["car"]


def target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def pred(boxes, scores, labels):
    return {**target(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


# Frame 0 has a pedestrian, frame 1 only a car.
TARGETS = [target([[10, 10, 50, 90]], [PERSON]), target([[20, 20, 120, 80]], [CAR])]
PERFECT = [pred([[10, 10, 50, 90]], [0.9], [PERSON]), pred([[20, 20, 120, 80]], [0.8], [CAR])]


def test_perfect_predictions_score_one():
    metrics = detections.compute_metrics(PERFECT, TARGETS, detections.mode_class_ids(["pedestrian", "car"]))
    assert metrics["map"] == metrics["map_50"] == metrics["mar_100"] == 1.0
    assert metrics["per_class"]["person"] == {"coco_id": PERSON, "bdd_classes": ["pedestrian"],
                                              "ap_50": 1.0, "ap": 1.0, "ar_100": 1.0, "pr_50": [1.0] * 101}
    assert metrics["per_class"]["car"]["ap_50"] == 1.0
    # 40x80 and 100x60 boxes are both medium (COCO: 32² to 96² px); no small or large object
    assert metrics["mode"] == {"map_50": 1.0, "map": 1.0, "mar_100": 1.0, "recall_50": 1.0, "map_small": None,
                               "map_medium": 1.0, "map_large": None}


def test_recall_at_iou_half_counts_a_loose_box_that_mar_averages_down():
    loose = [pred([[10, 10, 50, 70]], [0.9], [PERSON])]  # IoU 0.75 with the 40x80 box
    metrics = detections.compute_metrics(loose, TARGETS[:1], detections.mode_class_ids(["pedestrian"]))
    assert metrics["mode"]["recall_50"] == 1.0
    assert metrics["mode"]["mar_100"] == pytest.approx(0.6)  # found at IoU 0.50 .. 0.75: 6 of 10 thresholds


def test_prediction_of_a_class_absent_from_the_frame_is_a_false_positive():
    # A confident "person" on the car-only frame outranks the true person: the first
    # detection in the ranking is a false positive, so person precision at full recall is
    # 1/2 and COCO's 101-point AP is exactly 0.5 at every IoU threshold.
    with_fp = [PERFECT[0], pred([[20, 20, 120, 80], [0, 0, 30, 30]], [0.8, 0.95], [CAR, PERSON])]
    metrics = detections.compute_metrics(with_fp, TARGETS, detections.mode_class_ids(["pedestrian", "car"]))
    assert metrics["per_class"]["person"]["ap_50"] == pytest.approx(0.5)
    assert metrics["per_class"]["person"]["ap"] == pytest.approx(0.5)
    assert metrics["per_class"]["person"]["ar_100"] == 1.0  # recall is untouched
    assert metrics["per_class"]["car"]["ap"] == 1.0
    assert metrics["map"] == pytest.approx(0.75)
    assert metrics["mode"]["map"] == metrics["mode"]["map_50"] == pytest.approx(0.75)  # the mode: both classes
    pedestrians = detections.compute_metrics(with_fp, TARGETS, detections.mode_class_ids(["pedestrian"]))
    # The headline of a pedestrian mode is its own class; the all-class figure flatters it.
    assert pedestrians["mode"]["map_50"] == pytest.approx(0.5) and pedestrians["map_50"] == pytest.approx(0.75)
    assert pedestrians["per_class"]["person"]["pr_50"][:51] == [0.5] * 51  # precision 1/2 up to recall 1


def test_rider_and_pedestrian_share_coco_person():
    assert detections.mode_class_ids(["rider", "bicycle", "pedestrian"]) == {
        PERSON: ["rider", "pedestrian"], bdd100k.COCO_IDS["bicycle"]: ["bicycle"]}
    with pytest.raises(ValueError, match="unknown BDD class"):
        detections.mode_class_ids(["unicycle"])


def test_class_without_ground_truth_has_no_ap():
    metrics = detections.compute_metrics(PERFECT, TARGETS, detections.mode_class_ids(["bus"]))
    assert metrics["per_class"]["bus"]["ap"] is None and metrics["per_class"]["bus"]["ap_50"] is None


def test_frames_without_objects_have_nothing_to_measure():
    empty = [pred([], [], [])]
    for predictions, targets in (([], []), (empty, [target([], [])])):
        metrics = detections.compute_metrics(predictions, targets, detections.mode_class_ids(["pedestrian"]))
        assert metrics["map_50"] is None and metrics["per_class"]["person"]["ap_50"] is None
        assert metrics["mode"]["map_50"] is None

