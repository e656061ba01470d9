"""Marking a run failed with its reason (`patches.dagster`): Dagster 1.13 exports no way to say
why (the symptom; once it does, the first test fails and says the patch can go), and what run
recovery records with the patch and, on another Dagster, without it."""

import logging

import dagster as dg

from avperception_assets.patches import dagster as dagster_patches, versions

from .conftest import fake_distribution

FAILURE_REASON_TAG = "dagster/failure_reason"


def test_dagster_exports_no_way_to_give_a_run_failure_s_reason():
    assert not {"JobFailureData", "RunFailureReason"} & set(dir(dg)), (
        "dagster exports a failure reason now: import it from dagster and delete dagster.run_failure_reason")


@dg.op
def noop():
    pass


@dg.job
def one_op():
    noop()


def _failed_run(instance) -> dg.DagsterRun:
    run = instance.create_run_for_job(one_op)
    dagster_patches.report_run_failed(instance, run, "run worker process 1 is gone")
    return instance.get_run_by_id(run.run_id)


def test_a_run_marked_failed_carries_an_unexpected_termination():
    with dg.instance_for_test() as instance:
        run = _failed_run(instance)
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert run.tags[FAILURE_REASON_TAG] == "UNEXPECTED_TERMINATION"


def test_on_another_dagster_the_run_is_failed_without_a_reason_and_a_warning_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.syspath_prepend(str(fake_distribution(tmp_path, "dagster", "99.0.0")))
    monkeypatch.setattr(versions, "_reported", set())
    with dg.instance_for_test() as instance, caplog.at_level(logging.WARNING, logger=versions.__name__):
        run = _failed_run(instance)
    assert run.status == dg.DagsterRunStatus.FAILURE and FAILURE_REASON_TAG not in run.tags
    [warning] = [r.getMessage() for r in caplog.records if r.name == versions.__name__]
    assert "patch dagster.run_failure_reason" in warning and "dagster 99.0.0 (written for 1.13.27)" in warning
