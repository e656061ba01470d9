"""The code location: every stage's assets, checks and sensors, merged."""

import os

import dagster as dg

from .defs import ingest_assets, sensors
from .defs.resources import LanceDBResource

defs = dg.Definitions.merge(
    ingest_assets.defs,
    sensors.defs,
    dg.Definitions(
        resources={"lancedb": LanceDBResource(ray_address=os.environ.get("AVP_RAY_ADDRESS") or None)},
        # One run = one process: Ray starts once per run and training holds the CPU/GPU alone.
        executor=dg.in_process_executor,
    ),
)
