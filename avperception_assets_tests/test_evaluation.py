"""One evaluation pass: real detectors over a real (tiny, synthetic) Lance table through the real loader."""

from __future__ import annotations

import pytest
import torch

from avperception_assets.formats import taxonomy as bdd100k
from avperception_assets.model import detector, tiling
from avperception_assets.evaluation import bootstrap, comparison as evaluation, frame_errors, reports
from avperception_assets.ingest import frames as ingest
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from avperception_assets.evaluation.comparison import BASELINE, FINETUNED

PERSON = bdd100k.COCO_IDS["pedestrian"]


@pytest.fixture(scope="module")
def frames_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    synthetic.write_batch(root / "landing", "b1", 6, seed=0, width=320, height=180)
    conn = storage.connect(str(root / "lancedb"))
    ingest.ingest_batches(conn, root / "landing")
    return str(root / "lancedb")


def _tiny_model(seed, score_thresh, **model_kwargs):
    torch.manual_seed(seed)
    profile = detector.get_profile("cpu", min_size=160, max_size=320)
    profile = profile.replace(model_kwargs={**profile.model_kwargs, "box_score_thresh": score_thresh,
                                            "box_detections_per_img": 10, **model_kwargs})
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
    paths = reports.write_panels(tmp_path, result, score_threshold=0.0)
    assert len(paths) == 2 and all(p.stat().st_size > 1000 for p in paths)


def test_evaluate_view_pins_the_version_and_records_it(frames_uri, tiny_models):
    table = storage.connect(frames_uri).open_table(storage.FRAMES_TABLE)
    result, view = evaluation.evaluate_view(frames_uri, storage.FRAMES_TABLE, tiny_models, classes=["rider"],
                                            panel_count=1)
    assert view == {"name": storage.FRAMES_TABLE, "version": table.version, "uri": frames_uri,
                    "source_table": storage.FRAMES_TABLE, "source_table_version": table.version}
    assert len(result.image_ids) == table.count_rows() and len(result.panel_frames) == 1
    with pytest.raises(ValueError, match="must include"):
        evaluation.evaluate_view(frames_uri, storage.FRAMES_TABLE, {BASELINE: tiny_models[BASELINE]},
                                 classes=["rider"])


def test_evaluate_rejects_an_empty_view(tiny_models):
    with pytest.raises(ValueError, match="no frames"):
        evaluation.evaluate(tiny_models, [], classes=["rider"])



def test_a_tiled_detector_is_evaluated_like_any_model(frames_uri):
    version = storage.connect(frames_uri).open_table(storage.FRAMES_TABLE).version
    few_proposals = {"rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20}  # 7 passes a frame: keep them light
    tiled = tiling.tiled(_tiny_model(1, 0.0, **few_proposals), 128, 0.25)  # on 6 tiles + the frame
    models = {BASELINE: _tiny_model(1, 0.0, **few_proposals), FINETUNED: tiled}
    first_frames = next(evaluation.view_batches(frames_uri, storage.FRAMES_TABLE, version, batch_size=2))
    images_seen = []
    tiled.model.register_forward_hook(lambda _, inputs, __: images_seen.append(len(inputs[0])))
    result = evaluation.evaluate(models, [first_frames], classes=["rider"])
    assert len(result.predictions[FINETUNED]) == len(result.image_ids) == 2
    for untiled, tiles in zip(result.predictions[BASELINE], result.predictions[FINETUNED]):
        boxes = tiles["boxes"]
        assert len(boxes) > len(untiled["boxes"]) == 10  # each tile adds its own 10 boxes, some merged away
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 180).all()
    assert result.metrics[FINETUNED]["mode"]["map_50"] is not None
    assert sum(images_seen) == 2 * (6 + 1)  # each frame's 6 tiles and the frame itself


def test_intervals_come_from_the_stored_matches_of_a_real_evaluation(frames_uri, tmp_path):
    """A real detector (untiled and tiled) against detections replayed from the frames' own boxes,
    over the real table: the matches stored in `<mode>_eval_frames` give the report's intervals,
    whose points are COCOeval's on the report's files, and the replayed model is better."""
    import contextlib
    import io
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from .test_reports import Replay, _jittered

    version = storage.connect(frames_uri).open_table(storage.FRAMES_TABLE).version
    frames = list(evaluation.view_batches(frames_uri, storage.FRAMES_TABLE, version, batch_size=3))
    close = _jittered([target for _, targets, _ in frames for target in targets], seed=0)
    real = _tiny_model(1, 0.0, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
    classes = sorted({name for name, coco_id in bdd100k.COCO_IDS.items()
                      if any(coco_id in target["labels"] for _, targets, _ in frames for target in targets)})
    untiled = evaluation.evaluate({BASELINE: real, FINETUNED: Replay(close)}, frames, classes=classes,
                                  panel_count=0, worst_count=0)
    tiled = evaluation.evaluate({BASELINE: tiling.tiled(real, 128, 0.25), FINETUNED: Replay(close)}, frames,
                                classes=classes, panel_count=0, worst_count=0)
    conn = storage.connect(str(tmp_path / "db"))
    written = frame_errors.write_table(conn, "frames", evaluation.frame_rows(untiled, tiled), {})
    stored = frame_errors.read_table(conn, "frames", written)
    assert stored.num_rows == 4 * 6
    report = reports.write_report(tmp_path / "report", untiled, mode="frames", val_view={}, baseline={},
                                  finetuned={}, tiled=tiled, tiling={"tile_size": 128, "overlap": 0.25,
                                                                     "whole_frame": True}, frames=stored)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(report.out_dir / reports.GROUND_TRUTH_FILE))
    files = {**reports.PREDICTIONS_FILES, **{evaluation.tiled_name(m): f for m, f in reports.TILED_PREDICTIONS_FILES.items()}}
    assert set(report.data["intervals"]) == {*files, reports.DELTA}
    for name, filename in files.items():
        detections = json.loads((report.out_dir / filename).read_text())
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = COCOeval(gt, gt.loadRes(detections), "bbox")
            coco_eval.params.catIds = untiled.class_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        recall = coco_eval.eval["recall"][0, :, 0, -1]
        intervals = report.data["intervals"][name]
        assert [intervals[key]["point"] for key in ("map", "map_50", "recall_50")] == pytest.approx(
            [coco_eval.stats[0], coco_eval.stats[1], recall[recall > -1].mean()], abs=1e-12)
        assert intervals["map_50"]["frames"] == 6 and intervals["map_50"]["resamples"] == bootstrap.RESAMPLES
    assert report.data["intervals"][FINETUNED]["map_50"]["point"] > 0.2  # jittered boxes of crowded small objects
    assert report.data["intervals"][reports.DELTA]["map_50"]["low"] > 0 and report.data["verdict"] == bootstrap.BETTER
