"""Training as torch.distributed processes: two gloo ranks started by torchrun share one epoch's
order and write one checkpoint; the asset trains in two processes through Dagster Pipes (the
logs and the materialization reach the run); two launchers as two nodes, the run's and one an
operator starts, train as one node of two processes does; a training process killed mid-epoch
is retried by the run and resumes from its last epoch, at the view version its first attempt
pinned."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest
import torch

from avperception_assets.model import checkpoints, detector, loader, training
from avperception_assets.model.recipe import Recipe
from avperception_assets.workspace import Workspace
from avperception_assets.storage import tables as storage
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.defs.training_assets import TrainingConfig, build_training_defs
from avperception_assets.failure_modes.registry import FailureMode

from .conftest import TINY_TRAINING, build_frames_table

pytestmark = pytest.mark.training  # torchrun ranks in subprocesses

# Two epochs of three one-frame steps a rank: a kill after a step of epoch 2 leaves two more
# steps before that epoch's checkpoint; each step logs, so the test sees it.
DDP_TRAINING = {**TINY_TRAINING, "epochs": 2, "batch_size": 1, "max_steps_per_epoch": 3, "log_every_steps": 1}


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


def _stand_in_mode(root: Path, name: str) -> FailureMode:
    """A mode `name` whose views are plain tables of each split's frames of the trained rider's
    table (the loader reads any table): every mode made so trains on the same frames."""
    conn = storage.connect(Workspace(data_location=str(root)).lancedb_uri)
    frames = conn.open_table(storage.FRAMES_TABLE).to_arrow()
    for split in ("train", "val"):
        conn.create_table(f"bdd100k_{name}_{split}", frames.filter(pc.equal(frames["split"], split)),
                          storage_options=storage.STABLE_ROW_IDS)
    return FailureMode(name, "split = 'train'", ("pedestrian",), "every frame: a stand-in slice")


def _materialize_checkpoint(trained_rider, mode: FailureMode, config: TrainingConfig) -> dg.ExecuteInProcessResult:
    key = f"{mode.name}_checkpoint"
    (checkpoint,) = [a for a in build_training_defs([mode]).assets if a.key == dg.AssetKey(key)]
    return dg.materialize([checkpoint], instance=trained_rider.instance, run_config=dg.RunConfig(ops={key: config}),
                          resources={"workspace": WorkspaceResource(data_location=str(trained_rider.root))})


def _checkpoint_dir(result: dg.ExecuteInProcessResult, mode: FailureMode) -> Path:
    [materialization] = result.asset_materializations_for_node(f"{mode.name}_checkpoint")
    return Path(materialization.metadata["checkpoint_dir"].value)


def _run_logs(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id)]


def _wait_for_log(instance: dg.DagsterInstance, fragment: str, timeout: float = 300) -> str:
    """The first log message holding `fragment` of the run in progress (this module runs one at a time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
            if found := [m for m in _run_logs(instance, run.run_id) if fragment in m]:
                return found[0]
        time.sleep(0.1)
    raise TimeoutError(f"no log message of a run in progress holds {fragment!r} after {timeout} s")


@pytest.fixture(scope="module")
def one_node_two_processes(trained_rider):
    """Mode `onenode`'s checkpoint, trained by the asset in two processes on one node: the run
    the two-node and the killed runs are held to."""
    mode = _stand_in_mode(trained_rider.root, "onenode")
    result = _materialize_checkpoint(trained_rider, mode, TrainingConfig(**DDP_TRAINING, processes_per_node=2))
    return result, _checkpoint_dir(result, mode)


def test_the_asset_trains_in_two_processes(trained_rider, one_node_two_processes):
    result, out = one_node_two_processes
    [materialization] = result.asset_materializations_for_node("onenode_checkpoint")
    metadata = checkpoints.read_metadata(out)
    assert materialization.metadata["world_size"].value == 2 and metadata["status"] == "complete"
    assert materialization.metadata["epoch_loss"].value == [round(e["loss"], 4) for e in metadata["epochs"]]
    for epoch in metadata["epochs"]:  # each rank trained its own 3 frames of the epoch's order
        assert epoch["steps"] == 3 and epoch["images"] == 6 <= metadata["train_rows"]
    logs = _run_logs(trained_rider.instance, result.run_id)
    assert any("epoch 2 step 3/3" in m for m in logs) and any("epoch 2/2 saved" in m for m in logs)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launcher_pids(out: Path, command: bytes = b"launch") -> list[int]:
    """The training processes this machine runs for the checkpoint folder `out` (whose run.json
    they read): torchrun's launchers (`launch`) or their ranks (`train`), never another run's."""
    found, folder = [], str(out).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"avperception_assets.training_worker" in args and command in args
                and any(arg.startswith(folder) for arg in args)):
            found.append(int(cmdline.parent.name))
    return found


def _same_run(out: Path, reference: Path) -> None:
    """`out` trained as `reference` did: the epochs' losses (over both ranks) and every weight.
    The two runs do the same arithmetic (seed, initial weights, shards, one intra-op thread per
    process), and gloo sums two ranks' gradients order-free (a + b = b + a), so they agree to the
    bit here; rel 1e-6 allows only for float summation order (another gloo, another CPU kernel),
    while a skipped or repeated step, a wrong shard or another seed moves an epoch's loss by
    1e-2 or more (epoch 1 to 2 here: about 1e-1)."""
    ran, expected = checkpoints.read_metadata(out), checkpoints.read_metadata(reference)
    assert [e["loss"] for e in ran["epochs"]] == pytest.approx([e["loss"] for e in expected["epochs"]], rel=1e-6)
    weights, expected_weights = (torch.load(folder / checkpoints.LAST_FILE) for folder in (out, reference))
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected_weights[name], rtol=1e-6, atol=1e-6, msg=name)


def test_two_nodes_of_one_process_train_as_one_node_of_two(trained_rider, one_node_two_processes, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun gives two processes on one node
    mode = _stand_in_mode(trained_rider.root, "twonode")
    workspace = Workspace(data_location=str(trained_rider.root))
    out = workspace.checkpoints_dir_for("twonode") / str(loader.open_table(workspace.lancedb_uri,
                                                                           "bdd100k_twonode_train").version)
    config = TrainingConfig(**DDP_TRAINING, nodes=2, rendezvous_endpoint=f"127.0.0.1:{_free_port()}")
    materialized = {}
    run = threading.Thread(target=lambda: materialized.update(
        result=_materialize_checkpoint(trained_rider, mode, config)))
    run.start()
    node_1 = None
    try:
        message = _wait_for_log(trained_rider.instance, "start each with: ")
        command = shlex.split(message.split("start each with: ", 1)[1])
        assert command[:3] == ["python", "-m", "avperception_assets.training_worker"] and str(out) in command
        # The operator's launcher on "the second machine". Its address sorts before this machine's
        # name, so c10d's rendezvous ranks its process 0, as it would a second machine whose
        # name sorts first: the run's process must lead anyway, or nothing reports to the run.
        node_1 = subprocess.Popen([sys.executable, *command[1:], "--local-addr=127.0.0.1"], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        node_1_output, _ = node_1.communicate(timeout=600)
    finally:
        if node_1 is not None and node_1.poll() is None:
            node_1.kill()
        if node_1 is None or node_1.returncode != 0:  # else node 0's launcher waits minutes for its rendezvous
            for pid in _launcher_pids(out):
                os.kill(pid, signal.SIGKILL)
        run.join()
    assert node_1.returncode == 0, node_1_output
    assert "[rank 0] epoch 1 step 1/3" in node_1_output  # node 1 held global rank 0 (it prints its steps)
    result = materialized["result"]
    assert result.success
    [materialization] = result.asset_materializations_for_node("twonode_checkpoint")
    assert materialization.metadata["world_size"].value == 2
    assert any("epoch 2/2 saved" in m for m in _run_logs(trained_rider.instance, result.run_id))  # the leader's, via Pipes
    _same_run(_checkpoint_dir(result, mode), one_node_two_processes[1])


def _kill_rank_1_mid_epoch_2(instance, out: Path, killed: list, then) -> None:
    """Once the leader has logged epoch 2's first step: SIGKILL rank 1, recording how many epochs
    were saved then, and call `then`."""
    _wait_for_log(instance, "epoch 2 step 1/3")
    epochs_saved = len(checkpoints.read_metadata(out)["epochs"])
    for pid in _launcher_pids(out, b"train"):
        if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            os.kill(pid, signal.SIGKILL)
            killed.append(epochs_saved)
    then()


def test_a_training_process_killed_mid_epoch_fails_its_attempt_and_the_retry_resumes(trained_rider,
                                                                                      one_node_two_processes):
    mode = _stand_in_mode(trained_rider.root, "killed")
    workspace = Workspace(data_location=str(trained_rider.root))
    train = loader.open_table(workspace.lancedb_uri, "bdd100k_killed_train")
    out = workspace.checkpoints_dir_for("killed") / str(train.version)
    killed: list[int] = []

    def grow():  # before the retry (5 s later) the view gains a version, as a refresh between attempts would
        conn = storage.connect(workspace.lancedb_uri)
        conn.open_table("bdd100k_killed_train").add(conn.open_table(storage.FRAMES_TABLE).to_arrow().slice(0, 1))

    watcher = threading.Thread(target=_kill_rank_1_mid_epoch_2, args=(trained_rider.instance, out, killed, grow))
    watcher.start()
    result = _materialize_checkpoint(trained_rider, mode, TrainingConfig(**DDP_TRAINING, processes_per_node=2))
    watcher.join()
    assert killed == [1], "rank 1 was not killed after epoch 1 was saved and before epoch 2 was"
    assert result.success
    retries = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert len(retries) == 1 and "died" in retries[0].event_specific_data.error.to_string()
    [materialization] = result.asset_materializations_for_node("killed_checkpoint")
    assert materialization.metadata["resumed_from_epoch"].value == 1  # epoch 1 was not trained again
    assert materialization.metadata["train_view_version"].value == train.version  # the first attempt's
    assert loader.open_table(workspace.lancedb_uri, "bdd100k_killed_train").version > train.version
    assert materialization.metadata["world_size"].value == 2
    logs = _run_logs(trained_rider.instance, result.run_id)
    assert any("epoch 2/2 saved" in m for m in logs)  # the trainer's log lines, through Pipes
    _same_run(out, one_node_two_processes[1])  # epoch 2 started over from epoch 1's checkpoint, as if never killed


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
