"""When a failure mode retrains: its train view grew past the policy since its checkpoint."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetrainPolicy:
    """A mode retrains when its train view grew by `min_new_rows` rows or by `min_growth` (a
    fraction of the rows its checkpoint saw), whichever comes first; 0 disables a criterion.
    (The deployment's thresholds are the workspace's `retrain_min_new_rows` and `retrain_min_growth`.)"""

    min_new_rows: int
    min_growth: float

    def should_retrain(self, view_rows: int, trained_rows: int | None) -> bool:
        if trained_rows is None:  # never trained
            return view_rows > 0
        grown = view_rows - trained_rows
        if grown <= 0:
            return False
        by_rows = self.min_new_rows > 0 and grown >= self.min_new_rows
        by_share = self.min_growth > 0 and grown >= self.min_growth * max(trained_rows, 1)
        return by_rows or by_share
