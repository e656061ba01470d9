"""The closed loop: `new_footage_sensor` ingests each READY batch (curation columns and slice
views refresh in the same run); `slice_growth_sensor` then retrains and re-evaluates exactly the
failure modes whose train view grew past the retrain policy; `footage_automation_sensor`
(declarative automation) brings everything after raw_frames up to date when raw_frames was
materialized some other way.

Neither keeps a cursor: Dagster launches one run per run key, so a batch id (or a mode at a view
version) requested again while its run is queued or done is skipped by the daemon."""

import dagster as dg

from avperception_assets.model import detector
from avperception_assets.ingest import frames as ingest
from avperception_assets.workspace import Workspace, variable_for
from avperception_assets.failure_modes.registry import check_registry
from avperception_assets.model.retrain_policy import RetrainPolicy
from avperception_assets.defs.ingest_assets import RawFramesConfig
from avperception_assets.defs.names import BASE_DETECTOR, BASE_DETECTOR_REPORT, DEPLOYMENT, EVALUATION, FAILURE_MODE_SUMMARY, RAW_FRAMES, TRAINING, checkpoint_key, eval_report_key, latest_metadata, view_key
from avperception_assets.defs.resources import WorkspaceResource

# Ingestion and everything that refreshes with it; retraining is the growth sensor's call, and an
# ONNX export a deliberate step of a deployment.
FOOTAGE_SELECTION = (dg.AssetSelection.assets(RAW_FRAMES).downstream()
                     - dg.AssetSelection.groups(TRAINING, EVALUATION, DEPLOYMENT))


def footage_request(batch_id: str) -> dg.RunRequest:
    """The run that ingests one batch and refreshes everything downstream of it."""
    return dg.RunRequest(
        run_key=batch_id,
        run_config=dg.RunConfig(ops={RAW_FRAMES.to_python_identifier(): RawFramesConfig(batch_ids=[batch_id])}),
        tags={"avp/batch_id": batch_id},
    )


def _footage_sensors(default_status: dg.DefaultSensorStatus) -> list[dg.SensorDefinition]:
    @dg.sensor(
        name="new_footage_sensor",
        target=FOOTAGE_SELECTION,
        default_status=default_status,
        minimum_interval_seconds=30,
        description="Requests one run per READY batch in the landing zone (run key = batch id): "
                    "ingestion, incremental backfill of the curation columns, refresh of every slice view.",
    )
    def new_footage_sensor(context: dg.SensorEvaluationContext, workspace: WorkspaceResource):
        # Decided by batch id, not by modification time: a batch that lands late with an old mtime
        # (`cp -p`, `rsync -a`) is still picked up.
        batches = ingest.pending_batches(workspace.connect(), workspace.layout.landing, workspace.storage_options)
        if not batches:
            return dg.SkipReason("no new READY batch in the landing zone")
        return [footage_request(batch_id) for batch_id in batches]

    footage_automation_sensor = dg.AutomationConditionSensorDefinition(
        "footage_automation_sensor", target=FOOTAGE_SELECTION - dg.AssetSelection.assets(RAW_FRAMES),
        default_status=default_status, minimum_interval_seconds=30,
        description="Brings curation columns, maintenance and slice views up to date after raw_frames is "
                    "materialized outside the footage sensor's runs (by hand in the UI, for example).")
    return [new_footage_sensor, footage_automation_sensor]


def modes_due(instance: dg.DagsterInstance, modes, policy: RetrainPolicy) -> dict[str, int]:
    """Failure mode → train view version, for each mode whose view grew past the policy."""
    due = {}
    for mode in modes:
        view = latest_metadata(instance, view_key(mode, "train"))
        if view is None:
            continue
        checkpoint = latest_metadata(instance, checkpoint_key(mode))
        if checkpoint is not None and checkpoint.get("train_view_version") == view["view_version"]:
            continue
        trained_rows = None if checkpoint is None else checkpoint["dagster/row_count"]
        if policy.should_retrain(view["dagster/row_count"], trained_rows):
            due[mode.name] = view["view_version"]
    return due


def _retrain_request(due: dict[str, int], with_base: bool) -> dg.RunRequest:
    keys = [key for mode in due for key in (checkpoint_key(mode), eval_report_key(mode))]
    return dg.RunRequest(
        # Mode and view version: however many ticks see the same growth, it retrains once.
        run_key="+".join(f"{m}@{v}" for m, v in sorted(due.items())),
        # The base's report re-scores it on the val frames the new footage added (no training).
        asset_selection=[*([BASE_DETECTOR] if with_base else []), *keys, BASE_DETECTOR_REPORT, FAILURE_MODE_SUMMARY],
        tags={"avp/failure_modes": ",".join(sorted(due)),
              # run monitoring fails a training run that overstays its profile's limit
              "dagster/max_runtime": str(detector.MAX_RUN_SECONDS[detector.default_profile_name()])},
    )


def retrain_requests(instance: dg.DagsterInstance, modes, policy: RetrainPolicy) -> list[dg.RunRequest]:
    """Runs that retrain and re-evaluate the modes whose train view grew past the policy.

    One run per mode, so modes retrain independently (the `training` pool runs one at a time).
    On a deployment with no base detector yet, one run trains it and then every due mode. The
    base detector is not retrained by the loop: it stays the fixed generic baseline.
    """
    due = modes_due(instance, modes, policy)
    if not due:
        return []
    if latest_metadata(instance, BASE_DETECTOR) is None:
        return [_retrain_request(due, with_base=True)]
    return [_retrain_request({mode: version}, with_base=False) for mode, version in due.items()]


def build_sensor_defs(modes, workspace: Workspace | None = None) -> dg.Definitions:
    """The loop's sensors for a registry, in the workspace's default status (default: the
    environment's; `stopped` serves the UI without the loop, and the UI can start them)."""
    modes = check_registry(modes)
    workspace = Workspace.from_env() if workspace is None else workspace
    default_status = (dg.DefaultSensorStatus.STOPPED if workspace.sensors_default_status == "stopped"
                      else dg.DefaultSensorStatus.RUNNING)

    @dg.sensor(
        name="slice_growth_sensor",
        target=dg.AssetSelection.groups(TRAINING, EVALUATION),
        default_status=default_status,
        minimum_interval_seconds=60,
        description="Retrains and re-evaluates a failure mode when its train view grew by "
                    f"{variable_for('retrain_min_new_rows')} rows or {variable_for('retrain_min_growth')} "
                    "(fraction) since its checkpoint (the workspace resource's retrain_min_new_rows and "
                    "retrain_min_growth).",
    )
    def slice_growth_sensor(context: dg.SensorEvaluationContext, workspace: WorkspaceResource):
        requests = retrain_requests(context.instance, modes, workspace.retrain_policy())
        return requests or dg.SkipReason("no train view grew past the retrain policy")

    return dg.Definitions(sensors=[*_footage_sensors(default_status), slice_growth_sensor])
