"""Writing evaluations down: COCO JSON checked against pycocotools, panels, report files, summary."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from avperception_assets import bdd100k, detections, evaluation, reports
from avperception_assets.evaluation import BASELINE, FINETUNED

from .test_detections import CAR, PERSON, TARGETS, pred, target


def test_delta_pct():
    assert reports.delta_pct(0.2, 0.3) == pytest.approx(50.0)
    assert reports.delta_pct(0.4, 0.3) == pytest.approx(-25.0)
    assert reports.delta_pct(0.0, 0.3) is None
    assert reports.delta_pct(None, 0.3) is None


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
    class_ids = detections.mode_class_ids(["rider", "car"])
    metrics = {name: detections.compute_metrics(p, targets, class_ids) for name, p in predictions.items()}
    image = torch.zeros(3, 300, 320, dtype=torch.uint8)
    frames = [evaluation.PanelFrame(i, f"frame-{i}.jpg", image) for i in range(2)]
    return evaluation.Evaluation(["rider", "car"], [f"frame-{i}.jpg" for i in range(24)], [(300, 320)] * 24, targets,
                                 predictions, metrics, frames)


@pytest.fixture(scope="module")
def written_report(hand_built_evaluation, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "rider" / "7"
    report = reports.write_report(
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
        gt = COCO(str(out / reports.GROUND_TRUTH_FILE))
    for name, filename in reports.PREDICTIONS_FILES.items():
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
    data = json.loads((out / reports.REPORT_JSON).read_text())
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
    markdown = (out / reports.REPORT_MD).read_text()
    assert "bdd100k_rider_val" in markdown and f"{first['baseline']:.3f}" in markdown
    assert markdown == written_report.markdown


def test_panels_are_png_files(written_report):
    assert len(written_report.panels) == 2
    for path in written_report.panels:
        assert path.stat().st_size > 1000
        with Image.open(path) as png:
            assert png.format == "PNG"
            assert png.size == (3 * 400, 375 + 18)  # three 400-px tiles of a 320x300 frame + caption
    markdown = reports.panels_markdown(written_report.panels)
    assert markdown.count("data:image/png;base64,") == 2


def test_panel_draws_each_model_in_its_colour():
    frame = evaluation.PanelFrame(0, "f.jpg", torch.zeros(3, 100, 200, dtype=torch.uint8))
    preds = {BASELINE: pred([[10, 10, 60, 60]], [0.9], [PERSON]),
             FINETUNED: pred([[100, 20, 150, 80]], [0.2], [PERSON])}  # below the threshold: not drawn
    panel = np.asarray(reports.draw_panel(frame, TARGETS[0], preds, score_threshold=0.5, tile_width=200))
    tiles = [panel[18:, i * 200:(i + 1) * 200] for i in range(3)]
    green, red, blue = (0, 128, 0), (255, 0, 0), (0, 0, 255)
    assert (tiles[0] == green).all(-1).any() and (tiles[1] == red).all(-1).any()
    assert not (tiles[2] == blue).all(-1).any()


def test_rewriting_a_report_replaces_its_files(written_report, hand_built_evaluation):
    fewer = evaluation.Evaluation(**{**hand_built_evaluation.__dict__,
                                     "panel_frames": hand_built_evaluation.panel_frames[:1]})
    report = reports.write_report(written_report.out_dir, fewer, mode="rider",
                                     val_view={"name": "bdd100k_rider_val", "version": 7},
                                     baseline={}, finetuned={})
    assert sorted(p.name for p in (report.out_dir / reports.PANELS_DIR).iterdir()) == [report.panels[0].name]


def test_summary_over_modes(written_report, tmp_path):
    by_mode = {"rider": written_report.data, "nighttime_person": written_report.data}
    md_path, json_path, markdown = reports.write_summary(tmp_path, by_mode)
    lines = markdown.splitlines()
    assert lines[0] == "| failure mode | metric | baseline | fine-tuned | Δ% |"
    assert len(lines) == 2 + 2 * len(written_report.rows)
    assert lines[2].startswith("| rider | mAP@0.5 |")
    assert markdown in md_path.read_text()
    summary = json.loads(json_path.read_text())
    assert summary["modes"]["rider"]["val_view"]["version"] == 7
    assert len(summary["rows"]) == 2 * len(written_report.rows)


# --- real detectors over a real (tiny, synthetic) Lance table through the real loader -------
