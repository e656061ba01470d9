"""The evaluation assets, materialized for real: tiny bdd100k table, Geneva views, trained checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest

from avperception_assets import ingest, settings, slices, storage, synthetic
from avperception_assets.defs import evaluation_assets, training_assets
from avperception_assets.defs.resources import LanceDBResource
from avperception_assets.evaluation import FINETUNED, GROUND_TRUTH_FILE, PREDICTIONS_FILES, REPORT_JSON
from avperception_assets.failure_modes import get_mode

RIDER = get_mode("rider")
TINY_TRAINING = {"profile": "cpu", "weights": "none", "epochs": 1, "max_steps_per_epoch": 1,
                 "batch_size": 2, "min_size": 96, "max_size": 160}


def _assets():
    training = training_assets.build_training_defs([RIDER])
    evaluation = evaluation_assets.build_evaluation_defs([RIDER])
    return [*training.assets, *evaluation.assets]


def _run_config():
    return {"ops": {"base_detector": {"config": TINY_TRAINING},
                    # Fine-tuned at a larger input than the base (as distant_person is by default).
                    "rider_checkpoint": {"config": {**TINY_TRAINING, "min_size": 128, "max_size": 228}},
                    "rider_eval_report": {"config": {"batch_size": 4, "panel_count": 2}}}}


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    """A tiny bdd100k table and stand-in rider views, then the assets materialized in one run.

    The views are plain Lance tables holding each split's frames (readers treat a Geneva
    view and a table alike); the real Geneva views run in the end-to-end loop test.
    """
    root = tmp_path_factory.mktemp("eval-assets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AVP_DATA_DIR", str(root))
        synthetic.write_batch(settings.landing_dir(), "b1", 16, seed=0, width=320, height=180,
                              val_fraction=0.5)
        conn = storage.connect(settings.lancedb_uri())
        ingest.ingest_batches(conn, settings.landing_dir())
        frames = conn.open_table(storage.FRAMES_TABLE).to_arrow()
        for split in ("train", "val"):
            conn.create_table(slices.view_name(RIDER, split), frames.filter(pc.equal(frames["split"], split)),
                              storage_options=storage.STABLE_ROW_IDS)
        with dg.instance_for_test() as instance:
            result = dg.materialize(_assets(), instance=instance, run_config=_run_config(),
                                    resources={"lancedb": LanceDBResource(uri=settings.lancedb_uri())})
            val_version = conn.open_table(slices.view_name(RIDER, "val")).version
            yield root, result, val_version


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
    assert meta["report"].startswith("| metric | baseline | fine-tuned | Δ% |")
    assert "AP@0.5 person (rider)" in meta["report"]
    assert meta["panels"].count("data:image/png;base64,") >= 1
    panels = list((Path(meta["report_dir"]) / "panels").glob("*.png"))
    assert panels and all(p.stat().st_size > 1000 for p in panels)


def test_metadata_figures_are_the_report_figures(materialized):
    _, result, _ = materialized
    meta = _metadata(result, "rider_eval_report")
    data = json.loads((Path(meta["report_dir"]) / REPORT_JSON).read_text())
    for model in ("baseline", FINETUNED):
        for key in ("map_50", "map", "mar_100"):
            assert meta[f"{key}_{model}"] == pytest.approx(data["metrics"][model][key])
    assert meta["map_50_delta_pct"] == data["rows"][0]["delta_pct"]


def test_summary_table_over_modes(materialized):
    root, result, _ = materialized
    meta = _metadata(result, "failure_mode_summary")
    assert meta["modes"] == ["rider"] and meta["modes_without_report"] == []
    lines = meta["summary"].splitlines()
    assert lines[0] == "| failure mode | metric | baseline | fine-tuned | Δ% |"
    assert lines[2].startswith("| rider | mAP@0.5 |")
    assert meta["summary"] in (root / "reports" / "summary.md").read_text()
    summary = json.loads((root / "reports" / "summary.json").read_text())
    assert summary["modes"]["rider"]["val_view"]["name"] == "bdd100k_rider_val"


def test_report_without_a_checkpoint_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("AVP_DATA_DIR", str(tmp_path))
    with dg.instance_for_test() as instance:
        with pytest.raises(dg.Failure, match="rider_checkpoint has not been materialized"):
            dg.materialize([evaluation_assets.build_eval_report_asset(RIDER)], instance=instance,
                           resources={"lancedb": LanceDBResource(uri=str(tmp_path / "lancedb"))})


def test_definitions_follow_the_registry():
    keys = {a.key.to_user_string() for a in evaluation_assets.defs.assets}
    assert keys == {"rider_eval_report", "nighttime_person_eval_report", "distant_person_eval_report",
                    "failure_mode_summary"}
    report = next(a for a in evaluation_assets.defs.assets if a.key.to_user_string() == "rider_eval_report")
    assert set(report.asset_deps[report.key]) == {dg.AssetKey("rider_checkpoint"),
                                                   dg.AssetKey("bdd100k_rider_val"), dg.AssetKey("base_detector")}
    assert report.group_names_by_key[report.key] == "evaluation"
