"""Writing evaluations down: COCO JSON checked against pycocotools, panels, report files, summary."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from avperception_assets.formats import taxonomy as bdd100k
from avperception_assets.model import detections
from avperception_assets.evaluation import bootstrap, comparison as evaluation, reports
from avperception_assets.evaluation.comparison import BASELINE, FINETUNED

from .test_detections import CAR, PERSON, TARGETS, pred, target


def test_delta_points():
    assert reports.delta_points(0.2, 0.3) == pytest.approx(10.0)
    assert reports.delta_points(0.4, 0.3) == pytest.approx(-10.0)
    assert reports.delta_points(0.0, 0.3) == pytest.approx(30.0)  # a baseline at 0 is no special case
    assert reports.delta_points(None, 0.3) is None


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


class Replay(torch.nn.Module):
    """Stands in for a detector: returns the detections it was given, frame after frame."""

    def __init__(self, outputs):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # `predict` reads the device from it
        self.outputs, self.served = list(outputs), 0

    def forward(self, images):
        self.served += len(images)
        return self.outputs[self.served - len(images):self.served]


def _hand_built(seeds=(2, 3)):
    """`evaluation.evaluate` over 24 frames of known boxes, with detections jittered from them."""
    targets = _random_targets(24, seed=1)
    models = {name: Replay(_jittered(targets, seed=seed)) for name, seed in zip((BASELINE, FINETUNED), seeds)}
    image = torch.zeros(3, 300, 320, dtype=torch.uint8)
    batches = [([image] * 6, targets[i:i + 6], [f"frame-{k}.jpg" for k in range(i, i + 6)]) for i in range(0, 24, 6)]
    return evaluation.evaluate(models, batches, classes=["rider", "car"], panel_count=2, worst_count=3)


@pytest.fixture(scope="module")
def hand_built_evaluation():
    return _hand_built()


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
            mode = COCOeval(gt, gt.loadRes(str(out / filename)), "bbox")
            mode.params.catIds = [PERSON, CAR]  # the mode's classes: not bicycle, which is only predicted
            mode.evaluate()
            mode.accumulate()
            mode.summarize()
        reported = written_report.data["metrics"][name]
        assert 0.05 < reported["map_50"] < 0.95  # a non-trivial case
        headline = reported["mode"]
        assert [headline[k] for k in ("map", "map_50", "map_small", "map_medium", "map_large", "mar_100")] == \
            pytest.approx([mode.stats[i] if mode.stats[i] >= 0 else None for i in (0, 1, 3, 4, 5, 8)], abs=1e-6)
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
    assert metrics == ["mAP@0.5 (mode classes)", "mAP@[.5:.95] (mode classes)", "recall (mAR@100) (mode classes)",
                       "AP@0.5 person (rider)", "AP@[.5:.95] person (rider)",
                       "AP@0.5 car (car)", "AP@[.5:.95] car (car)",
                       "mAP@0.5 (all classes)", "mAP@[.5:.95] (all classes)", "recall (mAR@100) (all classes)"]
    first = data["rows"][0]
    assert first["baseline"] == data["metrics"][BASELINE]["mode"]["map_50"]
    assert data["rows"][-3]["baseline"] == data["metrics"][BASELINE]["map_50"]
    assert [row["metric"] for row in data["size_rows"]][:3] == [
        "mAP@[.5:.95] small (mode classes)", "mAP@[.5:.95] medium (mode classes)", "mAP@[.5:.95] large (mode classes)"]
    assert first["delta_points"] == pytest.approx((first["finetuned"] - first["baseline"]) * 100)
    assert data["delta_points"][first["metric"]] == first["delta_points"] and "delta_pct" not in data
    markdown = (out / reports.REPORT_MD).read_text()
    assert "bdd100k_rider_val" in markdown and f"{first['baseline']:.3f}" in markdown
    assert f"| {first['metric']} | {first['baseline']:.3f} | {first['finetuned']:.3f} | " \
           f"{first['delta_points']:+.1f} |" in markdown and "%" not in rows_of(markdown)
    assert markdown == written_report.markdown


def rows_of(markdown: str) -> str:
    """The metric tables' lines of a report.md."""
    return "\n".join(line for line in markdown.splitlines() if line.startswith("| ") and "(points)" not in line)


def test_report_carries_intervals_and_a_verdict(written_report, hand_built_evaluation):
    data = json.loads((written_report.out_dir / reports.REPORT_JSON).read_text())
    intervals = data["intervals"]
    assert list(intervals) == [BASELINE, FINETUNED, reports.DELTA]
    for name in (BASELINE, FINETUNED):
        for key in ("map_50", "map", "recall_50"):
            entry = intervals[name][key]
            assert entry["point"] == pytest.approx(data["metrics"][name]["mode"][key], abs=1e-6)
            assert entry["low"] < entry["point"] < entry["high"]
            assert (entry["resamples"], entry["seed"], entry["confidence"]) == (1000, 0, 0.95)
            assert entry["frames"] == 24
            assert entry["objects"] == sum(int((t["labels"] == c).sum()) for t in hand_built_evaluation.targets
                                           for c in hand_built_evaluation.class_ids)
    delta = intervals[reports.DELTA]["map_50"]
    assert delta["point"] == pytest.approx(data["rows"][0]["delta_points"], abs=1e-4)
    assert delta["low"] < delta["point"] < delta["high"]
    assert data["verdict"] == bootstrap.verdict(delta) and data["verdict"] in (
        bootstrap.BETTER, bootstrap.WORSE, bootstrap.NO_DIFFERENCE)
    markdown = written_report.markdown
    assert f"**Verdict: {data['verdict']}**" in markdown and reports.intervals_markdown(intervals) in markdown
    assert f"{delta['point']:+.1f} [{delta['low']:+.1f}, {delta['high']:+.1f}]" in markdown
    assert f"![intervals]({reports.INTERVALS_FILE})" in markdown
    with Image.open(written_report.out_dir / reports.INTERVALS_FILE) as png:
        assert png.format == "PNG"


def test_interval_plot_labels_its_axes_and_draws_the_zero_line(written_report):
    data = written_report.data
    figure = reports.draw_intervals(data["intervals"], data["verdict"], "rider")
    top, bottom = figure.axes[0], figure.axes[3]  # AP@0.5: the models, then the delta
    assert top.get_xlabel() == "AP@0.5 (mode classes)" and bottom.get_xlabel() == "Δ AP@0.5 (points)"
    assert [t.get_text() for t in top.get_yticklabels()] == ["baseline", "fine-tuned"]
    assert [[t.get_text() for t in legend.get_texts()] for legend in figure.legends] == [
        ["baseline", "fine-tuned"], ["no difference", "fine-tuned − baseline"]]
    [zero] = [line for line in bottom.get_lines() if line.get_linestyle() == "--"]
    assert list(zero.get_xdata()) == [0, 0]
    assert data["verdict"] in figure.get_suptitle()


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


def test_rewriting_a_report_replaces_its_files(hand_built_evaluation, tmp_path):
    reports.write_report(tmp_path, hand_built_evaluation, mode="rider", val_view={}, baseline={}, finetuned={})
    fewer = evaluation.Evaluation(**{**hand_built_evaluation.__dict__,
                                     "panel_frames": hand_built_evaluation.panel_frames[:1],
                                     "worst_frames": hand_built_evaluation.worst_frames[:1]})
    report = reports.write_report(tmp_path, fewer, mode="rider",
                                     val_view={"name": "bdd100k_rider_val", "version": 7},
                                     baseline={}, finetuned={})
    assert sorted(p.name for p in (report.out_dir / reports.PANELS_DIR).iterdir()) == sorted(
        [report.panels[0].name, report.worst_panels[0].name])


def test_report_carries_tiled_figures_beside_untiled(hand_built_evaluation, tmp_path):
    tiled = _hand_built(seeds=(4, 5))  # stands in for the same frames evaluated on tiles
    spec = {"tile_size": 448, "overlap": 0.2, "whole_frame": True}
    report = reports.write_report(tmp_path, hand_built_evaluation, mode="rider", val_view={}, baseline={},
                                  finetuned={}, tiled=tiled, tiling=spec)
    tiling = json.loads((tmp_path / reports.REPORT_JSON).read_text())["tiling"]
    rows = {row["metric"]: row for row in tiling["rows"]}
    assert list(rows) == ["mAP@0.5 (mode classes)", "AP@0.5 person (rider)", "AP@0.5 car (car)",
                          "recall@IoU 0.5 (mode classes)", "recall (mAR@100) (mode classes)", reports.TIME_PER_FRAME]
    headline = rows["mAP@0.5 (mode classes)"]
    assert (headline[BASELINE], headline[FINETUNED]) == (report.rows[0]["baseline"], report.rows[0]["finetuned"])
    assert headline["finetuned_tiled"] == tiled.metrics[FINETUNED]["mode"]["map_50"] != headline[FINETUNED]
    assert rows["recall@IoU 0.5 (mode classes)"]["baseline_tiled"] == tiled.metrics[BASELINE]["mode"]["recall_50"]
    assert rows[reports.TIME_PER_FRAME]["finetuned_tiled"] == pytest.approx(tiled.seconds[FINETUNED] / 24)
    assert tiling["spec"] == spec and tiling["seconds_per_frame"][BASELINE] == pytest.approx(tiled.seconds[BASELINE] / 24)
    assert "## Tiled inference" in report.markdown and "448x448 px tiles at full resolution, overlapping by 20%" in \
        report.markdown and reports.tiling_markdown(tiling["rows"]) in report.markdown
    assert json.loads((tmp_path / reports.TILED_PREDICTIONS_FILES[FINETUNED]).read_text()) == \
        reports.coco_detections(tiled.predictions[FINETUNED])
    untiled = reports.write_report(tmp_path, hand_built_evaluation, mode="rider", val_view={}, baseline={}, finetuned={})
    assert untiled.data["tiling"] is None and "Tiled" not in untiled.markdown
    assert not any((tmp_path / f).exists() for f in reports.TILED_PREDICTIONS_FILES.values())


def test_summary_over_modes(written_report, tmp_path):
    by_mode = {"rider": written_report.data, "nighttime_person": written_report.data}
    md_path, json_path, markdown = reports.write_summary(tmp_path, by_mode)
    lines = markdown.splitlines()
    assert lines[0] == ("| failure mode | frames | objects | baseline AP@0.5 | fine-tuned AP@0.5 "
                        "| Δ AP@0.5 (points) | verdict |")
    delta = written_report.data["intervals"][reports.DELTA]["map_50"]
    assert lines[2] == (f"| rider | 24 | {delta['objects']} | "
                        f"{bootstrap.interval_text(written_report.data['intervals'][BASELINE]['map_50'])} | "
                        f"{bootstrap.interval_text(written_report.data['intervals'][FINETUNED]['map_50'])} | "
                        f"{bootstrap.interval_text(delta, points=True)} | {written_report.data['verdict']} |")
    assert lines[3].startswith("| nighttime_person | 24 |") and lines[4] == ""
    assert lines[5] == "| failure mode | metric | baseline | fine-tuned | Δ (points) |"
    assert len(lines) == 7 + 2 * len(written_report.rows)
    assert lines[7].startswith("| rider | mAP@0.5 (mode classes) |")
    assert "%" not in markdown
    assert markdown in md_path.read_text()
    summary = json.loads(json_path.read_text())
    assert summary["modes"]["rider"]["val_view"]["version"] == 7
    assert summary["modes"]["rider"]["verdict"] == written_report.data["verdict"]
    assert summary["modes"]["rider"]["intervals"] == written_report.data["intervals"]
    assert len(summary["rows"]) == 2 * len(written_report.rows)


# --- per-frame errors ----------------------------------------------------------------------

def _xyxy(bbox) -> tuple:
    x, y, w, h = bbox
    return tuple(round(v, 2) for v in (x, y, x + w, y + h))


def test_frame_matches_equal_pycocotools_at_iou_half(written_report, hand_built_evaluation):
    """Per frame and class: the same true positives, false positives, misses and matched pairs
    as COCOeval.evaluateImg at IoU 0.5 (area all, 100 detections) on the exported files."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = written_report.out_dir
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / reports.GROUND_TRUTH_FILE))
    for model, filename in reports.PREDICTIONS_FILES.items():
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(str(out / filename))
            coco_eval = COCOeval(gt, dt, "bbox")
            coco_eval.evaluate()
        assert coco_eval.params.iouThrs[0] == 0.5
        compared = 0
        for record in coco_eval.evalImgs:
            if record is None or record["aRng"] != [0, 1e10] or record["maxDet"] != 100:
                continue
            frame = hand_built_evaluation.frame_errors[model][record["image_id"]]
            counts = frame.per_class[record["category_id"]]
            tp = int((record["dtMatches"][0] > 0).sum())
            assert (counts.tp, counts.fp, counts.misses) == (
                tp, len(record["dtIds"]) - tp, int((record["gtMatches"][0] == 0).sum()))
            theirs = {(_xyxy(dt.anns[d]["bbox"]), _xyxy(gt.anns[int(g)]["bbox"]))
                      for d, g in zip(record["dtIds"], record["dtMatches"][0]) if g > 0}
            ours = {(tuple(round(b[k], 2) for k in ("x1", "y1", "x2", "y2")),
                     tuple(round(frame.boxes[b["match"]][k], 2) for k in ("x1", "y1", "x2", "y2")))
                    for b in frame.boxes if b["outcome"] == "tp" and b["coco_id"] == record["category_id"]}
            assert ours == theirs
            compared += 1
        assert compared > 30


def test_pr_curves_label_their_axes_and_name_each_model(written_report):
    figure = reports.draw_pr_curves(written_report.data["metrics"])
    assert [axes.get_title() for axes in figure.axes] == ["person (rider) at IoU 0.5", "car (car) at IoU 0.5"]
    for axes in figure.axes:
        assert (axes.get_xlabel(), axes.get_ylabel()) == ("recall", "precision")
        labels = [t.get_text() for t in axes.get_legend().get_texts()]
        assert [label.split(" (")[0] for label in labels] == ["baseline", "fine-tuned"]
    person = written_report.data["metrics"][FINETUNED]["per_class"]["person"]
    assert f"fine-tuned (AP@0.5 {person['ap_50']:.3f})" in [t.get_text() for t in figure.axes[0].get_legend().get_texts()]


def test_frame_counts_add_up(hand_built_evaluation):
    for model, frames in hand_built_evaluation.frame_errors.items():
        for frame, truth, prediction in zip(frames, hand_built_evaluation.targets,
                                            hand_built_evaluation.predictions[model]):
            for coco_id, counts in frame.per_class.items():
                assert counts.tp + counts.misses == counts.gt == int((truth["labels"] == coco_id).sum())
                assert counts.tp + counts.fp == int((prediction["labels"] == coco_id).sum())
            assert sum(b["source"] == "ground_truth" for b in frame.boxes) == len(truth["labels"])
            for box in frame.boxes:  # every match is mutual
                if box["match"] >= 0:
                    assert frame.boxes[box["match"]]["match"] == frame.boxes.index(box)


def test_worst_frames_are_the_finetuned_models_highest_error_scores(hand_built_evaluation):
    class_ids = hand_built_evaluation.class_ids
    scores = [f.error_score(class_ids) for f in hand_built_evaluation.frame_errors[FINETUNED]]
    expected = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:3]
    assert [f.index for f in hand_built_evaluation.worst_frames] == expected
    assert scores[expected[0]] > 0 and [f.image_id for f in hand_built_evaluation.worst_frames] == [
        f"frame-{i}.jpg" for i in expected]


def test_report_shows_sizes_confusion_curves_and_worst_frames(written_report):
    out, data = written_report.out_dir, written_report.data
    with Image.open(out / reports.PR_CURVES_FILE) as png:
        assert png.format == "PNG" and png.size == (2 * 420, 360)  # one plot per mode class
    confusion = data["confusion"][FINETUNED]
    assert confusion["classes"][-1] == "background" and "person" in confusion["classes"]
    matrix = np.array(confusion["matrix"])
    person = confusion["classes"].index("person")
    targets = written_report.data["num_objects"]
    assert matrix[:-1].sum() == targets  # every ground-truth box lands in one cell of its row
    assert matrix[person, confusion["classes"].index("car")] > 0  # _jittered relabels some people as cars
    assert [w["panel"] for w in data["worst_frames"]] == [
        str(p.relative_to(out)) for p in written_report.worst_panels]
    assert all((out / w["panel"]).stat().st_size > 1000 for w in data["worst_frames"])
    markdown = written_report.markdown
    for heading in ("## By object size", "## Confusion between classes", "## Worst frames of the fine-tuned model"):
        assert heading in markdown
    assert f"]({reports.PR_CURVES_FILE})" in markdown


def test_eval_frames_table_is_versioned_with_each_report(hand_built_evaluation, tmp_path):
    from avperception_assets.evaluation import frame_errors
    from avperception_assets.storage import tables as storage

    conn = storage.connect(str(tmp_path / "db"))
    names = detections.coco_category_names()
    rows = frame_errors.frame_rows(hand_built_evaluation.frame_errors, hand_built_evaluation.image_ids,
                                   hand_built_evaluation.class_ids, names)
    first = frame_errors.write_table(conn, "rider", rows, {"val_view": "bdd100k_rider_val@7"})
    second = frame_errors.write_table(conn, "rider", rows.slice(0, 5), {"val_view": "bdd100k_rider_val@8"})
    table = conn.open_table(frame_errors.table_name("rider"))
    assert second > first and table.count_rows() == 5
    table.checkout(first)
    assert table.count_rows() == 2 * 24 and table.schema.metadata[b"val_view"] == b"bdd100k_rider_val@7"
    missed = table.search().where("model = 'finetuned' AND mode_misses > 0").select(["image_id"]).to_list()
    assert {r["image_id"] for r in missed} == {
        image_id for image_id, f in zip(hand_built_evaluation.image_ids, hand_built_evaluation.frame_errors[FINETUNED])
        if f.total(hand_built_evaluation.class_ids).misses}


# --- real detectors over a real (tiny, synthetic) Lance table through the real loader -------
