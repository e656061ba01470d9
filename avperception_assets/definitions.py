"""The code location: every stage's assets, checks and sensors, merged."""

import dagster as dg

from avperception_assets.defs import audit_jobs, curation_assets, deployment_assets, evaluation_assets, export_jobs, ingest_assets, maintenance_assets, run_recovery, search_jobs, sensors, slice_assets, training_assets
from avperception_assets.defs.resources import WorkspaceResource

defs = dg.Definitions.merge(
    ingest_assets.defs,
    curation_assets.defs,
    slice_assets.defs,
    maintenance_assets.defs,
    training_assets.defs,
    evaluation_assets.defs,
    deployment_assets.defs,
    sensors.defs,
    audit_jobs.defs,
    search_jobs.defs,
    export_jobs.defs,
    run_recovery.defs,
    dg.Definitions(
        resources={"workspace": WorkspaceResource()},  # every field from the environment (`workspace.VARIABLES`)
        # One run = one process: Ray starts once per run and training holds the CPU/GPU alone.
        executor=dg.in_process_executor,
    ),
)
