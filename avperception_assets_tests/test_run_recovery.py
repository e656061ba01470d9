"""A run killed with SIGKILL in the middle of ingestion or of a backfill stays STARTED and keeps
its `lancedb_writes` pool slot. Under the daemon `dead_run_sensor`, from the command line the
next run itself, marks it failed with the reason and frees the slot; the batch then lands
whole, and the column is filled once."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from avperception_assets.ingest import checks as ingest_checks
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from avperception_assets.defs.names import LANCEDB_WRITES_POOL
from avperception_assets.cluster.processes import process_alive
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.defs.run_recovery import dead_run_sensor

REPO = Path(__file__).resolve().parents[1]
DAGSTER = str(Path(sys.executable).with_name("dagster"))
FRAMES = 240


def test_process_alive_tells_a_live_process_from_a_dead_or_later_one():
    assert process_alive(os.getpid(), time.time())
    assert not process_alive(os.getpid(), time.time() - 3600)  # started after the run: a reused pid
    child = subprocess.Popen(["true"])
    child.wait()
    assert not process_alive(child.pid, time.time())


@pytest.fixture
def deployment(tmp_path):
    """A DAGSTER_HOME with the project's dagster.yaml (one slot per pool) and a landed batch."""
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    synthetic.write_batch(data / "landing", "big", FRAMES, seed=5, width=640, height=360)
    env = {**os.environ, "DAGSTER_HOME": str(home), "AVP_DATA_DIR": str(data)}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance, env, data


def _materialize(env, select: str = "raw_frames") -> subprocess.Popen:
    return subprocess.Popen([DAGSTER, "asset", "materialize", "-m", "avperception_assets.definitions",
                             "--select", select], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _kill_while_holding_the_slot(instance, env) -> str:
    """Start an ingestion run and SIGKILL it as soon as its step holds the pool slot."""
    process = _materialize(env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        claimed = instance.event_log_storage.get_concurrency_info(LANCEDB_WRITES_POOL).claimed_slots
        if claimed:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return claimed[0].run_id
        assert process.poll() is None, f"the run ended before it could be killed:\n{process.stdout.read()}"
        time.sleep(0.02)
    raise AssertionError("the run never claimed its pool slot")


def _resources(data: Path, **settings) -> dict:
    return {"workspace": WorkspaceResource(data_location=str(data), **settings)}


def test_the_check_is_off_where_the_workspace_turns_it_off(tmp_path):
    with dg.instance_for_test() as instance, \
            dg.build_sensor_context(instance=instance, resources=_resources(tmp_path, dead_run_check=False)) as context:
        assert "off" in dead_run_sensor.evaluate_tick(context).skip_message  # as the daemon evaluates it


def _frames(data: Path) -> int:
    conn = storage.connect(str(data / "lancedb"))
    return conn.open_table(storage.FRAMES_TABLE).count_rows() if storage.table_exists(conn, storage.FRAMES_TABLE) else 0


def _failure_message(instance, run_id: str) -> str:
    [record] = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    return record.event_log_entry.dagster_event.message


@pytest.mark.dagster_run
def test_a_killed_run_is_failed_its_slot_freed_and_the_batch_lands_whole(deployment):
    instance, env, data = deployment
    # Killed once: the daemon's sensor finds the dead run.
    dead = _kill_while_holding_the_slot(instance, env)
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.STARTED  # what a kill leaves
    assert _frames(data) in (0, FRAMES)  # one commit per batch: all or nothing
    with dg.build_sensor_context(instance=instance, resources=_resources(data)) as context:
        dead_run_sensor.evaluate_tick(context)
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
    assert "is gone" in _failure_message(instance, dead)
    assert instance.get_run_by_id(dead).tags["dagster/failure_reason"] == "UNEXPECTED_TERMINATION"
    assert not instance.event_log_storage.get_concurrency_info(LANCEDB_WRITES_POOL).claimed_slots

    # Killed again: from the command line, with no daemon, the next run frees the slot itself.
    dead = _kill_while_holding_the_slot(instance, env)
    process = _materialize(env)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
    assert "is gone" in _failure_message(instance, dead)
    table = storage.connect(str(data / "lancedb")).open_table(storage.FRAMES_TABLE)
    assert table.count_rows() == FRAMES and not ingest_checks.duplicate_image_ids(table)


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (a run's local Ray: GCS, raylet, workers, actors)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def run_logging(instance, process: subprocess.Popen, text: str) -> str:
    """The id of the started run once one of its log messages contains `text`."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
            if any(text in (entry.user_message or "") for entry in instance.all_logs(run.run_id)):
                return run.run_id
        assert process.poll() is None, f"the run ended before it could be killed:\n{process.stdout.read()}"
        time.sleep(0.2)
    raise AssertionError(f"no run logged {text!r}")


@pytest.mark.ray
@pytest.mark.dagster_run
def test_a_run_killed_during_a_backfill_takes_its_ray_along_and_the_next_run_fills_the_column(deployment):
    instance, env, data = deployment
    process = _materialize(env, "raw_frames,dhash")
    dead = run_logging(instance, process, "dhash: backfilling")
    ray = _descendants(process.pid)
    assert ray, "the run started no local Ray"
    process.send_signal(signal.SIGKILL)
    process.wait()
    table = storage.connect(str(data / "lancedb")).open_table(storage.FRAMES_TABLE)
    assert table.count_rows() == FRAMES and table.count_rows("dhash IS NOT NULL") < FRAMES  # killed mid-backfill

    with dg.build_sensor_context(instance=instance, resources=_resources(data)) as context:  # the daemon's sensor
        dead_run_sensor.evaluate_tick(context)
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
    assert "processes it had started killed" in _failure_message(instance, dead)
    assert not instance.event_log_storage.get_concurrency_info(LANCEDB_WRITES_POOL).claimed_slots
    deadline = time.monotonic() + 30
    while [pid for pid in ray if process_alive(pid, time.time())] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in ray if process_alive(pid, time.time())], "the killed run's Ray outlived it"
    process = _materialize(env, "dhash")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    table.checkout_latest()
    assert table.count_rows() == table.count_rows("dhash IS NOT NULL") == FRAMES
    assert not ingest_checks.duplicate_image_ids(table)
