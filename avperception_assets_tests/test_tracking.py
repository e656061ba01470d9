"""BDD100K box_track metrics: the evaluator against golden figures from BDD100K's own toolkit
(written by scripts/tracking_reference.py), the protocol's rules one by one, the command line and
its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from avperception_assets.tracking.labels import MotFileError, read_videos
from avperception_assets.tracking.metrics import CLASSES, evaluate_paths

GOLDEN = Path(__file__).parent / "data" / "tracking_golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
TOP_LEVEL = ["MOTA", "MOTP", "IDF1", "FP", "FN", "IDSw", "MT", "PT", "ML", "FM", "mMOTA", "mMOTP", "mIDF1", "classes"]


def _inputs(case: str) -> tuple[Path, Path]:
    folder = GOLDEN / case
    return tuple(folder / f"{kind}.json" if (folder / f"{kind}.json").exists() else folder / kind
                 for kind in ("gt", "pred"))


def _assert_same_figures(ours: dict, expected: dict, where: str = "") -> None:
    assert list(ours) == list(expected), where
    for key, value in expected.items():
        here = f"{where}{key}"
        if isinstance(value, dict):
            _assert_same_figures(ours[key], value, f"{here}.")
        elif isinstance(value, float):
            assert ours[key] == pytest.approx(value, abs=1e-6), here
        else:  # counts exactly, as integers; undefined ratios as None
            assert ours[key] == value and type(ours[key]) is type(value), here


def test_every_constructed_case_and_the_synthetic_clip_have_golden_figures():
    assert set(CASES) == {"id_switch", "kept_match", "fragmentation", "ignore_regions", "crowd",
                          "unmatched_in_ignore", "two_videos_same_id", "class_without_objects", "synthetic_clip"}


@pytest.mark.parametrize("case", CASES)
def test_figures_match_bdd100k_toolkit(case):
    expected = json.loads((GOLDEN / case / "expected.json").read_text())
    assert expected["reference"]["bdd100k"] == "1.0.1" and expected["reference"]["motmetrics"] == "1.4.0"
    _assert_same_figures(evaluate_paths(*_inputs(case)), expected["figures"])


def _box(track_id, category, x1, y1, x2, y2, crowd=False, score=None) -> dict:
    label = {"id": track_id, "category": category, "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
             "attributes": {"occluded": False, "truncated": False, "crowd": crowd}}
    return label if score is None else {**label, "score": score}


def _write(path: Path, video: str, frames: list[list[dict]], start: int = 0) -> Path:
    path.write_text(json.dumps([{"name": f"{video}-{i}.jpg", "videoName": video, "frameIndex": i, "labels": labels}
                                for i, labels in enumerate(frames, start)]))
    return path


def test_a_track_id_names_a_track_only_within_its_video(tmp_path):
    # Object "1" in both videos, found by "7" in one and "8" in the other; prediction "9" in both
    # videos follows two different objects. Keyed by id alone, these would be switches and split ids.
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    for video, tracker in (("a", "7"), ("b", "8")):
        _write(gt / f"{video}.json", video, [[_box("1", "car", 0, 0, 99, 99), _box("2", "bus", 500, 0, 699, 199)]] * 3)
        _write(pred / f"{video}.json", video, [[_box(tracker, "car", 2, 0, 101, 99, score=0.8),
                                                _box("9", "bus", 500, 2, 699, 201, score=0.7)]] * 3)
    figures = evaluate_paths(gt, pred)
    assert (figures["IDSw"], figures["IDF1"], figures["MOTA"]) == (0, 100.0, 100.0)
    assert figures["classes"]["car"]["MT"] == 2  # one track per video


@pytest.mark.parametrize("region", [_box("5", "other person", 0, 0, 99, 99),
                                    _box("5", "car", 0, 0, 99, 99, crowd=True)])
def test_an_unmatched_prediction_mostly_inside_an_ignore_region_is_not_counted(tmp_path, region):
    gt = _write(tmp_path / "gt.json", "v", [[region, _box("1", "car", 300, 0, 399, 99)]])
    pred = _write(tmp_path / "pred.json", "v", [[
        _box("1", "car", 300, 0, 399, 99, score=0.9),      # the car: a match
        _box("2", "pedestrian", 40, 0, 139, 99, score=0.9),  # 60% inside: not counted, whatever its class
        _box("3", "car", 50, 0, 149, 99, score=0.9),         # exactly half inside: a false positive
    ]])
    figures = evaluate_paths(gt, pred)
    assert (figures["FP"], figures["FN"], figures["MOTA"]) == (1, 0, 0.0)
    assert figures["classes"]["pedestrian"]["FP"] == 0


def test_a_matched_prediction_inside_an_ignore_region_still_counts(tmp_path):
    gt = _write(tmp_path / "gt.json", "v", [[_box("9", "trailer", 0, 0, 399, 399),
                                             _box("1", "car", 100, 100, 199, 199)]])
    pred = _write(tmp_path / "pred.json", "v", [[_box("1", "car", 102, 100, 201, 199, score=0.4)]])
    figures = evaluate_paths(gt, pred)
    assert (figures["FP"], figures["FN"], figures["MOTA"]) == (0, 0, 100.0)


def test_an_object_keeps_its_earlier_tracker_over_a_better_fit(tmp_path):
    gt = _write(tmp_path / "gt.json", "v", [[_box("1", "car", 0, 0, 99, 99)]] * 2)
    pred = _write(tmp_path / "pred.json", "v", [
        [_box("7", "car", 0, 0, 99, 99, score=0.9)],
        [_box("7", "car", 30, 0, 129, 99, score=0.9), _box("8", "car", 0, 0, 99, 99, score=0.9)],
    ])
    figures = evaluate_paths(gt, pred)
    assert (figures["IDSw"], figures["FP"]) == (0, 1)
    assert figures["MOTP"] == pytest.approx(100 * (1 - (1 - 70 / 130) / 2))


def test_a_class_without_objects_counts_as_zero_in_the_means_and_the_overall_figures_pool_all(tmp_path):
    gt = _write(tmp_path / "gt.json", "v", [[_box("1", "car", 0, 0, 99, 99)]] * 2)
    pred = _write(tmp_path / "pred.json", "v", [[_box("1", "car", 0, 0, 99, 99, score=0.9),
                                                 _box("2", "bus", 300, 0, 499, 199, score=0.2)]] * 2)
    figures = evaluate_paths(gt, pred)
    assert figures["classes"]["car"]["MOTA"] == 100.0
    assert figures["classes"]["bus"]["MOTA"] is None and figures["classes"]["bus"]["IDF1"] == 0.0
    assert figures["mMOTA"] == pytest.approx(100.0 / len(CLASSES))
    assert figures["MOTA"] == 0.0  # 2 objects, 2 false positives
    assert figures["classes"]["vehicle"]["FP"] == 2


def test_a_video_or_frame_without_predictions_is_all_misses(tmp_path):
    gt = _write(tmp_path / "gt.json", "v", [[_box("1", "pedestrian", 0, 0, 39, 99)]] * 4)
    pred = _write(tmp_path / "pred.json", "v", [[_box("1", "pedestrian", 0, 0, 39, 99, score=0.9)]] * 2)
    assert evaluate_paths(gt, pred)["FN"] == 2
    other = _write(tmp_path / "other.json", "w", [[_box("1", "pedestrian", 0, 0, 39, 99, score=0.9)]])
    with pytest.raises(MotFileError, match="videos not in the ground truth: w"):
        evaluate_paths(gt, other)
    assert evaluate_paths(gt, _write(tmp_path / "empty.json", "v", []))["FN"] == 4


def test_the_command_prints_the_figures_as_json(tmp_path):
    gt, pred = _inputs("synthetic_clip")
    result = subprocess.run([sys.executable, "-m", "avperception_assets.tracking", "evaluate", "--gt", str(gt),
                             "--pred", str(pred)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert list(printed) == TOP_LEVEL
    assert list(printed["classes"]) == [*CLASSES, "human", "vehicle", "bike"]
    _assert_same_figures(printed, json.loads((GOLDEN / "synthetic_clip" / "expected.json").read_text())["figures"])


def test_the_command_names_the_file_and_frame_of_an_unknown_category(tmp_path):
    gt = _write(tmp_path / "gt.json", "v", [[_box("1", "car", 0, 0, 9, 9)], [_box("2", "traffic light", 0, 0, 9, 9)]])
    result = subprocess.run([sys.executable, "-m", "avperception_assets.tracking", "evaluate", "--gt", str(gt),
                             "--pred", str(gt)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert f"{gt}: frame 'v-1.jpg', label '2': category 'traffic light'" in result.stderr


@pytest.mark.parametrize("frame, message", [
    ({"name": "a.jpg", "videoName": "v", "labels": []}, "frame 'a.jpg': 'frameIndex' is not an integer"),
    ({"name": "a.jpg", "frameIndex": 0, "labels": []}, "frame 'a.jpg': no 'videoName'"),
    ({"name": "a.jpg", "videoName": "v", "frameIndex": 0, "labels": [{"category": "car"}]},
     "a label has no string 'id'"),
    ({"name": "a.jpg", "videoName": "v", "frameIndex": 0, "labels": [{"id": "1", "category": "car"}]},
     "frame 'a.jpg', label '1': no 'box2d'"),
    ({"name": "a.jpg", "videoName": "v", "frameIndex": 0,
      "labels": [{"id": "1", "category": "car", "box2d": {"x1": 5, "y1": 0, "x2": 1, "y2": 3}}]}, "x2 < x1"),
    ({"name": "a.jpg", "videoName": "v", "frameIndex": 0,
      "labels": [_box("1", "car", 0, 0, 1, 1), _box("1", "car", 5, 5, 9, 9)]}, "a track id appears twice"),
])
def test_a_malformed_file_is_named_with_its_frame(tmp_path, frame, message):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps([frame]))
    with pytest.raises(MotFileError, match=f"^{path}: .*") as error:
        read_videos(path)
    assert message in str(error.value)


def test_a_frame_index_twice_in_a_video_is_an_error_even_across_files(tmp_path):
    _write(tmp_path / "a.json", "v", [[]])
    _write(tmp_path / "b.json", "v", [[]])
    with pytest.raises(MotFileError, match="frameIndex 0 of video 'v' also in frame"):
        read_videos(tmp_path)
    with pytest.raises(MotFileError, match="p.json: frame 'v-3.jpg': video 'v' has no frameIndex 3"):
        evaluate_paths(_write(tmp_path / "gt.json", "v", [[]]), _write(tmp_path / "p.json", "v", [[]], start=3))
