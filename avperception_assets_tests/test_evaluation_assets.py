"""The evaluation assets, materialized for real on the session's tiny trained rider (see conftest)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import dagster as dg
import pytest

from avperception_assets import summary as summary_command
from avperception_assets.storage import tables as storage
from avperception_assets.defs import evaluation_assets
from avperception_assets.defs.evaluation_assets import EvalReportConfig
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.evaluation.comparison import BASELINE, FINETUNED
from avperception_assets.failure_modes.registry import Tiling, get_mode
from avperception_assets.evaluation.reports import GROUND_TRUTH_FILE, PREDICTIONS_FILES, REPORT_JSON, TILED_PREDICTIONS_FILES

from .conftest import RIDER, TINY_TILING

@pytest.fixture(scope="module")
def materialized(trained_rider):
    return trained_rider.root, trained_rider.result, trained_rider.val_version


def _metadata(result, key: str) -> dict:
    [event] = result.asset_materializations_for_node(key)
    return {k: v.value for k, v in event.metadata.items()}


def test_report_is_written_with_data_and_model_versions(materialized):
    root, result, val_version = materialized
    assert result.success
    meta = _metadata(result, "rider_eval_report")
    out = root / "reports" / "rider" / str(val_version)
    assert meta["report_dir"] == str(out) and meta["val_view_version"] == val_version
    data = json.loads((out / REPORT_JSON).read_text())
    assert data["val_view"]["name"] == "bdd100k_rider_val" and data["val_view"]["version"] == val_version
    finetuned = data["models"][FINETUNED]
    checkpoint = _metadata(result, "rider_checkpoint")
    assert finetuned["checkpoint"] == str(Path(checkpoint["checkpoint_dir"]) / "best.pt")
    assert finetuned["metadata"]["train_view"] == "bdd100k_rider_train"
    assert finetuned["metadata"]["train_view_version"] == checkpoint["train_view_version"]
    base = _metadata(result, "base_detector")
    assert data["models"]["baseline"]["weights"] == base["weights"] == meta["baseline_weights"]
    # Both models see the same pixels: the baseline runs at the fine-tuned model's input size.
    assert data["models"]["baseline"]["metadata"]["profile"]["min_size"] == 96
    assert data["models"]["baseline"]["input_size"] == [128, 228] == [
        finetuned["metadata"]["profile"]["min_size"], finetuned["metadata"]["profile"]["max_size"]]
    assert data["num_images"] == meta["dagster/row_count"] > 0
    for name in [GROUND_TRUTH_FILE, *PREDICTIONS_FILES.values(), "report.md"]:
        assert (out / name).stat().st_size > 0


def test_metadata_shows_the_table_and_the_panels(materialized):
    root, result, _ = materialized
    meta = _metadata(result, "rider_eval_report")
    assert meta["report"].startswith("| metric | baseline | fine-tuned | Δ (points) |")
    assert meta["report"].splitlines()[2].startswith("| mAP@0.5 (mode classes) |")
    assert "AP@0.5 person (rider)" in meta["report"] and "mAP@0.5 (all classes)" in meta["report"]
    assert meta["pr_curves"].count("data:image/png;base64,") == 1
    assert meta["intervals_plot"].count("data:image/png;base64,") == 1
    assert meta["intervals"].startswith(f"**Verdict: {meta['verdict']}**")
    assert "| fine-tuned − baseline (points) |" in meta["intervals"] and "1,000 resamples" in meta["intervals"]
    assert "mAP@[.5:.95] small (mode classes)" in meta["by_object_size"]
    assert meta["panels"].count("data:image/png;base64,") >= 1
    panels = list((Path(meta["report_dir"]) / "panels").glob("*.png"))
    assert panels and all(p.stat().st_size > 1000 for p in panels)


def test_metadata_figures_are_the_report_figures(materialized):
    _, result, _ = materialized
    meta = _metadata(result, "rider_eval_report")
    data = json.loads((Path(meta["report_dir"]) / REPORT_JSON).read_text())
    for model in ("baseline", FINETUNED):
        for key in ("map_50", "map", "mar_100"):
            assert meta[f"mode_{key}_{model}"] == pytest.approx(data["metrics"][model]["mode"][key])
            assert meta[f"all_classes_{key}_{model}"] == pytest.approx(data["metrics"][model][key])
    assert meta["mode_map_50_delta_points"] == data["rows"][0]["delta_points"]
    assert not any("pct" in key for key in meta)
    assert meta["verdict"] == data["verdict"]
    for name in (BASELINE, FINETUNED, "delta"):
        for key in ("map_50", "map", "recall_50"):
            for end in ("low", "high"):
                assert meta[f"ci_{name}_{key}_{end}"] == pytest.approx(data["intervals"][name][key][end])


def test_report_intervals_come_from_the_stored_matches(materialized, trained_rider):
    """The report's points are COCOeval's on its own files, for both models untiled and tiled,
    computed from `rider_eval_frames` as stored; the verdict reads the paired interval."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from avperception_assets.evaluation import bootstrap, frame_errors
    from avperception_assets.model.detections import mode_class_ids

    _, result, _ = materialized
    meta = _metadata(result, "rider_eval_report")
    out = Path(meta["report_dir"])
    data = json.loads((out / REPORT_JSON).read_text())
    stored = frame_errors.read_table(storage.connect(str(trained_rider.root / "lancedb")), "rider",
                                     meta["eval_frames_version"])
    class_ids = list(mode_class_ids(RIDER.classes))
    matches = bootstrap.matches_from_rows(stored, class_ids)
    files = {**PREDICTIONS_FILES, **{f"{model}_tiled": name for model, name in TILED_PREDICTIONS_FILES.items()}}
    assert list(data["intervals"]) == [BASELINE, FINETUNED, "baseline_tiled", "finetuned_tiled", "delta"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / GROUND_TRUTH_FILE))
    for name, filename in files.items():
        detections = json.loads((out / filename).read_text())
        points = [data["intervals"][name][key]["point"] for key in ("map", "map_50", "recall_50")]
        if not detections:  # COCO.loadRes refuses an empty list: nothing found scores 0
            assert points == [0.0, 0.0, 0.0]
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = COCOeval(gt, gt.loadRes(detections), "bbox")
            coco_eval.params.catIds = class_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        recall = coco_eval.eval["recall"][0, :, 0, -1]
        assert points == pytest.approx([coco_eval.stats[0], coco_eval.stats[1], recall[recall > -1].mean()], abs=1e-12)
        assert matches[name].frames == data["num_images"]
    delta = data["intervals"]["delta"]["map_50"]
    assert (delta["resamples"], delta["seed"], delta["frames"]) == (1000, 0, data["num_images"])
    assert data["verdict"] == bootstrap.verdict(delta)


def test_report_shows_both_models_untiled_and_tiled(materialized):
    _, result, _ = materialized
    meta = _metadata(result, "rider_eval_report")
    out = Path(meta["report_dir"])
    data = json.loads((out / REPORT_JSON).read_text())
    tiling = data["tiling"]
    assert tiling["spec"] == meta["tiling_spec"] == {"tile_size": TINY_TILING["tile_size"],
                                                     "overlap": TINY_TILING["tile_overlap"], "whole_frame": False}
    assert meta["tiling"].startswith("| metric | baseline | baseline tiled | fine-tuned | fine-tuned tiled |")
    headline = tiling["rows"][0]
    assert headline["metric"] == data["rows"][0]["metric"] == "mAP@0.5 (mode classes)"
    assert (headline[BASELINE], headline[FINETUNED]) == (data["rows"][0]["baseline"], data["rows"][0]["finetuned"])
    for model in (BASELINE, FINETUNED):
        assert meta[f"tiled_mode_map_50_{model}"] == pytest.approx(tiling["metrics"][model]["mode"]["map_50"])
        assert headline[f"{model}_tiled"] == tiling["metrics"][model]["mode"]["map_50"]
        assert meta[f"tiled_seconds_per_frame_{model}"] > 0 and meta[f"seconds_per_frame_{model}"] > 0  # both timed
        assert (out / TILED_PREDICTIONS_FILES[model]).stat().st_size > 0
    assert "## Tiled inference" in (out / "report.md").read_text()


def test_tiling_config_overrides_the_modes():
    distant = get_mode("distant_person")
    assert EvalReportConfig().resolve_tiling(distant) == distant.tiling
    assert (distant.tiling.tile_size, distant.tiling.overlap, distant.tiling.whole_frame) == (448, 0.2, True)
    assert EvalReportConfig(tiling=False).resolve_tiling(distant) is None
    assert EvalReportConfig(tile_overlap=0.5, tile_whole_frame=False).resolve_tiling(distant) == \
        dataclasses.replace(distant.tiling, overlap=0.5, whole_frame=False)
    assert EvalReportConfig().resolve_tiling(RIDER) is None
    assert EvalReportConfig(tile_size=256).resolve_tiling(RIDER) == Tiling(256)


def test_every_val_frame_is_kept_with_its_matches(materialized, trained_rider):
    _, result, _ = materialized
    meta = _metadata(result, "rider_eval_report")
    data = json.loads((Path(meta["report_dir"]) / REPORT_JSON).read_text())
    assert data["eval_frames"] == {"table": "rider_eval_frames", "version": meta["eval_frames_version"],
                                   "rows": 4 * data["num_images"]}  # both models, untiled and tiled
    table = storage.connect(str(trained_rider.root / "lancedb")).open_table("rider_eval_frames")
    rows = table.to_arrow().to_pylist()
    assert {r["model"] for r in rows} == {"baseline", FINETUNED, "baseline_tiled", "finetuned_tiled"}
    assert sum(r["gt"] for r in rows if r["model"] == FINETUNED) == data["num_objects"]
    assert all(r["tp"] + r["misses"] == r["gt"] and r["tp"] + r["fp"] == sum(
        b["source"] == "prediction" and b["outcome"] != "ignored" for b in r["boxes"]) for r in rows)
    assert all(len(b["matched"]) == len(b["ignored"]) == 10 for r in rows for b in r["boxes"])
    assert "{val view version}" in evaluation_assets.build_eval_report_asset(RIDER).descriptions_by_key[
        dg.AssetKey("rider_eval_report")]  # not an HTML tag the UI would swallow


def test_summary_table_over_modes(materialized):
    root, result, _ = materialized
    meta = _metadata(result, "failure_mode_summary")
    assert meta["modes"] == ["rider"] and meta["modes_without_report"] == []
    lines = meta["summary"].splitlines()
    assert lines[0] == ("| failure mode | frames | objects | baseline AP@0.5 | fine-tuned AP@0.5 "
                        "| Δ AP@0.5 (points) | verdict |")
    report = _metadata(result, "rider_eval_report")
    assert lines[2].startswith("| rider | ") and lines[2].endswith(f"| {report['verdict']} |")
    assert meta["verdicts"] == {"rider": report["verdict"]}
    assert lines[3] == "" and lines[4] == "| failure mode | metric | baseline | fine-tuned | Δ (points) |"
    assert lines[6].startswith("| rider | mAP@0.5 (mode classes) |")
    assert meta["summary"] in (root / "reports" / "summary.md").read_text()
    summary = json.loads((root / "reports" / "summary.json").read_text())
    assert summary["modes"]["rider"]["val_view"]["name"] == "bdd100k_rider_val"


@pytest.mark.dagster_run
def test_report_without_a_checkpoint_fails_clearly(tmp_path):
    with dg.instance_for_test() as instance:
        with pytest.raises(dg.Failure, match="rider_checkpoint has not been materialized"):
            dg.materialize([evaluation_assets.build_eval_report_asset(RIDER)], instance=instance,
                           resources={"workspace": WorkspaceResource(data_location=str(tmp_path))})


def test_the_summary_command_prints_the_data_locations_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AVP_DATA_DIR", str(tmp_path))
    assert summary_command.main() == 1
    assert f"no summary at {tmp_path / 'reports' / 'summary.md'}" in capsys.readouterr().err
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "summary.md").write_text("| rider | mAP@0.5 |")
    assert summary_command.main() == 0
    assert capsys.readouterr().out.splitlines() == ["| rider | mAP@0.5 |", f"reports: {tmp_path / 'reports'}"]
