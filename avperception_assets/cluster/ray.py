"""The Ray that Geneva backfills and view refreshes run on: started (or joined) by whoever runs
a stage (the Dagster resource in runs, a benchmark, a test session), never by a stage itself."""

from __future__ import annotations

import logging
import socket

from avperception_assets.patches import geneva as geneva_patches
from avperception_assets.patches import ray as ray_patches
from avperception_assets.workspace import variable_for

log = logging.getLogger(__name__)

# Run in each Ray worker process: import deferrals and Geneva's refresh patch (`patches`).
WORKER_SETUP = "avperception_assets.geneva_workarounds.setup_ray_worker"
START_HEAD = "make ray (python -m avperception_assets.ray_head start)"


class RayHeadUnreachable(RuntimeError):
    """No Ray head answers at the configured address (the message names it and how to start one)."""


def head_answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts connections at a GCS address `host:port`: a head that is gone
    refuses at once, where `ray.init` given a dead address did not return within 10 minutes
    here (Ray 2.60)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def ray_context(ray_address: str | None = None, dashboard: bool = False, fallback: str = "fail"):
    """Context manager for the Ray that Geneva backfills and view refreshes run on.

    No address: a local Ray on this machine, with Ray's dashboard UI only if `dashboard`.
    An address (a head's GCS, `host:port`; `make ray` starts one): this process attaches to it as
    a driver and leaves it running. Its nodes run this project's environment (`patches.geneva`,
    `geneva.ray_cluster`, says why). When no head answers there, `fallback` "fail" raises
    `RayHeadUnreachable` and "local" starts a local Ray instead.
    """
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP}
    if ray_address:
        if head_answers(ray_address):
            ray_patches.use_token_if_found()
            return geneva_patches.remote_ray(ray_address, runtime_env)
        if fallback != "local":
            raise RayHeadUnreachable(
                f"no Ray head answers at {ray_address} ({variable_for('ray_address')}): start it with {START_HEAD}, "
                f"or set {variable_for('ray_fallback')}=local to run on a local Ray of the run's own")
        log.warning("no Ray head answers at %s (%s): starting a local Ray for this run (%s=local)",
                    ray_address, variable_for("ray_address"), variable_for("ray_fallback"))
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
