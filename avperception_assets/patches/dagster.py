"""dagster 1.13.27: marking a run failed with the reason Dagster's own run monitoring records.

Symptom: `DagsterInstance.report_run_failed` takes a failure's reason only as a `JobFailureData`
(`RunFailureReason.UNEXPECTED_TERMINATION` for a run whose worker died), and the `dagster`
package exports neither: both live in the private `dagster._core.events`. Without them a run
that run recovery marks failed carries no `dagster/failure_reason` tag, so run retries and the
UI see an unknown reason instead of an unexpected termination.

`dagster.run_failure_reason` (the code is correct without it): on another version the run is
still marked failed, with the message and without the reason.

Upstream: none filed upstream (dagster-io/dagster#3239, closed, asked for a "mark as failed"
GraphQL mutation, not for this API).
"""

from __future__ import annotations

from avperception_assets.patches.versions import Patch

RUN_FAILURE_REASON = Patch(
    "dagster.run_failure_reason", {"dagster": "1.13.27"}, correctness=False,
    without="runs that run recovery marks failed carry no failure reason (dagster/failure_reason)")

PATCHES = (RUN_FAILURE_REASON,)


def report_run_failed(instance, run, message: str) -> None:
    """Mark `run` failed with `message`, its reason an unexpected termination."""
    if not RUN_FAILURE_REASON.applies():
        instance.report_run_failed(run, message=message)
        return
    from dagster._core.events import JobFailureData, RunFailureReason

    instance.report_run_failed(run, message=message, job_failure_data=JobFailureData(
        error=None, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION))
