"""The shared Ray head (`cluster.head`, `make ray`): runs attach to it as drivers, a run that
finds it gone fails naming it (or starts a local Ray, as configured), run recovery leaves it
running, and Geneva jobs leave its CPUs free.

Drivers here are processes of their own, as runs are: this test process may hold the session's
local Ray, and one process attaches to one Ray at a time."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import pytest

from avperception_assets import synthetic
from avperception_assets.cluster import head as shared_head
from avperception_assets.cluster.processes import kill_ray_of, process_alive, ray_processes_of
from avperception_assets.cluster.ray import RayHeadUnreachable, ray_context
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.defs.run_recovery import dead_run_sensor
from avperception_assets_tests.conftest import free_ports
from avperception_assets_tests.test_run_recovery import run_logging

pytestmark = pytest.mark.ray

HEAD_CPUS = 2
JOBS = 20  # each leaked JobTracker would hold 0.1 CPU: 20 of them all of the head's 2
DAGSTER = str(Path(sys.executable).with_name("dagster"))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head():
    port, client_port = free_ports(2)
    temp_dir = Path(tempfile.mkdtemp(prefix="avph", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        yield shared_head.start_head(port, num_cpus=HEAD_CPUS, client_port=client_port, temp_dir=temp_dir)
    finally:
        shared_head.stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _head_processes(head: shared_head.Head) -> set[int]:
    return set(shared_head._group(head.pid))


def _driver_logs(head: shared_head.Head, pid: int) -> list[Path]:
    """Ray's log of a driver process attached to the head (`python-core-driver-<job>_<pid>.log`)."""
    return list(head.temp_dir.glob(f"session_*/logs/python-core-driver-*_{pid}.log"))


def _in_a_driver_process(target, *args) -> None:
    """Run `target(*args)` in a process of its own, as a run is, without RAY_AUTH_MODE in its
    environment (the token is found as `patches.ray` finds it)."""
    saved = os.environ.pop("RAY_AUTH_MODE", None)
    try:
        process = multiprocessing.get_context("spawn").Process(target=target, args=args)
        process.start()
    finally:
        if saved is not None:
            os.environ["RAY_AUTH_MODE"] = saved
    process.join(600)
    assert process.exitcode == 0, f"the driver process failed (exit code {process.exitcode})"


# --- a head that is gone -------------------------------------------------------------------


def test_a_run_that_finds_no_head_fails_naming_the_address_and_the_command():
    [port] = free_ports(1)
    with pytest.raises(RayHeadUnreachable, match=rf"127\.0\.0\.1:{port} \(AVP_RAY_ADDRESS\): start it with make ray"):
        with ray_context(f"127.0.0.1:{port}"):
            pass


def _fall_back(address: str, out: str) -> None:
    import ray

    with ray_context(address, fallback="local"):
        Path(out).write_text(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                                         "cpus": ray.cluster_resources().get("CPU")}))


def test_a_run_configured_to_fall_back_starts_a_local_ray(tmp_path):
    [port] = free_ports(1)
    _in_a_driver_process(_fall_back, f"127.0.0.1:{port}", str(tmp_path / "ray.json"))
    ran_on = json.loads((tmp_path / "ray.json").read_text())
    assert ran_on["cpus"] and not ran_on["gcs"].endswith(f":{port}")


# --- run recovery --------------------------------------------------------------------------


@pytest.mark.dagster_run
def test_run_recovery_leaves_the_shared_head_running(head, tmp_path):
    data, home = tmp_path / "data", tmp_path / "dagster_home"
    home.mkdir()
    synthetic.write_batch(data / "landing", "b1", 60, seed=3, width=320, height=180)
    env = {**os.environ, "DAGSTER_HOME": str(home), "AVP_DATA_DIR": str(data), "AVP_RAY_ADDRESS": head.address}
    before = _head_processes(head)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = subprocess.Popen([DAGSTER, "asset", "materialize", "-m", "avperception_assets.definitions",
                                "--select", "raw_frames,dhash"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_id = run_logging(instance, run, "dhash: backfilling")
        assert _driver_logs(head, run.pid), "the run did not attach to the head as a driver"
        run.send_signal(signal.SIGKILL)
        run.wait()
        with dg.build_sensor_context(instance=instance, resources={
                "workspace": WorkspaceResource(data_location=str(data), ray_address=head.address)}) as context:
            dead_run_sensor.evaluate_tick(context)
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert shared_head.running_head(head.temp_dir) == head
    assert before <= _head_processes(head), "run recovery killed processes of the shared head"


def test_a_head_session_older_than_the_run_is_never_taken_for_the_runs_ray(head):
    """A run worker can get the pid the head's session is named after once `ray start` exits
    (a head started without --block): that session predates the run, so it is left alone."""
    assert set(ray_processes_of(head.pid)) & _head_processes(head)  # the session the pid names
    assert ray_processes_of(head.pid, started_after=time.time()) == []
    assert kill_ray_of(head.pid, started_after=0.0) == []  # its `ray start --block` still runs
    assert process_alive(head.pid, head.started)


# --- many Geneva jobs on one head ----------------------------------------------------------


def _backfill_jobs(address: str, root: str, jobs: int, out: str) -> None:
    """`jobs` dhash backfills of a small table, one after another, attached to the head."""
    import ray

    from avperception_assets.curation import columns as curation
    from avperception_assets.ingest import frames as ingest
    from avperception_assets.storage import tables as storage

    synthetic.write_batch(Path(root) / "landing", "b1", 6, seed=4, width=320, height=180)
    conn = storage.connect(str(Path(root) / "lancedb"))
    ingest.ingest_batches(conn, Path(root) / "landing")
    table = conn.open_table(storage.FRAMES_TABLE)
    config = curation.CurationConfig(recompute=("dhash",), concurrency=1)
    with ray_context(address):
        job_ids = [curation.backfill_columns(table, columns=["dhash"], config=config)["dhash"].job_id
                   for _ in range(jobs)]
        deadline = time.monotonic() + 60  # Ray reports an ended job's resources back within a second
        while ray.available_resources().get("CPU", 0) < HEAD_CPUS and time.monotonic() < deadline:
            time.sleep(0.5)
        result = {"jobs": len(set(job_ids)), "free_cpus": ray.available_resources().get("CPU", 0),
                  "filled": table.count_rows("dhash IS NOT NULL"), "rows": table.count_rows(),
                  "ray_client": ray.util.client.ray.is_connected(), "pid": os.getpid()}
    Path(out).write_text(json.dumps(result))


def test_twenty_geneva_jobs_on_one_head_leave_its_cpus_free(head, tmp_path):
    _in_a_driver_process(_backfill_jobs, head.address, str(tmp_path), JOBS, str(tmp_path / "jobs.json"))
    result = json.loads((tmp_path / "jobs.json").read_text())
    assert result["jobs"] == JOBS and result["filled"] == result["rows"] == 6
    assert result["free_cpus"] == HEAD_CPUS
    assert not result["ray_client"] and _driver_logs(head, result["pid"])  # a driver, not Ray Client


# --- patches.ray's symptom -------------------------------------------------------------------

ATTACH_UNPATCHED = """
import sys, ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR")
except ConnectionError:
    print("refused")
else:
    print("attached")
"""


@pytest.mark.fresh_interpreter
def test_a_driver_given_the_address_sends_no_token_unless_told(head):
    """Ray 2.60 turns a found token on only for address None or "auto" (`patches.ray`)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    result = subprocess.run([sys.executable, "-c", ATTACH_UNPATCHED, head.address], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.split()[-1:] == ["refused"], (
        f"a driver given the address attaches with the token now: delete patches.ray\n{result.stderr[-2000:]}")
