"""The plain evaluation stage: COCO metrics, exported COCO JSON, panels and report files."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from avperception_assets import bdd100k, detector, evaluation, ingest, storage, synthetic
from avperception_assets.evaluation import BASELINE, FINETUNED

PERSON, CAR = bdd100k.COCO_IDS["pedestrian"], bdd100k.COCO_IDS["car"]


def box(*xyxy):
    return torch.tensor([xyxy], dtype=torch.float32)


def target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def pred(boxes, scores, labels):
    return {**target(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


# Frame 0 has a pedestrian, frame 1 only a car.
TARGETS = [target([[10, 10, 50, 90]], [PERSON]), target([[20, 20, 120, 80]], [CAR])]
PERFECT = [pred([[10, 10, 50, 90]], [0.9], [PERSON]), pred([[20, 20, 120, 80]], [0.8], [CAR])]


def test_perfect_predictions_score_one():
    metrics = evaluation.compute_metrics(PERFECT, TARGETS, evaluation.mode_class_ids(["pedestrian", "car"]))
    assert metrics["map"] == metrics["map_50"] == metrics["mar_100"] == 1.0
    assert metrics["per_class"]["person"] == {"coco_id": PERSON, "bdd_classes": ["pedestrian"],
                                              "ap_50": 1.0, "ap": 1.0, "ar_100": 1.0}
    assert metrics["per_class"]["car"]["ap_50"] == 1.0


def test_prediction_of_a_class_absent_from_the_frame_is_a_false_positive():
    # A confident "person" on the car-only frame outranks the true person: the first
    # detection in the ranking is a false positive, so person precision at full recall is
    # 1/2 and COCO's 101-point AP is exactly 0.5 at every IoU threshold.
    with_fp = [PERFECT[0], pred([[20, 20, 120, 80], [0, 0, 30, 30]], [0.8, 0.95], [CAR, PERSON])]
    metrics = evaluation.compute_metrics(with_fp, TARGETS, evaluation.mode_class_ids(["pedestrian", "car"]))
    assert metrics["per_class"]["person"]["ap_50"] == pytest.approx(0.5)
    assert metrics["per_class"]["person"]["ap"] == pytest.approx(0.5)
    assert metrics["per_class"]["person"]["ar_100"] == 1.0  # recall is untouched
    assert metrics["per_class"]["car"]["ap"] == 1.0
    assert metrics["map"] == pytest.approx(0.75)


def test_rider_and_pedestrian_share_coco_person():
    assert evaluation.mode_class_ids(["rider", "bicycle", "pedestrian"]) == {
        PERSON: ["rider", "pedestrian"], bdd100k.COCO_IDS["bicycle"]: ["bicycle"]}
    with pytest.raises(ValueError, match="unknown BDD class"):
        evaluation.mode_class_ids(["unicycle"])


def test_class_without_ground_truth_has_no_ap():
    metrics = evaluation.compute_metrics(PERFECT, TARGETS, evaluation.mode_class_ids(["bus"]))
    assert metrics["per_class"]["bus"]["ap"] is None and metrics["per_class"]["bus"]["ap_50"] is None


def test_frames_without_objects_have_nothing_to_measure():
    empty = [pred([], [], [])]
    for predictions, targets in (([], []), (empty, [target([], [])])):
        metrics = evaluation.compute_metrics(predictions, targets, evaluation.mode_class_ids(["pedestrian"]))
        assert metrics["map_50"] is None and metrics["per_class"]["person"]["ap_50"] is None


def test_delta_pct():
    assert evaluation.delta_pct(0.2, 0.3) == pytest.approx(50.0)
    assert evaluation.delta_pct(0.4, 0.3) == pytest.approx(-25.0)
    assert evaluation.delta_pct(0.0, 0.3) is None
    assert evaluation.delta_pct(None, 0.3) is None


def _jittered(targets, seed):
    """Deterministic imperfect detections: shifted true boxes, misses, and spurious boxes."""
    rng = np.random.default_rng(seed)
    preds = []
    for t in targets:
        boxes, scores, labels = [], [], []
        for b, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            if rng.random() < 0.2:
                continue  # a miss
            shift = rng.normal(0, 6, 4)
            boxes.append([b[0] + shift[0], b[1] + shift[1], b[2] + shift[2], b[3] + shift[3]])
            scores.append(float(rng.uniform(0.3, 1.0)))
            labels.append(label if rng.random() < 0.85 else CAR)
        for _ in range(int(rng.integers(0, 3))):  # spurious boxes, of classes the frame may lack
            x, y = rng.uniform(0, 250, 2)
            boxes.append([x, y, x + rng.uniform(8, 60), y + rng.uniform(8, 60)])
            scores.append(float(rng.uniform(0.05, 0.9)))
            labels.append(int(rng.choice([PERSON, CAR, bdd100k.COCO_IDS["bicycle"]])))
        preds.append(pred(boxes, scores, labels))
    return preds


def _random_targets(n, seed):
    rng = np.random.default_rng(seed)
    targets = []
    for _ in range(n):
        k = int(rng.integers(0, 5))
        xy = rng.uniform(0, 250, (k, 2))
        wh = rng.uniform(10, 90, (k, 2))
        targets.append(target(np.hstack([xy, xy + wh]).tolist(), rng.choice([PERSON, CAR], k).tolist()))
    return targets


@pytest.fixture(scope="module")
def hand_built_evaluation():
    targets = _random_targets(24, seed=1)
    predictions = {BASELINE: _jittered(targets, seed=2), FINETUNED: _jittered(targets, seed=3)}
    class_ids = evaluation.mode_class_ids(["rider", "car"])
    metrics = {name: evaluation.compute_metrics(p, targets, class_ids) for name, p in predictions.items()}
    image = torch.zeros(3, 300, 320, dtype=torch.uint8)
    frames = [evaluation.PanelFrame(i, f"frame-{i}.jpg", image) for i in range(2)]
    return evaluation.Evaluation(["rider", "car"], [f"frame-{i}.jpg" for i in range(24)], [(300, 320)] * 24, targets,
                                 predictions, metrics, frames)


@pytest.fixture(scope="module")
def written_report(hand_built_evaluation, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "rider" / "7"
    report = evaluation.write_report(
        out, hand_built_evaluation, mode="rider",
        val_view={"name": "bdd100k_rider_val", "version": 7},
        baseline={"source": "base_detector", "checkpoint": "/ckpt/base/best.pt"},
        finetuned={"checkpoint": "/ckpt/rider/5/best.pt", "metadata": {"view": "bdd100k_rider_train", "version": 5}},
        score_threshold=0.3)
    return report


def test_report_map_equals_pycocotools_on_the_exported_files(written_report, hand_built_evaluation):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = written_report.out_dir
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / evaluation.GROUND_TRUTH_FILE))
    for name, filename in evaluation.PREDICTIONS_FILES.items():
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = COCOeval(gt, gt.loadRes(str(out / filename)), "bbox")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
            per_class = {}
            for coco_id in (PERSON, CAR):  # car sits after bicycle (predicted only) in the class order
                per_class[coco_id] = COCOeval(gt, gt.loadRes(str(out / filename)), "bbox")
                per_class[coco_id].params.catIds = [coco_id]
                per_class[coco_id].evaluate()
                per_class[coco_id].accumulate()
                per_class[coco_id].summarize()
        reported = written_report.data["metrics"][name]
        assert 0.05 < reported["map_50"] < 0.95  # a non-trivial case
        assert reported["map"] == pytest.approx(coco_eval.stats[0], abs=1e-6)
        assert reported["map_50"] == pytest.approx(coco_eval.stats[1], abs=1e-6)
        assert reported["mar_100"] == pytest.approx(coco_eval.stats[8], abs=1e-6)
        for coco_id, name in ((PERSON, "person"), (CAR, "car")):
            assert reported["per_class"][name]["ap"] == pytest.approx(per_class[coco_id].stats[0], abs=1e-6)
            assert reported["per_class"][name]["ap_50"] == pytest.approx(per_class[coco_id].stats[1], abs=1e-6)
        assert reported["per_class"]["person"]["ap_50"] != reported["per_class"]["car"]["ap_50"]
    assert len(gt.getImgIds()) == 24
    assert gt.loadImgs(3)[0]["file_name"] == "frame-3.jpg"


def test_report_files_carry_figures_and_versions(written_report):
    out = written_report.out_dir
    data = json.loads((out / evaluation.REPORT_JSON).read_text())
    assert data["val_view"] == {"name": "bdd100k_rider_val", "version": 7}
    assert data["models"][FINETUNED]["checkpoint"] == "/ckpt/rider/5/best.pt"
    assert data["models"][FINETUNED]["metadata"] == {"view": "bdd100k_rider_train", "version": 5}
    assert data["models"][BASELINE]["source"] == "base_detector"
    assert data["num_images"] == 24
    metrics = [row["metric"] for row in data["rows"]]
    assert metrics == ["mAP@0.5", "mAP@[.5:.95]", "recall (mAR@100)",
                       "AP@0.5 person (rider)", "AP@[.5:.95] person (rider)",
                       "AP@0.5 car (car)", "AP@[.5:.95] car (car)"]
    first = data["rows"][0]
    assert first["baseline"] == data["metrics"][BASELINE]["map_50"]
    assert first["delta_pct"] == pytest.approx((first["finetuned"] - first["baseline"]) / first["baseline"] * 100)
    markdown = (out / evaluation.REPORT_MD).read_text()
    assert "bdd100k_rider_val" in markdown and f"{first['baseline']:.3f}" in markdown
    assert markdown == written_report.markdown


def test_panels_are_png_files(written_report):
    assert len(written_report.panels) == 2
    for path in written_report.panels:
        assert path.stat().st_size > 1000
        with Image.open(path) as png:
            assert png.format == "PNG"
            assert png.size == (3 * 400, 375 + 18)  # three 400-px tiles of a 320x300 frame + caption
    markdown = evaluation.panels_markdown(written_report.panels)
    assert markdown.count("data:image/png;base64,") == 2


def test_panel_draws_each_model_in_its_colour():
    frame = evaluation.PanelFrame(0, "f.jpg", torch.zeros(3, 100, 200, dtype=torch.uint8))
    preds = {BASELINE: pred([[10, 10, 60, 60]], [0.9], [PERSON]),
             FINETUNED: pred([[100, 20, 150, 80]], [0.2], [PERSON])}  # below the threshold: not drawn
    panel = np.asarray(evaluation.draw_panel(frame, TARGETS[0], preds, score_threshold=0.5, tile_width=200))
    tiles = [panel[18:, i * 200:(i + 1) * 200] for i in range(3)]
    green, red, blue = (0, 128, 0), (255, 0, 0), (0, 0, 255)
    assert (tiles[0] == green).all(-1).any() and (tiles[1] == red).all(-1).any()
    assert not (tiles[2] == blue).all(-1).any()


def test_rewriting_a_report_replaces_its_files(written_report, hand_built_evaluation):
    fewer = evaluation.Evaluation(**{**hand_built_evaluation.__dict__,
                                     "panel_frames": hand_built_evaluation.panel_frames[:1]})
    report = evaluation.write_report(written_report.out_dir, fewer, mode="rider",
                                     val_view={"name": "bdd100k_rider_val", "version": 7},
                                     baseline={}, finetuned={})
    assert sorted(p.name for p in (report.out_dir / evaluation.PANELS_DIR).iterdir()) == [report.panels[0].name]


def test_summary_over_modes(written_report, tmp_path):
    reports = {"rider": written_report.data, "nighttime_person": written_report.data}
    md_path, json_path, markdown = evaluation.write_summary(tmp_path, reports)
    lines = markdown.splitlines()
    assert lines[0] == "| failure mode | metric | baseline | fine-tuned | Δ% |"
    assert len(lines) == 2 + 2 * len(written_report.rows)
    assert lines[2].startswith("| rider | mAP@0.5 |")
    assert markdown in md_path.read_text()
    summary = json.loads(json_path.read_text())
    assert summary["modes"]["rider"]["val_view"]["version"] == 7
    assert len(summary["rows"]) == 2 * len(written_report.rows)


# --- real detectors over a real (tiny, synthetic) Lance table through the real loader -------

@pytest.fixture(scope="module")
def frames_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    synthetic.write_batch(root / "landing", "b1", 6, seed=0, width=320, height=180)
    conn = storage.connect(str(root / "lancedb"))
    ingest.ingest_batches(conn, root / "landing")
    return str(root / "lancedb")


def _tiny_model(seed, score_thresh):
    torch.manual_seed(seed)
    profile = detector.get_profile("cpu", min_size=160, max_size=320)
    profile = profile.replace(model_kwargs={**profile.model_kwargs, "box_score_thresh": score_thresh,
                                            "box_detections_per_img": 10})
    return detector.build_detector(profile, detector.WEIGHTS_NONE)


@pytest.fixture(scope="module")
def tiny_models():
    # A random head scores every class near 1/91: nothing passes 0.05, everything passes 0.
    return {BASELINE: _tiny_model(0, 0.05), FINETUNED: _tiny_model(1, 0.0)}


def test_evaluate_runs_both_models_in_one_pass(frames_uri, tiny_models, tmp_path):
    version = storage.connect(frames_uri).open_table(storage.FRAMES_TABLE).version
    batches = evaluation.view_batches(frames_uri, storage.FRAMES_TABLE, version, batch_size=4)
    result = evaluation.evaluate(tiny_models, batches, classes=["rider"], panel_count=2)
    assert len(result.image_ids) == len(result.targets) == 6
    assert all(len(result.predictions[name]) == 6 for name in tiny_models)
    assert result.sizes[0] == (180, 320)
    assert sum(len(p["labels"]) for p in result.predictions[BASELINE]) == 0
    assert all(len(p["labels"]) == 10 for p in result.predictions[FINETUNED])
    assert result.metrics[BASELINE]["map_50"] == 0.0
    rider_frames = [i for i, t in enumerate(result.targets) if PERSON in t["labels"].tolist()]
    others = [i for i in range(6) if i not in rider_frames]
    assert [f.index for f in result.panel_frames] == (rider_frames + others)[:2]
    assert result.panel_frames[0].image.dtype == torch.uint8
    paths = evaluation.write_panels(tmp_path, result, score_threshold=0.0)
    assert len(paths) == 2 and all(p.stat().st_size > 1000 for p in paths)


def test_evaluate_view_pins_the_version_and_records_it(frames_uri, tiny_models, tmp_path):
    table = storage.connect(frames_uri).open_table(storage.FRAMES_TABLE)
    models = {name: (model, {"source": name}) for name, model in tiny_models.items()}
    report = evaluation.evaluate_view(frames_uri, storage.FRAMES_TABLE, mode="rider", classes=["rider"],
                                      models=models, reports_root=tmp_path, panel_count=1)
    assert report.out_dir == tmp_path / "rider" / str(table.version)
    view = json.loads((report.out_dir / evaluation.REPORT_JSON).read_text())["val_view"]
    assert view == {"name": storage.FRAMES_TABLE, "version": table.version, "uri": frames_uri,
                    "source_table": storage.FRAMES_TABLE, "source_table_version": table.version}


def test_evaluate_rejects_an_empty_view(tiny_models):
    with pytest.raises(ValueError, match="no frames"):
        evaluation.evaluate(tiny_models, [], classes=["rider"])
