"""Runs whose worker process died (SIGKILL, OOM killer, a closed laptop) stay STARTED and keep
the pool slots they claimed, so every later ingestion, backfill and refresh waits on
`lancedb_writes` forever. Dagster's run monitoring cannot see this with the default run
launcher (it has no worker health check), so we check ourselves: a STARTED run whose worker
process is gone is marked failed with the reason and its slots are freed. The local Ray
the run had started outlives it: its agents and idle workers are re-parented, not killed (Ray
2.60.0: `ray::DashboardAgent`, `ray::RuntimeEnvAgent` and workers still alive minutes after a
SIGKILL, holding memory), so they are killed with the run.

The check runs when any run starts (the `workspace` resource, so the command line is covered
without a daemon) and on `dead_run_sensor` under the daemon. It assumes run workers on this
machine (the default run launcher, `dagster asset materialize`); a deployment whose runs
execute elsewhere (Kubernetes, ECS, Docker launchers) relies on run monitoring instead
and turns the workspace's `dead_run_check` off.
"""

import contextlib
import os
import re
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
from dagster._core.events import DagsterEventType, JobFailureData, RunFailureReason


def ray_processes_of(worker_pid: int) -> list[int]:
    """Live processes of the local Ray that the (dead) process `worker_pid` started. Ray names a
    session's directory after its driver's pid (`session_<date>_<pid>`) and every Ray process
    keeps its log files there open (the agents get an environment of Ray's own, so an
    environment variable cannot mark them)."""
    session = re.compile(rf"/session_[^/]+_{worker_pid}/")
    found = []
    for fds in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(session.search(os.readlink(fd)) for fd in fds.iterdir()):
                found.append(int(fds.parent.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def kill_ray_of(worker_pid: int) -> list[int]:
    """SIGKILL the local Ray a dead run worker left running; returns the pids killed. Nothing is
    killed while a live process holds `worker_pid` again: its own Ray's session would match."""
    if process_alive(worker_pid, time.time()):
        return []
    killed = []
    for pid in ray_processes_of(worker_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


def process_alive(pid: int, started_by: float) -> bool:
    """Whether process `pid` exists, is not a zombie and started by `started_by` (a later
    process that reused the pid is not the run's worker)."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.parent.exists():  # not Linux: existence is all we can tell
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    state, start_ticks = fields[0], int(fields[19])
    started = _boot_time() + start_ticks / os.sysconf("SC_CLK_TCK")
    return state != "Z" and started <= started_by + 1.0


def _worker(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, timestamp) of the run's RUN_START event: the process that executes it."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.RUN_START, limit=1).records
    if not records:
        return None
    entry = records[0].event_log_entry
    pid = entry.dagster_event.pid if entry.dagster_event else None
    return None if pid is None else (pid, entry.timestamp)


def fail_dead_runs(instance: dg.DagsterInstance, exclude_run_id: str | None = None) -> list[str]:
    """Mark every STARTED run whose worker process is gone as failed, free its pool slots;
    returns their run ids."""
    failed = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        worker = None if run.run_id == exclude_run_id else _worker(instance, run.run_id)
        if worker is None or process_alive(*worker):
            continue
        pid, _ = worker
        left = kill_ray_of(pid)
        instance.report_run_failed(
            run, message=f"run worker process {pid} is gone (killed?): marked failed, {len(left)} processes it "
                         "had started killed, and its pool slots freed so later runs can proceed",
            job_failure_data=JobFailureData(error=None, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION))
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        failed.append(run.run_id)
    return failed


def kill_ray_of_failed_runs(instance: dg.DagsterInstance, within_s: float = 3600.0) -> list[int]:
    """Kill the local Ray left by runs that failed or were canceled in the last `within_s`
    seconds: under `dagster dev` the code server fails a killed run itself (so it is never
    STARTED here), but not what the run had started. Returns the pids killed."""
    ended = dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED],
                          updated_after=datetime.fromtimestamp(time.time() - within_s, timezone.utc))
    killed = []
    for run in instance.get_runs(filters=ended):
        worker = _worker(instance, run.run_id)
        if worker is not None:
            killed += kill_ray_of(worker[0])
    return killed


@dg.sensor(name="dead_run_sensor", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           required_resource_keys={"workspace"},  # not a typed parameter: the resource's module imports this one
           description="Marks runs whose worker process died as failed, frees their pool slots and kills the "
                       "local Ray they left.")
def dead_run_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    if not context.resources.workspace.dead_run_check:
        return dg.SkipReason("the workspace's dead-run check is off")
    failed, leftovers = fail_dead_runs(context.instance), kill_ray_of_failed_runs(context.instance)
    done = ([f"marked failed (worker gone): {failed}"] if failed else []) + (
        [f"killed {len(leftovers)} processes of the local Ray that ended runs left"] if leftovers else [])
    return dg.SkipReason("; ".join(done) or "no dead run")


defs = dg.Definitions(sensors=[dead_run_sensor])
