"""Every asset key, group and pool name the code location uses, named once, and the one reader
of an asset's latest materialization metadata."""

from __future__ import annotations

import dagster as dg

from avperception_assets.failure_modes.registry import FailureMode
from avperception_assets.slices.views import view_name

# Groups, in pipeline order.
INGEST = "ingest"
CURATION = "curation"
SLICES = "slices"
TRAINING = "training"
EVALUATION = "evaluation"
DEPLOYMENT = "deployment"
MAINTENANCE = "maintenance"

# Concurrency pools (dagster.yaml gives each a limit of 1).
LANCEDB_WRITES_POOL = "lancedb_writes"  # ingestion, backfills and view refreshes never race on a table
TRAINING_POOL = "training"  # two retrains never share one GPU

# Curation columns, maintenance and slice views follow new frames on their own under the daemon
# (`footage_automation_sensor`): a raw_frames materialized by hand brings them up to date. A run
# that already updated them with raw_frames (the footage sensor's) leaves nothing to request.
FOLLOWS_FOOTAGE = dg.AutomationCondition.eager()

RAW_FRAMES = dg.AssetKey("raw_frames")
BASE_DETECTOR = dg.AssetKey("base_detector")
BASE_DETECTOR_REPORT = dg.AssetKey("base_detector_report")
FAILURE_MODE_SUMMARY = dg.AssetKey("failure_mode_summary")
TABLE_MAINTENANCE = dg.AssetKey("table_maintenance")
TRACK_COVERAGE = dg.AssetKey("track_coverage")  # the base detector's coverage of each clip's tracks


def _mode_name(mode: FailureMode | str) -> str:
    return mode.name if isinstance(mode, FailureMode) else mode


def column_key(column: str) -> dg.AssetKey:
    return dg.AssetKey(column)


def view_key(mode: FailureMode | str, split: str) -> dg.AssetKey:
    return dg.AssetKey(view_name(mode, split))


def checkpoint_key(mode: FailureMode | str) -> dg.AssetKey:
    return dg.AssetKey(f"{_mode_name(mode)}_checkpoint")


def eval_report_key(mode: FailureMode | str) -> dg.AssetKey:
    return dg.AssetKey(f"{_mode_name(mode)}_eval_report")


def onnx_model_key(mode: FailureMode | str) -> dg.AssetKey:
    return dg.AssetKey(f"{_mode_name(mode)}_onnx_model")


def latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict | None:
    """The metadata values of `key`'s latest materialization; None when it has none."""
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    return {name: value.value for name, value in event.asset_materialization.metadata.items()}


def latest_checkpoint_dir(instance: dg.DagsterInstance, mode: FailureMode) -> str:
    """Where the folder of the mode's latest checkpoint materialization lives in the data location
    (a folder, or a URI on an object store); a clear failure when there is none."""
    key = checkpoint_key(mode)
    recorded = latest_metadata(instance, key)
    if recorded is None or "checkpoint_dir" not in recorded:
        raise dg.Failure(f"{key.to_user_string()} has not been materialized; materialize it first",
                         allow_retries=False)
    return recorded["checkpoint_dir"]
