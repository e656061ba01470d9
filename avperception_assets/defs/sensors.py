"""`new_footage_sensor`: a READY landing batch becomes one ingestion run."""

import dagster as dg

from .. import ingest, sensors, settings
from .resources import LanceDBResource

# Ingestion and everything that refreshes with it; retraining is decided by its own sensor.
FOOTAGE_SELECTION = dg.AssetSelection.assets("raw_frames").downstream() - dg.AssetSelection.groups("training", "evaluation")


@dg.sensor(
    name="new_footage_sensor",
    target=FOOTAGE_SELECTION,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Requests one run per READY batch in the landing zone (run key = batch id).",
)
def new_footage_sensor(context: dg.SensorEvaluationContext, lancedb: LanceDBResource):
    requested = sensors.read_cursor(context.cursor)
    processed = ingest.ingested_batch_ids(lancedb.connect())
    batches = sensors.batches_to_request(settings.landing_dir(), processed, requested)
    if not batches:
        return dg.SkipReason("no new READY batch in the landing zone")
    context.update_cursor(sensors.write_cursor(requested | set(batches)))
    return [
        dg.RunRequest(
            run_key=batch_id,
            run_config={"ops": {"raw_frames": {"config": {"batch_ids": [batch_id]}}}},
            tags={"avp/batch_id": batch_id},
        )
        for batch_id in batches
    ]


defs = dg.Definitions(sensors=[new_footage_sensor])
