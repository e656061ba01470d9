"""Runs whose worker process died (SIGKILL, OOM killer, a closed laptop) stay STARTED and keep
the pool slots they claimed, so every later ingestion, backfill and refresh waits on
`lancedb_writes` forever. Dagster's run monitoring cannot see this with the default run
launcher (it has no worker health check), so we check ourselves: a STARTED run whose worker
process is gone is marked failed with the reason and its slots are freed. The local Ray
the run had started outlives it, so it is killed with the run (`cluster.processes`); a shared
Ray head that runs attach to (`make ray`) is left running.

The check runs when any run starts (the `workspace` resource, so the command line is covered
without a daemon) and on `dead_run_sensor` under the daemon. It assumes run workers on this
machine (the default run launcher, `dagster asset materialize`); a deployment whose runs
execute elsewhere (Kubernetes, ECS, Docker launchers) relies on run monitoring instead
and turns the workspace's `dead_run_check` off.
"""

import time
from datetime import datetime, timezone

import dagster as dg

from avperception_assets.cluster.processes import kill_ray_of, process_alive
from avperception_assets.patches import dagster as dagster_patches


def _worker(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, timestamp) of the run's RUN_START event: the process that executes it."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
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
        pid, started = worker
        left = kill_ray_of(pid, started_after=started)
        dagster_patches.report_run_failed(
            instance, run, f"run worker process {pid} is gone (killed?): marked failed, {len(left)} processes it "
                           "had started killed, and its pool slots freed so later runs can proceed")
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
            killed += kill_ray_of(*worker)
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
