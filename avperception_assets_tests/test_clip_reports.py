"""Reports on footage with clips (evaluation.tracks): a real table of synthetic clips evaluated with
detectors whose detections are known, so that every track figure can be worked out by hand; the
MOT files the report exports re-scored by the tracking command; a view without clips."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from avperception_assets import synthetic
from avperception_assets.defs import evaluation_assets
from avperception_assets.evaluation import comparison as evaluation, frame_errors, reports, tracks
from avperception_assets.evaluation.comparison import BASELINE, FINETUNED
from avperception_assets.formats.taxonomy import COCO_IDS
from avperception_assets.ingest import frames as ingest
from avperception_assets.storage import tables as storage
from avperception_assets.tracking import __main__ as tracking_command
from avperception_assets.tracking.metrics import evaluate_paths

from .test_reports import Replay

CLASSES = ["pedestrian", "rider"]
SIZE = {"width": 320, "height": 180}


def _missed_by_baseline(row: dict, category: str, track: str | None) -> bool:
    """The baseline misses every rider, and each other track of a clip in every third of its
    frames, tracks out of step (so a frame has objects found and objects missed)."""
    return category == "rider" or (track is not None and (int(track) + row["clip_frame_index"]) % 3 == 0)


def _detections(row: dict, model: str) -> dict:
    """The frame's objects (not its crowd regions) as detections scoring 0.9, read from the table."""
    crowd = row["ann_crowd"] or [False] * len(row["ann_bboxes"])
    tracks_of = row["ann_track_ids"] or [None] * len(row["ann_bboxes"])
    kept = [(box, COCO_IDS[category]) for category, box, is_crowd, track
            in zip(row["ann_categories"], row["ann_bboxes"], crowd, tracks_of)
            if not is_crowd and not (model == BASELINE and _missed_by_baseline(row, category, track))]
    return {"boxes": torch.tensor([box for box, _ in kept], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([label for _, label in kept], dtype=torch.int64),
            "scores": torch.full((len(kept),), 0.9)}


def _evaluate(uri: str, name: str):
    table = storage.connect(uri).open_table(name)
    rows = table.to_lance().to_table(columns=list(tracks.CLIP_COLUMNS)).to_pylist()  # in stored order, as read
    models = {model: Replay([_detections(row, model) for row in rows]) for model in (BASELINE, FINETUNED)}
    result, view = evaluation.evaluate_view(uri, name, models, classes=CLASSES, batch_size=4)
    return result, view, rows


@pytest.fixture(scope="module")
def clip_db(tmp_path_factory):
    """Three synthetic clips of eight frames (pedestrians, riders, a crowd region, …) and four
    detection frames, ingested."""
    root = tmp_path_factory.mktemp("clips")
    synthetic.write_clip_batch(root / "landing", "clips", 3, 8, seed=0, **SIZE)
    synthetic.write_batch(root / "landing", "det", 4, seed=0, **SIZE)
    conn = storage.connect(str(root / "lancedb"))
    ingest.ingest_batches(conn, root / "landing")
    return str(root / "lancedb")


@pytest.fixture(scope="module")
def clip_report(clip_db, tmp_path_factory):
    result, view, rows = _evaluate(clip_db, storage.FRAMES_TABLE)
    report = reports.write_report(tmp_path_factory.mktemp("report"), result, mode="people", val_view=view,
                                  baseline={"weights": "replay"}, finetuned={"weights": "replay"})
    return report, result, view, rows


def _expected_coverage(rows: list[dict], model: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(clip, track) -> (frames, found, longest gap), worked out frame by frame from the table."""
    runs: dict[tuple[str, str], list[bool]] = {}
    for row in sorted((r for r in rows if r["clip_frame_index"] is not None), key=lambda r: r["clip_frame_index"]):
        for category, track, crowd in zip(row["ann_categories"], row["ann_track_ids"], row["ann_crowd"]):
            if category in CLASSES and not crowd:
                runs.setdefault((row["clip_id"], track), []).append(
                    model == FINETUNED or not _missed_by_baseline(row, category, track))
    expected = {}
    for key, hits in runs.items():
        longest = gap = 0
        for hit in hits:
            gap = 0 if hit else gap + 1
            longest = max(longest, gap)
        expected[key] = (len(hits), sum(hits), longest)
    return expected


def test_each_track_of_the_modes_classes_has_its_coverage(clip_report):
    report, _, _, rows = clip_report
    tracking = report.data["tracking"]
    assert (tracking["clips"], tracking["frames"]) == (3, 24)
    for model in (BASELINE, FINETUNED):
        found = {(t["clip_id"], t["track_id"]): (t["frames"], t[model]["found"], t[model]["longest_gap"])
                 for t in tracking["tracks"]}
        assert found == _expected_coverage(rows, model)
    riders = [t for t in tracking["tracks"] if t["category"] == "rider"]
    assert riders and all(t[BASELINE]["coverage"] == 0 and t[FINETUNED]["coverage"] == 1 for t in riders)
    assert {t["category"] for t in tracking["tracks"]} == {"pedestrian", "rider"}  # no crowd region, no car

    summary = tracking["coverage"][BASELINE]
    coverages = [t[BASELINE]["coverage"] for t in tracking["tracks"]]
    assert summary["tracks"] == len(coverages) and summary["mean_coverage"] == pytest.approx(sum(coverages) / len(coverages))
    assert summary["tracks_under_half"] == sum(c < 0.5 for c in coverages) >= len(riders)
    assert tracking["coverage"][FINETUNED] == {"tracks": len(coverages), "mean_coverage": 1.0, "tracks_under_half": 0,
                                               "longest_gap": 0}


def test_worst_tracks_come_first(clip_report):
    report, *_ = clip_report
    order = [(t[FINETUNED]["coverage"], -t[FINETUNED]["longest_gap"], -t["frames"]) for t in report.data["tracking"]["tracks"]]
    assert order == sorted(order)
    markdown = report.markdown
    assert "## Tracks on clips" in markdown and "--pred tracks_finetuned.json" in markdown
    worst = report.data["tracking"]["tracks"][0]
    assert f"| `{worst['clip_id']}` | {worst['track_id']} | {worst['category']} | {worst['frames']} |" in markdown


def test_tracking_figures_are_the_tracking_commands_on_the_exported_files(clip_report, capsys):
    report, *_ = clip_report
    tracking, out = report.data["tracking"], report.out_dir
    gt = out / tracking["files"]["ground_truth"]
    for model in (BASELINE, FINETUNED):
        pred = out / tracking["files"][model]
        assert tracking["figures"][model] == evaluate_paths(gt, pred)
        assert tracking_command.main(["evaluate", "--gt", str(gt), "--pred", str(pred)]) == 0
        assert json.loads(capsys.readouterr().out) == tracking["figures"][model]
    assert json.loads((out / reports.REPORT_JSON).read_text())["tracking"] == tracking
    finetuned, baseline = tracking["figures"][FINETUNED], tracking["figures"][BASELINE]
    # Every object detected, nothing else: no miss and no false positive, whatever the tracker's ids.
    assert finetuned["FN"] == finetuned["FP"] == 0 and finetuned["MOTA"] > baseline["MOTA"]
    assert baseline["FN"] > 0 and baseline["IDF1"] < finetuned["IDF1"]


def test_exported_ground_truth_is_in_the_detectors_label_space(clip_report):
    report, _, _, rows = clip_report
    frames = json.loads((report.out_dir / tracks.GROUND_TRUTH_FILE).read_text())
    categories = {label["category"] for frame in frames for label in frame["labels"]}
    assert "rider" not in categories and "pedestrian" in categories  # COCO person: riders as pedestrians
    assert any(label["attributes"]["crowd"] for frame in frames for label in frame["labels"])
    clip_frames = {(r["clip_id"], r["clip_frame_index"], r["image_id"]) for r in rows if r["clip_frame_index"] is not None}
    assert {(f["videoName"], f["frameIndex"], f["name"]) for f in frames} == clip_frames and len(frames) == 24


def test_stored_ground_truth_follows_ground_truth_order(clip_report):
    _, result, *_ = clip_report
    for model in (BASELINE, FINETUNED):
        for target, errors in zip(result.targets, result.frame_errors[model]):
            stored = [b for b in errors.boxes if b["source"] == frame_errors.GROUND_TRUTH]
            order = frame_errors.ground_truth_order(target["labels"].tolist())
            assert [(b["coco_id"], [b["x1"], b["y1"], b["x2"], b["y2"]]) for b in stored] == [
                (int(target["labels"][k]), target["boxes"][k].tolist()) for k in order]


def test_metadata_and_summary_carry_the_tracking_figures(clip_report, tmp_path):
    report, _, view, _ = clip_report
    meta = evaluation_assets._tracking_metadata(report, view)
    figures = report.data["tracking"]["figures"]
    for model in (BASELINE, FINETUNED):
        assert meta[f"tracking_mota_{model}"] == figures[model]["MOTA"]
        assert meta[f"tracking_idf1_{model}"] == figures[model]["IDF1"]
        assert meta[f"tracks_under_half_{model}"] == report.data["tracking"]["coverage"][model]["tracks_under_half"]
    assert "| model | MOTA |" in meta["tracking"].value

    _, json_path, markdown = reports.write_summary(tmp_path, {"people": report.data})
    line = next(line for line in markdown.splitlines() if line.startswith("| people | 3 |"))
    assert f"{tracks.fmt(figures[BASELINE]['MOTA'])} → {tracks.fmt(figures[FINETUNED]['MOTA'])}" in line
    headline = json.loads(json_path.read_text())["modes"]["people"]["tracking"]
    assert headline[FINETUNED]["MOTA"] == figures[FINETUNED]["MOTA"] and headline[FINETUNED]["mean_coverage"] == 1.0


def test_a_view_without_clips_has_no_tracking_section(clip_db, clip_report, tmp_path):
    conn = storage.connect(clip_db)
    frames = conn.open_table(storage.FRAMES_TABLE).to_lance().to_table(filter="clip_frame_index IS NULL")
    conn.create_table("detection_frames", frames)  # the detection images: a clip id each, no position in it
    result, view, _ = _evaluate(clip_db, "detection_frames")
    assert result.clips is None and len(result.image_ids) == 4
    out = tmp_path / "report"
    shutil.copytree(clip_report[0].out_dir, out)  # an earlier report with clips in the same folder
    report = reports.write_report(out, result, mode="people", val_view=view, baseline={}, finetuned={})
    assert report.data["tracking"] is None and "Tracks on clips" not in report.markdown
    assert not list(out.glob("tracks_*.json"))
    assert evaluation_assets._tracking_metadata(report, view) == {
        "tracking": f"no frames of clips in detection_frames@{view['version']}: no tracking figures"}
    assert "failure mode (clips)" not in reports.write_summary(tmp_path, {"people": report.data})[2]
