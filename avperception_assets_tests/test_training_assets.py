"""base_detector and <mode>_checkpoint materialized for real with dg.materialize on tiny tables."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest

from avperception_assets import loader, settings, storage, training
from avperception_assets.defs.resources import LanceDBResource
from avperception_assets.defs.training_assets import TrainingConfig, build_training_defs
from avperception_assets.failure_modes import FailureMode

from .conftest import build_frames_table

TINY = dict(profile="cpu", epochs=1, batch_size=2, max_steps_per_epoch=2, min_size=96, max_size=160)
MODE = FailureMode("tiny", "split = 'train'", ("pedestrian",), "every frame: a stand-in slice")


def _write_views(conn, frames) -> None:
    """Stand-in slice views: plain tables with the frames columns (the loader reads any table)."""
    for split in ("train", "val"):
        rows = frames.filter(pc.equal(frames["split"], split))
        conn.create_table(f"bdd100k_tiny_{split}", rows, storage_options=storage.STABLE_ROW_IDS)


def test_materialize_base_and_checkpoint_then_retrain_on_a_newer_view(data_dir: Path):
    conn, _ = build_frames_table(data_dir, [("assets-a", 12, 11)])
    uri = settings.lancedb_uri()
    frames = conn.open_table(storage.FRAMES_TABLE).to_arrow()
    _write_views(conn, frames)
    defs = build_training_defs([MODE])
    assets = list(defs.assets)
    (checkpoint_asset,) = [a for a in assets if a.key == dg.AssetKey("tiny_checkpoint")]
    assert checkpoint_asset.op.pool == "training"
    assert {dg.AssetKey("bdd100k_tiny_train"), dg.AssetKey("base_detector")} <= set(
        checkpoint_asset.asset_deps[dg.AssetKey("tiny_checkpoint")])
    resources = {"lancedb": LanceDBResource(uri=uri)}
    config = dg.RunConfig(ops={"base_detector": TrainingConfig(**TINY), "tiny_checkpoint": TrainingConfig(**TINY)})

    with dg.instance_for_test() as instance:
        result = dg.materialize(assets, resources=resources, run_config=config, instance=instance)
        assert result.success
        base_meta = _metadata(result, "base_detector")
        frames_version = conn.open_table(storage.FRAMES_TABLE).version
        assert base_meta["weights"] == str(settings.checkpoints_dir() / "base" / str(frames_version) / "best.pt")
        assert base_meta["train_filter"] == "split = 'train'" and base_meta["weights_source"] == "none"

        meta = _metadata(result, "tiny_checkpoint")
        view_version = loader.open_table(uri, "bdd100k_tiny_train").version
        out = settings.checkpoints_dir() / "tiny" / str(view_version)
        assert meta["train_view"] == "bdd100k_tiny_train" and meta["train_view_version"] == view_version
        assert meta["weights_source"] == base_meta["weights"]  # fine-tuned from the base detector
        assert meta["dagster/row_count"] == loader.open_table(uri, "bdd100k_tiny_train").count_rows()
        assert meta["hyper_parameters"]["lr"] == 0.01  # the cpu profile's fine-tune rate
        assert meta["checkpoint_dir"] == str(out) and (out / "best.pt").is_file()
        on_disk = training.read_metadata(out)
        assert on_disk["val_view"] == "bdd100k_tiny_val" and on_disk["best_val_map_50"] == meta["best_val_map_50"]

        # New rows reach the train view: a new version, a fresh run pinned to it.
        conn.open_table("bdd100k_tiny_train").add(frames.filter(pc.equal(frames["split"], "val")))
        again = dg.materialize(assets, resources=resources, instance=instance, selection=["tiny_checkpoint"],
                               run_config=dg.RunConfig(ops={"tiny_checkpoint": TrainingConfig(**TINY)}))
        assert again.success
        newer = _metadata(again, "tiny_checkpoint")
        assert newer["train_view_version"] > view_version and newer["resumed_from_epoch"] is None
        assert newer["checkpoint_dir"] != meta["checkpoint_dir"] and (out / "best.pt").is_file()


def test_a_mode_input_size_raises_the_profile_and_run_config_still_wins():
    plain = TrainingConfig(profile="cpu")
    base = plain.resolve_profile(finetune=True)
    raised = plain.resolve_profile(finetune=True, min_input_size=448)
    assert (raised.min_size, raised.max_size) == (448, round(base.max_size * 448 / base.min_size))
    assert raised.replace(min_size=base.min_size, max_size=base.max_size) == base  # nothing else changes
    assert plain.resolve_profile(finetune=True, min_input_size=base.min_size // 2) == base  # never lowered
    explicit = TrainingConfig(profile="cpu", min_size=96, max_size=160)
    assert explicit.resolve_profile(finetune=True, min_input_size=448).min_size == 96


def test_checkpoint_without_base_detector_fails_clearly(data_dir: Path):
    conn, _ = build_frames_table(data_dir, [("assets-b", 4, 2)])
    _write_views(conn, conn.open_table(storage.FRAMES_TABLE).to_arrow())
    (checkpoint_asset,) = [a for a in build_training_defs([MODE]).assets
                           if a.key == dg.AssetKey("tiny_checkpoint")]
    with dg.instance_for_test() as instance, pytest.raises(dg.Failure, match="base_detector"):
        dg.materialize([checkpoint_asset], instance=instance,
                       resources={"lancedb": LanceDBResource(uri=settings.lancedb_uri())},
                       run_config=dg.RunConfig(ops={"tiny_checkpoint": TrainingConfig(**TINY)}))


def _metadata(result, asset: str) -> dict:
    (event,) = [m for m in result.asset_materializations_for_node(asset)]
    return {k: v.value for k, v in event.metadata.items()}
