"""When a failure mode retrains: the policy as a plain function."""

import pytest

from avperception_assets.model.retrain_policy import RetrainPolicy


@pytest.mark.parametrize(
    ("view_rows", "trained_rows", "expected"),
    [
        (10, None, True),  # never trained: train
        (0, None, False),  # nothing to train on
        (500, 500, False),  # no growth
        (480, 500, False),  # shrank (rows deleted upstream)
        (599, 500, False),  # +99 rows, +19.8%: below both thresholds
        (600, 500, True),  # +100 rows
        (130, 100, True),  # +30 rows but +30%
        (124, 100, False),
    ],
)
def test_retrain_policy_thresholds(view_rows, trained_rows, expected):
    policy = RetrainPolicy(min_new_rows=100, min_growth=0.25)
    assert policy.should_retrain(view_rows, trained_rows) is expected


def test_retrain_policy_criteria_can_be_disabled():
    policy = RetrainPolicy(min_new_rows=0, min_growth=0.5)
    assert not policy.should_retrain(10_000 + 4_999, 10_000)
    assert policy.should_retrain(15_000, 10_000)

