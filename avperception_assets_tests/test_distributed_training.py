"""Training as torch.distributed processes: two gloo ranks started by torchrun share one epoch's
order and write one checkpoint; through Dagster Pipes the logs and the materialization reach
the run; a killed training process is retried by the run and resumes from its last epoch, at
the view version its first attempt pinned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest

from avperception_assets.model import checkpoints, detector, loader, training
from avperception_assets.model.recipe import Recipe
from avperception_assets.workspace import Workspace
from avperception_assets.storage import tables as storage
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.defs.training_assets import TrainingConfig, build_training_defs
from avperception_assets.failure_modes.registry import FailureMode

from .conftest import TINY_TRAINING, build_frames_table

pytestmark = pytest.mark.training  # torchrun ranks in subprocesses


def _two_ranks(tmp_path: Path, **profile) -> tuple[Path, dict]:
    build_frames_table(tmp_path, [("ddp-a", 14, 6)])
    uri = str(tmp_path / "lancedb")
    view = loader.pin_view(uri, storage.FRAMES_TABLE, where="split = 'train'")
    recipe = Recipe.on(view, detector.get_profile(
        "cpu", **{"batch_size": 2, "min_size": 96, "max_size": 160, "epochs": 1, "warmup_steps": 0,
                  "max_steps_per_epoch": None, **profile}), seed=4)
    out = tmp_path / "ckpt"
    out.mkdir()
    run_file = checkpoints.write_run(out, recipe, None)
    launched = subprocess.run(
        [sys.executable, "-m", "avperception_assets.training_worker", "launch", str(run_file), str(out),
         "--standalone", "--nproc-per-node=2"], capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    return out, checkpoints.read_metadata(out)


def test_two_gloo_ranks_cover_the_epoch_once_and_write_one_checkpoint(tmp_path):
    out, metadata = _two_ranks(tmp_path)
    assert metadata["world_size"] == 2 and metadata["status"] == "complete"
    [epoch] = metadata["epochs"]
    assert epoch["images"] == metadata["train_rows"]  # every position trained on, by one rank or the other
    assert metadata["selection_rows"] > 0 and epoch["val_map_50"] is not None  # scored by the leader alone
    whole = training.reproduce_order(out)
    ranks = [training.reproduce_order(out, rank=r) for r in (0, 1)]
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2]  # each position to exactly one rank
    assert sorted(ranks[0] + ranks[1]) == sorted(whole) and not set(ranks[0]) & set(ranks[1])
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt", "train_state.pt"]
    checkpoints.load_checkpoint(out)  # rank 0's state_dict, without DDP's `module.` prefix
    cli = subprocess.run([sys.executable, "-m", "avperception_assets.model.training", "reproduce", str(out), "--rank", "1"],
                         capture_output=True, text=True, check=True)
    assert cli.stdout.splitlines()[1:] == ranks[1] and "rank 1 of 2" in cli.stdout


def _worker_pids(out: Path) -> list[int]:
    """The training ranks torchrun started for the checkpoint folder `out` (whose run.json they
    read): never another run's on the same machine."""
    found, folder = [], str(out).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"avperception_assets.training_worker" in args and b"train" in args and b"launch" not in args
                and any(arg.startswith(folder) for arg in args)):
            found.append(int(cmdline.parent.name))
    return found


def _kill_after_first_epoch(out: Path, killed: list, then) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metadata = out / checkpoints.METADATA_FILE
        if metadata.is_file() and len(json.loads(metadata.read_text())["epochs"]) == 1:
            for pid in _worker_pids(out):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            then()
            return
        time.sleep(0.05)


def test_a_killed_training_process_fails_its_attempt_and_the_retry_resumes(trained_rider):
    workspace = Workspace(data_location=str(trained_rider.root))
    mode = FailureMode("killed", "split = 'train'", ("pedestrian",), "every frame: a stand-in slice")
    conn = storage.connect(workspace.lancedb_uri)
    frames = conn.open_table(storage.FRAMES_TABLE).to_arrow()
    for split in ("train", "val"):
        conn.create_table(f"bdd100k_killed_{split}", frames.filter(pc.equal(frames["split"], split)),
                          storage_options=storage.STABLE_ROW_IDS)
    train = loader.open_table(workspace.lancedb_uri, "bdd100k_killed_train")
    out = workspace.checkpoints_dir_for("killed") / str(train.version)
    killed: list[int] = []

    def grow():  # before the retry (5 s later) the view gains a version, as a refresh between attempts would
        conn.open_table("bdd100k_killed_train").add(frames.slice(0, 1))

    watcher = threading.Thread(target=_kill_after_first_epoch, args=(out, killed, grow))
    watcher.start()
    (checkpoint,) = [a for a in build_training_defs([mode]).assets if a.key == dg.AssetKey("killed_checkpoint")]
    config = TrainingConfig(**{**TINY_TRAINING, "epochs": 2})
    result = dg.materialize([checkpoint], instance=trained_rider.instance, run_config=dg.RunConfig(
        ops={"killed_checkpoint": config}), resources={"workspace": WorkspaceResource(data_location=workspace.data_location)})
    watcher.join()
    assert killed, "no training process was killed"
    assert result.success
    retries = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert len(retries) == 1 and "died" in retries[0].event_specific_data.error.to_string()
    [materialization] = result.asset_materializations_for_node("killed_checkpoint")
    assert materialization.metadata["resumed_from_epoch"].value == 1  # epoch 1 was not trained again
    assert materialization.metadata["train_view_version"].value == train.version  # the first attempt's
    assert loader.open_table(workspace.lancedb_uri, "bdd100k_killed_train").version > train.version
    assert materialization.metadata["world_size"].value == 1
    logs = [e.user_message for e in trained_rider.instance.all_logs(result.run_id)]
    assert any("epoch 2/2 saved" in m for m in logs)  # the trainer's log lines, through Pipes
    assert len(checkpoints.read_metadata(out)["epochs"]) == 2


def test_several_nodes_need_a_rendezvous_endpoint(trained_rider):
    (base,) = [a for a in build_training_defs([]).assets if a.key == dg.AssetKey("base_detector")]
    with pytest.raises(dg.Failure, match="rendezvous_endpoint"):
        dg.materialize([base], instance=trained_rider.instance, resources={
            "workspace": WorkspaceResource(data_location=str(trained_rider.root))}, run_config=dg.RunConfig(
            ops={"base_detector": TrainingConfig(**TINY_TRAINING, nodes=2)}))


def test_a_runs_own_error_fails_clearly_without_a_retry(trained_rider):
    workspace = Workspace(data_location=str(trained_rider.root))
    mode = FailureMode("empty", "split = 'none'", ("pedestrian",), "no frame: an empty slice")
    conn = storage.connect(workspace.lancedb_uri)
    frames = conn.open_table(storage.FRAMES_TABLE).to_arrow()
    conn.create_table("bdd100k_empty_train", frames.slice(0, 0), storage_options=storage.STABLE_ROW_IDS)
    conn.create_table("bdd100k_empty_val", frames.slice(0, 2), storage_options=storage.STABLE_ROW_IDS)
    (checkpoint,) = [a for a in build_training_defs([mode]).assets if a.key == dg.AssetKey("empty_checkpoint")]
    result = dg.materialize([checkpoint], instance=trained_rider.instance, raise_on_error=False,
                            resources={"workspace": WorkspaceResource(data_location=workspace.data_location)},
                            run_config=dg.RunConfig(ops={"empty_checkpoint": TrainingConfig(**TINY_TRAINING)}))
    assert not result.success
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "bdd100k_empty_train" in failure.step_failure_data.error.to_string()
    assert "has no training rows" in failure.step_failure_data.error.to_string()
