"""base_detector and <mode>_checkpoint materialized for real (the session's tiny trained rider, see conftest)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest

from avperception_assets import synthetic
from avperception_assets.ingest import frames as ingest
from avperception_assets.model import checkpoints, detector, loader, selection, training
from avperception_assets.curation import maintenance
from avperception_assets.discovery import hard_examples
from avperception_assets.workspace import Workspace
from avperception_assets.storage import tables as storage
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.defs.training_assets import FineTuneConfig, TrainingConfig, build_training_defs
from avperception_assets.failure_modes.registry import FailureMode, get_mode

from .conftest import TINY_TRAINING, build_frames_table

MODE = FailureMode("tiny", "split = 'train'", ("pedestrian",), "every frame: a stand-in slice")


def _write_views(conn, frames, mode: str = "tiny") -> None:
    """Stand-in views of `mode`: plain tables with the frames columns (the loader reads any table)."""
    for split in ("train", "val"):
        conn.create_table(f"bdd100k_{mode}_{split}", frames.filter(pc.equal(frames["split"], split)),
                          storage_options=storage.STABLE_ROW_IDS)


def test_base_detector_trains_on_the_train_split_of_bdd100k(trained_rider):
    assert trained_rider.result.success
    base = trained_rider.metadata("base_detector")
    conn = storage.connect(str(trained_rider.root / "lancedb"))
    frames_version = conn.open_table(storage.FRAMES_TABLE).version
    assert base["weights"] == str(trained_rider.root / "checkpoints" / "base" / str(frames_version) / "best.pt")
    assert base["train_filter"] == "split = 'train'" and base["weights_source"] == "none"
    assert base["dagster/row_count"] == conn.open_table(storage.FRAMES_TABLE).count_rows("split = 'train'")
    # Of the train split, the selection share chose its best epoch and the rest trained it.
    assert base["train_rows"] + base["selection_rows"] == base["dagster/row_count"] and base["selection_rows"] > 0
    assert base["selection_pct"] == selection.DEFAULT_PCT and base["selection_rule"] == selection.RULE


def test_a_checkpoint_is_fine_tuned_from_the_base_and_pinned_to_its_view(trained_rider):
    base, meta = trained_rider.metadata("base_detector"), trained_rider.metadata("rider_checkpoint")
    train = loader.open_table(str(trained_rider.root / "lancedb"), "bdd100k_rider_train")
    out = trained_rider.root / "checkpoints" / "rider" / str(train.version)
    assert meta["train_view"] == "bdd100k_rider_train" and meta["train_view_version"] == train.version
    assert meta["weights_source"] == base["weights"]  # fine-tuned from the base detector
    assert meta["dagster/row_count"] == train.count_rows()
    assert meta["hyper_parameters"]["lr"] == 0.01  # the cpu profile's fine-tune rate
    assert meta["checkpoint_dir"] == str(out) and (out / "best.pt").is_file()
    on_disk = checkpoints.read_metadata(out)
    assert on_disk["selection_rows"] == meta["selection_rows"] > 0 and "val_view" not in on_disk
    assert on_disk["best_val_map_50"] == meta["best_val_map_50"]


def _trained_and_held_out(folder: Path) -> tuple[set[str], set[str]]:
    """A checkpoint's frames as its folder records them: every frame of every epoch's training
    order, and the frames that chose its best epoch."""
    epochs = len(checkpoints.read_metadata(folder)["epochs"])
    trained = {i for epoch in range(epochs) for i in training.reproduce_order(folder, epoch=epoch)}
    return trained, set(training.selection_frames(folder))


def test_no_frame_a_report_scores_trained_or_selected_its_models(trained_rider):
    """The report's frames (its eval_frames table at the version report.json records), the frames
    each of its models trained on and those that chose their best epoch: pairwise disjoint."""
    report = json.loads(Path(trained_rider.metadata("rider_eval_report")["report_json"]).read_text())
    frames_table = report["eval_frames"]
    scored = loader.open_table(str(trained_rider.root / "lancedb"), frames_table["table"], frames_table["version"])
    scored = set(scored.to_arrow()["image_id"].to_pylist())
    assert len(scored) == report["num_images"] > 0
    for asset in ("base_detector", "rider_checkpoint"):
        trained, held_out = _trained_and_held_out(Path(trained_rider.metadata(asset)["checkpoint_dir"]))
        assert trained and held_out, asset
        assert not trained & held_out and not trained & scored and not held_out & scored, asset
        assert len(held_out) == trained_rider.metadata(asset)["selection_rows"]


def test_a_newer_view_version_trains_a_fresh_checkpoint(trained_rider, tmp_path):
    """New rows reach a train view: a new version, a fresh run pinned to it, started from the
    same base detector (a mode of its own, so the shared rider checkpoint stays as it was)."""
    workspace = Workspace(data_location=str(trained_rider.root))
    conn = storage.connect(workspace.lancedb_uri)
    frames = conn.open_table(storage.FRAMES_TABLE).to_arrow()
    _write_views(conn, frames)
    (checkpoint,) = [a for a in build_training_defs([MODE]).assets if a.key == dg.AssetKey("tiny_checkpoint")]
    resources = {"workspace": WorkspaceResource(data_location=workspace.data_location)}
    config = dg.RunConfig(ops={"tiny_checkpoint": TrainingConfig(**TINY_TRAINING)})
    first = dg.materialize([checkpoint], resources=resources, instance=trained_rider.instance, run_config=config)
    meta = _metadata(first, "tiny_checkpoint")
    assert meta["weights_source"] == trained_rider.metadata("base_detector")["weights"]

    conn.open_table("bdd100k_tiny_train").add(frames.filter(pc.equal(frames["split"], "val")))
    again = dg.materialize([checkpoint], resources=resources, instance=trained_rider.instance, run_config=config)
    newer = _metadata(again, "tiny_checkpoint")
    assert newer["train_view_version"] > meta["train_view_version"] and newer["resumed_from_epoch"] is None
    assert newer["checkpoint_dir"] != meta["checkpoint_dir"]
    assert (Path(meta["checkpoint_dir"]) / "best.pt").is_file()  # the older checkpoint is kept


def test_a_mined_fine_tune_scores_its_view_and_records_its_sampling(trained_rider):
    """Hard-example mining from the UI's run config: the base detector scores the train view
    (incremental scoring is `test_hard_examples`'), and the checkpoint records what reproduce
    needs and maintenance keeps."""
    workspace = Workspace(data_location=str(trained_rider.root))
    mode = FailureMode("mined", "split = 'train'", ("pedestrian",), "every frame: a stand-in slice")
    conn = storage.connect(workspace.lancedb_uri)
    frames = conn.open_table(storage.FRAMES_TABLE).to_arrow()
    _write_views(conn, frames, mode.name)
    (checkpoint,) = [a for a in build_training_defs([mode]).assets if a.key == dg.AssetKey("mined_checkpoint")]
    resources = {"workspace": WorkspaceResource(data_location=workspace.data_location)}
    config = dg.RunConfig(ops={"mined_checkpoint": FineTuneConfig(**TINY_TRAINING, hard_example_mining=True,
                                                                  mining_neighbors=0)})
    meta = _metadata(dg.materialize([checkpoint], resources=resources, instance=trained_rider.instance,
                                    run_config=config), "mined_checkpoint")
    base = Path(trained_rider.metadata("base_detector")["weights"])
    assert meta["mining"]["table"] == "mined_difficulty"
    assert meta["mining"]["model"].startswith(detector.weights_digest(base) + "@")
    assert (meta["frames_scored"], meta["frames_already_scored"]) == (meta["train_rows"], 0)  # not the held out
    folder = Path(meta["checkpoint_dir"])
    order = training.reproduce_order(folder)
    train_ids = set(frames.filter(pc.equal(frames["split"], "train"))["image_id"].to_pylist())
    assert len(order) == meta["train_rows"] and set(order) <= train_ids
    assert not set(order) & set(training.selection_frames(folder))

    # Maintenance keeps the score version the checkpoint drew by, which still rebuilds its weights.
    scores = conn.open_table("mined_difficulty")
    scores.add(scores.to_arrow().slice(0, 1))  # a later version, unpinned
    pins = maintenance.pinned_versions(conn, workspace.checkpoints_dir, workspace.reports_dir, views=[])
    stats = maintenance.maintain(scores, scores.name, pins["mined_difficulty"], older_than=timedelta(0),
                                 compact_fragments=False)
    assert meta["mining"]["version"] in stats.pinned_versions
    assert stats.versions_after < stats.versions_before  # the unpinned ones went
    kept = checkpoints.read_sample_weights(folder)
    assert hard_examples.rebuild_weights(folder) == kept and training.reproduce_order(folder) == order


def test_a_fine_tune_draws_each_clips_frames_by_its_run_config(trained_rider, tmp_path):
    """`clip_draw` from the UI's run config: the materialization shows the frames before and after
    the draw, and its row count stays the view's (what the retrain policy compares growth with)."""
    landing = tmp_path / "landing"
    synthetic.write_clip_batch(landing, "drawn", 2, 5, seed=1, val_fraction=0.0, width=320, height=180)
    footage = storage.connect(str(tmp_path / "lancedb"))
    ingest.ingest_batches(footage, landing)
    mode = FailureMode("drawn", "split = 'train'", ("pedestrian",), "every frame: a stand-in slice")
    workspace = Workspace(data_location=str(trained_rider.root))
    _write_views(storage.connect(workspace.lancedb_uri), footage.open_table(storage.FRAMES_TABLE).to_arrow(), mode.name)
    (checkpoint,) = [a for a in build_training_defs([mode]).assets if a.key == dg.AssetKey("drawn_checkpoint")]
    config = dg.RunConfig(ops={"drawn_checkpoint": FineTuneConfig(**TINY_TRAINING, selection_pct=0,
                                                                  clip_draw="stride:2")})
    meta = _metadata(dg.materialize([checkpoint], instance=trained_rider.instance, run_config=config,
                                    resources={"workspace": WorkspaceResource(data_location=workspace.data_location)}),
                     "drawn_checkpoint")
    assert meta["clip_draw"] == "stride:2" and meta["dagster/row_count"] == meta["frames_before_draw"] == 10
    assert meta["frames_after_draw"] == meta["train_rows"] == 6  # frames 0, 2 and 4 of each clip
    rows = footage.open_table(storage.FRAMES_TABLE).to_lance().to_table(columns=["image_id", "clip_frame_index"])
    on_stride = {r["image_id"] for r in rows.to_pylist() if r["clip_frame_index"] % 2 == 0}
    assert set(training.reproduce_order(Path(meta["checkpoint_dir"]))) == on_stride


def test_a_mode_input_size_raises_the_profile_and_run_config_still_wins():
    plain = TrainingConfig(profile="cpu")
    base = plain.resolve_profile(finetune=True)
    raised = plain.resolve_profile(finetune=True, min_input_size=448)
    assert (raised.min_size, raised.max_size) == (448, round(base.max_size * 448 / base.min_size))
    assert raised.replace(min_size=base.min_size, max_size=base.max_size) == base  # nothing else changes
    assert plain.resolve_profile(finetune=True, min_input_size=base.min_size // 2) == base  # never lowered
    explicit = TrainingConfig(profile="cpu", min_size=96, max_size=160)
    assert explicit.resolve_profile(finetune=True, min_input_size=448).min_size == 96


def test_a_mode_that_trains_on_tiles_gives_its_fine_tune_crops_of_the_tile_size_and_its_epochs():
    distant = get_mode("distant_person")
    assert distant.train_crop == distant.tiling.tile_size == distant.min_input_size  # crops go in unscaled
    profile = TrainingConfig(profile="cpu").mode_profile(distant)
    assert (profile.train_crop, profile.min_size, profile.epochs) == (448, 448, 6)
    assert TrainingConfig(profile="cpu", max_steps_per_epoch=3).mode_profile(distant) == profile.replace(
        max_steps_per_epoch=3)  # run config wins
    assert TrainingConfig(profile="cpu", epochs=3).resolve_profile(True, finetune_epochs=20).epochs == 3  # run config wins
    assert get_mode("rider").train_crop is None and get_mode("rider").finetune_epochs is None
    plain = TrainingConfig(profile="cpu").resolve_profile(True)
    assert plain.train_crop is None and plain.epochs == plain.finetune_epochs


@pytest.mark.dagster_run
def test_checkpoint_without_base_detector_fails_clearly(data_dir: Path):
    conn, _ = build_frames_table(data_dir, [("assets-b", 4, 2)])
    _write_views(conn, conn.open_table(storage.FRAMES_TABLE).to_arrow())
    (checkpoint_asset,) = [a for a in build_training_defs([MODE]).assets
                           if a.key == dg.AssetKey("tiny_checkpoint")]
    with dg.instance_for_test() as instance, pytest.raises(dg.Failure, match="base_detector"):
        dg.materialize([checkpoint_asset], instance=instance,
                       resources={"workspace": WorkspaceResource(data_location=str(data_dir))},
                       run_config=dg.RunConfig(ops={"tiny_checkpoint": TrainingConfig(**TINY_TRAINING)}))


def _metadata(result, asset: str) -> dict:
    (event,) = [m for m in result.asset_materializations_for_node(asset)]
    return {k: v.value for k, v in event.metadata.items()}
