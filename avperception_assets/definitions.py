"""The code location: every stage's assets, checks and sensors, merged."""

import os

import dagster as dg

from avperception_assets import patches

patches.apply_at_startup()  # the code location's entry point: before the stages import lancedb and geneva

from avperception_assets.defs import audit_jobs, curation_assets, deployment_assets, evaluation_assets, export_jobs, ingest_assets, maintenance_assets, run_recovery, search_jobs, sensors, slice_assets, training_assets  # noqa: E402
from avperception_assets.defs.resources import LanceDBResource  # noqa: E402

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
        resources={"lancedb": LanceDBResource(ray_address=os.environ.get("AVP_RAY_ADDRESS") or None)},
        # One run = one process: Ray starts once per run and training holds the CPU/GPU alone.
        executor=dg.in_process_executor,
    ),
)
