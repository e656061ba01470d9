"""The code location: every stage's assets, checks and sensors, merged, for the failure modes of
the data location (`defs.modes`: the shipped ones with the user's config/failure_modes.toml)."""

import dagster as dg

from avperception_assets import patches

patches.apply_at_startup()  # the code location's entry point: before the stages import lancedb and geneva

from avperception_assets.defs import audit_jobs, curation_assets, deployment_assets, evaluation_assets, export_jobs, ingest_assets, maintenance_assets, run_recovery, search_jobs, sensors, slice_assets, track_coverage_assets, training_assets  # noqa: E402
from avperception_assets.defs.modes import location_modes  # noqa: E402
from avperception_assets.defs.resources import WorkspaceResource  # noqa: E402
from avperception_assets.workspace import Workspace  # noqa: E402


def build_definitions(modes, workspace: Workspace | None = None) -> dg.Definitions:
    """The whole graph for the failure-mode registry `modes` (one set of assets per mode) in the
    workspace (default: the environment's)."""
    workspace = Workspace.from_env() if workspace is None else workspace
    return dg.Definitions.merge(
        ingest_assets.defs,
        curation_assets.build_curation_defs(modes, workspace),
        slice_assets.build_slice_defs(modes),
        maintenance_assets.build_maintenance_defs(modes),
        training_assets.build_training_defs(modes),
        track_coverage_assets.build_track_coverage_defs(modes),
        evaluation_assets.build_evaluation_defs(modes),
        evaluation_assets.build_base_report_defs(modes),
        deployment_assets.build_deployment_defs(modes),
        sensors.build_sensor_defs(modes, workspace),
        audit_jobs.build_audit_defs(modes),
        search_jobs.defs,
        export_jobs.defs,
        run_recovery.defs,
        dg.Definitions(
            resources={"workspace": WorkspaceResource()},  # every field from the environment (`workspace.VARIABLES`)
            # One run = one process: Ray starts once per run and training holds the CPU/GPU alone.
            executor=dg.in_process_executor,
        ),
    )


_workspace = Workspace.from_env()
defs = build_definitions(location_modes(_workspace), _workspace)
