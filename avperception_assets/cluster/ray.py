"""The Ray that Geneva backfills and view refreshes run on: started (or joined) by whoever runs
a stage (the Dagster resource in runs, a benchmark, a test session), never by a stage itself."""

from __future__ import annotations

from avperception_assets.patches import geneva as geneva_patches

# Run in each Ray worker process: import deferrals and Geneva's refresh patch (`patches`).
WORKER_SETUP = "avperception_assets.geneva_workarounds.setup_ray_worker"


def ray_context(ray_address: str | None = None, dashboard: bool = False):
    """Context manager for the Ray that Geneva backfills and view refreshes run on.

    No address: a local Ray on this machine, with Ray's dashboard UI only if `dashboard`.
    An address (`ray://host:10001`): the same jobs run on that cluster, which is how a deployment
    outgrows one machine. Its nodes run an image with this project installed, as the code
    location's is (`patches.geneva`, `geneva.ray_cluster`, says why).
    """
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP}
    if ray_address:
        return geneva_patches.remote_ray(ray_address, runtime_env)
    # The dashboard costs each local Ray start about 2.5 s (4.7 s against 7.2 s measured here)
    # and ten more processes; a run's Ray lives only as long as the run. (Ray 2.60 still starts
    # a dashboard head without it, minus the UI's module processes.)
    return geneva_patches.local_ray(runtime_env, include_dashboard=dashboard)


def require_ray(what: str) -> None:
    """Fail clearly when no Ray runs in this process: plain functions never start one."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"{what} run on Ray, and none is running: open cluster.ray.ray_context() around "
                           "the call (in Dagster runs the workspace resource does)")
