"""Dagster resources shared by every stage."""

import contextlib
from pathlib import Path

import dagster as dg
from pydantic import Field, PrivateAttr

from avperception_assets.cluster.ray import ray_context
from avperception_assets.model.retrain_policy import RetrainPolicy
from avperception_assets.storage import artifacts, tables as storage
from avperception_assets.workspace import Workspace, WorkspaceError, env_settings, variable_for
from avperception_assets.defs.run_recovery import fail_dead_runs


def _from_env(name: str):
    """A field defaulting to the workspace the environment describes (read when the resource is built)."""
    return Field(default_factory=lambda: getattr(Workspace.from_env(), name),
                 description=f"Default: {variable_for(name)} (see the configuration table).")


class WorkspaceResource(dg.ConfigurableResource):
    """Where a deployment keeps its state, and its settings: the data location and its folder
    layout (`layout`), the LanceDB/Geneva connection, and one Ray context per run (started on
    first use). Every field defaults from the environment (`Workspace.from_env`)."""

    data_location: str = _from_env("data_location")
    # None: `<data_location>/lancedb`, so that a data location set here moves LanceDB with it.
    lancedb_uri: str | None = Field(default_factory=lambda: env_settings().get("lancedb_uri"),
                                    description=f"Default: {variable_for('lancedb_uri')}, else <data_location>/lancedb.")
    storage_options: dict[str, str] = Field(default_factory=dict, description="LanceDB's storage options "
                                            "(credentials, region, endpoint of an object store).")
    ray_address: str | None = _from_env("ray_address")
    ray_fallback: str = _from_env("ray_fallback")
    ray_dashboard: bool = _from_env("ray_dashboard")
    embedding_model: str = _from_env("embedding_model")
    dead_run_check: bool = _from_env("dead_run_check")
    retrain_min_new_rows: int = _from_env("retrain_min_new_rows")
    retrain_min_growth: float = _from_env("retrain_min_growth")
    cache_dir: str = _from_env("cache_dir")

    _ray_stack: contextlib.ExitStack | None = PrivateAttr(default=None)

    @property
    def layout(self) -> Workspace:
        """The plain workspace of these fields: folders under the data location, LanceDB's URI."""
        return Workspace(data_location=self.data_location, lancedb_uri=self.lancedb_uri,
                         storage_options=self.storage_options, ray_address=self.ray_address,
                         ray_fallback=self.ray_fallback, ray_dashboard=self.ray_dashboard,
                         embedding_model=self.embedding_model,
                         dead_run_check=self.dead_run_check, retrain_min_new_rows=self.retrain_min_new_rows,
                         retrain_min_growth=self.retrain_min_growth, cache_dir=self.cache_dir)

    def retrain_policy(self) -> RetrainPolicy:
        return RetrainPolicy(self.retrain_min_new_rows, self.retrain_min_growth)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Before this run claims a pool slot: free the slots of runs whose worker died.
        if self.dead_run_check and context.instance is not None:
            for run_id in fail_dead_runs(context.instance, exclude_run_id=context.run.run_id if context.run else None):
                context.log.warning(f"run {run_id} had lost its worker process: marked failed, pool slots freed")

    def pull(self, path: Path) -> Path:
        """A file or folder of the working copy (checkpoints, reports, exports), brought up to date
        from an object-store data location before it is read (`storage.artifacts`); returns it."""
        artifacts.pull(self.layout, path)
        return path

    def push(self, path: Path) -> str:
        """Upload a file or folder of the working copy to an object-store data location after it
        was written; returns where it lives there (its URI), what asset metadata shows."""
        artifacts.push(self.layout, path)
        return self.layout.location_of(path)

    def pulled(self, location: str, *names: str) -> Path:
        """The working copy of a file or folder that metadata recorded by its location (`push`),
        pulled whole, or only the files `names` in it."""
        try:
            path = self.layout.working_copy(location)
            for name in names or ("",):
                self.pull(path / name)
        except WorkspaceError as exc:
            raise dg.Failure(f"{exc}: it was written by a workspace with another data location",
                             allow_retries=False) from exc
        return path

    def connect(self):
        return storage.connect(self.layout.lancedb_uri, self.storage_options)

    def ensure_ray(self) -> None:
        """Start Ray once, or attach to the shared head at `ray_address`; later calls in the same
        run, or a Ray already running in this process (a test session's), are reused: Ray's
        start costs seconds."""
        import ray

        if self._ray_stack is None and not ray.is_initialized():
            stack = contextlib.ExitStack()
            stack.enter_context(ray_context(self.ray_address, dashboard=self.ray_dashboard, fallback=self.ray_fallback))
            self._ray_stack = stack

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._ray_stack is not None:
            self._ray_stack.close()
            self._ray_stack = None
