"""Bootstrap intervals from stored frame matches: COCOeval's figures, paired deltas and verdicts."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from avperception_assets.evaluation import bootstrap, comparison as evaluation, frame_errors, reports
from avperception_assets.evaluation.comparison import BASELINE, FINETUNED
from avperception_assets.formats import coco
from avperception_assets.model.detections import coco_category_names, mode_class_ids
from avperception_assets.storage import tables as storage

from .test_detections import CAR, PERSON, pred
from .test_reports import Replay, _jittered, _random_targets

CLASSES = ["rider", "car"]
CLASS_IDS = list(mode_class_ids(CLASSES))
NAMES = coco_category_names()


def _with_crowds(targets, seed):
    """A fifth of the boxes marked as crowd regions, as COCO data sets mark them."""
    rng = np.random.default_rng(seed)
    return [{**t, "iscrowd": torch.tensor((rng.random(len(t["labels"])) < 0.2).astype(np.int64))} for t in targets]


def _with_inverted_box(predictions):
    """A detection of negative width in the first frame: COCOeval ignores it unless it matches."""
    first = predictions[0]
    inverted = pred([[200, 20, 150, 80]], [0.97], [PERSON])
    return [{key: torch.cat([first[key], inverted[key]]) for key in first}, *predictions[1:]]


def _evaluate(targets, predictions_by_model):
    models = {name: Replay(predictions) for name, predictions in predictions_by_model.items()}
    image = torch.zeros(3, 300, 320, dtype=torch.uint8)
    batches = [([image] * 8, targets[i:i + 8], [f"frame-{k}.jpg" for k in range(i, min(i + 8, len(targets)))])
               for i in range(0, len(targets), 8)]
    return evaluation.evaluate(models, batches, classes=CLASSES, panel_count=0, worst_count=0)


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """A 40-frame evaluation with crowd regions, its report, and its matches as stored in LanceDB."""
    targets = _with_crowds(_random_targets(40, seed=1), seed=5)
    result = _evaluate(targets, {BASELINE: _with_inverted_box(_jittered(targets, seed=2)),
                                 FINETUNED: _jittered(targets, seed=3)})
    root = tmp_path_factory.mktemp("crowded")
    conn = storage.connect(str(root / "db"))
    version = frame_errors.write_table(conn, "rider", evaluation.frame_rows(result), {})
    stored = frame_errors.read_table(conn, "rider", version)
    report = reports.write_report(root / "report", result, mode="rider", val_view={}, baseline={}, finetuned={},
                                  frames=stored)
    return result, stored, report


def _quiet(call, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return call(*args)


def _cocoeval(ground_truth: dict, detections: list[dict], class_ids):
    """COCOeval over the mode's classes: (AP@[.5:.95], AP@0.5, recall at IoU 0.5) and the evaluator."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = ground_truth
    _quiet(gt.createIndex)
    coco_eval = COCOeval(gt, _quiet(gt.loadRes, detections), "bbox")
    coco_eval.params.catIds = list(class_ids)
    _quiet(coco_eval.evaluate)
    _quiet(coco_eval.accumulate)
    _quiet(coco_eval.summarize)
    recall = coco_eval.eval["recall"][0, :, 0, -1]
    return (coco_eval.stats[0], coco_eval.stats[1], recall[recall > -1].mean()), coco_eval


def test_point_estimates_equal_pycocotools_on_the_report_files(crowded):
    result, stored, report = crowded
    out = report.out_dir
    ground_truth = json.loads((out / reports.GROUND_TRUTH_FILE).read_text())
    assert sum(a["iscrowd"] for a in ground_truth["annotations"]) > 5  # crowd regions are in play
    matches = bootstrap.matches_from_rows(stored, CLASS_IDS)
    everywhere = np.ones((1, 40), dtype=np.int64)
    for model, filename in reports.PREDICTIONS_FILES.items():
        (ap, ap_50, recall_50), _ = _cocoeval(ground_truth, json.loads((out / filename).read_text()), CLASS_IDS)
        assert 0.1 < ap_50 < 0.9  # a non-trivial case
        figures = bootstrap.score(matches[model], everywhere)
        assert (figures["map"][0], figures["map_50"][0], figures["recall_50"][0]) == pytest.approx(
            (ap, ap_50, recall_50), abs=1e-12)
        interval = report.data["intervals"][model]
        assert (interval["map"]["point"], interval["map_50"]["point"], interval["recall_50"]["point"]) == \
            pytest.approx((ap, ap_50, recall_50), abs=1e-12)
        assert interval["map_50"]["objects"] == sum(
            1 for a in ground_truth["annotations"] if not a["iscrowd"] and a["category_id"] in CLASS_IDS)


def test_stored_matches_are_cocoevals_at_every_threshold(crowded):
    """Per frame, class and detection: matched and ignored as COCOeval.evaluateImg has them at each
    of its ten IoU thresholds, the negative-area detection and crowd matches included."""
    result, stored, report = crowded
    out = report.out_dir
    ground_truth = json.loads((out / reports.GROUND_TRUTH_FILE).read_text())
    rows = {(r["model"], r["frame_index"]): r for r in stored.to_pylist()}
    ignored_seen = 0
    for model, filename in reports.PREDICTIONS_FILES.items():
        _, coco_eval = _cocoeval(ground_truth, json.loads((out / filename).read_text()), CLASS_IDS)
        assert list(coco_eval.params.iouThrs) == list(frame_errors.IOU_THRESHOLDS)
        for record in coco_eval.evalImgs:
            if record is None or record["aRng"] != [0, 1e10] or record["maxDet"] != 100:
                continue
            boxes = [b for b in rows[(model, record["image_id"])]["boxes"]
                     if b["source"] == frame_errors.PREDICTION and b["coco_id"] == record["category_id"]]
            flags = {key: np.array([b[key] for b in boxes], dtype=bool).reshape(-1, 10).T for key in ("matched", "ignored")}
            assert (flags["matched"] == (record["dtMatches"] > 0)).all()
            assert (flags["ignored"] == record["dtIgnore"].astype(bool)).all()
            assert flags["matched"].shape == record["dtMatches"].shape
            ignored_seen += int(record["dtIgnore"].any())
    assert ignored_seen >= 3


def _frame_rows(targets, predictions_by_model):
    """`<mode>_eval_frames` rows straight from the matching, without a detector or metric pass."""
    errors = {model: [frame_errors.match_frame(p, t, NAMES) for p, t in zip(predictions, targets)]
              for model, predictions in predictions_by_model.items()}
    return frame_errors.frame_rows(errors, [f"frame-{i}" for i in range(len(targets))], CLASS_IDS, NAMES)


def _exact(targets, score=0.9):
    return [pred(t["boxes"].tolist(), [score] * len(t["labels"]), t["labels"].tolist()) for t in targets]


def _intervals(targets, predictions_by_model):
    matches = bootstrap.matches_from_rows(_frame_rows(targets, predictions_by_model), CLASS_IDS)
    return bootstrap.intervals(matches, {"delta": (BASELINE, FINETUNED)})


def test_a_better_model_by_construction_is_better_and_reversed_worse():
    targets = _random_targets(40, seed=11)
    poor, exact = _jittered(targets, seed=12), _exact(targets)
    better = _intervals(targets, {BASELINE: poor, FINETUNED: exact})
    delta = better["delta"]["map_50"]
    assert better[FINETUNED]["map_50"]["point"] == 1.0 and delta["low"] > 0
    assert delta["point"] == pytest.approx(100 * (1.0 - better[BASELINE]["map_50"]["point"]))
    assert bootstrap.verdict(delta) == bootstrap.BETTER
    worse = _intervals(targets, {BASELINE: exact, FINETUNED: poor})["delta"]["map_50"]
    assert worse["high"] < 0 and bootstrap.verdict(worse) == bootstrap.WORSE
    assert (worse["point"], worse["low"], worse["high"]) == pytest.approx((-delta["point"], -delta["high"], -delta["low"]))


def test_identical_models_show_no_detectable_difference():
    targets = _random_targets(40, seed=21)
    same = _jittered(targets, seed=22)
    found = _intervals(targets, {BASELINE: same, FINETUNED: same})
    for key in bootstrap.METRICS:
        own = found[FINETUNED][key]
        assert own["low"] < own["point"] < own["high"]  # the models' own figures do vary over resamples
        delta = found["delta"][key]
        assert delta["low"] <= 0 <= delta["high"]
    assert bootstrap.verdict(found["delta"]["map_50"]) == bootstrap.NO_DIFFERENCE


def test_the_interval_narrows_as_frames_are_added():
    targets = _random_targets(480, seed=31)
    models = {BASELINE: _jittered(targets, seed=32), FINETUNED: _jittered(targets, seed=33)}
    widths = []
    for count in (30, 120, 480):
        found = _intervals(targets[:count], {m: p[:count] for m, p in models.items()})
        widths.append([found[name][key]["high"] - found[name][key]["low"]
                       for name in (BASELINE, FINETUNED, "delta") for key in bootstrap.METRICS])
        assert found["delta"]["map_50"]["frames"] == count
    assert (np.array(widths[1]) < np.array(widths[0])).all() and (np.array(widths[2]) < np.array(widths[1])).all()


def _matches(targets, predictions) -> bootstrap.Matches:
    return bootstrap.matches_from_rows(_frame_rows(targets, {FINETUNED: predictions}), CLASS_IDS)[FINETUNED]


def _seeds(targets, first_seed, count=3):
    """A group of models as several training seeds would give: jittered each its own way."""
    return [_matches(targets, _jittered(targets, seed=first_seed + k)) for k in range(count)]


def test_a_group_better_by_construction_is_better_on_the_mean_over_seeds():
    targets = _random_targets(40, seed=101)
    poor, exact = _seeds(targets, 102), [_matches(targets, _exact(targets, score)) for score in (0.9, 0.8, 0.7)]
    found = bootstrap.group_intervals({"plain": poor, "mined": exact}, {"delta": ("plain", "mined")})
    members = [bootstrap.intervals({"m": m}, {})["m"]["map_50"]["point"] for m in poor]
    assert found["plain"]["map_50"]["point"] == pytest.approx(np.mean(members))
    assert found["mined"]["map_50"]["point"] == 1.0
    delta = found["delta"]["map_50"]
    assert delta["point"] == pytest.approx(100 * (1.0 - np.mean(members))) and delta["low"] > 0
    assert bootstrap.verdict(delta) == bootstrap.BETTER


def test_identical_groups_get_an_interval_containing_0_and_a_group_of_one_is_a_model():
    targets = _random_targets(40, seed=111)
    same = _seeds(targets, 112)
    found = bootstrap.group_intervals({"a": same, "b": list(reversed(same))}, {"delta": ("a", "b")})
    for key in bootstrap.METRICS:
        assert found["delta"][key]["low"] <= 0 <= found["delta"][key]["high"]
        assert found["a"][key]["low"] < found["a"][key]["point"] < found["a"][key]["high"]
    assert bootstrap.verdict(found["delta"]["map_50"]) == bootstrap.NO_DIFFERENCE
    alone = bootstrap.group_intervals({"a": same[:1], "b": same[1:2]}, {"delta": ("a", "b")})
    assert alone == bootstrap.intervals({"a": same[0], "b": same[1]}, {"delta": ("a", "b")})


def test_groups_must_cover_the_same_frames():
    targets = _random_targets(40, seed=121)
    with pytest.raises(ValueError, match="different frames"):
        bootstrap.group_intervals({"a": _seeds(targets, 122), "b": _seeds(targets[:30], 123)}, {})


def test_disjoint_frame_sets_that_differ_by_construction_differ_beyond_the_interval():
    off_targets, on_targets = _random_targets(50, seed=61), _random_targets(40, seed=62)
    sets = {"off": _matches(off_targets, _exact(off_targets)), "on": _matches(on_targets, _jittered(on_targets, seed=63))}
    found = bootstrap.independent_intervals(sets, {"off_minus_on": ("on", "off")})
    difference = found["off_minus_on"]["map_50"]
    assert found["off"]["map_50"]["point"] == 1.0 and found["on"]["map_50"]["point"] < 0.9
    assert difference["point"] == pytest.approx(100 * (1.0 - found["on"]["map_50"]["point"]))
    assert difference["low"] > 0 and bootstrap.verdict(difference) == bootstrap.BETTER
    assert difference["frames"] == {"on": 40, "off": 50} and found["on"]["map_50"]["frames"] == 40


def test_disjoint_frame_sets_of_one_distribution_get_an_interval_containing_0():
    targets = _random_targets(100, seed=71)
    predictions = _jittered(targets, seed=72)
    sets = {"a": _matches(targets[:50], predictions[:50]), "b": _matches(targets[50:], predictions[50:])}
    found = bootstrap.independent_intervals(sets, {"b_minus_a": ("a", "b")})
    for key in bootstrap.METRICS:
        difference = found["b_minus_a"][key]
        assert difference["low"] < 0 < difference["high"]
    assert bootstrap.verdict(found["b_minus_a"]["map_50"]) == bootstrap.NO_DIFFERENCE


def test_disjoint_sets_are_resampled_independently_not_paired():
    """The same frames as two sets: paired resamples would cancel to [0, 0]; independent ones
    spread around 0, and each set keeps the interval it gets alone."""
    targets = _random_targets(40, seed=81)
    same = _matches(targets, _jittered(targets, seed=82))
    found = bootstrap.independent_intervals({"a": same, "b": same}, {"b_minus_a": ("a", "b")})
    paired = bootstrap.intervals({"a": same, "b": same}, {"b_minus_a": ("a", "b")})
    for key in bootstrap.METRICS:
        assert paired["b_minus_a"][key]["low"] == paired["b_minus_a"][key]["high"] == 0.0
        assert found["b_minus_a"][key]["point"] == 0.0
        assert found["b_minus_a"][key]["low"] < 0 < found["b_minus_a"][key]["high"]
    assert found["a"] != found["b"]  # two streams
    alone = bootstrap.independent_intervals({"a": same}, {})
    assert alone["a"] == found["a"]


def test_the_rows_of_some_frames_are_their_own_evaluations_rows():
    targets = _random_targets(30, seed=91)
    models = {BASELINE: _jittered(targets, seed=92), FINETUNED: _jittered(targets, seed=93)}
    rows = _frame_rows(targets, models)
    picked = [i for i in range(30) if i % 3]
    subset = bootstrap.rows_of_frames(rows, [f"frame-{i}" for i in picked])
    direct = _frame_rows([targets[i] for i in picked], {m: [p[i] for i in picked] for m, p in models.items()})
    assert subset.num_rows == 2 * len(picked)
    everywhere = np.ones((1, len(picked)), dtype=np.int64)
    found, expected = (bootstrap.matches_from_rows(r, CLASS_IDS) for r in (subset, direct))
    for model in models:
        assert (found[model].gt == expected[model].gt).all()
        assert bootstrap.score(found[model], everywhere) == bootstrap.score(expected[model], everywhere)


def test_a_resample_scores_as_cocoeval_scores_the_frames_it_draws():
    """Weights stand for copies: a resample's figures are COCOeval's on a data set holding each
    frame as often as the resample draws it."""
    targets = _with_crowds(_random_targets(30, seed=41), seed=42)
    predictions = _jittered(targets, seed=43)
    matches = bootstrap.matches_from_rows(_frame_rows(targets, {FINETUNED: predictions}), CLASS_IDS)[FINETUNED]
    weights = bootstrap.resample_weights(30, resamples=3, seed=44)
    figures = bootstrap.score(matches, weights)
    for row, drawn in enumerate(weights):
        assert drawn.max() > 1 and (drawn == 0).any()
        dataset, detections = coco.Dataset({}, {c: NAMES[c] for c in (PERSON, CAR, 2)}, first_image_id=0), []
        for frame, copies in enumerate(drawn):
            for _ in range(copies):
                t, p = targets[frame], predictions[frame]
                image_id = dataset.add_image(f"frame-{frame}", 320, 300, t["labels"].tolist(), t["boxes"].numpy(),
                                             t["iscrowd"].tolist())
                detections += coco.detections(image_id, p["labels"].tolist(), p["boxes"].numpy(), p["scores"].tolist())
        expected, _ = _cocoeval(dataset.as_json(), detections, CLASS_IDS)
        assert (figures["map"][row], figures["map_50"][row], figures["recall_50"][row]) == pytest.approx(
            expected, abs=1e-12)


def test_resamples_are_seeded():
    first, again = bootstrap.resample_weights(50, 1000, seed=7), bootstrap.resample_weights(50, 1000, seed=7)
    assert first.shape == (1000, 50) and (first.sum(axis=1) == 50).all()
    assert (first == again).all() and not (first == bootstrap.resample_weights(50, 1000, seed=8)).all()


def test_tiled_matches_are_stored_and_get_intervals(tmp_path):
    targets = _random_targets(16, seed=51)
    untiled = _evaluate(targets, {BASELINE: _jittered(targets, seed=52), FINETUNED: _jittered(targets, seed=53)})
    tiled = _evaluate(targets, {BASELINE: _jittered(targets, seed=54), FINETUNED: _exact(targets)})
    conn = storage.connect(str(tmp_path / "db"))
    version = frame_errors.write_table(conn, "distant_person", evaluation.frame_rows(untiled, tiled), {})
    stored = frame_errors.read_table(conn, "distant_person", version)
    assert stored.num_rows == 4 * 16
    assert sorted(set(stored["model"].to_pylist())) == [BASELINE, "baseline_tiled", FINETUNED, "finetuned_tiled"]
    intervals = reports.report_intervals(stored, CLASS_IDS)
    assert list(intervals) == [BASELINE, FINETUNED, "baseline_tiled", "finetuned_tiled", reports.DELTA]
    assert intervals["finetuned_tiled"]["map_50"]["point"] == 1.0
    assert intervals[FINETUNED]["map_50"]["point"] == pytest.approx(untiled.metrics[FINETUNED]["mode"]["map_50"],
                                                                    abs=1e-6)
    report = reports.write_report(tmp_path / "report", untiled, mode="distant_person", val_view={}, baseline={},
                                  finetuned={}, tiled=tiled, tiling={"tile_size": 448, "overlap": 0.2,
                                                                     "whole_frame": True}, frames=stored)
    assert report.data["intervals"] == intervals
    assert "| fine-tuned tiled | 1.000 [1.000, 1.000] |" in report.markdown


def test_verdict_reads_the_paired_interval():
    assert bootstrap.verdict({"low": 0.1, "high": 5.0}) == bootstrap.BETTER
    assert bootstrap.verdict({"low": -5.0, "high": -0.1}) == bootstrap.WORSE
    assert bootstrap.verdict({"low": -0.1, "high": 5.0}) == bootstrap.NO_DIFFERENCE
    assert bootstrap.verdict({"low": 0.0, "high": 5.0}) == bootstrap.NO_DIFFERENCE
    assert bootstrap.verdict({"low": None, "high": None}) == bootstrap.NO_DIFFERENCE
