"""Dagster resources shared by every stage."""

import contextlib

import dagster as dg
from pydantic import PrivateAttr

from avperception_assets.cluster.ray import ray_context
from avperception_assets.storage import tables as storage
from avperception_assets.defs.run_recovery import fail_dead_runs


class LanceDBResource(dg.ConfigurableResource):
    """The LanceDB/Geneva backbone, plus one Ray context per run (started on first use).

    `uri` defaults to `$AVP_DATA_DIR/lancedb` (or `$AVP_LANCEDB_URI`); `ray_address` sends
    backfills and view refreshes to a Ray cluster instead of a local Ray.
    """

    uri: str | None = None
    ray_address: str | None = None

    _ray_stack: contextlib.ExitStack | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Before this run claims a pool slot: free the slots of runs whose worker died.
        if context.instance is not None:
            for run_id in fail_dead_runs(context.instance, exclude_run_id=context.run.run_id if context.run else None):
                context.log.warning(f"run {run_id} had lost its worker process: marked failed, pool slots freed")

    def connect(self):
        return storage.connect(self.uri)

    def ensure_ray(self) -> None:
        """Start Ray once; later calls in the same run, or a Ray already running in this
        process (a test session's), are reused: Ray's start costs seconds."""
        import ray

        if self._ray_stack is None and not ray.is_initialized():
            stack = contextlib.ExitStack()
            stack.enter_context(ray_context(self.ray_address))
            self._ray_stack = stack

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._ray_stack is not None:
            self._ray_stack.close()
            self._ray_stack = None
